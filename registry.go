package resilience

import (
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Registry holds the named, shared policies of a service: one breaker per
// downstream service, one bulkhead per resource, one retry policy and the
// timeouts per operation type, all from one [Config]. It is the original
// design's get_circuit_breaker, get_bulkhead and get_resilience_config.
//
// A Registry is safe for concurrent use by multiple goroutines. Build it with
// [NewRegistry]; [Default] is the one built from the environment.
type Registry struct {
	// enabled is the registry's one on/off switch (RESILIENCE_ENABLED),
	// read by every policy it builds and every entry point that uses it.
	enabled   atomic.Bool
	pipelines sync.Map // pipeKey -> *pipeline, of the sets in sets
	// evictions counts the sets evicted, and the sweeps that found idle
	// ones, so that a Func left on the overflow set looks for a set of
	// its own again once there may be room.
	evictions atomic.Uint64
	// While the sets are full, fullAt is evictions+1 as of the last name
	// that found no room (0: not full): until the next eviction, names
	// with no set go to the overflow set without taking the lock.
	fullAt     atomic.Uint64
	known      sync.Map // EnvKey -> *svcSet: the sets, for that check
	otherPipes [numKinds]atomic.Pointer[pipeline]

	mu         sync.Mutex
	cfg        Config
	sets       map[string]*svcSet // by EnvKey: registry_cap.go
	other      *svcSet            // the overflow set, once used
	bound      bound[*svcSet]
	warnedFull bool
	aging      *time.Timer // sweeps the tables once one is half full
	closed     bool
	breakers   map[string]*CircuitBreaker
	bulkheads  map[string]*Bulkhead
	timeouts   map[string]*atomic.Int64   // per operation key, for ForService
	phases     map[phaseKey]*atomic.Int64 // total, idle and stream timeouts, likewise
	pauses     map[string]*atomic.Int64   // per service: a provider's spent window, until
	limiters   map[string]*RateLimiter    // by limiterKey
	// limitCells hold each service's request limiter for its pipelines.
	limitCells map[string]limitCell
	hedges     map[string]*serviceHedge // by EnvKey of the service
	chaos      map[string]*serviceChaos // by EnvKey of the service
	retry      *Retry
	store      Store
	ownsStore  bool // opened from cfg.StoreURL: Close closes it
}

// Close stops the background work of a store the registry opened from its
// StoreURL, and the timer that ages its policy sets for eviction. It is
// safe to call more than once.
func (r *Registry) Close() error {
	r.mu.Lock()
	r.closed = true
	if r.aging != nil {
		r.aging.Stop()
	}
	s, owned := r.store, r.ownsStore
	if owned {
		r.store = nil
		r.ownsStore = false
	}
	r.mu.Unlock()
	if owned && s != nil {
		return s.Close()
	}
	return nil
}

// NewRegistry returns a registry configured by cfg, or every error
// [Config.Validate] finds in it.
func NewRegistry(cfg Config) (*Registry, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	r := &Registry{
		cfg:       cfg.Clone(),
		breakers:  map[string]*CircuitBreaker{},
		sets:      map[string]*svcSet{},
		bulkheads: map[string]*Bulkhead{},
		timeouts:  map[string]*atomic.Int64{},
	}
	r.retry, _ = NewRetry(cfg.Retry)
	r.retry.sw = &r.enabled
	r.enabled.Store(cfg.Enabled)
	r.reloadChaosLocked() // no other goroutine has r yet
	if cfg.StoreURL != "" {
		s, err := openStore(cfg.StoreURL)
		if err != nil {
			return nil, err
		}
		r.store, r.ownsStore = s, true
		r.tellStoreIdleLocked() // no other goroutine has r yet
	}
	return r, nil
}

// Config returns a copy of the registry's current configuration.
func (r *Registry) Config() Config {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cfg.Clone()
}

// Enabled reports whether the registry's policies act (RESILIENCE_ENABLED).
func (r *Registry) Enabled() bool { return r.enabled.Load() }

// CircuitBreaker returns the breaker for a service, built on first use from
// the service's configuration and shared from then on: names with the same
// [EnvKey] ("payments-eu", "PAYMENTS_EU") share one breaker. A breaker
// asked for by name is held by code, so its policy set is never evicted;
// when the registry holds RESILIENCE_MAX_SERVICES sets and none is idle, a
// new name gets the breaker of the set named "other".
func (r *Registry) CircuitBreaker(name string) *CircuitBreaker {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.breakerLocked(r.setLocked(name, true))
}

// Bulkhead returns the bulkhead for a resource, built on first use from the
// resource's configuration and shared from then on. Like a breaker asked
// for by name, its set is never evicted, and past the cap a new name gets
// the bulkhead of the set named "other".
func (r *Registry) Bulkhead(name string) *Bulkhead {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.bulkheadLocked(r.setLocked(name, true))
}

// Retry returns the registry's retry policy.
func (r *Registry) Retry() *Retry { return r.retry }

// Timeout returns the timeout for an operation type: TIMEOUT_<OP> if set,
// else the design's default for llm, auth, db and http, else
// TIMEOUT_DEFAULT.
func (r *Registry) Timeout(operation string) time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cfg.Timeout(operation)
}

