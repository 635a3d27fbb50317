package redisstore

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
)

// TestGlobalRateLimitFleet runs three replicas, each with a local limit of
// 30 requests per 2s (the 30 a minute, scaled down to keep the test
// short) and the same global limit, burst 3, failing fast. Sharing Redis,
// the fleet starts at most what one GCRA allows; with Redis stopped each
// replica keeps its own local limit, so the fleet starts up to three times
// as many, and no call waits for the missing Redis.
//
// The bound. GCRA (redis_rate) keeps a theoretical arrival time, tat, on
// Redis's clock; with T = per/limit, a cost-1 request at time now is allowed
// iff max(tat, now) + T - burst*T <= now, and then tat becomes
// max(tat, now) + T. Over a window [a, b], the first allowed request leaves
// tat >= a + T and each later one adds T, so after N of them tat >= a + N*T;
// the last was allowed at some t <= b, so a + N*T - burst*T <= b, that is
//
//	N <= burst + floor((b-a)/T)
//
// whatever came before a (a fresh key, here, but the bound does not need
// it). The window here is from before the first call to after the last one
// returned, on the same machine's clock as Redis's, so every decision falls
// inside it. For the local limiters (golang.org/x/time/rate, a token bucket
// of the same rate and burst) the same holds per replica, plus the permits
// a replica took locally and gave back when the global limit refused them,
// which it holds as credit, at most burst: N <= 2*burst + floor((b-a)/T).
func TestGlobalRateLimitFleet(t *testing.T) {
	needRedis(t)
	const (
		limit = 30
		per   = 2 * time.Second
		burst = 3
		// Long enough for the Redis round trips of a busy machine under
		// the race detector not to look like an outage, short enough for
		// the phase without Redis to show no call waits for it.
		opTimeout = 250 * time.Millisecond
		window    = 2 * time.Second
	)
	margin := 100 * time.Millisecond
	if raceEnabled {
		margin = 250 * time.Millisecond
	}
	env := map[string]string{
		"RATE_LIMIT_LLM_REQUESTS":        "30",
		"RATE_LIMIT_LLM_GLOBAL_REQUESTS": "30",
		"RATE_LIMIT_LLM_PER":             "2s",
		"RATE_LIMIT_LLM_BURST":           "3",
		"RATE_LIMIT_LLM_FAIL_FAST":       "true",
	}
	opts := Options{KeyPrefix: prefix(t), SyncInterval: syncInterval, OpTimeout: opTimeout}
	var (
		stores [3]*Store
		calls  [3]resilience.Func[string]
		d      downstream
	)
	for i := range 3 {
		stores[i] = newStore(t, opts)
		r := newRegistry(t, env, stores[i])
		calls[i] = resilience.WithRateLimit(d.fn(i), r.RateLimiter("llm"))
	}
	// Warm up the connections and the script cache with a limiter of
	// another name, so the measured calls do not pay for the first dial.
	for i := range 3 {
		if _, err := stores[i].GlobalRateLimiter("warmup", 1000, time.Second, 1000).Take(context.Background(), 1); err != nil {
			t.Fatal(err)
		}
	}

	interval := per / limit // T
	// run drives two callers per replica for window, and returns the
	// calls each replica started, the elapsed window and the slowest call.
	run := func() (started [3]int64, elapsed, slowest time.Duration) {
		var before [3]int64
		for i := range 3 {
			before[i] = d.calls[i].Load()
		}
		var maxLat atomic.Int64
		var other atomic.Int64 // errors other than ErrRateLimited
		start := time.Now()
		deadline := start.Add(window)
		var wg sync.WaitGroup
		for i := range 3 {
			for range 2 {
				wg.Go(func() {
					for time.Now().Before(deadline) {
						t0 := time.Now()
						_, err := calls[i](context.Background())
						lat := int64(time.Since(t0))
						for {
							m := maxLat.Load()
							if lat <= m || maxLat.CompareAndSwap(m, lat) {
								break
							}
						}
						if err != nil && !errors.Is(err, resilience.ErrRateLimited) {
							other.Add(1)
						}
						time.Sleep(time.Millisecond) // pacing the load, not synchronisation
					}
				})
			}
		}
		wg.Wait()
		elapsed = time.Since(start)
		if n := other.Load(); n != 0 {
			t.Errorf("%d calls failed with something other than ErrRateLimited", n)
		}
		for i := range 3 {
			started[i] = d.calls[i].Load() - before[i]
		}
		return started, elapsed, time.Duration(maxLat.Load())
	}
	bound := func(elapsed time.Duration) int64 { return burst + int64(elapsed/interval) }

	// Shared: the fleet as a whole keeps the limit.
	started, elapsed, slowest := run()
	fleet := started[0] + started[1] + started[2]
	b := bound(elapsed)
	t.Logf("with Redis: %v started per replica, %d fleet-wide in %v (bound %d = burst %d + %v/%v); slowest call %v",
		started, fleet, elapsed, b, burst, elapsed, interval, slowest)
	for i, s := range stores {
		if !s.Healthy() {
			t.Fatalf("replica %d took Redis for down during the shared phase: the bound does not apply", i)
		}
	}
	if fleet > b {
		t.Errorf("fleet started %d calls in %v; want at most %d (burst + elapsed/T)", fleet, elapsed, b)
	}
	// Not starved either: most of the shared limit is used.
	if fleet < b/2 {
		t.Errorf("fleet started only %d calls in %v; want at least %d of the %d allowed", fleet, elapsed, b/2, b)
	}

	// Redis stopped: each replica keeps its local limit, alone.
	srv.stop()
	t.Cleanup(func() {
		if err := srv.start(); err != nil {
			t.Error(err)
		}
	})
	started, elapsed, slowest = run()
	fleet = started[0] + started[1] + started[2]
	b = bound(elapsed)
	local := b + burst // plus the credit of permits given back
	t.Logf("without Redis: %v started per replica, %d fleet-wide in %v (per-replica bound %d); slowest call %v",
		started, fleet, elapsed, local, slowest)
	for i, n := range started {
		if n > local {
			t.Errorf("replica %d started %d calls in %v without Redis; want at most its local %d (2*burst + elapsed/T)", i, n, elapsed, local)
		}
		if n < b/2 {
			t.Errorf("replica %d started only %d calls in %v without Redis; want at least %d: the local limit alone applies", i, n, elapsed, b/2)
		}
	}
	if fleet <= b {
		t.Errorf("fleet started %d calls without Redis; want more than the global bound %d: the local limits apply, not the shared one", fleet, b)
	}
	if slowest > opTimeout+margin {
		t.Errorf("a call took %v without Redis; want at most OpTimeout %v plus scheduling", slowest, opTimeout)
	}
	for i, s := range stores {
		if s.Healthy() {
			t.Errorf("replica %d still takes Redis for up", i)
		}
	}
}

