package resilience

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// The pipeline feeds an adaptive bulkhead every attempt: its latency and
// whether it ended overloaded.

func TestAdaptiveBulkheadShrinksOnAttemptTimeouts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Name: "adaptive-timeouts", Limit: 10, Adaptive: &AdaptiveConfig{Algorithm: AdaptiveAIMD}})
		f := Compose(func(ctx context.Context) (int, error) {
			<-ctx.Done() // every attempt runs past its timeout
			return 0, ctx.Err()
		}, Stack[int]{Name: uniqueName("adaptive-timeouts"), Bulkhead: b, Timeout: 10 * time.Millisecond})
		for range 33 {
			f(context.Background())
		}
		// 33 attempts of 10ms: three windows of 100ms, each overloaded
		// (a window opens with its first sample, at the end of a call,
		// and closes with the eleventh, 100ms later).
		if l := b.Limit(); l != 7 {
			t.Errorf("limit %d after three windows of timeouts, want 10 x 0.9 three times, floored: 7", l)
		}
	})
}

func TestAdaptiveBulkheadGrowsWhenItsLimitIsUsed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Name: "adaptive-grow", Limit: 2, Adaptive: &AdaptiveConfig{Algorithm: AdaptiveAIMD, MaxLimit: 5}})
		f := WithBulkhead(func(context.Context) (int, error) {
			time.Sleep(10 * time.Millisecond)
			return 1, nil
		}, b)
		var wg sync.WaitGroup
		for range 2 {
			wg.Go(func() {
				for range 100 {
					f(context.Background())
				}
			})
		}
		wg.Wait()
		if l := b.Limit(); l != 5 {
			t.Errorf("limit %d after a second of full use without overload, want MaxLimit 5", l)
		}
	})
}

func TestIsOverload(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{nil, false},
		{errBoom, false},
		{&Error{Err: ErrTimeout}, true},
		{fmt.Errorf("wrapped: %w", &Error{Err: ErrRateLimited}), true},
		{&StatusError{StatusCode: 429}, true},
		{&StatusError{StatusCode: 503}, true},
		{&Error{Err: ErrRetryExhausted, Cause: &StatusError{StatusCode: 529}}, true},
		{&StatusError{StatusCode: 500}, false},
		{&StatusError{StatusCode: 404}, false},
	} {
		if got := isOverload(tc.err); got != tc.want {
			t.Errorf("isOverload(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestBulkheadReconfigureKeepsWhatTheAdaptiveLimitLearnt(t *testing.T) {
	b := mustBulkhead(t, BulkheadConfig{Name: "adaptive-reload", Limit: 10, Adaptive: &AdaptiveConfig{Algorithm: AdaptiveAIMD}})
	a := b.adapt.Load()
	var now time.Duration
	feed(a, &now, 3, time.Millisecond, 10, true)
	b.observe(a, monotonic(), true) // applies what the windows decided
	learnt := int(a.estimate)
	b.reconfigure(BulkheadConfig{Name: "adaptive-reload", Limit: 10, Adaptive: &AdaptiveConfig{Algorithm: AdaptiveAIMD, MaxLimit: 50}})
	if b.adapt.Load() != a || b.Limit() != learnt {
		t.Errorf("after a Reload that kept it adaptive: limit %d (learnt %d), same state %v", b.Limit(), learnt, b.adapt.Load() == a)
	}
	b.reconfigure(BulkheadConfig{Name: "adaptive-reload", Limit: 10, Adaptive: &AdaptiveConfig{Algorithm: AdaptiveAIMD, MaxLimit: 5}})
	if l := b.Limit(); l > 5 {
		t.Errorf("after a Reload to MaxLimit 5: limit %d", l)
	}
	b.reconfigure(BulkheadConfig{Name: "adaptive-reload", Limit: 12})
	if b.Adaptive() || b.Limit() != 12 {
		t.Errorf("after a Reload to a fixed 12: adaptive %v, limit %d", b.Adaptive(), b.Limit())
	}
}

// An attempt that was not timed still reports its overload: a busy
// bulkhead times only a share of its calls, and a 503 must not be left to
// chance.
func TestAdaptiveBulkheadUntimedAttemptReportsOverload(t *testing.T) {
	b := mustBulkhead(t, BulkheadConfig{Name: "adaptive-untimed", Limit: 10, Adaptive: &AdaptiveConfig{Algorithm: AdaptiveAIMD}})
	a := b.adapt.Load()
	a.sampleBelow.Store(0) // time no call
	f := Compose(func(context.Context) (int, error) {
		return 0, &StatusError{StatusCode: 503}
	}, Stack[int]{Name: uniqueName("adaptive-untimed"), Bulkhead: b})
	f(context.Background())
	if a.start.Load() != 0 {
		t.Fatal("an untimed attempt was sampled")
	}
	if !a.dropped.Load() {
		t.Error("an untimed attempt's 503 was not recorded as overload")
	}
}

// The gradient's first used window starts a probe: for one window the
// bulkhead admits a quarter of its limit, to measure the downstream's
// latency without load, while Limit reports the learnt limit throughout.
func TestAdaptiveBulkheadProbeAdmitsAQuarter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Name: "adaptive-probe", Limit: 40, FailFast: true, Adaptive: &AdaptiveConfig{}})
		f := WithBulkhead(func(context.Context) (int, error) {
			time.Sleep(10 * time.Millisecond)
			return 1, nil
		}, b)
		ctx, stop := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for range 50 {
			wg.Go(func() {
				for ctx.Err() == nil {
					if _, err := f(ctx); err != nil {
						time.Sleep(time.Millisecond)
					}
				}
			})
		}
		time.Sleep(115 * time.Millisecond) // the first window closed at 110ms
		synctest.Wait()
		b.mu.Lock()
		admit, learnt := b.limit, b.learnt
		b.mu.Unlock()
		if admit != learnt/4 {
			t.Errorf("during the probe: admitting %d, learnt %d; want a quarter admitted", admit, learnt)
		}
		// The calls admitted before the probe began, up to the old limit,
		// take 10ms to leave (a first check at 115ms, when some were
		// still inside, was flaky); the probe's window lasts longer.
		time.Sleep(10 * time.Millisecond)
		synctest.Wait()
		b.mu.Lock()
		admit, active := b.limit, b.active
		b.mu.Unlock()
		if admit != learnt/4 || active > admit {
			t.Errorf("during the probe, once the calls from before it left: admitting %d with %d inside, learnt %d; want a quarter admitted and no more inside", admit, active, learnt)
		}
		if l := b.Limit(); l != learnt || l < 40 {
			t.Errorf("Limit %d during the probe, want the learnt limit %d, at least the start 40", l, learnt)
		}
		time.Sleep(200 * time.Millisecond) // the probe's window closed
		synctest.Wait()
		b.mu.Lock()
		admit, learnt = b.limit, b.learnt
		b.mu.Unlock()
		if admit != learnt {
			t.Errorf("after the probe: admitting %d, learnt %d; want them equal", admit, learnt)
		}
		stop()
		wg.Wait()
	})
}

