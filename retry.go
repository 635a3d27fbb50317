package resilience

import (
	"fmt"
	"math"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
)

// defaultMaxDelay is RetryConfig.MaxDelay when it is 0.
const defaultMaxDelay = 10 * time.Second

// RetryStrategy chooses how the wait between attempts grows.
type RetryStrategy int

// The retry strategies, with the delay before retry n (n = 1, 2, ...) for an
// InitialDelay d. Every delay is capped at MaxDelay.
const (
	// RetryExponential waits d x Multiplier^(n-1): 1s, 2s, 4s, 8s...
	RetryExponential RetryStrategy = iota
	// RetryLinear waits d x n: 1s, 2s, 3s, 4s...
	RetryLinear
	// RetryFixed waits d every time: 1s, 1s, 1s...
	RetryFixed
	// RetryRandom waits a uniformly random time in [0, d x Multiplier^(n-1)]:
	// 0-1s, 0-2s, 0-4s... It is random by nature; jitter adds nothing.
	RetryRandom
)

// String returns "exponential", "linear", "fixed" or "random".
func (s RetryStrategy) String() string {
	switch s {
	case RetryExponential:
		return "exponential"
	case RetryLinear:
		return "linear"
	case RetryFixed:
		return "fixed"
	case RetryRandom:
		return "random"
	}
	return "RetryStrategy(" + formatValue(int(s)) + ")"
}

// RetryConfig configures a [Retry]. The zero value of each field means its
// documented default; the zero RetryConfig retries 3 attempts in all,
// exponentially from 1s with jitter, up to 10s.
type RetryConfig struct {
	// MaxAttempts is the number of attempts in all, the first included.
	// 0 means 3; 1 means no retries.
	MaxAttempts int

	// Strategy is how the delay grows. The zero value is RetryExponential.
	Strategy RetryStrategy

	// InitialDelay is the first delay. 0 means 1s, or MaxDelay if that is
	// smaller.
	InitialDelay time.Duration

	// MaxDelay caps every delay, jitter included. A Retry-After hint longer
	// than MaxDelay ends the retries instead. 0 means 10s.
	MaxDelay time.Duration

	// Multiplier is the exponential base. 0 means 2; it must not be below 1.
	Multiplier float64

	// DisableJitter turns off jitter, which is on by default: each delay of
	// the exponential, linear and fixed strategies is spread uniformly over
	// [0.5, 1.5] times itself (then capped), so that callers that failed
	// together do not retry together.
	DisableJitter bool

	// RetryIf decides whether an error is worth another attempt. nil means
	// IsRetryable.
	RetryIf func(error) bool

	// OnRetry, if set, is called before each wait with the number of the
	// attempt that just failed (from 1), its error and the wait.
	OnRetry func(attempt int, err error, delay time.Duration)

	// Budget, if set, caps retries at a share of recent calls; a retry it
	// refuses ends the call with ErrRetryBudgetExhausted. Share one budget
	// among the policies that call the same downstream. nil means no cap.
	Budget *RetryBudget

	// Delay, if set, chooses the wait before a retry by the error: when it
	// returns true, its delay replaces the strategy's for that wait, still
	// capped by MaxDelay and still overridden by a server's hint. Return 0
	// and true for a refused connection worth retrying at once, false to
	// keep the strategy's backoff. attempt is the number of the attempt
	// that failed, from 1.
	Delay func(attempt int, err error) (time.Duration, bool)
}

// Retry calls a function again when it fails with a retryable error, waiting
// between attempts as its strategy says.
//
// An error with a RetryAfter() time.Duration method sets the next wait
// itself, as a server's Retry-After would: a hint no longer than MaxDelay is
// waited exactly (0 retries at once), a longer one ends the retries at once,
// since retrying before the server asked only earns another refusal, and a
// negative duration means no hint, leaving the wait to the strategy. Waits
// end as soon as the caller's context is done: the error then matches the
// context's error and the last attempt's error. When the retries end, the
// error matches both [ErrRetryExhausted] and the last attempt's error, and
// errors.As to [*Error] gives the attempt count and, through
// [Error.RetryAfter], the last hint. A non-retryable error comes back as it
// was.
//
// A Retry holds only its configuration; the state of a call's backoff is
// built per call, and only once a first attempt has failed. A Retry is safe
// for concurrent use by multiple goroutines. Build it with [NewRetry]; the
// zero value is not usable.
type Retry struct {
	p  atomic.Pointer[retryParams]
	sw *atomic.Bool // a registry's switch, set before the Retry is shared; nil: always on
}

// retryParams is a Retry's configuration with defaults applied. It is
// replaced whole, never modified, so a call reads one consistent set.
type retryParams struct {
	maxAttempts int
	strategy    RetryStrategy
	initial     time.Duration
	max         time.Duration
	multiplier  float64
	jitter      bool
	retryIf     func(error) bool
	onRetry     func(attempt int, err error, delay time.Duration)
	delay       func(attempt int, err error) (time.Duration, bool)
	budget      *RetryBudget
}

