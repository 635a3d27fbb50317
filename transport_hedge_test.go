package resilience

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Transport's Check and hedging, against real loopback servers.

var errOverloaded = errors.New("model overloaded")

// overloadedBody rejects a response whose body says the model is
// overloaded, reading only the start of it.
func overloadedBody(resp *http.Response) error {
	buf := make([]byte, 32)
	n, _ := io.ReadFull(resp.Body, buf)
	if strings.Contains(string(buf[:n]), "overloaded") {
		return errOverloaded
	}
	return nil
}

func TestTransportCheckRetriesARejectedResponseAndKeepsThePassingBodyWhole(t *testing.T) {
	var n atomic.Int32
	long := strings.Repeat("the answer ", 1000)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1) == 1 {
			io.WriteString(w, `{"error":"overloaded"}`)
			return
		}
		io.WriteString(w, long)
	}))
	defer srv.Close()
	reg := transportRegistry(t, nil)
	c := &http.Client{Transport: &Transport{Registry: reg, Check: overloadedBody}}
	resp, err := c.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || string(body) != long {
		t.Errorf("body after the check read its start: %d bytes, %v; want the whole %d", len(body), err, len(long))
	}
	if n.Load() != 2 {
		t.Errorf("server saw %d requests, want 2: the overloaded answer retried", n.Load())
	}
	if s := reg.Bulkhead("127.0.0.1").Stats(); s.Active != 0 {
		t.Errorf("bulkhead active after the body was closed: %d", s.Active)
	}
}

func TestTransportCheckRejectedToTheEndReturnsTheError(t *testing.T) {
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		io.WriteString(w, `{"error":"overloaded"}`)
	}))
	defer srv.Close()
	reg := transportRegistry(t, map[string]string{"CIRCUIT_BREAKER_FAIL_MAX": "10"})
	c := &http.Client{Transport: &Transport{Registry: reg, Check: overloadedBody}}
	resp, err := c.Get(srv.URL)
	if err == nil {
		resp.Body.Close()
		t.Fatal("a response every attempt of which the check rejected was returned")
	}
	if !errors.Is(err, errOverloaded) || !errors.Is(err, ErrRetryExhausted) {
		t.Errorf("err = %v, want ErrRetryExhausted with the check's error", err)
	}
	if n.Load() != 3 {
		t.Errorf("server saw %d requests, want the 3 attempts", n.Load())
	}
	if c := reg.CircuitBreaker("127.0.0.1").Counts(); c.TotalFailures != 1 {
		t.Errorf("breaker failures = %d, want the call counted once", c.TotalFailures)
	}
	if s := reg.Bulkhead("127.0.0.1").Stats(); s.Active != 0 {
		t.Errorf("bulkhead active after the call: %d", s.Active)
	}
}

// hedgeServer answers GETs: the first request hangs until its client goes
// away, the others after 1ms. It counts requests by method, and the first
// request's disconnection.
type hedgeServer struct {
	*httptest.Server
	gets, posts atomic.Int32
	gone        chan struct{}
}

func newHedgeServer(t *testing.T) *hedgeServer {
	s := &hedgeServer{gone: make(chan struct{}, 1)}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		var n int32
		if r.Method == http.MethodPost {
			n = s.posts.Add(1)
		} else {
			n = s.gets.Add(1)
		}
		if n == 1 {
			select {
			case <-r.Context().Done():
				s.gone <- struct{}{}
				return
			case <-time.After(300 * time.Millisecond):
			}
		}
		io.WriteString(w, "answer "+r.Method)
	}))
	t.Cleanup(s.Close)
	return s
}

func hedgeClient(t *testing.T, srv *hedgeServer) (*http.Client, *Registry) {
	reg := transportRegistry(t, map[string]string{"HEDGE_API_DELAY": "0.02", "HEDGE_API_MAX": "1"})
	return &http.Client{Transport: &Transport{Registry: reg, Service: func(*http.Request) string { return "api" }}}, reg
}

func TestTransportHedgesIdempotentGet(t *testing.T) {
	srv := newHedgeServer(t)
	c, reg := hedgeClient(t, srv)
	start := time.Now()
	resp, err := c.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "answer GET" {
		t.Errorf("body %q", body)
	}
	if d := time.Since(start); d >= 300*time.Millisecond {
		t.Errorf("took %v: the hedge did not answer before the slow first attempt", d)
	}
	if srv.gets.Load() != 2 {
		t.Errorf("server saw %d GETs, want 2", srv.gets.Load())
	}
	select {
	case <-srv.gone:
	case <-time.After(5 * time.Second):
		t.Error("the losing request was never cancelled")
	}
	if s := reg.Bulkhead("api").Stats(); s.Active != 0 {
		t.Errorf("bulkhead active after the call: %d", s.Active)
	}
}

func TestTransportNeverHedgesPost(t *testing.T) {
	srv := newHedgeServer(t)
	c, _ := hedgeClient(t, srv)
	resp, err := c.Post(srv.URL, "text/plain", strings.NewReader("create"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if n := srv.posts.Load(); n != 1 {
		t.Errorf("a slow POST was sent %d times, want once", n)
	}
}

func TestTransportHedgesPostWithIdempotencyKey(t *testing.T) {
	srv := newHedgeServer(t)
	c, _ := hedgeClient(t, srv)
	req, _ := http.NewRequestWithContext(context.Background(), http.MethodPost, srv.URL, strings.NewReader("create"))
	req.Header.Set("Idempotency-Key", "k1")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "answer POST" || srv.posts.Load() != 2 {
		t.Errorf("body %q after %d POSTs, want the hedge's answer after 2", body, srv.posts.Load())
	}
}

func TestTransportClosesTheLosersResponse(t *testing.T) {
	var n atomic.Int32
	loser := &trackedBody{Reader: strings.NewReader("late answer")}
	base := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if n.Add(1) == 1 {
			// A base that ignores cancellation and answers late.
			time.Sleep(60 * time.Millisecond) // the slow answer under test
			return &http.Response{StatusCode: 200, Body: loser, ContentLength: -1, Request: r}, nil
		}
		return &http.Response{StatusCode: 200, Body: io.NopCloser(strings.NewReader("hedge answer")), ContentLength: -1, Request: r}, nil
	})
	reg := transportRegistry(t, map[string]string{"HEDGE_API_DELAY": "0.01"})
	c := &http.Client{Transport: &Transport{Registry: reg, Base: base, Service: func(*http.Request) string { return "api" }}}
	resp, err := c.Get("http://api.invalid/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "hedge answer" {
		t.Errorf("body %q, want the hedge's", body)
	}
	if !loser.closed.Load() {
		t.Error("the losing attempt's response was not closed by the time the call returned")
	}
	if s := reg.Bulkhead("api").Stats(); s.Active != 0 {
		t.Errorf("bulkhead active after the call: %d", s.Active)
	}
}
