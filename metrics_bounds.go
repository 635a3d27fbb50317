package resilience

import (
	"context"
	"sync"
	"sync/atomic"
	"weak"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// The metric side of a registry's bounds (registry_cap.go): what an
// evicted policy set leaves behind is dropped, so that the series stay
// bounded by the cap as the memory does.

// serviceCounts are the counts of the breakers of one service name. They
// are kept per name, not per breaker, so that the observed counters never
// fall when a breaker is rebuilt by a Reset (Prometheus would read a fall
// as a counter reset), and live while some breaker of that name does: a
// registry that evicts a name releases its breakers' references.
type serviceCounts struct {
	successes, rejections atomic.Int64
	shadowRejections      atomic.Int64 // calls a shadow breaker would have rejected
	slowCalls             atomic.Int64
	refs                  int // breakers holding it; guarded by countsByName.mu
}

var countsByName struct {
	mu sync.Mutex
	m  map[string]*serviceCounts
}

// countsFor returns the counts of the breakers named name, taking a
// reference to them.
func countsFor(name string) *serviceCounts {
	countsByName.mu.Lock()
	defer countsByName.mu.Unlock()
	c := countsByName.m[name]
	if c == nil {
		if countsByName.m == nil {
			countsByName.m = map[string]*serviceCounts{}
		}
		c = new(serviceCounts)
		countsByName.m[name] = c
	}
	c.refs++
	return c
}

// releaseCounts gives back an evicted breaker's reference to its counts;
// the last one drops them, and with them the name's series.
func releaseCounts(name string, c *serviceCounts) {
	countsByName.mu.Lock()
	defer countsByName.mu.Unlock()
	if c.refs--; c.refs <= 0 && countsByName.m[name] == c {
		delete(countsByName.m, name)
	}
}

func eachServiceCounts(f func(name string, c *serviceCounts)) {
	countsByName.mu.Lock()
	defer countsByName.mu.Unlock()
	for k, c := range countsByName.m {
		f(k, c)
	}
}

func (cb *CircuitBreaker) gone() bool { return cb.retired.Load() }
func (b *Bulkhead) gone() bool        { return b.retired.Load() }
func (l *RateLimiter) gone() bool     { return false }

// observeKeys makes t's breakers count in resilience.circuit_breaker.open_keys.
func observeKeys(t *keyTable) {
	observed.mu.Lock()
	observed.keys = appendWeak(observed.keys, t)
	observed.mu.Unlock()
}

// observeOpenKeys reports each service's keyed breakers that are not
// closed. observed.mu is held.
func observeOpenKeys(in *instruments, o metric.Observer) {
	open := map[string]int64{}
	observed.keys = prune(observed.keys, func(t *keyTable) { open[t.service] += int64(t.open()) })
	for svc, n := range open {
		o.ObserveInt64(in.cbOpenKeys, n, metric.WithAttributeSet(attribute.NewSet(attrService.String(svc))))
	}
}

var evictionAttrs = [2][]metric.AddOption{
	addSet(attribute.String("kind", "service")),
	addSet(attribute.String("kind", "key")),
}

// recordEviction counts an evicted set: a service's (key false) or a
// key's.
func recordEviction(key bool) {
	i := 0
	if key {
		i = 1
	}
	meter().regEvictions.Add(context.Background(), 1, evictionAttrs[i]...)
}

// appendWeak adds v to ws. Before the slice grows, it drops the entries
// collected or retired since: without an SDK no collection prunes them,
// and a registry that evicts names would otherwise leave one per name.
// observed.mu is held.
func appendWeak[T any, PT interface {
	*T
	gone() bool
}](ws []weak.Pointer[T], v PT) []weak.Pointer[T] {
	if len(ws) == cap(ws) {
		ws = prune[T, PT](ws, func(*T) {})
	}
	return append(ws, weak.Make((*T)(v)))
}

// forgetSites takes an evicted set's sites out of the metrics at once;
// appendWeak or the observer drops their entries.
func forgetSites(ss []*site) {
	for _, s := range ss {
		s.retired.Store(true)
	}
}

func (s *site) gone() bool { return s.retired.Load() }
