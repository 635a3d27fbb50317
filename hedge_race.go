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
	// reached is set when a hedge got past the bulkhead: the call's
	// outcome is then the downstream's, for the breaker, as guarded
	// tracks for the attempts it wraps.
	reached atomic.Bool

	mu        sync.Mutex
	parent    context.Context // the round's: what the hedges derive from
	round     uint64
	delay     time.Duration
	policy    *Hedge
	hp        *hedgeParams  // the round's
	timer     *time.Timer   // in a synctest bubble; else the hedge's schedule
	due       time.Duration // when the next hedge is due, on the schedule
	scheduled uint64        // the round it is in the heap for
	// Packed together: the race is allocated per hedged call.
	bubble, stopped, won, firstDone bool          // stopped: no more hedges this round
	winner, sent                    int32         // the attempt that won; hedges sent
	index                           int32         // in the schedule's heap; -1: not in it
	firstCancel                     func()        // written once bound is false, read once it is true
	bound                           atomic.Bool   // the first attempt gave its cancel func
	lostFirst                       atomic.Bool   // a hedge won: the first attempt is to stop
	start                           time.Duration // the first attempt's, to time it
	v                               *volley       // made when the round sends its first hedge
}

// volley is what a round that sent hedges keeps of them: a round whose
// first attempt answers in time never needs it.
type volley struct {
	running  int
	cancels  []context.CancelFunc
	lastErr  error
	lastStop bool
	done     chan struct{} // closed when the round's last hedge returns
	panicked bool
	panicVal any
}

// attempter runs one attempt of an edge, from the heap, and drops the
// result a hedge won with when the call panics instead of returning it.
type attempter interface {
	attempt(ctx context.Context) error
	dropKept()
}

// hedgeSeat says which attempt of which race an attempt's context is.
type hedgeSeat struct {
	r *race
	i int32 // 0: the round's first attempt
}

type hedgeKey struct{}

// errLost is a hedged attempt's error when another attempt won: its result
// was dropped.
var errLost = errors.New("resilience: a hedged attempt lost to another")

func (r *race) init(ctx context.Context, p *pipeline, call attempter) {
	r.Context, r.p, r.call = ctx, p, call
	r.seat0.r = r
	r.index = -1
}

// Value makes the race findable from the call's context.
func (r *race) Value(key any) any {
	if key == (hedgeKey{}) {
		return &r.seat0
	}
	return r.Context.Value(key)
}

// sent is called by a hedge's attempt once it holds its permits and slot
// and sends the call: the hedge is counted, and the call's outcome is the
// downstream's for the breaker.
func (s *hedgeSeat) sent(ctx context.Context) {
	if s.i > 0 {
		s.r.reached.Store(true)
		meter().hedgeAttempts.Add(ctx, 1, s.r.p.site.function...)
		traceHedge(ctx, s.r.p.site.name, int(s.i))
	}
}

// seatCtx is a hedge's context.
type seatCtx struct {
	context.Context
	s      hedgeSeat
	start  time.Duration // to time it
	cancel context.CancelFunc
	// handed is set when a handoff attempt's hold took over cancel: a
	// response handed to the caller keeps its context until its body is
	// closed.
	handed bool
}

func (c *seatCtx) Value(key any) any {
	if key == (hedgeKey{}) {
		return &c.s
	}
	return c.Context.Value(key)
}

// seatOf returns the seat of the attempt whose context is ctx in r, or
// nil when it is not an attempt of a running round of r: a call made with
// the context of another call's attempt must not take that call's seat.
func seatOf(ctx context.Context, r *race) *hedgeSeat {
	s, _ := ctx.Value(hedgeKey{}).(*hedgeSeat)
	if s == nil || s.r != r || (s.i == 0 && !s.r.inRound.Load()) {
		return nil
	}
	return s
}

