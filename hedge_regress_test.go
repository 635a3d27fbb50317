package resilience

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// Reproductions from the review of hedging. Each fails while its bug
// exists; run with -race (TestHedgeRegression_TransportFirstAttemptSharesTheHeader
// MapHedgesClone and TestHedgeRegression_TransportFirstAttemptReadsRtLastWithout
// TheRaceLock fail only through the race detector). The first three failed
// at e019e28 and pass since 031e907, which fixed them during the review:
// they stay as regression tests.

// A hedged function that makes an HTTP call through a Transport whose
// service has no hedge, with the context it was given: the Transport's
// attempt takes the outer call's seat for its own and settles the outer
// race with the HTTP response, so the function's own result then loses to
// "another attempt" that never existed.
func TestHedgeRegression_TransportInsideHedgedCallHijacksTheOuterRace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := transportRegistry(t, nil) // no HEDGE_ for "api"
		base := roundTripFunc(func(r *http.Request) (*http.Response, error) {
			return okResponse(r, http.StatusOK), nil
		})
		c := &http.Client{Transport: &Transport{Registry: reg, Base: base, Service: func(*http.Request) string { return "api" }}}
		fn := func(ctx context.Context) (string, error) {
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://api.invalid/", nil)
			resp, err := c.Do(req)
			if err != nil {
				return "", err
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			return string(b), err
		}
		h := mustHedge(t, HedgeConfig{Delay: 50 * time.Millisecond})
		v, err := Compose(fn, Stack[string]{Name: uniqueName("review-nested"), Hedge: h})(context.Background())
		if err != nil || v != "body" {
			t.Fatalf("got %q, %v; want the function's own answer", v, err)
		}
	})
}

// The same, when the outer attempt is a hedge and the inner request's body
// cannot be replayed: the inner Transport takes its one attempt for a hedge
// of its own and calls the nil GetBody.
func TestHedgeRegression_TransportInsideOuterHedgeCallsNilGetBody(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := transportRegistry(t, nil)
		base := roundTripFunc(func(r *http.Request) (*http.Response, error) {
			if r.Body != nil {
				io.Copy(io.Discard, r.Body)
				r.Body.Close()
			}
			return okResponse(r, http.StatusOK), nil
		})
		tr := &Transport{Registry: reg, Base: base, Service: func(*http.Request) string { return "api" }}
		var n atomic.Int32
		fn := func(ctx context.Context) (string, error) {
			if n.Add(1) == 1 {
				<-ctx.Done()
				return "", ctx.Err()
			}
			// A POST whose body is a plain reader: no GetBody.
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://api.invalid/", io.NopCloser(strings.NewReader("x")))
			resp, err := tr.RoundTrip(req)
			if err != nil {
				return "", err
			}
			resp.Body.Close()
			return "hedge", nil
		}
		h := mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond})
		var v string
		var err error
		func() {
			defer func() {
				if p := recover(); p != nil {
					err = errors.New("panicked: " + errString(p))
				}
			}()
			v, err = WithHedge(fn, h)(context.Background())
		}()
		if err != nil || v != "hedge" {
			t.Fatalf("got %q, %v; want the hedge's answer", v, err)
		}
	})
}

func errString(p any) string {
	if e, ok := p.(error); ok {
		return e.Error()
	}
	if s, ok := p.(string); ok {
		return s
	}
	return "?"
}

// The round's first attempt gives back "what the last attempt holds"
// (rt.between) without the race's lock, while the round's hedges write
// rt.last under it: a data race, and a hedge's answer that arrives before
// the first attempt reaches its RoundTrip (a first attempt delayed by its
// limiter) is discarded by it.
func TestHedgeRegression_TransportFirstAttemptReadsRtLastWithoutTheRaceLock(t *testing.T) {
	reg := transportRegistry(t, map[string]string{"HEDGE_API_DELAY": "0.01"})
	base := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		// No shared state of the test's: the attempts are told apart by
		// their seats, so nothing here orders them for the race detector.
		if s, _ := r.Context().Value(hedgeKey{}).(*hedgeSeat); s != nil && s.i > 0 {
			return okResponse(r, http.StatusOK), nil
		}
		// Slow, and deaf to its context: waiting on Done would lock the
		// context's mutex, which the winner's cancel then takes.
		time.Sleep(100 * time.Millisecond)
		return nil, context.Canceled
	})
	c := &http.Client{Transport: &Transport{Registry: reg, Base: base, Service: func(*http.Request) string { return "api" }}}
	resp, err := c.Get("http://api.invalid/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
}

