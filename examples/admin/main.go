// Command admin is a service that mounts resilience.AdminHandler, for people
// on call and the resilience CLI, on a listener of its own.
//
// The service calls two downstreams through resilience.ForService, ten times
// a second: "pricing", which is healthy, and "inventory", which answers 503
// from the 1st to the 6th second of every 10, so that its breaker opens,
// probes, opens again and closes. Meanwhile, from another terminal:
//
//	go run ./examples/admin
//	go run ./cmd/resilience -addr http://127.0.0.1:9090 breakers
//	go run ./cmd/resilience -addr http://127.0.0.1:9090 open inventory
//	go run ./cmd/resilience -addr http://127.0.0.1:9090 reset inventory
//
// It stops after -duration (30s by default; 0 runs until interrupted).
//
// # Why the admin endpoint has a listener of its own
//
// The admin endpoint changes how the service treats its dependencies: anyone
// who can reach it can force a breaker closed and send traffic to a
// downstream that is down, or force it open and cut the service off. It has
// no authentication of its own. So it is not mounted on the mux of the
// service's public port, where a routing mistake or a proxy rule would
// expose it; it gets its own http.Server on a loopback address, which only
// processes on the same host (or an operator's SSH tunnel or kubectl
// port-forward) can reach. This example refuses an -addr that is not a
// loopback address.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/resilience-go/resilience"
	"github.com/resilience-go/resilience/internal/term"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9090", "loopback `address` of the admin endpoint")
	duration := flag.Duration("duration", 30*time.Second, "how long to run; 0 runs until interrupted")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *duration)
		defer cancel()
	}
	if err := run(ctx, *addr, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "admin:", err)
		os.Exit(1)
	}
}

// The service's rhythm: a call to each downstream every tick, inventory down
// for ticks 10 to 59 of every 100.
const (
	tick       = 100 * time.Millisecond
	cycle      = 100
	outageFrom = 10
	outageTo   = 60
)

// environment is the registry's configuration, as the service's environment
// would give it.
var environment = map[string]string{
	"RETRY_MAX_ATTEMPTS":                 "2",
	"RETRY_EXPONENTIAL_MAX":              "20ms",
	"TIMEOUT_INVENTORY":                  "500ms",
	"TIMEOUT_PRICING":                    "500ms",
	"CIRCUIT_BREAKER_INVENTORY_FAIL_MAX": "3",
	"CIRCUIT_BREAKER_INVENTORY_TIMEOUT":  "2s",
	"BULKHEAD_INVENTORY_LIMIT":           "4",
	"BULKHEAD_PRICING_LIMIT":             "4",
}

