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

func TestWithChaosErrorRateOneNeverRunsTheFunction(t *testing.T) {
	var ran atomic.Int64
	fn := func(context.Context) (int, error) { ran.Add(1); return 1, nil }
	errDown := errors.New("openfga: connection refused")
	for _, tc := range []struct {
		name string
		cfg  ChaosConfig
		is   []error
	}{
		{"default error", ChaosConfig{ErrorRate: 1}, []error{ErrChaos}},
		{"own error", ChaosConfig{ErrorRate: 1, Error: errDown}, []error{ErrChaos, errDown}},
	} {
		_, err := WithChaos(fn, tc.cfg)(context.Background())
		for _, target := range tc.is {
			if !errors.Is(err, target) {
				t.Errorf("%s: err %v, want it to match %v", tc.name, err, target)
			}
		}
		if !IsRetryable(err) {
			t.Errorf("%s: injected %v is not retryable; want it retried as the transient fault it stands for", tc.name, err)
		}
	}
	if n := ran.Load(); n != 0 {
		t.Errorf("the function ran %d times under ErrorRate 1, want 0", n)
	}
	if v, err := WithChaos(fn, ChaosConfig{})(context.Background()); err != nil || v != 1 {
		t.Errorf("zero ChaosConfig: %v, %v; want the function's 1, nil", v, err)
	}
}

func TestChaosErrorRateIsAShare(t *testing.T) {
	f := WithChaos(func(context.Context) (int, error) { return 1, nil }, ChaosConfig{ErrorRate: 0.3})
	failed := 0
	const calls = 10000
	for range calls {
		if _, err := f(context.Background()); err != nil {
			failed++
		}
	}
	// 3000 expected; the binomial's standard deviation is 46.
	if failed < 2700 || failed > 3300 {
		t.Errorf("%d of %d calls failed at ErrorRate 0.3, want about 3000", failed, calls)
	}
}

// Injected latency sits inside the attempt's timeout: the timeout fires as
// it would for a slow downstream, and the retry retries it.
func TestChaosLatencyIsInsideTheTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var ran atomic.Int64
		f := Compose(func(context.Context) (int, error) { ran.Add(1); return 1, nil }, Stack[int]{
			Name:    uniqueName("chaos-latency"),
			Timeout: time.Second,
			Retry:   mustRetry(t, RetryConfig{MaxAttempts: 2, InitialDelay: time.Millisecond, DisableJitter: true}),
			Chaos:   ChaosConfig{LatencyRate: 1, Latency: 5 * time.Second},
		})
		start := time.Now()
		_, err := f(context.Background())
		if !errors.Is(err, ErrTimeout) || !errors.Is(err, ErrRetryExhausted) {
			t.Errorf("err %v, want the retries exhausted on ErrTimeout", err)
		}
		if took := time.Since(start); took != 2*time.Second+time.Millisecond {
			t.Errorf("took %v, want two 1s timeouts and the 1ms wait", took)
		}
		if n := ran.Load(); n != 0 {
			t.Errorf("the function ran %d times, want 0: each attempt timed out in the injected delay", n)
		}
		// A delay shorter than the timeout delays the call, which then runs.
		g := Compose(func(context.Context) (int, error) { return 7, nil }, Stack[int]{
			Name: uniqueName("chaos-latency"), Timeout: time.Second,
			Chaos: ChaosConfig{LatencyRate: 1, Latency: 300 * time.Millisecond},
		})
		start = time.Now()
		if v, err := g(context.Background()); v != 7 || err != nil || time.Since(start) != 300*time.Millisecond {
			t.Errorf("%v, %v after %v; want 7, nil after the injected 300ms", v, err, time.Since(start))
		}
	})
}

// The breaker above counts injected faults as it counts real ones, and the
// fallback answers; the metrics say the faults were injected.
func TestChaosOpensTheBreakerAndIsLabelled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reader := withReader(t)
		name := uniqueName("chaos-breaker")
		cb := mustBreaker(t, CircuitBreakerConfig{Name: name, FailMax: 3, OpenTimeout: time.Minute})
		var ran atomic.Int64
		f := Compose(func(context.Context) (string, error) { ran.Add(1); return "live", nil }, Stack[string]{
			Name: name, CircuitBreaker: cb,
			Chaos:    ChaosConfig{ErrorRate: 1},
			Fallback: FallbackValue("cached"),
		})
		for i := range 5 {
			v, err := f(context.Background())
			if v != "cached" || err != nil {
				t.Fatalf("call %d: %q, %v; want the fallback's value", i, v, err)
			}
		}
		if cb.State() != StateOpen {
			t.Errorf("breaker %v after 5 injected failures with FailMax 3, want open", cb.State())
		}
		if n := ran.Load(); n != 0 {
			t.Errorf("the function ran %d times, want 0", n)
		}
		c := collect(t, reader)
		wantPoints(t, c, "resilience.chaos.injected", "counter", "{fault}", "fault=error,function="+name+"=3")
		wantPoints(t, c, "resilience.circuit_breaker.failures", "counter", "{call}", "error.type=chaos,service="+name+"=3")
	})
}

