package resilience

import (
	"context"
	"errors"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// Regressions found by the second review of the breaker triggers, each
// named after what broke.

type transLog struct {
	mu sync.Mutex
	s  []string
}

func (l *transLog) add(_ string, from, to State) {
	l.mu.Lock()
	l.s = append(l.s, from.String()+"->"+to.String())
	l.mu.Unlock()
}

func (l *transLog) get() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.s)
}

// R1: a reshape while a longer open period holds the breaker leaves the new

// gobreaker closed: when the hold ends every call goes through, no half-open.

func TestReloadReshapeDuringHoldKeepsHalfOpen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var tl transLog
		env := map[string]string{"CIRCUIT_BREAKER_LLM_FAIL_MAX": "1", "CIRCUIT_BREAKER_LLM_TIMEOUT": "1", "RETRY_MAX_ATTEMPTS": "1"}
		cfg, err := LoadConfigWith(LoadOptions{Environment: env})
		if err != nil {
			t.Fatal(err)
		}
		c := cfg.CircuitBreakers["LLM"]
		c.DisableLogging, c.OnStateChange = true, tl.add
		cfg.CircuitBreakers["LLM"] = c
		reg, err := NewRegistry(cfg)
		if err != nil {
			t.Fatal(err)
		}
		cb := reg.CircuitBreaker("llm")
		// A 429 asking for 5s opens the breaker for 5s: longer than its 1s OpenTimeout.
		WithCircuitBreaker(func(context.Context) (int, error) { return 0, hinted(5 * time.Second) }, cb)(context.Background())
		env["CIRCUIT_BREAKER_LLM_TIMEOUT"] = "2" // a reshape
		cfg2, err := LoadConfigWith(LoadOptions{Environment: env})
		if err != nil {
			t.Fatal(err)
		}
		if err := reg.Reload(cfg2); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5*time.Second + time.Millisecond)
		block := make(chan struct{})
		var ran atomic.Int32
		fn := WithCircuitBreaker(func(context.Context) (int, error) { ran.Add(1); <-block; return 1, nil }, cb)
		for range 3 {
			go fn(context.Background())
		}
		synctest.Wait()
		if n := ran.Load(); n != 1 {
			t.Errorf("%d calls let through after the open period; want 1 probe (State() %v, reported %v)", n, cb.State(), cb.lastState())
		}
		close(block)
		synctest.Wait()
		if want := []string{"closed->open", "open->half-open", "half-open->closed"}; !slices.Equal(tl.get(), want) {
			t.Errorf("transitions %v, reported state %v; want %v", tl.get(), cb.lastState(), want)
		}
	})
}

// R2: a reload of a breaker whose open period ended with no call since

// opens it again for a whole OpenTimeout.

func TestReloadReshapeAfterOpenPeriodEndedDoesNotReopen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Minute, DisableLogging: true}
		cb := mustBreaker(t, cfg)
		WithCircuitBreaker(failFunc, cb)(context.Background())
		time.Sleep(10 * time.Minute) // no traffic: nobody asked gobreaker
		cfg.HalfOpenMaxCalls = 2     // a reshape
		if err := cb.reconfigure(cfg); err != nil {
			t.Fatal(err)
		}
		cb.flush()
		if _, err := WithCircuitBreaker(okFunc, cb)(context.Background()); err != nil {
			t.Errorf("10m after a 1m open, a Reload: %v (OpenPeriod %v, RetryAfter %v); want the call let through", err, cb.OpenPeriod(), cb.untilProbe())
		}
	})
}

// R3: a Goexit of a probe from an earlier half-open period reopens a later

// half-open period (gobreaker would drop that stale outcome).

