package resiliencegrpc

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Every status class, on a real loopback port and over bufconn: how many
// attempts reach the server, what the caller gets, and whether the breaker
// counts it (with FAIL_MAX 1, a counted call opens it, and the next call is
// rejected without reaching the server).
func TestUnaryStatusClasses(t *testing.T) {
	tests := []struct {
		code       codes.Code
		idempotent bool
		hits       int32 // attempts: 3 when retried
		counted    bool
	}{
		{codes.Unavailable, false, 3, true},
		{codes.ResourceExhausted, false, 3, true},
		{codes.Aborted, false, 3, true},
		{codes.Internal, false, 1, true},
		{codes.Internal, true, 3, true},
		{codes.Unknown, false, 1, true},
		{codes.Unknown, true, 3, true},
		{codes.DataLoss, true, 1, true},
		{codes.InvalidArgument, true, 1, false},
		{codes.NotFound, true, 1, false},
		{codes.AlreadyExists, true, 1, false},
		{codes.PermissionDenied, true, 1, false},
		{codes.Unauthenticated, true, 1, false},
		{codes.FailedPrecondition, true, 1, false},
		{codes.OutOfRange, true, 1, false},
		{codes.Unimplemented, true, 1, false},
		// The server's own deadline or cancellation, not the attempt's.
		{codes.DeadlineExceeded, true, 1, false},
		{codes.Canceled, true, 1, false},
	}
	for _, nw := range networks {
		for _, tt := range tests {
			name := string(nw) + "/" + tt.code.String()
			if tt.idempotent {
				name += "/idempotent"
			}
			t.Run(name, func(t *testing.T) {
				reg := registry(t, breaker(1))
				h := newHealth(step{code: tt.code})
				var opts []Option
				if tt.idempotent {
					opts = append(opts, WithIdempotent(checkM))
				}
				c := healthClient(t, nw, h, reg, opts...)
				_, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{})
				if got := status.Code(err); got != tt.code {
					t.Fatalf("status.Code(err) = %v; want %v (err %v)", got, tt.code, err)
				}
				if got := h.hits.Load(); got != tt.hits {
					t.Errorf("attempts that reached the server = %d; want %d", got, tt.hits)
				}
				// FAIL_MAX 1: a counted failure opens the breaker.
				if counted := reg.CircuitBreaker(healthSvc).State() == resilience.StateOpen; counted != tt.counted {
					t.Errorf("breaker open = %v; want %v", counted, tt.counted)
				}
				before := h.hits.Load()
				_, err = c.Check(context.Background(), &healthpb.HealthCheckRequest{})
				if tt.counted {
					if !errors.Is(err, resilience.ErrCircuitOpen) || h.hits.Load() != before {
						t.Errorf("after a counted failure with FAIL_MAX 1: %v, %d new hits; want ErrCircuitOpen and none", err, h.hits.Load()-before)
					}
				} else if status.Code(err) != tt.code {
					t.Errorf("second call: %v; want %v from the server", err, tt.code)
				}
			})
		}
	}
}

// A neutral status comes back to the caller exactly as the server sent it.
func TestUnaryNeutralStatusUnchanged(t *testing.T) {
	reg := registry(t, nil)
	c := healthClient(t, bufnet, newHealth(step{code: codes.NotFound}), reg)
	_, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{})
	var e *Error
	if errors.As(err, &e) || status.Convert(err).Message() != "scripted NotFound" {
		t.Fatalf("err = %#v; want the server's own status", err)
	}
}

