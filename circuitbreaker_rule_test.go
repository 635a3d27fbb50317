package resilience

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// The triggers, open periods and shadow mode of circuitbreaker_rule.go.

// switchable returns a Func that fails while *fail is true and a count of
// its calls.
func switchable() (fn Func[int], fail *bool, calls *int) {
	fail, calls = new(bool), new(int)
	return func(context.Context) (int, error) {
		*calls++
		if *fail {
			return 0, errBoom
		}
		return 1, nil
	}, fail, calls
}

func TestCircuitBreakerRatioOpensOnAlternatingFailures(t *testing.T) {
	for _, tc := range []struct {
		name     string
		cfg      CircuitBreakerConfig
		wantOpen bool
	}{
		{"ratio", CircuitBreakerConfig{FailureRatio: 0.5, MinimumThroughput: 20, SamplingWindow: 10 * time.Second}, true},
		{"consecutive", CircuitBreakerConfig{FailMax: 5}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				tc.cfg.DisableLogging = true
				cb := mustBreaker(t, tc.cfg)
				fn, fail, _ := switchable()
				protected := WithCircuitBreaker(fn, cb)
				start := time.Now()
				// 50 calls a second, every other one failing, for three windows.
				for i := range 1500 {
					*fail = i%2 == 1
					protected(context.Background())
					if cb.State() == StateOpen {
						break
					}
					time.Sleep(20 * time.Millisecond)
				}
				opened := cb.State() == StateOpen
				if opened != tc.wantOpen {
					t.Fatalf("open = %v after %v; want %v", opened, time.Since(start), tc.wantOpen)
				}
				if opened && time.Since(start) > 10*time.Second {
					t.Fatalf("opened after %v; want within one window of 10s", time.Since(start))
				}
			})
		})
	}
}

func TestCircuitBreakerRatioWaitsForMinimumThroughput(t *testing.T) {
	for _, tc := range []struct {
		name    string
		failMax int
		opensAt int // the failure that opens the breaker
	}{
		{"ratio only", 0, 20},
		{"FailMax beside the ratio", 5, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cb := mustBreaker(t, CircuitBreakerConfig{FailureRatio: 0.5, MinimumThroughput: 20, FailMax: tc.failMax, DisableLogging: true})
			fn := WithCircuitBreaker(failFunc, cb)
			for i := 1; i <= tc.opensAt; i++ {
				fn(context.Background())
				if open := cb.State() == StateOpen; open != (i == tc.opensAt) {
					t.Fatalf("after %d failures: state %v", i, cb.State())
				}
			}
		})
	}
}

func TestCircuitBreakerRatioForgetsFailuresOlderThanWindow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailureRatio: 0.5, MinimumThroughput: 20, SamplingWindow: 10 * time.Second, DisableLogging: true})
		fn, fail, _ := switchable()
		protected := WithCircuitBreaker(fn, cb)
		*fail = true
		for range 15 {
			protected(context.Background())
		}
		// A window of successes, few of them: 24 failures in 29 calls
		// would open the breaker if the first 15 were remembered.
		*fail = false
		for range 5 {
			time.Sleep(2 * time.Second)
			protected(context.Background())
		}
		time.Sleep(time.Second)
		*fail = true
		for range 9 {
			protected(context.Background())
		}
		if s := cb.State(); s != StateClosed {
			t.Fatalf("state %v, counts %+v; want closed: the first 15 failures left the window", s, cb.Counts())
		}
		if c := cb.Counts(); c.WindowFailures != 9 {
			t.Fatalf("counts %+v; want the 9 recent failures in the window", c)
		}
	})
}

func TestCircuitBreakerSlowCallsOpen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reader := withReader(t)
		base := collect(t, reader)
		const slow = 100 * time.Millisecond
		cb := mustBreaker(t, CircuitBreakerConfig{Name: "slow-llm", SlowCallDuration: slow, SlowCallRatio: 0.5, MinimumThroughput: 20, DisableLogging: true})
		n := 0
		fn := WithCircuitBreaker(func(context.Context) (int, error) {
			n++
			if n%5 < 3 { // 60% of the calls succeed slowly
				time.Sleep(2 * slow)
			}
			return 1, nil
		}, cb)
		for range 100 {
			if _, err := fn(context.Background()); errors.Is(err, ErrCircuitOpen) {
				break
			}
		}
		if cb.State() != StateOpen {
			t.Fatalf("state %v after %d calls; want open on the slow-call ratio", cb.State(), n)
		}
		if n != 20 {
			t.Errorf("opened after %d calls; want 20, the minimum throughput, with 12 of them slow", n)
		}
		c := since(base, collect(t, reader))
		wantPoints(t, c, "resilience.circuit_breaker.slow_calls", "observed counter", "{call}", "service=slow-llm=12")
	})
}

