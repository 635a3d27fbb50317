package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/resilience-go/resilience"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fixture is a registry with one breaker opened by failures, one healthy
// breaker and one bulkhead with a call inside, served by AdminHandler on a
// loopback httptest server.
type fixture struct {
	reg      *resilience.Registry
	payments *resilience.CircuitBreaker
	url      string
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	cfg := resilience.DefaultConfig()
	cfg.DefaultCircuitBreaker = resilience.CircuitBreakerConfig{
		FailMax:        2,
		OpenTimeout:    time.Hour, // stays open for the whole test
		DisableLogging: true,
	}
	reg, err := resilience.NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	payments := reg.CircuitBreaker("payments")
	fail := resilience.WithCircuitBreaker(func(context.Context) (int, error) { return 0, errors.New("down") }, payments)
	for range 2 {
		fail(t.Context())
	}
	if got := payments.State(); got != resilience.StateOpen {
		t.Fatalf("payments breaker after 2 failures: %v; want open", got)
	}
	ok := resilience.WithCircuitBreaker(func(context.Context) (int, error) { return 1, nil }, reg.CircuitBreaker("auth"))
	ok(t.Context())

	release, err := reg.Bulkhead("llm").Acquire(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)

	srv := httptest.NewServer(resilience.AdminHandler(reg))
	t.Cleanup(srv.Close)
	return &fixture{reg: reg, payments: payments, url: srv.URL}
}

// cli runs the command with args against the environment env.
func cli(env map[string]string, args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = run(args, func(k string) string { return env[k] }, &out, &errb)
	return code, out.String(), errb.String()
}

// table splits a table's output into rows of fields.
func table(t *testing.T, out string) [][]string {
	t.Helper()
	var rows [][]string
	for line := range strings.Lines(out) {
		rows = append(rows, strings.Fields(line))
	}
	if len(rows) == 0 {
		t.Fatalf("no table in output %q", out)
	}
	return rows
}

// row returns the row of the table whose first field is name.
func row(t *testing.T, out, name string) []string {
	t.Helper()
	for _, r := range table(t, out)[1:] {
		if len(r) > 0 && r[0] == name {
			return r
		}
	}
	t.Fatalf("no row for %q in output:\n%s", name, out)
	return nil
}

func TestBreakers(t *testing.T) {
	f := newFixture(t)
	code, out, errs := cli(nil, "-addr", f.url, "breakers")
	if code != exitOK || errs != "" {
		t.Fatalf("breakers: exit %d, stderr %q; want 0 and nothing", code, errs)
	}
	rows := table(t, out)
	if got := strings.Join(rows[0], " "); got != breakersHeader {
		t.Errorf("header = %q; want %q", got, breakersHeader)
	}
	if len(rows) != 3 {
		t.Fatalf("breakers printed %d rows; want a header and 2 breakers:\n%s", len(rows), out)
	}
	// Sorted by name: auth, then payments.
	if rows[1][0] != "auth" || rows[2][0] != "payments" {
		t.Errorf("rows not sorted by name:\n%s", out)
	}
	p := rows[2]
	if p[1] != "open" || p[2] != "false" {
		t.Errorf("payments row = %q; want open, not forced", p)
	}
	since, err := time.Parse(time.RFC3339, p[3])
	if err != nil || time.Since(since) > time.Minute || time.Until(since) > time.Minute {
		t.Errorf("payments SINCE = %q (%v); want an RFC 3339 time near now", p[3], err)
	}
	// Counts are since the last change of state: zero once open. Neither
	// breaker has a ratio trigger, a slow-call trigger or a MaxOpenTimeout.
	if got := strings.Join(p[4:13], " "); got != "0 0 0 normal 0 0% - - 1h0m0s" {
		t.Errorf("payments counts, mode, window and open period = %q; want 0 0 0 normal 0 0%% - - 1h0m0s", got)
	}
	// Open for an hour: a probe in a little under that.
	if probe, err := time.ParseDuration(p[13]); err != nil || probe > time.Hour || probe < time.Hour-time.Minute {
		t.Errorf("payments PROBE_IN = %q; want a little under 1h", p[13])
	}
	if got := strings.Join(rows[1][4:], " "); got != "1 0 0 normal 1 0% - - 1h0m0s -" {
		t.Errorf("auth counts and the rest = %q; want 1 0 0 normal 1 0%% - - 1h0m0s -", got)
	}
}

