// Command llm shows the resilience policies protecting a client of an LLM
// API: a circuit breaker, a retry, a timeout per attempt, a bulkhead and a
// fallback, stacked with resilience.Compose.
//
// It needs no network: it starts an endpoint shaped like Anthropic's
// Messages API (POST /v1/messages) on 127.0.0.1, through internal/flaky,
// which is overloaded for a while (529 and 503), answers one request too
// late, and then recovers.
//
// A second part paces the client as an LLM provider's limits require: four
// callers share a rate limiter of requests and one of tokens (Stack.
// RateLimiter, TokenLimiter, Tokens and TokensUsed), each call taking its
// estimated tokens before it is sent and settling them with the usage the
// endpoint reports; then a document too long for one call is refused at
// once, and sent in halves, the second waiting for the tokens the first took.
//
// The demo prints what each policy did, and what it prints is the same on
// every run:
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
	"sync"
	"time"
	"unicode"

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

	return paced(ctx, w, client)
}

// The second part's limits: an LLM provider's limits of requests and of
// tokens, scaled from a minute down to a second.
const (
	requestsPerSecond = 5
	requestBurst      = 2
	tokensPerSecond   = 600 // also the token limiter's burst, its default
	expectedOutput    = 50  // tokens an answer is expected to take, in the estimate
	totalTimeout      = 2 * time.Second
	// waited tells a wait for a permit from the time a call takes to get
	// through a limiter that has one free: the limits make every wait in
	// the demo much longer.
	waited = 80 * time.Millisecond
)

// pacedPrompts are what each of the second part's callers asks, in turn.
var pacedPrompts = [][]string{
	{"What is a token bucket?", "Why pace requests instead of retrying 429s?"},
	{"What does a rate limit per minute mean?", "How are tokens counted?"},
	{"Why estimate the tokens before the call?", "What if the answer is longer than the estimate?"},
	{"What is the burst of a limiter?", "What does a total timeout bound?"},
}

// summarise starts a prompt that asks for a summary of a document.
const summarise = "Summarise this incident timeline:\n"

// timeline is the long document of the second part: too many tokens for
// one call, sent in two halves.
func timeline() []string {
	lines := make([]string, 36)
	for i := range lines {
		lines[i] = fmt.Sprintf("02:%02d: the primary database still refused connections; the API answered 503 to %d%% of requests.\n", 10+i, 90-2*i)
	}
	return lines
}

// estimateTokens is the client's estimate of what a prompt will cost: a
// token per 4 bytes of the prompt, the usual rule of thumb, and the answer
// it expects. The API's count, in the answer, settles the difference.
func estimateTokens(prompt string) int {
	return (len(prompt)+3)/4 + expectedOutput
}

// pacedCall is one call of the second part, and what happened to it.
type pacedCall struct {
	prompt string
	// queued: the call began; permitted: it had its request permit (the
	// stack asked for its token estimate); started: it had its tokens and
	// the API was called. Zero if it did not happen.
	queued, permitted, started time.Time
	estimate                   int
	reply                      Reply
	err                        error
}

// waitedForRequest and waitedForTokens say which limiter made the call wait.
func (c *pacedCall) waitedForRequest() bool { return c.permitted.Sub(c.queued) > waited }
func (c *pacedCall) waitedForTokens() bool {
	return !c.started.IsZero() && c.started.Sub(c.permitted) > waited
}

