// Package redisstore shares the state of resilience policies across the
// replicas of a service through Redis: when one replica's circuit breaker
// opens, every replica's opens; a half-open probe is sent by one replica, not
// all; a bulkhead's GlobalLimit caps the calls in flight in the whole
// fleet; and a service's RATE_LIMIT_<SVC>_GLOBAL_REQUESTS or _GLOBAL_TOKENS
// is one rate limit for the whole fleet (see [Store.GlobalRateLimiter]).
//
// A blank import is all the wiring a service needs:
//
//	import _ "github.com/resilience-go/resilience/redisstore"
//
// and, in the environment,
//
//	RESILIENCE_REDIS_URL=redis://redis:6379/0
//	BULKHEAD_LLM_GLOBAL_LIMIT=10   # optional: a fleet-wide cap
//
// The package's init registers the "redis" and "rediss" schemes with
// [resilience.RegisterStore], so [resilience.Default] and
// [resilience.NewRegistry] open a [Store] from the URL. A service that builds
// its own client uses [New] and [resilience.Registry.UseStore] instead.
//
// # What stays local
//
// Nothing is held across a call: there is no distributed lock around calls,
// and a closed breaker's calls never touch Redis. Redis is asked on a call
// path only when a half-open probe is about to go out, when a bulkhead
// with a GlobalLimit takes a slot and when a fleet-wide rate limit gives a
// permit, each bounded by [Options.OpTimeout]. When
// Redis is slow or down, every replica keeps working on its local breakers
// and bulkheads (a probe is allowed; a global cap falls back to the
// replica's fair share of it, never to no cap), says so once in its log,
// and re-converges when Redis answers again. README.md, beside this file,
// has the design, the guarantees with the tests that hold them, and the
// measurements.
package redisstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/resilience-go/resilience"
)

func init() {
	resilience.RegisterStore("redis", open)
	resilience.RegisterStore("rediss", open)
}

