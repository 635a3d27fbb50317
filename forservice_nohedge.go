package resilience

// ForServiceNoHedge returns fn protected as [ForService] protects it, in
// the same pipeline (its breaker, the retry policy, the rate limits, its
// timeout per attempt, sent as the attempt's context deadline, and its
// bulkhead, with the same metrics), except that calls are never hedged,
// whatever HEDGE_<SERVICE>_DELAY says: for a call that must not be sent
// twice at once, such as a gRPC method that is not idempotent. A nil r
// means [Default]. The pipeline is built once per service; the returned
// Func is safe for concurrent use if fn is.
func ForServiceNoHedge[T any](r *Registry, service string, fn Func[T]) Func[T] {
	if fn == nil {
		return failing[T](invalid("ForServiceNoHedge fn", nil, "must not be nil"))
	}
	if r == nil {
		r = Default()
	}
	return newRegistryEdge(r, service, kindNoHedge, fn)
}
