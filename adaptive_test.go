package resilience

import (
	"errors"
	"math"
	"strings"
	"testing"
	"time"
)

// feed sends n windows of samples of latency rtt with inUse calls inside,
// and returns the limit after them.
func feed(a *adaptive, now *time.Duration, windows int, rtt time.Duration, inUse int, overload bool) int {
	for range windows {
		for range adaptMinSamples {
			*now += (time.Duration(a.window.Load()) + adaptMinSamples - 2) / (adaptMinSamples - 1)
			a.sample(*now, rtt, inUse, overload)
		}
	}
	return int(a.estimate)
}

// congestedModel is a downstream that answers in 10ms up to capacity
// calls at once, and 2ms later for each call beyond: TestAdaptiveLimit's
// server in internal/chaos, as arithmetic.
func congestedModel(capacity int) func(inUse int) time.Duration {
	return func(n int) time.Duration {
		return 10*time.Millisecond + 2*time.Millisecond*time.Duration(max(0, n-capacity))
	}
}

// feedModel sends windows of samples from a downstream whose latency is
// lat(calls inside), the calls inside being as many as the adaptive limit
// admits (a closed loop of more callers than the limit), and returns the
// learnt limit after them.
func feedModel(a *adaptive, now *time.Duration, windows int, lat func(int) time.Duration) int {
	admit := a.shown[1]
	for range windows {
		for range adaptMinSamples {
			*now += (time.Duration(a.window.Load()) + adaptMinSamples - 2) / (adaptMinSamples - 1)
			if _, n := a.sample(*now, lat(admit), admit, false); n > 0 {
				admit = n
			}
		}
	}
	return int(a.estimate)
}

func TestAdaptiveGradientShrinksWhenLatencyGrows(t *testing.T) {
	a := newAdaptive(AdaptiveConfig{}, 40)
	var now time.Duration
	feed(a, &now, 50, 10*time.Millisecond, 40, false) // learn the uncongested latency
	if l := int(a.estimate); l < 40 {
		t.Fatalf("limit %d after calm windows at full use, want it to stay or grow", l)
	}
	high := int(a.estimate)
	// The downstream's capacity falls to 8: latency grows with the calls
	// past it.
	l := feedModel(a, &now, 30, congestedModel(8))
	if l >= high/2 {
		t.Errorf("limit %d after 30 windows of queueing downstream, want well under %d", l, high/2)
	}
}

// Regression: Gradient2's long-term latency is an average of the short
// ones, so a limit started in congestion took the congested latency as its
// baseline and grew, 40 to 100, instead of settling at the downstream's
// capacity. The probed baseline finds it.
func TestAdaptiveGradientStartedInCongestionSettles(t *testing.T) {
	a := newAdaptive(AdaptiveConfig{MaxLimit: 200}, 40)
	var now time.Duration
	lat := congestedModel(8)
	feedModel(a, &now, 30, lat) // 3s of 100ms windows
	var lo, hi int = math.MaxInt, 0
	for range 70 {
		l := feedModel(a, &now, 1, lat)
		lo, hi = min(lo, l), max(hi, l)
	}
	if lo < 6 || hi > 12 {
		t.Errorf("limit in [%d, %d] over the 7s after the first 3s, want within [6, 12] (capacity 8)", lo, hi)
	}
	if got := lat(hi); got >= 2*lat(0) {
		t.Errorf("latency %v at the highest resting limit %d, want under 2x the uncongested %v", got, hi, lat(0))
	}
	// The capacity doubles: the limit follows.
	lat = congestedModel(16)
	if l := feedModel(a, &now, 100, lat); l <= 12 {
		t.Errorf("limit %d 10s after the capacity doubled to 16, want above 12", l)
	}
}

func TestAdaptiveGradientGrowsWhileLatencyHolds(t *testing.T) {
	a := newAdaptive(AdaptiveConfig{}, 10)
	var now time.Duration
	l := feed(a, &now, 30, 10*time.Millisecond, 100, false)
	if l <= 10 {
		t.Errorf("limit %d after 30 calm, fully used windows, want above 10", l)
	}
	if l > 100 {
		t.Errorf("limit %d above MaxLimit, 10x the start", l)
	}
}

