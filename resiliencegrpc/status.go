package resiliencegrpc

import (
	"context"
	"errors"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/resilience-go/resilience"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// PushbackKey is the trailer a server sets to say when to retry a failed
// call, in milliseconds, as gRFC A6 defines it: a non-negative integer is
// the wait before the next attempt; a negative or malformed value, or more
// than one value, says not to retry at all.
const PushbackKey = "grpc-retry-pushback-ms"

// ErrorDomain is the Domain of the errdetails.ErrorInfo a rejection
// carries.
const ErrorDomain = "resilience-go.github.io"

// class is what a status code is to the policies.
type class uint8

const (
	// classNeutral is neither retried nor counted: the caller's mistake or
	// an answer, not the server's illness. The pipeline sees a success, and
	// the caller gets the status.
	classNeutral    class = iota
	classRetry            // counted and retried
	classIdempotent       // counted, retried for idempotent methods only
	classCounted          // counted, not retried
	classContext          // the attempt's context ended: the pipeline decides whose
)

func classOf(c codes.Code) class {
	switch c {
	case codes.Unavailable, codes.ResourceExhausted, codes.Aborted:
		return classRetry
	case codes.Internal, codes.Unknown:
		return classIdempotent
	case codes.DeadlineExceeded, codes.Canceled:
		return classContext
	case codes.DataLoss:
		return classCounted
	}
	// InvalidArgument, NotFound, AlreadyExists, PermissionDenied,
	// Unauthenticated, FailedPrecondition, OutOfRange, Unimplemented.
	return classNeutral
}

// attemptError is a failed attempt's status as the policies see it: what
// RetryIf, OnRetry and IsFailure are given. It unwraps to the status error
// the call returned, so status.Code reads its code.
type attemptError struct {
	err       error
	retryable bool
	// final: gRFC A6's pushback or the method's idempotency says not to
	// try again, which a RetryIf cannot override.
	final bool
	hint  time.Duration // from the pushback trailer; < 0: none
}

// finalOf returns the attempt's error if it is final, else nil.
func finalOf(err error) *attemptError {
	var ae *attemptError
	if errors.As(err, &ae) && ae.final {
		return ae
	}
	return nil
}

func (e *attemptError) Error() string { return e.err.Error() }

// Unwrap returns the call's own status error.
func (e *attemptError) Unwrap() error { return e.err }

// Retryable reports whether the status is worth another attempt, for
// resilience.IsRetryable.
func (e *attemptError) Retryable() bool { return e.retryable }

// RetryAfter is the server's pushback, or negative when it sent none.
func (e *attemptError) RetryAfter() time.Duration { return e.hint }

// ErrorType names the status for the metrics' error.type, as Transport's
// "http_503" names a status: "grpc_unavailable", "grpc_resource_exhausted".
func (e *attemptError) ErrorType() string {
	var b strings.Builder
	b.WriteString("grpc_")
	for i, r := range status.Code(e.err).String() { // "ResourceExhausted"
		if unicode.IsUpper(r) {
			if i > 0 {
				b.WriteByte('_')
			}
			r = unicode.ToLower(r)
		}
		b.WriteRune(r)
	}
	return b.String()
}

// judge says what an attempt's error is to the policies: nil with neutral
// set when the pipeline must see a success (the status goes back to the
// caller as it is), else the error the pipeline classifies.
func judge(ctx context.Context, err error, trailer metadata.MD, idempotent bool) (perr error, neutral bool) {
	retryable := false
	switch classOf(status.Code(err)) {
	case classNeutral:
		return nil, true
	case classContext:
		if ctx.Err() == nil {
			dl, ok := ctx.Deadline()
			if !ok || time.Now().Before(dl) {
				// The server's own deadline or cancellation (a
				// downstream of its own timed out): not this attempt's
				// timeout, which alone is counted and retried.
				return nil, true
			}
			// The deadline passed, and the server, which was sent it,
			// said so first: the context's timer is about to end it,
			// and the pipeline must see whose deadline it was.
			<-ctx.Done()
		}
		// The attempt's timeout, which the pipeline makes an ErrTimeout
		// (retried, counted), or the caller's (neither).
		return &attemptError{err: err, hint: -1}, false
	case classRetry:
		retryable = true
	case classIdempotent:
		retryable = idempotent
	}
	e := &attemptError{err: err, retryable: retryable, hint: -1}
	// Not sent again whatever a RetryIf says: the server might have done
	// the work of a method that is not idempotent.
	e.final = classOf(status.Code(err)) == classIdempotent && !idempotent
	if vs := trailer.Get(PushbackKey); len(vs) > 0 {
		d, ok := -time.Duration(1), false
		if len(vs) == 1 {
			d, ok = parsePushback(vs[0])
		}
		if !ok {
			// gRFC A6: the server says not to retry.
			e.retryable, e.final = false, true
		} else if retryable {
			e.hint = d
		}
	}
	if e.final {
		// Permanent, for a RetryIf that asks resilience.IsRetryable; the
		// attempts that follow are refused (see finalOf).
		return resilience.Permanent(e), false
	}
	return e, false
}

// parsePushback parses a grpc-retry-pushback-ms value, as gRFC A6 defines
// it: ok is false for a negative or malformed value, which says not to
// retry; a value beyond the largest Duration is that Duration.
func parsePushback(v string) (d time.Duration, ok bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	for i := 0; i < len(v); i++ {
		if v[i] < '0' || v[i] > '9' {
			return 0, false // a sign, a fraction, anything else
		}
	}
	ms, err := strconv.ParseInt(v, 10, 64)
	if err != nil || ms > math.MaxInt64/int64(time.Millisecond) {
		// Digits only, so too large: waited as long as can be said.
		return math.MaxInt64, true
	}
	return time.Duration(ms) * time.Millisecond, true
}

// Error is what the client interceptors return when the policies decided
// the outcome of a call, rather than a single answer of the server: a
// rejection (an open breaker, a full bulkhead, a rate limit, a spent retry
// budget), a timeout of this library, or retries that ran out. It is a
// gRPC status, through GRPCStatus, so that status.Code and
// status.FromError read it, and it unwraps to the library's
// [*resilience.Error], so that errors.Is(err, resilience.ErrCircuitOpen)
// and the like match.
//
// When retries ran out on a failing status, the status is the last
// attempt's, as the server sent it. A rejection is UNAVAILABLE (a timeout
// of this library DEADLINE_EXCEEDED, the caller's own cancellation or
// deadline CANCELED or DEADLINE_EXCEEDED) with two details: an
// errdetails.ErrorInfo whose Domain is [ErrorDomain] and whose Reason
// names the sentinel (CIRCUIT_OPEN, BULKHEAD_FULL, RATE_LIMITED,
// RETRY_BUDGET_EXHAUSTED, RETRY_EXHAUSTED, TIMEOUT), with the service and
// the policy's name as metadata; and an errdetails.RetryInfo when the
// library's error says when to retry ([resilience.Error.RetryAfter]).
//
// An Error is not modified once made: any goroutine may read it.
type Error struct {
	st  *status.Status
	err error
}

// GRPCStatus returns the call's status.
func (e *Error) GRPCStatus() *status.Status { return e.st }

// Unwrap returns the library's error.
func (e *Error) Unwrap() error { return e.err }

// Error formats the code and the library's error as gRPC formats a status:
// "rpc error: code = Unavailable desc = resilience: ...".
func (e *Error) Error() string {
	return "rpc error: code = " + e.st.Code().String() + " desc = " + e.err.Error()
}

// callerError turns the pipeline's error into what the interceptor
// returns.
func callerError(service string, err error) error {
	var re *resilience.Error
	var ae *attemptError
	hasAttempt := errors.As(err, &ae)
	if !errors.As(err, &re) {
		if hasAttempt {
			// One attempt's status, not retried: as the server sent it.
			return ae.err
		}
		return err
	}
	if hasAttempt {
		st := status.Convert(ae.err)
		if st.Code() == codes.Canceled && errors.Is(re, resilience.ErrTimeout) {
			// A stream's attempt is ended by cancelling its context when
			// its timeout expires: say which it was.
			st = status.New(codes.DeadlineExceeded, st.Message())
		}
		return &Error{st: st, err: err}
	}
	return &Error{st: rejection(service, re), err: err}
}

// rejection is the status of a call the policies ended without a status of
// the server's.
func rejection(service string, re *resilience.Error) *status.Status {
	code := codes.Unavailable
	var reason string
	switch {
	case errors.Is(re, resilience.ErrCircuitOpen):
		reason = "CIRCUIT_OPEN"
	case errors.Is(re, resilience.ErrBulkheadFull):
		reason = "BULKHEAD_FULL"
	case errors.Is(re, resilience.ErrRateLimited):
		reason = "RATE_LIMITED"
	case errors.Is(re, resilience.ErrRetryBudgetExhausted):
		reason = "RETRY_BUDGET_EXHAUSTED"
	case errors.Is(re, resilience.ErrTimeout):
		code, reason = codes.DeadlineExceeded, "TIMEOUT"
	case errors.Is(re, context.Canceled):
		return status.New(codes.Canceled, re.Error())
	case errors.Is(re, context.DeadlineExceeded):
		return status.New(codes.DeadlineExceeded, re.Error())
	case errors.Is(re, resilience.ErrRetryExhausted):
		reason = "RETRY_EXHAUSTED"
	default:
		reason = "REJECTED"
	}
	info := &errdetails.ErrorInfo{Reason: reason, Domain: ErrorDomain, Metadata: map[string]string{"service": service}}
	if re.Name != "" {
		info.Metadata["policy"] = re.Name
	}
	st := status.New(code, re.Error())
	if d := re.RetryAfter(); d >= 0 {
		if ds, err := st.WithDetails(info, &errdetails.RetryInfo{RetryDelay: durationpb.New(d)}); err == nil {
			return ds
		}
	}
	if ds, err := st.WithDetails(info); err == nil {
		return ds
	}
	return st
}
