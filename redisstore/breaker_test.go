package redisstore

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/resilience-go/resilience"
)

// fleet is three replicas of a service, each with its own registry and its
// own store, against one Redis and one downstream.
type fleet struct {
	stores   [3]*Store
	regs     [3]*resilience.Registry
	breakers [3]*resilience.CircuitBreaker
	calls    [3]resilience.Func[string]
	down     *downstream
}

const syncInterval = 100 * time.Millisecond

func newFleet(t *testing.T, env map[string]string, opts Options) *fleet {
	t.Helper()
	if opts.KeyPrefix == "" {
		opts.KeyPrefix = prefix(t)
	}
	if opts.SyncInterval == 0 {
		opts.SyncInterval = syncInterval
	}
	f := &fleet{down: &downstream{}}
	for i := range 3 {
		f.stores[i] = newStore(t, opts)
		f.regs[i] = newRegistry(t, env, f.stores[i])
		f.breakers[i] = f.regs[i].CircuitBreaker("downstream")
		f.calls[i] = resilience.WithCircuitBreaker(f.down.fn(i), f.breakers[i])
	}
	return f
}

func (f *fleet) states() []resilience.State {
	s := make([]resilience.State, 3)
	for i, cb := range f.breakers {
		s[i] = cb.State()
	}
	return s
}

func (f *fleet) all(st resilience.State) bool {
	for _, s := range f.states() {
		if s != st {
			return false
		}
	}
	return true
}

// round sends one call from each replica at once and returns how many
// reached the downstream.
func (f *fleet) round(t *testing.T) (reached int64, errs [3]error) {
	t.Helper()
	before := f.down.total()
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range 3 {
		wg.Go(func() {
			<-start
			_, errs[i] = f.calls[i](context.Background())
		})
	}
	close(start)
	wg.Wait()
	return f.down.total() - before, errs
}

// TestFleetOpensTogetherAndProbesOnce is issue 8: replica A sees the
// outage and opens; B and C open within a SyncInterval without calling the
// downstream; each half-open round sends one probe from one replica; a
// failed probe opens every replica again, a good one closes them all.
func TestFleetOpensTogetherAndProbesOnce(t *testing.T) {
	const openTimeout = 400 * time.Millisecond
	f := newFleet(t, map[string]string{
		"CIRCUIT_BREAKER_DOWNSTREAM_FAIL_MAX": "3",
		"CIRCUIT_BREAKER_DOWNSTREAM_TIMEOUT":  openTimeout.String(),
	}, Options{})
	f.down.delay = 30 * time.Millisecond // so that the probes of a round overlap

	// Everything the replicas publish about the breaker, to check that
	// applying a remote state is never published back.
	sub := newClient(t, true).Subscribe(context.Background(), f.stores[0].channel)
	defer sub.Close()
	if _, err := sub.Receive(context.Background()); err != nil { // the subscription
		t.Fatal(err)
	}
	published := sub.Channel()

	f.down.outage.Store(true)
	for f.breakers[0].State() != resilience.StateOpen {
		f.calls[0](context.Background())
	}
	opened := time.Now()
	took := waitFor(t, syncInterval, "B and C open", func() bool { return f.all(resilience.StateOpen) })
	t.Logf("open reached the other replicas in %v (after A's open: %v)", took, time.Since(opened))
	if n := f.down.calls[1].Load() + f.down.calls[2].Load(); n != 0 {
		t.Fatalf("B and C sent %d calls to the downstream; want 0", n)
	}
	for i := 1; i < 3; i++ {
		if _, err := f.calls[i](context.Background()); !errors.Is(err, resilience.ErrCircuitOpen) {
			t.Fatalf("replica %d: err = %v; want ErrCircuitOpen", i, err)
		}
	}
	time.Sleep(3 * syncInterval) // let any echo arrive
	if got := drainMessages(published); len(got) != 1 || !strings.Contains(got[0], " open ") {
		t.Fatalf("published %q; want A's open alone", got)
	}

	// A failed probe: one replica probes, and every replica opens again.
	time.Sleep(openTimeout + 50*time.Millisecond)
	reached, errs := f.round(t)
	if reached != 1 {
		t.Fatalf("failed round: %d probes reached the downstream (errors %v); want 1", reached, errs)
	}
	waitFor(t, syncInterval, "every replica open after the failed probe", func() bool { return f.all(resilience.StateOpen) })
	probeLock := f.stores[0].opts.KeyPrefix + "cb:{DOWNSTREAM}:probe"
	redisClient := newClient(t, true)
	waitFor(t, syncInterval, "probe lock released", func() bool {
		return redisClient.Exists(context.Background(), probeLock).Val() == 0
	})

	// Recovery: one probe, and every replica closes.
	f.down.outage.Store(false)
	time.Sleep(openTimeout + 50*time.Millisecond)
	reached, errs = f.round(t)
	if reached != 1 {
		t.Fatalf("recovery round: %d probes reached the downstream (errors %v); want 1", reached, errs)
	}
	took = waitFor(t, syncInterval, "every replica closed", func() bool { return f.all(resilience.StateClosed) })
	t.Logf("close reached the other replicas in %v", took)
	waitFor(t, syncInterval, "probe lock released", func() bool {
		return redisClient.Exists(context.Background(), probeLock).Val() == 0
	})
	for i := range 3 {
		if _, err := f.calls[i](context.Background()); err != nil {
			t.Fatalf("replica %d after recovery: %v", i, err)
		}
	}
	time.Sleep(3 * syncInterval)
	msgs := drainMessages(published)
	var states []string
	for _, m := range msgs {
		states = append(states, strings.Fields(m)[2])
	}
	// The failed probe's open, and the good probe's close: nothing echoed.
	if strings.Join(states, " ") != "open closed" {
		t.Fatalf("published %q; want the failed probe's open and the good probe's close", msgs)
	}
}

