package resilience

import (
	"context"
	"errors"
	"reflect"
)

// errorType returns OpenTelemetry's error.type for err: a short name for
// this package's sentinels and the context errors, else the Go type of the
// first error in the chain that is not a plain wrapper. It is never the
// message, so its cardinality is bounded by the program's error types.
func errorType(err error) string {
	if e, ok := err.(*Error); ok {
		// The common case, a policy's own error: no chain to walk.
		switch e.Err {
		case ErrTimeout:
			return "timeout"
		case ErrCircuitOpen:
			return "circuit_open"
		case ErrBulkheadFull:
			return "bulkhead_full"
		case ErrRateLimited:
			return "rate_limited"
		}
	}
	if _, ok := err.(*chaosError); ok {
		return "chaos"
	}
	switch {
	case err == nil:
		return ""
	case errors.Is(err, ErrChaos):
		// Before the rest: an injected fault may be any error.
		return "chaos"
	case errors.Is(err, ErrTimeout):
		return "timeout"
	case errors.Is(err, ErrCircuitOpen):
		return "circuit_open"
	case errors.Is(err, ErrBulkheadFull):
		return "bulkhead_full"
	case errors.Is(err, ErrRateLimited):
		return "rate_limited"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, context.DeadlineExceeded):
		return "deadline_exceeded"
	}
	// Retries exhausted, stale: the type of what failed. A loop rather
	// than errors.As, whose target escapes and costs an allocation.
	for x := err; x != nil; x = errors.Unwrap(x) {
		switch x := x.(type) {
		case *StatusError:
			return x.errorType() // a failing HTTP status: "http_503"
		case *checkError:
			return "check" // a result Stack.Check or Transport.Check rejected
		case interface{ ErrorType() string }:
			// An error that names its own kind, as an adapter at the
			// edge does for its protocol's failures ("grpc_unavailable").
			if et := x.ErrorType(); et != "" {
				return et
			}
		}
	}
	for x := err; x != nil; x = errors.Unwrap(x) {
		if e, ok := x.(*Error); ok && e.Cause != nil {
			err = e.Cause
			break
		}
	}
	for {
		switch err.(type) {
		case interface{ Unwrap() error }:
			t := reflect.TypeOf(err).String()
			if t != "*fmt.wrapError" && t != "*backoff.PermanentError" {
				return t
			}
			if inner := errors.Unwrap(err); inner != nil {
				err = inner
				continue
			}
		}
		return reflect.TypeOf(err).String()
	}
}
