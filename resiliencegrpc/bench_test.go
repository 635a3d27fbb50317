package resiliencegrpc

import (
	"context"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// benchTimeout is the per-attempt timeout of the benchmarks: long enough
// never to expire.
const benchTimeout = time.Minute

// deadlineInterceptor gives each call a per-call deadline and nothing
// else: what the pipeline's per-attempt timeout costs on its own (a timer,
// and the grpc-timeout header the server then times).
func deadlineInterceptor(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	ctx, cancel := context.WithTimeout(ctx, benchTimeout)
	defer cancel()
	return invoker(ctx, method, req, reply, cc, opts...)
}

// BenchmarkInterceptorOnly measures what the interceptor adds to a call,
// without the call: its function around an invoker that returns at once,
// so that the figure does not drown in a loopback call's noise. none calls
// the invoker; deadline gives it a per-call deadline and nothing else;
// resilience is the interceptor on the default registry. The interceptor
// over a real loopback call, and beside failsafegrpc, is BenchmarkGRPCUnary
// in internal/benchmarks, where what a deadline costs beyond its timer (the
// grpc-timeout header, the server's timer) shows. Compare with benchstat
// -col /interceptor.
func BenchmarkInterceptorOnly(b *testing.B) {
	reg := registry(b, func(c *resilience.Config) {
		c.Timeouts[healthKey] = benchTimeout
		c.Bulkheads[healthKey] = resilience.BulkheadConfig{Limit: 1024}
	})
	invoker := func(context.Context, string, any, any, *grpc.ClientConn, ...grpc.CallOption) error { return nil }
	none := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	for _, tc := range []struct {
		name string
		icpt grpc.UnaryClientInterceptor
	}{{"none", none}, {"deadline", deadlineInterceptor}, {"resilience", UnaryClientInterceptor(reg)}} {
		b.Run("interceptor="+tc.name, func(b *testing.B) {
			ctx, req, reply := context.Background(), &healthpb.HealthCheckRequest{}, &healthpb.HealthCheckResponse{}
			b.ReportAllocs()
			for b.Loop() {
				if err := tc.icpt(ctx, checkM, req, reply, nil, invoker); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
