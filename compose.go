package resilience

import (
	"time"
)

// Stack is the set of policies [Compose] stacks around a function. A zero
// field is skipped: a Stack with only a Retry is just WithRetry.
type Stack[T any] struct {
	// CircuitBreaker, if set, rejects calls while its downstream is down.
	CircuitBreaker *CircuitBreaker
	// Retry, if set, retries failed attempts.
	Retry *Retry
	// Timeout, if positive, bounds each attempt. A negative Timeout is
	// reported as ErrInvalidConfig by every call.
	Timeout time.Duration
	// EnforceTimeout makes the timeout return at the deadline even if the
	// function ignores its context (WithEnforcedTimeout instead of
	// WithTimeout), at the cost of a goroutine per attempt.
	EnforceTimeout bool
	// Bulkhead, if set, caps the attempts running at once.
	Bulkhead *Bulkhead
	// Fallback, if set, answers calls that failed in the end.
	Fallback Fallback[T]
}

// Compose returns fn protected by the policies in s, in this order, outermost
// first:
//
//	fallback(breaker(retry(timeout(bulkhead(fn)))))
//
// So the breaker counts one failure per call whose retries were exhausted,
// each attempt gets the whole timeout, the wait for a bulkhead slot counts
// toward the attempt's timeout, and the fallback answers only what every
// other policy failed to save. The package documentation gives the reasons.
//
// The stack is built once, here; a call allocates nothing beyond what
// context.WithTimeout needs for the timeout, and gobreaker's admission.
func Compose[T any](fn Func[T], s Stack[T]) Func[T] {
	f := fn
	if s.Bulkhead != nil {
		f = WithBulkhead(f, s.Bulkhead)
	}
	if s.Timeout != 0 {
		if s.EnforceTimeout {
			f = WithEnforcedTimeout(f, s.Timeout)
		} else {
			f = WithTimeout(f, s.Timeout)
		}
	}
	if s.Retry != nil {
		f = WithRetry(f, s.Retry)
	}
	if s.CircuitBreaker != nil {
		f = WithCircuitBreaker(f, s.CircuitBreaker)
	}
	if s.Fallback != nil {
		f = WithFallback(f, s.Fallback)
	}
	if f == nil {
		return failing[T](invalid("Compose fn", nil, "must not be nil"))
	}
	return f
}
