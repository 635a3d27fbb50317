// Package resilience keeps a service standing when what it calls falls over.
//
// A protected call is a [Func]: a func(ctx) (T, error) goes in, a protected
// function of the same shape comes out. Five patterns wrap it, each a generic
// wrapper around a non-generic policy value that is built once, shared, and
// safe for concurrent use:
//
//   - [WithCircuitBreaker] over a [*CircuitBreaker] (on sony/gobreaker v2),
//   - [WithRetry] over a [*Retry] (backoff from cenkalti/backoff v4),
//   - [WithTimeout] and [WithEnforcedTimeout],
//   - [WithBulkhead] over a [*Bulkhead],
//   - [WithFallback] with a [Fallback], [FailOpen], [FailClosed],
//     [EmptyOnError] and a [FallbackCache] for cached and stale values.
//
// One policy serves wrappers of any result type: one breaker per downstream
// service is shared by its string- and int-returning calls alike.
//
// Around them: a [Registry] of named policies configured from environment
// variables ([LoadConfig], [ForService], [Default]), a [Transport] that
// protects every request of an http.Client, a [RetryBudget] that caps
// retries at a share of calls, an [AdminHandler] for operators, and one
// OpenTelemetry meter recording every outcome ([SetMeterProvider]).
//
// # Composition order
//
// [Compose] stacks the patterns, outermost first:
//
//	fallback(breaker(retry(timeout(bulkhead(fn)))))
//
// Every entry point, [Compose], the With... wrappers, [ForService] and
// [Transport], runs this one pipeline, built once per stack, per registry
// service and per Transport service, and adapts only its own types at the
// edge; hand-nested wrappers are recorded once, by the outermost.
//
// This is the original design's order (breaker, then retry, then timeout,
// then bulkhead) with the fallback moved from the innermost position to the
// outermost. The reasons:
//
//   - The fallback is the last resort "if all else fails". Placed innermost it
//     would turn every failure into a success and hide it from the retry and
//     the breaker, so neither would ever act.
//   - The breaker sits outside the retry, so it counts one failure per call
//     whose retries were exhausted, not one per attempt, and an open breaker
//     rejects a call before any attempt or backoff wait is spent on it.
//   - The timeout sits inside the retry, so each attempt gets the full
//     timeout; a per-attempt [ErrTimeout] is retryable.
//   - The bulkhead sits inside the timeout, so time spent waiting for a slot
//     counts toward the attempt's timeout, and a slot is held only while an
//     attempt runs, never across a backoff wait.
//
// # Errors
//
// Policies report their own decisions with the sentinels [ErrCircuitOpen],
// [ErrBulkheadFull], [ErrTimeout], [ErrRetryExhausted],
// [ErrRetryBudgetExhausted] and [ErrStale], wrapped in the one structured
// error [*Error], which carries the policy's name, the attempt count, the
// underlying cause and the downstream's retry hint ([Error.RetryAfter]). Match with [errors.Is] and
// [errors.As]. [ErrTimeout] also matches [context.DeadlineExceeded]. Invalid
// configuration is reported by the constructors with an error that matches
// [ErrInvalidConfig] and names the field and its value; nothing panics on bad
// configuration.
//
// # Cancellation
//
// The caller's own cancellation or deadline is never blamed on the
// downstream: the breaker counts it neither as success nor failure, the retry
// stops at once (with an [*Error] that matches the context's error and keeps
// the last attempt's), and the fallback passes it back rather than hiding it.
package resilience

import (
	"context"
	"errors"
	"io"
	"net"
	"net/url"
	"strconv"
	"syscall"
	"time"

	"github.com/cenkalti/backoff/v4"
)

// Func is the shape of every protected call: it takes the caller's context
// and returns a result or an error. Every wrapper in this package takes a
// Func and returns a Func of the same type.
type Func[T any] func(ctx context.Context) (T, error)

