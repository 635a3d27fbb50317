package resilience

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

var errEmptyAnswer = errors.New("empty completion")

func nonEmpty(s string) error {
	if s == "" {
		return errEmptyAnswer
	}
	return nil
}

func TestCheckRejectedAnswersAreRetriedThenFallenBackAndCountedByTheBreaker(t *testing.T) {
	calls := 0
	fn := func(context.Context) (string, error) { calls++; return "", nil }
	cb := mustBreaker(t, CircuitBreakerConfig{Name: uniqueName("check-cb"), FailMax: 10})
	f := Compose(fn, Stack[string]{
		Name:           uniqueName("check"),
		CircuitBreaker: cb,
		Retry:          mustRetry(t, RetryConfig{MaxAttempts: 3, InitialDelay: time.Microsecond, MaxDelay: time.Microsecond}),
		Check:          nonEmpty,
		Fallback:       FallbackValue("canned"),
	})
	v, err := f(context.Background())
	if err != nil || v != "canned" {
		t.Fatalf("got %q, %v; want the fallback's answer", v, err)
	}
	if calls != 3 {
		t.Errorf("calls = %d, want 3: every empty answer retried", calls)
	}
	if c := cb.Counts(); c.TotalFailures != 1 || c.TotalSuccesses != 0 {
		t.Errorf("breaker counts %+v, want the call counted as one failure", c)
	}
}

func TestCheckRetryGetsAGoodAnswer(t *testing.T) {
	answers := []string{"", "", "hello"}
	i := 0
	fn := func(context.Context) (string, error) { a := answers[i]; i++; return a, nil }
	f := Compose(fn, Stack[string]{
		Retry: mustRetry(t, RetryConfig{MaxAttempts: 3, InitialDelay: time.Microsecond}),
		Check: nonEmpty,
		Name:  uniqueName("check-ok"),
	})
	if v, err := f(context.Background()); err != nil || v != "hello" {
		t.Fatalf("got %q, %v", v, err)
	}
}

func TestCheckErrorWithoutFallbackMatchesTheChecksError(t *testing.T) {
	f := Compose(func(context.Context) (string, error) { return "", nil }, Stack[string]{
		Retry: mustRetry(t, RetryConfig{MaxAttempts: 2, InitialDelay: time.Microsecond}),
		Check: nonEmpty,
		Name:  uniqueName("check-err"),
	})
	_, err := f(context.Background())
	if !errors.Is(err, errEmptyAnswer) || !errors.Is(err, ErrRetryExhausted) {
		t.Errorf("err = %v, want ErrRetryExhausted with the check's error", err)
	}
}

// overloaded is a Check error that asks for a wait, as a provider's
// "overloaded" body with a retry hint would.
type overloaded struct{ wait time.Duration }

func (o overloaded) Error() string             { return "model overloaded" }
func (o overloaded) RetryAfter() time.Duration { return o.wait }

func TestCheckErrorRetryAfterIsHonoured(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var calls atomic.Int32
		fn := func(context.Context) (string, error) {
			if calls.Add(1) == 1 {
				return "overloaded", nil
			}
			return "fine", nil
		}
		f := Compose(fn, Stack[string]{
			Retry: mustRetry(t, RetryConfig{MaxAttempts: 2, InitialDelay: time.Millisecond, MaxDelay: time.Minute}),
			Check: func(s string) error {
				if s == "overloaded" {
					return overloaded{3 * time.Second}
				}
				return nil
			},
			Name: uniqueName("check-hint"),
		})
		start := time.Now()
		if v, err := f(context.Background()); err != nil || v != "fine" {
			t.Fatalf("got %q, %v", v, err)
		}
		if d := time.Since(start); d != 3*time.Second {
			t.Errorf("waited %v before the retry, want the check error's 3s", d)
		}
	})
}

func TestCheckNotRetryableWhenItsErrorSaysSo(t *testing.T) {
	calls := 0
	f := Compose(func(context.Context) (string, error) { calls++; return "", nil }, Stack[string]{
		Retry: mustRetry(t, RetryConfig{MaxAttempts: 3, InitialDelay: time.Microsecond}),
		Check: func(string) error { return refusal{} },
		Name:  uniqueName("check-final"),
	})
	f(context.Background())
	if calls != 1 {
		t.Errorf("calls = %d, want 1: the check's error says a retry is pointless", calls)
	}
}

type refusal struct{}

func (refusal) Error() string   { return "the model refused" }
func (refusal) Retryable() bool { return false }

func TestCheckSeenByTheHedge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var calls atomic.Int32
		fn := func(ctx context.Context) (string, error) {
			if calls.Add(1) == 1 {
				time.Sleep(30 * time.Millisecond) // after the hedge was sent
				return "", nil                    // and empty: a failure
			}
			time.Sleep(40 * time.Millisecond)
			return "hedged", nil
		}
		f := Compose(fn, Stack[string]{
			Hedge: mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond}),
			Check: nonEmpty,
			Name:  uniqueName("check-hedge"),
		})
		if v, err := f(context.Background()); err != nil || v != "hedged" {
			t.Fatalf("got %q, %v; want the hedge's answer, the first's empty one being a failure", v, err)
		}
	})
}
