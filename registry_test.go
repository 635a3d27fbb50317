package resilience

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// Bug 5 of the pipeline issue: Reload applied only the limit of a live
// bulkhead; new FAIL_FAST, MAX_QUEUE and MAX_WAIT were reported by Config
// but not used.
func TestReloadAppliesBulkheadFailFastQueueAndWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := mustRegistry(t, map[string]string{"BULKHEAD_PAY_LIMIT": "1"})
		b := reg.Bulkhead("pay")
		release, err := b.Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer release()

		reload := func(env map[string]string) {
			t.Helper()
			cfg, err := LoadConfigWith(LoadOptions{Environment: env})
			if err != nil {
				t.Fatal(err)
			}
			if err := reg.Reload(cfg); err != nil {
				t.Fatal(err)
			}
		}
		reload(map[string]string{"BULKHEAD_PAY_LIMIT": "1", "BULKHEAD_PAY_FAIL_FAST": "true"})
		if _, err := b.Acquire(context.Background()); !errors.Is(err, ErrBulkheadFull) {
			t.Fatalf("FAIL_FAST after reload: err = %v; want ErrBulkheadFull at once", err)
		}

		reload(map[string]string{"BULKHEAD_PAY_LIMIT": "1", "BULKHEAD_PAY_MAX_QUEUE": "1"})
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go b.Acquire(ctx) // waits: the queue's one place
		synctest.Wait()
		if _, err := b.Acquire(context.Background()); !errors.Is(err, ErrBulkheadFull) {
			t.Fatalf("MAX_QUEUE after reload: err = %v; want ErrBulkheadFull", err)
		}
		cancel()
		synctest.Wait()

		reload(map[string]string{"BULKHEAD_PAY_LIMIT": "1", "BULKHEAD_PAY_MAX_WAIT": "2s"})
		start := time.Now()
		if _, err := b.Acquire(context.Background()); !errors.Is(err, ErrBulkheadFull) || time.Since(start) != 2*time.Second {
			t.Fatalf("MAX_WAIT after reload: err = %v after %v; want ErrBulkheadFull after 2s", err, time.Since(start))
		}
	})
}

