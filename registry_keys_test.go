package resilience

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// tenantFunc fails for the keys in failing and counts the calls per key.
func tenantFunc(failing map[string]bool, calls map[string]int) Func[int] {
	return func(ctx context.Context) (int, error) {
		k := keyOf(ctx)
		calls[k]++
		if failing[k] {
			return 0, errBoom
		}
		return 1, nil
	}
}

func TestKeyedBreakersOpenForTheirKeyOnly(t *testing.T) {
	reader := withReader(t)
	svc := uniqueName("tenants")
	r := boundedRegistry(t, 10, time.Hour, nil)
	calls := map[string]int{}
	f := ForService(r, svc, tenantFunc(map[string]bool{"a": true}, calls))
	ctxA, ctxB := WithKey(context.Background(), "a"), WithKey(context.Background(), "b")
	if _, err := f(ctxA); !errors.Is(err, errBoom) {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := f(ctxA); !errors.Is(err, ErrCircuitOpen) {
			t.Fatalf("key a after its failure: %v; want ErrCircuitOpen", err)
		}
		if _, err := f(ctxB); err != nil {
			t.Fatalf("key b while a is open: %v", err)
		}
		if _, err := f(context.Background()); err != nil {
			t.Fatalf("unkeyed while a is open: %v", err)
		}
	}
	if calls["a"] != 1 || calls["b"] != 3 || calls[""] != 3 {
		t.Errorf("calls = %v; want a once, b and unkeyed 3 times", calls)
	}
	if st := r.CircuitBreaker(svc).State(); st != StateClosed {
		t.Errorf("the service's breaker is %v; want closed", st)
	}
	keys := r.OpenKeys(svc, "", 0)
	if len(keys) != 1 || keys[0].Key != "a" || keys[0].State != "open" || keys[0].Name != svc {
		t.Errorf("OpenKeys = %+v; want a, open, named after the service", keys)
	}
	m := collect(t, reader)
	var open int64 = -1
	for _, dp := range m["resilience.circuit_breaker.open_keys"].Data.(metricdata.Gauge[int64]).DataPoints {
		if v, _ := dp.Attributes.Value(attrService); v.AsString() == svc {
			open = dp.Value
		}
	}
	if open != 1 {
		t.Errorf("open_keys{service=%s} = %d; want 1", svc, open)
	}
	for _, dp := range m["resilience.circuit_breaker.state"].Data.(metricdata.Gauge[int64]).DataPoints {
		if v, _ := dp.Attributes.Value(attrService); v.AsString() == svc && dp.Value != 0 {
			t.Errorf("the state gauge of %s is %d: a keyed breaker's state leaked into the service's series", svc, dp.Value)
		}
	}
	if !r.ResetKey(svc, "a") {
		t.Fatal("ResetKey(a) = false")
	}
	if _, err := f(ctxA); !errors.Is(err, errBoom) || calls["a"] != 2 {
		t.Errorf("key a after ResetKey: %v, %d calls; want it called again", err, calls["a"])
	}
}

func TestKeysPastTheCapShareTheOverflowKey(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := boundedRegistry(t, 10, time.Minute, map[string]string{"CIRCUIT_BREAKER_SVC_MAX_KEYS": "2"})
		calls := map[string]int{}
		f := ForService(r, "svc", tenantFunc(map[string]bool{"k3": true}, calls))
		for _, k := range []string{"k1", "k2", "k3"} {
			f(WithKey(context.Background(), k))
		}
		// k3 found no room: it shares the key "other", whose breaker its
		// failure opened, with every key that finds none.
		if _, err := f(WithKey(context.Background(), "k4")); !errors.Is(err, ErrCircuitOpen) {
			t.Errorf("k4, sharing the overflow key with k3: %v; want ErrCircuitOpen", err)
		}
		if _, err := f(WithKey(context.Background(), "k1")); err != nil {
			t.Errorf("k1: %v", err)
		}
		keys := r.OpenKeys("svc", "", 0)
		if len(keys) != 1 || keys[0].Key != overflowName {
			t.Errorf("OpenKeys = %+v; want the overflow key", keys)
		}
		tb := setOf(r, "svc").keys.Load()
		r.mu.Lock()
		n := tb.n
		r.mu.Unlock()
		if n != 2 {
			t.Errorf("%d keys of their own; want the cap, 2", n)
		}
		// Once k2 is idle, a new key takes its place; k1, used, stays.
		time.Sleep(30 * time.Second)
		f(WithKey(context.Background(), "k1"))
		time.Sleep(90 * time.Second)
		f(WithKey(context.Background(), "k1"))
		if _, err := f(WithKey(context.Background(), "k5")); err != nil {
			t.Errorf("k5 after k2 went idle: %v; want its own closed breaker", err)
		}
		if _, ok := tb.m.Load("k5"); !ok {
			t.Error("k5 has no key of its own")
		}
		if _, ok := tb.m.Load("k2"); ok {
			t.Error("idle k2 was not evicted")
		}
		if _, ok := tb.m.Load("k1"); !ok {
			t.Error("k1, in use, was evicted")
		}
	})
}

