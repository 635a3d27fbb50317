package resilience

import (
	"cmp"
	"iter"
	"log/slog"
	"slices"
	"sync/atomic"
	"time"
	"weak"
)

// A registry's bounds. Names reach a registry from outside (Transport
// names a service after each request's host), so what it keeps per name is
// bounded: at most RESILIENCE_MAX_SERVICES policy sets, the least recently
// used idle one evicted to make room, and names that find no room sharing
// the set named "other". The same holds for the keys of each service
// (registry_keys.go), bounded by CIRCUIT_BREAKER_<SERVICE>_MAX_KEYS.

// The defaults of the bounds.
const (
	defaultMaxServices = 1000
	defaultIdleEvict   = 10 * time.Minute
	defaultMaxKeys     = 1000
	// overflowName names the set that names and keys without one of their
	// own share, in metrics too.
	overflowName = "other"
	overflowKey  = "OTHER" // EnvKey(overflowName)
)

// usage is what eviction knows of a service's or a key's policies. Calls
// set used; a sweep clears it and notes when, so that a set whose bit is
// still clear a full idle period later has had no call since. No call
// reads the clock for this: reading it costs about 28 ns here, a tenth of
// a call. Once a table is half full, a timer sweeps it every quarter of
// the idle period, so that an entry idle since its last call for 1.25
// idle periods at most is known to be. inflight counts the calls inside,
// from the entry point to its return, waits for permits and between
// attempts included, which hold no bulkhead slot.
type usage struct {
	used      atomic.Bool
	evicted   atomic.Bool
	inflight  atomic.Int64
	clearedAt time.Duration // on the monotonic clock; guarded by the registry's lock
	pinned    bool          // handed out by a getter, so held by code: never evicted; r.mu
}

// touch marks the policies used. It stores only on the first call after a
// sweep: a store per call would be one more write to the line.
func (u *usage) touch() {
	if !u.used.Load() {
		u.used.Store(true)
	}
}

// enter counts a call in and reports whether the policies are still
// live; a call that finds them evicted leaves and looks them up again.
func (u *usage) enter() bool {
	u.touch()
	u.inflight.Add(1)
	if u.evicted.Load() {
		u.inflight.Add(-1)
		return false
	}
	return true
}

func (u *usage) leave() { u.inflight.Add(-1) }

// tryEvict marks u evicted unless a call is inside or touched it
// meanwhile. A call counts itself in before it checks evicted, and
// tryEvict marks before it checks the count: one of the two sees the
// other (Go's atomics are sequentially consistent), so a call either
// finds the policies evicted, and looks them up again under the
// registry's lock, or keeps them from being evicted. r.mu is held.
func (u *usage) tryEvict() bool {
	if u.pinned {
		return false
	}
	u.evicted.Store(true)
	if u.used.Load() || u.inflight.Load() != 0 {
		u.evicted.Store(false)
		return false
	}
	return true
}

// bounded is an entry of a bounded table: a service's set or a key's.
type bounded interface {
	use() *usage
	// busy reports policies still protecting or in use: a breaker that is
	// not closed (or is forced), a bulkhead with calls inside or waiting.
	busy() bool
}

// bound keeps a table within its cap: it sweeps the table's use bits and
// keeps the idle entries it found, least recently used first, to evict
// as room is needed. Its state is guarded by the registry's lock.
type bound[E bounded] struct {
	cands   []E
	sweptAt time.Duration
	swept   bool
}

// room reports whether a table of n entries may add one under limit,
// evicting an idle entry if it must; evict removes one from the table and
// reports whether it did. all lists the table.
func (b *bound[E]) room(n, limit int, idle time.Duration, all iter.Seq[E], evict func(E) bool) bool {
	if n < limit {
		return true
	}
	now := monotonic()
	for {
		for len(b.cands) > 0 {
			e := b.cands[0]
			b.cands = b.cands[1:]
			u := e.use()
			if u.evicted.Load() || u.used.Load() || u.inflight.Load() != 0 || now-u.clearedAt < idle || e.busy() {
				continue
			}
			if evict(e) {
				return true
			}
		}
		if b.swept && now-b.sweptAt < max(idle/8, time.Millisecond) {
			// A full table of busy entries is not swept at every new
			// name: the names go to the overflow set meanwhile.
			return false
		}
		b.sweep(now, idle, all)
		if len(b.cands) == 0 {
			return false
		}
	}
}

// sweep clears the use bits, and lists the entries idle for idle,
// least recently used first.
func (b *bound[E]) sweep(now, idle time.Duration, all iter.Seq[E]) {
	b.swept, b.sweptAt = true, now
	clear(b.cands)
	b.cands = b.cands[:0]
	for e := range all {
		u := e.use()
		switch {
		case u.pinned:
		case u.used.Load():
			u.used.Store(false)
			u.clearedAt = now
		case now-u.clearedAt >= idle && u.inflight.Load() == 0 && !e.busy():
			b.cands = append(b.cands, e)
		}
	}
	slices.SortFunc(b.cands, func(x, y E) int { return cmp.Compare(x.use().clearedAt, y.use().clearedAt) })
}

