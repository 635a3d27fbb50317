package chaos

import (
	"log/slog"
	"testing"

	"github.com/resilience-go/resilience"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.uber.org/goleak"
)

// metricsReader collects what every policy of these tests records: the
// scenarios run with a real SDK behind the library, as a service would, and
// FuzzCompose checks the counts it reads.
// resilience.calls and the other observed counters report only the live
// protected functions at each collection, so they need no cardinality
// limit; FuzzCompose's thousands of names would overflow the default 2000.
var metricsReader = sdkmetric.NewManualReader(sdkmetric.WithCardinalityLimitSelector(
	func(k sdkmetric.InstrumentKind) (int, bool) {
		return 0, k != sdkmetric.InstrumentKindObservableCounter
	}))

func TestMain(m *testing.M) {
	// Breakers log every transition to slog.Default at Warn or Info.
	slog.SetDefault(slog.New(slog.DiscardHandler))
	resilience.SetMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(metricsReader)))
	goleak.VerifyTestMain(m)
}
