// Command llm shows the resilience policies protecting a client of an LLM
// API: a circuit breaker, a retry, a timeout per attempt, a bulkhead and a
// fallback, stacked with resilience.Compose.
//
// It needs no network: it starts an endpoint shaped like Anthropic's
// Messages API (POST /v1/messages) on 127.0.0.1, through internal/flaky,
// which is overloaded for a while (529 and 503), answers one request too
// late, and then recovers. The demo prints what each policy did, and what it
// prints is the same on every run:
//
//	go run ./examples/llm
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/resilience-go/resilience"
	"github.com/resilience-go/resilience/internal/flaky"
)

func main() {
	if err := run(os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "llm:", err)
		os.Exit(1)
	}
}

// The demo's timings: small enough for the whole run to take about a second,
// large enough that a loaded machine does not change what it prints.
const (
	attemptTimeout = 250 * time.Millisecond // per attempt; the slow answer takes longer
	openTimeout    = 200 * time.Millisecond // how long the breaker stays open
	retryDelay     = 10 * time.Millisecond  // first backoff wait, doubling
	maxRetryDelay  = 40 * time.Millisecond  // caps every wait; a longer Retry-After ends the retries
)

// plan is what the endpoint does with each request, in order of arrival.
// Every request past its end is answered.
func plan() []flaky.Outcome {
	busy := flaky.Fail(529).WithFineRetryAfter(30 * time.Millisecond)
	overloaded := flaky.Fail(529).WithRetryAfter(time.Second)
	unavailable := flaky.Fail(http.StatusServiceUnavailable)
	p := []flaky.Outcome{busy, unavailable, flaky.OK()}      // call 1: saved by the retry
	p = append(p, flaky.Repeat(unavailable, 3)...)           // call 2: retries exhausted
	p = append(p, overloaded)                                // call 3: asks for longer than we wait; the breaker opens
	return append(p, flaky.Slow(10*time.Second), flaky.OK()) // call 5: one attempt times out
}

// run plays the demo and writes its account to w.
func run(w io.Writer) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/messages", serveMessages)
	srv := flaky.Start(flaky.Script{Plan: plan(), Handler: mux})
	defer srv.Close()

	transport := &http.Transport{}
	defer transport.CloseIdleConnections()
	client := &Client{BaseURL: srv.URL(), HTTP: &http.Client{Transport: transport}}

	// The policies are built once and shared by every call.
	breaker, err := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{
		Name:        "llm",
		FailMax:     2,
		OpenTimeout: openTimeout,
		// A request the API refused as malformed says nothing about the
		// API's health.
		IsFailure: func(err error) bool { return !isClientError(err) },
		OnStateChange: func(name string, from, to resilience.State) {
			fmt.Fprintf(w, "  breaker %q: %s -> %s\n", name, from, to)
		},
		// OnStateChange tells the story; the breaker's own slog records of
		// the same transitions would add timestamped lines to stderr.
		DisableLogging: true,
	})
	if err != nil {
		return err
	}
	retry, err := resilience.NewRetry(resilience.RetryConfig{
		MaxAttempts:   3,
		InitialDelay:  retryDelay,
		MaxDelay:      maxRetryDelay,
		DisableJitter: true, // so that the waits printed are the same on every run
		OnRetry: func(attempt int, err error, delay time.Duration) {
			fmt.Fprintf(w, "  retry: attempt %d failed (%s); next attempt in %v\n", attempt, describe(err), delay)
		},
	})
	if err != nil {
		return err
	}
	bulkhead, err := resilience.NewBulkhead(resilience.BulkheadConfig{Name: "llm", Limit: 4})
	if err != nil {
		return err
	}
	var fromAPI, fromFallback, failed int
	fallback := func(_ context.Context, err error) (string, error) {
		if isClientError(err) {
			return "", err // the caller's own mistake: a canned answer would hide it
		}
		fromFallback++
		fmt.Fprintf(w, "  fallback: canned answer (%s)\n", describe(err))
		return "The assistant is busy right now; please try again in a minute.", nil
	}
	ask := func(ctx context.Context, prompt string) (string, error) {
		call := func(ctx context.Context) (string, error) { return client.Complete(ctx, prompt) }
		return resilience.Compose(call, resilience.Stack[string]{
			CircuitBreaker: breaker,
			Retry:          retry,
			Timeout:        attemptTimeout,
			Bulkhead:       bulkhead,
			Fallback:       fallback,
		})(ctx)
	}

	fmt.Fprintln(w, "resilience demo: an LLM client against a flaky local endpoint")
	fmt.Fprintln(w, "endpoint plan: 529 (retry-after-ms: 30), 503, ok, 503 x3, 529 (Retry-After: 1), slow, then ok")
	fmt.Fprintf(w, "policies: breaker opens after 2 failed calls for %v; retry 3 attempts from %v, waits capped at %v; timeout %v per attempt; bulkhead of 4\n",
		openTimeout, retryDelay, maxRetryDelay, attemptTimeout)

	calls := 0
	do := func(prompt string) {
		calls++
		fmt.Fprintf(w, "\ncall %d: %q\n", calls, prompt)
		before := fromFallback
		answer, err := ask(ctx, prompt)
		switch {
		case err != nil:
			failed++
			fmt.Fprintf(w, "  -> error: %v\n", err)
		case fromFallback == before:
			fromAPI++
			fmt.Fprintf(w, "  -> %q\n", answer)
		default:
			fmt.Fprintf(w, "  -> %q\n", answer)
		}
	}
	do("What does a circuit breaker do?")
	do("Why retry with backoff?")
	do("What is a bulkhead for?")
	do("Why is the fallback outermost?")
	// The 529 that opened the breaker asked for 1s: the breaker stays open
	// that long, not just its OpenTimeout, so that the API is not probed
	// before it said it would be ready.
	period := breaker.OpenPeriod()
	fmt.Fprintf(w, "\n(waiting out the breaker's open period of %v: the Retry-After of the 529 that opened it, not the %v open timeout)\n",
		period.Round(100*time.Millisecond), openTimeout)
	time.Sleep(period + 50*time.Millisecond)
	do("What does a timeout protect?")
	do("Is the service back?")
	do("") // an empty prompt: the API refuses it

	st := bulkhead.Stats()
	fmt.Fprintln(w, "\nsummary")
	fmt.Fprintf(w, "  calls: %d (%d answered by the API, %d by the fallback, %d failed)\n", calls, fromAPI, fromFallback, failed)
	fmt.Fprintf(w, "  downstream requests: %d (%d answered)\n", srv.Requests(), srv.Successes())
	fmt.Fprintf(w, "  breaker %q: %s\n", breaker.Name(), breaker.State())
	fmt.Fprintf(w, "  bulkhead %q: active %d, waiting %d, rejected %d, completed %d\n",
		bulkhead.Name(), st.Active, st.Waiting, st.Rejected, st.Completed)
	return nil
}

