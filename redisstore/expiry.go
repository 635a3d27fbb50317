package redisstore

import (
	"time"

	"github.com/resilience-go/resilience"
)

// A registry evicts the policies of a name unused for its idle period
// (RESILIENCE_IDLE_EVICT), so that a service that calls a new host or
// tenant every minute does not grow for ever. The store follows it twice:
// every key it writes in Redis expires, the breaker states after the idle
// period (see breaker.go, limiter.go and ratelimit.go for each key's
// rule), and Evicted drops what it holds in memory for the name.

// defaultIdle is the idle period until SetIdle says otherwise: the
// registry's default for RESILIENCE_IDLE_EVICT.
const defaultIdle = 10 * time.Minute

var _ resilience.ExpiringStore = (*Store)(nil)

// SetIdle sets how long a name may go unused before the registry evicts
// its policies; a breaker state written from then on expires that long
// after its last write, or when its open ends if that is later. The keys
// already written keep their expiry until they are written again. A
// duration <= 0 means the default, 10 minutes. The registry calls it when
// it starts using the store and on every Reload. It is safe for concurrent
// use.
func (s *Store) SetIdle(idle time.Duration) {
	if idle <= 0 {
		idle = defaultIdle
	}
	s.idle.Store(int64(idle))
}

// idleTTL returns the idle period.
func (s *Store) idleTTL() time.Duration { return time.Duration(s.idle.Load()) }

// Evicted drops what the store holds for the breaker and the global
// bulkhead of name (by EnvKey, as the registry keys them): the breaker is no
// longer polled nor told the fleet's states, and the bulkhead's heartbeat
// is no longer renewed. A breaker or a bulkhead asked for again afterwards
// starts anew, from the shared state.
//
// It never waits for Redis, as the registry calls it under its own lock:
// the heartbeat is removed in the background, so that the other replicas'
// fair shares grow at once, and the rest expires on its own. A bulkhead
// whose calls still hold leases (the registry does not evict one, but a
// caller may hold on to an evicted bulkhead) keeps them renewed until they
// are given back: a lease is never lost to an eviction. A breaker still
// attached to a circuit breaker in use keeps publishing that breaker's own
// transitions, and asking for its probe.
func (s *Store) Evicted(name string) {
	key := resilience.EnvKey(name)
	s.mu.Lock()
	for _, b := range s.byKey[key] {
		delete(s.breakers, b.cb)
	}
	delete(s.byKey, key)
	l := s.limiters[key]
	held := false
	if l != nil {
		delete(s.limiters, key)
		// Set before live is read: a lease granted after the read sees
		// it, and puts the limiter in draining itself (see send).
		l.evicted.Store(true)
		l.mu.Lock()
		held = len(l.live) > 0
		l.mu.Unlock()
		if held {
			s.draining[l] = struct{}{}
		}
	}
	s.mu.Unlock()
	if l != nil && !held {
		s.forget(goneRef{key, l.rkey})
	}
}

// goneRef is the heartbeat of an evicted limiter, to be removed unless the
// resource is in use again by then.
type goneRef struct {
	key  string // EnvKey of the resource
	rkey string // the replicas' heartbeats
}

// forget queues heartbeats for removal and asks the lease keeper to
// remove them now, without waiting.
func (s *Store) forget(refs ...goneRef) {
	s.keepGone(refs)
	select {
	case s.flush <- struct{}{}:
	default:
	}
}

// keepGone queues heartbeats for removal, at most maxUnsent: past it, the
// oldest are left to expire after LeaseTTL.
func (s *Store) keepGone(refs []goneRef) {
	if len(refs) == 0 {
		return
	}
	s.unsentMu.Lock()
	s.gone = append(s.gone, refs...)
	if n := len(s.gone) - maxUnsent; n > 0 {
		s.gone = append(s.gone[:0], s.gone[n:]...)
	}
	s.unsentMu.Unlock()
}

// drainingKey reports whether an evicted limiter with the heartbeat rkey
// still holds leases. The caller holds s.mu.
func (s *Store) drainingKey(rkey string) bool {
	for l := range s.draining {
		if l.rkey == rkey {
			return true
		}
	}
	return false
}
