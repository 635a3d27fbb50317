package redisstore

import (
	"bufio"
	"context"
	"errors"
	"maps"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/resilience-go/resilience"
)

// Issue 18: a global cap that holds under load, and degrades to a fair
// share of the limit when Redis is slow or down, never to no cap.

// TestGlobalCapUnderLoad: a global limit of 3, local limits of 10, three
// replicas, 30 callers (10 a replica) whose calls take 20ms, under -race,
// with the default OpTimeout (50ms). While Redis answers, never more than 3
// calls are inside the downstream at once (it was 20 to 30: slot requests
// that outlasted OpTimeout went through uncapped). With Redis frozen
// (SIGSTOP), each replica holds to its fair share, ceil(3/3) = 1, with the
// calls that held a lease when Redis stopped counted in: never more than
// 3 + 2.
func TestGlobalCapUnderLoad(t *testing.T) {
	needRedis(t)
	const global, replicas = 3, 3
	env := map[string]string{
		"BULKHEAD_DOWNSTREAM_LIMIT":        "10",
		"BULKHEAD_DOWNSTREAM_GLOBAL_LIMIT": strconv.Itoa(global),
	}
	// The defaults, OpTimeout 50ms above all; the poll every 100ms, so that
	// Redis is known to be back soon after SIGCONT.
	opts := Options{KeyPrefix: prefix(t), SyncInterval: syncInterval}
	down := &downstream{delay: 20 * time.Millisecond}
	var stores [replicas]*Store
	var calls [replicas]resilience.Func[string]
	for i := range replicas {
		s := New(newClient(t, true), opts)
		t.Cleanup(func() { s.Close() })
		stores[i] = s
		calls[i] = resilience.WithBulkhead(down.fn(i), newRegistry(t, env, s).Bulkhead("downstream"))
	}
	lim := func(i int) *limiter { return stores[i].Limiter("downstream", global).(*limiter) }

	var ok, full atomic.Int64
	phase := func(d time.Duration) {
		t.Helper()
		var wg sync.WaitGroup
		stop := time.Now().Add(d)
		for i := range replicas {
			for range 10 {
				wg.Go(func() {
					for time.Now().Before(stop) {
						_, err := calls[i](context.Background())
						switch {
						case err == nil:
							ok.Add(1)
						case errors.Is(err, resilience.ErrBulkheadFull):
							full.Add(1)
							time.Sleep(time.Millisecond) // pacing, not synchronisation
						default:
							t.Errorf("call: %v", err)
						}
					}
				})
			}
		}
		wg.Wait()
	}
	shared := func() (n int64) {
		for i := range replicas {
			n += lim(i).shared.Load()
		}
		return n
	}

	phase(1500 * time.Millisecond)
	upMax, upOK, upShared := down.maxInside.Load(), ok.Load(), shared()
	t.Logf("Redis up: %d calls in, %d refused, %d on the local share (not confirmed within OpTimeout); at most %d inside at once",
		upOK, full.Load(), upShared, upMax)
	if upMax > global {
		t.Errorf("%d calls inside at once while Redis answered; the global limit is %d", upMax, global)
	}
	if upOK == 0 {
		t.Fatal("no call got in")
	}

	// Every replica learnt from its last script how many share the limit.
	for i := range replicas {
		if n := lim(i).replicas.Load(); n != replicas {
			t.Fatalf("replica %d counts %d live replicas; want %d", i, n, replicas)
		}
	}

	// Freeze Redis: connections stay open, nothing answers.
	srv.pause()
	t.Cleanup(srv.resume) // whatever happens below
	down.maxInside.Store(down.inside.Load())
	ok.Store(0)
	full.Store(0)
	phase(1000 * time.Millisecond)
	frozenMax, frozenOK := down.maxInside.Load(), ok.Load()
	srv.resume()
	t.Logf("Redis frozen: %d calls in, %d refused, %d on the local share; at most %d inside at once (bound %d + %d - 1)",
		frozenOK, full.Load(), shared()-upShared, frozenMax, global, replicas)
	if frozenMax > global+replicas-1 {
		t.Errorf("%d calls inside at once with Redis frozen; want at most %d + %d - 1", frozenMax, global, replicas)
	}
	if frozenOK == 0 {
		t.Error("no call got in with Redis frozen: the fallback is no cap or no calls, not a fair share")
	}
	for i := range replicas {
		waitFor(t, 5*time.Second, "Redis known to be back", stores[i].Healthy)
	}
}

// roundTrips counts the acquire scripts a client sends: the slot
// requests' round trips (not the heartbeats' renewals).
type roundTrips struct{ n atomic.Int64 }

func (r *roundTrips) DialHook(next redis.DialHook) redis.DialHook { return next }
func (r *roundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if a := cmd.Args(); len(a) > 1 && (cmd.Name() == "evalsha" && a[1] == acquireScript.Hash() || cmd.Name() == "eval" && a[1] == acquireSource) {
			r.n.Add(1)
		}
		return next(ctx, cmd)
	}
}
func (r *roundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// commandStat returns Redis's count of calls of a command, from INFO
// commandstats.
func commandStat(t *testing.T, c *redis.Client, cmd string) int64 {
	t.Helper()
	info, err := c.Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(strings.NewReader(info))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "cmdstat_"+cmd+":calls=")
		if ok {
			n, _ := strconv.ParseInt(rest[:strings.IndexByte(rest, ',')], 10, 64)
			return n
		}
	}
	return 0
}

