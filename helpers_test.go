package resilience

import (
	"context"
	"errors"
	"net/http"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// Test helpers shared by the tests of several files.

var errBoom = errors.New("boom")

func mustBreaker(t testing.TB, cfg CircuitBreakerConfig) *CircuitBreaker {
	t.Helper()
	cb, err := NewCircuitBreaker(cfg)
	if err != nil {
		t.Fatalf("NewCircuitBreaker(%+v) = %v", cfg, err)
	}
	return cb
}

func okFunc(context.Context) (int, error) { return 1, nil }

func failFunc(context.Context) (int, error) { return 0, errBoom }

func mustBulkhead(t testing.TB, cfg BulkheadConfig) *Bulkhead {
	t.Helper()
	b, err := NewBulkhead(cfg)
	if err != nil {
		t.Fatalf("NewBulkhead(%+v) = %v", cfg, err)
	}
	return b
}

func mustRegistry(t testing.TB, env map[string]string) *Registry {
	t.Helper()
	cfg, err := LoadConfigWith(LoadOptions{Environment: env})
	if err != nil {
		t.Fatal(err)
	}
	r, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func mustRetry(t testing.TB, cfg RetryConfig) *Retry {
	t.Helper()
	r, err := NewRetry(cfg)
	if err != nil {
		t.Fatalf("NewRetry(%+v) = %v", cfg, err)
	}
	return r
}

// script returns a Func that returns errs[i] on call i (nil = success with
// value i+1) and counts its calls.
func script(errs ...error) (Func[int], *int) {
	n := new(int)
	return func(context.Context) (int, error) {
		i := *n
		*n++
		if i < len(errs) && errs[i] != nil {
			return 0, errs[i]
		}
		return i + 1, nil
	}, n
}

// withReader installs a ManualReader for the duration of a test.
func withReader(t *testing.T) *sdkmetric.ManualReader {
	t.Helper()
	// Observed counters sum every live policy and wrapper with the same
	// name; collect those of earlier runs (-count) first.
	runtime.GC()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	SetMeterProvider(mp)
	t.Cleanup(func() {
		SetMeterProvider(nil)
		mp.Shutdown(context.Background())
	})
	return reader
}

func counterValue(t *testing.T, reader *sdkmetric.ManualReader, name string) int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	for _, sm := range rm.ScopeMetrics {
		if sm.Scope.Name != ScopeName {
			continue
		}
		for _, m := range sm.Metrics {
			if m.Name != name {
				continue
			}
			var total int64
			for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
				total += dp.Value
			}
			return total
		}
	}
	return 0
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

var nameSeq atomic.Int64

// uniqueName returns prefix with a number no other call returned: metric
// sites live as long as the process, so a test that counts a site's calls
// needs a name of its own under -count.
func uniqueName(prefix string) string {
	return prefix + "-" + strconv.FormatInt(nameSeq.Add(1), 10)
}
