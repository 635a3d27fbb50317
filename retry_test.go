package resilience

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"slices"
	"strings"
	"syscall"
	"testing"
	"testing/synctest"
	"time"
)

type delayLog struct{ delays []time.Duration }

func (l *delayLog) hook(attempt int, err error, d time.Duration) { l.delays = append(l.delays, d) }

func TestRetryDelaysByStrategy(t *testing.T) {
	s := time.Second
	for _, tc := range []struct {
		name string
		cfg  RetryConfig
		want []time.Duration
	}{
		{"exponential", RetryConfig{MaxAttempts: 6, DisableJitter: true}, []time.Duration{s, 2 * s, 4 * s, 8 * s, 10 * s}},
		{"exponential base 3", RetryConfig{MaxAttempts: 4, Multiplier: 3, MaxDelay: time.Minute, DisableJitter: true}, []time.Duration{s, 3 * s, 9 * s}},
		{"linear", RetryConfig{MaxAttempts: 5, Strategy: RetryLinear, DisableJitter: true, MaxDelay: 3 * s}, []time.Duration{s, 2 * s, 3 * s, 3 * s}},
		{"fixed", RetryConfig{MaxAttempts: 4, Strategy: RetryFixed, InitialDelay: 250 * time.Millisecond, DisableJitter: true}, []time.Duration{250 * time.Millisecond, 250 * time.Millisecond, 250 * time.Millisecond}},
		{"max below 1s", RetryConfig{MaxAttempts: 3, MaxDelay: 300 * time.Millisecond, DisableJitter: true}, []time.Duration{300 * time.Millisecond, 300 * time.Millisecond}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				log := &delayLog{}
				tc.cfg.OnRetry = log.hook
				r := mustRetry(t, tc.cfg)
				errs := make([]error, 20)
				for i := range errs {
					errs[i] = errBoom
				}
				fn, _ := script(errs...)
				start := time.Now()
				_, err := WithRetry(fn, r)(context.Background())
				if !errors.Is(err, ErrRetryExhausted) {
					t.Fatalf("err = %v; want ErrRetryExhausted", err)
				}
				if fmt.Sprint(log.delays) != fmt.Sprint(tc.want) {
					t.Fatalf("delays = %v; want %v", log.delays, tc.want)
				}
				var total time.Duration
				for _, d := range tc.want {
					total += d
				}
				if got := time.Since(start); got != total {
					t.Errorf("elapsed %v; want %v (the waits really happen)", got, total)
				}
			})
		})
	}
}

func TestRetryJitterWithinBounds(t *testing.T) {
	for _, strategy := range []RetryStrategy{RetryExponential, RetryLinear, RetryFixed, RetryRandom} {
		t.Run(strategy.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				log := &delayLog{}
				r := mustRetry(t, RetryConfig{MaxAttempts: 8, Strategy: strategy, InitialDelay: time.Second, MaxDelay: 5 * time.Second, OnRetry: log.hook})
				for range 50 {
					fn, _ := script(errBoom, errBoom, errBoom, errBoom, errBoom, errBoom, errBoom, errBoom)
					WithRetry(fn, r)(context.Background())
				}
				distinct := map[time.Duration]bool{}
				for i, d := range log.delays {
					n := i%7 + 1 // the retry number within its call
					var base time.Duration
					switch strategy {
					case RetryExponential, RetryRandom:
						base = min(time.Second<<(n-1), 5*time.Second)
					case RetryLinear:
						base = min(time.Duration(n)*time.Second, 5*time.Second)
					case RetryFixed:
						base = time.Second
					}
					lo, hi := base/2, min(base*3/2, 5*time.Second)
					if strategy == RetryRandom {
						lo, hi = 0, base
					}
					if d < lo || d > hi {
						t.Fatalf("retry %d delay %v outside [%v, %v]", n, d, lo, hi)
					}
					distinct[d] = true
				}
				if len(distinct) < 10 {
					t.Errorf("only %d distinct delays in %d: jitter is not random", len(distinct), len(log.delays))
				}
			})
		})
	}
}