// paced plays the second part: callers sharing a limit of requests and of
// tokens per second, as an LLM provider sets them.
func paced(ctx context.Context, w io.Writer, client *Client) error {
	requests, err := resilience.NewRateLimiter(resilience.RateLimiterConfig{
		Name: "llm-requests", Limit: requestsPerSecond, Burst: requestBurst,
	})
	if err != nil {
		return err
	}
	tokens, err := resilience.NewRateLimiter(resilience.RateLimiterConfig{
		Name: "llm-tokens", Limit: tokensPerSecond,
	})
	if err != nil {
		return err
	}
	// The limiters are shared by every call; the stack is built per call,
	// around the call's prompt.
	send := func(ctx context.Context, c *pacedCall) {
		c.estimate = estimateTokens(c.prompt)
		c.queued = time.Now()
		c.reply, c.err = resilience.Compose(func(ctx context.Context) (Reply, error) {
			c.started = time.Now()
			return client.Message(ctx, c.prompt)
		}, resilience.Stack[Reply]{
			Name:         "llm-paced",
			RateLimiter:  requests, // one permit per attempt
			TokenLimiter: tokens,   // the estimate before each attempt...
			Tokens: func(context.Context) int {
				if c.permitted.IsZero() { // (asked after the request permit: the demo notes when)
					c.permitted = time.Now()
				}
				return c.estimate
			},
			TokensUsed:   func(r Reply) int { return r.Usage.Total() }, // ...settled with the API's count
			Timeout:      attemptTimeout,
			TotalTimeout: totalTimeout, // the waits for permits included
		})(ctx)
	}

	fmt.Fprintf(w, "\npaced calls: %d callers share limits of %d requests per second (burst %d) and %d tokens per second; a total timeout of %v per call\n",
		len(pacedPrompts), requestsPerSecond, requestBurst, tokensPerSecond, totalTimeout)
	fmt.Fprintf(w, "  estimate: a token per 4 bytes of prompt and %d for the answer; the API's count of what was used settles it\n", expectedOutput)

	calls := make([][]*pacedCall, len(pacedPrompts))
	var wg sync.WaitGroup
	start := time.Now()
	for i, prompts := range pacedPrompts {
		calls[i] = make([]*pacedCall, len(prompts))
		wg.Go(func() {
			for j, p := range prompts {
				c := &pacedCall{prompt: p}
				send(ctx, c)
				calls[i][j] = c
			}
		})
	}
	// Once the burst is spent and its calls are done, every caller waits
	// for its next permit. The state is watched for, not slept for: a
	// fixed sleep could read it before the burst's calls ended, or after
	// the next permit.
	interval := time.Second / requestsPerSecond
	st := requests.Stats()
	for deadline := time.Now().Add(interval / 2); (st.Granted < requestBurst || st.Waiting < len(pacedPrompts)) && time.Now().Before(deadline); st = requests.Stats() {
		time.Sleep(time.Millisecond)
	}
	fmt.Fprintf(w, "  once the burst is spent: %d requests sent, %d callers waiting for a request permit\n", st.Granted, st.Waiting)
	wg.Wait()

	// In a fixed order, whatever order the callers ran in.
	var perInterval []int
	waitedRequest, waitedTokens, n := 0, 0, 0
	for i, cs := range calls {
		for _, c := range cs {
			n++
			if c.err != nil {
				fmt.Fprintf(w, "  caller %d, %q: error: %s\n", i+1, c.prompt, describe(c.err))
				continue
			}
			fmt.Fprintf(w, "  caller %d, %q: %s\n", i+1, c.prompt, settled(c))
			k := int(c.started.Sub(start) / interval)
			for len(perInterval) <= k {
				perInterval = append(perInterval, 0)
			}
			perInterval[k]++
			if c.waitedForRequest() {
				waitedRequest++
			}
			if c.waitedForTokens() {
				waitedTokens++
			}
		}
	}
	fmt.Fprintf(w, "  requests sent per %v: %s\n", interval, strings.Trim(fmt.Sprint(perInterval), "[]"))
	busiest := 0
	for k := range perInterval {
		sum := 0
		for _, m := range perInterval[k:min(k+requestsPerSecond, len(perInterval))] {
			sum += m
		}
		busiest = max(busiest, sum)
	}
	verdict := "within"
	if busiest > requestsPerSecond+requestBurst {
		verdict = "BEYOND"
	}
	fmt.Fprintf(w, "  busiest second: %d requests, %s the %d per second plus the burst of %d\n", busiest, verdict, requestsPerSecond, requestBurst)
	fmt.Fprintf(w, "  %d of %d calls waited for a request permit, %d for tokens\n", waitedRequest, n, waitedTokens)

	// A document too long for one call: its estimate is more than the
	// token limiter ever holds, so it is refused at once rather than
	// waited for. Its halves fit, but the second has to wait for the
	// tokens the first took.
	lines := timeline()
	half := len(lines) / 2
	doc := []*pacedCall{
		{prompt: summarise + strings.Join(lines, "")},
		{prompt: summarise + strings.Join(lines[:half], "")},
		{prompt: summarise + strings.Join(lines[half:], "")},
	}
	fmt.Fprintf(w, "\na long document: an incident timeline of %d lines, %d bytes\n", len(lines), len(doc[0].prompt))
	for i, c := range doc {
		send(ctx, c)
		what := [...]string{"whole", "first half", "second half"}[i]
		switch {
		case c.err != nil && c.started.IsZero():
			fmt.Fprintf(w, "  %s: estimated %d tokens: %s; the API was not called\n", what, c.estimate, describe(c.err))
		case c.err != nil:
			fmt.Fprintf(w, "  %s: error: %s\n", what, describe(c.err))
		case c.waitedForTokens():
			fmt.Fprintf(w, "  %s: waited for the tokens the first half took; %s\n", what, settled(c))
		default:
			fmt.Fprintf(w, "  %s: %s\n", what, settled(c))
		}
	}

	rs, ts := requests.Stats(), tokens.Stats()
	fmt.Fprintln(w, "\npaced summary")
	fmt.Fprintf(w, "  request limiter %q: granted %d, rejected %d, waiting %d\n", requests.Name(), rs.Granted, rs.Rejected, rs.Waiting)
	fmt.Fprintf(w, "  token limiter %q: granted %d, rejected %d, waiting %d\n", tokens.Name(), ts.Granted, ts.Rejected, ts.Waiting)
	return nil
}

// settled says what a successful call was estimated at and what it used.
func settled(c *pacedCall) string {
	used := c.reply.Usage.Total()
	s := fmt.Sprintf("estimated %d tokens, used %d", c.estimate, used)
	switch d := used - c.estimate; {
	case d > 0:
		s += fmt.Sprintf(" (%d charged)", d)
	case d < 0:
		s += fmt.Sprintf(" (%d given back)", -d)
	}
	return s
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
	r, err := c.Message(ctx, prompt)
	return r.Text, err
}

// Reply is an answer of the API: its text, and the tokens the API says the
// call used.
type Reply struct {
	Text  string
	Usage Usage
}

// Usage is the usage object of a Messages answer.
type Usage struct {
	InputTokens  int `json:"input_tokens"`
	OutputTokens int `json:"output_tokens"`
}

// Total is what the call counts against a limit of tokens per minute.
func (u Usage) Total() int { return u.InputTokens + u.OutputTokens }

// Message is Complete with the tokens the API counted: what a token limiter
// is settled with.
func (c *Client) Message(ctx context.Context, prompt string) (Reply, error) {
	body, err := json.Marshal(messagesRequest{
		Model:     "demo-model",
		MaxTokens: 256,
		Messages:  nonEmpty(message{Role: "user", Content: prompt}),
	})
	if err != nil {
		return Reply{}, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.BaseURL+"/v1/messages", bytes.NewReader(body))
	if err != nil {
		return Reply{}, resilience.Permanent(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Anthropic-Version", "2023-06-01")
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return Reply{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return Reply{}, statusError(resp)
	}
	var m messagesResponse
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&m); err != nil {
		return Reply{}, fmt.Errorf("llm API: decoding the answer: %w", err)
	}
	var text strings.Builder
	for _, b := range m.Content {
		if b.Type == "text" {
			text.WriteString(b.Text)
		}
	}
	return Reply{Text: text.String(), Usage: m.Usage}, nil
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
	case errors.Is(err, resilience.ErrRateLimited) && errors.As(err, &re) && re.RetryAfter() < 0:
		return fmt.Sprintf("refused at once by rate limiter %q, which never holds that many", re.Name)
	case errors.Is(err, resilience.ErrRateLimited):
		return "rate limited"
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
	Usage      Usage          `json:"usage"`
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

	"What is a token bucket?":                     "A bucket that refills at a steady rate; each call takes permits from it, and waits when it is empty.",
	"Why pace requests instead of retrying 429s?": "A 429 spends a request and a round trip to learn what the client could have counted itself.",
	"What does a rate limit per minute mean?":     "That the provider counts your requests and tokens over each minute, and refuses what goes over.",
	"How are tokens counted?": "By the provider's tokenizer, for the prompt and for the answer: a word is often one token, " +
		"a long or rare one several, and every punctuation mark counts too, so a client can only estimate before the call.",
	"Why estimate the tokens before the call?": "So that the call waits for its tokens before it is sent, not after a refusal.",
	"What if the answer is longer than the estimate?": "Then the call used more tokens than the limiter took for it. The difference is charged to the limiter, " +
		"which goes into debt: the calls after it wait until the debt is paid back at the limiter's rate. So the estimate " +
		"need only be right on average; the count in each answer keeps the limiter honest.",
	"What is the burst of a limiter?":  "How many permits it grants at once after a quiet spell.",
	"What does a total timeout bound?": "The whole call: its attempts, the waits between them and the waits for permits.",
}

// summary is the endpoint's answer to a request for a summary.
const summary = "The primary database refused connections from 02:10; the share of requests answered 503 fell steadily as it recovered."

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
	prompt := req.Messages[len(req.Messages)-1].Content
	text, ok := answers[prompt]
	switch {
	case ok:
	case strings.HasPrefix(prompt, summarise):
		text = summary
	default:
		text = "I have no answer to that."
	}
	input := 0
	for _, m := range req.Messages {
		input += countTokens(m.Content)
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(messagesResponse{
		ID:         "msg_demo",
		Type:       "message",
		Role:       "assistant",
		Model:      req.Model,
		Content:    []contentBlock{{Type: "text", Text: text}},
		StopReason: "end_turn",
		Usage:      Usage{InputTokens: input, OutputTokens: countTokens(text)},
	})
}

// countTokens is the endpoint's tokenizer: a token per word, number and
// punctuation mark. Like a real one, it does not count as the client's
// estimate does.
func countTokens(s string) int {
	n, inWord := 0, false
	for _, r := range s {
		switch {
		case unicode.IsLetter(r) || unicode.IsDigit(r):
			if !inWord {
				n++
			}
			inWord = true
		case unicode.IsSpace(r):
			inWord = false
		default:
			n++
			inWord = false
		}
	}
	return n
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
