package resilience

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	metricnoop "go.opentelemetry.io/otel/metric/noop"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"golang.org/x/time/rate"
)

// checksCtx looks at its context once, as net/http and database/sql do
// first thing, so that no stack wins by never materialising its timeout's
// Done channel.
func checksCtx(ctx context.Context) (int, error) {
	select {
	case <-ctx.Done():
		return 0, ctx.Err()
	default:
		return 1, nil
	}
}

func benchStack(b *testing.B, cb *CircuitBreaker) Func[int] {
	b.Helper()
	return Compose(checksCtx, Stack[int]{
		CircuitBreaker: cb,
		Retry:          mustRetry(b, RetryConfig{MaxAttempts: 3}),
		Timeout:        time.Minute,
		Bulkhead:       mustBulkhead(b, BulkheadConfig{Limit: 1024, MaxWait: 100 * time.Millisecond}),
		Fallback:       FallbackValue(0),
	})
}

func meterProviders(b *testing.B) map[string]func() {
	return map[string]func(){
		"noop": func() { SetMeterProvider(metricnoop.NewMeterProvider()) },
		"sdk": func() {
			mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
			SetMeterProvider(mp)
			b.Cleanup(func() { mp.Shutdown(context.Background()) })
		},
	}
}

func BenchmarkBare(b *testing.B) {
	var fn Func[int] = checksCtx
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		fn(ctx)
	}
}

func BenchmarkCompose(b *testing.B) {
	for _, meter := range []string{"noop", "sdk"} {
		b.Run(meter+"/success", func(b *testing.B) {
			meterProviders(b)[meter]()
			defer SetMeterProvider(nil)
			fn := benchStack(b, mustBreaker(b, CircuitBreakerConfig{}))
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				fn(ctx)
			}
		})
		b.Run(meter+"/success-parallel", func(b *testing.B) {
			meterProviders(b)[meter]()
			defer SetMeterProvider(nil)
			fn := benchStack(b, mustBreaker(b, CircuitBreakerConfig{}))
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				ctx := context.Background()
				for pb.Next() {
					fn(ctx)
				}
			})
		})
		b.Run(meter+"/breaker-open", func(b *testing.B) {
			meterProviders(b)[meter]()
			defer SetMeterProvider(nil)
			cb := mustBreaker(b, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Hour})
			WithCircuitBreaker(failFunc, cb)(context.Background())
			fn := benchStack(b, cb)
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				fn(ctx)
			}
		})
	}
}

func BenchmarkCircuitBreaker(b *testing.B) {
	ctx := context.Background()
	b.Run("success", func(b *testing.B) {
		fn := WithCircuitBreaker(checksCtx, mustBreaker(b, CircuitBreakerConfig{}))
		b.ReportAllocs()
		for b.Loop() {
			fn(ctx)
		}
	})
	b.Run("success-parallel", func(b *testing.B) {
		fn := WithCircuitBreaker(checksCtx, mustBreaker(b, CircuitBreakerConfig{}))
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				fn(ctx)
			}
		})
	})
	b.Run("failure", func(b *testing.B) {
		fn := WithCircuitBreaker(failFunc, mustBreaker(b, CircuitBreakerConfig{FailMax: 1 << 30}))
		b.ReportAllocs()
		for b.Loop() {
			fn(ctx)
		}
	})
	b.Run("open", func(b *testing.B) {
		cb := mustBreaker(b, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Hour})
		fn := WithCircuitBreaker(failFunc, cb)
		fn(ctx)
		b.ReportAllocs()
		for b.Loop() {
			fn(ctx)
		}
	})
}