func TestCircuitBreakerStaleProbeGoexitIgnored(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var tl transLog
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, HalfOpenMaxCalls: 2, DisableLogging: true, OnStateChange: tl.add})
		WithCircuitBreaker(failFunc, cb)(context.Background())
		time.Sleep(time.Second + time.Millisecond)
		release := make(chan struct{})
		go WithCircuitBreaker(func(context.Context) (int, error) { <-release; runtime.Goexit(); return 0, nil }, cb)(context.Background())
		synctest.Wait()
		WithCircuitBreaker(failFunc, cb)(context.Background()) // the other probe fails: open
		time.Sleep(time.Second + time.Millisecond)
		if s := cb.State(); s != StateHalfOpen {
			t.Fatalf("state %v; want half-open", s)
		}
		close(release) // the probe of the first half-open period Goexits
		synctest.Wait()
		if s := cb.State(); s != StateHalfOpen {
			t.Errorf("state %v after a stale probe's Goexit; want still half-open; transitions %v", s, tl.get())
		}
	})
}

// R4: a Goexit of a call admitted in an earlier closed period counts as a

// failure of the current closed period.

func TestCircuitBreakerStaleClosedGoexitIgnored(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var tl transLog
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, DisableLogging: true, OnStateChange: tl.add})
		release := make(chan struct{})
		go WithCircuitBreaker(func(context.Context) (int, error) { <-release; runtime.Goexit(); return 0, nil }, cb)(context.Background())
		synctest.Wait()
		WithCircuitBreaker(failFunc, cb)(context.Background()) // open
		time.Sleep(time.Second + time.Millisecond)
		WithCircuitBreaker(okFunc, cb)(context.Background()) // probe succeeds: closed
		if s := cb.State(); s != StateClosed {
			t.Fatalf("state %v; want closed", s)
		}
		close(release)
		synctest.Wait()
		if s := cb.State(); s != StateClosed {
			t.Errorf("state %v after the Goexit of a call admitted before the open; want closed; transitions %v", s, tl.get())
		}
	})
}

// R5: with an enforced timeout the slow-call timing includes the wait for

// the bulkhead slot.

// R6: a bulkhead nested inside a breaker's function (hand-nested

// wrappers) rejecting a call now counts as a failure of the downstream.

func TestCircuitBreakerNestedBulkheadFullNotCounted(t *testing.T) {
	cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, DisableLogging: true})
	bh := mustBulkhead(t, BulkheadConfig{Limit: 1, FailFast: true})
	rel, err := bh.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer rel()
	fn := WithCircuitBreaker(WithBulkhead(okFunc, bh), cb)
	if _, err := fn(context.Background()); !errors.Is(err, ErrBulkheadFull) {
		t.Fatalf("%v; want ErrBulkheadFull", err)
	}
	if s := cb.State(); s != StateClosed {
		t.Errorf("state %v after a local bulkhead rejection; want closed: the downstream was never called", s)
	}
}

// R7: a Reload that reshapes a breaker whose longer open period has ended

// with no call since delivers the late open->half-open under the registry's

// lock: a callback that calls the registry deadlocks.

func TestReloadDeliversNoTransitionUnderRegistryLock(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		env := map[string]string{"CIRCUIT_BREAKER_LLM_FAIL_MAX": "1", "CIRCUIT_BREAKER_LLM_TIMEOUT": "1", "RETRY_MAX_ATTEMPTS": "1"}
		cfg, err := LoadConfigWith(LoadOptions{Environment: env})
		if err != nil {
			t.Fatal(err)
		}
		var reg *Registry
		var underLock []string
		c := cfg.CircuitBreakers["LLM"]
		c.DisableLogging = true
		c.OnStateChange = func(_ string, from, to State) {
			if !reg.mu.TryLock() {
				underLock = append(underLock, from.String()+"->"+to.String())
				return
			}
			reg.mu.Unlock()
		}
		cfg.CircuitBreakers["LLM"] = c
		reg, err = NewRegistry(cfg)
		if err != nil {
			t.Fatal(err)
		}
		cb := reg.CircuitBreaker("llm")
		go WithCircuitBreaker(func(context.Context) (int, error) { time.Sleep(2 * time.Second); return 1, nil }, cb)(context.Background())
		synctest.Wait()
		WithCircuitBreaker(func(context.Context) (int, error) { return 0, hinted(5 * time.Second) }, cb)(context.Background())
		time.Sleep(10 * time.Second) // the in-flight call returned during the hold; no call since
		synctest.Wait()
		env["CIRCUIT_BREAKER_LLM_TIMEOUT"] = "2" // a reshape
		cfg2, err := LoadConfigWith(LoadOptions{Environment: env})
		if err != nil {
			t.Fatal(err)
		}
		if err := reg.Reload(cfg2); err != nil {
			t.Fatal(err)
		}
		if len(underLock) > 0 {
			t.Errorf("OnStateChange called under the registry's lock for %v: a callback that calls the registry deadlocks", underLock)
		}
	})
}

