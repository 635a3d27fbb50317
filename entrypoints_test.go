package resilience

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// The cross-entry-point table: every semantic point of the pipeline runs
// through Compose, ForService and Transport alike, so that a new entry
// point, or a change to one, cannot silently differ from the others.

// entryPoint calls down once through one entry point, protected by the
// policies reg has for svc, and returns the call's error. For Transport,
// down is the base RoundTripper: its error is a network error, its success
// a 200.
type entryPoint struct {
	name string
	call func(ctx context.Context, reg *Registry, svc string, down func(context.Context) error) error
}

var entryPoints = []entryPoint{
	{"Compose", func(ctx context.Context, reg *Registry, svc string, down func(context.Context) error) error {
		fn := Compose(func(ctx context.Context) (int, error) { return 1, down(ctx) }, Stack[int]{
			Name:           svc,
			Operation:      svc, // as ForService and Transport name it
			CircuitBreaker: reg.CircuitBreaker(svc),
			Retry:          reg.Retry(),
			Timeout:        reg.Timeout(svc),
			Bulkhead:       reg.Bulkhead(svc),
		})
		_, err := fn(ctx)
		return err
	}},
	{"ForService", func(ctx context.Context, reg *Registry, svc string, down func(context.Context) error) error {
		_, err := ForService(reg, svc, func(ctx context.Context) (int, error) { return 1, down(ctx) })(ctx)
		return err
	}},
	{"Transport", func(ctx context.Context, reg *Registry, svc string, down func(context.Context) error) error {
		t := &Transport{
			Registry: reg,
			Service:  func(*http.Request) string { return svc },
			Base: roundTripFunc(func(r *http.Request) (*http.Response, error) {
				if err := down(r.Context()); err != nil {
					return nil, err
				}
				return &http.Response{StatusCode: http.StatusOK, Body: io.NopCloser(strings.NewReader("ok")), Request: r}, nil
			}),
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://downstream.test/", nil)
		if err != nil {
			return err
		}
		resp, err := t.RoundTrip(req)
		if resp != nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		return err
	}},
}

// tableRegistry returns a registry whose policies for svc are set by edit.
func tableRegistry(t *testing.T, svc string, edit func(*Config)) *Registry {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Retry = RetryConfig{MaxAttempts: 3, InitialDelay: time.Second, MaxDelay: 5 * time.Second, DisableJitter: true}
	cfg.Bulkheads[EnvKey(svc)] = BulkheadConfig{Limit: 1, FailFast: true}
	if edit != nil {
		edit(&cfg)
	}
	reg, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return reg
}

// callsRecorded sums resilience.calls of every site named name, by outcome.
func callsRecorded(name string) map[string]int64 {
	out := map[string]int64{}
	observed.mu.Lock()
	defer observed.mu.Unlock()
	sites := slices.Clone(observed.sites)
	for _, w := range observed.ownSites { // the registries'
		if s := w.Value(); s != nil && !s.gone() {
			sites = append(sites, s)
		}
	}
	for _, s := range sites {
		if s.name != name {
			continue
		}
		for o := range numOutcomes {
			if n := s.counts[o].Load(); n > 0 {
				out[outcomeNames[o]] += n
			}
		}
	}
	return out
}

// eachEntryPoint runs f for every entry point, in a synctest bubble, with a
// service name of its own.
func eachEntryPoint(t *testing.T, f func(t *testing.T, ep entryPoint, svc string)) {
	for _, ep := range entryPoints {
		t.Run(ep.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f(t, ep, uniqueName(strings.ToLower(t.Name())))
			})
		})
	}
}

// failing returns a downstream that fails with err on every call, and its
// call counter.
func failingDown(err error) (func(context.Context) error, *atomic.Int64) {
	var n atomic.Int64
	return func(context.Context) error { n.Add(1); return err }, &n
}

func TestEntryPointsRetryIf(t *testing.T) {
	eachEntryPoint(t, func(t *testing.T, ep entryPoint, svc string) {
		reg := tableRegistry(t, svc, func(c *Config) { c.Retry.RetryIf = func(err error) bool { return !errors.Is(err, errBoom) } })
		down, n := failingDown(errBoom)
		err := ep.call(context.Background(), reg, svc, down)
		if !errors.Is(err, errBoom) || n.Load() != 1 {
			t.Fatalf("err = %v after %d attempts; want boom after 1: RetryIf says no", err, n.Load())
		}
	})
}