// A panic in the round's first attempt: abandon cancels the hedges but the
// panic goes on at once, while they still run and hold their slots, and a
// hedge's result already kept is never closed. Hedge's doc: "the call
// returns when they have returned, so that nothing they hold outlives it".
func TestHedgeRegression_FirstAttemptPanicLeavesHedgesHoldingSlots(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Name: uniqueName("review-panic"), Limit: 4})
		var n atomic.Int32
		fn := func(ctx context.Context) (int, error) {
			if n.Add(1) == 1 {
				time.Sleep(20 * time.Millisecond) // the hedge is sent at 10ms
				panic("first boom")
			}
			time.Sleep(50 * time.Millisecond) // deaf to its context
			return 2, nil
		}
		h := mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond})
		f := Compose(fn, Stack[int]{Name: uniqueName("review-panic"), Hedge: h, Bulkhead: b})
		func() {
			defer func() {
				if p := recover(); p != "first boom" {
					t.Errorf("recovered %v, want the first attempt's panic", p)
				}
			}()
			f(context.Background())
		}()
		if a := b.Stats().Active; a != 0 {
			t.Errorf("%d bulkhead slots still held by hedges after the call panicked", a)
		}
		time.Sleep(time.Second)
	})
}

func TestHedgeRegression_FirstAttemptPanicAfterAHedgeWonLeaksTheWinnersResult(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		won := &closer{}
		var n atomic.Int32
		fn := func(ctx context.Context) (*closer, error) {
			if n.Add(1) == 1 {
				<-ctx.Done() // cancelled when the hedge wins
				panic("cleanup boom")
			}
			return won, nil
		}
		h := mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond})
		func() {
			defer func() { recover() }()
			WithHedge(fn, h)(context.Background())
		}()
		time.Sleep(time.Second)
		if !won.closed.Load() {
			t.Error("the hedge's winning io.Closer result was dropped by the panic without being closed")
		}
	})
}

// EnforceTimeout with a Hedge: a losing attempt is abandoned by enforced
// when the winner cancels it, and its eventual result is dropped on the
// floor: an io.Closer loser is never closed, which the Hedge promises.
func TestHedgeRegression_EnforcedLoserResultIsNeverClosed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		late, fast := &closer{}, &closer{}
		var n atomic.Int32
		fn := func(ctx context.Context) (*closer, error) {
			if n.Add(1) == 1 {
				time.Sleep(50 * time.Millisecond) // ignores its context
				return late, nil
			}
			return fast, nil
		}
		h := mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond})
		f := Compose(fn, Stack[*closer]{Name: uniqueName("review-enforce"), Hedge: h, Timeout: time.Second, EnforceTimeout: true})
		got, err := f(context.Background())
		if err != nil || got != fast {
			t.Fatalf("got %p, %v; want the hedge's result", got, err)
		}
		time.Sleep(time.Second) // the loser returns in here
		if !late.closed.Load() {
			t.Error("the losing attempt's io.Closer result was never closed")
		}
	})
}

// "Share it with the retry policy to cap both together": shared, the
// budget is deposited twice per call (by the retry and by the hedge's
// round), so hedges get twice their ratio.
func TestHedgeRegression_BudgetSharedWithRetryCountsEachCallTwice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		budget, err := NewRetryBudget(RetryBudgetConfig{Ratio: 0.1, MinPerSecond: -1})
		if err != nil {
			t.Fatal(err)
		}
		var calls atomic.Int32
		fn := func(ctx context.Context) (int, error) {
			calls.Add(1)
			select {
			case <-ctx.Done():
				return 0, ctx.Err()
			case <-time.After(30 * time.Millisecond):
				return 1, nil
			}
		}
		h := mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond, Budget: budget})
		rt := mustRetry(t, RetryConfig{MaxAttempts: 3, Budget: budget})
		f := Compose(fn, Stack[int]{Name: uniqueName("review-budget"), Hedge: h, Retry: rt})
		for range 100 {
			if _, err := f(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
		if n := calls.Load(); n > 110 {
			t.Errorf("100 calls, no retry needed, sent %d attempts; a shared budget of 0.1 allows 110", n)
		}
	})
}

