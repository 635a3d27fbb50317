package resilience_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/resilience-go/resilience"
)

// An LLM call fails over from one provider to the next, and then to a
// canned answer. Each provider has a breaker of its own: OpenAI's is open
// after its outage, so it is skipped without being called; Anthropic is
// overloaded and fails; the canned answer answers.
func ExampleFailover() {
	breaker := func(name string) *resilience.CircuitBreaker {
		cb, _ := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{Name: name, FailMax: 3, DisableLogging: true})
		return cb
	}
	openaiCB, anthropicCB := breaker("openai"), breaker("anthropic")
	openaiCB.Trip() // its outage opened it earlier

	provider := func(name string, err error) resilience.Func[string] {
		return func(context.Context) (string, error) {
			fmt.Println("calling", name)
			if err != nil {
				return "", err
			}
			return name + " says hello", nil
		}
	}
	ask := resilience.Failover(
		resilience.Compose(provider("openai", nil), resilience.Stack[string]{Name: "openai", CircuitBreaker: openaiCB}),
		resilience.Compose(provider("anthropic", errors.New("529 overloaded")), resilience.Stack[string]{Name: "anthropic", CircuitBreaker: anthropicCB}),
		func(context.Context) (string, error) { return "Sorry, try again in a minute.", nil },
	)
	answer, err := ask(context.Background())
	fmt.Println(answer, err)
	fmt.Println("anthropic failures:", anthropicCB.Counts().TotalFailures)
	// Output:
	// calling anthropic
	// Sorry, try again in a minute. <nil>
	// anthropic failures: 1
}

// A read whose first attempt is stuck: after the delay a hedge is sent, it
// answers, and the stuck attempt's context is cancelled.
func ExampleWithHedge() {
	h, _ := resilience.NewHedge(resilience.HedgeConfig{Name: "authz", Delay: 10 * time.Millisecond})
	var calls atomic.Int32
	check := resilience.WithHedge(func(ctx context.Context) (bool, error) {
		if calls.Add(1) == 1 {
			<-ctx.Done() // stuck until the hedge wins
			fmt.Println("first attempt cancelled:", ctx.Err())
			return false, ctx.Err()
		}
		return true, nil
	}, h)
	allowed, err := check(context.Background())
	fmt.Println("allowed:", allowed, err, "attempts:", calls.Load())
	// Output:
	// first attempt cancelled: context canceled
	// allowed: true <nil> attempts: 2
}

// A completion that came back empty is a failure to the retry, the breaker
// and the fallback, as an error would be.
func ExampleStack_check() {
	answers := []string{"", "Paris"}
	n := 0
	ask := resilience.Compose(func(context.Context) (string, error) {
		a := answers[n]
		n++
		return a, nil
	}, resilience.Stack[string]{
		Name: "capital",
		Retry: func() *resilience.Retry {
			r, _ := resilience.NewRetry(resilience.RetryConfig{MaxAttempts: 3, InitialDelay: time.Millisecond})
			return r
		}(),
		Check: func(s string) error {
			if s == "" {
				return errors.New("empty completion")
			}
			return nil
		},
	})
	fmt.Println(ask(context.Background()))
	fmt.Println("attempts:", n)
	// Output:
	// Paris <nil>
	// attempts: 2
}