func BenchmarkRetry(b *testing.B) {
	ctx := context.Background()
	b.Run("success", func(b *testing.B) {
		fn := WithRetry(checksCtx, mustRetry(b, RetryConfig{}))
		b.ReportAllocs()
		for b.Loop() {
			fn(ctx)
		}
	})
	b.Run("retry-once", func(b *testing.B) {
		// Zero delays: this measures the retry machinery, not the sleep.
		r := mustRetry(b, RetryConfig{MaxAttempts: 2, Strategy: RetryRandom, InitialDelay: 1, MaxDelay: 1})
		n := 0
		fn := WithRetry(func(context.Context) (int, error) {
			n++
			if n%2 == 1 {
				return 0, errBoom
			}
			return 1, nil
		}, r)
		b.ReportAllocs()
		for b.Loop() {
			fn(ctx)
		}
	})
}

func BenchmarkTimeout(b *testing.B) {
	ctx := context.Background()
	b.Run("cooperative", func(b *testing.B) {
		fn := WithTimeout(checksCtx, time.Minute)
		b.ReportAllocs()
		for b.Loop() {
			fn(ctx)
		}
	})
	b.Run("context.WithTimeout-alone", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			tctx, cancel := context.WithTimeout(ctx, time.Minute)
			checksCtx(tctx)
			cancel()
		}
	})
	b.Run("enforced", func(b *testing.B) {
		fn := WithEnforcedTimeout(checksCtx, time.Minute)
		b.ReportAllocs()
		for b.Loop() {
			fn(ctx)
		}
	})
}

// benchRegistry has the policies of benchStack for every service: the same
// timeout, and a bulkhead as large.
func benchRegistry(b *testing.B) *Registry {
	b.Helper()
	cfg := DefaultConfig()
	cfg.DefaultTimeout = time.Minute
	cfg.Timeouts = nil
	cfg.DefaultBulkhead = BulkheadConfig{Limit: 1024, MaxWait: 100 * time.Millisecond}
	cfg.Bulkheads = nil
	reg, err := NewRegistry(cfg)
	if err != nil {
		b.Fatal(err)
	}
	return reg
}

// BenchmarkEntryPoints runs the success path of Compose and ForService over
// the same policies, side by side.
func BenchmarkEntryPoints(b *testing.B) {
	ctx := context.Background()
	b.Run("Compose", func(b *testing.B) {
		reg := benchRegistry(b)
		fn := Compose(checksCtx, Stack[int]{
			CircuitBreaker: reg.CircuitBreaker("bench"), Retry: reg.Retry(), Timeout: time.Minute, Bulkhead: reg.Bulkhead("bench"),
		})
		b.ReportAllocs()
		for b.Loop() {
			if v, _ := fn(ctx); v != 1 {
				b.Fatal("failed call")
			}
		}
	})
	b.Run("ForService", func(b *testing.B) {
		fn := ForService(benchRegistry(b), "bench", checksCtx)
		b.ReportAllocs()
		for b.Loop() {
			if v, _ := fn(ctx); v != 1 {
				b.Fatal("failed call")
			}
		}
	})
	b.Run("ForService-per-call", func(b *testing.B) {
		// Wrapping in the handler, per request: the pipeline is cached.
		reg := benchRegistry(b)
		b.ReportAllocs()
		for b.Loop() {
			if v, _ := ForService(reg, "bench", checksCtx)(ctx); v != 1 {
				b.Fatal("failed call")
			}
		}
	})
}

// deadlineTransport gives each request the per-attempt deadline Transport
// gives it, and nothing else: the reference for Transport's own cost.
type deadlineTransport struct{ base http.RoundTripper }

func (d deadlineTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
	resp, err := d.base.RoundTrip(r.WithContext(ctx))
	if err != nil {
		cancel()
		return nil, err
	}
	resp.Body = cancelBody{resp.Body, cancel}
	return resp, nil
}

type cancelBody struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (c cancelBody) Close() error { err := c.ReadCloser.Close(); c.cancel(); return err }

