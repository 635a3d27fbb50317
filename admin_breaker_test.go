package resilience

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"testing/synctest"
	"time"
)

// The admin endpoint's report of a breaker's window, mode, thresholds and
// open period. The tests run in a synctest bubble, so that durations are
// exact. A server in the bubble whose goroutines wait on the network would
// keep the bubble's clock from moving, so each request gets a server of its
// own, closed before the test sleeps again.

// adminGet serves reg's admin endpoint on a fresh httptest server, GETs
// path and returns the body, decoded into v and as generic JSON.
func adminGet(t *testing.T, reg *Registry, path string, v any) map[string]any {
	t.Helper()
	srv := httptest.NewServer(AdminHandler(reg))
	defer srv.Close()
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get(srv.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s = %d %s (%v)", path, resp.StatusCode, body, err)
	}
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("GET %s: %v\n%s", path, err, body)
	}
	var raw map[string]any
	json.Unmarshal(body, &raw)
	return raw
}

// getBreaker returns GET /breakers/{name}, decoded and as generic JSON.
func getBreaker(t *testing.T, reg *Registry, name string) (BreakerStatus, map[string]any) {
	t.Helper()
	var bs BreakerStatus
	raw := adminGet(t, reg, "/breakers/"+name, &bs)
	return bs, raw
}

// checkKeys fails unless the JSON object m has every key of has and none of
// hasNot.
func checkKeys(t *testing.T, what string, m map[string]any, has, hasNot []string) {
	t.Helper()
	for _, k := range has {
		if _, ok := m[k]; !ok {
			t.Errorf("%s: no %q in %v", what, k, m)
		}
	}
	for _, k := range hasNot {
		if v, ok := m[k]; ok {
			t.Errorf("%s: %q = %v; want it left out", what, k, v)
		}
	}
}

