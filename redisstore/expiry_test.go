package redisstore

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/resilience-go/resilience"
)

// keysOf returns every key under prefix, by SCAN, as an operator would.
func keysOf(t *testing.T, c *redis.Client, prefix string) []string {
	t.Helper()
	var keys []string
	iter := c.Scan(context.Background(), 0, prefix+"*", 100).Iterator()
	for iter.Next(context.Background()) {
		keys = append(keys, iter.Val())
	}
	if err := iter.Err(); err != nil {
		t.Fatal(err)
	}
	return keys
}

// expiryEnv is the workload of the expiry tests: FLAKY trips and closes
// again, DOWN trips and stays open for a minute, PROBING is half-open with
// its probe in flight, DB has a global cap (a slot may still be on its way
// back when the next call asks: a full cap is no failure here), LLM a
// fleet-wide rate limit
// (100/s, burst 5: the GCRA state is back to full 50ms after a permit).
var expiryEnv = map[string]string{
	"CIRCUIT_BREAKER_FLAKY_FAIL_MAX":   "1",
	"CIRCUIT_BREAKER_FLAKY_TIMEOUT":    "100ms",
	"CIRCUIT_BREAKER_DOWN_FAIL_MAX":    "1",
	"CIRCUIT_BREAKER_DOWN_TIMEOUT":     "1m",
	"CIRCUIT_BREAKER_PROBING_FAIL_MAX": "1",
	"CIRCUIT_BREAKER_PROBING_TIMEOUT":  "100ms",
	"BULKHEAD_DB_GLOBAL_LIMIT":         "10",
	"RATE_LIMIT_LLM_REQUESTS":          "100",
	"RATE_LIMIT_LLM_GLOBAL_REQUESTS":   "100",
	"RATE_LIMIT_LLM_PER":               "1s",
	"RATE_LIMIT_LLM_BURST":             "5",
	"RATE_LIMIT_LLM_FAIL_FAST":         "true",
}

var (
	okFn   = func(context.Context) (int, error) { return 1, nil }
	failFn = func(context.Context) (int, error) { return 0, errDown }
)

// held runs one call of fn's through wrap, and returns once it is in the
// call; the call ends when end is closed. A call refused (a full cap, a
// probe not granted) is tried again.
func held(t *testing.T, wg *sync.WaitGroup, end <-chan struct{}, wrap func(resilience.Func[int]) resilience.Func[int]) {
	t.Helper()
	in := make(chan struct{})
	var once sync.Once
	call := wrap(func(context.Context) (int, error) {
		once.Do(func() { close(in) })
		<-end
		return 1, nil
	})
	wg.Go(func() {
		for {
			select {
			case <-end:
				return
			default:
			}
			if _, err := call(context.Background()); err == nil {
				return
			}
			time.Sleep(time.Millisecond) // a slot or a probe on its way back
		}
	})
	select {
	case <-in:
	case <-time.After(5 * time.Second):
		t.Fatal("the held call did not start within 5s")
	}
}

// tripAndClose opens cb with a failure, then probes until it closes.
func tripAndClose(t *testing.T, cb *resilience.CircuitBreaker) {
	t.Helper()
	resilience.WithCircuitBreaker(failFn, cb)(context.Background())
	if cb.State() != resilience.StateOpen {
		t.Fatalf("%s did not open", cb.Name())
	}
	waitFor(t, 5*time.Second, cb.Name()+" closed by a probe", func() bool {
		resilience.WithCircuitBreaker(okFn, cb)(context.Background())
		return cb.State() == resilience.StateClosed
	})
}

