package redisstore

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/resilience-go/resilience"
)

// TestRedisSlowDownAndBack freezes redis-server, then kills it, while three
// replicas keep calling: calls keep flowing on local state and none waits
// longer than OpTimeout (plus scheduling) for Redis; an open made while
// Redis is gone reaches the other replicas once it is back, and so does a
// fresh one. Each replica says once per outage that Redis is unreachable.
//
// One replica's client has no ContextTimeoutEnabled, so go-redis itself
// would wait its ReadTimeout (seconds): the bound must not depend on the
// client.
func TestRedisSlowDownAndBack(t *testing.T) {
	needRedis(t)
	const opTimeout = 50 * time.Millisecond
	// What a call may wait beyond OpTimeout: scheduling, which on a busy
	// two-core machine has been seen to reach 75ms, and 110ms under the
	// race detector. A client's own timeouts (ReadTimeout, dial retries)
	// are seconds: still far above.
	margin := 100 * time.Millisecond
	if raceEnabled {
		margin = 250 * time.Millisecond
	}
	env := map[string]string{
		"CIRCUIT_BREAKER_DEP_FAIL_MAX":  "1",
		"CIRCUIT_BREAKER_DEP_TIMEOUT":   "30",
		"BULKHEAD_LOAD_LIMIT":           "100",
		"BULKHEAD_LOAD_GLOBAL_LIMIT":    "1000",
		"CIRCUIT_BREAKER_LOAD_FAIL_MAX": "1000",
	}
	opts := Options{KeyPrefix: prefix(t), SyncInterval: syncInterval, OpTimeout: opTimeout}
	var (
		logs  [3]*counter
		regs  [3]*resilience.Registry
		dep   [3]*resilience.CircuitBreaker
		load  [3]resilience.Func[int]
		store [3]*Store
	)
	for i := range 3 {
		logs[i] = &counter{}
		o := opts
		o.Logger = slog.New(logs[i])
		client := redis.NewClient(&redis.Options{Addr: srv.addr(), ContextTimeoutEnabled: i != 2})
		t.Cleanup(func() { client.Close() })
		store[i] = New(client, o)
		t.Cleanup(func() { store[i].Close() })
		regs[i] = newRegistry(t, env, store[i])
		dep[i] = regs[i].CircuitBreaker("dep")
		ok := func(context.Context) (int, error) { return 1, nil }
		load[i] = resilience.WithCircuitBreaker(resilience.WithBulkhead(ok, regs[i].Bulkhead("load")), regs[i].CircuitBreaker("load"))
	}

	// The load: two callers per replica, each call's latency kept as the
	// maximum of the current phase.
	// Warm up: the first calls dial the pool's connections, which under
	// the race detector on a small machine can take longer than OpTimeout.
	for range 3 {
		for i := range 3 {
			load[i](context.Background())
		}
	}
	var phase atomic.Int32
	var maxLat [6]atomic.Int64
	var calls, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range 3 {
		for range 2 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					start := time.Now()
					_, err := load[i](context.Background())
					d := int64(time.Since(start))
					calls.Add(1)
					if err != nil {
						failed.Add(1)
					}
					m := &maxLat[phase.Load()]
					for {
						old := m.Load()
						if d <= old || m.CompareAndSwap(old, d) {
							break
						}
					}
					time.Sleep(time.Millisecond)
				}
			})
		}
	}
	defer func() {
		close(stop)
		wg.Wait()
	}()
	healthy := func() bool { return store[0].Healthy() && store[1].Healthy() && store[2].Healthy() }
	fail := func(i int) {
		resilience.WithCircuitBreaker(func(context.Context) (int, error) { return 0, errDown }, dep[i])(context.Background())
	}

	const (
		phaseHealthy = iota
		phasePaused
		phaseResumed
		phaseKilled
		phaseRestarted
	)
	time.Sleep(300 * time.Millisecond)

	outages := func() (n [3]int) {
		for i, l := range logs {
			n[i] = l.count("unreachable")
		}
		return n
	}
	waitFor(t, 3*time.Second, "every replica healthy before the outages", healthy)
	before := outages()

	phase.Store(phasePaused)
	srv.pause()
	waitFor(t, time.Second, "every replica sees Redis slow", func() bool { return !store[0].Healthy() && !store[1].Healthy() && !store[2].Healthy() })
	time.Sleep(500 * time.Millisecond)
	phase.Store(phaseResumed)
	srv.resume()
	took := waitFor(t, 3*time.Second, "every replica sees Redis back", healthy)
	t.Logf("after SIGCONT, every replica used Redis again within %v", took)

	phase.Store(phaseKilled)
	srv.stop()
	waitFor(t, time.Second, "every replica sees Redis down", func() bool { return !store[0].Healthy() && !store[1].Healthy() && !store[2].Healthy() })
	fail(0) // A opens while Redis is gone
	time.Sleep(500 * time.Millisecond)
	if dep[1].State() != resilience.StateClosed || dep[2].State() != resilience.StateClosed {
		t.Fatal("B or C opened with Redis down: nothing should have reached them")
	}

	phase.Store(phaseRestarted)
	restarted := time.Now()
	if err := srv.start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 3*time.Second, "every replica sees Redis back", healthy)
	waitFor(t, 3*time.Second, "A's open reaches B and C", func() bool {
		return dep[1].State() == resilience.StateOpen && dep[2].State() == resilience.StateOpen
	})
	t.Logf("after the restart, the open made while Redis was down reached B and C in %v", time.Since(restarted))

	// And a fresh change still travels: A's reset closes the fleet, C's
	// open opens it, within a SyncInterval and a round trip whether or not
	// the subscriptions are back yet.
	dep[0].Reset()
	waitFor(t, 2*syncInterval, "A's reset reaches B and C", func() bool {
		return dep[1].State() == resilience.StateClosed && dep[2].State() == resilience.StateClosed
	})
	fail(2)
	took = waitFor(t, 2*syncInterval, "C's open reaches A and B", func() bool {
		return dep[0].State() == resilience.StateOpen && dep[1].State() == resilience.StateOpen
	})
	t.Logf("a fresh open reached the other replicas in %v", took)
	time.Sleep(200 * time.Millisecond)

	if failed.Load() != 0 {
		t.Errorf("%d of %d calls failed; want none: Redis is not on the call's path", failed.Load(), calls.Load())
	}
	names := []string{"healthy", "Redis paused", "resumed", "Redis killed", "restarted"}
	for p, name := range names {
		d := time.Duration(maxLat[p].Load())
		t.Logf("%-13s slowest call %v", name+":", d)
		if (p == phasePaused || p == phaseKilled) && d > opTimeout+margin {
			t.Errorf("%s: a call took %v; want at most OpTimeout %v plus scheduling", name, d, opTimeout)
		}
	}
	t.Logf("%d calls in all", calls.Load())
	after := outages()
	for i := range after {
		// One per outage, not one per call. A busy machine may make a
		// slow answer right after the restart look like one more.
		if n := after[i] - before[i]; n < 2 || n > 4 {
			t.Errorf("replica %d logged %d outages; want 2, one per outage", i, n)
		}
	}
}