// BenchmarkTransport is a GET on a loopback server: bare, with the same
// per-attempt deadline, and through Transport.
func BenchmarkTransport(b *testing.B) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	defer srv.Close()
	newBase := func() *http.Transport {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.MaxIdleConnsPerHost = 64
		return t
	}
	for _, c := range []struct {
		name string
		rt   func(b *testing.B, base http.RoundTripper) http.RoundTripper
	}{
		{"bare", func(_ *testing.B, base http.RoundTripper) http.RoundTripper { return base }},
		{"deadline", func(_ *testing.B, base http.RoundTripper) http.RoundTripper { return deadlineTransport{base} }},
		{"Transport", func(b *testing.B, base http.RoundTripper) http.RoundTripper {
			return &Transport{Base: base, Registry: benchRegistry(b)}
		}},
	} {
		b.Run(c.name, func(b *testing.B) {
			base := newBase()
			defer base.CloseIdleConnections()
			client := &http.Client{Transport: c.rt(b, base)}
			b.ReportAllocs()
			for b.Loop() {
				resp, err := client.Get(srv.URL)
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					b.Fatalf("status %d", resp.StatusCode)
				}
			}
		})
	}
}

// BenchmarkCircuitBreakerTriggers compares the closed breaker's success
// path with each kind of trigger, side by side: consecutive failures only
// (the zero config), a failure ratio (gobreaker's rolling window), and a
// failure ratio with a slow-call trigger (which times every call). Each is
// run through WithCircuitBreaker alone and through the whole Compose stack,
// with the no-op and the SDK meter, serial and in parallel. The trigger is
// the last element of the name, trigger=..., so that
//
//	benchstat -col /trigger
//
// puts the three side by side with consecutive as the base.
func BenchmarkCircuitBreakerTriggers(b *testing.B) {
	triggers := []struct {
		name string
		cfg  CircuitBreakerConfig
	}{
		{"consecutive", CircuitBreakerConfig{}},
		{"ratio", CircuitBreakerConfig{FailureRatio: 0.5}},
		{"ratio+slow", CircuitBreakerConfig{FailureRatio: 0.5, SlowCallDuration: time.Second}},
	}
	paths := []struct {
		name string
		wrap func(b *testing.B, cb *CircuitBreaker) Func[int]
	}{
		{"breaker", func(_ *testing.B, cb *CircuitBreaker) Func[int] { return WithCircuitBreaker(checksCtx, cb) }},
		{"compose", benchStack},
	}
	for _, path := range paths {
		for _, meter := range []string{"noop", "sdk"} {
			for _, parallel := range []bool{false, true} {
				mode := meter
				if parallel {
					mode += "-parallel"
				}
				for _, tr := range triggers {
					b.Run(path.name+"/"+mode+"/trigger="+tr.name, func(b *testing.B) {
						meterProviders(b)[meter]()
						defer SetMeterProvider(nil)
						cb := mustBreaker(b, tr.cfg)
						fn := path.wrap(b, cb)
						b.ReportAllocs()
						if parallel {
							b.RunParallel(func(pb *testing.PB) {
								ctx := context.Background()
								for pb.Next() {
									fn(ctx)
								}
							})
						} else {
							ctx := context.Background()
							for b.Loop() {
								fn(ctx)
							}
						}
						// Every call was a fast success: the breaker stayed
						// closed and counted no slow call.
						if s, c := cb.State(), cb.Counts(); s != StateClosed || c.TotalFailures != 0 || c.WindowSlowCalls != 0 {
							b.Fatalf("after the run: state %v, counts %+v", s, c)
						}
					})
				}
			}
		}
	}
}

// grantingLimiter returns a rate limiter that always grants: 1e9 permits a
// second in bursts of 1e9, far beyond what one process can take.
func grantingLimiter(b *testing.B) *RateLimiter {
	b.Helper()
	return mustRateLimiter(b, RateLimiterConfig{Name: "bench", Limit: 1e9, Burst: 1e9})
}