// TestGlobalRateLimiterTake checks Take on its own: the key stays under
// the store's prefix, a refusal says how long to wait, a limit that is not
// whole keeps its rate, and a store that is down answers at once with an
// error, without Redis.
func TestGlobalRateLimiterTake(t *testing.T) {
	needRedis(t)
	ctx := context.Background()
	p := prefix(t)
	s := newStore(t, Options{KeyPrefix: p})
	g := s.GlobalRateLimiter("requests:LLM", 30, time.Minute, 2)
	for range 2 {
		if wait, err := g.Take(ctx, 1); err != nil || wait != 0 {
			t.Fatalf("Take within the burst = %v, %v; want 0, nil", wait, err)
		}
	}
	wait, err := g.Take(ctx, 1)
	if err != nil || wait <= 0 || wait > 2*time.Second {
		t.Fatalf("Take past the burst = %v, %v; want a wait of at most T = 2s", wait, err)
	}
	keys, err := s.client.Keys(ctx, "*requests:LLM*").Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 1 || keys[0] != p+"rl:{requests:LLM}" {
		t.Errorf("keys %q; want just %q", keys, p+"rl:{requests:LLM}")
	}

	// 0.5 per second is one permit every 2s, not one every second.
	h := s.GlobalRateLimiter("requests:HALF", 0.5, time.Second, 1).(*rateLimiter)
	if h.limit.Rate != 1 || h.limit.Period != 2*time.Second {
		t.Errorf("0.5 per 1s became %v; want 1 per 2s", h.limit)
	}
	if _, err := h.Take(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if wait, err := h.Take(ctx, 1); err != nil || wait < time.Second || wait > 2*time.Second {
		t.Errorf("second Take at 0.5/s = %v, %v; want a wait near 2s", wait, err)
	}
	// More than the burst at once: granted when idle, not refused forever.
	if wait, err := s.GlobalRateLimiter("requests:BIG", 10, time.Second, 2).Take(ctx, 5); err != nil || wait != 0 {
		t.Errorf("Take(5) with burst 2 on an idle limit = %v, %v; want 0, nil", wait, err)
	}

	s.down.Store(true)
	start := time.Now()
	if _, err := g.Take(ctx, 1); err == nil {
		t.Error("Take with Redis down: want an error, so the local limit applies")
	}
	if d := time.Since(start); d > 10*time.Millisecond {
		t.Errorf("Take with Redis down took %v; want no round trip", d)
	}
}