func TestAdminBreakerWindow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := mustRegistry(t, map[string]string{
			"CIRCUIT_BREAKER_LLM_FAILURE_RATIO":      "0.5",
			"CIRCUIT_BREAKER_LLM_MINIMUM_THROUGHPUT": "10",
			"CIRCUIT_BREAKER_LLM_SAMPLING_WINDOW":    "10s",
			"CIRCUIT_BREAKER_LLM_SLOW_CALL_DURATION": "1s",
			"CIRCUIT_BREAKER_LLM_SLOW_CALL_RATIO":    "0.8",
			"CIRCUIT_BREAKER_LLM_TIMEOUT":            "8s",
			"CIRCUIT_BREAKER_LLM_MAX_TIMEOUT":        "1m",
		})
		cb := reg.CircuitBreaker("llm")
		ctx := context.Background()
		fail, ok := WithCircuitBreaker(failFunc, cb), WithCircuitBreaker(okFunc, cb)
		slow := WithCircuitBreaker(func(context.Context) (int, error) { time.Sleep(2 * time.Second); return 1, nil }, cb)
		// 10 calls, the minimum: 3 failures (30% < 50%), 2 slow (20% < 80%).
		for range 3 {
			fail(ctx)
		}
		for range 5 {
			ok(ctx)
		}
		for range 2 {
			slow(ctx)
		}

		bs, raw := getBreaker(t, reg, "llm")
		if bs.State != "closed" || bs.Mode != "normal" || bs.FailureRatio != 0.3 || bs.SlowCallRatio != 0.2 ||
			bs.OpenPeriod != "8s" || bs.RetryAfter != "" {
			t.Errorf("llm = %+v; want closed, normal, failure_ratio 0.3, slow_call_ratio 0.2, open_period 8s", bs)
		}
		if c := bs.Counts; c.WindowCalls != 10 || c.WindowFailures != 3 || c.WindowSlowCalls != 2 {
			t.Errorf("counts = %+v; want 10 window calls, 3 failures, 2 slow", c)
		}
		want := BreakerThresholds{
			FailureRatio: 0.5, MinimumThroughput: 10, SamplingWindow: "10s", SlowCallDuration: "1s",
			SlowCallRatio: 0.8, OpenTimeout: "8s", MaxOpenTimeout: "1m0s",
		}
		if bs.Thresholds != want {
			t.Errorf("thresholds = %+v; want %+v", bs.Thresholds, want)
		}
		checkKeys(t, "llm", raw, []string{"mode", "failure_ratio", "slow_call_ratio", "open_period", "thresholds"}, []string{"retry_after"})
		th, _ := raw["thresholds"].(map[string]any)
		checkKeys(t, "llm thresholds", th, []string{
			"failure_ratio", "minimum_throughput", "sampling_window", "slow_call_duration", "slow_call_ratio",
			"open_timeout", "max_open_timeout",
		}, []string{"fail_max"})
		counts, _ := raw["counts"].(map[string]any)
		if counts["window_calls"] != 10.0 || counts["window_failures"] != 3.0 || counts["window_slow_calls"] != 2.0 {
			t.Errorf("counts JSON = %v", counts)
		}

		// The window forgets: the ratios are of the window now.
		time.Sleep(15 * time.Second)
		bs, _ = getBreaker(t, reg, "llm")
		if bs.Counts.WindowCalls != 0 || bs.FailureRatio != 0 || bs.SlowCallRatio != 0 {
			t.Errorf("a window later: counts %+v, ratios %v %v; want all 0", bs.Counts, bs.FailureRatio, bs.SlowCallRatio)
		}

		// 10 failures open it for OpenTimeout; each failed probe doubles the
		// open period, up to MaxOpenTimeout.
		for range 10 {
			fail(ctx)
		}
		for i, period := range []string{"8s", "16s", "32s", "1m0s", "1m0s"} {
			bs, _ = getBreaker(t, reg, "llm")
			if bs.State != "open" || bs.OpenPeriod != period || bs.RetryAfter != period {
				t.Fatalf("open %d: state %s, open_period %q, retry_after %q; want open, %s, %s",
					i, bs.State, bs.OpenPeriod, bs.RetryAfter, period, period)
			}
			d, _ := time.ParseDuration(period)
			time.Sleep(d - 3*time.Second)
			if bs, _ = getBreaker(t, reg, "llm"); bs.RetryAfter != "3s" {
				t.Fatalf("open %d, 3s before the probe: retry_after %q; want 3s", i, bs.RetryAfter)
			}
			time.Sleep(3*time.Second + 1) // gobreaker goes half-open just after the period
			bs, raw = getBreaker(t, reg, "llm")
			if bs.State != "half-open" || bs.OpenPeriod != period {
				t.Fatalf("after open %d: state %s, open_period %q; want half-open, %s", i, bs.State, bs.OpenPeriod, period)
			}
			checkKeys(t, "half-open llm", raw, nil, []string{"retry_after"})
			fail(ctx) // the probe fails
		}

		// A probe that succeeds closes it: the open period is OpenTimeout
		// again.
		time.Sleep(time.Minute + 1)
		ok(ctx)
		if bs, _ = getBreaker(t, reg, "llm"); bs.State != "closed" || bs.OpenPeriod != "8s" {
			t.Errorf("closed again: state %s, open_period %q; want closed, 8s", bs.State, bs.OpenPeriod)
		}
	})
}