func (r *Registry) timeoutCellLocked(operation string) *atomic.Int64 {
	return cellLocked(&r.timeouts, EnvKey(operation), func() int64 { return int64(r.cfg.Timeout(operation)) })
}

// cellLocked returns the cell m holds under k, making it with the value
// first() if there is none. r.mu is held.
func cellLocked[K comparable](m *map[K]*atomic.Int64, k K, first func() int64) *atomic.Int64 {
	if c, ok := (*m)[k]; ok {
		return c
	}
	if *m == nil {
		*m = map[K]*atomic.Int64{}
	}
	c := new(atomic.Int64)
	c.Store(first())
	(*m)[k] = c
	return c
}

// pauseCellLocked returns the cell of a service's pause, which Transport
// sets from a 429 that says the provider's window is spent. r.mu is held.
func (r *Registry) pauseCellLocked(service string) *atomic.Int64 {
	return cellLocked(&r.pauses, EnvKey(service), func() int64 { return 0 })
}

// The timeouts of a call's phases beyond the attempt's.
type phase int

const (
	phaseTotal  phase = iota // TIMEOUT_<OP>_TOTAL
	phaseIdle                // TIMEOUT_<OP>_IDLE
	phaseStream              // TIMEOUT_<OP>_STREAM
)

func (p phase) of(c Config) map[string]time.Duration {
	switch p {
	case phaseIdle:
		return c.IdleTimeouts
	case phaseStream:
		return c.StreamTimeouts
	}
	return c.TotalTimeouts
}

type phaseKey struct {
	op    string
	phase phase
}

// phaseCellLocked returns the cell of an operation's timeout of phase ph,
// 0 when it has none, which a Reload updates. r.mu is held.
func (r *Registry) phaseCellLocked(operation string, ph phase) *atomic.Int64 {
	k := phaseKey{EnvKey(operation), ph}
	return cellLocked(&r.phases, k, func() int64 { return int64(phaseTimeout(ph.of(r.cfg), k.op)) })
}

// Reload applies cfg to the live registry without dropping calls in flight:
// breakers take their new FailMax at once (a new OpenTimeout or
// HalfOpenMaxCalls starts them afresh, closed), bulkheads take their new
// limit (shrinking admits no one until enough calls have finished), queue
// bound, wait and fail-fast setting, the retry policy and timeouts apply
// from the next call, and Enabled switches every policy and entry point on
// or off. An invalid cfg changes nothing and returns every error.
//
// Reload is a merge: settings that no variable sets, and that cfg leaves at
// their zero value, keep their current values, so that a configuration
// loaded from the environment does not drop what the code set. They are
// RetryConfig's Strategy, InitialDelay, RetryIf, OnRetry, Delay and Budget, and
// CircuitBreakerConfig's IsFailure, OnStateChange, Logger and
// DisableLogging (of the default and of each service in both).
func (r *Registry) Reload(cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	cfg = cfg.Clone()
	r.mu.Lock()
	cfg = keepCode(r.cfg, cfg)
	if err := cfg.Validate(); err != nil {
		// Unreachable: keepCode keeps only what fits the new values.
		r.mu.Unlock()
		return err
	}
	r.cfg = cfg
	r.retry.reconfigure(cfg.Retry)
	breakers := make([]*CircuitBreaker, 0, len(r.breakers))
	for _, cb := range r.breakers {
		cb.reconfigure(cfg.CircuitBreakerConfig(cb.Name()))
		breakers = append(breakers, cb)
	}
	for _, b := range r.bulkheads {
		b.reconfigure(cfg.BulkheadConfig(b.Name()))
		r.attachBulkheadLocked(b)
	}
	for key, c := range r.timeouts {
		c.Store(int64(cfg.Timeout(key)))
	}
	for k, c := range r.phases {
		c.Store(int64(phaseTimeout(k.phase.of(cfg), k.op)))
	}
	breakers = append(breakers, r.reloadKeysLocked()...)
	r.reloadLimitersLocked()
	r.reloadHedgesLocked()
	r.reloadChaosLocked()
	r.tellStoreIdleLocked()
	// The caps may have grown: past the full registry's fast path, and
	// Funcs left on the overflow set look for room again.
	r.evictions.Add(1)
	wasOn := r.enabled.Swap(cfg.Enabled)
	if wasOn && !cfg.Enabled {
		// Callers queued for a slot pass through too, as every later
		// caller does.
		for _, b := range r.bulkheads {
			b.bypassWaiters()
		}
		r.eachKeyLocked(func(_ *svcSet, e *keyEntry) { e.bh.bypassWaiters() })
	}
	r.mu.Unlock()
	// Transitions the new settings caused are delivered outside the
	// registry's lock, so that a callback may call the registry.
	for _, cb := range breakers {
		cb.flush()
	}
	return nil
}

