package resilience

import (
	"context"
	"errors"
	"math/rand/v2"
	"sort"
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

// Calls earn retries as they arrive, and old calls stop counting a bucket
// at a time as the window slides.
func TestRetryBudgetSlidingWindow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		budget := mustBudget(t, RetryBudgetConfig{Ratio: 0.5, MinPerSecond: -1, Window: 10 * time.Second})
		if budget.withdraw() {
			t.Fatal("a retry was granted with no floor and no call")
		}
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
		if want := "resilience: retry budget exhausted after 1 attempt: boom"; err.Error() != want {
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

// Regression: the budget used to take its snapshots only when a retry asked
// for budget, so after a long run of successes with no retry every snapshot
// had aged out, the base was reset to "now" and the calls of the last window
// earned nothing (49 retries here). 2000 calls at 100/s then 100 failures
// retried until refused: the last 10s hold 1099 calls, which at ratio 0.5
// earn about 550 retries; the failures come as a bucket opens, so the
// buckets cover only the last 9s and their 1000 calls earn 500.
func TestRetryBudgetCountsCallsOfTheLastWindow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		budget := mustBudget(t, RetryBudgetConfig{Ratio: 0.5, MinPerSecond: -1, Window: 10 * time.Second})
		for range 2000 {
			budget.deposit()
			time.Sleep(10 * time.Millisecond)
		}
		granted := 0
		for range 100 {
			budget.deposit()
			for budget.withdraw() {
				granted++
			}
		}
		if granted < 500 || granted > 560 {
			t.Fatalf("granted %d retries after 2000 calls at 100/s and 100 failures, ratio 0.5, 10s window; want about 550 (500 to 560)", granted)
		}
	})
}

// Whatever the load shape, a decision of the budget agrees with some count
// of the calls and retries between those of the last nine tenths of the
// window and those of the whole window: nothing older than the window
// counts, and nothing in the last nine tenths is lost. Random schedules mix
// bursts, steady calls and pauses longer than the window.
func TestRetryBudgetCountsOnlyItsWindow(t *testing.T) {
	const window = 10 * time.Second
	const recent = window * 9 / 10 // counted whatever the bucket boundaries
	for seed := range uint64(20) {
		synctest.Test(t, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			ratio, floor := 0.5, 0.0
			cfg := RetryBudgetConfig{Ratio: ratio, MinPerSecond: -1, Window: window}
			if seed%2 == 1 {
				cfg.MinPerSecond, floor = 0.5, 5
			}
			budget := mustBudget(t, cfg)
			start := time.Now()
			var calls, retries []time.Duration // since start, in order
			// since counts the times at or after from, or after it if open.
			since := func(ts []time.Duration, from time.Duration, open bool) int {
				return len(ts) - sort.Search(len(ts), func(i int) bool {
					return ts[i] > from || !open && ts[i] == from
				})
			}
			// The share of calls among the steps changes now and then, so
			// that buckets full of calls alternate with buckets full of
			// retries.
			callShare := 55
			for range 3000 {
				now := time.Since(start)
				if rng.IntN(50) == 0 {
					callShare = rng.IntN(85)
				}
				switch r := rng.IntN(100); {
				case r < callShare:
					budget.deposit()
					calls = append(calls, now)
				case r < 85:
					granted := budget.withdraw()
					minCalls, maxCalls := since(calls, now-recent, false), since(calls, now-window, true)
					minRetries, maxRetries := since(retries, now-recent, false), since(retries, now-window, true)
					if granted && float64(minRetries+1) > floor+ratio*float64(maxCalls) {
						t.Fatalf("seed %d at %v: granted a retry with at least %d retries and at most %d calls in the window", seed, now, minRetries, maxCalls)
					}
					if !granted && float64(maxRetries+1) <= floor+ratio*float64(minCalls) {
						t.Fatalf("seed %d at %v: refused a retry with at most %d retries and at least %d calls in the window", seed, now, maxRetries, minCalls)
					}
					if granted {
						retries = append(retries, now)
					}
				case r < 99:
					time.Sleep(time.Duration(rng.Int64N(int64(40 * time.Millisecond))))
				default:
					time.Sleep(time.Duration(rng.Int64N(int64(2 * window))))
				}
			}
		})
	}
}

// Goroutines that all make the first calls of a new period must reset its
// bucket once between them: a second reset would drop the calls counted
// after the first. They start together so that they race for the reset.
func TestRetryBudgetConcurrentRotation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		budget := mustBudget(t, RetryBudgetConfig{Ratio: 0.5, MinPerSecond: -1, Window: 100 * time.Millisecond})
		for round := range 200 {
			time.Sleep(100 * time.Millisecond) // a new window: every bucket is stale
			start := make(chan struct{})
			var wg sync.WaitGroup
			for range 8 {
				wg.Go(func() {
					<-start
					for range 50 {
						budget.deposit()
					}
				})
			}
			close(start)
			wg.Wait()
			var granted atomic.Int64
			for range 4 {
				wg.Go(func() {
					for budget.withdraw() {
						granted.Add(1)
					}
				})
			}
			wg.Wait()
			if granted.Load() != 200 {
				t.Fatalf("round %d: granted %d retries for 400 calls at ratio 0.5; want 200", round, granted.Load())
			}
		}
	})
}

// deposit runs on every call of a policy with a budget, retried or not.
func BenchmarkRetryBudgetDeposit(b *testing.B) {
	budget := mustBudget(b, RetryBudgetConfig{})
	for b.Loop() {
		budget.deposit()
	}
}

// One budget is shared by every caller of a downstream, so its deposits
// contend on the current bucket.
func BenchmarkRetryBudgetDepositParallel(b *testing.B) {
	budget := mustBudget(b, RetryBudgetConfig{})
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			budget.deposit()
		}
	})
}
