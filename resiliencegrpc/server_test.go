package resiliencegrpc

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// gateServer's EmptyCall signals that it entered, then waits for its gate.
type gateServer struct {
	testpb.UnimplementedTestServiceServer
	entered chan string
	gate    chan struct{}
}

func (g *gateServer) EmptyCall(ctx context.Context, _ *testpb.Empty) (*testpb.Empty, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	g.entered <- first(md["id"])
	select {
	case <-g.gate:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return &testpb.Empty{}, nil
}

func first(vs []string) string {
	if len(vs) == 0 {
		return ""
	}
	return vs[0]
}

// metadataPriority ranks a call by its "priority" metadata.
func metadataPriority(ctx context.Context, _ string) int {
	md, _ := metadata.FromIncomingContext(ctx)
	if p := first(md["priority"]); p == "highest" {
		return resilience.PriorityHighest
	} else if n, err := strconv.Atoi(p); err == nil {
		return n
	}
	return 0
}

// shedServer serves gateServer and a health server behind the shedding
// interceptor, and returns plain clients of both.
func shedServer(t *testing.T, b *resilience.Bulkhead, opts ...ServerOption) (*gateServer, testpb.TestServiceClient, healthpb.HealthClient) {
	t.Helper()
	g := &gateServer{entered: make(chan string, 16), gate: make(chan struct{})}
	cc := serve(t, tcp, func(s *grpc.Server) {
		testpb.RegisterTestServiceServer(s, g)
		healthpb.RegisterHealthServer(s, newHealth())
	}, []grpc.ServerOption{grpc.ChainUnaryInterceptor(UnaryServerInterceptor(b, opts...))})
	return g, testpb.NewTestServiceClient(cc), healthpb.NewHealthClient(cc)
}

type callResult struct {
	err     error
	trailer metadata.MD
}

// call makes an EmptyCall with id and priority in its metadata, in its own
// goroutine.
func call(c testpb.TestServiceClient, id, prio string) chan callResult {
	ch := make(chan callResult, 1)
	go func() {
		ctx := metadata.AppendToOutgoingContext(context.Background(), "id", id, "priority", prio)
		var tr metadata.MD
		_, err := c.EmptyCall(ctx, &testpb.Empty{}, grpc.Trailer(&tr))
		ch <- callResult{err, tr}
	}()
	return ch
}

func wantShed(t *testing.T, what string, r callResult, pushback string) {
	t.Helper()
	if status.Code(r.err) != codes.ResourceExhausted {
		t.Fatalf("%s: %v; want RESOURCE_EXHAUSTED", what, r.err)
	}
	if got := first(r.trailer[PushbackKey]); got != pushback {
		t.Errorf("%s: %s = %q; want %q", what, PushbackKey, got, pushback)
	}
	var ri *errdetails.RetryInfo
	for _, d := range status.Convert(r.err).Details() {
		if x, ok := d.(*errdetails.RetryInfo); ok {
			ri = x
		}
	}
	if ri == nil {
		t.Errorf("%s: no RetryInfo in %v", what, r.err)
	}
}

// Lower priorities are shed first: priority 0 at once, a waiter displaced
// by a higher newcomer when the queue is full, and PriorityHighest never,
// served first when a slot frees.
func TestServerShedsByPriority(t *testing.T) {
	b, err := resilience.NewBulkhead(resilience.BulkheadConfig{Name: "grpc-server", Limit: 1, MaxQueue: 1})
	if err != nil {
		t.Fatal(err)
	}
	g, c, _ := shedServer(t, b, WithPriority(metadataPriority), WithPushback(250*time.Millisecond))
	holder := call(c, "holder", "1")
	if id := <-g.entered; id != "holder" {
		t.Fatalf("entered %q; want holder", id)
	}
	wantShed(t, "priority 0 while full", <-call(c, "zero", "0"), "250")

	low := call(c, "low", "1")
	waitFor(t, "low to wait", func() bool { return b.Stats().Waiting == 1 })
	high := call(c, "high", "5")
	wantShed(t, "the waiter a higher priority displaced", <-low, "250")
	top := call(c, "top", "highest")
	waitFor(t, "high and top to wait", func() bool { return b.Stats().Waiting == 2 })

	g.gate <- struct{}{}
	if r := <-holder; r.err != nil {
		t.Fatal(r.err)
	}
	if id := <-g.entered; id != "top" {
		t.Fatalf("served first after the holder: %q; want top", id)
	}
	g.gate <- struct{}{}
	if r := <-top; r.err != nil {
		t.Fatal(r.err)
	}
	if id := <-g.entered; id != "high" {
		t.Fatalf("served next: %q; want high", id)
	}
	g.gate <- struct{}{}
	if r := <-high; r.err != nil {
		t.Fatal(r.err)
	}
	if s := b.Stats(); s.Active != 0 || s.Waiting != 0 {
		t.Fatalf("Stats = %+v; want idle", s)
	}
}

// Without WithPriority, the health service is never shed, and every other
// call is shed at once when no slot is free.
func TestServerHealthNeverShedByDefault(t *testing.T) {
	healthWaits(t, "grpc-health", true)
}

// TestServerHealthNeverShedWithPriority: a WithPriority that ranks every
// call 0, the health service's included, does not get the health check
// shed: it waits for a slot, as PriorityHighest does.
func TestServerHealthNeverShedWithPriority(t *testing.T) {
	healthWaits(t, "grpc-health-prio", false, WithPriority(func(context.Context, string) int { return 0 }))
}

// healthWaits checks that a health check waits for the one slot another
// call holds, and is served once it is free; with other, that a call of
// priority 0 is shed meanwhile.
func healthWaits(t *testing.T, name string, other bool, opts ...ServerOption) {
	t.Helper()
	b, err := resilience.NewBulkhead(resilience.BulkheadConfig{Name: name, Limit: 1})
	if err != nil {
		t.Fatal(err)
	}
	g, c, health := shedServer(t, b, opts...)
	holder := call(c, "holder", "")
	<-g.entered
	if other {
		wantShed(t, "another call while full", <-call(c, "other", ""), "1000")
	}
	checked := make(chan error, 1)
	go func() {
		_, err := health.Check(context.Background(), &healthpb.HealthCheckRequest{})
		checked <- err
	}()
	waitFor(t, "the health check to wait", func() bool { return b.Stats().Waiting == 1 })
	g.gate <- struct{}{}
	if r := <-holder; r.err != nil {
		t.Fatal(r.err)
	}
	if err := <-checked; err != nil {
		t.Fatalf("health check: %v; want served", err)
	}
}

// A waiting call whose client gives up leaves the queue, and a panicking
// handler gives its slot back.
func TestServerCanceledWaiterAndPanic(t *testing.T) {
	b, err := resilience.NewBulkhead(resilience.BulkheadConfig{Name: "grpc-cancel", Limit: 1})
	if err != nil {
		t.Fatal(err)
	}
	g, c, _ := shedServer(t, b, WithPriority(metadataPriority))
	holder := call(c, "holder", "1")
	<-g.entered
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), "priority", "3"))
	done := make(chan error, 1)
	go func() {
		_, err := c.EmptyCall(ctx, &testpb.Empty{})
		done <- err
	}()
	waitFor(t, "the call to wait", func() bool { return b.Stats().Waiting == 1 })
	cancel()
	if err := <-done; status.Code(err) != codes.Canceled {
		t.Fatalf("cancelled waiter: %v; want CANCELED", err)
	}
	waitFor(t, "the waiter to leave", func() bool { return b.Stats().Waiting == 0 })
	g.gate <- struct{}{}
	<-holder

	intercept := UnaryServerInterceptor(b)
	func() {
		defer func() { _ = recover() }()
		intercept(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/x.Y/Z"}, func(context.Context, any) (any, error) { panic("boom") })
	}()
	if got := b.Stats().Active; got != 0 {
		t.Fatalf("after a panicking handler: Active = %d; want 0", got)
	}
}