// keepCode returns next with the settings of cur that come from code, not
// from variables, wherever next leaves them zero. next is a clone.
func keepCode(cur, next Config) Config {
	rc, rn := cur.Retry, &next.Retry
	if rn.Strategy == RetryExponential {
		rn.Strategy = rc.Strategy
	}
	maxDelay := rn.MaxDelay
	if maxDelay == 0 {
		maxDelay = defaultMaxDelay
	}
	if rn.InitialDelay == 0 && rc.InitialDelay <= maxDelay {
		rn.InitialDelay = rc.InitialDelay
	}
	if rn.RetryIf == nil {
		rn.RetryIf = rc.RetryIf
	}
	if rn.OnRetry == nil {
		rn.OnRetry = rc.OnRetry
	}
	if rn.Delay == nil {
		rn.Delay = rc.Delay
	}
	if rn.Budget == nil {
		rn.Budget = rc.Budget
	}
	next.DefaultCircuitBreaker = keepBreakerCode(cur.DefaultCircuitBreaker, next.DefaultCircuitBreaker)
	for k, n := range next.CircuitBreakers {
		if c, ok := cur.CircuitBreakers[k]; ok {
			next.CircuitBreakers[k] = keepBreakerCode(c, n)
		}
	}
	next.DefaultBulkhead = keepBulkheadCode(cur.DefaultBulkhead, next.DefaultBulkhead)
	for k, n := range next.Bulkheads {
		if c, ok := cur.Bulkheads[k]; ok {
			next.Bulkheads[k] = keepBulkheadCode(c, n)
		}
	}
	return next
}

// keepBulkheadCode keeps an adaptive limit's Smoothing and Window, which
// no variable sets, when both configurations are adaptive.
func keepBulkheadCode(cur, next BulkheadConfig) BulkheadConfig {
	if cur.Adaptive == nil || next.Adaptive == nil {
		return next
	}
	a := *next.Adaptive
	if a.Smoothing == 0 {
		a.Smoothing = cur.Adaptive.Smoothing
	}
	if a.Window == 0 {
		a.Window = cur.Adaptive.Window
	}
	next.Adaptive = &a
	return next
}

func keepBreakerCode(cur, next CircuitBreakerConfig) CircuitBreakerConfig {
	if next.IsFailure == nil {
		next.IsFailure = cur.IsFailure
	}
	if next.OnStateChange == nil {
		next.OnStateChange = cur.OnStateChange
	}
	if next.Logger == nil {
		next.Logger = cur.Logger
	}
	next.DisableLogging = next.DisableLogging || cur.DisableLogging
	return next
}

// pipeKind is the entry point a registry pipeline serves.
type pipeKind uint8

const (
	kindService pipeKind = iota // ForService
	kindHandoff                 // Transport: attempts hand their slot to the response body
	kindNoHedge                 // ForServiceNoHedge
	kindStream                  // ForStream: Transport's, without the hedge
	numKinds
)

// pipeKey names a registry pipeline: a service name's, for one entry point.
type pipeKey struct {
	service string
	kind    pipeKind
}

