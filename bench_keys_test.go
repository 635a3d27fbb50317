package resilience

import (
	"context"
	"io"
	"net/http"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// The cost of keys and of the registry's cap on a call: a keyed call at
// most 1.2x an unkeyed one, and no allocation for the bookkeeping on a
// name the registry knows. docs/BENCHMARKS.md has the figures.

// benchKeys is how many keys the keyed-10k-keys runs rotate over: past
// CIRCUIT_BREAKER_<SERVICE>_MAX_KEYS (1000 by default), 9000 of them share
// the key "other", as a service with more tenants than its cap would. The
// keyed-10k-keys-cap-10k runs raise the cap to 10 000, so that every key
// has a breaker of its own.
const benchKeys = 10_000

// keyedContexts returns n contexts, each with a key of its own, built
// once: a caller keeps its tenant's context, it does not make one per
// call.
func keyedContexts(n int) []context.Context {
	ctxs := make([]context.Context, n)
	for i := range ctxs {
		ctxs[i] = WithKey(context.Background(), "tenant-"+strconv.Itoa(i))
	}
	return ctxs
}

// benchKeyContexts returns the contexts a run of key mode rotates over.
func benchKeyContexts(key string) []context.Context {
	switch key {
	case "keyed":
		return keyedContexts(1)
	case "keyed-10k-keys", "keyed-10k-keys-cap-10k":
		return keyedContexts(benchKeys)
	}
	return []context.Context{context.Background()}
}

// BenchmarkRegistryCall runs the success path of ForService and of
// Transport (over a base that answers 200 at once, with no network) on a
// known name, without a key, with one key, and rotating over 10 000 keys
// (with the default cap of 1000 keys, and with a cap of 10 000), serial
// and in parallel. The last element of each name is key=..., so
// that
//
//	benchstat -col /key
//
// puts the keyed calls beside the unkeyed one. The registry is
// benchRegistry's: a timeout of a minute and a bulkhead of 1024.
func BenchmarkRegistryCall(b *testing.B) {
	const service = "bench-keys"
	for _, entry := range []string{"ForService", "Transport"} {
		for _, parallel := range []bool{false, true} {
			mode := "serial"
			if parallel {
				mode = "parallel"
			}
			for _, key := range []string{"unkeyed", "keyed", "keyed-10k-keys", "keyed-10k-keys-cap-10k"} {
				b.Run(entry+"/"+mode+"/key="+key, func(b *testing.B) {
					reg := benchRegistry(b)
					defer reg.Close()
					if key == "keyed-10k-keys-cap-10k" {
						cfg := reg.Config()
						cfg.DefaultCircuitBreaker.MaxKeys = benchKeys
						if err := reg.Reload(cfg); err != nil {
							b.Fatal(err)
						}
					}
					ctxs := benchKeyContexts(key)
					if entry == "ForService" {
						fn := ForService(reg, service, checksCtx)
						rotate(b, parallel, func() []context.Context { return ctxs }, func(ctx context.Context) bool {
							v, err := fn(ctx)
							return v == 1 && err == nil
						})
						return
					}
					tr := &Transport{Base: okBase, Registry: reg}
					// Each goroutine has its requests, built once.
					reqs := func() []*http.Request { return benchRequests(b, "http://"+service+"/", ctxs) }
					rotate(b, parallel, reqs, func(req *http.Request) bool { return roundTripOK(tr, req) })
				})
			}
		}
	}
}

// BenchmarkOpenKeyRejection is a call to a key whose breaker is open,
// through ForService and through Transport, while the service's other
// keys are closed.
func BenchmarkOpenKeyRejection(b *testing.B) {
	const service = "bench-open-key"
	reg := openKeyRegistry(b, service)
	defer reg.Close()
	open := WithKey(context.Background(), "open")
	b.Run("ForService", func(b *testing.B) {
		fn := ForService(reg, service, failFunc)
		fn(open)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := fn(open); err == nil {
				b.Fatal("an open key's call passed")
			}
		}
	})
	b.Run("Transport", func(b *testing.B) {
		tr := &Transport{Base: roundTripFunc(func(*http.Request) (*http.Response, error) {
			return nil, errBoom
		}), Registry: reg}
		req := benchRequests(b, "http://"+service+"/", []context.Context{open})[0]
		tr.RoundTrip(req)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := tr.RoundTrip(req); err == nil {
				b.Fatal("an open key's request passed")
			}
		}
	})
}

