package resilience

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// scripted serves the statuses in order (then 200), counting requests,
// the bodies it received and the connections opened.
type scripted struct {
	*httptest.Server
	mu       sync.Mutex
	statuses []int
	headers  []http.Header
	requests atomic.Int32
	bodies   []string
	conns    atomic.Int32
}

func newScripted(t *testing.T, statuses ...int) *scripted {
	t.Helper()
	s := &scripted{statuses: statuses}
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	s.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			s.conns.Add(1)
		}
	}
	s.Start()
	t.Cleanup(s.Close)
	return s
}

func (s *scripted) serve(w http.ResponseWriter, r *http.Request) {
	n := int(s.requests.Add(1)) - 1
	body, _ := io.ReadAll(r.Body)
	s.mu.Lock()
	s.bodies = append(s.bodies, string(body))
	code := http.StatusOK
	if n < len(s.statuses) {
		code = s.statuses[n]
	}
	if n < len(s.headers) {
		for k, v := range s.headers[n] {
			w.Header()[k] = v
		}
	}
	s.mu.Unlock()
	w.WriteHeader(code)
	io.WriteString(w, strings.Repeat("x", 1000)) // a body worth draining
	io.WriteString(w, "body-"+http.StatusText(code))
}

// transportRegistry builds a registry with fast retries for HTTP tests.
func transportRegistry(t *testing.T, env map[string]string) *Registry {
	t.Helper()
	full := map[string]string{"RETRY_MAX_ATTEMPTS": "3", "RETRY_EXPONENTIAL_MAX": "0.001", "TIMEOUT_DEFAULT": "5"}
	for k, v := range env {
		full[k] = v
	}
	return mustRegistry(t, full)
}

func client(reg *Registry, base http.RoundTripper) *http.Client {
	return &http.Client{Transport: &Transport{Registry: reg, Base: base}}
}

func get(t *testing.T, c *http.Client, url string) (*http.Response, string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the body: %v", err)
	}
	return resp, string(b)
}

func TestTransportRetriesStatuses(t *testing.T) {
	for _, code := range []int{408, 429, 500, 502, 503, 504} {
		srv := newScripted(t, code, code)
		reg := transportRegistry(t, nil)
		resp, body := get(t, client(reg, nil), srv.URL)
		if resp.StatusCode != 200 || !strings.HasSuffix(body, "body-OK") || srv.requests.Load() != 3 {
			t.Errorf("%d: got %d %q after %d requests; want 200 after 3", code, resp.StatusCode, body[len(body)-10:], srv.requests.Load())
		}
		// The drained bodies let one connection serve every attempt.
		if n := srv.conns.Load(); n != 1 {
			t.Errorf("%d: %d connections; want 1 (failed bodies drained and reused)", code, n)
		}
	}
}

func TestTransportClientErrorsNeitherRetriedNorCounted(t *testing.T) {
	srv := newScripted(t, 404, 400, 403, 409, 422)
	reg := transportRegistry(t, map[string]string{"CIRCUIT_BREAKER_DEFAULT_FAIL_MAX": "1"})
	c := client(reg, nil)
	for i, want := range []int{404, 400, 403, 409, 422} {
		resp, _ := get(t, c, srv.URL)
		if resp.StatusCode != want {
			t.Fatalf("request %d: %d; want %d", i, resp.StatusCode, want)
		}
	}
	if srv.requests.Load() != 5 {
		t.Errorf("%d requests; want 5 (4xx not retried)", srv.requests.Load())
	}
	if st := reg.CircuitBreaker("127.0.0.1").State(); st != StateClosed {
		t.Errorf("breaker %v after 4xx; want closed (the caller's bug, not the downstream's)", st)
	}
}