func TestEntryPointsOnRetry(t *testing.T) {
	eachEntryPoint(t, func(t *testing.T, ep entryPoint, svc string) {
		var seen []string
		reg := tableRegistry(t, svc, func(c *Config) {
			c.Retry.OnRetry = func(attempt int, err error, d time.Duration) {
				seen = append(seen, fmt.Sprintf("%d:%v:%v", attempt, errors.Is(err, errBoom), d))
			}
		})
		var n atomic.Int64
		down := func(context.Context) error {
			if n.Add(1) < 3 {
				return errBoom
			}
			return nil
		}
		start := time.Now()
		if err := ep.call(context.Background(), reg, svc, down); err != nil {
			t.Fatal(err)
		}
		if got, want := strings.Join(seen, " "), "1:true:1s 2:true:2s"; got != want {
			t.Errorf("OnRetry saw %q; want %q", got, want)
		}
		if time.Since(start) != 3*time.Second {
			t.Errorf("took %v; want the 3s of waits", time.Since(start))
		}
		if got := callsRecorded(svc); fmt.Sprint(got) != "map[success:1]" {
			t.Errorf("resilience.calls = %v; want one success", got)
		}
	})
}

func TestEntryPointsIsFailure(t *testing.T) {
	eachEntryPoint(t, func(t *testing.T, ep entryPoint, svc string) {
		reg := tableRegistry(t, svc, func(c *Config) {
			c.Retry.MaxAttempts = 1
			c.DefaultCircuitBreaker.FailMax = 1
			c.DefaultCircuitBreaker.IsFailure = func(err error) bool { return !errors.Is(err, errBoom) }
		})
		down, _ := failingDown(errBoom)
		for range 3 {
			ep.call(context.Background(), reg, svc, down)
		}
		if st := reg.CircuitBreaker(svc).State(); st != StateClosed {
			t.Fatalf("breaker %v after errors IsFailure excuses; want closed", st)
		}
		other, _ := failingDown(io.ErrUnexpectedEOF)
		ep.call(context.Background(), reg, svc, other)
		if st := reg.CircuitBreaker(svc).State(); st != StateOpen {
			t.Fatalf("breaker %v after a counted failure with FailMax 1; want open", st)
		}
	})
}

func TestEntryPointsBudgetRefusal(t *testing.T) {
	eachEntryPoint(t, func(t *testing.T, ep entryPoint, svc string) {
		budget := mustBudget(t, RetryBudgetConfig{Ratio: 0.1, MinPerSecond: -1})
		reg := tableRegistry(t, svc, func(c *Config) { c.Retry.Budget = budget })
		down, n := failingDown(errBoom)
		err := ep.call(context.Background(), reg, svc, down)
		var e *Error
		if !errors.Is(err, ErrRetryBudgetExhausted) || !errors.Is(err, errBoom) || !errors.As(err, &e) || e.Attempts != 1 || n.Load() != 1 {
			t.Fatalf("err = %v after %d attempts; want ErrRetryBudgetExhausted with boom after 1", err, n.Load())
		}
	})
}

func TestEntryPointsCancelDuringWait(t *testing.T) {
	eachEntryPoint(t, func(t *testing.T, ep entryPoint, svc string) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		reg := tableRegistry(t, svc, func(c *Config) {
			c.Retry.OnRetry = func(int, error, time.Duration) { cancel() } // just before the wait
		})
		down, n := failingDown(errBoom)
		start := time.Now()
		err := ep.call(ctx, reg, svc, down)
		var e *Error
		if !errors.As(err, &e) || !errors.Is(err, context.Canceled) || !errors.Is(err, errBoom) || e.Attempts != 1 {
			t.Fatalf("err = %v; want an *Error matching context.Canceled and boom after 1 attempt", err)
		}
		if n.Load() != 1 || time.Since(start) != 0 {
			t.Errorf("%d attempts in %v; want 1, and no wait", n.Load(), time.Since(start))
		}
		if got := callsRecorded(svc); fmt.Sprint(got) != "map[canceled:1]" {
			t.Errorf("resilience.calls = %v; want one canceled", got)
		}
	})
}

func TestEntryPointsHintLongerThanMaxDelay(t *testing.T) {
	eachEntryPoint(t, func(t *testing.T, ep entryPoint, svc string) {
		reg := tableRegistry(t, svc, nil)
		down, n := failingDown(retryAfterErr{time.Minute})
		start := time.Now()
		err := ep.call(context.Background(), reg, svc, down)
		var e *Error
		if !errors.As(err, &e) || e.RetryAfter() != time.Minute || n.Load() != 1 || time.Since(start) != 0 {
			t.Fatalf("err = %v after %d attempts and %v; want the hint of 1m at once, after 1 attempt", err, n.Load(), time.Since(start))
		}
	})
}

