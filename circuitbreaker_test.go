package resilience

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// recorder collects a breaker's transitions.
type recorder struct {
	mu  sync.Mutex
	got []string
}

func (r *recorder) hook(name string, from, to State) {
	r.mu.Lock()
	r.got = append(r.got, name+":"+from.String()+"->"+to.String())
	r.mu.Unlock()
}

func (r *recorder) transitions() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.got...)
}

func TestStateString(t *testing.T) {
	for s, want := range map[State]string{StateClosed: "closed", StateHalfOpen: "half-open", StateOpen: "open", State(7): "State(7)"} {
		if got := s.String(); got != want {
			t.Errorf("State(%d).String() = %q; want %q", int(s), got, want)
		}
	}
}

func TestCircuitBreakerLifecycle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rec := &recorder{}
		cb := mustBreaker(t, CircuitBreakerConfig{Name: "llm", FailMax: 3, OpenTimeout: 10 * time.Second, OnStateChange: rec.hook})
		var calls atomic.Int32
		fail := true
		fn := WithCircuitBreaker(func(ctx context.Context) (int, error) {
			calls.Add(1)
			if fail {
				return 0, errBoom
			}
			return 42, nil
		}, cb)
		ctx := context.Background()

		for i := range 3 {
			if cb.State() != StateClosed {
				t.Fatalf("after %d failures State() = %v; want closed", i, cb.State())
			}
			if _, err := fn(ctx); !errors.Is(err, errBoom) {
				t.Fatalf("call %d: err = %v; want errBoom", i, err)
			}
		}
		if got := cb.State(); got != StateOpen {
			t.Fatalf("after FailMax failures State() = %v; want open", got)
		}
		// Open: rejected at once, fn not called.
		_, err := fn(ctx)
		if !errors.Is(err, ErrCircuitOpen) {
			t.Fatalf("while open err = %v; want ErrCircuitOpen", err)
		}
		var e *Error
		if !errors.As(err, &e) || e.Name != "llm" {
			t.Fatalf("errors.As(%v) = %+v; want *Error named llm", err, e)
		}
		if IsRetryable(err) {
			t.Errorf("IsRetryable(open error) = true; want false")
		}
		if calls.Load() != 3 {
			t.Fatalf("fn called %d times; want 3 (none while open)", calls.Load())
		}

		// Just before OpenTimeout it is still open; at OpenTimeout, half-open.
		time.Sleep(10*time.Second - time.Nanosecond)
		if got := cb.State(); got != StateOpen {
			t.Fatalf("just before OpenTimeout State() = %v; want open", got)
		}
		time.Sleep(time.Nanosecond + 1)
		if got := cb.State(); got != StateHalfOpen {
			t.Fatalf("after OpenTimeout State() = %v; want half-open", got)
		}
		// A failed probe re-opens it.
		if _, err := fn(ctx); !errors.Is(err, errBoom) {
			t.Fatalf("probe err = %v; want errBoom", err)
		}
		if got := cb.State(); got != StateOpen {
			t.Fatalf("after failed probe State() = %v; want open", got)
		}
		// A successful probe closes it.
		time.Sleep(10*time.Second + 1)
		fail = false
		if v, err := fn(ctx); err != nil || v != 42 {
			t.Fatalf("probe = %v, %v; want 42, nil", v, err)
		}
		if got := cb.State(); got != StateClosed {
			t.Fatalf("after successful probe State() = %v; want closed", got)
		}
		want := []string{
			"llm:closed->open", "llm:open->half-open", "llm:half-open->open",
			"llm:open->half-open", "llm:half-open->closed",
		}
		if got := rec.transitions(); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("transitions = %v; want %v", got, want)
		}
	})
}

func TestCircuitBreakerDefaults(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{})
		fn := WithCircuitBreaker(failFunc, cb)
		for range 4 {
			fn(context.Background())
		}
		if got := cb.State(); got != StateClosed {
			t.Fatalf("after 4 failures State() = %v; want closed (FailMax defaults to 5)", got)
		}
		fn(context.Background())
		if got := cb.State(); got != StateOpen {
			t.Fatalf("after 5 failures State() = %v; want open", got)
		}
		time.Sleep(60*time.Second - 1)
		if got := cb.State(); got != StateOpen {
			t.Fatalf("before 60s State() = %v; want open (OpenTimeout defaults to 60s)", got)
		}
		time.Sleep(2 * time.Nanosecond)
		if got := cb.State(); got != StateHalfOpen {
			t.Fatalf("just after 60s State() = %v; want half-open", got)
		}
	})
}

