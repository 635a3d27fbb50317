package resilience

import (
	"context"
	"errors"
	"reflect"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"weak"

	"github.com/resilience-go/resilience/internal/cowmap"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// ScopeName is the OpenTelemetry instrumentation scope of every instrument
// this package records into: the module path.
const ScopeName = "github.com/resilience-go/resilience"

// Version is this module's version, reported as the instrumentation scope's
// version.
const Version = "0.1.0"

// The attribute keys, as the original design named them; error.type is
// OpenTelemetry's.
const (
	attrService       = attribute.Key("service")
	attrMode          = attribute.Key("mode")
	attrTrigger       = attribute.Key("trigger")
	attrFrom          = attribute.Key("from")
	attrTo            = attribute.Key("to")
	attrErrorType     = attribute.Key("error.type")
	attrFunction      = attribute.Key("function")
	attrAttempt       = attribute.Key("attempt_number")
	attrOperationType = attribute.Key("operation_type")
	attrTimeoutSecs   = attribute.Key("timeout_seconds")
	attrResourceType  = attribute.Key("resource_type")
	attrFallbackType  = attribute.Key("fallback_type")
	attrName          = attribute.Key("name")
	attrOutcome       = attribute.Key("outcome")
)

// instruments holds the instruments of one meter provider. Policies load the
// current set on each record, so a provider set at any time takes effect for
// policies built before it.
type instruments struct {
	cbTransitions, cbFailures                        metric.Int64Counter
	cbSuccesses, cbRejections, calls                 metric.Int64ObservableCounter
	cbSlowCalls                                      metric.Int64ObservableCounter
	rlGranted, rlRejected                            metric.Int64ObservableCounter
	rlWaiting                                        metric.Int64ObservableGauge
	rlWait, cbRecovery                               metric.Float64Histogram
	cbThreshold                                      metric.Float64ObservableGauge
	retryAttempts, retryExhausted, retrySuccessAfter metric.Int64Counter
	retryBudgetExhausted                             metric.Int64Counter
	timeoutExceeded, timeoutAbandoned                metric.Int64Counter
	timeoutDuration                                  metric.Float64Histogram
	bhRejections                                     metric.Int64Counter
	hedgeAttempts, hedgeWins, failoverUsed           metric.Int64Counter
	chaosInjected                                    metric.Int64Counter
	fbUsed, fbCacheHits                              metric.Int64ObservableCounter
	callDuration                                     metric.Float64Histogram
	cbState, bhActive, bhQueue, bhLimit              metric.Int64ObservableGauge
	shedRejections                                   metric.Int64Counter
	regEvictions                                     metric.Int64Counter
	cbOpenKeys                                       metric.Int64ObservableGauge
	reg                                              metric.Registration
}

var (
	current   atomic.Pointer[instruments]
	currentMu sync.Mutex // serialises replacing current
)

// SetMeterProvider makes every policy record into mp from now on, whether it
// was built before or after this call. A nil mp restores the default, the
// global OpenTelemetry provider (otel.GetMeterProvider), which itself
// forwards to whatever provider is later set globally. It is safe for
// concurrent use, also while calls are in flight.
func SetMeterProvider(mp metric.MeterProvider) {
	in := newInstruments(mp)
	currentMu.Lock()
	old := current.Swap(in)
	currentMu.Unlock()
	if old != nil && old.reg != nil {
		old.reg.Unregister()
	}
}

func meter() *instruments {
	if in := current.Load(); in != nil {
		return in
	}
	currentMu.Lock()
	defer currentMu.Unlock()
	if in := current.Load(); in != nil {
		return in
	}
	in := newInstruments(nil)
	current.Store(in)
	return in
}

// durationBuckets suit calls from a millisecond to the LLM timeout's minute.
// recoveryBuckets are the bounds of resilience.circuit_breaker.recovery_duration,
// from an open timeout of seconds to an outage of hours, with the original
// design's 5-minute MTTR target as one of them.
var recoveryBuckets = []float64{1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200}

var durationBuckets = []float64{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}

func newInstruments(mp metric.MeterProvider) *instruments {
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	m := mp.Meter(ScopeName, metric.WithInstrumentationVersion(Version))
	in := &instruments{}
	var errs []error
	counter := func(name, desc, unit string) metric.Int64Counter {
		c, err := m.Int64Counter(name, metric.WithDescription(desc), metric.WithUnit(unit))
		errs = append(errs, err)
		return c
	}
	histogram := func(name, desc string) metric.Float64Histogram {
		h, err := m.Float64Histogram(name, metric.WithDescription(desc), metric.WithUnit("s"),
			metric.WithExplicitBucketBoundaries(durationBuckets...))
		errs = append(errs, err)
		return h
	}
	observedCounter := func(name, desc, unit string) metric.Int64ObservableCounter {
		c, err := m.Int64ObservableCounter(name, metric.WithDescription(desc), metric.WithUnit(unit))
		errs = append(errs, err)
		return c
	}
	gauge := func(name, desc, unit string) metric.Int64ObservableGauge {
		g, err := m.Int64ObservableGauge(name, metric.WithDescription(desc), metric.WithUnit(unit))
		errs = append(errs, err)
		return g
	}
	in.cbState = gauge("resilience.circuit_breaker.state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.", "{state}")
	in.cbTransitions = counter("resilience.circuit_breaker.transitions", "Circuit breaker state transitions.", "{transition}")
	in.cbFailures = counter("resilience.circuit_breaker.failures", "Calls a circuit breaker counted as failures.", "{call}")
	in.cbSuccesses = observedCounter("resilience.circuit_breaker.successes", "Calls a circuit breaker counted as successes.", "{call}")
	in.cbRejections = observedCounter("resilience.circuit_breaker.rejections", "Calls a circuit breaker rejected while open or half-open; with mode shadow, calls a shadow breaker would have rejected and let through.", "{call}")
	cbRecovery, err := m.Float64Histogram("resilience.circuit_breaker.recovery_duration",
		metric.WithDescription("Time from a circuit breaker leaving closed to its closing again, open and half-open together: the time to recover."),
		metric.WithUnit("s"), metric.WithExplicitBucketBoundaries(recoveryBuckets...))
	errs = append(errs, err)
	in.cbRecovery = cbRecovery
	in.cbSlowCalls = observedCounter("resilience.circuit_breaker.slow_calls", "Calls that succeeded but took longer than the breaker's SlowCallDuration.", "{call}")
	in.cbThreshold, err = m.Float64ObservableGauge("resilience.circuit_breaker.threshold",
		metric.WithDescription("The ratio of failed (trigger failure_ratio) or slow (trigger slow_call_ratio) calls that opens a circuit breaker."),
		metric.WithUnit("1"))
	errs = append(errs, err)
	in.rlGranted = observedCounter("resilience.rate_limiter.granted", "Calls a rate limiter granted their permits.", "{call}")
	in.rlRejected = observedCounter("resilience.rate_limiter.rejected", "Calls a rate limiter refused.", "{call}")
	in.rlWaiting = gauge("resilience.rate_limiter.waiting", "Callers waiting for a rate limiter's permits.", "{call}")
	in.rlWait = histogram("resilience.rate_limiter.wait", "How long callers waited for a rate limiter's permits.")
	in.retryAttempts = counter("resilience.retry.attempts", "Failed attempts that were retried.", "{attempt}")
	in.retryExhausted = counter("resilience.retry.exhausted", "Calls whose every attempt failed.", "{call}")
	in.retryBudgetExhausted = counter("resilience.retry.budget_exhausted", "Retries a retry budget refused.", "{call}")
	in.retrySuccessAfter = counter("resilience.retry.success_after_retry", "Calls that succeeded after one or more retries.", "{call}")
	in.timeoutExceeded = counter("resilience.timeout.exceeded", "Attempts that ran past their timeout.", "{attempt}")
	in.timeoutAbandoned = counter("resilience.timeout.abandoned", "Attempts an enforced timeout returned from at the deadline while they went on running.", "{attempt}")
	in.timeoutDuration = histogram("resilience.timeout.duration", "How long attempts that exceeded their timeout really ran.")
	in.bhRejections = counter("resilience.bulkhead.rejections", "Calls a bulkhead rejected.", "{call}")
	in.bhActive = gauge("resilience.bulkhead.active_operations", "Calls inside a bulkhead.", "{call}")
	in.bhQueue = gauge("resilience.bulkhead.queue_depth", "Callers waiting for a bulkhead slot.", "{call}")
	in.bhLimit = gauge("resilience.bulkhead.limit", "Calls a bulkhead lets in at once now: its limit, which an adaptive bulkhead moves.", "{call}")
	in.shedRejections = counter("resilience.shed.rejections", "Inbound requests Shed answered with 503 because no slot was free, by priority.", "{request}")
	in.hedgeAttempts = counter("resilience.hedge.attempts", "Hedged attempts sent beside an attempt slow to answer.", "{attempt}")
	in.hedgeWins = counter("resilience.hedge.wins", "Hedged rounds that succeeded, by whether a hedge (hedged true) or the first attempt answered.", "{call}")
	in.failoverUsed = counter("resilience.failover.used", "Calls a Failover answered, by the index of the function that answered.", "{call}")
	in.chaosInjected = counter("resilience.chaos.injected", "Faults injected for a rehearsal, by fault: error or latency.", "{fault}")
	in.fbUsed = observedCounter("resilience.fallback.used", "Failed calls answered by a fallback.", "{call}")
	in.fbCacheHits = observedCounter("resilience.fallback.cache_hits", "Failed calls answered from a fallback cache.", "{call}")
	in.calls = observedCounter("resilience.calls", "Protected calls, by outcome.", "{call}")
	in.regEvictions = counter("resilience.registry.evictions", "Idle policy sets a registry evicted to stay within its cap, by kind: service or key.", "{set}")
	in.cbOpenKeys = gauge("resilience.circuit_breaker.open_keys", "Keyed circuit breakers of a service (WithKey) that are not closed.", "{key}")
	in.callDuration = histogram("resilience.call.duration", "Duration of protected calls, retries and waits included.")
	reg, err := m.RegisterCallback(func(ctx context.Context, o metric.Observer) error { return observe(in, o) }, in.cbState, in.bhActive, in.bhQueue, in.bhLimit, in.cbSuccesses, in.cbRejections, in.cbSlowCalls, in.cbThreshold, in.rlGranted, in.rlRejected, in.rlWaiting, in.calls, in.fbUsed, in.fbCacheHits, in.cbOpenKeys)
	errs = append(errs, err)
	in.reg = reg
	// An SDK reports these to otel's error handler too and leaves a working
	// no-op instrument in place, so recording is safe either way.
	if err := errors.Join(errs...); err != nil {
		otel.Handle(err)
	}
	return in
}

// The gauges, and the counters a successful call adds to, are observed at
// collection time from the live breakers, bulkheads and protected
// functions: a gauge then costs nothing per call, and a counter one atomic
// add instead of an SDK measurement (about 150 ns each with the SDK). These
// weak references are bookkeeping for that, not state: a policy or wrapper
// that is garbage collected drops out of them.
var observed struct {
	mu        sync.Mutex
	breakers  []weak.Pointer[CircuitBreaker]
	bulkheads []weak.Pointer[Bulkhead]
	limiters  []weak.Pointer[RateLimiter]
	sites     []*site // one per name and operation: see newSite
	keys      []weak.Pointer[keyTable]
	// ownSites are the registries' sites, weak: a registry nobody holds
	// takes its sites with it, and an evicted set's are retired.
	ownSites []weak.Pointer[site]
}

// prune keeps the live entries of ws, calling f on each: those neither
// collected nor retired by a registry's eviction.
func prune[T any, PT interface {
	*T
	gone() bool
}](ws []weak.Pointer[T], f func(*T)) []weak.Pointer[T] {
	live := ws[:0]
	for _, w := range ws {
		if v := w.Value(); v != nil && !PT(v).gone() {
			live = append(live, w)
			f(v)
		}
	}
	clear(ws[len(live):])
	return live
}

func observeBreaker(cb *CircuitBreaker) {
	observed.mu.Lock()
	observed.breakers = appendWeak(observed.breakers, cb)
	observed.mu.Unlock()
}

func observeRateLimiter(l *RateLimiter) {
	observed.mu.Lock()
	observed.limiters = appendWeak(observed.limiters, l)
	observed.mu.Unlock()
}

func observeBulkhead(b *Bulkhead) {
	observed.mu.Lock()
	observed.bulkheads = appendWeak(observed.bulkheads, b)
	observed.mu.Unlock()
}

// observe reports the observed instruments of in, the instruments of the
// provider whose collection called it.
func observe(in *instruments, o metric.Observer) error {
	// Policies and wrappers may share a name: their counts are summed, as
	// one observation per attribute set is all an observer may make.
	type callKey struct {
		name    string
		outcome outcome
	}
	calls := map[callKey]int64{}
	type fbKey struct{ name, errorType, kind string }
	used, hits := map[fbKey]int64{}, map[fbKey]int64{}

	observed.mu.Lock()
	observed.breakers = prune(observed.breakers, func(cb *CircuitBreaker) {
		r := cb.rule.Load()
		attrs := metric.WithAttributeSet(attribute.NewSet(attrService.String(cb.name)))
		if r.shadow {
			attrs = metric.WithAttributeSet(attribute.NewSet(attrService.String(cb.name), attrMode.String("shadow")))
		}
		o.ObserveInt64(in.cbState, int64(cb.lastState()), attrs)
		if r.ratio > 0 {
			o.ObserveFloat64(in.cbThreshold, r.ratio, metric.WithAttributeSet(attribute.NewSet(
				attrService.String(cb.name), attrTrigger.String("failure_ratio"))))
		}
		if r.slowRatio > 0 {
			o.ObserveFloat64(in.cbThreshold, r.slowRatio, metric.WithAttributeSet(attribute.NewSet(
				attrService.String(cb.name), attrTrigger.String("slow_call_ratio"))))
		}
	})
	observed.limiters = prune(observed.limiters, func(l *RateLimiter) {
		attrs := metric.WithAttributeSet(attribute.NewSet(attrName.String(l.name)))
		s := l.Stats()
		o.ObserveInt64(in.rlGranted, int64(s.Granted), attrs)
		o.ObserveInt64(in.rlRejected, int64(s.Rejected), attrs)
		o.ObserveInt64(in.rlWaiting, int64(s.Waiting), attrs)
	})
	observed.bulkheads = prune(observed.bulkheads, func(b *Bulkhead) {
		s := b.Stats()
		attrs := metric.WithAttributeSet(attribute.NewSet(attrResourceType.String(b.name)))
		o.ObserveInt64(in.bhActive, int64(s.Active), attrs)
		o.ObserveInt64(in.bhQueue, int64(s.Waiting), attrs)
		o.ObserveInt64(in.bhLimit, int64(b.Limit()), attrs)
	})
	observeSite := func(s *site) {
		for oc := range numOutcomes {
			if n := s.counts[oc].Load(); n > 0 {
				calls[callKey{s.name, oc}] += n
			}
		}
		for k := range s.fbUsed {
			s.fbUsed[k].each(func(et string, n int64) { used[fbKey{s.name, et, fallbackKinds[k]}] += n })
		}
		s.fbHits.each(func(et string, n int64) { hits[fbKey{s.name, et, ""}] += n })
	}
	for _, s := range observed.sites {
		observeSite(s)
	}
	observed.ownSites = prune(observed.ownSites, observeSite)
	observeOpenKeys(in, o)
	observed.mu.Unlock()

	eachServiceCounts(func(k string, c *serviceCounts) {
		attrs := metric.WithAttributeSet(attribute.NewSet(attrService.String(k)))
		o.ObserveInt64(in.cbSuccesses, c.successes.Load(), attrs)
		o.ObserveInt64(in.cbRejections, c.rejections.Load(), attrs)
		if n := c.shadowRejections.Load(); n > 0 {
			o.ObserveInt64(in.cbRejections, n, metric.WithAttributeSet(attribute.NewSet(
				attrService.String(k), attrMode.String("shadow"))))
		}
		if n := c.slowCalls.Load(); n > 0 {
			o.ObserveInt64(in.cbSlowCalls, n, attrs)
		}
	})
	for k, n := range used {
		o.ObserveInt64(in.fbUsed, n, metric.WithAttributeSet(attribute.NewSet(
			attrFunction.String(k.name), attrErrorType.String(k.errorType), attrFallbackType.String(k.kind))))
	}
	for k, n := range hits {
		o.ObserveInt64(in.fbCacheHits, n, metric.WithAttributeSet(attribute.NewSet(
			attrFunction.String(k.name), attrErrorType.String(k.errorType))))
	}
	for k, n := range calls {
		o.ObserveInt64(in.calls, n, metric.WithAttributeSet(attribute.NewSet(attrName.String(k.name), attrOutcome.String(outcomeNames[k.outcome]))))
	}
	return nil
}

// optCache keeps the option slices of attribute sets that vary per call,
// so that recording them allocates only the first time.
type optCache struct {
	m cowmap.Map[[]metric.AddOption]
}

// maxCached bounds an optCache; past it, options are built per call.
const maxCached = 64

func (c *optCache) get(key string, kvs func() []attribute.KeyValue) []metric.AddOption {
	return c.m.Get(key, func() []metric.AddOption { return addSet(kvs()...) }, maxCached)
}

// keyedCounts counts per key, for observed counters: an atomic add per
// call. Every key is kept, so that no count is lost.
type keyedCounts struct{ m cowmap.Map[*atomic.Int64] }

func (c *keyedCounts) add(key string) {
	c.m.Get(key, func() *atomic.Int64 { return new(atomic.Int64) }, 0).Add(1)
}

// each calls f with every key and its count.
func (c *keyedCounts) each(f func(key string, n int64)) {
	c.m.Each(func(k string, n *atomic.Int64) { f(k, n.Load()) })
}

func addSet(kvs ...attribute.KeyValue) []metric.AddOption {
	return []metric.AddOption{metric.WithAttributeSet(attribute.NewSet(kvs...))}
}

func recSet(kvs ...attribute.KeyValue) []metric.RecordOption {
	return []metric.RecordOption{metric.WithAttributeSet(attribute.NewSet(kvs...))}
}

// The outcomes of a protected call, the values of resilience.calls' outcome.
type outcome int

const (
	outcomeSuccess  outcome = iota
	outcomeFailure          // fn's error, retries exhausted
	outcomeRejected         // an open breaker or a full bulkhead
	outcomeTimeout          // a timeout of this package
	outcomeCanceled         // the caller's own cancellation or deadline
	outcomeFallback         // a fallback answered
	numOutcomes
)

var outcomeNames = [numOutcomes]string{"success", "failure", "rejected", "timeout", "canceled", "fallback"}

func classify(ctx context.Context, err error) outcome {
	switch {
	case err == nil:
		return outcomeSuccess
	case ctx.Err() != nil:
		return outcomeCanceled
	}
	if e, ok := err.(*Error); ok {
		switch e.Err {
		case ErrCircuitOpen, ErrBulkheadFull, ErrRateLimited:
			return outcomeRejected
		case ErrTimeout:
			return outcomeTimeout
		}
	}
	switch {
	case errors.Is(err, ErrCircuitOpen), errors.Is(err, ErrBulkheadFull), errors.Is(err, ErrRateLimited):
		return outcomeRejected
	case errors.Is(err, ErrTimeout):
		return outcomeTimeout
	}
	return outcomeFailure
}

// site is one protected function's metric identity, built once when it is
// wrapped, so that recording allocates nothing.
type site struct {
	name, operation string
	retired         atomic.Bool               // its registry evicted it: no longer observed
	counts          [numOutcomes]atomic.Int64 // resilience.calls, observed
	durations       [numOutcomes][]metric.RecordOption
	function        []metric.AddOption            // the function attribute alone
	fbUsed          [numFallbackKinds]keyedCounts // by fallback_type, then error.type; observed
	fbHits          keyedCounts                   // by error.type; observed
	retryAttempts   optCache                      // by attempt_number and error.type
	hedgeWins       [2][]metric.AddOption         // hedged false, true
	chaos           [2][]metric.AddOption         // by fault: faultError, faultLatency
	timeoutDuration []metric.RecordOption
}

// sites holds one site per name and operation, so that wrappers built per
// request (ForService or Compose inside a handler) cost a map lookup, not a
// new set of attributes, and the metrics stay bounded by the names.
var sites sync.Map // siteKey -> *site

type siteKey struct{ name, operation string }

func newSite(name, operation string) *site {
	if operation == "" {
		operation = "default"
	}
	key := siteKey{name, operation}
	if s, ok := sites.Load(key); ok {
		return s.(*site)
	}
	s := makeSite(name, operation)
	if actual, loaded := sites.LoadOrStore(key, s); loaded {
		return actual.(*site)
	}
	observeSite(s)
	return s
}

// newOwnSite returns a site of its own, not shared through sites: a
// registry's, which the registry retires when it evicts the name.
func newOwnSite(name, operation string) *site {
	s := makeSite(name, operation)
	observed.mu.Lock()
	observed.ownSites = appendWeak(observed.ownSites, s)
	observed.mu.Unlock()
	return s
}

func observeSite(s *site) {
	observed.mu.Lock()
	observed.sites = append(observed.sites, s)
	observed.mu.Unlock()
}

func makeSite(name, operation string) *site {
	s := &site{name: name, operation: operation}
	for o := range numOutcomes {
		s.durations[o] = recSet(attrName.String(name), attrOutcome.String(outcomeNames[o]))
	}
	s.function = addSet(attrFunction.String(name))
	s.hedgeWins = hedgeWinAttrs(name)
	s.chaos = [2][]metric.AddOption{
		faultError:   addSet(attrFunction.String(name), attribute.String("fault", "error")),
		faultLatency: addSet(attrFunction.String(name), attribute.String("fault", "latency")),
	}
	s.timeoutDuration = recSet(attrFunction.String(name), attrOperationType.String(operation))
	return s
}

// timedOut records an attempt that ran past its timeout d: the violation,
// and how long the attempt really took, which for a function that ignores
// its context can be far longer than d.
func (s *site) timedOut(ctx context.Context, start time.Time, d time.Duration) {
	in := meter()
	in.timeoutExceeded.Add(ctx, 1, addSet(attrFunction.String(s.name), attrOperationType.String(s.operation),
		attrTimeoutSecs.String(strconv.FormatFloat(d.Seconds(), 'f', -1, 64)))...)
	in.timeoutDuration.Record(ctx, time.Since(start).Seconds(), s.timeoutDuration...)
	traceTimeout(ctx, s.name, s.operation, d)
}

// The faults chaos injects, the values of the fault attribute of
// resilience.chaos.injected.
const (
	faultError = iota
	faultLatency
)

// injected counts a fault injected into one of the site's attempts.
func (s *site) injected(ctx context.Context, fault int) {
	meter().chaosInjected.Add(ctx, 1, s.chaos[fault]...)
	traceChaos(ctx, s.name, fault)
}

// retried counts a failed attempt that is about to be retried.
func (s *site) retried(ctx context.Context, in *instruments, attempt int, et string) {
	in.retryAttempts.Add(ctx, 1, s.retryAttempts.get(strconv.Itoa(attempt)+" "+et, func() []attribute.KeyValue {
		return []attribute.KeyValue{attrFunction.String(s.name), attrAttempt.Int(attempt), attrErrorType.String(et)}
	})...)
}

// The fallback kinds, the values of fallback_type.
const (
	fallbackFunction = iota
	fallbackValue
	fallbackCached
	fallbackStale
	fallbackEmpty
	numFallbackKinds
)

var fallbackKinds = [numFallbackKinds]string{"function", "value", "cached", "stale", "empty"}

// madeFallbacks maps the code of each Fallback this package's constructors
// made to its kind. The name of the code cannot tell: a constructor inlined
// into its caller, as FallbackValue and the cache's methods are outside this
// package, gives its closure the caller's name.
var madeFallbacks sync.Map // code pointer (uintptr) -> kind

// markFallback records fb as made by a constructor of the given kind. The
// map holds one entry per closure and inlined call site, not per call.
func markFallback[T any](fb Fallback[T], kind int) Fallback[T] {
	pc := reflect.ValueOf(fb).Pointer()
	if _, ok := madeFallbacks.Load(pc); !ok {
		madeFallbacks.Store(pc, kind)
	}
	return fb
}

// fallbackKind tells which constructor made fb, once at wrap time.
func fallbackKind(fb any) int {
	if k, ok := madeFallbacks.Load(reflect.ValueOf(fb).Pointer()); ok {
		return k.(int)
	}
	return fallbackFunction
}

// epoch is a fixed instant for monotonic.
var epoch = time.Now()

// monotonic reads the monotonic clock alone: time.Since on a fixed instant
// skips the wall clock that time.Now also reads, about half the cost.
func monotonic() time.Duration { return time.Since(epoch) }
