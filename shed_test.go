package resilience

import (
	"context"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// Package-level names in this file start with shed so that they cannot
// clash with the helpers of the other test files in the package.

// shedPrio is a ShedConfig.Priority that reads the request's "Prio" header.
func shedPrio(r *http.Request) int {
	p, _ := strconv.Atoi(r.Header.Get("Prio"))
	return p
}

// shedGate is a handler that reports each request it starts serving on
// entered (by its "Id" header) and returns only when told to on leave.
type shedGate struct {
	entered chan string
	leave   chan struct{}
	open    sync.Once
	calls   atomic.Int64
}

// newShedGate returns a gate that opens when t ends, so that a test that
// fails half-way leaves no goroutine behind in its synctest bubble.
func newShedGate(t *testing.T) *shedGate {
	g := &shedGate{entered: make(chan string, 100), leave: make(chan struct{}, 100)}
	t.Cleanup(func() { g.open.Do(func() { close(g.leave) }) })
	return g
}

func (g *shedGate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	g.calls.Add(1)
	g.entered <- r.Header.Get("Id")
	<-g.leave
	io.WriteString(w, "ok")
}

// next lets one request out of the gate and returns the id of the next one
// in, or "" if none entered. Call it inside a synctest bubble.
func (g *shedGate) next() string {
	g.leave <- struct{}{}
	synctest.Wait()
	select {
	case id := <-g.entered:
		return id
	default:
		return ""
	}
}

// drain opens the gate for good: every request in it and every later one
// is served at once. Call it inside a synctest bubble.
func (g *shedGate) drain() {
	g.open.Do(func() { close(g.leave) })
	synctest.Wait()
}

// in returns the ids of the requests that entered since the last call.
// Call it inside a synctest bubble.
func (g *shedGate) in() []string {
	synctest.Wait()
	var ids []string
	for {
		select {
		case id := <-g.entered:
			ids = append(ids, id)
		default:
			return ids
		}
	}
}

// shedCall is one request through a handler, served in its own goroutine.
type shedCall struct {
	id     string
	rec    *httptest.ResponseRecorder
	done   chan struct{}
	cancel context.CancelFunc
}

// shedStart serves a request of priority prio, named id, with h, in its
// own goroutine. The request's client goes away when t ends.
func shedStart(t *testing.T, h http.Handler, id string, prio int) *shedCall {
	ctx, cancel := context.WithCancel(context.Background())
	return shedStartCtx(t, ctx, cancel, h, id, prio)
}

func shedStartCtx(t *testing.T, ctx context.Context, cancel context.CancelFunc, h http.Handler, id string, prio int) *shedCall {
	t.Cleanup(cancel)
	c := &shedCall{id: id, rec: httptest.NewRecorder(), done: make(chan struct{}), cancel: cancel}
	r := httptest.NewRequestWithContext(ctx, http.MethodGet, "/", nil)
	r.Header.Set("Id", id)
	r.Header.Set("Prio", strconv.Itoa(prio))
	go func() {
		defer close(c.done)
		defer cancel()
		h.ServeHTTP(c.rec, r)
	}()
	return c
}

func (c *shedCall) finished() bool { return bhClosed(c.done) }

// wantShed checks that c was answered with 503 and Retry-After ra. Call it
// after synctest.Wait.
func (c *shedCall) wantShed(t *testing.T, ra string) {
	t.Helper()
	if !c.finished() {
		t.Errorf("request %s still waiting; want it shed at once", c.id)
		return
	}
	if c.rec.Code != http.StatusServiceUnavailable {
		t.Errorf("request %s answered %d; want 503", c.id, c.rec.Code)
	}
	if got := c.rec.Header().Values("Retry-After"); !slices.Equal(got, []string{ra}) {
		t.Errorf("request %s Retry-After %q; want [%q]", c.id, got, ra)
	}
}

// wantServed checks that c was served by a shedGate.
func (c *shedCall) wantServed(t *testing.T) {
	t.Helper()
	if !c.finished() {
		t.Errorf("request %s not answered; want it served", c.id)
		return
	}
	if c.rec.Code != http.StatusOK || c.rec.Body.String() != "ok" {
		t.Errorf("request %s answered %d %q; want 200 \"ok\"", c.id, c.rec.Code, c.rec.Body)
	}
}

func TestShedWithoutPriorityShedsAtOnce(t *testing.T) {
	for _, tc := range []struct {
		retryAfter time.Duration
		want       string // Retry-After
	}{
		{0, "1"},
		{time.Nanosecond, "1"},
		{time.Second, "1"},
		{1500 * time.Millisecond, "2"},
		{3 * time.Second, "3"},
		{time.Hour, "3600"},
	} {
		t.Run("RetryAfter="+tc.retryAfter.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				// MaxWait and an unbounded queue would let a pipeline
				// caller wait 10s: Shed must not.
				b := mustBulkhead(t, BulkheadConfig{Limit: 2, MaxWait: 10 * time.Second})
				g := newShedGate(t)
				h := Shed(g, ShedConfig{Bulkhead: b, RetryAfter: tc.retryAfter})
				a, c := shedStart(t, h, "a", 0), shedStart(t, h, "b", 0)
				if got := g.in(); len(got) != 2 {
					t.Fatalf("%v entered; want a and b", got)
				}
				start := time.Now()
				// Without Priority, a request's priority header means nothing.
				shed := []*shedCall{shedStart(t, h, "c", 0), shedStart(t, h, "d", PriorityHighest)}
				synctest.Wait()
				if d := time.Since(start); d != 0 {
					t.Errorf("shed after %v; want at once", d)
				}
				for _, s := range shed {
					s.wantShed(t, tc.want)
				}
				if n := g.calls.Load(); n != 2 {
					t.Errorf("next served %d requests; want 2", n)
				}
				bhWantStats(t, b, BulkheadStats{Active: 2, Rejected: 2})
				g.leave <- struct{}{}
				g.leave <- struct{}{}
				synctest.Wait()
				a.wantServed(t)
				c.wantServed(t)
				bhWantStats(t, b, BulkheadStats{Rejected: 2, Completed: 2})
			})
		})
	}
}