// TestEveryKeyExpires: after a workload of two replicas through their
// registries (breakers that trip and close, one open for a minute, a probe
// in flight, global bulkhead slots, a fleet-wide rate limit), every key
// under the prefix has a TTL, within its rule: a breaker state the idle
// period, or until its open ends if later; a probe lock ProbeTTL; the
// leases and heartbeats LeaseTTL; a rate limit until it is back to full,
// which redis_rate rounds up to the second. A key the test does not know
// fails it: a new kind of key needs a rule here and in README.md.
func TestEveryKeyExpires(t *testing.T) {
	const (
		idle     = 2 * time.Second
		leaseTTL = 3 * time.Second
		probeTTL = time.Second
		rateTTL  = time.Second // ceil(burst × per/limit) = ceil(50ms), in seconds
		slack    = 10 * time.Millisecond
	)
	p := prefix(t)
	opts := Options{KeyPrefix: p, SyncInterval: syncInterval, LeaseTTL: leaseTTL, ProbeTTL: probeTTL}
	var regs [2]*resilience.Registry
	for i := range regs {
		s := newStore(t, opts)
		regs[i] = newRegistry(t, expiryEnv, s)
		s.SetIdle(idle) // after UseStore, which sets the registry's own
	}
	ctx := context.Background()

	tripAndClose(t, regs[0].CircuitBreaker("flaky"))
	resilience.WithCircuitBreaker(failFn, regs[1].CircuitBreaker("down"))(ctx)

	probing := regs[0].CircuitBreaker("probing")
	resilience.WithCircuitBreaker(failFn, probing)(ctx)
	waitFor(t, 5*time.Second, "probing half-open", func() bool { return probing.State() == resilience.StateHalfOpen })
	var wg sync.WaitGroup
	end := make(chan struct{})
	defer wg.Wait()
	defer close(end)
	held(t, &wg, end, func(fn resilience.Func[int]) resilience.Func[int] {
		return resilience.WithCircuitBreaker(fn, probing)
	})

	for _, r := range regs {
		call := resilience.WithBulkhead(okFn, r.Bulkhead("db"))
		for range 5 {
			if _, err := call(ctx); err != nil && !errors.Is(err, resilience.ErrBulkheadFull) {
				t.Fatal(err)
			}
		}
	}
	held(t, &wg, end, func(fn resilience.Func[int]) resilience.Func[int] {
		return resilience.WithBulkhead(fn, regs[1].Bulkhead("db"))
	})

	for _, r := range regs {
		call := resilience.WithRateLimit(okFn, r.RateLimiter("llm"))
		for range 10 {
			call(ctx) // some refused: fail fast
		}
	}

	c := newClient(t, true)
	// The worker publishes in the background: wait for DOWN's open.
	waitFor(t, 5*time.Second, "DOWN's open in Redis", func() bool {
		return c.HGet(ctx, p+"cb:{DOWN}", "state").Val() == "open"
	})
	seen := map[string]int{}
	for _, k := range keysOf(t, c, p) {
		pttl, err := c.PTTL(ctx, k).Result()
		if err != nil {
			t.Fatal(err)
		}
		if pttl == -2 { // go-redis gives PTTL's -2 and -1 as they are
			continue // expired between SCAN and PTTL
		}
		rest := strings.TrimPrefix(k, p)
		var kind string
		var bound time.Duration
		switch {
		case strings.HasPrefix(rest, "cb:{") && strings.HasSuffix(rest, "}:probe"):
			kind, bound = "probe lock", probeTTL
		case strings.HasPrefix(rest, "cb:{") && strings.HasSuffix(rest, "}"):
			h := c.HMGet(ctx, k, "state", "until").Val()
			kind, bound = "breaker "+fmt.Sprint(h[0]), idle
			if until, _ := strconv.ParseInt(fmt.Sprint(h[1]), 10, 64); h[0] == "open" && until > 0 {
				left := time.Until(time.UnixMilli(until))
				bound = max(idle, left)
				if pttl < left-slack {
					t.Errorf("%s: PTTL %v, shorter than the open's %v left", k, pttl, left)
				}
			}
		case strings.HasPrefix(rest, "bh:{") && strings.HasSuffix(rest, "}:replicas"):
			kind, bound = "heartbeats", leaseTTL
		case strings.HasPrefix(rest, "bh:{") && strings.HasSuffix(rest, "}"):
			kind, bound = "leases", leaseTTL
		case strings.HasPrefix(rest, "rl:{") && strings.HasSuffix(rest, "}"):
			kind, bound = "rate limit", rateTTL
		default:
			t.Errorf("%s: a key with no expiry rule in this test", k)
			continue
		}
		seen[kind]++
		t.Logf("%-20s %-28s PTTL %v (bound %v)", kind, rest, pttl, bound.Round(time.Millisecond))
		if pttl <= 0 || pttl > bound+slack {
			t.Errorf("%s (%s): PTTL %v; want > 0 and <= %v", k, kind, pttl, bound)
		}
	}
	for _, kind := range []string{"breaker closed", "breaker open", "probe lock", "heartbeats", "leases", "rate limit"} {
		if seen[kind] == 0 {
			t.Errorf("no %s key seen (saw %v): the workload no longer writes one", kind, seen)
		}
	}
}

