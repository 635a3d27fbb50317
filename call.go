package resilience

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/metric"
)

// This file is the one call pipeline. Every entry point (Compose, the
// With... wrappers, ForService, Transport) builds a pipeline once and runs
// each call through it, adapting its own types at the edge: the pipeline
// runs attempts of the shape func(ctx) error, and the edge keeps the typed
// result in its closure and turns its own failure signals (an HTTP status,
// a gRPC code) into errors the pipeline classifies. A policy added here
// works for every entry point at once. The order, outermost first:
//
//	record(fallback(total timeout(breaker(retry(hedge(rate limit(timeout(bulkhead(chaos(attempt))))))))))
//
// The fallback is generic and applied by the edge (fallback.go); the
// recording of resilience.calls is done once per outermost call (edge.go).

// attemptFunc is one try of the protected function. The pipeline never
// lets it escape, so an edge's closure over its typed result stays on the
// caller's stack.
type attemptFunc = func(ctx context.Context) error

// pipeline is the chain of policies of one protected call site. It is built
// once and is safe for concurrent use; every policy is optional.
type pipeline struct {
	site    *site
	sw      *atomic.Bool // a registry's on/off switch; nil means always on
	cb      *CircuitBreaker
	retry   *Retry
	limiter *RateLimiter // one permit per attempt
	// limitCell, if not nil, holds the limiter instead: a registry's,
	// which a Reload may add or remove.
	limitCell *atomic.Pointer[RateLimiter]
	// tokenLimiter, if not nil, takes tokens(ctx) permits per attempt.
	tokenLimiter *RateLimiter
	tokens       func(ctx context.Context) int
	// pause, if not nil, holds when a provider's spent window resets
	// (unix ns; 0: none): a registry service's, set by Transport.
	pause    *atomic.Int64
	timeout  *atomic.Int64 // per attempt, in nanoseconds; nil or <= 0: none
	total    *atomic.Int64 // the whole call, in nanoseconds; nil or <= 0: none
	idle     *atomic.Int64 // a handed-off body's idle timeout; nil or <= 0: the attempt's
	stream   *atomic.Int64 // a handed-off body's stream timeout; nil or <= 0: none
	bulkhead *Bulkhead
	// hedge, if not nil, sends hedged attempts; hedgeCell, if not nil,
	// holds it instead: a registry's, which a Reload may add or remove.
	// hedged is set with either: the edge then runs calls through a race
	// (hedge_race.go).
	hedge     *Hedge
	hedgeCell *atomic.Pointer[Hedge]
	hedged    bool

	// enforce makes the edge run each attempt, bulkhead slot included, in
	// a goroutine of its own that the timeout can abandon (timeout.go).
	enforce bool
	// handoff lets an attempt keep its slot and timeout after it returns,
	// as Transport does for a response body still being read.
	handoff bool
	// chaos, if not nil, holds the fault injection of each attempt
	// (chaos.go), innermost; nil in the cell while none runs.
	chaos *chaosCell

	rejected []metric.AddOption // resilience.bulkhead.rejections attributes

	// A registry's pipeline: its service's set, what eviction knows of
	// its policies (the set's, or a key's), and its entry point.
	set  *svcSet
	use  *usage
	kind pipeKind
	// base is the service's pipeline a keyed one was made from.
	base *pipeline
}

// on reports whether the pipeline's policies act: a disabled registry's
// entry points call straight through.
func (p *pipeline) on() bool { return p.sw == nil || p.sw.Load() }

// setSite gives the pipeline its metric identity.
func (p *pipeline) setSite(s *site) {
	p.site = s
	if p.bulkhead != nil {
		p.rejected = addSet(attrResourceType.String(p.bulkhead.name), attrFunction.String(s.name))
	}
}

// leave counts a call entered by Registry.current or regRef.current out
// of a registry pipeline's policies: its key's and its service's.
func (p *pipeline) leave() {
	p.use.leave()
	if p.base != nil {
		p.set.leave()
	}
}

// fixedTimeout returns a timeout cell holding d.
func fixedTimeout(d time.Duration) *atomic.Int64 {
	c := new(atomic.Int64)
	c.Store(int64(d))
	return c
}

