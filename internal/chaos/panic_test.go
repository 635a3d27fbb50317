package chaos

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/resilience-go/resilience"
)

// boom is what the protected function panics with.
type boom struct{ n int64 }

// TestPanics: the protected function panics at random, three calls in ten,
// under eight concurrent callers that recover. Every slot of the bulkhead
// is given back, no breaker probe is left held (once the panics stop, a
// healthy call closes the breaker within OpenTimeout), and no goroutine is
// left behind: with a cooperative timeout and with an enforced one, whose
// abandoned attempts panic after their caller has gone.
//
// No network here, so it runs in a synctest bubble: time is fake and the
// bounds are exact.
func TestPanics(t *testing.T) {
	for _, enforce := range []bool{false, true} {
		name := "cooperative"
		if enforce {
			name = "enforced"
		}
		t.Run(name, func(t *testing.T) {
			before := goroutines()
			synctest.Test(t, func(t *testing.T) { panics(t, name, enforce) })
			if after := goroutines(); after > before {
				t.Errorf("goroutines: %d before, %d after", before, after)
			}
		})
	}
}

func panics(t *testing.T, name string, enforce bool) {
	const (
		callers     = 8
		callsEach   = 200
		pace        = 5 * time.Millisecond
		failMax     = 3
		openTimeout = 50 * time.Millisecond
		limit       = 3
		timeout     = 5 * time.Millisecond
	)
	var (
		mu          sync.Mutex
		transitions []resilience.State
	)
	cb, err := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{
		Name: "chaos-panics-" + name, FailMax: failMax, OpenTimeout: openTimeout,
		OnStateChange: func(_ string, _, to resilience.State) {
			mu.Lock()
			transitions = append(transitions, to)
			mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	bh, err := resilience.NewBulkhead(resilience.BulkheadConfig{Name: "chaos-panics-" + name, Limit: limit, MaxWait: 2 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	rt, err := resilience.NewRetry(resilience.RetryConfig{MaxAttempts: 2, InitialDelay: time.Millisecond, MaxDelay: 2 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	var (
		panicPct                atomic.Int64 // the share of attempts that panic, in percent
		entered, inside, peak   atomic.Int64
		thrown, caught, dropped atomic.Int64
	)
	panicPct.Store(30)
	fn := func(ctx context.Context) (int, error) {
		entered.Add(1)
		n := inside.Add(1)
		defer inside.Add(-1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		// 1ms +- 1ms of work, and one attempt in ten runs past the
		// timeout: an enforced timeout abandons it, and if it panics
		// then, there is no caller left to take the panic.
		work := time.Duration(rand.Int64N(int64(2 * time.Millisecond)))
		if panicPct.Load() == 30 && rand.Float64() < 0.1 {
			work = 2 * timeout
		}
		time.Sleep(work) // simulated work, in the bubble's fake time
		if rand.Int64N(100) < panicPct.Load() {
			thrown.Add(1)
			panic(boom{thrown.Load()})
		}
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		return 1, nil
	}
	call := resilience.Compose(fn, resilience.Stack[int]{
		Name: "chaos.panics." + name, CircuitBreaker: cb, Retry: rt,
		Timeout: timeout, EnforceTimeout: enforce, Bulkhead: bh,
	})

	kinds := map[string]int{}
	var kindsMu sync.Mutex
	var wg sync.WaitGroup
	for range callers {
		wg.Go(func() {
			for range callsEach {
				func() {
					defer func() {
						if r := recover(); r != nil {
							if _, ok := r.(boom); !ok {
								t.Errorf("recovered %v; want a boom", r)
							}
							caught.Add(1)
						}
					}()
					_, err := call(context.Background())
					if err != nil && !typed(err) {
						t.Errorf("untyped error %v", err)
					}
					kindsMu.Lock()
					kinds[errorKind(err)]++
					kindsMu.Unlock()
				}()
				time.Sleep(pace)
			}
		})
	}
	wg.Wait()
	// Abandoned attempts finish their fake work, and panic or not.
	time.Sleep(4 * timeout)
	synctest.Wait()
	dropped.Store(thrown.Load() - caught.Load())
	if !enforce && dropped.Load() != 0 {
		t.Errorf("%d panics never reached a caller without an enforced timeout", dropped.Load())
	}
	randomPhase := struct{ thrown, caught, entered int64 }{thrown.Load(), caught.Load(), entered.Load()}

	st := bh.Stats()
	if st.Active != 0 || st.Waiting != 0 {
		t.Errorf("bulkhead after the panics: %+v; want nothing active or waiting", st)
	}
	if got := int64(st.Completed); got != entered.Load() {
		t.Errorf("bulkhead completed %d; %d attempts entered fn", got, entered.Load())
	}
	if peak.Load() > limit {
		t.Errorf("%d attempts inside at once; the limit is %d", peak.Load(), limit)
	}

	// Every attempt panics until the breaker opens; after OpenTimeout the
	// half-open probe panics too, and must open the breaker again rather
	// than leave it half-open with its one probe slot held.
	panicPct.Store(100)
	protect := func() (err error) {
		defer func() {
			if r := recover(); r != nil {
				caught.Add(1)
			}
		}()
		_, err = call(context.Background())
		return err
	}
	for i := 0; cb.State() != resilience.StateOpen; i++ {
		if i == 100 {
			t.Fatalf("breaker %v after 100 panicking calls", cb.State())
		}
		protect()
		time.Sleep(pace)
	}
	time.Sleep(openTimeout + time.Millisecond)
	if s := cb.State(); s != resilience.StateHalfOpen {
		t.Fatalf("breaker %v OpenTimeout after opening; want half-open", s)
	}
	protect()
	probeReopened := cb.State() == resilience.StateOpen
	if !probeReopened {
		t.Errorf("breaker %v after its probe panicked; want open", cb.State())
	}

	// The panics and the slow attempts stop: a healthy call closes the
	// breaker within OpenTimeout and one pace.
	panicPct.Store(0)
	stopped := time.Now()
	for cb.State() != resilience.StateClosed {
		if time.Since(stopped) > 3*openTimeout {
			t.Fatalf("breaker still %v %v after the panics stopped: a probe is stuck", cb.State(), time.Since(stopped))
		}
		protect()
		time.Sleep(time.Millisecond)
	}
	recovered := time.Since(stopped)
	if recovered > openTimeout+pace {
		t.Errorf("breaker closed %v after the panics stopped; want within OpenTimeout %v and a probe", recovered, openTimeout)
	}
	if _, err := call(context.Background()); err != nil {
		t.Errorf("healthy call after recovery: %v", err)
	}
	time.Sleep(4 * timeout)
	synctest.Wait()
	if st := bh.Stats(); st.Active != 0 {
		t.Errorf("bulkhead active = %d at the end", st.Active)
	}

	mu.Lock()
	opens := 0
	for _, s := range transitions {
		if s == resilience.StateOpen {
			opens++
		}
	}
	mu.Unlock()
	kindsMu.Lock()
	defer kindsMu.Unlock()
	report(t, "panics/"+name,
		"callers", callers,
		"calls", callers*callsEach,
		"attempts_entered_fn", randomPhase.entered,
		"panics_thrown", randomPhase.thrown,
		"panics_caught_by_callers", randomPhase.caught,
		"panics_dropped_after_abandon", dropped.Load(),
		"returned_kinds", kinds,
		"breaker_opens", opens,
		"panicking_probe_reopened", probeReopened,
		"time_to_close_after_panics_stop", recovered,
		"bulkhead_peak_inside", peak.Load(),
		"bulkhead_completed", st.Completed,
		"bulkhead_active_after", st.Active,
	)
}
