package resiliencegrpc

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/resilience-go/resilience"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
)

// Option configures the client interceptors.
type Option func(*clientConfig)

type clientConfig struct {
	service    string
	key        func(ctx context.Context, fullMethod string) string
	idempotent map[string]bool
	files      *protoregistry.Files // where idempotency_level is looked up
	err        error
}

// WithService names the registry service of every call, instead of the
// gRPC service of each call's method: its breaker, bulkhead, timeouts and
// metric name. An empty name is an error every call reports.
func WithService(name string) Option {
	return func(c *clientConfig) {
		if name == "" {
			c.fail("WithService name", name, "must not be empty")
		}
		c.service = name
	}
}

// WithKey names each call's key within its service, as
// [resilience.WithKey] does: a tenant, a model. The call then runs through
// the breaker and the bulkhead of its (service, key), so that one tenant's
// failures open that tenant's breaker only; see resilience.WithKey for the
// bounds. f returns "" for a call without one, which keeps the key its
// context may already carry. A nil f is an error every call reports.
func WithKey(f func(ctx context.Context, fullMethod string) string) Option {
	return func(c *clientConfig) {
		if f == nil {
			c.fail("WithKey f", "nil", "must not be nil")
		}
		c.key = f
	}
}

// keyed returns ctx marked with the call's key, if WithKey names one.
func (c *clientConfig) keyed(ctx context.Context, full string) context.Context {
	if c.key != nil {
		if k := c.key(ctx, full); k != "" {
			return resilience.WithKey(ctx, k)
		}
	}
	return ctx
}

// WithIdempotent declares methods idempotent, by full name
// ("/openfga.v1.OpenFGAService/Check"): INTERNAL and UNKNOWN are retried
// for them, and they may be hedged (HEDGE_<SERVICE>_DELAY). A method whose
// proto declares option idempotency_level = NO_SIDE_EFFECTS or IDEMPOTENT,
// in a file registered with the global registry as generated code does, is
// idempotent without it. A name that is not a full method name is an error
// every call reports.
func WithIdempotent(fullMethods ...string) Option {
	return func(c *clientConfig) {
		for _, m := range fullMethods {
			if _, ok := serviceOf(m); !ok {
				c.fail("WithIdempotent method", m, "want a full method name, /package.Service/Method")
				continue
			}
			if c.idempotent == nil {
				c.idempotent = map[string]bool{}
			}
			c.idempotent[m] = true
		}
	}
}

// withFiles looks idempotency levels up in files instead of the global
// registry, for tests.
func withFiles(files *protoregistry.Files) Option {
	return func(c *clientConfig) { c.files = files }
}

func (c *clientConfig) fail(field, value, why string) {
	if c.err == nil {
		c.err = invalid(field, value, why)
	}
}

// invalid is a configuration error: an *Error with status INTERNAL that
// matches resilience.ErrInvalidConfig and names the field and its value.
func invalid(field, value, why string) error {
	msg := "resiliencegrpc: invalid configuration: " + field + " = \"" + value + "\": " + why
	return &Error{st: status.New(codes.Internal, msg), err: &configError{msg}}
}

type configError struct{ msg string }

func (e *configError) Error() string        { return e.msg }
func (e *configError) Is(target error) bool { return target == resilience.ErrInvalidConfig }

// serviceOf returns the service of a full method name: "pkg.Svc" of
// "/pkg.Svc/Method".
func serviceOf(fullMethod string) (string, bool) {
	if len(fullMethod) < 4 || fullMethod[0] != '/' {
		return "", false
	}
	i := strings.IndexByte(fullMethod[1:], '/') + 1
	if i <= 1 || i == len(fullMethod)-1 || strings.IndexByte(fullMethod[i+1:], '/') >= 0 {
		return "", false
	}
	return fullMethod[1:i], true
}

// declaredIdempotent reports whether the method's proto says it is
// idempotent (option idempotency_level).
func declaredIdempotent(files *protoregistry.Files, fullMethod string) bool {
	name := protoreflect.FullName(strings.Replace(fullMethod[1:], "/", ".", 1))
	d, err := files.FindDescriptorByName(name)
	if err != nil {
		return false
	}
	md, ok := d.(protoreflect.MethodDescriptor)
	if !ok {
		return false
	}
	opts, _ := md.Options().(*descriptorpb.MethodOptions)
	switch opts.GetIdempotencyLevel() {
	case descriptorpb.MethodOptions_NO_SIDE_EFFECTS, descriptorpb.MethodOptions_IDEMPOTENT:
		return true
	}
	return false
}

// ServerOption configures [UnaryServerInterceptor].
type ServerOption func(*serverConfig)

type serverConfig struct {
	priority func(ctx context.Context, fullMethod string) int
	user     bool // priority is WithPriority's
	pushback time.Duration
	err      error
}

// WithPriority ranks each inbound call, higher being more important, as
// resilience.ShedConfig.Priority does for HTTP: a call of priority 0 or
// below is shed at once when no slot is free; one above waits for a slot,
// the highest priority first, as long as the bulkhead's MaxWait and
// MaxQueue allow, a newcomer of higher priority shedding the lowest waiter
// when the queue is full; resilience.PriorityHighest is never shed. Keep
// its values to a few: each is a metric attribute. It must be safe for
// concurrent use. The health service (grpc.health.v1.Health) has
// PriorityHighest whatever f returns for it, so that an overloaded server
// is not also taken for a dead one; without WithPriority every other call
// has priority 0. A nil f is an error every call reports.
func WithPriority(f func(ctx context.Context, fullMethod string) int) ServerOption {
	return func(c *serverConfig) {
		if f == nil && c.err == nil {
			c.err = invalid("WithPriority f", "nil", "must not be nil")
		}
		c.priority, c.user = f, true
	}
}

// WithPushback sets the wait a shed call is told to leave before it tries
// again, in its grpc-retry-pushback-ms trailer and its errdetails.RetryInfo.
// The default is 1s. A negative d is an error every call reports.
func WithPushback(d time.Duration) ServerOption {
	return func(c *serverConfig) {
		if d < 0 && c.err == nil {
			c.err = invalid("WithPushback d", d.String(), "must not be negative")
		}
		c.pushback = d
	}
}

// defaultPriority is the priority of a call without WithPriority: health
// checks are never shed, so that an overloaded server is not also taken
// for a dead one.
func defaultPriority(_ context.Context, fullMethod string) int {
	if isHealth(fullMethod) {
		return resilience.PriorityHighest
	}
	return 0
}

// isHealth reports whether fullMethod is the health service's.
func isHealth(fullMethod string) bool {
	return strings.HasPrefix(fullMethod, "/grpc.health.v1.Health/")
}

// methodCache maps full method names to what the interceptor keeps for
// each. Generated code has a fixed set of methods, so it does not grow
// without bound.
type methodCache[M any] struct {
	m sync.Map // string -> *M
}

func (c *methodCache[M]) get(name string, build func() *M) *M {
	if v, ok := c.m.Load(name); ok {
		return v.(*M)
	}
	v, _ := c.m.LoadOrStore(name, build())
	return v.(*M)
}
