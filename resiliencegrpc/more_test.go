package resiliencegrpc

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// Header, Trailer and Context of a retried stream are its answering
// attempt's.
func TestStreamHeaderTrailerContext(t *testing.T) {
	reg := registry(t, nil)
	h := newHealth(step{code: codes.Unavailable, header: []string{"attempt", "1"}},
		step{sends: 1, header: []string{"attempt", "2"}, trailer: []string{"served-by", "two"}})
	c := healthClient(t, bufnet, h, reg)
	ctx := context.Background()
	s, err := c.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Context(); got == nil {
		t.Fatal("Context() = nil before the first message")
	}
	n, err := recvAll(s)
	if err != nil || n != 1 {
		t.Fatalf("received %d, %v; want 1 message", n, err)
	}
	hd, err := s.Header()
	if err != nil || strings.Join(hd.Get("attempt"), ",") != "2" {
		t.Errorf("Header() = %v, %v; want the second attempt's", hd, err)
	}
	if got := s.Trailer().Get("served-by"); len(got) != 1 || got[0] != "two" {
		t.Errorf("Trailer() = %v; want the second attempt's", s.Trailer())
	}
	if s.Context().Err() == nil {
		t.Error("the answering stream's context is alive after its end")
	}
}

// A stream that ends with a neutral status before a header says so from
// Header, and Trailer gives the last attempt's.
func TestStreamHeaderAfterEnd(t *testing.T) {
	reg := registry(t, nil)
	h := newHealth(step{code: codes.NotFound, trailer: []string{"why", "gone"}})
	c := healthClient(t, bufnet, h, reg)
	s, err := c.Watch(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := recvAll(s); status.Code(err) != codes.NotFound {
		t.Fatalf("err = %v; want NOT_FOUND", err)
	}
	if _, err := s.Header(); status.Code(err) != codes.NotFound {
		t.Errorf("Header() after the end: %v; want the stream's NOT_FOUND", err)
	}
	if got := s.Trailer().Get("why"); len(got) != 1 || got[0] != "gone" {
		t.Errorf("Trailer() = %v; want the server's", s.Trailer())
	}
	if err := s.SendMsg(&healthpb.HealthCheckRequest{}); err == nil {
		t.Error("SendMsg after the end: nil; want an error")
	}
	if err := s.CloseSend(); err != nil {
		t.Errorf("CloseSend after the end: %v", err)
	}
}

// A stream that cannot be opened (nothing listens) is retried, and
// NewStream reports the last attempt's UNAVAILABLE with the library's
// error; a unary call likewise.
func TestUnreachableServer(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	reg := registry(t, nil)
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithUnaryInterceptor(UnaryClientInterceptor(reg)), grpc.WithStreamInterceptor(StreamClientInterceptor(reg)))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	c := healthpb.NewHealthClient(cc)
	_, err = c.Watch(context.Background(), &healthpb.HealthCheckRequest{})
	if status.Code(err) != codes.Unavailable || !errors.Is(err, resilience.ErrRetryExhausted) {
		t.Fatalf("NewStream to nothing: %v; want UNAVAILABLE matching ErrRetryExhausted", err)
	}
	var e *Error
	if !errors.As(err, &e) || !strings.HasPrefix(e.Error(), "rpc error: code = Unavailable desc = resilience: ") {
		t.Errorf("Error() = %q", err)
	}
	if _, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{}); status.Code(err) != codes.Unavailable || !errors.Is(err, resilience.ErrRetryExhausted) {
		t.Errorf("unary call to nothing: %v; want UNAVAILABLE matching ErrRetryExhausted", err)
	}
}

// Each way the policies end a call without a status of the server's has
// its code and reason; the caller's own cancellation or deadline its code.
func TestRejectionStatus(t *testing.T) {
	tests := []struct {
		err    error
		code   codes.Code
		reason string
	}{
		{resilience.ErrCircuitOpen, codes.Unavailable, "CIRCUIT_OPEN"},
		{resilience.ErrBulkheadFull, codes.Unavailable, "BULKHEAD_FULL"},
		{resilience.ErrRateLimited, codes.Unavailable, "RATE_LIMITED"},
		{resilience.ErrRetryBudgetExhausted, codes.Unavailable, "RETRY_BUDGET_EXHAUSTED"},
		{resilience.ErrRetryExhausted, codes.Unavailable, "RETRY_EXHAUSTED"},
		{resilience.ErrTimeout, codes.DeadlineExceeded, "TIMEOUT"},
		{resilience.ErrStale, codes.Unavailable, "REJECTED"},
		{context.Canceled, codes.Canceled, ""},
		{context.DeadlineExceeded, codes.DeadlineExceeded, ""},
	}
	for _, tt := range tests {
		re := &resilience.Error{Err: tt.err, Name: "pol", Cause: errors.New("cause")}
		err := callerError("svc", re)
		if status.Code(err) != tt.code || !errors.Is(err, tt.err) {
			t.Errorf("%v: %v; want %v matching it", tt.err, err, tt.code)
			continue
		}
		info := errorInfo(err)
		if tt.reason == "" {
			if info != nil {
				t.Errorf("%v: ErrorInfo %v; want none", tt.err, info)
			}
			continue
		}
		if info == nil || info.Reason != tt.reason || info.Metadata["policy"] != "pol" || info.Metadata["service"] != "svc" {
			t.Errorf("%v: ErrorInfo %v; want %s of policy pol, service svc", tt.err, info, tt.reason)
		}
	}
	// A rate limit says when to retry.
	re := &resilience.Error{Err: resilience.ErrRateLimited}
	var ri *errdetails.RetryInfo
	for _, d := range status.Convert(callerError("svc", re)).Details() {
		if x, ok := d.(*errdetails.RetryInfo); ok {
			ri = x
		}
	}
	if ri == nil || ri.RetryDelay.AsDuration() != 0 {
		t.Errorf("RetryInfo of a rate limit = %v; want its wait, 0 here", ri)
	}
	// Not the library's error at all: as it is.
	plain := errors.New("plain")
	if got := callerError("svc", plain); got != plain {
		t.Errorf("callerError(plain) = %v", got)
	}
	// A configuration error's message.
	if msg := invalid("f", "v", "why").Error(); msg != `rpc error: code = Internal desc = resiliencegrpc: invalid configuration: f = "v": why` {
		t.Errorf("invalid(...).Error() = %q", msg)
	}
	if got := (&attemptError{err: status.Error(codes.Aborted, "x"), hint: time.Second}).Error(); got != "rpc error: code = Aborted desc = x" {
		t.Errorf("attemptError.Error() = %q", got)
	}
}

// The metrics' error.type names a failed attempt's status, as Transport's
// http_503 names a status, rather than the adapter's Go type.
func TestAttemptErrorType(t *testing.T) {
	for code, want := range map[codes.Code]string{
		codes.Unavailable:       "grpc_unavailable",
		codes.ResourceExhausted: "grpc_resource_exhausted",
		codes.DeadlineExceeded:  "grpc_deadline_exceeded",
		codes.Internal:          "grpc_internal",
	} {
		if got := (&attemptError{err: status.Error(code, "x")}).ErrorType(); got != want {
			t.Errorf("%v: ErrorType() = %q, want %q", code, got, want)
		}
	}
}
