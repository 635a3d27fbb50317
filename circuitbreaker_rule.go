package resilience

import (
	"context"
	"log/slog"
	"math"
	"sync"
	"time"

	"github.com/sony/gobreaker/v2"
)

// What opens a breaker and for how long: its thresholds, resolved from a
// CircuitBreakerConfig, the window of slow calls kept beside gobreaker's
// own counts, and the length of each open period.

// The defaults of the ratio triggers.
const (
	defaultMinimumThroughput = 20
	defaultSamplingWindow    = 30 * time.Second
	// windowBuckets is the number of buckets a sampling window rolls in:
	// a tenth of the window each.
	windowBuckets = 10
	// hintCapFactor bounds the open period a retry hint asks for when
	// MaxOpenTimeout is not set, as a multiple of OpenTimeout.
	hintCapFactor = 10
	// maxSamplingWindow keeps gobreaker's rounding of the window to whole
	// buckets far from overflow; a longer window says nothing about now.
	maxSamplingWindow = 24 * time.Hour
)

// breakerRule is a breaker's resolved thresholds. It is replaced whole when
// the breaker is reconfigured, so that a call and gobreaker's ReadyToTrip
// always see one consistent rule, and changing it keeps gobreaker's counts.
type breakerRule struct {
	failMax   uint32        // consecutive failures that open; 0: no such trigger
	ratio     float64       // failures/calls that opens; 0: no such trigger
	minCalls  uint32        // calls in the window before a ratio can open
	slow      time.Duration // a success longer than this is slow; 0: none is
	slowRatio float64       // slow calls/calls that opens
	open      time.Duration // OpenTimeout
	maxOpen   time.Duration // the longest open period
	hintCap   time.Duration // the longest open period a retry hint may ask for
	shadow    bool
}

// breakerShape is what gobreaker fixes at construction: changing it starts
// the breaker afresh.
type breakerShape struct {
	open   time.Duration // gobreaker's Timeout: the shortest open period
	probes uint32
	window time.Duration // the sampling window; 0: counts since the last transition
}

