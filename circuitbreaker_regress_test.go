package resilience

import (
	"context"
	"errors"
	"math"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// Regressions found in review of the ratio, slow-call and open-period
// triggers, each named after what broke.

func TestCircuitBreakerHintDoesNotOutliveClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, DisableLogging: true})
		var next error
		fn := WithCircuitBreaker(func(context.Context) (int, error) { return 0, next }, cb)
		next = hinted(time.Hour)
		fn(context.Background()) // opens for the capped hint: 10s
		if got := cb.OpenPeriod(); got != 10*time.Second {
			t.Fatalf("OpenPeriod() = %v; want 10s", got)
		}
		time.Sleep(10*time.Second + 1)
		next = nil
		fn(context.Background()) // the probe succeeds
		if cb.State() != StateClosed {
			t.Fatalf("state %v; want closed", cb.State())
		}
		next = errBoom // no hint
		fn(context.Background())
		if got := cb.OpenPeriod(); got != time.Second {
			t.Errorf("after closing, a hint-less failure opens for %v; want OpenTimeout 1s", got)
		}
	})
}

func TestCircuitBreakerHintDoesNotOutliveReset(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, DisableLogging: true})
		var next error
		fn := WithCircuitBreaker(func(context.Context) (int, error) { return 0, next }, cb)
		next = hinted(time.Hour)
		fn(context.Background())
		cb.Reset()
		next = errBoom
		fn(context.Background())
		if got := cb.OpenPeriod(); got != time.Second {
			t.Errorf("after Reset, a hint-less failure opens for %v; want OpenTimeout 1s", got)
		}
	})
}

func TestCircuitBreakerHintOfUncountedCallIgnored(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, DisableLogging: true})
		var next error
		fn := WithCircuitBreaker(func(context.Context) (int, error) { return 0, next }, cb)
		cb.ForceClose()
		next = hinted(time.Hour)
		fn(context.Background()) // uncounted
		cb.Reset()
		next = errBoom
		fn(context.Background())
		if got := cb.OpenPeriod(); got != time.Second {
			t.Errorf("a hint of an uncounted call stretches a later open to %v; want 1s", got)
		}
	})
}

func TestCircuitBreakerRetryAfterDuringHoldAfterInFlightCall(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var trans []string
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, DisableLogging: true,
			OnStateChange: func(_ string, from, to State) { trans = append(trans, from.String()+"->"+to.String()) }})
		slow := WithCircuitBreaker(func(context.Context) (int, error) { time.Sleep(3 * time.Second); return 1, nil }, cb)
		go slow(context.Background())
		synctest.Wait()
		fail := WithCircuitBreaker(func(context.Context) (int, error) { return 0, hinted(8 * time.Second) }, cb)
		fail(context.Background()) // opens for 8s
		if cb.OpenPeriod() != 8*time.Second {
			t.Fatalf("OpenPeriod %v; want 8s", cb.OpenPeriod())
		}
		time.Sleep(3 * time.Second)
		synctest.Wait() // the slow call has returned
		_, err := fail(context.Background())
		var e *Error
		if !errors.As(err, &e) || !errors.Is(err, ErrCircuitOpen) {
			t.Fatalf("%v; want a rejection, 3s into an 8s open", err)
		}
		if got := e.RetryAfter(); got != 5*time.Second {
			t.Errorf("RetryAfter() = %v 3s into an 8s open; want 5s", got)
		}
		if got := cb.lastState(); got != StateOpen {
			t.Errorf("reported state %v; want open; transitions %v", got, trans)
		}
		// When the hold ends, the move to half-open is reported, once, and
		// the probe goes through and closes the breaker.
		time.Sleep(5*time.Second + 1)
		if _, err := WithCircuitBreaker(okFunc, cb)(context.Background()); err != nil {
			t.Fatalf("the probe after the hold: %v", err)
		}
		if want := []string{"closed->open", "open->half-open", "half-open->closed"}; !slices.Equal(trans, want) {
			t.Errorf("transitions %v; want %v", trans, want)
		}
	})
}

