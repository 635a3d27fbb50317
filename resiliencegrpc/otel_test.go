package resiliencegrpc

import (
	"context"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"
)

// The interceptors beside otelgrpc's stats handlers, on client and server:
// one ManualReader sees both sets of metrics. otelgrpc records every
// attempt (the retried call is two RPCs to it); resilience.calls records
// the call once, and the retry and the server's shed are counted too.
func TestBesideOtelgrpc(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	resilience.SetMeterProvider(mp)
	t.Cleanup(func() {
		resilience.SetMeterProvider(nil)
		mp.Shutdown(context.Background())
	})

	reg := registry(t, nil)
	h := newHealth(step{code: codes.Unavailable}, step{})
	b, err := resilience.NewBulkhead(resilience.BulkheadConfig{Name: "otel-server", Limit: 1})
	if err != nil {
		t.Fatal(err)
	}
	g := &gateServer{entered: make(chan string, 4), gate: make(chan struct{})}
	cc := serve(t, bufnet, func(s *grpc.Server) {
		healthpb.RegisterHealthServer(s, h)
		testpb.RegisterTestServiceServer(s, g)
	}, []grpc.ServerOption{
		grpc.StatsHandler(otelgrpc.NewServerHandler(otelgrpc.WithMeterProvider(mp))),
		grpc.ChainUnaryInterceptor(UnaryServerInterceptor(b, WithPushback(5*time.Second))), // past MaxDelay: not retried
	},
		grpc.WithStatsHandler(otelgrpc.NewClientHandler(otelgrpc.WithMeterProvider(mp))),
		grpc.WithChainUnaryInterceptor(UnaryClientInterceptor(reg)),
	)
	if _, err := healthpb.NewHealthClient(cc).Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	// A shed call: the server's slot is held by another.
	tc := testpb.NewTestServiceClient(cc)
	holder := call(tc, "holder", "")
	<-g.entered
	if _, err := tc.EmptyCall(context.Background(), &testpb.Empty{}, grpc.WaitForReady(true)); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("shed call: %v; want RESOURCE_EXHAUSTED", err)
	}
	g.gate <- struct{}{}
	<-holder

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	names := map[string][]string{}
	points := map[string]map[string]int64{} // resilience counters: attributes -> value
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			names[sm.Scope.Name] = append(names[sm.Scope.Name], m.Name)
			if sum, ok := m.Data.(metricdata.Sum[int64]); ok && sm.Scope.Name == resilience.ScopeName {
				points[m.Name] = map[string]int64{}
				for _, dp := range sum.DataPoints {
					var kv []string
					for _, a := range dp.Attributes.ToSlice() {
						kv = append(kv, string(a.Key)+"="+a.Value.String())
					}
					sort.Strings(kv)
					points[m.Name][strings.Join(kv, ",")] += dp.Value
				}
			}
		}
	}
	otel := strings.Join(names[otelgrpc.ScopeName], " ")
	if !strings.Contains(otel, "rpc.client.") || !strings.Contains(otel, "rpc.server.") {
		t.Fatalf("otelgrpc metrics: %q; want rpc.client.* and rpc.server.*", otel)
	}
	want := map[string]string{
		"resilience.calls":           "name=grpc.health.v1.Health,outcome=success",
		"resilience.retry.attempts":  "function=grpc.health.v1.Health",
		"resilience.shed.rejections": "priority=0,resource_type=otel-server",
	}
	for name, attrs := range want {
		found := false
		for got, v := range points[name] {
			if strings.Contains(got, attrs) && v > 0 {
				found = true
			}
		}
		if !found {
			t.Errorf("%s: %v; want a point with %s", name, points[name], attrs)
		}
	}
	t.Logf("otelgrpc: %s", otel)
	t.Logf("resilience: %s", strings.Join(names[resilience.ScopeName], " "))
}
