package resilience

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// boundedRegistry is a registry with the given cap and idle period,
// breakers that open on one failure for an hour, and no retries.
func boundedRegistry(t testing.TB, maxServices int, idle time.Duration, env map[string]string) *Registry {
	t.Helper()
	e := map[string]string{
		"RESILIENCE_MAX_SERVICES":          strconv.Itoa(maxServices),
		"RESILIENCE_IDLE_EVICT":            idle.String(),
		"CIRCUIT_BREAKER_DEFAULT_FAIL_MAX": "1",
		"CIRCUIT_BREAKER_DEFAULT_TIMEOUT":  "1h",
		"RETRY_MAX_ATTEMPTS":               "1",
	}
	for k, v := range env {
		e[k] = v
	}
	r := mustRegistry(t, e)
	t.Cleanup(func() { r.Close() })
	return r
}

// setOf returns the registry's own set for name, nil if it has none.
func setOf(r *Registry, name string) *svcSet {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sets[EnvKey(name)]
}

func call(r *Registry, name string, fn Func[int]) error {
	_, err := ForService(r, name, fn)(context.Background())
	return err
}

func TestCapSendsNewNamesToOther(t *testing.T) {
	var buf bytes.Buffer
	old := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&buf, nil)))
	t.Cleanup(func() { slog.SetDefault(old) })
	reader := withReader(t)
	r := boundedRegistry(t, 3, time.Hour, nil)
	names := []string{uniqueName("cap"), uniqueName("cap"), uniqueName("cap"), uniqueName("cap"), uniqueName("cap")}
	for _, n := range names {
		if err := call(r, n, okFunc); err != nil {
			t.Fatal(err)
		}
	}
	if got := r.Services(); got != 3 {
		t.Fatalf("Services() = %d; want the cap, 3", got)
	}
	for _, n := range names[3:] {
		if setOf(r, n) != nil {
			t.Errorf("%s has a set of its own past the cap", n)
		}
	}
	calls := collect(t, reader)["resilience.calls"].Data.(metricdata.Sum[int64])
	byName := map[string]int64{}
	for _, dp := range calls.DataPoints {
		v, _ := dp.Attributes.Value(attrName)
		byName[v.AsString()] += dp.Value
	}
	if byName[overflowName] < 2 {
		t.Errorf("resilience.calls{name=other} = %d; want the 2 calls past the cap", byName[overflowName])
	}
	for _, n := range names[3:] {
		if byName[n] != 0 {
			t.Errorf("resilience.calls has a series for %s, past the cap", n)
		}
	}
	if n := strings.Count(buf.String(), "RESILIENCE_MAX_SERVICES"); n != 1 {
		t.Errorf("%d warnings about the cap; want 1:\n%s", n, buf.String())
	}
}

func TestEvictionNeverDropsOpenBreakers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := boundedRegistry(t, 3, time.Minute, nil)
		open := []string{"open-a", "open-b", "open-c"}
		for _, n := range open {
			if err := call(r, n, failFunc); !errors.Is(err, errBoom) {
				t.Fatalf("%s: %v", n, err)
			}
		}
		time.Sleep(10 * time.Minute) // idle many times over, but open
		for _, n := range []string{"new-d", "new-e"} {
			if err := call(r, n, okFunc); err != nil {
				t.Fatalf("%s: %v", n, err)
			}
			if setOf(r, n) != nil {
				t.Errorf("%s got a set of its own: an open breaker was evicted", n)
			}
		}
		if got := r.Services(); got != 3 {
			t.Errorf("Services() = %d; want 3", got)
		}
		for _, n := range open {
			called := false
			err := call(r, n, func(context.Context) (int, error) { called = true; return 1, nil })
			if !errors.Is(err, ErrCircuitOpen) || called {
				t.Errorf("%s after the new names: err %v, called %v; want its open breaker to reject", n, err, called)
			}
		}
	})
}

func TestEvictionNeverDropsBulkheadWithCallsInside(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := boundedRegistry(t, 2, time.Minute, nil)
		release := make(chan struct{})
		done := make(chan error)
		go func() {
			done <- call(r, "busy", func(context.Context) (int, error) { <-release; return 1, nil })
		}()
		synctest.Wait()
		if err := call(r, "quiet", okFunc); err != nil {
			t.Fatal(err)
		}
		busy := setOf(r, "busy")
		time.Sleep(10 * time.Minute)
		if err := call(r, "newcomer", okFunc); err != nil {
			t.Fatal(err)
		}
		if setOf(r, "busy") != busy || busy.evicted.Load() {
			t.Error("the set with a call inside its bulkhead was evicted")
		}
		if setOf(r, "quiet") != nil || setOf(r, "newcomer") == nil {
			t.Error("the idle set was not evicted for the new name")
		}
		if s := busy.bh.Stats(); s.Active != 1 {
			t.Errorf("busy bulkhead Active = %d; want 1", s.Active)
		}
		close(release)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if s := busy.bh.Stats(); s.Active != 0 {
			t.Errorf("busy bulkhead Active = %d after the call; want 0: a slot leaked", s.Active)
		}
	})
}