func TestTransport500NonIdempotent(t *testing.T) {
	srv := newScripted(t, 500, 500, 500)
	reg := transportRegistry(t, map[string]string{"CIRCUIT_BREAKER_DEFAULT_FAIL_MAX": "2"})
	c := client(reg, nil)
	resp, err := c.Post(srv.URL, "text/plain", strings.NewReader("pay"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 500 || srv.requests.Load() != 1 {
		t.Fatalf("POST: %d after %d requests; want the 500 after 1 (not retried)", resp.StatusCode, srv.requests.Load())
	}
	// Counted against the breaker all the same.
	if c := reg.CircuitBreaker("127.0.0.1").Counts(); c.ConsecutiveFailures != 1 {
		t.Fatalf("breaker counts %+v; want one failure", c)
	}
	// An Idempotency-Key opts in.
	req, _ := http.NewRequest(http.MethodPost, srv.URL, strings.NewReader("pay"))
	req.Header.Set("Idempotency-Key", "k1")
	resp, err = c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || srv.requests.Load() != 4 {
		t.Fatalf("POST with Idempotency-Key: %d after %d requests; want 200 after 4", resp.StatusCode, srv.requests.Load())
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	for i, b := range srv.bodies {
		if b != "pay" {
			t.Errorf("attempt %d body %q; want the body replayed whole", i, b)
		}
	}
}

func TestTransportExhaustedReturnsLastResponse(t *testing.T) {
	srv := newScripted(t, 503, 503, 503, 503)
	reg := transportRegistry(t, nil)
	resp, body := get(t, client(reg, nil), srv.URL)
	if resp.StatusCode != 503 || !strings.HasSuffix(body, "body-Service Unavailable") || srv.requests.Load() != 3 {
		t.Fatalf("%d after %d requests; want the last 503, readable, after 3", resp.StatusCode, srv.requests.Load())
	}
	if c := reg.CircuitBreaker("127.0.0.1").Counts(); c.TotalFailures != 1 {
		t.Errorf("breaker counts %+v; want one failure for the exhausted call", c)
	}
}

func TestTransportNonReplayableBodyNotRetried(t *testing.T) {
	srv := newScripted(t, 503)
	reg := transportRegistry(t, nil)
	req, _ := http.NewRequest(http.MethodPut, srv.URL, io.NopCloser(strings.NewReader("once")))
	req.GetBody = nil
	resp, err := client(reg, nil).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 503 || srv.requests.Load() != 1 {
		t.Fatalf("%d after %d requests; want 503 after 1", resp.StatusCode, srv.requests.Load())
	}
}

func TestTransportRetryAfter(t *testing.T) {
	for _, tc := range []struct {
		name, header string
		maxDelay     string
		wantRequests int32
		wantWait     time.Duration
		wantStatus   int
	}{
		{"zero retries at once", "0", "10", 2, 0, 200},
		{"past date retries at once", time.Now().Add(-time.Hour).UTC().Format(http.TimeFormat), "10", 2, 0, 200},
		{"seconds", "1", "10", 2, time.Second, 200},
		{"longer than MaxDelay ends the retries", "30", "10", 1, -1, 503},
		{"date beyond MaxDelay", time.Now().Add(time.Hour).UTC().Format(http.TimeFormat), "10", 1, -1, 503},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newScripted(t, 503)
			srv.headers = []http.Header{{"Retry-After": {tc.header}}}
			reg := transportRegistry(t, map[string]string{"RETRY_EXPONENTIAL_MAX": tc.maxDelay})
			var waits []time.Duration
			cfg := reg.Config()
			cfg.Retry.OnRetry = func(_ int, err error, d time.Duration) {
				var se *StatusError
				if !errors.As(err, &se) || se.StatusCode != 503 {
					t.Errorf("OnRetry err = %v; want a *StatusError 503", err)
				}
				waits = append(waits, d)
			}
			reg.Reload(cfg)
			start := time.Now()
			resp, _ := get(t, client(reg, nil), srv.URL)
			if resp.StatusCode != tc.wantStatus || srv.requests.Load() != tc.wantRequests {
				t.Fatalf("%d after %d requests; want %d after %d", resp.StatusCode, srv.requests.Load(), tc.wantStatus, tc.wantRequests)
			}
			if tc.wantWait >= 0 {
				if len(waits) != 1 || waits[0] != tc.wantWait {
					t.Fatalf("waits %v; want [%v]", waits, tc.wantWait)
				}
				if el := time.Since(start); el < tc.wantWait {
					t.Errorf("returned after %v; the wait of %v was not honoured", el, tc.wantWait)
				}
			}
		})
	}
}

func TestRetryAfterHeader(t *testing.T) {
	now := time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		v    string
		want time.Duration
		ok   bool
	}{
		{"", 0, false},
		{"5", 5 * time.Second, true},
		{" 7 ", 7 * time.Second, true},
		{"-1", 0, false},
		{"soon", 0, false},
		{"99999999999999999", 1<<63 - 1, true},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second, true},
		{now.Add(-time.Minute).Format(http.TimeFormat), 0, true},
	} {
		resp := &http.Response{Header: http.Header{"Retry-After": {tc.v}}}
		got, ok := retryAfterHeader(resp, now)
		if got != tc.want || ok != tc.ok {
			t.Errorf("Retry-After %q = %v, %v; want %v, %v", tc.v, got, ok, tc.want, tc.ok)
		}
	}
}

