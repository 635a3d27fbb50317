package resilience

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Transport is an [http.RoundTripper] that runs every request through a
// registry's policies for its service: the breaker, the retry policy, the
// timeout and the bulkhead, in the one pipeline that [Compose] and
// [ForService] run, so RetryIf, OnRetry, IsFailure, the retry budget,
// cancellation and panics behave exactly as they do there. Put it in an
// http.Client and every call through that client is protected, with the
// HTTP rules below instead of each caller's own status handling.
//
// Statuses. A failing status is a [*StatusError] to the policies, which is
// what RetryIf, OnRetry and IsFailure see. 408, 429, 502, 503 and 504 count
// against the breaker and are retryable, whatever the method: they say the
// server did not do the work. 500 counts against the breaker and is retried
// only for idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) or a
// request that opts in with an Idempotency-Key header. Other 5xx count and
// are not retryable. Other 4xx neither count nor are retried: they are the
// caller's bug, not the downstream's illness.
//
// Network errors are retried when RetryIf (by default [IsRetryable]) says
// so, and, for a request that is not idempotent, only when the error shows
// the request never reached the server (a refused or failed dial), so that
// a POST is never sent twice, whatever RetryIf says. A request whose body
// cannot be replayed (no GetBody) is not retried at all.
//
// Retry-After, in seconds or as an HTTP date, and retry-after-ms, the
// finer hint of LLM providers, replace the backoff for that one wait,
// exactly; one longer than the retry's MaxDelay ends the retries at once,
// since retrying sooner than the server asked only earns another refusal.
// When the retries end on a failing status, for whatever reason, RoundTrip
// returns that last response, not an error, as any RoundTripper would; on
// a network error it returns the pipeline's error ([ErrRetryExhausted],
// [ErrRetryBudgetExhausted], or the caller's context error together with
// the last attempt's).
//
// Bodies. The bodies of failed attempts are drained and closed before the
// wait, so their connections are reused and their slots freed. The final
// response's body stays readable after RoundTrip returns: its attempt's
// timeout and bulkhead slot last until the body is closed or read to the
// end, since streaming a body is still work the downstream is doing, and
// no longer than the attempt's timeout, so that a caller who forgets to
// close a body cannot hold a slot for ever. A 101 Switching Protocols body
// stays an [io.ReadWriteCloser], for WebSocket upgrades and
// httputil.ReverseProxy. A request rejected by the breaker or the bulkhead
// has its body closed, as a RoundTripper must. Close every body, as
// net/http asks.
//
// Hedging. With HEDGE_<SERVICE>_DELAY set for its service, a request that
// can be sent twice (GET, HEAD or OPTIONS, or any method with an
// Idempotency-Key header) and whose body can be replayed is hedged: after
// the delay without an answer, another copy is sent, each with its own
// permit, timeout and slot, and the first success is returned; the losers
// are cancelled and their responses closed before RoundTrip returns. Other
// requests are never hedged. Hedged copies are clones of the request and
// take their bodies from GetBody, concurrently: it must be safe for that,
// as http.NewRequest's is.
//
// A Transport is safe for concurrent use by multiple goroutines; do not
// copy it after first use.
type Transport struct {
	// Base performs the requests. nil means http.DefaultTransport.
	Base http.RoundTripper

	// Registry provides the policies. nil means Default().
	Registry *Registry

	// Service names a request's downstream service, the key of its
	// breaker, bulkhead and timeout in the registry. nil means the
	// request's host without its port.
	Service func(*http.Request) string

	// Key, if set, names a request's key within its service: a tenant, a
	// model. The request then runs through the breaker and bulkhead of
	// its (service, key), as [WithKey] on its context does; "" means the
	// key of its context, if any. See WithKey for the bounds.
	Key func(*http.Request) string

	// Check, if set, inspects each response whose status is not a
	// failure: a non-nil error makes it a failure that the retry, the
	// hedge and the breaker see as they see a failing status (for
	// example a 200 whose body says the model is overloaded). Its error
	// is retryable unless it has a Retryable() bool method that says
	// otherwise, and its RetryAfter() time.Duration method, if any, is
	// honoured. Check may read the body: what it reads is kept, and the
	// body stays whole for the caller when the response passes. When the
	// retries end on a rejected response, RoundTrip returns the error,
	// not the response. Check must be safe for concurrent use.
	Check func(*http.Response) error
}