// TestLeaseSetOutlivesItsLongestLease: replicas with different LeaseTTLs
// share a set; one with a short LeaseTTL that writes it last must not cut
// short another's longer lease (the set expired 2 × the writer's LeaseTTL
// after its last write, here 600ms with a 5s lease inside).
func TestLeaseSetOutlivesItsLongestLease(t *testing.T) {
	p := prefix(t)
	long := newStore(t, Options{KeyPrefix: p, SyncInterval: syncInterval, LeaseTTL: 5 * time.Second})
	short := newStore(t, Options{KeyPrefix: p, SyncInterval: syncInterval, LeaseTTL: 300 * time.Millisecond})
	ctx := context.Background()
	rl, err := long.Limiter("db", 5).Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer rl()
	rs, err := short.Limiter("db", 5).Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer rs()
	c := newClient(t, true)
	for _, k := range []string{p + "bh:{DB}", p + "bh:{DB}:replicas"} {
		if pttl := c.PTTL(ctx, k).Val(); pttl < 4*time.Second {
			t.Errorf("%s: PTTL %v after the short replica's write; want the long lease's ~5s", k, pttl)
		}
	}
}

// TestIdleReplicaLeavesNothing: a replica whose registry evicted every name
// (idle 300ms) leaves no key in Redis soon after, not a LeaseTTL (30s)
// later: the breaker state expires after the idle period, the heartbeat is
// removed in the background, and the rate limit's key expires when the
// limit is full again (a second at most, here).
func TestIdleReplicaLeavesNothing(t *testing.T) {
	p := prefix(t)
	s := newStore(t, Options{KeyPrefix: p, SyncInterval: syncInterval, LeaseTTL: 30 * time.Second})
	r := newRegistry(t, expiryEnv, s)
	s.SetIdle(300 * time.Millisecond) // after UseStore, which sets the registry's own
	ctx := context.Background()
	tripAndClose(t, r.CircuitBreaker("flaky"))
	call := resilience.WithBulkhead(okFn, r.Bulkhead("db"))
	for range 5 {
		if _, err := call(ctx); err != nil && !errors.Is(err, resilience.ErrBulkheadFull) {
			t.Fatal(err)
		}
	}
	limited := resilience.WithRateLimit(okFn, r.RateLimiter("llm"))
	for range 10 {
		limited(ctx)
	}
	c := newClient(t, true)
	waitFor(t, 5*time.Second, "the workload's keys written", func() bool {
		k := keysOf(t, c, p)
		return len(k) >= 3 // the breaker, the heartbeats, the rate limit
	})
	t.Logf("keys before: %q", keysOf(t, c, p))

	start := time.Now()
	for _, name := range []string{"flaky", "db", "llm"} {
		s.Evicted(name) // as the registry does after the idle period
	}
	var left []string
	waitFor(t, 5*time.Second, "every key gone", func() bool {
		left = keysOf(t, c, p)
		return len(left) == 0
	})
	t.Logf("every key gone %v after the names were evicted", time.Since(start).Round(time.Millisecond))
}