func TestCircuitBreakerTripForHalfOpenWithProbeInFlight(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, DisableLogging: true})
		WithCircuitBreaker(failFunc, cb)(context.Background())
		time.Sleep(time.Second + 1)
		block := make(chan struct{})
		go WithCircuitBreaker(func(context.Context) (int, error) { <-block; return 1, nil }, cb)(context.Background())
		synctest.Wait()
		cb.TripFor(time.Minute)
		if s := cb.State(); s != StateOpen {
			t.Errorf("state %v after TripFor(1m) on a half-open breaker; want open", s)
		}
		close(block)
		synctest.Wait()
		if s := cb.State(); s != StateOpen {
			t.Errorf("state %v after the probe returned; want still open for TripFor's minute", s)
		}
	})
}

func TestReloadAddingSlowTriggerKeepsBreakerOpen(t *testing.T) {
	env := map[string]string{"CIRCUIT_BREAKER_LLM_FAIL_MAX": "1", "RETRY_MAX_ATTEMPTS": "1"}
	reg := mustRegistry(t, env)
	ForService(reg, "llm", failFunc)(context.Background())
	cb := reg.CircuitBreaker("llm")
	if cb.State() != StateOpen {
		t.Fatal("not open")
	}
	env["CIRCUIT_BREAKER_LLM_SLOW_CALL_DURATION"] = "30s"
	cfg, err := LoadConfigWith(LoadOptions{Environment: env})
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	if s := cb.State(); s != StateOpen {
		t.Errorf("state %v after a Reload that only added a slow-call threshold; want still open", s)
	}
}

func TestCircuitBreakerGoexitOfClosedCallDuringHold(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var trans []string
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, MaxOpenTimeout: 8 * time.Second, DisableLogging: true,
			OnStateChange: func(_ string, from, to State) { trans = append(trans, from.String()+"->"+to.String()) }})
		go WithCircuitBreaker(func(context.Context) (int, error) {
			time.Sleep(2 * time.Second)
			runtime.Goexit()
			return 0, nil
		}, cb)(context.Background())
		synctest.Wait()
		WithCircuitBreaker(func(context.Context) (int, error) { return 0, hinted(2500 * time.Millisecond) }, cb)(context.Background())
		if got := cb.OpenPeriod(); got != 2500*time.Millisecond {
			t.Fatalf("OpenPeriod %v; want 2.5s", got)
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if want := []string{"closed->open"}; !slices.Equal(trans, want) {
			t.Errorf("transitions %v; want %v: no probe was let through", trans, want)
		}
		time.Sleep(time.Second) // 3s after the open: past the 2.5s asked for
		if _, err := WithCircuitBreaker(okFunc, cb)(context.Background()); err != nil {
			t.Errorf("3s after a 2.5s open: %v (OpenPeriod %v); want the probe let through", err, cb.OpenPeriod())
		}
	})
}

func TestCircuitBreakerGoexitOfClosedCallIsNoProbe(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, MaxOpenTimeout: 8 * time.Second, DisableLogging: true})
		go WithCircuitBreaker(func(context.Context) (int, error) {
			time.Sleep(2 * time.Second)
			runtime.Goexit()
			return 0, nil
		}, cb)(context.Background())
		synctest.Wait()
		WithCircuitBreaker(failFunc, cb)(context.Background()) // open for 1s
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if _, err := WithCircuitBreaker(okFunc, cb)(context.Background()); err != nil {
			t.Errorf("2s after a 1s open, no probe having run: %v (OpenPeriod %v); want the probe let through", err, cb.OpenPeriod())
		}
	})
}

func TestLoadConfigDefaultMaxTimeoutBelowServiceTimeout(t *testing.T) {
	cfg, err := LoadConfigWith(LoadOptions{Environment: map[string]string{
		"CIRCUIT_BREAKER_DEFAULT_MAX_TIMEOUT": "2m",
		"CIRCUIT_BREAKER_LLM_TIMEOUT":         "5m",
	}})
	if err != nil {
		t.Fatalf("LoadConfig: %v", err)
	}
	if got := cfg.CircuitBreakers["LLM"]; got.OpenTimeout != 5*time.Minute {
		t.Fatalf("LLM %+v", got)
	}
}

