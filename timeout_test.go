package resilience

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// honours waits for its context or for d, whichever comes first.
func honours(d time.Duration) Func[int] {
	return func(ctx context.Context) (int, error) {
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(d):
			return 7, nil
		}
	}
}

func TestWithTimeoutExpires(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var cause error
		fn := WithTimeout(func(ctx context.Context) (int, error) {
			<-ctx.Done()
			cause = context.Cause(ctx)
			return 0, ctx.Err()
		}, 2*time.Second)
		start := time.Now()
		_, err := fn(context.Background())
		if got := time.Since(start); got != 2*time.Second {
			t.Errorf("returned after %v; want 2s", got)
		}
		if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v; want ErrTimeout and DeadlineExceeded", err)
		}
		if cause != ErrTimeout {
			t.Errorf("context.Cause seen by fn = %v; want ErrTimeout", cause)
		}
		if !IsRetryable(err) {
			t.Errorf("IsRetryable(per-attempt timeout) = false; want true")
		}
		if want := "resilience: timeout exceeded: context deadline exceeded"; err.Error() != want {
			t.Errorf("Error() = %q; want %q", err.Error(), want)
		}
	})
}

func TestWithTimeoutInTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		v, err := WithTimeout(honours(time.Second), 2*time.Second)(context.Background())
		if v != 7 || err != nil {
			t.Fatalf("= %v, %v; want 7, nil", v, err)
		}
		// A non-timeout error in time comes back as it was.
		_, err = WithTimeout(failFunc, time.Second)(context.Background())
		if err != errBoom {
			t.Fatalf("err = %v; want errBoom unchanged", err)
		}
	})
}

func TestWithTimeoutCallerDeadlineFirst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := WithTimeout(honours(time.Hour), 5*time.Second)(ctx)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v; want DeadlineExceeded", err)
		}
		if errors.Is(err, ErrTimeout) {
			t.Fatalf("err = %v matches ErrTimeout; the caller's own deadline must not", err)
		}
		if IsRetryable(err) {
			t.Errorf("IsRetryable(caller deadline) = true")
		}
	})
}

func TestWithTimeoutNested(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// The outer timeout fires first: the inner one passes fn's error
		// up, the outer one marks it, once.
		fn := WithTimeout(WithTimeout(honours(time.Hour), 5*time.Second), time.Second)
		_, err := fn(context.Background())
		var e *Error
		if !errors.As(err, &e) || e.Err != ErrTimeout || e.Cause != context.DeadlineExceeded {
			t.Fatalf("err = %#v; want one *Error{ErrTimeout} around DeadlineExceeded", err)
		}
		// The inner one fires first.
		_, err = WithTimeout(WithTimeout(honours(time.Hour), time.Second), 5*time.Second)(context.Background())
		if !errors.Is(err, ErrTimeout) || strings.Count(err.Error(), "timeout exceeded") != 1 {
			t.Fatalf("err = %v; want one ErrTimeout", err)
		}
	})
}

func TestWithTimeoutInvalid(t *testing.T) {
	for name, fn := range map[string]Func[int]{
		"zero":     WithTimeout(okFunc, 0),
		"negative": WithTimeout(okFunc, -time.Second),
		"nil fn":   WithTimeout[int](nil, time.Second),
		"enforced": WithEnforcedTimeout(okFunc, -1),
		"enf nil":  WithEnforcedTimeout[int](nil, time.Second),
	} {
		_, err := fn(context.Background())
		if !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: err = %v; want ErrInvalidConfig", name, err)
		}
	}
	_, err := WithTimeout(okFunc, -time.Second)(context.Background())
	if !strings.Contains(err.Error(), "WithTimeout d = -1s") {
		t.Errorf("err = %v; want it to name d and its value", err)
	}
}

func TestWithEnforcedTimeoutReturnsAtDeadline(t *testing.T) {
	reader := withReader(t)
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		var finished atomic.Bool
		stubborn := func(ctx context.Context) (int, error) {
			<-release // ignores ctx
			finished.Store(true)
			return 1, nil
		}
		start := time.Now()
		_, err := WithEnforcedTimeout(stubborn, time.Second)(context.Background())
		if got := time.Since(start); got != time.Second {
			t.Errorf("returned after %v; want 1s", got)
		}
		if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v; want ErrTimeout and DeadlineExceeded", err)
		}
		if n := counterValue(t, reader, "resilience.timeout.abandoned"); n != 1 {
			t.Errorf("abandoned = %d; want 1", n)
		}
		close(release)
		synctest.Wait() // the abandoned goroutine ends; its result is dropped
		if !finished.Load() {
			t.Fatal("abandoned call did not finish")
		}
	})
}

func TestWithEnforcedTimeoutPassesResults(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		v, err := WithEnforcedTimeout(honours(time.Second), 2*time.Second)(context.Background())
		if v != 7 || err != nil {
			t.Fatalf("= %v, %v; want 7, nil", v, err)
		}
		if _, err := WithEnforcedTimeout(failFunc, time.Second)(context.Background()); err != errBoom {
			t.Fatalf("err = %v; want errBoom", err)
		}
		// A cooperative function that returns at the deadline: its error is
		// marked as our timeout.
		_, err = WithEnforcedTimeout(honours(time.Hour), time.Second)(context.Background())
		if !errors.Is(err, ErrTimeout) {
			t.Fatalf("err = %v; want ErrTimeout", err)
		}
	})
}