// TestOpenOutlivesShortIdle: a shared open lasts past an idle period much
// shorter than it: the state is there until the open ends, so a replica
// that asks for the probe meanwhile finds the open, and gone soon after.
func TestOpenOutlivesShortIdle(t *testing.T) {
	const idle = 100 * time.Millisecond
	env := map[string]string{"CIRCUIT_BREAKER_X_FAIL_MAX": "1", "CIRCUIT_BREAKER_X_TIMEOUT": "1s"}
	s := newStore(t, Options{KeyPrefix: prefix(t), SyncInterval: syncInterval})
	cb := newRegistry(t, env, s).CircuitBreaker("x")
	s.SetIdle(idle) // after UseStore, which sets the registry's own
	resilience.WithCircuitBreaker(failFn, cb)(context.Background())
	hkey := syncOf(t, s, cb).hkey
	c := newClient(t, true)
	ctx := context.Background()
	var until int64
	waitFor(t, 5*time.Second, "the open in Redis", func() bool {
		v := parseHash(c.HMGet(ctx, hkey, "state", "until", "at", "origin", "epoch", "gen").Val())
		until = v.until
		return v.state == "open"
	})
	end := time.UnixMilli(until)
	if pttl := c.PTTL(ctx, hkey).Val(); pttl < time.Until(end)-10*time.Millisecond || pttl <= idle {
		t.Fatalf("PTTL %v with %v of the open left; want the open's end, not the idle %v", pttl, time.Until(end), idle)
	}
	polls := 0
	for time.Until(end) > 20*time.Millisecond {
		if c.Exists(ctx, hkey).Val() != 1 {
			t.Fatalf("the state expired %v before the open's end (idle %v)", time.Until(end), idle)
		}
		polls++
		time.Sleep(5 * time.Millisecond) // polling a condition
	}
	waitFor(t, 2*time.Second, "the state gone after the open's end", func() bool {
		return c.Exists(ctx, hkey).Val() == 0
	})
	t.Logf("state present through %d polls until the open's end, gone %v after it", polls, time.Since(end).Round(time.Millisecond))
}

// tracked returns what s holds in memory for names.
func tracked(s *Store) (breakers, keys, limiters, draining int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.breakers), len(s.byKey), len(s.limiters), len(s.draining)
}

// TestEvictedDropsTheNamesState: Evicted drops the store's breaker and
// limiter of the name, and removes the heartbeat; asked for again, both
// work as new: the breaker follows another replica's open (the evicted
// one no longer does), and the bulkhead's slot is the fleet's.
func TestEvictedDropsTheNamesState(t *testing.T) {
	env := map[string]string{
		"CIRCUIT_BREAKER_SVC_A_FAIL_MAX": "1", "CIRCUIT_BREAKER_SVC_A_TIMEOUT": "5",
		"BULKHEAD_SVC_A_GLOBAL_LIMIT": "1",
	}
	opts := Options{KeyPrefix: prefix(t), SyncInterval: syncInterval}
	a, b := newStore(t, opts), newStore(t, opts)
	ra := newRegistry(t, env, a)
	old := ra.CircuitBreaker("svc-a")
	ra.Bulkhead("svc-a")
	if n, k, l, _ := tracked(a); n != 1 || k != 1 || l != 1 {
		t.Fatalf("tracked %d breakers, %d keys, %d limiters; want 1 each", n, k, l)
	}
	c := newClient(t, true)
	ctx := context.Background()
	rkey := opts.KeyPrefix + "bh:{SVC_A}:replicas"
	waitFor(t, 5*time.Second, "A's heartbeat", func() bool { return c.ZScore(ctx, rkey, a.id).Err() == nil })

	a.Evicted("SVC_A") // the registry's key; any name with that EnvKey does
	if n, k, l, d := tracked(a); n+k+l+d != 0 {
		t.Fatalf("after Evicted: %d breakers, %d keys, %d limiters, %d draining; want none", n, k, l, d)
	}
	waitFor(t, 5*time.Second, "A's heartbeat removed", func() bool { return c.ZScore(ctx, rkey, a.id).Err() == redis.Nil })

	// Asked for again, as a registry does for a name after its eviction.
	ra2 := newRegistry(t, env, a)
	cb := ra2.CircuitBreaker("svc-a")
	ra2.Bulkhead("svc-a")
	if n, k, l, _ := tracked(a); n != 1 || k != 1 || l != 1 {
		t.Fatalf("asked for again: tracked %d breakers, %d keys, %d limiters; want 1 each", n, k, l)
	}
	rb := newRegistry(t, env, b)
	resilience.WithCircuitBreaker(failFn, rb.CircuitBreaker("svc-a"))(ctx)
	waitFor(t, 5*time.Second, "the new breaker opens with B", func() bool { return cb.State() == resilience.StateOpen })
	if st := old.State(); st != resilience.StateClosed {
		t.Fatalf("the evicted breaker is %v; want it no longer told the fleet's states", st)
	}

	release, err := a.Limiter("svc-a", 1).Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Limiter("svc-a", 1).Acquire(ctx); !errors.Is(err, resilience.ErrBulkheadFull) {
		t.Fatalf("B's acquire while A's new limiter holds the slot: %v; want ErrBulkheadFull", err)
	}
	release()
}