func TestLoadConfigPresetKeepsDefaultFailMaxBesideRatio(t *testing.T) {
	cfg, err := LoadConfigWith(LoadOptions{Environment: map[string]string{
		"CIRCUIT_BREAKER_DEFAULT_FAIL_MAX":      "7",
		"CIRCUIT_BREAKER_OPENFGA_FAILURE_RATIO": "0.5",
		"CIRCUIT_BREAKER_LLM_FAILURE_RATIO":     "0.5",
	}})
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.CircuitBreakers["OPENFGA"]; got.FailMax == 0 {
		t.Errorf("OPENFGA %+v: FailMax dropped although DEFAULT_FAIL_MAX is set", got)
	}
}

// A SamplingWindow near MaxInt64 overflowed gobreaker's rounding to whole
// buckets, and every call panicked; it is rejected now.
func TestCircuitBreakerHugeSamplingWindowRejected(t *testing.T) {
	_, err := NewCircuitBreaker(CircuitBreakerConfig{FailureRatio: 0.5, SamplingWindow: time.Duration(math.MaxInt64)})
	if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "SamplingWindow") {
		t.Fatalf("%v; want ErrInvalidConfig naming SamplingWindow", err)
	}
}

func TestLoadConfigHugeSamplingWindowRejected(t *testing.T) {
	_, err := LoadConfigWith(LoadOptions{Environment: map[string]string{
		"CIRCUIT_BREAKER_LLM_FAILURE_RATIO": "0.5", "CIRCUIT_BREAKER_LLM_SAMPLING_WINDOW": "2562047h",
	}})
	var ve *VarError
	if !errors.As(err, &ve) || ve.Var != "CIRCUIT_BREAKER_LLM_SAMPLING_WINDOW" {
		t.Fatalf("%v; want a VarError for CIRCUIT_BREAKER_LLM_SAMPLING_WINDOW", err)
	}
}

func TestCircuitBreakerSlowCallExcludesBulkheadQueue(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{SlowCallDuration: time.Second, SlowCallRatio: 0.5, MinimumThroughput: 4, DisableLogging: true})
		bh := mustBulkhead(t, BulkheadConfig{Limit: 1})
		fn := Compose(func(context.Context) (int, error) {
			time.Sleep(600 * time.Millisecond) // the downstream is always fast
			return 1, nil
		}, Stack[int]{CircuitBreaker: cb, Bulkhead: bh})
		var wg sync.WaitGroup
		for range 4 {
			wg.Add(1)
			go func() { defer wg.Done(); fn(context.Background()) }()
		}
		wg.Wait()
		if c := cb.Counts(); c.WindowSlowCalls != 0 || cb.State() != StateClosed {
			t.Errorf("state %v, counts %+v; want no slow call: every downstream call took 600ms < 1s", cb.State(), c)
		}
	})
}

func TestCircuitBreakerTripForHalfOpenDoesNotDouble(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, MaxOpenTimeout: 8 * time.Second, DisableLogging: true})
		WithCircuitBreaker(failFunc, cb)(context.Background())
		time.Sleep(time.Second + 1)
		if cb.State() != StateHalfOpen {
			t.Fatal("not half-open")
		}
		cb.TripFor(time.Second)
		if got := cb.OpenPeriod(); got != time.Second {
			t.Errorf("OpenPeriod() after TripFor(1s) on a half-open breaker = %v; want 1s", got)
		}
	})
}

func TestCircuitBreakerHugeHintSaturates(t *testing.T) {
	cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Millisecond, DisableLogging: true})
	WithCircuitBreaker(func(context.Context) (int, error) { return 0, hinted(math.MaxInt64) }, cb)(context.Background())
	if h := cb.hintUntil.Load(); h < 0 {
		t.Errorf("hintUntil = %d after a hint of %v: overflowed", h, time.Duration(math.MaxInt64))
	}
}

