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
	// breaker. 0 means 5.
	FailMax int

	// OpenTimeout is how long the breaker stays open before it lets probes
	// through (half-open). 0 means 60s.
	OpenTimeout time.Duration

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
// It opens after FailMax consecutive failures, rejects calls with
// [ErrCircuitOpen] while open, lets HalfOpenMaxCalls probes through after
// OpenTimeout, and closes again when they succeed. It is built on
// sony/gobreaker v2 and, unlike gobreaker's own type, is not generic: one
// breaker serves wrappers of any result type.
//
// A CircuitBreaker is safe for concurrent use by multiple goroutines. Build it
// with [NewCircuitBreaker]; the zero value is not usable.
type CircuitBreaker struct {
	name     string
	failMax  atomic.Int64
	mode     atomic.Int32 // modeForcedOpen, modeForcedClosed: one load on the hot path
	sw       *atomic.Bool // a registry's switch, set before the breaker is shared; nil: always on
	sync     atomic.Pointer[syncBox]
	setMu    sync.Mutex // guards settings
	settings gobreaker.Settings
	hooks    atomic.Pointer[breakerHooks]

	// Rejections return these, so an open breaker allocates nothing.
	errOpen, errTooMany *Error
	mService            []metric.AddOption // the service attribute, built once
	mFailures           optCache           // by error.type
	counts              *serviceCounts     // successes and rejections, observed by the metrics

	// cur is the gobreaker instance in use. Reset swaps in a fresh one;
	// calls already admitted by the old one finish against it, and the old
	// one's transitions are no longer reported.
	cur atomic.Pointer[breakerGen]

	// Transitions are queued by gobreaker's hook, which runs under
	// gobreaker's mutex, and delivered by flush once that mutex is released.
	evMu       sync.Mutex
	pending    []transition
	npending   atomic.Int32
	delivering bool
	last       State        // the state as of the last queued transition
	lastAtomic atomic.Int32 // last, for lock-free reads on the call path
	since      time.Time    // when it entered that state
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
	gb *gobreaker.CircuitBreaker[struct{}]
}

type transition struct{ from, to State }

// The outcome of a call, as gobreaker's done callback is told it.
var (
	errFailure  = errors.New("failure")
	errExcluded = errors.New("excluded")
)

// resolve validates cfg and applies its defaults, without building a
// breaker: a breaker built only to validate would show in the metrics.
func (cfg CircuitBreakerConfig) resolve() (failMax int, openTimeout time.Duration, probes int, err error) {
	switch {
	case cfg.FailMax < 0:
		return 0, 0, 0, invalid("CircuitBreakerConfig.FailMax", cfg.FailMax, "must not be negative")
	case cfg.OpenTimeout < 0:
		return 0, 0, 0, invalid("CircuitBreakerConfig.OpenTimeout", cfg.OpenTimeout, "must not be negative")
	case cfg.HalfOpenMaxCalls < 0:
		return 0, 0, 0, invalid("CircuitBreakerConfig.HalfOpenMaxCalls", cfg.HalfOpenMaxCalls, "must not be negative")
	case uint64(cfg.HalfOpenMaxCalls) > 1<<32-1:
		return 0, 0, 0, invalid("CircuitBreakerConfig.HalfOpenMaxCalls", cfg.HalfOpenMaxCalls, "must fit in 32 bits")
	}
	failMax, openTimeout, probes = cfg.FailMax, cfg.OpenTimeout, cfg.HalfOpenMaxCalls
	if failMax == 0 {
		failMax = 5
	}
	if openTimeout == 0 {
		openTimeout = 60 * time.Second
	}
	if probes == 0 {
		probes = 1
	}
	return failMax, openTimeout, probes, nil
}