func TestWithEnforcedTimeoutCallerCancel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		ctx, cancel := context.WithCancel(context.Background())
		go func() { time.Sleep(100 * time.Millisecond); cancel() }()
		_, err := WithEnforcedTimeout(func(context.Context) (int, error) { <-release; return 0, nil }, time.Second)(ctx)
		if !errors.Is(err, context.Canceled) || errors.Is(err, ErrTimeout) {
			t.Fatalf("err = %v; want context.Canceled, not ErrTimeout", err)
		}
		close(release)
		synctest.Wait()
	})
}

func TestWithEnforcedTimeoutPanic(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fn := WithEnforcedTimeout(func(context.Context) (int, error) { panic("deep") }, time.Second)
		func() {
			defer func() {
				if r := recover(); r != "deep" {
					t.Errorf("recovered %v; want the panic re-raised in the caller", r)
				}
			}()
			fn(context.Background())
		}()
		// Goexit in fn becomes an error, not a hang.
		_, err := WithEnforcedTimeout(func(context.Context) (int, error) { runtime.Goexit(); return 0, nil }, time.Second)(context.Background())
		if err != errGoexit {
			t.Errorf("err = %v; want errGoexit", err)
		}
		// A panic after abandonment is dropped, not a crash.
		release := make(chan struct{})
		WithEnforcedTimeout(func(context.Context) (int, error) { <-release; panic("late") }, time.Second)(context.Background())
		close(release)
		synctest.Wait()
	})
}

// The slot of an abandoned call stays held until the call really returns.
func TestEnforcedTimeoutHoldsBulkheadSlot(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b, _ := NewBulkhead(BulkheadConfig{Limit: 1, FailFast: true})
		release := make(chan struct{})
		fn := WithEnforcedTimeout(WithBulkhead(func(context.Context) (int, error) { <-release; return 1, nil }, b), time.Second)
		if _, err := fn(context.Background()); !errors.Is(err, ErrTimeout) {
			t.Fatalf("err = %v; want ErrTimeout", err)
		}
		if s := b.Stats(); s.Active != 1 {
			t.Fatalf("after abandonment Active = %d; want 1 (still running)", s.Active)
		}
		if _, err := fn(context.Background()); !errors.Is(err, ErrBulkheadFull) {
			t.Fatalf("err = %v; want ErrBulkheadFull while the abandoned call runs", err)
		}
		close(release)
		synctest.Wait()
		if s := b.Stats(); s.Active != 0 || s.Completed != 1 {
			t.Fatalf("after it returned Stats = %+v; want Active 0, Completed 1", s)
		}
	})
}

func TestTimeoutFor(t *testing.T) {
	for op, want := range map[string]time.Duration{
		"llm": 60 * time.Second, "LLM": 60 * time.Second, "auth": 5 * time.Second,
		"db": 10 * time.Second, "http": 15 * time.Second, "other": 30 * time.Second, "": 30 * time.Second,
	} {
		if got := TimeoutFor(op); got != want {
			t.Errorf("TimeoutFor(%q) = %v; want %v", op, got, want)
		}
	}
}

func TestTimeoutContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := TimeoutContext(context.Background(), "auth")
		defer cancel()
		dl, ok := ctx.Deadline()
		if !ok || time.Until(dl) != 5*time.Second {
			t.Fatalf("deadline in %v; want 5s", time.Until(dl))
		}
		<-ctx.Done()
		if context.Cause(ctx) != ErrTimeout {
			t.Errorf("cause = %v; want ErrTimeout", context.Cause(ctx))
		}
	})
}

// Found in the second review of the pipeline change (concurrency); it
// failed before the fix.
// An attempt that times out while still queued for the bulkhead never
// reached the downstream: with a cooperative timeout the breaker excludes
// it (ErrBulkheadFull is in the error). With an enforced one, the caller's
// select and the attempt's goroutine wake on the same deadline; when the
// caller wins (about half the time) it returns the bare context error, counts
// the attempt as abandoned, and the breaker counts a failure against a
// downstream nobody called. Repeated, since which goroutine wins is chance.
func TestEnforcedTimeoutQueueWaitIsARejection(t *testing.T) {
	for _, enforce := range []bool{false, true} {
		t.Run(fmt.Sprintf("enforce=%v", enforce), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				blamed := 0
				for range 20 {
					b := mustBulkhead(t, BulkheadConfig{Name: "q", Limit: 1})
					cb := mustBreaker(t, CircuitBreakerConfig{Name: "q", FailMax: 1})
					release, err := b.Acquire(context.Background()) // another user holds the only slot
					if err != nil {
						t.Fatal(err)
					}
					var called atomic.Bool
					fn := Compose(func(context.Context) (int, error) { called.Store(true); return 1, nil },
						Stack[int]{Name: "enforced-queue", CircuitBreaker: cb, Bulkhead: b, Timeout: 10 * time.Millisecond, EnforceTimeout: enforce})
					_, err = fn(context.Background())
					release()
					synctest.Wait()
					if called.Load() || !errors.Is(err, ErrTimeout) {
						t.Fatalf("called %v, err = %v; want the downstream not called, ErrTimeout", called.Load(), err)
					}
					if s := b.Stats(); s.Active != 0 || s.Waiting != 0 {
						t.Fatalf("%+v", s)
					}
					if st := cb.State(); st != StateClosed || !errors.Is(err, ErrBulkheadFull) {
						blamed++
						if blamed == 1 {
							t.Errorf("a call that timed out in the bulkhead's queue, never reaching the downstream: err = %v, breaker %v; want an error matching ErrBulkheadFull and the breaker closed, as without EnforceTimeout", err, st)
						}
					}
				}
				if blamed > 0 {
					t.Errorf("the breaker blamed the downstream in %d of 20 calls", blamed)
				}
			})
		})
	}
}
