package resilience

import (
	"context"
	"errors"
	"maps"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"weak"

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
	cbTransitions, cbFailures, cbSuccesses, cbRejections metric.Int64Counter
	retryAttempts, retryExhausted, retrySuccessAfter     metric.Int64Counter
	timeoutExceeded, timeoutAbandoned                    metric.Int64Counter
	timeoutDuration                                      metric.Float64Histogram
	bhRejections                                         metric.Int64Counter
	fbUsed, fbCacheHits                                  metric.Int64Counter
	calls                                                metric.Int64Counter
	callDuration                                         metric.Float64Histogram
	cbState, bhActive, bhQueue                           metric.Int64ObservableGauge
	reg                                                  metric.Registration
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
	gauge := func(name, desc, unit string) metric.Int64ObservableGauge {
		g, err := m.Int64ObservableGauge(name, metric.WithDescription(desc), metric.WithUnit(unit))
		errs = append(errs, err)
		return g
	}
	in.cbState = gauge("resilience.circuit_breaker.state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.", "{state}")
	in.cbTransitions = counter("resilience.circuit_breaker.transitions", "Circuit breaker state transitions.", "{transition}")
	in.cbFailures = counter("resilience.circuit_breaker.failures", "Calls a circuit breaker counted as failures.", "{call}")
	in.cbSuccesses = counter("resilience.circuit_breaker.successes", "Calls a circuit breaker counted as successes.", "{call}")
	in.cbRejections = counter("resilience.circuit_breaker.rejections", "Calls a circuit breaker rejected while open or half-open.", "{call}")
	in.retryAttempts = counter("resilience.retry.attempts", "Failed attempts that were retried.", "{attempt}")
	in.retryExhausted = counter("resilience.retry.exhausted", "Calls whose every attempt failed.", "{call}")
	in.retrySuccessAfter = counter("resilience.retry.success_after_retry", "Calls that succeeded after one or more retries.", "{call}")
	in.timeoutExceeded = counter("resilience.timeout.exceeded", "Attempts that ran past their timeout.", "{attempt}")
	in.timeoutAbandoned = counter("resilience.timeout.abandoned", "Attempts an enforced timeout returned from at the deadline while they went on running.", "{attempt}")
	in.timeoutDuration = histogram("resilience.timeout.duration", "Duration of attempts run under a timeout.")
	in.bhRejections = counter("resilience.bulkhead.rejections", "Calls a bulkhead rejected.", "{call}")
	in.bhActive = gauge("resilience.bulkhead.active_operations", "Calls inside a bulkhead.", "{call}")
	in.bhQueue = gauge("resilience.bulkhead.queue_depth", "Callers waiting for a bulkhead slot.", "{call}")
	in.fbUsed = counter("resilience.fallback.used", "Failed calls answered by a fallback.", "{call}")
	in.fbCacheHits = counter("resilience.fallback.cache_hits", "Failed calls answered from a fallback cache.", "{call}")
	in.calls = counter("resilience.calls", "Protected calls, by outcome.", "{call}")
	in.callDuration = histogram("resilience.call.duration", "Duration of protected calls, retries and waits included.")
	reg, err := m.RegisterCallback(observe, in.cbState, in.bhActive, in.bhQueue)
	errs = append(errs, err)
	in.reg = reg
	// An SDK reports these to otel's error handler too and leaves a working
	// no-op instrument in place, so recording is safe either way.
	if err := errors.Join(errs...); err != nil {
		otel.Handle(err)
	}
	return in
}

// The gauges are observed at collection time from the live breakers and
// bulkheads, so that they cost nothing per call. These weak references are
// bookkeeping for that, not state: a policy that is garbage collected drops
// out of them.
var observed struct {
	mu        sync.Mutex
	breakers  []weak.Pointer[CircuitBreaker]
	bulkheads []weak.Pointer[Bulkhead]
}

func observeBreaker(cb *CircuitBreaker) {
	observed.mu.Lock()
	observed.breakers = append(observed.breakers, weak.Make(cb))
	observed.mu.Unlock()
}

func observeBulkhead(b *Bulkhead) {
	observed.mu.Lock()
	observed.bulkheads = append(observed.bulkheads, weak.Make(b))
	observed.mu.Unlock()
}