func TestRetryStopsOnSuccess(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fn, calls := script(errBoom, errBoom, nil)
		v, err := WithRetry(fn, mustRetry(t, RetryConfig{MaxAttempts: 5}))(context.Background())
		if err != nil || v != 3 || *calls != 3 {
			t.Fatalf("= %v, %v after %d calls; want 3, nil after 3", v, err, *calls)
		}
	})
}

func TestRetryExhausted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fn, calls := script(errBoom, errBoom, errBoom, errBoom)
		_, err := WithRetry(fn, mustRetry(t, RetryConfig{}))(context.Background())
		if *calls != 3 {
			t.Fatalf("%d attempts; want 3 (the default)", *calls)
		}
		if !errors.Is(err, ErrRetryExhausted) || !errors.Is(err, errBoom) {
			t.Fatalf("err = %v; want ErrRetryExhausted and errBoom", err)
		}
		var e *Error
		if !errors.As(err, &e) || e.Attempts != 3 {
			t.Fatalf("errors.As = %+v; want Attempts 3", e)
		}
		if want := "resilience: retries exhausted after 3 attempts: boom"; err.Error() != want {
			t.Errorf("Error() = %q; want %q", err.Error(), want)
		}
	})
}

func TestRetryNonRetryableComesBackAsIs(t *testing.T) {
	perm := Permanent(errBoom)
	for _, err := range []error{perm, context.Canceled, &Error{Err: ErrCircuitOpen}} {
		fn, calls := script(err, nil)
		_, got := WithRetry(fn, mustRetry(t, RetryConfig{}))(context.Background())
		if got != err || *calls != 1 {
			t.Errorf("err %v: got %v after %d calls; want it as it was after 1", err, got, *calls)
		}
	}
}

func TestRetryIfOverrides(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		only := errors.New("only this")
		r := mustRetry(t, RetryConfig{MaxAttempts: 5, RetryIf: func(err error) bool { return errors.Is(err, only) }})
		fn, calls := script(only, context.Canceled)
		_, err := WithRetry(fn, r)(context.Background())
		if !errors.Is(err, context.Canceled) || *calls != 2 {
			t.Fatalf("err = %v after %d calls; want context.Canceled after 2", err, *calls)
		}
	})
}

func TestRetryOnRetryArguments(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var got []string
		r := mustRetry(t, RetryConfig{MaxAttempts: 3, DisableJitter: true, OnRetry: func(a int, err error, d time.Duration) {
			got = append(got, fmt.Sprintf("%d:%v:%v", a, err, d))
		}})
		fn, _ := script(errBoom, io.ErrUnexpectedEOF, nil)
		WithRetry(fn, r)(context.Background())
		if want := "1:boom:1s 2:unexpected EOF:2s"; strings.Join(got, " ") != want {
			t.Fatalf("OnRetry saw %q; want %q", strings.Join(got, " "), want)
		}
	})
}

type retryAfterErr struct{ d time.Duration }

func (e retryAfterErr) Error() string             { return "slow down" }
func (e retryAfterErr) RetryAfter() time.Duration { return e.d }

func TestRetryAfterSetsNextWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		log := &delayLog{}
		r := mustRetry(t, RetryConfig{MaxAttempts: 4, DisableJitter: true, MaxDelay: 5 * time.Second, OnRetry: log.hook})
		fn, _ := script(retryAfterErr{3 * time.Second}, retryAfterErr{-1}, retryAfterErr{5 * time.Second}, nil)
		start := time.Now()
		if _, err := WithRetry(fn, r)(context.Background()); err != nil {
			t.Fatal(err)
		}
		// A hint no longer than MaxDelay replaces the backoff for its wait,
		// exactly, without jitter; the backoff itself still advances (2s
		// for the second retry, whose negative RetryAfter is no hint).
		want := []time.Duration{3 * time.Second, 2 * time.Second, 5 * time.Second}
		if fmt.Sprint(log.delays) != fmt.Sprint(want) {
			t.Fatalf("delays = %v; want %v", log.delays, want)
		}
		if got := time.Since(start); got != 10*time.Second {
			t.Errorf("elapsed %v; want 10s", got)
		}
	})
}

