package resilience_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"time"

	"github.com/resilience-go/resilience"
)

var errUnavailable = errors.New("503 service unavailable")

func ExampleWithCircuitBreaker() {
	cb, err := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{
		Name:    "llm",
		FailMax: 2,
		OnStateChange: func(name string, from, to resilience.State) {
			fmt.Printf("breaker %s: %s -> %s\n", name, from, to)
		},
	})
	if err != nil {
		panic(err)
	}
	calls := 0
	generate := resilience.WithCircuitBreaker(func(ctx context.Context) (string, error) {
		calls++
		return "", errUnavailable
	}, cb)

	for range 3 {
		_, err := generate(context.Background())
		fmt.Println(err)
	}
	fmt.Println("downstream calls:", calls)
	// Output:
	// 503 service unavailable
	// breaker llm: closed -> open
	// 503 service unavailable
	// resilience: "llm": circuit breaker is open
	// downstream calls: 2
}

func ExampleWithRetry() {
	r, err := resilience.NewRetry(resilience.RetryConfig{
		MaxAttempts:   4,
		InitialDelay:  time.Millisecond,
		DisableJitter: true,
		OnRetry: func(attempt int, err error, delay time.Duration) {
			fmt.Printf("attempt %d failed (%v); retrying in %v\n", attempt, err, delay)
		},
	})
	if err != nil {
		panic(err)
	}
	attempts := 0
	fetch := resilience.WithRetry(func(ctx context.Context) (int, error) {
		attempts++
		if attempts < 3 {
			return 0, errUnavailable
		}
		return 42, nil
	}, r)

	v, err := fetch(context.Background())
	fmt.Println(v, err)

	// Permanent errors are not retried.
	_, err = resilience.WithRetry(func(ctx context.Context) (int, error) {
		return 0, resilience.Permanent(errors.New("400 bad request"))
	}, r)(context.Background())
	fmt.Println(err)
	// Output:
	// attempt 1 failed (503 service unavailable); retrying in 1ms
	// attempt 2 failed (503 service unavailable); retrying in 2ms
	// 42 <nil>
	// 400 bad request
}

func ExampleWithRetry_exhausted() {
	r, _ := resilience.NewRetry(resilience.RetryConfig{MaxAttempts: 3, MaxDelay: time.Millisecond})
	_, err := resilience.WithRetry(func(ctx context.Context) (int, error) {
		return 0, errUnavailable
	}, r)(context.Background())

	var re *resilience.Error
	if errors.As(err, &re) {
		fmt.Println("attempts:", re.Attempts)
	}
	fmt.Println(errors.Is(err, resilience.ErrRetryExhausted), errors.Is(err, errUnavailable))
	// Output:
	// attempts: 3
	// true true
}

