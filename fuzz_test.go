package resilience

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
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
		d := r.params().newBackOff()
		var prev time.Duration
		for i := range 70 {
			got := d.next()
			if got < 0 || got > r.params().max {
				t.Fatalf("retry %d: delay %v outside [0, %v] (config %+v)", i+1, got, r.params().max, *r.params())
			}
			if noJitter && (r.params().strategy == RetryExponential || r.params().strategy == RetryLinear) {
				if got < prev {
					t.Fatalf("retry %d: delay %v shrank from %v without jitter (config %+v)", i+1, got, prev, *r.params())
				}
				prev = got
			}
		}
	})
}

// FuzzLoadConfig feeds the loader random variables and checks that it
// either returns a Config that NewRegistry accepts or an error in which
// every line names a variable it was given, and never panics.
func FuzzLoadConfig(f *testing.F) {
	f.Add("RETRY_MAX_ATTEMPTS", "3", "TIMEOUT_LLM", "60", "CIRCUIT_BREAKER_X_FAIL_MAX", "0")
	f.Add("RETRY_EXPONENTIAL_MAX", "0.25", "RETRY_EXPONENTIAL_BASE", "NaN", "BULKHEAD_DB_LIMIT", "-1")
	f.Add("CIRCUIT_BREAKER__TIMEOUT", "1e400", "TIMEOUT_", "x", "BULKHEAD_DEFAULT_MAX_WAIT", "1h")
	f.Add("RESILIENCE_ENABLED", "maybe", "RETRY_JITTER", "1", "CIRCUIT_BREAKER_DEFAULT_HALF_OPEN_MAX_CALLS", "99999999999")
	f.Add("RESILIENCE_CHAOS", "true", "CHAOS_LLM_LATENCY_RATE", "0.5", "CHAOS_LLM_ERROR_RATE", "1.5")
	f.Add("CHAOS_DEFAULT_LATENCY", "2s", "CHAOS__ERROR_RATE", "NaN", "CHAOS_X_LATENCY", "-1")
	f.Add("BULKHEAD_LLM_ADAPTIVE", "gradient", "BULKHEAD_LLM_MIN_LIMIT", "0", "BULKHEAD_LLM_MAX_LIMIT", "1e9")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2, k3, v3 string) {
		env := map[string]string{k1: v1, k2: v2, k3: v3}
		cfg, err := LoadConfigWith(LoadOptions{Environment: env})
		if err == nil {
			if _, err := NewRegistry(cfg); err != nil {
				t.Fatalf("LoadConfigWith(%q) accepted a config NewRegistry rejects: %v", env, err)
			}
			return
		}
		if !errors.Is(err, ErrInvalidConfig) {
			t.Fatalf("error %v does not match ErrInvalidConfig", err)
		}
		for _, line := range strings.Split(err.Error(), "\n") {
			named := false
			for k := range env {
				if k != "" && (strings.HasPrefix(line, k+"=") || strings.HasPrefix(line, strconv.Quote(k)+"=")) {
					named = true
				}
			}
			if !named {
				t.Fatalf("error line %q names none of the variables %q", line, env)
			}
		}
	})
}

// FuzzParseDuration checks that plain seconds and Go durations parse
// without panics or wrap-around: a plain number's sign is kept.
func FuzzParseDuration(f *testing.F) {
	for _, s := range []string{"60", "0.25", "1m", "1500ms", "-1", "9223372036.854775807", "1e19", "NaN", "-0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDuration(s)
		if err != nil {
			return
		}
		if x, perr := strconv.ParseFloat(strings.TrimSpace(s), 64); perr == nil {
			if (x > 0 && d < 0) || (x < 0 && d > 0) {
				t.Fatalf("ParseDuration(%q) = %v: sign flipped", s, d)
			}
		}
	})
}

// fuzzService names each fuzz case's policies and metrics afresh.
var fuzzService atomic.Int64

// FuzzEntryPointsAgree plays one script of downstream outcomes through
// Compose, ForService and Transport over the same policies, and checks that
// they agree call by call (result, error kind, attempts made) and that each
// leaves nothing behind: no slot held, every call recorded once. A byte of
// the script is one attempt's outcome: success, a retryable error, a
// permanent one, a short or a long retry hint, or a panic.
func FuzzEntryPointsAgree(f *testing.F) {
	f.Add([]byte{1, 1, 0}, uint8(2))
	f.Add([]byte{3, 0, 4, 2}, uint8(2))
	f.Add([]byte{5, 1, 5, 0}, uint8(1))
	f.Add([]byte{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0}, uint8(0))
	f.Fuzz(func(t *testing.T, script []byte, attempts uint8) {
		if len(script) > 24 {
			script = script[:24]
		}
		maxAttempts := int(attempts%4) + 1
		var runs []string
		for _, ep := range entryPoints {
			synctest.Test(t, func(t *testing.T) {
				svc := "fuzz-" + strconv.FormatInt(fuzzService.Add(1), 10)
				reg := tableRegistry(t, svc, func(c *Config) {
					c.Retry.MaxAttempts = maxAttempts
					c.DefaultCircuitBreaker = CircuitBreakerConfig{FailMax: 3, OpenTimeout: time.Second}
				})
				next := 0
				down := func(context.Context) error {
					b := byte(0)
					if next < len(script) {
						b = script[next] % 6
					}
					next++
					switch b {
					case 1:
						return errBoom
					case 2:
						return Permanent(errBoom)
					case 3:
						return retryAfterErr{time.Second}
					case 4:
						return retryAfterErr{time.Hour}
					case 5:
						panic("downstream bug")
					}
					return nil
				}
				var got []string
				calls := 0
				for calls < 8 && next < len(script) {
					calls++
					before := next
					var err error
					panicked := func() (p bool) {
						defer func() { p = recover() != nil }()
						err = ep.call(context.Background(), reg, svc, down)
						return false
					}()
					got = append(got, fmt.Sprintf("%s/%d", fuzzKind(err, panicked), next-before))
					time.Sleep(1500 * time.Millisecond) // past the breaker's open timeout, sometimes
				}
				if a := reg.Bulkhead(svc).Stats().Active; a != 0 {
					t.Errorf("%s: %d slots held after every call returned", ep.name, a)
				}
				var recorded int64
				for _, n := range callsRecorded(svc) {
					recorded += n
				}
				if recorded != int64(calls) {
					t.Errorf("%s: %d calls recorded for %d made", ep.name, recorded, calls)
				}
				runs = append(runs, strings.Join(got, " "))
			})
		}
		for i, r := range runs[1:] {
			if r != runs[0] {
				t.Fatalf("%s and %s disagree on script %v (MaxAttempts %d):\n%s\n%s",
					entryPoints[0].name, entryPoints[i+1].name, script, maxAttempts, runs[0], r)
			}
		}
	})
}

// fuzzKind names the outcome of a call for FuzzEntryPointsAgree.
func fuzzKind(err error, panicked bool) string {
	switch {
	case panicked:
		return "panic"
	case err == nil:
		return "ok"
	case errors.Is(err, ErrCircuitOpen):
		return "open"
	case errors.Is(err, ErrRetryBudgetExhausted):
		return "budget"
	case errors.Is(err, ErrRetryExhausted):
		var e *Error
		errors.As(err, &e)
		return fmt.Sprintf("exhausted(%d,%v)", e.Attempts, e.RetryAfter())
	case errors.Is(err, errBoom):
		return "boom"
	case errors.As(err, new(retryAfterErr)):
		return "hinted"
	}
	return "other:" + err.Error()
}
