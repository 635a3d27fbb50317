package resilience

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func mustRateLimiter(t testing.TB, cfg RateLimiterConfig) *RateLimiter {
	t.Helper()
	l, err := NewRateLimiter(cfg)
	if err != nil {
		t.Fatalf("NewRateLimiter(%+v) = %v", cfg, err)
	}
	return l
}

// 20 goroutines against 60 a minute in bursts of 10, for 10 minutes: no
// call starts before its permit, and every goroutine gets some.
func TestRateLimiterPacesGoroutinesWithoutStarving(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := mustRateLimiter(t, RateLimiterConfig{Name: "llm", Limit: 60, Per: time.Minute, Burst: 10})
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		var mu sync.Mutex
		var starts []time.Duration
		per := make([]int, 20)
		fn := WithRateLimit(func(context.Context) (int, error) {
			mu.Lock()
			starts = append(starts, time.Since(start))
			mu.Unlock()
			return 1, nil
		}, l)
		var wg sync.WaitGroup
		for g := range per {
			wg.Go(func() {
				for {
					if _, err := fn(ctx); err != nil {
						if !errors.Is(err, ErrRateLimited) {
							t.Errorf("goroutine %d: %v", g, err)
						}
						return // the next permit comes after the deadline
					}
					per[g]++
				}
			})
		}
		wg.Wait()
		if len(starts) > 10+60*10 {
			t.Fatalf("%d calls started in 10 minutes; want at most 610", len(starts))
		}
		if len(starts) < 600 {
			t.Errorf("%d calls started in 10 minutes; want about 610", len(starts))
		}
		for i, at := range starts {
			// Call i (from 0) needs i+1 permits: 10 at once, then one a second.
			if earliest := time.Duration(i+1-10) * time.Second; at < earliest {
				t.Fatalf("call %d started at %v; its permit comes at %v", i, at, earliest)
			}
		}
		for g, n := range per {
			if n < 600/20/2 {
				t.Errorf("goroutine %d got %d calls of %d: starved", g, n, len(starts))
			}
		}
	})
}

func TestRateLimiterFailFastSaysWhen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := mustRateLimiter(t, RateLimiterConfig{Name: "llm", Limit: 60, Per: time.Minute, Burst: 10, FailFast: true})
		for i := range 10 {
			if err := l.Wait(context.Background(), 1); err != nil {
				t.Fatalf("permit %d of the burst: %v", i, err)
			}
		}
		err := l.Wait(context.Background(), 1)
		var e *Error
		if !errors.As(err, &e) || !errors.Is(err, ErrRateLimited) || !IsRetryable(err) {
			t.Fatalf("%v; want a retryable ErrRateLimited", err)
		}
		if got := e.RetryAfter(); got != time.Second {
			t.Errorf("RetryAfter() = %v; want 1s, when the next permit is free", got)
		}
		if !strings.Contains(err.Error(), `"llm"`) {
			t.Errorf("%q does not name the limiter", err)
		}
		time.Sleep(time.Second)
		if err := l.Wait(context.Background(), 1); err != nil {
			t.Errorf("after RetryAfter: %v", err)
		}
		if s := l.Stats(); s.Granted != 11 || s.Rejected != 1 || s.Waiting != 0 {
			t.Errorf("Stats() = %+v", s)
		}
	})
}

// A wait that could never be granted, or would end after MaxWait or the
// context's deadline, is refused at once rather than slept through first.
func TestRateLimiterRefusesHopelessWaitsAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := mustRateLimiter(t, RateLimiterConfig{Limit: 1, Per: time.Minute, Burst: 2, MaxWait: 30 * time.Second})
		start := time.Now()
		var e *Error
		if err := l.Wait(context.Background(), 3); !errors.As(err, &e) || !errors.Is(err, ErrRateLimited) || e.RetryAfter() >= 0 {
			t.Errorf("3 permits of a burst of 2: %v; want ErrRateLimited that never ends", err)
		}
		l.Wait(context.Background(), 2)
		if err := l.Wait(context.Background(), 1); !errors.Is(err, ErrRateLimited) {
			t.Errorf("a 60s wait with MaxWait 30s: %v; want ErrRateLimited", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		unbounded := mustRateLimiter(t, RateLimiterConfig{Limit: 1, Per: time.Minute})
		unbounded.Wait(ctx, 1)
		if err := unbounded.Wait(ctx, 1); !errors.Is(err, ErrRateLimited) {
			t.Errorf("a 60s wait with 10s left: %v; want ErrRateLimited", err)
		}
		if d := time.Since(start); d != 0 {
			t.Errorf("the refusals took %v; want none of it", d)
		}
	})
}

