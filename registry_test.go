package resilience

import (
	"context"
	"errors"
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