// R7b: the same, with a callback that calls the registry: Reload never returns.

func TestReloadDoesNotDeadlockWithCallbackUsingRegistry(t *testing.T) {
	env := map[string]string{"CIRCUIT_BREAKER_LLM_FAIL_MAX": "1", "RETRY_MAX_ATTEMPTS": "1"}
	cfg, err := LoadConfigWith(LoadOptions{Environment: env})
	if err != nil {
		t.Fatal(err)
	}
	var reg *Registry
	c := cfg.CircuitBreakers["LLM"]
	c.DisableLogging = true
	c.OpenTimeout = 20 * time.Millisecond
	c.OnStateChange = func(string, State, State) { reg.Config() }
	cfg.CircuitBreakers["LLM"] = c
	reg, err = NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cb := reg.CircuitBreaker("llm")
	done := make(chan struct{})
	go func() {
		WithCircuitBreaker(func(context.Context) (int, error) { time.Sleep(50 * time.Millisecond); return 1, nil }, cb)(context.Background())
		close(done)
	}()
	time.Sleep(5 * time.Millisecond)
	WithCircuitBreaker(func(context.Context) (int, error) { return 0, hinted(100 * time.Millisecond) }, cb)(context.Background())
	<-done
	time.Sleep(150 * time.Millisecond)
	cfg2 := reg.Config()
	c2 := cfg2.CircuitBreakers["LLM"]
	c2.OpenTimeout = 30 * time.Millisecond
	cfg2.CircuitBreakers["LLM"] = c2
	reloaded := make(chan error, 1)
	go func() { reloaded <- reg.Reload(cfg2) }()
	select {
	case err := <-reloaded:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Reload has not returned after 3s: OnStateChange, called under the registry's lock, waits for it")
	}
}

// R8: when a hold ends with gobreaker already half-open (lateHalfOpen), a

// call that passes the hold check after another caller's endHold swapped

// the hold out, but before that caller has reported half-open, is admitted

// as gobreaker's probe with probe=false (and without AllowProbe). If it

// calls runtime.Goexit, goexited sees a non-probe in a non-closed state

// and repairs nothing: the probe is leaked and the breaker is stuck

// half-open. The interleaving is forced by holding evMu, as a scheduler

// would by descheduling the first caller between its CAS and its Lock.