// Bug 6: Reload from the environment dropped the retry's Budget, RetryIf and
// OnRetry, which no variable sets: a failing call made 1 attempt before the
// reload and 3 after.
func TestReloadKeepsRetryBudgetRetryIfAndOnRetry(t *testing.T) {
	cfg := DefaultConfig()
	budget := mustBudget(t, RetryBudgetConfig{})
	hooked := 0
	cfg.Retry.RetryIf = func(error) bool { return false }
	cfg.Retry.OnRetry = func(int, error, time.Duration) { hooked++ }
	cfg.Retry.Budget = budget
	cfg.DefaultCircuitBreaker.IsFailure = func(error) bool { return false }
	reg, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	attempts := 0
	fn := ForService(reg, "kept", func(context.Context) (int, error) { attempts++; return 0, errBoom })
	fn(context.Background())
	if attempts != 1 {
		t.Fatalf("%d attempts before the reload; want 1", attempts)
	}
	env, err := LoadConfigWith(LoadOptions{Environment: map[string]string{"RETRY_MAX_ATTEMPTS": "4"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.Reload(env); err != nil {
		t.Fatal(err)
	}
	attempts = 0
	fn(context.Background())
	if attempts != 1 {
		t.Errorf("%d attempts after the reload; want 1: RetryIf came from code and is kept", attempts)
	}
	got := reg.Config()
	if got.Retry.MaxAttempts != 4 || got.Retry.RetryIf == nil || got.Retry.OnRetry == nil || got.Retry.Budget != budget {
		t.Errorf("Config().Retry after reload = %+v; want MaxAttempts 4 from the environment and the hooks and budget from code", got.Retry)
	}
	if got.DefaultCircuitBreaker.IsFailure == nil {
		t.Error("the default breaker's IsFailure was dropped by the reload")
	}
	if reg.Retry().params().budget != budget {
		t.Error("the live retry policy lost its budget")
	}
}

// Found in review of the pipeline change; it failed before the fix.
// Reload merges the code's InitialDelay into a configuration whose
// MaxDelay is left at 0 (10s) without checking the result: with a code
// InitialDelay over 10s the merged retry is invalid, reconfigure fails
// silently, Reload returns nil, Config() reports the new MaxAttempts, and
// the live retry keeps the old one.
func TestReloadKeptInitialDelayFitsDefaultMaxDelay(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Retry = RetryConfig{MaxAttempts: 2, InitialDelay: 20 * time.Second, MaxDelay: 30 * time.Second}
	reg, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	next := DefaultConfig()
	next.Retry = RetryConfig{MaxAttempts: 5}
	if err := reg.Reload(next); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if got, reported := reg.Retry().MaxAttempts(), reg.Config().Retry.MaxAttempts; got != reported {
		t.Errorf("after Reload the live retry makes %d attempts; Config() reports %d", got, reported)
	}
	if err := reg.Config().Validate(); err != nil {
		t.Errorf("Config() after a successful Reload is invalid: %v", err)
	}
}

// Found in review of the pipeline change; it failed before the fix.
// Reload with a new IsFailure stores it in Config() but the live breaker
// keeps the one it was built with (reconfigure ignores the hooks): the
// same "reported but not used" as bug 5, for code-set settings.
func TestReloadAppliesNewIsFailure(t *testing.T) {
	cfg := DefaultConfig()
	cfg.DefaultCircuitBreaker = CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Minute,
		IsFailure: func(err error) bool { return !errors.Is(err, errBoom) }}
	reg, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cb := reg.CircuitBreaker("isfailure")
	next := reg.Config()
	next.DefaultCircuitBreaker.IsFailure = func(error) bool { return true }
	if err := reg.Reload(next); err != nil {
		t.Fatal(err)
	}
	WithCircuitBreaker(failFunc, cb)(context.Background())
	if st := cb.State(); st != StateOpen {
		t.Errorf("breaker %v after a failure the reloaded IsFailure counts, with FailMax 1; want open", st)
	}
}

// Calls through Compose (on the registry's policies), ForService and
// Transport while Reload changes every setting and ForceOpen and Reset
// run. Invariants once every call has returned: no slot held, no waiter,
// the breaker recovers, and with the registry left enabled, resilience.calls
// counts every call exactly once.
func TestReloadStress(t *testing.T) {
	for _, flipEnabled := range []bool{false, true} {
		t.Run(fmt.Sprintf("flipEnabled=%v", flipEnabled), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				svc := fmt.Sprintf("stress-%v", flipEnabled)
				reg := tableRegistry(t, svc, func(c *Config) {
					c.Retry = RetryConfig{MaxAttempts: 3, InitialDelay: time.Millisecond, MaxDelay: 5 * time.Millisecond}
					c.Bulkheads[EnvKey(svc)] = BulkheadConfig{Limit: 2, MaxQueue: 4, MaxWait: 3 * time.Millisecond}
					c.DefaultCircuitBreaker = CircuitBreakerConfig{FailMax: 3, OpenTimeout: 5 * time.Millisecond, HalfOpenMaxCalls: 2}
					c.DefaultTimeout = 4 * time.Millisecond
				})
				var n atomic.Int64
				down := func(ctx context.Context) error {
					i := n.Add(1)
					select {
					case <-time.After(time.Duration(i%5) * time.Millisecond):
					case <-ctx.Done():
						return ctx.Err()
					}
					if i%3 == 0 {
						return errBoom
					}
					return nil
				}
				before := callsRecorded(svc)
				var made atomic.Int64
				var wg sync.WaitGroup
				stop := make(chan struct{})
				for g := range 12 {
					ep := entryPoints[g%len(entryPoints)]
					wg.Go(func() {
						for i := range 60 {
							ctx, cancel := context.WithTimeout(context.Background(), time.Duration(1+i%20)*time.Millisecond)
							ep.call(ctx, reg, svc, down)
							cancel()
							made.Add(1)
						}
					})
				}
				wg.Go(func() {
					cfg := reg.Config()
					for i := 0; ; i++ {
						select {
						case <-stop:
							return
						case <-time.After(time.Millisecond):
						}
						if flipEnabled {
							cfg.Enabled = i%3 != 0
						}
						cfg.Bulkheads[EnvKey(svc)] = BulkheadConfig{Limit: 1 + i%3, MaxQueue: i % 4, MaxWait: time.Duration(i%4) * time.Millisecond, FailFast: i%5 == 0}
						cfg.DefaultCircuitBreaker.OpenTimeout = time.Duration(1+i%4) * time.Millisecond
						cfg.DefaultCircuitBreaker.HalfOpenMaxCalls = 1 + i%2
						cfg.Retry.MaxAttempts = 1 + i%3
						cfg.DefaultTimeout = time.Duration(1+i%5) * time.Millisecond
						if err := reg.Reload(cfg); err != nil {
							t.Error(err)
							return
						}
						switch i % 7 {
						case 2:
							reg.CircuitBreaker(svc).ForceOpen()
						case 4:
							reg.CircuitBreaker(svc).Reset()
						}
					}
				})
				done := make(chan struct{})
				go func() { wg.Wait(); close(done) }()
				// the callers finish; then stop the reloader
				for made.Load() < 12*60 {
					time.Sleep(time.Millisecond)
				}
				close(stop)
				<-done

				b := reg.Bulkhead(svc)
				if s := b.Stats(); s.Active != 0 || s.Waiting != 0 {
					t.Fatalf("after every call returned: %+v; want nothing held, nobody waiting", s)
				}
				cfg := reg.Config()
				cfg.Enabled = true
				reg.Reload(cfg)
				cb := reg.CircuitBreaker(svc)
				cb.Reset()
				for range 3 {
					if err := entryPoints[1].call(context.Background(), reg, svc, func(context.Context) error { return nil }); err != nil {
						t.Fatalf("a healthy call after the storm: %v (breaker %v)", err, cb.State())
					}
				}
				if st := cb.State(); st != StateClosed {
					t.Fatalf("breaker %v after healthy calls", st)
				}
				if !flipEnabled {
					after := callsRecorded(svc)
					var total int64
					for k, v := range after {
						total += v - before[k]
					}
					if want := made.Load() + 3; total != want {
						t.Errorf("resilience.calls counted %d calls (%v); %d were made", total, after, want)
					}
				}
			})
		})
	}
}

