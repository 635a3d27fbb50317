// Command prometheus serves the resilience metrics in Prometheus's text
// format, through OpenTelemetry's Prometheus exporter, while it calls a flaky
// downstream through resilience.Compose, so that every instrument of the
// package has data to show within a few seconds:
//
//	go run . -addr 127.0.0.1:9464
//	curl -s http://127.0.0.1:9464/metrics | grep ^resilience_
//
// The downstream is simulated in process and needs no network. It answers in
// 2 to 10ms, fails one call in ten, hangs past the timeouts one call in ten,
// answers slowly (55ms, within the timeouts) one call in ten,
// and is down altogether for 2s of every 8s, starting 1s in: the breakers
// open and close again (one on consecutive failures, one on its failure or
// slow-call ratio, and one in shadow mode, which only counts the calls it
// would have rejected), the retries succeed or give up, the retry budget
// runs out, the bulkhead queues and rejects, a rate limiter keeps the
// recommender's quota (its callers exceed it now and then: some attempts
// wait for a permit, a few are refused), and the fallbacks answer with a
// fixed value, a cached one and a stale one. A stock lookup is hedged: an
// attempt slow to answer gets a second one beside it, which usually wins,
// and now and then loses to the first. A completion fails over from a
// primary provider to a backup one, whose outages come at other times, so
// that the backup answers whenever the primary fails or its breaker is open.
//
// A search index slows down as calls pile into it, and four times as much
// while it reindexes, 5s to 7s into each cycle; its adaptive bulkhead
// finds the limit the index can take, so resilience.bulkhead.limit moves:
// up to 12, one per caller, while the index is fast, down to about half of
// that while it reindexes. And the program serves a storefront of its own,
// on another loopback port, guarded by resilience.Shed with a bulkhead of
// two slots: its shoppers ask for more than that, so page views (priority
// 0) are shed with 503 whenever no slot is free, and checkouts (priority
// 1), which wait briefly for a slot ahead of them, now and then
// (resilience.shed.rejections, by priority).
//
// A ledger and a webhook sender are called through a registry
// (ForService) capped at four policy sets (bounds.go): the ledger keys its
// breaker by tenant, and one tenant's broken integration keeps its key's
// breaker open (resilience.circuit_breaker.open_keys) while the others'
// calls go through; the sender delivers to four receivers at a time, named
// after their hosts, one more than the cap leaves room for, so that one
// delivers through the overflow set "other", and every 2s a receiver
// leaves for a new one, whose set evicts the idle one's
// (resilience.registry.evictions).
//
// dashboards/resilience.json at the root of the repository is a Grafana
// dashboard for these metrics; the test in this directory evaluates each of
// its queries against a real Prometheus scraping this program.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/resilience-go/resilience"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9464", "address to serve /metrics on")
	duration := flag.Duration("duration", 0, "how long to run; 0 runs until interrupted")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *duration)
		defer cancel()
	}
	ready := make(chan string, 1)
	printed := make(chan struct{})
	go func() {
		defer close(printed)
		for url := range ready {
			fmt.Printf("serving metrics at %s (Ctrl-C stops)\n", url)
		}
	}()
	err := run(ctx, *addr, ready)
	close(ready)
	<-printed
	if err != nil {
		fmt.Fprintln(os.Stderr, "prometheus:", err)
		os.Exit(1)
	}
}

// run serves /metrics on addr and calls the downstream until ctx is done. It
// sends the URL of /metrics on ready, if not nil, once it listens. It returns
// once every goroutine it started has ended, the calls the enforced timeout
// abandoned included.
func run(ctx context.Context, addr string, ready chan<- string) error {
	// A registry of our own rather than Prometheus's default one, so that
	// the example can run twice in one process (its tests do).
	reg := prometheus.NewRegistry()
	exporter, err := otelprom.New(otelprom.WithRegisterer(reg))
	if err != nil {
		return err
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter))
	defer mp.Shutdown(context.Background())
	resilience.SetMeterProvider(mp)
	defer resilience.SetMeterProvider(nil)

	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	if ready != nil {
		select {
		case ready <- "http://" + ln.Addr().String() + "/metrics":
		case <-ctx.Done():
		}
	}

	trafficErr := traffic(ctx)

	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return err
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return trafficErr
}

