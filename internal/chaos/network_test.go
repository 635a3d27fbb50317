package chaos

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
)

// The registry of the network scenarios, as a service would load it from
// its environment: three attempts with waits of at most 20ms, a 50ms
// timeout per attempt, and a breaker that opens after 3 failed calls for
// 200ms.
const (
	netService     = "chaos"
	netAttempts    = 3
	netFailMax     = 3
	netTimeout     = 50 * time.Millisecond
	netOpenTimeout = 200 * time.Millisecond
)

var netEnv = map[string]string{
	"RESILIENCE_ENABLED":             "true",
	"RETRY_MAX_ATTEMPTS":             "3",
	"RETRY_EXPONENTIAL_MAX":          "20ms",
	"TIMEOUT_CHAOS":                  "50ms",
	"CIRCUIT_BREAKER_CHAOS_FAIL_MAX": "3",
	"CIRCUIT_BREAKER_CHAOS_TIMEOUT":  "200ms",
	"BULKHEAD_CHAOS_LIMIT":           "8",
}

// counting is a RoundTripper that counts the attempts that reach it.
type counting struct {
	base http.RoundTripper
	n    atomic.Int64
}

func (c *counting) RoundTrip(r *http.Request) (*http.Response, error) {
	c.n.Add(1)
	return c.base.RoundTrip(r)
}

// protectedClient returns an http.Client whose every request goes through
// resilience.Transport with a registry loaded from netEnv, the counter of
// the attempts that reach the network, and the registry.
func protectedClient(t *testing.T) (*http.Client, *counting, *resilience.Registry) {
	t.Helper()
	cfg, err := resilience.LoadConfigWith(resilience.LoadOptions{Environment: netEnv})
	if err != nil {
		t.Fatalf("LoadConfigWith: %v", err)
	}
	reg, err := resilience.NewRegistry(cfg)
	if err != nil {
		t.Fatalf("NewRegistry: %v", err)
	}
	base := &http.Transport{DisableCompression: true}
	t.Cleanup(base.CloseIdleConnections)
	c := &counting{base: base}
	return &http.Client{Transport: &resilience.Transport{
		Base: c, Registry: reg, Service: func(*http.Request) string { return netService },
	}}, c, reg
}

