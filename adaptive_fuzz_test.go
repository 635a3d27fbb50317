package resilience

import (
	"context"
	"errors"
	"math"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// adFuzzSample is one finished call fed to an adaptive limit.
type adFuzzSample struct {
	step     time.Duration // since the previous sample
	rtt      time.Duration
	inUse    int
	overload bool
}

// adFuzzSamples decodes n samples from data, 4 bytes each, cycling over
// data so that a short input still closes many windows. hi scales inUse.
func adFuzzSamples(data []byte, n, hi int) []adFuzzSample {
	if len(data) == 0 {
		data = []byte{0}
	}
	at := func(i int) int { return int(data[i%len(data)]) }
	out := make([]adFuzzSample, n)
	for i := range out {
		b0, b1, b2, b3 := at(4*i), at(4*i+1), at(4*i+2), at(4*i+3)
		out[i] = adFuzzSample{
			step: time.Duration(b0) * time.Millisecond,
			// 1ns up to about 18 minutes, and a few nonsense negatives.
			rtt:      time.Duration(1)<<(b1%41) - time.Duration(b3>>7),
			inUse:    b2 * 2 * hi / 255,
			overload: b3&1 == 1,
		}
	}
	return out
}

// adFuzzConfig builds a valid adaptive configuration and starting limit
// from the fuzzer's numbers.
func adFuzzConfig(algo AdaptiveAlgorithm, minLimit, maxLimit, start uint16, smoothing, window uint8) (AdaptiveConfig, int) {
	cfg := AdaptiveConfig{
		Algorithm: algo,
		MinLimit:  int(minLimit % 1000),
		Window:    time.Duration(window) * time.Millisecond,
	}
	switch {
	case maxLimit == 0: // 10 times the starting limit
	case maxLimit >= 0xff00: // "no bound": the largest ints
		cfg.MaxLimit = math.MaxInt - int(math.MaxUint16-maxLimit)
	default:
		cfg.MaxLimit = max(cfg.MinLimit, 1) + int(maxLimit%2000)
	}
	if smoothing != 0 {
		cfg.Smoothing = float64(smoothing) / 255
	}
	limit := max(cfg.MinLimit, 1) + int(start)
	if cfg.MaxLimit != 0 {
		limit = min(limit, cfg.MaxLimit)
	}
	return cfg, limit
}

// FuzzAdaptiveLimit checks, for both algorithms and any bounds, that an
// adaptive limit never leaves [MinLimit, MaxLimit] whatever latencies and
// overloads it is fed, and that a bulkhead whose limit shrinks and grows
// under waiting callers never strands one: every caller gets a slot once
// the holders release theirs, and no more than MaxLimit are inside.
func FuzzAdaptiveLimit(f *testing.F) {
	// minLimit, maxLimit, start, smoothing, window, samples
	f.Add(uint16(0), uint16(0), uint16(9), uint8(0), uint8(0), []byte{})
	// Calm and fully used, then 5x the latency: the gradient shrinks.
	f.Add(uint16(2), uint16(38), uint16(18), uint8(0), uint8(100),
		[]byte{10, 23, 255, 0, 10, 23, 255, 0, 10, 23, 255, 0, 10, 25, 255, 0})
	// Overloads at full use: AIMD and the gradient shrink to MinLimit.
	f.Add(uint16(1), uint16(9), uint16(9), uint8(255), uint8(1), []byte{50, 20, 255, 1})
	// Alternating calm and overloaded windows, a tight range.
	f.Add(uint16(5), uint16(1), uint16(0), uint8(128), uint8(10),
		[]byte{1, 10, 200, 0, 1, 10, 200, 1, 1, 40, 255, 0, 2, 0, 0, 129})
	// Idle (inUse 0) and huge latencies; default bounds.
	f.Add(uint16(0), uint16(0), uint16(200), uint8(3), uint8(255), []byte{255, 40, 0, 0, 0, 0, 0, 128})
	// A wide range, fast windows, latency swinging by orders of magnitude.
	f.Add(uint16(1), uint16(1999), uint16(50), uint8(51), uint8(1),
		[]byte{1, 1, 255, 0, 1, 30, 128, 0, 1, 5, 255, 0, 1, 35, 64, 1, 1, 2, 255, 0})
	// "No bound" (MaxLimit near math.MaxInt), the limit set only to
	// MinLimit.
	f.Add(uint16(1), uint16(0xfff0), uint16(10), uint8(0), uint8(0), make([]byte, 16))
	f.Fuzz(func(t *testing.T, minLimit, maxLimit, start uint16, smoothing, window uint8, samples []byte) {
		for _, algo := range []AdaptiveAlgorithm{AdaptiveGradient, AdaptiveAIMD} {
			cfg, limit := adFuzzConfig(algo, minLimit, maxLimit, start, smoothing, window)
			if err := cfg.validate(limit); err != nil {
				t.Fatalf("config %+v with limit %d built to be valid: %v", cfg, limit, err)
			}
			lo, hi := cfg.bounds(limit)
			adFuzzEstimate(t, cfg, limit, lo, hi, adFuzzSamples(samples, 600, hi))
			synctest.Test(t, func(t *testing.T) {
				adFuzzBulkhead(t, cfg, limit, lo, hi, samples)
			})
		}
	})
}

// adFuzzEstimate feeds ss to a fresh adaptive limit and checks its
// estimate, and every limit it returns, after each sample.
func adFuzzEstimate(t *testing.T, cfg AdaptiveConfig, limit, lo, hi int, ss []adFuzzSample) {
	t.Helper()
	a := newAdaptive(cfg, limit)
	var now time.Duration
	for i, s := range ss {
		now += s.step
		n, m := a.sample(now, s.rtt, s.inUse, s.overload)
		e := a.estimate
		if math.IsNaN(e) || e < float64(lo) || e > float64(hi) || int(e) < lo || int(e) > hi {
			t.Fatalf("%s %+v from %d: estimate %v after sample %d %+v; want within [%d, %d]", cfg.Algorithm, cfg, limit, e, i, s, lo, hi)
		}
		if n != 0 && (n < lo || n > hi || m < lo || m > n) {
			t.Fatalf("%s %+v from %d: new limit %d admitting %d after sample %d %+v; want within [%d, %d]", cfg.Algorithm, cfg, limit, n, m, i, s, lo, hi)
		}
	}
}

// adFuzzBulkhead runs callers through an adaptive bulkhead, in a synctest
// bubble, while its limit moves: from the calls' own latency and overload
// (through the pipeline's observe) and from SetLimit, shrinking to lo and
// growing to hi. Every caller must get its slots, in bounded virtual time.
func adFuzzBulkhead(t *testing.T, cfg AdaptiveConfig, limit, lo, hi int, data []byte) {
	if len(data) == 0 {
		data = []byte{0}
	}
	at := func(i int) int { return int(data[i%len(data)]) }
	b := mustBulkhead(t, BulkheadConfig{Limit: limit, Adaptive: &cfg})
	errOverload := ErrTimeout
	var inside, most atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	workers := 1 + at(0)%24
	var calls atomic.Int64 // finished
	total := 0
	var wg sync.WaitGroup
	for w := range workers {
		rounds := 1 + at(w+1)%4
		total += rounds
		wg.Go(func() {
			for r := range rounds {
				k := at(4*(w*4+r)) + at(4*(w*4+r)+1)
				fn := WithBulkhead(func(context.Context) (int, error) {
					bhRaiseMax(&most, inside.Add(1))
					defer inside.Add(-1)
					time.Sleep(time.Duration(k%200) * time.Millisecond)
					if k%3 == 0 {
						return 0, errOverload
					}
					return 1, nil
				}, b)
				if _, err := fn(ctx); err != nil && !errors.Is(err, errOverload) {
					if ctx.Err() == nil {
						t.Errorf("call error %v; want a slot (no MaxWait, no MaxQueue)", err)
					}
					return
				}
				calls.Add(1)
				if l := b.Limit(); l < lo || l > hi {
					t.Errorf("Limit() = %d; want within [%d, %d]", l, lo, hi)
				}
			}
		})
	}
	// Shrink and grow the limit under the callers.
	wg.Go(func() {
		for i := range 8 {
			time.Sleep(time.Duration(at(3*i+2)%100) * time.Millisecond)
			var l int
			switch at(3*i+3) % 3 {
			case 0:
				l = lo
			case 1:
				l = hi
			default:
				l = lo + at(3*i+4)%(hi-lo+1)
			}
			if err := b.SetLimit(l); err != nil {
				t.Errorf("SetLimit(%d) = %v", l, err)
			}
			if got := b.Limit(); got < lo || got > hi {
				t.Errorf("Limit() = %d after SetLimit(%d); want within [%d, %d]", got, l, lo, hi)
			}
		}
	})

	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(time.Hour): // virtual: about a minute of calls at most
		st := b.Stats()
		t.Errorf("callers stranded: %d of %d calls unfinished after an hour; limit %d, stats %+v", int64(total)-calls.Load(), total, b.Limit(), st)
		cancel()
		<-done
	}
	// Everyone has left: the bulkhead has a slot for the next caller.
	if l := b.Limit(); l < lo || l > hi {
		t.Errorf("Limit() = %d at the end; want within [%d, %d]", l, lo, hi)
	}
	actx, acancel := context.WithTimeout(context.Background(), time.Minute)
	release, err := b.Acquire(actx)
	acancel()
	if err != nil {
		t.Errorf("Acquire on an idle bulkhead = %v; want a slot (limit %d)", err, b.Limit())
	}
	release()
	if m := most.Load(); m > int64(hi) {
		t.Errorf("%d calls inside at once; want at most MaxLimit %d", m, hi)
	}
	if st := b.Stats(); st.Active != 0 || st.Waiting != 0 || st.Rejected != 0 || st.Completed != uint64(total)+1 {
		t.Errorf("Stats() = %+v after every caller finished; want none active, waiting or rejected, %d completed", st, total+1)
	}
}