// Client calls a Messages-style API. It is safe for concurrent use.
type Client struct {
	// BaseURL is the API's address, without the /v1/messages path.
	BaseURL string
	// HTTP sends the requests.
	HTTP *http.Client
}

// Complete sends prompt as one user message and returns the text of the
// answer. A non-2xx answer is a *StatusError; one that a retry cannot help,
// a 4xx other than 408 and 429, is also marked resilience.Permanent.
func (c *Client) Complete(ctx context.Context, prompt string) (string, error) {
	body, err := json.Marshal(messagesRequest{
		Model:     "demo-model",
		MaxTokens: 256,
		Messages:  nonEmpty(message{Role: "user", Content: prompt}),
	})
	if err != nil {
		return "", err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.BaseURL+"/v1/messages", bytes.NewReader(body))
	if err != nil {
		return "", resilience.Permanent(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Anthropic-Version", "2023-06-01")
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return "", statusError(resp)
	}
	var m messagesResponse
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&m); err != nil {
		return "", fmt.Errorf("llm API: decoding the answer: %w", err)
	}
	var text strings.Builder
	for _, b := range m.Content {
		if b.Type == "text" {
			text.WriteString(b.Text)
		}
	}
	return text.String(), nil
}

// nonEmpty drops a message with no content, so that an empty prompt makes
// an empty request, which the API refuses.
func nonEmpty(m message) []message {
	if m.Content == "" {
		return nil
	}
	return []message{m}
}

// StatusError is an answer from the API with a status other than 2xx.
type StatusError struct {
	// StatusCode is the HTTP status.
	StatusCode int
	// Message is the API's explanation, if its body had one.
	Message string
}

// Error returns "llm API: HTTP 503" and the API's message, if any.
func (e *StatusError) Error() string {
	s := "llm API: HTTP " + strconv.Itoa(e.StatusCode)
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// retryAfter carries a server's Retry-After to the retry policy, which asks
// every error for a RetryAfter() time.Duration method. It is a type of its
// own, rather than a method of StatusError, because the method's answer
// always replaces the backoff wait: an answer without the header must not
// have the method at all, or it would be retried at once.
type retryAfter struct {
	*StatusError
	after time.Duration
}

func (e *retryAfter) RetryAfter() time.Duration { return e.after }
func (e *retryAfter) Unwrap() error             { return e.StatusError }

// statusError reads a non-2xx answer into the error the client returns.
func statusError(resp *http.Response) error {
	se := &StatusError{StatusCode: resp.StatusCode}
	var body apiError
	if json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&body) == nil {
		se.Message = body.Error.Message
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10)) // so the connection is reused
	var err error = se
	if d, ok := parseRetryAfterMs(resp.Header.Get("Retry-After-Ms")); ok {
		err = &retryAfter{StatusError: se, after: d}
	} else if d, ok := parseRetryAfter(resp.Header.Get("Retry-After")); ok {
		err = &retryAfter{StatusError: se, after: d}
	}
	if c := resp.StatusCode; c/100 == 4 && c != http.StatusRequestTimeout && c != http.StatusTooManyRequests {
		return resilience.Permanent(err)
	}
	return err
}