func TestShedPriorityZeroShedWhileHigherWaits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Limit: 1})
		g := newShedGate(t)
		h := Shed(g, ShedConfig{Bulkhead: b, Priority: shedPrio, RetryAfter: 2 * time.Second})
		holder := shedStart(t, h, "holder", 0) // a free slot serves any priority
		if got := g.in(); !slices.Equal(got, []string{"holder"}) {
			t.Fatalf("%v entered; want [holder]", got)
		}
		high := shedStart(t, h, "high", 1)
		zero := shedStart(t, h, "zero", 0)
		neg := shedStart(t, h, "neg", -3)
		synctest.Wait()
		zero.wantShed(t, "2")
		neg.wantShed(t, "2")
		if high.finished() {
			t.Fatalf("priority 1 answered %d while the slot was held; want it waiting", high.rec.Code)
		}
		bhWantStats(t, b, BulkheadStats{Active: 1, Waiting: 1, Rejected: 2})

		if id := g.next(); id != "high" {
			t.Fatalf("after the holder left, %q entered; want high", id)
		}
		holder.wantServed(t)
		if id := g.next(); id != "" {
			t.Fatalf("%q entered; want none", id)
		}
		high.wantServed(t)
		bhWantStats(t, b, BulkheadStats{Rejected: 2, Completed: 2})
	})
}

func TestShedServesHighestPriorityFirst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Limit: 1})
		g := newShedGate(t)
		h := Shed(g, ShedConfig{Bulkhead: b, Priority: shedPrio})
		calls := []*shedCall{shedStart(t, h, "holder", 1)}
		g.in()
		for _, w := range []struct {
			id   string
			prio int
		}{{"p1a", 1}, {"p3", 3}, {"p2", 2}, {"p1b", 1}, {"top", PriorityHighest}, {"p3b", 3}} {
			calls = append(calls, shedStart(t, h, w.id, w.prio))
			synctest.Wait() // arrival order is the order of the list
		}
		var order []string
		for id := g.next(); id != ""; id = g.next() {
			order = append(order, id)
		}
		want := []string{"top", "p3", "p3b", "p2", "p1a", "p1b"}
		if !slices.Equal(order, want) {
			t.Errorf("served in order %v; want %v", order, want)
		}
		for _, c := range calls {
			c.wantServed(t)
		}
	})
}

