package resilience

import (
	"context"
	"log/slog"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
	"weak"
)

// edge adapts a Func[T] to the pipeline: it keeps the typed result in the
// attempt's closure, applies the fallback, and records the call once.
// Compose, the With... wrappers and ForService all return an edge's call.
type edge[T any] struct {
	p      *pipeline
	ref    regRef // a registry's Func (ref.r set): finds its pipeline at each call
	fn     Func[T]
	fb     Fallback[T]
	fbKind int
	self   *edgeMeta   // this edge's identity, for the edges that wrap it
	inner  *edgeMeta   // the protected Func this edge wraps, if fn is one
	used   func(T) int // tokens a successful result used; nil: not counted
	check  func(T) error
}

// edgeMeta is what an edge that wraps another needs to know of it.
type edgeMeta struct {
	name string
	// nested is set once some edge wraps this one: only then does a call
	// look for the wrapping edge's mark in its context.
	nested atomic.Bool
}

// nestKey marks a context passed by an edge to the protected Func it
// wraps; the value is that Func's *edgeMeta, so that the mark is read only
// by the edge it was meant for, not by other protected calls made further
// down with the same context.
type nestKey struct{}

// newEdge returns fn protected by p. name is the explicit metric name, if
// any; stableName says what is used without one.
func newEdge[T any](p *pipeline, name, operation string, fn Func[T], fb Fallback[T], fbKind int) Func[T] {
	return newEdgeUsed(p, name, operation, fn, fb, fbKind, nil)
}

// newEdgeUsed is newEdge with used, if not nil, reading the tokens a
// successful result used, to settle the estimate the pipeline took, and
// check, if not nil, turning a result it rejects into a failure.
func newEdgeUsed[T any](p *pipeline, name, operation string, fn Func[T], fb Fallback[T], fbKind int, used func(T) int, check ...func(T) error) Func[T] {
	return buildEdge(p, name, operation, fn, fb, fbKind, used, check...).register()
}

// newRegistryEdge returns fn protected by a registry's pipeline of
// service for an entry point: ForService's, ForServiceNoHedge's,
// ForStream's.
func newRegistryEdge[T any](r *Registry, service string, kind pipeKind, fn Func[T]) Func[T] {
	e := buildEdge(r.pipeline(service, kind), service, service, fn, nil, 0, nil)
	// In the edge, not beside it: wrapping per request allocates no more
	// than before the cap.
	e.ref.r, e.ref.name, e.ref.kind = r, service, kind
	e.ref.refresh().leave() // found, not called yet
	return e.register()
}

func buildEdge[T any](p *pipeline, name, operation string, fn Func[T], fb Fallback[T], fbKind int, used func(T) int, check ...func(T) error) *edge[T] {
	inner := lookupEdge(fn)
	if inner != nil {
		inner.nested.Store(true)
	}
	if p.site == nil {
		name = stableName(name, fn, inner, p.cb, p.bulkhead)
		p.setSite(newSite(name, operation))
	} else {
		name = p.site.name // a registry's pipeline, shared
	}
	e := &edge[T]{p: p, fn: fn, fb: fb, fbKind: fbKind, self: &edgeMeta{name: name}, inner: inner, used: used}
	if len(check) > 0 {
		e.check = check[0]
	}
	return e
}

func (e *edge[T]) register() Func[T] {
	f := Func[T](e.call)
	registerFunc(f, e.self, e)
	return f
}

func (e *edge[T]) call(ctx context.Context) (T, error) {
	if e.ref.r != nil {
		p := e.ref.current(ctx)
		defer p.leave()
		return e.callOn(ctx, p)
	}
	return e.callOn(ctx, e.p)
}

// callOn runs a call through p.
func (e *edge[T]) callOn(ctx context.Context, p *pipeline) (T, error) {
	wrapped := e.self.nested.Load() && ctx.Value(nestKey{}) == e.self
	if !p.on() {
		// Straight through, recording nothing: the Func this edge wraps
		// records the call unless an edge around this one does.
		if wrapped {
			ctx = context.WithValue(ctx, nestKey{}, e.inner)
		}
		return e.fn(ctx)
	}
	if wrapped || e.inner != nil {
		// Pass the mark on to the Func this edge wraps, or clear it, so
		// that a protected call further down with this context (a
		// recursive call, a fallback calling fn again) is not taken for
		// the wrapped one. An edge nobody wraps, around a plain function,
		// pays nothing.
		ctx = context.WithValue(ctx, nestKey{}, e.inner)
	}
	if wrapped {
		// Another edge wraps this one and records the call.
		v, _, err := e.protect(ctx, p)
		return v, err
	}
	s := p.site
	rec := s.begin(ctx)
	o := outcomeFailure // a panic or runtime.Goexit, in fn or the fallback: a failed call
	defer func() { s.end(ctx, rec, o) }()
	v, oc, err := e.protect(ctx, p)
	o = oc
	return v, err
}

