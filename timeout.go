package resilience

import (
	"context"
	"errors"
	"sync/atomic"
	"time"
)

// WithTimeout returns fn bounded by d, cooperatively: fn runs with a context
// whose deadline is d from the call and whose cause ([context.Cause]) is
// [ErrTimeout], and it is up to fn to return when that context is done, as
// net/http and database/sql do.
//
// If the deadline passes and fn fails, the error matches both [ErrTimeout]
// and [context.DeadlineExceeded] (and fn's own error). If the caller's
// context was done first, fn's error comes back as it was and does not match
// ErrTimeout, so neither a retry nor a breaker blames the downstream for the
// caller's own deadline. A success that arrives late is still a success.
//
// A d that is not positive yields a function that reports
// [ErrInvalidConfig].
func WithTimeout[T any](fn Func[T], d time.Duration) Func[T] {
	if err := checkTimeout("WithTimeout", fn == nil, d); err != nil {
		return failing[T](err)
	}
	return newEdge(&pipeline{timeout: fixedTimeout(d)}, "", "", fn, nil, 0)
}

// startOf returns when tctx, derived from ctx with timeout d, was made:
// its deadline less d, so that the start of an attempt costs no clock read.
// When ctx's own deadline came first, tctx's deadline is ctx's, and the
// clock is read after all.
func startOf(ctx, tctx context.Context, d time.Duration) time.Time {
	dl, ok := tctx.Deadline()
	if pdl, pok := ctx.Deadline(); !ok || (pok && pdl.Equal(dl)) {
		return time.Now()
	}
	return dl.Add(-d)
}

// ownTimeout reports whether tctx expired through its own deadline rather
// than through the caller's ctx.
func ownTimeout(ctx, tctx context.Context) bool {
	return tctx.Err() != nil && context.Cause(ctx) == nil && context.Cause(tctx) == ErrTimeout
}

func timedOut(err error) error {
	var e *Error
	if errors.As(err, &e) && e.Err == ErrTimeout {
		return err
	}
	return &Error{Err: ErrTimeout, Cause: err}
}

func checkTimeout(name string, nilFn bool, d time.Duration) error {
	if nilFn {
		return invalid(name+" fn", nil, "must not be nil")
	}
	if d <= 0 {
		return invalid(name+" d", d, "must be positive")
	}
	return nil
}

// WithEnforcedTimeout returns fn bounded by d, and returns to the caller at
// the deadline even if fn ignores its context. fn runs in its own goroutine
// with the same context WithTimeout would give it; at the deadline the caller
// gets an error matching [ErrTimeout] and [context.DeadlineExceeded], and
// fn's eventual result is dropped (safely, without a data race) and counted
// as abandoned in the metrics. Whatever fn holds, such as a bulkhead slot
// inside it, stays held until fn really returns.
//
// A panic in fn is re-raised in the caller's goroutine if the caller is still
// waiting; once the call is abandoned there is no caller left to receive it,
// so it is recovered, dropped and counted.
//
// Enforcement costs a goroutine and a channel per call; prefer WithTimeout
// for functions that honour their context.
func WithEnforcedTimeout[T any](fn Func[T], d time.Duration) Func[T] {
	if err := checkTimeout("WithEnforcedTimeout", fn == nil, d); err != nil {
		return failing[T](err)
	}
	return newEdge(&pipeline{timeout: fixedTimeout(d), enforce: true}, "", "", fn, nil, 0)
}

// enforced runs one attempt of an enforcing pipeline: it waits for the
// bulkhead slot here, so that a wait cut short by the deadline is the
// bulkhead's rejection as in every other pipeline, then runs fn in a
// goroutine of its own, which gives the slot back when fn really returns,
// so that the caller can return when ctx, the attempt's context, is done.
// The result is handed over by a channel and written to the caller's
// variables only by the caller, so an abandoned attempt's late result is
// dropped without a data race.
func enforced[T any](ctx context.Context, p *pipeline, fn Func[T]) (T, error) {
	type result struct {
		v        T
		err      error
		panicked bool
		panicVal any
	}
	b, grel, err := p.take(ctx)
	if err != nil {
		var zero T
		return zero, err
	}
	if p.hedged {
		if s, _ := ctx.Value(hedgeKey{}).(*hedgeSeat); s != nil && s.r.p == p {
			s.sent(ctx) // a hedge in its slot
		}
	}
	ch := make(chan result, 1)
	// state decides, once, whether the result is handed over (1) or the
	// caller left (2): a result nobody will read is dropped, closed if it
	// is a Closer, rather than left in the channel.
	var state atomic.Int32
	go func() {
		returned := false
		defer func() {
			give(b, grel)
			if !returned {
				// A panic or runtime.Goexit: tell the caller either way.
				ch <- result{panicked: true, panicVal: recover()}
			}
		}()
		var r result
		var start time.Duration
		a := (*adaptive)(nil)
		if b != nil {
			if a = b.adapt.Load(); a != nil {
				start = monotonic()
			}
		}
		if r.err = p.injectChaos(ctx); r.err == nil {
			r.v, r.err = fn(ctx)
		}
		returned = true
		if a != nil {
			b.observe(a, start, isOverload(r.err) || (r.err != nil && context.Cause(ctx) == ErrTimeout))
		}
		if !state.CompareAndSwap(0, 1) {
			if r.err == nil {
				drop(r.v)
			}
			return
		}
		ch <- r
	}()
	var r result
	select {
	case r = <-ch:
	case <-ctx.Done():
		if state.CompareAndSwap(0, 2) {
			meter().timeoutAbandoned.Add(ctx, 1, p.site.function...)
			var zero T
			return zero, ctx.Err()
		}
		r = <-ch // finished at the same moment: keep the result
	}
	if r.panicked {
		if r.panicVal == nil {
			var zero T
			return zero, errGoexit
		}
		panic(r.panicVal)
	}
	return r.v, r.err
}

var errGoexit = errors.New("resilience: protected function called runtime.Goexit")

const defaultTimeout = 30 * time.Second

// TimeoutFor returns the timeout for an operation type from the default
// registry ([Default]), case-insensitively: TIMEOUT_<OP> if set, else the
// original design's defaults, "llm" 60s, "auth" 5s, "db" 10s, "http" 15s,
// and TIMEOUT_DEFAULT (30s) for anything else.
func TimeoutFor(operation string) time.Duration {
	return Default().Timeout(operation)
}

// TimeoutContext returns a context with the operation type's deadline from
// [TimeoutFor], whose cause is [ErrTimeout]: the original design's
// TimeoutContext, for code that calls several things under one budget.
// Call cancel when done, as with [context.WithTimeout].
func TimeoutContext(ctx context.Context, operation string) (context.Context, context.CancelFunc) {
	return context.WithTimeoutCause(ctx, TimeoutFor(operation), ErrTimeout)
}
