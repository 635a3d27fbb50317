package resilience

import (
	"container/list"
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// defaultBulkheadLimit is BulkheadConfig.Limit when it is 0.
const defaultBulkheadLimit = 10

// BulkheadConfig configures a [Bulkhead]. The zero value of each field means
// its documented default; the zero BulkheadConfig lets 10 calls in at once
// and makes others wait, in arrival order, for as long as their context
// allows.
type BulkheadConfig struct {
	// Name identifies the bulkhead in errors and metrics, usually after the
	// resource it guards ("llm", "redis").
	Name string

	// Limit is the number of calls allowed inside at once. 0 means 10.
	Limit int

	// MaxQueue bounds the callers waiting for a slot; a caller that finds
	// the queue full is rejected with ErrBulkheadFull. 0 means no bound
	// (each caller still waits at most MaxWait).
	MaxQueue int

	// MaxWait bounds how long a caller waits for a slot before it is
	// rejected with ErrBulkheadFull. 0 means until the caller's context is
	// done.
	MaxWait time.Duration

	// FailFast rejects a call at once with ErrBulkheadFull when no slot is
	// free, instead of queueing it (the original design's wait=False).
	FailFast bool

	// GlobalLimit caps the calls inside across every process that shares
	// the registry's Store (BULKHEAD_<RESOURCE>_GLOBAL_LIMIT): "at most 10
	// LLM calls in flight in the whole fleet". 0 means no global cap. It
	// needs a Registry with a Store; a bulkhead built on its own ignores it.
	GlobalLimit int

	// Adaptive, if set, makes Limit a starting point: the limit then
	// moves between Adaptive.MinLimit and Adaptive.MaxLimit, driven by the
	// latency of the calls and by overload signals (ErrTimeout,
	// ErrRateLimited, HTTP 429, 503 and 529 through Transport), as Netflix
	// concurrency-limits does. See [AdaptiveConfig].
	Adaptive *AdaptiveConfig
}

// BulkheadStats is a snapshot of a bulkhead's counters.
type BulkheadStats struct {
	// Active is the number of calls inside now.
	Active int
	// Waiting is the number of callers queued for a slot now.
	Waiting int
	// Rejected counts calls turned away with ErrBulkheadFull.
	Rejected uint64
	// Completed counts calls that held a slot and gave it back.
	Completed uint64
}

// Bulkhead caps the number of calls inside at once, so that one slow
// dependency cannot take every goroutine, connection or token of a service
// with it. Waiting callers are served in arrival order.
//
// A slot is given back on every path, panics included. A Bulkhead is safe for
// concurrent use by multiple goroutines. Build it with [NewBulkhead]; the
// zero value is not usable.
type Bulkhead struct {
	name     string
	maxQueue int
	maxWait  time.Duration
	failFast bool
	errFull  *Error       // returned on every rejection, so it allocates nothing
	sw       *atomic.Bool // a registry's switch, set before the Bulkhead is shared; nil: always on
	global   atomic.Pointer[limiterBox]
	adapt    atomic.Pointer[adaptive] // nil: a fixed limit
	inUse    atomic.Int32             // active, for adaptive samples without the lock
	retired  atomic.Bool              // its registry evicted it: no longer observed

	mu        sync.Mutex // guards what follows, and maxQueue, maxWait and failFast
	limit     int        // the calls admitted at once
	learnt    int        // the limit Limit reports: limit, but during an adaptive probe
	active    int
	waiters   list.List // of *waiter, oldest first
	rejected  uint64
	completed atomic.Uint64
}

type waiter struct {
	ready  chan struct{} // closed when the slot is handed over, or the waiter let through
	bypass bool          // set under mu before ready is closed: let through without a slot
	shed   bool          // set under mu before ready is closed: displaced by a higher priority
	prio   int           // Shed's priority; 0 for the pipeline's callers
}

// errBypassed is what acquire returns to a waiter let through without a
// slot because its registry was switched off while it waited.
var errBypassed = errors.New("resilience: bulkhead switched off")

// bypassWaiters lets every queued caller through without a slot: the
// registry was switched off, and later callers pass straight through.
func (b *Bulkhead) bypassWaiters() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for e := b.waiters.Front(); e != nil; e = b.waiters.Front() {
		b.waiters.Remove(e)
		w := e.Value.(*waiter)
		w.bypass = true
		close(w.ready)
	}
}

