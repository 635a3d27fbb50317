package resilience

import (
	"context"
	"testing"
	"time"
)

// hedgeStacks returns the benchmark stack without and with a hedge whose
// delay no attempt reaches: the cost of hedging a call that does not need
// it.
func hedgeStacks(tb testing.TB, timeout time.Duration) (plain, hedged Func[int]) {
	h := mustHedge(tb, HedgeConfig{Delay: time.Minute})
	mk := func(h *Hedge) Func[int] {
		return Compose(checksCtx, Stack[int]{
			Name:     "bench-hedge",
			Retry:    mustRetry(tb, RetryConfig{MaxAttempts: 3}),
			Timeout:  timeout,
			Bulkhead: mustBulkhead(tb, BulkheadConfig{Limit: 1024, MaxWait: 100 * time.Millisecond}),
			Hedge:    h,
		})
	}
	return mk(nil), mk(h)
}

func BenchmarkHedge(b *testing.B) {
	for _, tc := range []struct {
		name    string
		timeout time.Duration
	}{{"timeout", time.Minute}, {"no-timeout", 0}} {
		plain, hedged := hedgeStacks(b, tc.timeout)
		for _, v := range []struct {
			name string
			fn   Func[int]
		}{{"without", plain}, {"with", hedged}} {
			b.Run(tc.name+"/hedge="+v.name, func(b *testing.B) {
				ctx := context.Background()
				b.ReportAllocs()
				for b.Loop() {
					v.fn(ctx)
				}
			})
			b.Run(tc.name+"/parallel/hedge="+v.name, func(b *testing.B) {
				b.ReportAllocs()
				b.RunParallel(func(pb *testing.PB) {
					ctx := context.Background()
					for pb.Next() {
						v.fn(ctx)
					}
				})
			})
		}
	}
}

// A hedge whose first attempt answers before the delay costs at most 2
// allocations over the same stack without it: its race, and its timer when
// the pool has none. Without a per-attempt timeout, the first attempt needs
// a cancellable context of its own, which context.WithCancel makes in two
// more, and a third for its Done channel.
func TestHedgeAllocationsWhenNotNeeded(t *testing.T) {
	for _, tc := range []struct {
		timeout time.Duration
		most    float64
	}{{time.Minute, 2}, {0, 4}} {
		plain, hedged := hedgeStacks(t, tc.timeout)
		ctx := context.Background()
		base := testing.AllocsPerRun(1000, func() { plain(ctx) })
		with := testing.AllocsPerRun(1000, func() { hedged(ctx) })
		if with-base > tc.most {
			t.Errorf("timeout %v: a hedged call answered before the delay allocates %.1f times, %.1f more than without the hedge; want at most %v more", tc.timeout, with, with-base, tc.most)
		}
	}
}