// NewRetry returns a retry policy configured by cfg, or an error that names
// the first invalid field and its value.
func NewRetry(cfg RetryConfig) (*Retry, error) {
	if cfg.MaxAttempts < 0 {
		return nil, invalid("RetryConfig.MaxAttempts", cfg.MaxAttempts, "must not be negative")
	}
	if cfg.Strategy < RetryExponential || cfg.Strategy > RetryRandom {
		return nil, invalid("RetryConfig.Strategy", int(cfg.Strategy), "unknown strategy")
	}
	if cfg.InitialDelay < 0 {
		return nil, invalid("RetryConfig.InitialDelay", cfg.InitialDelay, "must not be negative")
	}
	if cfg.MaxDelay < 0 {
		return nil, invalid("RetryConfig.MaxDelay", cfg.MaxDelay, "must not be negative")
	}
	if math.IsNaN(cfg.Multiplier) || math.IsInf(cfg.Multiplier, 0) {
		return nil, invalid("RetryConfig.Multiplier", cfg.Multiplier, "must be a finite number")
	}
	if cfg.Multiplier != 0 && cfg.Multiplier < 1 {
		return nil, invalid("RetryConfig.Multiplier", cfg.Multiplier, "must not be below 1")
	}
	r := &retryParams{
		maxAttempts: cfg.MaxAttempts,
		strategy:    cfg.Strategy,
		initial:     cfg.InitialDelay,
		max:         cfg.MaxDelay,
		multiplier:  cfg.Multiplier,
		jitter:      !cfg.DisableJitter,
		retryIf:     cfg.RetryIf,
		onRetry:     cfg.OnRetry,
		delay:       cfg.Delay,
		budget:      cfg.Budget,
	}
	if r.maxAttempts == 0 {
		r.maxAttempts = 3
	}
	if r.max == 0 {
		r.max = defaultMaxDelay
	}
	if r.initial == 0 {
		r.initial = min(time.Second, r.max)
	} else if r.initial > r.max {
		field, value := "RetryConfig.InitialDelay", r.initial
		if cfg.MaxDelay != 0 {
			field, value = "RetryConfig.MaxDelay", cfg.MaxDelay
		}
		return nil, invalid(field, value, fmt.Sprintf("MaxDelay (%v) must not be below InitialDelay (%v)", r.max, r.initial))
	}
	if r.multiplier == 0 {
		r.multiplier = 2
	}
	rt := &Retry{}
	rt.p.Store(r)
	return rt, nil
}

func (r *Retry) params() *retryParams { return r.p.Load() }

// reconfigure applies a new configuration; calls in flight keep the one they
// started with.
func (r *Retry) reconfigure(cfg RetryConfig) error {
	n, err := NewRetry(cfg)
	if err != nil {
		return err
	}
	r.p.Store(n.params())
	return nil
}

// MaxAttempts returns the number of attempts in all, the first included. It
// is safe for concurrent use.
func (r *Retry) MaxAttempts() int { return r.params().maxAttempts }

func (r *retryParams) retryable(err error) bool {
	if r.retryIf != nil {
		return r.retryIf(err)
	}
	return IsRetryable(err)
}

// on reports whether the retry acts: a disabled registry's retry makes one
// attempt.
func (r *Retry) on() bool { return r.sw == nil || r.sw.Load() }

// WithRetry returns fn protected by r. A first attempt that succeeds costs
// one call and a nil check: no backoff state is built for it. A nil r or fn
// yields a function that reports [ErrInvalidConfig].
func WithRetry[T any](fn Func[T], r *Retry) Func[T] {
	if fn == nil {
		return failing[T](invalid("WithRetry fn", nil, "must not be nil"))
	}
	if r == nil {
		return failing[T](invalid("WithRetry r", nil, "must not be nil"))
	}
	return newEdge(&pipeline{retry: r}, "", "", fn, nil, 0)
}

// delays is one call's backoff state, built on the first failure.
type delays struct {
	r   *retryParams
	bo  backoff.BackOff
	exp *backoff.ExponentialBackOff // for RetryRandom: the upper bound
}

func (r *retryParams) newBackOff() *delays {
	d := &delays{r: r}
	switch r.strategy {
	case RetryExponential, RetryRandom:
		// RandomizationFactor 0: backoff's own jitter can exceed MaxInterval
		// and overflow for large intervals, so jitter is applied here,
		// after the growth, in floating point, and capped.
		e := &backoff.ExponentialBackOff{
			InitialInterval: r.initial,
			Multiplier:      r.multiplier,
			MaxInterval:     r.max,
			Stop:            backoff.Stop,
			Clock:           backoff.SystemClock,
		}
		e.Reset()
		d.exp = e
		d.bo = e
	case RetryFixed:
		d.bo = backoff.NewConstantBackOff(r.initial)
	case RetryLinear:
		d.bo = &linearBackOff{initial: r.initial, max: r.max}
	}
	return d
}

// next returns the strategy's wait before the next attempt.
func (d *delays) next() time.Duration {
	base := d.bo.NextBackOff()
	switch {
	case d.r.strategy == RetryRandom:
		// Uint64N: the bound + 1 overflows int64 when MaxDelay is the
		// largest Duration (found by FuzzRetryDelays).
		return time.Duration(rand.Uint64N(uint64(clampDelay(base, d.r.max)) + 1))
	case d.r.jitter:
		return jitter(base, d.r.max, rand.Float64())
	}
	return clampDelay(base, d.r.max)
}

// jitter spreads d uniformly over [0.5d, 1.5d] for r in [0, 1), capped at
// max. The arithmetic is in float64 so that 1.5d cannot overflow.
func jitter(d, max time.Duration, r float64) time.Duration {
	f := float64(d) * (0.5 + r)
	if !(f < float64(max)) { // also catches NaN
		return max
	}
	if f < 0 {
		return 0
	}
	return time.Duration(f)
}

func clampDelay(d, max time.Duration) time.Duration {
	if d < 0 {
		return 0
	}
	if d > max {
		return max
	}
	return d
}

// linearBackOff waits initial x n for the nth retry, saturating at max.
type linearBackOff struct {
	initial, max time.Duration
	n            int64
}

func (l *linearBackOff) NextBackOff() time.Duration {
	l.n++
	if l.initial > 0 && l.n > int64(l.max/l.initial) {
		return l.max
	}
	return l.initial * time.Duration(l.n)
}

func (l *linearBackOff) Reset() { l.n = 0 }
