package resilience

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

// traced runs f with a context carrying a recording span, and returns the
// span's events, each as its name and its attributes, "k=v" sorted.
func traced(t *testing.T, f func(ctx context.Context)) []string {
	t.Helper()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	defer tp.Shutdown(context.Background())
	ctx, span := tp.Tracer("test").Start(context.Background(), "call")
	f(ctx)
	span.End()
	var out []string
	for _, s := range rec.Ended() {
		for _, e := range s.Events() {
			out = append(out, e.Name+" "+attrsString(e.Attributes))
		}
	}
	return out
}

func attrsString(kvs []attribute.KeyValue) string {
	var parts []string
	for _, kv := range kvs {
		parts = append(parts, string(kv.Key)+"="+kv.Value.String())
	}
	slices.Sort(parts)
	return strings.Join(parts, ",")
}

func wantEvents(t *testing.T, got []string, want ...string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("events:\n got  %q\n want %q", got, want)
	}
}

var errFlaky = errors.New("flaky")

func TestTraceRetry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		name := uniqueName("trace-retry")
		fails := 2
		f := Compose(func(context.Context) (int, error) {
			if fails > 0 {
				fails--
				return 0, errFlaky
			}
			return 1, nil
		}, Stack[int]{Name: name, Retry: mustRetry(t, RetryConfig{MaxAttempts: 3, InitialDelay: time.Second, DisableJitter: true})})
		got := traced(t, func(ctx context.Context) { f(ctx) })
		wantEvents(t, got,
			"resilience.retry error.type=*errors.errorString,resilience.attempt=1,resilience.function="+name+",resilience.retry.delay=1",
			"resilience.retry error.type=*errors.errorString,resilience.attempt=2,resilience.function="+name+",resilience.retry.delay=2")
	})
}

func TestTraceBreaker(t *testing.T) {
	name := uniqueName("trace-breaker")
	cb := mustBreaker(t, CircuitBreakerConfig{Name: name, FailMax: 1, OpenTimeout: time.Minute, DisableLogging: true})
	f := Compose(func(context.Context) (int, error) { return 0, errFlaky }, Stack[int]{Name: name, CircuitBreaker: cb})
	got := traced(t, func(ctx context.Context) {
		f(ctx) // fails, and opens the breaker
		f(ctx) // rejected
	})
	wantEvents(t, got,
		"resilience.circuit_breaker.state_change resilience.circuit_breaker.from=closed,resilience.circuit_breaker.to=open,resilience.service="+name,
		"resilience.circuit_breaker.rejected error.type=circuit_open,resilience.circuit_breaker.state=open,resilience.service="+name)
}

func TestTraceTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		name := uniqueName("trace-timeout")
		f := Compose(func(ctx context.Context) (int, error) { <-ctx.Done(); return 0, ctx.Err() },
			Stack[int]{Name: name, Operation: "llm", Timeout: 2 * time.Second})
		got := traced(t, func(ctx context.Context) { f(ctx) })
		wantEvents(t, got, "resilience.timeout error.type=timeout,resilience.function="+name+",resilience.operation=llm,resilience.timeout=2")
	})
}

func TestTraceBulkhead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		name := uniqueName("trace-bulkhead")
		b := mustBulkhead(t, BulkheadConfig{Name: name, Limit: 1, MaxWait: 100 * time.Millisecond})
		release, err := b.Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		f := Compose(func(context.Context) (int, error) { return 1, nil }, Stack[int]{Name: name, Bulkhead: b})
		got := traced(t, func(ctx context.Context) {
			f(ctx) // waits 100ms, and is turned away
			var wg sync.WaitGroup
			wg.Go(func() { f(ctx) }) // waits 50ms, and gets the slot
			time.Sleep(50 * time.Millisecond)
			release()
			wg.Wait()
		})
		wantEvents(t, got,
			"resilience.bulkhead.wait resilience.acquired=false,resilience.bulkhead="+name+",resilience.wait=0.1",
			"resilience.bulkhead.rejected error.type=bulkhead_full,resilience.bulkhead="+name,
			"resilience.bulkhead.wait resilience.acquired=true,resilience.bulkhead="+name+",resilience.wait=0.05")
	})
}

func TestTraceRateLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		name := uniqueName("trace-ratelimit")
		l := mustRateLimiter(t, RateLimiterConfig{Name: name, Limit: 1, Per: time.Second, Burst: 1, MaxWait: 2 * time.Second})
		f := Compose(func(context.Context) (int, error) { return 1, nil }, Stack[int]{Name: name, RateLimiter: l})
		got := traced(t, func(ctx context.Context) {
			f(ctx) // the burst
			f(ctx) // waits a second
			if err := l.Wait(ctx, 5); !errors.Is(err, ErrRateLimited) {
				t.Errorf("5 permits of a burst of 1: %v", err)
			}
		})
		wantEvents(t, got,
			"resilience.rate_limit.wait resilience.acquired=true,resilience.rate_limiter.permits=1,resilience.rate_limiter="+name+",resilience.wait=1",
			"resilience.rate_limit.rejected error.type=rate_limited,resilience.rate_limiter.permits=5,resilience.rate_limiter="+name)
	})
}

func TestTraceHedgeFallbackChaos(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		name := uniqueName("trace-hedge")
		first := true
		var mu sync.Mutex
		f := Compose(func(ctx context.Context) (int, error) {
			mu.Lock()
			slow := first
			first = false
			mu.Unlock()
			if slow {
				<-ctx.Done() // the first attempt never answers
				return 0, ctx.Err()
			}
			return 2, nil
		}, Stack[int]{Name: name, Hedge: mustHedge(t, HedgeConfig{Name: name, Delay: 10 * time.Millisecond})})
		got := traced(t, func(ctx context.Context) { f(ctx) })
		wantEvents(t, got, "resilience.hedge resilience.function="+name+",resilience.hedge.number=1")

		fname := uniqueName("trace-fallback")
		g := Compose(func(context.Context) (int, error) { return 1, nil }, Stack[int]{
			Name: fname, Chaos: ChaosConfig{ErrorRate: 1}, Fallback: FallbackValue(9),
		})
		got = traced(t, func(ctx context.Context) { g(ctx) })
		wantEvents(t, got,
			"resilience.chaos.injected resilience.chaos.fault=error,resilience.function="+fname,
			"resilience.fallback error.type=chaos,resilience.fallback.type=value,resilience.function="+fname)
	})
}

// The events' helpers allocate nothing when the span does not record: no
// span, or one sampled out.
func TestTraceNotRecordingAllocatesNothing(t *testing.T) {
	tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.NeverSample()))
	defer tp.Shutdown(context.Background())
	sampledOut, span := tp.Tracer("test").Start(context.Background(), "call")
	defer span.End()
	name := uniqueName("trace-alloc")
	cb := mustBreaker(t, CircuitBreakerConfig{Name: name, DisableLogging: true})
	cb.ForceOpen()
	b := mustBulkhead(t, BulkheadConfig{Name: name, Limit: 1, FailFast: true})
	release, _ := b.Acquire(context.Background())
	defer release()
	rejected := Compose(func(context.Context) (int, error) { return 1, nil }, Stack[int]{Name: name, CircuitBreaker: cb})
	full := Compose(func(context.Context) (int, error) { return 1, nil }, Stack[int]{Name: name + "-b", Bulkhead: b})
	for _, ctx := range []context.Context{context.Background(), sampledOut} {
		if trace.SpanFromContext(ctx).IsRecording() {
			t.Fatal("the span records")
		}
		for what, f := range map[string]func(){
			"helpers": func() {
				traceRetry(ctx, name, 1, "timeout", time.Second)
				traceBreakerRejected(ctx, cb, ErrCircuitOpen)
				traceTimeout(ctx, name, "llm", time.Second)
				traceBulkheadRejected(ctx, name)
				traceRateLimited(ctx, name, 1, time.Second)
				traceFallback(ctx, name, "timeout", fallbackValue)
			},
			"open breaker":  func() { rejected(ctx) },
			"full bulkhead": func() { full(ctx) },
		} {
			if n := testing.AllocsPerRun(100, f); n != 0 {
				t.Errorf("%s, span %v: %v allocations, want 0", what, fmt.Sprint(trace.SpanFromContext(ctx).SpanContext().IsValid()), n)
			}
		}
	}
}