// Hedges clone the request "so that a base that sets headers must not
// write to the map the other copy is reading", but the round's first
// attempt is sent with rt.req.WithContext, which shares rt.req's header
// map: a base that sets a header on the first attempt races with every
// hedge's Clone of rt.req.
func TestHedgeRegression_TransportFirstAttemptSharesTheHeaderMapHedgesClone(t *testing.T) {
	reg := transportRegistry(t, map[string]string{"HEDGE_API_DELAY": "0.01"})
	base := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		r.Header.Set("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
		if s, _ := r.Context().Value(hedgeKey{}).(*hedgeSeat); s != nil && s.i > 0 {
			return okResponse(r, http.StatusOK), nil
		}
		time.Sleep(50 * time.Millisecond) // slow, deaf to its context
		return nil, context.Canceled
	})
	c := &http.Client{Transport: &Transport{Registry: reg, Base: base, Service: func(*http.Request) string { return "api" }}}
	req, _ := http.NewRequest(http.MethodGet, "http://api.invalid/", nil)
	req.Header.Set("Accept", "text/plain")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
}

func TestHedgeRegression_TransportHedgedFailingStatusReturnsAStatusError(t *testing.T) {
	reg := transportRegistry(t, map[string]string{
		"RETRY_MAX_ATTEMPTS": "1", "HEDGE_API_DELAY": "0", "HEDGE_API_MAX": "10",
		"CIRCUIT_BREAKER_DEFAULT_FAIL_MAX": "1000000", "BULKHEAD_DEFAULT_LIMIT": "100",
	})
	base := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		return okResponse(r, http.StatusServiceUnavailable), nil
	})
	tr := &Transport{Registry: reg, Base: base, Service: func(*http.Request) string { return "api" }}
	bad := 0
	for range 5000 {
		req, _ := http.NewRequest(http.MethodGet, "http://api.invalid/", nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			if bad == 0 {
				t.Logf("first error: %v", err)
			}
			bad++
			continue
		}
		resp.Body.Close()
	}
	if bad > 0 {
		t.Errorf("%d of 5000 hedged requests that all answered 503 returned an error instead of the 503", bad)
	}
}

// Transport's request without a hedge (none configured for its service)
// allocates one more object than before hedging (117bacf: 9): roundTrip
// now embeds the race and escapes as the pipeline's context, so it is on
// the heap for every request, about 320 bytes.
func TestHedgeRegression_TransportWithoutAHedgeAllocatesMore(t *testing.T) {
	reg := mustRegistry(t, map[string]string{})
	base := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		return &http.Response{StatusCode: http.StatusOK, Body: http.NoBody, Request: r}, nil
	})
	tr := &Transport{Registry: reg, Base: base}
	req, _ := http.NewRequest(http.MethodGet, "http://api.invalid/", nil)
	n := testing.AllocsPerRun(1000, func() {
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	})
	if n > 9 {
		t.Errorf("a request without a hedge allocates %v times, 9 before hedging", n)
	}
}

