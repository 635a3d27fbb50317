package resilience

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

// TestForServiceNoHedgeNeverSendsTwice: with HEDGE_<SERVICE>_DELAY set, a
// slow call through ForService is hedged, and the same call through
// ForServiceNoHedge, with the service's other policies, is sent once.
func TestForServiceNoHedgeNeverSendsTwice(t *testing.T) {
	reg := mustRegistry(t, map[string]string{
		"HEDGE_NOHEDGESVC_DELAY": "5ms",
		"TIMEOUT_NOHEDGESVC":     "2s",
	})
	var calls atomic.Int32
	var deadline atomic.Bool
	slow := func(ctx context.Context) (int, error) {
		calls.Add(1)
		_, ok := ctx.Deadline()
		deadline.Store(ok)
		select {
		case <-time.After(60 * time.Millisecond):
		case <-ctx.Done():
		}
		return 1, nil
	}
	if _, err := ForService(reg, "nohedgesvc", slow)(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := calls.Load(); got < 2 {
		t.Fatalf("ForService: %d calls; want a hedge beside the first", got)
	}
	calls.Store(0)
	if _, err := ForServiceNoHedge(reg, "nohedgesvc", slow)(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := calls.Load(); got != 1 {
		t.Errorf("ForServiceNoHedge: %d calls; want 1, never hedged", got)
	}
	if !deadline.Load() {
		t.Error("ForServiceNoHedge's attempt has no deadline; want TIMEOUT_NOHEDGESVC's")
	}
	if _, err := ForServiceNoHedge[int](reg, "nohedgesvc", nil)(context.Background()); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("nil fn: %v; want ErrInvalidConfig", err)
	}
}
