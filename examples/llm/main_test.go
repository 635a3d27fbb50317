package main

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
	"github.com/resilience-go/resilience/internal/flaky"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestRun checks that the demo tells its story: each line below must appear,
// in this order.
func TestRun(t *testing.T) {
	var buf bytes.Buffer
	if err := run(&buf); err != nil {
		t.Fatalf("run: %v", err)
	}
	out := buf.String()
	want := []string{
		`call 1: "What does a circuit breaker do?"`,
		`  retry: attempt 1 failed (HTTP 529, Retry-After 30ms); next attempt in 30ms`,
		`  retry: attempt 2 failed (HTTP 503); next attempt in 20ms`,
		`  -> "It stops calling a failing service for a while, so that it can recover and callers fail fast."`,
		`call 2: "Why retry with backoff?"`,
		`  fallback: canned answer (retries exhausted after 3 attempts, last: HTTP 503)`,
		`call 3: "What is a bulkhead for?"`,
		`  breaker "llm": closed -> open`,
		`  fallback: canned answer (the API asked to wait 1s, longer than the retry waits; last: HTTP 529, Retry-After 1s)`,
		`call 4: "Why is the fallback outermost?"`,
		`  fallback: canned answer (circuit open, the API was not called)`,
		`(waiting out the breaker's open period of 1s: the Retry-After of the 529 that opened it, not the 200ms open timeout)`,
		`call 5: "What does a timeout protect?"`,
		`  breaker "llm": open -> half-open`,
		`  retry: attempt 1 failed (timed out); next attempt in 10ms`,
		`  breaker "llm": half-open -> closed`,
		`call 6: "Is the service back?"`,
		`  -> "Yes: every policy is back to normal."`,
		`call 7: ""`,
		`  -> error: llm API: HTTP 400: messages: at least one message is required`,
		`  calls: 7 (3 answered by the API, 3 by the fallback, 1 failed)`,
		`  downstream requests: 11 (3 answered)`,
		`  breaker "llm": closed`,
		`  bulkhead "llm": active 0, waiting 0, rejected 0, completed 11`,

		// The second part: callers paced by requests and tokens.
		`paced calls: 4 callers share limits of 5 requests per second (burst 2) and 600 tokens per second; a total timeout of 2s per call`,
		`  once the burst is spent: 2 requests sent, 4 callers waiting for a request permit`,
		`  caller 1, "What is a token bucket?": estimated 56 tokens, used 29 (27 given back)`,
		`  caller 1, "Why pace requests instead of retrying 429s?": estimated 61 tokens, used 27 (34 given back)`,
		`  caller 2, "What does a rate limit per minute mean?": estimated 60 tokens, used 27 (33 given back)`,
		`  caller 2, "How are tokens counted?": estimated 56 tokens, used 51 (5 given back)`,
		`  caller 3, "Why estimate the tokens before the call?": estimated 60 tokens, used 26 (34 given back)`,
		`  caller 3, "What if the answer is longer than the estimate?": estimated 62 tokens, used 74 (12 charged)`,
		`  caller 4, "What is the burst of a limiter?": estimated 58 tokens, used 20 (38 given back)`,
		`  caller 4, "What does a total timeout bound?": estimated 58 tokens, used 24 (34 given back)`,
		`  requests sent per 200ms: 2 1 1 1 1 1 1`, // the burst, then one per 1/5s
		`  busiest second: 6 requests, within the 5 per second plus the burst of 2`,
		`  6 of 8 calls waited for a request permit, 0 for tokens`,
		`a long document: an incident timeline of 36 lines, 3490 bytes`,
		`  whole: estimated 923 tokens: refused at once by rate limiter "llm-tokens", which never holds that many; the API was not called`,
		`  first half: estimated 491 tokens, used 405 (86 given back)`,
		`  second half: waited for the tokens the first half took; estimated 491 tokens, used 405 (86 given back)`,
		`  request limiter "llm-requests": granted 11, rejected 0, waiting 0`, // the refused document took a request permit
		`  token limiter "llm-tokens": granted 10, rejected 1, waiting 0`,
	}
	lines := strings.Split(out, "\n")
	i := 0
	for _, w := range want {
		for i < len(lines) && lines[i] != w {
			i++
		}
		if i == len(lines) {
			t.Fatalf("output lacks %q after the lines before it; output:\n%s", w, out)
		}
	}
	if strings.Count(out, "breaker \"llm\": ") != 4 { // three transitions and the summary
		t.Errorf("want exactly three breaker transitions; output:\n%s", out)
	}

	// Nothing that changes from run to run: no port, no measured time.
	if strings.Contains(out, "127.0.0.1") {
		t.Errorf("output names the endpoint's address; output:\n%s", out)
	}
	var again bytes.Buffer
	if err := run(&again); err != nil {
		t.Fatalf("second run: %v", err)
	}
	if again.String() != out {
		t.Errorf("two runs printed different output:\n%s\n---\n%s", out, again.String())
	}
}

