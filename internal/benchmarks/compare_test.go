package benchmarks

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/failsafe-go/failsafe-go"
	"github.com/failsafe-go/failsafe-go/bulkhead"
	"github.com/failsafe-go/failsafe-go/fallback"
	"github.com/failsafe-go/failsafe-go/retrypolicy"
	"github.com/failsafe-go/failsafe-go/timeout"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/resilience-go/resilience"
)

// protected is checksCtx behind a variable, so that no benchmark gets to
// inline the protected function where the others call it through a func
// value.
var protected fn = checksCtx

// run calls f in a loop and checks every result, so that a benchmark never
// quietly measures a failure path it was not meant to.
func run(b *testing.B, f fn, want int, wantErr bool) {
	b.Helper()
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if v, err := f(ctx); v != want || (err != nil) != wantErr {
			b.Fatalf("got (%d, %v); want %d and an error: %v", v, err, want, wantErr)
		}
	}
}

// runParallel is run on every core at once (b.RunParallel). Its ns/op is
// wall time divided by all the calls made, so a stack that scales perfectly
// reports its serial time divided by GOMAXPROCS.
func runParallel(b *testing.B, f fn, want int) {
	b.Helper()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		ctx := context.Background()
		for pb.Next() {
			if v, err := f(ctx); v != want || err != nil {
				b.Errorf("got (%d, %v); want (%d, nil)", v, err, want)
				return
			}
		}
	})
}

// BenchmarkStack measures the five policies together,
// fallback(breaker(retry(timeout(bulkhead(fn))))), as resilience's Compose,
// as written by hand on gobreaker and a channel, and as failsafe-go, around
// the same fn; bare is fn called through a func value, the floor. success is
// a closed breaker and a first attempt that succeeds; breaker-open is a
// breaker tripped open, answered by the fallback without calling fn, next to
// gobreaker's own Execute on an open breaker; success-parallel is success on
// every core. resilience records into the default meter provider (the global
// OpenTelemetry one, with no SDK installed), as it does for a user who sets
// none.
func BenchmarkStack(b *testing.B) {
	b.Run("bare/success", func(b *testing.B) { run(b, protected, 1, false) })
	b.Run("bare/success-parallel", func(b *testing.B) { runParallel(b, protected, 1) })
	for _, s := range stacks {
		b.Run(s.name+"/success", func(b *testing.B) {
			run(b, s.build(b, closed, protected, false), 1, false)
		})
		b.Run(s.name+"/breaker-open", func(b *testing.B) {
			run(b, s.build(b, open, protected, true), 0, false)
		})
		b.Run(s.name+"/success-parallel", func(b *testing.B) {
			runParallel(b, s.build(b, closed, protected, false), 1)
		})
	}
	b.Run("gobreaker/breaker-open", func(b *testing.B) {
		run(b, gobreakerOpen(b, protected), 0, false)
	})
}

// BenchmarkMeter measures what recording metrics costs resilience's Compose
// stack: noop is OpenTelemetry's no-op provider, sdk the real SDK with a
// manual reader (aggregation on every call, export never). The difference
// between the two is the price of the metrics a user actually collects.
func BenchmarkMeter(b *testing.B) {
	providers := []struct {
		name string
		set  func(b *testing.B)
	}{
		{"noop", func(b *testing.B) {
			resilience.SetMeterProvider(metricnoop.NewMeterProvider())
			b.Cleanup(func() { resilience.SetMeterProvider(nil) })
		}},
		{"sdk", func(b *testing.B) {
			mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
			resilience.SetMeterProvider(mp)
			b.Cleanup(func() {
				resilience.SetMeterProvider(nil)
				if err := mp.Shutdown(context.Background()); err != nil {
					b.Error(err)
				}
			})
		}},
	}
	for _, p := range providers {
		b.Run(p.name+"/success", func(b *testing.B) {
			p.set(b)
			run(b, resilienceStack(b, closed, protected, false), 1, false)
		})
		b.Run(p.name+"/breaker-open", func(b *testing.B) {
			p.set(b)
			run(b, resilienceStack(b, open, protected, true), 0, false)
		})
	}
}

