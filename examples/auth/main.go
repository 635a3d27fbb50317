// Command auth shows fail-closed and fail-open permission checks against an
// authorization service that goes down.
//
// It starts an endpoint shaped like OpenFGA's Check API
// (POST /stores/{store_id}/check, answering {"allowed": true}) on 127.0.0.1
// and checks two permissions through one registry's policies for the
// "openfga" service: the breaker, the retry, the timeout and the bulkhead of
// resilience.ForService.
//
//   - The admin check ("may alice administer the organization?") is wrapped
//     with resilience.FailClosed: when openfga cannot answer, it denies.
//   - The read check ("may alice view a document?") is low-risk and wrapped
//     with resilience.FailOpen: when openfga cannot answer, it allows.
//
// Midway the endpoint answers 503 to every request for a while. The demo
// prints what each check returned and why, the breaker's own log records of
// its transitions, and the breaker's state after each call. What it prints
// is the same on every run:
//
//	go run ./examples/auth
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/resilience-go/resilience"
	"github.com/resilience-go/resilience/internal/term"
)

func main() {
	if err := run(os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "auth:", err)
		os.Exit(1)
	}
}

// storeID is the store the checks ask about.
const storeID = "01JDEMOSTORE"

// openTimeout is how long the breaker stays open. The demo sleeps a little
// longer than this whenever it waits for the breaker, and everything else it
// does takes milliseconds, so a loaded machine does not change the output.
const openTimeout = 200 * time.Millisecond

// environment is the registry's configuration, as a service would set it in
// its environment: the breaker opens after 2 failed calls for openTimeout,
// each call makes up to 3 attempts 5ms apart, and each attempt has 1s.
var environment = map[string]string{
	"RETRY_MAX_ATTEMPTS":               "3",
	"RETRY_EXPONENTIAL_MAX":            "5ms",
	"RETRY_JITTER":                     "false",
	"TIMEOUT_OPENFGA":                  "1s",
	"CIRCUIT_BREAKER_OPENFGA_FAIL_MAX": "2",
	"CIRCUIT_BREAKER_OPENFGA_TIMEOUT":  openTimeout.String(),
}

// check is one permission check and what happened on its last call.
type check struct {
	label, policy string
	tuple         TupleKey
	call          resilience.Func[bool] // protected
	attempts      int                   // requests made by the last call
	lastErr       error                 // the error of its last request
	fromFGA       int                   // calls openfga answered
	fromFallback  int                   // calls the fallback answered
}

