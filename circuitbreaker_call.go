package resilience

import (
	"context"
	"errors"

	"github.com/sony/gobreaker/v2"
)

// How a breaker admits a call and counts its outcome: guard, on gobreaker's
// Execute, with the repairs a panic, a runtime.Goexit or shadow mode need.

// The stages of a call through guard.
const (
	callNotRun   = iota // rejected by gobreaker
	probeDenied         // a half-open probe another process holds
	staleDenied         // admitted by gobreaker while the breaker is open
	callRunning         // fn running, or it panicked or called Goexit
	callReturned        // fn returned
)

// guard runs call if the breaker admits it, through gobreaker's Execute,
// whose closure does not escape, so that admission allocates nothing (its
// two-step API allocates a done func per call). call returns the outcome
// for gobreaker: nil, errFailure or errExcluded; it is told whether the
// breaker counts it. r is the rule the caller loaded for the call. guard returns the
// rejection, or nil once call has run, with counted false when the breaker
// is disabled, forced closed or in shadow mode and call ran uncounted. A
// panic in call counts as a failure and propagates, and a runtime.Goexit,
// guardForced is guard for a breaker in mode m, forced open or closed, or
// switched off.
func (cb *CircuitBreaker) guardForced(m int32, call func(counted bool) error) (counted bool, rejected error) {
	if m&modeForcedOpen != 0 && cb.on() {
		cb.counts.rejections.Add(1)
		return false, cb.errOpen
	}
	call(false) // disabled, or forced closed: not counted
	return false, nil
}

// which gobreaker does not see, is repaired so that no probe is lost.
func (cb *CircuitBreaker) guard(ctx context.Context, r *breakerRule, call func(counted bool) error) (counted bool, rejected error) {
	if m := cb.mode.Load(); m != 0 || !cb.on() {
		return cb.guardForced(m, call)
	}
	if h := cb.hold.Load(); h != 0 {
		if int64(monotonic()) <= h {
			return cb.reject(r, call, cb.errOpen)
		}
		cb.endHold(ctx, h)
	}
	g := cb.cur.Load()
	stage := callNotRun
	var panicked any
	defer func() {
		if stage != callRunning {
			return
		}
		if panicked == nil {
			// A Goexit, turned into goexitPanic for gobreaker to count
			// (or drop as stale, by its own generation): swallowed here,
			// after which the Goexit resumes.
			if r := recover(); r != goexitPanic {
				panic(r)
			}
		}
		cb.flushTo(ctx)
		cb.recordFailure(ctx, "panic")
	}()
	_, err := g.gb.Execute(func() (struct{}, error) {
		cb.flushTo(ctx) // deliver open -> half-open before asking the sync
		// One read of the state for both checks: an open applied between
		// two reads would let a half-open admission out unasked.
		st := cb.lastState()
		if st == StateOpen || (st == StateHalfOpen && cb.cur.Load() != g) {
			// Let through by g while the breaker is open: g opened
			// after admitting it, or its own open period ended during a
			// longer one held here, or g was replaced by an open (Trip,
			// TripFor, OpenFor) after this call loaded it. g may have let
			// it through as a probe that no sync was asked about (issue
			// 18: a second probe in a round, from a replica applying the
			// fleet's open at that moment). Its outcome would not count.
			stage = staleDenied
			return struct{}{}, errExcluded
		}
		if sb := cb.sync.Load(); sb != nil && st == StateHalfOpen && !sb.s.AllowProbe(ctx, cb.name) {
			// Another process is probing: give the probe back uncounted.
			stage = probeDenied
			return struct{}{}, errExcluded
		}
		stage = callRunning
		defer func() {
			if stage == callRunning {
				// Tell a panic from a Goexit, then let gobreaker count it.
				if r := recover(); r != nil {
					panicked = r
					panic(r)
				}
				// runtime.Goexit: gobreaker sees no outcome of it, so
				// give it one.
				panic(goexitPanic)
			}
		}()
		o := call(true)
		stage = callReturned
		return struct{}{}, o
	})
	cb.flushTo(ctx)
	switch stage {
	case callNotRun:
		if err == gobreaker.ErrTooManyRequests {
			return cb.reject(r, call, cb.errTooMany)
		}
		return cb.reject(r, call, cb.errOpen)
	case probeDenied:
		return cb.reject(r, call, cb.errTooMany)
	case staleDenied:
		return cb.reject(r, call, cb.errOpen)
	}
	return true, nil
}

// reject rejects a call with err, or in shadow mode runs it uncounted.
func (cb *CircuitBreaker) reject(r *breakerRule, call func(bool) error, err error) (bool, error) {
	if r.shadow {
		cb.counts.shadowRejections.Add(1)
		call(false)
		return false, nil
	}
	cb.counts.rejections.Add(1)
	return false, err
}

// replaceAndTrip opens the breaker from half-open, whatever probes are in
// flight: a fresh generation, tripped, so that they are dropped as stale.
func (cb *CircuitBreaker) replaceAndTrip() {
	cb.setMu.Lock()
	n := cb.newGen()
	// Open n before it is published: queue ignores it until then, and no
	// call is admitted by a closed n.
	n.force.Add(1)
	n.gb.Execute(func() (struct{}, error) { return struct{}{}, errFailure })
	n.force.Add(-1)
	cb.evMu.Lock()
	cb.cur.Store(n)
	cb.openedLocked(n)
	cb.transitionLocked(cb.last, StateOpen)
	cb.evMu.Unlock()
	cb.setMu.Unlock()
}

// goexitPanic stands for a runtime.Goexit in gobreaker's Execute, which
// counts a panic as a failure (or drops it as stale) and sees nothing of a
// Goexit.
var goexitPanic any = goexitMarker{}

type goexitMarker struct{}

// outcome maps a call's result to what gobreaker should count.
func (cb *CircuitBreaker) outcome(ctx context.Context, err error, reached bool) error {
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		// The caller gave up: that says nothing about the downstream.
		return errExcluded
	}
	if !reached && (errors.Is(err, ErrBulkheadFull) || errors.Is(err, ErrRateLimited)) {
		// Local saturation: the call never reached the downstream. One
		// that did, and whose retry then found the bulkhead full, is
		// counted: a half-open probe that reached it decides.
		return errExcluded
	}
	if f := cb.hooks.Load().isFailure; f != nil && !f(err) {
		return nil
	}
	return errFailure
}
