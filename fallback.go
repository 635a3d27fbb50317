package resilience

import (
	"container/list"
	"context"
	"errors"
	"reflect"
	"sync"
	"sync/atomic"
	"time"
)

// Fallback produces a result for a call that failed, from the call's context
// and its error. It may return an error of its own, which the caller then
// gets instead.
type Fallback[T any] func(ctx context.Context, err error) (T, error)

// FallbackValue returns a Fallback that answers every failure with v.
func FallbackValue[T any](v T) Fallback[T] {
	return markFallback(func(context.Context, error) (T, error) { return v, nil }, fallbackValue)
}

// WithFallback returns fn with fb as its last resort: when fn fails, the
// caller gets what fb makes of the failure. The caller's own cancellation is
// passed back as it was, not replaced: a caller that gave up wants to know
// it did. A panic in fn is not a failure fb handles; it propagates, and so
// does a panic in fb, after the call is recorded as failed. A nil fn
// or fb yields a function that reports [ErrInvalidConfig].
func WithFallback[T any](fn Func[T], fb Fallback[T]) Func[T] {
	if fn == nil {
		return failing[T](invalid("WithFallback fn", nil, "must not be nil"))
	}
	if fb == nil {
		return failing[T](invalid("WithFallback fb", nil, "must not be nil"))
	}
	return withFallback(fn, fb, fallbackKind(fb))
}

func withFallback[T any](fn Func[T], fb Fallback[T], kind int) Func[T] {
	if fn == nil {
		return failing[T](invalid("WithFallback fn", nil, "must not be nil"))
	}
	return newEdge(&pipeline{}, "", "", fn, fb, kind)
}

// sameError reports whether a and b are the same non-nil error value. An
// error of an uncomparable type (a slice of errors, say) would panic with
// ==: a slice, map or func is the same when it refers to the same data,
// and anything else uncomparable is taken as different.
func sameError(a, b error) bool {
	if a == nil || b == nil {
		return false
	}
	t := reflect.TypeOf(a)
	if t != reflect.TypeOf(b) {
		return false
	}
	if t.Comparable() {
		return a == b
	}
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	switch t.Kind() {
	case reflect.Slice:
		return va.Pointer() == vb.Pointer() && va.Len() == vb.Len()
	case reflect.Map, reflect.Func:
		return va.Pointer() == vb.Pointer()
	}
	return false
}

// applyFallback answers a failed call with fb, and reports the outcome: a
// fallback that returns the very error it was given had nothing to offer.
// It panics if fb does; the edge records the call as failed then.
func applyFallback[T any](ctx context.Context, s *site, fb Fallback[T], kind int, err error) (T, outcome, error) {
	et := errorType(err)
	v, ferr := fb(ctx, err)
	if sameError(ferr, err) {
		return v, classify(ctx, ferr), ferr
	}
	s.fbUsed[kind].add(et)
	traceFallback(ctx, s.name, et, kind)
	if kind == fallbackCached || kind == fallbackStale {
		s.fbHits.add(et)
	}
	if ferr != nil && !errors.Is(ferr, ErrStale) {
		return v, classify(ctx, ferr), ferr
	}
	return v, outcomeFallback, ferr
}

// FailOpen returns fn answering true when it fails: for checks where letting
// a request through during an outage is the lesser harm (a low-risk read).
func FailOpen(fn Func[bool]) Func[bool] {
	return withFallback(fn, FallbackValue(true), fallbackValue)
}

// FailClosed returns fn answering false when it fails: for checks that must
// deny when in doubt (an admin permission).
func FailClosed(fn Func[bool]) Func[bool] {
	return withFallback(fn, FallbackValue(false), fallbackValue)
}

// EmptyOnError returns fn answering T's zero value (a nil slice or map, an
// empty string, 0) when it fails.
func EmptyOnError[T any](fn Func[T]) Func[T] {
	var zero T
	return withFallback(fn, FallbackValue(zero), fallbackEmpty)
}

// FallbackCacheConfig configures a [FallbackCache]. The zero value of each
// field means its documented default.
type FallbackCacheConfig struct {
	// MaxEntries bounds the number of keys kept; the least recently stored
	// key is evicted first. 0 means 1000.
	MaxEntries int

	// MaxAge is the oldest a value may be and still be served. 0 means no
	// limit.
	MaxAge time.Duration
}

// FallbackCacheStats is a snapshot of a [FallbackCache]'s counters.
type FallbackCacheStats struct {
	// Entries is the number of keys held now.
	Entries int
	// Hits counts failures answered from the cache, stale ones included.
	Hits uint64
	// Stale counts failures answered with ErrStale.
	Stale uint64
	// Misses counts failures the cache could not answer: no value for the
	// key, or one older than MaxAge.
	Misses uint64
}

// FallbackCache keeps the last good value per key and serves it when a later
// call for that key fails: the original design's cached-value and stale-data
// fallbacks. It is bounded in entries and safe for concurrent use by multiple
// goroutines. Build it with [NewFallbackCache]; the zero value is not usable.
type FallbackCache[T any] struct {
	max    int
	maxAge time.Duration

	mu      sync.Mutex
	entries map[string]*list.Element // of *cacheEntry[T]
	order   list.List                // most recently stored first

	hits, stale, misses atomic.Uint64
}