// NewCircuitBreaker returns a circuit breaker configured by cfg, or an error
// that names the first invalid field and its value.
func NewCircuitBreaker(cfg CircuitBreakerConfig) (*CircuitBreaker, error) {
	failMax, openTimeout, probes, err := cfg.resolve()
	if err != nil {
		return nil, err
	}
	cb := &CircuitBreaker{
		name:       cfg.Name,
		since:      time.Now(),
		errOpen:    &Error{Err: ErrCircuitOpen, Name: cfg.Name},
		errTooMany: &Error{Err: ErrCircuitOpen, Name: cfg.Name, Cause: gobreaker.ErrTooManyRequests},
	}
	cb.hooks.Store(cfg.hooks())
	cb.mService = addSet(attrService.String(cfg.Name))
	cb.counts = countsFor(cfg.Name)
	cb.failMax.Store(int64(failMax))
	cb.settings = gobreaker.Settings{
		Name:        cfg.Name,
		MaxRequests: uint32(probes),
		Timeout:     openTimeout,
		ReadyToTrip: func(c gobreaker.Counts) bool {
			return int64(c.ConsecutiveFailures) >= cb.failMax.Load()
		},
		IsSuccessful: func(err error) bool { return err == nil },
		IsExcluded:   func(err error) bool { return err == errExcluded },
	}
	cb.cur.Store(cb.newGen())
	observeBreaker(cb)
	return cb, nil
}