// Options configures a [Store]. The zero value of each field means its
// documented default; a negative duration also means the default.
type Options struct {
	// KeyPrefix is put before every Redis key and channel name, so that
	// several services, or several environments, can share one Redis.
	// "" means "resilience:".
	KeyPrefix string

	// SyncInterval is how often each replica reads the shared breaker
	// states, as a fallback to the pub/sub messages that normally bring a
	// change within a round trip, and checks whether an unreachable Redis is
	// back. 0 means 1s.
	SyncInterval time.Duration

	// OpTimeout bounds every Redis round trip made on a call path: asking
	// for the half-open probe, taking a global bulkhead slot and a permit
	// of a fleet-wide rate limit. A call never waits longer than this for
	// Redis; a global slot not confirmed within it is taken from the
	// replica's fair share of the limit. 0 means 50ms.
	OpTimeout time.Duration

	// LeaseTTL is how long a global bulkhead slot outlives the replica that
	// holds it: a replica that dies mid-call frees its slots after at most
	// this long. A live replica renews the slots of its calls in flight
	// every LeaseTTL/3, so calls may run longer. It is also how long a
	// replica that stopped is still counted among the live replicas that
	// share a global limit when Redis is slow or down. 0 means 30s.
	LeaseTTL time.Duration

	// ProbeTTL is how long the half-open probe lock lasts when the replica
	// that holds it does not release it (it died, or its probe outlasts
	// ProbeTTL): then another replica may probe. 0 means 5s.
	ProbeTTL time.Duration

	// Logger receives a record when Redis becomes unreachable (once per
	// outage, at Warn) and when it is back (at Info). nil means
	// slog.Default().
	Logger *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.KeyPrefix == "" {
		o.KeyPrefix = "resilience:"
	}
	if o.SyncInterval <= 0 {
		o.SyncInterval = time.Second
	}
	if o.OpTimeout <= 0 {
		o.OpTimeout = 50 * time.Millisecond
	}
	if o.LeaseTTL <= 0 {
		o.LeaseTTL = 30 * time.Second
	}
	if o.ProbeTTL <= 0 {
		o.ProbeTTL = 5 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// Store shares breaker state, global bulkhead slots and fleet-wide rate
// limits through Redis. It implements [resilience.Store],
// [resilience.RateStore] and [resilience.ExpiringStore]. It is safe for
// concurrent use by multiple goroutines. Build it with [New], or let a
// registry open it from RESILIENCE_REDIS_URL; the zero value is not usable.
//
// Every key it writes expires, and each write pushes the expiry back, so
// that Redis holds only the names the fleet used lately, not every host or
// tenant it ever saw: a breaker's state the idle period ([Store.SetIdle],
// 10 minutes unless the registry says otherwise) after its last change, or
// when its open ends if that is later; a probe lock after ProbeTTL; a
// resource's leases and heartbeats when the last of them expires (LeaseTTL
// after its last renewal); a rate limit when it is back to full. What it
// holds in memory for a name goes when the registry evicts the name
// ([Store.Evicted]). README.md lists the keys.
type Store struct {
	client    redis.UniversalClient
	ownClient bool // opened from a URL: Close closes it
	opts      Options
	id        string // this replica, in leases, probe locks and published states
	channel   string // where breaker changes are published
	bgTimeout time.Duration

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine the store started
	life   sync.RWMutex   // orders track's wg.Add before Close's wg.Wait
	closed atomic.Bool
	ps     *redis.PubSub

	// down is set while Redis is unreachable: call paths then skip it.
	down  atomic.Bool
	fails atomic.Int32 // round trips failed in a row

	events   chan event    // local transitions, for the worker to publish
	msgs     chan *message // changes published by other replicas
	resync   chan struct{} // asks the worker to poll now
	releases chan leaseRef // global slots to give back
	// unsent holds the releases Redis did not take (down, or an error),
	// sent again with the next that go out: a release dropped would hold
	// its slot of the global cap until LeaseTTL, with nothing in flight.
	unsentMu sync.Mutex
	unsent   []leaseRef
	// gone holds the heartbeats of evicted limiters, for the lease keeper
	// to remove, so that the other replicas' fair shares grow at once.
	gone     []goneRef
	beat     chan struct{} // asks the lease keeper to renew now: a limiter is new
	flush    chan struct{} // asks the lease keeper to remove the heartbeats gone now
	leaseSeq atomic.Uint64 // makes lease ids unique

	// idle is how long a name may go unused before the registry evicts
	// it (SetIdle): what the keys the store writes expire after.
	idle atomic.Int64

	mu       sync.Mutex
	breakers map[*resilience.CircuitBreaker]*breaker
	byKey    map[string][]*breaker // by EnvKey of the breaker's name
	limiters map[string]*limiter   // by EnvKey of the resource
	// draining holds the limiters evicted while their calls held leases:
	// those are renewed until given back, and then the limiter is dropped.
	draining map[*limiter]struct{}
}

var _ resilience.Store = (*Store)(nil)

// New returns a Store that shares state through client, and starts its
// background work: a publisher of local transitions, a subscriber to the
// other replicas' transitions, a poll every SyncInterval, and the renewal
// and release of global bulkhead slots. Close stops it; it does not close
// client.
//
// Call paths bound their wait for Redis with OpTimeout themselves, so any
// client works; one built with ContextTimeoutEnabled also stops its own
// work on the store's deadlines instead of at its ReadTimeout.
func New(client redis.UniversalClient, opts Options) *Store {
	opts = opts.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	s := &Store{
		client:    client,
		opts:      opts,
		id:        replicaID(),
		channel:   opts.KeyPrefix + "breakers",
		bgTimeout: max(opts.SyncInterval, opts.OpTimeout),
		ctx:       ctx,
		cancel:    cancel,
		events:    make(chan event, 256),
		msgs:      make(chan *message, 256),
		resync:    make(chan struct{}, 1),
		releases:  make(chan leaseRef, 1024),
		beat:      make(chan struct{}, 1),
		flush:     make(chan struct{}, 1),
		breakers:  map[*resilience.CircuitBreaker]*breaker{},
		byKey:     map[string][]*breaker{},
		limiters:  map[string]*limiter{},
		draining:  map[*limiter]struct{}{},
	}
	s.idle.Store(int64(defaultIdle))
	// Subscribing with no channel does no I/O: the subscriber goroutine
	// subscribes, so that New never waits for Redis.
	s.ps = client.Subscribe(ctx)
	s.wg.Add(3)
	go s.worker()
	go s.subscriber()
	go s.leaseKeeper()
	return s
}

// open is the driver registered for redis:// and rediss://. Besides the
// go-redis parameters, the URL may set the store's own: key_prefix,
// sync_interval, op_timeout, lease_ttl and probe_ttl (durations in seconds
// or as Go durations, as elsewhere in resilience).
func open(rawURL string) (resilience.Store, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		// url.Parse's error quotes the URL, password included.
		return nil, urlError(rawURL, "not a valid URL")
	}
	q := u.Query()
	var opts Options
	if v, ok := q["key_prefix"]; ok {
		opts.KeyPrefix = v[len(v)-1]
		q.Del("key_prefix")
	}
	for name, d := range map[string]*time.Duration{
		"sync_interval": &opts.SyncInterval,
		"op_timeout":    &opts.OpTimeout,
		"lease_ttl":     &opts.LeaseTTL,
		"probe_ttl":     &opts.ProbeTTL,
	} {
		v, ok := q[name]
		if !ok {
			continue
		}
		q.Del(name)
		if *d, err = resilience.ParseDuration(v[len(v)-1]); err != nil || *d <= 0 {
			return nil, urlError(rawURL, name+" must be a positive duration")
		}
	}
	u.RawQuery = q.Encode()
	ropts, err := redis.ParseURL(u.String())
	if err != nil {
		return nil, urlError(rawURL, err.Error())
	}
	// Let the store's deadlines stop the client's work, not only the
	// caller's wait for it.
	ropts.ContextTimeoutEnabled = true
	s := New(redis.NewClient(ropts), opts)
	s.ownClient = true
	openStores.Add(1)
	return s, nil
}

// openStores counts the stores opened from a URL and not yet closed, for
// the tests.
var openStores atomic.Int64

func urlError(rawURL, why string) error {
	// Never echo a password into logs.
	if u, err := url.Parse(rawURL); err == nil {
		rawURL = u.Redacted()
	} else {
		rawURL = "(unparsable URL)"
	}
	return &resilience.VarError{Var: "RESILIENCE_REDIS_URL", Value: rawURL, Reason: why}
}

func replicaID() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	host, _ := os.Hostname()
	host = strings.Map(func(r rune) rune {
		if r <= ' ' || r == ':' || r > '~' {
			return '_'
		}
		return r
	}, host)
	if host == "" {
		host = "host"
	}
	return fmt.Sprintf("%s-%d-%s", host, os.Getpid(), hex.EncodeToString(b[:]))
}