func TestTransportKeyOpensOneTenantsBreaker(t *testing.T) {
	svc := uniqueName("tenant-api")
	r := boundedRegistry(t, 10, time.Hour, nil)
	sent := map[string]int{}
	tr := &Transport{
		Registry: r,
		Service:  func(*http.Request) string { return svc },
		Key:      func(req *http.Request) string { return req.Header.Get("X-Tenant") },
		Base: roundTripFunc(func(req *http.Request) (*http.Response, error) {
			tenant := req.Header.Get("X-Tenant")
			sent[tenant]++
			code := http.StatusOK
			if tenant == "broken" {
				code = http.StatusServiceUnavailable
			}
			return &http.Response{StatusCode: code, Body: io.NopCloser(strings.NewReader("x")), Request: req}, nil
		}),
	}
	get := func(tenant string) (*http.Response, error) {
		req, _ := http.NewRequest(http.MethodGet, "http://api.test/v1", nil)
		req.Header.Set("X-Tenant", tenant)
		resp, err := tr.RoundTrip(req)
		if resp != nil {
			resp.Body.Close()
		}
		return resp, err
	}
	get("broken")
	for range 3 {
		if _, err := get("broken"); !errors.Is(err, ErrCircuitOpen) {
			t.Errorf("the broken tenant: %v; want ErrCircuitOpen", err)
		}
		if resp, err := get("fine"); err != nil || resp.StatusCode != http.StatusOK {
			t.Errorf("the fine tenant: %v", err)
		}
	}
	if sent["broken"] != 1 || sent["fine"] != 3 {
		t.Errorf("sent = %v; want broken once, fine 3 times", sent)
	}
	// WithKey on the request's context keys it when Key says nothing.
	req, _ := http.NewRequestWithContext(WithKey(context.Background(), "broken"), http.MethodGet, "http://api.test/v1", nil)
	if _, err := tr.RoundTrip(req); !errors.Is(err, ErrCircuitOpen) {
		t.Errorf("a request keyed by its context: %v; want ErrCircuitOpen", err)
	}
}

func TestReloadReconfiguresKeyedBreakers(t *testing.T) {
	r := boundedRegistry(t, 10, time.Hour, nil)
	calls := map[string]int{}
	f := ForService(r, "svc", tenantFunc(map[string]bool{"a": true}, calls))
	ctx := WithKey(context.Background(), "a")
	f(WithKey(context.Background(), "b")) // a key built before the reload
	cfg := r.Config()
	cfg.DefaultCircuitBreaker.FailMax = 3
	if err := r.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := f(ctx); !errors.Is(err, errBoom) {
			t.Fatalf("failure %d under FailMax 3: %v", i+1, err)
		}
	}
	if _, err := f(ctx); !errors.Is(err, ErrCircuitOpen) {
		t.Errorf("after 3 failures: %v; want ErrCircuitOpen", err)
	}
	tb := setOf(r, "svc").keys.Load()
	v, _ := tb.m.Load("b")
	if got := v.(*keyEntry).cb.rule.Load().failMax; got != 3 {
		t.Errorf("key b's FailMax after the reload = %d; want 3", got)
	}
}

