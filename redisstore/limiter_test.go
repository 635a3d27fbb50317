package redisstore

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
)

// TestGlobalBulkheadCapsTheFleet is issue 8's other half: three replicas,
// each with a local bulkhead of 3 and a global limit of 3, never have more
// than 3 calls inside the downstream at once, all replicas together.
func TestGlobalBulkheadCapsTheFleet(t *testing.T) {
	env := map[string]string{
		"BULKHEAD_DOWNSTREAM_LIMIT":        "3",
		"BULKHEAD_DOWNSTREAM_GLOBAL_LIMIT": "3",
	}
	opts := Options{KeyPrefix: prefix(t), SyncInterval: syncInterval}
	down := &downstream{delay: 2 * time.Millisecond}
	var ok, full atomic.Int64
	var wg sync.WaitGroup
	var stores [3]*Store
	for i := range 3 {
		stores[i] = newStore(t, opts)
		reg := newRegistry(t, env, stores[i])
		call := resilience.WithBulkhead(down.fn(i), reg.Bulkhead("downstream"))
		for range 4 {
			wg.Go(func() {
				for range 25 {
					_, err := call(context.Background())
					switch {
					case err == nil:
						ok.Add(1)
					case errors.Is(err, resilience.ErrBulkheadFull):
						full.Add(1)
						time.Sleep(time.Millisecond)
					default:
						t.Errorf("call: %v", err)
					}
				}
			})
		}
	}
	wg.Wait()
	t.Logf("%d calls in, %d refused by the global cap; at most %d inside at once", ok.Load(), full.Load(), down.maxInside.Load())
	if m := down.maxInside.Load(); m > 3 {
		t.Fatalf("%d calls inside the downstream at once; the global limit is 3", m)
	}
	if ok.Load() == 0 || full.Load() == 0 {
		t.Fatalf("ok %d, refused %d: want both", ok.Load(), full.Load())
	}
	// Every lease is given back.
	l := stores[0].Limiter("downstream", 3).(*limiter)
	c := newClient(t, true)
	waitFor(t, time.Second, "leases given back", func() bool { return c.ZCard(context.Background(), l.key).Val() == 0 })
}

// TestLeaseOutlivesItsReplicaByLeaseTTL: a replica that dies mid-call (its
// store closes without giving the slot back) holds the slot for LeaseTTL at
// most.
func TestLeaseOutlivesItsReplicaByLeaseTTL(t *testing.T) {
	const ttl = 300 * time.Millisecond
	opts := Options{KeyPrefix: prefix(t), SyncInterval: syncInterval, LeaseTTL: ttl}
	dead := newStore(t, opts)
	if _, err := dead.Limiter("x", 1).Acquire(context.Background()); err != nil {
		t.Fatal(err)
	}
	died := time.Now()
	dead.Close() // the release function is dropped: the replica is gone

	other := newStore(t, opts).Limiter("x", 1)
	if _, err := other.Acquire(context.Background()); !errors.Is(err, resilience.ErrBulkheadFull) {
		t.Fatalf("err = %v; want the dead replica's slot still held", err)
	}
	var release func()
	took := waitFor(t, 3*ttl, "slot freed", func() bool {
		var err error
		release, err = other.Acquire(context.Background())
		return err == nil
	})
	defer release()
	if since := time.Since(died); since < ttl-20*time.Millisecond {
		t.Fatalf("slot freed after %v; want LeaseTTL %v", since, ttl)
	}
	t.Logf("slot freed %v after the replica died (LeaseTTL %v)", took, ttl)
}

// TestLeaseRenewedWhileCallRuns: a live replica's call may outlast LeaseTTL
// without losing its slot, and gives it back when it ends.
func TestLeaseRenewedWhileCallRuns(t *testing.T) {
	const ttl = 150 * time.Millisecond
	opts := Options{KeyPrefix: prefix(t), SyncInterval: syncInterval, LeaseTTL: ttl}
	a, b := newStore(t, opts).Limiter("x", 1), newStore(t, opts).Limiter("x", 1)
	release, err := a.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(4 * ttl)
	if _, err := b.Acquire(context.Background()); !errors.Is(err, resilience.ErrBulkheadFull) {
		t.Fatalf("after 4 LeaseTTLs: err = %v; want the long call's slot still held", err)
	}
	release()
	release() // a second call gives nothing back twice
	var rb func()
	waitFor(t, time.Second, "slot given back", func() bool {
		rb, err = b.Acquire(context.Background())
		return err == nil
	})
	rb()
}

// TestAcquireHonoursTheCallersContext: a caller that has given up gets its
// context's error, not a slot.
func TestAcquireHonoursTheCallersContext(t *testing.T) {
	l := newStore(t, Options{KeyPrefix: prefix(t)}).Limiter("x", 5)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := l.Acquire(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v; want context.Canceled", err)
	}
}
