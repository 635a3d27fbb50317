package resiliencegrpc

import (
	"context"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
)

func TestMain(m *testing.M) {
	// Breakers log their transitions; tests that look at them install
	// their own logger.
	slog.SetDefault(slog.New(slog.DiscardHandler))
	goleak.VerifyTestMain(m)
}

// The services the tests call, by resilience.EnvKey.
const (
	healthSvc = "grpc.health.v1.Health"
	healthKey = "GRPC_HEALTH_V1_HEALTH"
	checkM    = "/grpc.health.v1.Health/Check"
)

// registry returns a registry from the defaults, with retries that wait a
// millisecond, changed by edit.
func registry(t testing.TB, edit func(*resilience.Config)) *resilience.Registry {
	t.Helper()
	cfg := resilience.DefaultConfig()
	cfg.Retry.InitialDelay = time.Millisecond
	cfg.Retry.DisableJitter = true
	cfg.Retry.MaxDelay = time.Second
	if edit != nil {
		edit(&cfg)
	}
	reg, err := resilience.NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return reg
}

// breaker sets the health service's breaker.
func breaker(failMax int) func(*resilience.Config) {
	return func(c *resilience.Config) {
		c.CircuitBreakers[healthKey] = resilience.CircuitBreakerConfig{FailMax: failMax, OpenTimeout: time.Minute}
	}
}

// step is what the scripted health server does on one call.
type step struct {
	code    codes.Code
	trailer []string      // key, value pairs
	header  []string      // key, value pairs, sent before anything else
	block   bool          // wait until the call's context is done
	sends   int           // Watch: messages sent before code
	entered chan struct{} // closed once the call is in the handler
	delay   time.Duration // before answering
}

// healthServer is a real grpc_health_v1 server whose calls follow a
// script, the last step repeating, and count every call that reached it.
type healthServer struct {
	healthpb.UnimplementedHealthServer
	mu    sync.Mutex
	steps []step
	hits  atomic.Int32
}

func newHealth(steps ...step) *healthServer { return &healthServer{steps: steps} }

func (h *healthServer) next() step {
	n := int(h.hits.Add(1)) - 1
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.steps) == 0 {
		return step{}
	}
	return h.steps[min(n, len(h.steps)-1)]
}

func (h *healthServer) play(ctx context.Context, s step) error {
	if len(s.header) > 0 {
		grpc.SetHeader(ctx, metadata.Pairs(s.header...))
	}
	if s.entered != nil {
		close(s.entered)
	}
	if len(s.trailer) > 0 {
		grpc.SetTrailer(ctx, metadata.Pairs(s.trailer...))
	}
	if s.block {
		<-ctx.Done()
		return status.FromContextError(ctx.Err()).Err()
	}
	if s.delay > 0 {
		select {
		case <-time.After(s.delay):
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
	}
	if s.code != codes.OK {
		return status.Error(s.code, "scripted "+s.code.String())
	}
	return nil
}

func (h *healthServer) Check(ctx context.Context, _ *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	if err := h.play(ctx, h.next()); err != nil {
		return nil, err
	}
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

func (h *healthServer) Watch(_ *healthpb.HealthCheckRequest, ss grpc.ServerStreamingServer[healthpb.HealthCheckResponse]) error {
	s := h.next()
	if len(s.header) > 0 {
		ss.SendHeader(metadata.Pairs(s.header...))
	}
	for range s.sends {
		if err := ss.Send(&healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}); err != nil {
			return err
		}
	}
	return h.play(ss.Context(), s)
}

// network is how a test reaches its server.
type network string

const (
	tcp    network = "tcp"     // a real loopback port
	bufnet network = "bufconn" // grpc-go's in-memory listener
)

// serve starts a gRPC server on nw with register's services and returns a
// client connection to it with the dial options; both are closed when the
// test ends.
func serve(t testing.TB, nw network, register func(*grpc.Server), sopts []grpc.ServerOption, dopts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	srv := grpc.NewServer(sopts...)
	register(srv)
	var lis net.Listener
	target := "passthrough:///bufnet"
	switch nw {
	case bufnet:
		bl := bufconn.Listen(1 << 20)
		lis = bl
		dopts = append(dopts, grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return bl.DialContext(ctx) }))
	default:
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lis, target = l, l.Addr().String()
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(lis)
	}()
	dopts = append(dopts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	cc, err := grpc.NewClient(target, dopts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cc.Close()
		srv.Stop()
		<-done
	})
	return cc
}

// healthClient serves h on nw and returns a client whose calls go through
// the interceptors of reg with opts.
func healthClient(t testing.TB, nw network, h *healthServer, reg *resilience.Registry, opts ...Option) healthpb.HealthClient {
	t.Helper()
	cc := serve(t, nw, func(s *grpc.Server) { healthpb.RegisterHealthServer(s, h) }, nil,
		grpc.WithUnaryInterceptor(UnaryClientInterceptor(reg, opts...)),
		grpc.WithStreamInterceptor(StreamClientInterceptor(reg, opts...)))
	return healthpb.NewHealthClient(cc)
}

var networks = []network{tcp, bufnet}
