package chaos

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
)

// TestLatencySpikeAndHang: the downstream's latency jumps from 1ms to
// 150ms, and three requests in ten hang until the client gives up, for a
// second. The protected function ignores its context (its HTTP client gives
// up only after its own 1s timeout), so only an enforced timeout can return
// on time. Timeouts fire and return on time, the bulkhead sheds what the
// abandoned attempts leave no room for, and the goroutines and heap stay
// bounded during the spike and come back to the baseline after it.
func TestLatencySpikeAndHang(t *testing.T) {
	const (
		workers      = 16
		pace         = 5 * time.Millisecond
		timeout      = 50 * time.Millisecond
		limit        = 8
		clientGiveUp = time.Second
	)
	d := startDownstream(t,
		Phase{Name: "baseline", Fault: Fault{Latency: time.Millisecond, Jitter: time.Millisecond}, For: 300 * time.Millisecond},
		Phase{Name: "spike", Fault: Fault{
			Latency: 150 * time.Millisecond, Jitter: 50 * time.Millisecond, HangRate: 0.3,
		}, For: time.Second},
		Phase{Name: "recovered", Fault: Fault{Latency: time.Millisecond, Jitter: time.Millisecond}},
	)
	client := newClient(t, clientGiveUp)
	bh, err := resilience.NewBulkhead(resilience.BulkheadConfig{Name: "chaos-spike", Limit: limit, FailFast: true})
	if err != nil {
		t.Fatal(err)
	}
	// fn ignores ctx: the request lives until the downstream answers or
	// the client's own timeout.
	ignoring := func(context.Context) (Result, error) {
		return doGet(context.Background(), client, d.URL())
	}
	call := resilience.Compose(ignoring, resilience.Stack[Result]{
		Name: "chaos.spike", Timeout: timeout, EnforceTimeout: true, Bulkhead: bh,
	})

	runtime.GC()
	baseG, baseHeap := goroutines(), heapInuse()

	// Sample goroutines and heap while the load runs.
	var peakG atomic.Int64
	var peakHeap atomic.Uint64
	stopMon := make(chan struct{})
	var mon sync.WaitGroup
	mon.Go(func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			if g := int64(runtime.NumGoroutine()); g > peakG.Load() {
				peakG.Store(g)
			}
			if h := heapInuse(); h > peakHeap.Load() {
				peakHeap.Store(h)
			}
			select {
			case <-stopMon:
				return
			case <-tick.C:
			}
		}
	})

	type sample struct {
		kind  string
		took  time.Duration
		phase int
	}
	var (
		mu      sync.Mutex
		samples []sample
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			tick := time.NewTicker(pace)
			defer tick.Stop()
			var local []sample
			defer func() {
				mu.Lock()
				samples = append(samples, local...)
				mu.Unlock()
			}()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				phase := d.Current()
				start := time.Now()
				_, err := call(context.Background())
				took := time.Since(start)
				if err != nil && !typed(err) {
					t.Errorf("untyped error %v", err)
				}
				local = append(local, sample{errorKind(err), took, phase})
			}
		})
	}
	// The load runs through the spike and 300ms of recovery.
	select {
	case <-d.Entered(2):
	case <-time.After(5 * time.Second):
		t.Fatal("the spike did not end")
	}
	time.Sleep(300 * time.Millisecond) // the length of the recovered load, not a synchronisation
	close(stop)
	wg.Wait()
	close(stopMon)
	mon.Wait()

	// After the spike: the abandoned attempts end when their client gives
	// up, and the bulkhead empties.
	drainStart := time.Now()
	if !waitFor(3*clientGiveUp, func() bool { return bh.Stats().Active == 0 }) {
		t.Errorf("bulkhead still has %d calls inside %v after the load", bh.Stats().Active, 3*clientGiveUp)
	}
	drained := time.Since(drainStart)
	client.Transport.(interface{ CloseIdleConnections() }).CloseIdleConnections()
	var afterG int
	waitFor(2*time.Second, func() bool { afterG = goroutines(); return afterG <= baseG+2 })
	runtime.GC()
	afterHeap := heapInuse()

	var spikeTimeouts, spikeShed, spikeOK, total int
	var timedOut []time.Duration
	var maxTook time.Duration
	for _, s := range samples {
		total++
		maxTook = max(maxTook, s.took)
		if s.kind == "timeout" {
			timedOut = append(timedOut, s.took)
		}
		if s.phase != 1 {
			continue
		}
		switch s.kind {
		case "timeout":
			spikeTimeouts++
		case "bulkhead_full":
			spikeShed++
		case "ok":
			spikeOK++
		}
	}
	timedOut = sortedCopy(timedOut)
	if spikeTimeouts == 0 {
		t.Error("no timeout fired during the spike")
	}
	if spikeShed == 0 {
		t.Error("the bulkhead shed nothing during the spike")
	}
	// On time: the hung requests last 1s, the enforced timeout is 50ms.
	onTime := timeout + 100*time.Millisecond
	if raceEnabled {
		onTime = timeout + 250*time.Millisecond
	}
	if maxTook > onTime {
		t.Errorf("slowest call took %v; want at most %v with an enforced %v timeout", maxTook, onTime, timeout)
	}
	// Bounded: each of the limit slots holds at most an abandoned
	// goroutine, a client connection (2) and a server connection with
	// its handler (2); the workers and idle connections add the rest.
	if grew := int(peakG.Load()) - baseG; grew > workers+limit*5+workers*3+20 {
		t.Errorf("goroutines grew by %d during the spike; want a bound independent of the %d calls", grew, total)
	}
	if afterG > baseG+2 {
		t.Errorf("goroutines after the spike = %d; baseline %d", afterG, baseG)
	}
	if grew := mib(peakHeap.Load()) - mib(baseHeap); grew > 64 {
		t.Errorf("heap in use grew by %.1f MiB during the spike", grew)
	}
	if afterHeap > baseHeap+8<<20 {
		t.Errorf("heap in use after the spike = %.1f MiB; baseline %.1f MiB", mib(afterHeap), mib(baseHeap))
	}
	report(t, "latency_spike",
		"calls", total,
		"spike_ok", spikeOK,
		"spike_timeouts", spikeTimeouts,
		"spike_shed_bulkhead_full", spikeShed,
		"downstream_hung", d.Stats().Hung,
		"timeout", timeout,
		"timed_out_call_p50", percentile(timedOut, 0.5),
		"timed_out_call_p99", percentile(timedOut, 0.99),
		"slowest_call", maxTook,
		"goroutines_baseline", baseG,
		"goroutines_peak", peakG.Load(),
		"goroutines_after", afterG,
		"heap_inuse_baseline_mib", round(mib(baseHeap), 2),
		"heap_inuse_peak_mib", round(mib(peakHeap.Load()), 2),
		"heap_inuse_after_mib", round(mib(afterHeap), 2),
		"bulkhead_drained_after_load", drained,
	)
}
