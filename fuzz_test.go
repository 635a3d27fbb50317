package resilience

import (
	"errors"
	"testing"
	"time"
)

// FuzzRetryDelays checks the delay math for any configuration NewRetry
// accepts: no delay is negative or above MaxDelay, jitter included, and
// without jitter the exponential and linear strategies never shrink.
func FuzzRetryDelays(f *testing.F) {
	f.Add(uint8(0), int64(time.Second), int64(10*time.Second), 2.0, false, int64(0))
	f.Add(uint8(1), int64(time.Millisecond), int64(time.Hour), 1.0, true, int64(0))
	f.Add(uint8(3), int64(1), int64(1<<62), 1e300, false, int64(5*time.Second))
	f.Add(uint8(0), int64(1<<62), int64(1<<63-1), 3.5, true, int64(-1))
	f.Add(uint8(2), int64(0), int64(300*time.Millisecond), 0.0, false, int64(1<<63-1))
	// Found by the fuzzer: RetryRandom's bound + 1 overflowed at the
	// largest MaxDelay.
	f.Add(uint8(']'), int64(4611686018427387885), int64(1<<63-1), 3.5, false, int64(-7))
	f.Fuzz(func(t *testing.T, strategy uint8, initial, max int64, mult float64, noJitter bool, retryAfter int64) {
		r, err := NewRetry(RetryConfig{
			MaxAttempts:   50,
			Strategy:      RetryStrategy(strategy % 5),
			InitialDelay:  time.Duration(initial),
			MaxDelay:      time.Duration(max),
			Multiplier:    mult,
			DisableJitter: noJitter,
		})
		if err != nil {
			if !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("NewRetry error %v does not match ErrInvalidConfig", err)
			}
			return
		}
		d := r.newBackOff()
		var prev time.Duration
		for i := range 70 {
			var cause error = errBoom
			if retryAfter != 0 && i%3 == 2 {
				cause = retryAfterErr{time.Duration(retryAfter)}
			}
			got := d.next(cause)
			if got < 0 || got > r.max {
				t.Fatalf("retry %d: delay %v outside [0, %v] (config %+v)", i+1, got, r.max, *r)
			}
			if cause == errBoom && noJitter && (r.strategy == RetryExponential || r.strategy == RetryLinear) {
				if got < prev {
					t.Fatalf("retry %d: delay %v shrank from %v without jitter (config %+v)", i+1, got, prev, *r)
				}
				prev = got
			}
		}
	})
}
