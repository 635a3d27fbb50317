package resilience

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The criterion for hedging, against a real loopback server: where
// 5% of requests hang 1s and the rest take about 5ms, a hedge with Delay
// 20ms brings the p99 below 60ms (above 1s without it), and with the hedge's
// budget of 0.1 the server sees at most 1.1x the requests of the unhedged
// run. The figures are in docs/RELIABILITY.md, "Hedging the tail".

const (
	tailRequests = 400
	tailWorkers  = 4
	tailEvery    = 20 // every 20th request the server receives hangs: 5%
	tailHang     = time.Second
	tailWork     = 5 * time.Millisecond
)

// tailServer holds each request it receives for the time delay gives for
// its number in order of arrival (1 for the first), or until the client
// goes away, and then answers "ok". Going by arrival, not by request, a
// hedge of a hung request is an attempt like any other: with
// tailDelay, 5% of the attempts hang, whoever sends them.
type tailServer struct {
	*httptest.Server
	requests atomic.Int64 // received
	hung     atomic.Int64 // held for tailHang
	gone     atomic.Int64 // of those, ended early by the client going away
}

// tailDelay hangs every tailEvery-th request and answers the others after
// tailWork.
func tailDelay(n int64) time.Duration {
	if n%tailEvery == 0 {
		return tailHang
	}
	return tailWork
}

func newTailServer(t *testing.T, delay func(n int64) time.Duration) *tailServer {
	s := &tailServer{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		d := delay(s.requests.Add(1))
		if d == tailHang {
			s.hung.Add(1)
		}
		tm := time.NewTimer(d)
		defer tm.Stop()
		select {
		case <-tm.C:
			io.WriteString(w, "ok")
		case <-r.Context().Done():
			// A hedge won: the losing request is cancelled, and the
			// server stops holding it.
			if d == tailHang {
				s.gone.Add(1)
			}
		}
	}))
	t.Cleanup(s.Close)
	return s
}

// tailRun is what one run measured.
type tailRun struct {
	p50, p99, max time.Duration // of the requests, client-side
	elapsed       time.Duration // of the whole run
	serverSeen    int64         // requests the server received
	hung, gone    int64         // as the tailServer counts them
	breaker       BreakerCounts // of the service, after the run
	bulkhead      BulkheadStats // of the service, after the run
}

// runTail sends n GETs from tailWorkers workers, through a Transport over
// a registry with env, to a tailServer with delay, and measures each
// request from before Do to its body read and closed.
func runTail(t *testing.T, n int, delay func(int64) time.Duration, env map[string]string) tailRun {
	t.Helper()
	srv := newTailServer(t, delay)
	// A base of its own: http.DefaultTransport keeps 2 idle connections
	// per host, fewer than the workers and their hedges need, and the
	// dials it would make instead would be part of the latencies.
	base := http.DefaultTransport.(*http.Transport).Clone()
	base.MaxIdleConnsPerHost = 4 * tailWorkers
	t.Cleanup(base.CloseIdleConnections)
	full := map[string]string{
		// One attempt per request: the server's count is then requests
		// plus hedges. A 5s per-attempt timeout never cuts the 1s hang.
		"RETRY_MAX_ATTEMPTS": "1",
		"TIMEOUT_DEFAULT":    "5",
	}
	for k, v := range env {
		full[k] = v
	}
	reg := mustRegistry(t, full)
	c := &http.Client{Transport: &Transport{
		Base:     base,
		Registry: reg,
		Service:  func(*http.Request) string { return "tail" },
	}}

	lat := make([]time.Duration, n)
	errs := make([]error, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range tailWorkers {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				t0 := time.Now()
				resp, err := c.Get(srv.URL)
				if err == nil {
					var body []byte
					body, err = io.ReadAll(resp.Body)
					resp.Body.Close()
					if err == nil && (resp.StatusCode != http.StatusOK || string(body) != "ok") {
						err = fmt.Errorf("%s %q; want 200 \"ok\"", resp.Status, body)
					}
				}
				lat[i], errs[i] = time.Since(t0), err
			}
		})
	}
	wg.Wait()
	run := tailRun{elapsed: time.Since(start)}
	for i, err := range errs {
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	slices.Sort(lat)
	run.p50, run.p99, run.max = tailQuantile(lat, 0.50), tailQuantile(lat, 0.99), lat[len(lat)-1]
	// The losers' handlers may still be seeing their clients go: wait
	// for every handler to return before reading the server's counts.
	srv.Close()
	run.serverSeen, run.hung, run.gone = srv.requests.Load(), srv.hung.Load(), srv.gone.Load()
	run.breaker, run.bulkhead = reg.CircuitBreaker("tail").Counts(), reg.Bulkhead("tail").Stats()
	return run
}

