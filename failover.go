package resilience

import (
	"context"
	"strconv"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// Failover returns a function that calls each of fns in order until one
// succeeds, and returns that one's result: an LLM call that falls back from
// one provider to another, then to a canned answer. If all fail, the last
// error is returned. The caller's own cancellation stops it at once: no
// further function is tried once ctx is done.
//
// Give each provider its own policies, with [ForService] or [Compose], so
// that each keeps its own breaker: a provider whose breaker is open is then
// skipped in the time its breaker takes to say so, nanoseconds, and its
// outage does not count against the others.
//
// Each answer is counted in resilience.failover.used, with the index of the
// function that answered and, as function, the name of the first one (see
// [Stack].Name): the primary whose failures the others cover. Failover with
// no function, or a nil one, yields a function that reports
// [ErrInvalidConfig]. The result is safe for concurrent use if fns are.
func Failover[T any](fns ...Func[T]) Func[T] {
	if len(fns) == 0 {
		return failing[T](invalid("Failover fns", nil, "must not be empty"))
	}
	for i, fn := range fns {
		if fn == nil {
			return failing[T](invalid("Failover fns["+strconv.Itoa(i)+"]", nil, "must not be nil"))
		}
	}
	fns = append([]Func[T](nil), fns...)
	name := nameOf(fns[0])
	if name == "" {
		name = unnamed
	}
	used := make([][]metric.AddOption, len(fns))
	for i := range fns {
		used[i] = addSet(attrFunction.String(name), attribute.Int("index", i))
	}
	return func(ctx context.Context) (T, error) {
		var v T
		var err error
		for i, fn := range fns {
			if v, err = fn(ctx); err == nil {
				meter().failoverUsed.Add(ctx, 1, used[i]...)
				return v, nil
			}
			if ctx.Err() != nil {
				// The caller gave up: no other provider can help.
				return v, err
			}
		}
		return v, err
	}
}