func TestIdleSetsAreEvictedLeastRecentlyUsedFirst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reader := withReader(t)
		before := evictionCount(t, reader, "service")
		r := boundedRegistry(t, 2, time.Minute, nil)
		call(r, "first", okFunc)
		time.Sleep(30 * time.Second)
		call(r, "second", okFunc)
		time.Sleep(2 * time.Minute) // both idle now; first for longer
		call(r, "third", okFunc)
		if setOf(r, "first") != nil || setOf(r, "second") == nil || setOf(r, "third") == nil {
			t.Fatalf("after third: first %v, second %v, third %v; want first evicted",
				setOf(r, "first") != nil, setOf(r, "second") != nil, setOf(r, "third") != nil)
		}
		call(r, "second", okFunc) // used again: not idle any more
		call(r, "fourth", okFunc)
		if setOf(r, "fourth") != nil {
			t.Error("fourth got a set although no set was idle")
		}
		if setOf(r, "second") == nil || setOf(r, "third") == nil {
			t.Error("a set in use was evicted")
		}
		if got := evictionCount(t, reader, "service") - before; got != 1 {
			t.Errorf("resilience.registry.evictions{kind=service} grew by %d; want 1", got)
		}
	})
}

func evictionCount(t *testing.T, reader interface {
	Collect(context.Context, *metricdata.ResourceMetrics) error
}, kind string) int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != "resilience.registry.evictions" {
				continue
			}
			var n int64
			for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
				if v, _ := dp.Attributes.Value("kind"); v.AsString() == kind {
					n += dp.Value
				}
			}
			return n
		}
	}
	return 0
}

func TestForServiceFuncOutlivesTheEvictionOfItsSet(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := boundedRegistry(t, 2, time.Minute, nil)
		calls := 0
		f := ForService(r, "kept", func(context.Context) (int, error) { calls++; return 1, nil })
		if _, err := f(context.Background()); err != nil {
			t.Fatal(err)
		}
		old := setOf(r, "kept")
		time.Sleep(30 * time.Second)
		call(r, "other-1", okFunc)
		time.Sleep(2 * time.Minute)
		call(r, "other-2", okFunc) // evicts kept, the least recently used
		if !old.evicted.Load() || setOf(r, "kept") != nil {
			t.Fatal("kept was not evicted")
		}
		if _, err := f(context.Background()); err != nil || calls != 2 {
			t.Fatalf("f after eviction: %v, %d calls", err, calls)
		}
		cur := setOf(r, "kept")
		if cur == nil || cur == old {
			t.Fatal("f did not find a set of its own again: other-1 was idle and could make room")
		}
		if c := cur.cb.Counts(); c.Requests != 1 {
			t.Errorf("the new breaker counted %d requests; want f's call", c.Requests)
		}
		if !old.cb.gone() || !old.bh.gone() {
			t.Error("the evicted breaker or bulkhead is still observed by the metrics")
		}
	})
}

func TestOverflowFuncFindsASetOnceThereIsRoom(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := boundedRegistry(t, 1, time.Minute, nil)
		if err := call(r, "open", failFunc); !errors.Is(err, errBoom) {
			t.Fatal(err)
		}
		f := ForService(r, "late", okFunc)
		f(context.Background())
		if setOf(r, "late") != nil {
			t.Fatal("late has a set while the only one is open")
		}
		r.CircuitBreaker("open").Reset() // pins it: never evicted
		r.Reload(r.Config())             // no change
		time.Sleep(5 * time.Minute)
		f(context.Background())
		if setOf(r, "late") != nil {
			t.Fatal("late evicted a pinned set")
		}
		r2 := boundedRegistry(t, 1, time.Minute, nil)
		call(r2, "idle", okFunc)
		g := ForService(r2, "late", okFunc)
		if setOf(r2, "late") != nil {
			t.Fatal("late has a set while idle was not idle yet")
		}
		time.Sleep(5 * time.Minute)
		g(context.Background())
		if setOf(r2, "late") == nil {
			t.Error("a Func left on the overflow set kept it after the only set went idle")
		}
	})
}

