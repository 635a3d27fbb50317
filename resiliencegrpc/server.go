package resiliencegrpc

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/resilience-go/resilience"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// UnaryServerInterceptor returns an interceptor that guards a server's
// unary handlers with b, as resilience.Shed guards an http.Handler: each
// call runs holding one of b's slots, and a call that cannot get one is
// shed at once with RESOURCE_EXHAUSTED, a grpc-retry-pushback-ms trailer
// and an errdetails.RetryInfo saying when to try again ([WithPushback]),
// rather than queued until its deadline, so that an overloaded server
// answers fast and keeps serving what it admitted. [WithPriority] ranks
// calls: lower priorities are shed first, and the highest never; the
// health service (grpc.health.v1.Health) is never shed, whatever
// WithPriority says. A call whose client goes away
// while it waits leaves the queue with CANCELED or DEADLINE_EXCEEDED. With
// an adaptive bulkhead (BULKHEAD_<R>_ADAPTIVE), the limit follows the
// handlers' latency. Shed calls are counted in resilience.shed.rejections
// by resource_type (b's name) and priority, as Shed's are.
//
// A nil b, or a configuration error of the options, is reported by every
// call, as an *Error with status INTERNAL that matches
// resilience.ErrInvalidConfig. The interceptor is safe for concurrent use.
func UnaryServerInterceptor(b *resilience.Bulkhead, opts ...ServerOption) grpc.UnaryServerInterceptor {
	cfg := serverConfig{priority: defaultPriority, pushback: time.Second}
	for _, o := range opts {
		if o == nil {
			if cfg.err == nil {
				cfg.err = invalid("ServerOption", "nil", "must not be nil")
			}
			continue
		}
		o(&cfg)
	}
	if b == nil && cfg.err == nil {
		cfg.err = invalid("UnaryServerInterceptor b", "nil", "must not be nil")
	}
	if cfg.err != nil {
		err := cfg.err
		return func(context.Context, any, *grpc.UnaryServerInfo, grpc.UnaryHandler) (any, error) { return nil, err }
	}
	ms := cfg.pushback.Milliseconds()
	if cfg.pushback%time.Millisecond != 0 {
		ms++ // rounded up: a client that comes back early is shed again
	}
	trailer := metadata.Pairs(PushbackKey, strconv.FormatInt(ms, 10))
	st := status.New(codes.ResourceExhausted, "resiliencegrpc: "+strconv.Quote(b.Name())+": overloaded, the call was shed")
	if ds, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(cfg.pushback)}); err == nil {
		st = ds
	}
	shed := st.Err() // read-only, shared by every shed call
	prio := cfg.priority
	if user := prio; cfg.user {
		prio = func(ctx context.Context, fullMethod string) int {
			if isHealth(fullMethod) {
				// Whatever WithPriority says: an overloaded server
				// must not also be taken for a dead one.
				return resilience.PriorityHighest
			}
			return user(ctx, fullMethod)
		}
	}
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		release, err := b.Admit(ctx, prio(ctx, info.FullMethod))
		if err != nil {
			if errors.Is(err, resilience.ErrBulkheadFull) {
				_ = grpc.SetTrailer(ctx, trailer) // fails only outside a server call
				return nil, shed
			}
			return nil, status.FromContextError(err).Err()
		}
		defer release() // on every path, a panicking handler's included
		return handler(ctx, req)
	}
}
