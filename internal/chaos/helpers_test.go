package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
)

// resultsMu serialises appends to the CHAOS_RESULTS file.
var resultsMu sync.Mutex

// runStarted names the run in CHAOS_RESULTS. It is read at start-up, as
// time.Now inside a synctest bubble is the bubble's fake time.
var runStarted = time.Now().UTC().Format(time.RFC3339)

// report logs a scenario's figures, given as name, value pairs in the order
// to print them, and appends them as one JSON line to the file named by
// CHAOS_RESULTS, if set, so docs/RELIABILITY.md can be filled from a run.
func report(t testing.TB, scenario string, kv ...any) {
	t.Helper()
	if len(kv)%2 != 0 {
		t.Fatalf("report(%q): odd number of arguments", scenario)
	}
	figs := make(map[string]any, len(kv)/2)
	for i := 0; i < len(kv); i += 2 {
		k := kv[i].(string)
		v := kv[i+1]
		if d, ok := v.(time.Duration); ok {
			// JSON gets milliseconds; the log gets the Duration.
			figs[k+"_ms"] = float64(d.Microseconds()) / 1000
		} else {
			figs[k] = v
		}
		t.Logf("%s: %s = %v", scenario, k, v)
	}
	path := os.Getenv("CHAOS_RESULTS")
	if path == "" {
		return
	}
	line, err := json.Marshal(map[string]any{
		"scenario": scenario,
		"race":     raceEnabled,
		"go":       runtime.Version(),
		"cpus":     runtime.NumCPU(),
		"run":      runStarted,
		"figures":  figs,
	})
	if err != nil {
		t.Fatalf("report(%q): %v", scenario, err)
	}
	resultsMu.Lock()
	defer resultsMu.Unlock()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatalf("CHAOS_RESULTS: %v", err)
	}
	defer f.Close()
	if _, err := f.Write(append(line, '\n')); err != nil {
		t.Fatalf("CHAOS_RESULTS: %v", err)
	}
}

// waitFor polls cond until it holds or timeout passes, and reports whether
// it held. It is a bounded poll of a condition, not a sleep standing in
// for one.
func waitFor(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
}

// percentile returns the q-th quantile (0 to 1) of sorted, by nearest rank.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func sortedCopy(ds []time.Duration) []time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s
}

// startDownstream starts a downstream and closes it when the test ends.
func startDownstream(t testing.TB, phases ...Phase) *Downstream {
	t.Helper()
	d, err := NewDownstream(phases...)
	if err != nil {
		t.Fatalf("NewDownstream: %v", err)
	}
	t.Cleanup(func() {
		d.Close()
		if err := d.Err(); err != nil {
			t.Errorf("downstream: %v", err)
		}
	})
	return d
}

// newClient returns an HTTP client with its own connection pool, closed
// when the test ends so that no connection goroutine outlives it.
func newClient(t testing.TB, timeout time.Duration) *http.Client {
	tr := &http.Transport{
		MaxIdleConns:        256,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     30 * time.Second,
		DisableCompression:  true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: timeout}
}

// Result is what a call to the downstream returns.
type Result struct {
	ID       string        // the request ID the downstream echoed
	Handling time.Duration // the downstream's own time on the request
	Fallback bool          // made by the fallback, not the downstream
}

// get returns a Func that GETs url with the request ID from ctx (see
// withID), honouring ctx. An answer other than 200 is a *StatusError.
func get(client *http.Client, url string) resilience.Func[Result] {
	return func(ctx context.Context) (Result, error) {
		return doGet(ctx, client, url)
	}
}

func doGet(ctx context.Context, client *http.Client, url string) (Result, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return Result{}, err
	}
	if id, ok := ctx.Value(idKey{}).(string); ok {
		req.Header.Set(HeaderRequestID, id)
	}
	resp, err := client.Do(req)
	if err != nil {
		return Result{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return Result{}, err
	}
	if resp.StatusCode != http.StatusOK {
		return Result{}, &StatusError{Code: resp.StatusCode}
	}
	ns, _ := strconv.ParseInt(resp.Header.Get(HeaderHandling), 10, 64)
	return Result{ID: string(body), Handling: time.Duration(ns)}, nil
}

type idKey struct{}

func withID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, idKey{}, id)
}

// typed reports whether err is one the caller can act on: one of the
// library's sentinels, the downstream's own error, or the caller's own
// cancellation.
func typed(err error) bool {
	for _, target := range []error{
		resilience.ErrCircuitOpen, resilience.ErrBulkheadFull, resilience.ErrTimeout,
		resilience.ErrRetryExhausted, resilience.ErrRetryBudgetExhausted, ErrDownstream,
		context.Canceled, context.DeadlineExceeded,
	} {
		if errors.Is(err, target) {
			return true
		}
	}
	return false
}

// errorKind names the first sentinel err matches, for counting outcomes.
func errorKind(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, resilience.ErrCircuitOpen):
		return "circuit_open"
	case errors.Is(err, resilience.ErrBulkheadFull):
		return "bulkhead_full"
	case errors.Is(err, resilience.ErrRetryBudgetExhausted):
		return "budget_exhausted"
	case errors.Is(err, resilience.ErrTimeout):
		return "timeout"
	case errors.Is(err, resilience.ErrRetryExhausted):
		return "retry_exhausted"
	case errors.Is(err, ErrDownstream):
		return "downstream"
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return "canceled"
	}
	return fmt.Sprintf("untyped(%T)", err)
}

// goroutines returns runtime.NumGoroutine once it has stopped falling, so
// that goroutines on their way out are not counted.
func goroutines() int {
	n := runtime.NumGoroutine()
	for range 50 {
		runtime.Gosched()
		time.Sleep(time.Millisecond)
		m := runtime.NumGoroutine()
		if m >= n {
			return m
		}
		n = m
	}
	return n
}

func heapInuse() uint64 {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

func round(f float64, places int) float64 {
	p := 1.0
	for range places {
		p *= 10
	}
	return float64(int64(f*p+0.5)) / p
}