// The sentinel errors. Policies return them wrapped in an [*Error]; match
// them with [errors.Is].
var (
	// ErrCircuitOpen reports a call rejected by an open circuit breaker, or
	// by a half-open one whose probe slots are all taken. It is not
	// retryable.
	ErrCircuitOpen = errors.New("circuit breaker is open")

	// ErrBulkheadFull reports a call rejected by a bulkhead: no slot was free
	// and the bulkhead fails fast, its queue was full, or its MaxWait passed.
	// It is retryable.
	ErrBulkheadFull = errors.New("bulkhead is full")

	// ErrRateLimited reports a call a rate limiter refused: its permits
	// were not free and it fails fast, they would not be free within
	// MaxWait or the context's deadline, or more were asked than a burst
	// holds. It is retryable; the *Error's RetryAfter says when the
	// permits would be free.
	ErrRateLimited = errors.New("rate limited")

	// ErrTimeout reports that a timeout set by this package expired. It also
	// matches [context.DeadlineExceeded], and, unlike the caller's own
	// deadline, it is retryable.
	ErrTimeout error = timeoutError{}

	// ErrRetryExhausted reports that every attempt a [Retry] allowed failed
	// with a retryable error. The [*Error] that wraps it also matches the
	// last attempt's error and holds the attempt count.
	ErrRetryExhausted = errors.New("retries exhausted")

	// ErrStale reports that a [FallbackCache] served a value older than a
	// fresh one, alongside the value itself.
	ErrStale = errors.New("stale value served")

	// ErrInvalidConfig is matched by every error a constructor returns for a
	// configuration it cannot accept.
	ErrInvalidConfig = errors.New("invalid configuration")
)

// timeoutError is the type of ErrTimeout. It is a distinct type so that it
// can match context.DeadlineExceeded and answer net.Error-style questions.
type timeoutError struct{}

func (timeoutError) Error() string   { return "timeout exceeded" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }

// Is makes ErrTimeout match context.DeadlineExceeded, so code that only
// knows the standard library still recognises a deadline.
func (timeoutError) Is(target error) bool { return target == context.DeadlineExceeded }

// Error is the structured error a policy returns when it, rather than the
// protected function, decided the outcome of a call. Err is always one of the
// package's sentinels, so errors.Is(err, ErrCircuitOpen) and the like work;
// errors.Is and errors.As also see Cause.
//
// Rejections by a breaker or a bulkhead return one preallocated *Error per
// policy, so that a rejection allocates nothing: treat an *Error as read-only.
type Error struct {
	// Err is the sentinel: ErrCircuitOpen, ErrBulkheadFull, ErrTimeout,
	// ErrRetryExhausted, ErrRetryBudgetExhausted or ErrStale; or the
	// context's error (context.Canceled, context.DeadlineExceeded) when the
	// caller gave up while a retry waited, with the last attempt's error
	// as Cause.
	Err error
	// Name is the name of the breaker or bulkhead that rejected the call,
	// if it has one.
	Name string
	// Attempts is the number of attempts made, for ErrRetryExhausted.
	Attempts int
	// Age is the age of the value served, for ErrStale.
	Age time.Duration
	// Cause is the underlying error: the last attempt's error, the error
	// the function returned at its deadline, or gobreaker's own error.
	Cause error

	cb      *CircuitBreaker // the breaker that rejected the call, for RetryAfter
	retryIn time.Duration   // ErrRateLimited: until the permits are free; < 0: never
}

// RetryAfter returns how long the downstream asked the caller to wait
// before it tries again, when the retries ended on an error that carried
// such a hint (an HTTP Retry-After, an error's own RetryAfter method), so
// that the caller can pass it on, as a 429 or 503 of its own would; a hint
// longer than the retry's MaxDelay ends the retries and is reported here.
// It is the hint of Cause, and a negative duration when there is none.
//
// For a call a circuit breaker rejected ([ErrCircuitOpen]) it is how long,
// as of the moment it is asked, until the breaker lets a probe through: 0
// when it is half-open, and negative when an operator holds it open. A
// service can pass it on as a Retry-After of its own.
func (e *Error) RetryAfter() time.Duration {
	if e.cb != nil {
		return e.cb.untilProbe()
	}
	if e.Err == ErrRateLimited {
		return e.retryIn
	}
	if e.Cause == nil {
		return -1
	}
	return hintOf(e.Cause)
}

// Error formats the sentinel, the policy's name and the cause on one line.
func (e *Error) Error() string {
	b := make([]byte, 0, 64)
	b = append(b, "resilience: "...)
	if e.Name != "" {
		b = strconv.AppendQuote(b, e.Name)
		b = append(b, ": "...)
	}
	if e.Err != nil {
		b = append(b, e.Err.Error()...)
	} else {
		b = append(b, "error"...)
	}
	if e.Attempts > 0 {
		b = append(b, " after "...)
		b = strconv.AppendInt(b, int64(e.Attempts), 10)
		b = append(b, " attempt"...)
		if e.Attempts > 1 {
			b = append(b, 's')
		}
	}
	if e.Age > 0 {
		b = append(b, " (age "...)
		b = append(b, e.Age.String()...)
		b = append(b, ')')
	}
	if e.Cause != nil {
		b = append(b, ": "...)
		b = append(b, e.Cause.Error()...)
	}
	return string(b)
}

