package resilience

import (
	"context"
	"errors"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// A race is one call's hedging state. The edge embeds it in the object it
// passes to the pipeline as the call's context, so that a hedged call
// allocates that one object: the pipeline finds the race with ctx.Value,
// and a hedge runs the edge's attempt through call, on the heap, while the
// first attempt runs the edge's own closure on the caller's stack.
//
// Each attempt of the retry policy is one round: the first attempt inline,
// then, while it has no answer, a hedge every delay. Attempts settle with
// keep, under mu, so that exactly one success is kept and a result the
// caller will read is written only under the lock.
type race struct {
	context.Context // the caller's
	seat0           hedgeSeat
	p               *pipeline
	call            attempter
	inRound         atomic.Bool

	mu          sync.Mutex
	parent      context.Context // the round's: what the hedges derive from
	round       uint64
	max         int
	delay       time.Duration
	budget      *RetryBudget
	timer       *hedgeTimer
	stopped     bool // no more hedges this round
	won         bool
	winner      int
	sent        int
	running     int
	firstDone   bool
	firstLost   bool
	firstCancel func()
	cancels     []context.CancelFunc
	lastErr     error
	lastStop    bool
	done        chan struct{} // closed when the round's last hedge returns
	panicked    bool
	panicVal    any
	policy      *Hedge
	quantile    float64       // the round's; 0: attempts are not timed
	start       time.Duration // the first attempt's, to time it
}

// attempter runs one attempt of an edge, from the heap.
type attempter interface {
	attempt(ctx context.Context) error
}

// hedgeSeat says which attempt of which race an attempt's context is.
type hedgeSeat struct {
	r     *race
	i     int           // 0: the round's first attempt
	start time.Duration // a hedge's, to time it
}

type hedgeKey struct{}

// noHedge, as the hedgeKey value of a call's context, keeps the call from
// being hedged: Transport marks requests that must not be sent twice.
var noHedge = &hedgeSeat{}

// errLost is a hedged attempt's error when another attempt won: its result
// was dropped.
var errLost = errors.New("resilience: a hedged attempt lost to another")

func (r *race) init(ctx context.Context, p *pipeline, call attempter) {
	r.Context, r.p, r.call = ctx, p, call
	r.seat0.r = r
}

// Value makes the race findable from the call's context.
func (r *race) Value(key any) any {
	if key == (hedgeKey{}) {
		if v := r.Context.Value(key); v == noHedge {
			return v
		}
		return &r.seat0
	}
	return r.Context.Value(key)
}

// seatCtx is a hedge's context.
type seatCtx struct {
	context.Context
	s hedgeSeat
}

func (c *seatCtx) Value(key any) any {
	if key == (hedgeKey{}) {
		return &c.s
	}
	return c.Context.Value(key)
}

// seatOf returns the seat of the attempt whose context is ctx, or nil when
// it is not an attempt of a running round.
func seatOf(ctx context.Context) *hedgeSeat {
	s, _ := ctx.Value(hedgeKey{}).(*hedgeSeat)
	if s == nil || s == noHedge || (s.i == 0 && !s.r.inRound.Load()) {
		return nil
	}
	return s
}

// keep settles an attempt that returned: it reports whether its result is
// kept, a success being kept only if it is the first. The caller writes the
// kept result before unlocking r.mu.
func (r *race) keepLocked(i int, ok bool) bool {
	if r.won {
		return false
	}
	if ok {
		r.won, r.winner = true, i
		r.stopLocked(i)
	}
	return true
}

// stopLocked ends the round for every attempt but the winner, -1 for
// none: no more hedges, and the others' contexts cancelled.
func (r *race) stopLocked(winner int) {
	r.stopped = true
	if winner != 0 {
		r.firstLost = true
		if r.firstCancel != nil {
			r.firstCancel()
		}
	}
	for j, c := range r.cancels {
		if j+1 != winner {
			c()
		}
	}
}

// bindFirst gives the race the cancel func of the round's first attempt.
func (r *race) bindFirst(cancel func()) {
	r.mu.Lock()
	if r.firstLost {
		cancel()
	} else {
		r.firstCancel = cancel
	}
	r.mu.Unlock()
}

// noteLocked records an attempt's error as the round's last.
func (r *race) noteLocked(err error, stop bool) {
	if err != nil && !r.won && !errors.Is(err, errLost) {
		r.lastErr, r.lastStop = err, stop
	}
}

// run runs one round: attempt, and hedges of it while it has no answer.
func (r *race) run(ctx context.Context, h *Hedge, attempt attemptFunc) (error, bool) {
	hp := h.params.Load()
	if hp.budget != nil {
		hp.budget.deposit()
	}
	r.mu.Lock()
	r.round++
	r.parent, r.max, r.delay, r.budget = ctx, hp.max, h.delay(hp), hp.budget
	r.stopped, r.won, r.winner, r.sent, r.running = false, false, 0, 0, 0
	r.firstDone, r.firstLost, r.firstCancel = false, false, nil
	r.cancels, r.lastErr, r.lastStop, r.done = r.cancels[:0], nil, false, nil
	r.policy, r.quantile, r.start = h, hp.quantile, 0
	if r.quantile > 0 {
		r.start = monotonic()
	}
	r.timer = armHedge(r, r.round, r.delay)
	r.mu.Unlock()
	r.inRound.Store(true)
	finished := false
	defer func() {
		if !finished {
			r.abandon()
		}
	}()
	err, stop := r.p.once(ctx, attempt, r)
	finished = true
	return r.finish(h, hp, err, stop)
}

// finish ends a round whose first attempt returned: no more hedges; wait
// for those sent, then the round's answer is the winner's, or the last
// error.
func (r *race) finish(h *Hedge, hp *hedgeParams, err error, stop bool) (error, bool) {
	r.mu.Lock()
	r.firstDone, r.stopped, r.firstCancel = true, true, nil
	if r.timer.stop() {
		r.timer = nil
	}
	r.noteLocked(err, stop)
	if r.sent == 0 {
		r.mu.Unlock()
		r.inRound.Store(false)
		if err == nil && hp.quantile > 0 {
			h.lat.add(monotonic()-r.start, hp.quantile)
		}
		return err, stop
	}
	if r.running > 0 {
		done := r.done
		r.mu.Unlock()
		<-done
		r.mu.Lock()
	}
	won, winner, panicked, pv := r.won, r.winner, r.panicked, r.panicVal
	err, stop = r.lastErr, r.lastStop
	r.mu.Unlock()
	r.inRound.Store(false)
	if panicked {
		panic(pv)
	}
	if !won {
		return err, stop
	}
	if winner == 0 && hp.quantile > 0 {
		h.lat.add(monotonic()-r.start, hp.quantile)
	}
	meter().hedgeWins.Add(r.parent, 1, r.p.site.hedgeWins[min(winner, 1)]...)
	return nil, false
}

// abandon ends a round whose first attempt panicked: the hedges are
// cancelled and their results dropped; the panic goes on.
func (r *race) abandon() {
	r.mu.Lock()
	r.won = true // no result is kept any more
	r.stopLocked(-1)
	r.timer.stop()
	r.mu.Unlock()
	r.inRound.Store(false)
}

// fire sends a hedge of round n, if it is still the race's round and no
// attempt answered, and arms the timer for the next.
func (r *race) fire(n uint64) {
	r.mu.Lock()
	if n != r.round || r.stopped || r.won || r.sent >= r.max {
		r.mu.Unlock()
		return
	}
	if r.parent.Err() != nil {
		r.stopped = true
		r.mu.Unlock()
		return
	}
	if r.budget != nil && !r.budget.withdraw() {
		r.stopped = true
		r.mu.Unlock()
		return
	}
	r.sent++
	r.running++
	if r.done == nil {
		r.done = make(chan struct{})
	}
	c := &seatCtx{s: hedgeSeat{r: r, i: r.sent}}
	var cancel context.CancelFunc
	c.Context, cancel = context.WithCancel(r.parent)
	r.cancels = append(r.cancels, cancel)
	if r.sent < r.max {
		r.timer = armHedge(r, n, r.delay)
	}
	timed := r.quantile > 0
	r.mu.Unlock()
	if timed {
		c.s.start = monotonic()
	}
	meter().hedgeAttempts.Add(r.parent, 1, r.p.site.function...)
	r.hedge(c, cancel)
}

// hedge runs one hedged attempt in its own goroutine, the timer's.
func (r *race) hedge(c *seatCtx, cancel context.CancelFunc) {
	var err error
	var stop bool
	returned := false
	defer func() {
		cancel()
		var pv any
		if !returned {
			if pv = recover(); pv == nil {
				err = errGoexit // runtime.Goexit: an error, as enforced says
			}
		}
		r.mu.Lock()
		if pv != nil && !r.panicked {
			// Re-raised in the caller's goroutine, which waits for this
			// one: a panic in a goroutine of ours must not end the
			// process.
			r.panicked, r.panicVal = true, pv
			r.won = true
			r.stopLocked(-1)
		}
		r.noteLocked(err, stop)
		won := r.won && r.winner == c.s.i && !r.panicked
		h, q := r.policy, r.quantile
		if r.running--; r.running == 0 && r.firstDone {
			close(r.done)
		}
		r.mu.Unlock()
		if won && q > 0 {
			h.lat.add(monotonic()-c.s.start, q)
		}
	}()
	err, stop = r.p.once(c, r.call.attempt, nil)
	returned = true
}

// drop releases a losing attempt's result: its body, if it is an HTTP
// response, or itself, if it is an io.Closer. Nothing else can.
func drop(v any) {
	switch x := v.(type) {
	case *http.Response:
		discard(x)
	case io.Closer:
		x.Close()
	}
}

// hedgeWinAttrs are the attribute sets of resilience.hedge.wins for a
// site: the first attempt answered, or a hedge did.
func hedgeWinAttrs(name string) [2][]metric.AddOption {
	return [2][]metric.AddOption{
		addSet(attrFunction.String(name), attribute.Bool("hedged", false)),
		addSet(attrFunction.String(name), attribute.Bool("hedged", true)),
	}
}

// hedgeTimer sends a race's hedges. Timers made outside a testing/synctest
// bubble are pooled: a hedged call whose first attempt answers in time
// then allocates no timer. A timer is reused only once it is stopped before
// it fired, so a late fire never reaches a new race.
type hedgeTimer struct {
	t     *time.Timer
	r     *race
	n     uint64
	delay time.Duration
	fake  bool // made in a bubble: never pooled
}

var hedgeTimers sync.Pool

// armHedge returns a timer that calls r.fire(n) after d.
func armHedge(r *race, n uint64, d time.Duration) *hedgeTimer {
	bubble := inBubble()
	var t *hedgeTimer
	if !bubble {
		t, _ = hedgeTimers.Get().(*hedgeTimer)
	}
	if t == nil {
		t = &hedgeTimer{fake: bubble}
		t.r, t.n = r, n
		t.t = time.AfterFunc(d, t.fire)
		return t
	}
	t.r, t.n = r, n
	t.t.Reset(d)
	return t
}

func (t *hedgeTimer) fire() { t.r.fire(t.n) }

// stop stops t, and pools it when it had not fired, reporting whether it
// had not.
func (t *hedgeTimer) stop() bool {
	if t == nil || !t.t.Stop() {
		return false
	}
	if !t.fake {
		t.r = nil
		hedgeTimers.Put(t)
	}
	return true
}

// inBubble reports whether the calling goroutine runs in a testing/synctest
// bubble, where the clock has no monotonic reading. A timer made in a
// bubble runs on the bubble's fake clock and must never be touched from
// outside it (the runtime treats that as fatal), nor a real timer used in a
// bubble, whose fake clock it would not follow.
func inBubble() bool {
	now := time.Now()
	return now == now.Round(0)
}