// run runs one call through the breaker, the retry, the per-attempt
// timeout and the bulkhead. between, if not nil, is called after a failed
// attempt that is about to be retried, before the wait: an edge gives back
// what that attempt still holds (Transport's response body).
func (p *pipeline) run(ctx context.Context, attempt attemptFunc, between func()) error {
	if p.total != nil {
		if d := time.Duration(p.total.Load()); d > 0 {
			return p.runTotal(ctx, d, attempt, between)
		}
	}
	return p.guarded(ctx, ctx, attempt, between)
}

// runTotal runs the call within its total timeout d: attempts, waits for
// permits and between attempts included. The call ends with an error
// matching ErrTimeout, keeping the last attempt's error, when d runs out.
func (p *pipeline) runTotal(ctx context.Context, d time.Duration, attempt attemptFunc, between func()) error {
	tctx, cancel := context.WithTimeoutCause(ctx, d, ErrTimeout)
	err := p.guarded(ctx, tctx, attempt, between)
	var se *StatusError
	if p.handoff && (err == nil || errors.As(err, &se)) {
		// A response is handed back, its body read after the call
		// returns: the total deadline bounds it too, and its timer ends
		// the context.
		_ = cancel
	} else {
		cancel()
	}
	if err != nil && ctx.Err() == nil && !errors.Is(err, ErrTimeout) {
		var e *Error
		dl, _ := tctx.Deadline()
		switch {
		case ownTimeout(ctx, tctx):
			err = &Error{Err: ErrTimeout, Cause: err}
		case errors.As(err, &e) && e.Err == ErrRateLimited && e.retryIn >= 0 && !time.Now().Add(e.retryIn).Before(dl):
			// A wait for permits the call's time would not cover.
			err = &Error{Err: ErrTimeout, Cause: err}
		}
	}
	return err
}

// guarded runs a call through the breaker and what is inside it. outer is
// the caller's context, which decides whether the caller gave up; ctx
// carries the total timeout, if any.
func (p *pipeline) guarded(outer, ctx context.Context, attempt attemptFunc, between func()) error {
	cb := p.cb
	var forced int32 // the service's breaker's mode, for a key's call
	if p.base != nil {
		if forced = p.base.cb.mode.Load(); forced != 0 {
			// An operator's ForceOpen or ForceClose of the service's
			// breaker holds for its keys too. Read once: a Reset
			// meanwhile must not have the key's call counted by it.
			cb = p.base.cb
		}
	}
	if cb == nil {
		return p.retried(ctx, attempt, between)
	}
	var err, o error
	r := cb.rule.Load()
	var began, ended time.Duration // of the successful attempt, for a slow-call trigger
	// reached: an attempt got past the bulkhead, so the call's outcome is
	// the downstream's even if a later attempt found the bulkhead full.
	// Without a retry there is one attempt, and a local rejection
	// (ErrBulkheadFull, ErrRateLimited) is never the downstream's: reached
	// matters only between attempts.
	// Atomic: hedged attempts run in goroutines of their own.
	var reached atomic.Bool
	var admitted time.Duration
	if r.slow > 0 || p.retry != nil {
		inner := attempt
		attempt = func(ctx context.Context) error {
			var b time.Duration
			if r.slow > 0 {
				// Timed inside the bulkhead: a wait for a slot or
				// between attempts is local, not the downstream's
				// slowness.
				b = monotonic()
			}
			err := inner(ctx)
			if err == nil {
				// Only the winner of a hedged round returns nil.
				reached.Store(true)
				if r.slow > 0 {
					began, ended = b, monotonic()
				}
			} else if !reached.Load() && !errors.Is(err, ErrBulkheadFull) {
				// An enforced attempt takes its slot itself, and says
				// so by its error when it got none.
				reached.Store(true)
			}
			return err
		}
	}
	run := func(counted bool) error {
		if r.slow > 0 {
			admitted = monotonic() // the bucket gobreaker counts the call in
		}
		err = p.retried(ctx, attempt, between)
		if p.hedged && !reached.Load() && p.hedgeNow() != nil {
			// Hedges run the edge's attempt, not the wrapper above.
			if s, _ := ctx.Value(hedgeKey{}).(*hedgeSeat); s != nil && s.r.p == p && s.r.reached.Load() {
				reached.Store(true)
			}
		}
		o = cb.outcome(outer, err, reached.Load())
		if counted && o == errFailure {
			// Before gobreaker counts it: an open it causes lasts as
			// long as the downstream asked.
			cb.noteHint(err)
		}
		return o
	}
	var counted bool
	var rej error
	if forced != 0 {
		counted, rej = cb.guardForced(forced, run)
	} else {
		counted, rej = cb.guard(ctx, r, run)
	}
	if rej != nil {
		traceBreakerRejected(ctx, cb, rej)
		return rej
	}
	if counted {
		switch o {
		case nil:
			cb.counts.successes.Add(1)
			if ended-began > r.slow && ended != 0 {
				cb.slowCall(ctx, r, admitted, ended)
			}
		case errFailure:
			cb.recordFailure(ctx, errorType(err))
		}
	}
	return err
}