// keep settles an attempt that returned: it reports whether its result is
// kept, a success being kept only if it is the first. The caller writes the
// kept result before unlocking r.mu.
func (r *race) keepLocked(i int32, ok bool) bool {
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
func (r *race) stopLocked(winner int32) {
	r.stopped = true
	if winner != 0 {
		// With bindFirst, a Dekker handshake: whichever of the two
		// stores comes second sees the other's, so the first attempt is
		// cancelled once or twice, never missed, and bindFirst needs no
		// lock.
		r.lostFirst.Store(true)
		if r.bound.Load() {
			r.firstCancel()
		}
	}
	if r.v == nil {
		return
	}
	for j, c := range r.v.cancels {
		if int32(j+1) != winner {
			c()
		}
	}
}

// bindFirst gives the race the cancel func of the round's first attempt.
func (r *race) bindFirst(cancel func()) {
	r.firstCancel = cancel
	r.bound.Store(true)
	if r.lostFirst.Load() {
		cancel()
	}
}

// noteLocked records an attempt's error as the last of a round that sent
// hedges.
func (r *race) noteLocked(err error, stop bool) {
	if r.v != nil && err != nil && !r.won && !errors.Is(err, errLost) {
		r.v.lastErr, r.v.lastStop = err, stop
	}
}

// run runs one round: attempt, and hedges of it while it has no answer.
func (r *race) run(ctx context.Context, h *Hedge, attempt attemptFunc) (error, bool) {
	hp := h.params.Load()
	if b := hp.budget; b != nil && r.round == 0 && (r.p.retry == nil || r.p.retry.params().budget != b) {
		// One deposit per call, and none when the retry, sharing the
		// budget, made it.
		b.deposit()
	}
	r.mu.Lock()
	r.round++
	r.parent, r.hp, r.delay = ctx, hp, h.delay(hp)
	r.stopped, r.won, r.winner, r.sent, r.v = false, false, 0, 0, nil
	r.firstDone, r.firstCancel = false, nil
	r.bound.Store(false)
	r.lostFirst.Store(false)
	r.policy, r.start = h, 0
	if hp.quantile > 0 {
		r.start = monotonic()
	}
	r.arm(h, r.round)
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
	r.firstDone, r.stopped = true, true
	r.bound.Store(false) // the first attempt has returned: nothing to cancel
	r.disarm(h)
	r.noteLocked(err, stop)
	if r.sent == 0 {
		r.mu.Unlock()
		r.inRound.Store(false)
		if err == nil && hp.quantile > 0 {
			h.lat.add(monotonic()-r.start, hp.quantile)
		}
		return err, stop
	}
	v := r.v
	if v.running > 0 {
		r.mu.Unlock()
		<-v.done
		r.mu.Lock()
	}
	won, winner := r.won, r.winner
	r.mu.Unlock()
	// The hedges have all returned: v is no longer written.
	panicked, pv := v.panicked, v.panicVal
	err, stop = v.lastErr, v.lastStop
	r.inRound.Store(false)
	if panicked {
		panic(pv)
	}
	if !won {
		return err, stop
	}
	if hp.quantile > 0 {
		// When a hedge won, the first attempt's time so far is a lower
		// bound of its latency: recorded too, or the slow tail that the
		// quantile is to find would never be seen.
		h.lat.add(monotonic()-r.start, hp.quantile)
	}
	meter().hedgeWins.Add(r.parent, 1, r.p.site.hedgeWins[min(winner, 1)]...)
	return nil, false
}

// abandon ends a round whose first attempt panicked: the hedges are
// cancelled and waited for, so that nothing they hold outlives the call,
// and a result one of them won with is dropped; the panic goes on.
func (r *race) abandon() {
	r.mu.Lock()
	var winner int32
	if r.won {
		winner = r.winner
	}
	r.won = true // no result is kept any more
	r.firstDone = true
	r.stopLocked(-1)
	r.disarm(r.policy)
	v := r.v
	if v != nil && v.running > 0 {
		r.mu.Unlock()
		<-v.done
		r.mu.Lock()
	}
	r.mu.Unlock()
	if winner > 0 {
		r.call.dropKept()
	}
	r.inRound.Store(false)
}

// fire sends a hedge of round n, if it is still the race's round and no
// attempt answered, and arms the timer for the next.
func (r *race) fire(n uint64) {
	r.mu.Lock()
	if n != r.round || r.stopped || r.won || int(r.sent) >= r.hp.max {
		r.mu.Unlock()
		return
	}
	if r.parent.Err() != nil || !r.policy.on() || r.p.hedgeNow() != r.policy {
		// The caller gave up, or the registry was switched off or its
		// hedge removed since the round began.
		r.stopped = true
		r.mu.Unlock()
		return
	}
	if b := r.hp.budget; b != nil && !b.withdraw() {
		r.stopped = true
		r.mu.Unlock()
		return
	}
	if r.v == nil {
		r.v = &volley{done: make(chan struct{})}
	}
	v := r.v
	r.sent++
	v.running++
	c := &seatCtx{s: hedgeSeat{r: r, i: r.sent}}
	c.Context, c.cancel = context.WithCancel(r.parent)
	v.cancels = append(v.cancels, c.cancel)
	if int(r.sent) < r.hp.max {
		r.arm(r.policy, n)
	}
	timed := r.hp.quantile > 0
	r.mu.Unlock()
	if timed {
		c.start = monotonic()
	}
	r.hedge(c, v)
}

// hedge runs one hedged attempt in its own goroutine.
func (r *race) hedge(c *seatCtx, v *volley) {
	var err error
	var stop bool
	returned := false
	defer func() {
		if !c.handed {
			c.cancel()
		}
		var pv any
		if !returned {
			if pv = recover(); pv == nil {
				err = errGoexit // runtime.Goexit: an error, as enforced says
			}
		}
		r.mu.Lock()
		if pv != nil && !v.panicked {
			// Re-raised in the caller's goroutine, which waits for this
			// one: a panic in a goroutine of ours must not end the
			// process.
			v.panicked, v.panicVal = true, pv
			r.won = true
			r.stopLocked(-1)
		}
		r.noteLocked(err, stop)
		won := r.won && r.winner == c.s.i && !v.panicked
		h, q := r.policy, r.hp.quantile
		if v.running--; v.running == 0 && r.firstDone {
			close(v.done)
		}
		r.mu.Unlock()
		if won && q > 0 {
			h.lat.add(monotonic()-c.start, q)
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
