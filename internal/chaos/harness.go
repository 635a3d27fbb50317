// Package chaos is the fault-injection harness of the resilience library and
// the scenarios that run against it: real servers on loopback whose faults
// are scripted over time or by request count, with Toxiproxy run in-process
// for faults on the wire. It is a nested module, so Toxiproxy and its
// dependencies never enter the library's module graph.
//
// Everything here listens on 127.0.0.1 only, is bounded in time and count,
// and stops by itself. docs/RELIABILITY.md holds the
// figures of the last run and the command of each scenario.
package chaos

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// The headers the downstream reads and writes.
const (
	// HeaderRequestID names a request; the downstream echoes it in the
	// header and as the body of a 200, and records the IDs it served.
	HeaderRequestID = "X-Request-Id"
	// HeaderHandling is the time the downstream spent on a request, in
	// nanoseconds, from entering the handler to writing the answer, its
	// added latency included.
	HeaderHandling = "X-Handling-Ns"
)

// Fault is what the downstream does to the requests of one phase. The zero
// Fault answers every request at once with 200.
type Fault struct {
	// ErrorRate is the share of requests answered 503, from 0 to 1.
	ErrorRate float64
	// Latency is added before every answer, spread uniformly over
	// [Latency-Jitter, Latency+Jitter] and never below 0. It ends early if
	// the client gives up.
	Latency, Jitter time.Duration
	// HangRate is the share of requests held unanswered until the client
	// gives up (or the downstream is closed).
	HangRate float64
	// ResetRate is the share of requests whose connection is reset: taken
	// over from net/http, set to linger 0 and closed, so the client gets
	// an RST instead of an answer.
	ResetRate float64
	// Outage answers every request 503.
	Outage bool
	// Refuse closes the listener for the phase, so that connections are
	// refused, and closes idle keep-alive connections so clients must
	// dial; the listener is opened again on the same port when a phase
	// without Refuse begins.
	Refuse bool
}

// Phase is one step of a downstream's script: a fault, held for a time or
// for a number of requests, whichever comes first. A phase with neither
// lasts for ever, and so does the last phase of a script whatever it says.
type Phase struct {
	Name     string
	Fault    Fault
	For      time.Duration
	Requests int64
}

// Stats are a downstream's counts, since it started or for one phase.
type Stats struct {
	Received int64 // requests that reached the handler
	Served   int64 // answered 200
	Failed   int64 // answered 503
	Hung     int64 // held until the client gave up
	Reset    int64 // connections reset
	Conns    int64 // connections accepted (all phases only)
}

type counts struct {
	received, served, failed, hung, reset, conns atomic.Int64
}

func (c *counts) stats() Stats {
	return Stats{
		Received: c.received.Load(), Served: c.served.Load(), Failed: c.failed.Load(),
		Hung: c.hung.Load(), Reset: c.reset.Load(), Conns: c.conns.Load(),
	}
}

// phaseState is the live state of one phase of the playing script.
type phaseState struct {
	Phase
	entered chan struct{} // closed when the phase begins
	start   time.Time
	counts  counts
}

// Downstream is an HTTP server on 127.0.0.1 whose faults follow a script.
// It is safe for concurrent use. Build it with [NewDownstream] and Close it.
type Downstream struct {
	addr string
	srv  *http.Server
	all  counts

	mu        sync.Mutex
	phases    []*phaseState
	cur       int
	ln        net.Listener // nil while refusing
	conns     map[net.Conn]http.ConnState
	served    map[string]int // request ID -> 200s served for it
	listenErr error
	closed    bool

	kick     chan struct{} // wakes the player: the script changed
	stop     chan struct{} // closed by Close: hung requests return
	serving  sync.WaitGroup
	handlers sync.WaitGroup
	player   sync.WaitGroup
}

// NewDownstream starts a downstream on a free port of 127.0.0.1, playing
// the given phases (none: healthy for ever).
func NewDownstream(phases ...Phase) (*Downstream, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	d := &Downstream{
		addr:   ln.Addr().String(),
		conns:  map[net.Conn]http.ConnState{},
		served: map[string]int{},
		kick:   make(chan struct{}, 1),
		stop:   make(chan struct{}),
	}
	d.srv = &http.Server{
		Handler:           http.HandlerFunc(d.handle),
		ConnState:         d.connState,
		ReadHeaderTimeout: 10 * time.Second,
	}
	d.mu.Lock()
	d.ln = ln
	d.serveLocked(ln)
	d.playLocked(phases)
	d.mu.Unlock()
	d.player.Add(1)
	go d.play()
	return d, nil
}

