package resilience

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// State is the state of a [CircuitBreaker].
type State int

// The states of a circuit breaker.
const (
	// StateClosed lets every call through and counts failures.
	StateClosed State = iota
	// StateHalfOpen lets a limited number of probe calls through.
	StateHalfOpen
	// StateOpen rejects every call with ErrCircuitOpen.
	StateOpen
)

// String returns "closed", "half-open" or "open".
func (s State) String() string {
	switch s {
	case StateClosed:
		return "closed"
	case StateHalfOpen:
		return "half-open"
	case StateOpen:
		return "open"
	}
	return "State(" + formatValue(int(s)) + ")"
}

// CircuitBreakerConfig configures a [CircuitBreaker]. The zero value of each
// field means its documented default.
type CircuitBreakerConfig struct {
	// Name identifies the breaker in errors, callbacks and metrics, usually
	// after the downstream service it protects ("llm", "openfga").
	Name string

	// FailMax is the number of consecutive failures that opens the
	// breaker. 0 means 5, unless FailureRatio is set: then 0 means no
	// consecutive trigger, and a FailMax set beside a ratio opens the
	// breaker too, whichever comes first.
	FailMax int

	// FailureRatio, in (0, 1], opens the breaker when, over the last
	// SamplingWindow, at least MinimumThroughput calls were counted and
	// failures/calls >= FailureRatio. 0 means no ratio trigger. As in
	// gobreaker and Polly, the ratio is checked when a call fails (the
	// slow-call ratio also when a call is slow), never on a success, which
	// only lowers it. A ratio
	// suits a downstream called more than about once a second; below that
	// a window rarely holds MinimumThroughput calls, and FailMax is the
	// better trigger.
	FailureRatio float64

	// MinimumThroughput is the number of calls the window must hold before
	// a ratio can open the breaker. 0 means 20.
	MinimumThroughput int

	// SamplingWindow is the rolling window the ratios are counted over, in
	// buckets of a tenth of it (gobreaker's own rolling counts). 0 means
	// 30s; it must be at least 10ms. It is used only when FailureRatio or
	// SlowCallDuration is set.
	SamplingWindow time.Duration

	// SlowCallDuration makes a call that succeeds but takes longer than it
	// slow: an LLM that degrades by slowing down opens the breaker before
	// it fails. 0 means no call is slow.
	SlowCallDuration time.Duration

	// SlowCallRatio, in (0, 1], opens the breaker when, over the window
	// and with MinimumThroughput calls, slow calls/calls >= SlowCallRatio.
	// 0 means 1 when SlowCallDuration is set.
	SlowCallRatio float64

	// OpenTimeout is how long the breaker stays open before it lets probes
	// through (half-open). 0 means 60s.
	OpenTimeout time.Duration

	// MaxOpenTimeout, when longer than OpenTimeout, doubles the open period
	// after each failed probe, up to MaxOpenTimeout; closing returns it to
	// OpenTimeout. It also caps the open period a retry hint asks for
	// (which is otherwise capped at 10x OpenTimeout). 0 means OpenTimeout:
	// every open period is the same.
	MaxOpenTimeout time.Duration

	// MaxKeys bounds the keys ([WithKey]) a registry keeps a breaker and
	// a bulkhead for under this service (CIRCUIT_BREAKER_<SERVICE>_MAX_KEYS).
	// 0 means 1000. A breaker built on its own ignores it.
	MaxKeys int

	// Shadow runs the breaker in shadow mode: it counts, changes state,
	// logs and records metrics as usual, but never rejects a call, so that
	// thresholds can be tried on a critical path without the risk of a
	// wrong open. Calls it would have rejected run uncounted, and show in
	// resilience.circuit_breaker.rejections with mode "shadow". ForceOpen
	// still rejects: it is an operator's decision, not the breaker's.
	Shadow bool

	// HalfOpenMaxCalls is the number of probe calls let through at once
	// while half-open. The breaker closes once that many probes in a row
	// have succeeded, and any failed probe opens it again. A probe whose
	// caller gave up decides nothing and frees its place for another. 0
	// means 1: the first probe's outcome decides.
	HalfOpenMaxCalls int

	// IsFailure decides whether an error counts against the downstream;
	// an error for which it returns false counts as a success. It is never
	// asked about the caller's own cancellation or deadline, which count as
	// neither. nil means every other error is a failure.
	IsFailure func(error) bool

	// OnStateChange, if set, is called with every transition, in order. It
	// is never called under a lock, so it may call the breaker's own
	// methods. It runs before the call or method that caused the
	// transition returns, unless another goroutine is delivering
	// transitions at that moment: that goroutine then delivers this one
	// too, in order, so that callbacks never run at once.
	OnStateChange func(name string, from, to State)

	// Logger receives a structured record of every transition (service,
	// from, to, and its thresholds): at Warn when the breaker opens,
	// at Info otherwise, outside every lock, like OnStateChange. nil means
	// slog.Default().
	Logger *slog.Logger

	// DisableLogging turns the transition records off.
	DisableLogging bool
}

