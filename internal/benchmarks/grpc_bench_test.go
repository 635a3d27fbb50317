package benchmarks

import (
	"context"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/failsafe-go/failsafe-go/bulkhead"
	"github.com/failsafe-go/failsafe-go/circuitbreaker"
	"github.com/failsafe-go/failsafe-go/failsafegrpc"
	"github.com/failsafe-go/failsafe-go/timeout"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/resilience-go/resilience"
	"github.com/resilience-go/resilience/resiliencegrpc"
)

// healthService is the registry service of grpc-go's health Check.
const healthService = "grpc.health.v1.Health"

// A grpcCase builds the unary interceptor of one of the stacks compared,
// nil for none.
type grpcCase struct {
	name  string
	build func(tb testing.TB, c config) grpc.UnaryClientInterceptor
}

// grpcCases are the unary client interceptors compared, in the order they
// are reported: none, a per-call deadline alone, resiliencegrpc's on a
// registry with the policies of BenchmarkTransport (transportConfig), and
// failsafegrpc's with the same policies in the same order.
var grpcCases = []grpcCase{
	{"none", func(testing.TB, config) grpc.UnaryClientInterceptor { return nil }},
	{"deadline", func(testing.TB, config) grpc.UnaryClientInterceptor { return deadlineInterceptor }},
	{"resilience", func(tb testing.TB, c config) grpc.UnaryClientInterceptor {
		return resiliencegrpc.UnaryClientInterceptor(newRegistry(tb, transportConfig(c, healthService)))
	}},
	{"failsafe", failsafeInterceptor},
}

// deadlineInterceptor is the same call under a per-attempt
// context.WithTimeout of attemptTimeout, and nothing else: the floor of any
// stack with a per-attempt timeout.
func deadlineInterceptor(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	ctx, cancel := context.WithTimeout(ctx, attemptTimeout)
	defer cancel()
	return invoker(ctx, method, req, reply, cc, opts...)
}

// failsafeInterceptor is failsafegrpc's interceptor with resiliencegrpc's
// policies, in its order, outermost first: a breaker counting the codes
// resiliencegrpc counts, opening after c.failMax of them for
// c.openTimeout; failsafegrpc's own retry policy (UNAVAILABLE,
// DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) with the same 3 attempts and
// backoff from c.retryDelay up to ten times it, jittered as resilience's
// is; a per-attempt timeout of attemptTimeout; and a bulkhead of slots with
// maxWait.
func failsafeInterceptor(_ testing.TB, c config) grpc.UnaryClientInterceptor {
	return failsafegrpc.NewUnaryClientInterceptor[any](
		circuitbreaker.NewBuilder[any]().
			HandleIf(func(_ any, err error) bool { return countedCode(status.Code(err)) }).
			WithFailureThreshold(uint(c.failMax)).
			WithDelay(c.openTimeout).
			Build(),
		failsafegrpc.NewRetryPolicyBuilder[any]().
			WithMaxAttempts(maxAttempts).
			WithBackoff(c.retryDelay, 10*c.retryDelay).
			WithJitterFactor(0.5).
			ReturnLastFailure().
			Build(),
		timeout.New[any](attemptTimeout),
		bulkhead.NewBuilder[any](slots).WithMaxWaitTime(maxWait).Build(),
	)
}

// countedCode is the codes resiliencegrpc counts against its breaker
// (DEADLINE_EXCEEDED only for its own timeout, which failsafe cannot tell
// apart).
func countedCode(c codes.Code) bool {
	switch c {
	case codes.Unavailable, codes.ResourceExhausted, codes.Aborted, codes.Internal, codes.Unknown, codes.DataLoss, codes.DeadlineExceeded:
		return true
	}
	return false
}

// healthConn serves grpc-go's own health server, or one answering every
// call with code, on a loopback port, and returns a client through icpt.
func healthConn(tb testing.TB, code codes.Code, icpt grpc.UnaryClientInterceptor) (healthpb.HealthClient, *countingHealth) {
	tb.Helper()
	lis := must(net.Listen("tcp", "127.0.0.1:0"))(tb)
	srv := grpc.NewServer()
	h := &countingHealth{HealthServer: health.NewServer(), code: code}
	healthpb.RegisterHealthServer(srv, h)
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(lis)
	}()
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if icpt != nil {
		opts = append(opts, grpc.WithUnaryInterceptor(icpt))
	}
	cc := must(grpc.NewClient(lis.Addr().String(), opts...))(tb)
	tb.Cleanup(func() {
		cc.Close()
		srv.Stop()
		<-done
	})
	return healthpb.NewHealthClient(cc), h
}

// countingHealth is grpc-go's health server, counting the calls it gets and
// failing each with code unless it is OK.
type countingHealth struct {
	healthpb.HealthServer
	code  codes.Code
	calls int64
}

func (h *countingHealth) Check(ctx context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	h.calls++ // the tests call serially
	if h.code != codes.OK {
		return nil, status.Error(h.code, "down")
	}
	return h.HealthServer.Check(ctx, req)
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkGRPCUnary measures resiliencegrpc's unary client interceptor
// where users put it, in a grpc.ClientConn, against none, a per-call
// deadline alone, and failsafegrpc's interceptor with the same policies: a
// health Check over loopback to grpc-go's own health server, on the success
// path, serially and on every core (b.RunParallel). Besides the time per
// call, cpu-ns/op is the CPU time the process spent per call, client and
// server, which other work on the machine does not inflate. Compare with
// benchstat -col /interceptor.
func BenchmarkGRPCUnary(b *testing.B) {
	for _, mode := range []string{"serial", "parallel"} {
		for _, tc := range grpcCases {
			b.Run("mode="+mode+"/interceptor="+tc.name, func(b *testing.B) {
				c, _ := healthConn(b, codes.OK, tc.build(b, closed))
				ctx, req := context.Background(), &healthpb.HealthCheckRequest{}
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

// TestGRPCInterceptorsAgree checks that the interceptors BenchmarkGRPCUnary
// compares do the same work: one call reaches the server on success; against
// a server answering UNAVAILABLE, none and deadline make one attempt, and
// resiliencegrpc and failsafegrpc maxAttempts, both returning UNAVAILABLE.
func TestGRPCInterceptorsAgree(t *testing.T) {
	fast := closed
	fast.retryDelay = 1e6 // 1ms: the UNAVAILABLE case waits for real
	ctx, req := context.Background(), &healthpb.HealthCheckRequest{}
	for _, tc := range grpcCases {
		t.Run(tc.name, func(t *testing.T) {
			c, h := healthConn(t, codes.OK, tc.build(t, fast))
			if resp, err := c.Check(ctx, req); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING || h.calls != 1 {
				t.Errorf("success: %v, %v after %d calls; want SERVING after 1", resp, err, h.calls)
			}
			c, h = healthConn(t, codes.Unavailable, tc.build(t, fast))
			want := int64(maxAttempts)
			if tc.name == "none" || tc.name == "deadline" {
				want = 1
			}
			_, err := c.Check(ctx, req)
			if status.Code(err) != codes.Unavailable || h.calls != want {
				t.Errorf("UNAVAILABLE: %v after %d calls; want UNAVAILABLE after %d", err, h.calls, want)
			}
			if tc.name == "resilience" && !errors.Is(err, resilience.ErrRetryExhausted) {
				t.Errorf("resilience: %v; want it to match ErrRetryExhausted", err)
			}
		})
	}
}