// RoundTrip implements [http.RoundTripper].
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	base := t.Base
	if base == nil {
		base = http.DefaultTransport
	}
	reg := t.Registry
	if reg == nil {
		reg = Default()
	}
	service := t.serviceOf(req)
	p := reg.current(service, kindHandoff, t.keyOf(req))
	defer p.leave()
	if !p.on() {
		return base.RoundTrip(req)
	}
	rt := roundTrip{base: base, req: req, p: p, reg: reg, service: service, check: t.Check}
	key := req.Header.Get("Idempotency-Key") != ""
	rt.idempotent = isIdempotent(req) || key
	rt.hasBody = req.Body != nil && req.Body != http.NoBody
	rt.replayable = !rt.hasBody || req.GetBody != nil
	if rt.replayable && (hedgeable(req.Method) || key) && p.hedged && p.hedgeNow() != nil {
		// Hedged: attempts run concurrently and settle through the
		// race, which runs them from the heap. Only then is the request
		// state allocated: an unhedged request keeps it on the stack.
		h := &hedgedTrip{roundTrip: rt}
		h.race.init(req.Context(), p, &h.roundTrip)
		h.roundTrip.race = &h.race
		// What hedges copy: the first attempt's base may write to the
		// request's header map while they run.
		h.hreq = req.Clone(req.Context())
		return h.do(p, &h.race)
	}
	return rt.do(p, req.Context())
}

// hedgedTrip is a hedged request's state and its race, in one allocation.
type hedgedTrip struct {
	roundTrip
	race race
}

// hedgeable reports whether a request of this method may be sent twice at
// once: a read, with no effect for a second copy to repeat.
func hedgeable(method string) bool {
	switch method {
	case "", http.MethodGet, http.MethodHead, http.MethodOptions:
		return true
	}
	return false
}

func (t *Transport) keyOf(req *http.Request) string {
	if t.Key != nil {
		if k := t.Key(req); k != "" {
			return k
		}
	}
	return keyOf(req.Context())
}

func (t *Transport) serviceOf(req *http.Request) string {
	if t.Service != nil {
		if name := t.Service(req); name != "" {
			return name
		}
	}
	return req.URL.Hostname()
}

// roundTrip is one request through the pipeline: the HTTP edge. Its
// attempts turn failing statuses into *StatusError for the pipeline to
// classify, and keep each response open, with its slot and timeout, until
// the pipeline says whether it is the answer.
type roundTrip struct {
	race                            *race // the call's, when it is hedged
	hreq                            *http.Request
	base                            http.RoundTripper
	req                             *http.Request
	idempotent, hasBody, replayable bool
	bodyUsed                        bool           // req.Body was handed to base
	last                            *http.Response // the last attempt's response, still open
	lastStatus                      bool           // last failed with its status: a StatusError
	p                               *pipeline
	reg                             *Registry
	service                         string
	check                           func(*http.Response) error
}

// do runs the request through p, with pctx, the request's context or,
// when it is hedged, its race.
func (rt *roundTrip) do(p *pipeline, pctx context.Context) (resp *http.Response, err error) {
	ctx := rt.req.Context()
	s := p.site
	rec := s.begin(ctx)
	o, returned := outcomeFailure, false // a panic: a failed call
	defer func() {
		if !returned {
			// A panic: give back what the last attempt holds, and close
			// a body no attempt handed to base.
			rt.between()
			rt.closeUnsent()
		}
		s.end(ctx, rec, o)
	}()
	err = p.run(pctx, rt.attempt, rt.between)
	o, returned = classify(ctx, err), true
	if rt.last != nil {
		if err == nil || (rt.lastStatus && isStatusError(err)) {
			// The answer, or a failing status whose retries ended: the
			// caller gets the response, as from any RoundTripper.
			return rt.last, nil
		}
		rt.between()
	}
	rt.closeUnsent()
	return nil, err
}

// closeUnsent closes the request's body if no attempt handed it to base,
// which would have closed it: a RoundTripper closes the body on every path.
func (rt *roundTrip) closeUnsent() {
	if rt.hasBody && !rt.bodyUsed {
		rt.bodyUsed = true
		rt.req.Body.Close()
	}
}

func (rt *roundTrip) dropKept() { rt.between() }

// isStatusError reports whether err is, or wraps, a failing status. In a
// hedged round the status may be another attempt's than the response
// kept: both failed by their status, and the one kept is the answer.
func isStatusError(err error) bool {
	// A loop rather than errors.As, whose target escapes and costs an
	// allocation per attempt; the errors this package wraps a status in
	// have one cause each.
	for x := err; x != nil; x = errors.Unwrap(x) {
		if _, ok := x.(*StatusError); ok {
			return true
		}
	}
	return false
}

