package resilience

import (
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// AdaptiveAlgorithm chooses how an adaptive bulkhead moves its limit.
type AdaptiveAlgorithm int

const (
	// AdaptiveGradient, the default, follows Netflix concurrency-limits'
	// Gradient2: it compares the latency of each window of calls with a
	// long-term average and shrinks the limit in proportion when calls
	// slow down (queueing downstream), grows it by a small queue
	// allowance while they do not. Overload signals count as the
	// steepest slope.
	AdaptiveGradient AdaptiveAlgorithm = iota
	// AdaptiveAIMD adds one to the limit after a window without overload
	// in which the limit was used, and multiplies it by 0.9 after one
	// with an overload signal, as TCP's congestion avoidance (and Netflix
	// concurrency-limits' AIMDLimit) does. It ignores latency.
	AdaptiveAIMD
)

// String returns "gradient" or "aimd", the names BULKHEAD_<R>_ADAPTIVE
// takes.
func (a AdaptiveAlgorithm) String() string {
	switch a {
	case AdaptiveGradient:
		return "gradient"
	case AdaptiveAIMD:
		return "aimd"
	}
	return "AdaptiveAlgorithm(" + strconv.Itoa(int(a)) + ")"
}

// AdaptiveConfig makes a bulkhead's limit adaptive. The zero value of
// each field means its documented default.
type AdaptiveConfig struct {
	// MinLimit is the lowest the limit goes. 0 means 1.
	MinLimit int
	// MaxLimit is the highest the limit goes. 0 means 10 times the
	// bulkhead's starting Limit.
	MaxLimit int
	// Algorithm is AdaptiveGradient (the default) or AdaptiveAIMD.
	Algorithm AdaptiveAlgorithm
	// Smoothing, in (0, 1], is how far each window moves the gradient's
	// limit toward its new estimate. 0 means 0.2, Gradient2's.
	Smoothing float64
	// Window is how long calls are sampled before the limit moves. 0
	// means 100ms. A window closes only once it holds at least 10 calls,
	// so a quiet bulkhead keeps its limit.
	Window time.Duration
}

const (
	defaultSmoothing     = 0.2
	defaultAdaptWindow   = 100 * time.Millisecond
	adaptMinSamples      = 10
	gradientTolerance    = 1.5  // Gradient2's: latency may grow by half before the limit shrinks
	gradientLongWindow   = 600  // Gradient2's long-term average, in windows
	aimdBackoff          = 0.9  // AIMDLimit's backoffRatio
	gradientMinSlope     = 0.5  // a window never more than halves the estimate
	gradientDecayTrigger = 2.0  // long/short latency ratio past which the long average is pulled down
	gradientDecay        = 0.95 // how far, per window
)

func (cfg *AdaptiveConfig) validate(limit int) error {
	switch {
	case cfg.MinLimit < 0:
		return invalid("AdaptiveConfig.MinLimit", cfg.MinLimit, "must not be negative")
	case cfg.MaxLimit < 0:
		return invalid("AdaptiveConfig.MaxLimit", cfg.MaxLimit, "must not be negative")
	case cfg.MaxLimit > 0 && cfg.MaxLimit < max(cfg.MinLimit, 1):
		return invalid("AdaptiveConfig.MaxLimit", cfg.MaxLimit, "must not be below MinLimit")
	case cfg.Algorithm != AdaptiveGradient && cfg.Algorithm != AdaptiveAIMD:
		return invalid("AdaptiveConfig.Algorithm", cfg.Algorithm, "must be AdaptiveGradient or AdaptiveAIMD")
	case math.IsNaN(cfg.Smoothing) || cfg.Smoothing < 0 || cfg.Smoothing > 1:
		return invalid("AdaptiveConfig.Smoothing", cfg.Smoothing, "must be above 0 and at most 1, or 0 for 0.2")
	case cfg.Window < 0:
		return invalid("AdaptiveConfig.Window", cfg.Window, "must not be negative")
	}
	if limit > maxAdaptiveLimit {
		return invalid("BulkheadConfig.Limit", limit, "must be at most 1073741824 (2^30) for an adaptive bulkhead")
	}
	lo, hi := cfg.bounds(limit)
	if limit < lo || limit > hi {
		return invalid("BulkheadConfig.Limit", limit, "must be between the adaptive MinLimit and MaxLimit")
	}
	return nil
}

// maxAdaptiveLimit caps an adaptive limit, whatever MaxLimit says: the
// estimate is a float64, and a limit near math.MaxInt would not survive
// the round trip. No bulkhead lets a billion calls in at once.
const maxAdaptiveLimit = 1 << 30

// bounds returns the limit's range for a bulkhead starting at limit.
func (cfg *AdaptiveConfig) bounds(limit int) (lo, hi int) {
	lo, hi = min(max(cfg.MinLimit, 1), maxAdaptiveLimit), cfg.MaxLimit
	if hi == 0 {
		hi = max(10*min(limit, maxAdaptiveLimit), lo)
	}
	return lo, min(hi, maxAdaptiveLimit)
}

// adaptive is the state of an adaptive limit: a window of samples, and
// the algorithm's estimate. It is guarded by its own mutex, taken once per
// call that finishes; the bulkhead learns a new limit only when a window
// closes.
type adaptive struct {
	mu        sync.Mutex
	algo      AdaptiveAlgorithm
	lo, hi    float64
	smoothing float64

	estimate float64 // the limit, unrounded
	longRTT  float64 // Gradient2's long-term average latency, ns; 0: none yet
	longN    int     // windows averaged into longRTT, up to gradientLongWindow

	// The window being sampled, counted without the lock: it is taken
	// once a window, by the sample that closes it, so that concurrent
	// calls do not queue on it. The counts are striped over cache lines,
	// so that cores adding at once do not pass one line between them on
	// every call. A sample that lands while a window is being closed may
	// be counted in the next.
	window   atomic.Int64 // ns
	start    atomic.Int64 // monotonic ns the window began; 0: no sample yet
	dropped  atomic.Bool
	maxInUse atomic.Int64
	stripes  [adaptStripes]adaptStripe
}

// adaptStripes is the number of stripes of an adaptive bulkhead's counts:
// more than the cores that usually share one.
const adaptStripes = 8

// adaptStripe is a cache line of a window's counts.
type adaptStripe struct {
	n, sum atomic.Int64
	_      [48]byte
}

func newAdaptive(cfg AdaptiveConfig, limit int) *adaptive {
	a := &adaptive{estimate: float64(limit)}
	a.configure(cfg, limit)
	return a
}

// configure applies cfg, keeping what was learnt; the estimate is moved
// into the new bounds.
func (a *adaptive) configure(cfg AdaptiveConfig, limit int) {
	lo, hi := cfg.bounds(limit)
	a.algo, a.lo, a.hi = cfg.Algorithm, float64(lo), float64(hi)
	a.smoothing = cfg.Smoothing
	if a.smoothing == 0 {
		a.smoothing = defaultSmoothing
	}
	w := cfg.Window
	if w == 0 {
		w = defaultAdaptWindow
	}
	a.window.Store(int64(w))
	a.estimate = min(max(a.estimate, a.lo), a.hi)
}

// reconfigure applies cfg to a live adaptive limit and returns the limit
// to use now: what was learnt, moved into the new bounds.
func (a *adaptive) reconfigure(cfg AdaptiveConfig, limit int) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.configure(cfg, limit)
	return int(a.estimate)
}

// set moves the estimate to limit, within the bounds, and returns it.
func (a *adaptive) set(limit int) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.estimate = min(max(float64(limit), a.lo), a.hi)
	return int(a.estimate)
}

// sample records one call that took rtt with inUse calls inside when it
// started, overloaded or not, at now. It returns the new limit when this
// sample closed a window and the limit moved, else 0.
func (a *adaptive) sample(now, rtt time.Duration, inUse int, overload bool) int {
	// The clock's low bits pick the stripe: calls of different cores
	// rarely end in the same nanosecond.
	st := &a.stripes[uint64(now)%adaptStripes]
	st.n.Add(1)
	st.sum.Add(int64(rtt))
	if overload && !a.dropped.Load() {
		a.dropped.Store(true)
	}
	for m := a.maxInUse.Load(); int64(inUse) > m && !a.maxInUse.CompareAndSwap(m, int64(inUse)); m = a.maxInUse.Load() {
	}
	start := a.start.Load()
	if start == 0 {
		a.start.CompareAndSwap(0, int64(now))
		return 0
	}
	if now-time.Duration(start) < time.Duration(a.window.Load()) {
		return 0
	}
	if !a.mu.TryLock() {
		return 0 // another sample is closing the window, or a Reload is on
	}
	defer a.mu.Unlock()
	var n int64
	for i := range a.stripes {
		n += a.stripes[i].n.Load()
	}
	if n < adaptMinSamples || a.start.Load() != start {
		return 0 // too few calls yet, or closed by another sample just now
	}
	w := window{dropped: a.dropped.Load(), maxInUse: a.maxInUse.Load()}
	for i := range a.stripes {
		w.n += a.stripes[i].n.Swap(0)
		w.sum += a.stripes[i].sum.Swap(0)
	}
	a.dropped.Store(false)
	a.maxInUse.Store(0)
	a.start.Store(int64(now))
	before := int(a.estimate)
	switch a.algo {
	case AdaptiveAIMD:
		a.aimd(w)
	default:
		a.gradient(w)
	}
	if after := int(a.estimate); after != before {
		return after
	}
	return 0
}