func TestEntryPointsHintWaitedExactly(t *testing.T) {
	eachEntryPoint(t, func(t *testing.T, ep entryPoint, svc string) {
		reg := tableRegistry(t, svc, nil)
		var n atomic.Int64
		down := func(context.Context) error {
			if n.Add(1) == 1 {
				return retryAfterErr{4500 * time.Millisecond}
			}
			return nil
		}
		start := time.Now()
		if err := ep.call(context.Background(), reg, svc, down); err != nil || time.Since(start) != 4500*time.Millisecond {
			t.Fatalf("err = %v after %v; want success after exactly the 4.5s asked for", err, time.Since(start))
		}
	})
}

// panicDown panics on its first call, then succeeds.
func panicDown() func(context.Context) error {
	var n atomic.Int64
	return func(context.Context) error {
		if n.Add(1) == 1 {
			panic("downstream bug")
		}
		return nil
	}
}

func mustPanic(t *testing.T, f func()) {
	t.Helper()
	defer func() {
		if recover() == nil {
			t.Fatal("the panic did not propagate")
		}
	}()
	f()
}

func TestEntryPointsPanic(t *testing.T) {
	eachEntryPoint(t, func(t *testing.T, ep entryPoint, svc string) {
		reg := tableRegistry(t, svc, func(c *Config) {
			c.DefaultCircuitBreaker = CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second}
		})
		down := panicDown()
		mustPanic(t, func() { ep.call(context.Background(), reg, svc, down) })
		if got := callsRecorded(svc); fmt.Sprint(got) != "map[failure:1]" {
			t.Errorf("resilience.calls = %v; want the panicking call as one failure", got)
		}
		if a := reg.Bulkhead(svc).Stats().Active; a != 0 {
			t.Fatalf("%d bulkhead slots still held after the panic", a)
		}
		cb := reg.CircuitBreaker(svc)
		if st := cb.State(); st != StateOpen {
			t.Fatalf("breaker %v; a panic is a failure, and FailMax is 1", st)
		}
		// The half-open probe panics too: it must be given back, or the
		// breaker would reject every call for ever.
		time.Sleep(time.Second + time.Millisecond)
		down = panicDown()
		mustPanic(t, func() { ep.call(context.Background(), reg, svc, down) })
		time.Sleep(time.Second + time.Millisecond)
		if err := ep.call(context.Background(), reg, svc, down); err != nil {
			t.Fatalf("call after the panicking probe: %v", err)
		}
		if st := cb.State(); st != StateClosed {
			t.Errorf("breaker %v after a good probe; want closed", st)
		}
	})
}

func TestEntryPointsPanicInOnRetry(t *testing.T) {
	eachEntryPoint(t, func(t *testing.T, ep entryPoint, svc string) {
		var hookPanics atomic.Bool
		hookPanics.Store(true)
		reg := tableRegistry(t, svc, func(c *Config) {
			c.Retry.OnRetry = func(int, error, time.Duration) {
				if hookPanics.Load() {
					panic("hook bug")
				}
			}
		})
		down, _ := failingDown(errBoom)
		mustPanic(t, func() { ep.call(context.Background(), reg, svc, down) })
		if a := reg.Bulkhead(svc).Stats().Active; a != 0 {
			t.Fatalf("%d bulkhead slots still held after OnRetry panicked", a)
		}
		hookPanics.Store(false)
		ok := func(context.Context) error { return nil }
		if err := ep.call(context.Background(), reg, svc, ok); err != nil {
			t.Fatalf("next call: %v; want it let in", err)
		}
	})
}

func TestEntryPointsDisabled(t *testing.T) {
	eachEntryPoint(t, func(t *testing.T, ep entryPoint, svc string) {
		reg := tableRegistry(t, svc, func(c *Config) { c.Enabled = false })
		down, n := failingDown(errBoom)
		if err := ep.call(context.Background(), reg, svc, down); err == nil || !errors.Is(err, errBoom) || n.Load() != 1 {
			t.Fatalf("err = %v after %d attempts; want boom straight through", err, n.Load())
		}
		release, err := reg.Bulkhead(svc).Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer release()
		block := make(chan struct{})
		var inside atomic.Int64
		slow := func(context.Context) error { inside.Add(1); <-block; return nil }
		for range 3 {
			go ep.call(context.Background(), reg, svc, slow)
		}
		synctest.Wait()
		if inside.Load() != 3 {
			t.Errorf("%d of 3 calls inside a disabled registry's bulkhead of 1", inside.Load())
		}
		close(block)
		synctest.Wait()
	})
}