// Regression: observe applied the limit its sample returned after taking
// the bulkhead's lock, so a SetLimit (or a Reload) between the two was
// overwritten by a stale probe admission, which then held for ever.
func TestAdaptiveSetLimitBetweenSampleAndApplyWins(t *testing.T) {
	b := mustBulkhead(t, BulkheadConfig{Name: "adaptive-setlimit-race", Limit: 40, Adaptive: &AdaptiveConfig{MaxLimit: 100}})
	a := b.adapt.Load()
	var now time.Duration
	if feed(a, &now, 1, 10*time.Millisecond, 40, false); a.probe == 0 {
		t.Fatal("no probe after the first used window")
	}
	// The sample that started the probe returned; before it is applied:
	if err := b.SetLimit(30); err != nil {
		t.Fatal(err)
	}
	b.learn(a) // what the sample's observe does next
	b.mu.Lock()
	limit, learnt := b.limit, b.learnt
	b.mu.Unlock()
	if limit != 30 || learnt != 30 {
		t.Errorf("after SetLimit(30) then the stale apply: admitting %d, Limit %d; want 30 and 30", limit, learnt)
	}
}

// A probe of slow calls ends after about one call, and a probe whose
// calls stop is abandoned at its deadline: it never holds the bulkhead at
// a quarter of its limit for long.
func TestAdaptiveProbeOfSlowCallsEnds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Name: "adaptive-slow-probe", Limit: 8, FailFast: true, Adaptive: &AdaptiveConfig{}})
		f := WithBulkhead(func(context.Context) (int, error) {
			time.Sleep(2 * time.Second)
			return 1, nil
		}, b)
		ctx, stop := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for range 20 {
			wg.Go(func() {
				for ctx.Err() == nil {
					if _, err := f(ctx); err != nil {
						time.Sleep(100 * time.Millisecond)
					}
				}
			})
		}
		var probing, longest time.Duration
		for range 1200 { // two minutes, every 100ms
			time.Sleep(100 * time.Millisecond)
			b.mu.Lock()
			under := b.limit < b.learnt
			b.mu.Unlock()
			if under {
				probing += 100 * time.Millisecond
				longest = max(longest, probing)
			} else {
				probing = 0
			}
		}
		// At most three baselines (6s), the deadline; before, 10s.
		if longest == 0 || longest > 6*time.Second {
			t.Errorf("longest probe %v with 2s calls, want one, of at most 6s", longest)
		}
		stop()
		wg.Wait()

		// Traffic stops during a probe: the probe is abandoned at its
		// deadline, and a burst an hour later finds the whole limit.
		a := b.adapt.Load()
		a.mu.Lock()
		a.probe = max(1, int(a.estimate)/4)
		a.probeSeq++
		a.probeFrom.Store(int64(monotonic()))
		a.shown[1] = a.probe
		a.mu.Unlock()
		b.learn(a) // as observe does when a sample starts a probe
		if b.mu.Lock(); b.limit >= b.learnt {
			t.Fatalf("no probe: admitting %d of %d", b.limit, b.learnt)
		}
		b.mu.Unlock()
		time.Sleep(time.Hour)
		var admitted atomic.Int64
		limit := b.Limit()
		for range limit {
			wg.Go(func() {
				if _, err := f(context.Background()); err == nil {
					admitted.Add(1)
				}
			})
		}
		wg.Wait()
		if n := admitted.Load(); n != int64(limit) {
			t.Errorf("a burst of %d an hour after a probe's calls stopped: %d admitted, want all", limit, n)
		}
	})
}