const breakersHeader = "NAME STATE FORCED SINCE REQUESTS FAILURES CONSECUTIVE_FAILURES " +
	"MODE WINDOW_CALLS FAILURE_RATIO SLOW_CALLS SLOW_RATIO OPEN_PERIOD PROBE_IN"

// TestBreakersWindowAndMode prints breakers with a ratio and a slow-call
// trigger, an open period that doubled after a failed probe, and shadow
// mode. It runs in a synctest bubble, so that every time and duration is
// exact; the endpoint is served only once the bubble's clock no longer
// needs to move, since a server waiting on the network keeps it still.
func TestBreakersWindowAndMode(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := resilience.DefaultConfig()
		cfg.CircuitBreakers = map[string]resilience.CircuitBreakerConfig{
			"LLM": {
				FailureRatio: 0.5, MinimumThroughput: 10, SamplingWindow: 10 * time.Second,
				SlowCallDuration: time.Second, SlowCallRatio: 0.8,
				OpenTimeout: 8 * time.Second, MaxOpenTimeout: time.Minute, DisableLogging: true,
			},
			"PAYMENTS": {FailMax: 1, OpenTimeout: 8 * time.Second, MaxOpenTimeout: time.Minute, DisableLogging: true},
			"AUDIT":    {FailMax: 2, OpenTimeout: 5 * time.Second, Shadow: true, DisableLogging: true},
		}
		reg, err := resilience.NewRegistry(cfg)
		if err != nil {
			t.Fatal(err)
		}
		ctx := t.Context()
		failing := func(cb *resilience.CircuitBreaker) func(context.Context) (int, error) {
			return resilience.WithCircuitBreaker(func(context.Context) (int, error) { return 0, errors.New("down") }, cb)
		}
		succeeding := func(cb *resilience.CircuitBreaker, d time.Duration) func(context.Context) (int, error) {
			return resilience.WithCircuitBreaker(func(context.Context) (int, error) { time.Sleep(d); return 1, nil }, cb)
		}

		// payments opens at 0s for 8s; its probe fails at 8s: open for 16s.
		payments := reg.CircuitBreaker("payments")
		failing(payments)(ctx)
		time.Sleep(8*time.Second + 1)
		failing(payments)(ctx)

		// llm, built at 8s, from 8s to 12s: 10 calls, 3 failures, 2 slow (of 2s).
		llm := reg.CircuitBreaker("llm")
		for range 3 {
			failing(llm)(ctx)
		}
		for range 5 {
			succeeding(llm, 0)(ctx)
		}
		for range 2 {
			succeeding(llm, 2*time.Second)(ctx)
		}

		// audit, shadow, opens at 12s and still lets calls through.
		audit := reg.CircuitBreaker("audit")
		for range 2 {
			failing(audit)(ctx)
		}
		if _, err := succeeding(audit, 0)(ctx); err != nil {
			t.Errorf("a call through the open shadow breaker: %v", err)
		}

		srv := httptest.NewServer(resilience.AdminHandler(reg))
		defer srv.Close()
		code, out, errs := cli(nil, "-addr", srv.URL, "breakers")
		if code != exitOK || errs != "" {
			t.Fatalf("breakers: exit %d, stderr %q", code, errs)
		}
		var got []string
		for _, r := range table(t, out) {
			got = append(got, strings.Join(r, " "))
		}
		want := []string{
			breakersHeader,
			"audit open false 2000-01-01T00:00:12Z 0 0 0 shadow 0 0% - - 5s 5s",
			"llm closed false 2000-01-01T00:00:08Z 10 3 0 normal 10 30%/50% 2 20%/80% 8s/1m0s -",
			"payments open false 2000-01-01T00:00:08Z 0 0 0 normal 0 0% - - 16s/1m0s 12s",
		}
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Errorf("breakers printed\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}

		// An operator's open has no probe to wait for.
		code, out, _ = cli(nil, "-addr", srv.URL, "open", "payments")
		if got, want := strings.Join(row(t, out, "payments")[7:], " "), "normal 0 0% - - 16s/1m0s -"; code != exitOK || got != want {
			t.Errorf("open payments: exit %d, printed %q; want %q", code, got, want)
		}
	})
}

