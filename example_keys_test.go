package resilience_test

import (
	"context"
	"errors"
	"fmt"

	"github.com/resilience-go/resilience"
)

// One tenant's failing integration opens that tenant's breaker only: the
// others' calls go through, and the service's metrics count them all.
func ExampleWithKey() {
	cfg, _ := resilience.LoadConfigWith(resilience.LoadOptions{Environment: map[string]string{
		"CIRCUIT_BREAKER_WEBHOOKS_FAIL_MAX": "2",
		"RETRY_MAX_ATTEMPTS":                "1",
	}})
	reg, _ := resilience.NewRegistry(cfg)
	deliver := resilience.ForService(reg, "webhooks", func(ctx context.Context) (string, error) {
		if tenant, _ := ctx.Value(tenantKey{}).(string); tenant == "acme" {
			return "", errors.New("acme's endpoint answers 500")
		}
		return "delivered", nil
	})
	for _, tenant := range []string{"acme", "acme", "acme", "globex"} {
		ctx := context.WithValue(context.Background(), tenantKey{}, tenant)
		ctx = resilience.WithKey(ctx, tenant)
		_, err := deliver(ctx)
		fmt.Printf("%s: %v\n", tenant, err)
	}
	for _, k := range reg.OpenKeys("webhooks", "", 10) {
		fmt.Printf("open: %s (%s)\n", k.Key, k.State)
	}
	// Output:
	// acme: resilience: retries exhausted after 1 attempt: acme's endpoint answers 500
	// acme: resilience: retries exhausted after 1 attempt: acme's endpoint answers 500
	// acme: resilience: "webhooks": circuit breaker is open
	// globex: <nil>
	// open: acme (open)
}

type tenantKey struct{}