// CircuitBreaker stops calling a failing downstream for a while, so that it
// can recover and so that callers fail fast instead of waiting on it.
//
// It opens after FailMax consecutive failures, or when a failure or
// slow-call ratio over a rolling window is reached; rejects calls with
// [ErrCircuitOpen] while open; lets HalfOpenMaxCalls probes through after
// the open period; and closes again when they succeed. A failed probe opens
// it again, for twice as long up to MaxOpenTimeout. A failure that carries
// a retry hint (an HTTP 429's Retry-After) and opens it keeps it open at
// least that long. It is built on sony/gobreaker v2 and, unlike gobreaker's
// own type, is not generic: one breaker serves wrappers of any result type.
//
// A CircuitBreaker is safe for concurrent use by multiple goroutines. Build it
// with [NewCircuitBreaker]; the zero value is not usable.
type CircuitBreaker struct {
	name     string
	rule     atomic.Pointer[breakerRule]
	mode     atomic.Int32 // modeForcedOpen, modeForcedClosed: one load on the hot path
	sw       *atomic.Bool // a registry's switch, set before the breaker is shared; nil: always on
	sync     atomic.Pointer[syncBox]
	setMu    sync.Mutex // guards settings and shape
	settings gobreaker.Settings
	shape    breakerShape
	hooks    atomic.Pointer[breakerHooks]

	// Rejections return these, so an open breaker allocates nothing.
	errOpen, errTooMany *Error
	mService            []metric.AddOption // the service attribute, built once
	mFailures           optCache           // by error.type
	counts              *serviceCounts     // successes and rejections, observed by the metrics
	retired             atomic.Bool        // its registry evicted it: no longer observed

	// cur is the gobreaker instance in use. Reset swaps in a fresh one;
	// calls already admitted by the old one finish against it, and the old
	// one's transitions are no longer reported.
	cur atomic.Pointer[breakerGen]

	// The open period. gobreaker's is fixed at OpenTimeout; a longer one
	// (a failed probe's, a retry hint's) is held here, on the monotonic
	// clock: calls are rejected before gobreaker is asked until hold.
	hold      atomic.Int64 // when a longer open period ends; 0: none
	openEnd   atomic.Int64 // when the current open period ends
	period    atomic.Int64 // the length of the current or last open period
	hintUntil atomic.Int64 // the latest end a failure's retry hint asked for
	tripMin   atomic.Int64 // the open period TripFor asks for
	tripping  atomic.Int32 // > 0: Trip or TripFor is opening the breaker
	streak    int          // failed probes in a row; guarded by evMu
	// lateHalfOpen: gobreaker went half-open during a hold, to be reported
	// when the hold ends; guarded by evMu.
	lateHalfOpen bool

	// Transitions are queued by gobreaker's hook, which runs under
	// gobreaker's mutex, and delivered by flush once that mutex is released.
	evMu       sync.Mutex
	pending    []transition
	npending   atomic.Int32
	delivering bool
	last       State        // the state as of the last queued transition
	lastAtomic atomic.Int32 // last, for lock-free reads on the call path
	since      time.Time    // when it entered that state
	downSince  time.Time    // when it last left closed; zero while closed
	// untraced holds the transitions no call has flushed yet: the next
	// call to flush adds them to its span, whoever delivers them.
	untraced  []transition
	nuntraced atomic.Int32
}