// protect runs the pipeline and the fallback, and reports the outcome.
func (e *edge[T]) protect(ctx context.Context, p *pipeline) (v T, o outcome, err error) {
	if p.hedged && p.hedgeNow() != nil {
		return e.protectHedged(ctx, p)
	}
	var attempt attemptFunc
	switch {
	case p.enforce || e.check != nil:
		attempt = func(actx context.Context) error {
			var err error
			v, err = e.try(actx, p)
			return err
		}
	default:
		attempt = func(actx context.Context) error {
			var err error
			v, err = e.fn(actx)
			return err
		}
	}
	err = p.run(ctx, attempt, nil)
	return e.finish(ctx, p, v, err)
}

// try runs fn once, in its own goroutine if the timeout is enforced, and
// applies the result check.
func (e *edge[T]) try(ctx context.Context, p *pipeline) (T, error) {
	var v T
	var err error
	if p.enforce {
		v, err = enforced(ctx, p, e.fn)
	} else {
		v, err = e.fn(ctx)
	}
	if err == nil && e.check != nil {
		if cerr := e.check(v); cerr != nil {
			err = &checkError{cerr}
		}
	}
	return v, err
}

// hedgeCall is one call of a hedging edge: its race, which is the call's
// context for the pipeline, and the result the race keeps.
type hedgeCall[T any] struct {
	race
	e *edge[T]
	p *pipeline
	v T
}

func (e *edge[T]) protectHedged(ctx context.Context, p *pipeline) (T, outcome, error) {
	c := &hedgeCall[T]{e: e, p: p}
	c.init(ctx, p, c)
	err := p.run(c, c.attempt, nil)
	// Every attempt has returned, and wrote c.v under the race's lock.
	return e.finish(ctx, p, c.v, err)
}

// attempt runs one attempt of a hedging call, the first on the caller's
// goroutine or a hedge on its own, and keeps its result if the race says.
func (c *hedgeCall[T]) attempt(ctx context.Context) error {
	s := seatOf(ctx, &c.race)
	if s != nil && !c.p.enforce {
		s.sent(ctx) // inside its slot; enforced says so once it has one
	}
	v, err := c.e.try(ctx, c.p)
	if s == nil {
		c.v = v
		return err
	}
	s.r.mu.Lock()
	keep := s.r.keepLocked(s.i, err == nil)
	if keep {
		c.v = v
	}
	s.r.mu.Unlock()
	if !keep {
		if err == nil {
			drop(v)
		}
		return errLost
	}
	return err
}

func (c *hedgeCall[T]) dropKept() { drop(c.v) }

// finish settles the tokens of a call that succeeded, or applies the
// fallback to one that failed.
func (e *edge[T]) finish(ctx context.Context, p *pipeline, v T, err error) (T, outcome, error) {
	if err == nil {
		if e.used != nil {
			p.settleTokens(ctx, e.used(v))
		}
		return v, outcomeSuccess, nil
	}
	o := classify(ctx, err)
	if e.fb != nil && o != outcomeCanceled {
		// The caller's own cancellation is passed back, not replaced: a
		// caller that gave up wants to know it did.
		return applyFallback(ctx, p.site, e.fb, e.fbKind, err)
	}
	return v, o, err
}

// recording is the start of one recorded call.
type recording struct {
	in    *instruments
	start time.Duration
	timed bool
}

// begin starts recording a call: resilience.call.duration reads the
// monotonic clock only when its instrument is enabled.
func (s *site) begin(ctx context.Context) recording {
	in := meter()
	r := recording{in: in, timed: in.callDuration.Enabled(ctx)}
	if r.timed {
		r.start = monotonic()
	}
	return r
}

// end records a call's outcome in resilience.calls and its duration.
func (s *site) end(ctx context.Context, r recording, o outcome) {
	s.counts[o].Add(1)
	if r.timed {
		r.in.callDuration.Record(ctx, (monotonic() - r.start).Seconds(), s.durations[o]...)
	}
}

// unnamed is the metric name of a protected function that has no stable
// name of its own: see stableName.
const unnamed = "unnamed"

var warnUnnamed sync.Once