// BenchmarkBreaker measures a circuit breaker alone: resilience's
// WithCircuitBreaker, gobreaker's Execute, and failsafe-go's CircuitBreaker,
// configured alike. success is a closed breaker and a call that succeeds;
// open is a breaker tripped open, which rejects the call with its error.
func BenchmarkBreaker(b *testing.B) {
	breakers := []struct {
		name  string
		build func(b *testing.B, c config, trip bool) fn
	}{
		{"resilience", func(b *testing.B, c config, trip bool) fn {
			return resilience.WithCircuitBreaker(protected, resilienceBreaker(b, c, trip))
		}},
		{"gobreaker", func(b *testing.B, c config, trip bool) fn {
			cb := newGobreaker(b, c, trip)
			return func(ctx context.Context) (int, error) {
				return cb.Execute(func() (int, error) { return protected(ctx) })
			}
		}},
		{"failsafe", func(b *testing.B, c config, trip bool) fn {
			return failsafeFn(failsafe.With[int](failsafeBreaker(b, c, trip)), protected)
		}},
	}
	for _, br := range breakers {
		b.Run(br.name+"/success", func(b *testing.B) { run(b, br.build(b, closed, false), 1, false) })
		b.Run(br.name+"/open", func(b *testing.B) { run(b, br.build(b, open, true), 0, true) })
	}
}

// failsafeFn calls f through exec with the caller's context, the way
// failsafe-go passes a context through: WithContext per call, and the
// execution's Context inside.
func failsafeFn(exec failsafe.Executor[int], f fn) fn {
	call := func(e failsafe.Execution[int]) (int, error) { return f(e.Context()) }
	return func(ctx context.Context) (int, error) {
		return exec.WithContext(ctx).GetWithExecution(call)
	}
}

// flaky fails every other call, starting with the first: under a retry,
// each call fails once and succeeds on its second attempt.
func flaky() fn {
	n := 0
	return func(ctx context.Context) (int, error) {
		n++
		if n%2 == 1 {
			return 0, errBoom
		}
		return protected(ctx)
	}
}

// retryDelay is the wait between attempts in BenchmarkRetry: 1ns, so that
// retry-once measures the retry machinery, a timer included, not a sleep.
const retryDelay = time.Nanosecond

// BenchmarkRetry measures a retry policy alone, 3 attempts with a fixed 1ns
// wait: resilience's WithRetry, cenkalti/backoff v4's RetryWithData with the
// per-call BackOff state it needs (its BackOffs are not safe to share), and
// failsafe-go's RetryPolicy. success is a first attempt that succeeds;
// retry-once a first attempt that fails and a second that succeeds.
func BenchmarkRetry(b *testing.B) {
	retries := []struct {
		name string
		wrap func(b *testing.B, f fn) fn
	}{
		{"resilience", func(b *testing.B, f fn) fn {
			return resilience.WithRetry(f, must(resilience.NewRetry(resilience.RetryConfig{
				MaxAttempts: maxAttempts, Strategy: resilience.RetryFixed,
				InitialDelay: retryDelay, MaxDelay: retryDelay, DisableJitter: true,
			}))(b))
		}},
		{"backoff", func(b *testing.B, f fn) fn {
			return func(ctx context.Context) (int, error) {
				bo := backoff.WithContext(backoff.WithMaxRetries(backoff.NewConstantBackOff(retryDelay), maxAttempts-1), ctx)
				return backoff.RetryWithData(func() (int, error) { return f(ctx) }, bo)
			}
		}},
		{"failsafe", func(b *testing.B, f fn) fn {
			return failsafeFn(failsafe.With[int](retrypolicy.NewBuilder[int]().
				WithMaxAttempts(maxAttempts).
				WithDelay(retryDelay).
				Build()), f)
		}},
	}
	for _, r := range retries {
		b.Run(r.name+"/success", func(b *testing.B) { run(b, r.wrap(b, protected), 1, false) })
		b.Run(r.name+"/retry-once", func(b *testing.B) { run(b, r.wrap(b, flaky()), 1, false) })
	}
}