// pipeline returns the registry's pipeline for service and an entry point,
// built once per set: its breaker, the retry policy, its timeouts, limits,
// hedge and bulkhead, under the registry's switch. A name with no set of
// its own gets the overflow set's.
func (r *Registry) pipeline(service string, kind pipeKind) *pipeline {
	if v, ok := r.pipelines.Load(pipeKey{service, kind}); ok {
		if p := v.(*pipeline); !p.use.evicted.Load() {
			return p
		}
	}
	if f := r.fullAt.Load(); f != 0 && f-1 == r.evictions.Load() {
		if p := r.otherPipes[kind].Load(); p != nil {
			if _, known := r.known.Load(EnvKey(service)); !known {
				return p
			}
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pipelineLocked(service, kind)
}

// pipelineLocked is pipeline with r.mu held.
func (r *Registry) pipelineLocked(service string, kind pipeKind) *pipeline {
	s := r.setLocked(service, false)
	if s.other {
		service = overflowName
	}
	return r.setPipelineLocked(s, service, kind)
}

// setPipelineLocked returns the pipeline of s for the name service and an
// entry point, building it on first use. r.mu is held.
func (r *Registry) setPipelineLocked(s *svcSet, service string, kind pipeKind) *pipeline {
	k := pipeKey{service, kind}
	if p := s.pipes[k]; p != nil {
		return p
	}
	var p *pipeline
	switch kind {
	case kindNoHedge, kindStream:
		base := kindService
		if kind == kindStream {
			base = kindHandoff
		}
		c := *r.setPipelineLocked(s, service, base)
		c.hedge, c.hedgeCell, c.hedged = nil, nil, false
		p = &c
	default:
		p = &pipeline{
			sw:       &r.enabled,
			cb:       r.breakerLocked(s),
			retry:    r.retry,
			timeout:  r.timeoutCellLocked(service),
			total:    r.phaseCellLocked(service, phaseTotal),
			idle:     r.phaseCellLocked(service, phaseIdle),
			stream:   r.phaseCellLocked(service, phaseStream),
			bulkhead: r.bulkheadLocked(s),
			handoff:  kind == kindHandoff,
		}
		p.limitCell = r.limitCellLocked(service)
		p.hedgeCell, p.hedged = r.hedgeCellLocked(service), true
		p.pause = r.pauseCellLocked(service)
		p.chaos = &r.chaosLocked(service).cell
		p.setSite(newOwnSite(service, service))
	}
	p.set, p.use, p.kind = s, &s.usage, kind
	s.pipes[k] = p
	if s.other {
		r.otherPipes[kind].Store(p)
	} else {
		r.pipelines.Store(k, p)
	}
	return p
}

// ForService returns fn protected by the registry's policies for service:
// its breaker, the retry policy, its timeout (per attempt) and its bulkhead,
// in the one pipeline that [Compose] and [Transport] run, named service in
// the metrics. A nil r means [Default]. The pipeline is built once per
// service, so wrapping per request is cheap. Reloads apply to it from the
// next call; while the registry is disabled, calls go straight to fn.
func ForService[T any](r *Registry, service string, fn Func[T]) Func[T] {
	if fn == nil {
		return failing[T](invalid("ForService fn", nil, "must not be nil"))
	}
	if r == nil {
		r = Default()
	}
	return newRegistryEdge(r, service, kindService, fn)
}

var defaultRegistry struct {
	once sync.Once
	r    *Registry
}

// Default returns the default registry, the package's one piece of global
// state, built on first use from the process environment by [LoadConfig].
//
// If the environment is invalid, the default registry does not run with half
// a configuration: it uses [DefaultConfig] whole, and says so once through
// log/slog at Warn, with every bad variable in the message. Services that
// would rather stop should call LoadConfig themselves at start-up and fail
// on its error.
func Default() *Registry {
	defaultRegistry.once.Do(func() { defaultRegistry.r = newDefaultRegistry(LoadConfig) })
	return defaultRegistry.r
}

func newDefaultRegistry(load func() (Config, error)) *Registry {
	cfg, err := load()
	if err != nil {
		slog.Warn("resilience: invalid environment; using the built-in defaults for every policy", "error", err.Error())
		cfg = DefaultConfig()
	}
	r, err := NewRegistry(cfg)
	if err != nil {
		// The store could not be opened: run on local state, and say so.
		slog.Warn("resilience: cannot share state; every policy runs on local state", "error", err.Error())
		cfg.StoreURL = ""
		if r, err = NewRegistry(cfg); err != nil {
			r, _ = NewRegistry(DefaultConfig())
		}
	}
	return r
}

// GetCircuitBreaker returns the default registry's breaker for a service.
func GetCircuitBreaker(name string) *CircuitBreaker { return Default().CircuitBreaker(name) }

// GetBulkhead returns the default registry's bulkhead for a resource.
func GetBulkhead(name string) *Bulkhead { return Default().Bulkhead(name) }

// GetResilienceConfig returns the default registry's configuration.
func GetResilienceConfig() Config { return Default().Config() }