// An endpoint from before the mode, ratios and open period prints "-"
// for them.
func TestBreakerTableOlderEndpoint(t *testing.T) {
	body := `[{"name": "llm", "state": "closed", "forced": false, "since": "2024-05-01T10:00:00Z",
		"counts": {"requests": 4, "total_successes": 3, "total_failures": 1, "consecutive_successes": 0, "consecutive_failures": 1}}]`
	var out bytes.Buffer
	if err := printBreakers(&out, []byte(body)); err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Join(row(t, out.String(), "llm"), " "),
		"llm closed false 2024-05-01T10:00:00Z 4 1 1 - 0 0% - - - -"; got != want {
		t.Errorf("row = %q; want %q", got, want)
	}
}

func TestRatioCell(t *testing.T) {
	for _, tc := range []struct {
		now, threshold float64
		want           string
	}{
		{0, 0, "0%"},
		{0.3, 0.5, "30%/50%"},
		{1.0 / 3, 0.125, "33.3%/12.5%"},
		{1, 1, "100%/100%"},
		{2.0 / 3, 0, "66.7%"},
	} {
		if got := ratioCell(tc.now, tc.threshold); got != tc.want {
			t.Errorf("ratioCell(%v, %v) = %q; want %q", tc.now, tc.threshold, got, tc.want)
		}
	}
}

func TestBreakersJSON(t *testing.T) {
	f := newFixture(t)
	// Flags after the command work too.
	code, out, errs := cli(nil, "breakers", "-json", "-addr", f.url)
	if code != exitOK || errs != "" {
		t.Fatalf("breakers -json: exit %d, stderr %q", code, errs)
	}
	var bs []resilience.BreakerStatus
	if err := json.Unmarshal([]byte(out), &bs); err != nil {
		t.Fatalf("output is not the JSON of []BreakerStatus: %v\n%s", err, out)
	}
	if len(bs) != 2 || bs[1].Name != "payments" || bs[1].State != "open" {
		t.Errorf("breakers -json = %+v; want auth and payments (open)", bs)
	}
}

func TestBulkheads(t *testing.T) {
	f := newFixture(t)
	code, out, errs := cli(nil, "-addr", f.url, "bulkheads")
	if code != exitOK || errs != "" {
		t.Fatalf("bulkheads: exit %d, stderr %q", code, errs)
	}
	rows := table(t, out)
	if got, want := strings.Join(rows[0], " "), "NAME LIMIT ACTIVE WAITING REJECTED COMPLETED"; got != want {
		t.Errorf("header = %q; want %q", got, want)
	}
	// DefaultConfig gives llm a limit of 10; the fixture holds one slot.
	if got, want := strings.Join(row(t, out, "llm"), " "), "llm 10 1 0 0 0"; got != want {
		t.Errorf("llm row = %q; want %q", got, want)
	}

	code, out, _ = cli(nil, "-addr", f.url, "-json", "bulkheads")
	var bs []resilience.BulkheadStatus
	if code != exitOK || json.Unmarshal([]byte(out), &bs) != nil || len(bs) != 1 || bs[0].Active != 1 {
		t.Errorf("bulkheads -json: exit %d, output %q; want one bulkhead with one active call", code, out)
	}
}

