package resilience

import (
	"context"
	"log/slog"
	"time"
)

// A breaker's transitions and the callbacks they are delivered to: queued
// under gobreaker's mutex, delivered outside every lock, one at a time and
// in order.

// breakerHooks are a breaker's callbacks, replaced whole by a reload.
type breakerHooks struct {
	isFailure     func(error) bool
	onStateChange func(name string, from, to State)
	logger        *slog.Logger // nil when logging is off
}

// hooks returns cfg's callbacks.
func (cfg CircuitBreakerConfig) hooks() *breakerHooks {
	h := &breakerHooks{isFailure: cfg.IsFailure, onStateChange: cfg.OnStateChange, logger: cfg.Logger}
	switch {
	case cfg.DisableLogging:
		h.logger = nil
	case h.logger == nil:
		h.logger = slog.Default()
	}
	return h
}

// config returns h as the settings of a CircuitBreakerConfig.
func (h *breakerHooks) config() CircuitBreakerConfig {
	return CircuitBreakerConfig{IsFailure: h.isFailure, OnStateChange: h.onStateChange, Logger: h.logger, DisableLogging: h.logger == nil}
}

// queue runs under gobreaker's mutex, so transitions arrive in order.
func (cb *CircuitBreaker) queue(g *breakerGen, from, to State) {
	cb.evMu.Lock()
	if g.slow != nil {
		g.slow.reset(monotonic()) // as gobreaker clears its counts
	}
	if cb.cur.Load() == g && cb.mode.Load()&(modeForcedOpen|modeForcedClosed) == 0 {
		switch to {
		case StateHalfOpen:
			if cb.held() {
				// A call that finished during a longer open period let
				// gobreaker move on after its OpenTimeout; the breaker is
				// still open, and says half-open when the hold ends.
				cb.lateHalfOpen = true
				cb.evMu.Unlock()
				return
			}
		case StateOpen:
			cb.openedLocked(g)
		case StateClosed:
			cb.closedLocked()
		}
		// From our own record rather than gobreaker's: after a Reset or a
		// repair the new gobreaker starts closed whatever we last said.
		cb.transitionLocked(cb.last, to)
	}
	cb.evMu.Unlock()
}

// transitionLocked records a transition and queues it for delivery. The
// caller holds evMu.
func (cb *CircuitBreaker) transitionLocked(from, to State) {
	if from == to {
		return
	}
	cb.recordTransition(from, to)
	now := time.Now()
	switch {
	case from == StateClosed:
		cb.downSince = now
	case to == StateClosed && !cb.downSince.IsZero():
		// Back to closed: the time to recover, open and half-open
		// together, as the original design's MTTR counts it.
		cb.recordRecovery(now.Sub(cb.downSince))
		cb.downSince = time.Time{}
	}
	cb.last = to
	cb.lastAtomic.Store(int32(to))
	cb.since = now
	// Queued even with no callback, log or sync to deliver it to: the
	// call that caused it adds it to its span as it flushes. Transitions
	// are rare; an append each costs nothing that matters.
	cb.pending = append(cb.pending, transition{from, to})
	cb.npending.Add(1)
	cb.untraced = append(cb.untraced, transition{from, to})
	cb.nuntraced.Add(1)
}

// flush delivers queued transitions outside every lock. Only one goroutine
// delivers at a time, so callbacks never run concurrently and stay in order;
// a callback that causes a transition itself has it delivered right after
// it returns.
func (cb *CircuitBreaker) flush() { cb.flushTo(context.Background()) }

// flushTo is flush for a call: the transitions queued since the last
// flush are events of ctx's span, whichever goroutine delivers them to the
// callbacks. A flush without a call's context (an operator's Reset, a
// Reload) takes them off the list untraced.
func (cb *CircuitBreaker) flushTo(ctx context.Context) {
	if cb.npending.Load() == 0 && cb.nuntraced.Load() == 0 {
		return
	}
	cb.evMu.Lock()
	traced := cb.untraced
	cb.untraced = nil
	cb.nuntraced.Store(0)
	for len(cb.pending) > 0 && !cb.delivering {
		t := cb.pending[0]
		cb.pending = cb.pending[1:]
		cb.npending.Add(-1)
		cb.delivering = true
		cb.evMu.Unlock()
		cb.deliver(t)
		cb.evMu.Lock()
		cb.delivering = false
	}
	if len(cb.pending) == 0 {
		cb.pending = nil
	}
	cb.evMu.Unlock()
	for _, t := range traced {
		traceTransition(ctx, cb.name, t)
	}
}

func (cb *CircuitBreaker) deliver(t transition) {
	// A panicking callback must not leave delivering set for ever.
	defer func() {
		if r := recover(); r != nil {
			cb.evMu.Lock()
			cb.delivering = false
			cb.evMu.Unlock()
			panic(r)
		}
	}()
	h := cb.hooks.Load()
	if h.logger != nil {
		level := slog.LevelInfo
		if t.to == StateOpen {
			level = slog.LevelWarn
		}
		attrs := append([]slog.Attr{
			slog.String("service", cb.name), slog.String("from", t.from.String()), slog.String("to", t.to.String()),
		}, cb.rule.Load().attrs()...)
		if t.to == StateOpen {
			attrs = append(attrs, slog.Duration("open_period", cb.OpenPeriod()))
		}
		h.logger.LogAttrs(context.Background(), level, "circuit breaker "+t.to.String(), attrs...)
	}
	if sb := cb.sync.Load(); sb != nil {
		sb.s.StateChanged(cb.name, t.from, t.to)
	}
	if h.onStateChange != nil {
		h.onStateChange(cb.name, t.from, t.to)
	}
}