// run plays the demo and writes its account to w.
func run(w io.Writer) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	color := term.IsTerminal(w)

	fga, err := startFGA(map[TupleKey]bool{
		{User: "user:alice", Relation: "admin", Object: "organization:acme"}: true,
		{User: "user:alice", Relation: "viewer", Object: "document:roadmap"}: true,
	})
	if err != nil {
		return err
	}
	defer fga.Close()
	transport := &http.Transport{}
	defer transport.CloseIdleConnections()
	client := &Client{BaseURL: fga.URL, StoreID: storeID, HTTP: &http.Client{Transport: transport}}

	cfg, err := resilience.LoadConfigWith(resilience.LoadOptions{Environment: environment})
	if err != nil {
		return err
	}
	// The breaker's slog records of its transitions are part of the story:
	// send them to w, indented and without their timestamps so that the
	// output is the same on every run.
	bc := cfg.CircuitBreakerConfig("openfga")
	bc.Logger = slog.New(slog.NewTextHandler(&indent{w: w, prefix: "    log: "}, &slog.HandlerOptions{
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		},
	}))
	cfg.CircuitBreakers[resilience.EnvKey("openfga")] = bc
	reg, err := resilience.NewRegistry(cfg)
	if err != nil {
		return err
	}
	breaker := reg.CircuitBreaker("openfga")

	admin := &check{label: "admin", policy: "fail-closed",
		tuple: TupleKey{User: "user:alice", Relation: "admin", Object: "organization:acme"}}
	read := &check{label: "read", policy: "fail-open",
		tuple: TupleKey{User: "user:alice", Relation: "viewer", Object: "document:roadmap"}}
	// Each protected check is built once and shared by every call. Both go
	// through the one "openfga" breaker: it protects the service, whichever
	// check is asking.
	admin.call = resilience.FailClosed(resilience.ForService(reg, "openfga", admin.raw(client)))
	read.call = resilience.FailOpen(resilience.ForService(reg, "openfga", read.raw(client)))

	fmt.Fprintln(w, "resilience demo: permission checks against an OpenFGA-like service")
	fmt.Fprintf(w, "admin check: may %s be %s of %s? fail-closed: denied when openfga cannot answer\n",
		admin.tuple.User, admin.tuple.Relation, admin.tuple.Object)
	fmt.Fprintf(w, "read check:  may %s be %s of %s? fail-open: allowed when openfga cannot answer\n",
		read.tuple.User, read.tuple.Relation, read.tuple.Object)
	fmt.Fprintf(w, "policies: breaker \"openfga\" (shared by both checks) opens after %d failed calls for %v; %d attempts per call\n",
		cfg.CircuitBreakerConfig("openfga").FailMax, openTimeout, cfg.Retry.MaxAttempts)

	calls := 0
	step := func() {
		calls++
		fmt.Fprintf(w, "call %d\n", calls)
		for _, c := range []*check{admin, read} {
			c.do(ctx, w, breaker, color)
		}
	}
	wait := func() {
		fmt.Fprintln(w, "\n-- waiting for the breaker's open timeout")
		time.Sleep(openTimeout + openTimeout/4)
	}

	fmt.Fprintln(w, "\n-- openfga is up")
	step()
	fmt.Fprintln(w, "\n-- outage: openfga answers 503 to every request")
	fga.down.Store(true)
	step() // both checks fail after their retries: the breaker opens
	step() // rejected by the open breaker, openfga is not called
	wait()
	step() // the admin check is the probe, it fails: open again
	fmt.Fprintln(w, "\n-- openfga recovers")
	fga.down.Store(false)
	step() // still open: the breaker has not seen the recovery yet
	wait()
	step() // the probe succeeds: closed
	step()

	fmt.Fprintln(w, "\nsummary")
	for _, c := range []*check{admin, read} {
		answer := "denied"
		if c.policy == "fail-open" {
			answer = "allowed"
		}
		fmt.Fprintf(w, "  %-5s check, %-12s %d calls answered by openfga, %d %s by the fallback\n",
			c.label, c.policy+":", c.fromFGA, c.fromFallback, answer)
	}
	fmt.Fprintf(w, "  openfga: %d requests, %d answered\n", fga.requests.Load(), fga.answered.Load())
	fmt.Fprintf(w, "  breaker \"openfga\": %s\n", term.Paint(breaker.State(), color))
	return nil
}

// raw returns the unprotected check, counting its requests so that the demo
// can say what happened.
func (c *check) raw(client *Client) resilience.Func[bool] {
	return func(ctx context.Context) (bool, error) {
		c.attempts++
		allowed, err := client.Check(ctx, c.tuple)
		c.lastErr = err
		return allowed, err
	}
}

// do makes one call of the check and reports it.
func (c *check) do(ctx context.Context, w io.Writer, breaker *resilience.CircuitBreaker, color bool) {
	c.attempts, c.lastErr = 0, nil
	allowed, err := c.call(ctx)
	if err != nil {
		// FailOpen and FailClosed answer every failure but the caller's
		// own cancellation.
		fmt.Fprintf(w, "  %-5s -> error: %v\n", c.label, err)
		return
	}
	var why string
	switch {
	case c.attempts > 0 && c.lastErr == nil:
		c.fromFGA++
		why = "openfga answered"
		if c.attempts > 1 {
			why += " after " + strconv.Itoa(c.attempts) + " attempts"
		}
	case c.attempts == 0:
		c.fromFallback++
		why = c.policy + " fallback: the breaker is open, openfga was not called"
	default:
		c.fromFallback++
		why = c.policy + " fallback: " + strconv.Itoa(c.attempts) + " attempts failed, last: " + describe(c.lastErr)
	}
	fmt.Fprintf(w, "  %-5s -> %-5t (%s); breaker %s\n", c.label, allowed, why, term.Paint(breaker.State(), color))
}

