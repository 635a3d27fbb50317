package resiliencegrpc

import (
	"context"
	"errors"
	"reflect"
	"sync/atomic"

	"github.com/resilience-go/resilience"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// client is what both client interceptors share: the registry, the
// options, and per method its pipelines.
type client struct {
	reg     *resilience.Registry
	cfg     clientConfig
	methods methodCache[method]
}

func newClient(reg *resilience.Registry, opts []Option) *client {
	if reg == nil {
		reg = resilience.Default()
	}
	c := &client{reg: reg, cfg: clientConfig{files: protoregistry.GlobalFiles}}
	for _, o := range opts {
		if o == nil {
			c.cfg.fail("Option", "nil", "must not be nil")
			continue
		}
		o(&c.cfg)
	}
	return c
}

// method is one method's pipelines, built on its first call.
type method struct {
	full       string
	service    string
	idempotent bool
	err        error // a malformed method name
	unary      resilience.Func[result]
	stream     resilience.Func[result]
}

// result is an attempt's outcome that the pipeline sees as a success: the
// answer, or a status that is neither retried nor counted, which goes back
// to the caller as it came.
type result struct {
	reply any   // the reply the answer was decoded into
	err   error // a neutral status, or io.EOF for a stream that ended empty
}

func (c *client) method(full string) *method {
	return c.methods.get(full, func() *method {
		m := &method{full: full, service: c.cfg.service}
		if m.service == "" {
			s, ok := serviceOf(full)
			if !ok {
				m.err = invalid("method", full, "want a full method name, /package.Service/Method, or WithService")
				return m
			}
			m.service = s
		}
		m.idempotent = c.cfg.idempotent[full]
		if !m.idempotent {
			if _, ok := serviceOf(full); ok {
				m.idempotent = declaredIdempotent(c.cfg.files, full)
			}
		}
		// ForService hedges when the service has a hedge; a hedge of a
		// method that is not idempotent is refused by the attempt.
		m.unary = resilience.ForService(c.reg, m.service, m.attemptUnary)
		m.stream = resilience.ForStream(c.reg, m.service, m.attemptStream)
		return m
	})
}

// UnaryClientInterceptor returns an interceptor that runs every unary call
// through reg's pipeline for its service, the one [resilience.ForService]
// runs: its breaker, the retry policy, its rate limits, its per-attempt
// timeout (the attempt's deadline, sent to the server) and its bulkhead,
// configured by the registry's variables (CIRCUIT_BREAKER_<SERVICE>_*,
// RETRY_*, TIMEOUT_<SERVICE>, BULKHEAD_<SERVICE>_*) and recorded in its
// metrics under the service's name. The service is the gRPC service of the
// method ("openfga.v1.OpenFGAService" for
// "/openfga.v1.OpenFGAService/Check", whose variables read
// OPENFGA_V1_OPENFGASERVICE as resilience.EnvKey says) unless WithService
// names one. A nil reg means resilience.Default().
//
// Status codes. UNAVAILABLE, RESOURCE_EXHAUSTED and ABORTED count against
// the breaker and are retried. DEADLINE_EXCEEDED counts and is retried only
// when the attempt's own timeout expired, and CANCELED never does: the
// caller's own deadline or cancellation is never counted, and one the
// server reports of its own is passed on as it is. INTERNAL and UNKNOWN
// count, and are retried for idempotent methods only ([WithIdempotent], or
// the method's idempotency_level). DATA_LOSS counts and is not retried.
// The others (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
// PERMISSION_DENIED, UNAUTHENTICATED, FAILED_PRECONDITION, OUT_OF_RANGE,
// UNIMPLEMENTED) are answers, not illness: neither retried nor counted, the
// pipeline sees a success and the caller gets the status. The policies'
// hooks (RetryIf, OnRetry, IsFailure) see a failing attempt's error, whose
// code status.Code reads.
//
// Pushback. The trailer grpc-retry-pushback-ms is honoured as gRFC A6
// says: a non-negative value is the wait before the next attempt, exactly,
// for a status that is retried, and one longer than the retry's MaxDelay
// ends the retries; a negative or malformed value stops the retries.
//
// Errors. A call that failed with one attempt's status gets that status as
// the server sent it. When the policies decided (a rejection, a timeout of
// the library, retries that ran out) the call gets an [*Error]: the last
// attempt's status if there was one, else UNAVAILABLE with the library's
// error as details, and errors.Is matches the library's sentinels through
// it.
//
// Hedging. With HEDGE_<SERVICE>_DELAY set, calls of idempotent methods are
// hedged, each copy decoding into a reply of its own; hedges of other
// methods are not sent. Leave grpc-go's own retry policy (the service
// config's retryPolicy) off for these calls, or each of its attempts is
// retried here too.
//
// A configuration error (see the options) is reported by every call, as an
// *Error with status INTERNAL that matches resilience.ErrInvalidConfig.
// The interceptor is safe for concurrent use.
func UnaryClientInterceptor(reg *resilience.Registry, opts ...Option) grpc.UnaryClientInterceptor {
	c := newClient(reg, opts)
	return func(ctx context.Context, full string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if c.cfg.err != nil {
			return c.cfg.err
		}
		m := c.method(full)
		if m.err != nil {
			return m.err
		}
		call := &unaryCall{Context: ctx, m: m, req: req, reply: reply, cc: cc, invoker: invoker, opts: opts}
		if m.idempotent {
			if pm, ok := reply.(proto.Message); ok {
				// Read here, before any attempt decodes into the reply,
				// for the hedges to make theirs.
				call.replyType = pm.ProtoReflect().Type()
			}
		}
		res, err := m.unary(call)
		if err != nil {
			return callerError(m.service, err)
		}
		if res.reply != nil && res.reply != reply {
			copyReply(reply, res.reply)
		}
		return res.err
	}
}

type callKey struct{}

// unaryCall is one unary call, and the context its pipeline runs with, so
// that the method's attempt, built once, finds the call's arguments
// without a context.WithValue of its own.
type unaryCall struct {
	context.Context
	m          *method
	req, reply any
	cc         *grpc.ClientConn
	invoker    grpc.UnaryInvoker
	opts       []grpc.CallOption
	replyType  protoreflect.MessageType // the reply's, for hedges: nil if not a proto
	inFlight   atomic.Int32             // attempts running: more than one is a hedge
	// The first attempt's trailer and options, and so every attempt's
	// but a hedge's: one allocation per call, the call's own.
	trailer metadata.MD
	optBuf  [4]grpc.CallOption
}

// Value finds the call; other keys go to the caller's context, which keeps
// the context package's cheap propagation of cancellation.
func (c *unaryCall) Value(key any) any {
	if key == (callKey{}) {
		return c
	}
	return c.Context.Value(key)
}

// errNotHedged is a refused hedge of a method that is not idempotent.
var errNotHedged = resilience.Permanent(errors.New("resiliencegrpc: not hedged: the method is not idempotent"))

var errNoCall = errors.New("resiliencegrpc: an attempt's context does not carry its call")

func (m *method) attemptUnary(ctx context.Context) (result, error) {
	c, _ := ctx.Value(callKey{}).(*unaryCall)
	if c == nil {
		return result{}, errNoCall // unreachable: every call passes its own
	}
	reply := c.reply
	if c.inFlight.Add(1) > 1 {
		// A hedge beside an attempt still running: sent only if the
		// method may be sent twice, and decoded into a reply of its own.
		if reply = c.newReply(); reply == nil || !m.idempotent {
			c.inFlight.Add(-1)
			return result{}, errNotHedged
		}
	}
	defer c.inFlight.Add(-1)
	// The caller's options and one for the trailer: never an append into
	// the caller's array, which hedges would share.
	trailer, opts := &c.trailer, c.optBuf[:0]
	if reply != c.reply {
		trailer, opts = new(metadata.MD), nil // a hedge, beside the first attempt
	}
	*trailer = nil
	opts = append(append(opts, c.opts...), grpc.TrailerCallOption{TrailerAddr: trailer})
	err := c.invoker(ctx, m.full, c.req, reply, c.cc, opts...)
	if err == nil {
		return result{reply: reply}, nil
	}
	perr, neutral := judge(ctx, err, *trailer, m.idempotent)
	if neutral {
		return result{reply: reply, err: err}, nil
	}
	return result{}, perr
}

// newReply returns an empty reply of the call's reply type, or nil if it
// cannot. It reads the type, never the reply, which another attempt may be
// writing.
func (c *unaryCall) newReply() any {
	if c.replyType != nil {
		return c.replyType.New().Interface()
	}
	if t := reflect.TypeOf(c.reply); t != nil && t.Kind() == reflect.Pointer {
		return reflect.New(t.Elem()).Interface()
	}
	return nil
}

// copyReply makes dst, the caller's reply, the hedge's reply src.
func copyReply(dst, src any) {
	if pd, ok := dst.(proto.Message); ok {
		proto.Reset(pd)
		proto.Merge(pd, src.(proto.Message))
		return
	}
	reflect.ValueOf(dst).Elem().Set(reflect.ValueOf(src).Elem())
}

// ctxStatus is the status of a context error, for a stream whose attempt
// context ended.
func ctxStatus(err error) error { return status.FromContextError(err).Err() }
