package resiliencegrpc

import (
	"context"
	"errors"
	"reflect"
	"sync/atomic"

	"github.com/resilience-go/resilience"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
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
	reply any          // the reply the answer was decoded into
	err   error        // a neutral status, or io.EOF for a stream that ended empty
	meta  *attemptMeta // a unary attempt's header, trailer and peer
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
		// ForService hedges when the service has a hedge: a method that
		// is not idempotent gets the same pipeline without it, so that
		// it is never sent twice at once.
		if m.idempotent {
			m.unary = resilience.ForService(c.reg, m.service, m.attemptUnary)
		} else {
			m.unary = resilience.ForServiceNoHedge(c.reg, m.service, m.attemptUnary)
		}
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
// UNIMPLEMENTED) are answers, not illness: not retried, and the pipeline
// sees a success, which the breaker counts as one (it ends a run of
// consecutive failures and is a call of its window), as it does a
// Transport's 4xx or an error IsFailure says is not a failure; the caller
// gets the status. The policies' hooks (RetryIf, OnRetry, IsFailure) see a
// failing attempt's error, whose code status.Code reads. A RetryIf cannot
// have INTERNAL or UNKNOWN of a method that is not idempotent sent again,
// nor a call whose pushback says not to retry: those attempts' errors are
// resilience.Permanent, and no attempt follows them.
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
// hedged, each copy decoding into a reply of its own, and the caller's
// grpc.Header, grpc.Trailer and grpc.Peer get the answering attempt's;
// other methods run in the service's pipeline without its hedge
// ([resilience.ForServiceNoHedge]) and are never sent twice at once. Leave grpc-go's own retry policy (the service
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
		call := &unaryCall{Context: c.cfg.keyed(ctx, full), m: m, req: req, reply: reply, cc: cc, invoker: invoker, opts: opts}
		call.scanOptions()
		if m.idempotent {
			if pm, ok := reply.(proto.Message); ok {
				// Read here, before any attempt decodes into the reply,
				// for the hedges to make theirs.
				call.replyType = pm.ProtoReflect().Type()
			}
		}
		res, err := m.unary(call)
		if call.metaOpts {
			// The answering attempt's, or the last to end's: never a
			// hedge that lost and ended later.
			meta := res.meta
			if err != nil || meta == nil {
				meta = call.last.Load()
			}
			call.giveMeta(meta)
		}
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
	// The first attempt's metadata and options, and so every attempt's
	// but a hedge's: one allocation per call, the call's own.
	meta   attemptMeta
	optBuf [4]grpc.CallOption
	// The caller's grpc.Header, grpc.Trailer and grpc.Peer, given the
	// answering attempt's after the call rather than every attempt's.
	metaOpts bool
	header   *metadata.MD
	trailer  *metadata.MD
	peer     *peer.Peer
	last     atomic.Pointer[attemptMeta]  // the last attempt to end
	final    atomic.Pointer[attemptError] // a status no attempt may follow
}

// attemptMeta is what one attempt's call options fill in.
type attemptMeta struct {
	header, trailer metadata.MD
	peer            peer.Peer
}

// scanOptions finds the caller's grpc.Header, grpc.Trailer and grpc.Peer,
// which each attempt replaces with its own.
func (c *unaryCall) scanOptions() {
	for _, o := range c.opts {
		switch o := o.(type) {
		case grpc.HeaderCallOption:
			c.header, c.metaOpts = o.HeaderAddr, true
		case grpc.TrailerCallOption:
			c.trailer, c.metaOpts = o.TrailerAddr, true
		case grpc.PeerCallOption:
			c.peer, c.metaOpts = o.PeerAddr, true
		}
	}
}

// giveMeta gives the caller an attempt's header, trailer and peer.
func (c *unaryCall) giveMeta(m *attemptMeta) {
	if m == nil {
		return
	}
	if c.header != nil {
		*c.header = m.header
	}
	if c.trailer != nil {
		*c.trailer = m.trailer
	}
	if c.peer != nil {
		*c.peer = m.peer
	}
}

// options returns the caller's options for an attempt, with its own
// header, trailer and peer in place of the caller's: never an append into
// the caller's array, which hedges would share.
func (c *unaryCall) options(m *attemptMeta, buf []grpc.CallOption) []grpc.CallOption {
	if !c.metaOpts {
		buf = append(buf, c.opts...)
	} else {
		for _, o := range c.opts {
			switch o.(type) {
			case grpc.HeaderCallOption, grpc.TrailerCallOption, grpc.PeerCallOption:
				continue
			}
			buf = append(buf, o)
		}
		if c.header != nil {
			buf = append(buf, grpc.HeaderCallOption{HeaderAddr: &m.header})
		}
		if c.peer != nil {
			buf = append(buf, grpc.PeerCallOption{PeerAddr: &m.peer})
		}
	}
	return append(buf, grpc.TrailerCallOption{TrailerAddr: &m.trailer})
}

// Value finds the call; other keys go to the caller's context, which keeps
// the context package's cheap propagation of cancellation.
func (c *unaryCall) Value(key any) any {
	if key == (callKey{}) {
		return c
	}
	return c.Context.Value(key)
}

// errNotHedged is a refused hedge whose reply cannot be made.
var errNotHedged = resilience.Permanent(errors.New("resiliencegrpc: not hedged: no reply of its own can be made"))

var errNoCall = errors.New("resiliencegrpc: an attempt's context does not carry its call")

func (m *method) attemptUnary(ctx context.Context) (result, error) {
	c, _ := ctx.Value(callKey{}).(*unaryCall)
	if c == nil {
		return result{}, errNoCall // unreachable: every call passes its own
	}
	if e := c.final.Load(); e != nil {
		// gRFC A6's pushback or the method's idempotency said not to
		// try again, whatever a RetryIf says: not sent.
		return result{}, resilience.Permanent(e)
	}
	reply := c.reply
	am := &c.meta
	if c.inFlight.Add(1) > 1 {
		// A hedge beside an attempt still running (only idempotent
		// methods are hedged): decoded into a reply of its own.
		if reply = c.newReply(); reply == nil {
			c.inFlight.Add(-1)
			return result{}, errNotHedged
		}
		am = new(attemptMeta)
	}
	defer c.inFlight.Add(-1)
	var buf []grpc.CallOption
	if am == &c.meta {
		buf = c.optBuf[:0]
	}
	*am = attemptMeta{}
	err := c.invoker(ctx, m.full, c.req, reply, c.cc, c.options(am, buf)...)
	if c.metaOpts {
		// A copy: a later attempt reuses c.meta.
		last := *am
		c.last.Store(&last)
	}
	if err == nil {
		return result{reply: reply, meta: am}, nil
	}
	perr, neutral := judge(ctx, err, am.trailer, m.idempotent)
	if neutral {
		return result{reply: reply, err: err, meta: am}, nil
	}
	if ae := finalOf(perr); ae != nil {
		c.final.Store(ae)
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