func TestCircuitBreakerSuccessResetsConsecutiveFailures(t *testing.T) {
	cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 2})
	fail, ok := WithCircuitBreaker(failFunc, cb), WithCircuitBreaker(okFunc, cb)
	ctx := context.Background()
	fail(ctx)
	ok(ctx)
	fail(ctx)
	if got := cb.State(); got != StateClosed {
		t.Fatalf("fail, ok, fail with FailMax 2: State() = %v; want closed", got)
	}
	fail(ctx)
	if got := cb.State(); got != StateOpen {
		t.Fatalf("two consecutive failures: State() = %v; want open", got)
	}
}

// Extra calls while half-open get ErrCircuitOpen; HalfOpenMaxCalls probes
// are let through and all must succeed to close.
func TestCircuitBreakerHalfOpenProbes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second, HalfOpenMaxCalls: 2})
		WithCircuitBreaker(failFunc, cb)(context.Background())
		time.Sleep(time.Second + 1)

		release := make(chan struct{})
		var inside atomic.Int32
		probe := WithCircuitBreaker(func(ctx context.Context) (int, error) {
			inside.Add(1)
			<-release
			return 1, nil
		}, cb)
		var wg sync.WaitGroup
		for range 2 {
			wg.Go(func() {
				if _, err := probe(context.Background()); err != nil {
					t.Errorf("probe err = %v", err)
				}
			})
		}
		synctest.Wait()
		if inside.Load() != 2 {
			t.Fatalf("%d probes inside; want 2", inside.Load())
		}
		// A third call is rejected while both probes are out.
		if _, err := WithCircuitBreaker(okFunc, cb)(context.Background()); !errors.Is(err, ErrCircuitOpen) {
			t.Fatalf("extra half-open call err = %v; want ErrCircuitOpen", err)
		}
		close(release)
		wg.Wait()
		if got := cb.State(); got != StateClosed {
			t.Fatalf("after 2 successful probes State() = %v; want closed", got)
		}
	})
}

func TestCircuitBreakerCallerCancellationIsNeutral(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second})
		ctxFn := WithCircuitBreaker(func(ctx context.Context) (int, error) {
			<-ctx.Done()
			return 0, ctx.Err()
		}, cb)

		// Cancelled and past-deadline callers in the closed state.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := ctxFn(ctx); !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v; want context.Canceled", err)
		}
		dctx, dcancel := context.WithTimeout(context.Background(), time.Millisecond)
		defer dcancel()
		if _, err := ctxFn(dctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v; want DeadlineExceeded", err)
		}
		if got := cb.State(); got != StateClosed {
			t.Fatalf("after caller cancellations State() = %v; want closed", got)
		}

		// A cancelled probe neither closes nor re-opens it, and frees the
		// probe slot for the next caller.
		WithCircuitBreaker(failFunc, cb)(context.Background())
		time.Sleep(time.Second + 1)
		if got := cb.State(); got != StateHalfOpen {
			t.Fatalf("State() = %v; want half-open", got)
		}
		ctx2, cancel2 := context.WithCancel(context.Background())
		cancel2()
		ctxFn(ctx2)
		if got := cb.State(); got != StateHalfOpen {
			t.Fatalf("after cancelled probe State() = %v; want half-open", got)
		}
		if _, err := WithCircuitBreaker(okFunc, cb)(context.Background()); err != nil {
			t.Fatalf("next probe err = %v; want admitted", err)
		}
		if got := cb.State(); got != StateClosed {
			t.Fatalf("State() = %v; want closed", got)
		}
	})
}