// Bug 11 of the pipeline issue: WithRetry clamped a hint longer than
// MaxDelay to MaxDelay and retried before the server asked, earning
// another 429, while Transport gave up. Now a longer hint ends the retries
// at once, and the caller gets the last error with the hint.
func TestRetryHintLongerThanMaxDelayIsNotRetriedEarly(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		log := &delayLog{}
		r := mustRetry(t, RetryConfig{MaxAttempts: 3, MaxDelay: 5 * time.Second, OnRetry: log.hook})
		fn, calls := script(retryAfterErr{time.Minute}, nil)
		start := time.Now()
		_, err := WithRetry(fn, r)(context.Background())
		if *calls != 1 || len(log.delays) != 0 {
			t.Fatalf("made %d attempts and waited %v; want 1 attempt and no wait", *calls, log.delays)
		}
		if time.Since(start) != 0 {
			t.Errorf("elapsed %v; want 0", time.Since(start))
		}
		var e *Error
		if !errors.As(err, &e) || e.RetryAfter() != time.Minute || !errors.Is(err, ErrRetryExhausted) {
			t.Fatalf("err = %v; want an *Error matching ErrRetryExhausted with RetryAfter() = 1m", err)
		}
		var ra retryAfterErr
		if !errors.As(err, &ra) {
			t.Errorf("err = %v does not keep the last attempt's error", err)
		}
	})
}

func TestRetryWaitEndsWithCallerContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
		defer cancel()
		fn, calls := script(errBoom, errBoom, errBoom)
		start := time.Now()
		_, err := WithRetry(fn, mustRetry(t, RetryConfig{MaxAttempts: 5, DisableJitter: true}))(ctx)
		if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, errBoom) {
			t.Fatalf("err = %v; want DeadlineExceeded and the last error", err)
		}
		if errors.Is(err, ErrTimeout) {
			t.Errorf("err = %v matches ErrTimeout; the caller's deadline is not a timeout of ours", err)
		}
		if got := time.Since(start); got != 1500*time.Millisecond {
			t.Errorf("returned after %v; want at the caller's deadline, 1.5s", got)
		}
		if *calls != 2 {
			t.Errorf("%d attempts; want 2 (1s wait fits, 2s wait does not)", *calls)
		}
	})
}

func TestRetryStopsWhenCallerCancelledDuringAttempt(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	calls := 0
	fn := func(context.Context) (int, error) {
		calls++
		cancel()
		return 0, errBoom // retryable, but the caller is gone
	}
	_, err := WithRetry(fn, mustRetry(t, RetryConfig{}))(ctx)
	if !errors.Is(err, context.Canceled) || !errors.Is(err, errBoom) || calls != 1 {
		t.Fatalf("err = %v after %d calls; want Canceled and errBoom after 1", err, calls)
	}
}

func TestRetrySingleAttempt(t *testing.T) {
	fn, calls := script(errBoom)
	_, err := WithRetry(fn, mustRetry(t, RetryConfig{MaxAttempts: 1}))(context.Background())
	if !errors.Is(err, ErrRetryExhausted) || *calls != 1 {
		t.Fatalf("err = %v after %d calls", err, *calls)
	}
}

func TestNewRetryDefaultsAndInvalid(t *testing.T) {
	r := mustRetry(t, RetryConfig{})
	if r.MaxAttempts() != 3 || r.params().initial != time.Second || r.params().max != 10*time.Second || r.params().multiplier != 2 || !r.params().jitter {
		t.Errorf("defaults = %+v", *r.params())
	}
	if r := mustRetry(t, RetryConfig{MaxDelay: 250 * time.Millisecond}); r.params().initial != 250*time.Millisecond {
		t.Errorf("InitialDelay unset, MaxDelay 250ms: initial = %v; want 250ms", r.params().initial)
	}
}

