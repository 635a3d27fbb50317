package resilience

import (
	"context"
	"sync/atomic"
	"time"
)

// The handoff of an attempt's slot to the caller, for Transport: the
// attempt ends when the response headers arrive, but the downstream is
// still at work while the body streams, so the body keeps the attempt's
// bulkhead slot until it is closed or read to its end. The attempt's
// timeout bounds the time to the headers; then the idle timeout bounds
// each wait for the body's next bytes, and the stream timeout, if any, the
// whole body: an LLM answer streamed for minutes is not cut by a 60s
// attempt timeout, and a stream that stalls is.

// onceHandoff is once for a pipeline whose attempts may keep their slot:
// the attempt's context is a *hold, which the attempt keeps with
// hold.keep. What is not kept is given back when the attempt returns or
// panics.
func (p *pipeline) onceHandoff(ctx context.Context, attempt attemptFunc, d time.Duration, bind *race) (err error, stop bool) {
	h := &hold{idle: d}
	if p.idle != nil {
		if v := time.Duration(p.idle.Load()); v > 0 {
			h.idle = v
		}
	}
	if p.stream != nil {
		h.stream = time.Duration(p.stream.Load())
	}
	h.Context, h.cancel = context.WithCancelCause(ctx)
	if bind != nil {
		bind.bindFirst(func() { h.cancel(context.Canceled) })
	}
	if sc, ok := ctx.(*seatCtx); ok && sc.s.r.p == p {
		// One of this pipeline's hedges (not a call made with another
		// pipeline's hedge context): its context lives as long as its
		// hold.
		sc.handed, h.after = true, sc.cancel
	}
	if d > 0 {
		h.start = time.Now()
		h.headers = time.AfterFunc(d, func() { h.cancel(ErrTimeout) })
	}
	defer h.settle()
	err, stop = unstop(p.slot(h, attempt, h))
	if h.headers != nil {
		h.headers.Stop()
	}
	if err != nil && d > 0 && context.Cause(ctx) == nil && context.Cause(h.Context) == ErrTimeout {
		p.site.timedOut(ctx, h.start, d)
		err = timedOut(err)
	}
	return err, stop
}

type holdKey struct{}

// hold is what one attempt of a handoff pipeline holds: its context and,
// with a bulkhead, its slot. It is the attempt's context too, so that the
// attempt finds it without a context.WithValue of its own.
type hold struct {
	context.Context // the attempt's
	cancel          context.CancelCauseFunc
	b               *Bulkhead // nil: no slot
	grel            func()
	kept            bool // set by the attempt, in the attempt's goroutine
	start           time.Time
	headers         *time.Timer // the attempt's timeout, until keep
	idle, stream    time.Duration
	idleTimer       *time.Timer // the body's idle timeout
	streamTimer     *time.Timer // the body's stream timeout
	done            atomic.Bool
	after           context.CancelFunc // a hedge's context, ended with the hold
}

// Value makes the hold findable from the attempt's context and what is
// derived from it; other keys go to the attempt's context, which keeps
// the context package's own lookups (and so its cheap propagation of
// cancellation) working through a hold.
func (h *hold) Value(key any) any {
	if key == (holdKey{}) {
		return h
	}
	return h.Context.Value(key)
}

// holdFrom returns the hold of the attempt whose context is ctx.
func holdFrom(ctx context.Context) *hold {
	h, _ := ctx.Value(holdKey{}).(*hold)
	return h
}

// keep hands the attempt's slot to the caller, who gives it back with
// release. The headers have arrived: the attempt's timeout stops, and the
// idle and stream timeouts start, so that a caller who stops reading, or
// never closes the body, holds the slot no longer than they allow. A
// time.AfterFunc costs less than a context.AfterFunc, which would also
// register with the context.
func (h *hold) keep() {
	h.kept = true
	if h.headers != nil {
		h.headers.Stop()
	}
	if h.idle > 0 {
		h.idleTimer = time.AfterFunc(h.idle, h.expire)
	}
	if h.stream > 0 {
		h.streamTimer = time.AfterFunc(h.stream, h.expire)
	}
}

// touch restarts the idle timeout: the body's next bytes arrived.
func (h *hold) touch() {
	if h.idleTimer != nil && !h.done.Load() {
		h.idleTimer.Reset(h.idle)
	}
}

// expire ends a kept body whose idle or stream timeout passed: its reads
// fail with ErrTimeout, and its slot is given back.
func (h *hold) expire() { h.free(ErrTimeout) }

// expired reports whether the body was cut by its idle or stream timeout.
func (h *hold) expired() bool { return context.Cause(h.Context) == ErrTimeout }

// release gives back what keep kept. It may be called more than once.
func (h *hold) release() {
	if h.idleTimer != nil {
		h.idleTimer.Stop()
	}
	if h.streamTimer != nil {
		h.streamTimer.Stop()
	}
	h.free(nil)
}

// settle gives back what the attempt did not keep.
func (h *hold) settle() {
	if !h.kept {
		h.free(nil)
	}
}

// free gives the slot and the context back, once, the context ended with
// cause. The slot first: whoever the context's end wakes (a body's
// reader, a stream's RecvMsg, which then returns to its caller) finds the
// slot back already, whichever goroutine freed it.
func (h *hold) free(cause error) {
	if !h.done.CompareAndSwap(false, true) {
		return
	}
	if h.b != nil {
		h.grel()
		h.b.release()
	}
	h.cancel(cause)
	if h.after != nil {
		h.after()
	}
}
