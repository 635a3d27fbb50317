package resilience

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// PriorityHighest is the priority of requests [Shed] never sheds: health
// checks, an operator's requests. They wait for the next free slot ahead
// of every other request, however long it takes, and so still count
// against the limit.
const PriorityHighest = math.MaxInt

// ShedConfig configures [Shed].
type ShedConfig struct {
	// Bulkhead caps the requests being served at once; fixed or adaptive
	// (BulkheadConfig.Adaptive). Required.
	Bulkhead *Bulkhead

	// Priority, if set, ranks each request: higher is more important.
	// Without it, a request that finds no free slot is shed at once.
	// With it, a request of priority 0 or below is shed at once too, and
	// one above 0 waits for a slot, the highest priority first, as long as
	// the bulkhead's MaxWait and MaxQueue allow: when the queue is full, a
	// newcomer of higher priority sheds the lowest waiting request in its
	// place. A request of PriorityHighest is never shed. So a request of
	// lower priority is always shed before any of higher priority waits.
	// Keep its values to a few: each is a metric attribute.
	Priority func(*http.Request) int

	// RetryAfter is the Retry-After a shed request is answered with,
	// rounded up to whole seconds. 0 means 1s.
	RetryAfter time.Duration
}

// Shed returns next guarded by cfg.Bulkhead: a service's protection of
// itself. Each inbound request runs holding one of the bulkhead's slots;
// one that cannot get a slot is answered at once with 503 Service
// Unavailable and Retry-After, rather than queued until it times out, so
// that an overloaded server answers fast and keeps serving what it
// admitted. A waiting request whose client goes away leaves the queue at
// once. With an adaptive bulkhead, the limit follows the handler's
// latency. Shed requests are counted in resilience.shed.rejections, by
// resource_type (the bulkhead's name) and priority.
//
// An invalid cfg yields a handler that answers every request with 500 and
// the configuration error, logged once. The handler is safe for concurrent
// use.
func Shed(next http.Handler, cfg ShedConfig) http.Handler {
	err := cfg.validate(next)
	if err != nil {
		slog.Error("resilience: Shed is misconfigured; answering every request with 500", "error", err.Error())
		return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, err.Error(), http.StatusInternalServerError)
		})
	}
	ra := cfg.RetryAfter
	if ra == 0 {
		ra = time.Second
	}
	secs := ra / time.Second
	if ra%time.Second != 0 {
		secs++ // rounded up, without overflowing near the largest Duration
	}
	return &shedHandler{
		next:       next,
		b:          cfg.Bulkhead,
		priority:   cfg.Priority,
		retryAfter: []string{strconv.FormatInt(int64(secs), 10)},
	}
}

func (cfg *ShedConfig) validate(next http.Handler) error {
	switch {
	case next == nil:
		return invalid("Shed next", nil, "must not be nil")
	case cfg.Bulkhead == nil:
		return invalid("ShedConfig.Bulkhead", nil, "must not be nil")
	case cfg.RetryAfter < 0:
		return invalid("ShedConfig.RetryAfter", cfg.RetryAfter, "must not be negative")
	}
	return nil
}

type shedHandler struct {
	next       http.Handler
	b          *Bulkhead
	priority   func(*http.Request) int
	retryAfter []string
	shed       optCache // resilience.shed.rejections attributes, by priority
}

func (h *shedHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b := h.b
	if !b.on() {
		h.next.ServeHTTP(w, r)
		return
	}
	prio := 0
	if h.priority != nil {
		prio = h.priority(r)
	}
	ctx := r.Context()
	if err := b.admit(ctx, prio); err != nil {
		switch {
		case err == errBypassed:
			// The registry was switched off while it waited: served
			// without a slot, as every later request is.
			h.next.ServeHTTP(w, r)
		case errors.Is(err, ErrBulkheadFull):
			h.reject(ctx, w, prio)
		}
		// Else the client went away while it waited: nobody to answer.
		return
	}
	grel, err := b.acquireGlobal(ctx)
	if err != nil {
		if errors.Is(b.refusedGlobal(ctx, err), ErrBulkheadFull) {
			h.reject(ctx, w, prio)
		}
		return
	}
	defer give(b, grel)
	if a := b.adapt.Load(); a != nil {
		start := monotonic()
		defer func() { b.observe(a, start, false) }()
	}
	h.next.ServeHTTP(w, r)
}

// reject answers a shed request.
func (h *shedHandler) reject(ctx context.Context, w http.ResponseWriter, prio int) {
	p := strconv.Itoa(prio)
	meter().shedRejections.Add(ctx, 1, h.shed.get(p, func() []attribute.KeyValue {
		return []attribute.KeyValue{attrResourceType.String(h.b.name), attribute.String("priority", p)}
	})...)
	w.Header()["Retry-After"] = h.retryAfter
	w.WriteHeader(http.StatusServiceUnavailable)
}

