package resilience

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"
)

// hangs waits for its context and counts its attempts.
func hangs(attempts *int) Func[int] {
	return func(ctx context.Context) (int, error) {
		*attempts++
		<-ctx.Done()
		return 0, ctx.Err()
	}
}

func TestTotalTimeoutBoundsTheWholeCall(t *testing.T) {
	for _, tc := range []struct {
		name         string
		total        time.Duration
		wantAt       time.Duration
		wantAttempts int
	}{
		// 60s attempt, 10s wait, then the second attempt is cut at 90s.
		{"during an attempt", 90 * time.Second, 90 * time.Second, 2},
		// The wait would end at 70s, after the 65s: not started.
		{"before a wait", 65 * time.Second, 60 * time.Second, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				var attempts int
				rt := mustRetry(t, RetryConfig{MaxAttempts: 5, Strategy: RetryFixed, InitialDelay: 10 * time.Second, DisableJitter: true})
				fn := Compose(hangs(&attempts), Stack[int]{Retry: rt, Timeout: 60 * time.Second, TotalTimeout: tc.total})
				start := time.Now()
				_, err := fn(context.Background())
				if d := time.Since(start); d != tc.wantAt {
					t.Errorf("returned after %v; want %v", d, tc.wantAt)
				}
				if attempts != tc.wantAttempts {
					t.Errorf("%d attempts; want %d", attempts, tc.wantAttempts)
				}
				var e *Error
				if !errors.As(err, &e) || !errors.Is(err, ErrTimeout) || e.Cause == nil {
					t.Fatalf("%v; want an *Error matching ErrTimeout with the last attempt's error", err)
				}
			})
		})
	}
}

// The total timeout is the call's, not the caller's: a breaker counts a
// call it cut as a failure.
func TestTotalTimeoutCountsAgainstTheBreaker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, DisableLogging: true})
		var attempts int
		fn := Compose(hangs(&attempts), Stack[int]{CircuitBreaker: cb, TotalTimeout: time.Second})
		if _, err := fn(context.Background()); !errors.Is(err, ErrTimeout) {
			t.Fatalf("%v; want ErrTimeout", err)
		}
		if cb.State() != StateOpen {
			t.Fatalf("state %v; want open", cb.State())
		}
	})
}

func TestTotalTimeoutNegativeIsInvalid(t *testing.T) {
	_, err := Compose(okFunc, Stack[int]{TotalTimeout: -time.Second})(context.Background())
	if !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("%v; want ErrInvalidConfig", err)
	}
}

func TestRegistryTotalTimeoutFromEnvironment(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		env := map[string]string{"TIMEOUT_LLM": "60", "TIMEOUT_LLM_TOTAL": "90", "RETRY_EXPONENTIAL_MAX": "10", "RETRY_JITTER": "false", "RETRY_MAX_ATTEMPTS": "5"}
		cfg, err := LoadConfigWith(LoadOptions{Environment: env})
		if err != nil {
			t.Fatal(err)
		}
		if cfg.TotalTimeouts["LLM"] != 90*time.Second || cfg.Timeout("llm") != 60*time.Second {
			t.Fatalf("TotalTimeouts %v, Timeout(llm) %v; want 90s and 60s", cfg.TotalTimeouts, cfg.Timeout("llm"))
		}
		if _, ok := cfg.Timeouts["LLM_TOTAL"]; ok {
			t.Fatal("TIMEOUT_LLM_TOTAL taken for the attempt timeout of an operation LLM_TOTAL")
		}
		reg, err := NewRegistry(cfg)
		if err != nil {
			t.Fatal(err)
		}
		var attempts int
		start := time.Now()
		_, err = ForService(reg, "llm", hangs(&attempts))(context.Background())
		if d := time.Since(start); !errors.Is(err, ErrTimeout) || d > 90*time.Second {
			t.Fatalf("%v after %v; want ErrTimeout by 90s", err, d)
		}
		if _, err := LoadConfigWith(LoadOptions{Environment: map[string]string{"TIMEOUT_LLM_TOTAL": "-1"}}); err == nil {
			t.Fatal("TIMEOUT_LLM_TOTAL=-1 accepted")
		}
	})
}