// TestOperate drives a breaker through open, close and reset, and checks
// both the output and the breaker itself.
func TestOperate(t *testing.T) {
	f := newFixture(t)
	for _, tc := range []struct {
		cmd    string
		state  resilience.State
		forced bool
	}{
		{"close", resilience.StateClosed, true},
		{"open", resilience.StateOpen, true},
		{"reset", resilience.StateClosed, false},
	} {
		code, out, errs := cli(nil, "-addr", f.url, tc.cmd, "payments")
		if code != exitOK || errs != "" {
			t.Fatalf("%s payments: exit %d, stderr %q", tc.cmd, code, errs)
		}
		r := row(t, out, "payments")
		if r[1] != tc.state.String() || r[2] != boolString(tc.forced) {
			t.Errorf("%s payments printed %q; want state %v, forced %v", tc.cmd, r, tc.state, tc.forced)
		}
		if got := f.payments.State(); got != tc.state {
			t.Errorf("after %s: breaker state %v; want %v", tc.cmd, got, tc.state)
		}
		if got := f.payments.Forced(); got != tc.forced {
			t.Errorf("after %s: Forced() = %v; want %v", tc.cmd, got, tc.forced)
		}
	}

	// -json prints the breaker as the endpoint reports it.
	code, out, _ := cli(nil, "-addr", f.url, "-json", "open", "payments")
	var b resilience.BreakerStatus
	if code != exitOK || json.Unmarshal([]byte(out), &b) != nil || b.State != "open" || !b.Forced {
		t.Errorf("open -json: exit %d, output %q; want the forced-open breaker's JSON", code, out)
	}
}

func boolString(b bool) string {
	if b {
		return "true"
	}
	return "false"
}

func TestUnknownBreaker(t *testing.T) {
	f := newFixture(t)
	for _, cmd := range []string{"reset", "open", "close"} {
		code, out, errs := cli(nil, "-addr", f.url, cmd, "nosuch")
		if code != exitServer {
			t.Errorf("%s nosuch: exit %d; want %d", cmd, code, exitServer)
		}
		want := `resilience: no circuit breaker named "nosuch" (HTTP 404 from ` + f.url + ")\n"
		if errs != want || out != "" {
			t.Errorf("%s nosuch: stdout %q, stderr %q; want nothing and %q", cmd, out, errs, want)
		}
	}
	if f.payments.State() != resilience.StateOpen {
		t.Error("a command on an unknown breaker changed another one")
	}
}

func TestUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := "http://" + ln.Addr().String()
	ln.Close() // nothing listens there now: connections are refused

	code, out, errs := cli(nil, "-addr", addr, "breakers")
	if code != exitUnreachable || out != "" {
		t.Errorf("breakers against a closed port: exit %d, stdout %q; want %d and nothing", code, out, exitUnreachable)
	}
	if !strings.HasPrefix(errs, "resilience: cannot reach the admin endpoint at "+addr+": ") ||
		strings.Count(errs, "\n") != 1 {
		t.Errorf("stderr = %q; want one line saying the endpoint is unreachable", errs)
	}
}

func TestTimeout(t *testing.T) {
	// A server that never answers in time.
	block := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { <-block }))
	defer srv.Close()
	defer close(block)
	code, _, errs := cli(nil, "-addr", srv.URL, "-timeout", "50ms", "breakers")
	if code != exitUnreachable || !strings.Contains(errs, "cannot reach") {
		t.Errorf("breakers against a hanging server: exit %d, stderr %q; want %d", code, errs, exitUnreachable)
	}
}

func TestAddress(t *testing.T) {
	f := newFixture(t)
	hostport := strings.TrimPrefix(f.url, "http://")
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
	}{
		{"from the environment", map[string]string{addrEnv: f.url}, nil},
		{"without a scheme", map[string]string{addrEnv: hostport}, nil},
		{"with a trailing slash", nil, []string{"-addr", f.url + "/"}},
		{"-addr over the environment", map[string]string{addrEnv: "http://127.0.0.1:1"}, []string{"-addr", f.url}},
	} {
		code, out, errs := cli(tc.env, append(tc.args, "breakers")...)
		if code != exitOK || !strings.Contains(out, "payments") {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want the breakers", tc.name, code, out, errs)
		}
	}
}

