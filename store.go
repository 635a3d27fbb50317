package resilience

import (
	"context"
	"strings"
	"sync"
	"time"
)

// Store shares a registry's state with the other processes of a fleet:
// breaker state, so that an outage one replica sees opens every replica's
// breaker, and cluster-wide bulkhead slots. The redisstore module provides
// one for Redis. Implementations must be safe for concurrent use and keep
// the hot path local: see BreakerSync and Limiter.
type Store interface {
	// BreakerSync returns the sync for cb, which the store may also drive
	// with Trip, TripFor, OpenFor and Reset to apply state seen elsewhere.
	// The registry calls it while holding its own lock: it must not call
	// back into the registry.
	BreakerSync(cb *CircuitBreaker) BreakerSync
	// Limiter returns the cluster-wide cap of limit calls for resource.
	Limiter(resource string, limit int) Limiter
	// Close stops the store's background work.
	Close() error
}

var storeDrivers struct {
	mu sync.Mutex
	m  map[string]func(url string) (Store, error)
}

// RegisterStore makes a Store available to registries whose StoreURL has
// the given scheme, as database/sql drivers register themselves: the
// redisstore package calls it from its init for "redis" and "rediss", so a
// blank import and RESILIENCE_REDIS_URL are all the wiring a service needs.
// Registering a scheme twice replaces the first. It is safe for concurrent
// use.
func RegisterStore(scheme string, open func(url string) (Store, error)) {
	storeDrivers.mu.Lock()
	defer storeDrivers.mu.Unlock()
	if storeDrivers.m == nil {
		storeDrivers.m = map[string]func(string) (Store, error){}
	}
	storeDrivers.m[strings.ToLower(scheme)] = open
}

func openStore(url string) (Store, error) {
	scheme, _, ok := strings.Cut(url, "://")
	if !ok {
		return nil, &VarError{Var: "RESILIENCE_REDIS_URL", Value: url, Reason: "not a URL with a scheme, such as redis://host:6379"}
	}
	storeDrivers.mu.Lock()
	open := storeDrivers.m[strings.ToLower(scheme)]
	storeDrivers.mu.Unlock()
	if open == nil {
		return nil, &VarError{Var: "RESILIENCE_REDIS_URL", Value: url, Reason: "no store registered for " + scheme + "://: import github.com/resilience-go/resilience/redisstore"}
	}
	return open(url)
}

// UseStore shares the registry's breakers and global bulkhead caps through
// s, for the instances built so far and those built later; nil stops
// sharing. The registry does not close a store given this way. It is safe
// for concurrent use.
func (r *Registry) UseStore(s Store) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.store = s
	r.tellStoreIdleLocked()
	for _, cb := range r.breakers {
		r.attachBreakerLocked(cb)
	}
	for _, b := range r.bulkheads {
		r.attachBulkheadLocked(b)
	}
	for lk, l := range r.limiters {
		kind, key, _ := strings.Cut(lk, ":")
		r.attachLimiterLocked(l, key, kind == "tokens")
	}
}

// tellStoreIdleLocked tells an expiring store the idle period after which
// the registry evicts a name. r.mu is held.
func (r *Registry) tellStoreIdleLocked() {
	if es, ok := r.store.(ExpiringStore); ok {
		es.SetIdle(r.cfg.idleEvict())
	}
}

func (r *Registry) attachBreakerLocked(cb *CircuitBreaker) {
	if r.store == nil {
		cb.SetSync(nil)
		return
	}
	cb.SetSync(r.store.BreakerSync(cb))
}

func (r *Registry) attachBulkheadLocked(b *Bulkhead) {
	limit := r.cfg.BulkheadConfig(b.Name()).GlobalLimit
	if r.store == nil || limit <= 0 {
		b.SetGlobal(nil)
		return
	}
	b.SetGlobal(r.store.Limiter(b.Name(), limit))
}

// BreakerSync shares a breaker's state with other processes, so that when
// one replica's breaker opens the others open too, and a half-open probe is
// taken by one replica rather than all. The redisstore module implements
// it; a Registry wires it in through its Store.
//
// Implementations must be safe for concurrent use and must not block the
// hot path: StateChanged should hand the change to a background publisher,
// and AllowProbe, asked only when a half-open probe is about to go out,
// must answer within a small bounded wait, and say yes when the shared
// store cannot be reached, so that every replica keeps working on its local
// breaker.
type BreakerSync interface {
	// StateChanged is called after each local transition, in order,
	// outside every lock, including transitions that Trip and Reset cause.
	StateChanged(name string, from, to State)
	// AllowProbe reports whether this process may send the half-open
	// probe; false rejects the call with ErrCircuitOpen, uncounted.
	AllowProbe(ctx context.Context, name string) bool
}

type syncBox struct{ s BreakerSync }

// SetSync attaches s to the breaker, or detaches any with nil. It is safe
// for concurrent use.
func (cb *CircuitBreaker) SetSync(s BreakerSync) {
	if s == nil {
		cb.sync.Store(nil)
		return
	}
	cb.sync.Store(&syncBox{s})
}

// Limiter caps calls across processes: a cluster-wide bulkhead. The
// redisstore module implements it with leases that expire if a process dies
// mid-call. Acquire must wait at most a small bounded time for the shared
// store and return an error matching ErrBulkheadFull when the cap is
// reached. When the store cannot confirm a slot in time, or cannot be
// reached, it should hold the process to a fair share of the limit, such
// as ceil(limit / processes), rather than let every call through: a cap
// that vanishes when the store is slow, which is when the fleet is loaded,
// protects nothing. The local bulkhead applies either way.
type Limiter interface {
	Acquire(ctx context.Context) (release func(), err error)
}

type limiterBox struct{ l Limiter }

// ExpiringStore is a [Store] that keeps no name for ever: a registry tells
// it how long a name may go unused before its policies are evicted
// (RESILIENCE_IDLE_EVICT), when it starts using the store and on every
// Reload, and which names it evicted. The redisstore module implements it,
// so that Redis does not grow with every host or tenant a fleet has seen.
type ExpiringStore interface {
	Store
	// SetIdle says how long a name may go unused before the registry
	// evicts its policies: every key the store writes should expire some
	// time after that, unless it is written again.
	SetIdle(idle time.Duration)
	// Evicted says the registry dropped the breaker and the bulkhead of
	// name: the store drops what it holds for them, as for a breaker or
	// a limiter that is never asked for again. It is called with the
	// registry's lock held, and must not call back into the registry.
	Evicted(name string)
}
