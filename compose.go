package resilience

import (
	"context"
	"time"
)

// Stack is the set of policies [Compose] stacks around a function. A zero
// field is skipped: a Stack with only a Retry is just WithRetry.
type Stack[T any] struct {
	// Name identifies the protected function in metrics: the name and
	// function attributes. Empty means the name of fn's code, such as
	// "main.(*Client).Generate-fm", computed once by Compose. Keep it to a
	// fixed set of values: it is a metric attribute.
	Name string
	// Operation is the operation type of the timeout metrics ("llm",
	// "auth"). Empty means "default".
	Operation string
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
	if fn == nil {
		return failing[T](invalid("Compose fn", nil, "must not be nil"))
	}
	name := s.Name
	if name == "" {
		name = funcName(fn)
	}
	st := newSite(name, s.Operation)
	f := fn
	if s.Bulkhead != nil {
		f = bulkheadLayer(f, s.Bulkhead, st)
	}
	if s.Timeout != 0 {
		if err := checkTimeout("Stack.Timeout", false, s.Timeout); err != nil {
			return failing[T](err)
		}
		if s.EnforceTimeout {
			f = enforcedLayer(f, s.Timeout, st)
		} else {
			inner, d := f, s.Timeout
			f = func(ctx context.Context) (T, error) { return callWithTimeout(ctx, inner, d, st) }
		}
	}
	if s.Retry != nil {
		f = retryLayer(f, s.Retry, st)
	}
	if s.CircuitBreaker != nil {
		f = breakerLayer(f, s.CircuitBreaker)
	}
	kind := fallbackFunction
	if s.Fallback != nil {
		kind = fallbackKind(s.Fallback)
	}
	return top(f, st, s.Fallback, kind)
}