func TestBoundsConfigErrors(t *testing.T) {
	for env, want := range map[string]string{
		"RESILIENCE_MAX_SERVICES=0":        `RESILIENCE_MAX_SERVICES="0": must be at least 1`,
		"RESILIENCE_MAX_SERVICES=many":     `RESILIENCE_MAX_SERVICES="many"`,
		"RESILIENCE_IDLE_EVICT=-1s":        `RESILIENCE_IDLE_EVICT="-1s": must be positive`,
		"CIRCUIT_BREAKER_LLM_MAX_KEYS=-1":  `CIRCUIT_BREAKER_LLM_MAX_KEYS="-1": must not be negative`,
		"CIRCUIT_BREAKER_LLM_MAX_KEYS=lot": `CIRCUIT_BREAKER_LLM_MAX_KEYS="lot"`,
	} {
		k, v, _ := strings.Cut(env, "=")
		_, err := LoadConfigWith(LoadOptions{Environment: map[string]string{k: v}})
		if err == nil || !strings.Contains(err.Error(), want) || !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: %v; want an error containing %s", env, err, want)
		}
	}
	cfg := DefaultConfig()
	cfg.MaxServices, cfg.IdleEvict = -1, -time.Second
	err := cfg.Validate()
	for _, want := range []string{"Config.MaxServices", "Config.IdleEvict"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate() = %v; want it to name %s", err, want)
		}
	}
	c, err := LoadConfigWith(LoadOptions{Environment: map[string]string{
		"RESILIENCE_MAX_SERVICES": "50", "RESILIENCE_IDLE_EVICT": "90s", "CIRCUIT_BREAKER_LLM_MAX_KEYS": "20",
	}})
	if err != nil || c.MaxServices != 50 || c.IdleEvict != 90*time.Second || c.CircuitBreakers["LLM"].MaxKeys != 20 {
		t.Errorf("LoadConfigWith = %v, %d, %v, %d", err, c.MaxServices, c.IdleEvict, c.CircuitBreakers["LLM"].MaxKeys)
	}
}