// drainMessages returns the payloads of the messages received so far.
func drainMessages(ch <-chan *redis.Message) []string {
	var out []string
	for {
		select {
		case m := <-ch:
			out = append(out, m.Payload)
		default:
			return out
		}
	}
}

// TestPollCatchesUp: a replica that missed the message (it was not
// subscribed, here: its breaker is made after the open) still opens, from
// the poll, within a SyncInterval, and an open whose end has passed is not
// applied.
func TestPollCatchesUp(t *testing.T) {
	env := map[string]string{"CIRCUIT_BREAKER_X_FAIL_MAX": "1", "CIRCUIT_BREAKER_X_TIMEOUT": "5"}
	opts := Options{KeyPrefix: prefix(t), SyncInterval: syncInterval}
	a := newRegistry(t, env, newStore(t, opts))
	fail := resilience.WithCircuitBreaker(func(context.Context) (int, error) { return 0, errDown }, a.CircuitBreaker("x"))
	fail(context.Background())

	b := newRegistry(t, env, newStore(t, opts))
	cb := b.CircuitBreaker("x") // new to its store: read on the first poll
	waitFor(t, 2*syncInterval, "late replica open", func() bool { return cb.State() == resilience.StateOpen })
}

// TestForcedBreakerIsLeftAlone: an operator's ForceClose holds, whatever
// the fleet says; and the operator's Reset of an open breaker closes the
// fleet.
func TestForcedBreakerIsLeftAlone(t *testing.T) {
	env := map[string]string{"CIRCUIT_BREAKER_X_FAIL_MAX": "1", "CIRCUIT_BREAKER_X_TIMEOUT": "5"}
	opts := Options{KeyPrefix: prefix(t), SyncInterval: syncInterval}
	a, b, c := newRegistry(t, env, newStore(t, opts)), newRegistry(t, env, newStore(t, opts)), newRegistry(t, env, newStore(t, opts))
	cbA, cbB, cbC := a.CircuitBreaker("x"), b.CircuitBreaker("x"), c.CircuitBreaker("x")
	time.Sleep(2 * syncInterval) // every store has read the (empty) state
	cbC.ForceClose()
	resilience.WithCircuitBreaker(func(context.Context) (int, error) { return 0, errDown }, cbA)(context.Background())
	waitFor(t, syncInterval, "B open", func() bool { return cbB.State() == resilience.StateOpen })
	time.Sleep(2 * syncInterval)
	if cbC.State() != resilience.StateClosed {
		t.Fatalf("forced-closed breaker is %v", cbC.State())
	}
	cbA.Reset()
	waitFor(t, syncInterval, "B closed after A's reset", func() bool { return cbB.State() == resilience.StateClosed })
}