func TestAdminBreakerShadow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := mustRegistry(t, map[string]string{
			"CIRCUIT_BREAKER_LLM_MODE":     "shadow",
			"CIRCUIT_BREAKER_LLM_FAIL_MAX": "2",
			"CIRCUIT_BREAKER_LLM_TIMEOUT":  "5s",
		})
		llm := reg.CircuitBreaker("llm")
		reg.CircuitBreaker("auth")
		ctx := context.Background()
		for range 2 {
			WithCircuitBreaker(failFunc, llm)(ctx)
		}
		// Open, but in shadow mode it lets calls through.
		if _, err := WithCircuitBreaker(okFunc, llm)(ctx); err != nil {
			t.Fatalf("a call through the open shadow breaker: %v", err)
		}
		time.Sleep(time.Second)

		var st Status
		adminGet(t, reg, "/", &st)
		if len(st.Breakers) != 2 {
			t.Fatalf("breakers %+v", st.Breakers)
		}
		auth, shadow := st.Breakers[0], st.Breakers[1]
		if shadow.Name != "llm" || shadow.Mode != "shadow" || shadow.State != "open" || shadow.RetryAfter != "4s" ||
			shadow.OpenPeriod != "5s" || shadow.Thresholds != (BreakerThresholds{FailMax: 2, OpenTimeout: "5s"}) {
			t.Errorf("llm = %+v; want shadow, open, retry_after 4s, open_period 5s, fail_max 2", shadow)
		}
		// DefaultConfig's breaker: 5 failures, 60s, no other trigger.
		if auth.Name != "auth" || auth.Mode != "normal" || auth.State != "closed" || auth.OpenPeriod != "1m0s" ||
			auth.RetryAfter != "" || auth.Thresholds != (BreakerThresholds{FailMax: 5, OpenTimeout: "1m0s"}) {
			t.Errorf("auth = %+v; want normal, closed, open_period 1m0s, fail_max 5", auth)
		}
		var list []map[string]any
		adminGet(t, reg, "/breakers", &list)
		if len(list) != 2 || list[0]["mode"] != "normal" || list[1]["mode"] != "shadow" {
			t.Fatalf("GET /breakers = %v; want auth normal, llm shadow", list)
		}
		th, _ := list[0]["thresholds"].(map[string]any)
		checkKeys(t, "auth thresholds", th, []string{"fail_max", "open_timeout"}, []string{
			"failure_ratio", "minimum_throughput", "sampling_window", "slow_call_duration", "slow_call_ratio", "max_open_timeout",
		})

		// Held open by an operator there is no probe to wait for.
		llm.ForceOpen()
		bs, raw := getBreaker(t, reg, "llm")
		if bs.State != "open" || !bs.Forced || bs.Mode != "shadow" {
			t.Errorf("forced open: %+v", bs)
		}
		checkKeys(t, "forced-open llm", raw, []string{"open_period"}, []string{"retry_after"})
	})
}

// hintErr is a failure that asks for a wait, as an HTTP 429 would.
type hintErr time.Duration

func (h hintErr) Error() string             { return "slow down" }
func (h hintErr) RetryAfter() time.Duration { return time.Duration(h) }

func TestAdminBreakerRetryHint(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := mustRegistry(t, map[string]string{
			"CIRCUIT_BREAKER_LLM_FAIL_MAX": "1",
			"CIRCUIT_BREAKER_LLM_TIMEOUT":  "5s",
		})
		cb := reg.CircuitBreaker("llm")
		_, err := WithCircuitBreaker(func(context.Context) (int, error) { return 0, hintErr(30 * time.Second) }, cb)(context.Background())
		if err == nil {
			t.Fatal("the failing call returned no error")
		}
		bs, _ := getBreaker(t, reg, "llm")
		// A hint up to 10x OpenTimeout sets the open period.
		if bs.State != "open" || bs.OpenPeriod != "30s" || bs.RetryAfter != "30s" || bs.Thresholds.MaxOpenTimeout != "" {
			t.Errorf("llm = %+v; want open for the hint's 30s", bs)
		}
		time.Sleep(10*time.Second + 1)
		// Rounded up to the millisecond.
		if bs, _ = getBreaker(t, reg, "llm"); bs.RetryAfter != "20s" {
			t.Errorf("10s later retry_after = %q; want 20s", bs.RetryAfter)
		}
		_, err = WithCircuitBreaker(okFunc, cb)(context.Background())
		var e *Error
		if !errors.As(err, &e) || e.RetryAfter() != 20*time.Second-1 {
			t.Errorf("rejection %v; want a RetryAfter of 20s-1ns, as the endpoint reports it rounded up", err)
		}
	})
}
