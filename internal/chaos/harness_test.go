package chaos

import (
	"context"
	"errors"
	"syscall"
	"testing"
	"time"
)

// TestDownstreamScript checks the harness itself: phases bound by request
// count and by time, each fault, and the counts.
func TestDownstreamScript(t *testing.T) {
	d := startDownstream(t,
		Phase{Name: "three ok", Requests: 3},
		Phase{Name: "two 503", Fault: Fault{Outage: true}, Requests: 2},
		Phase{Name: "refusing", Fault: Fault{Refuse: true}, For: 100 * time.Millisecond},
		Phase{Name: "reset", Fault: Fault{ResetRate: 1}, Requests: 1},
		Phase{Name: "hang", Fault: Fault{HangRate: 1}, Requests: 1},
		Phase{Name: "healthy"},
	)
	client := newClient(t, 2*time.Second)
	ctx := context.Background()
	for i := range 3 {
		v, err := doGet(withID(ctx, "ok-"+string(rune('a'+i))), client, d.URL())
		if err != nil || v.ID != "ok-"+string(rune('a'+i)) {
			t.Fatalf("request %d: %+v, %v; want its ID back", i, v, err)
		}
	}
	for i := range 2 {
		if _, err := doGet(ctx, client, d.URL()); !errors.Is(err, ErrDownstream) {
			t.Fatalf("outage request %d: %v; want a 503", i, err)
		}
	}
	// The 5th request ended the outage: refusing now, keep-alive
	// connections included.
	if got := d.Current(); got != 2 {
		t.Fatalf("phase %d after 5 requests; want 2", got)
	}
	if _, err := doGet(ctx, client, d.URL()); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("refusing: %v; want ECONNREFUSED", err)
	}
	select {
	case <-d.Entered(3):
	case <-time.After(2 * time.Second):
		t.Fatal("the refusing phase did not end on time")
	}
	if got := d.Started(3).Sub(d.Started(2)); got != 100*time.Millisecond {
		t.Errorf("refusing phase lasted %v; want its 100ms exactly (phases end on schedule)", got)
	}
	// Listening again on the same port.
	if _, err := doGet(ctx, client, d.URL()); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("reset: %v; want ECONNRESET", err)
	}
	hctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	start := time.Now()
	_, err := doGet(hctx, client, d.URL())
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("hang: %v; want the client's deadline", err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("hang returned after %v", took)
	}
	if !waitFor(2*time.Second, func() bool { return d.Stats().Hung == 1 }) {
		t.Errorf("hung requests = %d; want 1 once the client gave up", d.Stats().Hung)
	}
	if _, err := doGet(ctx, client, d.URL()); err != nil {
		t.Fatalf("healthy: %v", err)
	}
	want := Stats{Received: 8, Served: 4, Failed: 2, Hung: 1, Reset: 1}
	got := d.Stats()
	got.Conns = 0
	if got != want {
		t.Errorf("stats %+v; want %+v", got, want)
	}
	if ids := d.ServedIDs(); len(ids) != 3 || ids["ok-a"] != 1 {
		t.Errorf("served IDs %v; want ok-a, ok-b, ok-c once each", ids)
	}
	if s := d.PhaseStats(1); s.Received != 2 || s.Failed != 2 {
		t.Errorf("outage phase stats %+v; want 2 received, 2 failed", s)
	}
	if d.Err() != nil {
		t.Error(d.Err())
	}
}
