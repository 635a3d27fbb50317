package resilience

import (
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// ErrRetryBudgetExhausted reports a retry that a [RetryBudget] refused: the
// retries of recent calls had used up their share. It also matches
// [ErrRetryExhausted], since either way the call was not retried again.
var ErrRetryBudgetExhausted error = budgetError{}

type budgetError struct{}

func (budgetError) Error() string { return "retry budget exhausted" }

// Is makes ErrRetryBudgetExhausted match ErrRetryExhausted.
func (budgetError) Is(target error) bool { return target == ErrRetryExhausted }

// RetryBudgetConfig configures a [RetryBudget]. The zero value of each field
// means its documented default.
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

	// Window is how far back calls and retries count. 0 means 10s.
	Window time.Duration
}

// RetryBudget caps retries at a share of recent calls, as Envoy's
// retry_budget and gRPC's retry throttling do, so that retries cannot
// multiply the load on a downstream that is already failing: with a budget,
// a retry storm is bounded by 1 + Ratio times the calls, plus the floor.
//
// Share one budget between the [Retry] policies that call the same
// downstream. A call costs one atomic add; the clock is read only when a
// retry asks for budget. A RetryBudget is safe for concurrent use by
// multiple goroutines. Build it with [NewRetryBudget]; the zero value is not
// usable.
type RetryBudget struct {
	ratio    float64
	floor    float64 // retries allowed per window whatever the calls
	window   time.Duration
	calls    atomic.Int64 // since the budget was made
	retries  atomic.Int64 // allowed since the budget was made
	mu       sync.Mutex
	snaps    [budgetSlots]budgetSnap // a ring, oldest at head
	head, n  int
	interval time.Duration // between snapshots
}

// budgetSlots is the number of snapshots a window is cut into: the budget
// forgets calls and retries a slot at a time.
const budgetSlots = 10

type budgetSnap struct {
	at             time.Time
	calls, retries int64
}

// NewRetryBudget returns a retry budget configured by cfg, or an error that
// names the first invalid field and its value.
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
	b := &RetryBudget{ratio: cfg.Ratio, window: cfg.Window}
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
	b.interval = b.window / budgetSlots
	b.snaps[0] = budgetSnap{at: time.Now()}
	b.n = 1
	return b, nil
}

// deposit counts a call: it earns its share of a retry.
func (b *RetryBudget) deposit() { b.calls.Add(1) }

// withdraw asks for one retry and reports whether the budget allows it.
func (b *RetryBudget) withdraw() bool {
	now := time.Now()
	b.mu.Lock()
	defer b.mu.Unlock()
	calls, retries := b.calls.Load(), b.retries.Load()
	// Forget what is older than the window, a slot at a time; keep one
	// snapshot as the base.
	for b.n > 1 && now.Sub(b.snaps[(b.head+1)%budgetSlots].at) >= b.window {
		b.head = (b.head + 1) % budgetSlots
		b.n--
	}
	base := b.snaps[b.head]
	if now.Sub(base.at) >= b.window {
		// Even the newest snapshot is out of the window: start afresh
		// rather than credit calls made long ago.
		b.snaps[b.head] = budgetSnap{at: now, calls: calls, retries: retries}
		base = b.snaps[b.head]
	}
	last := b.snaps[(b.head+b.n-1)%budgetSlots]
	if now.Sub(last.at) >= b.interval {
		if b.n == budgetSlots {
			b.head = (b.head + 1) % budgetSlots
			b.n--
		}
		b.snaps[(b.head+b.n)%budgetSlots] = budgetSnap{at: now, calls: calls, retries: retries}
		b.n++
	}
	allowed := b.floor + b.ratio*float64(calls-base.calls)
	if float64(retries-base.retries+1) > allowed {
		return false
	}
	b.retries.Add(1)
	return true
}

// budgetExhausted is the error of a call whose retry the budget refused.
func budgetExhausted(attempts int, last error) error {
	return &Error{Err: ErrRetryBudgetExhausted, Attempts: attempts, Cause: last}
}