// retried runs the attempts the retry policy allows. A first attempt that
// succeeds costs a nil check: no backoff state is built for it.
func (p *pipeline) retried(ctx context.Context, attempt attemptFunc, between func()) error {
	rt := p.retry
	if rt == nil {
		err, _ := p.try(ctx, attempt)
		return err
	}
	r := rt.params()
	if r.budget != nil {
		r.budget.deposit()
	}
	err, stop := p.try(ctx, attempt)
	if err == nil || stop || !rt.on() {
		return err
	}
	return p.retryAfterFailure(ctx, attempt, between, r, err)
}

// retryAfterFailure runs the attempts after a failed first one. It is kept
// out of retried so that the success path stays small.
func (p *pipeline) retryAfterFailure(ctx context.Context, attempt attemptFunc, between func(), r *retryParams, err error) error {
	in := meter()
	var bo *delays
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for n := 1; ; n++ {
		if !r.retryable(err) {
			return err
		}
		hint := hintOf(err)
		if ctx.Err() != nil {
			return &Error{Err: ctxErr(ctx), Attempts: n, Cause: err}
		}
		if n >= r.maxAttempts || hint > r.max {
			// A hint longer than MaxDelay ends the retries: retrying
			// before the server asked only earns another refusal.
			in.retryExhausted.Add(ctx, 1, p.site.function...)
			return &Error{Err: ErrRetryExhausted, Attempts: n, Cause: err}
		}
		if r.budget != nil && !r.budget.withdraw() {
			in.retryBudgetExhausted.Add(ctx, 1, p.site.function...)
			return &Error{Err: ErrRetryBudgetExhausted, Attempts: n, Cause: err}
		}
		et := errorType(err)
		p.site.retried(ctx, in, n, et)
		if bo == nil {
			bo = r.newBackOff()
		}
		// The strategy advances whether or not a hint replaces its wait,
		// so that the nth retry's wait does not depend on earlier hints.
		delay := bo.next()
		if r.delay != nil {
			if d, ok := r.delay(n, err); ok {
				delay = min(max(d, 0), r.max)
			}
		}
		if hint >= 0 {
			delay = hint // no longer than MaxDelay: waited exactly
		}
		if p.total != nil && p.total.Load() > 0 {
			if dl, ok := ctx.Deadline(); ok && time.Now().Add(delay).After(dl) {
				// The call's time runs out during the wait: end it now
				// rather than wait for nothing.
				return &Error{Err: ErrTimeout, Attempts: n, Cause: err}
			}
		}
		if between != nil {
			between()
		}
		if r.onRetry != nil {
			r.onRetry(n, err, delay)
		}
		traceRetry(ctx, p.site.name, n, et, delay)
		if delay > 0 {
			if timer == nil {
				timer = time.NewTimer(delay)
			} else {
				timer.Reset(delay)
			}
			select {
			case <-ctx.Done():
				return &Error{Err: ctxErr(ctx), Attempts: n, Cause: err}
			case <-timer.C:
			}
		}
		var stop bool
		if err, stop = p.try(ctx, attempt); err == nil {
			in.retrySuccessAfter.Add(ctx, 1, p.site.function...)
			return nil
		}
		if stop {
			return err
		}
	}
}

