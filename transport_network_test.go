package resilience

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Transport against real loopback servers, HTTP/1.1 and HTTP/2.

// waitFor polls cond for at most d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", d, what)
		}
		time.Sleep(time.Millisecond) // polling a condition
	}
}

// streamServer streams chunks slowly until the client goes away.
func streamServer(t *testing.T, h2 bool, chunk time.Duration) *httptest.Server {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(200)
		for i := 0; i < 50; i++ {
			if _, err := io.WriteString(w, "chunk "); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
				return
			case <-time.After(chunk):
			}
		}
	}))
	if h2 {
		srv.EnableHTTP2 = true
		srv.StartTLS()
	} else {
		srv.Start()
	}
	t.Cleanup(srv.Close)
	return srv
}

func protoName(h2 bool) string {
	if h2 {
		return "h2"
	}
	return "h1"
}

// Slow streaming past the stream timeout, caller cancellation mid-body,
// double Close and EOF-then-Close, over real HTTP/1.1 and HTTP/2.
func TestTransportStreamingBodies(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(protoName(h2), func(t *testing.T) {
			srv := streamServer(t, h2, 20*time.Millisecond)
			reg := transportRegistry(t, map[string]string{"TIMEOUT_DEFAULT": "0.3", "TIMEOUT_DEFAULT_STREAM": "0.3", "BULKHEAD_DEFAULT_LIMIT": "1", "BULKHEAD_DEFAULT_MAX_WAIT": "2"})
			c := client(reg, srv.Client().Transport)
			b := reg.Bulkhead("127.0.0.1")

			// 1. Read slowly past the stream timeout: the read fails with
			// ErrTimeout, the slot goes back.
			resp, err := c.Get(srv.URL)
			if err != nil {
				t.Fatal(err)
			}
			if h2 && resp.ProtoMajor != 2 {
				t.Fatalf("proto %s", resp.Proto)
			}
			buf := make([]byte, 4)
			var rerr error
			for rerr == nil {
				_, rerr = resp.Body.Read(buf)
			}
			if rerr == io.EOF || !errors.Is(rerr, ErrTimeout) {
				t.Fatalf("a body streamed past its stream timeout ended with %v; want ErrTimeout", rerr)
			}
			waitFor(t, 2*time.Second, "slot not given back after the timeout", func() bool { return b.Stats().Active == 0 })
			resp.Body.Close()
			resp.Body.Close()
			if s := b.Stats(); s.Active != 0 || s.Completed != 1 {
				t.Fatalf("after timeout and two Closes: %+v; want Active 0, Completed 1", s)
			}

			// 2. Caller cancels mid-body.
			ctx, cancel := context.WithCancel(context.Background())
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL, nil)
			resp, err = c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Read(buf)
			cancel()
			if _, err = io.ReadAll(resp.Body); err == nil {
				t.Fatal("a body read after its caller cancelled read to EOF")
			}
			resp.Body.Close()
			resp.Body.Close()
			if s := b.Stats(); s.Active != 0 || s.Completed != 2 {
				t.Fatalf("after cancel and Close: %+v; want Active 0, Completed 2", s)
			}

			// 3. The next request gets the slot at once.
			ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			req, _ = http.NewRequestWithContext(ctx, http.MethodGet, srv.URL, nil)
			resp, err = c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if s := b.Stats(); s.Active != 0 {
				t.Fatalf("after Close: %+v", s)
			}
		})
	}
}

// Found in the second review of the pipeline change (concurrency); it
// failed before the fix.
// HEAD, 204 and 304 responses carry no body: nothing more of the
// downstream's work is streamed once the headers are in. net/http frees
// their connection at once whether or not the caller closes the body.
func TestTransportBodilessResponsesFreeTheSlot(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(protoName(h2), func(t *testing.T) {
			srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				switch r.URL.Path {
				case "/204":
					w.WriteHeader(204)
				case "/304":
					w.WriteHeader(304)
				default:
					w.Header().Set("Content-Length", "5")
					w.WriteHeader(200)
				}
			}))
			if h2 {
				srv.EnableHTTP2 = true
				srv.StartTLS()
			} else {
				srv.Start()
			}
			defer srv.Close()
			reg := transportRegistry(t, map[string]string{"BULKHEAD_DEFAULT_LIMIT": "1", "BULKHEAD_DEFAULT_FAIL_FAST": "true", "RETRY_MAX_ATTEMPTS": "1"})
			c := client(reg, srv.Client().Transport)
			b := reg.Bulkhead("127.0.0.1")
			for _, tc := range []struct{ method, path string }{{"HEAD", "/"}, {"GET", "/204"}, {"GET", "/304"}} {
				req, _ := http.NewRequest(tc.method, srv.URL+tc.path, nil)
				resp, err := c.Do(req)
				if err != nil {
					t.Fatalf("%s %s: %v", tc.method, tc.path, err)
				}
				a := b.Stats().Active
				resp.Body.Close()
				if a != 0 {
					t.Errorf("%s %s -> %d: %d slot held by a response without a body until it is closed; want 0", tc.method, tc.path, resp.StatusCode, a)
				}
			}
		})
	}
}

