package resilience

import (
	"math"
	"math/rand/v2"
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
	// long-term one and shrinks the limit in proportion when calls slow
	// down (queueing downstream), grows it by a small queue allowance
	// while they do not. Overload signals count as the steepest slope.
	// Unlike Gradient2, its long-term latency is the downstream's
	// latency without load, which it measures now and then by lowering
	// the limit for one window, as TCP BBR's ProbeRTT does: see
	// AdaptiveConfig.
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
	//
	// The gradient probes with windows too. After its first used window,
	// and then after one in every 5 to 100 (the interval doubles while
	// probes find the same baseline, and returns to 5 when one does not),
	// it admits only a quarter of the limit (at least MinLimit) for a
	// probe window, and that window's mean latency becomes the baseline
	// that later windows are compared with. A probe window closes after
	// Window once as many calls begun in it as it admits (at most 10)
	// have ended: about one call's time for slow calls. A probe still
	// open after four windows or three baselines, whichever is longer
	// (its calls stopped), is abandoned. Limit and
	// resilience.bulkhead.limit report the learnt limit throughout; a
	// FailFast bulkhead or Shed rejects more calls during a probe.
	Window time.Duration
}

const (
	defaultSmoothing   = 0.2
	defaultAdaptWindow = 100 * time.Millisecond
	adaptMinSamples    = 10
	aimdBackoff        = 0.9     // AIMDLimit's backoffRatio
	gradientMinSlope   = 0.5     // a window never more than halves the estimate
	probeDivisor       = 4       // a probe admits a quarter of the limit
	probeMinEvery      = 5       // windows between probes, after one that moved the baseline
	probeMaxEvery      = 100     // and at most, while probes agree
	probeSame          = 0.1     // a probe within 10% of the baseline agrees with it
	sampleAll          = 1 << 32 // sampleBelow when every call is timed
	sampleTarget       = 64      // timed calls a window, when there are more calls
	sampleMin          = 256     // at least one call in this many is timed
	probeRise          = 0.25
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
// the algorithm's estimate. Its fields below the mutex are guarded by it,
// taken once per window by the sample that closes it; the bulkhead learns
// a new limit only then.
type adaptive struct {
	mu        sync.Mutex
	algo      AdaptiveAlgorithm
	lo, hi    float64
	smoothing float64

	estimate   float64 // the limit, unrounded
	baseline   float64 // the gradient's no-load latency, ns; 0: none yet
	sinceProbe int     // windows closed since the last probe
	probeEvery int     // windows between probes, probeMinEvery to probeMaxEvery
	probe      int     // the limit a probe admits while it runs; 0: none
	probeSeq   uint64  // probes started, to tell a stale probe deadline
	probeArmed uint64  // the probe whose deadline is armed
	shown      [2]int  // the limit and admission last returned by sample

	// probeFrom is when the running probe began, monotonic ns; 0: none.
	// A call that began before it ran at the old limit, and is not
	// sampled.
	probeFrom atomic.Int64

	// The window being sampled, counted without the lock: it is taken
	// once a window, by the sample that closes it, so that concurrent
	// calls do not queue on it. The counts are striped over cache lines,
	// so that cores adding at once do not pass one line between them on
	// every call. A sample that lands while a window is being closed may
	// be counted in the next.
	// sampleBelow is the chance that a call is timed and sampled, as a
	// threshold on a random uint32 (sampleAll: every call). Reading the
	// clock twice costs more than the rest of a sample: a busy bulkhead
	// times only about sampleTarget calls a window, which tell its mean
	// latency as well as all of them would.
	sampleBelow atomic.Uint64

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
	a := &adaptive{estimate: float64(limit), probeEvery: 1}
	a.sampleBelow.Store(sampleAll)
	a.configure(cfg, limit)
	a.shown = [2]int{int(a.estimate), int(a.estimate)}
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
	a.stopProbe()
}

// stopProbe ends a running probe without reading it.
func (a *adaptive) stopProbe() {
	a.probe = 0
	a.probeFrom.Store(0)
	a.shown = [2]int{int(a.estimate), int(a.estimate)}
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
	a.stopProbe()
	return int(a.estimate)
}

// timed reports whether to time the call that is starting and sample it.
func (a *adaptive) timed() bool {
	t := a.sampleBelow.Load()
	return t == sampleAll || uint64(rand.Uint32()) < t
}

// overloaded records an overload signal from a call that was not timed:
// rare, and too important to leave to chance.
func (a *adaptive) overloaded() {
	if !a.dropped.Load() {
		a.dropped.Store(true)
	}
}

// sample records one timed call that ended at now after rtt, with inUse calls
// inside, overloaded or not. When this sample closed a window and the
// limit moved, it returns the learnt limit and the number of calls to
// admit, which is lower while a probe runs; else 0, 0.
func (a *adaptive) sample(now, rtt time.Duration, inUse int, overload bool) (limit, admit int) {
	if overload {
		a.overloaded() // whenever the call began: every overload counts
	}
	if from := a.probeFrom.Load(); from != 0 && int64(now-rtt) < from {
		return 0, 0 // began before the probe: its latency is the old limit's
	}
	// The clock's low bits pick the stripe: calls of different cores
	// rarely end in the same nanosecond.
	st := &a.stripes[uint64(now)%adaptStripes]
	st.n.Add(1)
	st.sum.Add(int64(rtt))
	for m := a.maxInUse.Load(); int64(inUse) > m && !a.maxInUse.CompareAndSwap(m, int64(inUse)); m = a.maxInUse.Load() {
	}
	start := a.start.Load()
	if start == 0 {
		a.start.CompareAndSwap(0, int64(now))
		return 0, 0
	}
	if now-time.Duration(start) < time.Duration(a.window.Load()) {
		return 0, 0
	}
	if !a.mu.TryLock() {
		return 0, 0 // another sample is closing the window, or a Reload is on
	}
	defer a.mu.Unlock()
	var n int64
	for i := range a.stripes {
		n += a.stripes[i].n.Load()
	}
	if a.start.Load() != start {
		return 0, 0 // closed by another sample just now
	}
	need := int64(adaptMinSamples)
	if a.probe > 0 {
		// A probe admits few calls: as many as it admits will do, so
		// that a probe of slow calls lasts about one call, not ten.
		need = int64(min(adaptMinSamples, max(a.probe, 2)))
	}
	if n < need {
		// Too few timed calls yet: time more of them.
		a.sampleBelow.Store(min(sampleAll, 2*a.sampleBelow.Load()))
		return 0, 0
	}
	w := window{dropped: a.dropped.Swap(false), maxInUse: a.maxInUse.Swap(0)}
	for i := range a.stripes {
		w.n += a.stripes[i].n.Swap(0)
		w.sum += a.stripes[i].sum.Swap(0)
	}
	// Time about sampleTarget calls of the next window, if it is as busy.
	calls := float64(w.n) * sampleAll / float64(a.sampleBelow.Load())
	a.sampleBelow.Store(uint64(min(1, max(1.0/sampleMin, sampleTarget/calls)) * sampleAll))
	a.start.Store(int64(now))
	switch {
	case a.probe > 0:
		a.probed(w)
	case a.algo == AdaptiveAIMD:
		a.aimd(w)
	default:
		a.gradient(w, now)
	}
	shown := [2]int{int(a.estimate), int(a.estimate)}
	if a.probe > 0 {
		shown[1] = a.probe
	}
	if shown == a.shown {
		return 0, 0
	}
	a.shown = shown
	return shown[0], shown[1]
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
//	gradient = clamp(baseline / shortRTT, 0.5, 1)
//	new      = estimate * gradient + queue, queue = sqrt(estimate) / 2
//	estimate = estimate * (1 - smoothing) + new * smoothing
//
// A window that was not used to half the limit does not grow it. An
// overload signal in the window is the steepest slope, 0.5, without the
// allowance.
//
// Gradient2's long-term latency is an average of the short ones, so it
// takes whatever latency the limit starts in as normal: started in
// congestion, it never shrinks (docs/RELIABILITY.md §8 measured it). Here
// the long-term latency is a baseline without load, as TCP Vegas's and
// BBR's minimum RTT: the mean of a probe window (see AdaptiveConfig.Window
// and probed), lowered by any faster window since. Since the baseline has
// no queueing in it, Gradient2's tolerance of 1.5 becomes 1, and the queue
// allowance is the only headroom: the limit rests where the latency is
// baseline / (1 - queue/limit). With Gradient2's sqrt(limit) that is 1.46x
// at a limit of 10 and 2x at 4, which left the p99 of TestAdaptiveLimit
// at 1.6 to 2.0x; half of it rests at 1.19x at 10 and 1.33x at 4, and
// still grows a limit of 9 by 10% a second.
func (a *adaptive) gradient(w window, now time.Duration) {
	short := float64(w.sum) / float64(w.n)
	if short <= 0 {
		short = 1
	}
	if a.baseline == 0 || short < a.baseline {
		a.baseline = short
	}
	slope := min(1, max(gradientMinSlope, a.baseline/short))
	queue := math.Sqrt(a.estimate) / 2
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
	if a.sinceProbe++; a.sinceProbe >= a.probeEvery {
		if p := max(a.lo, math.Floor(a.estimate/probeDivisor)); p < math.Floor(a.estimate) {
			a.probe = int(p)
			a.probeSeq++
			a.probeFrom.Store(int64(now))
			a.sampleBelow.Store(sampleAll) // few calls: time them all
		}
		a.sinceProbe = 0
	}
}

// probed reads a probe's window. A faster probe is the new baseline at
// once: the last one was still congested. A slower one raises it by a
// quarter of the difference, so that a downstream that slows down for
// everyone, not from this bulkhead's load, still shrinks the limit for a
// while (as Gradient2's slow long-term average does) and the baseline
// follows it within a few probes. Probes come less often while they agree
// with the baseline, and often again when one does not.
func (a *adaptive) probed(w window) {
	a.probe = 0
	a.probeFrom.Store(0)
	if w.dropped {
		// Overloaded even at a quarter of the limit: not a latency
		// without load, and a reason to back off as any overloaded
		// window is. Probe again soon.
		next := a.estimate*(1-a.smoothing) + a.estimate*gradientMinSlope*a.smoothing
		a.estimate = min(a.hi, max(a.lo, next))
		a.probeEvery = probeMinEvery
		return
	}
	short := max(float64(w.sum)/float64(w.n), 1)
	if math.Abs(short-a.baseline) <= probeSame*a.baseline {
		a.probeEvery = min(2*a.probeEvery, probeMaxEvery)
	} else {
		a.probeEvery = probeMinEvery
	}
	if short < a.baseline {
		a.baseline = short
	} else {
		a.baseline += (short - a.baseline) * probeRise
	}
}

// probeDeadline is how long a probe may run before it is abandoned: its
// window, four times over, or three times the baseline latency, whichever
// is longer. A probe whose calls stopped, or never came, must not hold the
// bulkhead at a quarter of its limit. a.mu is held.
func (a *adaptive) probeDeadline() time.Duration {
	return max(4*time.Duration(a.window.Load()), 3*time.Duration(a.baseline))
}

// abandonProbe ends probe number seq, if it still runs, without reading
// it: the limit is back, and the baseline as it was. a.mu is held.
func (a *adaptive) abandonProbe(seq uint64) {
	if a.probe == 0 || a.probeSeq != seq {
		return
	}
	a.probe = 0
	a.probeFrom.Store(0)
	a.shown = [2]int{int(a.estimate), int(a.estimate)}
}
