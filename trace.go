package resilience

import (
	"context"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
)

// Trace events: what the policies did to a call, added to the caller's
// span, so that a slow request's trace says it waited 8s in two retries.
// The core uses only the trace API: with no SDK installed, or a span that
// is not recording, each helper is a context lookup and a boolean, and
// allocates nothing; and none of them is on the path of a call that
// succeeds at once.
//
// Names are namespaced resilience.*; the error's kind is error.type, as
// OpenTelemetry's conventions name it, with the values of the metrics;
// durations are in seconds, as doubles.

// The events.
const (
	evRetry            = "resilience.retry"
	evBreakerRejected  = "resilience.circuit_breaker.rejected"
	evBreakerState     = "resilience.circuit_breaker.state_change"
	evTimeout          = "resilience.timeout"
	evBulkheadWait     = "resilience.bulkhead.wait"
	evBulkheadRejected = "resilience.bulkhead.rejected"
	evRateLimitWait    = "resilience.rate_limit.wait"
	evRateLimited      = "resilience.rate_limit.rejected"
	evHedge            = "resilience.hedge"
	evFallback         = "resilience.fallback"
	evChaos            = "resilience.chaos.injected"
)

// The attributes.
const (
	attrTrErrorType  = attribute.Key("error.type")
	attrTrAttempt    = attribute.Key("resilience.attempt")     // the attempt that failed, from 1
	attrTrDelay      = attribute.Key("resilience.retry.delay") // s
	attrTrService    = attribute.Key("resilience.service")     // a breaker's name
	attrTrFrom       = attribute.Key("resilience.circuit_breaker.from")
	attrTrTo         = attribute.Key("resilience.circuit_breaker.to")
	attrTrState      = attribute.Key("resilience.circuit_breaker.state")
	attrTrOperation  = attribute.Key("resilience.operation")    // the timeout's operation type
	attrTrTimeout    = attribute.Key("resilience.timeout")      // s
	attrTrResource   = attribute.Key("resilience.bulkhead")     // a bulkhead's name
	attrTrWait       = attribute.Key("resilience.wait")         // s
	attrTrAcquired   = attribute.Key("resilience.acquired")     // whether the wait ended with the slot or permits
	attrTrLimiter    = attribute.Key("resilience.rate_limiter") // a rate limiter's name
	attrTrPermits    = attribute.Key("resilience.rate_limiter.permits")
	attrTrRetryAfter = attribute.Key("resilience.retry_after")   // s
	attrTrHedge      = attribute.Key("resilience.hedge.number")  // 1 for the first hedge
	attrTrFallback   = attribute.Key("resilience.fallback.type") // as fallback_type
	attrTrFault      = attribute.Key("resilience.chaos.fault")   // error or latency
	attrTrFunction   = attribute.Key("resilience.function")      // the protected function's name
)

// recordingSpan returns ctx's span if it records events, else nil.
func recordingSpan(ctx context.Context) trace.Span {
	if s := trace.SpanFromContext(ctx); s.IsRecording() {
		return s
	}
	return nil
}

func traceRetry(ctx context.Context, fn string, attempt int, et string, delay time.Duration) {
	if s := recordingSpan(ctx); s != nil {
		s.AddEvent(evRetry, trace.WithAttributes(attrTrFunction.String(fn), attrTrAttempt.Int(attempt),
			attrTrErrorType.String(et), attrTrDelay.Float64(delay.Seconds())))
	}
}

func traceBreakerRejected(ctx context.Context, cb *CircuitBreaker, err error) {
	if s := recordingSpan(ctx); s != nil {
		s.AddEvent(evBreakerRejected, trace.WithAttributes(attrTrService.String(cb.name),
			attrTrState.String(cb.lastState().String()), attrTrErrorType.String(errorType(err))))
	}
}

func traceTransition(ctx context.Context, name string, t transition) {
	if s := recordingSpan(ctx); s != nil {
		s.AddEvent(evBreakerState, trace.WithAttributes(attrTrService.String(name),
			attrTrFrom.String(t.from.String()), attrTrTo.String(t.to.String())))
	}
}

func traceTimeout(ctx context.Context, fn, operation string, d time.Duration) {
	if s := recordingSpan(ctx); s != nil {
		s.AddEvent(evTimeout, trace.WithAttributes(attrTrFunction.String(fn), attrTrOperation.String(operation),
			attrTrTimeout.Float64(d.Seconds()), attrTrErrorType.String("timeout")))
	}
}

func traceBulkheadWait(ctx context.Context, name string, waited time.Duration, acquired bool) {
	if s := recordingSpan(ctx); s != nil {
		s.AddEvent(evBulkheadWait, trace.WithAttributes(attrTrResource.String(name),
			attrTrWait.Float64(waited.Seconds()), attrTrAcquired.Bool(acquired)))
	}
}

func traceBulkheadRejected(ctx context.Context, name string) {
	if s := recordingSpan(ctx); s != nil {
		s.AddEvent(evBulkheadRejected, trace.WithAttributes(attrTrResource.String(name),
			attrTrErrorType.String("bulkhead_full")))
	}
}

func traceRateLimitWait(ctx context.Context, name string, n int, waited time.Duration, acquired bool) {
	if s := recordingSpan(ctx); s != nil {
		s.AddEvent(evRateLimitWait, trace.WithAttributes(attrTrLimiter.String(name), attrTrPermits.Int(n),
			attrTrWait.Float64(waited.Seconds()), attrTrAcquired.Bool(acquired)))
	}
}

func traceRateLimited(ctx context.Context, name string, n int, retryIn time.Duration) {
	if s := recordingSpan(ctx); s != nil {
		attrs := []attribute.KeyValue{attrTrLimiter.String(name), attrTrPermits.Int(n), attrTrErrorType.String("rate_limited")}
		if retryIn >= 0 {
			attrs = append(attrs, attrTrRetryAfter.Float64(retryIn.Seconds()))
		}
		s.AddEvent(evRateLimited, trace.WithAttributes(attrs...))
	}
}

func traceHedge(ctx context.Context, fn string, n int) {
	if s := recordingSpan(ctx); s != nil {
		s.AddEvent(evHedge, trace.WithAttributes(attrTrFunction.String(fn), attrTrHedge.Int(n)))
	}
}

func traceFallback(ctx context.Context, fn, et string, kind int) {
	if s := recordingSpan(ctx); s != nil {
		s.AddEvent(evFallback, trace.WithAttributes(attrTrFunction.String(fn), attrTrErrorType.String(et),
			attrTrFallback.String(fallbackKinds[kind])))
	}
}

func traceChaos(ctx context.Context, fn string, fault int) {
	if s := recordingSpan(ctx); s != nil {
		name := "error"
		if fault == faultLatency {
			name = "latency"
		}
		s.AddEvent(evChaos, trace.WithAttributes(attrTrFunction.String(fn), attrTrFault.String(name)))
	}
}