// The bits of CircuitBreaker.mode.
const (
	modeForcedOpen   = 1 << iota // ForceOpen: every call rejected
	modeForcedClosed             // ForceClose: every call let through, uncounted
)

func (cb *CircuitBreaker) setMode(bits int32, on bool) {
	for {
		old := cb.mode.Load()
		m := old &^ bits
		if on {
			m |= bits
		}
		if cb.mode.CompareAndSwap(old, m) {
			return
		}
	}
}

type breakerGen struct {
	gb      *gobreaker.CircuitBreaker[struct{}]
	timeout time.Duration // gobreaker's open period
	slow    *slowWindow   // nil without a sampling window
	force   atomic.Int32  // > 0: the next failure opens, whatever the counts
}

type transition struct{ from, to State }

// The outcome of a call, as gobreaker's done callback is told it.
var (
	errFailure  = errors.New("failure")
	errExcluded = errors.New("excluded")
)

// NewCircuitBreaker returns a circuit breaker configured by cfg, or an error
// that names the first invalid field and its value.
func NewCircuitBreaker(cfg CircuitBreakerConfig) (*CircuitBreaker, error) {
	return newCircuitBreaker(cfg, true)
}

// newCircuitBreaker builds a breaker, observed by the state gauge unless
// it is a keyed breaker, which the service's open_keys gauge counts.
func newCircuitBreaker(cfg CircuitBreakerConfig, observed bool) (*CircuitBreaker, error) {
	rule, shape, err := cfg.resolve()
	if err != nil {
		return nil, err
	}
	cb := &CircuitBreaker{name: cfg.Name, since: time.Now()}
	cb.errOpen = &Error{Err: ErrCircuitOpen, Name: cfg.Name, cb: cb}
	cb.errTooMany = &Error{Err: ErrCircuitOpen, Name: cfg.Name, Cause: gobreaker.ErrTooManyRequests, cb: cb}
	cb.hooks.Store(cfg.hooks())
	cb.mService = addSet(attrService.String(cfg.Name))
	cb.counts = countsFor(cfg.Name)
	cb.rule.Store(rule)
	cb.period.Store(int64(rule.open))
	cb.settings = gobreaker.Settings{
		Name:         cfg.Name,
		IsSuccessful: func(err error) bool { return err == nil },
		IsExcluded:   func(err error) bool { return err == errExcluded },
	}
	cb.setShape(shape)
	cb.cur.Store(cb.newGen())
	if observed {
		observeBreaker(cb)
	}
	return cb, nil
}

// setShape sets what gobreaker fixes at construction. setMu is held, or
// the breaker is not shared yet.
func (cb *CircuitBreaker) setShape(sh breakerShape) {
	cb.shape = sh
	cb.settings.Timeout, cb.settings.MaxRequests = sh.open, sh.probes
	cb.settings.Interval, cb.settings.BucketPeriod = sh.window, sh.window/windowBuckets
}

// newGen returns a fresh gobreaker with the current settings. The caller
// holds setMu until it has stored the generation, so that a generation
// built from settings another goroutine is replacing cannot be stored over
// the one built from the new settings.
func (cb *CircuitBreaker) newGen() *breakerGen {
	g := &breakerGen{timeout: cb.settings.Timeout}
	if cb.shape.window > 0 {
		g.slow = newSlowWindow(cb.shape.window)
	}
	st := cb.settings
	st.OnStateChange = func(_ string, from, to gobreaker.State) { cb.queue(g, fromGobreaker(from), fromGobreaker(to)) }
	st.ReadyToTrip = func(c gobreaker.Counts) bool {
		if g.force.Load() > 0 {
			return true
		}
		r := cb.rule.Load()
		var slow uint32
		if r.slowRatio > 0 {
			slow = g.slow.sum(monotonic())
		}
		return r.trips(c, slow)
	}
	g.gb = gobreaker.NewCircuitBreaker[struct{}](st)
	return g
}