// BenchmarkTraceRejection measures an open breaker's rejection with no span,
// with one that does not record, and with one that does: compare with
// benchstat -col /span.
func BenchmarkTraceRejection(b *testing.B) {
	cb := mustBreaker(b, CircuitBreakerConfig{Name: "bench-trace", DisableLogging: true})
	cb.ForceOpen()
	f := Compose(func(context.Context) (int, error) { return 1, nil }, Stack[int]{Name: "bench-trace", CircuitBreaker: cb})
	never := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.NeverSample()))
	always := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(tracetest.NewSpanRecorder()))
	defer never.Shutdown(context.Background())
	defer always.Shutdown(context.Background())
	sampledOut, s1 := never.Tracer("bench").Start(context.Background(), "call")
	defer s1.End()
	for _, c := range []struct {
		name string
		ctx  func() (context.Context, func())
	}{
		{"none", func() (context.Context, func()) { return context.Background(), func() {} }},
		{"sampled-out", func() (context.Context, func()) { return sampledOut, func() {} }},
		{"recording", func() (context.Context, func()) {
			// A span per run: a recorded span keeps its events.
			ctx, s := always.Tracer("bench").Start(context.Background(), "call")
			return ctx, func() { s.End() }
		}},
	} {
		b.Run("span="+c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				ctx, end := c.ctx()
				f(ctx)
				end()
			}
		})
	}
}

// Regression: a breaker's transitions were added to the span of whichever
// call delivered them to the callbacks, so a call whose transitions
// another call was delivering (a slow OnStateChange) had none on its own
// span, and the deliverer had them all.
func TestTraceTransitionsOnTheSpanOfTheCallThatCausedThem(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		name := uniqueName("trace-transitions")
		release := make(chan struct{})
		var once sync.Once
		cb := mustBreaker(t, CircuitBreakerConfig{Name: name, FailMax: 1, OpenTimeout: time.Second, DisableLogging: true,
			OnStateChange: func(string, State, State) { once.Do(func() { <-release }) }})
		fail := true
		f := Compose(func(context.Context) (int, error) {
			if fail {
				return 0, errFlaky
			}
			return 1, nil
		}, Stack[int]{Name: name, CircuitBreaker: cb})
		rec := tracetest.NewSpanRecorder()
		tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
		defer tp.Shutdown(context.Background())
		ctxA, spanA := tp.Tracer("test").Start(context.Background(), "A")
		ctxB, spanB := tp.Tracer("test").Start(context.Background(), "B")
		done := make(chan struct{})
		go func() {
			f(ctxA) // opens the breaker, and delivers it to the slow callback
			close(done)
		}()
		synctest.Wait()
		time.Sleep(time.Second + time.Millisecond) // past the open period
		fail = false
		f(ctxB) // half-open, the probe succeeds: closed
		close(release)
		<-done
		spanA.End()
		spanB.End()
		got := map[string][]string{}
		for _, s := range rec.Ended() {
			for _, e := range s.Events() {
				got[s.Name()] = append(got[s.Name()], e.Name+" "+attrsString(e.Attributes))
			}
		}
		ev := func(from, to string) string {
			return "resilience.circuit_breaker.state_change resilience.circuit_breaker.from=" + from + ",resilience.circuit_breaker.to=" + to + ",resilience.service=" + name
		}
		wantEvents(t, got["A"], ev("closed", "open"))
		wantEvents(t, got["B"], ev("open", "half-open"), ev("half-open", "closed"))
	})
}
