package resilience

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

func mustHedge(t testing.TB, cfg HedgeConfig) *Hedge {
	t.Helper()
	h, err := NewHedge(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// slowFirst returns a Func whose first call waits until its context is
// done (or release is closed) and whose later calls answer at once with
// their number; it records each call's context error when it returned.
type slowFirst struct {
	mu       sync.Mutex
	calls    int
	canceled []bool
	release  chan struct{}
	late     time.Duration // the first call answers after this, if > 0
}

func (s *slowFirst) fn(ctx context.Context) (int, error) {
	s.mu.Lock()
	s.calls++
	n := s.calls
	s.mu.Unlock()
	if n == 1 {
		var timer <-chan time.Time
		if s.late > 0 {
			timer = time.After(s.late)
		}
		select {
		case <-ctx.Done():
			s.mu.Lock()
			s.canceled = append(s.canceled, true)
			s.mu.Unlock()
			return 0, ctx.Err()
		case <-timer:
			return n, nil
		case <-s.release:
			return n, nil
		}
	}
	return n, nil
}

func TestHedgeFirstSuccessWinsAndLoserIsCancelledBeforeReturn(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := &slowFirst{}
		h := mustHedge(t, HedgeConfig{Delay: 20 * time.Millisecond})
		f := Compose(s.fn, Stack[int]{Name: uniqueName("hedge-win"), Hedge: h, Timeout: time.Second})
		start := time.Now()
		v, err := f(context.Background())
		if err != nil || v != 2 {
			t.Fatalf("got %v, %v; want the hedge's 2", v, err)
		}
		if d := time.Since(start); d != 20*time.Millisecond {
			t.Errorf("took %v, want the hedge delay of 20ms", d)
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if len(s.canceled) != 1 {
			t.Errorf("the losing first attempt saw its context cancelled %d times before the call returned, want 1", len(s.canceled))
		}
	})
}

func TestHedgeNotSentWhenFirstAnswersBeforeDelay(t *testing.T) {
	reader := withReader(t)
	synctest.Test(t, func(t *testing.T) {
		s := &slowFirst{late: 5 * time.Millisecond}
		h := mustHedge(t, HedgeConfig{Delay: 20 * time.Millisecond})
		f := Compose(s.fn, Stack[int]{Name: uniqueName("hedge-fast"), Hedge: h})
		if v, err := f(context.Background()); err != nil || v != 1 {
			t.Fatalf("got %v, %v", v, err)
		}
		time.Sleep(time.Second) // a stray timer would fire in here
		if s.calls != 1 {
			t.Errorf("calls = %d, want 1", s.calls)
		}
	})
	if n := counterValue(t, reader, "resilience.hedge.attempts"); n != 0 {
		t.Errorf("hedge.attempts = %d, want 0", n)
	}
}

func TestHedgeWithoutTimeoutCancelsTheFirstAttempt(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := &slowFirst{}
		h := mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond})
		v, err := WithHedge(s.fn, h)(context.Background())
		if err != nil || v != 2 {
			t.Fatalf("got %v, %v", v, err)
		}
		if len(s.canceled) != 1 {
			t.Errorf("first attempt cancelled %d times, want 1", len(s.canceled))
		}
	})
}

func TestHedgeAllFailReturnsLastError(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		errFirst, errHedge := errors.New("first"), errors.New("hedge")
		var calls atomic.Int32
		fn := func(ctx context.Context) (int, error) {
			if calls.Add(1) == 1 {
				time.Sleep(30 * time.Millisecond) // answers after the hedge
				return 0, errFirst
			}
			time.Sleep(5 * time.Millisecond)
			return 0, errHedge
		}
		h := mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond, MaxHedges: 1})
		_, err := WithHedge(fn, h)(context.Background())
		if !errors.Is(err, errFirst) {
			t.Errorf("err = %v, want the last to fail, the first attempt's", err)
		}
		if calls.Load() != 2 {
			t.Errorf("calls = %d, want 2", calls.Load())
		}
	})
}

func TestHedgeMaxHedgesSendsEachAfterTheDelay(t *testing.T) {
	reader := withReader(t)
	synctest.Test(t, func(t *testing.T) {
		var calls atomic.Int32
		var at []time.Duration
		var mu sync.Mutex
		start := time.Now()
		fn := func(ctx context.Context) (int, error) {
			n := calls.Add(1)
			mu.Lock()
			at = append(at, time.Since(start))
			mu.Unlock()
			if n < 3 {
				<-ctx.Done()
				return 0, ctx.Err()
			}
			return int(n), nil
		}
		h := mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond, MaxHedges: 3})
		v, err := WithHedge(fn, h)(context.Background())
		if err != nil || v != 3 {
			t.Fatalf("got %v, %v", v, err)
		}
		want := []time.Duration{0, 10 * time.Millisecond, 20 * time.Millisecond}
		if len(at) != 3 || at[0] != want[0] || at[1] != want[1] || at[2] != want[2] {
			t.Errorf("attempts started at %v, want %v", at, want)
		}
	})
	if n := counterValue(t, reader, "resilience.hedge.attempts"); n != 2 {
		t.Errorf("hedge.attempts = %d, want 2", n)
	}
	if n := counterValue(t, reader, "resilience.hedge.wins"); n != 1 {
		t.Errorf("hedge.wins = %d, want 1", n)
	}
}