// The final body stays readable after RoundTrip returns, and the attempt's
// bulkhead slot is held until it is closed or read to the end.
func TestTransportBodyHoldsSlotUntilClosed(t *testing.T) {
	srv := newScripted(t)
	reg := transportRegistry(t, nil)
	c := client(reg, nil)
	b := reg.Bulkhead("127.0.0.1")
	resp, err := c.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if s := b.Stats(); s.Active != 1 {
		t.Fatalf("before the body is read Active = %d; want 1", s.Active)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil || !strings.HasSuffix(string(body), "body-OK") {
		t.Fatalf("body %q, %v; want it readable after RoundTrip returned", body, err)
	}
	if s := b.Stats(); s.Active != 0 {
		t.Fatalf("after reading to EOF Active = %d; want 0", s.Active)
	}
	resp.Body.Close() // a second release is harmless
	if s := b.Stats(); s.Active != 0 || s.Completed != 1 {
		t.Fatalf("Stats %+v; want the slot released once", s)
	}
	// Closed without reading: released too.
	resp, _ = c.Get(srv.URL)
	resp.Body.Close()
	if s := b.Stats(); s.Active != 0 {
		t.Fatalf("after Close Active = %d; want 0", s.Active)
	}
}

// The attempt's timeout covers streaming the body.
func TestTransportTimeoutCoversBody(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(200)
		io.WriteString(w, "start")
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(release)
	reg := transportRegistry(t, map[string]string{"TIMEOUT_DEFAULT": "0.2"})
	resp, err := client(reg, nil).Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(resp.Body)
	resp.Body.Close()
	if err == nil {
		t.Fatal("reading a body that outlives the attempt's timeout succeeded")
	}
}

func TestTransportNetworkErrors(t *testing.T) {
	// A refused dial never reached the server: a POST may be retried.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	reg := transportRegistry(t, nil)
	var attempts atomic.Int32
	counting := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		attempts.Add(1)
		return http.DefaultTransport.RoundTrip(r)
	})
	_, err := client(reg, counting).Post("http://"+addr, "text/plain", strings.NewReader("x"))
	if err == nil || attempts.Load() != 3 {
		t.Fatalf("POST to a closed port: %v after %d attempts; want an error after 3", err, attempts.Load())
	}

	// A reset after the request was read: a GET is retried, a POST is not.
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		conn, _, _ := w.(http.Hijacker).Hijack()
		conn.(*net.TCPConn).SetLinger(0)
		conn.Close()
	}))
	defer srv.Close()
	reg2 := transportRegistry(t, nil)
	if _, err := client(reg2, nil).Get(srv.URL); err == nil || hits.Load() != 3 {
		t.Fatalf("GET reset: %v after %d hits; want an error after 3", err, hits.Load())
	}
	hits.Store(0)
	if _, err := client(reg2, nil).Post(srv.URL, "text/plain", strings.NewReader("x")); err == nil || hits.Load() != 1 {
		t.Fatalf("POST reset: %v after %d hits; want an error after 1 (never sent twice)", err, hits.Load())
	}
}

func TestTransportBreakerOpen(t *testing.T) {
	srv := newScripted(t, 503, 503, 503)
	reg := transportRegistry(t, map[string]string{"CIRCUIT_BREAKER_DEFAULT_FAIL_MAX": "1"})
	c := client(reg, nil)
	get(t, c, srv.URL) // exhausted: opens the breaker
	_, err := c.Get(srv.URL)
	if !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("err = %v; want ErrCircuitOpen through url.Error", err)
	}
	if srv.requests.Load() != 3 {
		t.Fatalf("%d requests; want none while open", srv.requests.Load())
	}
	reg.CircuitBreaker("127.0.0.1").ForceClose()
	if resp, _ := get(t, c, srv.URL); resp.StatusCode != 200 {
		t.Fatalf("forced closed: %d", resp.StatusCode)
	}
}