// The downstream's behaviour and the policies' settings. The timeouts are
// shorter than a hang, so a hanging call always times out; the breakers'
// open timeouts are shorter than an outage, so a breaker probes, opens
// again, and closes once the outage is over.
const (
	cycle       = 8 * time.Second        // the downstream's behaviour repeats
	outageStart = 1 * time.Second        // into each cycle
	outageEnd   = 3 * time.Second        // into each cycle
	hang        = 150 * time.Millisecond // how long a hanging call takes
	failShare   = 0.1                    // of calls outside an outage
	hangShare   = 0.1                    // of calls outside an outage
	pause       = 10 * time.Millisecond  // between one worker's calls
	slowCall    = 50 * time.Millisecond  // a slow success for the recommender's breaker
	slowShare   = 0.1                    // of calls outside an outage, answered in slowReply
	slowReply   = 55 * time.Millisecond  // above slowCall, below every timeout
	recLimit    = 70                     // the recommender's quota: attempts a second
	recBurst    = 4                      // attempts let through at once after a quiet spell
	recMaxWait  = 15 * time.Millisecond  // the longest an attempt waits for its permit
	stockDelay  = 20 * time.Millisecond  // the stock lookup's hedge delay: above a usual answer, below a slow one

	searchCost     = 4 * time.Millisecond  // while the index reindexes, a search's latency per call inside, itself included
	reindexStart   = 5 * time.Second       // into each cycle
	reindexEnd     = 7 * time.Second       // into each cycle
	searchTimeout  = 40 * time.Millisecond // reached while reindexing with 10 calls inside
	searchCallers  = 12                    // more than the index takes at once while it reindexes
	searchStart    = 4                     // the adaptive limit's start
	searchMaxLimit = searchCallers         // enough for every caller while the index is fast
)

// httpError is the downstream's failure: its type, *main.httpError, is the
// error.type attribute of the metrics.
type httpError struct{ code int }

func (e *httpError) Error() string { return "downstream: HTTP " + strconv.Itoa(e.code) }

// downstream is the flaky service. It is safe for concurrent use.
type downstream struct {
	start    time.Time
	inflight atomic.Int64 // calls running, those an enforced timeout abandoned included
}

func (d *downstream) down() bool {
	t := time.Since(d.start) % cycle
	return t >= outageStart && t < outageEnd
}

// call answers as the downstream does now. A cooperative call returns when
// ctx is done; one that is not (a legacy client) hangs for the whole hang.
func (d *downstream) call(ctx context.Context, cooperative bool, answer string) (string, error) {
	// Counted before ctx is checked, so that run, which waits for the count
	// to drop to zero once ctx is done, cannot miss a call that starts late.
	d.inflight.Add(1)
	defer d.inflight.Add(-1)
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if d.down() {
		return "", &httpError{http.StatusServiceUnavailable}
	}
	latency := time.Duration(2+rand.IntN(9)) * time.Millisecond
	var err error
	switch r := rand.Float64(); {
	case r < failShare:
		err = &httpError{http.StatusInternalServerError}
	case r < failShare+hangShare:
		latency = hang
	case r < failShare+hangShare+slowShare:
		latency = slowReply
	}
	if !cooperative {
		time.Sleep(latency)
		return answer, err
	}
	t := time.NewTimer(latency)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return "", ctx.Err()
	case <-t.C:
		return answer, err
	}
}

func (d *downstream) exchangeRate(ctx context.Context) (string, error) {
	return d.call(ctx, true, "1.08")
}

// searchIndex is a downstream that slows down as calls pile into it while
// it is busy, as a database does once every connection is: a search takes
// about 2ms however many calls are inside, but while the index reindexes,
// 2ms plus searchCost per call inside. It is safe for concurrent use.
type searchIndex struct {
	start  time.Time
	inside atomic.Int64
}

func (s *searchIndex) reindexing() bool {
	t := time.Since(s.start) % cycle
	return t >= reindexStart && t < reindexEnd
}

func (s *searchIndex) search(ctx context.Context) (string, error) {
	n := s.inside.Add(1)
	defer s.inside.Add(-1)
	latency := 2*time.Millisecond + rand.N(time.Millisecond)
	if s.reindexing() {
		latency += time.Duration(n) * searchCost
	}
	t := time.NewTimer(latency)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return "", ctx.Err()
	case <-t.C:
		return "3 results", nil
	}
}