func TestHedgeSlotsAndPermitsAllReturned(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Name: "hedge-slots", Limit: 4})
		l, err := NewRateLimiter(RateLimiterConfig{Name: "hedge-permits", Limit: 100})
		if err != nil {
			t.Fatal(err)
		}
		inside := make(chan int, 8)
		fn := func(ctx context.Context) (int, error) {
			inside <- b.Stats().Active
			select {
			case <-ctx.Done():
				return 0, ctx.Err()
			case <-time.After(50 * time.Millisecond):
				return 1, nil
			}
		}
		h := mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond, MaxHedges: 2})
		f := Compose(fn, Stack[int]{Name: uniqueName("hedge-slots"), Hedge: h, Bulkhead: b, RateLimiter: l, Timeout: time.Second})
		if _, err := f(context.Background()); err != nil {
			t.Fatal(err)
		}
		close(inside)
		var seen []int
		for a := range inside {
			seen = append(seen, a)
		}
		if len(seen) != 3 || seen[2] != 3 {
			t.Errorf("slots held as attempts started: %v, want each hedge in a slot of its own (1 2 3)", seen)
		}
		if st := b.Stats(); st.Active != 0 {
			t.Errorf("bulkhead active after the call = %d, want 0", st.Active)
		}
		if st := l.Stats(); st.Granted != 3 {
			t.Errorf("permits granted = %d, want one per attempt, 3", st.Granted)
		}
	})
}

func TestHedgeBudgetCapsHedges(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		budget, err := NewRetryBudget(RetryBudgetConfig{Ratio: 0.1, MinPerSecond: -1})
		if err != nil {
			t.Fatal(err)
		}
		var calls atomic.Int32
		fn := func(ctx context.Context) (int, error) {
			calls.Add(1)
			select {
			case <-ctx.Done():
				return 0, ctx.Err()
			case <-time.After(30 * time.Millisecond):
				return 1, nil
			}
		}
		h := mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond, Budget: budget})
		f := WithHedge(fn, h)
		for range 100 {
			if _, err := f(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
		if n := calls.Load(); n > 110 {
			t.Errorf("100 calls, every one slow, sent %d attempts; the budget of 0.1 allows 110", n)
		}
		if n := calls.Load(); n <= 100 {
			t.Errorf("100 slow calls sent %d attempts: the budget let no hedge through", n)
		}
	})
}

func TestHedgeQuantileDelay(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var lat atomic.Int64
		fn := func(ctx context.Context) (int, error) {
			select {
			case <-ctx.Done():
				return 0, ctx.Err()
			case <-time.After(time.Duration(lat.Load())):
				return 1, nil
			}
		}
		h := mustHedge(t, HedgeConfig{Delay: time.Millisecond, Quantile: 0.9})
		f := WithHedge(fn, h)
		if h.Delay() != time.Millisecond {
			t.Fatalf("delay before any latency = %v, want Delay", h.Delay())
		}
		lat.Store(int64(40 * time.Microsecond))
		for i := range latencyWindow {
			// 90% answer in 40µs, the rest in 500µs: all before Delay.
			if i%10 == 9 {
				lat.Store(int64(500 * time.Microsecond))
			} else {
				lat.Store(int64(40 * time.Microsecond))
			}
			f(context.Background())
		}
		if d := h.Delay(); d != time.Millisecond {
			t.Errorf("delay = %v, want Delay, 1ms, when the quantile is below it", d)
		}
		for i := range latencyWindow {
			if i%10 == 9 {
				lat.Store(int64(50 * time.Millisecond))
			} else {
				lat.Store(int64(5 * time.Millisecond))
			}
			f(context.Background())
		}
		if d := h.Delay(); d < 5*time.Millisecond || d > 50*time.Millisecond {
			t.Errorf("delay = %v, want the 0.9 quantile of latencies of 5ms and 50ms", d)
		}
	})
}

func TestHedgePanicInHedgeIsRaisedInTheCaller(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var calls atomic.Int32
		fn := func(ctx context.Context) (int, error) {
			if calls.Add(1) == 2 {
				panic("hedge boom")
			}
			<-ctx.Done()
			return 0, ctx.Err()
		}
		h := mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond})
		defer func() {
			if r := recover(); r != "hedge boom" {
				t.Errorf("recovered %v, want the hedge's panic", r)
			}
		}()
		WithHedge(fn, h)(context.Background())
		t.Error("the call returned instead of panicking")
	})
}

