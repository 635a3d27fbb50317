package resilience

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

// The admin endpoint's guards: Host, cross-origin, token, and the log of
// each action. Every test goes through a real loopback listener, so that
// the local address, the Host header and the remote address are what a
// server sees.

const testToken = "3f1c9e0b7a4d4c2e9b8f6a5d4c3b2a19"

// securedAdmin serves NewAdminHandler(cfg) for a registry whose llm
// breaker is open, with chaos allowed, and returns the registry, the
// server and the log the handler writes.
func securedAdmin(t *testing.T, cfg AdminConfig) (*Registry, *httptest.Server, *logBuffer) {
	t.Helper()
	reg := mustRegistry(t, map[string]string{"CIRCUIT_BREAKER_LLM_FAIL_MAX": "1", "RESILIENCE_CHAOS": "true"})
	WithCircuitBreaker(failFunc, reg.CircuitBreaker("llm"))(context.Background())
	reg.Bulkhead("llm")
	logs := &logBuffer{}
	cfg.Registry = reg
	cfg.Logger = slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv := httptest.NewServer(NewAdminHandler(cfg))
	t.Cleanup(srv.Close)
	return reg, srv, logs
}

// logBuffer is an io.Writer for a slog.JSONHandler that keeps each record.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

// records returns the records logged so far, decoded.
func (l *logBuffer) records(t *testing.T) []map[string]any {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	var recs []map[string]any
	for line := range strings.Lines(l.buf.String()) {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		recs = append(recs, m)
	}
	return recs
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// request is one request to the admin endpoint: host, if set, replaces the
// Host header; headers are added.
type request struct {
	method, path, host string
	headers            map[string]string
	body               string
}

func (rq request) do(t *testing.T, srv *httptest.Server) (int, http.Header, string) {
	t.Helper()
	var body io.Reader
	if rq.body != "" {
		body = strings.NewReader(rq.body)
	}
	req, err := http.NewRequest(rq.method, srv.URL+rq.path, body)
	if err != nil {
		t.Fatal(err)
	}
	if rq.host != "" {
		req.Host = rq.host
	}
	for k, v := range rq.headers {
		req.Header.Set(k, v)
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, string(b)
}

func bearerHeader(token string) map[string]string {
	return map[string]string{"Authorization": "Bearer " + token}
}

// jsonError returns the "error" of an error answer, failing the test if
// the body is not one.
func jsonError(t *testing.T, body string) string {
	t.Helper()
	var e struct {
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(body), &e); err != nil || e.Error == "" {
		t.Errorf("body %q is not a JSON error", body)
	}
	return e.Error
}

func TestAdminHostRebinding(t *testing.T) {
	reg, srv, logs := securedAdmin(t, AdminConfig{Hosts: []string{"Admin.Internal", "[::1]"}})
	hostport := func(h string) string { return net.JoinHostPort(h, "1234") }

	for _, tc := range []struct {
		host string
		ok   bool
	}{
		{srv.Listener.Addr().String(), true}, // the listener's address
		{"127.0.0.1", true},                  // without a port
		{hostport("127.0.0.1"), true},        // through a tunnel of another port
		{"localhost", true},
		{hostport("LocalHost"), true},
		{"admin.internal", true}, // configured, in another case
		{hostport("ADMIN.internal"), true},
		{"[::1]:9090", true}, // configured as an IP literal
		{"evil.example.com", false},
		{hostport("evil.example.com"), false},
		{"admin.internal.evil.example.com", false},
		{"localhost.evil.example.com", false},
		{"127.0.0.2", false}, // a loopback address, not the listener's
		{"10.0.0.1:80", false},
	} {
		for _, rq := range []request{
			{method: "GET", path: "/"},
			{method: "GET", path: "/breakers/llm"},
			{method: "POST", path: "/breakers/llm/open"},
		} {
			rq.host = tc.host
			code, _, body := rq.do(t, srv)
			if tc.ok && code != http.StatusOK {
				t.Errorf("%s %s with Host %q = %d %s; want 200", rq.method, rq.path, tc.host, code, body)
			}
			if !tc.ok {
				if code != http.StatusForbidden || !strings.Contains(jsonError(t, body), "not this listener's address") {
					t.Errorf("%s %s with Host %q = %d %s; want 403 and why", rq.method, rq.path, tc.host, code, body)
				}
				if strings.Contains(body, `"state"`) {
					t.Errorf("%s %s with Host %q leaked the status: %s", rq.method, rq.path, tc.host, body)
				}
			}
		}
		if !tc.ok && reg.CircuitBreaker("llm").Forced() {
			t.Fatalf("POST /breakers/llm/open with Host %q forced the breaker", tc.host)
		}
		reg.CircuitBreaker("llm").Reset()
	}
	if !strings.Contains(logs.String(), `"host":"evil.example.com"`) {
		t.Errorf("the refused rebinding is not in the log:\n%s", logs)
	}
}

// hostAllowed's cases that a TCP listener cannot show: no local address
// (a handler called directly), and a Unix socket, which no browser reaches.
func TestAdminHostWithoutTCP(t *testing.T) {
	a, err := newAdmin(AdminConfig{})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		local net.Addr
		host  string
		want  bool
	}{
		{nil, "localhost:9090", true},
		{nil, "127.0.0.1:9090", false}, // the listener's address is unknown
		{nil, "", false},
		{&net.UnixAddr{Name: "/run/admin.sock", Net: "unix"}, "anything", true},
		{&net.TCPAddr{IP: net.ParseIP("10.1.2.3"), Port: 9090}, "10.1.2.3:8080", true},
		{&net.TCPAddr{IP: net.ParseIP("::1"), Port: 9090}, "[::1]:9090", true},
		{&net.TCPAddr{IP: net.ParseIP("::1"), Port: 9090}, "[::2]:9090", false},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:127.0.0.1"), Port: 9090}, "127.0.0.1:9090", true}, // IPv4 on a dual-stack listener
		// A listener of another kind, known by its address's text only.
		{wrappedAddr("10.1.2.3:9090"), "10.1.2.3", true},
		{wrappedAddr("10.1.2.3:9090"), "10.1.2.4", false},
		{wrappedAddr("pipe"), "10.1.2.3", false},
	} {
		req := httptest.NewRequest("GET", "/", nil)
		req.Host = tc.host
		if tc.local != nil {
			req = req.WithContext(context.WithValue(req.Context(), http.LocalAddrContextKey, tc.local))
		}
		if got := a.hostAllowed(req); got != tc.want {
			t.Errorf("hostAllowed(Host %q, local %v) = %v; want %v", tc.host, tc.local, got, tc.want)
		}
	}
}

// wrappedAddr is the address of a listener that is not a *net.TCPListener,
// such as one a proxy library wraps: only its text says where it is.
type wrappedAddr string

func (a wrappedAddr) Network() string { return "wrapped" }
func (a wrappedAddr) String() string  { return string(a) }

func TestAdminCrossOrigin(t *testing.T) {
	reg, srv, logs := securedAdmin(t, AdminConfig{})
	cb := reg.CircuitBreaker("llm")
	for _, tc := range []struct {
		name    string
		headers map[string]string
		ok      bool
	}{
		{"cross-site", map[string]string{"Origin": "https://evil.example.com", "Sec-Fetch-Site": "cross-site"}, false},
		{"same-site", map[string]string{"Origin": "http://other.localhost", "Sec-Fetch-Site": "same-site"}, false},
		{"an old browser's other origin", map[string]string{"Origin": "https://evil.example.com"}, false},
		{"same-origin", map[string]string{"Origin": srv.URL, "Sec-Fetch-Site": "same-origin"}, true},
		{"an old browser's same origin", map[string]string{"Origin": srv.URL}, true},
		{"not a browser", nil, true},
	} {
		for _, path := range []string{"/breakers/llm/open", "/chaos/llm/on"} {
			code, _, body := request{method: "POST", path: path, headers: tc.headers}.do(t, srv)
			if tc.ok && code != http.StatusOK {
				t.Errorf("%s POST %s = %d %s; want 200", tc.name, path, code, body)
			}
			if !tc.ok && (code != http.StatusForbidden || !strings.Contains(jsonError(t, body), "cross-origin request refused")) {
				t.Errorf("%s POST %s = %d %s; want 403", tc.name, path, code, body)
			}
		}
		if forced, injecting := cb.Forced(), reg.Status().Chaos; !tc.ok && (forced || len(injecting) > 0 && injecting[0].Active) {
			t.Errorf("%s: a refused request forced the breaker (%v) or started chaos (%+v)", tc.name, forced, injecting)
		}
		cb.Reset()
		reg.StopChaos("llm")
	}
	// Reading stays open to every origin: a browser's CORS keeps another
	// site from reading the answer.
	if code, _, body := (request{method: "GET", path: "/", headers: map[string]string{"Sec-Fetch-Site": "cross-site"}}).do(t, srv); code != 200 {
		t.Errorf("cross-site GET / = %d %s; want 200", code, body)
	}
	if !strings.Contains(logs.String(), `"user_agent":"Go-http-client/1.1"`) || !strings.Contains(logs.String(), "cross-origin request refused") {
		t.Errorf("the refused cross-origin requests are not in the log:\n%s", logs)
	}
}

func TestAdminToken(t *testing.T) {
	reg, srv, logs := securedAdmin(t, AdminConfig{Token: testToken})
	cb := reg.CircuitBreaker("llm")
	routes := []request{
		{method: "GET", path: "/"},
		{method: "GET", path: "/", headers: map[string]string{"Accept": "application/json"}},
		{method: "GET", path: "/breakers"},
		{method: "GET", path: "/bulkheads"},
		{method: "GET", path: "/breakers/llm"},
		{method: "HEAD", path: "/breakers/llm"},
		{method: "POST", path: "/breakers/llm/open"},
		{method: "POST", path: "/breakers/llm/reset"},
		{method: "GET", path: "/chaos"},
		{method: "POST", path: "/chaos/llm/on"},
		{method: "POST", path: "/chaos/llm/off"},
		{method: "GET", path: "/nosuch"},
	}
	for _, tc := range []struct {
		name, authorization string
		want                int
		challenge           string
	}{
		{"no token", "", 401, `Bearer realm="resilience admin"`},
		{"another scheme", "Basic " + testToken, 401, `Bearer realm="resilience admin"`},
		{"a wrong token", "Bearer wrong", 401, `Bearer realm="resilience admin", error="invalid_token"`},
		{"the token and more", "Bearer " + testToken + "0", 401, `Bearer realm="resilience admin", error="invalid_token"`},
		{"a prefix of the token", "Bearer " + testToken[:len(testToken)-1], 401, `Bearer realm="resilience admin", error="invalid_token"`},
		{"the token in another case", "Bearer " + strings.ToUpper(testToken), 401, `Bearer realm="resilience admin", error="invalid_token"`},
		{"the token", "Bearer " + testToken, 200, ""},
		{"the token, scheme in lower case", "bearer " + testToken, 200, ""},
	} {
		for _, rq := range routes {
			if tc.authorization != "" {
				rq.headers = map[string]string{"Authorization": tc.authorization, "Accept": rq.headers["Accept"]}
			}
			code, h, body := rq.do(t, srv)
			want := tc.want
			if want == 200 && rq.path == "/nosuch" {
				want = 404
			}
			if code != want || h.Get("WWW-Authenticate") != tc.challenge {
				t.Errorf("%s: %s %s = %d WWW-Authenticate %q; want %d %q", tc.name, rq.method, rq.path, code, h.Get("WWW-Authenticate"), want, tc.challenge)
			}
			if code == 401 {
				if rq.method != "HEAD" {
					jsonError(t, body)
				}
				if strings.Contains(body, `"llm"`) {
					t.Errorf("%s: %s %s leaked the status: %s", tc.name, rq.method, rq.path, body)
				}
			}
		}
		if tc.want == 401 && (cb.State() != StateOpen || cb.Forced()) {
			t.Fatalf("%s: a refused request changed the breaker: %v forced=%v", tc.name, cb.State(), cb.Forced())
		}
		if tc.want == 200 && cb.State() != StateClosed {
			t.Errorf("%s: reset did not close the breaker", tc.name)
		}
		cb.ForceOpen()
		cb.Reset()
		WithCircuitBreaker(failFunc, cb)(context.Background())
	}
	if strings.Contains(logs.String(), testToken) || strings.Contains(logs.String(), testToken[:8]) {
		t.Errorf("the token is in the log:\n%s", logs)
	}
}

// tokenMatches is right whatever the lengths, and digestsEqual, which
// takes fixed-size arrays by its type, is the one comparison: what
// ConstantTimeCompare sees is always two 32-byte digests, so a token sent
// that shares a prefix with the right one, or has its length, is compared
// exactly as any other. Speed is not timed here: see digestsEqual.
func TestTokenMatches(t *testing.T) {
	want := sha256.Sum256([]byte(testToken))
	for _, sent := range []string{
		"", "3", testToken[:16], testToken[:len(testToken)-1], testToken + "0", testToken + testToken,
		"0" + testToken[1:], testToken[:len(testToken)-1] + "0", strings.Repeat("x", len(testToken)), strings.Repeat("x", 4096),
	} {
		if tokenMatches(&want, sent) {
			t.Errorf("tokenMatches(digest of %q, %q) = true", testToken, sent)
		}
	}
	if !tokenMatches(&want, testToken) {
		t.Errorf("tokenMatches(digest of %q, the same) = false", testToken)
	}
	a, b := sha256.Sum256([]byte("a")), sha256.Sum256([]byte("a"))
	if !digestsEqual(&a, &b) {
		t.Error("digestsEqual of two equal digests = false")
	}
	b[sha256.Size-1] ^= 1 // differ in the last byte only
	if digestsEqual(&a, &b) {
		t.Error("digestsEqual of digests differing in their last byte = true")
	}
}

// Every action is logged at Warn with its action, its breaker or service,
// the remote address and the user agent; a failed one with its error.
func TestAdminActionsLogged(t *testing.T) {
	_, srv, logs := securedAdmin(t, AdminConfig{Token: testToken})
	ua := map[string]string{"Authorization": "Bearer " + testToken, "User-Agent": "oncall-test/1.0"}
	for _, path := range []string{
		"/breakers/llm/open", "/breakers/LLM/close", "/breakers/llm/reset",
		"/chaos/llm/on", "/chaos/llm/off",
	} {
		if code, _, body := (request{method: "POST", path: path, headers: ua}).do(t, srv); code != 200 {
			t.Fatalf("POST %s = %d %s", path, code, body)
		}
	}
	// A bad body is an action that failed, logged with its error.
	if code, _, body := (request{method: "POST", path: "/chaos/llm/on", headers: ua, body: `{"error_rate": 2}`}).do(t, srv); code != 400 {
		t.Fatalf("POST /chaos/llm/on with error_rate 2 = %d %s; want 400", code, body)
	}
	// Reading is not an action.
	(request{method: "GET", path: "/breakers", headers: ua}).do(t, srv)

	want := []struct{ action, key, name, status string }{
		{"open", "breaker", "llm", "200"},
		{"close", "breaker", "llm", "200"},
		{"reset", "breaker", "llm", "200"},
		{"chaos_on", "service", "llm", "200"},
		{"chaos_off", "service", "llm", "200"},
		{"chaos_on", "service", "llm", "400"},
	}
	recs := logs.records(t)
	if len(recs) != len(want) {
		t.Fatalf("%d records; want %d:\n%s", len(recs), len(want), logs)
	}
	for i, w := range want {
		r := recs[i]
		remote, _ := r["remote_addr"].(string)
		if host, _, err := net.SplitHostPort(remote); err != nil || host != "127.0.0.1" {
			t.Errorf("record %d: remote_addr %q; want 127.0.0.1:port", i, remote)
		}
		if r["level"] != "WARN" || r["msg"] != "resilience: admin action" || r["action"] != w.action ||
			r[w.key] != w.name || r["user_agent"] != "oncall-test/1.0" || jsonNumber(r["status"]) != w.status {
			t.Errorf("record %d = %v; want WARN admin action %s %s=%s user_agent oncall-test/1.0 status %s",
				i, r, w.action, w.key, w.name, w.status)
		}
		if _, hasErr := r["error"]; hasErr != (w.status != "200") {
			t.Errorf("record %d = %v: error attribute %v; want it only for a failure", i, r, hasErr)
		}
	}
}

func jsonNumber(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// A bad configuration answers 500 with the error, logged once, and never
// shows the token.
func TestAdminConfigInvalid(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  AdminConfig
		want string
	}{
		{"a token with a trailing newline", AdminConfig{Token: testToken + "\n"}, "AdminConfig.Token"},
		{"a token with a space", AdminConfig{Token: "two words"}, "AdminConfig.Token"},
		{"a token not in ASCII", AdminConfig{Token: "mot-de-passe-é"}, "AdminConfig.Token"},
		{"a host with a port", AdminConfig{Hosts: []string{"admin.internal:9090"}}, "AdminConfig.Hosts"},
		{"a host as a URL", AdminConfig{Hosts: []string{"http://admin.internal"}}, "AdminConfig.Hosts"},
		{"an empty host", AdminConfig{Hosts: []string{""}}, "AdminConfig.Hosts"},
	} {
		logs := &logBuffer{}
		tc.cfg.Logger = slog.New(slog.NewJSONHandler(logs, nil))
		srv := httptest.NewServer(NewAdminHandler(tc.cfg))
		for range 3 {
			code, _, body := request{method: "GET", path: "/breakers"}.do(t, srv)
			if msg := jsonError(t, body); code != 500 || !strings.Contains(msg, tc.want) || (tc.cfg.Token != "" && strings.Contains(msg, strings.TrimSpace(tc.cfg.Token))) {
				t.Errorf("%s: GET /breakers = %d %s; want 500 naming %s, without the token", tc.name, code, body, tc.want)
			}
		}
		srv.Close()
		recs := logs.records(t)
		if len(recs) != 1 || recs[0]["level"] != "ERROR" || !strings.Contains(recs[0]["error"].(string), tc.want) {
			t.Errorf("%s: logged %v; want one error naming %s", tc.name, recs, tc.want)
		}
	}
}

// AdminHandler reads RESILIENCE_ADMIN_TOKEN and RESILIENCE_ADMIN_HOSTS
// once, when it is called.
func TestAdminHandlerEnvironment(t *testing.T) {
	reg := mustRegistry(t, nil)
	reg.CircuitBreaker("llm")
	t.Setenv(adminTokenEnv, testToken)
	t.Setenv(adminHostsEnv, " admin.internal, ops.example.com ,")
	srv := httptest.NewServer(AdminHandler(reg))
	defer srv.Close()
	t.Setenv(adminTokenEnv, "") // too late: read already

	if code, _, _ := (request{method: "GET", path: "/breakers"}).do(t, srv); code != 401 {
		t.Errorf("GET /breakers without the token = %d; want 401", code)
	}
	for _, host := range []string{"", "admin.internal:9090", "ops.example.com"} {
		if code, _, body := (request{method: "GET", path: "/breakers", host: host, headers: bearerHeader(testToken)}).do(t, srv); code != 200 {
			t.Errorf("GET /breakers with the token, Host %q = %d %s; want 200", host, code, body)
		}
	}
	if code, _, _ := (request{method: "GET", path: "/breakers", host: "evil.example.com", headers: bearerHeader(testToken)}).do(t, srv); code != 403 {
		t.Errorf("GET /breakers with Host evil.example.com = %d; want 403", code)
	}

	// Unset, as before tokens: no token needed.
	t.Setenv(adminTokenEnv, "")
	t.Setenv(adminHostsEnv, "")
	open := httptest.NewServer(AdminHandler(reg))
	defer open.Close()
	if code, _, body := (request{method: "GET", path: "/breakers"}).do(t, open); code != 200 {
		t.Errorf("GET /breakers with no RESILIENCE_ADMIN_TOKEN = %d %s; want 200", code, body)
	}
}