// DEADLINE_EXCEEDED of the attempt's own timeout is retried and counted,
// and the caller gets DEADLINE_EXCEEDED matching ErrTimeout.
func TestUnaryAttemptTimeoutRetriedAndCounted(t *testing.T) {
	reg := registry(t, func(c *resilience.Config) {
		breaker(1)(c)
		c.Timeouts[healthKey] = 50 * time.Millisecond
	})
	h := newHealth(step{block: true})
	c := healthClient(t, tcp, h, reg)
	_, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{})
	if status.Code(err) != codes.DeadlineExceeded || !errors.Is(err, resilience.ErrTimeout) || !errors.Is(err, resilience.ErrRetryExhausted) {
		t.Fatalf("err = %v; want DEADLINE_EXCEEDED matching ErrTimeout and ErrRetryExhausted", err)
	}
	if got := h.hits.Load(); got != 3 {
		t.Errorf("attempts = %d; want 3", got)
	}
	if got := reg.CircuitBreaker(healthSvc).State(); got != resilience.StateOpen {
		t.Errorf("breaker = %v; want open (FAIL_MAX 1)", got)
	}
}

// The caller's own deadline ends the call without a retry, and is not
// counted against the server.
func TestUnaryCallerDeadlineNotCounted(t *testing.T) {
	reg := registry(t, breaker(1))
	h := newHealth(step{block: true}, step{})
	c := healthClient(t, tcp, h, reg)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := c.Check(ctx, &healthpb.HealthCheckRequest{})
	if status.Code(err) != codes.DeadlineExceeded || errors.Is(err, resilience.ErrTimeout) {
		t.Fatalf("err = %v; want the caller's DEADLINE_EXCEEDED, not ErrTimeout", err)
	}
	if got := h.hits.Load(); got != 1 {
		t.Errorf("attempts = %d; want 1", got)
	}
	counts := reg.CircuitBreaker(healthSvc).Counts()
	if counts.TotalFailures != 0 {
		t.Errorf("breaker counts = %+v; want no failure", counts)
	}
	if _, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Errorf("next call = %v; want it served", err)
	}
}

// The caller's cancellation ends the call at once, is CANCELED, and is not
// counted.
func TestUnaryCallerCancelNotCounted(t *testing.T) {
	for _, nw := range networks {
		t.Run(string(nw), func(t *testing.T) {
			reg := registry(t, breaker(1))
			entered := make(chan struct{})
			h := newHealth(step{block: true, entered: entered}, step{})
			c := healthClient(t, nw, h, reg)
			ctx, cancel := context.WithCancel(context.Background())
			go func() {
				<-entered
				cancel()
			}()
			_, err := c.Check(ctx, &healthpb.HealthCheckRequest{})
			if status.Code(err) != codes.Canceled {
				t.Fatalf("err = %v; want CANCELED", err)
			}
			if got := h.hits.Load(); got != 1 {
				t.Errorf("attempts = %d; want 1", got)
			}
			if counts := reg.CircuitBreaker(healthSvc).Counts(); counts.TotalFailures != 0 {
				t.Errorf("breaker counts = %+v; want no failure", counts)
			}
			if _, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
				t.Errorf("next call = %v; want it served", err)
			}
		})
	}
}

// FAIL_MAX calls that fail with UNAVAILABLE open the breaker, and the next
// call is rejected without reaching the server: UNAVAILABLE with the
// library's error as details, matching ErrCircuitOpen.
func TestUnaryBreakerOpensAfterFailMax(t *testing.T) {
	for _, nw := range networks {
		t.Run(string(nw), func(t *testing.T) {
			reg := registry(t, func(c *resilience.Config) {
				breaker(3)(c)
				c.Retry.MaxAttempts = 1
			})
			h := newHealth(step{code: codes.Unavailable})
			c := healthClient(t, nw, h, reg)
			for i := range 3 {
				if _, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{}); status.Code(err) != codes.Unavailable || errors.Is(err, resilience.ErrCircuitOpen) {
					t.Fatalf("call %d: %v; want the server's UNAVAILABLE", i+1, err)
				}
			}
			if got := h.hits.Load(); got != 3 {
				t.Fatalf("hits = %d; want 3", got)
			}
			_, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{})
			if got := h.hits.Load(); got != 3 {
				t.Errorf("hits after the breaker opened = %d; want 3", got)
			}
			if !errors.Is(err, resilience.ErrCircuitOpen) || status.Code(err) != codes.Unavailable {
				t.Fatalf("err = %v; want UNAVAILABLE matching ErrCircuitOpen", err)
			}
			var re *resilience.Error
			if !errors.As(err, &re) || re.Name != healthSvc {
				t.Errorf("errors.As(*resilience.Error) = %v; want the breaker's, named %q", re, healthSvc)
			}
			var info *errdetails.ErrorInfo
			var retry *errdetails.RetryInfo
			for _, d := range status.Convert(err).Details() {
				switch d := d.(type) {
				case *errdetails.ErrorInfo:
					info = d
				case *errdetails.RetryInfo:
					retry = d
				}
			}
			if info == nil || info.Reason != "CIRCUIT_OPEN" || info.Domain != ErrorDomain || info.Metadata["service"] != healthSvc {
				t.Errorf("ErrorInfo = %v; want CIRCUIT_OPEN of %s", info, healthSvc)
			}
			if retry == nil || retry.RetryDelay.AsDuration() <= 0 || retry.RetryDelay.AsDuration() > time.Minute {
				t.Errorf("RetryInfo = %v; want the time to the breaker's probe, within its minute", retry)
			}
		})
	}
}

