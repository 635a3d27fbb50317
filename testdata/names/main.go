// Command names prints the metric name of each protected function it builds,
// one per line: the names test runs it built with and without -gcflags=-l
// and compares. A name must not change with a build flag.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/resilience-go/resilience"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

func fetch(context.Context) (int, error) { return 1, nil }

type client struct{}

func (client) Generate(context.Context) (string, error) { return "ok", nil }

// build makes the same stack for two unrelated breakers: the closure is
// the same code for both.
func build(cb *resilience.CircuitBreaker) resilience.Func[int] {
	return resilience.Compose(func(context.Context) (int, error) { return 2, nil }, resilience.Stack[int]{CircuitBreaker: cb})
}

func main() {
	slog.SetDefault(slog.New(slog.DiscardHandler))
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	resilience.SetMeterProvider(mp)
	ctx := context.Background()

	a, _ := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{Name: "auth"})
	b, _ := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{Name: "llm"})
	r, _ := resilience.NewRetry(resilience.RetryConfig{})
	calls := []func(){
		func() { build(a)(ctx) },
		func() { build(b)(ctx) },
		func() { resilience.WithTimeout(fetch, time.Second)(ctx) },
		func() { resilience.WithRetry(resilience.WithTimeout(client{}.Generate, time.Second), r)(ctx) },
		func() {
			resilience.Compose(func(context.Context) (int, error) { return 3, nil }, resilience.Stack[int]{Name: "explicit"})(ctx)
		},
		func() {
			resilience.WithRetry(func(context.Context) (int, error) { return 4, nil }, r)(ctx)
		},
	}
	for _, call := range calls {
		call()
	}
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(ctx, &rm); err != nil {
		panic(err)
	}
	var names []string
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != "resilience.calls" {
				continue
			}
			for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
				v, _ := dp.Attributes.Value("name")
				names = append(names, fmt.Sprintf("%s %d", v.AsString(), dp.Value))
			}
		}
	}
	slices.Sort(names)
	for _, n := range names {
		fmt.Println(n)
	}
	if err := mp.Shutdown(ctx); err != nil && !errors.Is(err, context.Canceled) {
		panic(err)
	}
}