func TestShedFullQueueDisplacesLowestWaiter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Limit: 1, MaxQueue: 2})
		g := newShedGate(t)
		h := Shed(g, ShedConfig{Bulkhead: b, Priority: shedPrio})
		holder := shedStart(t, h, "holder", 5)
		g.in()
		w1 := shedStart(t, h, "w1", 1)
		synctest.Wait()
		w2 := shedStart(t, h, "w2", 2)
		synctest.Wait()
		bhWantStats(t, b, BulkheadStats{Active: 1, Waiting: 2})

		// A newcomer of higher priority takes the place of the lowest.
		n := shedStart(t, h, "n", 3)
		synctest.Wait()
		w1.wantShed(t, "1")
		if n.finished() || w2.finished() {
			t.Fatalf("n or w2 answered; want both waiting")
		}
		bhWantStats(t, b, BulkheadStats{Active: 1, Waiting: 2, Rejected: 1})

		// A newcomer of lower or equal priority than the lowest waiter is
		// shed itself: equal priorities keep their arrival order.
		low := shedStart(t, h, "low", 1)
		equal := shedStart(t, h, "equal", 2)
		synctest.Wait()
		low.wantShed(t, "1")
		equal.wantShed(t, "1")
		bhWantStats(t, b, BulkheadStats{Active: 1, Waiting: 2, Rejected: 3})

		var order []string
		for id := g.next(); id != ""; id = g.next() {
			order = append(order, id)
		}
		if want := []string{"n", "w2"}; !slices.Equal(order, want) {
			t.Errorf("served %v; want %v", order, want)
		}
		for _, c := range []*shedCall{holder, n, w2} {
			c.wantServed(t)
		}
		bhWantStats(t, b, BulkheadStats{Rejected: 3, Completed: 3})
	})
}

func TestShedNeverShedsPriorityHighest(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Limit: 1, MaxQueue: 1, MaxWait: time.Second})
		g := newShedGate(t)
		h := Shed(g, ShedConfig{Bulkhead: b, Priority: shedPrio})
		holder := shedStart(t, h, "holder", 1)
		g.in()
		w := shedStart(t, h, "w", 9)
		synctest.Wait()
		// The queue is full: PriorityHighest waits all the same, and does
		// not displace w either (it needs no place).
		top1 := shedStart(t, h, "top1", PriorityHighest)
		synctest.Wait()
		top2 := shedStart(t, h, "top2", PriorityHighest)
		synctest.Wait()
		if w.finished() || top1.finished() || top2.finished() {
			t.Fatalf("a waiter was answered; want w, top1 and top2 waiting")
		}
		bhWantStats(t, b, BulkheadStats{Active: 1, Waiting: 3})
		// A newcomer below the lowest waiter finds the queue full.
		shedStart(t, h, "late", 5).wantShedAfterWait(t)

		// MaxWait passes many times over: w is shed, the top ones wait on.
		time.Sleep(time.Hour)
		synctest.Wait()
		w.wantShed(t, "1")
		if top1.finished() || top2.finished() {
			t.Fatalf("top1 answered %d, top2 finished %v after MaxWait; want both waiting", top1.rec.Code, top2.finished())
		}
		bhWantStats(t, b, BulkheadStats{Active: 1, Waiting: 2, Rejected: 2})

		var order []string
		for id := g.next(); id != ""; id = g.next() {
			order = append(order, id)
		}
		if want := []string{"top1", "top2"}; !slices.Equal(order, want) {
			t.Errorf("served %v; want %v", order, want)
		}
		for _, c := range []*shedCall{holder, top1, top2} {
			c.wantServed(t)
		}
	})
}

func (c *shedCall) wantShedAfterWait(t *testing.T) {
	t.Helper()
	synctest.Wait()
	c.wantShed(t, "1")
}