// svcSet is one service's policies in a registry: the unit that
// RESILIENCE_MAX_SERVICES counts and that eviction drops whole. Its
// breaker and bulkhead are built when first needed; its pipelines are
// those of each name with its EnvKey and each entry point.
type svcSet struct {
	usage
	key, name string
	other     bool // the overflow set
	cb        *CircuitBreaker
	bh        *Bulkhead
	pipes     map[pipeKey]*pipeline
	keys      atomic.Pointer[keyTable] // nil until a keyed call
}

func (s *svcSet) use() *usage { return &s.usage }

func (s *svcSet) busy() bool {
	if s.cb != nil && breakerBusy(s.cb) || s.bh != nil && bulkheadBusy(s.bh) {
		return true
	}
	if t := s.keys.Load(); t != nil {
		for _, e := range t.entries() {
			if e.busy() {
				return true
			}
		}
	}
	return false
}

// breakerBusy reports a breaker still protecting: not closed, or forced.
func breakerBusy(cb *CircuitBreaker) bool {
	return cb.lastState() != StateClosed || cb.mode.Load() != 0
}

// bulkheadBusy reports a bulkhead with calls inside or waiting.
func bulkheadBusy(b *Bulkhead) bool {
	s := b.Stats()
	return s.Active > 0 || s.Waiting > 0
}

// maxServices is RESILIENCE_MAX_SERVICES, its default for 0.
func (c *Config) maxServices() int {
	if c.MaxServices > 0 {
		return c.MaxServices
	}
	return defaultMaxServices
}

// idleEvict is RESILIENCE_IDLE_EVICT, its default for 0.
func (c *Config) idleEvict() time.Duration {
	if c.IdleEvict > 0 {
		return c.IdleEvict
	}
	return defaultIdleEvict
}

// setLocked returns the set of service: its own, made if there is room,
// else the overflow set. pin marks its own set as held by code. r.mu is
// held.
func (r *Registry) setLocked(service string, pin bool) *svcSet {
	key := EnvKey(service)
	if key == overflowKey {
		// A service named other is the overflow set: one breaker, one
		// series, whichever way a call came to it.
		return r.overflowLocked()
	}
	s := r.sets[key]
	if s == nil {
		if !r.bound.room(len(r.sets), r.cfg.maxServices(), r.cfg.idleEvict(), r.allSetsLocked, r.evictSetLocked) {
			if !r.closed {
				// Its timer ages the sets (a Reload may have lowered the
				// cap under a registry that never armed it), so that an
				// eviction ends the fast path once a set is idle.
				r.ageLocked()
				r.fullAt.Store(r.evictions.Load() + 1)
			}
			r.warnFullLocked()
			return r.overflowLocked()
		}
		s = &svcSet{key: key, name: service, pipes: map[pipeKey]*pipeline{}}
		s.clearedAt = monotonic()
		if r.sets == nil {
			r.sets = map[string]*svcSet{}
		}
		r.sets[key] = s
		r.known.Store(key, s)
		if len(r.sets) >= r.cfg.maxServices()/2 {
			r.ageLocked()
		}
	}
	s.pinned = s.pinned || pin
	return s
}

// overflowLocked returns the set that names without one share. r.mu is
// held.
func (r *Registry) overflowLocked() *svcSet {
	if r.other == nil {
		r.other = &svcSet{key: overflowKey, name: overflowName, other: true, pipes: map[pipeKey]*pipeline{}}
		r.other.pinned = true
	}
	return r.other
}

// warnFullLocked says once that the cap sends names to the overflow set.
// r.mu is held.
func (r *Registry) warnFullLocked() {
	if r.warnedFull {
		return
	}
	r.warnedFull = true
	slog.Warn("resilience: the registry holds RESILIENCE_MAX_SERVICES policy sets, none idle: new names share the set named "+overflowName,
		"max_services", r.cfg.maxServices(), "idle_evict", r.cfg.idleEvict().String())
}

// breakerLocked returns the set's breaker, building it on first use. r.mu
// is held.
func (r *Registry) breakerLocked(s *svcSet) *CircuitBreaker {
	if s.cb != nil {
		return s.cb
	}
	cb, err := NewCircuitBreaker(r.cfg.CircuitBreakerConfig(s.name))
	if err != nil {
		// Unreachable: NewRegistry and Reload validated the configuration.
		// Were it not so, a breaker with the defaults beats a nil one.
		cb, _ = NewCircuitBreaker(CircuitBreakerConfig{Name: s.name})
	}
	cb.sw = &r.enabled
	r.attachBreakerLocked(cb)
	s.cb = cb
	r.breakers[s.key] = cb
	return cb
}