func TestCircuitBreakerLateHalfOpenProbeNotLeaked(t *testing.T) {
	cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: 20 * time.Millisecond, DisableLogging: true})
	inflight, started := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(inflight)
		WithCircuitBreaker(func(context.Context) (int, error) { close(started); time.Sleep(50 * time.Millisecond); return 1, nil }, cb)(context.Background())
	}()
	<-started
	WithCircuitBreaker(func(context.Context) (int, error) { return 0, hinted(150 * time.Millisecond) }, cb)(context.Background())
	<-inflight // returned 50ms into a 150ms hold: gobreaker is half-open, lateHalfOpen
	cb.evMu.Lock()
	if !cb.lateHalfOpen {
		cb.evMu.Unlock()
		t.Fatal("setup: lateHalfOpen not set")
	}
	time.Sleep(150 * time.Millisecond) // the hold has ended
	bDone := make(chan error, 1)
	go func() { _, err := WithCircuitBreaker(okFunc, cb)(context.Background()); bDone <- err }() // B: CAS, then waits for evMu
	for cb.hold.Load() != 0 {
		time.Sleep(time.Millisecond)
	}
	aDone := make(chan struct{})
	go func() { // A: past the hold, admitted by gobreaker as its half-open probe
		defer close(aDone)
		WithCircuitBreaker(func(context.Context) (int, error) { runtime.Goexit(); return 0, nil }, cb)(context.Background())
	}()
	time.Sleep(20 * time.Millisecond) // A has returned (or, fixed, waits for evMu to count its Goexit)
	cb.evMu.Unlock()
	<-aDone
	t.Logf("B: %v", <-bDone)
	time.Sleep(60 * time.Millisecond) // past any open period A's Goexit may have started
	for i := range 3 {
		if _, err := WithCircuitBreaker(okFunc, cb)(context.Background()); err != nil {
			t.Errorf("call %d after the Goexit: %v (state %v, counts %+v); want a probe let through", i, err, cb.State(), cb.Counts())
		}
	}
}

// R9: slow calls are bucketed by the start of their successful attempt,

// calls by gobreaker at admission: after retries the slow window keeps a

// slow call whose call gobreaker has dropped, and one failure, with no slow

// call among the window's calls, opens the breaker on the slow-call ratio.

func TestCircuitBreakerSlowCallBucketedByAdmission(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{SlowCallDuration: 100 * time.Millisecond, SlowCallRatio: 0.5,
			MinimumThroughput: 2, FailMax: 100, SamplingWindow: 10 * time.Second, DisableLogging: true})
		rt := mustRetry(t, RetryConfig{MaxAttempts: 2, InitialDelay: 5 * time.Second, DisableJitter: true})
		n := 0
		Compose(func(context.Context) (int, error) {
			n++
			if n == 1 {
				return 0, errBoom
			}
			time.Sleep(200 * time.Millisecond) // slow, 5s after admission
			return 1, nil
		}, Stack[int]{CircuitBreaker: cb, Retry: rt})(context.Background())
		time.Sleep(5 * time.Second) // 10.2s after admission: the call has left gobreaker's window
		if c := cb.Counts(); c.WindowSlowCalls > c.WindowCalls {
			t.Errorf("counts %+v: more slow calls than calls (SlowCallRatio %v)", c, c.SlowCallRatio())
		}
		WithCircuitBreaker(okFunc, cb)(context.Background())
		WithCircuitBreaker(failFunc, cb)(context.Background())
		if s := cb.State(); s != StateClosed {
			t.Errorf("state %v after 1 fast success and 1 failure, no slow call among them; want closed", s)
		}
	})
}

// S1: Trip on a half-open breaker stores a fresh closed generation before

// tripping it: calls that arrive in between are admitted as closed calls.

func TestCircuitBreakerTripForHalfOpenAdmitsNoneInWindow(t *testing.T) {
	var extra atomic.Int32
	for iter := 0; iter < 100 && extra.Load() == 0; iter++ {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: 20 * time.Millisecond, MaxOpenTimeout: 2 * time.Hour, DisableLogging: true})
		WithCircuitBreaker(failFunc, cb)(context.Background())
		time.Sleep(25 * time.Millisecond)
		block := make(chan struct{})
		entered := make(chan struct{})
		go WithCircuitBreaker(func(context.Context) (int, error) { close(entered); <-block; return 1, nil }, cb)(context.Background())
		<-entered // the one probe
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				fn := WithCircuitBreaker(func(context.Context) (int, error) { extra.Add(1); return 1, nil }, cb)
				for {
					select {
					case <-stop:
						return
					default:
					}
					fn(context.Background())
				}
			}()
		}
		time.Sleep(100 * time.Microsecond)
		cb.TripFor(time.Hour)
		close(stop)
		wg.Wait()
		close(block)
	}
	if n := extra.Load(); n > 0 {
		t.Errorf("%d calls let through besides the one probe, while half-open and tripped", n)
	}
}