// A half-open probe whose first attempt reached the downstream and failed,
// and whose retry then found the bulkhead full, was taken for local
// saturation and excluded: its place went to a second probe in the same
// half-open period (found by internal/chaos FuzzCompose).
func TestCircuitBreakerProbeThatReachedDownstreamCountsDespiteFullBulkhead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, DisableLogging: true})
		bh := mustBulkhead(t, BulkheadConfig{Limit: 1, MaxWait: time.Millisecond})
		rt := mustRetry(t, RetryConfig{MaxAttempts: 2, InitialDelay: 10 * time.Millisecond, DisableJitter: true})
		release := make(chan struct{})
		var held sync.WaitGroup
		calls := 0
		fn := Compose(func(context.Context) (int, error) {
			calls++
			if calls == 3 { // the first call made 2 attempts
				// The probe: someone else takes the slot as it leaves,
				// so that its retry finds the bulkhead full.
				held.Go(func() {
					rel, err := bh.Acquire(context.Background())
					if err != nil {
						t.Error(err)
						return
					}
					<-release
					rel()
				})
			}
			return 0, errBoom
		}, Stack[int]{CircuitBreaker: cb, Retry: rt, Bulkhead: bh})
		fn(context.Background()) // opens
		time.Sleep(time.Second + 1)
		_, err := fn(context.Background()) // the probe
		if !errors.Is(err, ErrBulkheadFull) {
			t.Fatalf("probe: %v; want its retry to have found the bulkhead full", err)
		}
		if s := cb.State(); s != StateOpen {
			t.Fatalf("state %v (counts %+v, err %v, calls %d) after a probe that reached the downstream and failed; want open", s, cb.Counts(), err, calls)
		}
		close(release)
		held.Wait()
	})
}

// Issue 18: a replica that tripped on its own a little after the fleet
// stayed open a full OpenTimeout from its own trip, not until the shared
// open ended, and went half-open on its own clock. OpenFor sets the end of
// an open breaker's period, earlier or later, without a transition.
func TestOpenForEndsALateLocalOpenWithTheSharedOne(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var tl transLog
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, DisableLogging: true, OnStateChange: tl.add})
		fail := WithCircuitBreaker(func(context.Context) (int, error) { return 0, errBoom }, cb)
		fail(context.Background()) // opens until 1s on its own clock
		time.Sleep(200 * time.Millisecond)
		if opened := cb.OpenFor(600 * time.Millisecond); opened {
			t.Error("OpenFor on an open breaker reported a transition")
		}
		time.Sleep(600*time.Millisecond - time.Millisecond)
		if st := cb.State(); st != StateOpen {
			t.Fatalf("1ms before the shared end: %v; want open", st)
		}
		time.Sleep(2 * time.Millisecond)
		if st := cb.State(); st != StateHalfOpen {
			t.Fatalf("1ms after the shared end, 199ms before its own: %v; want half-open", st)
		}
		if got, want := tl.get(), []string{"closed->open", "open->half-open"}; !slices.Equal(got, want) {
			t.Errorf("transitions %v; want %v", got, want)
		}
	})
}

// Issue 18: a failed probe's longer open, seen by a replica already open,
// only held back that replica's probes; its breaker said half-open while the
// fleet was open. OpenFor extends the open itself.
func TestOpenForExtendsAnOpenBreaker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var tl transLog
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, MaxOpenTimeout: 8 * time.Second, DisableLogging: true, OnStateChange: tl.add})
		fail := WithCircuitBreaker(func(context.Context) (int, error) { return 0, errBoom }, cb)
		fail(context.Background())
		time.Sleep(500 * time.Millisecond)
		cb.OpenFor(2 * time.Second)
		time.Sleep(2*time.Second - time.Millisecond)
		if _, err := fail(context.Background()); !errors.Is(err, ErrCircuitOpen) {
			t.Fatalf("1ms before the adopted end: err %v; want ErrCircuitOpen", err)
		}
		if st := cb.State(); st != StateOpen {
			t.Fatalf("state %v; want open", st)
		}
		time.Sleep(2 * time.Millisecond)
		if st := cb.State(); st != StateHalfOpen {
			t.Fatalf("after the adopted end: %v; want half-open", st)
		}
		if got := cb.OpenPeriod(); got != 2500*time.Millisecond {
			t.Errorf("OpenPeriod() = %v; want 2.5s, from its own trip", got)
		}
		if got, want := tl.get(), []string{"closed->open", "open->half-open"}; !slices.Equal(got, want) {
			t.Errorf("transitions %v; want %v", got, want)
		}
	})
}

