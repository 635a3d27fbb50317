package resilience

import (
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// HedgeConfig configures a [Hedge]. The zero value of each field but Delay
// means its documented default. It is a plain value that [NewHedge] copies.
type HedgeConfig struct {
	// Name identifies the hedge in errors and, for a protected function
	// that has no other stable name, in metrics.
	Name string

	// Delay is how long an attempt may go without an answer before another
	// one is sent beside it, and then between further ones. 0 sends them
	// all at once; it must not be negative.
	Delay time.Duration

	// MaxHedges is the most attempts sent beside each attempt of the
	// retry policy. 0 means 1; at most 10.
	MaxHedges int

	// Quantile, in (0, 1), makes the delay that quantile of the latencies
	// of the last 256 answered attempts, never below Delay: 0.95 sends a
	// hedge for the slowest 5% of attempts, whatever their usual speed.
	// Until 32 latencies are known the delay is Delay, and with a Delay of
	// 0 no hedge is sent. 0 means Delay alone.
	Quantile float64

	// Budget, if set, caps the hedges as a share of calls: a hedge it
	// refuses is not sent, and the attempt waits alone. Share it with
	// the retry policy of the same stack to cap retries and hedges
	// together: a call is then counted once. A budget's floor
	// (MinPerSecond) lets that many hedges a second through whatever the
	// calls; a hedge seldom wants one (-1 for none).
	Budget *RetryBudget
}

// Hedge sends another attempt beside one that is slow to answer, and takes
// the first success, as "The Tail at Scale" describes: for idempotent reads
// and auth checks whose p99 is far above their p50. It sits inside the
// retry and outside the rate limit, the per-attempt timeout and the
// bulkhead: every hedged attempt takes its own permit, timeout and slot,
// and the breaker sees one outcome per call.
//
// The first attempt runs in the caller's goroutine, the hedges each in one
// of their own. When one succeeds, the contexts of the others are cancelled
// at once and their results are dropped (an [io.Closer] result, or an
// *http.Response's body, is closed); the call returns when they have
// returned, so that nothing they hold outlives it. If all fail, the last
// error is returned. An attempt that fails before any hedge was sent ends
// the round at once, for the retry policy to decide.
//
// An attempt's context ends when the call returns, as a per-attempt
// timeout's does: a result read after the call returns, such as an
// *http.Response's body, cannot be read through it (use [Transport], which
// keeps a response's attempt open until its body is closed). A call a
// hedge answered is not timed for the breaker's slow-call trigger. Hedges
// are sent for what the first attempt has not answered after the delay,
// its waits for permits and a slot included: under a saturated rate
// limiter, prefer a Delay above the usual wait.
//
// A Hedge is safe for concurrent use by multiple goroutines and may be
// shared by several protected functions. Build it with [NewHedge].
type Hedge struct {
	name   string
	params atomic.Pointer[hedgeParams]
	lat    latencies
	sched  schedule
	sw     *atomic.Bool // a registry's on/off switch; nil means always on
}

// on reports whether the hedge sends hedges: a disabled registry's do not.
func (h *Hedge) on() bool { return h.sw == nil || h.sw.Load() }

type hedgeParams struct {
	delay    time.Duration
	max      int
	quantile float64
	budget   *RetryBudget
}

// maxHedges bounds HedgeConfig.MaxHedges: more parallel copies of one call
// than this is a load test, not a hedge.
const maxHedges = 10

// NewHedge returns a hedge configured by cfg, or an error matching
// [ErrInvalidConfig] that names the first invalid field and its value.
func NewHedge(cfg HedgeConfig) (*Hedge, error) {
	p, err := cfg.params()
	if err != nil {
		return nil, err
	}
	h := &Hedge{name: cfg.Name}
	h.params.Store(p)
	return h, nil
}

func (cfg HedgeConfig) params() (*hedgeParams, error) {
	switch {
	case cfg.Delay < 0:
		return nil, invalid("HedgeConfig.Delay", cfg.Delay, "must not be negative")
	case cfg.MaxHedges < 0 || cfg.MaxHedges > maxHedges:
		return nil, invalid("HedgeConfig.MaxHedges", cfg.MaxHedges, "must be between 0 and 10")
	case math.IsNaN(cfg.Quantile) || cfg.Quantile < 0 || cfg.Quantile >= 1:
		return nil, invalid("HedgeConfig.Quantile", cfg.Quantile, "must be 0, or above 0 and below 1")
	}
	p := &hedgeParams{delay: cfg.Delay, max: cfg.MaxHedges, quantile: cfg.Quantile, budget: cfg.Budget}
	if p.max == 0 {
		p.max = 1
	}
	return p, nil
}

// Name returns the hedge's name.
func (h *Hedge) Name() string { return h.name }

// Delay returns the wait before the next hedge: Delay, or with a Quantile,
// that quantile of recent latencies when it is longer. With a Quantile and
// a Delay of 0, it is negative until 32 latencies are known: no hedge is
// sent before then.
func (h *Hedge) Delay() time.Duration { return h.delay(h.params.Load()) }

func (h *Hedge) delay(p *hedgeParams) time.Duration {
	if p.quantile > 0 {
		q := time.Duration(h.lat.quantile.Load())
		if q > p.delay {
			return q
		}
		if q == 0 && p.delay == 0 {
			// No latency known yet and no floor: sending every hedge
			// at once would multiply the load after each start.
			return noHedgeYet
		}
	}
	return p.delay
}

// noHedgeYet is the delay of a quantile hedge without a floor before it
// has seen latencies: none is sent.
const noHedgeYet = -1

// reconfigure gives a live hedge new parameters, for a registry's Reload.
// A new quantile applies at once, to the latencies already recorded.
func (h *Hedge) reconfigure(p *hedgeParams) {
	h.params.Store(p)
	h.lat.recompute(p.quantile)
}

// WithHedge returns fn with hedged attempts: see [Hedge]. A nil h yields a
// function that reports [ErrInvalidConfig].
func WithHedge[T any](fn Func[T], h *Hedge) Func[T] {
	switch {
	case fn == nil:
		return failing[T](invalid("WithHedge fn", nil, "must not be nil"))
	case h == nil:
		return failing[T](invalid("WithHedge h", nil, "must not be nil"))
	}
	name := ""
	if nameOf(fn) == "" {
		name = h.name
	}
	return newEdge(&pipeline{hedge: h, hedged: true}, name, "", fn, nil, 0)
}

// latencies keeps the latencies of the last answered attempts, for a
// quantile delay. The quantile is recomputed every latencyEvery records,
// into a scratch copy sorted off the record lock, so that a record costs a
// lock and a store.
type latencies struct {
	mu       sync.Mutex
	ring     [latencyWindow]time.Duration
	n, next  int
	since    int
	quantile atomic.Int64

	sorting sync.Mutex // guards scratch; a record that finds it held skips the recompute
	scratch [latencyWindow]time.Duration
}

const (
	latencyWindow = 256
	latencyEvery  = 32
	latencyMin    = 32 // records before a quantile is trusted
)

// add records one latency d and, every latencyEvery records, recomputes
// quantile q.
func (l *latencies) add(d time.Duration, q float64) {
	l.mu.Lock()
	l.ring[l.next] = d
	l.next = (l.next + 1) % latencyWindow
	l.n = min(l.n+1, latencyWindow)
	l.since++
	due := l.since >= latencyEvery
	if due {
		l.since = 0
	}
	l.mu.Unlock()
	if due {
		l.recompute(q)
	}
}

// recompute sets the quantile q of the recorded latencies, or 0 (Delay
// alone) without q or with too few records.
func (l *latencies) recompute(q float64) {
	if !l.sorting.TryLock() {
		return // another goroutine is at it
	}
	defer l.sorting.Unlock()
	l.mu.Lock()
	n := l.n
	copy(l.scratch[:n], l.ring[:n])
	l.mu.Unlock()
	if q <= 0 || n < latencyMin {
		l.quantile.Store(0)
		return
	}
	s := l.scratch[:n]
	slices.Sort(s)
	l.quantile.Store(int64(s[min(int(q*float64(n)), n-1)]))
}
