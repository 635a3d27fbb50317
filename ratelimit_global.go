package resilience

import (
	"context"
	"time"
)

// A rate limit shared by a fleet: each replica keeps its local limiter, and
// a permit also takes from the fleet's limit in a shared store, so that
// three replicas under a provider's 30 requests a minute send 30 in all,
// not 90. When the store cannot be reached, the local limit applies alone.

// GlobalRateLimiter is a rate limit shared across processes. The redisstore
// module implements it with GCRA (github.com/go-redis/redis_rate). It must
// be safe for concurrent use and answer within a small bounded wait.
type GlobalRateLimiter interface {
	// Take takes n permits of the shared limit if they are free now, and
	// returns 0; else it takes none and returns how long until they would
	// be. An error means the store could not be reached: the caller then
	// goes on with its local limit alone.
	Take(ctx context.Context, n int) (wait time.Duration, err error)
}

// RateStore is a Store that also shares rate limits. A registry whose
// store implements it shares RATE_LIMIT_<SERVICE>_GLOBAL_REQUESTS and
// _GLOBAL_TOKENS through it.
type RateStore interface {
	GlobalRateLimiter(resource string, limit float64, per time.Duration, burst int) GlobalRateLimiter
}

type globalBox struct{ g GlobalRateLimiter }

// SetGlobal makes every permit of l also take from the shared limit g; nil
// removes it. It is safe for concurrent use.
func (l *RateLimiter) SetGlobal(g GlobalRateLimiter) {
	if g == nil {
		l.global.Store(nil)
		return
	}
	l.global.Store(&globalBox{g})
}

// takeGlobal takes n permits of the shared limit, waiting for them as the
// limiter's configuration allows. The local permits are already taken: a
// refusal gives them back.
func (l *RateLimiter) takeGlobal(ctx context.Context, b *globalBox, n int) error {
	for {
		wait, err := b.g.Take(ctx, n)
		if err != nil || wait <= 0 {
			return nil // taken, or the store is away: the local limit applies
		}
		now := time.Now()
		dl, hasDeadline := ctx.Deadline()
		maxWait := time.Duration(l.maxWait.Load())
		if l.failFast.Load() || (maxWait > 0 && wait > maxWait) || (hasDeadline && !now.Add(wait).Before(dl)) {
			l.giveBack(n)
			l.rejected.Add(1)
			return &Error{Err: ErrRateLimited, Name: l.name, retryIn: wait}
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			l.giveBack(n)
			return ctx.Err()
		}
	}
}