func TestDefaultAddress(t *testing.T) {
	// With neither -addr nor the environment, the default is used: whether
	// or not something listens there, the message names it.
	code, _, errs := cli(nil, "-timeout", "1s", "breakers")
	if code == exitOK {
		t.Skip("something answers on the default address")
	}
	if !strings.Contains(errs, defaultAddr) {
		t.Errorf("stderr = %q; want it to name %s", errs, defaultAddr)
	}
}

func TestUsage(t *testing.T) {
	for _, args := range [][]string{
		nil,
		{"frobnicate"},
		{"breakers", "extra"},
		{"bulkheads", "extra"},
		{"reset"},
		{"open", "a", "b"},
		{"close", ""},
		{"-nosuchflag", "breakers"},
		{"-timeout", "soon", "breakers"},
		{"-timeout", "0s", "breakers"},
		{"-addr", "ftp://example.com", "breakers"},
		{"-addr", "http://", "breakers"},
		{"keys"},
		{"keys", "a", "b"},
		{"keys", "llm", "-limit", "0"},
		{"keys", "llm", "-limit", "ten"},
		{"-after", "t-a", "breakers"},
		{"reset", "llm", "-limit", "5"},
		{"reset-key", "llm"},
		{"reset-key", "llm", ""},
		{"reset-key", "", "t-a"},
		{"reset-key", "llm", "t-a", "t-b"},
	} {
		code, out, errs := cli(nil, args...)
		if code != exitUsage || out != "" {
			t.Errorf("%q: exit %d, stdout %q; want %d and nothing", args, code, out, exitUsage)
		}
		first, rest, _ := strings.Cut(errs, "\n")
		if !strings.HasPrefix(first, "resilience: ") || !strings.Contains(rest, "Usage: resilience") {
			t.Errorf("%q: stderr = %q; want one line saying what is wrong, then the usage", args, errs)
		}
	}

	code, out, _ := cli(nil, "-h")
	if code != exitOK || !strings.HasPrefix(out, "Usage: resilience") {
		t.Errorf("-h: exit %d, stdout %q; want 0 and the usage", code, out)
	}
}

func TestServerErrorText(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{`{"error": "no such path \"/x\""}`, `no such path "/x"`},
		{"<html>\n<body>Bad Gateway</body>\n</html>", "unexpected answer: <html> <body>Bad Gateway</body> </html>"},
		{"", "unexpected answer: empty answer"},
	} {
		if got := serverError([]byte(tc.body)); got != tc.want {
			t.Errorf("serverError(%q) = %q; want %q", tc.body, got, tc.want)
		}
	}
}

// TestBinary builds the command and runs it as a subprocess once, to prove
// that main wires run to the process's arguments, environment, output and
// exit status.
func TestBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a binary")
	}
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command in PATH")
	}
	f := newFixture(t)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	bin := filepath.Join(t.TempDir(), "resilience")
	if out, err := exec.CommandContext(ctx, gobin, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	cmd := exec.CommandContext(ctx, bin, "breakers")
	cmd.Env = append(cmd.Environ(), addrEnv+"="+f.url)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("resilience breakers: %v", err)
	}
	if r := row(t, string(out), "payments"); r[1] != "open" {
		t.Errorf("payments row = %q; want open", r)
	}

	cmd = exec.CommandContext(ctx, bin, "-addr", f.url, "reset", "nosuch")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != exitServer {
		t.Errorf("resilience reset nosuch: %v; want exit status %d", err, exitServer)
	}
	if !strings.Contains(stderr.String(), `no circuit breaker named "nosuch"`) {
		t.Errorf("stderr = %q; want the endpoint's error", stderr.String())
	}
}

