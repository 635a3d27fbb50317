package resilience

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// memStore is an in-process Store for testing the registry's wiring; the
// Redis store is tested against a real Redis in its own module.
type memStore struct {
	mu      sync.Mutex
	changes []string
	probes  atomic.Bool // AllowProbe's answer
	inside  atomic.Int32
	limit   int32
	closed  atomic.Bool
}

func (m *memStore) BreakerSync(cb *CircuitBreaker) BreakerSync { return memSync{m} }
func (m *memStore) Limiter(resource string, limit int) Limiter {
	m.limit = int32(limit)
	return memLimiter{m}
}
func (m *memStore) Close() error { m.closed.Store(true); return nil }

type memSync struct{ m *memStore }

func (s memSync) StateChanged(name string, from, to State) {
	s.m.mu.Lock()
	s.m.changes = append(s.m.changes, name+":"+from.String()+"->"+to.String())
	s.m.mu.Unlock()
}
func (s memSync) AllowProbe(ctx context.Context, name string) bool { return s.m.probes.Load() }

type memLimiter struct{ m *memStore }

func (l memLimiter) Acquire(ctx context.Context) (func(), error) {
	if l.m.inside.Add(1) > l.m.limit {
		l.m.inside.Add(-1)
		return nil, &Error{Err: ErrBulkheadFull, Name: "global"}
	}
	return func() { l.m.inside.Add(-1) }, nil
}

func TestRegistryStoreFromURL(t *testing.T) {
	store := &memStore{}
	RegisterStore("mem", func(url string) (Store, error) {
		if !strings.HasPrefix(url, "mem://") {
			t.Errorf("open(%q)", url)
		}
		return store, nil
	})
	reg := mustRegistry(t, map[string]string{
		"RESILIENCE_REDIS_URL":         "mem://fleet",
		"CIRCUIT_BREAKER_LLM_FAIL_MAX": "1",
		"CIRCUIT_BREAKER_LLM_TIMEOUT":  "1",
		"BULKHEAD_LLM_GLOBAL_LIMIT":    "2",
		"BULKHEAD_LLM_LIMIT":           "5",
		"BULKHEAD_LLM_FAIL_FAST":       "true",
	})
	if reg.Config().StoreURL != "mem://fleet" || reg.Config().BulkheadConfig("llm").GlobalLimit != 2 {
		t.Fatalf("config %+v", reg.Config())
	}
	synctest.Test(t, func(t *testing.T) {
		cb := reg.CircuitBreaker("llm")
		// A local open is published.
		WithCircuitBreaker(failFunc, cb)(context.Background())
		// Half-open: another replica holds the probe, so this call is
		// rejected uncounted.
		time.Sleep(time.Second + 1)
		if _, err := WithCircuitBreaker(okFunc, cb)(context.Background()); !errors.Is(err, ErrCircuitOpen) {
			t.Fatalf("err = %v; want the probe refused", err)
		}
		store.probes.Store(true)
		if _, err := WithCircuitBreaker(okFunc, cb)(context.Background()); err != nil {
			t.Fatalf("err = %v; want the probe allowed", err)
		}
		// An open seen elsewhere is applied with Trip.
		cb.Trip()
		if cb.State() != StateOpen {
			t.Fatalf("after Trip: %v", cb.State())
		}
		store.mu.Lock()
		got := strings.Join(store.changes, " ")
		store.mu.Unlock()
		if want := "llm:closed->open llm:open->half-open llm:half-open->closed llm:closed->open"; got != want {
			t.Fatalf("published %q; want %q", got, want)
		}
	})

	// The global cap applies on top of the local one.
	b := reg.Bulkhead("llm")
	release := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			WithBulkhead(func(context.Context) (int, error) { <-release; return 1, nil }, b)(context.Background())
		})
	}
	for store.inside.Load() != 2 {
		time.Sleep(time.Millisecond) // polling a condition
	}
	if _, err := WithBulkhead(okFunc, b)(context.Background()); !errors.Is(err, ErrBulkheadFull) {
		t.Fatalf("err = %v; want the global cap", err)
	}
	if s := b.Stats(); s.Active != 2 {
		t.Fatalf("local slot not given back after the global refusal: %+v", s)
	}
	rel, err := b.Acquire(context.Background())
	if !errors.Is(err, ErrBulkheadFull) {
		t.Fatalf("Acquire: %v; want the global cap", err)
	}
	rel()
	close(release)
	wg.Wait()
	if s := b.Stats(); s.Active != 0 || s.Completed != 2 || store.inside.Load() != 0 {
		t.Fatalf("after: %+v, global inside %d", s, store.inside.Load())
	}
	reg.Close()
	reg.Close()
	if !store.closed.Load() {
		t.Fatal("Close did not close the store the registry opened")
	}
}

func TestRegistryStoreErrors(t *testing.T) {
	for _, url := range []string{"nowhere", "unknown://x"} {
		cfg := DefaultConfig()
		cfg.StoreURL = url
		if _, err := NewRegistry(cfg); err == nil || !strings.Contains(err.Error(), "RESILIENCE_REDIS_URL") {
			t.Errorf("StoreURL %q: err = %v", url, err)
		}
	}
	// UseStore attaches to live instances and detaches with nil.
	reg := mustRegistry(t, map[string]string{"BULKHEAD_X_GLOBAL_LIMIT": "1"})
	cb, b := reg.CircuitBreaker("x"), reg.Bulkhead("x")
	store := &memStore{}
	reg.UseStore(store)
	if cb.sync.Load() == nil || b.global.Load() == nil {
		t.Fatal("UseStore did not attach")
	}
	reg.UseStore(nil)
	if cb.sync.Load() != nil || b.global.Load() != nil {
		t.Fatal("UseStore(nil) did not detach")
	}
	if reg.Close() != nil || store.closed.Load() {
		t.Fatal("Close closed a store the registry did not open")
	}
}
