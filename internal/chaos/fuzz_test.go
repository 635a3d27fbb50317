package chaos

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// The outcomes a fuzzed schedule gives the attempts that reach fn, one byte
// each, in the order they arrive.
const (
	doSucceed   = iota // return a value
	doFail             // return a retryable error
	doPermanent        // return a Permanent error
	doPanic            // panic
	doHang             // wait for the attempt's context, then return its error
	doCancel           // the caller gives up: cancel the call's context, then as doHang
	numDos
)

var (
	errFlaky = errors.New("chaos: flaky")
	errBad   = errors.New("chaos: bad request")
)

// fuzzIteration numbers the iterations, so that each has its own
// Stack.Name and its own resilience.calls series.
var fuzzIteration atomic.Int64

// FuzzCompose drives Compose (breaker, retry, timeout, bulkhead) with a
// fuzzed schedule of outcomes and a fuzzed configuration under a handful
// of concurrent callers, and checks what must hold whatever happens:
//
//   - never more than Limit attempts inside fn at once;
//   - no call admitted while the breaker is open, and no more than the
//     probe allowance while it is half-open;
//   - every call returns, within a deadline;
//   - no call makes more than MaxAttempts attempts;
//   - the bulkhead's Completed equals the attempts that entered fn, and
//     nothing is left active or waiting;
//   - every error is typed;
//   - resilience.calls, summed over outcomes, equals the calls that
//     returned (a call that panics is not counted: see
//     TestCallsMetricCountsPanics).
func FuzzCompose(f *testing.F) {
	// failMax, maxAttempts, limit, timeoutMs, callers, enforce, schedule
	f.Add(uint8(2), uint8(2), uint8(1), uint8(1), uint8(3), false, []byte{doSucceed, doFail, doFail, doFail, doSucceed})
	f.Add(uint8(0), uint8(0), uint8(0), uint8(0), uint8(0), false, []byte{doFail})
	f.Add(uint8(4), uint8(3), uint8(3), uint8(3), uint8(3), true, []byte{doHang, doSucceed, doPanic, doFail, doCancel, doPermanent})
	f.Add(uint8(1), uint8(3), uint8(0), uint8(2), uint8(3), true, []byte{doPanic, doPanic, doHang, doHang})
	f.Add(uint8(0), uint8(1), uint8(1), uint8(0), uint8(2), false, []byte{doCancel, doFail, doFail, doSucceed, doSucceed, doSucceed})
	f.Add(uint8(2), uint8(3), uint8(3), uint8(1), uint8(3), false, []byte{doFail, doFail, doFail, doFail, doFail, doFail, doFail, doSucceed, doSucceed, doPermanent, doPanic})
	f.Fuzz(func(t *testing.T, failMax, maxAttempts, limit, timeoutMs, callers uint8, enforce bool, schedule []byte) {
		if len(schedule) == 0 {
			schedule = []byte{doSucceed}
		}
		if len(schedule) > 64 {
			schedule = schedule[:64]
		}
		runCompose(t, composeConfig{
			failMax:     1 + int(failMax)%5,
			maxAttempts: 1 + int(maxAttempts)%4,
			limit:       1 + int(limit)%4,
			timeout:     time.Duration(1+int(timeoutMs)%4) * time.Millisecond,
			callers:     1 + int(callers)%4,
			enforce:     enforce,
		}, schedule)
	})
}

type composeConfig struct {
	failMax, maxAttempts, limit, callers int
	timeout                              time.Duration
	enforce                              bool
}

// call is the record of one protected call, shared with the attempts of it
// that reach fn (which, under an enforced timeout, may outlive the call).
type call struct {
	cancel   context.CancelFunc
	entries  atomic.Int64
	state    resilience.State // as of epoch, before the call
	epoch    time.Time        // cb.Since() before the call
	admitted atomic.Int32     // 1: first entry in the same epoch as before the call
	canceled atomic.Bool      // its caller gave up
}

type callKey struct{}

const callsPerCaller = 8