// validate reports the first invalid field of cfg, without building a
// bulkhead: one built only to validate would show in the metrics.
func (cfg BulkheadConfig) validate() error {
	switch {
	case cfg.Limit < 0:
		return invalid("BulkheadConfig.Limit", cfg.Limit, "must not be negative")
	case cfg.MaxQueue < 0:
		return invalid("BulkheadConfig.MaxQueue", cfg.MaxQueue, "must not be negative")
	case cfg.MaxWait < 0:
		return invalid("BulkheadConfig.MaxWait", cfg.MaxWait, "must not be negative")
	case cfg.GlobalLimit < 0:
		return invalid("BulkheadConfig.GlobalLimit", cfg.GlobalLimit, "must not be negative")
	}
	if cfg.Adaptive != nil {
		limit := cfg.Limit
		if limit == 0 {
			limit = defaultBulkheadLimit
		}
		return cfg.Adaptive.validate(limit)
	}
	return nil
}

// NewBulkhead returns a bulkhead configured by cfg, or an error that names
// the first invalid field and its value.
func NewBulkhead(cfg BulkheadConfig) (*Bulkhead, error) {
	return newBulkhead(cfg, true)
}

// newBulkhead builds a bulkhead, observed by the gauges unless it is a
// keyed one, whose calls its service's metrics count.
func newBulkhead(cfg BulkheadConfig, observed bool) (*Bulkhead, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	b := &Bulkhead{
		name:     cfg.Name,
		limit:    cfg.Limit,
		maxQueue: cfg.MaxQueue,
		maxWait:  cfg.MaxWait,
		failFast: cfg.FailFast,
		errFull:  &Error{Err: ErrBulkheadFull, Name: cfg.Name},
	}
	if b.limit == 0 {
		b.limit = defaultBulkheadLimit
	}
	b.learnt = b.limit
	if cfg.Adaptive != nil {
		b.adapt.Store(newAdaptive(*cfg.Adaptive, b.limit))
	}
	if observed {
		observeBulkhead(b)
	}
	return b, nil
}

// Adaptive reports whether the bulkhead's limit adapts.
func (b *Bulkhead) Adaptive() bool { return b.adapt.Load() != nil }

// Name returns the bulkhead's name. It is safe for concurrent use.
func (b *Bulkhead) Name() string { return b.name }

// Limit returns the number of calls allowed inside at once: for an
// adaptive bulkhead, the limit it has learnt now, which a probe of the
// gradient's baseline leaves as it is (see [AdaptiveConfig].Window). It
// is safe for concurrent use.
func (b *Bulkhead) Limit() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.learnt
}

// SetLimit changes the number of calls allowed inside at once, for calls
// already waiting too. Growing admits waiters at once; shrinking admits no
// one until enough calls in flight have finished, and never interrupts them.
// An adaptive bulkhead moves on from there, within its bounds: a limit
// outside them is taken as the nearest bound. It is safe for concurrent
// use.
func (b *Bulkhead) SetLimit(limit int) error {
	if limit <= 0 {
		return invalid("Bulkhead.SetLimit limit", limit, "must be positive")
	}
	b.mu.Lock()
	if a := b.adapt.Load(); a != nil {
		limit = a.set(limit)
	}
	b.limit, b.learnt = limit, limit
	b.grantLocked()
	b.mu.Unlock()
	return nil
}

// on reports whether the bulkhead limits calls: a disabled registry's
// bulkheads let every call through.
func (b *Bulkhead) on() bool { return b.sw == nil || b.sw.Load() }

// reconfigure applies a new configuration to a live bulkhead: the limit as
// SetLimit does, and the queue, wait and fail-fast settings from the next
// caller that has to wait. cfg must be valid.
func (b *Bulkhead) reconfigure(cfg BulkheadConfig) {
	limit := cfg.Limit
	if limit == 0 {
		limit = defaultBulkheadLimit
	}
	b.mu.Lock()
	b.maxQueue, b.maxWait, b.failFast = cfg.MaxQueue, cfg.MaxWait, cfg.FailFast
	if a := b.adapt.Load(); a != nil && cfg.Adaptive != nil {
		// Still adaptive: keep what it learnt, within the new bounds.
		limit = a.reconfigure(*cfg.Adaptive, limit)
	} else if cfg.Adaptive != nil {
		b.adapt.Store(newAdaptive(*cfg.Adaptive, limit))
	} else {
		b.adapt.Store(nil)
	}
	b.limit, b.learnt = limit, limit
	b.grantLocked()
	b.mu.Unlock()
}

