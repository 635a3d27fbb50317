package resilience

import (
	"context"
	"math"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/metric"
	"golang.org/x/time/rate"
)

// RateLimiterConfig configures a [RateLimiter]. The zero value of each field
// but Limit means its documented default.
type RateLimiterConfig struct {
	// Name identifies the limiter in errors and metrics, usually after the
	// downstream whose limit it keeps ("llm").
	Name string
	// Limit is the number of permits granted per Per. It must be positive.
	Limit float64
	// Per is the period Limit is counted over. 0 means 1s; LLM providers
	// count per minute.
	Per time.Duration
	// Burst is the most permits granted at once, after a quiet spell. 0
	// means the ceiling of Limit, at least 1.
	Burst int
	// MaxWait is the longest a caller waits for its permits. 0 means until
	// its context is done.
	MaxWait time.Duration
	// FailFast rejects a call that would have to wait, with
	// [ErrRateLimited], instead of waiting.
	FailFast bool
}

// RateLimiter paces calls to a downstream that limits requests or tokens
// per period, so that a service with many goroutines waits for its turn
// instead of spending its quota on 429s. It grants permits at Limit per Per
// in bursts of at most Burst (a token bucket: golang.org/x/time/rate), can
// be charged after the fact for permits a call turned out to use (the
// tokens of an LLM answer), and paused until a provider's reset.
//
// A RateLimiter is safe for concurrent use by multiple goroutines. Build it
// with [NewRateLimiter]; the zero value is not usable.
type RateLimiter struct {
	name     string
	lim      *rate.Limiter
	burst    atomic.Int64
	maxWait  atomic.Int64 // ns
	failFast atomic.Bool
	sw       *atomic.Bool // a registry's switch; nil: always on
	global   atomic.Pointer[globalBox]

	pause atomic.Int64 // unix ns: no permit before; 0: none

	credit            atomic.Int64 // permits given back, taken before the bucket's
	granted, rejected atomic.Uint64
	waiting           atomic.Int64
	mWait             []metric.RecordOption // the name attribute, built once
}

// RateLimiterStats are a rate limiter's counts since it was built.
type RateLimiterStats struct {
	Granted, Rejected uint64
	Waiting           int
}

// NewRateLimiter returns a rate limiter configured by cfg, or an error that
// names the first invalid field and its value.
func NewRateLimiter(cfg RateLimiterConfig) (*RateLimiter, error) {
	lim, burst, err := cfg.resolve()
	if err != nil {
		return nil, err
	}
	l := &RateLimiter{name: cfg.Name, lim: rate.NewLimiter(lim, burst)}
	l.set(cfg, burst)
	l.mWait = recSet(attrName.String(cfg.Name))
	observeRateLimiter(l)
	return l, nil
}

func (l *RateLimiter) set(cfg RateLimiterConfig, burst int) {
	l.burst.Store(int64(burst))
	l.maxWait.Store(int64(cfg.MaxWait))
	l.failFast.Store(cfg.FailFast)
}

// reconfigure applies cfg to a live limiter, keeping the permits it has
// granted and its debt.
func (l *RateLimiter) reconfigure(cfg RateLimiterConfig) error {
	lim, burst, err := cfg.resolve()
	if err != nil {
		return err
	}
	now := time.Now()
	l.lim.SetLimitAt(now, lim)
	l.lim.SetBurstAt(now, burst)
	l.set(cfg, burst)
	return nil
}

// resolve validates cfg and applies its defaults.
func (cfg RateLimiterConfig) resolve() (rate.Limit, int, error) {
	switch {
	case math.IsNaN(cfg.Limit) || math.IsInf(cfg.Limit, 0) || cfg.Limit <= 0:
		return 0, 0, invalid("RateLimiterConfig.Limit", cfg.Limit, "must be positive")
	case cfg.Per < 0:
		return 0, 0, invalid("RateLimiterConfig.Per", cfg.Per, "must not be negative")
	case cfg.Burst < 0:
		return 0, 0, invalid("RateLimiterConfig.Burst", cfg.Burst, "must not be negative")
	case cfg.MaxWait < 0:
		return 0, 0, invalid("RateLimiterConfig.MaxWait", cfg.MaxWait, "must not be negative")
	}
	per := cfg.Per
	if per == 0 {
		per = time.Second
	}
	burst := cfg.Burst
	if burst == 0 {
		burst = int(min(math.Ceil(cfg.Limit), math.MaxInt32))
	}
	return rate.Limit(cfg.Limit / per.Seconds()), burst, nil
}