func TestEvictionNeverDropsASetWaitingBetweenAttempts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg, err := LoadConfigWith(LoadOptions{Environment: map[string]string{
			"RESILIENCE_MAX_SERVICES": "1", "RESILIENCE_IDLE_EVICT": "1m", "RETRY_MAX_ATTEMPTS": "2",
			"CIRCUIT_BREAKER_DEFAULT_FAIL_MAX": "5",
		}})
		if err != nil {
			t.Fatal(err)
		}
		cfg.Retry.Delay = func(int, error) (time.Duration, bool) { return 5 * time.Minute, true }
		cfg.Retry.MaxDelay = 10 * time.Minute
		r, err := NewRegistry(cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		fail := true
		done := make(chan error)
		go func() {
			done <- call(r, "patient", func(context.Context) (int, error) {
				if fail {
					fail = false
					return 0, errBoom
				}
				return 1, nil
			})
		}()
		synctest.Wait() // waiting between attempts, holding no slot
		patient := setOf(r, "patient")
		time.Sleep(3 * time.Minute)
		call(r, "newcomer", okFunc)
		if setOf(r, "patient") != patient || patient.evicted.Load() {
			t.Error("the set of a call waiting between its attempts was evicted")
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
}

// TestCallsLeaveNothingInside checks that no path leaves a call counted
// inside a set or a key, which would keep it from eviction for ever.
func TestCallsLeaveNothingInside(t *testing.T) {
	r := boundedRegistry(t, 3, time.Hour, map[string]string{"HEDGE_HEDGED_DELAY": "0"})
	ctx := context.Background()
	kctx := WithKey(ctx, "tenant")
	for _, c := range []context.Context{ctx, kctx} {
		call(r, "ok", okFunc)
		ForService(r, "ok", okFunc)(c)
		ForService(r, "fails", failFunc)(c)
		ForService(r, "fails", failFunc)(c) // rejected by the open breaker
		ForServiceNoHedge(r, "ok", okFunc)(c)
		ForService(r, "hedged", okFunc)(c)
		ForService(r, "overflow-1", okFunc)(c)
		func() {
			defer func() { recover() }()
			ForService(r, "ok", func(context.Context) (int, error) { panic("boom") })(c)
		}()
		tr := &Transport{Registry: r, Base: roundTripFunc(func(req *http.Request) (*http.Response, error) {
			return &http.Response{StatusCode: http.StatusOK, Body: io.NopCloser(strings.NewReader("x")), Request: req}, nil
		})}
		req, _ := http.NewRequestWithContext(c, http.MethodGet, "http://ok/", nil)
		if resp, err := tr.RoundTrip(req); err == nil {
			resp.Body.Close()
		}
	}
	cfg := r.Config()
	cfg.Enabled = false
	r.Reload(cfg)
	ForService(r, "ok", okFunc)(kctx)
	r.mu.Lock()
	defer r.mu.Unlock()
	sets := []*svcSet{r.other}
	for _, s := range r.sets {
		sets = append(sets, s)
	}
	for _, s := range sets {
		if n := s.inflight.Load(); n != 0 {
			t.Errorf("set %s: %d calls inside after every call returned", s.name, n)
		}
		if tb := s.keys.Load(); tb != nil {
			for _, e := range tb.entries() {
				if n := e.inflight.Load(); n != 0 {
					t.Errorf("set %s key %s: %d calls inside", s.name, e.key, n)
				}
			}
		}
	}
}

func TestServiceNamedOtherIsTheOverflowSet(t *testing.T) {
	r := boundedRegistry(t, 1, time.Hour, nil)
	call(r, "first", okFunc)
	call(r, "past-the-cap", failFunc) // opens the overflow set's breaker
	for _, name := range []string{"other", "OTHER"} {
		if err := call(r, name, okFunc); !errors.Is(err, ErrCircuitOpen) {
			t.Errorf("%s: %v; want the overflow set's open breaker", name, err)
		}
	}
	if r.Services() != 1 || r.CircuitBreaker("other") != r.other.cb {
		t.Error("a service named other got a set of its own beside the overflow set")
	}
	if keys := r.OpenKeys("OTHER", "", 0); keys == nil {
		t.Error("OpenKeys(OTHER) = nil")
	}
}

// A set swept as idle by the aging timer, then pinned by CircuitBreaker or
// Bulkhead (code now holds its breaker), is still evicted by the next new
// name: bound.room and usage.tryEvict never look at pinned, and setLocked
// pins without touching the use bit. The breaker the code holds is
// retired (no metrics, no store sync) and calls of the name run through
// a new breaker: "an evicted policy in use".
func TestPinnedSetIsNeverEvictedAfterASweep(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := boundedRegistry(t, 2, time.Minute, nil)
		call(r, "a", okFunc)
		call(r, "b", okFunc)
		// The aging timer (armed at half the cap, every 15s) clears the
		// use bits, then lists a and b as idle candidates.
		time.Sleep(3 * time.Minute)
		cbA := r.CircuitBreaker("a") // pinned from now on: never evicted, says the CHANGELOG
		bhB := r.Bulkhead("b")
		call(r, "c", okFunc) // needs room
		if got := r.CircuitBreaker("a"); got != cbA || cbA.gone() {
			t.Errorf("the breaker held by code was evicted: CircuitBreaker(a) now returns another one (retired: %v)", cbA.gone())
		}
		if got := r.Bulkhead("b"); got != bhB || bhB.gone() {
			t.Errorf("the bulkhead held by code was evicted: Bulkhead(b) now returns another one (retired: %v)", bhB.gone())
		}
	})
}

// Every evicted set left its *site in the observer's list (and weak
// pointers in observed.breakers/bulkheads) until a metric collection
// pruned them. With no OpenTelemetry SDK installed (the default: a no-op
// provider never calls the callback) nothing ever pruned them: memory grew
// with every name the registry had seen, the very thing the cap is for.
func TestEvictedSitesDoNotLeakWithoutCollection(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := boundedRegistry(t, 1, time.Minute, nil)
		// room is the most entries the observer's lists hold without
		// growing; live, those of sites and breakers still in use.
		lists := func() (n, room, live int) {
			observed.mu.Lock()
			defer observed.mu.Unlock()
			n, room = len(observed.ownSites)+len(observed.breakers), cap(observed.ownSites)+cap(observed.breakers)
			for _, w := range observed.ownSites {
				if s := w.Value(); s != nil && !s.gone() {
					live++
				}
			}
			for _, w := range observed.breakers {
				if cb := w.Value(); cb != nil && !cb.gone() {
					live++
				}
			}
			return n, room, live
		}
		_, room, _ := lists()
		names := room + 300 // more evictions than the lists have room for: a leak grows them
		for i := range names {
			call(r, "churn-"+strconv.Itoa(i), okFunc)
			time.Sleep(2 * time.Minute) // idle: the next name evicts it
		}
		if n := r.Services(); n != 1 {
			t.Fatalf("registry holds %d sets; want 1", n)
		}
		if n, _, live := lists(); n > max(room, 2*live+64) {
			t.Errorf("the observer keeps %d entries for %d live sites and breakers after %d evictions (room for %d before); want the evicted ones dropped", n, live, names, room)
		}
	})
}

