package main

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"time"

	"github.com/resilience-go/resilience"
)

// The storefront's settings. Its shoppers ask for more than two slots can
// serve: page views are shed whenever both slots are taken or a checkout
// waits, and a checkout waits at most shopMaxWait, behind at most one
// other, so that now and then one is shed too.
const (
	shopLimit   = 2                     // requests served at once
	shopQueue   = 2                     // checkouts waiting for a slot, at most
	shopMaxWait = 10 * time.Millisecond // the longest a checkout waits
	shopWorkMin = 4 * time.Millisecond  // a request's work takes
	shopWorkMax = 12 * time.Millisecond // from shopWorkMin to shopWorkMax
)

// shopPriority ranks a storefront request by its path: a checkout is a
// sale, worth a wait for a slot; a page view (priority 0) is not, and is
// shed at once when no slot is free.
func shopPriority(r *http.Request) int {
	if r.URL.Path == "/checkout" {
		return 1
	}
	return 0
}

// storefront is the service's own inbound side: an HTTP server on a
// loopback port, guarded by resilience.Shed, and the client its shoppers
// call it with. Shed requests are counted in resilience.shed.rejections,
// by priority; the bulkhead's gauges show under resource_type
// "storefront".
type storefront struct {
	url    string
	srv    *http.Server
	served chan error
	client *http.Client
	tr     *http.Transport
}

// openStorefront starts the storefront on a free loopback port.
func openStorefront() (*storefront, error) {
	b, err := resilience.NewBulkhead(resilience.BulkheadConfig{
		Name: "storefront", Limit: shopLimit, MaxQueue: shopQueue, MaxWait: shopMaxWait,
	})
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	h := resilience.Shed(http.HandlerFunc(serveShop), resilience.ShedConfig{
		Bulkhead: b, Priority: shopPriority, RetryAfter: time.Second,
	})
	// A connection per shopper, kept for the next request.
	tr := &http.Transport{MaxIdleConnsPerHost: 8}
	s := &storefront{
		url:    "http://" + ln.Addr().String(),
		srv:    &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second},
		served: make(chan error, 1),
		client: &http.Client{Transport: tr},
		tr:     tr,
	}
	go func() { s.served <- s.srv.Serve(ln) }()
	return s, nil
}

// serveShop is a page or a checkout: a few milliseconds of work.
func serveShop(w http.ResponseWriter, r *http.Request) {
	work := shopWorkMin + rand.N(shopWorkMax-shopWorkMin)
	t := time.NewTimer(work)
	defer t.Stop()
	select {
	case <-r.Context().Done():
		return // the shopper left
	case <-t.C:
	}
	_, _ = io.WriteString(w, "ok\n")
}

// visit returns a shopper's request for path, which fails with the
// *httpError of a 503 when the storefront shed it.
func (s *storefront) visit(path string) resilience.Func[string] {
	u := s.url + path
	return func(ctx context.Context) (string, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return "", err
		}
		resp, err := s.client.Do(req)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body) // to the end, so the connection is reused
		if err != nil {
			return "", err
		}
		if resp.StatusCode != http.StatusOK {
			return "", &httpError{resp.StatusCode}
		}
		return string(body), nil
	}
}

// close shuts the storefront down once its shoppers have stopped.
func (s *storefront) close() error {
	s.tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	if served := <-s.served; !errors.Is(served, http.ErrServerClosed) {
		err = errors.Join(err, served)
	}
	return err
}
