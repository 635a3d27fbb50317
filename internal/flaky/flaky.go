// Package flaky serves HTTP on loopback and fails on cue: a downstream for
// tests and demos of the resilience policies.
//
// A [Script] says what the server does with each request by its arrival
// number (answer, fail with a status and an optional Retry-After, answer
// late, or hang until the client gives up), and a [Server] follows it:
//
//	srv := flaky.Start(flaky.Script{
//		Plan: []flaky.Outcome{flaky.Fail(503), flaky.Slow(time.Second), flaky.OK()},
//	})
//	defer srv.Close()
//
// The server listens on 127.0.0.1 only and never reaches beyond it.
package flaky

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Outcome is what the server does with one request: wait Delay (or hang),
// then answer with Status, or pass the request to the script's Handler if
// Status is 0. The zero Outcome passes the request to the Handler at once.
type Outcome struct {
	// Delay is the latency added before the request is answered. The wait
	// ends early if the client gives up, and then nothing is answered.
	Delay time.Duration

	// Hang holds the request until the client gives up or the server is
	// closed; it is never answered. Status and Delay are ignored.
	Hang bool

	// Status, if not 0, is the HTTP status the server answers with, with
	// the status text as body, instead of calling the Handler.
	Status int

	// RetryAfter, if positive, is sent with Status as a Retry-After header
	// in whole seconds, rounded up: the header has no finer unit.
	RetryAfter time.Duration

	// FineRetryAfter, if positive, is sent with Status as a retry-after-ms
	// header, in milliseconds, as LLM APIs send their finer hint.
	FineRetryAfter time.Duration
}

// OK returns the Outcome that passes the request to the Handler at once.
func OK() Outcome { return Outcome{} }

// Fail returns the Outcome that answers with status at once.
func Fail(status int) Outcome { return Outcome{Status: status} }

// Slow returns the Outcome that passes the request to the Handler after d.
func Slow(d time.Duration) Outcome { return Outcome{Delay: d} }

// Hang returns the Outcome that never answers: the request is held until
// the client gives up or the server is closed.
func Hang() Outcome { return Outcome{Hang: true} }

// WithRetryAfter returns o with a Retry-After of d.
func (o Outcome) WithRetryAfter(d time.Duration) Outcome {
	o.RetryAfter = d
	return o
}

// WithFineRetryAfter returns o with a retry-after-ms header of d.
func (o Outcome) WithFineRetryAfter(d time.Duration) Outcome {
	o.FineRetryAfter = d
	return o
}

// Repeat returns a plan of n copies of o, to splice into a longer one with
// append.
func Repeat(o Outcome, n int) []Outcome {
	p := make([]Outcome, max(n, 0))
	for i := range p {
		p[i] = o
	}
	return p
}

// Script is a server's fault plan. The zero Script answers every request
// with 200 and the body "ok\n".
type Script struct {
	// Plan is the outcome of each request in order of arrival: Plan[0] for
	// the first, Plan[1] for the second, and so on.
	Plan []Outcome

	// Then is the outcome of every request past the end of Plan.
	Then Outcome

	// Handler serves the requests whose outcome passes them on. nil means
	// a handler that answers 200 with the body "ok\n".
	Handler http.Handler
}

// Server is an HTTP server on 127.0.0.1 that follows a [Script]. Its methods
// are safe for concurrent use by multiple goroutines. Build it with [Start];
// the zero value is not usable.
type Server struct {
	ts      *httptest.Server
	plan    []Outcome
	then    Outcome
	handler http.Handler

	closing   chan struct{} // closed by Close, to end waits and hangs
	closeOnce sync.Once

	requests  atomic.Int64
	successes atomic.Int64
}

// Start starts a Server following script on a free port of 127.0.0.1. The
// script is copied, so changing it afterwards has no effect. Call Close when
// done. Start panics if it cannot listen, as [httptest.NewServer] does.
func Start(script Script) *Server {
	s := &Server{
		plan:    append([]Outcome(nil), script.Plan...),
		then:    script.Then,
		handler: script.Handler,
		closing: make(chan struct{}),
	}
	if s.handler == nil {
		s.handler = http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			_, _ = io.WriteString(w, "ok\n")
		})
	}
	// Our own listener rather than httptest's, which may pick [::1] or honour
	// a -httptest.serve flag: the server must be on 127.0.0.1 and nowhere else.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic("flaky: cannot listen on 127.0.0.1: " + err.Error())
	}
	s.ts = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	s.ts.Listener.Close()
	s.ts.Listener = l
	s.ts.Start()
	return s
}

// URL returns the server's base URL, "http://127.0.0.1:PORT".
func (s *Server) URL() string { return s.ts.URL }

// Client returns an HTTP client for the server whose idle connections Close
// also closes, so that no connection goroutine outlives the server.
func (s *Server) Client() *http.Client { return s.ts.Client() }

// Requests returns the number of requests the server has received.
func (s *Server) Requests() int64 { return s.requests.Load() }

// Successes returns the number of requests the Handler answered with a 2xx
// status.
func (s *Server) Successes() int64 { return s.successes.Load() }

// Close releases every request still waiting or hanging, by aborting its
// connection, shuts the server down and waits for its handlers to return.
// Calling it again does nothing.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		close(s.closing)
		s.ts.Close()
	})
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	n := s.requests.Add(1)
	o := s.then
	if n <= int64(len(s.plan)) {
		o = s.plan[n-1]
	}
	switch {
	case o.Hang:
		s.wait(r, nil)
		return
	case o.Delay > 0:
		t := time.NewTimer(o.Delay)
		defer t.Stop()
		if !s.wait(r, t.C) {
			return
		}
	}
	if o.Status != 0 {
		if o.RetryAfter > 0 {
			secs := (o.RetryAfter + time.Second - 1) / time.Second
			w.Header().Set("Retry-After", strconv.FormatInt(int64(secs), 10))
		}
		if o.FineRetryAfter > 0 {
			w.Header().Set("Retry-After-Ms", strconv.FormatInt(o.FineRetryAfter.Milliseconds(), 10))
		}
		text := http.StatusText(o.Status)
		if text == "" {
			text = "status " + strconv.Itoa(o.Status)
		}
		http.Error(w, text, o.Status)
		return
	}
	rec := &recorder{ResponseWriter: w, successes: &s.successes}
	s.handler.ServeHTTP(rec, r)
	rec.decide(http.StatusOK) // a handler that writes nothing answers 200
}

// wait blocks until done fires (it reports true), the client gives up
// (false), or the server closes, which aborts the connection so that the
// client sees an error rather than an empty answer.
func (s *Server) wait(r *http.Request, done <-chan time.Time) bool {
	select {
	case <-done:
		return true
	case <-r.Context().Done():
		return false
	case <-s.closing:
		panic(http.ErrAbortHandler)
	}
}

// recorder counts a success as soon as the Handler's status is known to be
// 2xx: before any byte of the answer can reach the client, so a client that
// has its answer always finds it counted.
type recorder struct {
	http.ResponseWriter
	successes *atomic.Int64
	decided   bool
}

func (r *recorder) decide(status int) {
	if r.decided || status < 200 { // 1xx answers are interim
		return
	}
	r.decided = true
	if status < 300 {
		r.successes.Add(1)
	}
}

func (r *recorder) WriteHeader(code int) {
	r.decide(code)
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	r.decide(http.StatusOK)
	return r.ResponseWriter.Write(b)
}

// Unwrap gives http.ResponseController the underlying writer.
func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }
