package resilience

import (
	"context"
	"sync/atomic"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/metric"
)

// ScopeName is the OpenTelemetry instrumentation scope of every instrument
// this package records into: the module path.
const ScopeName = "github.com/resilience-go/resilience"

// Version is this module's version, reported as the instrumentation scope's
// version.
const Version = "0.1.0"

// instruments holds the instruments of one meter provider. Policies load the
// current set on each record, so a provider set at any time takes effect for
// policies built before it.
type instruments struct {
	timeoutAbandoned metric.Int64Counter
}

var current atomic.Pointer[instruments]

// SetMeterProvider makes every policy record into mp from now on, whether it
// was built before or after this call. A nil mp restores the default, the
// global OpenTelemetry provider (otel.GetMeterProvider), which itself
// forwards to whatever provider is later set globally. It is safe for
// concurrent use, also while calls are in flight.
func SetMeterProvider(mp metric.MeterProvider) {
	current.Store(newInstruments(mp))
}

func newInstruments(mp metric.MeterProvider) *instruments {
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	m := mp.Meter(ScopeName, metric.WithInstrumentationVersion(Version))
	in := &instruments{}
	// Instrument errors are reported to otel's error handler by the SDK and
	// leave a usable no-op instrument, so they need no handling here.
	in.timeoutAbandoned, _ = m.Int64Counter("resilience.timeout.abandoned",
		metric.WithDescription("Calls an enforced timeout returned from at the deadline while the function went on running."),
		metric.WithUnit("{call}"))
	return in
}

func meter() *instruments {
	if in := current.Load(); in != nil {
		return in
	}
	in := newInstruments(nil)
	if current.CompareAndSwap(nil, in) {
		return in
	}
	return current.Load()
}

func (in *instruments) abandoned() {
	in.timeoutAbandoned.Add(context.Background(), 1)
}