// resolve validates cfg and applies its defaults, without building a
// breaker: a breaker built only to validate would show in the metrics.
func (cfg CircuitBreakerConfig) resolve() (*breakerRule, breakerShape, error) {
	ratioBad := func(r float64) bool { return math.IsNaN(r) || r < 0 || r > 1 }
	var err error
	switch {
	case cfg.FailMax < 0:
		err = invalid("CircuitBreakerConfig.FailMax", cfg.FailMax, "must not be negative")
	case cfg.MaxKeys < 0:
		err = invalid("CircuitBreakerConfig.MaxKeys", cfg.MaxKeys, "must not be negative")
	case uint64(cfg.FailMax) > math.MaxUint32:
		err = invalid("CircuitBreakerConfig.FailMax", cfg.FailMax, "must fit in 32 bits")
	case cfg.OpenTimeout < 0:
		err = invalid("CircuitBreakerConfig.OpenTimeout", cfg.OpenTimeout, "must not be negative")
	case cfg.HalfOpenMaxCalls < 0:
		err = invalid("CircuitBreakerConfig.HalfOpenMaxCalls", cfg.HalfOpenMaxCalls, "must not be negative")
	case uint64(cfg.HalfOpenMaxCalls) > math.MaxUint32:
		err = invalid("CircuitBreakerConfig.HalfOpenMaxCalls", cfg.HalfOpenMaxCalls, "must fit in 32 bits")
	case ratioBad(cfg.FailureRatio):
		err = invalid("CircuitBreakerConfig.FailureRatio", cfg.FailureRatio, "must be in (0, 1], or 0 for no ratio trigger")
	case cfg.MinimumThroughput < 0:
		err = invalid("CircuitBreakerConfig.MinimumThroughput", cfg.MinimumThroughput, "must not be negative")
	case uint64(cfg.MinimumThroughput) > math.MaxUint32:
		err = invalid("CircuitBreakerConfig.MinimumThroughput", cfg.MinimumThroughput, "must fit in 32 bits")
	case cfg.SamplingWindow < 0:
		err = invalid("CircuitBreakerConfig.SamplingWindow", cfg.SamplingWindow, "must not be negative")
	case cfg.SamplingWindow > 0 && cfg.SamplingWindow < windowBuckets*time.Millisecond:
		err = invalid("CircuitBreakerConfig.SamplingWindow", cfg.SamplingWindow, "must be at least 10ms: 10 buckets of at least 1ms")
	case cfg.SamplingWindow > maxSamplingWindow:
		err = invalid("CircuitBreakerConfig.SamplingWindow", cfg.SamplingWindow, "must be at most 24h")
	case cfg.SlowCallDuration < 0:
		err = invalid("CircuitBreakerConfig.SlowCallDuration", cfg.SlowCallDuration, "must not be negative")
	case ratioBad(cfg.SlowCallRatio):
		err = invalid("CircuitBreakerConfig.SlowCallRatio", cfg.SlowCallRatio, "must be in (0, 1], or 0 for 1")
	case cfg.MaxOpenTimeout < 0:
		err = invalid("CircuitBreakerConfig.MaxOpenTimeout", cfg.MaxOpenTimeout, "must not be negative")
	}
	if err != nil {
		return nil, breakerShape{}, err
	}
	r := &breakerRule{
		failMax: uint32(cfg.FailMax), ratio: cfg.FailureRatio, minCalls: uint32(cfg.MinimumThroughput),
		slow: cfg.SlowCallDuration, slowRatio: cfg.SlowCallRatio, open: cfg.OpenTimeout,
		maxOpen: cfg.MaxOpenTimeout, shadow: cfg.Shadow,
	}
	if r.failMax == 0 && r.ratio == 0 {
		// Without a ratio, FailMax 0 means 5 as it always has; beside a
		// ratio it means no consecutive trigger.
		r.failMax = 5
	}
	if r.minCalls == 0 {
		r.minCalls = defaultMinimumThroughput
	}
	if r.slow > 0 && r.slowRatio == 0 {
		r.slowRatio = 1
	}
	if r.slow == 0 {
		r.slowRatio = 0
	}
	if r.open == 0 {
		r.open = 60 * time.Second
	}
	if r.maxOpen > 0 && r.maxOpen < r.open {
		return nil, breakerShape{}, invalid("CircuitBreakerConfig.MaxOpenTimeout", cfg.MaxOpenTimeout,
			"must not be below OpenTimeout ("+r.open.String()+")")
	}
	if r.maxOpen == 0 {
		r.maxOpen = r.open
		r.hintCap = satMul(r.open, hintCapFactor)
	} else {
		r.hintCap = r.maxOpen
	}
	sh := breakerShape{open: r.open, probes: uint32(cfg.HalfOpenMaxCalls)}
	if sh.probes == 0 {
		sh.probes = 1
	}
	if r.ratio > 0 || r.slow > 0 {
		sh.window = cfg.SamplingWindow
		if sh.window == 0 {
			sh.window = defaultSamplingWindow
		}
		// A whole number of buckets, so that gobreaker does not round the
		// window up to an eleventh.
		sh.window = sh.window / windowBuckets * windowBuckets
	}
	return r, sh, nil
}

// satMul returns d*n, or the longest duration if that overflows.
func satMul(d time.Duration, n int64) time.Duration {
	if d > math.MaxInt64/time.Duration(n) {
		return math.MaxInt64
	}
	return d * time.Duration(n)
}

// trips reports whether counts, with slow of the calls slow, open the
// breaker. Ratios are compared as quotients, so that 3 failures in 30
// calls meet a FailureRatio of 0.1 as a reader would expect.
func (r *breakerRule) trips(c gobreaker.Counts, slow uint32) bool {
	if r.failMax > 0 && c.ConsecutiveFailures >= r.failMax {
		return true
	}
	calls := uint64(c.TotalSuccesses) + uint64(c.TotalFailures)
	if calls == 0 || calls < uint64(r.minCalls) {
		return false
	}
	// The slow window's buckets follow gobreaker's to within the time
	// between its clock reading and ours: never more slow calls than calls.
	slow = uint32(min(uint64(slow), calls))
	if r.ratio > 0 && float64(c.TotalFailures)/float64(calls) >= r.ratio {
		return true
	}
	return r.slowRatio > 0 && float64(slow)/float64(calls) >= r.slowRatio
}