// on reports whether the limiter acts: a disabled registry's limiters
// grant every permit.
func (l *RateLimiter) on() bool { return l.sw == nil || l.sw.Load() }

// Name returns the limiter's name. It is safe for concurrent use.
func (l *RateLimiter) Name() string { return l.name }

// Stats returns the permits granted and refused so far and the callers
// waiting now. It is safe for concurrent use.
func (l *RateLimiter) Stats() RateLimiterStats {
	return RateLimiterStats{Granted: l.granted.Load(), Rejected: l.rejected.Load(), Waiting: int(l.waiting.Load())}
}

// Allow takes n permits if they are free now, without waiting. It is safe
// for concurrent use.
func (l *RateLimiter) Allow(n int) bool {
	now := time.Now()
	if n <= 0 || !l.on() {
		return true
	}
	if now.UnixNano() < l.pause.Load() {
		l.rejected.Add(1)
		return false
	}
	if n = l.fromCredit(n); n == 0 {
		l.granted.Add(1)
		return true
	}
	if !l.lim.AllowN(now, n) {
		l.rejected.Add(1)
		return false
	}
	l.granted.Add(1)
	return true
}

// Wait takes n permits, waiting for them as the limiter's configuration
// allows. A wait that could never be granted (n > Burst), that FailFast
// forbids, or that would end after MaxWait or the context's deadline is
// not started: Wait returns at once an [*Error] matching [ErrRateLimited]
// whose RetryAfter says when the permits would be free. A caller that
// gives up while waiting gets its permits back and an error matching its
// context's. It is safe for concurrent use.
func (l *RateLimiter) Wait(ctx context.Context, n int) error {
	if n <= 0 || !l.on() {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if int64(n) > l.burst.Load() {
		l.rejected.Add(1)
		traceRateLimited(ctx, l.name, n, -1)
		return &Error{Err: ErrRateLimited, Name: l.name, retryIn: -1}
	}
	now := time.Now()
	need := n // what the bucket must give, after the permits given back
	if l.pause.Load() <= now.UnixNano() {
		if need = l.fromCredit(n); need == 0 {
			return l.grant(ctx, n)
		}
	}
	r := l.lim.ReserveN(now, need)
	delay := r.DelayFrom(now)
	if p := l.pause.Load(); now.UnixNano() < p {
		delay = max(delay, time.Duration(p-now.UnixNano()))
	}
	if delay <= 0 {
		return l.grant(ctx, n)
	}
	deadline, hasDeadline := ctx.Deadline()
	maxWait := time.Duration(l.maxWait.Load())
	if l.failFast.Load() || (maxWait > 0 && delay > maxWait) || (hasDeadline && !now.Add(delay).Before(deadline)) {
		r.CancelAt(now)
		l.giveBack(n - need)
		l.rejected.Add(1)
		traceRateLimited(ctx, l.name, n, delay)
		return &Error{Err: ErrRateLimited, Name: l.name, retryIn: delay}
	}
	return l.sleep(ctx, r, delay, n, need)
}

// sleep waits delay for the permits r reserved, or gives them back when
// ctx is done first. It is out of Wait so that Wait has no defer: with
// Wait's many returns its defers were not open-coded, and every return, a
// granted permit's too, called runtime.deferreturn.
func (l *RateLimiter) sleep(ctx context.Context, r *rate.Reservation, delay time.Duration, n, need int) error {
	l.waiting.Add(1)
	defer l.waiting.Add(-1)
	t := time.NewTimer(delay)
	defer t.Stop()
	start := time.Now()
	select {
	case <-t.C:
		meter().rlWait.Record(ctx, delay.Seconds(), l.mWait...)
		traceRateLimitWait(ctx, l.name, n, delay, true)
		return l.grant(ctx, n)
	case <-ctx.Done():
		r.Cancel()
		l.giveBack(n - need)
		traceRateLimitWait(ctx, l.name, n, time.Since(start), false)
		return ctx.Err()
	}
}

// grant completes a grant of n local permits with the shared limit's, if
// any.
func (l *RateLimiter) grant(ctx context.Context, n int) error {
	if b := l.global.Load(); b != nil {
		if err := l.takeGlobal(ctx, b, n); err != nil {
			return err
		}
	}
	l.granted.Add(1)
	return nil
}

// Charge takes n more permits without waiting, for use found after the
// fact (the tokens an answer really used beyond its estimate): the
// limiter goes into debt, and later callers wait for it. It is safe for
// concurrent use.
func (l *RateLimiter) Charge(n int) {
	if !l.on() {
		return
	}
	now := time.Now()
	// At most maxDebtBursts bursts of debt: a count gone wrong must not
	// stop the limiter for ever, nor loop here for ever.
	n = int(min(int64(n), l.burst.Load()*maxDebtBursts))
	for n > 0 {
		k := min(n, int(l.burst.Load()))
		l.lim.ReserveN(now, k) // never cancelled: the debt stands
		n -= k
	}
}

// maxDebtBursts bounds the debt Charge runs up, in bursts.
const maxDebtBursts = 100

// maxUnix is the latest time UnixNano can say.
var maxUnix = time.Unix(0, math.MaxInt64)

// unixNano is t.UnixNano, saturated: after 2262 it is undefined.
func unixNano(t time.Time) int64 {
	if t.After(maxUnix) {
		return math.MaxInt64
	}
	return t.UnixNano()
}

// fromCredit takes what it can of n from the permits given back, and
// returns what is left to take.
func (l *RateLimiter) fromCredit(n int) int {
	for {
		c := l.credit.Load()
		if c <= 0 {
			return n
		}
		// Credit stands for permits the bucket lacks: as it refills, the
		// credit is worth less, so that a burst is never exceeded.
		room := l.burst.Load() - int64(l.lim.TokensAt(time.Now()))
		if room <= 0 {
			l.credit.CompareAndSwap(c, 0)
			return n
		}
		k := min(c, int64(n), room)
		if l.credit.CompareAndSwap(c, c-k) {
			return n - int(k)
		}
	}
}

// giveBack returns n permits a call took but did not use, up to what the
// bucket lacks of a burst: never more than a burst at once.
func (l *RateLimiter) giveBack(n int) {
	if n <= 0 {
		return
	}
	room := l.burst.Load() - int64(l.lim.TokensAt(time.Now()))
	for {
		c := l.credit.Load()
		next := max(min(c+int64(n), room), 0)
		if l.credit.CompareAndSwap(c, next) {
			return
		}
	}
}

// PauseUntil grants no permit before t, as a provider that said its window
// is spent until t asks. An earlier t than a pause already set changes
// nothing. It is safe for concurrent use.
func (l *RateLimiter) PauseUntil(t time.Time) {
	end := unixNano(t)
	for {
		cur := l.pause.Load()
		if end <= cur || l.pause.CompareAndSwap(cur, end) {
			return
		}
	}
}

// WithRateLimit returns fn paced by l: each call takes one permit first,
// and fails with an error matching [ErrRateLimited] when it cannot have
// it. A nil fn or l yields a function that reports [ErrInvalidConfig].
func WithRateLimit[T any](fn Func[T], l *RateLimiter) Func[T] {
	if fn == nil {
		return failing[T](invalid("WithRateLimit fn", nil, "must not be nil"))
	}
	if l == nil {
		return failing[T](invalid("WithRateLimit l", nil, "must not be nil"))
	}
	return newEdge(&pipeline{limiter: l}, "", "", fn, nil, 0)
}