// Concurrent requests beyond the bulkhead's limit over a real server, with
// MaxQueue and MaxWait: never more than Limit at the server, every request
// either answered or refused with ErrBulkheadFull, nothing held after.
func TestTransportBeyondLimitQueueAndWait(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(protoName(h2), func(t *testing.T) {
			var inside, most atomic.Int64
			srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				bhRaiseMax(&most, inside.Add(1))
				w.WriteHeader(200)
				io.WriteString(w, "part1 ")
				w.(http.Flusher).Flush()
				time.Sleep(5 * time.Millisecond) // the downstream's work, not synchronisation
				io.WriteString(w, "part2")
				inside.Add(-1)
			}))
			if h2 {
				srv.EnableHTTP2 = true
				srv.StartTLS()
			} else {
				srv.Start()
			}
			defer srv.Close()
			reg := transportRegistry(t, map[string]string{"BULKHEAD_DEFAULT_LIMIT": "2", "BULKHEAD_DEFAULT_MAX_QUEUE": "3",
				"BULKHEAD_DEFAULT_MAX_WAIT": "0.05", "RETRY_MAX_ATTEMPTS": "1"})
			c := client(reg, srv.Client().Transport)
			b := reg.Bulkhead("127.0.0.1")
			var ok, full, other atomic.Int64
			var wg sync.WaitGroup
			for range 40 {
				wg.Go(func() {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					defer cancel()
					req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL, nil)
					resp, err := c.Do(req)
					switch {
					case err == nil:
						body, rerr := io.ReadAll(resp.Body)
						resp.Body.Close()
						if rerr == nil && string(body) == "part1 part2" {
							ok.Add(1)
						} else {
							other.Add(1)
							t.Errorf("body %q, %v", body, rerr)
						}
					case errors.Is(err, ErrBulkheadFull):
						full.Add(1)
					default:
						other.Add(1)
						t.Errorf("err = %v", err)
					}
				})
			}
			wg.Wait()
			if s := b.Stats(); s.Active != 0 || s.Waiting != 0 {
				t.Fatalf("after every request returned: %+v", s)
			}
			if ok.Load() == 0 || ok.Load()+full.Load() != 40 {
				t.Fatalf("ok %d, full %d, other %d", ok.Load(), full.Load(), other.Load())
			}
			// The slot is held while the body streams, so the server never
			// works on more than Limit at once... unless the body outlives
			// its slot.
			if most.Load() > 2 {
				t.Errorf("%d requests at the server at once; want at most the limit 2", most.Load())
			}
		})
	}
}

// Redirects through http.Client: each hop is its own RoundTrip, and the
// client closes a hop's body before it sends the next, so a bulkhead of one
// with FailFast lets a chain of redirects through.
func TestTransportRedirectsWithBulkheadOfOne(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(protoName(h2), func(t *testing.T) {
			srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				var hop int
				fmt.Sscanf(r.URL.Path, "/%d", &hop)
				if hop < 5 {
					body, _ := io.ReadAll(r.Body)
					if r.Method == http.MethodPost && string(body) != "payload" {
						http.Error(w, "lost body "+string(body), 400)
						return
					}
					code := http.StatusFound
					if hop%2 == 1 {
						code = http.StatusTemporaryRedirect // keeps method and body: GetBody
					}
					http.Redirect(w, r, fmt.Sprintf("/%d", hop+1), code)
					return
				}
				io.WriteString(w, "landed "+r.Method)
			}))
			if h2 {
				srv.EnableHTTP2 = true
				srv.StartTLS()
			} else {
				srv.Start()
			}
			defer srv.Close()
			reg := transportRegistry(t, map[string]string{"BULKHEAD_DEFAULT_LIMIT": "1", "BULKHEAD_DEFAULT_FAIL_FAST": "true"})
			c := client(reg, srv.Client().Transport)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/0", nil)
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(body) != "landed GET" {
				t.Fatalf("body %q", body)
			}
			if s := reg.Bulkhead("127.0.0.1").Stats(); s.Active != 0 || s.Completed != 6 {
				t.Fatalf("%+v; want 6 hops completed", s)
			}
		})
	}
}

