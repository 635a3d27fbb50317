package resilience

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// The breaker sits outside the retry: one failure per exhausted call.
func TestComposeBreakerCountsExhaustedCalls(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 2, OpenTimeout: time.Minute})
		var calls atomic.Int32
		fn := Compose(func(context.Context) (int, error) { calls.Add(1); return 0, errBoom }, Stack[int]{
			CircuitBreaker: cb,
			Retry:          mustRetry(t, RetryConfig{MaxAttempts: 3, DisableJitter: true}),
		})
		_, err := fn(context.Background())
		if !errors.Is(err, ErrRetryExhausted) || calls.Load() != 3 {
			t.Fatalf("err = %v after %d attempts; want ErrRetryExhausted after 3", err, calls.Load())
		}
		if got := cb.State(); got != StateClosed {
			t.Fatalf("after one exhausted call State() = %v; want closed (FailMax 2)", got)
		}
		fn(context.Background())
		if got := cb.State(); got != StateOpen {
			t.Fatalf("after two State() = %v; want open", got)
		}
		// Open: no attempt, no backoff wait.
		start := time.Now()
		_, err = fn(context.Background())
		if !errors.Is(err, ErrCircuitOpen) || calls.Load() != 6 || time.Since(start) != 0 {
			t.Fatalf("err = %v, calls %d, took %v; want ErrCircuitOpen at once", err, calls.Load(), time.Since(start))
		}
	})
}

// The timeout is per attempt, and a per-attempt timeout is retried.
func TestComposeTimeoutPerAttempt(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var calls atomic.Int32
		fn := Compose(func(ctx context.Context) (int, error) {
			if calls.Add(1) < 3 {
				<-ctx.Done()
				return 0, ctx.Err()
			}
			return 9, nil
		}, Stack[int]{
			Retry:   mustRetry(t, RetryConfig{MaxAttempts: 3, Strategy: RetryFixed, InitialDelay: 500 * time.Millisecond, DisableJitter: true}),
			Timeout: time.Second,
		})
		start := time.Now()
		v, err := fn(context.Background())
		if v != 9 || err != nil {
			t.Fatalf("= %v, %v; want 9, nil", v, err)
		}
		if got := time.Since(start); got != 3*time.Second {
			t.Errorf("took %v; want 1s + 0.5s + 1s + 0.5s = 3s", got)
		}
	})
}

// The wait for a bulkhead slot counts toward the attempt's timeout.
func TestComposeBulkheadWaitCountsTowardTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b, _ := NewBulkhead(BulkheadConfig{Limit: 1})
		hold, _ := b.Acquire(context.Background())
		fn := Compose(okFunc, Stack[int]{Timeout: time.Second, Bulkhead: b})
		start := time.Now()
		_, err := fn(context.Background())
		if !errors.Is(err, ErrTimeout) || time.Since(start) != time.Second {
			t.Fatalf("err = %v after %v; want ErrTimeout after 1s", err, time.Since(start))
		}
		if s := b.Stats(); s.Waiting != 0 || s.Active != 1 {
			t.Fatalf("Stats = %+v; want the waiter gone", s)
		}
		hold()
	})
}

func TestComposeFallbackIsLastResort(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1})
		var seen []error
		fn := Compose(failFunc, Stack[int]{
			CircuitBreaker: cb,
			Retry:          mustRetry(t, RetryConfig{MaxAttempts: 2, DisableJitter: true}),
			Fallback: func(_ context.Context, err error) (int, error) {
				seen = append(seen, err)
				return -1, nil
			},
		})
		for range 2 {
			if v, err := fn(context.Background()); v != -1 || err != nil {
				t.Fatalf("= %v, %v; want the fallback's -1, nil", v, err)
			}
		}
		// The retry and the breaker saw the failure before the fallback.
		if len(seen) != 2 || !errors.Is(seen[0], ErrRetryExhausted) || !errors.Is(seen[1], ErrCircuitOpen) {
			t.Fatalf("fallback saw %v; want exhausted, then open", seen)
		}
	})
}

func TestComposeCallerCancellationPassesThrough(t *testing.T) {
	cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	fn := Compose(func(ctx context.Context) (int, error) { return 0, ctx.Err() }, Stack[int]{
		CircuitBreaker: cb,
		Retry:          mustRetry(t, RetryConfig{}),
		Timeout:        time.Second,
		Bulkhead:       mustBulkhead(t, BulkheadConfig{}),
		Fallback:       FallbackValue(5),
	})
	if _, err := fn(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v; want context.Canceled, not a fallback value", err)
	}
	if got := cb.State(); got != StateClosed {
		t.Fatalf("State() = %v; the caller's cancellation must not count", got)
	}
}

func TestComposeEnforcedTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		fn := Compose(func(context.Context) (int, error) { <-release; return 1, nil }, Stack[int]{Timeout: time.Second, EnforceTimeout: true})
		start := time.Now()
		if _, err := fn(context.Background()); !errors.Is(err, ErrTimeout) || time.Since(start) != time.Second {
			t.Fatalf("err = %v after %v; want ErrTimeout at 1s", err, time.Since(start))
		}
		close(release)
		synctest.Wait()
	})
}

func TestComposeEmptyAndInvalid(t *testing.T) {
	if v, err := Compose(okFunc, Stack[int]{})(context.Background()); v != 1 || err != nil {
		t.Fatalf("empty stack = %v, %v", v, err)
	}
	if _, err := Compose[int](nil, Stack[int]{})(context.Background()); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("nil fn: err = %v; want ErrInvalidConfig", err)
	}
	if _, err := Compose(okFunc, Stack[int]{Timeout: -time.Second})(context.Background()); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("negative timeout: err = %v; want ErrInvalidConfig", err)
	}
}

// A call allocates nothing beyond the timeout's context; an open breaker
// with a fallback allocates nothing at all.
func TestComposeAllocations(t *testing.T) {
	if testing.CoverMode() != "" || raceEnabled {
		t.Skip("allocation counts differ under -cover and -race")
	}
	cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1})
	r := mustRetry(t, RetryConfig{})
	b := mustBulkhead(t, BulkheadConfig{Limit: 1024})
	noTimeout := Compose(okFunc, Stack[int]{CircuitBreaker: cb, Retry: r, Bulkhead: b, Fallback: FallbackValue(0)})
	ctx := context.Background()
	if n := testing.AllocsPerRun(1000, func() { noTimeout(ctx) }); n != 0 {
		t.Errorf("success without timeout: %v allocs; want 0", n)
	}
	baseline := testing.AllocsPerRun(1000, func() {
		_, cancel := context.WithTimeoutCause(ctx, time.Minute, ErrTimeout)
		cancel()
	})
	full := Compose(okFunc, Stack[int]{CircuitBreaker: cb, Retry: r, Timeout: time.Minute, Bulkhead: b, Fallback: FallbackValue(0)})
	if n := testing.AllocsPerRun(1000, func() { full(ctx) }); n > baseline {
		t.Errorf("full stack success: %v allocs; want at most %v, the timeout context's", n, baseline)
	}
	WithCircuitBreaker(failFunc, cb)(ctx)
	if n := testing.AllocsPerRun(1000, func() { full(ctx) }); n != 0 {
		t.Errorf("breaker open with fallback: %v allocs; want 0", n)
	}
}

// Local saturation says nothing about the downstream: a call the bulkhead
// turned away, even after its retries, does not count against the breaker;
// and an attempt whose timeout runs out in the queue is a bulkhead
// rejection as well as a timeout.
func TestComposeBulkheadRejectionsDoNotTripBreaker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1})
		b := mustBulkhead(t, BulkheadConfig{Limit: 1})
		hold, _ := b.Acquire(context.Background())
		fn := Compose(okFunc, Stack[int]{
			CircuitBreaker: cb,
			Retry:          mustRetry(t, RetryConfig{MaxAttempts: 2, DisableJitter: true, MaxDelay: time.Millisecond}),
			Timeout:        time.Second,
			Bulkhead:       b,
		})
		_, err := fn(context.Background())
		if !errors.Is(err, ErrTimeout) || !errors.Is(err, ErrBulkheadFull) || !errors.Is(err, ErrRetryExhausted) {
			t.Fatalf("err = %v; want exhausted timeouts in the bulkhead queue", err)
		}
		if s := b.Stats(); s.Rejected != 2 || s.Waiting != 0 {
			t.Fatalf("Stats = %+v; want both attempts counted as rejected", s)
		}
		if cb.State() != StateClosed || cb.Counts().TotalFailures != 0 {
			t.Fatalf("breaker %v %+v; local saturation must not count", cb.State(), cb.Counts())
		}
		hold()
	})
}
