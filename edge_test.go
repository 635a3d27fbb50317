package resilience

import (
	"context"
	"io"
	"net/http"
	"os/exec"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

var nestedCalls atomic.Int64

// nestedDown fails its first two calls of every three.
func nestedDown(context.Context) (int, error) {
	if nestedCalls.Add(1)%3 != 0 {
		return 0, errBoom
	}
	return 1, nil
}

// Bug 8 of the pipeline issue: hand-nested wrappers, the README's own
// advice for another order, recorded one call in resilience.calls per layer
// and per attempt: one call with two retries was recorded 4 times.
func TestNestedWrappersRecordOneCall(t *testing.T) {
	reader := withReader(t)
	base := collect(t, reader)
	nestedCalls.Store(0)
	r := mustRetry(t, RetryConfig{MaxAttempts: 3, Strategy: RetryFixed, InitialDelay: time.Nanosecond, MaxDelay: time.Nanosecond})
	cb := mustBreaker(t, CircuitBreakerConfig{Name: "nested-cb"})
	fn := WithCircuitBreaker(WithRetry(WithTimeout(nestedDown, time.Minute), r), cb)
	if _, err := fn(context.Background()); err != nil {
		t.Fatal(err)
	}
	name := namedFunc(nestedDown)
	c := since(base, collect(t, reader))
	wantPoints(t, c, "resilience.calls", "observed counter", "{call}", "name="+name+",outcome=success=1")
	var durations uint64
	for _, p := range c.points(t, "resilience.call.duration", "histogram", "s") {
		if strings.Contains(p, "name="+name+",") {
			durations++
		}
	}
	if durations != 1 {
		t.Errorf("resilience.call.duration has %d series for %s; want one", durations, name)
	}
	// The inner wrappers still record when called on their own.
	inner := WithTimeout(nestedDown, time.Minute)
	base = collect(t, reader)
	nestedCalls.Store(2)
	inner(context.Background())
	wantPoints(t, since(base, collect(t, reader)), "resilience.calls", "observed counter", "{call}", "name="+name+",outcome=success=1")
}

// A protected call made inside a protected function, with its context, is
// a call of its own: the mark an edge leaves for the Func it wraps is not
// read by other protected calls further down.
func TestProtectedCallInsideProtectedCallIsRecorded(t *testing.T) {
	reg := mustRegistry(t, nil)
	tr := &Transport{Registry: reg, Base: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		return okResponse(r, http.StatusOK), nil
	})}
	outer := WithRetry(WithTimeout(func(ctx context.Context) (int, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://inner-downstream.test/", nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		_, err = ForService(reg, "inner-service", okFunc)(ctx)
		return 1, err
	}, time.Minute), reg.Retry())
	before := callsRecorded("inner-downstream.test")["success"] + callsRecorded("inner-service")["success"]
	if _, err := outer(context.Background()); err != nil {
		t.Fatal(err)
	}
	after := callsRecorded("inner-downstream.test")["success"] + callsRecorded("inner-service")["success"]
	if after-before != 2 {
		t.Errorf("recorded %d inner calls; want 2, one per downstream", after-before)
	}
}

