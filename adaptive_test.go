package resilience

import (
	"errors"
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

func TestAdaptiveGradientShrinksWhenLatencyGrows(t *testing.T) {
	a := newAdaptive(AdaptiveConfig{}, 40)
	var now time.Duration
	feed(a, &now, 50, 10*time.Millisecond, 40, false) // learn the uncongested latency
	if l := int(a.estimate); l != 40*10 && l < 40 {
		t.Fatalf("limit %d after calm windows at full use, want it to stay or grow", l)
	}
	high := int(a.estimate)
	l := feed(a, &now, 30, 50*time.Millisecond, high, false) // 5x slower: queueing downstream
	if l >= high/2 {
		t.Errorf("limit %d after 30 windows at 5x the latency, want well under %d", l, high/2)
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
	feed(a, &now, 1, 10*time.Millisecond, 40, false)
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
		if l := a.sample(time.Millisecond, time.Millisecond, 10, false); l != 0 {
			t.Fatalf("the limit moved to %d before the window's time passed", l)
		}
	}
	// Time passes with too few samples: none closes either.
	a = newAdaptive(AdaptiveConfig{Algorithm: AdaptiveAIMD}, 10)
	for i := range adaptMinSamples - 1 {
		if l := a.sample(time.Duration(i)*time.Second, time.Millisecond, 10, false); l != 0 {
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