func TestRateLimiterChargeDelaysLaterCallers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := mustRateLimiter(t, RateLimiterConfig{Name: "tokens", Limit: 10000, Per: time.Minute, Burst: 10000})
		start := time.Now()
		l.Wait(context.Background(), 10000)
		l.Charge(3000) // the answer used 3000 more than estimated
		l.Wait(context.Background(), 1000)
		if got, want := time.Since(start), 24*time.Second; got != want {
			t.Errorf("the next 1000 tokens came after %v; want %v: 4000 tokens at 10000 a minute", got, want)
		}
	})
}

func TestRateLimiterPauseUntil(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := mustRateLimiter(t, RateLimiterConfig{Limit: 100, Burst: 100})
		start := time.Now()
		l.PauseUntil(start.Add(2 * time.Second))
		l.PauseUntil(start.Add(time.Second)) // earlier: changes nothing
		if l.Allow(1) {
			t.Error("Allow during a pause")
		}
		l.Wait(context.Background(), 1)
		if got := time.Since(start); got != 2*time.Second {
			t.Errorf("the permit came after %v; want the 2s pause", got)
		}
	})
}

// A caller that gives up while waiting gives its permits back.
func TestRateLimiterCanceledWaitGivesPermitsBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := mustRateLimiter(t, RateLimiterConfig{Limit: 1, Burst: 1})
		l.Wait(context.Background(), 1)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() { done <- l.Wait(ctx, 1) }()
		synctest.Wait()
		if s := l.Stats(); s.Waiting != 1 {
			t.Fatalf("Stats() = %+v; want one waiting", s)
		}
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("%v; want context.Canceled", err)
		}
		start := time.Now()
		l.Wait(context.Background(), 1)
		if got := time.Since(start); got != time.Second {
			t.Errorf("the next permit came after %v; want 1s, as if the canceled wait had never been", got)
		}
	})
}

// A permit the limiter refuses says nothing about the downstream: the
// breaker around it does not count it, and an open breaker spends none.
func TestRateLimitedCallsDoNotOpenTheBreaker(t *testing.T) {
	cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, DisableLogging: true})
	l := mustRateLimiter(t, RateLimiterConfig{Limit: 1, Per: time.Hour, FailFast: true})
	fn := Compose(okFunc, Stack[int]{CircuitBreaker: cb, RateLimiter: l})
	fn(context.Background())
	if _, err := fn(context.Background()); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("%v; want ErrRateLimited", err)
	}
	if cb.State() != StateClosed {
		t.Fatalf("state %v after a rate-limited call; want closed", cb.State())
	}
	cb.ForceOpen()
	fn(context.Background())
	if s := l.Stats(); s.Granted+s.Rejected != 2 {
		t.Errorf("Stats() = %+v; want no permit asked for while the breaker was open", s)
	}
}

func TestNewRateLimiterRejectsBadConfig(t *testing.T) {
	for _, tc := range []struct {
		cfg   RateLimiterConfig
		field string
	}{
		{RateLimiterConfig{}, "Limit = 0"},
		{RateLimiterConfig{Limit: -1}, "Limit = -1"},
		{RateLimiterConfig{Limit: 1, Per: -time.Second}, "Per = -1s"},
		{RateLimiterConfig{Limit: 1, Burst: -1}, "Burst = -1"},
		{RateLimiterConfig{Limit: 1, MaxWait: -time.Second}, "MaxWait = -1s"},
	} {
		_, err := NewRateLimiter(tc.cfg)
		if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%+v: %v; want ErrInvalidConfig naming %s", tc.cfg, err, tc.field)
		}
	}
	if _, err := WithRateLimit(okFunc, nil)(context.Background()); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("WithRateLimit(fn, nil): %v", err)
	}
}

// FuzzRateLimiterConfig: no configuration makes NewRateLimiter or a first
// Wait panic, and a limiter it accepts grants its burst at once.
func FuzzRateLimiterConfig(f *testing.F) {
	f.Add(60.0, int64(time.Minute), 10, int64(0))
	f.Add(1e300, int64(1), 0, int64(-1))
	f.Add(1e-300, int64(1<<62), 1<<30, int64(time.Second))
	f.Fuzz(func(t *testing.T, limit float64, per int64, burst int, maxWait int64) {
		l, err := NewRateLimiter(RateLimiterConfig{Limit: limit, Per: time.Duration(per), Burst: burst, MaxWait: time.Duration(maxWait), FailFast: true})
		if err != nil {
			return
		}
		if err := l.Wait(context.Background(), 1); err != nil {
			t.Fatalf("the first permit of %+v: %v", l.Stats(), err)
		}
	})
}

