package resilience

import (
	"context"
	"time"
)

// Stack is the set of policies [Compose] stacks around a function. A zero
// field is skipped: a Stack with only a Retry is just WithRetry.
type Stack[T any] struct {
	// Name identifies the protected function in metrics: the name and
	// function attributes. Keep it to a fixed set of values: it is a metric
	// attribute. Empty means, in order: the name of fn if it is a named
	// function or method (such as "main.(*Client).Generate-fm"), the name of
	// the protected function fn wraps, the name of the CircuitBreaker, the
	// name of the Bulkhead, and else "unnamed", with a warning in the log
	// once per process. A closure's compiler-generated name is never used:
	// it changes with inlining and is shared by unrelated stacks.
	Name string
	// Operation is the operation type of the timeout metrics ("llm",
	// "auth"). Empty means "default".
	Operation string
	// CircuitBreaker, if set, rejects calls while its downstream is down.
	CircuitBreaker *CircuitBreaker
	// Retry, if set, retries failed attempts.
	Retry *Retry
	// RateLimiter, if set, paces the attempts: each takes one permit
	// before it starts, outside its timeout. An open breaker spends none.
	RateLimiter *RateLimiter
	// TokenLimiter, if set with Tokens, takes Tokens(ctx) permits before
	// each attempt: the estimated cost of an LLM call. TokensUsed, if set,
	// reads the real cost from a successful result; the difference is
	// charged (later callers wait for the debt) or given back.
	TokenLimiter *RateLimiter
	Tokens       func(ctx context.Context) int
	TokensUsed   func(T) int
	// Timeout, if positive, bounds each attempt. A negative Timeout is
	// reported as ErrInvalidConfig by every call.
	Timeout time.Duration
	// TotalTimeout, if positive, bounds the whole call: its attempts, the
	// waits between them and the waits for permits. A wait that would end
	// after it is not started: the call ends at once with an *Error
	// matching ErrTimeout that keeps the last attempt's error. A negative
	// TotalTimeout is reported as ErrInvalidConfig by every call.
	TotalTimeout time.Duration
	// EnforceTimeout makes the timeout return at the deadline even if the
	// function ignores its context (WithEnforcedTimeout instead of
	// WithTimeout), at the cost of a goroutine per attempt.
	EnforceTimeout bool
	// Bulkhead, if set, caps the attempts running at once.
	Bulkhead *Bulkhead
	// Hedge, if set, sends another attempt beside one slow to answer, and
	// takes the first success: see [Hedge]. It sits inside the retry and
	// around the rate limits, the timeout and the bulkhead, so each hedged
	// attempt takes its own permit, timeout and slot.
	Hedge *Hedge
	// Check, if set, inspects each successful result: a non-nil error
	// makes it a failure that the retry, the hedge, the breaker and the
	// fallback see as they see an error: an empty completion, a refusal,
	// JSON that does not parse. It is retryable unless the error has a
	// Retryable() bool method that says otherwise, and its RetryAfter()
	// time.Duration method, if any, is honoured. Check runs in the
	// attempt's goroutine and must be safe for concurrent use with Hedge.
	Check func(T) error
	// Fallback, if set, answers calls that failed in the end.
	Fallback Fallback[T]
	// Chaos, if it injects anything, injects faults into each attempt,
	// innermost, inside the bulkhead slot and the timeout, so that every
	// policy above reacts as to a real fault: for rehearsals. An invalid
	// Chaos is reported as ErrInvalidConfig by every call.
	Chaos ChaosConfig
}

// Compose returns fn protected by the policies in s, in this order, outermost
// first:
//
//	fallback(total timeout(breaker(retry(hedge(rate limit(timeout(bulkhead(chaos(fn)))))))))
//
// So the breaker counts one failure per call whose retries were exhausted,
// each attempt gets the whole timeout, the wait for a bulkhead slot counts
// toward the attempt's timeout, and the fallback answers only what every
// other policy failed to save. The package documentation gives the reasons.
//
// The stack is built once, here, into the same pipeline that [ForService]
// and [Transport] run; a call allocates nothing beyond what
// context.WithTimeout needs for the timeout, and, with a Hedge, its race. A call is recorded once in
// resilience.calls, also when the result is wrapped again.
func Compose[T any](fn Func[T], s Stack[T]) Func[T] {
	if fn == nil {
		return failing[T](invalid("Compose fn", nil, "must not be nil"))
	}
	p := &pipeline{cb: s.CircuitBreaker, retry: s.Retry, limiter: s.RateLimiter, bulkhead: s.Bulkhead, hedge: s.Hedge, hedged: s.Hedge != nil}
	if s.Timeout != 0 {
		if err := checkTimeout("Stack.Timeout", false, s.Timeout); err != nil {
			return failing[T](err)
		}
		p.timeout = fixedTimeout(s.Timeout)
		p.enforce = s.EnforceTimeout
	}
	if s.TotalTimeout != 0 {
		if err := checkTimeout("Stack.TotalTimeout", false, s.TotalTimeout); err != nil {
			return failing[T](err)
		}
		p.total = fixedTimeout(s.TotalTimeout)
	}
	if err := s.Chaos.checkAs("Stack.Chaos"); err != nil {
		return failing[T](err)
	}
	if s.Chaos.on() {
		p.chaos = new(chaosCell)
		p.chaos.Store(newChaos(s.Chaos))
	}
	kind := fallbackFunction
	if s.Fallback != nil {
		kind = fallbackKind(s.Fallback)
	}
	var used func(T) int
	if s.TokenLimiter != nil {
		if s.Tokens == nil {
			return failing[T](invalid("Stack.Tokens", nil, "must be set with TokenLimiter"))
		}
		p.tokenLimiter, p.tokens = s.TokenLimiter, s.Tokens
		used = s.TokensUsed
	}
	return newEdgeUsed(p, s.Name, s.Operation, fn, s.Fallback, kind, used, s.Check)
}