// SetLimit on an adaptive bulkhead keeps the limit within [MinLimit,
// MaxLimit], and the algorithm moves on from there: the bulkhead never
// stays at a limit its bounds forbid. (Before c875c2d, SetLimit(50) here
// left the limit at 50, 5x MaxLimit, for as long as the estimate held.)
func TestAdaptiveSetLimitStaysWithinBounds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Limit: 5, Adaptive: &AdaptiveConfig{MinLimit: 2, MaxLimit: 10}})
		for _, tc := range []struct{ set, want int }{{50, 10}, {1, 2}, {7, 7}} {
			if err := b.SetLimit(tc.set); err != nil {
				t.Fatalf("SetLimit(%d) = %v", tc.set, err)
			}
			if l := b.Limit(); l != tc.want {
				t.Errorf("Limit() = %d after SetLimit(%d); want %d, within [2, 10]", l, tc.set, tc.want)
			}
		}
		b.SetLimit(50)
		fn := WithBulkhead(func(context.Context) (int, error) {
			time.Sleep(10 * time.Millisecond)
			return 1, nil
		}, b)
		for range 300 { // 30 windows of one call at a time
			fn(context.Background())
		}
		if l := b.Limit(); l < 2 || l > 10 {
			t.Errorf("Limit() = %d after SetLimit(50) and 3s of calls; want within [2, 10]", l)
		}
	})
}

