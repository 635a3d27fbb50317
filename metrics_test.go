package resilience

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// collected is one collection from a ManualReader, by instrument name.
type collected map[string]metricdata.Metrics

func collect(t *testing.T, reader *sdkmetric.ManualReader) collected {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	out := collected{}
	for _, sm := range rm.ScopeMetrics {
		if sm.Scope.Name != ScopeName {
			continue
		}
		if sm.Scope.Version != Version {
			t.Errorf("scope version %q; want %q", sm.Scope.Version, Version)
		}
		for _, m := range sm.Metrics {
			out[m.Name] = m
		}
	}
	return out
}

// since returns c less what base had recorded: observed counters are
// cumulative over the process, and other tests (or earlier -count runs)
// used the same names. Points left at zero are dropped.
func since(base, c collected) collected {
	out := collected{}
	for name, m := range c {
		sum, ok := m.Data.(metricdata.Sum[int64])
		bm, inBase := base[name]
		if !ok || !inBase {
			out[name] = m
			continue
		}
		prev := map[string]int64{}
		for _, dp := range bm.Data.(metricdata.Sum[int64]).DataPoints {
			prev[attrString(dp.Attributes)] = dp.Value
		}
		var dps []metricdata.DataPoint[int64]
		for _, dp := range sum.DataPoints {
			dp.Value -= prev[attrString(dp.Attributes)]
			if dp.Value != 0 {
				dps = append(dps, dp)
			}
		}
		sum.DataPoints = dps
		m.Data = sum
		out[name] = m
	}
	return out
}

func attrString(set attribute.Set) string {
	var parts []string
	for _, kv := range set.ToSlice() {
		parts = append(parts, string(kv.Key)+"="+kv.Value.String())
	}
	return strings.Join(parts, ",")
}

// points returns "attrs=value" for every data point of a counter or gauge,
// sorted, and checks the instrument's kind and unit.
func (c collected) points(t *testing.T, name, kind, unit string) []string {
	t.Helper()
	m, ok := c[name]
	if !ok {
		t.Errorf("instrument %s not recorded", name)
		return nil
	}
	if m.Unit != unit {
		t.Errorf("%s unit %q; want %q", name, m.Unit, unit)
	}
	var out []string
	switch d := m.Data.(type) {
	case metricdata.Sum[int64]:
		if (kind != "counter" && kind != "observed counter") || !d.IsMonotonic {
			t.Errorf("%s is a monotonic sum; want %s", name, kind)
		}
		for _, dp := range d.DataPoints {
			out = append(out, fmt.Sprintf("%s=%d", attrString(dp.Attributes), dp.Value))
		}
	case metricdata.Gauge[int64]:
		if kind != "gauge" {
			t.Errorf("%s is a gauge; want %s", name, kind)
		}
		for _, dp := range d.DataPoints {
			out = append(out, fmt.Sprintf("%s=%d", attrString(dp.Attributes), dp.Value))
		}
	case metricdata.Histogram[float64]:
		if kind != "histogram" {
			t.Errorf("%s is a histogram; want %s", name, kind)
		}
		for _, dp := range d.DataPoints {
			if !slices.Equal(dp.Bounds, durationBuckets) {
				t.Errorf("%s bounds %v; want the explicit buckets", name, dp.Bounds)
			}
			out = append(out, fmt.Sprintf("%s=count:%d", attrString(dp.Attributes), dp.Count))
		}
	default:
		t.Errorf("%s has data %T", name, m.Data)
	}
	sort.Strings(out)
	return out
}

func wantPoints(t *testing.T, c collected, name, kind, unit string, want ...string) {
	t.Helper()
	got := c.points(t, name, kind, unit)
	if kind == "gauge" || kind == "observed counter" {
		// Observed instruments report every live policy and wrapper since
		// the process started, other tests' included: keep the ones named
		// in want.
		got = slices.DeleteFunc(got, func(p string) bool {
			return !slices.ContainsFunc(want, func(w string) bool { return strings.HasPrefix(p, w[:strings.LastIndex(w, "=")+1]) })
		})
	}
	sort.Strings(want)
	if !slices.Equal(got, want) {
		t.Errorf("%s:\n got  %q\n want %q", name, got, want)
	}
}