// stableName chooses the name a protected function has in metrics. It is
// never derived from a compiler-generated closure name, which changes with
// inlining (-gcflags=-l, PGO) and is shared by unrelated stacks built by
// the same code. In order:
//
//   - the explicit name (Stack.Name; the service, for ForService and
//     Transport);
//   - the name of the protected Func this one wraps, for hand-nested
//     wrappers;
//   - the name of a named function or method, such as
//     "main.(*Client).Generate-fm";
//   - the name of the stack's circuit breaker, else of its bulkhead;
//   - "unnamed", with one warning in the log per process.
func stableName(explicit string, fn any, inner *edgeMeta, cb *CircuitBreaker, b *Bulkhead) string {
	switch {
	case explicit != "":
		return explicit
	case inner != nil && inner.name != unnamed:
		return inner.name
	}
	if n := namedFunc(fn); n != "" {
		return n
	}
	switch {
	case cb != nil && cb.name != "":
		return cb.name
	case b != nil && b.name != "":
		return b.name
	}
	warnUnnamed.Do(func() {
		slog.Warn("resilience: a protected function has no stable name, so its metrics use the name " + unnamed +
			": set Stack.Name, pass a named function or method, or name its circuit breaker or bulkhead")
	})
	return unnamed
}

// nameOf is the name fn gives a wrapper built around code that calls it:
// its edge's name if it is a protected Func, else its own if it is named.
func nameOf[T any](fn Func[T]) string {
	if m := lookupEdge(fn); m != nil && m.name != unnamed {
		return m.name
	}
	return namedFunc(fn)
}

// namedFunc returns the name of fn's code if fn is a named function or a
// method value, and "" for a closure, whose compiler-generated name
// ("pkg.F.func1", "pkg.glob..func2") is not stable.
func namedFunc(fn any) string {
	v := reflect.ValueOf(fn)
	if v.Kind() != reflect.Func || v.IsNil() {
		return ""
	}
	f := runtime.FuncForPC(v.Pointer())
	if f == nil {
		return ""
	}
	name := f.Name()
	last := name[strings.LastIndexByte(name, '/')+1:]
	if isClosureName(last) || strings.HasPrefix(name, ScopeName+".(*edge[") || strings.HasPrefix(name, ScopeName+".(*cacheRecorder[") {
		// A closure, or this package's own adapters, which name nothing
		// of the caller's.
		return ""
	}
	return name
}

// isClosureName reports whether a symbol name, without its package path,
// names compiler-generated code: a func literal (".func1", ".func1.2",
// "glob..func1") or a range-over-func body ("-range1").
func isClosureName(s string) bool {
	for _, marker := range []string{".func", "-range"} {
		for i := strings.Index(s, marker); i >= 0; {
			j := i + len(marker)
			if j < len(s) && s[j] >= '0' && s[j] <= '9' {
				return true
			}
			k := strings.Index(s[j:], marker)
			if k < 0 {
				break
			}
			i = j + k
		}
	}
	return false
}

// edges maps the identity of each Func an edge returned to the edge's
// metadata, so that a wrapper built around it knows it is wrapping a
// protected call. Entries are weak and removed when their owner is
// collected, so that wrappers built per request do not accumulate.
var edges sync.Map // uintptr -> *edgeEntry

// edgeEntry is valid while both its metadata and its owner, the object the
// Func's closure holds, are alive: an address whose Func was collected may
// be reused by another closure before the cleanup removes the entry.
type edgeEntry struct {
	m     weak.Pointer[edgeMeta]
	alive func() bool
}

// funcID is the identity of a func value: the address of its closure.
// Go has no other way to tell two func values apart; the Funcs registered
// here are method values, heap closures of their own, so the address is
// unique while the Func is reachable.
func funcID[T any](fn Func[T]) uintptr { return *(*uintptr)(unsafe.Pointer(&fn)) }

// registerFunc records f, a method value of owner, as a protected Func
// with metadata m: an edge's own, or for a Func that only passes calls on
// to a protected one (FallbackCache.Record), that one's.
func registerFunc[T, O any](f Func[T], m *edgeMeta, owner *O) {
	id := funcID(f)
	wo := weak.Make(owner)
	e := &edgeEntry{m: weak.Make(m), alive: func() bool { return wo.Value() != nil }}
	edges.Store(id, e)
	runtime.AddCleanup(owner, func(id uintptr) { edges.CompareAndDelete(id, e) }, id)
}

// lookupEdge returns the metadata of fn's edge if fn is a protected Func.
func lookupEdge[T any](fn Func[T]) *edgeMeta {
	if fn == nil {
		return nil
	}
	v, ok := edges.Load(funcID(fn))
	if !ok {
		return nil
	}
	e := v.(*edgeEntry)
	if !e.alive() {
		return nil
	}
	return e.m.Value()
}