func TestNewRetryInvalid(t *testing.T) {
	for _, tc := range []struct {
		cfg  RetryConfig
		want string
	}{
		{RetryConfig{MaxAttempts: -1}, "RetryConfig.MaxAttempts = -1"},
		{RetryConfig{Strategy: 9}, "RetryConfig.Strategy = 9"},
		{RetryConfig{InitialDelay: -1}, "RetryConfig.InitialDelay = -1ns"},
		{RetryConfig{MaxDelay: -time.Second}, "RetryConfig.MaxDelay = -1s"},
		{RetryConfig{InitialDelay: 2 * time.Second, MaxDelay: time.Second}, "RetryConfig.MaxDelay = 1s"},
		{RetryConfig{InitialDelay: 20 * time.Second}, "RetryConfig.InitialDelay = 20s"},
		{RetryConfig{Multiplier: 0.5}, "RetryConfig.Multiplier = 0.5"},
		{RetryConfig{Multiplier: -2}, "RetryConfig.Multiplier = -2"},
		{RetryConfig{Multiplier: nan()}, "RetryConfig.Multiplier = NaN"},
		{RetryConfig{Multiplier: inf()}, "RetryConfig.Multiplier = +Inf"},
	} {
		r, err := NewRetry(tc.cfg)
		if r != nil || !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewRetry(%+v) = %v, %v; want ErrInvalidConfig containing %q", tc.cfg, r, err, tc.want)
		}
	}
}

func nan() float64 { z := 0.0; return z / z }
func inf() float64 { z := 0.0; return 1 / z }

func TestRetryStrategyString(t *testing.T) {
	for s, want := range map[RetryStrategy]string{RetryExponential: "exponential", RetryLinear: "linear", RetryFixed: "fixed", RetryRandom: "random", 9: "RetryStrategy(9)"} {
		if got := s.String(); got != want {
			t.Errorf("%d.String() = %q; want %q", int(s), got, want)
		}
	}
}

func TestWithRetryNilArgs(t *testing.T) {
	for name, fn := range map[string]Func[int]{
		"nil fn": WithRetry[int](nil, mustRetry(t, RetryConfig{})),
		"nil r":  WithRetry(okFunc, nil),
	} {
		if _, err := fn(context.Background()); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: err = %v; want ErrInvalidConfig", name, err)
		}
	}
}

type tempErr struct{ temp bool }

func (e tempErr) Error() string   { return "temp" }
func (e tempErr) Temporary() bool { return e.temp }

type retryableErr struct{ ok bool }

func (e retryableErr) Error() string   { return "r" }
func (e retryableErr) Retryable() bool { return e.ok }

type netTimeout struct{}

func (netTimeout) Error() string   { return "i/o timeout" }
func (netTimeout) Timeout() bool   { return true }
func (netTimeout) Temporary() bool { return false }

func TestIsRetryable(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"plain error", errBoom, true},
		{"ErrTimeout", &Error{Err: ErrTimeout, Cause: context.DeadlineExceeded}, true},
		{"wrapped ErrTimeout", fmt.Errorf("call: %w", &Error{Err: ErrTimeout}), true},
		{"Permanent", Permanent(errBoom), false},
		{"wrapped Permanent", fmt.Errorf("x: %w", Permanent(io.ErrUnexpectedEOF)), false},
		{"ErrCircuitOpen", &Error{Err: ErrCircuitOpen}, false},
		{"context.Canceled", context.Canceled, false},
		{"caller deadline", context.DeadlineExceeded, false},
		{"wrapped caller deadline", fmt.Errorf("get: %w", context.DeadlineExceeded), false},
		{"ErrBulkheadFull", &Error{Err: ErrBulkheadFull}, true},
		{"ErrRetryExhausted", &Error{Err: ErrRetryExhausted, Cause: errBoom}, false},
		{"ErrRetryBudgetExhausted", &Error{Err: ErrRetryBudgetExhausted, Cause: errBoom}, false},
		{"ErrStale", &Error{Err: ErrStale, Cause: errBoom}, false},
		{"Retryable true", retryableErr{true}, true},
		{"Retryable false", retryableErr{false}, false},
		{"Temporary true", tempErr{true}, true},
		{"Temporary false", tempErr{false}, false},
		{"refused", &net.OpError{Op: "dial", Err: &osSyscallErr{syscall.ECONNREFUSED}}, true},
		{"reset", fmt.Errorf("read: %w", syscall.ECONNRESET), true},
		{"aborted", syscall.ECONNABORTED, true},
		{"broken pipe", syscall.EPIPE, true},
		{"unexpected EOF", io.ErrUnexpectedEOF, true},
		{"EOF through http.Client", &url.Error{Op: "Get", URL: "http://x", Err: io.EOF}, true},
		{"client timeout through http.Client", &url.Error{Op: "Get", URL: "http://x", Err: context.DeadlineExceeded}, false},
		{"refused through http.Client", &url.Error{Op: "Get", URL: "http://x", Err: &net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}}, true},
		{"net timeout", &net.OpError{Op: "read", Err: netTimeout{}}, true},
		{"dns not found", &net.DNSError{Err: "no such host", Name: "x", IsNotFound: true}, false},
	} {
		if got := IsRetryable(tc.err); got != tc.want {
			t.Errorf("IsRetryable(%s: %v) = %v; want %v", tc.name, tc.err, got, tc.want)
		}
	}
}

