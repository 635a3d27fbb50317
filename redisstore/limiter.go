package redisstore

import (
	"context"
	"errors"
	"slices"
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
// clock, so that the replicas' clocks do not matter). Beside it,
// <prefix>bh:{KEY}:replicas holds one member per replica that uses the
// cap, scored by when its heartbeat expires: the live replicas, whose
// number sets each replica's fair share of the limit when a slot cannot be
// confirmed.
//
// Each set expires when the last of its members does, which each script
// sets again after it writes: a lease is never lost before its own expiry,
// whatever LeaseTTL each replica has, and a resource no replica uses any
// more leaves nothing behind once its last lease and heartbeat are over.

// expireWithLast is the Lua function the lease scripts share: it makes a
// sorted set scored by expiry, unix ms, expire with its last member.
const expireWithLast = `
local function expireWithLast(key, now)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIRE', key, math.max(tonumber(last[2]) - now, 1)) end
end
`

// acquireScript drops the expired leases, renews the replica's heartbeat,
// then adds the leases asked for, in order, while fewer than the limit are
// held: one round trip for every caller of a replica waiting at once. It
// returns how many it added (the first ones asked for) and how many
// replicas are alive.
//
// KEYS: the set, the replicas. ARGV: limit, lease ttl ms, replica id, then
// the lease ids.
var acquireScript = redis.NewScript(acquireSource)

const acquireSource = expireWithLast + `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
expireWithLast(KEYS[2], now)
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local n = 0
for i = 4, #ARGV do
  if n >= free then break end
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  n = n + 1
end
if n > 0 then expireWithLast(KEYS[1], now) end
return {n, redis.call('ZCARD', KEYS[2])}
`

// renewScript pushes back the expiry of the leases still in the set (a
// lease already gone, expired or lost with Redis's data, is not added
// back) and of the replica's heartbeat, and returns how many replicas are
// alive.
//
// KEYS: the set, the replicas. ARGV: lease ttl ms, replica id, then the
// lease ids.
var renewScript = redis.NewScript(expireWithLast + `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local exp = now + tonumber(ARGV[1])
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], 'XX', exp, ARGV[i]) end
if #ARGV > 2 then expireWithLast(KEYS[1], now) end
redis.call('ZADD', KEYS[2], exp, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
expireWithLast(KEYS[2], now)
return redis.call('ZCARD', KEYS[2])
`)

// maxBatch bounds the leases one round trip asks for.
const maxBatch = 256

// limiter is a cluster-wide cap for one resource.
type limiter struct {
	s       *Store
	envKey  string // of the resource: the limiter's key in Store.limiters
	key     string // the leases
	rkey    string // the replicas' heartbeats
	limit   atomic.Int64
	errFull *resilience.Error // returned on every refusal

	// replicas is the number of live replicas Redis last reported; 0
	// before its first answer.
	replicas atomic.Int64
	// inside counts this replica's calls in flight through the cap, with
	// a lease or on the local share: the local share admits a call only
	// while it is below the share.
	inside atomic.Int64
	// shared counts the calls that took the local share instead of a
	// lease: Redis down, slow or failing. For the tests and the README's
	// figures.
	shared atomic.Int64
	// slowAt is when a caller's wait last counted as a failed round trip
	// (unix ns): one per OpTimeout, not one per waiting caller.
	slowAt atomic.Int64
	// evicted is set when the registry evicted the resource: a lease
	// granted from then on puts the limiter in Store.draining, so that it
	// is renewed until given back.
	evicted atomic.Bool

	mu      sync.Mutex
	live    map[string]struct{} // the leases of this replica's calls in flight
	queue   []*slotRequest      // waiting for the next round trip
	sending bool                // a sender goroutine runs
}

// slotRequest is one caller's request for a lease, answered by the
// sender's next round trip.
type slotRequest struct {
	id    string
	claim atomic.Int32 // 0: waiting; 1: answered; 2: the caller left
	done  chan slotAnswer
}

type slotAnswer struct {
	granted bool
	err     error
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
// takes effect at once. A new limiter announces its replica (its
// heartbeat) in the background, so that the others' fair shares count it.
func (s *Store) Limiter(resource string, limit int) resilience.Limiter {
	key := resilience.EnvKey(resource)
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.limiters[key]
	if !ok {
		k := s.opts.KeyPrefix + "bh:{" + key + "}"
		l = &limiter{
			s:       s,
			envKey:  key,
			key:     k,
			rkey:    k + ":replicas",
			errFull: &resilience.Error{Err: resilience.ErrBulkheadFull, Name: resource},
			live:    map[string]struct{}{},
		}
		s.limiters[key] = l
		select {
		case s.beat <- struct{}{}:
		default:
		}
	}
	l.limit.Store(int64(limit))
	return l
}

func noop() {}

// Acquire takes a lease, waiting at most OpTimeout for Redis. It returns an
// error matching resilience.ErrBulkheadFull when the fleet has the limit of
// calls in flight, and the caller's context error if the caller gave up.
// The callers that wait at once share one round trip: one sender per
// resource asks for all their leases in one script, and whoever arrives
// while it is on its way goes in the next.
//
// When Redis does not answer within OpTimeout, or is known to be down,
// the call is held to this replica's fair share of the limit,
// ceil(limit / live replicas), the live replicas being those whose
// heartbeat Redis last reported (at least 1), with the calls of this
// replica that hold a lease counted in: never to no cap. Release gives the
// lease back in the background; it never waits for Redis.
func (l *limiter) Acquire(ctx context.Context) (release func(), err error) {
	s := l.s
	if err := ctx.Err(); err != nil {
		return noop, err
	}
	if !s.usable() {
		return l.local()
	}
	r := &slotRequest{
		id:   s.id + ":" + strconv.FormatUint(s.leaseSeq.Add(1), 36),
		done: make(chan slotAnswer, 1),
	}
	l.mu.Lock()
	l.queue = append(l.queue, r)
	start := !l.sending
	l.sending = true
	l.mu.Unlock()
	if start {
		if !s.track() {
			l.fail(errClosed) // closed meanwhile: nothing will send it
		} else {
			go l.send()
		}
	}
	t := time.NewTimer(s.opts.OpTimeout)
	defer t.Stop()
	var a slotAnswer
	select {
	case a = <-r.done:
	case <-t.C:
		a = l.leave(r)
	case <-ctx.Done():
		a = l.leave(r)
	}
	if a.err == errLeft {
		if err := ctx.Err(); err != nil {
			return noop, err
		}
		l.slow()
		return l.local() // not confirmed in time
	}
	switch {
	case a.granted:
		var once atomic.Bool
		return func() {
			if once.CompareAndSwap(false, true) {
				l.inside.Add(-1)
				s.release(l, r.id)
			}
		}, nil
	case a.err != nil:
		return l.local()
	default:
		return noop, l.errFull
	}
}

// errLeft is leave's answer when the caller left before Redis answered.
var errLeft = errors.New("redisstore: the caller stopped waiting")

// leave gives up waiting for r's answer, unless it has just come.
func (l *limiter) leave(r *slotRequest) slotAnswer {
	if r.claim.CompareAndSwap(0, 2) {
		return slotAnswer{err: errLeft}
	}
	return <-r.done // answered just in time
}

// local admits a call on this replica's fair share of the limit, counting
// the calls of this replica that hold a lease: then, with every replica
// on its share, the fleet has at most limit + replicas - 1 calls in
// flight.
func (l *limiter) local() (release func(), err error) {
	l.shared.Add(1)
	share := l.share()
	for {
		n := l.inside.Load()
		if n >= share {
			return noop, l.errFull
		}
		if l.inside.CompareAndSwap(n, n+1) {
			break
		}
	}
	var once atomic.Bool
	return func() {
		if once.CompareAndSwap(false, true) {
			l.inside.Add(-1)
		}
	}, nil
}

// share is ceil(limit / live replicas).
func (l *limiter) share() int64 {
	n := max(l.replicas.Load(), 1)
	return (l.limit.Load() + n - 1) / n
}

// slow counts a caller's wait that outlasted OpTimeout as a failed round
// trip, at most once per OpTimeout: the callers that waited on one round
// trip make one failure, not one each.
func (l *limiter) slow() {
	now := time.Now().UnixNano()
	last := l.slowAt.Load()
	if now-last < int64(l.s.opts.OpTimeout) || !l.slowAt.CompareAndSwap(last, now) {
		return
	}
	l.s.markDown(errSlow)
}

// send asks Redis for the leases queued, in batches of up to maxBatch,
// until the queue is empty, and hands each caller its answer. A lease
// whose caller has left is given back as soon as it lands.
func (l *limiter) send() {
	s := l.s
	defer s.wg.Done()
	ids := make([]any, 0, 8)
	for {
		l.mu.Lock()
		n := min(len(l.queue), maxBatch)
		batch := slices.Clone(l.queue[:n])
		l.queue = slices.Delete(l.queue, 0, n)
		if n == 0 {
			l.sending = false
			l.mu.Unlock()
			return
		}
		l.mu.Unlock()
		// Those whose caller left are not asked for.
		batch = slices.DeleteFunc(batch, func(r *slotRequest) bool { return r.claim.Load() == 2 })
		if len(batch) == 0 {
			continue
		}
		ids = append(ids[:0], l.limit.Load(), s.opts.LeaseTTL.Milliseconds(), s.id)
		for _, r := range batch {
			ids = append(ids, r.id)
		}
		// Not under OpTimeout: the callers stop waiting at OpTimeout on
		// their own timer, and a script cut short by a deadline may still
		// run in Redis, granting leases nobody would ever give back.
		ctx, cancel := s.bg()
		res, err := acquireScript.Run(ctx, s.client, []string{l.key, l.rkey}, ids...).Slice()
		cancel()
		if err != nil {
			// It may have run all the same: give back whatever it granted.
			for _, r := range batch {
				s.release(l, r.id)
			}
		}
		granted := 0
		if err == nil {
			s.markOK()
			var live int64
			if len(res) == 2 {
				g, _ := res[0].(int64)
				granted = int(g)
				live, _ = res[1].(int64)
			}
			if live > 0 {
				l.replicas.Store(live)
			}
		} else if s.ctx.Err() == nil && !errors.Is(err, context.DeadlineExceeded) {
			// A deadline is counted by the callers that waited on it
			// (slow); this is Redis refusing or the connection failing.
			s.markDown(err)
		}
		for i, r := range batch {
			a := slotAnswer{granted: err == nil && i < granted, err: err}
			if a.granted {
				l.mu.Lock()
				l.live[r.id] = struct{}{}
				l.mu.Unlock()
				l.inside.Add(1)
				if l.evicted.Load() {
					// Read after the lease is in live: Evicted, or a
					// renewal that drops a drained limiter, either saw
					// it there or is seen here.
					s.mu.Lock()
					s.draining[l] = struct{}{}
					s.mu.Unlock()
				}
			}
			if r.claim.CompareAndSwap(0, 1) {
				r.done <- a
			} else if a.granted {
				l.inside.Add(-1)
				s.release(l, r.id) // taken after the caller stopped waiting
			}
		}
	}
}

// fail answers every queued request with err, when no sender can run.
func (l *limiter) fail(err error) {
	l.mu.Lock()
	q := l.queue
	l.queue = nil
	l.sending = false
	l.mu.Unlock()
	for _, r := range q {
		if r.claim.CompareAndSwap(0, 1) {
			r.done <- slotAnswer{err: err}
		}
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
// calls in flight and this replica's heartbeats every LeaseTTL/3, and at
// once when a limiter is new. On Close it gives back what is queued and
// removes the heartbeats, so that the other replicas' shares grow at once.
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
			s.removeLeases(ctx, batch, true)
			cancel()
			return
		case r := <-s.releases:
			batch = drain(s.releases, append(batch[:0], r))
			ctx, cancel := s.bg()
			s.removeLeases(ctx, batch, false)
			cancel()
		case <-s.beat:
			s.renewLeases()
			ctx, cancel := s.bg()
			s.removeLeases(ctx, nil, false)
			cancel()
		case <-s.flush:
			ctx, cancel := s.bg()
			s.removeLeases(ctx, nil, false)
			cancel()
		case <-renew.C:
			s.renewLeases()
			// Releases kept while Redis was down, if it is back.
			ctx, cancel := s.bg()
			s.removeLeases(ctx, nil, false)
			cancel()
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

// removeLeases gives back a batch of leases in one pipeline, with the
// heartbeats of the limiters evicted since (unless the resource is in use
// again); leaving, it also removes this replica's other heartbeats.
func (s *Store) removeLeases(ctx context.Context, batch []leaseRef, leaving bool) {
	if s.down.Load() {
		s.keepUnsent(batch) // sent once Redis is back; else they expire after LeaseTTL
		return
	}
	s.unsentMu.Lock()
	batch = append(batch, s.unsent...)
	s.unsent = nil
	gone := s.gone
	s.gone = nil
	s.unsentMu.Unlock()
	if len(batch) == 0 && len(gone) == 0 && !leaving {
		return
	}
	byKey := map[string][]any{}
	for _, r := range batch {
		byKey[r.l.key] = append(byKey[r.l.key], r.id)
	}
	var rkeys []string
	s.mu.Lock()
	for _, g := range gone {
		if s.limiters[g.key] == nil && !s.drainingKey(g.rkey) {
			rkeys = append(rkeys, g.rkey)
		}
	}
	if leaving {
		for _, l := range s.limiters {
			rkeys = append(rkeys, l.rkey)
		}
		for l := range s.draining {
			rkeys = append(rkeys, l.rkey)
		}
	}
	s.mu.Unlock()
	if len(byKey) == 0 && len(rkeys) == 0 {
		return
	}
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for key, ids := range byKey {
			p.ZRem(ctx, key, ids...)
		}
		for _, k := range rkeys {
			p.ZRem(ctx, k, s.id)
		}
		return nil
	})
	if err != nil && s.ctx.Err() == nil {
		s.markDown(err)
		s.keepUnsent(batch)
		s.keepGone(gone)
	}
}

// maxUnsent bounds the releases kept for Redis's return: past it, the
// oldest are left to expire after LeaseTTL.
const maxUnsent = 4096

// keepUnsent keeps releases Redis did not take, for the next batch.
func (s *Store) keepUnsent(batch []leaseRef) {
	s.unsentMu.Lock()
	s.unsent = append(s.unsent, batch...)
	if n := len(s.unsent) - maxUnsent; n > 0 {
		s.unsent = append(s.unsent[:0], s.unsent[n:]...)
	}
	s.unsentMu.Unlock()
}

// renewLeases renews, for each limiter, the leases of this replica's calls
// in flight and its heartbeat, and learns how many replicas are alive. An
// evicted limiter whose calls have all given their leases back is dropped
// here, and its heartbeat queued for removal.
func (s *Store) renewLeases() {
	s.mu.Lock()
	ls := make([]*limiter, 0, len(s.limiters)+len(s.draining))
	for _, l := range s.limiters {
		ls = append(ls, l)
	}
	var drained []goneRef
	for l := range s.draining {
		l.mu.Lock()
		held := len(l.live) > 0
		l.mu.Unlock()
		if held {
			ls = append(ls, l)
			continue
		}
		delete(s.draining, l)
		drained = append(drained, goneRef{l.envKey, l.rkey})
	}
	s.mu.Unlock()
	s.keepGone(drained) // removed by the removeLeases that follows
	if !s.usable() {
		return
	}
	for _, l := range ls {
		l.mu.Lock()
		args := make([]any, 0, len(l.live)+2)
		args = append(args, s.opts.LeaseTTL.Milliseconds(), s.id)
		for id := range l.live {
			args = append(args, id)
		}
		l.mu.Unlock()
		ctx, cancel := s.bg()
		n, err := renewScript.Run(ctx, s.client, []string{l.key, l.rkey}, args...).Int64()
		cancel()
		if err != nil {
			s.markDown(err)
			return
		}
		s.markOK()
		if n > 0 {
			l.replicas.Store(n)
		}
	}
}