func observe(_ context.Context, o metric.Observer) error {
	in := current.Load()
	if in == nil {
		return nil
	}
	observed.mu.Lock()
	defer observed.mu.Unlock()
	live := observed.breakers[:0]
	for _, w := range observed.breakers {
		if cb := w.Value(); cb != nil {
			live = append(live, w)
			o.ObserveInt64(in.cbState, int64(cb.lastState()), metric.WithAttributeSet(attribute.NewSet(attrService.String(cb.name))))
		}
	}
	clear(observed.breakers[len(live):])
	observed.breakers = live
	liveB := observed.bulkheads[:0]
	for _, w := range observed.bulkheads {
		if b := w.Value(); b != nil {
			liveB = append(liveB, w)
			s := b.Stats()
			attrs := metric.WithAttributeSet(attribute.NewSet(attrResourceType.String(b.name)))
			o.ObserveInt64(in.bhActive, int64(s.Active), attrs)
			o.ObserveInt64(in.bhQueue, int64(s.Waiting), attrs)
		}
	}
	clear(observed.bulkheads[len(liveB):])
	observed.bulkheads = liveB
	return nil
}

// errorType returns OpenTelemetry's error.type for err: a short name for
// this package's sentinels and the context errors, else the Go type of the
// first error in the chain that is not a plain wrapper. It is never the
// message, so its cardinality is bounded by the program's error types.
func errorType(err error) string {
	if e, ok := err.(*Error); ok {
		// The common case, a policy's own error: no chain to walk.
		switch e.Err {
		case ErrTimeout:
			return "timeout"
		case ErrCircuitOpen:
			return "circuit_open"
		case ErrBulkheadFull:
			return "bulkhead_full"
		}
	}
	switch {
	case err == nil:
		return ""
	case errors.Is(err, ErrTimeout):
		return "timeout"
	case errors.Is(err, ErrCircuitOpen):
		return "circuit_open"
	case errors.Is(err, ErrBulkheadFull):
		return "bulkhead_full"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, context.DeadlineExceeded):
		return "deadline_exceeded"
	}
	// Retries exhausted, stale: the type of what failed. A loop rather
	// than errors.As, whose target escapes and costs an allocation.
	for x := err; x != nil; x = errors.Unwrap(x) {
		if e, ok := x.(*Error); ok && e.Cause != nil {
			err = e.Cause
			break
		}
	}
	for {
		switch err.(type) {
		case interface{ Unwrap() error }:
			t := reflect.TypeOf(err).String()
			if t != "*fmt.wrapError" && t != "*backoff.PermanentError" {
				return t
			}
			if inner := errors.Unwrap(err); inner != nil {
				err = inner
				continue
			}
		}
		return reflect.TypeOf(err).String()
	}
}

// funcName is the default "function" attribute: the name of fn's code, such
// as "main.(*Client).Generate-fm", computed once when a wrapper is built.
func funcName(fn any) string {
	v := reflect.ValueOf(fn)
	if v.Kind() != reflect.Func || v.IsNil() {
		return "unknown"
	}
	if f := runtime.FuncForPC(v.Pointer()); f != nil {
		return f.Name()
	}
	return "unknown"
}

// optCache keeps the option slices of attribute sets that vary per call
// but take few values, such as an error.type, so that recording them
// allocates only the first time. Reads take no lock.
type optCache struct {
	mu   sync.Mutex
	m    atomic.Pointer[map[string][]metric.AddOption]
	last atomic.Pointer[cachedOpts] // the last key asked for: no hashing when it repeats
}

type cachedOpts struct {
	key  string
	opts []metric.AddOption
}

// maxCached bounds an optCache; past it, options are built per call.
const maxCached = 64

func (c *optCache) get(key string, kvs func() []attribute.KeyValue) []metric.AddOption {
	if l := c.last.Load(); l != nil && l.key == key {
		return l.opts
	}
	if m := c.m.Load(); m != nil {
		if opts, ok := (*m)[key]; ok {
			return opts
		}
	}
	opts := addSet(kvs()...)
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.m.Load()
	if old != nil && len(*old) >= maxCached {
		return opts
	}
	m := make(map[string][]metric.AddOption, 1+lenOf(old))
	if old != nil {
		maps.Copy(m, *old)
	}
	m[key] = opts
	c.m.Store(&m)
	c.last.Store(&cachedOpts{key, opts})
	return opts
}