func TestRateLimiterMetrics(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reader := withReader(t)
		base := collect(t, reader)
		l := mustRateLimiter(t, RateLimiterConfig{Name: "metrics-llm", Limit: 1, Burst: 1, MaxWait: 5 * time.Second})
		l.Wait(context.Background(), 1)
		l.Wait(context.Background(), 1) // waits 1s
		l.Wait(context.Background(), 7) // more than a burst: refused
		c := since(base, collect(t, reader))
		wantPoints(t, c, "resilience.rate_limiter.granted", "observed counter", "{call}", "name=metrics-llm=2")
		wantPoints(t, c, "resilience.rate_limiter.rejected", "observed counter", "{call}", "name=metrics-llm=1")
		wantPoints(t, c, "resilience.rate_limiter.waiting", "gauge", "{call}", "name=metrics-llm=0")
		wantPoints(t, c, "resilience.rate_limiter.wait", "histogram", "s", "name=metrics-llm=count:1")
	})
}

// Calls estimated at 1000 tokens against 10 000 a minute: 10 start at once
// and 10 a minute after; a call that used 3000 delays the next by the debt.
func TestTokenLimiterPacesByEstimateAndChargesTheRest(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tokens := mustRateLimiter(t, RateLimiterConfig{Name: "llm-tokens", Limit: 10000, Per: time.Minute, Burst: 10000})
		used := 1000
		var starts []time.Duration
		start := time.Now()
		fn := Compose(func(context.Context) (int, error) {
			starts = append(starts, time.Since(start))
			return used, nil
		}, Stack[int]{
			Name: "tokens", TokenLimiter: tokens,
			Tokens:     func(context.Context) int { return 1000 },
			TokensUsed: func(n int) int { return n },
		})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		for {
			if _, err := fn(ctx); err != nil {
				break // the next permits come after the 5 minutes
			}
		}
		if len(starts) > 10+50 {
			t.Fatalf("%d calls in 5 minutes; want at most 60", len(starts))
		}
		if len(starts) < 59 {
			t.Fatalf("%d calls in 5 minutes; want about 60", len(starts))
		}

		// Used 3000 of an estimate of 1000: 2000 charged, so the next call
		// waits 12s (2000 tokens) more than the 6s of its own.
		tokens2 := mustRateLimiter(t, RateLimiterConfig{Limit: 10000, Per: time.Minute, Burst: 10000})
		fn2 := Compose(func(context.Context) (int, error) { return used, nil }, Stack[int]{
			Name: "tokens2", TokenLimiter: tokens2,
			Tokens:     func(context.Context) int { return 1000 },
			TokensUsed: func(n int) int { return n },
		})
		tokens2.Wait(context.Background(), 9000) // leaves 1000
		used = 3000
		fn2(context.Background())
		used = 1000
		t0 := time.Now()
		fn2(context.Background())
		if got := time.Since(t0); got != 18*time.Second {
			t.Errorf("the call after a 3000-token answer waited %v; want 18s", got)
		}
		// Used 200 of 1000: 800 given back, so the next call needs only 200
		// more of the bucket.
		used = 200
		fn2(context.Background())
		used = 1000
		t0 = time.Now()
		fn2(context.Background())
		if got := time.Since(t0); got != 6*time.Second*200/1000 {
			t.Errorf("the call after a 200-token answer waited %v; want %v", got, 6*time.Second*200/1000)
		}
	})
}

func TestComposeTokenLimiterNeedsTokens(t *testing.T) {
	l := mustRateLimiter(t, RateLimiterConfig{Limit: 1})
	if _, err := Compose(okFunc, Stack[int]{TokenLimiter: l})(context.Background()); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("%v; want ErrInvalidConfig naming Stack.Tokens", err)
	}
}

// An attempt the token limiter refuses is not sent: its request permit is
// given back.
func TestTokenRefusalGivesRequestPermitBack(t *testing.T) {
	requests := mustRateLimiter(t, RateLimiterConfig{Limit: 1, Per: time.Hour, FailFast: true})
	tokens := mustRateLimiter(t, RateLimiterConfig{Limit: 100, Burst: 100})
	n := 1000
	fn := Compose(okFunc, Stack[int]{Name: "refused-tokens", RateLimiter: requests, TokenLimiter: tokens,
		Tokens: func(context.Context) int { return n }})
	if _, err := fn(context.Background()); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("%v; want the token limiter's refusal", err)
	}
	n = 10
	if _, err := fn(context.Background()); err != nil {
		t.Fatalf("the next call: %v; want the request permit the refused one did not use", err)
	}
}
