package redisstore

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/resilience-go/resilience"
)

// A global bulkhead is a sorted set at <prefix>bh:{KEY}, KEY being the
// EnvKey of the resource: one member per call in flight anywhere in the
// fleet, a lease id, scored by when the lease expires (unix ms, by Redis's
// clock, so that the replicas' clocks do not matter).

// acquireScript drops the expired leases, then adds one if fewer than the
// limit remain. It returns 1 if it added it, 0 if the cap is reached.
//
// KEYS: the set. ARGV: limit, lease ttl ms, lease id.
var acquireScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return 1
`)

// renewScript pushes back the expiry of the leases still in the set; a
// lease already gone (expired, or lost with Redis's data) is not added back.
//
// KEYS: the set. ARGV: lease ttl ms, then the lease ids.
var renewScript = redis.NewScript(`
local t = redis.call('TIME')
local exp = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', exp, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
return 0
`)

// limiter is a cluster-wide cap for one resource.
type limiter struct {
	s       *Store
	key     string
	limit   atomic.Int64
	errFull *resilience.Error // returned on every refusal

	mu   sync.Mutex
	live map[string]struct{} // the leases of this replica's calls in flight
}

// leaseRef is a lease to give back.
type leaseRef struct {
	l  *limiter
	id string
}

// Limiter returns the cluster-wide cap of limit calls for resource. Every
// replica that names the same resource (by EnvKey) shares one count; each
// enforces the limit it was given. Asking again for the same resource
// returns the same Limiter with the new limit, so that a registry Reload
// takes effect at once.
func (s *Store) Limiter(resource string, limit int) resilience.Limiter {
	key := resilience.EnvKey(resource)
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.limiters[key]
	if !ok {
		l = &limiter{
			s:       s,
			key:     s.opts.KeyPrefix + "bh:{" + key + "}",
			errFull: &resilience.Error{Err: resilience.ErrBulkheadFull, Name: resource},
			live:    map[string]struct{}{},
		}
		s.limiters[key] = l
	}
	l.limit.Store(int64(limit))
	return l
}

func noop() {}

// Acquire takes a lease, waiting at most OpTimeout for Redis. It returns an
// error matching resilience.ErrBulkheadFull when the fleet has the limit of
// calls in flight, and the caller's context error if the caller gave up.
// When Redis does not answer in time, or is known to be down, it lets the
// call through (the local bulkhead still applies). Release gives the lease
// back in the background; it never waits for Redis.
func (l *limiter) Acquire(ctx context.Context) (release func(), err error) {
	s := l.s
	if err := ctx.Err(); err != nil {
		return noop, err
	}
	if !s.usable() {
		return noop, nil
	}
	id := s.id + ":" + strconv.FormatUint(s.leaseSeq.Add(1), 36)
	take := func(ctx context.Context) (int64, error) {
		return acquireScript.Run(ctx, s.client, []string{l.key}, l.limit.Load(), s.opts.LeaseTTL.Milliseconds(), id).Int64()
	}
	late := func(v int64, err error) {
		if err == nil && v == 1 {
			s.release(l, id) // taken after the caller stopped waiting
		}
	}
	v, err := bounded(s, ctx, take, late)
	if err == nil {
		s.markOK()
	}
	switch {
	case err == nil && v == 1:
		l.mu.Lock()
		l.live[id] = struct{}{}
		l.mu.Unlock()
		var once atomic.Bool
		return func() {
			if once.CompareAndSwap(false, true) {
				s.release(l, id)
			}
		}, nil
	case err == nil:
		return noop, l.errFull
	case callerGaveUp(ctx, err):
		return noop, err
	default:
		s.markDown(err)
		return noop, nil
	}
}

// release stops renewing a lease and queues it to be removed. When the
// queue is full (Redis is slow) or the store is closed, the lease is left
// to expire after LeaseTTL.
func (s *Store) release(l *limiter, id string) {
	l.mu.Lock()
	delete(l.live, id)
	l.mu.Unlock()
	if s.closed.Load() {
		return
	}
	select {
	case s.releases <- leaseRef{l, id}:
	default:
	}
}

// leaseKeeper gives leases back, in batches, and renews the leases of the
// calls in flight every LeaseTTL/3.
func (s *Store) leaseKeeper() {
	defer s.wg.Done()
	renew := time.NewTicker(max(s.opts.LeaseTTL/3, time.Millisecond))
	defer renew.Stop()
	batch := make([]leaseRef, 0, 256)
	for {
		select {
		case <-s.ctx.Done():
			// Give back what is queued, briefly: the client is still open.
			batch = drain(s.releases, batch[:0])
			ctx, cancel := context.WithTimeout(context.Background(), s.opts.OpTimeout)
			s.removeLeases(ctx, batch)
			cancel()
			return
		case r := <-s.releases:
			batch = drain(s.releases, append(batch[:0], r))
			ctx, cancel := s.bg()
			s.removeLeases(ctx, batch)
			cancel()
		case <-renew.C:
			s.renewLeases()
		}
	}
}

// drain appends what ch holds now, up to the batch's capacity.
func drain(ch chan leaseRef, batch []leaseRef) []leaseRef {
	for len(batch) < cap(batch) {
		select {
		case r := <-ch:
			batch = append(batch, r)
		default:
			return batch
		}
	}
	return batch
}

func (s *Store) removeLeases(ctx context.Context, batch []leaseRef) {
	if len(batch) == 0 || s.down.Load() {
		return // they expire after LeaseTTL
	}
	byKey := map[string][]any{}
	for _, r := range batch {
		byKey[r.l.key] = append(byKey[r.l.key], r.id)
	}
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for key, ids := range byKey {
			p.ZRem(ctx, key, ids...)
		}
		return nil
	})
	if err != nil && s.ctx.Err() == nil {
		s.markDown(err)
	}
}

func (s *Store) renewLeases() {
	if !s.usable() {
		return
	}
	s.mu.Lock()
	ls := make([]*limiter, 0, len(s.limiters))
	for _, l := range s.limiters {
		ls = append(ls, l)
	}
	s.mu.Unlock()
	for _, l := range ls {
		l.mu.Lock()
		args := make([]any, 0, len(l.live)+1)
		args = append(args, s.opts.LeaseTTL.Milliseconds())
		for id := range l.live {
			args = append(args, id)
		}
		l.mu.Unlock()
		if len(args) == 1 {
			continue
		}
		ctx, cancel := s.bg()
		err := renewScript.Run(ctx, s.client, []string{l.key}, args...).Err()
		cancel()
		if err != nil {
			s.markDown(err)
			return
		}
	}
}