func TestCircuitBreakerIsFailure(t *testing.T) {
	notFound := errors.New("not found")
	cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, IsFailure: func(err error) bool { return !errors.Is(err, notFound) }})
	WithCircuitBreaker(func(context.Context) (int, error) { return 0, notFound }, cb)(context.Background())
	if got := cb.State(); got != StateClosed {
		t.Fatalf("after a non-failure error State() = %v; want closed", got)
	}
	WithCircuitBreaker(failFunc, cb)(context.Background())
	if got := cb.State(); got != StateOpen {
		t.Fatalf("after a failure State() = %v; want open", got)
	}
}

func TestCircuitBreakerPanicCountsAndPropagates(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second})
		panicky := WithCircuitBreaker(func(context.Context) (int, error) { panic("kaboom") }, cb)
		callRecover := func() (r any) {
			defer func() { r = recover() }()
			panicky(context.Background())
			return nil
		}
		if r := callRecover(); r != "kaboom" {
			t.Fatalf("recovered %v; want kaboom", r)
		}
		if got := cb.State(); got != StateOpen {
			t.Fatalf("after panic State() = %v; want open", got)
		}
		// A panicking probe re-opens it rather than leaving it half-open.
		time.Sleep(time.Second + 1)
		if r := callRecover(); r != "kaboom" {
			t.Fatalf("recovered %v; want kaboom", r)
		}
		if got := cb.State(); got != StateOpen {
			t.Fatalf("after panicking probe State() = %v; want open", got)
		}
		time.Sleep(time.Second + 1)
		if _, err := WithCircuitBreaker(okFunc, cb)(context.Background()); err != nil {
			t.Fatalf("probe after panics err = %v; want admitted", err)
		}
		if got := cb.State(); got != StateClosed {
			t.Fatalf("State() = %v; want closed", got)
		}
	})
}

func TestCircuitBreakerGoexitReleasesProbe(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second})
		WithCircuitBreaker(failFunc, cb)(context.Background())
		time.Sleep(time.Second + 1)
		done := make(chan struct{})
		go func() {
			defer close(done)
			WithCircuitBreaker(func(context.Context) (int, error) { runtime.Goexit(); return 0, nil }, cb)(context.Background())
		}()
		<-done
		// The probe was given back (as a failure), not leaked.
		if got := cb.State(); got != StateOpen {
			t.Fatalf("after Goexit probe State() = %v; want open", got)
		}
		time.Sleep(time.Second + 1)
		if _, err := WithCircuitBreaker(okFunc, cb)(context.Background()); err != nil {
			t.Fatalf("next probe err = %v; want admitted", err)
		}
	})
}

func TestCircuitBreakerReset(t *testing.T) {
	rec := &recorder{}
	cb := mustBreaker(t, CircuitBreakerConfig{Name: "db", FailMax: 2, OnStateChange: rec.hook})
	cb.Reset() // closed already: nothing to report
	fail := WithCircuitBreaker(failFunc, cb)
	fail(context.Background())
	fail(context.Background())
	if cb.State() != StateOpen {
		t.Fatal("want open")
	}
	cb.Reset()
	if got := cb.State(); got != StateClosed {
		t.Fatalf("after Reset State() = %v; want closed", got)
	}
	// Counts are zeroed: one failure does not re-open it.
	fail(context.Background())
	if got := cb.State(); got != StateClosed {
		t.Fatalf("one failure after Reset: State() = %v; want closed", got)
	}
	want := "db:closed->open db:open->closed"
	if got := strings.Join(rec.transitions(), " "); got != want {
		t.Errorf("transitions = %q; want %q", got, want)
	}
}

// An in-flight call admitted before Reset finishes against the old state and
// neither changes the new one nor reports a transition.
func TestCircuitBreakerResetWithCallInFlight(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rec := &recorder{}
		cb := mustBreaker(t, CircuitBreakerConfig{Name: "x", FailMax: 1, OnStateChange: rec.hook})
		release := make(chan struct{})
		fn := WithCircuitBreaker(func(context.Context) (int, error) { <-release; return 0, errBoom }, cb)
		go fn(context.Background())
		synctest.Wait()
		cb.Reset()
		close(release)
		synctest.Wait()
		if got := cb.State(); got != StateClosed {
			t.Fatalf("State() = %v; want closed", got)
		}
		if got := rec.transitions(); len(got) != 0 {
			t.Fatalf("transitions = %v; want none", got)
		}
	})
}

