// Command grpcauth shows a fail-closed permission check over gRPC, with the
// client protected by resiliencegrpc's interceptor, against an
// authorization service that degrades, slows down, fails and recovers.
//
// The authorization service speaks grpc.health.v1's Check, whose generated
// code grpc-go ships: the permission to check travels as the request's
// service field ("user:alice#admin@organization:acme"), SERVING means
// allowed and NOT_SERVING denied. It listens on a loopback port. Every
// check goes through resiliencegrpc.UnaryClientInterceptor, and so through
// the registry's pipeline for the service "authz" (its breaker, retry and
// per-attempt timeout, configured by the variables in environment below),
// and the check itself is wrapped with resilience.FailClosed: when authz
// cannot answer, it denies. What it prints is the same on every run:
//
//	cd examples/grpcauth && go run .
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/resilience-go/resilience"
	"github.com/resilience-go/resilience/resiliencegrpc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

func main() {
	if err := run(os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "grpcauth:", err)
		os.Exit(1)
	}
}

// openTimeout is how long the breaker stays open; the demo waits a little
// longer, and everything else takes milliseconds.
const openTimeout = 200 * time.Millisecond

// environment is the registry's configuration, as a service would set it:
// 3 attempts of 100ms each, at most 20ms apart (a pushback longer than
// that ends the retries), and a breaker that opens after 2 failed calls for
// openTimeout.
var environment = map[string]string{
	"RETRY_MAX_ATTEMPTS":             "3",
	"RETRY_EXPONENTIAL_MAX":          "20ms",
	"RETRY_JITTER":                   "false",
	"TIMEOUT_AUTHZ":                  "100ms",
	"CIRCUIT_BREAKER_AUTHZ_FAIL_MAX": "2",
	"CIRCUIT_BREAKER_AUTHZ_TIMEOUT":  openTimeout.String(),
}

// The authorization service's modes.
const (
	up       = "up"
	degraded = "degraded" // every other request answers UNAVAILABLE
	slow     = "slow"     // answers after 300ms, past the attempt's timeout
	down     = "down"     // UNAVAILABLE, with a 10ms pushback
)

// authz is the authorization service: a health server whose Check answers
// a permission.
type authz struct {
	healthpb.UnimplementedHealthServer
	allowed map[string]bool

	mu       sync.Mutex
	mode     string
	requests int
}

func (a *authz) set(mode string) {
	a.mu.Lock()
	a.mode = mode
	a.mu.Unlock()
}

func (a *authz) Check(ctx context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	a.mu.Lock()
	a.requests++
	mode, n := a.mode, a.requests
	a.mu.Unlock()
	switch {
	case mode == degraded && n%2 == 1, mode == down:
		grpc.SetTrailer(ctx, metadata.Pairs(resiliencegrpc.PushbackKey, "10"))
		return nil, status.Error(codes.Unavailable, "authz is overloaded")
	case mode == slow:
		select {
		case <-time.After(300 * time.Millisecond):
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	if strings.Count(req.GetService(), "#") != 1 || strings.Count(req.GetService(), "@") != 1 {
		return nil, status.Errorf(codes.InvalidArgument, "malformed permission %q", req.GetService())
	}
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if a.allowed[req.GetService()] {
		st = healthpb.HealthCheckResponse_SERVING
	}
	return &healthpb.HealthCheckResponse{Status: st}, nil
}

func (a *authz) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.requests
}

// run plays the demo and writes its account to w.
func run(w io.Writer) error {
	svc := &authz{mode: up, allowed: map[string]bool{"user:alice#admin@organization:acme": true}}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, svc)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	defer func() {
		srv.Stop()
		<-served
	}()

	cfg, err := resilience.LoadConfigWith(resilience.LoadOptions{Environment: environment})
	if err != nil {
		return err
	}
	reg, err := resilience.NewRegistry(cfg)
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient(lis.Addr().String(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithChainUnaryInterceptor(resiliencegrpc.UnaryClientInterceptor(reg, resiliencegrpc.WithService("authz"))))
	if err != nil {
		return err
	}
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)
	breaker := reg.CircuitBreaker("authz")

	// The check, protected once and kept: FailClosed over the raw check,
	// whose every request goes through the interceptor.
	ck := &checker{client: client}
	protected := resilience.FailClosed(ck.Check)
	ctx := context.Background()
	do := func(permission string) {
		before := svc.count()
		ck.permission, ck.lastErr = permission, nil
		allowed, _ := protected(ctx)
		answer := "denied "
		if allowed {
			answer = "allowed"
		}
		reached := svc.count() - before
		why := fmt.Sprintf("authz answered, %s", plural(reached, "request"))
		if ck.lastErr != nil {
			why = "fail-closed: " + describe(ck.lastErr, reached)
		}
		fmt.Fprintf(w, "  %-36s -> %s (%s); breaker %s\n", permission, answer, why, breaker.State())
	}

	fmt.Fprintln(w, "grpcauth: fail-closed permission checks over gRPC")
	fmt.Fprintf(w, "policies for \"authz\": %d attempts of %v each; the breaker opens after %d failed calls for %v\n",
		cfg.Retry.MaxAttempts, reg.Timeout("authz"), cfg.CircuitBreakerConfig("authz").FailMax, openTimeout)

	alice, bob := "user:alice#admin@organization:acme", "user:bob#admin@organization:acme"
	for _, p := range []struct {
		title, mode string
		checks      []string
	}{
		{"authz is up", up, []string{alice, bob}},
		{"authz degrades: every other request is UNAVAILABLE, retried after its 10ms pushback", degraded, []string{alice}},
		{"a malformed permission: INVALID_ARGUMENT, neither retried nor counted", up, []string{"user:alice admin"}},
		{"authz slows down past the attempt's timeout: DEADLINE_EXCEEDED, retried and counted", slow, []string{alice}},
		{"authz is down: UNAVAILABLE", down, []string{alice, alice}},
		{"authz recovers; the breaker's open timeout passes", up, []string{alice}},
	} {
		fmt.Fprintf(w, "\n-- %s\n", p.title)
		svc.set(p.mode)
		if breaker.State() == resilience.StateOpen {
			time.Sleep(openTimeout + openTimeout/4)
		}
		for _, permission := range p.checks {
			do(permission)
		}
	}
	fmt.Fprintf(w, "\nauthz received %d requests\n", svc.count())
	return nil
}

// checker makes the raw check, and remembers why it failed for the
// account. A method, so that the metrics name it: a closure has no stable
// name.
type checker struct {
	client     healthpb.HealthClient
	permission string
	lastErr    error
}

// Check asks authz whether the permission is granted: SERVING is yes.
func (c *checker) Check(ctx context.Context) (bool, error) {
	resp, err := c.client.Check(ctx, &healthpb.HealthCheckRequest{Service: c.permission})
	c.lastErr = err
	return resp.GetStatus() == healthpb.HealthCheckResponse_SERVING, err
}

// describe says why a check failed: the status, and whether the policies
// or authz decided.
func describe(err error, reached int) string {
	st := status.Convert(err)
	switch {
	case errors.Is(err, resilience.ErrCircuitOpen):
		return fmt.Sprintf("%s, the breaker is open, authz was not called", st.Code())
	case errors.Is(err, resilience.ErrRetryExhausted):
		return fmt.Sprintf("%s after %s", st.Code(), plural(reached, "attempt"))
	}
	return fmt.Sprintf("%s from authz, %s", st.Code(), plural(reached, "attempt"))
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}
