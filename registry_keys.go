package resilience

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

// Keyed policies: a breaker and a bulkhead per (service, key), so that one
// tenant's failing integration does not open the breaker for everyone.

type keyCtx struct{}

// keysUsed is set by the first WithKey: until then no call looks for a
// key in its context, which for a deep context is a walk up its chain.
var keysUsed atomic.Bool

// WithKey returns a copy of ctx that marks the calls made with it with
// key: a tenant, a model, an endpoint. [ForService], [Transport] and the
// registry's other entry points then run such a call through a circuit
// breaker and a bulkhead of its own (service, key), configured like the
// service's, so that failures under one key open that key's breaker only,
// and a key's calls wait for its own slots: each key may have the
// service's limit inside at once. The rest of the pipeline (retry,
// timeouts, rate limits, hedge) is the service's, and so are the fleet's
// global cap on slots (BULKHEAD_<SERVICE>_GLOBAL_LIMIT) and an operator's
// ForceOpen or ForceClose of the service's breaker, which hold for every
// key. The service's breaker otherwise counts the calls made without a
// key, and a Store shares its state, not its keys'.
//
// Each service keeps at most CIRCUIT_BREAKER_<SERVICE>_MAX_KEYS keys (1000
// by default), evicting those idle for RESILIENCE_IDLE_EVICT, never one
// whose breaker is not closed or whose bulkhead has calls inside; keys
// that find no room share the key "other". Keys are not metric
// attributes, so that they cannot multiply the series: the service's
// metrics count the calls, and resilience.circuit_breaker.open_keys how
// many of its keys are not closed. An empty key marks the call as the
// service's own.
func WithKey(ctx context.Context, key string) context.Context {
	if !keysUsed.Load() {
		keysUsed.Store(true)
	}
	return context.WithValue(ctx, keyCtx{}, key)
}

// keyOf returns the key WithKey marked ctx with, or "".
func keyOf(ctx context.Context) string {
	if !keysUsed.Load() {
		return ""
	}
	k, _ := ctx.Value(keyCtx{}).(string)
	return k
}

// keyTable holds a service's keys. Calls find their key in m without a
// lock; what changes it holds the registry's lock.
type keyTable struct {
	service string
	m       sync.Map                 // key -> *keyEntry
	other   atomic.Pointer[keyEntry] // the overflow key, once used
	n       int                      // entries in m; r.mu
	bound   bound[*keyEntry]
	retired atomic.Bool // its set was evicted
	// evictions counts the keys evicted and the sweeps that found idle
	// ones; while the table is full, fullAt is evictions+1 as of the last
	// key that found no room (0: not full): until the next eviction, keys
	// not in m go to the overflow key without the registry's lock.
	evictions atomic.Uint64
	fullAt    atomic.Uint64
}

func (t *keyTable) gone() bool { return t.retired.Load() }

// all lists the table's own keys, not the overflow key.
func (t *keyTable) all(yield func(*keyEntry) bool) {
	t.m.Range(func(_, v any) bool { return yield(v.(*keyEntry)) })
}

// entries lists the table's keys, the overflow key included.
func (t *keyTable) entries() []*keyEntry {
	var out []*keyEntry
	t.m.Range(func(_, v any) bool {
		out = append(out, v.(*keyEntry))
		return true
	})
	if o := t.other.Load(); o != nil {
		out = append(out, o)
	}
	return out
}

// open counts the keys whose breaker is not closed.
func (t *keyTable) open() int {
	n := 0
	for _, e := range t.entries() {
		if e.cb.lastState() != StateClosed {
			n++
		}
	}
	return n
}

// keyEntry is one key's policies and its pipelines, one per entry point,
// made from the service's.
type keyEntry struct {
	usage
	key   string
	cb    *CircuitBreaker
	bh    *Bulkhead
	pipes [numKinds]atomic.Pointer[pipeline]
	// aliases holds the pipelines made from another spelling's (a
	// *pipeline of the service to the key's).
	aliases sync.Map
}

func (e *keyEntry) use() *usage { return &e.usage }
func (e *keyEntry) busy() bool  { return breakerBusy(e.cb) || bulkheadBusy(e.bh) }

// keyed returns the pipeline of p's service for key, the call entered in
// its key's policies as it is in its service's, p being the service's
// pipeline for the call's entry point, which the call has entered: the
// service's set cannot be evicted meanwhile.
func (r *Registry) keyed(p *pipeline, key string) *pipeline {
	if t := p.set.keys.Load(); t != nil {
		e := t.other.Load()
		if v, ok := t.m.Load(key); ok {
			e = v.(*keyEntry)
		} else if f := t.fullAt.Load(); f == 0 || f-1 != t.evictions.Load() {
			e = nil
		}
		if e != nil && e.enter() {
			if kp := e.pipes[p.kind].Load(); kp != nil && kp.base == p {
				return kp
			}
			if v, ok := e.aliases.Load(p); ok {
				return v.(*pipeline)
			}
			e.leave()
		}
	}
	return r.keyedSlow(p, key)
}

