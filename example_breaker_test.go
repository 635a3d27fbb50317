package resilience_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/resilience-go/resilience"
)

// A downstream that fails every other call never fails five times in a
// row, so a consecutive trigger never opens; a failure ratio does, once the
// window holds MinimumThroughput calls.
func ExampleCircuitBreakerConfig_failureRatio() {
	cb, _ := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{
		Name:              "flaky",
		FailureRatio:      0.5,
		MinimumThroughput: 6,
		SamplingWindow:    10 * time.Second,
		DisableLogging:    true,
	})
	n := 0
	call := resilience.WithCircuitBreaker(func(context.Context) (string, error) {
		n++
		if n%2 == 0 {
			return "", errors.New("503")
		}
		return "ok", nil
	}, cb)
	for range 7 {
		_, err := call(context.Background())
		c := cb.Counts()
		fmt.Printf("%d/%d failed, %v: %v\n", c.WindowFailures, c.WindowCalls, cb.State(), err)
	}
	// Output:
	// 0/1 failed, closed: <nil>
	// 1/2 failed, closed: 503
	// 1/3 failed, closed: <nil>
	// 2/4 failed, closed: 503
	// 2/5 failed, closed: <nil>
	// 0/0 failed, open: 503
	// 0/0 failed, open: resilience: "flaky": circuit breaker is open
}

// A rejected call says how long until the breaker lets a probe through, so
// that a service can pass it on as a Retry-After of its own. A failure
// that asked for a longer wait (a 429's Retry-After) keeps the breaker open
// that long.
func ExampleError_RetryAfter_circuitOpen() {
	cb, _ := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{
		Name: "llm", FailMax: 1, OpenTimeout: 5 * time.Second, DisableLogging: true,
	})
	call := resilience.WithCircuitBreaker(func(context.Context) (string, error) {
		return "", tooManyRequests(20 * time.Second)
	}, cb)
	call(context.Background()) // opens the breaker for the 20s asked
	_, err := call(context.Background())
	var e *resilience.Error
	if errors.As(err, &e) && errors.Is(err, resilience.ErrCircuitOpen) {
		fmt.Println("Retry-After:", e.RetryAfter().Round(time.Second))
	}
	// Output:
	// Retry-After: 20s
}

// tooManyRequests is a 429 that asks the caller to wait.
type tooManyRequests time.Duration

func (e tooManyRequests) Error() string             { return "429 Too Many Requests" }
func (e tooManyRequests) RetryAfter() time.Duration { return time.Duration(e) }
