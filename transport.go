package resilience

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Transport is an [http.RoundTripper] that runs every request through a
// registry's policies for its service: the breaker, the retry policy, the
// timeout and the bulkhead, in [Compose]'s order. Put it in an
// http.Client and every call through that client is protected, with the
// HTTP rules below instead of each caller's own status handling.
//
// Statuses. 408, 429, 502, 503 and 504 count against the breaker and are
// retried, whatever the method: they say the server did not do the work.
// 500 counts against the breaker and is retried only for idempotent
// methods (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) or a request that opts
// in with an Idempotency-Key header. Other 5xx count and are not retried.
// Other 4xx neither count nor are retried: they are the caller's bug, not
// the downstream's illness.
//
// Network errors are retried when [IsRetryable] says so, and, for a request
// that is not idempotent, only when the error shows the request never
// reached the server (a refused or failed dial), so that a POST is never
// sent twice. A request whose body cannot be replayed (no GetBody) is not
// retried at all.
//
// Retry-After, in seconds or as an HTTP date, replaces the backoff for that
// one wait; one longer than the retry's MaxDelay ends the retries and that
// response is returned, since retrying sooner than the server asked is rude;
// 0 or a past date retries at once. Once retries are exhausted on a
// retryable status, RoundTrip returns the last response, not an error.
//
// Bodies. The bodies of failed attempts are drained and closed, so their
// connections are reused. The final response's body stays readable after
// RoundTrip returns: its attempt's timeout and bulkhead slot last until the
// body is closed or read to the end, since streaming a body is still work
// the downstream is doing. Close every body, as net/http asks.
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

	sites sync.Map // service -> *site
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
	if !reg.Enabled() {
		return base.RoundTrip(req)
	}
	service := t.serviceOf(req)
	s := t.site(service)
	ctx := req.Context()
	in := meter()
	timed := in.callDuration.Enabled(ctx)
	var start time.Duration
	if timed {
		start = monotonic()
	}
	resp, err := t.protected(ctx, req, base, reg, service, s)
	o := outcomeSuccess
	switch {
	case err != nil:
		o = classify(ctx, err)
	case isFailureStatus(resp.StatusCode):
		o = outcomeFailure
	}
	s.counts[o].Add(1)
	if timed {
		in.callDuration.Record(ctx, (monotonic() - start).Seconds(), s.durations[o]...)
	}
	return resp, err
}

func (t *Transport) serviceOf(req *http.Request) string {
	if t.Service != nil {
		if name := t.Service(req); name != "" {
			return name
		}
	}
	return req.URL.Hostname()
}

func (t *Transport) site(service string) *site {
	if s, ok := t.sites.Load(service); ok {
		return s.(*site)
	}
	s, _ := t.sites.LoadOrStore(service, newSite(service, service))
	return s.(*site)
}

func (t *Transport) protected(ctx context.Context, req *http.Request, base http.RoundTripper, reg *Registry, service string, s *site) (resp *http.Response, err error) {
	cb := reg.CircuitBreaker(service)
	var outcome error
	counted, rej := cb.guard(ctx, func() error {
		var failed bool
		resp, failed, err = t.attempts(ctx, req, base, reg, service, s)
		outcome = errFailure
		switch {
		case ctx.Err() != nil || errors.Is(err, ErrBulkheadFull):
			// The caller gave up, or the call never left this process.
			outcome = errExcluded
		case err != nil && cb.isFailure != nil && !cb.isFailure(err), !failed:
			outcome = nil
		}
		return outcome
	})
	if rej != nil {
		return nil, rej
	}
	if !counted {
		return resp, err
	}
	switch outcome {
	case nil:
		cb.counts.successes.Add(1)
	case errFailure:
		cb.recordFailure(ctx, httpErrorType(resp, err))
	}
	return resp, err
}

// httpErrorType is the error.type of an HTTP attempt's outcome: the error's,
// or "http_503" for a failing status.
func httpErrorType(resp *http.Response, err error) string {
	if err != nil || resp == nil {
		return errorType(err)
	}
	return "http_" + strconv.Itoa(resp.StatusCode)
}

