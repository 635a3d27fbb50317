package benchmarks

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/failsafe-go/failsafe-go"
	"github.com/failsafe-go/failsafe-go/bulkhead"
	"github.com/failsafe-go/failsafe-go/circuitbreaker"
	"github.com/failsafe-go/failsafe-go/fallback"
	"github.com/failsafe-go/failsafe-go/retrypolicy"
	"github.com/failsafe-go/failsafe-go/timeout"
	"github.com/sony/gobreaker/v2"

	"github.com/resilience-go/resilience"
)

// fn is the shape every stack protects and returns.
type fn = func(ctx context.Context) (int, error)

// checksCtx is the protected function of every stack. It looks at its
// context once, as net/http does first thing, so that no stack wins by never
// materialising its timeout's Done channel.
func checksCtx(ctx context.Context) (int, error) {
	select {
	case <-ctx.Done():
		return 0, ctx.Err()
	default:
		return 1, nil
	}
}

var errBoom = errors.New("boom")

func failing(context.Context) (int, error) { return 0, errBoom }

// The settings every stack shares: the same five policies, configured alike.
const (
	maxAttempts    = 3
	attemptTimeout = time.Minute
	slots          = 1024
	maxWait        = 100 * time.Millisecond
)

// config is what varies between a stack for the success path and one whose
// breaker is to be forced open.
type config struct {
	failMax     int           // consecutive failures that open the breaker
	openTimeout time.Duration // how long it stays open
	retryDelay  time.Duration // the first retry's wait; it doubles, up to 10x
}

var (
	// closed is resilience's defaults: FailMax 5, OpenTimeout 60s, retries
	// from 1s.
	closed = config{failMax: 5, openTimeout: time.Minute, retryDelay: time.Second}
	// open trips on one failure and stays open for an hour.
	open = config{failMax: 1, openTimeout: time.Hour, retryDelay: time.Second}
)

// A stack builds fn protected by breaker(retry(timeout(bulkhead))) under a
// fallback value of 0. With trip set, it forces the breaker open by failing
// through it first, and fails tb if the breaker did not open.
type stack func(tb testing.TB, c config, f fn, trip bool) fn

// stacks are the implementations compared, in the order they are reported.
var stacks = []struct {
	name  string
	build stack
}{
	{"resilience", resilienceStack},
	{"handwritten", handwrittenStack},
	{"failsafe", failsafeStack},
}

// resilienceStack is this module's Compose.
func resilienceStack(tb testing.TB, c config, f fn, trip bool) fn {
	tb.Helper()
	return resilience.Compose(f, resilience.Stack[int]{
		CircuitBreaker: resilienceBreaker(tb, c, trip),
		Retry: must(resilience.NewRetry(resilience.RetryConfig{
			MaxAttempts: maxAttempts, InitialDelay: c.retryDelay, MaxDelay: 10 * c.retryDelay,
		}))(tb),
		Timeout:  attemptTimeout,
		Bulkhead: must(resilience.NewBulkhead(resilience.BulkheadConfig{Name: "bench", Limit: slots, MaxWait: maxWait}))(tb),
		Fallback: resilience.FallbackValue(0),
	})
}

// resilienceBreaker returns a breaker configured by c, tripped open if trip
// is set.
func resilienceBreaker(tb testing.TB, c config, trip bool) *resilience.CircuitBreaker {
	tb.Helper()
	cb := must(resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{
		Name: "bench", FailMax: c.failMax, OpenTimeout: c.openTimeout,
		// Its slog record of the trip would land in the benchmark output,
		// where benchstat cannot parse it; the others log nothing.
		DisableLogging: true,
	}))(tb)
	if trip {
		resilience.WithCircuitBreaker(failing, cb)(context.Background())
		if s := cb.State(); s != resilience.StateOpen {
			tb.Fatalf("resilience breaker is %v after tripping; want open", s)
		}
	}
	return cb
}