// openKeyRegistry returns a registry whose service opens a key's breaker
// at its first failure, for an hour, and makes one attempt per call.
func openKeyRegistry(tb testing.TB, service string) *Registry {
	tb.Helper()
	cfg := DefaultConfig()
	cfg.CircuitBreakers[EnvKey(service)] = CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Hour}
	cfg.Retry.MaxAttempts = 1
	reg, err := NewRegistry(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	return reg
}

func benchRequests(tb testing.TB, url string, ctxs []context.Context) []*http.Request {
	tb.Helper()
	reqs := make([]*http.Request, len(ctxs))
	for i, ctx := range ctxs {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			tb.Fatal(err)
		}
		reqs[i] = req
	}
	return reqs
}

// roundTripOK sends req through rt, reads the body and closes it, and
// reports a 200.
func roundTripOK(rt http.RoundTripper, req *http.Request) bool {
	resp, err := rt.RoundTrip(req)
	if err != nil {
		return false
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// rotate calls call with each of items() in turn, b.N times in all:
// serially, or with b.RunParallel, each goroutine with items of its own,
// built before the timer starts, and starting at a different one. A
// first pass, untimed, gives every key its place, so that the runs
// measure calls on known keys.
func rotate[T any](b *testing.B, parallel bool, items func() []T, call func(T) bool) {
	sets := make([][]T, runtime.GOMAXPROCS(0)) // RunParallel's goroutines
	for i := range sets {
		sets[i] = items()
	}
	for _, it := range sets[0] {
		if !call(it) {
			b.Fatal("failed call")
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	if !parallel {
		its, i := sets[0], 0
		for b.Loop() {
			if !call(its[i]) {
				b.Fatal("failed call")
			}
			if i++; i == len(its) {
				i = 0
			}
		}
		return
	}
	var g atomic.Int64
	b.RunParallel(func(pb *testing.PB) {
		k := int(g.Add(1)) - 1
		its := sets[k%len(sets)]
		i := k * 7919 % len(its)
		for pb.Next() {
			if !call(its[i]) {
				b.Error("failed call")
				return
			}
			if i++; i == len(its) {
				i = 0
			}
		}
	})
}

// A call on a name the registry knows allocates nothing for the cap's
// bookkeeping or for its key: through ForService, unkeyed and keyed, no
// more than its per-attempt timeout's context (4 objects, what the call
// allocated at 5775045, before the caps); through Transport, keyed as
// unkeyed (12 objects, as at 5775045, most of them the base's response).
func TestKnownNameCallAllocatesNothing(t *testing.T) {
	cfg := DefaultConfig()
	cfg.DefaultTimeout = time.Minute
	cfg.DefaultBulkhead = BulkheadConfig{Limit: 1024}
	reg, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	const service = "known-name"
	ctx := context.Background()
	keyed := WithKey(ctx, "tenant")
	timeoutCtx := testing.AllocsPerRun(1000, func() {
		_, cancel := context.WithTimeoutCause(ctx, time.Minute, ErrTimeout)
		cancel()
	})

	fn := ForService(reg, service, okFunc)
	fn(ctx)
	fn(keyed)
	unkeyedN := testing.AllocsPerRun(1000, func() { fn(ctx) })
	keyedN := testing.AllocsPerRun(1000, func() { fn(keyed) })
	if unkeyedN > timeoutCtx {
		t.Errorf("ForService, unkeyed: %v allocs a call; want at most %v, the timeout context's", unkeyedN, timeoutCtx)
	}
	if keyedN != unkeyedN {
		t.Errorf("ForService, keyed: %v allocs a call; want %v, the unkeyed call's", keyedN, unkeyedN)
	}

	tr := &Transport{Base: okBase, Registry: reg}
	reqs := benchRequests(t, "http://"+service+"/", []context.Context{ctx, keyed})
	for _, req := range reqs {
		roundTripOK(tr, req)
	}
	unkeyedT := testing.AllocsPerRun(1000, func() { roundTripOK(tr, reqs[0]) })
	keyedT := testing.AllocsPerRun(1000, func() { roundTripOK(tr, reqs[1]) })
	if keyedT != unkeyedT {
		t.Errorf("Transport, keyed: %v allocs a request; want %v, the unkeyed request's", keyedT, unkeyedT)
	}
	t.Logf("allocs a call: ForService %v unkeyed, %v keyed (the timeout context: %v); Transport %v unkeyed, %v keyed",
		unkeyedN, keyedN, timeoutCtx, unkeyedT, keyedT)
}
