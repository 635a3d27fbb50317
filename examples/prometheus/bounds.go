package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"time"

	"github.com/resilience-go/resilience"
)

// The registry's settings: a cap small enough to show its bounds. The
// ledger takes one set, and the webhook receivers would need one more
// than the other three.
const (
	regMaxServices = 4                      // RESILIENCE_MAX_SERVICES
	regIdle        = time.Second            // RESILIENCE_IDLE_EVICT
	hookHosts      = 8                      // receivers, hooks-0.example.com to hooks-7
	hookActive     = 4                      // receivers delivered to at a time
	hookShift      = 2 * time.Second        // a receiver leaves for the next one this often
	brokenTenant   = "initech"              // the tenant whose ledger integration is broken
	regTimeout     = 100 * time.Millisecond // the registry's DefaultTimeout
)

// boundedRegistry returns the registry through which the ledger and the
// webhooks are called, with ForService as a service's code would.
func boundedRegistry() (*resilience.Registry, error) {
	cfg := resilience.DefaultConfig()
	cfg.MaxServices = regMaxServices
	cfg.IdleEvict = regIdle
	cfg.DefaultTimeout = regTimeout
	cfg.Retry = resilience.RetryConfig{MaxAttempts: 2, InitialDelay: 5 * time.Millisecond, MaxDelay: 10 * time.Millisecond}
	cfg.DefaultCircuitBreaker = resilience.CircuitBreakerConfig{FailMax: 5, OpenTimeout: 500 * time.Millisecond, DisableLogging: true}
	return resilience.NewRegistry(cfg)
}

// ledgerEntry posts to the ledger for a tenant, with the tenant as the
// call's key (WithKey): each tenant has a breaker of its own. The broken
// tenant's calls all fail, so its breaker is open nearly all the time
// (resilience.circuit_breaker.open_keys{service="ledger"}), while the
// other tenants' calls go through.
func ledgerEntry(reg *resilience.Registry, d *downstream, tenant string) resilience.Func[string] {
	post := resilience.ForService(reg, "ledger", func(ctx context.Context) (string, error) {
		if tenant == brokenTenant {
			return "", &httpError{http.StatusUnauthorized} // its credentials expired
		}
		return d.call(ctx, true, "posted")
	})
	return func(ctx context.Context) (string, error) {
		return post(resilience.WithKey(ctx, tenant))
	}
}

// webhook delivers to the slot-th of the receivers active now, wrapping
// the delivery per request, named after the receiver's host, as a
// webhook sender does. hookActive receivers are active at a time, and
// every hookShift one leaves and the next one comes: with the ledger,
// one more name than the cap holds. A receiver that finds no room
// delivers through the overflow set "other" (resilience.calls with
// name="other"), and the set of one that left, once idle for regIdle, is
// evicted to make room (resilience.registry.evictions{kind="service"}).
// The receivers answer in 2 to 6ms and never fail, so that no breaker of
// theirs is left open, which would keep its set from eviction.
func webhook(reg *resilience.Registry, start time.Time, slot int) resilience.Func[string] {
	return func(ctx context.Context) (string, error) {
		n := (int(time.Since(start)/hookShift) + slot) % hookHosts
		deliver := resilience.ForService(reg, fmt.Sprintf("hooks-%d.example.com", n), func(ctx context.Context) (string, error) {
			t := time.NewTimer(2*time.Millisecond + rand.N(4*time.Millisecond))
			defer t.Stop()
			select {
			case <-ctx.Done():
				return "", ctx.Err()
			case <-t.C:
				return "202 Accepted", nil
			}
		})
		return deliver(ctx)
	}
}