func (r *Registry) keyedSlow(p *pipeline, key string) (kp *pipeline) {
	r.mu.Lock()
	defer r.mu.Unlock()
	defer func() {
		if kp == nil {
			// Building the key's policies panicked (a logger's
			// handler, say): the call never reaches its deferred leave.
			p.use.leave()
		}
	}()
	s := p.set
	t := s.keys.Load()
	if t == nil {
		t = &keyTable{service: s.name}
		s.keys.Store(t)
		observeKeys(t)
	}
	var e *keyEntry
	if v, ok := t.m.Load(key); ok {
		e = v.(*keyEntry) // not evicted: that takes this lock and removes it
	} else {
		maxKeys := r.cfg.CircuitBreakerConfig(s.name).maxKeys()
		evict := func(e *keyEntry) bool { return r.evictKeyLocked(t, e) }
		if t.bound.room(t.n, maxKeys, r.cfg.idleEvict(), t.all, evict) {
			e = r.newKeyLocked(s, key)
			t.m.Store(key, e)
			if t.n++; t.n >= maxKeys/2 {
				r.ageLocked()
			}
		} else {
			if !r.closed {
				r.ageLocked() // as for the sets: see setLocked
				t.fullAt.Store(t.evictions.Load() + 1)
			}
			if e = t.other.Load(); e == nil {
				e = r.newKeyLocked(s, overflowName)
				e.pinned = true
				t.other.Store(e)
			}
		}
	}
	e.enter() // true: eviction takes this lock
	if k := e.pipes[p.kind].Load(); k != nil && k.base == p {
		return k
	}
	if v, ok := e.aliases.Load(p); ok {
		return v.(*pipeline)
	}
	c := *p
	c.cb, c.bulkhead, c.use, c.base = e.cb, e.bh, &e.usage, p
	if k := e.pipes[p.kind].Load(); k == nil {
		e.pipes[p.kind].Store(&c)
	} else {
		// Another spelling of the service ("payments-eu", "PAYMENTS_EU"),
		// whose pipeline is its own.
		e.aliases.Store(p, &c)
	}
	return &c
}

// maxKeys is CIRCUIT_BREAKER_<SERVICE>_MAX_KEYS, its default for 0.
func (c CircuitBreakerConfig) maxKeys() int {
	if c.MaxKeys > 0 {
		return c.MaxKeys
	}
	return defaultMaxKeys
}

// newKeyLocked builds a key's breaker and bulkhead, configured like its
// service's, named after the service in errors and metrics, and with the
// key in their log records. r.mu is held.
func (r *Registry) newKeyLocked(s *svcSet, key string) *keyEntry {
	cc := r.keyBreakerConfigLocked(s.name, key)
	cb, err := newCircuitBreaker(cc, false)
	if err != nil {
		cb, _ = newCircuitBreaker(CircuitBreakerConfig{Name: s.name}, false) // unreachable: validated
	}
	cb.sw = &r.enabled
	bc := r.keyBulkheadConfigLocked(s.name)
	b, err := newBulkhead(bc, false)
	if err != nil {
		b, _ = newBulkhead(BulkheadConfig{Name: s.name}, false) // unreachable: validated
	}
	b.sw = &r.enabled
	e := &keyEntry{key: key, cb: cb, bh: b}
	e.clearedAt = monotonic()
	return e
}

func (r *Registry) keyBreakerConfigLocked(service, key string) CircuitBreakerConfig {
	cc := r.cfg.CircuitBreakerConfig(service)
	if !cc.DisableLogging {
		l := cc.Logger
		if l == nil {
			l = slog.Default()
		}
		cc.Logger = l.With("key", key)
	}
	return cc
}

// keyBulkheadConfigLocked is a key's bulkhead configuration: the
// service's, without its global cap, which is the service's as a whole.
func (r *Registry) keyBulkheadConfigLocked(service string) BulkheadConfig {
	bc := r.cfg.BulkheadConfig(service)
	bc.GlobalLimit = 0
	return bc
}

// evictKeyLocked drops an idle key, unless a call touched it meanwhile.
// r.mu is held.
func (r *Registry) evictKeyLocked(t *keyTable, e *keyEntry) bool {
	if !e.tryEvict() {
		return false
	}
	t.m.Delete(e.key)
	t.n--
	t.evictions.Add(1)
	retireBreaker(e.cb)
	e.bh.retired.Store(true)
	recordEviction(true)
	return true
}

// dropKeysLocked drops the keys of an evicted set, which were idle with
// it. r.mu is held.
func (r *Registry) dropKeysLocked(t *keyTable) {
	t.retired.Store(true)
	for _, e := range t.entries() {
		e.evicted.Store(true)
		retireBreaker(e.cb)
		e.bh.retired.Store(true)
	}
}

