package redisstore

import (
	"context"
	"testing"

	"github.com/resilience-go/resilience"
)

// BenchmarkBreaker is the cost per call of a closed breaker on the success
// path, on its own (Local) and shared through Redis (Shared). A closed
// breaker's calls never touch Redis, so the two should be near-identical.
//
//	go test -run='^$' -bench=Breaker -count=6 ./... | tee bench.txt
//	benchstat -col /store bench.txt
func BenchmarkBreaker(b *testing.B) {
	ok := func(context.Context) (int, error) { return 1, nil }
	for _, shared := range []bool{false, true} {
		name := "store=local"
		if shared {
			name = "store=shared"
		}
		b.Run(name, func(b *testing.B) {
			var s *Store
			if shared {
				s = newStore(b, Options{KeyPrefix: prefix(b)})
			}
			reg := newRegistry(b, nil, s)
			call := resilience.WithCircuitBreaker(ok, reg.CircuitBreaker("downstream"))
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				if _, err := call(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkBulkhead is the cost per call of a bulkhead with a global limit,
// which takes and gives back a lease in Redis on every call, next to a
// local one: the price of the fleet-wide cap, one round trip per call.
func BenchmarkBulkhead(b *testing.B) {
	ok := func(context.Context) (int, error) { return 1, nil }
	env := map[string]string{"BULKHEAD_DOWNSTREAM_GLOBAL_LIMIT": "100"}
	for _, shared := range []bool{false, true} {
		name := "store=local"
		if shared {
			name = "store=shared"
		}
		b.Run(name, func(b *testing.B) {
			var s *Store
			if shared {
				s = newStore(b, Options{KeyPrefix: prefix(b)})
			}
			reg := newRegistry(b, env, s)
			call := resilience.WithBulkhead(ok, reg.Bulkhead("downstream"))
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				if _, err := call(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
