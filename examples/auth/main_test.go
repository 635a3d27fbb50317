package main

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/resilience-go/resilience"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestRun checks that the demo tells its story: each line below must appear,
// in this order.
func TestRun(t *testing.T) {
	var buf bytes.Buffer
	if err := run(&buf); err != nil {
		t.Fatalf("run: %v", err)
	}
	out := buf.String()
	want := []string{
		`-- openfga is up`,
		`call 1`,
		`  admin -> true  (openfga answered); breaker closed`,
		`  read  -> true  (openfga answered); breaker closed`,
		`-- outage: openfga answers 503 to every request`,
		`call 2`,
		// Fail-closed denies, fail-open allows: the point of the demo.
		`  admin -> false (fail-closed fallback: 3 attempts failed, last: HTTP 503); breaker closed`,
		`    log: level=WARN msg="circuit breaker open" service=openfga from=closed to=open fail_max=2 open_timeout=200ms open_period=200ms`,
		`  read  -> true  (fail-open fallback: 3 attempts failed, last: HTTP 503); breaker open`,
		`call 3`,
		`  admin -> false (fail-closed fallback: the breaker is open, openfga was not called); breaker open`,
		`  read  -> true  (fail-open fallback: the breaker is open, openfga was not called); breaker open`,
		`-- waiting for the breaker's open timeout`,
		`call 4`,
		`    log: level=INFO msg="circuit breaker half-open" service=openfga from=open to=half-open fail_max=2 open_timeout=200ms`,
		`    log: level=WARN msg="circuit breaker open" service=openfga from=half-open to=open fail_max=2 open_timeout=200ms open_period=200ms`,
		`  admin -> false (fail-closed fallback: 3 attempts failed, last: HTTP 503); breaker open`,
		`  read  -> true  (fail-open fallback: the breaker is open, openfga was not called); breaker open`,
		`-- openfga recovers`,
		`call 5`,
		`  admin -> false (fail-closed fallback: the breaker is open, openfga was not called); breaker open`,
		`call 6`,
		`    log: level=INFO msg="circuit breaker closed" service=openfga from=half-open to=closed fail_max=2 open_timeout=200ms`,
		`  admin -> true  (openfga answered); breaker closed`,
		`call 7`,
		`  read  -> true  (openfga answered); breaker closed`,
		`summary`,
		`  admin check, fail-closed: 3 calls answered by openfga, 4 denied by the fallback`,
		`  read  check, fail-open:   3 calls answered by openfga, 4 allowed by the fallback`,
		`  openfga: 15 requests, 6 answered`,
		`  breaker "openfga": closed`,
	}
	lines := strings.Split(out, "\n")
	i := 0
	for _, w := range want {
		for i < len(lines) && lines[i] != w {
			i++
		}
		if i == len(lines) {
			t.Fatalf("output lacks %q after the lines before it; output:\n%s", w, out)
		}
	}
	if n := strings.Count(out, "msg=\"circuit breaker "); n != 5 {
		t.Errorf("output has %d breaker log records; want 5 transitions:\n%s", n, out)
	}

	// Nothing that changes from run to run: no address, no colour, no time.
	for _, bad := range []string{"127.0.0.1", "\x1b[", "time="} {
		if strings.Contains(out, bad) {
			t.Errorf("output contains %q; output:\n%s", bad, out)
		}
	}
	var again bytes.Buffer
	if err := run(&again); err != nil {
		t.Fatalf("second run: %v", err)
	}
	if again.String() != out {
		t.Errorf("two runs printed different output:\n%s\n---\n%s", out, again.String())
	}
}

func TestCheck(t *testing.T) {
	tk := TupleKey{User: "user:alice", Relation: "admin", Object: "organization:acme"}
	fga, err := startFGA(map[TupleKey]bool{tk: true})
	if err != nil {
		t.Fatal(err)
	}
	defer fga.Close()
	transport := &http.Transport{}
	defer transport.CloseIdleConnections()
	c := &Client{BaseURL: fga.URL, StoreID: storeID, HTTP: &http.Client{Transport: transport}}
	ctx := t.Context()

	if ok, err := c.Check(ctx, tk); !ok || err != nil {
		t.Errorf("Check(%v) = %v, %v; want true, nil", tk, ok, err)
	}
	other := TupleKey{User: "user:bob", Relation: "admin", Object: "organization:acme"}
	if ok, err := c.Check(ctx, other); ok || err != nil {
		t.Errorf("Check(%v) = %v, %v; want false, nil", other, ok, err)
	}

	for _, tc := range []struct {
		name      string
		client    *Client
		tuple     TupleKey
		down      bool
		status    int
		retryable bool
	}{
		{"down", c, tk, true, http.StatusServiceUnavailable, true},
		{"unknown store", &Client{BaseURL: fga.URL, StoreID: "nosuch", HTTP: c.HTTP}, tk, false, http.StatusNotFound, false},
		{"incomplete tuple", c, TupleKey{User: "user:alice"}, false, http.StatusBadRequest, false},
	} {
		fga.down.Store(tc.down)
		_, err := tc.client.Check(ctx, tc.tuple)
		var se *StatusError
		if !errors.As(err, &se) || se.StatusCode != tc.status {
			t.Errorf("%s: Check() = %v; want a *StatusError with status %d", tc.name, err, tc.status)
			continue
		}
		if got := resilience.IsRetryable(err); got != tc.retryable {
			t.Errorf("%s: IsRetryable = %v; want %v", tc.name, got, tc.retryable)
		}
		if got := describe(err); got != "HTTP "+strconv.Itoa(tc.status) {
			t.Errorf("%s: describe = %q", tc.name, got)
		}
	}
	fga.down.Store(false)

	// A canceled context is the caller's, and says so.
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := c.Check(canceled, tk); !errors.Is(err, context.Canceled) {
		t.Errorf("Check with a canceled context = %v; want context.Canceled", err)
	}
}