func TestShedCanceledWaiterLeavesQueue(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Limit: 1, MaxQueue: 2})
		g := newShedGate(t)
		h := Shed(g, ShedConfig{Bulkhead: b, Priority: shedPrio})
		holder := shedStart(t, h, "holder", 1)
		g.in()
		head := shedStart(t, h, "head", 3) // at the head of the queue
		tail := shedStart(t, h, "tail", 1)
		synctest.Wait()
		bhWantStats(t, b, BulkheadStats{Active: 1, Waiting: 2})

		head.cancel()
		synctest.Wait()
		if !head.finished() {
			t.Fatal("a canceled waiter is still waiting; want it gone at once")
		}
		if ra := head.rec.Header().Get("Retry-After"); ra != "" || head.rec.Code == http.StatusServiceUnavailable {
			t.Errorf("canceled waiter answered %d, Retry-After %q; want no answer", head.rec.Code, ra)
		}
		if got := b.Stats().Waiting; got != 1 {
			t.Errorf("Stats().Waiting = %d after a waiter was canceled; want 1", got)
		}

		// Its place is free: a newcomer of the tail's priority queues
		// instead of being shed, and the slot goes to the tail, then to it.
		again := shedStart(t, h, "again", 1)
		synctest.Wait()
		if again.finished() {
			t.Fatalf("newcomer answered %d; want it queued in the canceled waiter's place", again.rec.Code)
		}
		var order []string
		for id := g.next(); id != ""; id = g.next() {
			order = append(order, id)
		}
		if want := []string{"tail", "again"}; !slices.Equal(order, want) {
			t.Errorf("served %v; want %v", order, want)
		}
		for _, c := range []*shedCall{holder, tail, again} {
			c.wantServed(t)
		}
		if n := g.calls.Load(); n != 3 {
			t.Errorf("next served %d requests; want 3 (never the canceled one)", n)
		}
		bhWantStats(t, b, BulkheadStats{Completed: 3})
	})
}

func TestShedInvalidConfig(t *testing.T) {
	b := mustBulkhead(t, BulkheadConfig{Limit: 1})
	ok := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") })
	for _, tc := range []struct {
		name  string
		next  http.Handler
		cfg   ShedConfig
		field string
	}{
		{"nil next", nil, ShedConfig{Bulkhead: b}, "Shed next"},
		{"nil bulkhead", ok, ShedConfig{}, "ShedConfig.Bulkhead"},
		{"negative RetryAfter", ok, ShedConfig{Bulkhead: b, RetryAfter: -time.Second}, "ShedConfig.RetryAfter"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := Shed(tc.next, tc.cfg)
			for range 2 { // every request, not only the first
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
				if rec.Code != http.StatusInternalServerError || !strings.Contains(rec.Body.String(), tc.field) {
					t.Errorf("answered %d %q; want 500 naming %s", rec.Code, rec.Body, tc.field)
				}
			}
		})
	}
	bhWantStats(t, b, BulkheadStats{})
}

func TestShedPanicGivesSlotBack(t *testing.T) {
	b := mustBulkhead(t, BulkheadConfig{Limit: 1, Adaptive: &AdaptiveConfig{}})
	panics := true
	h := Shed(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if panics {
			panic(http.ErrAbortHandler)
		}
		io.WriteString(w, "ok")
	}), ShedConfig{Bulkhead: b})
	func() {
		defer func() {
			if r := recover(); r != http.ErrAbortHandler {
				t.Errorf("recovered %v; want the handler's panic to propagate", r)
			}
		}()
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/", nil))
	}()
	bhWantStats(t, b, BulkheadStats{Completed: 1})
	panics = false
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
	if rec.Code != http.StatusOK || rec.Body.String() != "ok" {
		t.Errorf("after a panic, answered %d %q; want 200 \"ok\"", rec.Code, rec.Body)
	}
	bhWantStats(t, b, BulkheadStats{Completed: 2})
}

