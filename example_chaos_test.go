package resilience_test

import (
	"context"
	"errors"
	"fmt"

	"github.com/resilience-go/resilience"
)

// A rehearsal of the permission service's outage: every attempt fails,
// the breaker counts the failures, and FailClosed denies, as it would in
// a real outage.
func ExampleWithChaos() {
	check := func(context.Context) (bool, error) { return true, nil } // the real call
	allowed := resilience.FailClosed(resilience.WithChaos(check, resilience.ChaosConfig{ErrorRate: 1}))
	ok, err := allowed(context.Background())
	fmt.Println(ok, err)

	_, err = resilience.WithChaos(check, resilience.ChaosConfig{ErrorRate: 1})(context.Background())
	fmt.Println(errors.Is(err, resilience.ErrChaos), err)
	// Output:
	// false <nil>
	// true resilience: fault injected
}
