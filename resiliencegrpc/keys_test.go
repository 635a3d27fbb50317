package resiliencegrpc

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/resilience-go/resilience"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// tenantHealth fails every call of the tenant "acme" (x-tenant metadata)
// and counts the calls that reached it per tenant.
type tenantHealth struct {
	healthpb.UnimplementedHealthServer
	mu   sync.Mutex
	hits map[string]int
}

func (h *tenantHealth) Check(ctx context.Context, _ *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	tenant := ""
	if v := md.Get("x-tenant"); len(v) > 0 {
		tenant = v[0]
	}
	h.mu.Lock()
	h.hits[tenant]++
	h.mu.Unlock()
	if tenant == "acme" {
		return nil, status.Error(codes.Unavailable, "acme's backend is down")
	}
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

func TestWithKeyOpensOneTenantsBreaker(t *testing.T) {
	for _, nw := range networks {
		t.Run(string(nw), func(t *testing.T) {
			reg := registry(t, func(c *resilience.Config) {
				breaker(1)(c)
				c.Retry.MaxAttempts = 1
			})
			h := &tenantHealth{hits: map[string]int{}}
			tenantOf := func(ctx context.Context, _ string) string {
				md, _ := metadata.FromOutgoingContext(ctx)
				if v := md.Get("x-tenant"); len(v) > 0 {
					return v[0]
				}
				return ""
			}
			cc := serve(t, nw, func(s *grpc.Server) { healthpb.RegisterHealthServer(s, h) }, nil,
				grpc.WithUnaryInterceptor(UnaryClientInterceptor(reg, WithKey(tenantOf))))
			c := healthpb.NewHealthClient(cc)
			check := func(tenant string) error {
				ctx := metadata.AppendToOutgoingContext(context.Background(), "x-tenant", tenant)
				_, err := c.Check(ctx, &healthpb.HealthCheckRequest{})
				return err
			}
			if err := check("acme"); status.Code(err) != codes.Unavailable {
				t.Fatalf("acme's first call: %v", err)
			}
			for range 3 {
				if err := check("acme"); !errors.Is(err, resilience.ErrCircuitOpen) {
					t.Errorf("acme after its failure: %v; want its breaker open", err)
				}
				if err := check("globex"); err != nil {
					t.Errorf("globex while acme's breaker is open: %v", err)
				}
			}
			h.mu.Lock()
			defer h.mu.Unlock()
			if h.hits["acme"] != 1 || h.hits["globex"] != 3 {
				t.Errorf("calls that reached the server = %v; want acme once, globex 3 times", h.hits)
			}
			if st := reg.CircuitBreaker(healthSvc).State(); st != resilience.StateClosed {
				t.Errorf("the service's breaker is %v; want closed", st)
			}
			if keys := reg.OpenKeys(healthSvc, "", 0); len(keys) != 1 || keys[0].Key != "acme" {
				t.Errorf("OpenKeys = %+v; want acme", keys)
			}
		})
	}
}

func TestWithKeyNil(t *testing.T) {
	reg := registry(t, nil)
	cc := serve(t, tcp, func(s *grpc.Server) { healthpb.RegisterHealthServer(s, newHealth()) }, nil,
		grpc.WithUnaryInterceptor(UnaryClientInterceptor(reg, WithKey(nil))))
	_, err := healthpb.NewHealthClient(cc).Check(context.Background(), &healthpb.HealthCheckRequest{})
	if err == nil || !errors.Is(err, resilience.ErrInvalidConfig) {
		t.Errorf("a call with WithKey(nil): %v; want an error naming WithKey f", err)
	}
}
