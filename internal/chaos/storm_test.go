package chaos

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
)

// TestRetryStorm: a downstream failing half (then nine tenths) of its
// requests under steady load. Retries alone multiply the load on it, by
// 1 + p + p^2 for three attempts; a RetryBudget holds the extra load to its
// Ratio, whatever the failure rate.
func TestRetryStorm(t *testing.T) {
	const (
		workers     = 8
		duration    = time.Second
		maxAttempts = 3
		ratio       = 0.1
		// A floor of 0.2 retries a second over the default 10s window:
		// 2 retries however few the calls.
		minPerSecond = 0.2
		floor        = 2
	)
	for _, tc := range []struct {
		failure float64
		budget  bool
	}{
		{0.5, false}, {0.5, true}, {0.9, false}, {0.9, true},
	} {
		name := fmt.Sprintf("failure=%v/budget=%v", tc.failure, tc.budget)
		t.Run(name, func(t *testing.T) {
			d := startDownstream(t, Phase{Name: "failing", Fault: Fault{
				ErrorRate: tc.failure, Latency: 500 * time.Microsecond, Jitter: 500 * time.Microsecond,
			}})
			client := newClient(t, 2*time.Second)
			cfg := resilience.RetryConfig{
				MaxAttempts: maxAttempts, InitialDelay: time.Millisecond, MaxDelay: 4 * time.Millisecond,
			}
			if tc.budget {
				b, err := resilience.NewRetryBudget(resilience.RetryBudgetConfig{Ratio: ratio, MinPerSecond: minPerSecond})
				if err != nil {
					t.Fatal(err)
				}
				cfg.Budget = b
			}
			rt, err := resilience.NewRetry(cfg)
			if err != nil {
				t.Fatal(err)
			}
			call := resilience.Compose(get(client, d.URL()), resilience.Stack[Result]{
				Name: "chaos.storm", Retry: rt, Timeout: time.Second,
			})

			var calls, successes, refused atomic.Int64
			ctx, cancel := context.WithTimeout(context.Background(), duration)
			defer cancel()
			var wg sync.WaitGroup
			for range workers {
				wg.Go(func() {
					for ctx.Err() == nil {
						// The load is the workers' own: a call in flight
						// when the time is up finishes.
						_, err := call(context.Background())
						calls.Add(1)
						switch {
						case err == nil:
							successes.Add(1)
						case errors.Is(err, resilience.ErrRetryBudgetExhausted):
							refused.Add(1)
						case !typed(err):
							t.Errorf("untyped error %v", err)
						}
					}
				})
			}
			wg.Wait()

			received := d.Stats().Received
			n := calls.Load()
			amp := float64(received) / float64(n)
			// Retries alone: 1 + p + p^2 attempts per call on average.
			p := tc.failure
			expected := 1 + p + p*p
			if tc.budget {
				// Every call deposits before its first attempt, and a
				// retry is allowed only while retries <= floor + Ratio x
				// calls, all inside the 10s window: so the downstream sees
				// at most (1 + Ratio) x calls + floor requests.
				if bound := 1 + ratio + floor/float64(n); amp > bound {
					t.Errorf("amplification with a budget = %.3f; want at most 1 + Ratio + floor/calls = %.3f", amp, bound)
				}
				if amp >= 1.2 {
					t.Errorf("amplification with a budget = %.3f; want < 1.2", amp)
				}
				if refused.Load() == 0 {
					t.Errorf("the budget refused no retry")
				}
			} else if amp < expected-0.25 {
				t.Errorf("amplification with retries alone = %.3f; want about %.2f", amp, expected)
			}
			report(t, "retry_storm/"+name,
				"workers", workers,
				"duration", duration,
				"failure_rate", tc.failure,
				"budget", tc.budget,
				"caller_calls", n,
				"downstream_requests", received,
				"amplification", round(amp, 3),
				"expected_without_budget", round(expected, 3),
				"bound_with_budget", round(1+ratio+floor/float64(n), 3),
				"caller_success_rate", round(float64(successes.Load())/float64(n), 3),
				"retries_refused_by_budget", refused.Load(),
			)
		})
	}
}