// bareGet sends one request with a fresh plain transport and returns its
// error, as the network and net/http make it.
func bareGet(url string) (time.Duration, error) {
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	start := time.Now()
	resp, err := (&http.Client{Transport: tr, Timeout: 300 * time.Millisecond}).Get(url)
	if err == nil {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	return time.Since(start), err
}

// TestNetworkFaults: faults on the wire, through Toxiproxy in front of the
// downstream and through the downstream's own listener, against an
// http.Client with resilience.Transport. For each: how IsRetryable
// classifies the error net/http returns, how many attempts each call made,
// that the breaker counted the failures and opened after FailMax calls,
// and that calls succeed again once the fault is gone.
func TestNetworkFaults(t *testing.T) {
	for _, tc := range []struct {
		name string
		// inject starts the fault and returns the URL to call and the
		// function that ends it.
		inject func(t *testing.T, d *Downstream, p *Proxy) (url string, heal func())
		// want is what the caller's final error must match.
		want error
		// retryable is IsRetryable's verdict on the bare error; bareOK
		// says the bare request, with its 300ms timeout, succeeds.
		retryable, bareOK bool
		// attempts is how many attempts a call makes.
		attempts int64
	}{
		{
			name: "reset_peer",
			inject: func(t *testing.T, d *Downstream, p *Proxy) (string, func()) {
				must(t, p.Add(Toxic{Name: "reset", Type: "reset_peer", Stream: "upstream", Attributes: map[string]any{"timeout": 0}}))
				return p.URL(), func() { must(t, p.Remove("reset")) }
			},
			want: syscall.ECONNRESET, retryable: true, attempts: netAttempts,
		},
		{
			name: "downstream_reset",
			inject: func(t *testing.T, d *Downstream, p *Proxy) (string, func()) {
				d.Set(Fault{ResetRate: 1})
				return d.URL(), func() { d.Set(Fault{}) }
			},
			want: syscall.ECONNRESET, retryable: true, attempts: netAttempts,
		},
		{
			name: "refused",
			inject: func(t *testing.T, d *Downstream, p *Proxy) (string, func()) {
				d.Set(Fault{Refuse: true})
				return d.URL(), func() { d.Set(Fault{}) }
			},
			want: syscall.ECONNREFUSED, retryable: true, attempts: netAttempts,
		},
		{
			// The downstream drops the connection, and the proxy holds
			// the close back for 200ms: the attempt's timeout ends the
			// wait first, and the timeout is retried.
			name: "slow_close",
			inject: func(t *testing.T, d *Downstream, p *Proxy) (string, func()) {
				must(t, p.Add(Toxic{Name: "slow", Type: "slow_close", Stream: "downstream", Attributes: map[string]any{"delay": 200}}))
				d.Set(Fault{ResetRate: 1})
				return p.URL(), func() { d.Set(Fault{}); must(t, p.Remove("slow")) }
			},
			// The bare error is *url.Error{EOF}: a connection closed
			// before the answer, retryable (see
			// TestComposeRetriesEOFThroughHTTPClient).
			want: resilience.ErrTimeout, retryable: true, attempts: netAttempts,
		},
		{
			// The proxy swallows every byte and never answers. The bare
			// client's own Timeout is the caller's deadline, which
			// IsRetryable rightly does not retry; the library's per-attempt
			// timeout is retried.
			name: "timeout",
			inject: func(t *testing.T, d *Downstream, p *Proxy) (string, func()) {
				must(t, p.Add(Toxic{Name: "blackhole", Type: "timeout", Stream: "upstream", Attributes: map[string]any{"timeout": 0}}))
				return p.URL(), func() { must(t, p.Remove("blackhole")) }
			},
			want: resilience.ErrTimeout, retryable: false, attempts: netAttempts,
		},
		{
			// 100ms each way: slower than the 50ms per attempt, not
			// than the bare client's 300ms.
			name: "latency",
			inject: func(t *testing.T, d *Downstream, p *Proxy) (string, func()) {
				must(t, p.Add(Toxic{Name: "slow", Type: "latency", Stream: "downstream", Attributes: map[string]any{"latency": 100, "jitter": 10}}))
				return p.URL(), func() { must(t, p.Remove("slow")) }
			},
			want: resilience.ErrTimeout, bareOK: true, attempts: netAttempts,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := startDownstream(t)
			p, err := NewProxy("chaos-"+tc.name, d.Addr())
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			client, attempts, reg := protectedClient(t)
			cb := reg.CircuitBreaker(netService)

			url, heal := tc.inject(t, d, p)
			bareTook, bareErr := bareGet(url)

			// FailMax calls, each retried to the end, open the breaker.
			var lastErr error
			var perCall []int64
			var consecutive []uint32 // the breaker's count after each call
			callsToOpen := 0
			for cb.State() == resilience.StateClosed {
				if callsToOpen == 10 {
					t.Fatalf("breaker still closed after 10 failing calls")
				}
				before := attempts.n.Load()
				resp, err := client.Get(url)
				if err == nil {
					resp.Body.Close()
					t.Fatalf("call %d succeeded during the fault (%s)", callsToOpen+1, resp.Status)
				}
				lastErr = err
				perCall = append(perCall, attempts.n.Load()-before)
				consecutive = append(consecutive, cb.Counts().ConsecutiveFailures)
				callsToOpen++
			}
			if callsToOpen != netFailMax {
				t.Errorf("calls to open the breaker = %d; want FAIL_MAX = %d", callsToOpen, netFailMax)
			}
			if !errors.Is(lastErr, tc.want) {
				t.Errorf("caller's error = %v; want one matching %v", lastErr, tc.want)
			}
			for i, n := range perCall {
				if n != tc.attempts {
					t.Errorf("call %d made %d attempts; want %d", i+1, n, tc.attempts)
				}
			}
			before := attempts.n.Load()
			_, err = client.Get(url)
			if !errors.Is(err, resilience.ErrCircuitOpen) {
				t.Errorf("call while open: %v; want ErrCircuitOpen", err)
			}
			if n := attempts.n.Load() - before; n != 0 {
				t.Errorf("call while open made %d attempts; want 0", n)
			}

			// The fault ends: after OpenTimeout one probe closes the
			// breaker, on the same port for a refused listener.
			heal()
			healed := time.Now()
			var closedAfter time.Duration
			if !waitFor(2*time.Second, func() bool {
				if cb.State() != resilience.StateHalfOpen {
					return false
				}
				resp, err := client.Get(url)
				if err != nil {
					return false
				}
				resp.Body.Close()
				closedAfter = time.Since(healed)
				return cb.State() == resilience.StateClosed
			}) {
				t.Fatalf("breaker %v 2s after the fault ended", cb.State())
			}

			classified := resilience.IsRetryable(bareErr)
			var verdict any = classified
			if bareErr == nil {
				verdict = "n/a (no error)"
			}
			if (bareErr == nil) != tc.bareOK {
				t.Errorf("bare request: %v; want it to fail: %v", bareErr, !tc.bareOK)
			} else if bareErr != nil && classified != tc.retryable {
				t.Errorf("IsRetryable(%v) = %v; want %v", bareErr, classified, tc.retryable)
			}
			report(t, "network/"+tc.name,
				"bare_error", fmt.Sprint(bareErr),
				"bare_error_took", bareTook,
				"is_retryable", verdict,
				"attempts_per_call", perCall,
				"calls_to_open", callsToOpen,
				"caller_error", fmt.Sprint(lastErr),
				"closed_after_heal", closedAfter,
				"downstream_requests", d.Stats().Received,
				"consecutive_failures_counted", consecutive,
			)
		})
	}
}