// syncOf returns the store's record of cb, to see what it applied.
func syncOf(t *testing.T, s *Store, cb *resilience.CircuitBreaker) *breaker {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.breakers[cb]
	if b == nil {
		t.Fatalf("breaker %q not tracked by the store", cb.Name())
	}
	return b
}

// waitSubscribed waits until n subscribers listen on the store's channel,
// so that a transition made next goes out by pub/sub, not the poll.
func waitSubscribed(t *testing.T, s *Store, n int64) {
	t.Helper()
	c := newClient(t, true)
	waitFor(t, 5*time.Second, "stores subscribed", func() bool {
		return c.PubSubNumSub(context.Background(), s.channel).Val()[s.channel] >= n
	})
}

// sharedOpen returns the shared state's open period, until - at.
func sharedOpen(t *testing.T, s *Store, cb *resilience.CircuitBreaker) time.Duration {
	t.Helper()
	v := parseHash(newClient(t, true).HMGet(context.Background(), syncOf(t, s, cb).hkey,
		"state", "until", "at", "origin", "epoch", "gen").Val())
	if v.state != "open" {
		t.Fatalf("shared state %+v; want open", v)
	}
	return time.Duration(v.until-v.at) * time.Millisecond
}

// rejectedFor returns how long a rejection of a call through cb asks the
// caller to wait: Error.RetryAfter of an ErrCircuitOpen.
func rejectedFor(t *testing.T, cb *resilience.CircuitBreaker) time.Duration {
	t.Helper()
	_, err := resilience.WithCircuitBreaker(func(context.Context) (int, error) { return 1, nil }, cb)(context.Background())
	var re *resilience.Error
	if !errors.Is(err, resilience.ErrCircuitOpen) || !errors.As(err, &re) {
		t.Fatalf("err = %v; want a rejection, ErrCircuitOpen", err)
	}
	return re.RetryAfter()
}

// TestRatioOpenReachesEveryReplica: a breaker that only a failure ratio
// opens (FailureRatio 0.5 over at least 4 calls, no FailMax) opens on A
// from alternating successes and failures, never two failures in a row,
// and B opens too.
func TestRatioOpenReachesEveryReplica(t *testing.T) {
	env := map[string]string{
		"CIRCUIT_BREAKER_X_FAILURE_RATIO":      "0.5",
		"CIRCUIT_BREAKER_X_MINIMUM_THROUGHPUT": "4",
		"CIRCUIT_BREAKER_X_TIMEOUT":            "5",
	}
	opts := Options{KeyPrefix: prefix(t), SyncInterval: syncInterval}
	sa, sb := newStore(t, opts), newStore(t, opts)
	cbA, cbB := newRegistry(t, env, sa).CircuitBreaker("x"), newRegistry(t, env, sb).CircuitBreaker("x")
	waitSubscribed(t, sa, 2)
	var n int
	call := resilience.WithCircuitBreaker(func(context.Context) (int, error) {
		n++
		if n%2 == 0 {
			return 0, errDown
		}
		return n, nil
	}, cbA)
	for i := range 4 {
		if st := cbA.State(); st != resilience.StateClosed {
			t.Fatalf("A is %v after %d calls; want closed until the 4th", st, i)
		}
		call(context.Background())
	}
	if st := cbA.State(); st != resilience.StateOpen {
		t.Fatalf("A is %v after 2 failures in 4 calls; want open by the ratio", st)
	}
	took := waitFor(t, 2*syncInterval, "B open", func() bool { return cbB.State() == resilience.StateOpen })
	t.Logf("the ratio's open reached B in %v", took)
	if p := sharedOpen(t, sa, cbA); p != 5*time.Second {
		t.Fatalf("shared open period %v; want OpenTimeout, 5s", p)
	}
}

// hinted is a failure that asks the caller to wait, as an HTTP 429 with a
// Retry-After does through Transport.
type hinted struct{ wait time.Duration }

func (e hinted) Error() string             { return "429 Too Many Requests" }
func (e hinted) RetryAfter() time.Duration { return e.wait }

// longerOpenEnv is a breaker that opens on the first failure for 200ms,
// and for up to 2s after failed probes or for a retry hint.
var longerOpenEnv = map[string]string{
	"CIRCUIT_BREAKER_X_FAIL_MAX":    "1",
	"CIRCUIT_BREAKER_X_TIMEOUT":     "200ms",
	"CIRCUIT_BREAKER_X_MAX_TIMEOUT": "2s",
}

