package resilience

import (
	"context"
	"fmt"
	"sync"
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