// BenchmarkRateLimiter measures a granted permit. Compose runs the stack of
// benchStack (breaker, retry of 3, timeout of 1 minute, bulkhead of 1024,
// fallback) without and with a RateLimiter that always grants, the same
// stack otherwise, with the no-op and the SDK meter, serial and in
// parallel; Wait is (*RateLimiter).Wait(ctx, 1) alone, and x/time/rate's own
// (*rate.Limiter).Wait at the same rate and burst for reference. The last
// element of each name is limiter=..., so that
//
//	benchstat -col /limiter
//
// puts the stack without a limiter (none) beside the one with (granted).
// After each run the benchmark checks that the limiter granted exactly one
// permit a call and refused none.
func BenchmarkRateLimiter(b *testing.B) {
	for _, meter := range []string{"noop", "sdk"} {
		for _, parallel := range []bool{false, true} {
			mode := meter
			if parallel {
				mode += "-parallel"
			}
			for _, withLimiter := range []bool{false, true} {
				name := "limiter=none"
				if withLimiter {
					name = "limiter=granted"
				}
				b.Run("Compose/"+mode+"/"+name, func(b *testing.B) {
					meterProviders(b)[meter]()
					defer SetMeterProvider(nil)
					var rl *RateLimiter
					if withLimiter {
						rl = grantingLimiter(b)
					}
					fn := Compose(checksCtx, Stack[int]{
						CircuitBreaker: mustBreaker(b, CircuitBreakerConfig{}),
						Retry:          mustRetry(b, RetryConfig{MaxAttempts: 3}),
						RateLimiter:    rl,
						Timeout:        time.Minute,
						Bulkhead:       mustBulkhead(b, BulkheadConfig{Limit: 1024, MaxWait: 100 * time.Millisecond}),
						Fallback:       FallbackValue(0),
					})
					b.ReportAllocs()
					if parallel {
						b.RunParallel(func(pb *testing.PB) {
							ctx := context.Background()
							for pb.Next() {
								if v, _ := fn(ctx); v != 1 {
									b.Error("failed call")
									return
								}
							}
						})
					} else {
						ctx := context.Background()
						for b.Loop() {
							if v, _ := fn(ctx); v != 1 {
								b.Fatal("failed call")
							}
						}
					}
					if rl != nil {
						checkAllGranted(b, rl)
					}
				})
			}
		}
	}
	for _, parallel := range []bool{false, true} {
		mode := "serial"
		if parallel {
			mode = "parallel"
		}
		b.Run("Wait/"+mode+"/limiter=granted", func(b *testing.B) {
			rl := grantingLimiter(b)
			b.ReportAllocs()
			if parallel {
				b.RunParallel(func(pb *testing.PB) {
					ctx := context.Background()
					for pb.Next() {
						if err := rl.Wait(ctx, 1); err != nil {
							b.Error(err)
							return
						}
					}
				})
			} else {
				ctx := context.Background()
				for b.Loop() {
					if err := rl.Wait(ctx, 1); err != nil {
						b.Fatal(err)
					}
				}
			}
			checkAllGranted(b, rl)
		})
		b.Run("Wait/"+mode+"/limiter=x-time-rate", func(b *testing.B) {
			rl := rate.NewLimiter(1e9, 1e9)
			b.ReportAllocs()
			if parallel {
				b.RunParallel(func(pb *testing.PB) {
					ctx := context.Background()
					for pb.Next() {
						if err := rl.Wait(ctx); err != nil {
							b.Error(err)
							return
						}
					}
				})
			} else {
				ctx := context.Background()
				for b.Loop() {
					if err := rl.Wait(ctx); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}

// checkAllGranted fails b unless rl granted one permit a call, refused
// nothing and has nobody waiting.
func checkAllGranted(b *testing.B, rl *RateLimiter) {
	b.Helper()
	if s := rl.Stats(); s.Rejected != 0 || s.Waiting != 0 || s.Granted != uint64(b.N) {
		b.Fatalf("after %d calls: %+v", b.N, s)
	}
}
