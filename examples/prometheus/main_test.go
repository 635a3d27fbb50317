package main

import (
	"context"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// client keeps no idle connections, so that no goroutine of its outlives a
// test for goleak to find.
var client = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// start runs the example on a free loopback port until the test ends and
// returns the URL of its /metrics.
func start(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	done := make(chan error, 1)
	go func() { done <- run(ctx, "127.0.0.1:0", ready) }()
	select {
	case url := <-ready:
		t.Cleanup(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("run: %v", err)
			}
		})
		return url
	case err := <-done:
		cancel()
		t.Fatalf("run returned before it was ready: %v", err)
	case <-time.After(10 * time.Second):
		cancel()
		<-done
		t.Fatal("run was not ready within 10s")
	}
	return ""
}

func get(url string) (string, error) {
	resp, err := client.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", &httpError{resp.StatusCode}
	}
	return string(body), nil
}

// instrument is one instrument of the root package's metrics.go, with the
// name and type the OpenTelemetry Prometheus exporter gives it.
type instrument struct {
	otelName, kind     string // kind: counter, observedCounter, gauge, histogram
	promName, promType string
}

// meterKinds are the kinds of the metric.Meter methods metrics.go may call
// directly, as it does for an instrument no helper makes (a float gauge).
var meterKinds = map[string]string{
	"Int64Counter": "counter", "Float64Counter": "counter",
	"Int64ObservableCounter": "observedCounter", "Float64ObservableCounter": "observedCounter",
	"Int64ObservableGauge": "gauge", "Float64ObservableGauge": "gauge",
	"Int64Gauge": "gauge", "Float64Gauge": "gauge",
	"Int64Histogram": "histogram", "Float64Histogram": "histogram",
}

// instruments reads the instruments from ../../metrics.go, where each is
// made by one of newInstruments' helpers, counter("name", ...) and the
// like, or by a direct call of the meter, m.Float64ObservableGauge("name",
// ..., metric.WithUnit("1")), so that an instrument added there is checked
// here without a change.
func instruments(t *testing.T) []instrument {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), "../../metrics.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var ins []instrument
	ast.Inspect(f, func(n ast.Node) bool {
		call, ok := n.(*ast.CallExpr)
		if !ok || len(call.Args) == 0 {
			return true
		}
		var kind string
		switch fn := call.Fun.(type) {
		case *ast.Ident:
			kind = fn.Name
		case *ast.SelectorExpr:
			kind = meterKinds[fn.Sel.Name]
		}
		if kind == "" {
			return true
		}
		lit, ok := call.Args[0].(*ast.BasicLit)
		if !ok || lit.Kind != token.STRING {
			return true
		}
		name, err := strconv.Unquote(lit.Value)
		if err != nil || !strings.HasPrefix(name, "resilience.") {
			return true
		}
		unit := ""
		if _, helper := call.Fun.(*ast.Ident); helper && len(call.Args) >= 3 {
			if u, ok := call.Args[2].(*ast.BasicLit); ok {
				unit, _ = strconv.Unquote(u.Value)
			}
		}
		for _, a := range call.Args[1:] { // a direct call's metric.WithUnit("1")
			if c, ok := a.(*ast.CallExpr); ok && len(c.Args) == 1 {
				if sel, ok := c.Fun.(*ast.SelectorExpr); ok && sel.Sel.Name == "WithUnit" {
					if u, ok := c.Args[0].(*ast.BasicLit); ok {
						unit, _ = strconv.Unquote(u.Value)
					}
				}
			}
		}
		if kind == "histogram" {
			unit = "s" // the helper sets it
		}
		// The exporter's default translation, UnderscoreEscapingWithSuffixes:
		// dots become underscores, a unit in braces is dropped, seconds
		// become a suffix, a gauge of unit 1 ends in _ratio, and a counter
		// ends in _total.
		in := instrument{otelName: name, kind: kind, promName: strings.ReplaceAll(name, ".", "_")}
		if unit == "s" {
			in.promName += "_seconds"
		}
		if unit == "1" && kind == "gauge" {
			in.promName += "_ratio"
		}
		switch kind {
		case "counter", "observedCounter":
			in.promType = "counter"
			in.promName += "_total"
		case "gauge":
			in.promType = "gauge"
		case "histogram":
			in.promType = "histogram"
		default:
			return true
		}
		ins = append(ins, in)
		return true
	})
	if len(ins) == 0 {
		t.Fatal("found no instruments in ../../metrics.go")
	}
	sort.Slice(ins, func(i, j int) bool { return ins[i].promName < ins[j].promName })
	return ins
}

var typeLine = regexp.MustCompile(`(?m)^# TYPE (\S+) (\S+)$`)

// families returns the metric families of an exposition, name to type.
func families(exposition string) map[string]string {
	fams := map[string]string{}
	for _, m := range typeLine.FindAllStringSubmatch(exposition, -1) {
		fams[m[1]] = m[2]
	}
	return fams
}

