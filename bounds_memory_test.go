package resilience

import (
	"context"
	"errors"
	"io"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// The memory and series bounds of the registry's caps (registry_cap.go,
// registry_keys.go), measured as the issue asks: the heap after a GC and
// the series a ManualReader collects. docs/RELIABILITY.md, section 9, has
// the figures.

// heapAfterGC returns the live heap. Two collections: edge.go's cleanups
// run after the first.
func heapAfterGC() int64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc)
}

// okBase answers 200 with a small body at once, with no network.
var okBase = roundTripFunc(func(r *http.Request) (*http.Response, error) {
	return &http.Response{
		StatusCode: http.StatusOK,
		Header:     http.Header{},
		Body:       io.NopCloser(strings.NewReader("ok")),
		Request:    r,
	}, nil
})

// boundsHost is the i-th host of TestManyHostsStayBounded. The names are
// the same in every run, so that under -count the series of a run are
// those of the one before.
func boundsHost(i int) string { return "h" + strconv.Itoa(i) + ".bounds.test" }

// getHost sends a GET through rt, reads the body and closes it.
func getHost(t *testing.T, rt http.RoundTripper, host string) {
	req, err := http.NewRequest(http.MethodGet, "http://"+host+"/", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := rt.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: status %d", host, resp.StatusCode)
	}
}

// namingValue returns the attribute that names a series' service,
// function or resource: what multiplies with the names a registry sees.
func namingValue(set attribute.Set) (string, bool) {
	for _, k := range []attribute.Key{attrService, attrName, attrFunction, attrResourceType} {
		if v, ok := set.Value(k); ok {
			return v.AsString(), true
		}
	}
	return "", false
}

// attributeSets returns the attribute sets of m's data points.
func attributeSets(m metricdata.Metrics) []attribute.Set {
	var out []attribute.Set
	switch d := m.Data.(type) {
	case metricdata.Sum[int64]:
		for _, dp := range d.DataPoints {
			out = append(out, dp.Attributes)
		}
	case metricdata.Sum[float64]:
		for _, dp := range d.DataPoints {
			out = append(out, dp.Attributes)
		}
	case metricdata.Gauge[int64]:
		for _, dp := range d.DataPoints {
			out = append(out, dp.Attributes)
		}
	case metricdata.Gauge[float64]:
		for _, dp := range d.DataPoints {
			out = append(out, dp.Attributes)
		}
	case metricdata.Histogram[float64]:
		for _, dp := range d.DataPoints {
			out = append(out, dp.Attributes)
		}
	case metricdata.Histogram[int64]:
		for _, dp := range d.DataPoints {
			out = append(out, dp.Attributes)
		}
	}
	return out
}

// The test of a Transport that names each service after its host:
// 100 000 requests to 100 000 distinct hosts. The registry keeps its cap
// of policy sets (the first 1000 hosts; the rest share "other", since no
// set is idle for RESILIENCE_IDLE_EVICT within the run), the heap grows by
// less than 20 MB over the same run to one host, and no instrument has more
// than cap + 1 series for these names.
func TestManyHostsStayBounded(t *testing.T) {
	const (
		requests = 100_000
		maxHeap  = 20 << 20
	)
	reader := withReader(t)
	capacity := DefaultConfig().MaxServices

	// run sends the requests through a new registry's Transport, to hosts
	// distinct hosts in turn, and returns the heap's growth and the
	// registry, kept alive.
	run := func(hosts int) (int64, *Registry) {
		reg, err := NewRegistry(DefaultConfig())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { reg.Close() })
		tr := &Transport{Base: okBase, Registry: reg}
		before := heapAfterGC()
		start := time.Now()
		for i := range requests {
			getHost(t, tr, boundsHost(i%hosts))
		}
		elapsed := time.Since(start)
		growth := heapAfterGC() - before
		runtime.KeepAlive(tr)
		t.Logf("%d requests to %d hosts in %v: heap grew by %.2f MB; the registry holds %d sets",
			requests, hosts, elapsed.Round(time.Millisecond), float64(growth)/(1<<20), reg.Services())
		return growth, reg
	}
	one, reg1 := run(1)
	many, reg := run(requests)
	if d := many - one; d >= maxHeap {
		t.Errorf("heap grew by %.2f MB over 100 000 hosts against %.2f MB over one; want less than 20 MB more", float64(many)/(1<<20), float64(one)/(1<<20))
	}
	if n := reg.Services(); n > capacity {
		t.Errorf("registry holds %d sets; want at most %d", n, capacity)
	}

	// The series of these names: at most cap + 1 per instrument, the
	// overflow set's among them.
	ours := func(name string) bool { return strings.HasSuffix(name, ".bounds.test") || name == overflowName }
	total := 0
	sawOther := false
	for name, m := range collect(t, reader) {
		names := map[string]bool{}
		for _, set := range attributeSets(m) {
			if v, ok := namingValue(set); ok && ours(v) {
				names[v] = true
				total++
			}
		}
		if len(names) > capacity+1 {
			t.Errorf("%s: %d names; want at most %d", name, len(names), capacity+1)
		}
		if len(names) > 0 {
			t.Logf("%s: %d names", name, len(names))
		}
		sawOther = sawOther || names[overflowName]
	}
	if !sawOther {
		t.Errorf("no series named %q: the hosts past the cap were not counted", overflowName)
	}
	if got := counterValueFor(t, reader, "resilience.calls", attrName, overflowName); got < requests-int64(capacity) {
		t.Errorf("resilience.calls{name=%q} = %d; want at least %d", overflowName, got, requests-capacity)
	}
	t.Logf("%d series in all for these names", total)
	runtime.KeepAlive(reg1)
	runtime.KeepAlive(reg)
}