// Found in the second review of the pipeline change (concurrency); it
// failed before the fix.
// OnStateChange "is never called under a lock, so it may call the
// breaker's own methods". Reload calls each breaker's reconfigure with the
// registry's mutex held, and a new OpenTimeout moves an open breaker to
// closed and delivers that transition right there: a callback that asks
// the registry anything (Status, Config, Bulkhead) deadlocks Reload.
func TestReloadDeliversTransitionsOutsideItsLock(t *testing.T) {
	reg := mustRegistry(t, nil)
	var deadlocked atomic.Bool
	cfg := reg.Config()
	cfg.DefaultCircuitBreaker.OnStateChange = func(name string, from, to State) {
		got := make(chan struct{})
		go func() { reg.Status(); close(got) }() // e.g. log the registry's state, or shed load on a bulkhead
		select {
		case <-got:
		case <-time.After(time.Second):
			deadlocked.Store(true)
		}
	}
	if err := reg.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	cb := reg.CircuitBreaker("deadlock")
	cb.Trip() // open: the callback runs, outside any lock
	if deadlocked.Load() {
		t.Fatal("the callback could not reach the registry after Trip")
	}
	cfg.DefaultCircuitBreaker.OpenTimeout = 2 * time.Minute
	done := make(chan error, 1)
	go func() { done <- reg.Reload(cfg) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Reload never returned")
	}
	if deadlocked.Load() {
		t.Fatal("OnStateChange, delivered by Reload (open -> closed on a new OpenTimeout), could not call reg.Status(): Reload holds the registry's mutex while it delivers transitions")
	}
}