// SetGlobal adds a cluster-wide cap to the bulkhead: a call then holds a
// local slot and a global one. nil removes it. It is safe for concurrent
// use.
func (b *Bulkhead) SetGlobal(l Limiter) {
	if l == nil {
		b.global.Store(nil)
		return
	}
	b.global.Store(&limiterBox{l})
}

// Stats returns a snapshot of the bulkhead's counters. It is safe for
// concurrent use.
func (b *Bulkhead) Stats() BulkheadStats {
	b.mu.Lock()
	defer b.mu.Unlock()
	return BulkheadStats{
		Active:    b.active,
		Waiting:   b.waiters.Len(),
		Rejected:  b.rejected,
		Completed: b.completed.Load(),
	}
}

// Acquire takes a slot, waiting as the configuration allows, and returns the
// function that gives it back: the original design's BulkheadContext, for
// code that is not a single Func. Call release exactly when the work is done;
// calling it more than once gives the slot back only once. On error, release
// is a no-op, so `defer release()` is safe either way. The error matches
// [ErrBulkheadFull] or is the context's error.
//
// A bulkhead of a disabled registry lets every caller straight through:
// Acquire then takes nothing and returns a no-op release.
func (b *Bulkhead) Acquire(ctx context.Context) (release func(), err error) {
	if !b.on() {
		return noop, nil
	}
	if err := b.acquire(ctx); err != nil {
		if err == errBypassed {
			return noop, nil
		}
		return noop, err
	}
	grel, err := b.acquireGlobal(ctx)
	if err != nil {
		b.giveBack()
		return noop, err
	}
	var once atomic.Bool
	return func() {
		if once.CompareAndSwap(false, true) {
			grel()
			b.release()
		}
	}, nil
}

// acquireGlobal takes a global slot, if the bulkhead has a global cap, once
// a local one is held. On error the caller gives the local slot back.
func (b *Bulkhead) acquireGlobal(ctx context.Context) (release func(), err error) {
	gb := b.global.Load()
	if gb == nil {
		return noop, nil
	}
	rel, err := gb.l.Acquire(ctx)
	if err != nil {
		return noop, err
	}
	if rel == nil {
		rel = noop
	}
	return rel, nil
}

// giveBack returns a slot that was taken but not used: not a completed call.
func (b *Bulkhead) giveBack() {
	b.mu.Lock()
	b.active--
	b.grantLocked()
	b.mu.Unlock()
}

func noop() {}

func (b *Bulkhead) acquire(ctx context.Context) error {
	b.mu.Lock()
	if b.takeFreeLocked() {
		b.mu.Unlock()
		return nil
	}
	if b.failFast || (b.maxQueue > 0 && b.waiters.Len() >= b.maxQueue) {
		b.rejected++
		b.mu.Unlock()
		return b.errFull
	}
	if err := ctx.Err(); err != nil {
		b.mu.Unlock()
		return err
	}
	w := &waiter{ready: make(chan struct{})}
	elem := b.queueLocked(w)
	maxWait := b.maxWait
	b.mu.Unlock()
	return b.wait(ctx, w, elem, maxWait, true)
}

// takeFreeLocked takes a slot if one is free and nobody waits for one:
// the path of every call that finds room.
func (b *Bulkhead) takeFreeLocked() bool {
	if b.active < b.limit && b.waiters.Len() == 0 {
		b.active++
		b.inUse.Store(int32(b.active))
		return true
	}
	return false
}

// queueLocked puts w in the queue behind every waiter of its priority or
// higher: arrival order within a priority.
func (b *Bulkhead) queueLocked(w *waiter) *list.Element {
	for e := b.waiters.Back(); e != nil; e = e.Prev() {
		if e.Value.(*waiter).prio >= w.prio {
			return b.waiters.InsertAfter(w, e)
		}
	}
	return b.waiters.PushFront(w)
}

