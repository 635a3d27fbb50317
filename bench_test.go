package resilience

import (
	"context"
	"testing"
	"time"

	metricnoop "go.opentelemetry.io/otel/metric/noop"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
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
