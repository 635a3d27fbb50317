package chaos

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
)

// TestOutage: the downstream answers 503 for a window, then recovers. One
// caller calls through a breaker, a retry and a timeout at a steady pace.
// The breaker opens after FailMax failed calls; while it is open the
// downstream sees nothing but the half-open probes; once the downstream is
// back, the breaker closes within OpenTimeout and one probe.
func TestOutage(t *testing.T) {
	const (
		failMax     = 5
		openTimeout = 300 * time.Millisecond
		maxAttempts = 2
		pace        = 5 * time.Millisecond
		outage      = time.Second
	)
	d := startDownstream(t,
		Phase{Name: "healthy", For: 200 * time.Millisecond},
		Phase{Name: "outage", Fault: Fault{Outage: true}, For: outage},
		Phase{Name: "recovered"},
	)
	client := newClient(t, 2*time.Second)

	type transition struct {
		at       time.Time
		from, to resilience.State
	}
	var (
		mu          sync.Mutex
		transitions []transition
		notClosed   atomic.Bool  // the state as OnStateChange tells it
		whileOpen   atomic.Int64 // attempts that reached fn while not closed
	)
	cb, err := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{
		Name: "chaos-outage", FailMax: failMax, OpenTimeout: openTimeout,
		OnStateChange: func(_ string, from, to resilience.State) {
			mu.Lock()
			transitions = append(transitions, transition{time.Now(), from, to})
			mu.Unlock()
			notClosed.Store(to != resilience.StateClosed)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	rt, err := resilience.NewRetry(resilience.RetryConfig{
		MaxAttempts: maxAttempts, InitialDelay: 2 * time.Millisecond, MaxDelay: 10 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	fn := func(ctx context.Context) (Result, error) {
		if notClosed.Load() {
			whileOpen.Add(1)
		}
		return doGet(ctx, client, d.URL())
	}
	call := resilience.Compose(fn, resilience.Stack[Result]{
		Name: "chaos.outage", CircuitBreaker: cb, Retry: rt, Timeout: 500 * time.Millisecond,
	})

	// One caller: every transition is delivered in its goroutine before
	// fn is entered, so notClosed is exact at every attempt.
	var (
		callsInOutage, rejectedInOutage, failedBeforeOpen int
		closedAfterRecovery                               time.Time
		successesAfter                                    int
	)
	ticker := time.NewTicker(pace)
	defer ticker.Stop()
	deadline := time.After(5 * time.Second)
loop:
	for {
		select {
		case <-ticker.C:
		case <-deadline:
			t.Fatal("the breaker did not close within 5s of the start")
		}
		phase := d.Current()
		mu.Lock()
		openedBefore := len(transitions) > 0
		mu.Unlock()
		_, err := call(context.Background())
		if err != nil && !errors.Is(err, resilience.ErrCircuitOpen) && !errors.Is(err, ErrDownstream) {
			t.Fatalf("call: untyped error %v", err)
		}
		mu.Lock()
		opened := len(transitions) > 0
		mu.Unlock()
		if phase == 1 {
			callsInOutage++
			if errors.Is(err, resilience.ErrCircuitOpen) {
				rejectedInOutage++
			}
		}
		// Whatever the phase when it started: a call begun just before
		// the outage may meet it.
		if err != nil && !openedBefore {
			failedBeforeOpen++
		}
		if phase == 2 && cb.State() == resilience.StateClosed && opened {
			if closedAfterRecovery.IsZero() {
				closedAfterRecovery = time.Now()
			}
			if err != nil {
				t.Fatalf("call after the breaker closed: %v", err)
			}
			if successesAfter++; successesAfter == 20 {
				break loop
			}
		}
	}

	mu.Lock()
	defer mu.Unlock()
	outageStart, recovery := d.Started(1), d.Started(2)
	var openedAt, closedAt time.Time
	probes := 0
	for i, tr := range transitions {
		if i > 0 && tr.from != transitions[i-1].to {
			t.Errorf("transition %d: from %v, but the previous went to %v", i, tr.from, transitions[i-1].to)
		}
		switch {
		case tr.to == resilience.StateOpen && openedAt.IsZero():
			openedAt = tr.at
		case tr.to == resilience.StateHalfOpen:
			probes++
		case tr.to == resilience.StateClosed:
			closedAt = tr.at
		}
	}
	if openedAt.IsZero() || closedAt.IsZero() {
		t.Fatalf("transitions %v: want open, then closed", transitions)
	}
	timeToOpen := openedAt.Sub(outageStart)
	mttr := closedAt.Sub(recovery)
	outageStats := d.PhaseStats(1)

	if failedBeforeOpen != failMax {
		t.Errorf("calls failed before the breaker opened = %d; want FailMax = %d", failedBeforeOpen, failMax)
	}
	// Open or half-open, the downstream sees only the probes: one call per
	// half-open period, and each probe call may retry.
	if got, limit := whileOpen.Load(), int64(probes*maxAttempts); got > limit {
		t.Errorf("attempts while not closed = %d; want at most %d probes x %d attempts = %d", got, probes, maxAttempts, limit)
	}
	if got, limit := outageStats.Received, int64((failMax+probes)*maxAttempts); got > limit {
		t.Errorf("downstream requests during the outage = %d; want at most (FailMax + probes) x attempts = %d", got, limit)
	}
	slack := 150 * time.Millisecond
	if raceEnabled {
		slack = 300 * time.Millisecond
	}
	if mttr > openTimeout+pace+slack {
		t.Errorf("time to close after recovery = %v; want at most OpenTimeout %v + one probe (%v slack)", mttr, openTimeout, pace+slack)
	}
	report(t, "outage",
		"fail_max", failMax,
		"open_timeout", openTimeout,
		"outage_window", recovery.Sub(outageStart),
		"caller_calls_during_outage", callsInOutage,
		"rejected_during_outage", rejectedInOutage,
		"downstream_requests_during_outage", outageStats.Received,
		"failed_calls_before_open", failedBeforeOpen,
		"half_open_probes", probes,
		"attempts_while_open_or_half_open", whileOpen.Load(),
		"time_to_open", timeToOpen,
		"time_to_close_mttr", mttr,
	)
}
