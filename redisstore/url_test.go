package redisstore

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
)

// TestURLWiring: the environment alone wires the store in, through the
// driver this package's init registers; Registry.Close closes it.
func TestURLWiring(t *testing.T) {
	needRedis(t)
	env := map[string]string{
		"RESILIENCE_REDIS_URL":       "redis://" + srv.addr() + "/0?sync_interval=100ms&op_timeout=1s&key_prefix=" + prefix(t),
		"CIRCUIT_BREAKER_X_FAIL_MAX": "1",
		"CIRCUIT_BREAKER_X_TIMEOUT":  "5",
		"BULKHEAD_X_GLOBAL_LIMIT":    "1",
	}
	before := openStores.Load()
	var regs [2]*resilience.Registry
	for i := range regs {
		cfg, err := resilience.LoadConfigWith(resilience.LoadOptions{Environment: env})
		if err != nil {
			t.Fatal(err)
		}
		if regs[i], err = resilience.NewRegistry(cfg); err != nil {
			t.Fatal(err)
		}
	}
	if n := openStores.Load() - before; n != 2 {
		t.Fatalf("%d stores opened from the URL; want 2", n)
	}

	// Breaker state travels.
	a, b := regs[0].CircuitBreaker("x"), regs[1].CircuitBreaker("x")
	time.Sleep(2 * syncInterval) // both stores have read the state once
	resilience.WithCircuitBreaker(func(context.Context) (int, error) { return 0, errDown }, a)(context.Background())
	waitFor(t, syncInterval, "B open", func() bool { return b.State() == resilience.StateOpen })

	// So does the global cap.
	release, err := regs[0].Bulkhead("x").Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := regs[1].Bulkhead("x").Acquire(context.Background()); !errors.Is(err, resilience.ErrBulkheadFull) {
		t.Fatalf("err = %v; want the global cap", err)
	}
	release()

	for _, r := range regs {
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		r.Close()
	}
	if n := openStores.Load() - before; n != 0 {
		t.Fatalf("%d stores still open after Registry.Close", n)
	}
	// Closed: the policies keep working on local state.
	if _, err := regs[1].Bulkhead("x").Acquire(context.Background()); err != nil {
		t.Fatalf("after Close: %v", err)
	}
}

func TestURLErrors(t *testing.T) {
	for _, tc := range []struct{ url, want string }{
		{"redis://:secret@127.0.0.1:1/0?op_timeout=soon", "op_timeout"},
		{"redis://:secret@127.0.0.1:1/0?lease_ttl=-1", "lease_ttl"},
		{"redis://:secret@127.0.0.1:1/0?no_such_option=1", "no_such_option"},
		{"redis://:secret@127.0.0.1:1/x", "database"},
		{"redis://:secret@127.0.0.1:port/0", "not a valid URL"},
	} {
		cfg := resilience.DefaultConfig()
		cfg.StoreURL = tc.url
		_, err := resilience.NewRegistry(cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "RESILIENCE_REDIS_URL") {
			t.Errorf("%s: err = %v; want it to name %s and RESILIENCE_REDIS_URL", tc.url, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("%s: the error shows the password: %v", tc.url, err)
		}
		if !errors.Is(err, resilience.ErrInvalidConfig) {
			t.Errorf("%s: err = %v; want it to match ErrInvalidConfig", tc.url, err)
		}
	}
}

// TestUnreachableAtStart: a store whose Redis is not there works on local
// state from the first call, and never waits for Redis longer than
// OpTimeout.
func TestUnreachableAtStart(t *testing.T) {
	cfg := resilience.DefaultConfig()
	cfg.StoreURL = "redis://127.0.0.1:" + strconv.Itoa(freePort()) + "/0?op_timeout=20ms&sync_interval=50ms"
	cfg.Bulkheads = map[string]resilience.BulkheadConfig{"X": {Limit: 2, GlobalLimit: 1}}
	reg, err := resilience.NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	cb := reg.CircuitBreaker("x")
	bh := reg.Bulkhead("x")
	call := resilience.WithCircuitBreaker(resilience.WithBulkhead(func(context.Context) (int, error) { return 1, nil }, bh), cb)
	var slowest time.Duration
	for range 20 {
		start := time.Now()
		if _, err := call(context.Background()); err != nil {
			t.Fatalf("call: %v", err)
		}
		slowest = max(slowest, time.Since(start))
	}
	if slowest > 20*time.Millisecond+50*time.Millisecond {
		t.Fatalf("slowest call %v; want at most OpTimeout 20ms plus scheduling", slowest)
	}
}