// TestSlotBurstRoundTrips: 30 callers of one replica ask for a global slot
// at once. The requests that wait together go in one script, so the burst
// costs a few round trips, not 30 (one a caller before issue 18).
func TestSlotBurstRoundTrips(t *testing.T) {
	const callers = 30
	c := newClient(t, true)
	s := New(c, Options{KeyPrefix: prefix(t), SyncInterval: time.Minute})
	t.Cleanup(func() { s.Close() })
	l := s.Limiter("downstream", 100).(*limiter)
	rt := &roundTrips{}
	c.AddHook(rt)
	other := newClient(t, true)
	// The worker loads the scripts at start: a NOSCRIPT and its retry
	// would make two round trips of one.
	waitFor(t, 5*time.Second, "scripts loaded", func() bool {
		ok, err := other.ScriptExists(context.Background(), acquireScript.Hash()).Result()
		return err == nil && ok[0]
	})
	before := commandStat(t, other, "evalsha") + commandStat(t, other, "eval")

	var wg sync.WaitGroup
	start := make(chan struct{})
	releases := make(chan func(), callers)
	for range callers {
		wg.Go(func() {
			<-start
			release, err := l.Acquire(context.Background())
			if err != nil {
				t.Errorf("Acquire: %v", err)
				return
			}
			releases <- release
		})
	}
	close(start)
	wg.Wait()
	close(releases)
	n := 0
	for release := range releases {
		release()
		n++
	}
	trips := rt.n.Load()
	server := commandStat(t, other, "evalsha") + commandStat(t, other, "eval") - before
	t.Logf("%d callers at once: %d slots in %d round trips (Redis counted %d scripts, a heartbeat's renewal included if it fell in); %d on the local share",
		callers, n, trips, server, l.shared.Load())
	if n != callers || l.shared.Load() != 0 {
		t.Fatalf("%d slots from Redis, %d on the local share; want all %d from Redis", n-int(l.shared.Load()), l.shared.Load(), callers)
	}
	if trips > 6 {
		t.Fatalf("%d round trips for %d callers at once; want a few (each takes every request queued meanwhile)", trips, callers)
	}
}

// TestClosedPathNeverTouchesRedis: a million calls through a closed shared
// breaker send Redis nothing, and a call allocates nothing.
func TestClosedPathNeverTouchesRedis(t *testing.T) {
	c := newClient(t, true)
	cmds := &countAll{}
	c.AddHook(cmds)
	// No poll and no renewal during the calls.
	s := New(c, Options{KeyPrefix: prefix(t), SyncInterval: time.Minute, LeaseTTL: time.Hour})
	t.Cleanup(func() { s.Close() })
	cb := newRegistry(t, nil, s).CircuitBreaker("downstream")
	waitSubscribed(t, s, 1)
	// The first polls, which a new breaker and a new subscription ask for
	// at once; then nothing until the next SyncInterval, a minute away.
	waitFor(t, 5*time.Second, "first poll", func() bool { return cmds.count("hmget") > 0 })
	last, quiet := cmds.count(""), time.Now()
	waitFor(t, 5*time.Second, "the store's client quiet for 300ms", func() bool {
		if n := cmds.count(""); n != last {
			last, quiet = n, time.Now()
		}
		return time.Since(quiet) > 300*time.Millisecond
	})
	other := newClient(t, true)
	stat := func() int64 {
		info, err := other.Info(context.Background(), "stats").Result()
		if err != nil {
			t.Fatal(err)
		}
		_, rest, _ := strings.Cut(info, "total_commands_processed:")
		n, _ := strconv.ParseInt(strings.TrimSpace(strings.SplitN(rest, "\n", 2)[0]), 10, 64)
		return n
	}
	sent := cmds.count("")
	before := stat()
	call := resilience.WithCircuitBreaker(func(context.Context) (int, error) { return 1, nil }, cb)
	ctx := context.Background()
	start := time.Now()
	for range 1_000_000 {
		if _, err := call(ctx); err != nil {
			t.Fatal(err)
		}
	}
	took := time.Since(start)
	server := stat() - before - 1 // the first INFO is counted by the second
	sent = cmds.count("") - sent
	t.Logf("1,000,000 closed calls in %v: %d commands from the store's client (%v before), %d processed by Redis", took, sent, cmds.names(), server)
	if sent != 0 || server != 0 {
		t.Fatalf("%d commands sent, %d processed during closed calls; want 0", sent, server)
	}
	if a := testing.AllocsPerRun(1000, func() { call(ctx) }); a != 0 {
		t.Fatalf("a closed call through a shared breaker allocates %v times; want 0", a)
	}
}

// countAll counts the commands a client sends, by name, pipelined or not.
type countAll struct {
	mu sync.Mutex
	n  map[string]int64
}

func (h *countAll) add(cmds ...redis.Cmder) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.n == nil {
		h.n = map[string]int64{}
	}
	for _, c := range cmds {
		h.n[c.Name()]++
	}
}

// count returns how many commands named name were sent; "" counts all.
func (h *countAll) count(name string) (n int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for k, v := range h.n {
		if name == "" || k == name {
			n += v
		}
	}
	return n
}

func (h *countAll) names() map[string]int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return maps.Clone(h.n)
}

func (h *countAll) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *countAll) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.add(cmd)
		return next(ctx, cmd)
	}
}
func (h *countAll) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.add(cmds...)
		return next(ctx, cmds)
	}
}