// between gives back what the last attempt's response holds.
func (rt *roundTrip) between() {
	if rt.last != nil {
		discard(rt.last)
		rt.last = nil
	}
}

func (rt *roundTrip) attempt(ctx context.Context) error {
	seat := seatOf(ctx, rt.race)
	hedge := seat != nil && seat.i > 0
	if seat == nil {
		// In a hedged round, what the round's attempts hold is settled
		// under its lock, and the retry gives back the last round's
		// before the next: a first attempt delayed by its permit must
		// not close a hedge's answer.
		rt.between()
	}
	out := rt.req.WithContext(ctx)
	if hedge {
		// Sent beside another copy: a base that sets headers (a tracer's)
		// must not write to the map another copy is reading.
		out = rt.hreq.Clone(ctx)
	}
	if rt.hasBody {
		if hedge || rt.bodyUsed {
			body, err := rt.req.GetBody()
			if err != nil {
				return &stopRetry{err}
			}
			out.Body = body
		}
		if !hedge {
			rt.bodyUsed = true
		}
	}
	if seat != nil {
		seat.sent(ctx)
	}
	resp, err := rt.base.RoundTrip(out)
	if err == nil && resp == nil {
		// The base broke the RoundTripper contract; say so, as
		// http.Client does, rather than fail on the nil response.
		err = fmt.Errorf("resilience: RoundTripper %T returned a nil *http.Response with a nil error", rt.base)
		return &stopRetry{err}
	}
	if err != nil {
		if !rt.replayable || (!rt.idempotent && !neverSent(err)) {
			// Sending it again could do the work twice, or cannot be done.
			return &stopRetry{err}
		}
		return err
	}
	err = rt.judge(ctx, resp)
	if seat == nil {
		rt.last, rt.lastStatus = resp, isStatusError(err)
		return err
	}
	r := seat.r
	r.mu.Lock()
	keep := r.keepLocked(seat.i, err == nil)
	prev := resp
	if keep {
		// An earlier failure of the round, if any, gives way.
		prev, rt.last, rt.lastStatus = rt.last, resp, isStatusError(err)
	}
	r.mu.Unlock()
	discard(prev) // off the lock: draining a body may take a while
	if !keep {
		return errLost
	}
	return err
}

// judge prepares an attempt's response for the caller and says what it is
// to the policies: nil, or a failing status or rejected response as an
// error.
func (rt *roundTrip) judge(ctx context.Context, resp *http.Response) error {
	h := holdFrom(ctx)
	h.keep()
	switch {
	case resp.StatusCode == http.StatusSwitchingProtocols:
		// An upgraded connection: keep the body an io.Writer, as
		// WebSocket clients and httputil.ReverseProxy need.
		if rwc, ok := resp.Body.(io.ReadWriteCloser); ok {
			resp.Body = &releasingRWC{releasingBody{rwc, h}, rwc}
		} else {
			resp.Body = &releasingBody{resp.Body, h}
		}
	case resp.Body == nil || resp.Body == http.NoBody || resp.ContentLength == 0 ||
		rt.req.Method == http.MethodHead || resp.StatusCode == http.StatusNoContent || resp.StatusCode == http.StatusNotModified:
		// Nothing left to stream: the downstream's work is done, as
		// net/http's own bookkeeping for the connection says.
		h.release()
	default:
		resp.Body = &releasingBody{resp.Body, h}
	}
	retry, said := shouldRetry(resp.Header)
	if !isFailureStatus(resp.StatusCode) && !(said && retry && resp.StatusCode >= 400) {
		if rt.check != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			if err := checkResponse(resp, rt.check); err != nil {
				if !rt.replayable {
					return &stopRetry{err}
				}
				return err
			}
		}
		return nil
	}
	se := &StatusError{StatusCode: resp.StatusCode, resp: resp, hint: -1}
	se.retryable = retryableStatus(resp.StatusCode)
	if d, ok := retryAfterHeader(resp, time.Now()); ok {
		se.hint = d
	}
	rt.limitsOf(rt.p, resp)
	switch {
	case !rt.replayable:
		return &stopRetry{se}
	case said && !retry:
		// The server says this answer will not change.
		se.retryable = false
		return &stopRetry{se}
	case said && retry:
		// The server says another attempt is worth it, even for a
		// status it would not be, or a 500 to a POST.
		se.retryable = true
		return se
	case resp.StatusCode == http.StatusInternalServerError && !rt.idempotent:
		return &stopRetry{se}
	}
	return se
}