// TestToken runs the command against an endpoint with a token: it works
// with RESILIENCE_ADMIN_TOKEN, and says what is wrong without it or with
// another.
func TestToken(t *testing.T) {
	const token = "c2f5a1e8d9b04f7a93e6d2c1b0a98765"
	f := newFixture(t)
	srv := httptest.NewServer(resilience.NewAdminHandler(resilience.AdminConfig{
		Registry: f.reg, Token: token, Logger: slog.New(slog.DiscardHandler),
	}))
	defer srv.Close()

	env := map[string]string{addrEnv: srv.URL, tokenEnv: token}
	code, out, errs := cli(env, "breakers")
	if code != exitOK || errs != "" || row(t, out, "payments")[1] != "open" {
		t.Fatalf("breakers with the token: exit %d, stdout %q, stderr %q; want the table", code, out, errs)
	}
	code, out, errs = cli(env, "reset", "payments")
	if code != exitOK || errs != "" || row(t, out, "payments")[1] != "closed" || f.payments.State() != resilience.StateClosed {
		t.Fatalf("reset with the token: exit %d, stdout %q, stderr %q, breaker %v; want it closed", code, out, errs, f.payments.State())
	}

	for _, tc := range []struct {
		name, token, want string
	}{
		{"without the token", "", "resilience: the admin endpoint wants a token: set RESILIENCE_ADMIN_TOKEN (HTTP 401 from " + srv.URL + ")\n"},
		{"with another token", token + "x", "resilience: the admin endpoint refused the token in RESILIENCE_ADMIN_TOKEN (HTTP 401 from " + srv.URL + ")\n"},
	} {
		for _, args := range [][]string{{"breakers"}, {"open", "payments"}} {
			code, out, errs := cli(map[string]string{addrEnv: srv.URL, tokenEnv: tc.token}, args...)
			if code != exitServer || out != "" || errs != tc.want {
				t.Errorf("%s, %q: exit %d, stdout %q, stderr %q; want %d, nothing and %q", tc.name, args, code, out, errs, exitServer, tc.want)
			}
		}
	}
	if f.payments.Forced() {
		t.Error("open without the token forced the breaker")
	}

	// A token read from a file with its newline is a usage error, not a
	// request the transport refuses as unreachable.
	code, _, errs = cli(map[string]string{addrEnv: srv.URL, tokenEnv: token + "\n"}, "breakers")
	if code != exitUsage || !strings.Contains(errs, "RESILIENCE_ADMIN_TOKEN must be printable ASCII") {
		t.Errorf("a token with a newline: exit %d, stderr %q; want %d and why", code, errs, exitUsage)
	}
}

// keyFixture is a registry whose service llm has the breakers of the keys
// in openKeys open, by a failure each, and that of the key ok closed,
// served by AdminHandler on a loopback httptest server.
type keyFixture struct {
	reg *resilience.Registry
	url string
}

// openKeys are the keys keyFixture opens, in the endpoint's order.
var openKeys = []string{"-dash", "eu west/1", "t-a", "t-b"}

func newKeyFixture(t *testing.T) *keyFixture {
	t.Helper()
	cfg := resilience.DefaultConfig()
	cfg.DefaultCircuitBreaker = resilience.CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Hour, DisableLogging: true}
	cfg.Retry.MaxAttempts = 1
	reg, err := resilience.NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	f := &keyFixture{reg: reg}
	for _, k := range openKeys {
		if ran, err := f.call(t, k, errors.New("down")); !ran || err == nil {
			t.Fatalf("the failing call under %q: ran %v, %v", k, ran, err)
		}
	}
	if _, err := f.call(t, "ok", nil); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(resilience.AdminHandler(reg))
	t.Cleanup(srv.Close)
	f.url = srv.URL
	return f
}

// call calls llm under key with a function that returns fail, and reports
// whether the function ran.
func (f *keyFixture) call(t *testing.T, key string, fail error) (ran bool, err error) {
	fn := func(context.Context) (int, error) { ran = true; return 0, fail }
	_, err = resilience.ForService(f.reg, "llm", fn)(resilience.WithKey(t.Context(), key))
	return ran, err
}

// column returns the first field of each row of a table, its header left
// out.
func column(t *testing.T, out string) []string {
	t.Helper()
	var col []string
	for _, r := range table(t, out)[1:] {
		col = append(col, r[0])
	}
	return col
}