// When retries run out, the caller gets the last attempt's status, and
// errors.Is still sees ErrRetryExhausted.
func TestUnaryRetryExhaustedKeepsLastStatus(t *testing.T) {
	reg := registry(t, nil)
	h := newHealth(step{code: codes.Aborted}, step{code: codes.Aborted}, step{code: codes.Unavailable})
	c := healthClient(t, bufnet, h, reg)
	_, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{})
	st, _ := status.FromError(err)
	if st.Code() != codes.Unavailable || st.Message() != "scripted Unavailable" {
		t.Fatalf("status = %v; want the last attempt's UNAVAILABLE", st)
	}
	var e *Error
	if !errors.As(err, &e) || !errors.Is(err, resilience.ErrRetryExhausted) {
		t.Fatalf("err = %v; want an *Error matching ErrRetryExhausted", err)
	}
	if got := h.hits.Load(); got != 3 {
		t.Errorf("hits = %d; want 3", got)
	}
}

// A retried call that then succeeds is a success to the caller and the
// breaker.
func TestUnaryRetryThenSuccess(t *testing.T) {
	reg := registry(t, breaker(1))
	h := newHealth(step{code: codes.Unavailable}, step{})
	c := healthClient(t, tcp, h, reg)
	resp, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Check = %v, %v; want SERVING", resp, err)
	}
	if counts := reg.CircuitBreaker(healthSvc).Counts(); counts.TotalSuccesses != 1 || counts.TotalFailures != 0 {
		t.Errorf("breaker counts = %+v; want one success", counts)
	}
}

// A full bulkhead rejects a call locally, with UNAVAILABLE and
// BULKHEAD_FULL, matching ErrBulkheadFull, and not counted.
func TestUnaryBulkheadFull(t *testing.T) {
	reg := registry(t, func(c *resilience.Config) {
		breaker(1)(c)
		c.Bulkheads[healthKey] = resilience.BulkheadConfig{Limit: 1, FailFast: true}
		c.Retry.MaxAttempts = 1
	})
	entered := make(chan struct{})
	h := newHealth(step{block: true, entered: entered}, step{})
	c := healthClient(t, bufnet, h, reg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := c.Check(ctx, &healthpb.HealthCheckRequest{})
		done <- err
	}()
	<-entered
	_, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{})
	if !errors.Is(err, resilience.ErrBulkheadFull) || status.Code(err) != codes.Unavailable {
		t.Fatalf("err = %v; want UNAVAILABLE matching ErrBulkheadFull", err)
	}
	if info := errorInfo(err); info == nil || info.Reason != "BULKHEAD_FULL" {
		t.Errorf("ErrorInfo = %v; want BULKHEAD_FULL", info)
	}
	cancel()
	<-done
	if got := h.hits.Load(); got != 1 {
		t.Errorf("hits = %d; want 1", got)
	}
	if counts := reg.CircuitBreaker(healthSvc).Counts(); counts.TotalFailures != 0 {
		t.Errorf("breaker counts = %+v; want no failure", counts)
	}
}

