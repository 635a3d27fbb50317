package resilience

import (
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"time"
)

// What an LLM provider's answer says about its own limits: a 429 that says
// the window is spent pauses the service until the provider's reset, so
// that the service's other goroutines wait instead of spending requests on
// more 429s; and x-should-retry, which OpenAI's and Anthropic's APIs send
// to say whether a response is worth another attempt.

// statusOverloaded is Anthropic's 529: overloaded, retried like a 503.
const statusOverloaded = 529

// spentUntil returns when the provider's window that resp says is spent
// resets, for requests and for tokens: OpenAI's x-ratelimit-remaining-* with
// x-ratelimit-reset-* as a duration ("1s", "6m0s"), Anthropic's
// anthropic-ratelimit-*-remaining with anthropic-ratelimit-*-reset as RFC
// 3339. A zero time means that window is not known to be spent.
func spentUntil(h http.Header, now time.Time) (requests, tokens time.Time) {
	reset := func(kind string) time.Time {
		if h.Get("X-Ratelimit-Remaining-"+kind) == "0" {
			if d, err := time.ParseDuration(h.Get("X-Ratelimit-Reset-" + kind)); err == nil && d > 0 {
				return now.Add(d)
			}
		}
		if h.Get("Anthropic-Ratelimit-"+kind+"-Remaining") == "0" {
			if t, err := time.Parse(time.RFC3339, h.Get("Anthropic-Ratelimit-"+kind+"-Reset")); err == nil && t.After(now) {
				return t
			}
		}
		return time.Time{}
	}
	return reset("Requests"), reset("Tokens")
}

// shouldRetry reads x-should-retry: set says whether the header is there.
func shouldRetry(h http.Header) (retry, set bool) {
	switch strings.ToLower(strings.TrimSpace(h.Get("X-Should-Retry"))) {
	case "true":
		return true, true
	case "false":
		return false, true
	}
	return false, false
}

// limitsOf notes what a 429 says of the provider's windows: the service
// pauses until the latest reset, and its limiters are paused too.
func (rt *roundTrip) limitsOf(p *pipeline, resp *http.Response) {
	if resp.StatusCode != http.StatusTooManyRequests || p.pause == nil {
		return
	}
	req, tok := spentUntil(resp.Header, time.Now())
	until := req
	if tok.After(until) {
		until = tok
	}
	if until.IsZero() {
		return
	}
	pauseUntil(p.pause, until)
	if !req.IsZero() && p.limitCell != nil {
		if l := p.limitCell.Load(); l != nil {
			l.PauseUntil(req)
		}
	}
	if !tok.IsZero() && rt.reg != nil {
		if l := rt.reg.TokenLimiter(rt.service); l != nil {
			l.PauseUntil(tok)
		}
	}
}

// pauseUntil moves the pause in c to t, if t is later.
func pauseUntil(c *atomic.Int64, t time.Time) {
	end := unixNano(t)
	for {
		cur := c.Load()
		if end <= cur || c.CompareAndSwap(cur, end) {
			return
		}
	}
}

// waitPause waits out a pause a provider asked for, before an attempt and
// outside its timeout. A pause that would outlast the context is not
// waited: the attempt fails at once with ErrRateLimited.
func waitPause(ctx context.Context, c *atomic.Int64, name string) error {
	until := c.Load()
	if until == 0 {
		return nil
	}
	now := time.Now()
	d := time.Duration(until - now.UnixNano())
	if d <= 0 {
		c.CompareAndSwap(until, 0) // over: later calls pay one load
		return nil
	}
	if dl, ok := ctx.Deadline(); ok && !now.Add(d).Before(dl) {
		return &Error{Err: ErrRateLimited, Name: name, retryIn: d}
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
