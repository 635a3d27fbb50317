package resilience_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/resilience-go/resilience"
)

// A limiter that fails fast says how long until its next permit, so that a
// caller can pass it on as a Retry-After of its own.
func ExampleRateLimiter() {
	l, _ := resilience.NewRateLimiter(resilience.RateLimiterConfig{
		Name: "llm", Limit: 60, Per: time.Minute, Burst: 2, FailFast: true,
	})
	call := resilience.WithRateLimit(func(context.Context) (string, error) { return "ok", nil }, l)
	for range 3 {
		v, err := call(context.Background())
		var e *resilience.Error
		if errors.As(err, &e) && errors.Is(err, resilience.ErrRateLimited) {
			fmt.Println("rate limited; retry after", e.RetryAfter().Round(100*time.Millisecond))
			continue
		}
		fmt.Println(v)
	}
	// Output:
	// ok
	// ok
	// rate limited; retry after 1s
}
