package resilience

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

func mustBudget(t testing.TB, cfg RetryBudgetConfig) *RetryBudget {
	t.Helper()
	b, err := NewRetryBudget(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// A storm against a downstream that always fails: with the budget, the
// downstream sees at most 1 + Ratio times the calls.
func TestRetryBudgetBoundsAmplification(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		for _, ratio := range []float64{0.1, 0.2, 0.5} {
			budget := mustBudget(t, RetryBudgetConfig{Ratio: ratio, MinPerSecond: -1})
			r := mustRetry(t, RetryConfig{MaxAttempts: 5, InitialDelay: time.Millisecond, MaxDelay: time.Millisecond, Budget: budget})
			var downstream atomic.Int64
			fn := WithRetry(func(context.Context) (int, error) { downstream.Add(1); return 0, errBoom }, r)
			const calls = 1000
			denied := 0
			for range calls {
				_, err := fn(context.Background())
				if errors.Is(err, ErrRetryBudgetExhausted) {
					denied++
				}
				time.Sleep(time.Millisecond) // 1000 calls/s, all within one window
			}
			amp := float64(downstream.Load()) / calls
			if amp > 1+ratio+0.001 {
				t.Errorf("ratio %v: amplification %.3f; want at most %.3f", ratio, amp, 1+ratio)
			}
			if amp < 1+ratio*0.8 {
				t.Errorf("ratio %v: amplification %.3f; the budget should allow about %v retries per call", ratio, amp, ratio)
			}
			if denied == 0 {
				t.Errorf("ratio %v: no call was denied", ratio)
			}
		}
	})
}

// Without a budget the same storm multiplies the load by MaxAttempts: the
// baseline the budget is for.
func TestRetryWithoutBudgetAmplifies(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := mustRetry(t, RetryConfig{MaxAttempts: 5, InitialDelay: time.Millisecond, MaxDelay: time.Millisecond})
		var downstream atomic.Int64
		fn := WithRetry(func(context.Context) (int, error) { downstream.Add(1); return 0, errBoom }, r)
		for range 100 {
			fn(context.Background())
		}
		if downstream.Load() != 500 {
			t.Fatalf("downstream calls %d; want 500", downstream.Load())
		}
	})
}

func TestRetryBudgetFloorAndWindow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// A floor of 1 retry per second over a 10s window: 10 retries even
		// with almost no calls.
		budget := mustBudget(t, RetryBudgetConfig{Ratio: 0.01, MinPerSecond: 1, Window: 10 * time.Second})
		allowed := 0
		for range 30 {
			if budget.withdraw() {
				allowed++
			}
		}
		if allowed != 10 {
			t.Fatalf("allowed %d retries with no calls; want the floor of 10", allowed)
		}
		// The window forgets them: after it has passed, the floor is there
		// again.
		time.Sleep(10 * time.Second)
		allowed = 0
		for range 30 {
			if budget.withdraw() {
				allowed++
			}
		}
		if allowed != 10 {
			t.Fatalf("after the window, allowed %d; want 10 again", allowed)
		}
	})
}

// Calls earn retries as they arrive, and old calls stop counting a slot at a
// time as the window slides.
func TestRetryBudgetSlidingWindow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		budget := mustBudget(t, RetryBudgetConfig{Ratio: 0.5, MinPerSecond: -1, Window: 10 * time.Second})
		budget.withdraw() // a first snapshot: calls count from here
		for range 100 {
			budget.deposit()
		}
		time.Sleep(time.Second)
		if !budget.withdraw() {
			t.Fatal("a retry was refused with 100 calls and none retried")
		}
		granted := 1
		for budget.withdraw() {
			granted++
		}
		if granted != 50 {
			t.Fatalf("granted %d retries for 100 calls at ratio 0.5; want 50", granted)
		}
		time.Sleep(11 * time.Second) // the calls and retries fall out of the window
		for range 10 {
			budget.deposit()
		}
		time.Sleep(time.Second)
		granted = 0
		for budget.withdraw() {
			granted++
		}
		if granted > 5 {
			t.Fatalf("granted %d after the window slid; want at most 5 for the 10 recent calls", granted)
		}
	})
}

func TestRetryBudgetError(t *testing.T) {
	reader := withReader(t)
	synctest.Test(t, func(t *testing.T) {
		budget := mustBudget(t, RetryBudgetConfig{Ratio: 0.01, MinPerSecond: -1})
		r := mustRetry(t, RetryConfig{MaxAttempts: 3, Budget: budget})
		_, err := WithRetry(failFunc, r)(context.Background())
		if !errors.Is(err, ErrRetryBudgetExhausted) || !errors.Is(err, ErrRetryExhausted) || !errors.Is(err, errBoom) {
			t.Fatalf("err = %v; want ErrRetryBudgetExhausted, ErrRetryExhausted and the last error", err)
		}
		var e *Error
		if !errors.As(err, &e) || e.Attempts != 1 {
			t.Fatalf("errors.As = %+v; want Attempts 1", e)
		}
		if want := "resilience: retry budget exhausted after 1 attempts: boom"; err.Error() != want {
			t.Errorf("Error() = %q; want %q", err.Error(), want)
		}
		if n := counterValue(t, reader, "resilience.retry.budget_exhausted"); n != 1 {
			t.Errorf("resilience.retry.budget_exhausted = %d; want 1", n)
		}
	})
}

func TestNewRetryBudgetInvalid(t *testing.T) {
	for _, tc := range []struct {
		cfg  RetryBudgetConfig
		want string
	}{
		{RetryBudgetConfig{Ratio: -0.1}, "RetryBudgetConfig.Ratio = -0.1"},
		{RetryBudgetConfig{Ratio: 1.5}, "RetryBudgetConfig.Ratio = 1.5"},
		{RetryBudgetConfig{Ratio: nan()}, "RetryBudgetConfig.Ratio = NaN"},
		{RetryBudgetConfig{MinPerSecond: inf()}, "RetryBudgetConfig.MinPerSecond = +Inf"},
		{RetryBudgetConfig{Window: -time.Second}, "RetryBudgetConfig.Window = -1s"},
	} {
		b, err := NewRetryBudget(tc.cfg)
		if b != nil || !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewRetryBudget(%+v) = %v, %v; want an error containing %q", tc.cfg, b, err, tc.want)
		}
	}
	b := mustBudget(t, RetryBudgetConfig{})
	if b.ratio != 0.1 || b.floor != 100 || b.window != 10*time.Second {
		t.Errorf("defaults: ratio %v floor %v window %v", b.ratio, b.floor, b.window)
	}
}

func TestRetryBudgetConcurrent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		budget := mustBudget(t, RetryBudgetConfig{Ratio: 0.2, MinPerSecond: -1})
		r := mustRetry(t, RetryConfig{MaxAttempts: 4, InitialDelay: time.Millisecond, MaxDelay: time.Millisecond, Budget: budget})
		var downstream atomic.Int64
		fn := WithRetry(func(context.Context) (int, error) { downstream.Add(1); return 0, errBoom }, r)
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				for range 250 {
					fn(context.Background())
					time.Sleep(time.Millisecond)
				}
			})
		}
		wg.Wait()
		if amp := float64(downstream.Load()) / 2000; amp > 1.2+0.001 {
			t.Fatalf("amplification %.3f under concurrency; want at most 1.2", amp)
		}
	})
}