// period returns the length of an open period: OpenTimeout doubled for
// each failed probe in a row (streak) up to MaxOpenTimeout, and at least
// the downstream's retry hint, up to hintCap.
func (r *breakerRule) period(streak int, hint time.Duration) time.Duration {
	p := r.open
	for range streak {
		if p >= r.maxOpen {
			break
		}
		p = satMul(p, 2)
	}
	p = min(p, r.maxOpen)
	if hint > p {
		p = max(p, min(hint, r.hintCap))
	}
	return p
}

// slowWindow counts a gobreaker generation's slow calls in the buckets
// gobreaker counts its calls in, so that the two make one ratio. gobreaker
// has no count of its own for them. Slow calls are rare and slow by
// definition, so a mutex costs them nothing that matters.
type slowWindow struct {
	mu     sync.Mutex
	start  time.Duration // monotonic: when the counting state began
	bucket time.Duration
	ages   [windowBuckets]int64 // the bucket age each count belongs to
	counts [windowBuckets]uint32
	total  uint32 // as of the latest age seen
	age    int64
}

func newSlowWindow(window time.Duration) *slowWindow {
	w := &slowWindow{bucket: window / windowBuckets}
	w.reset(monotonic())
	return w
}

// reset starts counting afresh, as gobreaker does on every transition.
func (w *slowWindow) reset(now time.Duration) {
	w.mu.Lock()
	w.start, w.total, w.age = now, 0, 0
	w.counts = [windowBuckets]uint32{}
	for i := range w.ages {
		w.ages[i] = -1
	}
	w.mu.Unlock()
}

// roll drops the buckets older than the window as of age. w.mu is held.
func (w *slowWindow) roll(age int64) {
	if age <= w.age {
		return
	}
	w.age = age
	w.total = 0
	for i, a := range w.ages {
		if a >= 0 && age-a < windowBuckets {
			w.total += w.counts[i]
		} else {
			w.ages[i], w.counts[i] = -1, 0
		}
	}
}

// add counts a slow call that started at the monotonic time began, in the
// bucket gobreaker counted it in, unless it started before the current
// counting state (gobreaker ignores it then too) or has left the window.
// It returns the window's slow calls as of now.
func (w *slowWindow) add(began, now time.Duration) uint32 {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.roll(int64((now - w.start) / w.bucket))
	if began < w.start {
		return w.total
	}
	a := int64((began - w.start) / w.bucket)
	if w.age-a >= windowBuckets {
		return w.total
	}
	i := a % windowBuckets
	if w.ages[i] != a {
		w.ages[i], w.counts[i] = a, 0
	}
	w.counts[i]++
	w.total++
	return w.total
}