// Is reports whether target is the sentinel (or something the sentinel
// matches, such as context.DeadlineExceeded for ErrTimeout). It allocates
// nothing, unlike an Unwrap() []error would on every errors.Is call.
func (e *Error) Is(target error) bool { return errors.Is(e.Err, target) }

// Unwrap returns the cause, so errors.Is and errors.As see through to it.
func (e *Error) Unwrap() error { return e.Cause }

// Permanent marks err as not worth retrying: [IsRetryable] says no to it and
// to anything that wraps it, and errors.Is still sees err through it.
// Permanent(nil) is nil. It is backoff's own PermanentError, so errors marked
// with backoff.Permanent are recognised too.
func Permanent(err error) error { return backoff.Permanent(err) }

// IsRetryable is the default retry classifier. In order, it says:
//
//   - no to nil;
//   - yes to ErrTimeout, a timeout set by this package for one attempt, even
//     though that also matches context.DeadlineExceeded;
//   - no to Permanent errors, ErrCircuitOpen, context.Canceled, the
//     caller's own context.DeadlineExceeded, ErrRetryExhausted (an inner
//     retry already gave up: retrying again would multiply the attempts)
//     and ErrStale (a value was served);
//   - yes to ErrBulkheadFull and ErrRateLimited;
//   - what the error says, if it has a Retryable() bool method;
//   - yes to refused, reset and aborted connections, broken pipes, EOF
//     and unexpected EOF (a connection closed before the answer), and
//     network timeouts; a *url.Error, as http.Client returns, is judged by
//     the error it wraps;
//   - what the error says, if it has a Temporary() bool method;
//   - yes to anything else: an error is worth retrying unless marked
//     Permanent, which is backoff's rule.
func IsRetryable(err error) bool {
	if err == nil {
		return false
	}
	// ErrTimeout first: it also matches context.DeadlineExceeded.
	if errors.Is(err, ErrTimeout) {
		return true
	}
	var perm *backoff.PermanentError
	if errors.As(err, &perm) {
		return false
	}
	if errors.Is(err, ErrCircuitOpen) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, ErrRetryExhausted) || errors.Is(err, ErrStale) {
		return false
	}
	if errors.Is(err, ErrBulkheadFull) || errors.Is(err, ErrRateLimited) {
		return true
	}
	var r interface{ Retryable() bool }
	if errors.As(err, &r) {
		return r.Retryable()
	}
	// Before Temporary(): syscall.ECONNREFUSED.Temporary() is false, yet a
	// refused connection is the textbook transient failure.
	if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return true
	}
	// *url.Error forwards Temporary() to its inner error and says false
	// when that has none: judge the inner error instead.
	var ue *url.Error
	if errors.As(err, &ue) && ue.Err != nil {
		return IsRetryable(ue.Err)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	var t interface{ Temporary() bool }
	if errors.As(err, &t) {
		return t.Temporary()
	}
	return true
}

// invalid builds a configuration error naming the field and its value.
func invalid(field string, value any, why string) error {
	return &configError{field: field, value: value, why: why}
}

type configError struct {
	field string
	value any
	why   string
}

func (e *configError) Error() string {
	return "resilience: invalid configuration: " + e.field + " = " + formatValue(e.value) + ": " + e.why
}

func (e *configError) Is(target error) bool { return target == ErrInvalidConfig }

func formatValue(v any) string {
	switch v := v.(type) {
	case string:
		return strconv.Quote(v)
	case int:
		return strconv.Itoa(v)
	case float64:
		return strconv.FormatFloat(v, 'g', -1, 64)
	case time.Duration:
		return v.String()
	case nil:
		return "nil"
	default:
		return "?"
	}
}

// failing returns a Func that reports err on every call. Wrappers use it for
// arguments they cannot work with (a nil policy, a negative duration): their
// signatures have no error result, and a panic or a silent pass-through would
// both be worse than an error at the first call.
func failing[T any](err error) Func[T] {
	return func(context.Context) (T, error) {
		var zero T
		return zero, err
	}
}
