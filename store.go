package resilience

import (
	"strings"
	"sync"
)

// Store shares a registry's state with the other processes of a fleet:
// breaker state, so that an outage one replica sees opens every replica's
// breaker, and cluster-wide bulkhead slots. The redisstore module provides
// one for Redis. Implementations must be safe for concurrent use and keep
// the hot path local: see BreakerSync and Limiter.
type Store interface {
	// BreakerSync returns the sync for cb, which the store may also drive
	// with Trip and Reset to apply state seen elsewhere. The registry calls
	// it while holding its own lock: it must not call back into the
	// registry.
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
	for _, cb := range r.breakers {
		r.attachBreakerLocked(cb)
	}
	for _, b := range r.bulkheads {
		r.attachBulkheadLocked(b)
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