// sum returns the window's slow calls as of now.
func (w *slowWindow) sum(now time.Duration) uint32 {
	if w == nil {
		return 0
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if now >= w.start {
		w.roll(int64((now - w.start) / w.bucket))
	}
	return w.total
}

// attrs describes the rule in a transition's log record: its thresholds.
func (r *breakerRule) attrs() []slog.Attr {
	a := make([]slog.Attr, 0, 8)
	if r.failMax > 0 {
		a = append(a, slog.Int("fail_max", int(r.failMax)))
	}
	if r.ratio > 0 {
		a = append(a, slog.Float64("failure_ratio", r.ratio))
	}
	if r.slowRatio > 0 {
		a = append(a, slog.Duration("slow_call_duration", r.slow), slog.Float64("slow_call_ratio", r.slowRatio))
	}
	if r.ratio > 0 || r.slowRatio > 0 {
		a = append(a, slog.Int("minimum_throughput", int(r.minCalls)))
	}
	a = append(a, slog.Duration("open_timeout", r.open))
	if r.maxOpen > r.open {
		a = append(a, slog.Duration("max_open_timeout", r.maxOpen))
	}
	if r.shadow {
		a = append(a, slog.String("mode", "shadow"))
	}
	return a
}

// openedLocked starts an open period: OpenTimeout, doubled for each failed
// probe in a row, and at least what a recent failure's retry hint or
// TripFor asked for. gobreaker holds the breaker open for OpenTimeout; a
// longer period is held by guard. It runs under g's mutex and evMu.
func (cb *CircuitBreaker) openedLocked(g *breakerGen) {
	switch {
	case cb.tripping.Load() > 0:
		// Trip or TripFor: an open applied, not a probe that failed.
	case cb.last == StateHalfOpen:
		cb.streak++
	default:
		cb.streak = 0
	}
	now := int64(monotonic())
	hint := time.Duration(cb.tripMin.Load())
	if h := cb.hintUntil.Swap(0); h != 0 {
		// Used once: a later open asks the downstream afresh.
		if h-now > int64(hint) && h-now > 0 {
			hint = time.Duration(h - now)
		}
	}
	p := max(cb.rule.Load().period(cb.streak, hint), g.timeout)
	cb.openUntilLocked(g, p, now, p)
}

// openUntilLocked records an open period of length p that ends rest after
// now (monotonic), held by guard where rest outlasts g's own open period.
// evMu is held.
func (cb *CircuitBreaker) openUntilLocked(g *breakerGen, p time.Duration, now int64, rest time.Duration) {
	end := now + int64(rest)
	if end < now {
		end = math.MaxInt64
	}
	cb.lateHalfOpen = false
	cb.period.Store(int64(p))
	cb.openEnd.Store(end)
	if rest > g.timeout {
		cb.hold.Store(end)
	} else {
		cb.hold.Store(0)
	}
}

// closedLocked ends the open periods' growth. evMu is held.
func (cb *CircuitBreaker) closedLocked() {
	cb.streak = 0
	cb.lateHalfOpen = false
	cb.hintUntil.Store(0)
	cb.hold.Store(0)
	cb.openEnd.Store(0)
	cb.period.Store(int64(cb.rule.Load().open))
}

// OpenPeriod returns the length of the breaker's current open period, or
// of its last one; OpenTimeout once it has closed. A BreakerSync shares it
// so that other processes know when an open ends. It is safe for
// concurrent use.
func (cb *CircuitBreaker) OpenPeriod() time.Duration { return time.Duration(cb.period.Load()) }

// untilProbe returns how long until the breaker lets a probe through: 0
// when it is not open, and -1 when an operator holds it open.
func (cb *CircuitBreaker) untilProbe() time.Duration {
	if cb.mode.Load()&modeForcedOpen != 0 {
		return -1
	}
	if h := cb.hold.Load(); h != 0 {
		// Held open, even if a call that finished meanwhile has moved
		// gobreaker on to half-open.
		if d := h - int64(monotonic()); d >= 0 {
			return time.Duration(d)
		}
	}
	if cb.lastState() != StateOpen {
		return 0
	}
	return time.Duration(max(cb.openEnd.Load()-int64(monotonic()), 0))
}

// noteHint remembers when the wait a failure's retry hint asks for ends,
// so that an open it causes lasts at least that long.
func (cb *CircuitBreaker) noteHint(err error) {
	d := hintOf(err)
	if d <= 0 {
		return
	}
	now := monotonic()
	end := int64(now + d)
	if now > 0 && d > math.MaxInt64-now {
		end = math.MaxInt64
	}
	for {
		cur := cb.hintUntil.Load()
		if (cur != 0 && end <= cur) || cb.hintUntil.CompareAndSwap(cur, end) {
			return
		}
	}
}

// slowCall counts a slow call of g, which ran from began to ended, and
// opens the breaker if the slow-call ratio is reached: gobreaker asks
// ReadyToTrip only after a failure.
func (cb *CircuitBreaker) slowCall(ctx context.Context, r *breakerRule, began, ended time.Duration) {
	cb.counts.slowCalls.Add(1)
	// The current generation: a call that began before it is not counted
	// in it, as gobreaker drops the outcome of an earlier one.
	g := cb.cur.Load()
	if g.slow == nil {
		return // built before a reload added the trigger
	}
	n := g.slow.add(began, ended)
	if r.slowRatio > 0 && cb.lastState() == StateClosed && cb.cur.Load() == g && r.trips(g.gb.Counts(), n) {
		cb.tripGen(g)
		cb.flushTo(ctx)
	}
}

// Trip opens the breaker now, as reaching a threshold would: it goes
// half-open after its open period as usual. A BreakerSync uses it to apply
// an open seen elsewhere; an open breaker stays as it is. It is safe for
// concurrent use.
func (cb *CircuitBreaker) Trip() { cb.TripFor(0) }

// TripFor opens the breaker now for at least d, up to the longest open
// period its configuration allows: a BreakerSync uses it to apply a longer
// open period seen elsewhere. An open breaker stays as it is. It is safe
// for concurrent use.
func (cb *CircuitBreaker) TripFor(d time.Duration) {
	cb.trip(d)
	cb.flush()
}

// trip is TripFor without delivering the transition.
func (cb *CircuitBreaker) trip(d time.Duration) {
	cb.tripping.Add(1)
	cb.tripMin.Store(int64(max(d, 0)))
	if cb.gbState(cb.cur.Load()) == StateHalfOpen {
		// Open whatever probes are in flight: their outcome would
		// close or reopen the breaker against what was asked.
		cb.replaceAndTrip()
	} else {
		cb.tripGen(cb.cur.Load())
	}
	cb.tripMin.Store(0)
	cb.tripping.Add(-1)
}

// MaxOpenPeriod returns the longest open period the breaker allows, which
// bounds OpenFor and TripFor: MaxOpenTimeout if it is set (it caps a retry
// hint's too), else 10 times OpenTimeout, a retry hint's cap. A BreakerSync bounds an open it
// learns of by it too: the open's end comes from another process's clock.
// It is safe for concurrent use.
func (cb *CircuitBreaker) MaxOpenPeriod() time.Duration {
	r := cb.rule.Load()
	return max(r.maxOpen, r.hintCap)
}

// OpenFor opens the breaker, or keeps it open, until d from now: shorter
// or longer than its own open period would be, up to the longest open
// period its configuration allows. A BreakerSync uses it so that every
// process's open ends when the shared one does: a process that tripped on
// its own a little after the others, or that learns of another's failed
// probe while it is still open, goes half-open with the fleet, not a full
// OpenTimeout after its own trip. Unlike TripFor, it changes an
// open breaker's end, and it makes no transition when the breaker is open
// already.
//
// An open adopted from half-open counts as a failed probe, as it is one
// (another process's); an adopted period as long as k doublings of
// OpenTimeout counts as k, so that the next failed probe here doubles what
// the fleet had reached. It reports whether the breaker was not open
// before: whether it made a transition to open. d <= 0, and a breaker held
// by ForceOpen or ForceClose, are left as they are. It is safe for
// concurrent use.
func (cb *CircuitBreaker) OpenFor(d time.Duration) (opened bool) {
	if d <= 0 || cb.Forced() {
		return false
	}
	r := cb.rule.Load()
	d = min(d, cb.MaxOpenPeriod())
	cb.setMu.Lock()
	// gobreaker fixes its open period per instance: a fresh one whose
	// period is no longer than d, opened before it is published, ends the
	// open at d; a longer d is held, as a failed probe's doubled period is.
	// Probes in flight are dropped as stale, as with Trip.
	saved := cb.settings.Timeout
	cb.settings.Timeout = min(d, saved)
	g := cb.newGen()
	cb.settings.Timeout = saved
	g.force.Add(1)
	g.gb.Execute(func() (struct{}, error) { return struct{}{}, errFailure })
	g.force.Add(-1)
	cb.evMu.Lock()
	if cb.mode.Load()&(modeForcedOpen|modeForcedClosed) != 0 {
		cb.evMu.Unlock() // forced meanwhile: the operator decides
		cb.setMu.Unlock()
		return false
	}
	cb.cur.Store(g)
	from := cb.last
	k := 0
	for p := r.open; p < d && p < r.maxOpen; p = satMul(p, 2) {
		k++
	}
	switch from {
	case StateHalfOpen:
		cb.streak = max(cb.streak+1, k)
	case StateOpen:
		cb.streak = max(cb.streak, k)
	default:
		cb.streak = k
	}
	period := d
	if from == StateOpen {
		// Measured from when it opened, as Since and OpenPeriod are read
		// together (a BreakerSync republishes an open as such).
		period += time.Since(cb.since)
	}
	cb.openUntilLocked(g, period, int64(monotonic()), d)
	cb.transitionLocked(from, StateOpen)
	cb.evMu.Unlock()
	cb.setMu.Unlock()
	cb.flush()
	return from != StateOpen
}

// tripGen opens g. gobreaker has no way to set a state, so it feeds g one
// failure that ReadyToTrip is told to take as reaching the threshold.
func (cb *CircuitBreaker) tripGen(g *breakerGen) {
	if cb.gbState(g) == StateOpen {
		return
	}
	g.force.Add(1)
	defer g.force.Add(-1)
	g.gb.Execute(func() (struct{}, error) { return struct{}{}, errFailure })
}