func must[P any](p P, err error) func(testing.TB) P {
	return func(tb testing.TB) P {
		tb.Helper()
		if err != nil {
			tb.Fatal(err)
		}
		return p
	}
}

// gobreakerSettings configures gobreaker as resilience configures it.
func gobreakerSettings(c config) gobreaker.Settings {
	return gobreaker.Settings{
		Name:    "bench",
		Timeout: c.openTimeout,
		ReadyToTrip: func(n gobreaker.Counts) bool {
			return n.ConsecutiveFailures >= uint32(c.failMax)
		},
	}
}

// handwritten is the five policies written out by hand, the least a careful
// programmer would write: gobreaker's two-step breaker, a retry loop, a
// context.WithTimeout per attempt, a buffered channel as the semaphore (with
// a timer only when it is full), and the fallback value.
type handwritten struct {
	cb         *gobreaker.TwoStepCircuitBreaker[struct{}]
	sem        chan struct{}
	retryDelay time.Duration
	fn         fn // a func value, so the compiler cannot inline it
}

var errFull = errors.New("bulkhead full")

func handwrittenStack(tb testing.TB, c config, f fn, trip bool) fn {
	tb.Helper()
	h := &handwritten{
		cb:         gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreakerSettings(c)),
		sem:        make(chan struct{}, slots),
		retryDelay: c.retryDelay,
		fn:         f,
	}
	if trip {
		done, err := h.cb.Allow()
		if err != nil {
			tb.Fatal(err)
		}
		done(errBoom)
		if s := h.cb.State(); s != gobreaker.StateOpen {
			tb.Fatalf("gobreaker is %v after tripping; want open", s)
		}
	}
	return h.call
}

func (h *handwritten) call(ctx context.Context) (int, error) {
	done, err := h.cb.Allow()
	if err != nil {
		return 0, nil // the fallback value
	}
	v, err := h.retry(ctx)
	done(err)
	if err != nil {
		return 0, nil // the fallback value
	}
	return v, nil
}

func (h *handwritten) retry(ctx context.Context) (int, error) {
	delay := h.retryDelay
	for attempt := 1; ; attempt++ {
		v, err := h.attempt(ctx)
		if err == nil || attempt == maxAttempts {
			return v, err
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return v, err
		case <-t.C:
		}
		delay = min(2*delay, 10*h.retryDelay)
	}
}

func (h *handwritten) attempt(ctx context.Context) (int, error) {
	tctx, cancel := context.WithTimeout(ctx, attemptTimeout)
	defer cancel()
	select {
	case h.sem <- struct{}{}:
	default:
		t := time.NewTimer(maxWait)
		select {
		case h.sem <- struct{}{}:
			t.Stop()
		case <-t.C:
			return 0, errFull
		case <-tctx.Done():
			t.Stop()
			return 0, tctx.Err()
		}
	}
	defer func() { <-h.sem }()
	return h.fn(tctx)
}

// failsafeStack is failsafe-go with the same policies. failsafe.With lists
// them outermost first, so this is
// Fallback(CircuitBreaker(RetryPolicy(Timeout(Bulkhead(fn))))), resilience's
// order. The executor is built once; each call gives it the caller's context
// with WithContext, and fn gets the attempt's context from the execution.
func failsafeStack(tb testing.TB, c config, f fn, trip bool) fn {
	tb.Helper()
	exec := failsafe.With[int](
		fallback.NewWithResult(0),
		failsafeBreaker(tb, c, trip),
		retrypolicy.NewBuilder[int]().
			WithMaxAttempts(maxAttempts).
			WithBackoff(c.retryDelay, 10*c.retryDelay).
			Build(),
		timeout.New[int](attemptTimeout),
		bulkhead.NewBuilder[int](slots).WithMaxWaitTime(maxWait).Build(),
	)
	call := func(e failsafe.Execution[int]) (int, error) { return f(e.Context()) }
	return func(ctx context.Context) (int, error) {
		return exec.WithContext(ctx).GetWithExecution(call)
	}
}