// describe says what went wrong in a request, without what changes from run
// to run (addresses, ports).
func describe(err error) string {
	var se *StatusError
	if errors.As(err, &se) {
		return "HTTP " + strconv.Itoa(se.StatusCode)
	}
	if errors.Is(err, resilience.ErrTimeout) {
		return "timed out"
	}
	return "transport error"
}

// TupleKey is the relationship a check asks about, as OpenFGA spells it.
type TupleKey struct {
	User     string `json:"user"`
	Relation string `json:"relation"`
	Object   string `json:"object"`
}

// Client is a minimal client of OpenFGA's Check API.
type Client struct {
	// BaseURL is the API's address, such as "http://127.0.0.1:8080".
	BaseURL string
	// StoreID is the store the checks ask about.
	StoreID string
	// HTTP makes the requests.
	HTTP *http.Client
}

// Check asks whether the relationship tk holds. An answer other than 200 is
// a *StatusError.
func (c *Client) Check(ctx context.Context, tk TupleKey) (bool, error) {
	body, err := json.Marshal(struct {
		TupleKey TupleKey `json:"tuple_key"`
	}{tk})
	if err != nil {
		return false, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.BaseURL+"/stores/"+c.StoreID+"/check", bytes.NewReader(body))
	if err != nil {
		return false, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10)) // so the connection is reused
		return false, &StatusError{StatusCode: resp.StatusCode}
	}
	var out struct {
		Allowed bool `json:"allowed"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return false, fmt.Errorf("openfga: decoding the answer: %w", err)
	}
	return out.Allowed, nil
}

// StatusError is an answer of the Check API other than 200 OK.
type StatusError struct {
	StatusCode int
}

// Error says which status the API answered.
func (e *StatusError) Error() string {
	return "openfga: HTTP " + strconv.Itoa(e.StatusCode) + " " + http.StatusText(e.StatusCode)
}

// Retryable tells resilience.IsRetryable that a server error or a 429 is
// worth another attempt, and that any other status, the caller's mistake, is
// not.
func (e *StatusError) Retryable() bool {
	return e.StatusCode >= 500 || e.StatusCode == http.StatusTooManyRequests
}

// fgaServer is the stand-in for OpenFGA: it answers checks from a fixed set
// of relationships, or 503 while down is set.
type fgaServer struct {
	URL      string
	down     atomic.Bool
	requests atomic.Int64
	answered atomic.Int64
	tuples   map[TupleKey]bool
	srv      *http.Server
	done     chan struct{}
}

// startFGA serves the Check API on a loopback port.
func startFGA(tuples map[TupleKey]bool) (*fgaServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	f := &fgaServer{URL: "http://" + ln.Addr().String(), tuples: tuples, done: make(chan struct{})}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /stores/{store_id}/check", f.check)
	f.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		defer close(f.done)
		f.srv.Serve(ln)
	}()
	return f, nil
}

func (f *fgaServer) check(w http.ResponseWriter, r *http.Request) {
	f.requests.Add(1)
	w.Header().Set("Content-Type", "application/json")
	if f.down.Load() {
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, `{"code":"unavailable","message":"service unavailable"}`)
		return
	}
	if r.PathValue("store_id") != storeID {
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, `{"code":"store_id_not_found","message":"store not found"}`)
		return
	}
	var req struct {
		TupleKey TupleKey `json:"tuple_key"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&req); err != nil ||
		req.TupleKey.User == "" || req.TupleKey.Relation == "" || req.TupleKey.Object == "" {
		w.WriteHeader(http.StatusBadRequest)
		io.WriteString(w, `{"code":"validation_error","message":"tuple_key needs user, relation and object"}`)
		return
	}
	f.answered.Add(1)
	json.NewEncoder(w).Encode(map[string]bool{"allowed": f.tuples[req.TupleKey]})
}

// Close stops the server and waits for it.
func (f *fgaServer) Close() error {
	err := f.srv.Close()
	<-f.done
	return err
}

// indent writes each line written to it to w with prefix before it. The
// breaker's logger writes one record per Write.
type indent struct {
	w      io.Writer
	prefix string
}

func (p *indent) Write(b []byte) (int, error) {
	var out []byte
	for line := range bytes.Lines(b) {
		out = append(out, p.prefix...)
		out = append(out, line...)
	}
	if _, err := p.w.Write(out); err != nil {
		return 0, err
	}
	return len(b), nil
}