func fromGobreaker(s gobreaker.State) State {
	switch s {
	case gobreaker.StateHalfOpen:
		return StateHalfOpen
	case gobreaker.StateOpen:
		return StateOpen
	}
	return StateClosed
}

func (cb *CircuitBreaker) recordFailure(ctx context.Context, et string) {
	meter().cbFailures.Add(ctx, 1, cb.mFailures.get(et, func() []attribute.KeyValue {
		return []attribute.KeyValue{attrService.String(cb.name), attrErrorType.String(et)}
	})...)
}

func (cb *CircuitBreaker) recordTransition(from, to State) {
	meter().cbTransitions.Add(context.Background(), 1,
		addSet(attrService.String(cb.name), attrFrom.String(from.String()), attrTo.String(to.String()))...)
}

// recordRecovery records the time from a transition out of closed to the
// next back to closed: by a successful probe, or by Reset, an operator's
// word that the downstream recovered. ForceOpen and ForceClose are not
// timed, nor a Reload that closes a half-open breaker.
func (cb *CircuitBreaker) recordRecovery(d time.Duration) {
	meter().cbRecovery.Record(context.Background(), d.Seconds(), recSet(attrService.String(cb.name))...)
}

// lastState is the state as of the last transition, without the lazy move
// from open to half-open that State makes: for the state gauge, which must
// not change what it observes.
func (cb *CircuitBreaker) lastState() State {
	return State(cb.lastAtomic.Load())
}

// OpenTimeout returns the breaker's OpenTimeout, the shortest open period.
// It is safe for concurrent use.
func (cb *CircuitBreaker) OpenTimeout() time.Duration {
	return cb.rule.Load().open
}

// Name returns the breaker's name. It is safe for concurrent use.
func (cb *CircuitBreaker) Name() string { return cb.name }

// Shadow reports whether the breaker runs in shadow mode, never rejecting
// a call. It is safe for concurrent use.
func (cb *CircuitBreaker) Shadow() bool { return cb.rule.Load().shadow }

// State returns the breaker's current state; an open breaker whose open
// period has passed reports (and becomes) half-open. It is safe for
// concurrent use.
func (cb *CircuitBreaker) State() State {
	switch m := cb.mode.Load(); {
	case m&modeForcedOpen != 0:
		return StateOpen
	case m&modeForcedClosed != 0:
		return StateClosed
	}
	s := cb.gbState(cb.cur.Load())
	cb.flush()
	return s
}

// gbState returns g's state, moving it on as gobreaker does when its time
// has come, except while a longer open period holds it open: gobreaker
// would go half-open after OpenTimeout.
func (cb *CircuitBreaker) gbState(g *breakerGen) State {
	if h := cb.hold.Load(); h != 0 {
		if int64(monotonic()) <= h {
			return StateOpen
		}
		cb.endHold(context.Background(), h)
	}
	return fromGobreaker(g.gb.State())
}

// endHold ends the longer open period that ended at h, and reports the move
// to half-open that gobreaker made meanwhile, if it did.
func (cb *CircuitBreaker) endHold(ctx context.Context, h int64) {
	if !cb.hold.CompareAndSwap(h, 0) {
		return
	}
	cb.evMu.Lock()
	if cb.lateHalfOpen {
		cb.lateHalfOpen = false
		if cb.last == StateOpen && cb.mode.Load()&(modeForcedOpen|modeForcedClosed) == 0 {
			cb.transitionLocked(StateOpen, StateHalfOpen)
		}
	}
	cb.evMu.Unlock()
	cb.flushTo(ctx)
}

// held reports whether a longer open period holds the breaker open now.
func (cb *CircuitBreaker) held() bool {
	h := cb.hold.Load()
	return h != 0 && int64(monotonic()) <= h // inclusive, as gobreaker's expiry is
}