// Found in the second review of the pipeline change (concurrency); it
// failed before the fix.
// RESILIENCE_ENABLED=false is the lever an operator pulls when the
// policies themselves are the trouble: every call passes straight through
// from then on. Callers already queued for a bulkhead slot when it is
// pulled are not let go: they stay queued behind the slow calls that hold
// the slots (until their context or MaxWait, if any), while every newer
// caller passes.
func TestDisableLetsQueuedCallersThrough(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const svc = "disable-queue"
		reg := tableRegistry(t, svc, func(c *Config) {
			c.Bulkheads[EnvKey(svc)] = BulkheadConfig{Limit: 1} // wait for a slot, no bound
		})
		hold := make(chan struct{})
		slow := ForService(reg, svc, func(context.Context) (int, error) { <-hold; return 1, nil })
		quick := ForService(reg, svc, okFunc)
		go slow(context.Background())
		synctest.Wait()
		queued := make(chan error, 1)
		go func() { _, err := quick(context.Background()); queued <- err }()
		synctest.Wait()
		if w := reg.Bulkhead(svc).Stats().Waiting; w != 1 {
			t.Fatalf("Waiting = %d; want 1", w)
		}
		cfg := reg.Config()
		cfg.Enabled = false
		if err := reg.Reload(cfg); err != nil {
			t.Fatal(err)
		}
		if _, err := quick(context.Background()); err != nil {
			t.Fatalf("a new call after the switch: %v", err)
		}
		synctest.Wait()
		select {
		case err := <-queued:
			queued <- err
			if err != nil {
				t.Errorf("the queued call: %v", err)
			}
		default:
			t.Errorf("a caller queued before RESILIENCE_ENABLED=false is still waiting for a slot (Stats %+v) while new callers pass straight through", reg.Bulkhead(svc).Stats())
		}
		close(hold)
		synctest.Wait()
		<-queued
	})
}

// Regression: Reload from the environment dropped an adaptive bulkhead's
// Smoothing and Window set in code, which no variable can set, as it never
// dropped a breaker's IsFailure.
func TestReloadKeepsAdaptiveSmoothingAndWindowFromCode(t *testing.T) {
	env := map[string]string{"BULKHEAD_LLM_LIMIT": "10", "BULKHEAD_LLM_ADAPTIVE": "gradient"}
	cfg, err := LoadConfigWith(LoadOptions{Environment: env})
	if err != nil {
		t.Fatal(err)
	}
	bc := cfg.Bulkheads["LLM"]
	bc.Adaptive.Smoothing, bc.Adaptive.Window = 0.5, time.Second
	cfg.Bulkheads["LLM"] = bc
	r, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	b := r.Bulkhead("llm")

	env["BULKHEAD_LLM_MAX_LIMIT"] = "50"
	reloadEnv(t, r, env)
	a := b.adapt.Load()
	if a == nil {
		t.Fatal("not adaptive after the reload")
	}
	a.mu.Lock()
	smoothing, hi := a.smoothing, a.hi
	a.mu.Unlock()
	if w := time.Duration(a.window.Load()); smoothing != 0.5 || w != time.Second {
		t.Errorf("after Reload: Smoothing %v, Window %v; want 0.5 and 1s, set in code", smoothing, w)
	}
	if hi != 50 {
		t.Errorf("after Reload: MaxLimit %v, want 50 from the new variable", hi)
	}
}