func TestTransportServiceName(t *testing.T) {
	srv := newScripted(t, 503, 503, 503)
	reg := transportRegistry(t, map[string]string{"CIRCUIT_BREAKER_LLM_FAIL_MAX": "1"})
	tr := &Transport{Registry: reg, Service: func(*http.Request) string { return "llm" }}
	resp, err := (&http.Client{Transport: tr}).Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if reg.CircuitBreaker("llm").State() != StateOpen || reg.CircuitBreaker("127.0.0.1").State() != StateClosed {
		t.Fatal("the Service function did not choose the breaker")
	}
}

func TestTransportDisabledPassesThrough(t *testing.T) {
	srv := newScripted(t, 503)
	reg := transportRegistry(t, map[string]string{"RESILIENCE_ENABLED": "false"})
	resp, _ := get(t, client(reg, nil), srv.URL)
	if resp.StatusCode != 503 || srv.requests.Load() != 1 {
		t.Fatalf("%d after %d; want the 503 after 1", resp.StatusCode, srv.requests.Load())
	}
}

func TestTransportCallerCancel(t *testing.T) {
	srv := newScripted(t, 503, 503, 503)
	reg := transportRegistry(t, map[string]string{"RETRY_EXPONENTIAL_MAX": "10", "CIRCUIT_BREAKER_DEFAULT_FAIL_MAX": "1"})
	cfg := reg.Config()
	cfg.Retry.InitialDelay = 5 * time.Second
	reg.Reload(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL, nil)
	_, err := client(reg, nil).Do(req)
	if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrTimeout) {
		t.Fatalf("err = %v; want the caller's deadline", err)
	}
	if reg.CircuitBreaker("127.0.0.1").State() != StateClosed {
		t.Fatal("the caller's deadline counted against the breaker")
	}
}

func TestTransportHTTP2(t *testing.T) {
	var protos sync.Map
	var n atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		protos.Store(r.Proto, true)
		if n.Add(1) == 1 {
			w.WriteHeader(503)
			return
		}
		io.WriteString(w, "h2 ok")
	}))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	defer srv.Close()
	reg := transportRegistry(t, nil)
	c := client(reg, srv.Client().Transport)
	resp, err := c.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.ProtoMajor != 2 || string(body) != "h2 ok" || n.Load() != 2 {
		t.Fatalf("proto %s body %q after %d; want HTTP/2, h2 ok, after 2", resp.Proto, body, n.Load())
	}
	if _, ok := protos.Load("HTTP/2.0"); !ok {
		t.Fatal("the server saw no HTTP/2 request")
	}
}

func TestTransportBulkheadFull(t *testing.T) {
	hold := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-hold
	}))
	defer srv.Close()
	defer close(hold)
	reg := transportRegistry(t, map[string]string{"BULKHEAD_DEFAULT_LIMIT": "1", "BULKHEAD_DEFAULT_FAIL_FAST": "true", "RETRY_MAX_ATTEMPTS": "1"})
	c := client(reg, nil)
	go c.Get(srv.URL)
	for reg.Bulkhead("127.0.0.1").Stats().Active == 0 {
		time.Sleep(time.Millisecond) // polling a condition, not synchronising on time
	}
	_, err := c.Post(srv.URL, "text/plain", bytes.NewReader([]byte("x")))
	if !errors.Is(err, ErrBulkheadFull) {
		t.Fatalf("err = %v; want ErrBulkheadFull", err)
	}
}

// Regression tests for the bugs the three copies of the call chain grew
// (the pipeline issue); each failed on 76b51c8.

// trackedBody records whether it was closed.
type trackedBody struct {
	io.Reader
	closed atomic.Bool
}

func (b *trackedBody) Close() error { b.closed.Store(true); return nil }

func okResponse(r *http.Request, code int) *http.Response {
	return &http.Response{StatusCode: code, Header: http.Header{}, Body: io.NopCloser(strings.NewReader("body")), ContentLength: -1, Request: r}
}