func ExampleWithTimeout() {
	slow := func(ctx context.Context) (string, error) {
		select {
		case <-time.After(time.Second):
			return "too late", nil
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}
	_, err := resilience.WithTimeout(slow, 10*time.Millisecond)(context.Background())
	fmt.Println(err)
	fmt.Println(errors.Is(err, resilience.ErrTimeout), errors.Is(err, context.DeadlineExceeded))
	// Output:
	// resilience: timeout exceeded: context deadline exceeded
	// true true
}

func ExampleWithEnforcedTimeout() {
	done := make(chan struct{})
	ignoresCtx := func(ctx context.Context) (string, error) {
		<-done // never looks at ctx
		return "finally", nil
	}
	_, err := resilience.WithEnforcedTimeout(ignoresCtx, 10*time.Millisecond)(context.Background())
	fmt.Println(errors.Is(err, resilience.ErrTimeout))
	close(done)
	// Output:
	// true
}

func ExampleTimeoutFor() {
	fmt.Println(resilience.TimeoutFor("llm"), resilience.TimeoutFor("auth"), resilience.TimeoutFor("reports"))
	// Output:
	// 1m0s 5s 30s
}

func ExampleWithBulkhead() {
	b, _ := resilience.NewBulkhead(resilience.BulkheadConfig{Name: "llm", Limit: 1, FailFast: true})
	release, _ := b.Acquire(context.Background()) // someone holds the only slot

	call := resilience.WithBulkhead(func(ctx context.Context) (string, error) { return "ok", nil }, b)
	_, err := call(context.Background())
	fmt.Println(err, errors.Is(err, resilience.ErrBulkheadFull))

	release()
	fmt.Println(call(context.Background()))
	fmt.Printf("%+v\n", b.Stats())
	// Output:
	// resilience: "llm": bulkhead is full true
	// ok <nil>
	// {Active:0 Waiting:0 Rejected:1 Completed:2}
}

func ExampleWithFallback() {
	recommend := func(ctx context.Context) ([]string, error) { return nil, errUnavailable }
	withDefault := resilience.WithFallback(recommend, func(ctx context.Context, err error) ([]string, error) {
		return []string{"bestsellers"}, nil
	})
	fmt.Println(withDefault(context.Background()))
	// Output:
	// [bestsellers] <nil>
}

func ExampleFailOpen() {
	check := func(ctx context.Context) (bool, error) { return false, errUnavailable }
	open := resilience.FailOpen(check)
	closed := resilience.FailClosed(check)
	a, _ := open(context.Background())
	b, _ := closed(context.Background())
	fmt.Println("fail open:", a, "fail closed:", b)
	// Output:
	// fail open: true fail closed: false
}

func ExampleEmptyOnError() {
	items := resilience.EmptyOnError(func(ctx context.Context) ([]string, error) { return nil, errUnavailable })
	v, err := items(context.Background())
	fmt.Println(len(v), err)
	// Output:
	// 0 <nil>
}

func ExampleFallbackCache() {
	cache, _ := resilience.NewFallbackCache[string](resilience.FallbackCacheConfig{MaxEntries: 100, MaxAge: time.Hour})
	up := true
	profile := func(ctx context.Context) (string, error) {
		if up {
			return "Ada Lovelace", nil
		}
		return "", errUnavailable
	}
	get := resilience.WithFallback(cache.Record("user:1", profile), cache.StaleFallback("user:1"))

	fmt.Println(get(context.Background()))
	up = false
	v, err := get(context.Background())
	fmt.Println(v, errors.Is(err, resilience.ErrStale), errors.Is(err, errUnavailable))
	// Output:
	// Ada Lovelace <nil>
	// Ada Lovelace true true
}

func ExampleCompose() {
	cb, _ := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{Name: "llm", FailMax: 1})
	r, _ := resilience.NewRetry(resilience.RetryConfig{MaxAttempts: 3, InitialDelay: time.Millisecond, DisableJitter: true})
	b, _ := resilience.NewBulkhead(resilience.BulkheadConfig{Name: "llm", Limit: 10})

	attempts := 0
	generate := resilience.Compose(func(ctx context.Context) (string, error) {
		attempts++
		return "", errUnavailable
	}, resilience.Stack[string]{
		CircuitBreaker: cb,
		Retry:          r,
		Timeout:        time.Second,
		Bulkhead:       b,
		Fallback: func(ctx context.Context, err error) (string, error) {
			return "(the assistant is busy, try again soon)", nil
		},
	})

	for range 2 {
		text, err := generate(context.Background())
		fmt.Printf("%q %v, breaker %s, attempts so far %d\n", text, err, cb.State(), attempts)
	}
	// Output:
	// "(the assistant is busy, try again soon)" <nil>, breaker open, attempts so far 3
	// "(the assistant is busy, try again soon)" <nil>, breaker open, attempts so far 3
}

func ExampleIsRetryable() {
	fmt.Println(
		resilience.IsRetryable(errUnavailable),
		resilience.IsRetryable(resilience.Permanent(errUnavailable)),
		resilience.IsRetryable(context.Canceled),
		resilience.IsRetryable(resilience.ErrBulkheadFull),
	)
	// Output:
	// true false false true
}

func ExampleForService() {
	// In production the registry comes from the process environment
	// (resilience.LoadConfig, or resilience.Default); here from a map.
	cfg, err := resilience.LoadConfigWith(resilience.LoadOptions{Environment: map[string]string{
		"CIRCUIT_BREAKER_OPENFGA_FAIL_MAX": "2",
		"RETRY_MAX_ATTEMPTS":               "2",
		"RETRY_EXPONENTIAL_MAX":            "0.001", // 1ms between attempts
		"TIMEOUT_OPENFGA":                  "0.5",
	}})
	if err != nil {
		panic(err)
	}
	reg, err := resilience.NewRegistry(cfg)
	if err != nil {
		panic(err)
	}

	attempts := 0
	check := resilience.ForService(reg, "openfga", func(ctx context.Context) (bool, error) {
		attempts++
		return false, errUnavailable
	})
	for range 3 {
		_, err := check(context.Background())
		fmt.Println(err)
	}
	fmt.Println("attempts:", attempts, "breaker:", reg.CircuitBreaker("openfga").State())
	// Output:
	// resilience: retries exhausted after 2 attempts: 503 service unavailable
	// resilience: retries exhausted after 2 attempts: 503 service unavailable
	// resilience: "openfga": circuit breaker is open
	// attempts: 4 breaker: open
}