// A call exactly as long as SlowCallDuration is not slow, nor is a slow
// failure: only successes that took longer count.
func TestCircuitBreakerSlowCallCountsOnlyLongerSuccesses(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{SlowCallDuration: time.Second, FailMax: 1000, DisableLogging: true})
		for _, tc := range []struct {
			d   time.Duration
			err error
		}{{time.Second, nil}, {2 * time.Second, errBoom}, {time.Second + 1, nil}} {
			WithCircuitBreaker(func(context.Context) (int, error) { time.Sleep(tc.d); return 0, tc.err }, cb)(context.Background())
		}
		if c := cb.Counts(); c.WindowSlowCalls != 1 || c.WindowCalls != 3 {
			t.Fatalf("counts %+v; want 1 slow call of 3", c)
		}
	})
}

func TestCircuitBreakerOpenPeriodDoublesAfterFailedProbes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, MaxOpenTimeout: 8 * time.Second, DisableLogging: true})
		fn, fail, calls := switchable()
		protected := WithCircuitBreaker(fn, cb)
		*fail = true
		protected(context.Background()) // opens
		// openFor checks that the breaker stays open for d and then lets
		// the probe through, which fails while *fail is set.
		openFor := func(d time.Duration) {
			t.Helper()
			if got := cb.OpenPeriod(); got != d {
				t.Errorf("OpenPeriod() = %v; want %v", got, d)
			}
			time.Sleep(d - time.Millisecond)
			before := *calls
			if _, err := protected(context.Background()); !errors.Is(err, ErrCircuitOpen) || *calls != before {
				t.Fatalf("%v into a %v open period: %v; want a rejection", d-time.Millisecond, d, err)
			}
			time.Sleep(2 * time.Millisecond)
			protected(context.Background())
			if *calls != before+1 {
				t.Fatalf("after %v: the probe was not let through", d)
			}
		}
		for _, d := range []time.Duration{1, 2, 4, 8, 8} {
			openFor(d * time.Second)
		}
		*fail = false
		time.Sleep(8*time.Second + 1)
		protected(context.Background()) // the probe succeeds: closed
		if cb.State() != StateClosed {
			t.Fatalf("state %v after a successful probe", cb.State())
		}
		*fail = true
		protected(context.Background())
		openFor(time.Second)
	})
}

// status429 answers every request with a 429 that asks for 20s.
func status429(r *http.Request) (*http.Response, error) {
	return &http.Response{
		StatusCode: http.StatusTooManyRequests, Header: http.Header{"Retry-After": {"20"}},
		Body: io.NopCloser(strings.NewReader("slow down")), ContentLength: -1, Request: r,
	}, nil
}

func TestCircuitBreakerRetryAfterKeepsItOpen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := mustRegistry(t, map[string]string{
			"CIRCUIT_BREAKER_LIMITED_FAIL_MAX": "1", "CIRCUIT_BREAKER_LIMITED_TIMEOUT": "5",
		})
		var sent int
		client := &http.Client{Transport: &Transport{Registry: reg, Base: roundTripFunc(func(r *http.Request) (*http.Response, error) {
			sent++
			return status429(r)
		})}}
		get := func() error {
			resp, err := client.Get("http://limited/")
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode != http.StatusTooManyRequests {
					t.Fatalf("status %d; want the 429", resp.StatusCode)
				}
			}
			return err
		}
		if err := get(); err != nil {
			t.Fatalf("first request: %v; want the 429 passed on", err)
		}
		cb := reg.CircuitBreaker("limited")
		if cb.State() != StateOpen || cb.OpenPeriod() != 20*time.Second {
			t.Fatalf("state %v for %v; want open for the 20s the 429 asked", cb.State(), cb.OpenPeriod())
		}
		for _, at := range []time.Duration{0, 5 * time.Second, 19 * time.Second} {
			if at > 0 {
				time.Sleep(at - time.Since(cb.Since()))
			}
			err := get()
			var e *Error
			if !errors.As(err, &e) || !errors.Is(err, ErrCircuitOpen) {
				t.Fatalf("%v after the open: %v; want ErrCircuitOpen", at, err)
			}
			if got, want := e.RetryAfter(), 20*time.Second-at; got != want {
				t.Errorf("%v after the open: RetryAfter() = %v; want %v", at, got, want)
			}
		}
		if sent != 1 {
			t.Fatalf("%d requests sent; want 1: the breaker held them back", sent)
		}
		time.Sleep(time.Second + 1)
		get() // the probe
		if sent != 2 {
			t.Fatalf("after 20s: %d requests sent; want the probe", sent)
		}
	})
}

