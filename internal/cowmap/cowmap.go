// Package cowmap provides a map read without a lock and copied on write,
// for values keyed by an attribute that takes few values per call site,
// such as an error.type: a lookup per call, an allocation only for a new
// key, and no hashing at all while the same key repeats.
package cowmap

import (
	"maps"
	"sync"
	"sync/atomic"
)

// Map is a copy-on-write map from strings to V. The zero Map is empty and
// ready to use. A Map is safe for concurrent use by multiple goroutines; it
// must not be copied after first use.
type Map[V any] struct {
	mu   sync.Mutex
	m    atomic.Pointer[map[string]V]
	last atomic.Pointer[entry[V]]
}

type entry[V any] struct {
	key string
	v   V
}

// Get returns the value for key, made by newV and kept if the key is new.
// With limit above 0, a map that holds limit keys keeps no more: the value
// is then made afresh for each call, so that a key set that turns out to be
// unbounded costs allocations rather than memory.
func (c *Map[V]) Get(key string, newV func() V, limit int) V {
	if l := c.last.Load(); l != nil && l.key == key {
		return l.v
	}
	if m := c.m.Load(); m != nil {
		if v, ok := (*m)[key]; ok {
			return v
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.m.Load()
	n := 0
	if old != nil {
		if v, ok := (*old)[key]; ok {
			return v
		}
		n = len(*old)
	}
	v := newV()
	if limit > 0 && n >= limit {
		return v
	}
	m := make(map[string]V, n+1)
	if old != nil {
		maps.Copy(m, *old)
	}
	m[key] = v
	c.m.Store(&m)
	c.last.Store(&entry[V]{key, v})
	return v
}

// Each calls f with every key and its value, in no particular order.
func (c *Map[V]) Each(f func(key string, v V)) {
	if m := c.m.Load(); m != nil {
		for k, v := range *m {
			f(k, v)
		}
	}
}