// Bug 1: a panic in the base RoundTripper leaked the bulkhead slot for
// ever, so every later request got ErrBulkheadFull.
func TestTransportPanicInBaseGivesSlotBack(t *testing.T) {
	reg := transportRegistry(t, map[string]string{"BULKHEAD_DEFAULT_LIMIT": "1", "BULKHEAD_DEFAULT_FAIL_FAST": "true"})
	var calls atomic.Int32
	tr := &Transport{Registry: reg, Base: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if calls.Add(1) == 1 {
			panic("base bug")
		}
		return okResponse(r, http.StatusOK), nil
	})}
	req, _ := http.NewRequest(http.MethodGet, "http://panics.test/", nil)
	mustPanic(t, func() { tr.RoundTrip(req) })
	if a := reg.Bulkhead("panics.test").Stats().Active; a != 0 {
		t.Fatalf("%d slots held after the panic", a)
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatalf("next request: %v", err)
	}
	resp.Body.Close()
}

// Bug 1, the hook: a panicking OnRetry after a failing status leaked the
// slot the response body held.
func TestTransportPanicInOnRetryGivesSlotBack(t *testing.T) {
	cfg := DefaultConfig()
	cfg.DefaultBulkhead = BulkheadConfig{Limit: 1, FailFast: true}
	var hookPanics atomic.Bool
	hookPanics.Store(true)
	cfg.Retry = RetryConfig{MaxAttempts: 3, MaxDelay: time.Millisecond, OnRetry: func(int, error, time.Duration) {
		if hookPanics.Load() {
			panic("hook bug")
		}
	}}
	reg, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var body *trackedBody
	tr := &Transport{Registry: reg, Base: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		body = &trackedBody{Reader: strings.NewReader("busy")}
		return &http.Response{StatusCode: http.StatusServiceUnavailable, Header: http.Header{}, Body: body, Request: r}, nil
	})}
	req, _ := http.NewRequest(http.MethodGet, "http://hook.test/", nil)
	mustPanic(t, func() { tr.RoundTrip(req) })
	if a := reg.Bulkhead("hook.test").Stats().Active; a != 0 {
		t.Fatalf("%d slots held after OnRetry panicked", a)
	}
	if !body.closed.Load() {
		t.Error("the failed attempt's body was not closed")
	}
}

// Bug 2: a request rejected by the breaker or the bulkhead never had its
// body closed, which an http.RoundTripper must do on every path.
func TestTransportClosesBodyOnRejection(t *testing.T) {
	reg := transportRegistry(t, map[string]string{
		"BULKHEAD_FULL_TEST_LIMIT": "1", "BULKHEAD_FULL_TEST_FAIL_FAST": "true", "RETRY_MAX_ATTEMPTS": "1",
	})
	tr := &Transport{Registry: reg, Base: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		t.Error("base called for a rejected request")
		return nil, errBoom
	})}
	post := func(host string) (*trackedBody, error) {
		body := &trackedBody{Reader: strings.NewReader("payload")}
		req, _ := http.NewRequest(http.MethodPost, "http://"+host+"/", body)
		_, err := tr.RoundTrip(req)
		return body, err
	}
	reg.CircuitBreaker("open.test").ForceOpen()
	if body, err := post("open.test"); !errors.Is(err, ErrCircuitOpen) || !body.closed.Load() {
		t.Errorf("breaker open: err = %v, body closed %v; want ErrCircuitOpen and a closed body", err, body.closed.Load())
	}
	release, err := reg.Bulkhead("full.test").Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	if body, err := post("full.test"); !errors.Is(err, ErrBulkheadFull) || !body.closed.Load() {
		t.Errorf("bulkhead full: err = %v, body closed %v; want ErrBulkheadFull and a closed body", err, body.closed.Load())
	}
}

// Bug 3: a 101 Switching Protocols body was wrapped so that it was no
// longer an io.Writer, which broke WebSocket upgrades and
// httputil.ReverseProxy through Transport. A real upgrade on loopback.
func TestTransportSwitchingProtocolsBodyIsWriter(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
		brw.Flush()
		line, _ := brw.ReadString('\n')
		brw.WriteString("echo " + line)
		brw.Flush()
	}))
	defer srv.Close()
	reg := transportRegistry(t, nil)
	req, _ := http.NewRequest(http.MethodGet, srv.URL, nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "echo")
	resp, err := client(reg, nil).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %d", resp.StatusCode)
	}
	rwc, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		t.Fatalf("101 body %T is not an io.ReadWriteCloser", resp.Body)
	}
	if _, err := io.WriteString(rwc, "ping\n"); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len("echo ping\n"))
	if _, err := io.ReadFull(rwc, got); err != nil || string(got) != "echo ping\n" {
		t.Fatalf("read %q, %v; want the echo", got, err)
	}
	if a := reg.Bulkhead("127.0.0.1").Stats().Active; a != 1 {
		t.Errorf("%d slots held while the upgraded connection is open; want 1", a)
	}
	rwc.Close()
	if a := reg.Bulkhead("127.0.0.1").Stats().Active; a != 0 {
		t.Errorf("%d slots held after Close; want 0", a)
	}
}

