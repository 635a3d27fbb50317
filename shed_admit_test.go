package resilience

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// admitCall is one Admit call running in its own goroutine.
type admitCall struct {
	release func()
	err     error
	done    chan struct{}
}

func startAdmit(ctx context.Context, b *Bulkhead, prio int) *admitCall {
	c := &admitCall{done: make(chan struct{})}
	go func() {
		defer close(c.done)
		c.release, c.err = b.Admit(ctx, prio)
	}()
	return c
}

// Admit follows Shed's rules: a free slot at once; priority 0 shed at once
// and counted; a higher priority waits and is served first; the lowest
// waiter displaced when the queue is full; PriorityHighest never shed.
func TestAdmitPriorities(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reader := withReader(t)
		base := collect(t, reader)
		name := uniqueName("admit")
		b := mustBulkhead(t, BulkheadConfig{Name: name, Limit: 1, MaxQueue: 1})
		ctx := context.Background()
		holder, err := b.Admit(ctx, 1)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := b.Admit(ctx, 0); !errors.Is(err, ErrBulkheadFull) {
			t.Fatalf("Admit(0) while full = %v; want ErrBulkheadFull", err)
		}
		low := startAdmit(ctx, b, 1)
		synctest.Wait()
		high := startAdmit(ctx, b, 5) // the queue is full: displaces low
		synctest.Wait()
		<-low.done
		if !errors.Is(low.err, ErrBulkheadFull) {
			t.Fatalf("displaced waiter: %v; want ErrBulkheadFull", low.err)
		}
		top := startAdmit(ctx, b, PriorityHighest) // never shed, queue or not
		synctest.Wait()
		if bhClosed(top.done) || bhClosed(high.done) {
			t.Fatal("a waiter was answered while the slot was held")
		}
		holder()
		holder() // a second call gives nothing back twice
		<-top.done
		if top.err != nil {
			t.Fatalf("PriorityHighest: %v", top.err)
		}
		if bhClosed(high.done) {
			t.Fatal("priority 5 served before PriorityHighest gave its slot back")
		}
		top.release()
		<-high.done
		if high.err != nil {
			t.Fatal(high.err)
		}
		high.release()
		if s := b.Stats(); s.Active != 0 {
			t.Fatalf("Active = %d; want 0", s.Active)
		}
		c := since(base, collect(t, reader))
		wantPoints(t, c, "resilience.shed.rejections", "counter", "{request}",
			"priority=0,resource_type="+name+"=1",
			"priority=1,resource_type="+name+"=1")
	})
}

// A waiter whose context ends leaves with the context's error, uncounted.
func TestAdmitCanceledWaiter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Name: "admit-cancel", Limit: 1})
		holder, _ := b.Admit(context.Background(), 1)
		ctx, cancel := context.WithCancel(context.Background())
		w := startAdmit(ctx, b, 3)
		synctest.Wait()
		cancel()
		<-w.done
		if !errors.Is(w.err, context.Canceled) || w.release == nil {
			t.Fatalf("canceled waiter: %v; want context.Canceled and a release that does nothing", w.err)
		}
		w.release() // as defer release() would: gives back nothing
		if s := b.Stats(); s.Active != 1 {
			t.Fatalf("Stats = %+v after the refused request's release; want the holder still inside", s)
		}
		holder()
		if s := b.Stats(); s.Active != 0 || s.Waiting != 0 {
			t.Fatalf("Stats = %+v; want nothing active or waiting", s)
		}
	})
}

// A switched-off bulkhead admits everything at once, without a slot.
func TestAdmitSwitchedOff(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Enabled = false
	cfg.Bulkheads["OFFB"] = BulkheadConfig{Limit: 1}
	reg, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	b := reg.Bulkhead("offb")
	for range 3 {
		rel, err := b.Admit(context.Background(), 0)
		if err != nil {
			t.Fatal(err)
		}
		defer rel()
	}
}

// An adaptive bulkhead learns from what Admit's release reports: with a
// fast handler fully used, its limit grows.
func TestAdmitAdaptiveLimitLearns(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Name: uniqueName("admit-adaptive"), Limit: 20, Adaptive: &AdaptiveConfig{MinLimit: 2, MaxLimit: 40}})
		ctx, stop := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for range 60 {
			wg.Go(func() {
				for ctx.Err() == nil {
					release, err := b.Admit(ctx, 0)
					if err != nil {
						time.Sleep(time.Millisecond)
						continue
					}
					time.Sleep(10 * time.Millisecond)
					release()
				}
			})
		}
		time.Sleep(3 * time.Second)
		if got := b.Limit(); got <= 20 {
			t.Errorf("limit %d after 3s of a fast, fully used server; want above its start, 20", got)
		}
		stop()
		wg.Wait()
	})
}

// downStore's global limiter fails as a store that cannot be reached does.
type downStore struct{ memStore }

func (s *downStore) Limiter(string, int) Limiter { return downLimiter{} }

type downLimiter struct{}

func (downLimiter) Acquire(context.Context) (func(), error) {
	return nil, errors.New("store unreachable")
}

// A request the global limit refuses is shed by Admit and by Shed alike,
// with its local slot given back: for a full global limit, and for a
// global limiter that fails (as one matching ErrBulkheadFull).
func TestAdmitGlobalLimitRefuses(t *testing.T) {
	RegisterStore("admit-mem", func(string) (Store, error) { return &memStore{}, nil })
	RegisterStore("admit-down", func(string) (Store, error) { return &downStore{}, nil })
	for _, scheme := range []string{"admit-mem", "admit-down"} {
		t.Run(scheme, func(t *testing.T) {
			reg := mustRegistry(t, map[string]string{
				"RESILIENCE_STORE_URL":      scheme + "://fleet",
				"BULKHEAD_API_LIMIT":        "5",
				"BULKHEAD_API_GLOBAL_LIMIT": "1",
			})
			defer reg.Close()
			b := reg.Bulkhead("api")
			var release func()
			if scheme == "admit-mem" {
				var err error
				if release, err = b.Admit(context.Background(), 0); err != nil {
					t.Fatalf("the first request: %v", err)
				}
			}
			if _, err := b.Admit(context.Background(), 0); !errors.Is(err, ErrBulkheadFull) {
				t.Fatalf("Admit past the global limit: %v; want ErrBulkheadFull", err)
			}
			h := Shed(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { t.Error("served past the global limit") }), ShedConfig{Bulkhead: b})
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
			if rec.Code != http.StatusServiceUnavailable {
				t.Fatalf("Shed past the global limit: %d; want 503", rec.Code)
			}
			want := 0
			if release != nil {
				want = 1
			}
			if got := b.Stats().Active; got != want {
				t.Fatalf("Active = %d; want %d: a refused request keeps no local slot", got, want)
			}
			if release != nil {
				release()
			}
		})
	}
}
