package resilience

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"sync/atomic"
	"time"
)

// Fault injection, for rehearsals: Polly's chaos strategies, innermost in
// the pipeline, so that the breaker, the retry, the timeout, the bulkhead
// and the fallback above react to an injected fault as to a real one.

// ErrChaos is the fault a [ChaosConfig] without an Error of its own
// injects. It is retryable, as the transient failure it stands for is.
var ErrChaos = errors.New("fault injected")

// ChaosConfig injects faults into the attempts of a protected function, to
// rehearse a dependency's failure: see [WithChaos], Stack.Chaos and the
// CHAOS_<SERVICE>_* variables. The zero value injects nothing.
type ChaosConfig struct {
	// ErrorRate, in [0, 1], is the share of attempts that fail with
	// Error instead of running the function.
	ErrorRate float64
	// Error is the fault injected. nil means ErrChaos. Whatever it is,
	// the injected error also matches ErrChaos with errors.Is, and is
	// recorded with error.type "chaos".
	Error error
	// LatencyRate, in [0, 1], is the share of attempts delayed by
	// Latency before they run (or fail with Error). The delay ends early
	// when the attempt's context is done.
	LatencyRate float64
	// Latency is the delay injected. It must not be negative.
	Latency time.Duration
}

// on reports whether c injects anything.
func (c ChaosConfig) on() bool {
	return c.ErrorRate > 0 || (c.LatencyRate > 0 && c.Latency > 0)
}

// checkAs checks c; field names it in errors ("ChaosConfig",
// "Config.Chaos[LLM]").
func (c ChaosConfig) checkAs(field string) error {
	switch {
	case math.IsNaN(c.ErrorRate) || c.ErrorRate < 0 || c.ErrorRate > 1:
		return invalid(field+".ErrorRate", c.ErrorRate, "must be a share in [0, 1]")
	case math.IsNaN(c.LatencyRate) || c.LatencyRate < 0 || c.LatencyRate > 1:
		return invalid(field+".LatencyRate", c.LatencyRate, "must be a share in [0, 1]")
	case c.Latency < 0:
		return invalid(field+".Latency", c.Latency, "must not be negative")
	case c.LatencyRate > 0 && c.Latency == 0:
		return invalid(field+".LatencyRate", c.LatencyRate, "needs a Latency to inject")
	}
	return nil
}

// chaosError is an injected fault: it is the configured error to
// errors.Is and errors.As, and ErrChaos too.
type chaosError struct{ err error }

func (e *chaosError) Error() string {
	if e.err == ErrChaos {
		return "resilience: fault injected"
	}
	return "resilience: fault injected: " + e.err.Error()
}

func (e *chaosError) Unwrap() error { return e.err }

func (e *chaosError) Is(target error) bool { return target == ErrChaos }

// chaos is a ChaosConfig ready to inject: what a pipeline loads per
// attempt.
type chaos struct {
	cfg ChaosConfig
	err *chaosError // made once: an injected fault allocates nothing
}

func newChaos(cfg ChaosConfig) *chaos {
	err := cfg.Error
	if err == nil {
		err = ErrChaos
	}
	return &chaos{cfg: cfg, err: &chaosError{err}}
}

// inject delays and fails an attempt as c says: it returns the fault to
// return instead of running the attempt, or nil to run it.
func (c *chaos) inject(ctx context.Context, s *site) error {
	if c.cfg.Latency > 0 && c.cfg.LatencyRate > 0 && (c.cfg.LatencyRate >= 1 || rand.Float64() < c.cfg.LatencyRate) {
		s.injected(ctx, faultLatency)
		t := time.NewTimer(c.cfg.Latency)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			// As a slow downstream's call ends when its context does.
			return ctx.Err()
		}
	}
	if c.cfg.ErrorRate > 0 && (c.cfg.ErrorRate >= 1 || rand.Float64() < c.cfg.ErrorRate) {
		s.injected(ctx, faultError)
		return c.err
	}
	return nil
}

// chaosCell holds a pipeline's injection, nil while there is none: one
// atomic load per attempt is all it costs then.
type chaosCell = atomic.Pointer[chaos]

// invoke runs one attempt, after the pipeline's fault injection, if any.
func (p *pipeline) invoke(ctx context.Context, attempt attemptFunc) error {
	if err := p.injectChaos(ctx); err != nil {
		if p.hedged {
			// A hedge failed by an injected fault was sent, as one failed
			// by the downstream: counted as the attempt would have (an
			// enforced attempt counts before it injects).
			if s, _ := ctx.Value(hedgeKey{}).(*hedgeSeat); s != nil && s.r.p == p {
				s.sent(ctx)
			}
		}
		return err
	}
	return attempt(ctx)
}

// injectChaos runs the pipeline's fault injection for one attempt, if
// any, and returns the fault to return instead of running it.
func (p *pipeline) injectChaos(ctx context.Context) error {
	if p.chaos != nil {
		if c := p.chaos.Load(); c != nil {
			return c.inject(ctx, p.site)
		}
	}
	return nil
}

// WithChaos returns fn with faults injected as cfg says, for rehearsing
// the failure of what fn calls: wrap it innermost, under the policies
// that are to react. An invalid cfg or a nil fn yields a function that
// reports [ErrInvalidConfig]. The result is safe for concurrent use if fn
// is.
func WithChaos[T any](fn Func[T], cfg ChaosConfig) Func[T] {
	if fn == nil {
		return failing[T](invalid("WithChaos fn", nil, "must not be nil"))
	}
	if err := cfg.checkAs("ChaosConfig"); err != nil {
		return failing[T](err)
	}
	p := &pipeline{chaos: new(chaosCell)}
	if cfg.on() {
		p.chaos.Store(newChaos(cfg))
	}
	return newEdge(p, "", "", fn, nil, 0)
}