// eachKeyLocked calls f with every key of every set. r.mu is held.
func (r *Registry) eachKeyLocked(f func(s *svcSet, e *keyEntry)) {
	for _, s := range r.sets {
		if t := s.keys.Load(); t != nil {
			for _, e := range t.entries() {
				f(s, e)
			}
		}
	}
	if s := r.other; s != nil {
		if t := s.keys.Load(); t != nil {
			for _, e := range t.entries() {
				f(s, e)
			}
		}
	}
}

// reloadKeysLocked applies the configuration to every keyed breaker and
// bulkhead. r.mu is held.
func (r *Registry) reloadKeysLocked() []*CircuitBreaker {
	for _, s := range r.sets {
		if t := s.keys.Load(); t != nil {
			t.evictions.Add(1) // MaxKeys may have grown
		}
	}
	if t := r.overflowLocked().keys.Load(); t != nil {
		t.evictions.Add(1)
	}
	var cbs []*CircuitBreaker
	r.eachKeyLocked(func(s *svcSet, e *keyEntry) {
		e.cb.reconfigure(r.keyBreakerConfigLocked(s.name, e.key))
		e.bh.reconfigure(r.keyBulkheadConfigLocked(s.name))
		cbs = append(cbs, e.cb)
	})
	return cbs
}

// KeyStatus is the admin endpoint's report of a keyed breaker: the key
// and its breaker's status.
type KeyStatus struct {
	Key string `json:"key"`
	BreakerStatus
}

// OpenKeys reports the keys of service whose breakers are not closed,
// sorted, at most limit of them (100 when limit is not positive), starting
// after the key after: a page, the next one starting after the last key
// of this one. It is safe for concurrent use.
func (r *Registry) OpenKeys(service, after string, limit int) []KeyStatus {
	if limit <= 0 {
		limit = 100
	}
	t := r.keyTable(service)
	out := []KeyStatus{}
	if t == nil {
		return out
	}
	var open []*keyEntry
	for _, e := range t.entries() {
		if e.cb.lastState() != StateClosed && e.key > after {
			open = append(open, e)
		}
	}
	slices.SortFunc(open, func(a, b *keyEntry) int { return strings.Compare(a.key, b.key) })
	for _, e := range open[:min(limit, len(open))] {
		out = append(out, KeyStatus{Key: e.key, BreakerStatus: breakerStatus(e.cb)})
	}
	return out
}

// ResetKey resets the breaker of service's key, as [CircuitBreaker.Reset]
// does, and reports whether the key had one. It is safe for concurrent
// use.
func (r *Registry) ResetKey(service, key string) bool {
	t := r.keyTable(service)
	if t == nil {
		return false
	}
	var e *keyEntry
	if v, ok := t.m.Load(key); ok {
		e = v.(*keyEntry)
	} else if o := t.other.Load(); o != nil && key == overflowName {
		e = o
	}
	if e == nil {
		return false
	}
	e.cb.Reset()
	return true
}

// keyTable returns the key table of the set of service, if it has one.
func (r *Registry) keyTable(service string) *keyTable {
	r.mu.Lock()
	defer r.mu.Unlock()
	key := EnvKey(service)
	s := r.sets[key]
	if key == overflowKey {
		s = r.other
	}
	if s == nil {
		return nil
	}
	return s.keys.Load()
}

// regRef is how a registry's Func finds its pipeline at each call: the
// one it was made with until eviction drops its set, and its key's.
type regRef struct {
	r    *Registry
	name string
	kind pipeKind
	p    atomic.Pointer[pipeline]
	// gen is r.evictions when p was found: a Func left on the overflow
	// set looks for a set of its own again once an eviction made room.
	gen atomic.Uint64
}

// current returns the pipeline a call runs now, the call entered in its
// policies: the caller calls its leave when the call returns.
func (g *regRef) current(ctx context.Context) *pipeline {
	k := keyOf(ctx) // before the call is counted in: ctx.Value may panic
	p := g.p.Load()
	if !p.use.enter() {
		p = g.refresh()
	} else if p.set.other && g.r.evictions.Load() != g.gen.Load() {
		p.use.leave()
		p = g.refresh()
	}
	if k != "" {
		return g.r.keyed(p, k)
	}
	return p
}

// refresh finds the pipeline of g's service anew, and enters it.
func (g *regRef) refresh() *pipeline {
	gen := g.r.evictions.Load()
	p := g.r.current(g.name, g.kind, "")
	g.p.Store(p)
	g.gen.Store(gen)
	return p
}

// current returns the pipeline a call of service through an entry point
// runs now, the service's or its key's, the call entered in its policies:
// the caller calls its leave when the call returns.
func (r *Registry) current(service string, kind pipeKind, key string) *pipeline {
	for {
		p := r.pipeline(service, kind)
		if !p.use.enter() {
			continue // evicted between the lookup and the entry
		}
		if key != "" {
			return r.keyed(p, key)
		}
		return p
	}
}
