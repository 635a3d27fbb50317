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