func TestMetricsCircuitBreaker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reader := withReader(t)
		base := collect(t, reader)
		cb := mustBreaker(t, CircuitBreakerConfig{Name: "metrics-llm", FailMax: 2, OpenTimeout: time.Second})
		fail := true
		fn := Compose(func(context.Context) (int, error) {
			if fail {
				return 0, errBoom
			}
			return 1, nil
		}, Stack[int]{Name: "generate", CircuitBreaker: cb})
		c := since(base, collect(t, reader))
		wantPoints(t, c, "resilience.circuit_breaker.state", "gauge", "{state}", "service=metrics-llm=0")

		fn(context.Background())
		fn(context.Background()) // opens
		c = since(base, collect(t, reader))
		wantPoints(t, c, "resilience.circuit_breaker.state", "gauge", "{state}", "service=metrics-llm=2")
		fn(context.Background()) // rejected
		time.Sleep(time.Second + 1)
		fail = false
		fn(context.Background()) // probe closes it
		fn(context.Background())

		c = since(base, collect(t, reader))
		wantPoints(t, c, "resilience.circuit_breaker.state", "gauge", "{state}", "service=metrics-llm=0")
		wantPoints(t, c, "resilience.circuit_breaker.transitions", "counter", "{transition}",
			"from=closed,service=metrics-llm,to=open=1", "from=open,service=metrics-llm,to=half-open=1", "from=half-open,service=metrics-llm,to=closed=1")
		wantPoints(t, c, "resilience.circuit_breaker.failures", "counter", "{call}", "error.type=*errors.errorString,service=metrics-llm=2")
		wantPoints(t, c, "resilience.circuit_breaker.successes", "observed counter", "{call}", "service=metrics-llm=2")
		wantPoints(t, c, "resilience.circuit_breaker.rejections", "observed counter", "{call}", "service=metrics-llm=1")
		wantPoints(t, c, "resilience.calls", "observed counter", "{call}",
			"name=generate,outcome=failure=2", "name=generate,outcome=rejected=1", "name=generate,outcome=success=2")
		wantPoints(t, c, "resilience.call.duration", "histogram", "s",
			"name=generate,outcome=failure=count:2", "name=generate,outcome=rejected=count:1", "name=generate,outcome=success=count:2")
	})
}

func TestMetricsRetry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reader := withReader(t)
		base := collect(t, reader)
		r := mustRetry(t, RetryConfig{MaxAttempts: 3})
		ok, _ := script(errBoom, &Error{Err: ErrBulkheadFull}, nil)
		WithRetry(ok, r)(context.Background())
		bad, _ := script(errBoom, errBoom, errBoom)
		Compose(bad, Stack[int]{Name: "bad", Retry: r})(context.Background())

		c := since(base, collect(t, reader))
		okName := unnamed // a closure has no stable name
		wantPoints(t, c, "resilience.retry.attempts", "counter", "{attempt}",
			"attempt_number=1,error.type=*errors.errorString,function="+okName+"=1",
			"attempt_number=2,error.type=bulkhead_full,function="+okName+"=1",
			"attempt_number=1,error.type=*errors.errorString,function=bad=1",
			"attempt_number=2,error.type=*errors.errorString,function=bad=1")
		wantPoints(t, c, "resilience.retry.exhausted", "counter", "{call}", "function=bad=1")
		wantPoints(t, c, "resilience.retry.success_after_retry", "counter", "{call}", "function="+okName+"=1")
		wantPoints(t, c, "resilience.calls", "observed counter", "{call}", "name="+okName+",outcome=success=1", "name=bad,outcome=failure=1")
	})
}

func TestMetricsTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reader := withReader(t)
		base := collect(t, reader)
		fn := Compose(honours(time.Hour), Stack[int]{Name: "slow", Operation: "llm", Timeout: 1500 * time.Millisecond})
		fn(context.Background())
		Compose(honours(time.Millisecond), Stack[int]{Name: "fast", Operation: "llm", Timeout: time.Second})(context.Background())
		release := make(chan struct{})
		Compose(func(context.Context) (int, error) { <-release; return 0, nil }, Stack[int]{Name: "stuck", Timeout: time.Second, EnforceTimeout: true})(context.Background())
		close(release)
		synctest.Wait()

		c := since(base, collect(t, reader))
		wantPoints(t, c, "resilience.timeout.exceeded", "counter", "{attempt}",
			"function=slow,operation_type=llm,timeout_seconds=1.5=1", "function=stuck,operation_type=default,timeout_seconds=1=1")
		wantPoints(t, c, "resilience.timeout.abandoned", "counter", "{attempt}", "function=stuck=1")
		wantPoints(t, c, "resilience.timeout.duration", "histogram", "s",
			"function=slow,operation_type=llm=count:1", "function=stuck,operation_type=default=count:1")
		wantPoints(t, c, "resilience.calls", "observed counter", "{call}",
			"name=slow,outcome=timeout=1", "name=fast,outcome=success=1", "name=stuck,outcome=timeout=1")
	})
}

// timeout.duration shows how long a timed-out attempt really ran: a
// function that ignores its context overruns a cooperative timeout.
func TestMetricsTimeoutOverrun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reader := withReader(t)
		base := collect(t, reader)
		late := Compose(func(context.Context) (int, error) {
			time.Sleep(3 * time.Second) // ignores ctx
			return 0, errBoom
		}, Stack[int]{Name: "late", Timeout: time.Second})
		if _, err := late(context.Background()); !errors.Is(err, ErrTimeout) {
			t.Fatalf("err = %v; want ErrTimeout", err)
		}
		c := since(base, collect(t, reader))
		for _, dp := range c["resilience.timeout.duration"].Data.(metricdata.Histogram[float64]).DataPoints {
			if v, _ := dp.Attributes.Value(attrFunction); v.AsString() == "late" && dp.Sum != 3 {
				t.Errorf("timeout.duration sum = %v; want 3 (seconds the attempt really ran)", dp.Sum)
			}
		}
	})
}

func TestMetricsBulkhead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reader := withReader(t)
		base := collect(t, reader)
		b := mustBulkhead(t, BulkheadConfig{Name: "metrics-redis", Limit: 1, MaxQueue: 1})
		release := make(chan struct{})
		fn := Compose(func(context.Context) (int, error) { <-release; return 1, nil }, Stack[int]{Name: "get", Bulkhead: b})
		go fn(context.Background())
		go fn(context.Background())
		synctest.Wait()
		c := since(base, collect(t, reader))
		wantPoints(t, c, "resilience.bulkhead.active_operations", "gauge", "{call}", "resource_type=metrics-redis=1")
		wantPoints(t, c, "resilience.bulkhead.queue_depth", "gauge", "{call}", "resource_type=metrics-redis=1")
		if _, err := fn(context.Background()); !errors.Is(err, ErrBulkheadFull) {
			t.Fatalf("err = %v", err)
		}
		close(release)
		synctest.Wait()
		c = since(base, collect(t, reader))
		wantPoints(t, c, "resilience.bulkhead.rejections", "counter", "{call}", "function=get,resource_type=metrics-redis=1")
		wantPoints(t, c, "resilience.bulkhead.active_operations", "gauge", "{call}", "resource_type=metrics-redis=0")
		wantPoints(t, c, "resilience.bulkhead.queue_depth", "gauge", "{call}", "resource_type=metrics-redis=0")
		wantPoints(t, c, "resilience.calls", "observed counter", "{call}", "name=get,outcome=rejected=1", "name=get,outcome=success=2")
	})
}