// newGen returns a fresh gobreaker with the current settings. The caller
// holds setMu until it has stored the generation, so that a generation
// built from settings another goroutine is replacing cannot be stored over
// the one built from the new settings.
func (cb *CircuitBreaker) newGen() *breakerGen {
	g := &breakerGen{}
	st := cb.settings
	st.OnStateChange = func(_ string, from, to gobreaker.State) { cb.queue(g, fromGobreaker(from), fromGobreaker(to)) }
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

// lastState is the state as of the last transition, without the lazy move
// from open to half-open that State makes: for the state gauge, which must
// not change what it observes.
func (cb *CircuitBreaker) lastState() State {
	return State(cb.lastAtomic.Load())
}

// OpenTimeout returns how long the breaker stays open before it lets a
// probe through: a BreakerSync shares it so that other processes know when
// an open ends. It is safe for concurrent use.
func (cb *CircuitBreaker) OpenTimeout() time.Duration {
	cb.setMu.Lock()
	defer cb.setMu.Unlock()
	return cb.settings.Timeout
}

// Name returns the breaker's name. It is safe for concurrent use.
func (cb *CircuitBreaker) Name() string { return cb.name }

// State returns the breaker's current state; an open breaker whose
// OpenTimeout has passed reports (and becomes) half-open. It is safe for
// concurrent use.
func (cb *CircuitBreaker) State() State {
	switch m := cb.mode.Load(); {
	case m&modeForcedOpen != 0:
		return StateOpen
	case m&modeForcedClosed != 0:
		return StateClosed
	}
	s := cb.cur.Load().gb.State()
	cb.flush()
	return fromGobreaker(s)
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
	cb.transitionLocked(cb.last, StateClosed)
	cb.evMu.Unlock()
	cb.setMu.Unlock()
	cb.flush()
}

// reconfigure applies a new configuration to a live breaker. FailMax takes
// effect at once, for calls in flight too. gobreaker fixes OpenTimeout and
// HalfOpenMaxCalls at construction, so changing either starts the breaker
// afresh, closed, as Reset does. IsFailure, OnStateChange and Logger are
// replaced when cfg sets them, and kept when it leaves them nil. The
// transition it may cause is queued, not delivered: the caller, which may
// hold a lock of its own (Registry.Reload), calls flush once it has let go.
func (cb *CircuitBreaker) reconfigure(cfg CircuitBreakerConfig) error {
	failMax, openTimeout, probes, err := cfg.resolve()
	if err != nil {
		return err
	}
	cb.hooks.Store(keepBreakerCode(cb.hooks.Load().config(), cfg).hooks())
	cb.failMax.Store(int64(failMax))
	cb.setMu.Lock()
	defer cb.setMu.Unlock()
	if cb.settings.Timeout == openTimeout && cb.settings.MaxRequests == uint32(probes) {
		return nil
	}
	cb.settings.Timeout, cb.settings.MaxRequests = openTimeout, uint32(probes)
	// A fresh gobreaker with the new settings, closed; a state an operator
	// forced stays forced.
	g := cb.newGen()
	cb.evMu.Lock()
	cb.cur.Store(g)
	if cb.mode.Load()&(modeForcedOpen|modeForcedClosed) == 0 {
		cb.transitionLocked(cb.last, StateClosed)
	}
	cb.evMu.Unlock()
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
	cb.transitionLocked(cb.last, to)
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
// the closed state, since it was built or reset).
type BreakerCounts struct {
	Requests             uint32 `json:"requests"`
	TotalSuccesses       uint32 `json:"total_successes"`
	TotalFailures        uint32 `json:"total_failures"`
	ConsecutiveSuccesses uint32 `json:"consecutive_successes"`
	ConsecutiveFailures  uint32 `json:"consecutive_failures"`
}

// Counts returns the breaker's counts. It is safe for concurrent use.
func (cb *CircuitBreaker) Counts() BreakerCounts {
	c := cb.cur.Load().gb.Counts()
	return BreakerCounts{c.Requests, c.TotalSuccesses, c.TotalFailures, c.ConsecutiveSuccesses, c.ConsecutiveFailures}
}

// The stages of a call through guard.
const (
	callNotRun   = iota // rejected by gobreaker
	probeDenied         // a half-open probe another process holds
	callRunning         // fn running, or it panicked or called Goexit
	callReturned        // fn returned
)

// guard runs call if the breaker admits it, through gobreaker's Execute,
// whose closure does not escape, so that admission allocates nothing (its
// two-step API allocates a done func per call). call returns the outcome
// for gobreaker: nil, errFailure or errExcluded. guard returns the
// rejection, or nil once call has run, with counted false when the breaker
// is disabled or forced closed and call ran uncounted. A panic in call
// counts as a failure and propagates, and a runtime.Goexit, which gobreaker
// does not see, is repaired so that no probe is lost.
func (cb *CircuitBreaker) guard(ctx context.Context, call func() error) (counted bool, rejected error) {
	if m := cb.mode.Load(); m != 0 || !cb.on() {
		if m&modeForcedOpen != 0 && cb.on() {
			cb.counts.rejections.Add(1)
			return false, cb.errOpen
		}
		call() // disabled, or forced closed: not counted
		return false, nil
	}
	g := cb.cur.Load()
	stage := callNotRun
	var panicked any
	defer func() {
		if stage != callRunning {
			return
		}
		if panicked == nil {
			cb.goexited(g)
		}
		cb.flush()
		cb.recordFailure(ctx, "panic")
	}()
	_, err := g.gb.Execute(func() (struct{}, error) {
		cb.flush() // deliver open -> half-open before asking the sync
		if sb := cb.sync.Load(); sb != nil && cb.lastState() == StateHalfOpen && !sb.s.AllowProbe(ctx, cb.name) {
			// Another process is probing: give the probe back uncounted.
			stage = probeDenied
			return struct{}{}, errExcluded
		}
		stage = callRunning
		defer func() {
			if stage == callRunning {
				// Tell a panic from a Goexit, then let gobreaker count it.
				if r := recover(); r != nil {
					panicked = r
					panic(r)
				}
			}
		}()
		o := call()
		stage = callReturned
		return struct{}{}, o
	})
	cb.flush()
	switch stage {
	case callNotRun:
		cb.counts.rejections.Add(1)
		if err == gobreaker.ErrTooManyRequests {
			return false, cb.errTooMany
		}
		return false, cb.errOpen
	case probeDenied:
		cb.counts.rejections.Add(1)
		return false, cb.errTooMany
	}
	return true, nil
}

// goexited repairs gobreaker after a call that called runtime.Goexit:
// gobreaker counted the request but, recovering nothing, never its outcome,
// and in the half-open state that probe would be held for ever. It counts
// the failure a panic would have been.
func (cb *CircuitBreaker) goexited(g *breakerGen) {
	if cb.cur.Load() != g {
		return
	}
	if g.gb.State() == gobreaker.StateHalfOpen {
		cb.setMu.Lock()
		n := cb.newGen()
		cb.evMu.Lock()
		cb.cur.Store(n)
		cb.evMu.Unlock()
		cb.setMu.Unlock()
		cb.tripGen(n)
		return
	}
	g.gb.Execute(func() (struct{}, error) { return struct{}{}, errFailure })
}

// outcome maps a call's result to what gobreaker should count.
func (cb *CircuitBreaker) outcome(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		// The caller gave up: that says nothing about the downstream.
		return errExcluded
	}
	if errors.Is(err, ErrBulkheadFull) {
		// Local saturation: the call never reached the downstream.
		return errExcluded
	}
	if f := cb.hooks.Load().isFailure; f != nil && !f(err) {
		return nil
	}
	return errFailure
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
