package resiliencegrpc

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
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

// benchConn serves grpc-go's own health server on a loopback port and
// returns a client of it with the dial options.
func benchConn(b *testing.B, dopts ...grpc.DialOption) healthpb.HealthClient {
	cc := serve(b, tcp, func(s *grpc.Server) { healthpb.RegisterHealthServer(s, health.NewServer()) }, nil, dopts...)
	return healthpb.NewHealthClient(cc)
}

// cpuTime is the process's user and system CPU time so far: the cost of a
// call, client and server together, whatever else the machine runs, which
// moves the wall-clock time per call but not this.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkUnaryInterceptor measures the unary client interceptor over a
// bare loopback call of grpc-go's health Check: none is the call alone;
// deadline the call under a per-call context.WithTimeout, the floor of any
// interceptor with a per-attempt timeout; resilience the interceptor on the
// default registry (breaker, retry, bulkhead, the timeout of a minute),
// on the success path. Besides the time per call, cpu-ns/op is the CPU time
// the process spent per call, client and server, which other work on the
// machine does not inflate. Compare with benchstat -col /interceptor.
func BenchmarkUnaryInterceptor(b *testing.B) {
	cases := []struct {
		name string
		opts func(b *testing.B) []grpc.DialOption
	}{
		{"none", func(*testing.B) []grpc.DialOption { return nil }},
		{"deadline", func(*testing.B) []grpc.DialOption {
			return []grpc.DialOption{grpc.WithUnaryInterceptor(deadlineInterceptor)}
		}},
		{"resilience", func(b *testing.B) []grpc.DialOption {
			reg := registry(b, func(c *resilience.Config) {
				c.Timeouts[healthKey] = benchTimeout
				c.Bulkheads[healthKey] = resilience.BulkheadConfig{Limit: 1024}
			})
			return []grpc.DialOption{grpc.WithUnaryInterceptor(UnaryClientInterceptor(reg))}
		}},
	}
	for _, mode := range []string{"serial", "parallel"} {
		for _, tc := range cases {
			b.Run("mode="+mode+"/interceptor="+tc.name, func(b *testing.B) {
				c := benchConn(b, tc.opts(b)...)
				req := &healthpb.HealthCheckRequest{}
				ctx := context.Background()
				if _, err := c.Check(ctx, req); err != nil { // the connection is up
					b.Fatal(err)
				}
				b.ReportAllocs()
				start := cpuTime()
				defer func() { b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op") }()
				if mode == "serial" {
					for b.Loop() {
						if _, err := c.Check(ctx, req); err != nil {
							b.Fatal(err)
						}
					}
					return
				}
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						if _, err := c.Check(ctx, req); err != nil {
							b.Error(err)
							return
						}
					}
				})
			})
		}
	}
}

// BenchmarkInterceptorOnly measures what the interceptors add to a call,
// without the call: their function around an invoker that returns at once,
// so that the figure does not drown in a loopback call's noise. none calls
// the invoker; deadline and resilience are BenchmarkUnaryInterceptor's.
// What a per-call deadline costs beyond its timer (the grpc-timeout header,
// the server's timer) shows only in BenchmarkUnaryInterceptor. Compare with
// benchstat -col /interceptor.
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