// TestNetworkFaultsRawTCP: the same faults without HTTP. A raw TCP client
// (an HTTP/1.0 request written by hand, the status line read back) is
// protected by a plain Compose: the reset and the refused connection are
// retried by IsRetryable, and the breaker counts them.
func TestNetworkFaultsRawTCP(t *testing.T) {
	d := startDownstream(t)
	p, err := NewProxy("chaos-tcp", d.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	addr := p.Addr()

	var dials atomic.Int64
	raw := func(ctx context.Context) (string, error) {
		dials.Add(1)
		var dialer net.Dialer
		conn, err := dialer.DialContext(ctx, "tcp", addr)
		if err != nil {
			return "", err
		}
		defer conn.Close()
		stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
		defer stop()
		if _, err := io.WriteString(conn, "GET / HTTP/1.0\r\nHost: chaos\r\n\r\n"); err != nil {
			return "", err
		}
		line, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil {
			if ctx.Err() != nil {
				return "", fmt.Errorf("%w: %w", ctx.Err(), err)
			}
			return "", err
		}
		return strings.TrimSpace(line), nil
	}
	cb, err := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{Name: "chaos-tcp", FailMax: netFailMax, OpenTimeout: netOpenTimeout})
	if err != nil {
		t.Fatal(err)
	}
	var retried []string
	rt, err := resilience.NewRetry(resilience.RetryConfig{
		MaxAttempts: netAttempts, InitialDelay: 5 * time.Millisecond, MaxDelay: 20 * time.Millisecond,
		OnRetry: func(_ int, err error, _ time.Duration) { retried = append(retried, errorName(err)) },
	})
	if err != nil {
		t.Fatal(err)
	}
	call := resilience.Compose(raw, resilience.Stack[string]{
		Name: "chaos.tcp", CircuitBreaker: cb, Retry: rt, Timeout: 100 * time.Millisecond,
	})
	if line, err := call(context.Background()); err != nil || !strings.HasPrefix(line, "HTTP/1.0 200") {
		t.Fatalf("healthy call: %q, %v", line, err)
	}

	for _, fault := range []struct {
		name   string
		inject func()
		heal   func()
		want   error
	}{
		{"reset_peer",
			func() {
				must(t, p.Add(Toxic{Name: "reset", Type: "reset_peer", Stream: "upstream", Attributes: map[string]any{"timeout": 0}}))
			},
			func() { must(t, p.Remove("reset")) },
			syscall.ECONNRESET},
		{"refused",
			func() { p.p.Stop() },
			func() { must(t, p.p.Start()) },
			syscall.ECONNREFUSED},
	} {
		retried = retried[:0]
		fault.inject()
		dials.Store(0)
		var lastErr error
		calls := 0
		for cb.State() == resilience.StateClosed && calls < 10 {
			_, lastErr = call(context.Background())
			calls++
		}
		if calls != netFailMax {
			t.Errorf("%s: calls to open the breaker = %d; want %d", fault.name, calls, netFailMax)
		}
		if !errors.Is(lastErr, fault.want) || !errors.Is(lastErr, resilience.ErrRetryExhausted) {
			t.Errorf("%s: error %v; want %v after retries exhausted", fault.name, lastErr, fault.want)
		}
		if got, want := dials.Load(), int64(netFailMax*netAttempts); got != want {
			t.Errorf("%s: %d attempts; want %d", fault.name, got, want)
		}
		var e *resilience.Error
		errors.As(lastErr, &e)
		attemptsMade := dials.Load()
		fault.heal()
		healed := time.Now()
		if !waitFor(2*time.Second, func() bool {
			_, err := call(context.Background())
			return err == nil && cb.State() == resilience.StateClosed
		}) {
			t.Fatalf("%s: breaker %v 2s after the fault ended", fault.name, cb.State())
		}
		report(t, "network_tcp/"+fault.name,
			"caller_error", fmt.Sprint(lastErr),
			"retried_errors", strings.Join(retried, ","),
			"calls_to_open", calls,
			"attempts", attemptsMade,
			"attempts_in_error", e.Attempts,
			"closed_after_heal", time.Since(healed),
		)
	}
}

