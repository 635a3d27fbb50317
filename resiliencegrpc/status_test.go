package resiliencegrpc

import (
	"context"
	"testing"

	"github.com/resilience-go/resilience"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// TestRetryIfOverridesA6AndIdempotency: a RetryIf that retries UNAVAILABLE
// and INTERNAL, as a gRPC-aware predicate would, sent the call again after
// gRFC A6's "do not retry" (a negative pushback) and after INTERNAL of a
// method that is not idempotent. Those decisions are final: one request,
// and the caller gets its status.
func TestRetryIfOverridesA6AndIdempotency(t *testing.T) {
	for _, tt := range []struct {
		name    string
		code    codes.Code
		trailer []string
	}{
		{"pushback -1", codes.Unavailable, []string{PushbackKey, "-1"}},
		{"malformed pushback", codes.Unavailable, []string{PushbackKey, "soon"}},
		{"INTERNAL, not idempotent", codes.Internal, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var asked int
			reg := registry(t, func(c *resilience.Config) {
				c.Retry.RetryIf = func(err error) bool {
					asked++
					switch status.Code(err) {
					case codes.Unavailable, codes.Internal:
						return true
					}
					return resilience.IsRetryable(err)
				}
			})
			for _, nw := range networks {
				h := newHealth(step{code: tt.code, trailer: tt.trailer}, step{})
				c := healthClient(t, nw, h, reg)
				_, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{})
				if got := h.hits.Load(); got != 1 {
					t.Errorf("%s: requests sent = %d; want 1", nw, got)
				}
				if status.Code(err) != tt.code {
					t.Errorf("%s: err = %v; want %v", nw, err, tt.code)
				}
			}
			if asked == 0 {
				t.Error("RetryIf was never asked")
			}
		})
	}
}

// TestStreamRetryIfOverridesA6: the same for a stream before its first
// message: a negative pushback ends it, whatever RetryIf says.
func TestStreamRetryIfOverridesA6(t *testing.T) {
	reg := registry(t, func(c *resilience.Config) {
		c.Retry.RetryIf = func(err error) bool { return status.Code(err) == codes.Unavailable }
	})
	h := newHealth(step{code: codes.Unavailable, trailer: []string{PushbackKey, "-1"}}, step{sends: 1})
	c := healthClient(t, bufnet, h, reg)
	s, err := c.Watch(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	n, err := recvAll(s)
	if got := h.hits.Load(); got != 1 || n != 0 || status.Code(err) != codes.Unavailable {
		t.Errorf("requests sent = %d, messages %d, err %v; want 1, 0, UNAVAILABLE", got, n, err)
	}
}