// An adaptive bulkhead whose bound is near the largest int ("no bound":
// MaxLimit math.MaxInt) keeps a usable limit after SetLimit(math.MaxInt).
// Its estimate is a float64, where math.MaxInt rounds up to 2^63; before
// 2b55948 capped adaptive limits at 2^30, int() of that overflowed (to
// math.MinInt on amd64): the limit went negative and no caller was ever let
// in again. A huge starting Limit must be refused or kept usable too.
func TestAdaptiveSetLimitHugeKeepsSlots(t *testing.T) {
	for _, cfg := range []BulkheadConfig{
		{Limit: 10, Adaptive: &AdaptiveConfig{MaxLimit: math.MaxInt}},
		{Limit: 10, Adaptive: &AdaptiveConfig{MaxLimit: math.MaxInt - 100, MinLimit: 5}},
		{Limit: math.MaxInt/10 + 1, Adaptive: &AdaptiveConfig{}},
		{Limit: math.MaxInt, Adaptive: &AdaptiveConfig{MaxLimit: math.MaxInt}},
	} {
		b, err := NewBulkhead(cfg)
		if err != nil {
			if !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("NewBulkhead(Limit %d, MaxLimit %d) = %v; want a bulkhead or ErrInvalidConfig", cfg.Limit, cfg.Adaptive.MaxLimit, err)
			}
			continue
		}
		if err := b.SetLimit(math.MaxInt); err != nil {
			t.Fatalf("SetLimit(math.MaxInt) = %v", err)
		}
		if l := b.Limit(); l < cfg.Limit {
			t.Errorf("Limit %d, MaxLimit %d: Limit() = %d after SetLimit(math.MaxInt); want at least the starting limit", cfg.Limit, cfg.Adaptive.MaxLimit, l)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		release, err := b.Acquire(ctx)
		cancel()
		if err != nil {
			t.Errorf("Limit %d, MaxLimit %d: Acquire on an empty bulkhead after SetLimit(math.MaxInt) = %v; want a slot", cfg.Limit, cfg.Adaptive.MaxLimit, err)
		}
		release()
	}
}