// runtime.Goexit in the downstream (a test double calling t.FailNow, say)
// through every entry point: the slot and the half-open probe come back,
// and the call is recorded once, as a failure.
func TestEntryPointsGoexit(t *testing.T) {
	eachEntryPoint(t, func(t *testing.T, ep entryPoint, svc string) {
		reg := tableRegistry(t, svc, func(c *Config) {
			c.DefaultCircuitBreaker = CircuitBreakerConfig{FailMax: 1, OpenTimeout: time.Second}
		})
		goexit := func(context.Context) error { runtime.Goexit(); return nil }
		callInGoroutine := func(down func(context.Context) error) {
			done := make(chan struct{})
			go func() {
				defer close(done)
				ep.call(context.Background(), reg, svc, down)
			}()
			<-done
		}
		callInGoroutine(goexit)
		if got := callsRecorded(svc); fmt.Sprint(got) != "map[failure:1]" {
			t.Errorf("resilience.calls = %v; want one failure", got)
		}
		if a := reg.Bulkhead(svc).Stats().Active; a != 0 {
			t.Fatalf("%d slots held after Goexit", a)
		}
		if st := reg.CircuitBreaker(svc).State(); st != StateOpen {
			t.Fatalf("breaker %v after a Goexit with FailMax 1; want open", st)
		}
		time.Sleep(time.Second + time.Millisecond)
		callInGoroutine(goexit) // the probe
		time.Sleep(time.Second + time.Millisecond)
		if err := ep.call(context.Background(), reg, svc, func(context.Context) error { return nil }); err != nil {
			t.Fatalf("after the Goexit probe: %v", err)
		}
	})
}

// pointsOf returns the points of a counter that name svc.
func pointsOf(t *testing.T, c collected, name, svc string) []string {
	t.Helper()
	var out []string
	for _, p := range c.points(t, name, "counter", c[name].Unit) {
		if strings.Contains(p, "="+svc+",") || strings.Contains(p, "="+svc+"=") {
			out = append(out, p)
		}
	}
	return out
}

// The same scenario records the same metrics through every entry point:
// retried attempts with their number and error.type, a success after
// retries, a timed-out attempt, a bulkhead rejection and the breaker's
// failure.
func TestEntryPointsMetrics(t *testing.T) {
	for _, ep := range entryPoints {
		t.Run(ep.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				reader := withReader(t)
				svc := uniqueName("metrics")
				reg := tableRegistry(t, svc, func(c *Config) {
					c.Timeouts[EnvKey(svc)] = time.Second
					c.Retry.MaxAttempts = 3
				})
				var n atomic.Int64
				down := func(ctx context.Context) error {
					switch n.Add(1) {
					case 1:
						return errBoom
					case 2:
						<-ctx.Done() // the attempt's own timeout
						return ctx.Err()
					}
					return nil
				}
				if err := ep.call(context.Background(), reg, svc, down); err != nil {
					t.Fatal(err)
				}
				release, err := reg.Bulkhead(svc).Acquire(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				reg.Retry().reconfigure(RetryConfig{MaxAttempts: 1})
				if err := ep.call(context.Background(), reg, svc, down); !errors.Is(err, ErrBulkheadFull) {
					t.Fatalf("err = %v; want ErrBulkheadFull", err)
				}
				release()
				fail, _ := failingDown(errBoom)
				ep.call(context.Background(), reg, svc, fail)

				c := collect(t, reader)
				check := func(name string, want ...string) {
					t.Helper()
					if got := pointsOf(t, c, name, svc); strings.Join(got, " ") != strings.Join(want, " ") {
						t.Errorf("%s:\n got  %q\n want %q", name, got, want)
					}
				}
				et := "error.type=*errors.errorString"
				check("resilience.retry.attempts",
					"attempt_number=1,"+et+",function="+svc+"=1",
					"attempt_number=2,error.type=timeout,function="+svc+"=1")
				check("resilience.retry.success_after_retry", "function="+svc+"=1")
				check("resilience.timeout.exceeded", "function="+svc+",operation_type="+svc+",timeout_seconds=1=1")
				check("resilience.bulkhead.rejections", "function="+svc+",resource_type="+svc+"=1")
				check("resilience.circuit_breaker.failures", et+",service="+svc+"=1")
				wantPoints(t, c, "resilience.calls", "observed counter", "{call}",
					"name="+svc+",outcome=failure=1", "name="+svc+",outcome=rejected=1", "name="+svc+",outcome=success=1")
			})
		})
	}
}