// window is what a closed window of samples says.
type window struct {
	n, sum   int64
	dropped  bool
	maxInUse int64
}

// aimd is Netflix concurrency-limits' AIMDLimit: multiply by the backoff
// ratio after an overload, else add one if the limit was used (at least
// half of it), so that an idle bulkhead does not grow without evidence.
func (a *adaptive) aimd(w window) {
	switch {
	case w.dropped:
		a.estimate = max(a.lo, math.Floor(a.estimate*aimdBackoff))
	case float64(w.maxInUse)*2 >= a.estimate:
		a.estimate = min(a.hi, a.estimate+1)
	}
}

// gradient is Netflix concurrency-limits' Gradient2Limit, fed the mean
// latency of a window (their WindowedLimit with an average sample):
//
//	gradient = clamp(tolerance * longRTT / shortRTT, 0.5, 1)
//	new      = estimate * gradient + queue, queue = sqrt(estimate)
//	estimate = estimate * (1 - smoothing) + new * smoothing
//
// The long-term latency is an exponential average over 600 windows, pulled
// down faster when it is twice the short one (the load has passed). A
// window that was not used to half the limit does not grow it. An overload
// signal in the window is the steepest slope, 0.5, without the allowance.
func (a *adaptive) gradient(w window) {
	short := float64(w.sum) / float64(w.n)
	if short <= 0 {
		short = 1
	}
	if a.longN < gradientLongWindow {
		a.longN++
	}
	if a.longRTT == 0 {
		a.longRTT = short
	} else {
		a.longRTT += (short - a.longRTT) / float64(a.longN)
	}
	if a.longRTT/short > gradientDecayTrigger {
		a.longRTT *= gradientDecay
	}
	slope := min(1, max(gradientMinSlope, gradientTolerance*a.longRTT/short))
	queue := math.Sqrt(a.estimate)
	switch {
	case w.dropped:
		// Overloaded: the steepest slope, and no allowance to grow, or
		// the limit would settle at 4 (x/2 + sqrt(x) = x) however
		// overloaded the downstream.
		slope, queue = gradientMinSlope, 0
	case float64(w.maxInUse) < a.estimate/2:
		return // app-limited: no evidence the limit could be higher
	}
	next := a.estimate*slope + queue
	next = a.estimate*(1-a.smoothing) + next*a.smoothing
	a.estimate = min(a.hi, max(a.lo, next))
}