func TestShedRejectionsMetric(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reader := withReader(t)
		base := collect(t, reader)
		name := uniqueName("shed-metric")
		b := mustBulkhead(t, BulkheadConfig{Name: name, Limit: 1, MaxQueue: 1})
		g := newShedGate(t)
		h := Shed(g, ShedConfig{Bulkhead: b, Priority: shedPrio})
		holder := shedStart(t, h, "holder", 1)
		g.in()
		w := shedStart(t, h, "w", 1)
		synctest.Wait()
		shedStart(t, h, "z1", 0)
		shedStart(t, h, "z2", 0)
		shedStart(t, h, "neg", -2)
		synctest.Wait()
		n := shedStart(t, h, "n", 4) // displaces w: counted at w's priority, 1
		synctest.Wait()
		w.wantShed(t, "1")

		c := since(base, collect(t, reader))
		wantPoints(t, c, "resilience.shed.rejections", "counter", "{request}",
			"priority=-2,resource_type="+name+"=1",
			"priority=0,resource_type="+name+"=2",
			"priority=1,resource_type="+name+"=1")
		g.drain()
		holder.wantServed(t)
		n.wantServed(t)
	})
}

// An adaptive bulkhead under Shed learns from the handler's latency: its
// limit grows while the handler is fast and fully used, and shrinks when
// the handler slows down tenfold.
func TestShedAdaptiveLimitFollowsHandlerLatency(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reader := withReader(t)
		name := uniqueName("shed-adaptive")
		b := mustBulkhead(t, BulkheadConfig{Name: name, Limit: 20, Adaptive: &AdaptiveConfig{MinLimit: 2, MaxLimit: 40}})
		var latency atomic.Int64
		latency.Store(int64(10 * time.Millisecond))
		var inside, most atomic.Int64
		h := Shed(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			bhRaiseMax(&most, inside.Add(1))
			time.Sleep(time.Duration(latency.Load()))
			inside.Add(-1)
		}), ShedConfig{Bulkhead: b})

		// More clients than MaxLimit, each retrying 1ms after a 503.
		ctx, stop := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		var shed atomic.Int64
		for range 60 {
			wg.Go(func() {
				for ctx.Err() == nil {
					rec := httptest.NewRecorder()
					h.ServeHTTP(rec, httptest.NewRequestWithContext(ctx, http.MethodGet, "/", nil))
					if rec.Code == http.StatusServiceUnavailable {
						shed.Add(1)
						time.Sleep(time.Millisecond)
					}
				}
			})
		}
		time.Sleep(3 * time.Second)
		fast := b.Limit()
		if fast <= 20 {
			t.Errorf("limit %d after 3s of a fast, fully used handler; want above its start, 20", fast)
		}
		latency.Store(int64(100 * time.Millisecond))
		lowest := fast
		for range 60 { // 3s
			time.Sleep(50 * time.Millisecond)
			lowest = min(lowest, b.Limit())
		}
		if lowest > fast/2 {
			t.Errorf("limit fell only to %d from %d within 3s of a 10x slower handler; want at most %d", lowest, fast, fast/2)
		}
		if m := most.Load(); m > 40 {
			t.Errorf("%d requests inside at once; want at most MaxLimit 40", m)
		}
		if shed.Load() == 0 {
			t.Error("no request was shed by 60 clients; want some")
		}
		wantPoints(t, collect(t, reader), "resilience.bulkhead.limit", "gauge", "{call}",
			"resource_type="+name+"="+strconv.Itoa(b.Limit()))
		stop()
		wg.Wait()
		t.Logf("limit: start 20, after the fast phase %d, lowest in the slow phase %d, at the end %d", fast, lowest, b.Limit())
	})
}