func TestMetricsFallbacks(t *testing.T) {
	reader := withReader(t)
	base := collect(t, reader)
	ctx := context.Background()
	cache, _ := NewFallbackCache[int](FallbackCacheConfig{})
	cache.Store("k", 7)
	Compose(failFunc, Stack[int]{Name: "value", Fallback: FallbackValue(1)})(ctx)
	Compose(failFunc, Stack[int]{Name: "func", Fallback: func(context.Context, error) (int, error) { return 2, nil }})(ctx)
	Compose(failFunc, Stack[int]{Name: "cached", Fallback: cache.Fallback("k")})(ctx)
	Compose(failFunc, Stack[int]{Name: "stale", Fallback: cache.StaleFallback("k")})(ctx)
	Compose(failFunc, Stack[int]{Name: "miss", Fallback: cache.Fallback("none")})(ctx)
	open := FailOpen(func(context.Context) (bool, error) { return false, errBoom })
	open(ctx)
	empty := EmptyOnError(failFunc)
	empty(ctx)
	wrapped := cache.Wrap("k", func(context.Context) (int, error) { return 0, errBoom })
	wrapped(ctx)

	c := since(base, collect(t, reader))
	et := "error.type=*errors.errorString"
	wantPoints(t, c, "resilience.fallback.used", "observed counter", "{call}",
		et+",fallback_type=value,function=value=1",
		et+",fallback_type=function,function=func=1",
		et+",fallback_type=cached,function=cached=1",
		et+",fallback_type=stale,function=stale=1",
		et+",fallback_type=value,function="+unnamed+"=1",
		et+",fallback_type=empty,function="+namedFunc(failFunc)+"=1",
		et+",fallback_type=cached,function="+unnamed+"=1",
	)
	wantPoints(t, c, "resilience.fallback.cache_hits", "observed counter", "{call}",
		et+",function=cached=1", et+",function=stale=1", et+",function="+unnamed+"=1")
	for _, p := range c.points(t, "resilience.fallback.used", "observed counter", "{call}") {
		if strings.Contains(p, "function=miss") {
			t.Errorf("a cache miss was counted as a fallback used: %s", p)
		}
	}
	calls := c.points(t, "resilience.calls", "observed counter", "{call}")
	for _, want := range []string{"name=value,outcome=fallback=1", "name=stale,outcome=fallback=1", "name=miss,outcome=failure=1"} {
		if !slices.Contains(calls, want) {
			t.Errorf("resilience.calls lacks %q: %q", want, calls)
		}
	}
}

func TestErrorType(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{nil, ""},
		{&Error{Err: ErrTimeout}, "timeout"},
		{&Error{Err: ErrCircuitOpen}, "circuit_open"},
		{&Error{Err: ErrBulkheadFull}, "bulkhead_full"},
		{context.Canceled, "canceled"},
		{fmt.Errorf("x: %w", context.DeadlineExceeded), "deadline_exceeded"},
		{&Error{Err: ErrRetryExhausted, Cause: &VarError{}}, "*resilience.VarError"},
		{fmt.Errorf("wrapped: %w", Permanent(&VarError{})), "*resilience.VarError"},
		{fmt.Errorf("no wrap %v", 1), "*errors.errorString"},
		{errors.Join(errBoom), "*errors.joinError"},
	} {
		if got := errorType(tc.err); got != tc.want {
			t.Errorf("errorType(%v) = %q; want %q", tc.err, got, tc.want)
		}
	}
}

// Switching providers while calls are in flight is race-free and each call
// records into one provider or the other.
func TestSetMeterProviderWhileCalling(t *testing.T) {
	readers := []*sdkmetric.ManualReader{sdkmetric.NewManualReader(), sdkmetric.NewManualReader()}
	var mps []*sdkmetric.MeterProvider
	for _, r := range readers {
		mps = append(mps, sdkmetric.NewMeterProvider(sdkmetric.WithReader(r)))
	}
	t.Cleanup(func() {
		SetMeterProvider(nil)
		for _, mp := range mps {
			mp.Shutdown(context.Background())
		}
	})
	runtime.GC()                                            // see withReader
	name := fmt.Sprintf("switch-%d", time.Now().UnixNano()) // observed counters are cumulative: a name of its own
	cb := mustBreaker(t, CircuitBreakerConfig{Name: name, FailMax: 1 << 30})
	fn := Compose(okFunc, Stack[int]{Name: name, CircuitBreaker: cb, Bulkhead: mustBulkhead(t, BulkheadConfig{Name: name})})
	var wg sync.WaitGroup
	const callers, calls = 4, 500
	for range callers {
		wg.Go(func() {
			for range calls {
				fn(context.Background())
			}
		})
	}
	for i := range 50 {
		SetMeterProvider(mps[i%2])
	}
	wg.Wait()
	// Counters are cumulative and observed at collection: whichever
	// provider is current sees every call, none lost in the switching.
	c := collect(t, readers[1])
	wantPoints(t, c, "resilience.calls", "observed counter", "{call}", fmt.Sprintf("name=%s,outcome=success=%d", name, callers*calls))
	wantPoints(t, c, "resilience.circuit_breaker.successes", "observed counter", "{call}", fmt.Sprintf("service=%s=%d", name, callers*calls))
}

