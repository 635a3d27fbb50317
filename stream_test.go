package resilience

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// A kept attempt holds its slot after it returns, until Release; one that
// is not kept gives it back when it returns.
func TestForStreamKeepHoldsSlotUntilRelease(t *testing.T) {
	reg := mustRegistry(t, map[string]string{"BULKHEAD_STREAMSVC_LIMIT": "1"})
	b := reg.Bulkhead("streamsvc")
	var kept *Kept
	fn := ForStream(reg, "streamsvc", func(ctx context.Context) (int, error) {
		kept = KeepAttempt(ctx)
		if KeepAttempt(ctx) != nil {
			t.Error("KeepAttempt twice: want nil the second time")
		}
		return 1, nil
	})
	if _, err := fn(context.Background()); err != nil {
		t.Fatal(err)
	}
	if kept == nil {
		t.Fatal("KeepAttempt = nil in a ForStream attempt")
	}
	if got := b.Stats().Active; got != 1 {
		t.Fatalf("after a kept attempt returned: Active = %d; want 1", got)
	}
	kept.Touch()
	kept.Release()
	kept.Release() // a second call does nothing
	if got := b.Stats().Active; got != 0 {
		t.Fatalf("after Release: Active = %d; want 0", got)
	}
	if kept.Expired() {
		t.Error("Expired() = true after Release")
	}

	plain := ForStream(reg, "streamsvc", func(ctx context.Context) (int, error) { return 2, nil })
	if _, err := plain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := b.Stats().Active; got != 0 {
		t.Fatalf("after an attempt that kept nothing: Active = %d; want 0", got)
	}
}

// The kept attempt's context lives past the attempt, and Release ends it.
func TestForStreamKeptContextLivesUntilRelease(t *testing.T) {
	reg := mustRegistry(t, nil)
	var actx context.Context
	var kept *Kept
	fn := ForStream(reg, "ctxsvc", func(ctx context.Context) (int, error) {
		actx, kept = ctx, KeepAttempt(ctx)
		return 0, nil
	})
	if _, err := fn(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := actx.Err(); err != nil {
		t.Fatalf("kept attempt's context after the call: %v; want alive", err)
	}
	kept.Release()
	if actx.Err() == nil {
		t.Fatal("kept attempt's context after Release: alive; want done")
	}
}

// The idle timeout ends a kept attempt that makes no progress: its context
// ends with ErrTimeout and its slot is given back; Touch puts it off.
func TestForStreamIdleTimeoutExpiresKept(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := mustRegistry(t, map[string]string{"BULKHEAD_IDLESVC_LIMIT": "1", "TIMEOUT_IDLESVC": "1", "TIMEOUT_IDLESVC_IDLE": "2"})
		b := reg.Bulkhead("idlesvc")
		var actx context.Context
		var kept *Kept
		fn := ForStream(reg, "idlesvc", func(ctx context.Context) (int, error) {
			actx, kept = ctx, KeepAttempt(ctx)
			return 0, nil
		})
		if _, err := fn(context.Background()); err != nil {
			t.Fatal(err)
		}
		time.Sleep(1500 * time.Millisecond) // past the attempt's timeout, which keep stopped
		kept.Touch()
		time.Sleep(1500 * time.Millisecond)
		if actx.Err() != nil || kept.Expired() {
			t.Fatal("kept attempt ended within its idle timeout of a Touch")
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if !kept.Expired() || context.Cause(actx) != ErrTimeout {
			t.Fatalf("after 2s idle: Expired() = %v, cause %v; want true, ErrTimeout", kept.Expired(), context.Cause(actx))
		}
		if got := b.Stats().Active; got != 0 {
			t.Fatalf("after the idle timeout: Active = %d; want 0", got)
		}
		kept.Release()
	})
}

// ForStream never hedges, even for a service with a hedge: one attempt at
// a time.
func TestForStreamNeverHedges(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := mustRegistry(t, map[string]string{"HEDGE_HEDGED_DELAY": "0.01"})
		var inFlight, most atomic.Int32
		fn := ForStream(reg, "hedged", func(ctx context.Context) (int, error) {
			n := inFlight.Add(1)
			if n > most.Load() {
				most.Store(n)
			}
			time.Sleep(100 * time.Millisecond) // far past the hedge's delay
			inFlight.Add(-1)
			return 0, nil
		})
		if _, err := fn(context.Background()); err != nil {
			t.Fatal(err)
		}
		if most.Load() != 1 {
			t.Fatalf("attempts at once: %d; want 1", most.Load())
		}
	})
}

// A failed attempt is retried by the service's policy, and what it did not
// keep is given back before the next.
func TestForStreamRetriesFailedAttempt(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Retry.InitialDelay = time.Millisecond
	cfg.Bulkheads["RETRYSVC"] = BulkheadConfig{Limit: 1}
	reg, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	calls := 0
	fn := ForStream(reg, "retrysvc", func(ctx context.Context) (int, error) {
		calls++
		if calls < 3 {
			return 0, errBoom
		}
		KeepAttempt(ctx).Release()
		return calls, nil
	})
	if v, err := fn(context.Background()); err != nil || v != 3 {
		t.Fatalf("fn() = %d, %v; want 3, nil", v, err)
	}
	if got := reg.Bulkhead("retrysvc").Stats().Active; got != 0 {
		t.Fatalf("Active = %d; want 0", got)
	}
}

// Outside a ForStream attempt, and with the registry disabled, KeepAttempt
// returns nil, whose methods do nothing.
func TestKeepAttemptNil(t *testing.T) {
	if k := KeepAttempt(context.Background()); k != nil {
		t.Fatalf("KeepAttempt(Background) = %v; want nil", k)
	}
	cfg := DefaultConfig()
	cfg.Enabled = false
	reg, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var kept *Kept
	fn := ForStream(reg, "off", func(ctx context.Context) (int, error) { kept = KeepAttempt(ctx); return 0, nil })
	if _, err := fn(context.Background()); err != nil {
		t.Fatal(err)
	}
	if kept != nil {
		t.Fatalf("KeepAttempt with the registry disabled = %v; want nil", kept)
	}
	kept.Touch()
	kept.Release()
	if kept.Expired() {
		t.Fatal("nil Kept: Expired() = true")
	}
	if _, err := ForStream[int](reg, "x", nil)(context.Background()); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("ForStream(nil fn)() = %v; want ErrInvalidConfig", err)
	}
}

// A panicking attempt gives its slot back.
func TestForStreamPanicGivesSlotBack(t *testing.T) {
	reg := mustRegistry(t, map[string]string{"BULKHEAD_PANICSVC_LIMIT": "1"})
	fn := ForStream(reg, "panicsvc", func(ctx context.Context) (int, error) { panic("boom") })
	func() {
		defer func() { _ = recover() }()
		fn(context.Background())
	}()
	if got := reg.Bulkhead("panicsvc").Stats().Active; got != 0 {
		t.Fatalf("Active = %d; want 0", got)
	}
}