// The callback runs outside every lock: it may call the breaker's own
// methods, and sees the transition before the causing call returns.
func TestOnStateChangeMayCallBreaker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var cb *CircuitBreaker
		var seen []string
		cb = mustBreaker(t, CircuitBreakerConfig{
			Name: "auth", FailMax: 1, OpenTimeout: time.Second,
			OnStateChange: func(name string, from, to State) {
				// Re-entrant calls: State, Name and even Reset.
				seen = append(seen, fmt.Sprintf("%s->%s (State()=%s)", from, to, cb.State()))
				if to == StateHalfOpen {
					cb.Reset()
				}
			},
		})
		WithCircuitBreaker(failFunc, cb)(context.Background())
		if len(seen) != 1 || seen[0] != "closed->open (State()=open)" {
			t.Fatalf("after the failing call returned, seen = %v", seen)
		}
		time.Sleep(time.Second + 1)
		if got := cb.State(); got != StateHalfOpen {
			t.Fatalf("State() = %v; want half-open (reported before the callback's Reset)", got)
		}
		want := []string{"closed->open (State()=open)", "open->half-open (State()=half-open)", "half-open->closed (State()=closed)"}
		if strings.Join(seen, "|") != strings.Join(want, "|") {
			t.Fatalf("seen = %v; want %v", seen, want)
		}
		if got := cb.State(); got != StateClosed {
			t.Fatalf("State() = %v; want closed", got)
		}
	})
}

func TestOnStateChangeConcurrentInOrder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rec := &recorder{}
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 3, OpenTimeout: time.Second, OnStateChange: rec.hook})
		fn := WithCircuitBreaker(func(context.Context) (int, error) { return 0, errBoom }, cb)
		ok := WithCircuitBreaker(okFunc, cb)
		var wg sync.WaitGroup
		for round := range 20 {
			for range 8 {
				wg.Go(func() { fn(context.Background()) })
			}
			wg.Wait()
			time.Sleep(time.Second + 1)
			if round%2 == 0 {
				ok(context.Background())
			} else {
				fn(context.Background())
			}
		}
		// Each delivered transition starts where the previous one ended.
		got := rec.transitions()
		if len(got) == 0 {
			t.Fatal("no transitions")
		}
		prev := "closed"
		for i, tr := range got {
			parts := strings.Split(strings.TrimPrefix(tr, ":"), "->")
			if parts[0] != prev {
				t.Fatalf("transition %d %q does not start at %q: %v", i, tr, prev, got)
			}
			prev = parts[1]
		}
	})
}

func TestOnStateChangePanicDoesNotWedgeDelivery(t *testing.T) {
	calls := 0
	cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, OnStateChange: func(string, State, State) {
		calls++
		if calls == 1 {
			panic("hook")
		}
	}})
	func() {
		defer func() { recover() }()
		WithCircuitBreaker(failFunc, cb)(context.Background())
	}()
	cb.Reset()
	if calls != 2 {
		t.Fatalf("callback called %d times; want 2 (delivery continues after a panic)", calls)
	}
}

func TestNewCircuitBreakerInvalid(t *testing.T) {
	for _, tc := range []struct {
		cfg  CircuitBreakerConfig
		want string
	}{
		{CircuitBreakerConfig{FailMax: -1}, "CircuitBreakerConfig.FailMax = -1"},
		{CircuitBreakerConfig{OpenTimeout: -time.Second}, "CircuitBreakerConfig.OpenTimeout = -1s"},
		{CircuitBreakerConfig{HalfOpenMaxCalls: -2}, "CircuitBreakerConfig.HalfOpenMaxCalls = -2"},
		{CircuitBreakerConfig{HalfOpenMaxCalls: 1 << 40}, "CircuitBreakerConfig.HalfOpenMaxCalls = 1099511627776"},
	} {
		cb, err := NewCircuitBreaker(tc.cfg)
		if cb != nil || !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewCircuitBreaker(%+v) = %v, %v; want ErrInvalidConfig containing %q", tc.cfg, cb, err, tc.want)
		}
	}
}