// parseRetryAfterMs reads the retry-after-ms header LLM APIs send: a
// number of milliseconds.
func parseRetryAfterMs(v string) (time.Duration, bool) {
	ms, err := strconv.ParseFloat(v, 64)
	if err != nil || ms < 0 || ms > float64(time.Hour/time.Millisecond) {
		return 0, false
	}
	return time.Duration(ms * float64(time.Millisecond)), true
}

// parseRetryAfter reads a Retry-After header: a number of seconds or an
// HTTP date.
func parseRetryAfter(v string) (time.Duration, bool) {
	if v == "" {
		return 0, false
	}
	if secs, err := strconv.Atoi(v); err == nil && secs >= 0 {
		return time.Duration(secs) * time.Second, true
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(time.Until(t), 0), true
	}
	return 0, false
}

// isClientError reports whether err is the API refusing the request itself
// (a 4xx other than 408 and 429): the caller's fault, not the API's.
func isClientError(err error) bool {
	var se *StatusError
	if !errors.As(err, &se) {
		return false
	}
	c := se.StatusCode
	return c/100 == 4 && c != http.StatusRequestTimeout && c != http.StatusTooManyRequests
}

// describe names what went wrong, without anything that changes from run to
// run, such as the endpoint's port.
func describe(err error) string {
	var re *resilience.Error
	var se *StatusError
	var ra interface{ RetryAfter() time.Duration }
	switch {
	case errors.Is(err, resilience.ErrCircuitOpen):
		return "circuit open, the API was not called"
	case errors.Is(err, resilience.ErrRetryExhausted) && errors.As(err, &re) && re.RetryAfter() > maxRetryDelay:
		return fmt.Sprintf("the API asked to wait %v, longer than the retry waits; last: %s", re.RetryAfter(), describe(re.Cause))
	case errors.Is(err, resilience.ErrRetryExhausted) && errors.As(err, &re):
		return fmt.Sprintf("retries exhausted after %d attempts, last: %s", re.Attempts, describe(re.Cause))
	case errors.Is(err, resilience.ErrTimeout):
		return "timed out"
	case errors.Is(err, resilience.ErrBulkheadFull):
		return "bulkhead full"
	case errors.As(err, &ra) && errors.As(err, &se):
		return fmt.Sprintf("HTTP %d, Retry-After %v", se.StatusCode, ra.RetryAfter())
	case errors.As(err, &se):
		return fmt.Sprintf("HTTP %d", se.StatusCode)
	}
	return "transport error"
}

// The endpoint: just enough of the Messages API for the demo.

type messagesRequest struct {
	Model     string    `json:"model"`
	MaxTokens int       `json:"max_tokens"`
	Messages  []message `json:"messages"`
}

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type messagesResponse struct {
	ID         string         `json:"id"`
	Type       string         `json:"type"`
	Role       string         `json:"role"`
	Model      string         `json:"model"`
	Content    []contentBlock `json:"content"`
	StopReason string         `json:"stop_reason"`
}

type contentBlock struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

type apiError struct {
	Type  string `json:"type"`
	Error struct {
		Type    string `json:"type"`
		Message string `json:"message"`
	} `json:"error"`
}

// answers are the endpoint's replies, by prompt.
var answers = map[string]string{
	"What does a circuit breaker do?": "It stops calling a failing service for a while, so that it can recover and callers fail fast.",
	"What does a timeout protect?":    "The caller's own time: no attempt waits longer than its budget.",
	"Is the service back?":            "Yes: every policy is back to normal.",
}

func serveMessages(w http.ResponseWriter, r *http.Request) {
	var req messagesRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil {
		writeAPIError(w, http.StatusBadRequest, "invalid JSON body")
		return
	}
	if len(req.Messages) == 0 {
		writeAPIError(w, http.StatusBadRequest, "messages: at least one message is required")
		return
	}
	text, ok := answers[req.Messages[len(req.Messages)-1].Content]
	if !ok {
		text = "I have no answer to that."
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(messagesResponse{
		ID:         "msg_demo",
		Type:       "message",
		Role:       "assistant",
		Model:      req.Model,
		Content:    []contentBlock{{Type: "text", Text: text}},
		StopReason: "end_turn",
	})
}

func writeAPIError(w http.ResponseWriter, status int, msg string) {
	var e apiError
	e.Type = "error"
	e.Error.Type = "invalid_request_error"
	e.Error.Message = msg
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(e)
}