func errorInfo(err error) *errdetails.ErrorInfo {
	for _, d := range status.Convert(err).Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info
		}
	}
	return nil
}

// A disabled registry passes calls straight through: no retry, no breaker.
func TestUnaryDisabledRegistry(t *testing.T) {
	reg := registry(t, func(c *resilience.Config) { c.Enabled = false })
	h := newHealth(step{code: codes.Unavailable})
	c := healthClient(t, bufnet, h, reg)
	_, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{})
	if status.Code(err) != codes.Unavailable || h.hits.Load() != 1 {
		t.Fatalf("err = %v, hits %d; want the server's UNAVAILABLE, once", err, h.hits.Load())
	}
}

// WithService names the registry service instead of the gRPC one.
func TestUnaryWithService(t *testing.T) {
	reg := registry(t, func(c *resilience.Config) {
		c.CircuitBreakers["AUTHZ"] = resilience.CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Minute}
		c.Retry.MaxAttempts = 1
	})
	h := newHealth(step{code: codes.Unavailable})
	c := healthClient(t, bufnet, h, reg, WithService("authz"))
	c.Check(context.Background(), &healthpb.HealthCheckRequest{})
	if got := reg.CircuitBreaker("authz").State(); got != resilience.StateOpen {
		t.Fatalf("authz breaker = %v; want open", got)
	}
	if got := reg.CircuitBreaker(healthSvc).Counts().Requests; got != 0 {
		t.Fatalf("the gRPC service's breaker saw %d requests; want 0", got)
	}
}

// TestUnaryHedgeLoserOverwritesCallerMetadata: in a hedged call, the
// first attempt, slow, loses to the hedge and is cancelled; it wrote its
// (empty) header and trailer into the caller's grpc.Header and
// grpc.Trailer after the winner did. The caller gets the winner's.
func TestUnaryHedgeLoserOverwritesCallerMetadata(t *testing.T) {
	reg := registry(t, func(c *resilience.Config) {
		c.Hedges = map[string]resilience.HedgingConfig{healthKey: {Delay: 20 * time.Millisecond}}
	})
	h := newHealth(step{delay: 300 * time.Millisecond, header: []string{"who", "first"}, trailer: []string{"who", "first"}},
		step{header: []string{"who", "hedge"}, trailer: []string{"who", "hedge"}})
	c := healthClient(t, bufnet, h, reg, WithIdempotent(checkM))
	var hdr, trl metadata.MD
	var p peer.Peer
	_, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{}, grpc.Header(&hdr), grpc.Trailer(&trl), grpc.Peer(&p))
	if err != nil {
		t.Fatal(err)
	}
	if got := h.hits.Load(); got != 2 {
		t.Fatalf("server hits = %d; want 2, the first and its hedge", got)
	}
	if got := trl.Get("who"); len(got) != 1 || got[0] != "hedge" {
		t.Errorf("trailer who = %v; want the winner's [hedge]", got)
	}
	if got := hdr.Get("who"); len(got) != 1 || got[0] != "hedge" {
		t.Errorf("header who = %v; want the winner's [hedge]", got)
	}
	if p.Addr == nil {
		t.Error("peer: no address; want the winner's")
	}
}

// TestUnaryCallerMetadataOnFailure: without a hedge, the caller's
// grpc.Header and grpc.Trailer get the last attempt's, on failure too.
func TestUnaryCallerMetadataOnFailure(t *testing.T) {
	reg := registry(t, nil)
	h := newHealth(step{code: codes.Unavailable, trailer: []string{"n", "1"}}, step{code: codes.DataLoss, trailer: []string{"n", "2"}})
	c := healthClient(t, bufnet, h, reg)
	var trl metadata.MD
	_, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{}, grpc.Trailer(&trl))
	if status.Code(err) != codes.DataLoss {
		t.Fatalf("err = %v; want DATA_LOSS", err)
	}
	if got := trl.Get("n"); len(got) != 1 || got[0] != "2" {
		t.Errorf("trailer n = %v; want the last attempt's [2]", got)
	}
}