// TestShedFlood floods a real server with ten times its capacity: the
// handler never holds more than the limit, health checks (PriorityHighest)
// are never shed, priority 0 is, and a shed request is answered fast.
func TestShedFlood(t *testing.T) {
	const (
		limit    = 8
		clients  = 10 * limit
		requests = 400
		work     = 20 * time.Millisecond
	)
	b := mustBulkhead(t, BulkheadConfig{Name: uniqueName("shed-flood"), Limit: limit, MaxQueue: 2 * limit, MaxWait: 200 * time.Millisecond})
	var inside, most atomic.Int64
	shedHandler := Shed(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		bhRaiseMax(&most, inside.Add(1))
		time.Sleep(work)
		inside.Add(-1)
		io.WriteString(w, "ok")
	}), ShedConfig{Bulkhead: b, Priority: shedPrio})
	// The server side of a shed answer: Shed's own time, without the
	// network and the client.
	var serverMu sync.Mutex
	var serverShed []time.Duration
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &shedStatusWriter{ResponseWriter: w}
		shedHandler.ServeHTTP(sw, r)
		if sw.code == http.StatusServiceUnavailable {
			d := time.Since(start)
			serverMu.Lock()
			serverShed = append(serverShed, d)
			serverMu.Unlock()
		}
	}))
	defer srv.Close()
	tr := &http.Transport{MaxIdleConns: clients, MaxIdleConnsPerHost: clients}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}

	type result struct {
		prio int
		code int
		took time.Duration
	}
	results := make([]result, requests)
	var next atomic.Int64
	var wg sync.WaitGroup
	begin := time.Now()
	for range clients {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < requests; i = int(next.Add(1) - 1) {
				prio := 0
				switch i % 10 {
				case 0:
					prio = PriorityHighest // a health check
				case 1, 2:
					prio = 1
				}
				req, _ := http.NewRequest(http.MethodGet, srv.URL, nil)
				req.Header.Set("Prio", strconv.Itoa(prio))
				start := time.Now()
				resp, err := client.Do(req)
				if err != nil {
					t.Errorf("request %d: %v", i, err)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				results[i] = result{prio, resp.StatusCode, time.Since(start)}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(begin)

	if m := most.Load(); m > limit || m < 1 {
		t.Errorf("most requests in the handler at once = %d; want 1..%d", m, limit)
	}
	served := map[int]int{}
	shedBy := map[int]int{}
	var shedTook []time.Duration
	for i, r := range results {
		switch r.code {
		case http.StatusOK:
			served[r.prio]++
		case http.StatusServiceUnavailable:
			shedBy[r.prio]++
			shedTook = append(shedTook, r.took)
		case 0: // the request failed, reported above
		default:
			t.Errorf("request %d (priority %d) answered %d; want 200 or 503", i, r.prio, r.code)
		}
	}
	if n := shedBy[PriorityHighest]; n != 0 {
		t.Errorf("%d health checks (PriorityHighest) shed; want none", n)
	}
	if shedBy[0] == 0 {
		t.Errorf("no priority-0 request shed under 10x load; want some (served %v)", served)
	}
	if served[PriorityHighest] != requests/10 {
		t.Errorf("%d health checks served; want all %d", served[PriorityHighest], requests/10)
	}
	t.Logf("%d requests from %d clients in %v: served by priority %v, shed by priority %v; most in the handler at once %d (limit %d)",
		requests, clients, elapsed.Round(time.Millisecond), shedMap(served), shedMap(shedBy), most.Load(), limit)
	serverMu.Lock()
	defer serverMu.Unlock()
	if len(shedTook) > 0 {
		t.Logf("time to answer a shed request, client side (loopback round trip): median %v, p99 %v, max %v (n=%d)",
			shedQuantile(shedTook, 0.5), shedQuantile(shedTook, 0.99), shedQuantile(shedTook, 1), len(shedTook))
		t.Logf("time to answer a shed request, server side (Shed alone): median %v, p99 %v, max %v (n=%d)",
			shedQuantile(serverShed, 0.5), shedQuantile(serverShed, 0.99), shedQuantile(serverShed, 1), len(serverShed))
	}
}

type shedStatusWriter struct {
	http.ResponseWriter
	code int
}

func (w *shedStatusWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

// shedMap prints a map by priority with PriorityHighest spelled out.
func shedMap(m map[int]int) string {
	var parts []string
	for _, p := range []int{PriorityHighest, 1, 0} {
		name := strconv.Itoa(p)
		if p == PriorityHighest {
			name = "highest"
		}
		parts = append(parts, name+":"+strconv.Itoa(m[p]))
	}
	return strings.Join(parts, " ")
}

// shedQuantile returns the q-quantile of ds (nearest rank), sorting ds.
func shedQuantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	i := int(math.Ceil(q*float64(len(ds)))) - 1
	return ds[max(0, min(i, len(ds)-1))]
}

// Reproductions of bugs found while writing these tests. Each fails until
// its bug is fixed.

// A request waiting for a slot when its registry is switched off is let
// through without one (bypassWaiters), as every later request is; Shed
// takes the bypass for a client that went away and returns without
// calling next or answering: the client gets an empty 200.
func TestShedSwitchOffDropsWaitingRequest(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := mustRegistry(t, map[string]string{"BULKHEAD_SHEDSW_LIMIT": "1"})
		b := r.Bulkhead("shedsw")
		g := newShedGate(t)
		h := Shed(g, ShedConfig{Bulkhead: b, Priority: shedPrio})
		holder := shedStart(t, h, "holder", 1)
		g.in()
		w := shedStart(t, h, "w", 1)
		synctest.Wait()
		if w.finished() {
			t.Fatalf("w answered %d; want it waiting", w.rec.Code)
		}
		cfg := r.Config()
		cfg.Enabled = false
		if err := r.Reload(cfg); err != nil {
			t.Fatal(err)
		}
		// Later requests pass straight through.
		later := shedStart(t, h, "later", 0)
		got := g.in()
		slices.Sort(got)
		if want := []string{"later", "w"}; !slices.Equal(got, want) {
			t.Errorf("after the switch-off, %v entered next; want %v", got, want)
		}
		g.drain()
		for _, c := range []*shedCall{holder, w, later} {
			c.wantServed(t)
		}
	})
}