// Addr is the downstream's host:port, the same for its whole life.
func (d *Downstream) Addr() string { return d.addr }

// URL is the downstream's base URL.
func (d *Downstream) URL() string { return "http://" + d.addr }

// Play replaces the script with phases, starting now.
func (d *Downstream) Play(phases ...Phase) {
	d.mu.Lock()
	d.playLocked(phases)
	d.mu.Unlock()
	d.wake()
}

// Set replaces the script with one fault held for ever.
func (d *Downstream) Set(f Fault) { d.Play(Phase{Name: "set", Fault: f}) }

// Entered returns a channel closed when phase i of the current script
// begins, or nil if there is no such phase.
func (d *Downstream) Entered(i int) <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	if i < 0 || i >= len(d.phases) {
		return nil
	}
	return d.phases[i].entered
}

// Current returns the index of the phase playing now. It also moves the
// script on if a phase's time is up.
func (d *Downstream) Current() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.advanceLocked(time.Now())
	return d.cur
}

// Started returns when phase i began; the zero time if it has not.
func (d *Downstream) Started(i int) time.Time {
	d.mu.Lock()
	defer d.mu.Unlock()
	if i < 0 || i >= len(d.phases) || i > d.cur {
		return time.Time{}
	}
	return d.phases[i].start
}

// Stats returns the counts since the downstream started.
func (d *Downstream) Stats() Stats { return d.all.stats() }

// PhaseStats returns the counts of phase i of the current script.
func (d *Downstream) PhaseStats(i int) Stats {
	d.mu.Lock()
	defer d.mu.Unlock()
	if i < 0 || i >= len(d.phases) {
		return Stats{}
	}
	return d.phases[i].counts.stats()
}

// ServedIDs returns a copy of the request IDs answered 200, with the number
// of 200s each got.
func (d *Downstream) ServedIDs() map[string]int {
	d.mu.Lock()
	defer d.mu.Unlock()
	m := make(map[string]int, len(d.served))
	for k, v := range d.served {
		m[k] = v
	}
	return m
}

// Err reports a failure to listen again after a refusing phase.
func (d *Downstream) Err() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.listenErr
}

// Close stops the downstream: the listener and every connection are
// closed, hung requests return, and Close waits for every goroutine the
// downstream started.
func (d *Downstream) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	close(d.stop)
	d.mu.Unlock()
	err := d.srv.Close()
	d.serving.Wait()
	d.handlers.Wait()
	d.player.Wait()
	return err
}

func (d *Downstream) wake() {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

func (d *Downstream) playLocked(phases []Phase) {
	if len(phases) == 0 {
		phases = []Phase{{Name: "healthy"}}
	}
	now := time.Now()
	d.phases = make([]*phaseState, len(phases))
	for i, p := range phases {
		d.phases[i] = &phaseState{Phase: p, entered: make(chan struct{})}
	}
	d.cur = 0
	d.phases[0].start = now
	close(d.phases[0].entered)
	d.applyLocked()
}

// advanceLocked moves the script past every phase that is over by now.
func (d *Downstream) advanceLocked(now time.Time) {
	moved := false
	for d.cur < len(d.phases)-1 {
		p := d.phases[d.cur]
		end := p.start.Add(p.For)
		switch {
		case p.For > 0 && !now.Before(end):
			// On schedule, not when someone happened to look.
		case p.Requests > 0 && p.counts.received.Load() >= p.Requests:
			end = now
		default:
			if moved {
				d.applyLocked()
			}
			return
		}
		d.cur++
		d.phases[d.cur].start = end
		close(d.phases[d.cur].entered)
		moved = true
	}
	if moved {
		d.applyLocked()
	}
}

// applyLocked opens or closes the listener as the current phase wants.
func (d *Downstream) applyLocked() {
	if d.closed {
		return
	}
	refuse := d.phases[d.cur].Fault.Refuse
	switch {
	case refuse && d.ln != nil:
		d.ln.Close()
		d.ln = nil
		for c, st := range d.conns {
			if st == http.StateIdle || st == http.StateNew {
				c.Close()
			}
		}
	case !refuse && d.ln == nil:
		ln, err := net.Listen("tcp", d.addr)
		if err != nil {
			d.listenErr = fmt.Errorf("chaos: listen again on %s: %w", d.addr, err)
			return
		}
		d.ln = ln
		d.serveLocked(ln)
	}
}

func (d *Downstream) serveLocked(ln net.Listener) {
	d.serving.Add(1)
	go func() {
		defer d.serving.Done()
		d.srv.Serve(ln) // returns when ln is closed, by a refusing phase or Close
	}()
}

// play moves time-bound phases on at their time, so that a refusing phase,
// which no request reaches, still ends.
func (d *Downstream) play() {
	defer d.player.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		d.mu.Lock()
		d.advanceLocked(time.Now())
		var due <-chan time.Time
		if p := d.phases[d.cur]; d.cur < len(d.phases)-1 && p.For > 0 {
			timer.Reset(time.Until(p.start.Add(p.For)))
			due = timer.C
		}
		d.mu.Unlock()
		select {
		case <-d.stop:
			return
		case <-d.kick:
		case <-due:
		}
	}
}