func TestWithCircuitBreakerNilArgs(t *testing.T) {
	cb := mustBreaker(t, CircuitBreakerConfig{})
	for name, fn := range map[string]Func[int]{
		"nil fn": WithCircuitBreaker[int](nil, cb),
		"nil cb": WithCircuitBreaker(okFunc, nil),
	} {
		if _, err := fn(context.Background()); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: err = %v; want ErrInvalidConfig", name, err)
		}
	}
}

// One breaker serves wrappers of different result types.
func TestCircuitBreakerSharedAcrossTypes(t *testing.T) {
	cb := mustBreaker(t, CircuitBreakerConfig{Name: "svc", FailMax: 2})
	s := WithCircuitBreaker(func(context.Context) (string, error) { return "", errBoom }, cb)
	n := WithCircuitBreaker(failFunc, cb)
	s(context.Background())
	n(context.Background())
	if _, err := WithCircuitBreaker(func(context.Context) ([]byte, error) { return nil, nil }, cb)(context.Background()); !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("err = %v; want ErrCircuitOpen after failures from two result types", err)
	}
	if cb.Name() != "svc" {
		t.Errorf("Name() = %q", cb.Name())
	}
}

func TestCircuitBreakerNoLeakUnderConcurrency(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 5, OpenTimeout: 100 * time.Millisecond, HalfOpenMaxCalls: 3})
		var n atomic.Int64
		fn := WithCircuitBreaker(func(ctx context.Context) (int, error) {
			i := n.Add(1)
			time.Sleep(time.Duration(i%7) * time.Millisecond)
			switch i % 5 {
			case 0:
				panic("p")
			case 1, 2:
				return 0, errBoom
			}
			return 1, nil
		}, cb)
		var wg sync.WaitGroup
		for range 16 {
			wg.Go(func() {
				for range 200 {
					func() {
						defer func() { recover() }()
						fn(context.Background())
					}()
				}
			})
		}
		wg.Wait()
		// Whatever happened, the breaker recovers once the downstream does.
		time.Sleep(time.Second)
		for range 3 {
			if _, err := WithCircuitBreaker(okFunc, cb)(context.Background()); err != nil {
				t.Fatalf("healthy call err = %v; breaker stuck in %v", err, cb.State())
			}
		}
		if got := cb.State(); got != StateClosed {
			t.Fatalf("State() = %v; want closed", got)
		}
	})
}

func TestCircuitBreakerForce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rec := &recorder{}
		cb := mustBreaker(t, CircuitBreakerConfig{Name: "f", FailMax: 1, OpenTimeout: time.Second, OnStateChange: rec.hook, DisableLogging: true})
		var calls atomic.Int32
		fn := WithCircuitBreaker(func(context.Context) (int, error) { calls.Add(1); return 0, errBoom }, cb)

		cb.ForceOpen()
		if cb.State() != StateOpen || !cb.Forced() {
			t.Fatalf("after ForceOpen: %v, forced %v", cb.State(), cb.Forced())
		}
		// It holds past OpenTimeout: no half-open probe.
		time.Sleep(time.Hour)
		if _, err := fn(context.Background()); !errors.Is(err, ErrCircuitOpen) || calls.Load() != 0 {
			t.Fatalf("forced open: err %v, calls %d; want rejected", err, calls.Load())
		}
		if cb.State() != StateOpen {
			t.Fatalf("forced open became %v", cb.State())
		}

		cb.ForceClose()
		for range 5 { // failures are not counted while forced closed
			fn(context.Background())
		}
		if cb.State() != StateClosed || calls.Load() != 5 {
			t.Fatalf("forced closed: %v after %d calls", cb.State(), calls.Load())
		}
		cb.Reset()
		if cb.Forced() {
			t.Fatal("Reset did not clear the forced state")
		}
		fn(context.Background())
		if cb.State() != StateOpen {
			t.Fatalf("after Reset a failure should open it again (FailMax 1): %v", cb.State())
		}
		want := "f:closed->open f:open->closed f:closed->open"
		if got := strings.Join(rec.transitions(), " "); got != want {
			t.Errorf("transitions %q; want %q", got, want)
		}
	})
}

