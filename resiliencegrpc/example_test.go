package resiliencegrpc_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/resilience-go/resilience"
	"github.com/resilience-go/resilience/resiliencegrpc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
)

// down is a health server that is always UNAVAILABLE, and counts calls.
type down struct {
	healthpb.UnimplementedHealthServer
	calls int
}

func (d *down) Check(context.Context, *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	d.calls++
	return nil, status.Error(codes.Unavailable, "down for maintenance")
}

// dial serves register's services over an in-memory listener and returns
// a connection with opts, and a func that stops both.
func dial(register func(*grpc.Server), sopts []grpc.ServerOption, opts ...grpc.DialOption) (*grpc.ClientConn, func()) {
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(sopts...)
	register(srv)
	go srv.Serve(lis)
	opts = append(opts,
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	conn, err := grpc.NewClient("passthrough:///bufnet", opts...)
	if err != nil {
		panic(err)
	}
	return conn, func() { conn.Close(); srv.Stop() }
}

// A client whose calls run through a registry's policies: the breaker of
// the gRPC service opens after FAIL_MAX calls that failed with UNAVAILABLE
// (each retried, three attempts), and the next call is rejected without
// reaching the server.
func ExampleUnaryClientInterceptor() {
	cfg := resilience.DefaultConfig()
	cfg.Retry.InitialDelay = time.Millisecond
	cfg.CircuitBreakers["GRPC_HEALTH_V1_HEALTH"] = resilience.CircuitBreakerConfig{FailMax: 2, OpenTimeout: time.Minute}
	reg, err := resilience.NewRegistry(cfg)
	if err != nil {
		panic(err)
	}
	srv := &down{}
	conn, stop := dial(func(s *grpc.Server) { healthpb.RegisterHealthServer(s, srv) }, nil,
		grpc.WithChainUnaryInterceptor(resiliencegrpc.UnaryClientInterceptor(reg)))
	defer stop()
	client := healthpb.NewHealthClient(conn)

	for range 3 {
		_, err := client.Check(context.Background(), &healthpb.HealthCheckRequest{})
		fmt.Printf("%s; retries exhausted: %v; breaker open: %v; server calls: %d\n",
			status.Code(err), errors.Is(err, resilience.ErrRetryExhausted), errors.Is(err, resilience.ErrCircuitOpen), srv.calls)
	}
	// Output:
	// Unavailable; retries exhausted: true; breaker open: false; server calls: 3
	// Unavailable; retries exhausted: true; breaker open: false; server calls: 6
	// Unavailable; retries exhausted: false; breaker open: true; server calls: 6
}

// busy holds its caller until released.
type busy struct {
	testpb.UnimplementedTestServiceServer
	in, out chan struct{}
}

func (b *busy) EmptyCall(context.Context, *testpb.Empty) (*testpb.Empty, error) {
	b.in <- struct{}{}
	<-b.out
	return &testpb.Empty{}, nil
}

// A server that sheds what it cannot serve at once: with its one slot
// taken, a call of priority 0 is shed with RESOURCE_EXHAUSTED and a
// pushback. (The health service is never shed.)
func ExampleUnaryServerInterceptor() {
	b, err := resilience.NewBulkhead(resilience.BulkheadConfig{Name: "server", Limit: 1})
	if err != nil {
		panic(err)
	}
	h := &busy{in: make(chan struct{}), out: make(chan struct{})}
	everyone := func(context.Context, string) int { return 0 }
	conn, stop := dial(func(s *grpc.Server) { testpb.RegisterTestServiceServer(s, h) },
		[]grpc.ServerOption{grpc.ChainUnaryInterceptor(resiliencegrpc.UnaryServerInterceptor(b, resiliencegrpc.WithPriority(everyone)))})
	defer stop()
	client := testpb.NewTestServiceClient(conn)

	done := make(chan error)
	go func() {
		_, err := client.EmptyCall(context.Background(), &testpb.Empty{})
		done <- err
	}()
	<-h.in // the slot is taken
	var trailer metadata.MD
	_, err = client.EmptyCall(context.Background(), &testpb.Empty{}, grpc.Trailer(&trailer))
	fmt.Println(status.Code(err), trailer.Get(resiliencegrpc.PushbackKey))
	close(h.out)
	fmt.Println(<-done)
	// Output:
	// ResourceExhausted [1000]
	// <nil>
}