// TestMetricsEndpoint scrapes the example's /metrics, without Prometheus,
// until every instrument of metrics.go is there under its Prometheus name
// and type, with the labels the dashboard relies on.
func TestMetricsEndpoint(t *testing.T) {
	ins := instruments(t)
	labels := []string{
		`otel_scope_name="github.com/resilience-go/resilience"`,
		`error_type="timeout"`, `error_type="*main.httpError"`,
		// Breaker transitions both ways.
		`from="closed"`, `from="half-open"`, `from="open"`, `to="closed"`, `to="open"`, `to="half-open"`,
		`operation_type="auth"`, `resource_type="pricing-db"`,
		`fallback_type="cached"`, `outcome="success"`, `outcome="fallback"`,
		// The ratio triggers' thresholds, and the shadow breaker's state
		// and the calls it would have rejected.
		`trigger="failure_ratio"`, `trigger="slow_call_ratio"`, `mode="shadow"`,
		"resilience_call_duration_seconds_bucket{",
		"resilience_timeout_duration_seconds_bucket{",
		// The rate limiter's name, a wait it timed, and a call it
		// refused, which the fallback answered.
		`resilience_rate_limiter_wait_seconds_bucket{name="recommender"`,
		`error_type="rate_limited"`,
		// Rounds won by a hedge and by the first attempt beside one, and
		// a completion the backup answered after the primary failed.
		`hedged="true"`, `hedged="false"`,
		`resilience_failover_used_total{function="get_completion",index="1"`,
		// Page views the storefront shed (only Shed's counter has a
		// priority label); the search index's adaptive limit is checked
		// by TestAdaptiveLimit.
		`priority="0",resource_type="storefront"`,
		// The reviews' rehearsal: both kinds of fault, and the injected
		// errors as the failures' kind.
		`fault="error"`, `fault="latency"`, `error_type="chaos"`,
	}
	url := start(t)

	var missing []string
	deadline := time.Now().Add(20 * time.Second)
	for {
		body, err := get(url)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		fams := families(body)
		missing = missing[:0]
		for _, in := range ins {
			if got, ok := fams[in.promName]; !ok {
				missing = append(missing, in.promName)
			} else if got != in.promType {
				t.Fatalf("%s (%s) is a %s, want a %s", in.promName, in.otelName, got, in.promType)
			}
		}
		for _, l := range labels {
			if !strings.Contains(body, l) {
				missing = append(missing, l)
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if len(missing) > 0 {
		t.Fatalf("after 20s, /metrics lacks %s", strings.Join(missing, ", "))
	}
	for _, in := range ins {
		t.Logf("%-45s %-10s %s", in.promName, in.promType, in.otelName)
	}
}

// TestAdaptiveLimit scrapes the example's /metrics until the search
// index's adaptive limit has moved both ways: up from where it started,
// while the index is fast, and down by a quarter or more from its highest,
// while it reindexes.
func TestAdaptiveLimit(t *testing.T) {
	url := start(t)
	limit := regexp.MustCompile(`(?m)^resilience_bulkhead_limit\{[^}]*resource_type="search-index"[^}]*\} (\S+)$`)
	var seen []int
	high, fell := 0, false
	deadline := time.Now().Add(30 * time.Second)
	for !fell && time.Now().Before(deadline) {
		body, err := get(url)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		if m := limit.FindStringSubmatch(body); m != nil {
			n, err := strconv.Atoi(m[1])
			if err != nil {
				t.Fatalf("resilience_bulkhead_limit = %q, want an integer", m[1])
			}
			if len(seen) == 0 || seen[len(seen)-1] != n {
				seen = append(seen, n)
			}
			high = max(high, n)
			fell = high > searchStart && n <= high*3/4
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !fell {
		t.Fatalf("after 30s, the search-index limit went %v: want it above %d, then a quarter below its highest", seen, searchStart)
	}
	t.Logf("search-index limit: %v", seen)
}

// TestFallbackTypes checks that the fallbacks of Stack.Fallback are told
// apart: FallbackValue, FallbackCache.Fallback and StaleFallback.
func TestFallbackTypes(t *testing.T) {
	url := start(t)
	want := map[string]string{ // function: fallback_type
		"get_recommendations": "value",
		"get_quote":           "cached",
		"get_profile":         "stale",
	}
	used := regexp.MustCompile(`(?m)^resilience_fallback_used_total\{(.*)\} `)
	label := func(labels, name string) string {
		m := regexp.MustCompile(name + `="([^"]*)"`).FindStringSubmatch(labels)
		if m == nil {
			return ""
		}
		return m[1]
	}
	var seen map[string]map[string]bool
	deadline := time.Now().Add(20 * time.Second)
	for {
		body, err := get(url)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		seen = map[string]map[string]bool{}
		for _, m := range used.FindAllStringSubmatch(body, -1) {
			fn := label(m[1], "function")
			if seen[fn] == nil {
				seen[fn] = map[string]bool{}
			}
			seen[fn][label(m[1], "fallback_type")] = true
		}
		all := true
		for fn := range want {
			all = all && seen[fn] != nil
		}
		if all || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	var wrong []string
	for fn, kind := range want {
		if !seen[fn][kind] {
			wrong = append(wrong, fn+" has fallback_type "+strings.Join(keys(seen[fn]), ",")+", want "+kind)
		}
	}
	if len(wrong) == 0 {
		return
	}
	sort.Strings(wrong)
	t.Errorf("fallback_type: %s", strings.Join(wrong, "; "))
}

func keys(m map[string]bool) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	if len(ks) == 0 {
		return []string{"none"}
	}
	return ks
}