func runCompose(t *testing.T, cfg composeConfig, schedule []byte) {
	name := "fuzz-" + strconv.FormatInt(fuzzIteration.Add(1), 10)
	var (
		mu          sync.Mutex
		transitions [][2]resilience.State
	)
	cb, err := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{
		Name: name, FailMax: cfg.failMax, OpenTimeout: 2 * time.Millisecond,
		OnStateChange: func(_ string, from, to resilience.State) {
			mu.Lock()
			transitions = append(transitions, [2]resilience.State{from, to})
			mu.Unlock()
		},
		DisableLogging: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	rt, err := resilience.NewRetry(resilience.RetryConfig{
		MaxAttempts: cfg.maxAttempts, InitialDelay: 100 * time.Microsecond, MaxDelay: 500 * time.Microsecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	bh, err := resilience.NewBulkhead(resilience.BulkheadConfig{Name: name, Limit: cfg.limit, MaxWait: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}

	var (
		next, entered, inside, peak atomic.Int64
		openViolations              atomic.Int64
		halfOpenMu                  sync.Mutex
		halfOpen                    = map[time.Time][]*call{} // admissions per half-open period
	)
	fn := func(ctx context.Context) (int, error) {
		c := ctx.Value(callKey{}).(*call)
		entered.Add(1)
		n := inside.Add(1)
		defer inside.Add(-1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		if c.entries.Add(1) == 1 && cb.Since().Equal(c.epoch) {
			// No transition since the caller looked: the breaker admitted
			// this call in the state the caller saw.
			c.admitted.Store(1)
			switch c.state {
			case resilience.StateOpen:
				openViolations.Add(1)
			case resilience.StateHalfOpen:
				halfOpenMu.Lock()
				halfOpen[c.epoch] = append(halfOpen[c.epoch], c)
				halfOpenMu.Unlock()
			}
		}
		switch schedule[int(next.Add(1)-1)%len(schedule)] % numDos {
		case doSucceed:
			return 1, nil
		case doFail:
			return 0, errFlaky
		case doPermanent:
			return 0, resilience.Permanent(errBad)
		case doPanic:
			panic(boom{})
		case doCancel:
			c.canceled.Store(true)
			c.cancel()
		}
		<-ctx.Done()
		return 0, ctx.Err()
	}
	protected := resilience.Compose(fn, resilience.Stack[int]{
		Name: name, CircuitBreaker: cb, Retry: rt,
		Timeout: cfg.timeout, EnforceTimeout: cfg.enforce, Bulkhead: bh,
	})

	var (
		returned, panicked atomic.Int64
		problems           = make(chan string, 64)
	)
	problem := func(format string, args ...any) {
		select {
		case problems <- fmt.Sprintf(format, args...):
		default:
		}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	for range cfg.callers {
		wg.Go(func() {
			for range callsPerCaller {
				ctx, cancel := context.WithCancel(context.Background())
				c := &call{cancel: cancel}
				// The state and the epoch it began, read consistently.
				for range 10 {
					c.epoch = cb.Since()
					c.state = cb.State()
					if cb.Since().Equal(c.epoch) {
						break
					}
					c.state = -1 // changing under us: check nothing
				}
				err := func() (err error) {
					defer func() {
						if r := recover(); r != nil {
							if _, ok := r.(boom); !ok {
								problem("recovered %v; want a boom", r)
							}
							panicked.Add(1)
							err = nil
							return
						}
						returned.Add(1)
					}()
					_, err = protected(context.WithValue(ctx, callKey{}, c))
					return err
				}()
				cancel()
				if n := c.entries.Load(); n > int64(cfg.maxAttempts) {
					problem("a call made %d attempts; MaxAttempts is %d", n, cfg.maxAttempts)
				}
				var e *resilience.Error
				if errors.As(err, &e) && errors.Is(err, resilience.ErrRetryExhausted) && e.Attempts > cfg.maxAttempts {
					problem("ErrRetryExhausted after %d attempts; MaxAttempts is %d", e.Attempts, cfg.maxAttempts)
				}
				if err != nil && !typed(err) && !errors.Is(err, errFlaky) && !errors.Is(err, errBad) {
					problem("untyped error %v", err)
				}
				// A little room between calls, so the breaker's 2ms
				// OpenTimeout passes and probes happen.
				if rand.IntN(4) == 0 {
					time.Sleep(time.Duration(rand.IntN(1000)) * time.Microsecond)
				}
			}
		})
	}
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		buf := make([]byte, 1<<20)
		t.Fatalf("calls still running after 10s (config %+v, schedule %v):\n%s", cfg, schedule, buf[:runtime.Stack(buf, true)])
	}
	// Under an enforced timeout, abandoned attempts end when their
	// context does, just after their call returned.
	if !waitFor(5*time.Second, func() bool { return inside.Load() == 0 && bh.Stats().Active == 0 }) {
		t.Fatalf("%d attempts still inside fn, bulkhead %+v", inside.Load(), bh.Stats())
	}
	close(problems)
	for p := range problems {
		t.Errorf("config %+v, schedule %v: %s", cfg, schedule, p)
	}

	if p := peak.Load(); p > int64(cfg.limit) {
		t.Errorf("%d attempts inside fn at once; Limit is %d", p, cfg.limit)
	}
	if n := openViolations.Load(); n > 0 {
		t.Errorf("%d calls admitted while the breaker was open", n)
	}
	for epoch, calls := range halfOpen {
		// One probe per half-open period (HalfOpenMaxCalls 1), plus one
		// for each probe whose caller gave up: gobreaker does not count
		// an excluded call against the probes.
		allowed := 1
		for _, c := range calls {
			if c.canceled.Load() {
				allowed++
			}
		}
		if len(calls) > allowed {
			t.Errorf("%d calls admitted in the half-open period from %v; want at most %d", len(calls), epoch, allowed)
		}
	}
	st := bh.Stats()
	if int64(st.Completed) != entered.Load() {
		t.Errorf("bulkhead Completed = %d; %d attempts entered fn", st.Completed, entered.Load())
	}
	if st.Active != 0 || st.Waiting != 0 {
		t.Errorf("bulkhead after the calls: %+v", st)
	}
	cb.State() // delivers any transition still queued
	mu.Lock()
	for i, tr := range transitions {
		if i > 0 && tr[0] != transitions[i-1][1] {
			t.Errorf("transition %d is %v -> %v, after one to %v", i, tr[0], tr[1], transitions[i-1][1])
		}
		switch tr {
		case [2]resilience.State{resilience.StateClosed, resilience.StateOpen},
			[2]resilience.State{resilience.StateOpen, resilience.StateHalfOpen},
			[2]resilience.State{resilience.StateHalfOpen, resilience.StateOpen},
			[2]resilience.State{resilience.StateHalfOpen, resilience.StateClosed}:
		default:
			t.Errorf("transition %v -> %v", tr[0], tr[1])
		}
	}
	mu.Unlock()

	total := int64(cfg.callers * callsPerCaller)
	if got := returned.Load() + panicked.Load(); got != total {
		t.Errorf("%d calls returned or panicked; %d were made", got, total)
	}
	if got := callsMetric(t, name); got != total {
		t.Errorf("resilience.calls{name=%q} = %d; %d calls were made (%d returned, %d panicked)", name, got, total, returned.Load(), panicked.Load())
	}
	runtime.KeepAlive(protected) // its metrics are observed while it lives
}

// callsMetric sums resilience.calls over outcomes for the protected
// function name.
func callsMetric(t testing.TB, name string) int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := metricsReader.Collect(context.Background(), &rm); err != nil {
		t.Fatalf("collect: %v", err)
	}
	var sum int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != "resilience.calls" {
				continue
			}
			data, ok := m.Data.(metricdata.Sum[int64])
			if !ok {
				t.Fatalf("resilience.calls is a %T", m.Data)
			}
			for _, dp := range data.DataPoints {
				if v, ok := dp.Attributes.Value(attribute.Key("name")); ok && v.AsString() == name {
					sum += dp.Value
				}
			}
		}
	}
	return sum
}

// TestCallsMetricCountsPanics: a call whose function panics is a failed
// protected call in resilience.calls, as the breaker counts it a failure
// (error.type "panic"). A regression test: it once went uncounted.
func TestCallsMetricCountsPanics(t *testing.T) {
	name := "chaos.panic-count"
	call := resilience.Compose(func(context.Context) (int, error) { panic(boom{}) }, resilience.Stack[int]{Name: name})
	func() {
		defer func() { recover() }()
		call(context.Background())
	}()
	if got := callsMetric(t, name); got != 1 {
		t.Errorf("resilience.calls{name=%q} = %d after one call that panicked; want 1", name, got)
	}
	runtime.KeepAlive(call)
}