// Reset returns the breaker to closed with all counts zeroed, and reports
// that transition to OnStateChange if the breaker was not closed. Calls
// already let through finish without affecting the new state. It is safe for
// concurrent use.
func (cb *CircuitBreaker) Reset() {
	cb.setMu.Lock()
	g := cb.newGen()
	cb.evMu.Lock()
	cb.cur.Store(g)
	cb.setMode(modeForcedOpen|modeForcedClosed, false)
	cb.closedLocked()
	cb.transitionLocked(cb.last, StateClosed)
	cb.evMu.Unlock()
	cb.setMu.Unlock()
	cb.flush()
}

// reconfigure applies a new configuration to a live breaker. The
// thresholds (FailMax, the ratios, MinimumThroughput, SlowCallDuration,
// MaxOpenTimeout, Shadow) take effect at once, for calls in flight too,
// and keep the window's counts. gobreaker fixes OpenTimeout,
// HalfOpenMaxCalls and the sampling window (which exists only with a
// ratio or slow-call trigger) at construction, so changing one of them
// starts the counts afresh; an open breaker stays open for the rest of its
// period, any other closes. IsFailure,
// OnStateChange and Logger are replaced when cfg sets them, and kept when
// it leaves them nil. The transition it may cause is queued, not
// delivered: the caller, which may hold a lock of its own
// (Registry.Reload), calls flush once it has let go.
func (cb *CircuitBreaker) reconfigure(cfg CircuitBreakerConfig) error {
	rule, shape, err := cfg.resolve()
	if err != nil {
		return err
	}
	cb.hooks.Store(keepBreakerCode(cb.hooks.Load().config(), cfg).hooks())
	cb.rule.Store(rule)
	cb.setMu.Lock()
	if cb.shape == shape {
		cb.setMu.Unlock()
		return nil
	}
	cb.setShape(shape)
	// A fresh gobreaker with the new settings, closed; a state an operator
	// forced stays forced, and an open breaker stays open for the rest of
	// its period.
	g := cb.newGen()
	forced := cb.mode.Load()&(modeForcedOpen|modeForcedClosed) != 0
	now := int64(monotonic())
	end := cb.openEnd.Load()
	// Open for the rest of the period only if the period has not ended:
	// an open breaker whose period is over is half-open, and closes here.
	open := cb.lastState() == StateOpen && !forced && end > now
	if open {
		// Opened before it is published, so that no call is admitted by
		// a closed g, and without a transition: it stays open.
		g.force.Add(1)
		g.gb.Execute(func() (struct{}, error) { return struct{}{}, errFailure })
		g.force.Add(-1)
	}
	cb.evMu.Lock()
	cb.cur.Store(g)
	if open {
		cb.lateHalfOpen = false
		if end-now > int64(g.timeout) {
			cb.hold.Store(end)
		} else {
			cb.hold.Store(0)
			cb.openEnd.Store(now + int64(g.timeout))
		}
	} else {
		cb.closedLocked()
		if !forced {
			cb.downSince = time.Time{} // closed by a new shape, not by a recovery
			cb.transitionLocked(cb.last, StateClosed)
		}
	}
	cb.evMu.Unlock()
	cb.setMu.Unlock()
	return nil
}

// ForceOpen opens the breaker and holds it open, rejecting every call, until
// Reset or ForceClose: for an operator who knows a downstream is down, or
// wants it left alone. It reports the transition like any other. It is safe
// for concurrent use.
func (cb *CircuitBreaker) ForceOpen() { cb.force(modeForcedOpen, StateOpen) }

// ForceClose closes the breaker and holds it closed, letting every call
// through without counting it, until Reset or ForceOpen: for an operator
// who knows better than the breaker. It is safe for concurrent use.
func (cb *CircuitBreaker) ForceClose() { cb.force(modeForcedClosed, StateClosed) }