// bulkheadLocked returns the set's bulkhead, building it on first use.
// r.mu is held.
func (r *Registry) bulkheadLocked(s *svcSet) *Bulkhead {
	if s.bh != nil {
		return s.bh
	}
	b, err := NewBulkhead(r.cfg.BulkheadConfig(s.name))
	if err != nil {
		// Unreachable, as for breakers.
		b, _ = NewBulkhead(BulkheadConfig{Name: s.name})
	}
	b.sw = &r.enabled
	r.attachBulkheadLocked(b)
	s.bh = b
	r.bulkheads[s.key] = b
	return b
}

// evictSetLocked drops an idle set and everything the registry keeps for
// its name, unless a call touched it meanwhile. r.mu is held.
func (r *Registry) evictSetLocked(s *svcSet) bool {
	if !s.tryEvict() {
		return false
	}
	delete(r.sets, s.key)
	r.known.Delete(s.key)
	sites := make([]*site, 0, len(s.pipes))
	for k, p := range s.pipes {
		r.pipelines.CompareAndDelete(k, p)
		sites = append(sites, p.site)
	}
	forgetSites(sites)
	if t := s.keys.Load(); t != nil {
		r.dropKeysLocked(t)
	}
	if s.cb != nil {
		delete(r.breakers, s.key)
		retireBreaker(s.cb)
	}
	if s.bh != nil {
		delete(r.bulkheads, s.key)
		s.bh.retired.Store(true)
		s.bh.SetGlobal(nil)
	}
	r.dropCellsLocked(s.key)
	if es, ok := r.store.(ExpiringStore); ok {
		es.Evicted(s.name)
	}
	r.evictions.Add(1)
	recordEviction(false)
	return true
}

// retireBreaker takes an evicted breaker out of the metrics and the store.
func retireBreaker(cb *CircuitBreaker) {
	cb.retired.Store(true)
	cb.SetSync(nil)
	releaseCounts(cb.name, cb.counts)
}

// dropCellsLocked forgets what the registry keeps for an evicted service
// beside its set: its timeouts, pause, limiter cell, and its hedge and
// fault injection unless the configuration or an operator set them. r.mu
// is held.
func (r *Registry) dropCellsLocked(key string) {
	delete(r.timeouts, key)
	for ph := range phase(3) {
		delete(r.phases, phaseKey{key, ph})
	}
	delete(r.pauses, key)
	delete(r.limitCells, key)
	if _, ok := r.cfg.Hedges[key]; !ok {
		delete(r.hedges, key)
	}
	if c, ok := r.chaos[key]; ok {
		if _, set := r.cfg.Chaos[key]; !set && c.started == nil && !c.stopped {
			delete(r.chaos, key)
		}
	}
}

// ageLocked arms the timer that sweeps the registry's tables, once one is
// half full. It holds the registry weakly: a registry nobody uses any more
// is collected, and its timer then stops. r.mu is held.
func (r *Registry) ageLocked() {
	if r.aging != nil {
		return
	}
	w := weak.Make(r)
	r.aging = time.AfterFunc(r.cfg.agingPeriod(), func() {
		r := w.Value()
		if r == nil {
			return
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.closed {
			return
		}
		r.sweepLocked()
		if len(r.bound.cands) > 0 {
			// Idle sets to evict: Funcs left on the overflow set look
			// for a set of their own again.
			r.evictions.Add(1)
		}
		r.aging.Reset(r.cfg.agingPeriod())
	})
}

// agingPeriod is how often the aging timer sweeps: a quarter of the idle
// period.
func (c *Config) agingPeriod() time.Duration { return max(c.idleEvict()/4, time.Millisecond) }

// sweepLocked ages every table's use bits. r.mu is held.
func (r *Registry) sweepLocked() {
	now, idle := monotonic(), r.cfg.idleEvict()
	r.bound.sweep(now, idle, r.allSetsLocked)
	each := func(t *keyTable) {
		t.bound.sweep(now, idle, t.all)
		if len(t.bound.cands) > 0 {
			t.evictions.Add(1) // keys may find room: past the full table's fast path
		}
	}
	for _, s := range r.sets {
		if t := s.keys.Load(); t != nil {
			each(t)
		}
	}
	if r.other != nil {
		if t := r.other.keys.Load(); t != nil {
			each(t)
		}
	}
}

// allSetsLocked lists the registry's own sets. r.mu is held.
func (r *Registry) allSetsLocked(yield func(*svcSet) bool) {
	for _, s := range r.sets {
		if !yield(s) {
			return
		}
	}
}

// Services reports how many policy sets the registry holds, the overflow
// set not counted: at most RESILIENCE_MAX_SERVICES. It is safe for
// concurrent use.
func (r *Registry) Services() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.sets)
}