// TestEvictedLimiterKeepsLeasesInFlight: a lease held when its limiter is
// evicted, or taken afterwards by a caller still holding the evicted
// bulkhead, is renewed past LeaseTTL until given back; then the limiter
// is dropped and the slots are free.
func TestEvictedLimiterKeepsLeasesInFlight(t *testing.T) {
	const ttl = 300 * time.Millisecond
	opts := Options{KeyPrefix: prefix(t), SyncInterval: syncInterval, LeaseTTL: ttl}
	a, b := newStore(t, opts), newStore(t, opts)
	ctx := context.Background()
	held := a.Limiter("db", 1)
	relHeld, err := held.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stale := a.Limiter("cache", 1)
	a.Evicted("db")    // a call in flight
	a.Evicted("cache") // nothing in flight, but a caller still holds it
	relStale, err := stale.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, l, d := tracked(a); l != 0 || d != 2 {
		t.Fatalf("%d limiters, %d draining; want 0 and both draining", l, d)
	}
	time.Sleep(4 * ttl) // the leases must outlive LeaseTTL
	for _, name := range []string{"db", "cache"} {
		if _, err := b.Limiter(name, 1).Acquire(ctx); !errors.Is(err, resilience.ErrBulkheadFull) {
			t.Fatalf("%s after 4 LeaseTTLs: err = %v; want the evicted limiter's slot still held", name, err)
		}
	}
	relHeld()
	relStale()
	waitFor(t, 5*time.Second, "both dropped once given back", func() bool {
		_, _, _, d := tracked(a)
		return d == 0
	})
	for _, name := range []string{"db", "cache"} {
		var rel func()
		waitFor(t, 5*time.Second, name+"'s slot free", func() bool {
			rel, err = b.Limiter(name, 1).Acquire(ctx)
			return err == nil
		})
		rel()
	}
}

// TestEvictedKeepsNoState: a store whose registry sees 100,000 names over
// time, each evicted after use, holds none of them, and its heap does not
// grow with their number. The breakers are built outside a registry, which
// keeps ~120 B per name in the core's metrics until a registry retires
// them: the same names churned without the store are the baseline.
func TestEvictedKeepsNoState(t *testing.T) {
	s := newStore(t, Options{KeyPrefix: prefix(t), SyncInterval: time.Minute})
	heap := func() int64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return int64(m.HeapAlloc)
	}
	churn := func(from, to int, store bool) {
		for i := from; i < to; i++ {
			name := "host-" + strconv.Itoa(i)
			cb, err := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{Name: name})
			if err != nil {
				t.Fatal(err)
			}
			if store {
				cb.SetSync(s.BreakerSync(cb))
				s.Limiter(name, 1)
				s.Evicted(name)
			}
		}
	}
	const n, warm = 100_000, 10_000
	half := (n - warm) / 2
	churn(0, warm, true)
	h0 := heap()
	churn(warm, warm+half, false)
	h1 := heap()
	start := time.Now()
	churn(warm+half, n, true)
	took := time.Since(start)
	h2 := heap()
	if b, k, l, d := tracked(s); b+k+l+d != 0 {
		t.Fatalf("after %d names evicted: %d breakers, %d keys, %d limiters, %d draining; want none", n, b, k, l, d)
	}
	s.unsentMu.Lock()
	gone := len(s.gone)
	s.unsentMu.Unlock()
	if gone > maxUnsent {
		t.Fatalf("%d heartbeat removals queued; want at most %d", gone, maxUnsent)
	}
	core, store := h1-h0, h2-h1
	perName := (store - core) / int64(half)
	t.Logf("%d names through the store in %v: heap %+d B per name, %+d B per name without the store; the store's own %+d B",
		half, took.Round(time.Millisecond), store/int64(half), core/int64(half), perName)
	// A name kept would cost ~1 KiB (a breaker, a limiter and their map
	// entries): 45 MiB here.
	if store-core > 4<<20 {
		t.Fatalf("the store's heap grew by %d KiB over %d evicted names", (store-core)>>10, half)
	}
}