// While the sets are full, names with no set go to the overflow set
// without the registry's lock; a name that has a set, asked for by an
// entry point that has not built its pipeline yet, must still get its own.
func TestFullRegistryStillFindsAKnownNamesOtherEntryPoints(t *testing.T) {
	r := boundedRegistry(t, 1, time.Hour, nil)
	call(r, "api", okFunc)
	call(r, "stranger", okFunc) // finds the registry full
	tr := &Transport{Registry: r, Base: roundTripFunc(func(req *http.Request) (*http.Response, error) {
		code := http.StatusOK
		if req.URL.Hostname() == "api" {
			code = http.StatusServiceUnavailable
		}
		return &http.Response{StatusCode: code, Body: io.NopCloser(strings.NewReader("x")), Request: req}, nil
	})}
	for _, host := range []string{"stranger", "api"} { // the overflow set's Transport pipeline first
		req, _ := http.NewRequest(http.MethodGet, "http://"+host+"/", nil)
		if resp, err := tr.RoundTrip(req); err == nil {
			resp.Body.Close()
		}
	}
	if st := setOf(r, "api").cb.State(); st != StateOpen {
		t.Errorf("api's breaker is %v; want open by the 503 sent through Transport", st)
	}
	if st := r.other.cb.State(); st != StateClosed {
		t.Errorf("the overflow breaker is %v: it counted api's 503", st)
	}
}

// A registry's pipelines have metric sites of their own: held strongly
// by the observer, a registry closed and dropped kept them, and their
// series, for the life of the process (10 000 registries, about 25 MB).
func TestDroppedRegistryReleasesItsSites(t *testing.T) {
	count := func() int {
		runtime.GC()
		runtime.GC()
		observed.mu.Lock()
		defer observed.mu.Unlock()
		n := len(observed.sites)
		for _, w := range observed.ownSites {
			if s := w.Value(); s != nil && !s.gone() {
				n++
			}
		}
		return n
	}
	before := count()
	for range 1000 {
		reg, err := NewRegistry(DefaultConfig())
		if err != nil {
			t.Fatal(err)
		}
		ForService(reg, "dropped-registry", okFunc)(context.Background())
		reg.Close()
	}
	if n := count() - before; n > 10 {
		t.Errorf("1000 registries closed and dropped left %d metric sites observed; want at most 10", n)
	}
}

// Regression (fixed): A Func made while the registry was full holds the overflow set's
// pipeline; regRef.current refreshes it only when r.evictions moves.
// Reload raising RESILIENCE_MAX_SERVICES clears r.fullAt but does not move
// r.evictions: the Func stays on the overflow set for good, though its name
// would get a set of its own at once (a Transport call for it does).
func TestReloadRaisingTheCapFreesOverflowFuncs(t *testing.T) {
	r := boundedRegistry(t, 1, time.Hour, nil)
	if err := call(r, "first", okFunc); err != nil {
		t.Fatal(err)
	}
	f := ForService(r, "late", okFunc)
	f(context.Background())
	if setOf(r, "late") != nil {
		t.Fatal("late has a set of its own past the cap")
	}
	cfg := r.Config()
	cfg.MaxServices = 10
	if err := r.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		f(context.Background())
	}
	if setOf(r, "late") == nil {
		t.Error("after a Reload raised the cap to 10 (1 set held), a Func made while full still runs on the overflow set")
	}
}

// Regression (fixed): A Reload that lowers the cap under the sets held leaves the registry
// full with no aging timer (it is armed only when a set is added at half
// the cap). The first new name sets r.fullAt; from then on every new name
// takes the lock-free path to the overflow set, and nothing moves
// r.evictions: no name ever gets a set again, however long the old sets
// stay idle. Before the fast path, each new name reached bound.room, whose
// own sweep (at most every idle/8) found the idle sets.
func TestFullAfterReloadWithoutTimerFindsRoomOnceIdle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := boundedRegistry(t, 100, time.Minute, nil)
		for i := range 4 {
			call(r, "old-"+strconv.Itoa(i), okFunc)
		}
		cfg := r.Config()
		cfg.MaxServices = 2
		if err := r.Reload(cfg); err != nil {
			t.Fatal(err)
		}
		call(r, "new-1", okFunc)     // the four were used just now: overflow
		time.Sleep(10 * time.Minute) // every old set idle for 10 idle periods
		call(r, "new-2", okFunc)
		if setOf(r, "new-2") == nil {
			t.Errorf("new-2 has no set of its own although %d sets sat idle for 10 idle periods (cap 2)", r.Services())
		}
	})
}