// failsafeBreaker returns a failsafe-go breaker configured by c, tripped
// open if trip is set.
func failsafeBreaker(tb testing.TB, c config, trip bool) circuitbreaker.CircuitBreaker[int] {
	tb.Helper()
	cb := circuitbreaker.NewBuilder[int]().
		WithFailureThreshold(uint(c.failMax)).
		WithDelay(c.openTimeout).
		Build()
	if trip {
		failsafe.With[int](cb).Get(func() (int, error) { return 0, errBoom })
		if !cb.IsOpen() {
			tb.Fatalf("failsafe breaker is %v after tripping; want open", cb.State())
		}
	}
	return cb
}

// newGobreaker returns gobreaker's one-step breaker configured by c, tripped
// open if trip is set.
func newGobreaker(tb testing.TB, c config, trip bool) *gobreaker.CircuitBreaker[int] {
	tb.Helper()
	cb := gobreaker.NewCircuitBreaker[int](gobreakerSettings(c))
	if trip {
		cb.Execute(func() (int, error) { return 0, errBoom })
		if s := cb.State(); s != gobreaker.StateOpen {
			tb.Fatalf("gobreaker is %v after tripping; want open", s)
		}
	}
	return cb
}

// gobreakerOpen is the reference for a rejection: gobreaker's own Execute on
// an open breaker, with the fallback value as a plain if.
func gobreakerOpen(tb testing.TB, f fn) fn {
	tb.Helper()
	cb := newGobreaker(tb, open, true)
	return func(ctx context.Context) (int, error) {
		v, err := cb.Execute(func() (int, error) { return f(ctx) })
		if err != nil {
			return 0, nil // the fallback value
		}
		return v, nil
	}
}

// TestStacksAgree checks that the stacks compared do the same work: each
// calls fn once and returns (1, nil) on success; each calls fn maxAttempts
// times and answers with the fallback value when every attempt fails; and
// each answers with the fallback value without calling fn when its breaker is
// open. Otherwise the benchmarks would not compare like with like.
func TestStacksAgree(t *testing.T) {
	fast := closed
	fast.retryDelay = time.Millisecond // the failure case waits for real
	// counting counts the calls of f and checks that each gets a context
	// the stack's timeout can cancel: failsafe-go's Timeout cancels a plain
	// cancellable context from a timer rather than setting a deadline, so
	// Done, not Deadline, is what the stacks have in common.
	counting := func(t *testing.T, f fn) (fn, *int) {
		n := new(int)
		return func(ctx context.Context) (int, error) {
			*n++
			if ctx.Done() == nil {
				t.Error("fn ran with a context no timeout can cancel")
			}
			return f(ctx)
		}, n
	}
	ctx := context.Background() // Done is nil: only a stack's timeout sets it
	for _, s := range stacks {
		t.Run(s.name, func(t *testing.T) {
			f, n := counting(t, checksCtx)
			if v, err := s.build(t, closed, f, false)(ctx); v != 1 || err != nil || *n != 1 {
				t.Errorf("success: got (%d, %v) after %d calls of fn; want (1, nil) after 1", v, err, *n)
			}
			f, n = counting(t, failing)
			if v, err := s.build(t, fast, f, false)(ctx); v != 0 || err != nil || *n != maxAttempts {
				t.Errorf("failure: got (%d, %v) after %d calls of fn; want (0, nil) after %d", v, err, *n, maxAttempts)
			}
			f, n = counting(t, checksCtx)
			if v, err := s.build(t, open, f, true)(ctx); v != 0 || err != nil || *n != 0 {
				t.Errorf("breaker open: got (%d, %v) after %d calls of fn; want (0, nil) after 0", v, err, *n)
			}
		})
	}
	t.Run("gobreaker", func(t *testing.T) {
		f, n := counting(t, checksCtx)
		if v, err := gobreakerOpen(t, f)(ctx); v != 0 || err != nil || *n != 0 {
			t.Errorf("breaker open: got (%d, %v) after %d calls of fn; want (0, nil) after 0", v, err, *n)
		}
	})
}