func lenOf(m *map[string][]metric.AddOption) int {
	if m == nil {
		return 0
	}
	return len(*m)
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
		case ErrCircuitOpen, ErrBulkheadFull:
			return outcomeRejected
		case ErrTimeout:
			return outcomeTimeout
		}
	}
	switch {
	case errors.Is(err, ErrCircuitOpen), errors.Is(err, ErrBulkheadFull):
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
	calls           [numOutcomes][]metric.AddOption
	durations       [numOutcomes][]metric.RecordOption
	function        []metric.AddOption // the function attribute alone
	fbUsed, fbHits  optCache           // by error.type
	retryAttempts   optCache           // by attempt_number and error.type
	timeoutDuration []metric.RecordOption
}

func newSite(name, operation string) *site {
	if operation == "" {
		operation = "default"
	}
	s := &site{name: name, operation: operation}
	for o := range numOutcomes {
		kv := []attribute.KeyValue{attrName.String(name), attrOutcome.String(outcomeNames[o])}
		s.calls[o] = addSet(kv...)
		s.durations[o] = recSet(kv...)
	}
	s.function = addSet(attrFunction.String(name))
	s.timeoutDuration = recSet(attrFunction.String(name), attrOperationType.String(operation))
	return s
}

func (s *site) timeoutExceeded(ctx context.Context, d time.Duration) {
	meter().timeoutExceeded.Add(ctx, 1, addSet(attrFunction.String(s.name), attrOperationType.String(s.operation),
		attrTimeoutSecs.String(strconv.FormatFloat(d.Seconds(), 'f', -1, 64)))...)
}

// The fallback kinds, the values of fallback_type.
const (
	fallbackFunction = "function"
	fallbackValue    = "value"
	fallbackCached   = "cached"
	fallbackStale    = "stale"
	fallbackEmpty    = "empty"
)

// fallbackKind tells which constructor made fb, from the name of its code,
// once at wrap time.
func fallbackKind(fb any) string {
	name := funcName(fb)
	switch {
	case !strings.HasPrefix(name, ScopeName+"."):
		return fallbackFunction
	case strings.Contains(name, ".FallbackValue["):
		return fallbackValue
	case strings.Contains(name, ").StaleFallback."):
		return fallbackStale
	case strings.Contains(name, ").Fallback."):
		return fallbackCached
	}
	return fallbackFunction
}

// top makes fn a protected call: it records resilience.calls and
// resilience.call.duration once per call, and applies fb, if any, as the
// last resort. Every wrapper and Compose end in it, so that a call is
// recorded once however many policies protect it.
func top[T any](fn Func[T], s *site, fb Fallback[T], fbKind string) Func[T] {
	return func(ctx context.Context) (T, error) {
		in := meter()
		timed := in.callDuration.Enabled(ctx)
		var start time.Time
		if timed {
			start = time.Now()
		}
		v, err := fn(ctx)
		o := outcomeSuccess
		if err != nil {
			o = classify(ctx, err)
			if fb != nil && o != outcomeCanceled {
				// The caller's own cancellation is passed back, not
				// replaced: a caller that gave up wants to know it did.
				v, err = useFallback(ctx, in, s, fb, fbKind, err)
				o = outcomeFallback
				if err != nil && !errors.Is(err, ErrStale) {
					o = classify(ctx, err)
				}
			}
		}
		in.calls.Add(ctx, 1, s.calls[o]...)
		if timed {
			in.callDuration.Record(ctx, time.Since(start).Seconds(), s.durations[o]...)
		}
		return v, err
	}
}

func useFallback[T any](ctx context.Context, in *instruments, s *site, fb Fallback[T], kind string, err error) (T, error) {
	et := errorType(err)
	v, ferr := fb(ctx, err)
	if ferr != nil && ferr == err {
		return v, ferr // the fallback had nothing to offer
	}
	in.fbUsed.Add(ctx, 1, s.fbUsed.get(et, func() []attribute.KeyValue {
		return []attribute.KeyValue{attrFunction.String(s.name), attrErrorType.String(et), attrFallbackType.String(kind)}
	})...)
	if kind == fallbackCached || kind == fallbackStale {
		in.fbCacheHits.Add(ctx, 1, s.fbHits.get(et, func() []attribute.KeyValue {
			return []attribute.KeyValue{attrFunction.String(s.name), attrErrorType.String(et)}
		})...)
	}
	return v, ferr
}