func TestHedgeConfigErrorsNameTheField(t *testing.T) {
	for _, tc := range []struct {
		cfg   HedgeConfig
		field string
	}{
		{HedgeConfig{Delay: -1}, "HedgeConfig.Delay"},
		{HedgeConfig{MaxHedges: -1}, "HedgeConfig.MaxHedges"},
		{HedgeConfig{MaxHedges: 11}, "HedgeConfig.MaxHedges"},
		{HedgeConfig{Quantile: 1}, "HedgeConfig.Quantile"},
		{HedgeConfig{Quantile: -0.5}, "HedgeConfig.Quantile"},
	} {
		_, err := NewHedge(tc.cfg)
		if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("NewHedge(%+v) = %v, want ErrInvalidConfig naming %s", tc.cfg, err, tc.field)
		}
	}
	if _, err := WithHedge(okFunc, nil)(context.Background()); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("WithHedge(fn, nil) = %v, want ErrInvalidConfig", err)
	}
}

func TestHedgeOfADisabledRegistrySendsNoHedge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := mustRegistry(t, map[string]string{"RESILIENCE_ENABLED": "false", "HEDGE_SEARCH_DELAY": "10ms"})
		h := reg.Hedge("search")
		if h == nil {
			t.Fatal("no hedge for search")
		}
		s := &slowFirst{late: 50 * time.Millisecond}
		if v, err := WithHedge(s.fn, h)(context.Background()); err != nil || v != 1 {
			t.Fatalf("got %v, %v; want the first attempt's answer", v, err)
		}
		if s.calls != 1 {
			t.Errorf("a disabled registry's hedge sent %d attempts, want 1", s.calls)
		}
	})
}

func TestHedgeQuantileSeesTheTailOfAttemptsThatLost(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// Every tenth first attempt hangs until cancelled; the hedge
		// answers in 1ms. Were only winners timed, the 0.95 quantile
		// would be 1ms and Delay would stay; the losers' time so far
		// (at least Delay) must count.
		var n atomic.Int32
		fn := func(ctx context.Context) (int, error) {
			i := n.Add(1)
			if i%11 == 1 {
				<-ctx.Done()
				return 0, ctx.Err()
			}
			time.Sleep(time.Millisecond)
			return 1, nil
		}
		h := mustHedge(t, HedgeConfig{Delay: 20 * time.Millisecond, Quantile: 0.95})
		f := WithHedge(fn, h)
		for range 2 * latencyWindow {
			f(context.Background())
		}
		if d := h.Delay(); d <= 20*time.Millisecond {
			t.Errorf("delay = %v; the slow 10%% of first attempts were not seen", d)
		}
	})
}

func TestHedgeReloadedQuantileAppliesAtOnce(t *testing.T) {
	h := mustHedge(t, HedgeConfig{Delay: time.Millisecond, Quantile: 0.5})
	for i := range latencyWindow {
		h.lat.add(time.Duration(i+1)*time.Millisecond, 0.5)
	}
	if d := h.Delay(); d < 120*time.Millisecond || d > 136*time.Millisecond {
		t.Fatalf("median delay = %v, want about 128ms", d)
	}
	p, _ := HedgeConfig{Delay: time.Millisecond, Quantile: 0.9}.params()
	h.reconfigure(p)
	if d := h.Delay(); d < 225*time.Millisecond || d > 235*time.Millisecond {
		t.Errorf("after a Reload to the 0.9 quantile the delay is %v, want about 230ms at once", d)
	}
	p, _ = HedgeConfig{Delay: time.Millisecond}.params()
	h.reconfigure(p)
	if d := h.Delay(); d != time.Millisecond {
		t.Errorf("after a Reload without a quantile the delay is %v, want Delay", d)
	}
}

type closer struct{ closed atomic.Bool }

func (c *closer) Close() error { c.closed.Store(true); return nil }

func TestHedgeClosesALosingCloser(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		late, fast := &closer{}, &closer{}
		var n atomic.Int32
		fn := func(ctx context.Context) (*closer, error) {
			if n.Add(1) == 1 {
				time.Sleep(50 * time.Millisecond) // ignores its context
				return late, nil
			}
			return fast, nil
		}
		got, err := WithHedge(fn, mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond}))(context.Background())
		if err != nil || got != fast {
			t.Fatalf("got %p, %v; want the hedge's result", got, err)
		}
		if !late.closed.Load() || fast.closed.Load() {
			t.Errorf("late closed %v, winner closed %v; want only the loser closed", late.closed.Load(), fast.closed.Load())
		}
	})
}