func TestCircuitBreakerSinceAndCounts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		cb := mustBreaker(t, CircuitBreakerConfig{FailMax: 3, DisableLogging: true})
		if !cb.Since().Equal(start) {
			t.Errorf("Since() = %v; want the construction time %v", cb.Since(), start)
		}
		WithCircuitBreaker(okFunc, cb)(context.Background())
		WithCircuitBreaker(failFunc, cb)(context.Background())
		if c := cb.Counts(); c != (BreakerCounts{Requests: 2, TotalSuccesses: 1, TotalFailures: 1, ConsecutiveFailures: 1, WindowCalls: 2, WindowFailures: 1}) {
			t.Errorf("Counts() = %+v", c)
		}
		time.Sleep(time.Minute)
		WithCircuitBreaker(failFunc, cb)(context.Background())
		WithCircuitBreaker(failFunc, cb)(context.Background())
		if cb.State() != StateOpen || !cb.Since().Equal(start.Add(time.Minute)) {
			t.Errorf("State %v Since %v; want open since %v", cb.State(), cb.Since(), start.Add(time.Minute))
		}
	})
}

func TestCircuitBreakerLogs(t *testing.T) {
	var buf strings.Builder
	var mu sync.Mutex
	logger := slog.New(slog.NewTextHandler(&lockedWriter{w: &buf, mu: &mu}, nil))
	cb := mustBreaker(t, CircuitBreakerConfig{Name: "pay", FailMax: 1, Logger: logger})
	WithCircuitBreaker(failFunc, cb)(context.Background())
	cb.Reset()
	mu.Lock()
	out := buf.String()
	mu.Unlock()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 ||
		!strings.Contains(lines[0], "level=WARN") || !strings.Contains(lines[0], `msg="circuit breaker open"`) ||
		!strings.Contains(lines[0], "service=pay") || !strings.Contains(lines[0], "from=closed") || !strings.Contains(lines[0], "to=open") ||
		!strings.Contains(lines[0], "fail_max=1") ||
		!strings.Contains(lines[1], "level=INFO") || !strings.Contains(lines[1], "to=closed") {
		t.Fatalf("log:\n%s", out)
	}
	// Off means off.
	buf.Reset()
	quiet := mustBreaker(t, CircuitBreakerConfig{FailMax: 1, Logger: logger, DisableLogging: true})
	WithCircuitBreaker(failFunc, quiet)(context.Background())
	if buf.Len() != 0 {
		t.Fatalf("DisableLogging still logged: %s", buf.String())
	}
}

type lockedWriter struct {
	w  *strings.Builder
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// gbTimeout reads the OpenTimeout the breaker's live gobreaker generation
// really uses (gobreaker fixes it at construction).
func gbTimeout(cb *CircuitBreaker) time.Duration {
	v := reflect.ValueOf(cb.cur.Load().gb).Elem().FieldByName("timeout")
	return time.Duration(v.Int())
}

// Found in the second review of the pipeline change (concurrency); it
// failed before the fix.
// Reset racing a Reload that changes OpenTimeout: Reset builds its new
// gobreaker generation from the settings before it takes evMu, so it can
// store a generation with the old OpenTimeout after reconfigure stored one
// with the new: OpenTimeout() (and a BreakerSync) then say one thing and
// the breaker does another, until the next change.
func TestResetRacingReloadKeepsNewOpenTimeout(t *testing.T) {
	reg := mustRegistry(t, nil)
	cb := reg.CircuitBreaker("reset-race")
	cfg := reg.Config()
	for i := range 2000 {
		d := time.Duration(1+i%2) * time.Minute
		cfg.DefaultCircuitBreaker.OpenTimeout = d
		var wg sync.WaitGroup
		start := make(chan struct{})
		wg.Go(func() { <-start; cb.Reset() })
		wg.Go(func() {
			<-start
			if err := reg.Reload(cfg); err != nil {
				t.Error(err)
			}
		})
		close(start)
		wg.Wait()
		if got, want := gbTimeout(cb), cb.OpenTimeout(); got != want {
			t.Fatalf("iteration %d: after Reset raced Reload, OpenTimeout() = %v but the breaker runs with %v", i, want, got)
		}
	}
}