// Admit takes one of the bulkhead's slots for an inbound request of the
// given priority, by the rules of [Shed] (see ShedConfig.Priority), for a
// server that is not an http.Handler, such as a gRPC server interceptor:
// at once if a slot is free; else the request is shed at once at priority
// 0 or below, and one above waits, the highest priority first, as long as
// the bulkhead's MaxWait and MaxQueue allow; [PriorityHighest] is never
// shed. The bulkhead's global limit, if any, is taken too.
//
// On success, serve the request, then call release, once the request is
// served: it gives the slot back and, for an adaptive bulkhead, reports the
// request's latency. Calls of release after the first do nothing, and so
// does the release that comes with an error: defer release() is safe
// either way. A shed
// request gets an error matching [ErrBulkheadFull], counted in
// resilience.shed.rejections by resource_type and priority as Shed counts
// its own; a request whose ctx ended while it waited gets the context's
// error, and is not counted. While the bulkhead is switched off (its
// registry disabled), every request is admitted at once, without a slot.
//
// Admit is safe for concurrent use.
func (b *Bulkhead) Admit(ctx context.Context, priority int) (release func(), err error) {
	if !b.on() {
		return noop, nil
	}
	if err := b.admit(ctx, priority); err != nil {
		if err == errBypassed {
			return noop, nil
		}
		return noop, b.shed(ctx, priority, err)
	}
	grel, err := b.acquireGlobal(ctx)
	if err != nil {
		return noop, b.shed(ctx, priority, b.refusedGlobal(ctx, err))
	}
	a := b.adapt.Load()
	var start time.Duration
	if a != nil {
		start = monotonic()
	}
	var done atomic.Bool
	return func() {
		if !done.CompareAndSwap(false, true) {
			return
		}
		if a != nil {
			b.observe(a, start, false)
		}
		give(b, grel)
	}, nil
}

// shed counts a request Admit refused with err, when it was shed rather
// than left by its client, and returns err.
func (b *Bulkhead) shed(ctx context.Context, prio int, err error) error {
	if errors.Is(err, ErrBulkheadFull) {
		p := strconv.Itoa(prio)
		meter().shedRejections.Add(ctx, 1, metric.WithAttributes(attrResourceType.String(b.name), attribute.String("priority", p)))
	}
	return err
}

// refusedGlobal gives back the slot of a request whose global slot was
// refused with err, and says why it is not served: the context's error
// when the client went away, else an error matching ErrBulkheadFull, for
// a global limiter that failed some other way too. Shed and Admit share
// it; their paths to a slot are otherwise two calls each, kept apart so
// that Shed's stays as it was.
func (b *Bulkhead) refusedGlobal(ctx context.Context, err error) error {
	b.giveBack()
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	if !errors.Is(err, ErrBulkheadFull) {
		err = &Error{Err: ErrBulkheadFull, Name: b.name, Cause: err}
	}
	return err
}

// admit takes a slot for an inbound request of priority prio, by Shed's
// rules: at once if one is free; else shed at once at priority 0 or below;
// else wait, the highest priority first, displacing the lowest waiter when
// the queue is full; PriorityHighest never shed and never timed out. A
// FailFast bulkhead sheds every request but PriorityHighest at once.
func (b *Bulkhead) admit(ctx context.Context, prio int) error {
	b.mu.Lock()
	if b.takeFreeLocked() {
		b.mu.Unlock()
		return nil
	}
	top := prio == PriorityHighest
	if !top && (prio <= 0 || b.failFast) {
		b.rejected++
		b.mu.Unlock()
		return b.errFull
	}
	if err := ctx.Err(); err != nil {
		// Before displacing anyone: a client that left takes no place.
		b.mu.Unlock()
		return err
	}
	if !top && b.maxQueue > 0 && b.waiters.Len() >= b.maxQueue {
		back := b.waiters.Back()
		low := back.Value.(*waiter)
		if low.prio >= prio {
			b.rejected++
			b.mu.Unlock()
			return b.errFull
		}
		// The newcomer outranks the lowest waiter: shed that one.
		b.waiters.Remove(back)
		low.shed = true
		close(low.ready)
		b.rejected++
	}
	w := &waiter{ready: make(chan struct{}), prio: prio}
	elem := b.queueLocked(w)
	maxWait := b.maxWait
	if top {
		maxWait = 0
	}
	b.mu.Unlock()
	return b.wait(ctx, w, elem, maxWait, false)
}