// tailQuantile returns the q quantile of sorted: the element at index
// ceil(q*n)-1.
func tailQuantile(sorted []time.Duration, q float64) time.Duration {
	return sorted[max(int(math.Ceil(q*float64(len(sorted))))-1, 0)]
}

func TestHedgeCutsTheTail(t *testing.T) {
	if testing.Short() {
		t.Skip("about 6s, most of it the unhedged run waiting out its hangs")
	}
	plain := runTail(t, tailRequests, tailDelay, nil)
	hedged := runTail(t, tailRequests, tailDelay, map[string]string{
		"HEDGE_TAIL_DELAY":  "0.02",
		"HEDGE_TAIL_BUDGET": "0.1",
	})
	ratio := float64(hedged.serverSeen) / float64(plain.serverSeen)
	t.Logf("race=%v: %d GETs from %d workers; every %dth request the server receives hangs %v, the others take %v",
		raceEnabled, tailRequests, tailWorkers, tailEvery, tailHang, tailWork)
	t.Logf("unhedged: p50=%v p99=%v max=%v; server requests=%d (hung %d) in %v",
		tailRound(plain.p50), tailRound(plain.p99), tailRound(plain.max),
		plain.serverSeen, plain.hung, plain.elapsed.Round(time.Millisecond))
	t.Logf("hedged (delay 20ms, budget 0.1): p50=%v p99=%v max=%v; server requests=%d (hedges %d, hung %d, cancelled %d) in %v; %.3fx the unhedged",
		tailRound(hedged.p50), tailRound(hedged.p99), tailRound(hedged.max),
		hedged.serverSeen, hedged.bulkhead.Completed-tailRequests, hedged.hung, hedged.gone,
		hedged.elapsed.Round(time.Millisecond), ratio)

	if plain.p99 < tailHang {
		t.Errorf("unhedged p99 = %v; want at least the %v hang", plain.p99, tailHang)
	}
	if hedged.p99 >= 60*time.Millisecond {
		t.Errorf("hedged p99 = %v; want below 60ms", hedged.p99)
	}
	if ratio > 1.1 {
		t.Errorf("hedged run: the server saw %d requests, %.3fx the unhedged %d; want at most 1.1x",
			hedged.serverSeen, ratio, plain.serverSeen)
	}
	for _, r := range []struct {
		name string
		run  tailRun
	}{{"unhedged", plain}, {"hedged", hedged}} {
		// The breaker sees one outcome per call, however many attempts
		// the hedge sent; every attempt gave its slot back.
		if got := r.run.breaker.Requests; got != tailRequests {
			t.Errorf("%s: breaker counted %d requests; want %d, one per call", r.name, got, tailRequests)
		}
		if b := r.run.bulkhead; b.Active != 0 || b.Waiting != 0 || b.Rejected != 0 {
			t.Errorf("%s: bulkhead %+v after the run; want nothing active, waiting or rejected", r.name, b)
		}
	}
}

// At a low rate the hedge's budget still holds to its ratio: HEDGE_<SVC>_BUDGET
// makes a RetryBudget with no floor (a retry budget's default floor of 10/s
// over 10s would let 100 hedges through before the ratio counts, 1.6x the
// calls here). Every request is slower than the delay, so every call asks
// for a hedge: the budget lets through at most 0.1 per call.
func TestHedgeBudgetHoldsItsRatioAtLowRate(t *testing.T) {
	const (
		n     = 200
		ratio = 0.1
		floor = 0 // none, for a hedge budget
	)
	run := runTail(t, n, func(int64) time.Duration { return 30 * time.Millisecond }, map[string]string{
		"HEDGE_TAIL_DELAY":  "0.02",
		"HEDGE_TAIL_BUDGET": "0.1",
	})
	// Attempts that held a bulkhead slot: the calls and the hedges sent,
	// whether or not a hedge reached the server before it was cancelled.
	hedges := int(run.bulkhead.Completed) - n
	bound := floor + int(ratio*n)
	t.Logf("race=%v: %d GETs of 30ms each from %d workers in %v, hedged after 20ms with budget 0.1: %d hedges sent (bound %d = floor %d + %.1f × %d calls), server requests=%d, %.3fx the calls",
		raceEnabled, n, tailWorkers, run.elapsed.Round(time.Millisecond), hedges, bound, floor, ratio, n,
		run.serverSeen, float64(run.serverSeen)/n)
	if hedges > bound {
		t.Errorf("%d hedges sent; want at most %d, the budget's floor and ratio", hedges, bound)
	}
	if hedges >= n {
		t.Errorf("%d hedges sent for %d calls; want the budget to refuse some", hedges, n)
	}
}

// tailRound rounds a latency for the log.
func tailRound(d time.Duration) time.Duration { return d.Round(10 * time.Microsecond) }