// attempts runs the retry loop. failed reports whether the final outcome
// counts against the breaker.
func (t *Transport) attempts(ctx context.Context, req *http.Request, base http.RoundTripper, reg *Registry, service string, s *site) (resp *http.Response, failed bool, err error) {
	rp := reg.Retry().params()
	retryOff := reg.Retry().off.Load()
	b := reg.Bulkhead(service)
	timeout := reg.Timeout(service)
	idempotent := isIdempotent(req)
	replayable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
	if rp.budget != nil {
		rp.budget.deposit()
	}
	in := meter()
	var bo *delays
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for attempt := 1; ; attempt++ {
		var release func()
		var sent bool
		resp, release, sent, err = t.attempt(ctx, req, base, b, timeout, s)
		failed = err != nil || isFailureStatus(resp.StatusCode)
		retryable := retryableHTTP(resp, err, idempotent || req.Header.Get("Idempotency-Key") != "", sent)
		if !retryable || retryOff || !replayable || ctx.Err() != nil {
			return finish(resp, release), failed, err
		}
		if attempt >= rp.maxAttempts {
			in.retryExhausted.Add(ctx, 1, s.function...)
			return finish(resp, release), failed, err
		}
		var wait time.Duration
		if ra, ok := retryAfterHeader(resp, time.Now()); ok {
			if ra > rp.max {
				// The server asked for longer than we will wait: give the
				// caller its answer rather than retry early.
				return finish(resp, release), failed, err
			}
			wait = ra
		} else {
			if bo == nil {
				bo = rp.newBackOff()
			}
			wait = bo.next(err)
		}
		if rp.budget != nil && !rp.budget.withdraw() {
			in.retryBudgetExhausted.Add(ctx, 1, s.function...)
			return finish(resp, release), failed, err
		}
		s.retried(ctx, in, attempt, httpErrorType(resp, err))
		if rp.onRetry != nil {
			cause := err
			if cause == nil {
				cause = &StatusError{StatusCode: resp.StatusCode}
			}
			rp.onRetry(attempt, cause, wait)
		}
		discard(resp)
		release()
		if wait > 0 {
			if timer == nil {
				timer = time.NewTimer(wait)
			} else {
				timer.Reset(wait)
			}
			select {
			case <-ctx.Done():
				return nil, false, ctx.Err()
			case <-timer.C:
			}
		}
		if req.GetBody != nil && req.Body != nil && req.Body != http.NoBody {
			body, gerr := req.GetBody()
			if gerr != nil {
				return nil, false, gerr
			}
			req = req.Clone(ctx)
			req.Body = body
		}
		if attempt == 1 {
			defer func() {
				if err == nil && !failed {
					in.retrySuccessAfter.Add(ctx, 1, s.function...)
				}
			}()
		}
	}
}

// StatusError is the error OnRetry sees for a retried HTTP status.
type StatusError struct {
	StatusCode int
}

// Error says "resilience: HTTP 503 Service Unavailable".
func (e *StatusError) Error() string {
	return "resilience: HTTP " + strconv.Itoa(e.StatusCode) + " " + http.StatusText(e.StatusCode)
}

// attempt sends one attempt under its own timeout and bulkhead slot.
// release gives both back; sent reports whether the request may have
// reached the server.
func (t *Transport) attempt(ctx context.Context, req *http.Request, base http.RoundTripper, b *Bulkhead, timeout time.Duration, s *site) (resp *http.Response, release func(), sent bool, err error) {
	actx, cancel := context.WithTimeoutCause(ctx, timeout, ErrTimeout)
	bypass := b.off.Load()
	if !bypass {
		if err := b.acquire(actx); err != nil {
			if err == b.errFull {
				meter().bhRejections.Add(ctx, 1, addSet(attrResourceType.String(b.name), attrFunction.String(s.name))...)
			} else if ownTimeout(ctx, actx) {
				s.timedOut(ctx, startOf(ctx, actx, timeout), timeout)
				err = timedOut(err)
			}
			cancel()
			return nil, noop, false, err
		}
	}
	grel := noop
	if !bypass {
		var gerr error
		if grel, gerr = b.acquireGlobal(actx); gerr != nil {
			b.giveBack()
			if ownTimeout(ctx, actx) {
				gerr = timedOut(gerr)
			}
			cancel()
			return nil, noop, false, gerr
		}
	}
	var once sync.Once
	release = func() {
		once.Do(func() {
			cancel()
			if !bypass {
				grel()
				b.release()
			}
		})
	}
	resp, err = base.RoundTrip(req.Clone(actx))
	if err != nil {
		if ownTimeout(ctx, actx) {
			s.timedOut(ctx, startOf(ctx, actx, timeout), timeout)
			err = timedOut(err)
		}
		release()
		return nil, noop, !neverSent(err), err
	}
	return resp, release, true, nil
}

// finish hands the final response to the caller with a body that gives the
// attempt's slot and timeout back when it is closed or read to the end.
func finish(resp *http.Response, release func()) *http.Response {
	if resp == nil || resp.Body == nil {
		release()
		return resp
	}
	resp.Body = &releasingBody{ReadCloser: resp.Body, release: release}
	return resp
}

type releasingBody struct {
	io.ReadCloser
	release func()
	done    atomic.Bool
}

func (b *releasingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF && b.done.CompareAndSwap(false, true) {
		b.release()
	}
	return n, err
}

func (b *releasingBody) Close() error {
	err := b.ReadCloser.Close()
	if b.done.CompareAndSwap(false, true) {
		b.release()
	}
	return err
}

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

func retryableHTTP(resp *http.Response, err error, idempotent, sent bool) bool {
	if err != nil {
		if !IsRetryable(err) {
			return false
		}
		return idempotent || !sent
	}
	switch resp.StatusCode {
	case http.StatusRequestTimeout, http.StatusTooManyRequests, http.StatusBadGateway,
		http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	case http.StatusInternalServerError:
		return idempotent
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

// retryAfterHeader parses a response's Retry-After: delay-seconds or an
// HTTP date, relative to now. A past date is 0.
func retryAfterHeader(resp *http.Response, now time.Time) (time.Duration, bool) {
	if resp == nil {
		return 0, false
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