// A newcomer whose client has already gone away displaces the lowest
// waiter of a full queue (which is answered 503) before admit sees the
// canceled context; the newcomer then leaves too, so a request was shed
// for a place nobody took.
func TestShedCanceledNewcomerShedsWaiter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Limit: 1, MaxQueue: 1})
		g := newShedGate(t)
		h := Shed(g, ShedConfig{Bulkhead: b, Priority: shedPrio})
		holder := shedStart(t, h, "holder", 1)
		g.in()
		w := shedStart(t, h, "w", 1)
		synctest.Wait()
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		gone := shedStartCtx(t, ctx, cancel, h, "gone", 2)
		synctest.Wait()
		if !gone.finished() {
			t.Fatal("a request with a canceled context waits; want it gone")
		}
		if w.finished() {
			t.Errorf("w answered %d when a canceled request arrived; want it still waiting", w.rec.Code)
		}
		bhWantStats(t, b, BulkheadStats{Active: 1, Waiting: 1})
		g.drain()
		holder.wantServed(t)
		if w.rec.Code != http.StatusServiceUnavailable {
			w.wantServed(t)
		}
	})
}

// PriorityHighest is "never shed, however long it takes", but a request
// whose context carries the package's own timeout cause (TimeoutContext
// in a server middleware) is answered 503 when that deadline passes in
// the queue, and counted as a shed request of priority PriorityHighest:
// wait turns an ErrTimeout cause into ErrBulkheadFull.
func TestShedPriorityHighestShedOnTimeoutCause(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Limit: 1})
		g := newShedGate(t)
		h := Shed(g, ShedConfig{Bulkhead: b, Priority: shedPrio})
		holder := shedStart(t, h, "holder", 1)
		g.in()
		ctx, cancel := context.WithTimeoutCause(context.Background(), time.Second, ErrTimeout)
		top := shedStartCtx(t, ctx, cancel, h, "top", PriorityHighest)
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if !top.finished() {
			t.Fatal("a request whose deadline passed still waits; want it gone")
		}
		if top.rec.Code == http.StatusServiceUnavailable {
			t.Errorf("PriorityHighest answered 503 (shed) when its deadline passed; want it never shed")
		}
		g.drain()
		holder.wantServed(t)
	})
}

// ShedConfig.RetryAfter is rounded up to whole seconds by adding a second
// less a nanosecond, which overflows for a RetryAfter near the largest
// Duration: the header is then negative. validate accepts any RetryAfter
// not below 0.
func TestShedRetryAfterHugeOverflows(t *testing.T) {
	b := mustBulkhead(t, BulkheadConfig{Limit: 1})
	release, err := b.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	h := Shed(http.NotFoundHandler(), ShedConfig{Bulkhead: b, RetryAfter: math.MaxInt64})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
	ra := rec.Header().Get("Retry-After")
	if n, err := strconv.ParseInt(ra, 10, 64); err != nil || n < 1 {
		t.Errorf("Retry-After %q for RetryAfter %v; want a positive number of seconds", ra, time.Duration(math.MaxInt64))
	}
}