// The cap of a retry hint: MaxOpenTimeout when set, else 10x OpenTimeout.
func TestCircuitBreakerRetryHintIsCapped(t *testing.T) {
	for _, tc := range []struct {
		cfg  CircuitBreakerConfig
		want time.Duration
	}{
		{CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second}, 10 * time.Second},
		{CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, MaxOpenTimeout: 5 * time.Second}, 5 * time.Second},
		{CircuitBreakerConfig{FailMax: 1, OpenTimeout: 2 * time.Minute}, 2 * time.Minute},
	} {
		synctest.Test(t, func(t *testing.T) {
			tc.cfg.DisableLogging = true
			cb := mustBreaker(t, tc.cfg)
			WithCircuitBreaker(func(context.Context) (int, error) {
				return 0, hinted(time.Minute)
			}, cb)(context.Background())
			if got := cb.OpenPeriod(); got != tc.want {
				t.Errorf("%+v: a hint of 1m gives an open period of %v; want %v", tc.cfg, got, tc.want)
			}
		})
	}
}

func TestCircuitBreakerRetryAfterOfRejections(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: 10 * time.Second, DisableLogging: true})
		block := make(chan struct{})
		fn := WithCircuitBreaker(func(ctx context.Context) (int, error) {
			if ctx.Value(blockKey{}) != nil {
				<-block
			}
			return 0, errBoom
		}, cb)
		fn(context.Background())
		retryAfter := func() time.Duration {
			var e *Error
			if _, err := fn(context.Background()); !errors.As(err, &e) {
				t.Fatalf("%v; want a rejection", err)
			}
			return e.RetryAfter()
		}
		if got := retryAfter(); got != 10*time.Second {
			t.Errorf("open: RetryAfter() = %v; want 10s", got)
		}
		time.Sleep(10 * time.Second)
		go fn(context.WithValue(context.Background(), blockKey{}, true)) // the probe, held
		synctest.Wait()
		if got := retryAfter(); got != 0 {
			t.Errorf("half-open, probe in flight: RetryAfter() = %v; want 0", got)
		}
		close(block)
		synctest.Wait()
		cb.ForceOpen()
		if got := retryAfter(); got >= 0 {
			t.Errorf("forced open: RetryAfter() = %v; want negative: only an operator ends it", got)
		}
	})
}

type blockKey struct{}

// hinted is a failure that asks for a wait, as an HTTP Retry-After does.
type hinted time.Duration

func (h hinted) Error() string             { return "busy" }
func (h hinted) RetryAfter() time.Duration { return time.Duration(h) }

func TestCircuitBreakerShadowNeverRejects(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reader := withReader(t)
		base := collect(t, reader)
		var buf strings.Builder
		var mu sync.Mutex
		logger := slog.New(slog.NewTextHandler(&lockedWriter{w: &buf, mu: &mu}, nil))
		cb := mustBreaker(t, CircuitBreakerConfig{Name: "shadow-auth", FailMax: 5, OpenTimeout: time.Second, Shadow: true, Logger: logger})
		fn, fail, calls := switchable()
		protected := WithCircuitBreaker(fn, cb)
		*fail = true
		for i := range 100 {
			if _, err := protected(context.Background()); !errors.Is(err, errBoom) {
				t.Fatalf("call %d: %v; want the function's own error", i, err)
			}
			if i == 50 {
				time.Sleep(time.Second + 1) // half-open: the probe fails, open again
			}
		}
		if *calls != 100 {
			t.Fatalf("%d of 100 calls ran; want every one", *calls)
		}
		if cb.State() != StateOpen {
			t.Fatalf("state %v; want open, as it would be", cb.State())
		}
		mu.Lock()
		logs := buf.String()
		mu.Unlock()
		for _, want := range []string{"to=open", "to=half-open", "mode=shadow"} {
			if !strings.Contains(logs, want) {
				t.Errorf("logs lack %q:\n%s", want, logs)
			}
		}
		c := since(base, collect(t, reader))
		wantPoints(t, c, "resilience.circuit_breaker.transitions", "counter", "{transition}",
			"from=closed,service=shadow-auth,to=open=1", "from=half-open,service=shadow-auth,to=open=1",
			"from=open,service=shadow-auth,to=half-open=1")
		wantPoints(t, c, "resilience.circuit_breaker.rejections", "observed counter", "{call}",
			"mode=shadow,service=shadow-auth=94")
		wantPoints(t, c, "resilience.circuit_breaker.state", "gauge", "{state}", "mode=shadow,service=shadow-auth=2")
	})
}

