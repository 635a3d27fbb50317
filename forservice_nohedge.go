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
	return newEdge(r.noHedgePipeline(service), service, service, fn, nil, 0)
}

// noHedgeKey names ForServiceNoHedge's pipeline of a service in
// Registry.pipelines, beside the pipeKeys and streamKeys.
type noHedgeKey struct{ service string }

// noHedgePipeline returns ForService's pipeline of service without its
// hedge. The policies it points to are the service's, shared with the
// other entry points.
func (r *Registry) noHedgePipeline(service string) *pipeline {
	k := noHedgeKey{service}
	if p, ok := r.pipelines.Load(k); ok {
		return p.(*pipeline)
	}
	p := *r.pipeline(service, false)
	p.hedge, p.hedgeCell, p.hedged = nil, nil, false
	actual, _ := r.pipelines.LoadOrStore(k, &p)
	return actual.(*pipeline)
}