// wait waits for w's slot, at most maxWait (0: until ctx is done), and
// leaves the queue on every other way out. attempt says the caller is an
// attempt of the pipeline, whose own timeout ending in the queue is the
// bulkhead's rejection; for Shed it is the request's deadline.
func (b *Bulkhead) wait(ctx context.Context, w *waiter, elem *list.Element, maxWait time.Duration, attempt bool) (err error) {
	if recordingSpan(ctx) != nil {
		start := time.Now()
		defer func() {
			traceBulkheadWait(ctx, b.name, time.Since(start), err == nil || err == errBypassed)
		}()
	}
	var expired <-chan time.Time
	if maxWait > 0 {
		t := time.NewTimer(maxWait)
		defer t.Stop()
		expired = t.C
	}
	select {
	case <-w.ready:
		switch {
		case w.bypass:
			return errBypassed
		case w.shed:
			return b.errFull // counted by whoever displaced it
		}
		return nil
	case <-ctx.Done():
		err = ctx.Err()
		if attempt && context.Cause(ctx) == ErrTimeout {
			// The attempt's own timeout ran out in the queue: the
			// downstream was never called, so this is the bulkhead
			// turning the call away (the timeout layer adds ErrTimeout).
			err = b.errFull
		}
	case <-expired:
		err = b.errFull
	}

	b.mu.Lock()
	select {
	case <-w.ready:
		// The slot was handed over as we gave up: pass it on.
		if !w.bypass && !w.shed {
			b.active--
			b.grantLocked()
		}
	default:
		b.waiters.Remove(elem)
		// Leaving the head of the queue may unblock those behind.
		b.grantLocked()
	}
	if err == b.errFull && !w.shed {
		b.rejected++
	}
	b.mu.Unlock()
	return err
}

func (b *Bulkhead) release() {
	b.mu.Lock()
	b.completed.Add(1) // under the lock, so Stats never counts a call twice
	b.active--
	b.grantLocked()
	b.mu.Unlock()
}

// observe feeds an adaptive bulkhead a call that held a slot from start
// (monotonic) and ended overloaded, or not.
func (b *Bulkhead) observe(a *adaptive, start time.Duration, overload bool) {
	now := monotonic()
	if limit, _ := a.sample(now, now-start, int(b.inUse.Load()), overload); limit > 0 {
		b.learn(a)
	}
}

// learn applies what a has learnt to the bulkhead: its limit, and its
// admission while a probe runs, read under both locks, so that a SetLimit
// or a Reload since the sample is never overwritten by what the sample
// returned. A probe just begun gets its deadline.
func (b *Bulkhead) learn(a *adaptive) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.adapt.Load() != a {
		return
	}
	a.mu.Lock()
	b.learnt, b.limit = a.shown[0], a.shown[1]
	seq, arm := a.probeSeq, a.probe > 0 && a.probeArmed != a.probeSeq
	var d time.Duration
	if arm {
		a.probeArmed, d = seq, a.probeDeadline()
	}
	a.mu.Unlock()
	b.grantLocked()
	if arm {
		time.AfterFunc(d, func() { b.endProbe(a, seq) })
	}
}

// endProbe abandons probe number seq of a, if it still runs: see
// adaptive.probeDeadline.
func (b *Bulkhead) endProbe(a *adaptive, seq uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.adapt.Load() != a {
		return
	}
	a.mu.Lock()
	a.abandonProbe(seq)
	b.learnt, b.limit = a.shown[0], a.shown[1]
	a.mu.Unlock()
	b.grantLocked()
}

// isOverload reports whether err says the downstream is overloaded: a
// timeout, a rate limit, or an HTTP 429, 503 or 529.
func isOverload(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, ErrTimeout) || errors.Is(err, ErrRateLimited) {
		return true
	}
	for x := err; x != nil; x = errors.Unwrap(x) {
		if se, ok := x.(*StatusError); ok {
			switch se.StatusCode {
			case 429, 503, statusOverloaded:
				return true
			}
			return false
		}
	}
	return false
}

// grantLocked hands free slots to waiters in arrival order.
func (b *Bulkhead) grantLocked() {
	for b.active < b.limit {
		front := b.waiters.Front()
		if front == nil {
			break
		}
		b.waiters.Remove(front)
		b.active++
		close(front.Value.(*waiter).ready)
	}
	b.inUse.Store(int32(b.active))
}

// WithBulkhead returns fn guarded by b: it runs only while holding one of b's
// slots, and the slot is given back when fn returns or panics. A nil b or fn
// yields a function that reports [ErrInvalidConfig].
func WithBulkhead[T any](fn Func[T], b *Bulkhead) Func[T] {
	if fn == nil {
		return failing[T](invalid("WithBulkhead fn", nil, "must not be nil"))
	}
	if b == nil {
		return failing[T](invalid("WithBulkhead b", nil, "must not be nil"))
	}
	return newEdge(&pipeline{bulkhead: b}, "", "", fn, nil, 0)
}
