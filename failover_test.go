package resilience

import (
	"context"
	"errors"
	"testing"
)

func TestFailoverSkipsProviderWithOpenBreaker(t *testing.T) {
	reader := withReader(t)
	cb := mustBreaker(t, CircuitBreakerConfig{Name: "failover-primary"})
	cb.ForceOpen()
	calls := [3]int{}
	provider := func(i int, err error) Func[string] {
		return func(context.Context) (string, error) {
			calls[i]++
			return "answer " + string(rune('A'+i)), err
		}
	}
	name := uniqueName("failover-a")
	f := Failover(
		Compose(provider(0, nil), Stack[string]{Name: name, CircuitBreaker: cb}),
		Compose(provider(1, nil), Stack[string]{Name: uniqueName("failover-b")}),
		provider(2, nil),
	)
	v, err := f(context.Background())
	if err != nil || v != "answer B" {
		t.Fatalf("got %q, %v; want the second provider's answer", v, err)
	}
	if calls[0] != 0 || calls[1] != 1 || calls[2] != 0 {
		t.Errorf("calls = %v, want the first skipped by its open breaker and the third not needed", calls)
	}
	wantPoints(t, collect(t, reader), "resilience.failover.used", "counter", "{call}", "function="+name+",index=1=1")
}

func TestFailoverAllFailReturnsLastError(t *testing.T) {
	errA, errB := errors.New("a"), errors.New("b")
	f := Failover(
		func(context.Context) (int, error) { return 0, errA },
		func(context.Context) (int, error) { return 0, errB },
	)
	if _, err := f(context.Background()); !errors.Is(err, errB) {
		t.Errorf("err = %v, want the last provider's", err)
	}
}

func TestFailoverStopsAtCallerCancellation(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	second := 0
	f := Failover(
		func(ctx context.Context) (int, error) { cancel(); return 0, ctx.Err() },
		func(context.Context) (int, error) { second++; return 2, nil },
	)
	if _, err := f(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("err = %v, want the caller's cancellation", err)
	}
	if second != 0 {
		t.Error("the second provider was called after the caller gave up")
	}
}

func TestFailoverInvalid(t *testing.T) {
	if _, err := Failover[int]()(context.Background()); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("Failover() = %v, want ErrInvalidConfig", err)
	}
	if _, err := Failover(okFunc, nil)(context.Background()); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("Failover(fn, nil) = %v, want ErrInvalidConfig", err)
	}
}