// BenchmarkTimeout measures a one-minute timeout alone around a function that
// succeeds: resilience's WithTimeout, context.WithTimeout and cancel written
// out, and failsafe-go's Timeout.
func BenchmarkTimeout(b *testing.B) {
	b.Run("resilience", func(b *testing.B) {
		run(b, resilience.WithTimeout(protected, attemptTimeout), 1, false)
	})
	b.Run("context", func(b *testing.B) {
		run(b, func(ctx context.Context) (int, error) {
			tctx, cancel := context.WithTimeout(ctx, attemptTimeout)
			defer cancel()
			return protected(tctx)
		}, 1, false)
	})
	b.Run("failsafe", func(b *testing.B) {
		run(b, failsafeFn(failsafe.With[int](timeout.New[int](attemptTimeout)), protected), 1, false)
	})
}

// BenchmarkBulkhead measures a 1024-slot bulkhead with a 100ms maximum wait
// alone, with slots free: resilience's WithBulkhead, a buffered channel used
// as a semaphore (a timer only when it is full), and failsafe-go's Bulkhead.
func BenchmarkBulkhead(b *testing.B) {
	b.Run("resilience", func(b *testing.B) {
		bh := must(resilience.NewBulkhead(resilience.BulkheadConfig{Name: "bench", Limit: slots, MaxWait: maxWait}))(b)
		run(b, resilience.WithBulkhead(protected, bh), 1, false)
	})
	b.Run("channel", func(b *testing.B) {
		sem := make(chan struct{}, slots)
		run(b, func(ctx context.Context) (int, error) {
			select {
			case sem <- struct{}{}:
			default:
				t := time.NewTimer(maxWait)
				select {
				case sem <- struct{}{}:
					t.Stop()
				case <-t.C:
					return 0, errFull
				case <-ctx.Done():
					t.Stop()
					return 0, ctx.Err()
				}
			}
			defer func() { <-sem }()
			return protected(ctx)
		}, 1, false)
	})
	b.Run("failsafe", func(b *testing.B) {
		bh := bulkhead.NewBuilder[int](slots).WithMaxWaitTime(maxWait).Build()
		run(b, failsafeFn(failsafe.With[int](bh), protected), 1, false)
	})
}

// BenchmarkFallback measures a fallback value alone: resilience's
// WithFallback and failsafe-go's Fallback. success is a call that succeeds
// and passes through; failure one that fails and is answered with 0.
func BenchmarkFallback(b *testing.B) {
	fallbacks := []struct {
		name string
		wrap func(f fn) fn
	}{
		{"resilience", func(f fn) fn { return resilience.WithFallback(f, resilience.FallbackValue(0)) }},
		{"failsafe", func(f fn) fn { return failsafeFn(failsafe.With[int](fallback.NewWithResult(0)), f) }},
	}
	for _, fb := range fallbacks {
		b.Run(fb.name+"/success", func(b *testing.B) { run(b, fb.wrap(protected), 1, false) })
		b.Run(fb.name+"/failure", func(b *testing.B) { run(b, fb.wrap(failing), 0, false) })
	}
}

// BenchmarkHTTP measures what resilience's Compose stack adds to a real
// request: a GET over loopback to an httptest server that writes a 2-byte
// body, through one shared keep-alive client, reading and closing the body
// inside the protected function. bare is the request alone; resilience the
// same function under the same five policies as BenchmarkStack.
func BenchmarkHTTP(b *testing.B) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "ok")
	}))
	defer srv.Close()
	client := srv.Client()
	get := func(ctx context.Context) (int, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL, nil)
		if err != nil {
			return 0, err
		}
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		n, err := io.Copy(io.Discard, resp.Body)
		return int(n), err
	}
	// The same request under a per-attempt context.WithTimeout and nothing
	// else: what net/http itself does with a cancellable context (it
	// watches it for the whole exchange) is a floor every stack with a
	// timeout pays, hand-written or not.
	withTimeout := func(ctx context.Context) (int, error) {
		tctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		return get(tctx)
	}
	b.Run("bare", func(b *testing.B) { run(b, get, 2, false) })
	b.Run("timeout-only", func(b *testing.B) { run(b, withTimeout, 2, false) })
	b.Run("resilience", func(b *testing.B) { run(b, resilienceStack(b, closed, get, false), 2, false) })
}