// counterValueFor sums the points of the counter name whose attribute k
// is v.
func counterValueFor(t *testing.T, reader *sdkmetric.ManualReader, name string, k attribute.Key, v string) int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != name {
				continue
			}
			for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
				if got, ok := dp.Attributes.Value(k); ok && got.AsString() == v {
					total += dp.Value
				}
			}
		}
	}
	return total
}

// The test of keyed breakers' memory: 1 000 000 calls spread over
// 10 000 keys, each key's context built once, keep the heap flat between
// the 100 000th call and the last, and the service's table within
// CIRCUIT_BREAKER_<SERVICE>_MAX_KEYS (1000 by default; the other keys share
// "other"). Under -race a call takes about 30µs, so the run stops at
// 250 000 calls there (8s); `make cover` runs the million.
func TestManyKeysKeepMemoryFlat(t *testing.T) {
	const (
		keys    = 10_000
		early   = 100_000
		maxFlat = 2 << 20
	)
	calls := 1_000_000
	if raceEnabled {
		calls = 250_000
	}
	reg, err := NewRegistry(DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	const service = "keys-flat"
	fn := ForService(reg, service, okFunc)
	ctxs := make([]context.Context, keys)
	for i := range ctxs {
		ctxs[i] = WithKey(context.Background(), "tenant-"+strconv.Itoa(i))
	}
	call := func(i int) {
		if v, err := fn(ctxs[i%keys]); v != 1 || err != nil {
			t.Fatalf("call %d = %v, %v", i, v, err)
		}
	}
	start := time.Now()
	for i := range early {
		call(i)
	}
	at100k := heapAfterGC()
	for i := early; i < calls; i++ {
		call(i)
	}
	at1M := heapAfterGC()
	elapsed := time.Since(start)
	runtime.KeepAlive(fn)
	runtime.KeepAlive(ctxs)

	kt := reg.keyTable(service)
	if kt == nil {
		t.Fatal("no key table")
	}
	reg.mu.Lock()
	n := kt.n
	reg.mu.Unlock()
	maxKeys := DefaultConfig().DefaultCircuitBreaker.maxKeys()
	if n > maxKeys {
		t.Errorf("the table holds %d keys; want at most %d", n, maxKeys)
	}
	if kt.other.Load() == nil {
		t.Errorf("no overflow key after %d keys; want the keys past %d to share %q", keys, maxKeys, overflowName)
	}
	if open := reg.OpenKeys(service, "", 0); len(open) != 0 {
		t.Errorf("OpenKeys = %v; want none", open)
	}
	d := at1M - at100k
	t.Logf("%d calls over %d keys in %v: heap %.2f MB after %d calls, %.2f MB after %d (%+.3f MB); %d keys in the table",
		calls, keys, elapsed.Round(time.Millisecond), float64(at100k)/(1<<20), early, float64(at1M)/(1<<20), calls, float64(d)/(1<<20), n)
	if d >= maxFlat {
		t.Errorf("heap grew by %.2f MB between call %d and call %d; want less than 2 MB", float64(d)/(1<<20), early, calls)
	}
}

// One key's open breaker rejects that key's calls without allocating,
// while another key of the same service still calls through.
func TestOpenKeyRejectsWithoutAllocating(t *testing.T) {
	const service = "keys-open"
	cfg := DefaultConfig()
	cfg.CircuitBreakers[EnvKey(service)] = CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Hour}
	cfg.Retry.MaxAttempts = 1 // the first failure opens a's breaker: no backoff to wait out
	reg, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	fn := ForService(reg, service, func(ctx context.Context) (int, error) {
		if keyOf(ctx) == "a" {
			return 0, errBoom
		}
		return 1, nil
	})
	a, b := WithKey(context.Background(), "a"), WithKey(context.Background(), "b")
	if _, err := fn(a); !errors.Is(err, errBoom) && !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("first call of a: %v; want boom", err)
	}
	for range 10 { // warm: the key's pipeline is built, its rejection cached
		if _, err := fn(a); !errors.Is(err, ErrCircuitOpen) {
			t.Fatalf("a's call after it failed: %v; want ErrCircuitOpen", err)
		}
	}
	if v, err := fn(b); v != 1 || err != nil {
		t.Fatalf("b's call = %v, %v; want 1, nil: a's open breaker is a's alone", v, err)
	}
	if n := testing.AllocsPerRun(1000, func() { fn(a) }); n != 0 {
		t.Errorf("a call to an open key allocates %v times; want 0", n)
	}
	if open := reg.OpenKeys(service, "", 0); len(open) != 1 || open[0].Key != "a" {
		t.Errorf("OpenKeys = %+v; want a alone", open)
	}
	if s := reg.CircuitBreaker(service).State(); s != StateClosed {
		t.Errorf("the service's breaker is %v; want closed", s)
	}
}