// ID returns the id this replica writes into Redis: the origin of the
// breaker states it publishes, the holder of the probe locks it takes, the
// prefix of its lease ids.
func (s *Store) ID() string { return s.id }

// Close stops the store's background work and waits for it. Breakers and
// bulkheads attached to the store keep working on local state: a probe is
// allowed without asking Redis, and a global cap holds this replica to its
// fair share of the limit, as when Redis is down. Slots of calls
// still in flight are no longer renewed and expire after LeaseTTL. If the
// store opened its client from a URL, Close closes the client too. It is
// safe to call more than once.
func (s *Store) Close() error {
	s.life.Lock()
	first := s.closed.CompareAndSwap(false, true)
	s.life.Unlock()
	if !first {
		return nil
	}
	s.cancel()
	_ = s.ps.Close() // unblocks the subscriber's read
	s.wg.Wait()
	if s.ownClient {
		openStores.Add(-1)
		return s.client.Close()
	}
	return nil
}

// Healthy reports whether the store takes Redis to be reachable: false from
// the third round trip in a row that failed until Redis answers the
// worker's next check, true otherwise. While it is false, call paths do not
// ask Redis.
func (s *Store) Healthy() bool { return !s.down.Load() }

// usable reports whether call paths should ask Redis at all.
func (s *Store) usable() bool { return !s.closed.Load() && !s.down.Load() }

// downAfter is how many round trips in a row must fail before the store
// takes Redis for down: one slow answer (a fresh connection, a script to
// load again) is not an outage.
const downAfter = 3

// markDown records a failed round trip. The one that makes an outage is
// logged; the worker's poll clears it when Redis answers again.
func (s *Store) markDown(err error) {
	if s.closed.Load() || s.ctx.Err() != nil || err == errClosed {
		return
	}
	if s.fails.Add(1) < downAfter {
		return
	}
	if s.down.CompareAndSwap(false, true) {
		s.opts.Logger.Warn("resilience/redisstore: Redis unreachable; breakers and bulkheads run on local state",
			slog.String("replica", s.id), slog.String("error", err.Error()))
	}
}

// markOK records a round trip that succeeded.
func (s *Store) markOK() {
	if s.fails.Load() != 0 {
		s.fails.Store(0)
	}
}

func (s *Store) markUp() {
	s.fails.Store(0)
	if s.down.CompareAndSwap(true, false) {
		s.opts.Logger.Info("resilience/redisstore: Redis reachable again; re-syncing",
			slog.String("replica", s.id))
		// Renew the leases of the calls in flight, and give back the
		// releases kept while it was down, now.
		select {
		case s.beat <- struct{}{}:
		default:
		}
	}
}

// loadScripts loads the scripts into Redis, so that call paths do not pay
// for a NOSCRIPT round trip after Redis restarts.
func (s *Store) loadScripts(ctx context.Context) {
	for _, sc := range []*redis.Script{acquireScript, renewScript, publishScript, probeScript, releaseProbeScript} {
		if sc.Load(ctx, s.client).Err() != nil {
			return
		}
	}
}

// errClosed reports a round trip not made because the store is closed.
var errClosed = errors.New("redisstore: the store is closed")

