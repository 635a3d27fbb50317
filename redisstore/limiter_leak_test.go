package redisstore

import (
	"context"
	"sync"
	"testing"
	"time"
)

// Regression: the slot script ran under OpTimeout; cut short by the
// deadline while Redis was frozen, it still ran once Redis resumed, and
// its leases, granted to nobody, held the whole global cap until LeaseTTL:
// Acquire answered "bulkhead is full" with nothing in flight.
func TestTimedOutSlotScriptLeavesNoLease(t *testing.T) {
	s := newStore(t, Options{KeyPrefix: prefix(t), OpTimeout: 50 * time.Millisecond, LeaseTTL: 30 * time.Second})
	lim := s.Limiter("svc", 3).(*limiter)
	rel, err := lim.Acquire(context.Background()) // scripts loaded, replicas known
	if err != nil {
		t.Fatal(err)
	}
	rel()
	srv.pause()
	var wg sync.WaitGroup
	for range 5 {
		wg.Go(func() {
			r, _ := lim.Acquire(context.Background()) // the fair share, while frozen
			r()
		})
	}
	wg.Wait()
	srv.resume()
	waitFor(t, 5*time.Second, "Redis up", s.Healthy)
	c := newClient(t, false)
	waitFor(t, 5*time.Second, "no lease left with nothing in flight", func() bool {
		n, err := c.ZCard(context.Background(), lim.key).Result()
		return err == nil && n == 0
	})
	r, err := lim.Acquire(context.Background())
	if err != nil {
		t.Fatalf("Acquire after Redis is back, nothing in flight: %v", err)
	}
	r()
}

// Regression: the releases of calls that ended while Redis was down were
// dropped, so after a brief outage their leases held the global cap until
// LeaseTTL. They are sent once Redis is back.
func TestReleasesWhileRedisIsDownAreSentWhenItIsBack(t *testing.T) {
	s := newStore(t, Options{KeyPrefix: prefix(t), OpTimeout: 50 * time.Millisecond, SyncInterval: 100 * time.Millisecond})
	lim := s.Limiter("svc", 3).(*limiter)
	var rels []func()
	for range 3 {
		r, err := lim.Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		rels = append(rels, r)
	}
	srv.pause()
	for s.Healthy() { // until the store marks Redis down
		r, _ := lim.Acquire(context.Background())
		r()
	}
	for _, r := range rels {
		r() // the calls end during the outage
	}
	srv.resume()
	waitFor(t, 5*time.Second, "Redis up", s.Healthy)
	c := newClient(t, false)
	waitFor(t, 5*time.Second, "the leases given back", func() bool {
		n, err := c.ZCard(context.Background(), lim.key).Result()
		return err == nil && n == 0
	})
	r, err := lim.Acquire(context.Background())
	if err != nil {
		t.Fatalf("Acquire after the outage, nothing in flight: %v", err)
	}
	r()
}