const longerOpenTimeout = 200 * time.Millisecond

// TestRetryHintOpenPeriodReachesEveryReplica: A opens on a 429 that asks
// for 1.5s; B, closed, opens for what is left of those 1.5s, not for its
// 200ms OpenTimeout, and its rejections say so.
func TestRetryHintOpenPeriodReachesEveryReplica(t *testing.T) {
	opts := Options{KeyPrefix: prefix(t), SyncInterval: syncInterval}
	sa, sb := newStore(t, opts), newStore(t, opts)
	cbA, cbB := newRegistry(t, longerOpenEnv, sa).CircuitBreaker("x"), newRegistry(t, longerOpenEnv, sb).CircuitBreaker("x")
	waitSubscribed(t, sa, 2)
	const hint = 1500 * time.Millisecond
	resilience.WithCircuitBreaker(func(context.Context) (int, error) { return 0, hinted{hint} }, cbA)(context.Background())
	// The hint counts from when the call failed, a little before the open.
	if p := cbA.OpenPeriod(); p < hint*9/10 || p > hint {
		t.Fatalf("A's open period %v; want the hint, %v", p, hint)
	}
	waitFor(t, 2*syncInterval, "B open", func() bool { return cbB.State() == resilience.StateOpen })
	if p := sharedOpen(t, sa, cbA); p != cbA.OpenPeriod().Truncate(time.Millisecond) {
		t.Fatalf("shared open period %v; want A's, %v", p, cbA.OpenPeriod())
	}
	// What was left of A's period when B applied it: nearly all of it.
	if p := cbB.OpenPeriod(); p <= longerOpenTimeout || p > hint {
		t.Fatalf("B's open period %v; want nearly %v, more than OpenTimeout (%v)", p, hint, longerOpenTimeout)
	}
	if d := rejectedFor(t, cbB); d <= longerOpenTimeout {
		t.Fatalf("B's rejection: RetryAfter %v; want more than OpenTimeout, %v", d, longerOpenTimeout)
	}
}

// TestFailedProbeDoubledPeriodReachesHalfOpenReplica: A and B open
// together for 200ms; both go half-open; A's probe fails, doubling A's
// period to 400ms; B opens again for the doubled period too, without a
// probe of its own.
func TestFailedProbeDoubledPeriodReachesHalfOpenReplica(t *testing.T) {
	opts := Options{KeyPrefix: prefix(t), SyncInterval: syncInterval}
	sa, sb := newStore(t, opts), newStore(t, opts)
	cbA, cbB := newRegistry(t, longerOpenEnv, sa).CircuitBreaker("x"), newRegistry(t, longerOpenEnv, sb).CircuitBreaker("x")
	waitSubscribed(t, sa, 2)
	failA := resilience.WithCircuitBreaker(func(context.Context) (int, error) { return 0, errDown }, cbA)
	failA(context.Background())
	waitFor(t, 2*syncInterval, "B open", func() bool { return cbB.State() == resilience.StateOpen })
	if p := cbB.OpenPeriod(); p > longerOpenTimeout {
		t.Fatalf("B's first open period %v; want OpenTimeout, %v", p, longerOpenTimeout)
	}
	waitFor(t, longerOpenTimeout+time.Second, "A and B half-open", func() bool {
		return cbA.State() == resilience.StateHalfOpen && cbB.State() == resilience.StateHalfOpen
	})
	failA(context.Background()) // A's probe
	if p := cbA.OpenPeriod(); p != 2*longerOpenTimeout {
		t.Fatalf("A's open period after its failed probe %v; want %v", p, 2*longerOpenTimeout)
	}
	waitFor(t, 2*syncInterval, "B open again", func() bool { return cbB.State() == resilience.StateOpen })
	if p := sharedOpen(t, sa, cbA); p != 2*longerOpenTimeout {
		t.Fatalf("shared open period %v; want %v", p, 2*longerOpenTimeout)
	}
	if p := cbB.OpenPeriod(); p <= longerOpenTimeout {
		t.Fatalf("B's open period %v; want more than OpenTimeout, %v", p, longerOpenTimeout)
	}
	if d := rejectedFor(t, cbB); d <= longerOpenTimeout {
		t.Fatalf("B's rejection: RetryAfter %v; want more than OpenTimeout, %v", d, longerOpenTimeout)
	}
}