// track counts a goroutine that Close must wait for, unless the store is
// closed: then it reports false and the goroutine must not start.
func (s *Store) track() bool {
	s.life.RLock()
	defer s.life.RUnlock()
	if s.closed.Load() {
		return false
	}
	s.wg.Add(1)
	return true
}

// errSlow reports a round trip that took longer than OpTimeout.
var errSlow = errors.New("redisstore: Redis did not answer within OpTimeout")

// bounded runs op with a deadline of OpTimeout and returns when op is done
// or when the deadline passes, whichever is first, whatever the client's own
// timeouts: op runs in a goroutine of its own. If the caller stopped waiting
// first (errSlow, or the caller's context error), late, if not nil, is
// given op's result once it comes, so that a lease taken too late is given
// back.
func bounded[T any](s *Store, ctx context.Context, op func(context.Context) (T, error), late func(T, error)) (T, error) {
	octx, cancel := context.WithTimeout(ctx, s.opts.OpTimeout)
	type result struct {
		v   T
		err error
	}
	res := make(chan result, 1)
	var claim atomic.Int32 // 1: the result is the caller's; 2: the caller left
	if !s.track() {
		cancel()
		var zero T
		return zero, errClosed
	}
	go func() {
		defer s.wg.Done()
		defer cancel()
		v, err := op(octx)
		if claim.CompareAndSwap(0, 1) {
			res <- result{v, err}
		} else if late != nil {
			late(v, err)
		}
	}()
	select {
	case r := <-res:
		return r.v, r.err
	case <-octx.Done():
		if !claim.CompareAndSwap(0, 2) {
			r := <-res // op finished just in time
			return r.v, r.err
		}
		var zero T
		if ctx.Err() != nil {
			return zero, ctx.Err()
		}
		return zero, errSlow
	}
}

// callerGaveUp reports whether err is the caller's own cancellation, which
// says nothing about Redis.
func callerGaveUp(ctx context.Context, err error) bool {
	return ctx.Err() != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded))
}

// bg returns a context for a background round trip.
func (s *Store) bg() (context.Context, context.CancelFunc) {
	return context.WithTimeout(s.ctx, s.bgTimeout)
}

// sleep waits d or until the store closes; it reports whether the store is
// still open.
func (s *Store) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-s.ctx.Done():
		return false
	}
}

// poke asks the worker to poll now, without waiting.
func (s *Store) poke() {
	select {
	case s.resync <- struct{}{}:
	default:
	}
}

// worker publishes local transitions, applies the other replicas' and polls
// the shared states every SyncInterval. It is the only goroutine that calls
// Trip and Reset or writes breaker states, so applying and publishing never
// race.
func (s *Store) worker() {
	defer s.wg.Done()
	ctx, cancel := s.bg()
	s.loadScripts(ctx)
	cancel()
	tick := time.NewTicker(s.opts.SyncInterval)
	defer tick.Stop()
	for {
		// Local transitions first: the one an applied state caused must
		// be known for what it is before the next remote state is applied.
		select {
		case ev := <-s.events:
			s.handleEvent(ev)
			continue
		default:
		}
		select {
		case <-s.ctx.Done():
			return
		case ev := <-s.events:
			s.handleEvent(ev)
		case m := <-s.msgs:
			s.handleMessage(m)
		case <-s.resync:
			s.poll()
		case <-tick.C:
			s.poll()
		}
	}
}

// subscriber receives the changes other replicas publish and hands them to
// the worker. go-redis reconnects and resubscribes on the next receive
// after an error; each (re)subscription asks the worker to poll, so what was
// missed meanwhile is read back.
func (s *Store) subscriber() {
	defer s.wg.Done()
	if err := s.ps.Subscribe(s.ctx, s.channel); err != nil && s.ctx.Err() == nil {
		s.markDown(err)
	}
	idle := min(max(10*s.opts.SyncInterval, time.Second), 30*time.Second)
	for {
		msg, err := s.ps.ReceiveTimeout(s.ctx, idle)
		if s.ctx.Err() != nil {
			return
		}
		if err != nil {
			var ne interface{ Timeout() bool }
			if errors.As(err, &ne) && ne.Timeout() {
				// Quiet: check that the connection is alive.
				_ = s.ps.Ping(s.ctx)
				continue
			}
			s.markDown(err)
			if !s.sleep(s.opts.SyncInterval) {
				return
			}
			continue
		}
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" {
				s.poke()
			}
		case *redis.Message:
			pm, ok := parseMessage(m.Payload)
			if !ok {
				continue
			}
			select {
			case s.msgs <- pm:
			default:
				s.poke() // the poll reads what was dropped
			}
		}
	}
}