func (cb *CircuitBreaker) force(bit int32, to State) {
	cb.evMu.Lock()
	cb.setMode(modeForcedOpen|modeForcedClosed, false)
	cb.setMode(bit, true)
	// An operator's hold is not the downstream's outage or recovery:
	// resilience.circuit_breaker.recovery_duration times neither.
	cb.downSince = time.Time{}
	cb.transitionLocked(cb.last, to)
	cb.downSince = time.Time{}
	cb.evMu.Unlock()
	cb.flush()
}

// Forced reports whether the breaker's state is held by ForceOpen or
// ForceClose. It is safe for concurrent use.
func (cb *CircuitBreaker) Forced() bool {
	return cb.mode.Load()&(modeForcedOpen|modeForcedClosed) != 0
}

// Since returns when the breaker entered its current state, as of its last
// transition. It is safe for concurrent use.
func (cb *CircuitBreaker) Since() time.Time {
	cb.evMu.Lock()
	defer cb.evMu.Unlock()
	return cb.since
}

// BreakerCounts are a breaker's counts since it last changed state (or, in
// the closed state, since it was built or reset). A breaker with a ratio
// trigger counts over its sampling window: calls older than the window
// are forgotten.
type BreakerCounts struct {
	Requests             uint32 `json:"requests"`
	TotalSuccesses       uint32 `json:"total_successes"`
	TotalFailures        uint32 `json:"total_failures"`
	ConsecutiveSuccesses uint32 `json:"consecutive_successes"`
	ConsecutiveFailures  uint32 `json:"consecutive_failures"`

	// WindowCalls, WindowFailures and WindowSlowCalls are the finished
	// calls the ratios are taken over, the failures among them and the
	// slow successes: over the sampling window, or without one since the
	// last transition.
	WindowCalls     uint32 `json:"window_calls"`
	WindowFailures  uint32 `json:"window_failures"`
	WindowSlowCalls uint32 `json:"window_slow_calls"`
}

// FailureRatio returns WindowFailures/WindowCalls, or 0 without calls.
func (c BreakerCounts) FailureRatio() float64 { return ratio(c.WindowFailures, c.WindowCalls) }

// SlowCallRatio returns WindowSlowCalls/WindowCalls, or 0 without calls.
func (c BreakerCounts) SlowCallRatio() float64 { return ratio(c.WindowSlowCalls, c.WindowCalls) }

func ratio(n, of uint32) float64 {
	if of == 0 {
		return 0
	}
	return float64(n) / float64(of)
}

// Counts returns the breaker's counts. It is safe for concurrent use.
func (cb *CircuitBreaker) Counts() BreakerCounts {
	g := cb.cur.Load()
	cb.gbState(g) // rolls the window to now
	cb.flush()
	c := g.gb.Counts()
	return BreakerCounts{
		c.Requests, c.TotalSuccesses, c.TotalFailures, c.ConsecutiveSuccesses, c.ConsecutiveFailures,
		c.TotalSuccesses + c.TotalFailures, c.TotalFailures, g.slow.sum(monotonic()),
	}
}

// WithCircuitBreaker returns fn protected by cb. While cb is open the
// returned function fails with an error matching [ErrCircuitOpen] without
// calling fn. A panic in fn counts as a failure and propagates; the probe it
// held is always given back, whatever fn does, so the breaker is never left
// stuck half-open by a call that has returned. A nil cb or fn yields a
// function that reports [ErrInvalidConfig].
func WithCircuitBreaker[T any](fn Func[T], cb *CircuitBreaker) Func[T] {
	if fn == nil {
		return failing[T](invalid("WithCircuitBreaker fn", nil, "must not be nil"))
	}
	if cb == nil {
		return failing[T](invalid("WithCircuitBreaker cb", nil, "must not be nil"))
	}
	return newEdge(&pipeline{cb: cb}, "", "", fn, nil, 0)
}

// on reports whether the breaker acts: a disabled registry's breakers let
// every call through, uncounted.
func (cb *CircuitBreaker) on() bool { return cb.sw == nil || cb.sw.Load() }
