package resilience

import (
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// ErrRetryBudgetExhausted reports a retry that a [RetryBudget] refused: the
// retries of recent calls had used up their share. It also matches
// [ErrRetryExhausted], since either way the call was not retried again. It
// is never modified, so any goroutine may compare errors with it.
var ErrRetryBudgetExhausted error = budgetError{}

type budgetError struct{}

func (budgetError) Error() string { return "retry budget exhausted" }

// Is makes ErrRetryBudgetExhausted match ErrRetryExhausted.
func (budgetError) Is(target error) bool { return target == ErrRetryExhausted }

// RetryBudgetConfig configures a [RetryBudget]. The zero value of each field
// means its documented default. It is a plain value that [NewRetryBudget]
// copies, so one config may be shared between goroutines as long as none
// of them writes to it.
type RetryBudgetConfig struct {
	// Ratio is the number of retries allowed per call over the window:
	// 0.1 lets 10 retries in for every 100 calls, so retries add at most
	// 10% to the load on the downstream, whatever its failure rate.
	// 0 means 0.1; it must not be above 1.
	Ratio float64

	// MinPerSecond is a floor of retries allowed per second however few
	// calls there are, so that a quiet service still retries its rare
	// failures. 0 means 10; use a negative value for no floor.
	MinPerSecond float64

	// Window is how far back calls and retries count. 0 means 10s. The
	// budget forgets a tenth of the window at a time, so what it counts at
	// any instant is between nine tenths of the window and all of it, never
	// more.
	Window time.Duration
}

// RetryBudget caps retries at a share of recent calls, as Envoy's
// retry_budget and gRPC's retry throttling do, so that retries cannot
// multiply the load on a downstream that is already failing: with a budget,
// a retry storm is bounded by 1 + Ratio times the calls, plus the floor.
//
// Share one budget between the [Retry] policies that call the same
// downstream. A call costs a clock read and an atomic add, whatever the
// load: the window is a ring of ten buckets that calls fill as they come,
// so a long run of successes with no retry still earns the retries of the
// failures that follow it. A RetryBudget is safe for concurrent use by
// multiple goroutines. Build it with [NewRetryBudget]; the zero value is not
// usable.
type RetryBudget struct {
	ratio  float64
	floor  float64 // retries allowed per window whatever the calls
	window time.Duration
	// start is read through the monotonic clock (time.Since), so a wall
	// clock step neither ages calls out early nor keeps them too long; it
	// belongs to the budget rather than the package so that a budget made
	// inside a testing/synctest bubble runs on the bubble's clock.
	start    time.Time
	interval time.Duration // the span of one bucket, a tenth of the window
	// mu serializes the reuse of a bucket for a new period, so that it is
	// reset once, and withdrawals, so that a retry is checked against the
	// budget and counted in one step.
	mu      sync.Mutex
	buckets [budgetSlots]budgetBucket
}

// budgetSlots is the number of buckets a window is cut into: the budget
// forgets calls and retries a bucket at a time. More buckets would follow
// the window more closely at the cost of a longer sum on every retry.
const budgetSlots = 10

// budgetBucket counts the calls and granted retries of one period, the
// interval number period since the budget's start. The bucket of period p
// is reused for period p + budgetSlots.
type budgetBucket struct {
	period  atomic.Int64
	calls   atomic.Int64
	retries atomic.Int64
}

// NewRetryBudget returns a retry budget configured by cfg, or an error that
// names the first invalid field and its value. The budget's window starts
// now. It is safe to call from any goroutine.
func NewRetryBudget(cfg RetryBudgetConfig) (*RetryBudget, error) {
	if math.IsNaN(cfg.Ratio) || cfg.Ratio < 0 || cfg.Ratio > 1 {
		return nil, invalid("RetryBudgetConfig.Ratio", cfg.Ratio, "must be between 0 and 1")
	}
	if math.IsNaN(cfg.MinPerSecond) || math.IsInf(cfg.MinPerSecond, 0) {
		return nil, invalid("RetryBudgetConfig.MinPerSecond", cfg.MinPerSecond, "must be a finite number")
	}
	if cfg.Window < 0 {
		return nil, invalid("RetryBudgetConfig.Window", cfg.Window, "must not be negative")
	}
	b := &RetryBudget{ratio: cfg.Ratio, window: cfg.Window, start: time.Now()}
	if b.ratio == 0 {
		b.ratio = 0.1
	}
	if b.window == 0 {
		b.window = 10 * time.Second
	}
	perSecond := cfg.MinPerSecond
	switch {
	case perSecond == 0:
		perSecond = 10
	case perSecond < 0:
		perSecond = 0
	}
	b.floor = perSecond * b.window.Seconds()
	// Rounding down keeps the ten buckets within the window; a window under
	// ten nanoseconds cannot be cut that fine and spans ten.
	b.interval = max(b.window/budgetSlots, 1)
	return b, nil
}

// period is the number of the bucket interval that now falls in.
func (b *RetryBudget) period() int64 {
	// Before the start only if the budget was made outside the synctest
	// bubble it is used in; count such calls in the first period rather
	// than index the ring with a negative number.
	return int64(max(time.Since(b.start), 0) / b.interval)
}

// deposit counts a call: it earns its share of a retry. It runs on every
// call, so the lock is taken only when the call is the first of its period.
func (b *RetryBudget) deposit() {
	p := b.period()
	k := &b.buckets[p%budgetSlots]
	if k.period.Load() != p {
		b.mu.Lock()
		b.rotate(k, p)
		b.mu.Unlock()
	}
	// A goroutine descheduled for a whole window between the clock read
	// and this add may count its call in the bucket's newer period, or
	// into counts about to be reset; either way off by one call, and far
	// cheaper than tagging every add with its period.
	k.calls.Add(1)
}

// rotate makes k the bucket of period p, unless it already is or is for a
// later period: a caller whose clock read is stale must not turn a bucket
// back and wipe newer counts. b.mu must be held, so that of the callers
// that saw the old period only the first resets the counts.
func (b *RetryBudget) rotate(k *budgetBucket, p int64) {
	if k.period.Load() >= p {
		return
	}
	// The counts are cleared before the period is published: a depositor
	// that sees the new period then adds to the cleared counts, and one
	// that does not yet see it waits on the lock.
	k.calls.Store(0)
	k.retries.Store(0)
	k.period.Store(p)
}

// withdraw asks for one retry and reports whether the budget allows it.
func (b *RetryBudget) withdraw() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	// The clock is read under the lock: every rotation happens under it
	// too, after its own clock read, so no bucket is ahead of p.
	p := b.period()
	var calls, retries int64
	for i := range b.buckets {
		k := &b.buckets[i]
		// A bucket last used more than a window ago still holds its old
		// counts; they must not count.
		if q := k.period.Load(); q > p-budgetSlots && q <= p {
			calls += k.calls.Load()
			retries += k.retries.Load()
		}
	}
	if float64(retries+1) > b.floor+b.ratio*float64(calls) {
		return false
	}
	k := &b.buckets[p%budgetSlots]
	b.rotate(k, p)
	k.retries.Add(1)
	return true
}