// TestClientErrors checks how Complete turns the API's answers into errors.
func TestClientErrors(t *testing.T) {
	srv := flaky.Start(flaky.Script{
		Plan: []flaky.Outcome{
			flaky.Fail(529).WithRetryAfter(2 * time.Second),
			flaky.Fail(http.StatusServiceUnavailable),
			flaky.Fail(http.StatusTooManyRequests),
			flaky.Fail(http.StatusRequestTimeout),
			flaky.Fail(http.StatusUnauthorized),
			flaky.Fail(http.StatusNotFound).WithRetryAfter(time.Second),
		},
	})
	defer srv.Close()
	c := &Client{BaseURL: srv.URL(), HTTP: srv.Client()}
	for _, tc := range []struct {
		status     int
		retryable  bool
		retryAfter time.Duration // 0: no RetryAfter method
	}{
		{529, true, 2 * time.Second},
		{503, true, 0},
		{429, true, 0},
		{408, true, 0},
		{401, false, 0},
		{404, false, time.Second},
	} {
		_, err := c.Complete(t.Context(), "hello")
		var se *StatusError
		if !errors.As(err, &se) || se.StatusCode != tc.status {
			t.Fatalf("Complete() = %v; want a *StatusError with status %d", err, tc.status)
		}
		if got := resilience.IsRetryable(err); got != tc.retryable {
			t.Errorf("HTTP %d: IsRetryable = %v; want %v", tc.status, got, tc.retryable)
		}
		var ra interface{ RetryAfter() time.Duration }
		switch {
		case tc.retryAfter == 0 && errors.As(err, &ra):
			t.Errorf("HTTP %d without Retry-After has a RetryAfter method: the retry would not wait", tc.status)
		case tc.retryAfter != 0 && (!errors.As(err, &ra) || ra.RetryAfter() != tc.retryAfter):
			t.Errorf("HTTP %d: RetryAfter missing or wrong; want %v", tc.status, tc.retryAfter)
		}
	}

	// Past the plan, the default handler answers "ok", which is not JSON.
	if _, err := c.Complete(t.Context(), "hello"); err == nil || !strings.Contains(err.Error(), "decoding") {
		t.Errorf("Complete() on a non-JSON answer = %v; want a decoding error", err)
	}
}

func TestCompleteHonoursCancellation(t *testing.T) {
	srv := flaky.Start(flaky.Script{Then: flaky.Hang()})
	defer srv.Close()
	c := &Client{BaseURL: srv.URL(), HTTP: srv.Client()}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
	if _, err := c.Complete(ctx, "hello"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Complete() = %v; want context.DeadlineExceeded", err)
	}
}

func TestParseRetryAfter(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"", 0, false},
		{"0", 0, true},
		{"3", 3 * time.Second, true},
		{"-1", 0, false},
		{"soon", 0, false},
		{"Mon, 02 Jan 2006 15:04:05 GMT", 0, true}, // in the past
	} {
		got, ok := parseRetryAfter(tc.in)
		if got != tc.want || ok != tc.ok {
			t.Errorf("parseRetryAfter(%q) = %v, %v; want %v, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestDescribe(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&resilience.Error{Err: resilience.ErrBulkheadFull, Name: "llm"}, "bulkhead full"},
		{&resilience.Error{Err: resilience.ErrRateLimited, Name: "llm-tokens"}, "rate limited"},
		{errors.New("dial tcp 127.0.0.1:1: connection refused"), "transport error"},
	} {
		if got := describe(tc.err); got != tc.want {
			t.Errorf("describe(%v) = %q; want %q", tc.err, got, tc.want)
		}
	}
}

// TestMessageUsage checks that Message reads the usage the endpoint reports,
// counted by its own tokenizer, not by the client's estimate.
func TestMessageUsage(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/messages", serveMessages)
	srv := flaky.Start(flaky.Script{Handler: mux})
	defer srv.Close()
	c := &Client{BaseURL: srv.URL(), HTTP: srv.Client()}
	r, err := c.Message(t.Context(), "What is a token bucket?")
	if err != nil {
		t.Fatalf("Message: %v", err)
	}
	if want := answers["What is a token bucket?"]; r.Text != want {
		t.Errorf("Text = %q; want %q", r.Text, want)
	}
	// What, is, a, token, bucket, ? and the answer's words and marks.
	if r.Usage.InputTokens != 6 || r.Usage.OutputTokens != countTokens(r.Text) || r.Usage.Total() != 6+countTokens(r.Text) {
		t.Errorf("Usage = %+v; want 6 input tokens and %d output", r.Usage, countTokens(r.Text))
	}
	for _, tc := range []struct {
		in   string
		want int
	}{
		{"", 0},
		{"Hello, world!", 4},
		{"02:14: 503 to 90% of requests.", 11},
		{"  two   words ", 2},
	} {
		if got := countTokens(tc.in); got != tc.want {
			t.Errorf("countTokens(%q) = %d; want %d", tc.in, got, tc.want)
		}
	}
	if got := estimateTokens("What is a token bucket?"); got != 6+expectedOutput {
		t.Errorf("estimateTokens = %d; want %d", got, 6+expectedOutput)
	}
}