func TestEmptyKeyIsTheServices(t *testing.T) {
	r := boundedRegistry(t, 10, time.Hour, nil)
	f := ForService(r, "svc", failFunc)
	f(WithKey(context.Background(), ""))
	if st := r.CircuitBreaker("svc").State(); st != StateOpen {
		t.Errorf("the service's breaker is %v after a failure with an empty key; want open", st)
	}
	if setOf(r, "svc").keys.Load() != nil {
		t.Error("an empty key made a key table")
	}
}

// A service's breaker forced open by an operator (admin POST
// /breakers/{name}/open, CircuitBreaker.ForceOpen) no longer stops the
// calls made with a key: the keyed pipeline replaces the service's
// breaker by the key's, so the kill switch and the fleet's shared open
// state (Store) of the service are ignored by all WithKey/Transport.Key
// traffic. Not in the CHANGELOG nor WithKey's doc.
func TestForcedServiceBreakerHoldsForItsKeys(t *testing.T) {
	r := mustRegistry(t, nil)
	r.CircuitBreaker("svc").ForceOpen()
	f := ForService(r, "svc", okFunc)
	if _, err := f(context.Background()); !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("unkeyed call: %v; want ErrCircuitOpen", err)
	}
	if _, err := f(WithKey(context.Background(), "tenant-1")); !errors.Is(err, ErrCircuitOpen) {
		t.Errorf("keyed call through a force-opened service breaker: err = %v; want ErrCircuitOpen", err)
	}
}

// BULKHEAD_<SVC>_GLOBAL_LIMIT caps a service's calls across the fleet. A
// keyed call runs through its key's bulkhead only, built with
// GlobalLimit 0 and never attached to the store, so keyed calls are not
// capped by the service's global limit at all ("without its global cap,
// which is the service's as a whole" says keyBulkheadConfigLocked, but
// nothing applies the service's).
func TestKeyedCallsTakeTheServicesGlobalSlot(t *testing.T) {
	r := mustRegistry(t, map[string]string{"BULKHEAD_SVC_GLOBAL_LIMIT": "1", "RETRY_MAX_ATTEMPTS": "1"})
	m := &memStore{}
	r.UseStore(m)
	var maxInside, inside int32
	var mu sync.Mutex
	enter := make(chan struct{})
	release := make(chan struct{})
	fn := func(ctx context.Context) (int, error) {
		mu.Lock()
		inside++
		maxInside = max(maxInside, inside)
		mu.Unlock()
		enter <- struct{}{}
		<-release
		mu.Lock()
		inside--
		mu.Unlock()
		return 1, nil
	}
	f := ForService(r, "svc", fn)
	errs := make(chan error, 2)
	for _, k := range []string{"t1", "t2"} {
		go func() {
			_, err := f(WithKey(context.Background(), k))
			errs <- err
		}()
	}
	<-enter
	// The second either enters (the bug) or is rejected by the global cap.
	select {
	case <-enter:
	case err := <-errs:
		if !errors.Is(err, ErrBulkheadFull) {
			t.Errorf("second keyed call: %v; want ErrBulkheadFull", err)
		}
		close(release)
		<-errs
		return
	case <-time.After(2 * time.Second):
	}
	close(release)
	<-errs
	<-errs
	if maxInside > 1 {
		t.Errorf("%d keyed calls of svc inside at once with BULKHEAD_SVC_GLOBAL_LIMIT=1 (store saw %d acquires); want 1", maxInside, m.inside.Load())
	}
}