func ExampleLoadConfigWith() {
	_, err := resilience.LoadConfigWith(resilience.LoadOptions{Environment: map[string]string{
		"RETRY_MAX_ATTEMPTS":          "three",
		"TIMEOUT_LLM":                 "soon",
		"BULKHEAD_OPENFGA_LIMIT":      "0",
		"CIRCUIT_BREAKER_LLM_TIMEOUT": "90", // plain seconds are fine
	}})
	fmt.Println(err)
	// Output:
	// RETRY_MAX_ATTEMPTS="three": not a whole number
	// TIMEOUT_LLM="soon": not a duration: use seconds (60, 0.25) or a Go duration (1m, 1500ms)
	// BULKHEAD_OPENFGA_LIMIT="0": must be at least 1
}

func ExampleRetryBudget() {
	// Retries may add at most 10% to the calls, with no floor: a downstream
	// that fails every call sees about 1.1 attempts per call, not 3.
	budget, _ := resilience.NewRetryBudget(resilience.RetryBudgetConfig{Ratio: 0.1, MinPerSecond: -1})
	r, _ := resilience.NewRetry(resilience.RetryConfig{MaxAttempts: 3, MaxDelay: time.Microsecond, Budget: budget})

	attempts := 0
	call := resilience.WithRetry(func(ctx context.Context) (int, error) {
		attempts++
		return 0, errUnavailable
	}, r)
	refused := 0
	for range 100 {
		if _, err := call(context.Background()); errors.Is(err, resilience.ErrRetryBudgetExhausted) {
			refused++
		}
	}
	fmt.Printf("calls: 100, attempts: %d, calls that ended on a refused retry: %d\n", attempts, refused)
	// Output:
	// calls: 100, attempts: 110, calls that ended on a refused retry: 100
}

// An alert on every breaker transition, posted to a webhook (here a
// loopback server standing in for Slack or PagerDuty). OnStateChange runs
// outside the breaker's locks, so a slow webhook delays only the call that
// caused the transition, never other callers; a service that wants no
// delay at all hands the alert to a goroutine or a queue, as here.
func ExampleCircuitBreakerConfig_webhook() {
	received := make(chan string, 10)
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var alert struct{ Service, From, To string }
		json.NewDecoder(r.Body).Decode(&alert)
		received <- fmt.Sprintf("alert: %s %s -> %s", alert.Service, alert.From, alert.To)
	}))
	defer hook.Close()

	var sent sync.WaitGroup
	cb, _ := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{
		Name:           "payments",
		FailMax:        1,
		DisableLogging: true,
		OnStateChange: func(name string, from, to resilience.State) {
			body, _ := json.Marshal(map[string]string{"service": name, "from": from.String(), "to": to.String()})
			sent.Go(func() {
				resp, err := http.Post(hook.URL, "application/json", bytes.NewReader(body))
				if err == nil {
					resp.Body.Close()
				}
			})
		},
	})
	pay := resilience.WithCircuitBreaker(func(ctx context.Context) (string, error) { return "", errUnavailable }, cb)
	pay(context.Background()) // opens it
	sent.Wait()
	fmt.Println(<-received)
	cb.Reset()
	sent.Wait()
	fmt.Println(<-received)
	// Output:
	// alert: payments closed -> open
	// alert: payments open -> closed
}

// rateLimited is a provider's 429 with the wait it asked for, as an LLM
// client might report it.
type rateLimited struct{ after time.Duration }

func (e rateLimited) Error() string             { return "429 too many requests" }
func (e rateLimited) RetryAfter() time.Duration { return e.after }

// A hint no longer than MaxDelay is waited exactly; a longer one ends the
// retries at once, and the caller gets the hint to pass on, for example as
// its own Retry-After.
func ExampleError_RetryAfter() {
	r, err := resilience.NewRetry(resilience.RetryConfig{MaxAttempts: 3, MaxDelay: 2 * time.Second})
	if err != nil {
		panic(err)
	}
	attempts := 0
	generate := resilience.WithRetry(func(context.Context) (string, error) {
		attempts++
		return "", rateLimited{after: time.Minute}
	}, r)

	_, err = generate(context.Background())
	var e *resilience.Error
	if errors.As(err, &e) {
		fmt.Printf("gave up after %d attempt: %v\n", attempts, err)
		fmt.Printf("Retry-After: %.0f\n", e.RetryAfter().Seconds())
	}
	// Output:
	// gave up after 1 attempt: resilience: retries exhausted after 1 attempt: 429 too many requests
	// Retry-After: 60
}