// A response whose body is never closed held its slot for ever: one
// caller's bug became an outage. The slot now goes back at the attempt's
// timeout at the latest.
func TestTransportUnclosedBodyReleasesSlotAtTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := transportRegistry(t, map[string]string{"TIMEOUT_LEAKY_TEST": "2", "BULKHEAD_LEAKY_TEST_LIMIT": "1", "BULKHEAD_LEAKY_TEST_FAIL_FAST": "true"})
		tr := &Transport{Registry: reg, Base: roundTripFunc(func(r *http.Request) (*http.Response, error) {
			return okResponse(r, http.StatusOK), nil
		})}
		req, _ := http.NewRequest(http.MethodGet, "http://leaky.test/", nil)
		if _, err := tr.RoundTrip(req); err != nil { // the body is never closed
			t.Fatal(err)
		}
		b := reg.Bulkhead("leaky.test")
		time.Sleep(time.Second)
		if a := b.Stats().Active; a != 1 {
			t.Fatalf("%d slots held before the timeout; want 1: the body is still the downstream's work", a)
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if a := b.Stats().Active; a != 0 {
			t.Fatalf("%d slots held after the attempt's timeout; want 0", a)
		}
	})
}

// Bug 10: Transport ignored RetryConfig.RetryIf, returned the raw error when
// the budget refused a retry, and returned a bare ctx.Err() when the caller
// cancelled during a backoff wait. Now it runs the pipeline of ForService;
// the table of entry points covers each point, this runs it for Transport
// alone, by name.
func TestTransportRetryIfBudgetAndCancellationAsForService(t *testing.T) {
	tr := entryPoints[2]
	if tr.name != "Transport" {
		t.Fatalf("entryPoints[2] is %s", tr.name)
	}
	synctest.Test(t, func(t *testing.T) {
		down, n := failingDown(errBoom)
		reg := tableRegistry(t, "retryif", func(c *Config) { c.Retry.RetryIf = func(error) bool { return false } })
		if err := tr.call(context.Background(), reg, "retryif", down); !errors.Is(err, errBoom) || n.Load() != 1 {
			t.Errorf("RetryIf: err = %v after %d attempts; want 1", err, n.Load())
		}
		reg = tableRegistry(t, "budget", func(c *Config) { c.Retry.Budget = mustBudget(t, RetryBudgetConfig{Ratio: 0.1, MinPerSecond: -1}) })
		if err := tr.call(context.Background(), reg, "budget", down); !errors.Is(err, ErrRetryBudgetExhausted) {
			t.Errorf("budget: err = %v; want ErrRetryBudgetExhausted", err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		reg = tableRegistry(t, "cancel", func(c *Config) { c.Retry.OnRetry = func(int, error, time.Duration) { cancel() } })
		if err := tr.call(ctx, reg, "cancel", down); !errors.Is(err, context.Canceled) || !errors.Is(err, errBoom) {
			t.Errorf("cancel: err = %v; want context.Canceled with the last error", err)
		}
	})
}

// Retry-After-Ms, the millisecond hint of LLM providers, is honoured
// exactly, and preferred to Retry-After.
func TestTransportRetryAfterMs(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := transportRegistry(t, map[string]string{"RETRY_EXPONENTIAL_MAX": "10"})
		var calls atomic.Int32
		tr := &Transport{Registry: reg, Base: roundTripFunc(func(r *http.Request) (*http.Response, error) {
			if calls.Add(1) == 1 {
				resp := okResponse(r, http.StatusTooManyRequests)
				resp.Header.Set("Retry-After-Ms", "1250.5")
				resp.Header.Set("Retry-After", "9")
				return resp, nil
			}
			return okResponse(r, http.StatusOK), nil
		})}
		req, _ := http.NewRequest(http.MethodGet, "http://llm.test/", nil)
		start := time.Now()
		resp, err := tr.RoundTrip(req)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("resp %v, err %v", resp, err)
		}
		resp.Body.Close()
		if got, want := time.Since(start), 1250*time.Millisecond+500*time.Microsecond; got != want {
			t.Errorf("waited %v; want %v", got, want)
		}
	})
}