// Trip used to feed the breaker FailMax failures, which never opened a
// breaker whose only trigger is a ratio.
func TestCircuitBreakerTripOpensRatioOnlyBreaker(t *testing.T) {
	cb := mustBreaker(t, CircuitBreakerConfig{FailureRatio: 0.5, DisableLogging: true})
	cb.Trip()
	if cb.State() != StateOpen {
		t.Fatalf("state %v after Trip; want open", cb.State())
	}
	cb.Reset()
	cb.TripFor(3 * time.Minute)
	if got := cb.OpenPeriod(); got != 3*time.Minute {
		t.Fatalf("OpenPeriod() after TripFor(3m) = %v; want 3m", got)
	}
}

func TestCircuitBreakerConfigRejectsBadTriggers(t *testing.T) {
	for _, tc := range []struct {
		cfg   CircuitBreakerConfig
		field string
	}{
		{CircuitBreakerConfig{FailureRatio: 1.5}, "FailureRatio = 1.5"},
		{CircuitBreakerConfig{FailureRatio: -0.1}, "FailureRatio = -0.1"},
		{CircuitBreakerConfig{SlowCallRatio: 2}, "SlowCallRatio = 2"},
		{CircuitBreakerConfig{MinimumThroughput: -1}, "MinimumThroughput = -1"},
		{CircuitBreakerConfig{SamplingWindow: 5 * time.Millisecond}, "SamplingWindow = 5ms"},
		{CircuitBreakerConfig{SlowCallDuration: -time.Second}, "SlowCallDuration = -1s"},
		{CircuitBreakerConfig{OpenTimeout: 10 * time.Second, MaxOpenTimeout: 5 * time.Second}, "MaxOpenTimeout = 5s"},
		{CircuitBreakerConfig{MaxOpenTimeout: -1}, "MaxOpenTimeout = -1ns"},
	} {
		_, err := NewCircuitBreaker(tc.cfg)
		if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%+v: %v; want ErrInvalidConfig naming %s", tc.cfg, err, tc.field)
		}
	}
}

func TestBreakerRulePeriod(t *testing.T) {
	r, _, err := CircuitBreakerConfig{OpenTimeout: time.Second, MaxOpenTimeout: 8 * time.Second}.resolve()
	if err != nil {
		t.Fatal(err)
	}
	for streak, want := range []time.Duration{1, 2, 4, 8, 8, 8} {
		if got := r.period(streak, -1); got != want*time.Second {
			t.Errorf("period(%d) = %v; want %v", streak, got, want*time.Second)
		}
	}
	if got := r.period(0, 5*time.Second); got != 5*time.Second {
		t.Errorf("period(0, hint 5s) = %v; want 5s", got)
	}
	if got := r.period(1<<30, time.Hour); got != 8*time.Second {
		t.Errorf("period(huge streak, hint 1h) = %v; want the 8s cap", got)
	}
}

// FuzzBreakerRulePeriod: whatever the settings, streak and hint, an open
// period is at least OpenTimeout and at most the larger of MaxOpenTimeout
// and the hint's cap, and never shrinks as failed probes add up.
func FuzzBreakerRulePeriod(f *testing.F) {
	f.Add(int64(time.Second), int64(8*time.Second), 3, int64(20*time.Second))
	f.Add(int64(1<<62), int64(0), 70, int64(-1))
	f.Fuzz(func(t *testing.T, open, maxOpen int64, streak int, hint int64) {
		r, _, err := CircuitBreakerConfig{OpenTimeout: time.Duration(open), MaxOpenTimeout: time.Duration(maxOpen)}.resolve()
		if err != nil || streak < 0 || streak > 1<<20 {
			return
		}
		p := r.period(streak, time.Duration(hint))
		if p < r.open || p > max(r.maxOpen, r.hintCap) {
			t.Fatalf("period(%d, %v) = %v outside [%v, %v]", streak, time.Duration(hint), p, r.open, max(r.maxOpen, r.hintCap))
		}
		if next := r.period(streak+1, time.Duration(hint)); next < p {
			t.Fatalf("period shrank from %v to %v after another failed probe", p, next)
		}
	})
}

func TestMaxOpenPeriod(t *testing.T) {
	for _, tc := range []struct {
		cfg  CircuitBreakerConfig
		want time.Duration
	}{
		{CircuitBreakerConfig{OpenTimeout: time.Second}, 10 * time.Second},                                   // a hint's cap
		{CircuitBreakerConfig{OpenTimeout: time.Second, MaxOpenTimeout: 30 * time.Second}, 30 * time.Second}, // doubling's
		{CircuitBreakerConfig{OpenTimeout: time.Second, MaxOpenTimeout: 4 * time.Second}, 4 * time.Second},   // which caps a hint too
	} {
		if got := mustBreaker(t, tc.cfg).MaxOpenPeriod(); got != tc.want {
			t.Errorf("%+v: MaxOpenPeriod() = %v, want %v", tc.cfg, got, tc.want)
		}
	}
}