// regRef.current counts the call into its set's usage and only then reads
// the key from ctx; a ctx whose Value panics (nil ctx here, once any code
// in the process used WithKey) leaves inflight at 1 for ever: the set is
// never evicted again, and once the cap is reached every new name goes to
// "other" for good. The project rule: nothing leaked on any path, panics
// included.
func TestPanicBeforeTheDeferLeavesNothingInside(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_ = WithKey(context.Background(), "k") // keysUsed, as any use in the process does
		r := boundedRegistry(t, 1, time.Minute, nil)
		f := ForService(r, "a", okFunc)
		func() {
			defer func() { recover() }()
			var ctx context.Context // nil
			f(ctx)
		}()
		s := setOf(r, "a")
		if n := s.inflight.Load(); n != 0 {
			t.Errorf("set a has inflight = %d after the call panicked and returned; want 0", n)
		}
		time.Sleep(5 * time.Minute)
		call(r, "b", okFunc)
		if setOf(r, "b") == nil {
			t.Error("b never gets a set: a, idle for 5 idle periods, is pinned by a leaked inflight count")
		}
	})
}

// Two spellings of one service ("payments-eu", "PAYMENTS_EU") share a set
// but have a pipeline each; a key entry caches one keyed pipeline per entry
// point, checked by kp.base == p, so alternating spellings rebuild it on
// every call: r.mu taken and a pipeline copied (allocated) per call on a
// known name and key.
func TestKeyedAliasesDoNotAllocatePerCall(t *testing.T) {
	r := mustRegistry(t, nil)
	f1 := ForService(r, "payments-eu", okFunc)
	f2 := ForService(r, "PAYMENTS_EU", okFunc)
	ctx := WithKey(context.Background(), "tenant")
	f1(ctx)
	f2(ctx)
	one := testing.AllocsPerRun(200, func() { f1(ctx); f1(ctx) })
	alt := testing.AllocsPerRun(200, func() { f1(ctx); f2(ctx) })
	if alt > one {
		t.Errorf("alternating spellings of one service: %.1f allocs per pair of keyed calls against %.1f for one spelling; want no more", alt, one)
	}
}

// A key past CIRCUIT_BREAKER_<SVC>_MAX_KEYS shares the key "other": every
// call with it took the registry's lock and re-read the configuration,
// allocating more than a call under a key in the table.
func TestOverflowKeyCallAllocatesNothing(t *testing.T) {
	cfg := DefaultConfig()
	cfg.DefaultCircuitBreaker.MaxKeys = 10
	reg, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	fn := ForService(reg, "overflow-keys", okFunc)
	var ctxs []context.Context
	for i := range 20 {
		ctxs = append(ctxs, WithKey(context.Background(), "k"+strconv.Itoa(i)))
		fn(ctxs[i])
	}
	known := testing.AllocsPerRun(1000, func() { fn(ctxs[0]) })
	over := testing.AllocsPerRun(1000, func() { fn(ctxs[15]) })
	if over != known {
		t.Errorf("a call under a key past the cap allocates %v times; want %v, a key in the table's", over, known)
	}
	// Raising the cap lets new keys in again.
	cfg = reg.Config()
	cfg.DefaultCircuitBreaker.MaxKeys = 100
	if err := reg.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	fn(ctxs[15])
	if _, ok := setOf(reg, "overflow-keys").keys.Load().m.Load("k15"); !ok {
		t.Error("k15 found no room after the cap grew")
	}
}

// Regression (fixed): The same for keys: MAX_KEYS lowered by Reload under the keys held, no
// aging timer (no table ever reached half its cap), keyTable.fullAt set by
// the first key past it: no key ever gets an entry again.
func TestFullKeyTableAfterReloadWithoutTimerFindsRoomOnceIdle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := boundedRegistry(t, 100, time.Minute, nil)
		f := ForService(r, "svc", okFunc)
		for i := range 4 {
			f(WithKey(context.Background(), "k"+strconv.Itoa(i)))
		}
		cfg := r.Config()
		cfg.DefaultCircuitBreaker.MaxKeys = 2
		if err := r.Reload(cfg); err != nil {
			t.Fatal(err)
		}
		f(WithKey(context.Background(), "new-1")) // overflow key
		time.Sleep(10 * time.Minute)
		f(WithKey(context.Background(), "new-2"))
		tb := setOf(r, "svc").keys.Load()
		if _, ok := tb.m.Load("new-2"); !ok {
			t.Error("new-2 has no key of its own although the four old keys sat idle for 10 idle periods (cap 2)")
		}
	})
}