func TestAdaptiveGradientAppLimitedDoesNotGrow(t *testing.T) {
	a := newAdaptive(AdaptiveConfig{}, 20)
	var now time.Duration
	if l := feed(a, &now, 30, 10*time.Millisecond, 3, false); l != 20 {
		t.Errorf("limit %d after windows that used 3 of 20, want 20", l)
	}
}

func TestAdaptiveGradientOverloadHalvesAtMost(t *testing.T) {
	a := newAdaptive(AdaptiveConfig{Smoothing: 1}, 40)
	var now time.Duration
	feed(a, &now, 2, 10*time.Millisecond, 40, false) // the first window starts a probe, the second is it
	before := a.estimate
	feed(a, &now, 1, 10*time.Millisecond, 40, true)
	want := before * gradientMinSlope
	if d := a.estimate - want; d > 1e-9 || d < -1e-9 {
		t.Errorf("estimate %.3f after an overloaded window from %.3f, want %.3f", a.estimate, before, want)
	}
}

func TestAdaptiveAIMD(t *testing.T) {
	a := newAdaptive(AdaptiveConfig{Algorithm: AdaptiveAIMD, MinLimit: 2, MaxLimit: 12}, 10)
	var now time.Duration
	if l := feed(a, &now, 1, time.Millisecond, 10, false); l != 11 {
		t.Errorf("after a used window: %d, want 11", l)
	}
	if l := feed(a, &now, 5, time.Millisecond, 12, false); l != 12 {
		t.Errorf("after five more: %d, want MaxLimit 12", l)
	}
	if l := feed(a, &now, 1, time.Millisecond, 12, true); l != 10 {
		t.Errorf("after an overload: %d, want floor(12*0.9) = 10", l)
	}
	if l := feed(a, &now, 40, time.Millisecond, 12, true); l != 2 {
		t.Errorf("after many overloads: %d, want MinLimit 2", l)
	}
	if l := feed(a, &now, 3, time.Millisecond, 0, false); l != 2 {
		t.Errorf("after idle windows: %d, want no growth", l)
	}
}

func TestAdaptiveWindowNeedsTimeAndSamples(t *testing.T) {
	a := newAdaptive(AdaptiveConfig{Algorithm: AdaptiveAIMD}, 10)
	// Many samples in an instant: no window closes before Window passed.
	for range 100 {
		if l, _ := a.sample(time.Millisecond, time.Millisecond, 10, false); l != 0 {
			t.Fatalf("the limit moved to %d before the window's time passed", l)
		}
	}
	// Time passes with too few samples: none closes either.
	a = newAdaptive(AdaptiveConfig{Algorithm: AdaptiveAIMD}, 10)
	for i := range adaptMinSamples - 1 {
		if l, _ := a.sample(time.Duration(i)*time.Second, time.Millisecond, 10, false); l != 0 {
			t.Fatalf("the limit moved to %d on %d samples", l, i+1)
		}
	}
}

func TestAdaptiveConfigErrorsNameTheField(t *testing.T) {
	for _, tc := range []struct {
		cfg   AdaptiveConfig
		limit int
		field string
	}{
		{AdaptiveConfig{MinLimit: -1}, 10, "AdaptiveConfig.MinLimit"},
		{AdaptiveConfig{MaxLimit: -1}, 10, "AdaptiveConfig.MaxLimit"},
		{AdaptiveConfig{MinLimit: 5, MaxLimit: 4}, 5, "AdaptiveConfig.MaxLimit"},
		{AdaptiveConfig{Algorithm: 7}, 10, "AdaptiveConfig.Algorithm"},
		{AdaptiveConfig{Smoothing: 1.5}, 10, "AdaptiveConfig.Smoothing"},
		{AdaptiveConfig{Window: -time.Second}, 10, "AdaptiveConfig.Window"},
		{AdaptiveConfig{MinLimit: 20}, 10, "BulkheadConfig.Limit"},
	} {
		err := tc.cfg.validate(tc.limit)
		if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%+v: %v, want ErrInvalidConfig naming %s", tc.cfg, err, tc.field)
		}
	}
}