func errorName(err error) string {
	switch {
	case errors.Is(err, syscall.ECONNRESET):
		return "ECONNRESET"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "ECONNREFUSED"
	case errors.Is(err, resilience.ErrTimeout):
		return "timeout"
	}
	return fmt.Sprintf("%T", err)
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestComposeRetriesEOFThroughHTTPClient: a connection closed before the
// answer (a downstream that restarts, a proxy whose upstream is gone) comes
// back from http.Client as *url.Error{Err: io.EOF}. IsRetryable(io.EOF) is
// true, but IsRetryable of the same error wrapped by http.Client is false:
// *url.Error has a Temporary method, which forwards to io.EOF's (it has
// none) and so says false, and IsRetryable believes it. A Compose around
// http.Client.Do therefore does not retry it; resilience.Transport, which
// sees the error before http.Client wraps it, does.
func TestComposeRetriesEOFThroughHTTPClient(t *testing.T) {
	d := startDownstream(t, Phase{Name: "refusing", Fault: Fault{Refuse: true}})
	p, err := NewProxy("chaos-eof", d.Addr()) // accepts, finds no upstream, closes
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	client := newClient(t, time.Second)
	rt, err := resilience.NewRetry(resilience.RetryConfig{MaxAttempts: 3, InitialDelay: time.Millisecond, MaxDelay: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	var attempts atomic.Int64
	call := resilience.Compose(func(ctx context.Context) (Result, error) {
		attempts.Add(1)
		return doGet(ctx, client, p.URL())
	}, resilience.Stack[Result]{Name: "chaos.eof", Retry: rt})
	_, err = call(context.Background())
	// The proxy closes the connection: the client reads EOF, or a reset
	// when the close races its write, or, when a retry picked up a pooled
	// connection the proxy had already closed, net/http's unexported
	// "server closed idle connection" (seen under -race).
	if !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) &&
		(err == nil || !strings.Contains(err.Error(), "http: server closed idle connection")) {
		t.Fatalf("error %v; want io.EOF or a reset from the closed connection", err)
	}
	if got := attempts.Load(); got != 3 {
		t.Errorf("%d attempts on %v; want 3: a connection closed before the answer is worth retrying", got, err)
	}
	if wrapped := (&url.Error{Op: "Get", URL: "http://x", Err: io.EOF}); resilience.IsRetryable(wrapped) != resilience.IsRetryable(io.EOF) {
		t.Errorf("IsRetryable(%v) = %v, IsRetryable(io.EOF) = %v: http.Client's wrapper changes the verdict",
			wrapped, resilience.IsRetryable(wrapped), resilience.IsRetryable(io.EOF))
	}
}
