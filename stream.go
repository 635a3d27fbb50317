package resilience

import "context"

// This file lets an entry point outside this package do what Transport
// does for a response body: end an attempt once its answer has begun, and
// keep the attempt's bulkhead slot and context while the answer keeps
// coming. resiliencegrpc's stream interceptor is the first user: a gRPC
// stream's attempt ends with its first response message, and the stream
// holds its slot until it ends.

// ForStream returns fn protected by the registry's policies for service,
// in the one pipeline [ForService] runs (its breaker, the retry policy, the
// rate limits, its timeout per attempt and its bulkhead), for a call whose
// answer outlives its attempt, such as a stream: an attempt that calls
// [KeepAttempt] with its context before it returns keeps its bulkhead slot
// and its context after it returns, until the [Kept] is released.
//
// The attempt's timeout bounds the attempt, up to KeepAttempt; from then
// on the service's idle timeout (TIMEOUT_<SERVICE>_IDLE, by default the
// attempt's) bounds each wait between [Kept.Touch] calls, and its stream
// timeout (TIMEOUT_<SERVICE>_STREAM), if any, the whole kept part, as for
// the body of a [Transport] response. The total timeout
// (TIMEOUT_<SERVICE>_TOTAL) bounds the kept part too.
//
// Calls are never hedged, whatever HEDGE_<SERVICE>_DELAY says: what a
// stream sends cannot be sent twice at once. A nil r means [Default]. The
// pipeline is built once per service; while the registry is disabled,
// calls go straight to fn, and KeepAttempt returns nil. The returned Func
// is safe for concurrent use if fn is.
func ForStream[T any](r *Registry, service string, fn Func[T]) Func[T] {
	if fn == nil {
		return failing[T](invalid("ForStream fn", nil, "must not be nil"))
	}
	if r == nil {
		r = Default()
	}
	return newRegistryEdge(r, service, kindStream, fn)
}

// Kept is an attempt's bulkhead slot and context, kept past the attempt's
// return by [KeepAttempt]. Its methods are safe for concurrent use, and a
// nil *Kept's do nothing, so that code need not tell a disabled registry
// apart.
type Kept struct{ h *hold }

// KeepAttempt keeps the bulkhead slot and the context of the [ForStream]
// attempt whose context is ctx (or derives from it) after the attempt
// returns: the attempt's timeout stops, and its idle and stream timeouts
// start. Call it from the attempt, before it returns, and give the slot
// back with [Kept.Release] once the answer has ended; the context stays
// alive until then. It returns nil when ctx is not such an attempt's (the
// registry is disabled, or the call is not ForStream's), or when the
// attempt's slot is already kept.
func KeepAttempt(ctx context.Context) *Kept {
	h := holdFrom(ctx)
	if h == nil || h.kept {
		return nil
	}
	h.keep()
	return &Kept{h}
}

// Touch restarts the idle timeout: the answer made progress.
func (k *Kept) Touch() {
	if k != nil {
		k.h.touch()
	}
}

// Release gives the slot back and ends the attempt's context. Calls after
// the first do nothing.
func (k *Kept) Release() {
	if k != nil {
		k.h.release()
	}
}

// Expired reports whether the idle or the stream timeout ended the kept
// attempt: its context is done with [ErrTimeout] as its cause, and its
// slot was given back.
func (k *Kept) Expired() bool { return k != nil && k.h.expired() }