// Bad configuration is reported by every call, naming what is wrong.
func TestInvalidConfiguration(t *testing.T) {
	b, _ := resilience.NewBulkhead(resilience.BulkheadConfig{Name: "cfg"})
	info := &grpc.UnaryServerInfo{FullMethod: "/x.Y/Z"}
	handler := func(context.Context, any) (any, error) { return "served", nil }
	servers := map[string]grpc.UnaryServerInterceptor{
		`UnaryServerInterceptor b = "nil"`: UnaryServerInterceptor(nil),
		`WithPriority f = "nil"`:           UnaryServerInterceptor(b, WithPriority(nil)),
		`WithPushback d = "-1s"`:           UnaryServerInterceptor(b, WithPushback(-time.Second)),
		`ServerOption = "nil"`:             UnaryServerInterceptor(b, nil),
	}
	for want, icpt := range servers {
		_, err := icpt(context.Background(), nil, info, handler)
		checkInvalid(t, err, want)
	}
	reg := registry(t, nil)
	invoker := func(context.Context, string, any, any, *grpc.ClientConn, ...grpc.CallOption) error { return nil }
	clients := []struct {
		want   string
		icpt   grpc.UnaryClientInterceptor
		method string
	}{
		{`WithService name = ""`, UnaryClientInterceptor(reg, WithService("")), checkM},
		{`WithIdempotent method = "Check"`, UnaryClientInterceptor(reg, WithIdempotent("Check")), checkM},
		{`Option = "nil"`, UnaryClientInterceptor(reg, nil), checkM},
		{`method = "nonsense"`, UnaryClientInterceptor(reg), "nonsense"},
		{`method = "/a/b/c"`, UnaryClientInterceptor(reg), "/a/b/c"},
	}
	for _, tt := range clients {
		checkInvalid(t, tt.icpt(context.Background(), tt.method, nil, nil, nil, invoker), tt.want)
	}
	_, err := StreamClientInterceptor(reg, WithService(""))(context.Background(), &grpc.StreamDesc{}, nil, checkM, nil)
	checkInvalid(t, err, `WithService name = ""`)
	// With WithService, any method name will do.
	if err := UnaryClientInterceptor(reg, WithService("svc"))(context.Background(), "nonsense", nil, nil, nil, invoker); err != nil {
		t.Errorf("WithService and a method name without a service: %v; want nil", err)
	}
}

func checkInvalid(t *testing.T, err error, want string) {
	t.Helper()
	if !errors.Is(err, resilience.ErrInvalidConfig) || status.Code(err) != codes.Internal {
		t.Errorf("%s: err = %v; want INTERNAL matching ErrInvalidConfig", want, err)
		return
	}
	if msg := status.Convert(err).Message(); !strings.Contains(msg, want) {
		t.Errorf("message %q does not name %s", msg, want)
	}
}