func TestChaosConfigErrorsNameTheField(t *testing.T) {
	fn := func(context.Context) (int, error) { return 1, nil }
	for _, tc := range []struct {
		f     Func[int]
		field string
	}{
		{WithChaos(fn, ChaosConfig{ErrorRate: 1.5}), "ChaosConfig.ErrorRate"},
		{WithChaos(fn, ChaosConfig{LatencyRate: -0.1, Latency: time.Second}), "ChaosConfig.LatencyRate"},
		{WithChaos(fn, ChaosConfig{Latency: -time.Second}), "ChaosConfig.Latency"},
		{WithChaos(fn, ChaosConfig{LatencyRate: 0.5}), "ChaosConfig.LatencyRate"}, // no Latency: nothing to inject
		{Compose(fn, Stack[int]{Chaos: ChaosConfig{ErrorRate: 2}}), "Stack.Chaos.ErrorRate"},
		{WithChaos[int](nil, ChaosConfig{}), "WithChaos fn"},
	} {
		_, err := tc.f(context.Background())
		if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("err %v, want ErrInvalidConfig naming %s", err, tc.field)
		}
	}
}

// An enforced timeout runs its attempt in a goroutine of its own: the
// fault is injected there, inside the slot, and the deadline still cuts
// an injected delay.
func TestChaosWithEnforcedTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Name: uniqueName("chaos-enforced"), Limit: 1})
		f := Compose(func(context.Context) (int, error) { return 1, nil }, Stack[int]{
			Name: uniqueName("chaos-enforced"), Timeout: time.Second, EnforceTimeout: true, Bulkhead: b,
			Chaos: ChaosConfig{LatencyRate: 1, Latency: time.Hour, ErrorRate: 1},
		})
		start := time.Now()
		if _, err := f(context.Background()); !errors.Is(err, ErrTimeout) || time.Since(start) != time.Second {
			t.Errorf("err %v after %v, want ErrTimeout after 1s", err, time.Since(start))
		}
		synctest.Wait()
		if s := b.Stats(); s.Active != 0 {
			t.Errorf("%d slots held after the abandoned attempt ended, want 0", s.Active)
		}
	})
}

// BenchmarkChaosOff measures what a pipeline with fault injection switched
// off pays per call (a registry's pipelines all have the cell): one atomic
// load. Compare with benchstat -col /chaos.
func BenchmarkChaosOff(b *testing.B) {
	fn := func(context.Context) (int, error) { return 1, nil }
	for _, c := range []struct {
		name string
		p    *pipeline
	}{
		{"none", &pipeline{}},
		{"off", &pipeline{chaos: new(chaosCell)}},
	} {
		b.Run("chaos="+c.name, func(b *testing.B) {
			f := newEdge(c.p, "bench-chaos-"+c.name, "", fn, nil, 0)
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				if _, err := f(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// A hedge failed by an injected fault is counted as sent, with or without
// an enforced timeout, as one the downstream failed is.
func TestChaosHedgeCountedOnEveryPath(t *testing.T) {
	for _, enforce := range []bool{false, true} {
		synctest.Test(t, func(t *testing.T) {
			reader := withReader(t)
			name := uniqueName("chaos-hedge")
			var mu sync.Mutex
			first := true
			f := Compose(func(ctx context.Context) (int, error) {
				mu.Lock()
				slow := first
				first = false
				mu.Unlock()
				if slow {
					<-ctx.Done()
					return 0, ctx.Err()
				}
				return 1, nil
			}, Stack[int]{
				Name: name, Timeout: time.Second, EnforceTimeout: enforce,
				Hedge: mustHedge(t, HedgeConfig{Name: name, Delay: 10 * time.Millisecond}),
				// The first attempt is delayed past the hedge's delay;
				// the hedge fails by injection.
				Chaos: ChaosConfig{LatencyRate: 1, Latency: 20 * time.Millisecond, ErrorRate: 1},
			})
			f(context.Background())
			wantPoints(t, collect(t, reader), "resilience.hedge.attempts", "counter", "{attempt}", "function="+name+"=1")
		})
	}
}