// A hedge that wins while the round's first attempt is still waiting for
// its permit (here it got a permit another call gave back; a Reload that
// swaps the limiter does the same): the first attempt's permit wait runs
// on the round's context, which the win does not cancel (bindFirst comes
// after it), so the call waits out the whole permit wait, and then calls
// fn once more with a cancelled context, for nothing.
func TestHedgeRegression_HedgeWinDoesNotStopTheFirstAttemptsPermitWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l, err := NewRateLimiter(RateLimiterConfig{Name: uniqueName("review-permit"), Limit: 1, Burst: 1})
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Wait(context.Background(), 1); err != nil { // the burst spent
			t.Fatal(err)
		}
		var calls atomic.Int32
		fn := func(ctx context.Context) (int, error) {
			calls.Add(1)
			return 1, nil
		}
		h := mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond})
		f := Compose(fn, Stack[int]{Name: uniqueName("review-permit"), Hedge: h, RateLimiter: l})
		go func() {
			time.Sleep(5 * time.Millisecond)
			l.giveBack(1) // another call's permit, unused
		}()
		start := time.Now()
		if _, err := f(context.Background()); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d > 100*time.Millisecond {
			t.Errorf("the hedge won at 10ms but the call returned after %v, when the first attempt's permit came", d)
		}
		if n := calls.Load(); n != 1 {
			t.Errorf("fn called %d times; the first attempt called it after it had lost", n)
		}
	})
}

// onceHandoff takes over the cancel of any *seatCtx it is given, asking
// only for the type: a hedge of a hedged function (no timeout, so its fn
// gets the seatCtx itself) that sends a request through a Transport whose
// request is not hedged hands its own context's cancel to that request's
// hold. Closing the first response's body then cancels the hedge's
// context, and its next request fails.
func TestHedgeRegression_TransportRequestInsideAHedgeCancelsTheHedgesContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := transportRegistry(t, nil) // no hedge for "api"
		base := roundTripFunc(func(r *http.Request) (*http.Response, error) {
			if err := r.Context().Err(); err != nil {
				return nil, err
			}
			return &http.Response{StatusCode: http.StatusOK, Body: io.NopCloser(strings.NewReader("ok")), ContentLength: -1, Request: r}, nil
		})
		c := &http.Client{Transport: &Transport{Registry: reg, Base: base, Service: func(*http.Request) string { return "api" }}}
		get := func(ctx context.Context) error {
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://api.invalid/", nil)
			resp, err := c.Do(req)
			if err != nil {
				return err
			}
			io.Copy(io.Discard, resp.Body)
			return resp.Body.Close()
		}
		var n atomic.Int32
		fn := func(ctx context.Context) (string, error) {
			if n.Add(1) == 1 {
				select {
				case <-ctx.Done():
					return "", ctx.Err()
				case <-time.After(100 * time.Millisecond):
					return "", errBoom
				}
			}
			if err := get(ctx); err != nil {
				return "", err
			}
			if err := get(ctx); err != nil { // the same hedge's second request
				t.Errorf("the hedge's second request: %v", err) // context canceled
				return "", err
			}
			return "hedge", nil
		}
		h := mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond})
		v, err := WithHedge(fn, h)(context.Background())
		if err != nil || v != "hedge" {
			t.Fatalf("got %q, %v; want the hedge's answer after its two requests", v, err)
		}
	})
}

// "Hedges counted and marked as reaching the downstream only once inside
// their slot": with EnforceTimeout, hedgeCall.attempt counts a hedge after
// the fact unless its error is ErrBulkheadFull, but a hedge whose wait in
// the bulkhead's queue is ended by its context (the caller's, or the
// winner's cancel) fails with context.Canceled: it is counted in
// resilience.hedge.attempts, and the call marked as having reached the
// downstream, though it never had a slot.
func TestHedgeRegression_EnforcedHedgeCancelledInTheQueueIsCountedAsSent(t *testing.T) {
	reader := withReader(t)
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Name: uniqueName("review-queue"), Limit: 1})
		if err := b.acquire(context.Background()); err != nil { // someone else's slot
			t.Fatal(err)
		}
		defer b.release()
		h := mustHedge(t, HedgeConfig{Delay: 10 * time.Millisecond})
		f := Compose(okFunc, Stack[int]{Name: uniqueName("review-queue"), Hedge: h, Bulkhead: b, Timeout: time.Second, EnforceTimeout: true})
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
		defer cancel()
		if _, err := f(ctx); err == nil {
			t.Fatal("a call that never got a slot succeeded")
		}
	})
	if n := counterValue(t, reader, "resilience.hedge.attempts"); n != 0 {
		t.Errorf("hedge.attempts = %d for a hedge that never left the bulkhead's queue, want 0", n)
	}
}