// Expect: 100-continue with a replayable body: a 503 before the body was
// sent, then a retry that sends it. A request body without GetBody is
// not retried and is closed; http.NoBody is retried.
func TestTransportExpectContinueAndBodies(t *testing.T) {
	var n atomic.Int32
	var got sync.Map
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i := n.Add(1)
		if r.URL.Query().Get("fail") != "" && i == 1 {
			w.WriteHeader(503) // before reading the body: 100-continue is never sent
			return
		}
		body, _ := io.ReadAll(r.Body)
		got.Store(r.URL.RawQuery, string(body))
		io.WriteString(w, "ok")
	}))
	defer srv.Close()
	reg := transportRegistry(t, map[string]string{"BULKHEAD_DEFAULT_LIMIT": "1", "BULKHEAD_DEFAULT_FAIL_FAST": "true"})
	base := http.DefaultTransport.(*http.Transport).Clone()
	base.ExpectContinueTimeout = time.Second
	defer base.CloseIdleConnections()
	c := client(reg, base)
	b := reg.Bulkhead("127.0.0.1")

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPut, srv.URL+"?fail=1", strings.NewReader("the payload"))
	req.Header.Set("Expect", "100-continue")
	// send does req and reads its body to the end.
	send := func(req *http.Request) *http.Response {
		t.Helper()
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp
	}
	resp := send(req)
	if v, _ := got.Load("fail=1"); resp.StatusCode != 200 || v != "the payload" || n.Load() != 2 {
		t.Fatalf("status %d, body at server %q after %d requests; want 200, the payload, 2", resp.StatusCode, v, n.Load())
	}

	// http.NoBody: no body, retried like a GET would be.
	n.Store(0)
	req, _ = http.NewRequestWithContext(ctx, http.MethodPut, srv.URL+"?fail=1&nobody=1", http.NoBody)
	resp = send(req)
	if resp.StatusCode != 200 || n.Load() != 2 {
		t.Fatalf("NoBody: status %d after %d requests; want 200 after 2", resp.StatusCode, n.Load())
	}

	// No GetBody: not retried, the 503 comes back, the body is closed.
	n.Store(0)
	tb := &trackedBody{Reader: strings.NewReader("once")}
	req, _ = http.NewRequestWithContext(ctx, http.MethodPut, srv.URL+"?fail=1&once=1", tb)
	resp = send(req)
	if resp.StatusCode != 503 || n.Load() != 1 {
		t.Fatalf("no GetBody: status %d after %d requests; want 503 after 1", resp.StatusCode, n.Load())
	}
	waitFor(t, 2*time.Second, "the unreplayable body was never closed", tb.closed.Load)
	if s := b.Stats(); s.Active != 0 {
		t.Fatalf("%+v", s)
	}
}

// A body read in one goroutine and closed from another (a proxy, a
// watchdog), over HTTP/2 and HTTP/1.1: the race detector is the judge, and
// the slot goes back once.
func TestTransportConcurrentReadAndClose(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run(protoName(h2), func(t *testing.T) {
			srv := streamServer(t, h2, 2*time.Millisecond)
			reg := transportRegistry(t, map[string]string{"BULKHEAD_DEFAULT_LIMIT": "4"})
			c := client(reg, srv.Client().Transport)
			b := reg.Bulkhead("127.0.0.1")
			var wg sync.WaitGroup
			for range 8 {
				wg.Go(func() {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					defer cancel()
					req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL, nil)
					resp, err := c.Do(req)
					if err != nil {
						t.Error(err)
						return
					}
					done := make(chan struct{})
					go func() {
						defer close(done)
						io.Copy(io.Discard, resp.Body)
					}()
					resp.Body.Close()
					<-done
					resp.Body.Close()
				})
			}
			wg.Wait()
			if s := b.Stats(); s.Active != 0 || s.Completed != 8 {
				t.Fatalf("%+v; want Active 0, Completed 8", s)
			}
		})
	}
}
