package resilience

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

// TestChaosDrill is the rehearsal of docs/runbook.md, end to end on real
// loopback servers: faults injected at 100% for a service that is healthy
// open its breaker through Transport, and the fallback answers; switched
// off through the admin endpoint, the breaker closes after its open
// timeout, on the next call's probe.
func TestChaosDrill(t *testing.T) {
	var hits atomic.Int64
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		hits.Add(1)
		io.WriteString(w, "live")
	}))
	defer api.Close()
	const openTimeout = 200 * time.Millisecond
	reg := mustRegistry(t, map[string]string{
		"RESILIENCE_CHAOS":             "true",
		"CHAOS_API_ERROR_RATE":         "1",
		"CIRCUIT_BREAKER_API_FAIL_MAX": "3",
		"CIRCUIT_BREAKER_API_TIMEOUT":  openTimeout.String(),
		"RETRY_MAX_ATTEMPTS":           "1",
	})
	defer reg.Close()
	client := &http.Client{Transport: &Transport{Registry: reg, Service: func(*http.Request) string { return "api" }}}
	defer client.CloseIdleConnections()
	get := WithFallback(func(ctx context.Context) (string, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, api.URL, nil)
		if err != nil {
			return "", err
		}
		resp, err := client.Do(req)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}, FallbackValue("cached"))
	admin := httptest.NewServer(AdminHandler(reg))
	defer admin.Close()

	for i := range 5 {
		if v, err := get(context.Background()); v != "cached" || err != nil {
			t.Fatalf("call %d during the drill: %q, %v; want the fallback's %q", i, v, err, "cached")
		}
	}
	cb := reg.CircuitBreaker("api")
	if s := cb.State(); s != StateOpen {
		t.Fatalf("breaker %v after 5 injected failures with FAIL_MAX 3, want open", s)
	}
	if n := hits.Load(); n != 0 {
		t.Fatalf("the healthy server was reached %d times during the drill, want 0", n)
	}

	if code, body := post(t, admin.URL+"/chaos/api/off", ""); code != http.StatusOK {
		t.Fatalf("POST /chaos/api/off: %d %s", code, body)
	}
	if v, _ := get(context.Background()); v != "cached" {
		t.Errorf("right after the drill stopped: %q, want the fallback's while the breaker is still open", v)
	}
	// The open timeout runs on the real clock: the servers are real.
	<-time.After(openTimeout)
	if v, err := get(context.Background()); v != "live" || err != nil {
		t.Errorf("after the open timeout: %q, %v; want the server's %q from the probe", v, err, "live")
	}
	if s := cb.State(); s != StateClosed {
		t.Errorf("breaker %v after a good probe, want closed", s)
	}
	if n := hits.Load(); n != 1 {
		t.Errorf("the server was reached %d times, want 1: the probe", n)
	}
}