// Bug 9: default metric names came from the compiler's closure names, so
// two unrelated stacks built the same way shared a name, and the same code
// was named differently with -gcflags=-l or under PGO. The same program,
// built both ways, must name its calls alike, and never after a closure.
func TestMetricNamesStableUnderInlining(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a program twice")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Fatal(err)
	}
	run := func(flags ...string) string {
		t.Helper()
		args := append(append([]string{"run"}, flags...), "./testdata/names")
		out, err := exec.Command(goTool, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	plain, noInline := run(), run("-gcflags=-l")
	if plain != noInline {
		t.Fatalf("names differ with -gcflags=-l:\n%s\nwithout:\n%s", noInline, plain)
	}
	want := []string{"auth 1", "explicit 1", "llm 1", "main.client.Generate-fm 1", "main.fetch 1", "unnamed 1"}
	if got := strings.Fields(strings.ReplaceAll(plain, " ", "_")); !slices.Equal(got, underscored(want)) {
		t.Errorf("names:\n%s\nwant:\n%s", plain, strings.Join(want, "\n"))
	}
}

func underscored(s []string) []string {
	out := make([]string, len(s))
	for i, v := range s {
		out[i] = strings.ReplaceAll(v, " ", "_")
	}
	return out
}

func TestStableNameRule(t *testing.T) {
	cb := mustBreaker(t, CircuitBreakerConfig{Name: "cb"})
	b := mustBulkhead(t, BulkheadConfig{Name: "bh"})
	closure := func(context.Context) (int, error) { return 0, nil }
	for _, tc := range []struct {
		explicit string
		fn       any
		cb       *CircuitBreaker
		b        *Bulkhead
		want     string
	}{
		{"x", closure, cb, b, "x"},
		{"", okFunc, cb, b, namedFunc(okFunc)},
		{"", closure, cb, b, "cb"},
		{"", closure, nil, b, "bh"},
		{"", closure, nil, nil, unnamed},
	} {
		if got := stableName(tc.explicit, tc.fn, nil, tc.cb, tc.b); got != tc.want {
			t.Errorf("stableName(%q, ...) = %q; want %q", tc.explicit, got, tc.want)
		}
	}
	if got := namedFunc(okFunc); got != "github.com/resilience-go/resilience.okFunc" {
		t.Errorf("namedFunc(okFunc) = %q", got)
	}
	for _, s := range []string{"main.main.func1", "pkg.F.func2.3", "pkg.glob..func1", "pkg.(*T).M.func1", "pkg.F-range1", "pkg.F[...].func1"} {
		if !isClosureName(s) {
			t.Errorf("isClosureName(%q) = false", s)
		}
	}
	for _, s := range []string{"main.fetch", "pkg.(*T).M-fm", "pkg.F[...]", "pkg.funcs", "pkg.(*T).function"} {
		if isClosureName(s) {
			t.Errorf("isClosureName(%q) = true", s)
		}
	}
}

// Found in review of the pipeline change; it failed before the fix.
// A disabled registry's ForService passes the call straight to fn, but
// not the nesting mark: when an outer wrapper records the call and fn is a
// protected Func, fn records it a second time.
func TestDisabledEdgePassesNestingMarkOn(t *testing.T) {
	const name = "disabled-nested"
	reg := mustRegistry(t, map[string]string{"RESILIENCE_ENABLED": "false"})
	inner := Compose(func(context.Context) (int, error) { return 1, nil }, Stack[int]{Name: name, Timeout: time.Minute})
	fn := WithFallback(ForService(reg, name, inner), func(context.Context, error) (int, error) { return 0, nil })
	before := callsRecorded(name)["success"]
	if _, err := fn(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := callsRecorded(name)["success"] - before; got != 1 {
		t.Errorf("one call through WithFallback(ForService(disabled, Compose(...))) recorded %d times; want 1", got)
	}
}

// Found in review of the pipeline change; it failed before the fix.
// The nesting mark an outer edge leaves for the Func it wraps is still in
// the context that Func passes to its own fn, so a call of the same
// protected Func made from inside it (a paginating or re-authenticating
// client) is taken for the wrapped call and not recorded at all. The same
// code without the outer wrapper records it.
func TestRecursiveProtectedCallIsRecorded(t *testing.T) {
	const name = "recursive"
	var page Func[int]
	depth := 0
	page = Compose(func(ctx context.Context) (int, error) {
		if depth == 0 {
			depth++
			return page(ctx) // the next page, through the same protected call
		}
		return 1, nil
	}, Stack[int]{Name: name})

	before := callsRecorded(name)["success"]
	if _, err := page(context.Background()); err != nil {
		t.Fatal(err)
	}
	plain := callsRecorded(name)["success"] - before

	depth = 0
	wrapped := WithTimeout(page, time.Minute)
	before = callsRecorded(name)["success"]
	if _, err := wrapped(context.Background()); err != nil {
		t.Fatal(err)
	}
	nested := callsRecorded(name)["success"] - before
	if plain != 2 || nested != plain {
		t.Errorf("two protected calls recorded %d times on their own and %d times under WithTimeout; want 2 both ways", plain, nested)
	}
}

// A wrapper around a protected Func whose own name is "unnamed" falls
// through to namedFunc(fn), and fn is the inner edge's method value: the
// metric name becomes the compiler's wrapper name
// "github.com/resilience-go/resilience.(*edge[...]).call-fm", shared by
// every such stack, instead of the breaker's name or "unnamed".
func TestNestedNamesNeverAdapterMethods(t *testing.T) {
	cb := mustBreaker(t, CircuitBreakerConfig{Name: "payments"})
	closure := func(context.Context) (int, error) { return 1, nil }
	for _, tc := range []struct {
		fn   Func[int]
		want string
	}{
		{WithTimeout(WithRetry(closure, mustRetry(t, RetryConfig{})), time.Minute), unnamed},
		{Compose(WithTimeout(closure, time.Minute), Stack[int]{CircuitBreaker: cb}), "payments"},
	} {
		m := lookupEdge(tc.fn)
		if m == nil {
			t.Fatal("not an edge")
		}
		if m.name != tc.want {
			t.Errorf("metric name %q; want %q", m.name, tc.want)
		}
	}
}

// Found in the second review of the pipeline change (concurrency); it
// failed before the fix.
// A disabled registry's ForService around a Compose stack: ForService
// passes the call straight through but leaves its nesting mark in the
// context, so the Compose stack, whose own policies act (its retry ran
// three attempts here), takes itself for a wrapped call and records
// nothing. The call disappears from resilience.calls; without ForService
// around it, or with the registry enabled, it is recorded once.
func TestDisabledEdgeAroundStackRecordsTheCall(t *testing.T) {
	const name = "disabled-outer"
	reg := mustRegistry(t, map[string]string{"RESILIENCE_ENABLED": "false"})
	attempts := 0
	inner := Compose(func(context.Context) (int, error) {
		attempts++
		return 0, errBoom
	}, Stack[int]{Name: name, Retry: mustRetry(t, RetryConfig{MaxAttempts: 3, InitialDelay: time.Nanosecond, MaxDelay: time.Nanosecond})})
	fn := ForService(reg, "disabled-svc", inner)
	before := callsRecorded(name)["failure"]
	if _, err := fn(context.Background()); err == nil {
		t.Fatal("want an error")
	}
	got := callsRecorded(name)["failure"] - before
	if attempts != 3 || got != 1 {
		t.Errorf("one call through ForService(disabled, Compose(retry)) made %d attempts and was recorded %d times; want 3 attempts, recorded once", attempts, got)
	}
}