type cacheEntry[T any] struct {
	key    string
	v      T
	stored time.Time
}

// NewFallbackCache returns a cache configured by cfg, or an error that names
// the first invalid field and its value.
func NewFallbackCache[T any](cfg FallbackCacheConfig) (*FallbackCache[T], error) {
	if cfg.MaxEntries < 0 {
		return nil, invalid("FallbackCacheConfig.MaxEntries", cfg.MaxEntries, "must not be negative")
	}
	if cfg.MaxAge < 0 {
		return nil, invalid("FallbackCacheConfig.MaxAge", cfg.MaxAge, "must not be negative")
	}
	c := &FallbackCache[T]{max: cfg.MaxEntries, maxAge: cfg.MaxAge, entries: make(map[string]*list.Element)}
	if c.max == 0 {
		c.max = 1000
	}
	return c, nil
}

// Store records v as the last good value for key.
func (c *FallbackCache[T]) Store(key string, v T) {
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[key]; ok {
		e := el.Value.(*cacheEntry[T])
		e.v, e.stored = v, now
		c.order.MoveToFront(el)
		return
	}
	c.entries[key] = c.order.PushFront(&cacheEntry[T]{key: key, v: v, stored: now})
	for c.order.Len() > c.max {
		oldest := c.order.Back()
		c.order.Remove(oldest)
		delete(c.entries, oldest.Value.(*cacheEntry[T]).key)
	}
}

// Load returns the last good value for key and its age, if the cache holds
// one no older than MaxAge.
func (c *FallbackCache[T]) Load(key string) (v T, age time.Duration, ok bool) {
	c.mu.Lock()
	el, found := c.entries[key]
	var e cacheEntry[T]
	if found {
		e = *el.Value.(*cacheEntry[T])
	}
	c.mu.Unlock()
	if !found {
		return v, 0, false
	}
	age = time.Since(e.stored)
	if c.maxAge > 0 && age > c.maxAge {
		return v, age, false
	}
	return e.v, age, true
}

// Stats returns a snapshot of the cache's counters.
func (c *FallbackCache[T]) Stats() FallbackCacheStats {
	c.mu.Lock()
	n := c.order.Len()
	c.mu.Unlock()
	return FallbackCacheStats{Entries: n, Hits: c.hits.Load(), Stale: c.stale.Load(), Misses: c.misses.Load()}
}

// Record returns fn storing each successful result under key.
func (c *FallbackCache[T]) Record(key string, fn Func[T]) Func[T] {
	if fn == nil {
		return failing[T](invalid("FallbackCache.Record fn", nil, "must not be nil"))
	}
	r := &cacheRecorder[T]{c: c, key: key, fn: fn}
	f := Func[T](r.call)
	if m := lookupEdge(fn); m != nil {
		// f only passes calls on to a protected Func: a wrapper built
		// around f wraps that one, and must record the call once, by
		// that one's name.
		registerFunc(f, m, r)
	}
	return f
}

// cacheRecorder is the Func that Record returns.
type cacheRecorder[T any] struct {
	c   *FallbackCache[T]
	key string
	fn  Func[T]
}

func (r *cacheRecorder[T]) call(ctx context.Context) (T, error) {
	v, err := r.fn(ctx)
	if err == nil {
		r.c.Store(r.key, v)
	}
	return v, err
}

// Fallback returns a Fallback that answers a failure with the last good
// value for key and a nil error: the cached-value fallback. With no usable
// value it returns the original error.
func (c *FallbackCache[T]) Fallback(key string) Fallback[T] {
	return markFallback(func(_ context.Context, err error) (T, error) {
		v, _, ok := c.Load(key)
		if !ok {
			c.misses.Add(1)
			return v, err
		}
		c.hits.Add(1)
		return v, nil
	}, fallbackCached)
}

// StaleFallback returns a Fallback that answers a failure with the last good
// value for key together with an [*Error] matching [ErrStale], which carries
// the value's age and wraps the original error: the stale-data fallback.
// Callers see that the value is stale and decide whether to use it:
//
//	v, err := get(ctx)
//	if err != nil && !errors.Is(err, resilience.ErrStale) {
//		return err
//	}
//
// With no usable value it returns the original error.
func (c *FallbackCache[T]) StaleFallback(key string) Fallback[T] {
	return markFallback(func(_ context.Context, err error) (T, error) {
		v, age, ok := c.Load(key)
		if !ok {
			c.misses.Add(1)
			return v, err
		}
		c.hits.Add(1)
		c.stale.Add(1)
		return v, &Error{Err: ErrStale, Age: age, Cause: err}
	}, fallbackStale)
}

// Wrap returns fn recording its successes under key and answering its
// failures with the last good value: Record and Fallback in one.
func (c *FallbackCache[T]) Wrap(key string, fn Func[T]) Func[T] {
	if fn == nil {
		return failing[T](invalid("FallbackCache.Wrap fn", nil, "must not be nil"))
	}
	return newEdge(&pipeline{}, nameOf(fn), "", c.Record(key, fn), c.Fallback(key), fallbackCached)
}
