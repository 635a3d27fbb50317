package resiliencegrpc

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
)

// idempotencyFiles is a registry holding one service whose methods declare
// each idempotency level.
func idempotencyFiles(t *testing.T) *protoregistry.Files {
	t.Helper()
	method := func(name string, level descriptorpb.MethodOptions_IdempotencyLevel) *descriptorpb.MethodDescriptorProto {
		return &descriptorpb.MethodDescriptorProto{
			Name: proto.String(name), InputType: proto.String(".authz.v1.Req"), OutputType: proto.String(".authz.v1.Req"),
			Options: &descriptorpb.MethodOptions{IdempotencyLevel: level.Enum()},
		}
	}
	fd := &descriptorpb.FileDescriptorProto{
		Name: proto.String("authz.proto"), Package: proto.String("authz.v1"), Syntax: proto.String("proto3"),
		MessageType: []*descriptorpb.DescriptorProto{{Name: proto.String("Req")}},
		Service: []*descriptorpb.ServiceDescriptorProto{{
			Name: proto.String("Authz"),
			Method: []*descriptorpb.MethodDescriptorProto{
				method("Check", descriptorpb.MethodOptions_NO_SIDE_EFFECTS),
				method("Put", descriptorpb.MethodOptions_IDEMPOTENT),
				method("Append", descriptorpb.MethodOptions_IDEMPOTENCY_UNKNOWN),
			},
		}},
	}
	f, err := protodesc.NewFile(fd, nil)
	if err != nil {
		t.Fatal(err)
	}
	files := new(protoregistry.Files)
	if err := files.RegisterFile(f); err != nil {
		t.Fatal(err)
	}
	return files
}

// A method's idempotency_level makes it idempotent: NO_SIDE_EFFECTS and
// IDEMPOTENT do, IDEMPOTENCY_UNKNOWN and unknown methods do not.
func TestDeclaredIdempotent(t *testing.T) {
	files := idempotencyFiles(t)
	for m, want := range map[string]bool{
		"/authz.v1.Authz/Check":   true,
		"/authz.v1.Authz/Put":     true,
		"/authz.v1.Authz/Append":  false,
		"/authz.v1.Authz/Missing": false,
		"/authz.v1.Req/Check":     false, // a message, not a service
		checkM:                    false,
	} {
		if got := declaredIdempotent(files, m); got != want {
			t.Errorf("declaredIdempotent(%q) = %v; want %v", m, got, want)
		}
	}
	c := newClient(registry(t, nil), []Option{withFiles(files)})
	if !c.method("/authz.v1.Authz/Check").idempotent || c.method("/authz.v1.Authz/Append").idempotent {
		t.Error("the client's methods do not follow their idempotency_level")
	}
}

// With a hedge configured, an idempotent method is hedged, the hedge
// decoding into a reply of its own that the caller then gets; a method
// that is not idempotent is never sent twice.
func TestUnaryHedgeOnlyIdempotent(t *testing.T) {
	for _, idempotent := range []bool{true, false} {
		name := "not idempotent"
		if idempotent {
			name = "idempotent"
		}
		t.Run(name, func(t *testing.T) {
			reg := registry(t, func(c *resilience.Config) {
				c.Hedges = map[string]resilience.HedgingConfig{healthKey: {Delay: 20 * time.Millisecond}}
			})
			slow := 300 * time.Millisecond
			h := newHealth(step{delay: slow}, step{})
			var opts []Option
			if idempotent {
				opts = append(opts, WithIdempotent(checkM))
			}
			c := healthClient(t, bufnet, h, reg, opts...)
			reply, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{})
			if err != nil || reply.GetStatus() != healthpb.HealthCheckResponse_SERVING {
				t.Fatalf("Check = %v, %v; want SERVING", reply, err)
			}
			want := int32(1)
			if idempotent {
				want = 2
			}
			if got := h.hits.Load(); got != want {
				t.Fatalf("calls that reached the server = %d; want %d", got, want)
			}
		})
	}
}

// copyReply and newReply work for replies that are not proto messages too.
func TestReplyCopies(t *testing.T) {
	type plain struct{ N int }
	c := &unaryCall{reply: &plain{N: 1}}
	src := c.newReply().(*plain)
	src.N = 7
	copyReply(c.reply, src)
	if c.reply.(*plain).N != 7 {
		t.Fatalf("copyReply: %d; want 7", c.reply.(*plain).N)
	}
	if (&unaryCall{reply: plain{}}).newReply() != nil {
		t.Fatal("newReply of a non-pointer: want nil")
	}
	pm := &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_NOT_SERVING}
	pc := &unaryCall{reply: pm, replyType: pm.ProtoReflect().Type()}
	if _, ok := pc.newReply().(*healthpb.HealthCheckResponse); !ok {
		t.Fatal("newReply of a proto: not its type")
	}
	copyReply(pm, &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING})
	if pm.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("copyReply of a proto: %v", pm)
	}
}

// TestUnaryNotIdempotentSentTwiceWhenFirstDelayed: with a hedge and chaos
// latency before some attempts, a hedge could reach the method before the
// round's first attempt, be taken for it and be sent; and the first,
// taken for a hedge, ended the call with "not hedged". A method that is
// not idempotent runs in a pipeline that never hedges: each call reaches
// the server once and ends with its status.
func TestUnaryNotIdempotentSentTwiceWhenFirstDelayed(t *testing.T) {
	reg := registry(t, func(c *resilience.Config) {
		c.ChaosEnabled = true
		c.Chaos = map[string]resilience.ChaosConfig{healthKey: {LatencyRate: 0.5, Latency: 40 * time.Millisecond}}
		c.Hedges = map[string]resilience.HedgingConfig{healthKey: {Delay: 5 * time.Millisecond}}
		c.Retry.MaxAttempts = 1
		c.CircuitBreakers[healthKey] = resilience.CircuitBreakerConfig{FailMax: 1000, OpenTimeout: time.Minute}
	})
	h := newHealth(step{code: codes.Unavailable})
	c := healthClient(t, bufnet, h, reg) // Check is not idempotent
	const calls = 40
	for range calls {
		_, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{})
		if status.Code(err) != codes.Unavailable || strings.Contains(err.Error(), "not hedged") {
			t.Errorf("err = %v; want the server's UNAVAILABLE", err)
		}
	}
	if got := h.hits.Load(); got != calls {
		t.Errorf("server hits = %d for %d calls; want %d: a method that is not idempotent was sent twice", got, calls, calls)
	}
}