func (d *Downstream) connState(c net.Conn, st http.ConnState) {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch st {
	case http.StateNew:
		d.all.conns.Add(1)
		fallthrough
	case http.StateActive, http.StateIdle:
		d.conns[c] = st
		if d.ln == nil && st != http.StateActive {
			// Refusing: no keep-alive connection may carry a request.
			c.Close()
		}
	case http.StateHijacked, http.StateClosed:
		delete(d.conns, c)
	}
}

func (d *Downstream) handle(w http.ResponseWriter, r *http.Request) {
	d.handlers.Add(1)
	defer d.handlers.Done()
	start := time.Now()
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		http.Error(w, "closed", http.StatusServiceUnavailable)
		return
	}
	d.advanceLocked(start)
	p := d.phases[d.cur]
	p.counts.received.Add(1)
	if p.Requests > 0 && p.counts.received.Load() >= p.Requests {
		d.advanceLocked(start) // the next request sees the next phase
		d.wake()
	}
	d.mu.Unlock()
	d.all.received.Add(1)
	f := p.Fault

	switch {
	case chance(f.ResetRate):
		d.reset(w, p)
		return
	case chance(f.HangRate):
		select {
		case <-r.Context().Done():
		case <-d.stop:
		}
		p.counts.hung.Add(1)
		d.all.hung.Add(1)
		return
	}
	if delay := jittered(f.Latency, f.Jitter); delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		case <-d.stop:
			t.Stop()
			return
		}
	}
	id := r.Header.Get(HeaderRequestID)
	w.Header().Set(HeaderRequestID, id)
	if f.Outage || chance(f.ErrorRate) {
		w.Header().Set(HeaderHandling, strconv.FormatInt(int64(time.Since(start)), 10))
		w.WriteHeader(http.StatusServiceUnavailable)
		p.counts.failed.Add(1)
		d.all.failed.Add(1)
		return
	}
	if id != "" {
		d.mu.Lock()
		d.served[id]++
		d.mu.Unlock()
	}
	p.counts.served.Add(1)
	d.all.served.Add(1)
	w.Header().Set(HeaderHandling, strconv.FormatInt(int64(time.Since(start)), 10))
	w.Header().Set("Content-Length", strconv.Itoa(len(id)))
	w.WriteHeader(http.StatusOK)
	w.Write([]byte(id))
}

// reset takes the connection over and closes it with linger 0: the kernel
// sends an RST instead of a FIN.
func (d *Downstream) reset(w http.ResponseWriter, p *phaseState) {
	p.counts.reset.Add(1)
	d.all.reset.Add(1)
	hj, ok := w.(http.Hijacker)
	if !ok {
		panic(http.ErrAbortHandler)
	}
	c, _, err := hj.Hijack()
	if err != nil {
		panic(http.ErrAbortHandler)
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

func chance(p float64) bool { return p > 0 && (p >= 1 || rand.Float64() < p) }

func jittered(d, j time.Duration) time.Duration {
	if j > 0 {
		d += time.Duration(rand.Int64N(int64(2*j)+1)) - j
	}
	return max(d, 0)
}

// StatusError is the error a client of the downstream makes of an answer
// other than 200: the downstream's own error, as opposed to the library's.
type StatusError struct{ Code int }

// Error says which status the downstream answered.
func (e *StatusError) Error() string { return "chaos: downstream answered " + strconv.Itoa(e.Code) }

// ErrDownstream is matched by every *StatusError.
var ErrDownstream = errors.New("chaos: downstream error")

// Is makes every StatusError match ErrDownstream.
func (e *StatusError) Is(target error) bool { return target == ErrDownstream }