// settleTokens charges the token limiter what a call used beyond its
// estimate, or gives back what it did not use.
func (p *pipeline) settleTokens(ctx context.Context, used int) {
	if p.tokenLimiter == nil {
		return
	}
	if d := used - p.tokens(ctx); d > 0 {
		p.tokenLimiter.Charge(d)
	} else {
		p.tokenLimiter.giveBack(-d)
	}
}

// ctxErr is ctx's error, or ErrTimeout when a timeout of this package (a
// total timeout) ended it.
func ctxErr(ctx context.Context) error {
	if context.Cause(ctx) == ErrTimeout {
		return ErrTimeout
	}
	return ctx.Err()
}

// hintOf returns the wait an error asks for through a RetryAfter()
// time.Duration method, or -1 when it asks for none.
func hintOf(err error) time.Duration {
	var ra interface{ RetryAfter() time.Duration }
	if errors.As(err, &ra) {
		if d := ra.RetryAfter(); d >= 0 {
			return d
		}
	}
	return -1
}

// stopRetry marks an attempt's error that must not be retried whatever the
// retry policy says: a request that cannot be replayed, or one that may
// have reached the server and is not idempotent. The pipeline strips it.
type stopRetry struct{ err error }

func (s *stopRetry) Error() string { return s.err.Error() }
func (s *stopRetry) Unwrap() error { return s.err }

// hedgeNow returns the pipeline's hedge, if it has one now.
func (p *pipeline) hedgeNow() *Hedge {
	if p.hedgeCell != nil {
		return p.hedgeCell.Load()
	}
	return p.hedge
}

// try runs one attempt of the retry policy: hedged, when the pipeline
// hedges and the call's context carries its race, else once.
func (p *pipeline) try(ctx context.Context, attempt attemptFunc) (error, bool) {
	if p.hedged {
		if h := p.hedgeNow(); h != nil && h.on() {
			s, _ := ctx.Value(hedgeKey{}).(*hedgeSeat)
			if s != nil && s.i == 0 && s.r.p == p && !s.r.inRound.Load() {
				return s.r.run(ctx, h, attempt)
			}
		}
	}
	return p.once(ctx, attempt, nil)
}

// once runs one attempt under the per-attempt timeout. stop reports an
// error the attempt marked as final. bind, if not nil, is the race whose
// round this attempt begins: it gets the attempt's cancel func, to stop it
// if a hedge wins.
func (p *pipeline) once(ctx context.Context, attempt attemptFunc, bind *race) (err error, stop bool) {
	l := p.limiter
	if p.limitCell != nil {
		l = p.limitCell.Load()
	}
	if bind != nil && (l != nil || p.tokenLimiter != nil || (p.pause != nil && p.pause.Load() != 0)) {
		// The first attempt of a hedged round may wait for permits: a
		// hedge that wins meanwhile must end the wait too, so the
		// attempt's own context starts here, and is the one bound.
		cctx, cancel := context.WithCancel(ctx)
		defer cancel()
		bind.bindFirst(cancel)
		ctx, bind = cctx, nil
	}
	if p.pause != nil {
		if err := waitPause(ctx, p.pause, p.site.name); err != nil {
			return err, false
		}
	}
	if l != nil {
		// Before the attempt's timeout starts: a wait for a permit is
		// the limiter's, not the downstream's.
		if err := l.Wait(ctx, 1); err != nil {
			return err, false
		}
	}
	if p.tokenLimiter != nil {
		if err := p.tokenLimiter.Wait(ctx, p.tokens(ctx)); err != nil {
			if l != nil {
				l.giveBack(1) // the request was not sent
			}
			return err, false
		}
	}
	var d time.Duration
	if p.timeout != nil {
		d = time.Duration(p.timeout.Load())
	}
	switch {
	case p.handoff:
		err, stop = p.onceHandoff(ctx, attempt, d, bind)
	case d <= 0 && bind == nil:
		err, stop = unstop(p.slot(ctx, attempt, nil))
	case d <= 0:
		cctx, cancel := context.WithCancel(ctx)
		defer cancel()
		bind.bindFirst(cancel)
		err, stop = unstop(p.slot(cctx, attempt, nil))
	default:
		tctx, cancel := context.WithTimeoutCause(ctx, d, ErrTimeout)
		defer cancel() // on every path: a panic must not leave the timer armed
		if bind != nil {
			bind.bindFirst(cancel)
		}
		if p.enforce {
			err, stop = unstop(attempt(tctx))
		} else {
			err, stop = unstop(p.slot(tctx, attempt, nil))
		}
		err = p.timedOut(ctx, tctx, d, err)
	}
	return err, stop
}

// timedOut marks err as the attempt's own timeout, and records it, when
// tctx, the attempt's context with timeout d, expired by its own deadline.
func (p *pipeline) timedOut(ctx, tctx context.Context, d time.Duration, err error) error {
	if err == nil || !ownTimeout(ctx, tctx) {
		return err
	}
	p.site.timedOut(ctx, startOf(ctx, tctx, d), d)
	return timedOut(err)
}

func unstop(err error) (error, bool) {
	if s, ok := err.(*stopRetry); ok {
		return s.err, true
	}
	return err, false
}

// slot runs attempt holding a bulkhead slot, if the pipeline has a
// bulkhead, and gives the slot back when attempt returns or panics, unless
// h is given: h then owns it.
func (p *pipeline) slot(ctx context.Context, attempt attemptFunc, h *hold) error {
	b, grel, err := p.take(ctx)
	if err != nil {
		return err
	}
	if b == nil {
		return p.invoke(ctx, attempt)
	}
	a := b.adapt.Load()
	if a == nil {
		if h != nil {
			h.b, h.grel = b, grel
			return p.invoke(ctx, attempt)
		}
		defer give(b, grel)
		return p.invoke(ctx, attempt)
	}
	// An adaptive bulkhead learns from the attempts' latency, to the
	// response headers for a handed-off body (from a share of them, when
	// it is busy), and from every attempt's overload.
	timed := a.timed()
	var start time.Duration
	if timed {
		start = monotonic()
	}
	if h != nil {
		h.b, h.grel = b, grel
	} else {
		defer give(b, grel)
	}
	err = p.invoke(ctx, attempt)
	// The attempt's own timeout says overload as ErrTimeout does: inside
	// the slot the attempt's error is still the context's.
	overload := isOverload(err) || (err != nil && context.Cause(ctx) == ErrTimeout)
	if timed {
		b.observe(a, start, overload)
	} else if overload {
		a.overloaded()
	}
	return err
}

// take waits for the pipeline's bulkhead slot, and its global one, as the
// bulkhead's settings allow. b is nil when no slot was taken: the pipeline
// has no bulkhead, or it is switched off.
func (p *pipeline) take(ctx context.Context) (b *Bulkhead, grel func(), err error) {
	b = p.bulkhead
	if b == nil || !b.on() {
		return nil, noop, nil
	}
	if err := b.acquire(ctx); err != nil {
		switch err {
		case errBypassed:
			return nil, noop, nil
		case b.errFull:
			meter().bhRejections.Add(ctx, 1, p.rejected...)
			traceBulkheadRejected(ctx, b.name)
		}
		return nil, noop, err
	}
	grel = noop
	gb := b
	if p.base != nil {
		// A key's bulkhead caps the key; the fleet's cap is the service's.
		gb = p.base.bulkhead
	}
	if gb.global.Load() != nil {
		g, err := gb.acquireGlobal(ctx)
		if err != nil {
			b.giveBack()
			if errors.Is(err, ErrBulkheadFull) {
				meter().bhRejections.Add(ctx, 1, p.rejected...)
				traceBulkheadRejected(ctx, b.name)
			}
			return nil, noop, err
		}
		grel = g
	}
	return b, grel, nil
}

// give gives back what take took.
func give(b *Bulkhead, grel func()) {
	if b != nil {
		grel()
		b.release()
	}
}