func TestAdaptiveGradientOverloadGoesBelowFour(t *testing.T) {
	// x/2 + sqrt(x) holds still at 4: with the allowance on overloaded
	// windows, no overload could take the limit below it.
	for _, start := range []int{1, 2, 8, 40} {
		a := newAdaptive(AdaptiveConfig{}, start)
		var now time.Duration
		if l := feed(a, &now, 60, 10*time.Millisecond, start, true); l != 1 {
			t.Errorf("from %d: limit %d after 60 overloaded windows, want MinLimit 1", start, l)
		}
	}
}

// A busy bulkhead times about sampleTarget calls a window, not all of
// them: the two clock reads of a timed call were most of what an
// adaptive limit cost.
func TestAdaptiveBusyWindowsTimeAShare(t *testing.T) {
	a := newAdaptive(AdaptiveConfig{Algorithm: AdaptiveAIMD}, 10)
	var now time.Duration
	// A first window of 10 000 calls, every one timed: the share becomes
	// 64 in 10 001 (the calls of the window, the one closing it included).
	for range 10001 {
		now += 10 * time.Microsecond
		a.sample(now, time.Millisecond, 10, false)
	}
	calls := 10001.0
	if got, want := a.sampleBelow.Load(), uint64(sampleTarget/calls*sampleAll); got != want {
		t.Fatalf("sampleBelow %d after a window of 10 001 timed calls, want %d (64 in 10 001)", got, want)
	}
	// Windows as busy, of which only the calls timed() picks are
	// sampled, as the pipeline does: the share holds near 64 in 10 000.
	for w := range 5 {
		timed := 0
		for range 10000 {
			now += 10 * time.Microsecond
			if a.timed() {
				timed++
				a.sample(now, time.Millisecond, 10, false)
			}
		}
		if timed < 64/4 || timed > 64*4 {
			t.Errorf("window %d: %d of 10 000 calls timed, want about 64", w+2, timed)
		}
	}
	// Quiet again: windows that pass with too few timed calls time more,
	// doubling, up to every call.
	for range 20 {
		now += time.Second
		a.sample(now, time.Millisecond, 1, false)
	}
	if got := a.sampleBelow.Load(); got != sampleAll {
		t.Errorf("sampleBelow %d after quiet windows, want every call timed (%d)", got, uint64(sampleAll))
	}
}

// An overload in a probe's window backs the limit off, as in any window,
// and is not taken for the latency without load.
func TestAdaptiveOverloadDuringAProbe(t *testing.T) {
	a := newAdaptive(AdaptiveConfig{}, 40)
	var now time.Duration
	feed(a, &now, 1, 10*time.Millisecond, 40, false) // the first window starts a probe
	if a.probe == 0 {
		t.Fatal("no probe after the first used window")
	}
	before, baseline := a.estimate, a.baseline
	feed(a, &now, 1, time.Millisecond, 10, true) // the probe's window: fast, but overloaded
	if a.probe != 0 {
		t.Fatal("the probe's window did not end it")
	}
	if want := before * (1 - defaultSmoothing + gradientMinSlope*defaultSmoothing); math.Abs(a.estimate-want) > 1e-9 {
		t.Errorf("estimate %.3f after an overloaded probe from %.3f, want %.3f", a.estimate, before, want)
	}
	if a.baseline != baseline {
		t.Errorf("baseline %v after an overloaded probe, want it kept at %v", a.baseline, baseline)
	}
}

// An overload signal from an untimed call moves the limit at the next
// window's close.
func TestAdaptiveUntimedOverloadCounts(t *testing.T) {
	a := newAdaptive(AdaptiveConfig{Algorithm: AdaptiveAIMD}, 10)
	a.overloaded()
	var now time.Duration
	if l := feed(a, &now, 1, time.Millisecond, 10, false); l != 9 {
		t.Errorf("limit %d after a window with an untimed overload, want 10 x 0.9: 9", l)
	}
}
