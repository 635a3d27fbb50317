package resiliencegrpc

import (
	"context"
	"testing"

	"github.com/resilience-go/resilience"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// panicking is an interceptor further down the chain that panics.
func panickingUnary(context.Context, string, any, any, *grpc.ClientConn, grpc.UnaryInvoker, ...grpc.CallOption) error {
	panic("unary boom")
}

func panickingStream(context.Context, *grpc.StreamDesc, *grpc.ClientConn, string, grpc.Streamer, ...grpc.CallOption) (grpc.ClientStream, error) {
	panic("stream boom")
}

// recovered runs f and returns what it panicked with.
func recovered(f func()) (p any) {
	defer func() { p = recover() }()
	f()
	return nil
}

// A panic below the interceptors reaches the caller's goroutine, unary or
// stream, and the slot and the stream's goroutine are given back (goleak
// checks the goroutine when the tests end).
func TestPanicsGiveEverythingBack(t *testing.T) {
	reg := registry(t, func(c *resilience.Config) {
		c.Bulkheads[healthKey] = resilience.BulkheadConfig{Limit: 1, FailFast: true}
	})
	b := reg.Bulkhead(healthSvc)
	cc := serve(t, bufnet, func(s *grpc.Server) { healthpb.RegisterHealthServer(s, newHealth()) }, nil,
		grpc.WithChainUnaryInterceptor(UnaryClientInterceptor(reg), panickingUnary),
		grpc.WithChainStreamInterceptor(StreamClientInterceptor(reg), panickingStream))
	c := healthpb.NewHealthClient(cc)
	for i := range 2 { // a slot kept by the first would fail the second fast
		if p := recovered(func() { c.Check(context.Background(), &healthpb.HealthCheckRequest{}) }); p != "unary boom" {
			t.Fatalf("unary call %d: recovered %v; want the panic", i, p)
		}
		if p := recovered(func() { c.Watch(context.Background(), &healthpb.HealthCheckRequest{}) }); p != "stream boom" {
			t.Fatalf("stream %d: recovered %v; want the panic", i, p)
		}
	}
	if got := b.Stats().Active; got != 0 {
		t.Fatalf("Active = %d; want 0", got)
	}
}