// Found in review of the pipeline change; it failed before the fix.
// A panic in OnRetry after the bulkhead turned the first attempt away
// (so base never got the request body) leaves the request body open:
// do() closes it only on the returning path.
func TestTransportPanicClosesUnsentBody(t *testing.T) {
	cfg := DefaultConfig()
	cfg.DefaultBulkhead = BulkheadConfig{Limit: 1, FailFast: true}
	cfg.Retry = RetryConfig{MaxAttempts: 3, MaxDelay: time.Millisecond, OnRetry: func(int, error, time.Duration) { panic("hook bug") }}
	reg, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	release, err := reg.Bulkhead("unsent.test").Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	tr := &Transport{Registry: reg, Base: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		t.Error("base called")
		return nil, errBoom
	})}
	body := &trackedBody{Reader: strings.NewReader("payload")}
	req, _ := http.NewRequest(http.MethodPost, "http://unsent.test/", body)
	mustPanic(t, func() { tr.RoundTrip(req) })
	if !body.closed.Load() {
		t.Error("request body not closed after the panic; a RoundTripper closes it on every path")
	}
}

// Loopback: a POST with an Idempotency-Key that gets two 503s is replayed
// through GetBody with its whole body each time, the 503 bodies are
// drained so that every attempt reuses the one connection, and the last
// body holds its slot until it is read to the end.
func TestTransportLoopbackReplayAndReuse(t *testing.T) {
	var n atomic.Int32
	var bodies []string
	var mu sync.Mutex
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		bodies = append(bodies, string(b))
		mu.Unlock()
		if n.Add(1) < 3 {
			w.Header().Set("Retry-After", "0")
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, strings.Repeat("x", 4096))
			return
		}
		io.WriteString(w, "done")
	}))
	var conns atomic.Int32
	srv.Config.ConnState = func(c net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	defer srv.Close()
	reg := transportRegistry(t, nil)
	c := client(reg, nil)
	defer c.CloseIdleConnections()
	req, _ := http.NewRequest(http.MethodPost, srv.URL, strings.NewReader("payload"))
	req.Header.Set("Idempotency-Key", "k1")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if a := reg.Bulkhead("127.0.0.1").Stats().Active; a != 1 {
		t.Errorf("%d slots held while the body is unread; want 1", a)
	}
	b, _ := io.ReadAll(resp.Body)
	if string(b) != "done" {
		t.Errorf("body %q", b)
	}
	if a := reg.Bulkhead("127.0.0.1").Stats().Active; a != 0 {
		t.Errorf("%d slots held after EOF; want 0", a)
	}
	resp.Body.Close()
	mu.Lock()
	defer mu.Unlock()
	if strings.Join(bodies, ",") != "payload,payload,payload" {
		t.Errorf("server saw bodies %q", bodies)
	}
	if conns.Load() != 1 {
		t.Errorf("%d connections for 3 attempts; want 1: failed bodies drained", conns.Load())
	}
}

// Found in review of the pipeline change; it failed before the fix.
// A base RoundTripper that breaks the contract with (nil, nil) makes
// Transport dereference the nil response after keep(): the caller gets a
// nil-pointer panic where http.Client would give an error, and the slot
// stays held until the attempt's timeout.
func TestTransportNilResponseFromBaseIsAnError(t *testing.T) {
	reg := transportRegistry(t, map[string]string{"BULKHEAD_NILRESP_TEST_LIMIT": "1", "BULKHEAD_NILRESP_TEST_FAIL_FAST": "true"})
	tr := &Transport{Registry: reg, Base: roundTripFunc(func(*http.Request) (*http.Response, error) { return nil, nil })}
	req, _ := http.NewRequest(http.MethodGet, "http://nilresp.test/", nil)
	var panicked any
	func() {
		defer func() { panicked = recover() }()
		tr.RoundTrip(req)
	}()
	if panicked != nil {
		t.Errorf("RoundTrip panicked: %v; want an error, as http.Client gives for (nil, nil)", panicked)
	}
	if a := reg.Bulkhead("nilresp.test").Stats().Active; a != 0 {
		t.Errorf("%d slots held after the call returned", a)
	}
}