// A call whose function panics is a failed call in the metrics, and the
// panic goes on up.
func TestMetricsCountPanics(t *testing.T) {
	reader := withReader(t)
	base := collect(t, reader)
	fn := Compose(func(context.Context) (int, error) { panic("boom") }, Stack[int]{Name: "panicky"})
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v; want the panic", r)
			}
		}()
		fn(context.Background())
	}()
	c := since(base, collect(t, reader))
	wantPoints(t, c, "resilience.calls", "observed counter", "{call}", "name=panicky,outcome=failure=1")
}

// resilience.circuit_breaker.recovery_duration records the time from a
// breaker's leaving closed to its closing again: the original design's
// MTTR, one point per recovery.
func TestMetricsBreakerRecoveryDuration(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reader := withReader(t)
		name := uniqueName("metrics-recovery")
		cb := mustBreaker(t, CircuitBreakerConfig{Name: name, FailMax: 1, OpenTimeout: 10 * time.Second, DisableLogging: true})
		fail := true
		f := WithCircuitBreaker(func(context.Context) (int, error) {
			if fail {
				return 0, errors.New("down")
			}
			return 1, nil
		}, cb)
		f(context.Background()) // opens
		time.Sleep(25 * time.Second)
		f(context.Background()) // half-open, the probe fails: open again
		time.Sleep(11 * time.Second)
		fail = false
		f(context.Background()) // the probe succeeds: closed, 36s after the open
		cb.ForceOpen()
		time.Sleep(3 * time.Second)
		cb.Reset() // an operator's hold for maintenance: not timed
		fail = true
		f(context.Background()) // opens
		time.Sleep(time.Hour)
		cb.ForceClose() // an operator's word against the breaker: not timed
		cb.Reset()
		f(context.Background()) // opens
		time.Sleep(3 * time.Second)
		cb.Reset() // an operator's word that the downstream recovered: 3s
		var got []float64
		for _, dp := range collect(t, reader)["resilience.circuit_breaker.recovery_duration"].Data.(metricdata.Histogram[float64]).DataPoints {
			if v, _ := dp.Attributes.Value(attrService); v.AsString() == name {
				got = append(got, float64(dp.Count), dp.Sum)
			}
		}
		if want := []float64{2, 39}; !slices.Equal(got, want) {
			t.Errorf("recovery_duration of %s: count and sum %v, want %v (36s, and 3s to a Reset)", name, got, want)
		}
	})
}

// typedErr names its own error.type, as an adapter's error does.
type typedErr struct{ kind string }

func (e typedErr) Error() string     { return "typed: " + e.kind }
func (e typedErr) ErrorType() string { return e.kind }

func TestErrorTypeFromTheErrorsOwnMethod(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{typedErr{"grpc_unavailable"}, "grpc_unavailable"},
		{fmt.Errorf("wrapped: %w", typedErr{"grpc_aborted"}), "grpc_aborted"},
		{&Error{Err: ErrRetryExhausted, Cause: typedErr{"grpc_unavailable"}}, "grpc_unavailable"},
		{typedErr{""}, "resilience.typedErr"}, // empty: the type, as before
	} {
		if got := errorType(tc.err); got != tc.want {
			t.Errorf("errorType(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}