// TestLongerSharedOpenKeepsAnOpenReplicaOpen: B is open for its own
// 300ms when another replica publishes an open of 1.5s, over B's still in
// force. B's breaker stays open until the shared open ends (it used to go
// half-open on its own clock, its probes held back: issue 18), sends no
// probe until then, then probes and closes; B publishes nothing meanwhile.
func TestLongerSharedOpenKeepsAnOpenReplicaOpen(t *testing.T) {
	env := map[string]string{"CIRCUIT_BREAKER_X_FAIL_MAX": "1", "CIRCUIT_BREAKER_X_TIMEOUT": "300ms"}
	opts := Options{KeyPrefix: prefix(t), SyncInterval: syncInterval}
	sb := newStore(t, opts)
	cbB := newRegistry(t, env, sb).CircuitBreaker("x")
	waitSubscribed(t, sb, 1)
	sub := newClient(t, true).Subscribe(context.Background(), sb.channel)
	defer sub.Close()
	if _, err := sub.Receive(context.Background()); err != nil { // the subscription
		t.Fatal(err)
	}
	published := sub.Channel()

	d := &downstream{}
	callB := resilience.WithCircuitBreaker(d.fn(1), cbB)
	d.outage.Store(true)
	callB(context.Background())
	d.outage.Store(false)
	if cbB.State() != resilience.StateOpen {
		t.Fatal("B did not open")
	}

	// Another replica's longer open, published as a replica publishes it
	// (a retry hint's 1.5s, from a breaker that was closed until then).
	b := syncOf(t, sb, cbB)
	const longer = 1500 * time.Millisecond
	res, err := publishScript.Run(context.Background(), newClient(t, true), []string{b.hkey, b.pkey},
		"open", longer.Milliseconds(), "", "other-replica", newEpoch(), sb.channel, b.key,
		defaultIdle.Milliseconds(), "0", syncInterval.Milliseconds()).Slice()
	if err != nil || len(res) != 3 || res[0] != int64(1) {
		t.Fatalf("the longer open over B's: %v, %v; want it written", res, err)
	}
	if p := sharedOpen(t, sb, cbB); p != longer {
		t.Fatalf("shared open period %v; want %v", p, longer)
	}
	waitFor(t, 2*syncInterval, "B applies the longer open", func() bool { return b.holdUntil.Load() != 0 })
	end := time.UnixMilli(b.holdUntil.Load())
	if cbB.State() != resilience.StateOpen {
		t.Fatal("B was no longer open when the longer open arrived; the test needs a longer OpenTimeout")
	}

	for time.Until(end) > 20*time.Millisecond {
		if _, err := callB(context.Background()); !errors.Is(err, resilience.ErrCircuitOpen) {
			t.Fatalf("B's call %v before the shared open's end: err = %v; want ErrCircuitOpen", time.Until(end), err)
		}
		if st := cbB.State(); st != resilience.StateOpen {
			t.Fatalf("B's breaker %v, %v before the shared open's end; want open until then", st, time.Until(end))
		}
		time.Sleep(time.Millisecond) // polling a condition
	}
	if n := d.calls[1].Load(); n != 1 {
		t.Fatalf("B sent %d calls to the downstream during the shared open; want its first failure alone", n-1)
	}
	waitFor(t, time.Second+time.Until(end), "B probes and closes after the shared open", func() bool {
		callB(context.Background())
		return cbB.State() == resilience.StateClosed
	})
	t.Logf("B closed %v after the shared open's end", time.Since(end))

	var got []string
	waitFor(t, 2*time.Second, "three messages", func() bool {
		got = append(got, drainMessages(published)...)
		return len(got) >= 3
	})
	var states []string
	for _, m := range got {
		f := strings.Fields(m)
		origin := f[5]
		if origin == sb.id {
			origin = "B"
		}
		states = append(states, f[2]+" by "+origin)
	}
	if strings.Join(states, ", ") != "open by B, open by other-replica, closed by B" {
		t.Fatalf("published %q (%q); want B's open, the longer open, B's close", states, got)
	}
}
