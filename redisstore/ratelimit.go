package redisstore

import (
	"context"
	"errors"
	"math"
	"strings"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
	"github.com/resilience-go/resilience"
)

// A global rate limit is one GCRA (generic cell rate algorithm) state in
// Redis, kept by github.com/go-redis/redis_rate: a single key at
// <prefix>rl:{RESOURCE} holding the theoretical arrival time of the next
// permit, read and written by one Lua script on Redis's clock, so that the
// replicas' clocks do not matter.

var _ resilience.RateStore = (*Store)(nil)

// GlobalRateLimiter returns the fleet-wide limit of limit permits per per,
// in bursts of at most burst, for resource (the registry passes
// "requests:<SERVICE>" or "tokens:<SERVICE>"). Every replica that names the
// same resource shares one limit; give every replica the same values.
//
// redis_rate takes a whole number of permits per period. Only their ratio,
// the time between two permits (per/limit), matters to GCRA, so a limit
// that is not whole is kept exactly: the rate is the ceiling of limit and
// the period is stretched to match (0.5 per minute is 1 per 2 minutes), to
// the nanosecond. The burst is at least 1.
//
// Take waits at most OpTimeout for Redis. When Redis does not answer in
// time, or is known to be down, or the store is closed, Take returns an
// error and the caller keeps its local limit alone.
func (s *Store) GlobalRateLimiter(resource string, limit float64, per time.Duration, burst int) resilience.GlobalRateLimiter {
	if math.IsNaN(limit) || limit <= 0 {
		limit = math.SmallestNonzeroFloat64 // never called so by the registry
	}
	if per <= 0 {
		per = time.Second
	}
	r := min(math.Ceil(limit), math.MaxInt32)
	period := time.Duration(math.Min(float64(per)*r/limit, math.MaxInt64))
	return &rateLimiter{
		s:     s,
		rl:    redis_rate.NewLimiter(unprefixed{s.client}),
		key:   s.opts.KeyPrefix + "rl:{" + resource + "}",
		limit: redis_rate.Limit{Rate: int(r), Period: period, Burst: max(burst, 1)},
	}
}

// rateLimiter is a fleet-wide rate limit for one resource.
type rateLimiter struct {
	s     *Store
	rl    *redis_rate.Limiter
	key   string
	limit redis_rate.Limit
}

// errNotUsable reports a Take that did not ask Redis: it is known to be
// down, or the store is closed.
var errNotUsable = errors.New("redisstore: Redis unreachable or the store closed; the local rate limit applies alone")

// Take takes n permits of the shared limit if they are free now and
// returns 0; else it takes none and returns how long until they would be.
// A request for more permits than the burst is granted when the shared
// limit is idle and puts it in debt, which later permits pay back, rather
// than never. An error means Redis was not asked or did not answer within
// OpTimeout (or the caller gave up): the caller then keeps its local limit
// alone.
func (l *rateLimiter) Take(ctx context.Context, n int) (time.Duration, error) {
	s := l.s
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if n <= 0 {
		return 0, nil
	}
	if !s.usable() {
		return 0, errNotUsable
	}
	lim := l.limit
	lim.Burst = max(lim.Burst, n)
	take := func(ctx context.Context) (*redis_rate.Result, error) {
		return l.rl.AllowN(ctx, l.key, lim, n)
	}
	res, err := bounded(s, ctx, take, nil)
	switch {
	case err == nil:
		s.markOK()
	case callerGaveUp(ctx, err):
		return 0, err
	default:
		s.markDown(err)
		return 0, err
	}
	if res.Allowed > 0 {
		return 0, nil
	}
	// Refused: RetryAfter is positive. A zero or negative one (-1 means
	// "allowed" to redis_rate, and is not expected here) still must not
	// read as a grant.
	return max(res.RetryAfter, time.Millisecond), nil
}

// unprefixed hands redis_rate the client with the "rate:" it puts before
// every key taken off again, so that the store's keys all stay under
// KeyPrefix (where an ACL or a shared Redis expects them).
type unprefixed struct{ redis.UniversalClient }

const rateLibPrefix = "rate:"

func trimKeys(keys []string) []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = strings.TrimPrefix(k, rateLibPrefix)
	}
	return out
}

func (c unprefixed) Eval(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return c.UniversalClient.Eval(ctx, script, trimKeys(keys), args...)
}

func (c unprefixed) EvalSha(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return c.UniversalClient.EvalSha(ctx, sha1, trimKeys(keys), args...)
}

func (c unprefixed) EvalRO(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return c.UniversalClient.EvalRO(ctx, script, trimKeys(keys), args...)
}

func (c unprefixed) EvalShaRO(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return c.UniversalClient.EvalShaRO(ctx, sha1, trimKeys(keys), args...)
}

func (c unprefixed) Del(ctx context.Context, keys ...string) *redis.IntCmd {
	return c.UniversalClient.Del(ctx, trimKeys(keys)...)
}