// Issue 18: an open adopted from half-open is another replica's failed
// probe, and a doubled period adopted is the fleet's streak: the next probe
// that fails here must double that, not start again from OpenTimeout.
func TestOpenForKeepsTheFleetsDoubling(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, MaxOpenTimeout: 16 * time.Second, DisableLogging: true})
		fail := WithCircuitBreaker(func(context.Context) (int, error) { return 0, errBoom }, cb)
		fail(context.Background())
		time.Sleep(time.Second + time.Millisecond)
		if st := cb.State(); st != StateHalfOpen {
			t.Fatalf("state %v; want half-open", st)
		}
		if !cb.OpenFor(2 * time.Second) { // another replica's probe failed
			t.Fatal("OpenFor from half-open reported no transition")
		}
		time.Sleep(2*time.Second + time.Millisecond)
		fail(context.Background()) // this replica's probe fails
		if got := cb.OpenPeriod(); got != 4*time.Second {
			t.Errorf("after an adopted 2s open, a failed probe opens for %v; want 4s", got)
		}
		time.Sleep(4*time.Second + time.Millisecond)
		cb.OpenFor(time.Hour) // capped at MaxOpenTimeout
		time.Sleep(16*time.Second - time.Millisecond)
		if st := cb.State(); st != StateOpen {
			t.Fatalf("state %v; want open until MaxOpenTimeout", st)
		}
		time.Sleep(2 * time.Millisecond)
		if st := cb.State(); st != StateHalfOpen {
			t.Fatalf("state %v; want half-open after MaxOpenTimeout", st)
		}
	})
}

// OpenFor leaves an operator's decision alone, and an end already passed.
func TestOpenForLeavesForcedAndPastAlone(t *testing.T) {
	cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, DisableLogging: true})
	if cb.OpenFor(0) || cb.OpenFor(-time.Second) || cb.State() != StateClosed {
		t.Fatal("OpenFor(<= 0) opened the breaker")
	}
	cb.ForceClose()
	if cb.OpenFor(time.Second) || cb.State() != StateClosed {
		t.Fatal("OpenFor opened a breaker held by ForceClose")
	}
}

// fleetSync is a BreakerSync that lets every probe through, counting the
// calls it was asked about.
type fleetSync struct{ asked atomic.Int32 }

func (s *fleetSync) StateChanged(string, State, State) {}
func (s *fleetSync) AllowProbe(context.Context, string) bool {
	s.asked.Add(1)
	return true
}

// Issue 18: a call that gobreaker let through as a probe just as the
// fleet's open was applied (OpenFor, from another goroutine, between
// gobreaker's admission and the sync's question) went to the downstream
// without the sync being asked: a second probe in the round. Here the
// open is applied by the transition's own callback, which runs at that
// very point of the call.
func TestCircuitBreakerProbeAdmittedAsTheFleetReopensIsRejected(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var cb *CircuitBreaker
		var reopened atomic.Bool
		cb = mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, DisableLogging: true,
			OnStateChange: func(_ string, from, to State) {
				if to == StateHalfOpen && reopened.CompareAndSwap(false, true) {
					cb.OpenFor(time.Second) // another replica's probe failed
				}
			}})
		fs := &fleetSync{}
		cb.SetSync(fs)
		var reached atomic.Int32
		call := WithCircuitBreaker(func(context.Context) (int, error) { reached.Add(1); return 0, errBoom }, cb)
		call(context.Background()) // opens
		reached.Store(0)
		time.Sleep(time.Second + time.Millisecond)
		_, err := call(context.Background()) // half-open: the probe, as the fleet reopens
		if n := reached.Load(); n != 0 {
			t.Fatalf("%d calls reached the downstream as the fleet's open was applied (sync asked %d times); want 0", n, fs.asked.Load())
		}
		if !errors.Is(err, ErrCircuitOpen) {
			t.Fatalf("err = %v; want ErrCircuitOpen", err)
		}
		if st := cb.State(); st != StateOpen {
			t.Fatalf("state %v; want open, for the fleet's period", st)
		}
	})
}