type osSyscallErr struct{ err error }

func (e *osSyscallErr) Error() string { return "connect: " + e.err.Error() }
func (e *osSyscallErr) Unwrap() error { return e.err }

// A real refused connection on loopback is classified as retryable.
func TestIsRetryableRealRefusedConnection(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, err = net.Dial("tcp", addr)
	if err == nil {
		t.Skip("port was reused")
	}
	if !IsRetryable(err) {
		t.Fatalf("IsRetryable(%v) = false; want true", err)
	}
}

func TestJitterAndClamp(t *testing.T) {
	max := 10 * time.Second
	for _, tc := range []struct {
		d    time.Duration
		r    float64
		want time.Duration
	}{
		{2 * time.Second, 0, time.Second},
		{2 * time.Second, 0.5, 2 * time.Second},
		{2 * time.Second, 0.999999999, 2999999998 * time.Nanosecond},
		{8 * time.Second, 0.9, max},
		{time.Duration(1<<63 - 1), 0.9, max},
		{-time.Second, 0.5, 0},
	} {
		if got := jitter(tc.d, max, tc.r); got != tc.want {
			t.Errorf("jitter(%v, %v, %v) = %v; want %v", tc.d, max, tc.r, got, tc.want)
		}
	}
	if got := clampDelay(-1, max); got != 0 {
		t.Errorf("clampDelay(-1) = %v", got)
	}
}

// RetryConfig.Delay chooses the wait by the error: at once after a refused
// connection, the strategy's backoff otherwise, capped by MaxDelay.
func TestRetryDelayByErrorType(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		refused := &net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}
		errs := []error{refused, errors.New("503"), refused, errors.New("slow down")}
		var waits []time.Duration
		rt := mustRetry(t, RetryConfig{
			MaxAttempts: 5, InitialDelay: time.Second, MaxDelay: 30 * time.Second, DisableJitter: true,
			RetryIf: func(error) bool { return true },
			Delay: func(attempt int, err error) (time.Duration, bool) {
				switch {
				case errors.Is(err, syscall.ECONNREFUSED):
					return 0, true
				case err.Error() == "slow down":
					return time.Hour, true // capped by MaxDelay
				}
				return 0, false
			},
			OnRetry: func(_ int, _ error, d time.Duration) { waits = append(waits, d) },
		})
		fn, _ := script(errs...)
		start := time.Now()
		if _, err := WithRetry(fn, rt)(context.Background()); err != nil {
			t.Fatal(err)
		}
		// The strategy's waits are 1s, 2s, 4s, 8s; Delay replaces the 1st,
		// 3rd and 4th.
		want := []time.Duration{0, 2 * time.Second, 0, 30 * time.Second}
		if !slices.Equal(waits, want) {
			t.Errorf("waits %v; want %v", waits, want)
		}
		if d := time.Since(start); d != 32*time.Second {
			t.Errorf("measured %v in all; want 32s", d)
		}
	})
}