// traffic calls the downstreams through eight protected functions, the
// ledger and the webhook receivers through a registry, and the storefront
// as its shoppers, until ctx is done, then waits for every call to end.
func traffic(ctx context.Context) error {
	d := &downstream{start: time.Now()}

	// The quote service: a breaker, a retry within a budget, a timeout, a
	// bulkhead too small for its four callers, and the last good quote.
	quoteBreaker, err := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{
		Name: "pricing", FailMax: 5, OpenTimeout: 500 * time.Millisecond,
		// A full bulkhead is our own contention, not the downstream's
		// failure: without this the breaker would open under load alone.
		IsFailure:      func(err error) bool { return !errors.Is(err, resilience.ErrBulkheadFull) },
		DisableLogging: true, // the metrics tell the story
	})
	if err != nil {
		return err
	}
	budget, err := resilience.NewRetryBudget(resilience.RetryBudgetConfig{
		Ratio: 0.1, MinPerSecond: 2, Window: 5 * time.Second,
	})
	if err != nil {
		return err
	}
	quoteRetry, err := resilience.NewRetry(resilience.RetryConfig{
		MaxAttempts: 3, InitialDelay: 5 * time.Millisecond, MaxDelay: 20 * time.Millisecond, Budget: budget,
	})
	if err != nil {
		return err
	}
	quoteBulkhead, err := resilience.NewBulkhead(resilience.BulkheadConfig{
		Name: "pricing-db", Limit: 2, MaxQueue: 2, MaxWait: 10 * time.Millisecond,
	})
	if err != nil {
		return err
	}
	quotes, err := resilience.NewFallbackCache[string](resilience.FallbackCacheConfig{})
	if err != nil {
		return err
	}
	getQuote := resilience.Compose(
		quotes.Record("quote", func(ctx context.Context) (string, error) { return d.call(ctx, true, "42.00 EUR") }),
		resilience.Stack[string]{
			Name: "get_quote", Operation: "db",
			CircuitBreaker: quoteBreaker, Retry: quoteRetry, Timeout: 100 * time.Millisecond,
			Bulkhead: quoteBulkhead, Fallback: quotes.Fallback("quote"),
		})

	// The recommendation service: a breaker, a retry, a rate limiter, a
	// timeout, and a fixed answer when all else fails. Its breaker opens
	// on ratios over a rolling second rather than on consecutive
	// failures: when half of the calls fail, which only an outage does (a
	// call fails outside one when both its attempts do), or when half of
	// them are slow, a success that took more than slowCall (each attempt
	// is timed on its own, so one in ten: the slow replies). Each failed
	// probe doubles the open period, up to 1.6s.
	recBreaker, err := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{
		Name: "recommender", FailureRatio: 0.5, MinimumThroughput: 20, SamplingWindow: time.Second,
		SlowCallDuration: slowCall, SlowCallRatio: 0.5,
		OpenTimeout: 400 * time.Millisecond, MaxOpenTimeout: 1600 * time.Millisecond,
		DisableLogging: true,
	})
	if err != nil {
		return err
	}
	recRetry, err := resilience.NewRetry(resilience.RetryConfig{
		MaxAttempts: 2, InitialDelay: 5 * time.Millisecond, MaxDelay: 10 * time.Millisecond,
	})
	if err != nil {
		return err
	}
	// The recommender's quota, which its two callers exceed while its
	// breaker is closed: an attempt waits up to recMaxWait for its permit
	// (about a third of them wait), or is refused at once (about one in
	// ten). A refusal asks for a wait longer than the retry's MaxDelay, so
	// it is not retried: the fallback answers. The breaker leaves out a
	// call refused on its first attempt, and counts one whose attempt had
	// failed at the downstream before its retry was refused, with
	// error.type rate_limited. A call the open breaker rejects spends no
	// permit.
	recLimiter, err := resilience.NewRateLimiter(resilience.RateLimiterConfig{
		Name: "recommender", Limit: recLimit, Burst: recBurst, MaxWait: recMaxWait,
	})
	if err != nil {
		return err
	}
	getRecommendations := resilience.Compose(
		func(ctx context.Context) (string, error) { return d.call(ctx, true, "personalised") },
		resilience.Stack[string]{
			Name: "get_recommendations", Operation: "http",
			CircuitBreaker: recBreaker, Retry: recRetry, RateLimiter: recLimiter, Timeout: 80 * time.Millisecond,
			Fallback: resilience.FallbackValue("bestsellers"),
		})

	// The profile service, through a legacy client that ignores its
	// context: the timeout is enforced, abandoning the calls that hang, and
	// the last good profile is served marked stale. Its breaker is a
	// shadow: thresholds on trial, it opens and closes as a breaker would,
	// but lets every call through, counting those it would have rejected.
	profileBreaker, err := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{
		Name: "profile", Shadow: true,
		FailureRatio: 0.5, MinimumThroughput: 10, SamplingWindow: time.Second,
		OpenTimeout: 500 * time.Millisecond, DisableLogging: true,
	})
	if err != nil {
		return err
	}
	profileRetry, err := resilience.NewRetry(resilience.RetryConfig{
		MaxAttempts: 2, InitialDelay: 5 * time.Millisecond, MaxDelay: 10 * time.Millisecond,
	})
	if err != nil {
		return err
	}
	profiles, err := resilience.NewFallbackCache[string](resilience.FallbackCacheConfig{})
	if err != nil {
		return err
	}
	getProfile := resilience.Compose(
		profiles.Record("profile", func(ctx context.Context) (string, error) { return d.call(ctx, false, "ada") }),
		resilience.Stack[string]{
			Name: "get_profile", Operation: "auth",
			CircuitBreaker: profileBreaker, Retry: profileRetry, Timeout: 60 * time.Millisecond, EnforceTimeout: true,
			Fallback: profiles.StaleFallback("profile"),
		})

	// The exchange rate, through FallbackCache.Wrap alone: its last good
	// value answers every failure. Its metrics are named after the method,
	// "main.(*downstream).exchangeRate-fm", as Wrap has no Stack.Name.
	rates, err := resilience.NewFallbackCache[string](resilience.FallbackCacheConfig{MaxAge: time.Minute})
	if err != nil {
		return err
	}
	getRate := rates.Wrap("EUR/USD", d.exchangeRate)

	// The stock lookup, hedged: an attempt with no answer after stockDelay
	// gets a second one beside it, and the first success wins, the other
	// being cancelled. A usual answer takes 2 to 10ms, so only the slow
	// replies and the hangs (one attempt in five) are hedged. The hedge
	// usually wins (hedged="true" in resilience.hedge.wins); when it fails
	// or is slow itself, a slow first attempt answers first
	// (hedged="false"). A round where both hang times out, and is retried.
	stockHedge, err := resilience.NewHedge(resilience.HedgeConfig{
		Name: "stock", Delay: stockDelay, MaxHedges: 1,
	})
	if err != nil {
		return err
	}
	stockRetry, err := resilience.NewRetry(resilience.RetryConfig{
		MaxAttempts: 2, InitialDelay: 5 * time.Millisecond, MaxDelay: 10 * time.Millisecond,
	})
	if err != nil {
		return err
	}
	getStock := resilience.Compose(
		func(ctx context.Context) (string, error) { return d.call(ctx, true, "12 in stock") },
		resilience.Stack[string]{
			Name: "get_stock", Operation: "db",
			Retry: stockRetry, Hedge: stockHedge, Timeout: 100 * time.Millisecond,
		})

	// The completion, from a primary provider or else a backup one, each
	// with its own policies, through Failover. The backup is a downstream
	// of its own, half a cycle out of step with the primary, so that their
	// outages never overlap: resilience.failover.used counts the answers by
	// index, 0 the primary's and 1 the backup's, which answers when the
	// primary fails (one call in five, and every call of its outage) or
	// when the primary's breaker is open and rejects the call at once.
	backup := &downstream{start: d.start.Add(-cycle / 2)}
	primaryBreaker, err := resilience.NewCircuitBreaker(resilience.CircuitBreakerConfig{
		Name: "completion-primary", FailMax: 5, OpenTimeout: 500 * time.Millisecond,
		DisableLogging: true,
	})
	if err != nil {
		return err
	}
	getCompletion := resilience.Failover(
		resilience.Compose(
			func(ctx context.Context) (string, error) { return d.call(ctx, true, "primary completion") },
			resilience.Stack[string]{
				Name: "get_completion", Operation: "llm",
				CircuitBreaker: primaryBreaker, Timeout: 80 * time.Millisecond,
			}),
		resilience.Compose(
			func(ctx context.Context) (string, error) { return backup.call(ctx, true, "backup completion") },
			resilience.Stack[string]{
				Name: "get_completion_backup", Operation: "llm", Timeout: 80 * time.Millisecond,
			}),
	)

	// The reviews, under a rehearsal that never ends: faults injected into
	// a fifth of the attempts (error.type "chaos") and a delay into another
	// fifth, as RESILIENCE_CHAOS and CHAOS_REVIEWS_* would in staging. The
	// retry and the fallback react as to a real outage, and
	// resilience.chaos.injected counts the faults by kind.
	reviewsRetry, err := resilience.NewRetry(resilience.RetryConfig{
		MaxAttempts: 2, InitialDelay: 2 * time.Millisecond, MaxDelay: 5 * time.Millisecond,
	})
	if err != nil {
		return err
	}
	getReviews := resilience.Compose(
		func(context.Context) (string, error) { return "4.5 stars", nil },
		resilience.Stack[string]{
			Name: "get_reviews", Operation: "db", Retry: reviewsRetry, Timeout: 50 * time.Millisecond,
			Chaos:    resilience.ChaosConfig{ErrorRate: 0.2, LatencyRate: 0.2, Latency: 5 * time.Millisecond},
			Fallback: resilience.FallbackValue("no reviews yet"),
		})

	// The search, through an adaptive bulkhead: its limit starts at
	// searchStart and follows the index. While the index is fast, the
	// latency does not grow with the calls inside, and the limit grows to
	// let every caller in. While it reindexes, the latency climbs with each
	// call let in, and with 10 calls inside a search runs past its timeout,
	// an overload signal: the gradient shrinks the limit to about half,
	// and the callers beyond it queue for a slot (or time out there,
	// rejected by the bulkhead).
	idx := &searchIndex{start: d.start}
	searchBulkhead, err := resilience.NewBulkhead(resilience.BulkheadConfig{
		Name: "search-index", Limit: searchStart,
		Adaptive: &resilience.AdaptiveConfig{MinLimit: 2, MaxLimit: searchMaxLimit},
	})
	if err != nil {
		return err
	}
	search := resilience.Compose(idx.search, resilience.Stack[string]{
		Name: "search", Operation: "db", Bulkhead: searchBulkhead, Timeout: searchTimeout,
	})

	// The storefront, this service's own inbound side, and its shoppers:
	// three viewing pages and two checking out.
	shop, err := openStorefront()
	if err != nil {
		return err
	}

	// The ledger and the webhooks, through a registry capped at
	// regMaxServices policy sets (bounds.go): a tenant's breaker of its
	// own, names past the cap sharing the set "other", and idle ones
	// evicted. The ledger posts one entry first, so that it has its set
	// before the receivers fill the registry.
	reg, err := boundedRegistry()
	if err != nil {
		return err
	}
	defer reg.Close()
	var ledger []resilience.Func[string]
	for _, tenant := range []string{"acme", "globex", brokenTenant} {
		ledger = append(ledger, ledgerEntry(reg, d, tenant))
	}
	_, _ = ledger[0](ctx)

	var wg sync.WaitGroup
	worker := func(call resilience.Func[string]) {
		wg.Go(func() {
			t := time.NewTimer(pause)
			defer t.Stop()
			for ctx.Err() == nil {
				// Every error is in the metrics; a stale profile is
				// an answer too.
				_, _ = call(ctx)
				t.Reset(pause)
				select {
				case <-ctx.Done():
				case <-t.C:
				}
			}
		})
	}
	for range 4 {
		worker(getQuote)
	}
	for range 2 {
		worker(getRecommendations)
	}
	worker(getProfile)
	worker(getRate)
	for range 2 {
		worker(getStock)
	}
	worker(getCompletion)
	worker(getReviews)
	for range searchCallers {
		worker(search)
	}
	for _, post := range ledger {
		worker(post)
	}
	for slot := range hookActive {
		worker(webhook(reg, d.start, slot))
	}
	for range 3 {
		worker(shop.visit("/"))
	}
	for range 2 {
		worker(shop.visit("/checkout"))
	}
	wg.Wait()

	// The calls the enforced timeout abandoned end within a hang.
	for d.inflight.Load() > 0 || backup.inflight.Load() > 0 {
		time.Sleep(5 * time.Millisecond)
	}
	return shop.close()
}