// run serves the admin endpoint on addr, which must be a loopback address,
// and calls the downstreams until ctx is done. It writes the endpoint's
// address (the line "admin endpoint: http://...") and what happens to w. It
// returns nil when ctx is done.
func run(ctx context.Context, addr string, w io.Writer) error {
	color := term.IsTerminal(w)
	cfg, err := resilience.LoadConfigWith(resilience.LoadOptions{Environment: environment})
	if err != nil {
		return err
	}
	// The demo reports the breakers' states itself, below; a real service
	// would keep their slog records.
	cfg.DefaultCircuitBreaker.DisableLogging = true
	for k, bc := range cfg.CircuitBreakers {
		bc.DisableLogging = true
		cfg.CircuitBreakers[k] = bc
	}
	reg, err := resilience.NewRegistry(cfg)
	if err != nil {
		return err
	}

	down, err := startDownstream()
	if err != nil {
		return err
	}
	defer down.Close()

	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("admin endpoint: %w", err)
	}
	if tcp, ok := ln.Addr().(*net.TCPAddr); !ok || !tcp.IP.IsLoopback() {
		ln.Close()
		return fmt.Errorf("%s is not a loopback address: the admin endpoint must not be reachable from other hosts", ln.Addr())
	}
	admin := &http.Server{Handler: resilience.AdminHandler(reg), ReadHeaderTimeout: 5 * time.Second}
	served := make(chan error, 1)
	go func() { served <- admin.Serve(ln) }()
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if admin.Shutdown(sctx) != nil {
			admin.Close()
		}
		<-served
	}()

	url := "http://" + ln.Addr().String()
	fmt.Fprintf(w, "admin endpoint: %s (loopback only)\n", url)
	fmt.Fprintln(w, "drive it from another terminal:")
	for _, c := range []string{"breakers", "bulkheads", "open inventory", "close inventory", "reset inventory"} {
		fmt.Fprintf(w, "  go run ./cmd/resilience -addr %s %s\n", url, c)
	}
	fmt.Fprintf(w, "calling pricing and inventory every %v; inventory is down from %v to %v of every %v\n",
		tick, outageFrom*tick, outageTo*tick, cycle*tick)

	transport := &http.Transport{}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport}
	// Each protected call is built once and used on every tick.
	stock := resilience.ForService(reg, "inventory", func(ctx context.Context) (int, error) {
		body, err := get(ctx, client, down.URL+"/inventory/sku-42")
		if err != nil {
			return 0, err
		}
		return strconv.Atoi(body)
	})
	price := resilience.ForService(reg, "pricing", func(ctx context.Context) (string, error) {
		return get(ctx, client, down.URL+"/pricing/sku-42")
	})

	type view struct {
		state  resilience.State
		forced bool
	}
	watched := []string{"inventory", "pricing"}
	last := map[string]view{}
	for _, name := range watched {
		last[name] = view{state: resilience.StateClosed}
	}
	var ok, failed, rejected int

	t := time.NewTicker(tick)
	defer t.Stop()
	for n := 0; ; n++ {
		if outage := n%cycle >= outageFrom && n%cycle < outageTo; outage != down.failing.Load() {
			down.failing.Store(outage)
			if outage {
				fmt.Fprintln(w, "downstream inventory: down, answering 503")
			} else {
				fmt.Fprintln(w, "downstream inventory: up")
			}
		}
		for _, err := range []error{second(stock(ctx)), second(price(ctx))} {
			switch {
			case err == nil:
				ok++
			case errors.Is(err, resilience.ErrCircuitOpen), errors.Is(err, resilience.ErrBulkheadFull):
				rejected++
			default:
				failed++
			}
		}
		for _, name := range watched {
			cb := reg.CircuitBreaker(name)
			v := view{cb.State(), cb.Forced()}
			if v == last[name] {
				continue
			}
			last[name] = v
			note := ""
			if v.forced {
				note = ", forced until reset"
			}
			fmt.Fprintf(w, "breaker %s: %s%s\n", name, term.Paint(v.state, color), note)
		}

		select {
		case <-ctx.Done():
			fmt.Fprintf(w, "stopping: %d calls succeeded, %d failed, %d rejected by a breaker or bulkhead\n", ok, failed, rejected)
			return nil
		case err := <-served:
			served <- err // for the deferred shutdown
			return fmt.Errorf("admin endpoint: %w", err)
		case <-t.C:
		}
	}
}

// second returns the error of a (value, error) pair.
func second[T any](_ T, err error) error { return err }

// get fetches url and returns its body; an answer other than 200 is an
// error.
func get(ctx context.Context, client *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: HTTP %d", req.URL.Path, resp.StatusCode)
	}
	return string(body), nil
}

// downstream serves the two downstreams on a loopback port; inventory
// answers 503 while failing is set.
type downstream struct {
	URL     string
	failing atomic.Bool
	srv     *http.Server
	done    chan struct{}
}

func startDownstream() (*downstream, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	d := &downstream{URL: "http://" + ln.Addr().String(), done: make(chan struct{})}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /inventory/{sku}", func(w http.ResponseWriter, r *http.Request) {
		if d.failing.Load() {
			http.Error(w, "inventory database unavailable", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "17")
	})
	mux.HandleFunc("GET /pricing/{sku}", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "EUR 12.50")
	})
	d.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		defer close(d.done)
		d.srv.Serve(ln)
	}()
	return d, nil
}

// Close stops the downstreams and waits for them.
func (d *downstream) Close() error {
	err := d.srv.Close()
	<-d.done
	return err
}