// StatusError is the error a failing HTTP status is to the policies: what
// OnRetry, RetryIf and IsFailure see for a 503. Transport returns the
// response itself to its caller, never a StatusError. It is not modified
// once made, so any goroutine may read it.
type StatusError struct {
	StatusCode int

	resp      *http.Response
	retryable bool
	hint      time.Duration
}

// Error says "resilience: HTTP 503 Service Unavailable".
func (e *StatusError) Error() string {
	return "resilience: HTTP " + strconv.Itoa(e.StatusCode) + " " + http.StatusText(e.StatusCode)
}

// Retryable reports whether the status is worth another attempt by
// Transport's rules, for [IsRetryable].
func (e *StatusError) Retryable() bool { return e.retryable }

// RetryAfter returns the wait the response asked for with Retry-After or
// retry-after-ms, or a negative duration when it asked for none.
func (e *StatusError) RetryAfter() time.Duration { return e.hint }

// errorType is the error.type of a failing status: "http_503".
func (e *StatusError) errorType() string { return "http_" + strconv.Itoa(e.StatusCode) }

// releasingBody gives its attempt's slot and timeout back when it is
// closed or read to the end.
type releasingBody struct {
	io.ReadCloser
	h *hold
}

func (b *releasingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	switch {
	case err == io.EOF:
		b.h.release()
	case err != nil && b.h.expired():
		// Cut by its idle or stream timeout: say so, as an attempt's
		// timeout does.
		err = &Error{Err: ErrTimeout, Cause: err}
	case n > 0:
		b.h.touch()
	}
	return n, err
}

func (b *releasingBody) Close() error {
	err := b.ReadCloser.Close()
	b.h.release()
	return err
}

// releasingRWC is the body of a 101 response: an io.ReadWriteCloser.
type releasingRWC struct {
	releasingBody
	w io.Writer
}

func (b *releasingRWC) Write(p []byte) (int, error) { return b.w.Write(p) }

// discard drains and closes a failed attempt's body, up to a bound, so that
// its connection can be reused.
func discard(resp *http.Response) {
	if resp == nil || resp.Body == nil {
		return
	}
	io.CopyN(io.Discard, resp.Body, 64<<10)
	resp.Body.Close()
}

func isIdempotent(req *http.Request) bool {
	switch req.Method {
	case "", http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return false
}

// isFailureStatus reports whether a status counts against the breaker.
func isFailureStatus(code int) bool {
	switch {
	case code >= 500:
		return true
	case code == http.StatusRequestTimeout, code == http.StatusTooManyRequests:
		return true
	}
	return false
}

// retryableStatus reports whether a failing status is retried: those that
// say the server did not do the work. 500 is retried for idempotent
// requests only, which the attempt enforces.
func retryableStatus(code int) bool {
	switch code {
	case http.StatusRequestTimeout, http.StatusTooManyRequests, http.StatusBadGateway,
		http.StatusServiceUnavailable, http.StatusGatewayTimeout, http.StatusInternalServerError, statusOverloaded:
		return true
	}
	return false
}

// neverSent reports whether err shows the request never reached the
// server: the bulkhead turned it away, or the dial failed.
func neverSent(err error) bool {
	if errors.Is(err, ErrBulkheadFull) || errors.Is(err, syscall.ECONNREFUSED) {
		return true
	}
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// retryAfterHeader parses a response's retry-after-ms, else its
// Retry-After: delay-seconds or an HTTP date, relative to now. A past date
// is 0.
func retryAfterHeader(resp *http.Response, now time.Time) (time.Duration, bool) {
	if resp == nil {
		return 0, false
	}
	if ms := strings.TrimSpace(resp.Header.Get("Retry-After-Ms")); ms != "" {
		// LLM providers' finer hint, in milliseconds, which may be
		// fractional.
		if f, err := strconv.ParseFloat(ms, 64); err == nil && f >= 0 && !math.IsInf(f, 0) {
			if f >= float64(math.MaxInt64/time.Millisecond) {
				return math.MaxInt64, true
			}
			return time.Duration(f * float64(time.Millisecond)), true
		}
	}
	v := strings.TrimSpace(resp.Header.Get("Retry-After"))
	if v == "" {
		return 0, false
	}
	if secs, err := strconv.ParseInt(v, 10, 64); err == nil {
		if secs < 0 {
			return 0, false
		}
		if secs > int64((1<<63-1)/time.Second) {
			return 1<<63 - 1, true
		}
		return time.Duration(secs) * time.Second, true
	}
	if at, err := http.ParseTime(v); err == nil {
		return max(at.Sub(now), 0), true
	}
	return 0, false
}
