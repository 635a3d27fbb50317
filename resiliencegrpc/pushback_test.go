package resiliencegrpc

import (
	"context"
	"errors"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// The pushback trailer, as gRFC A6 says: a valid value is the wait before
// the next attempt, exactly; a negative or malformed one, or two values,
// stop the retries; one longer than MaxDelay ends them too.
func TestUnaryPushback(t *testing.T) {
	tests := []struct {
		name    string
		code    codes.Code
		trailer []string
		hits    int32
		wait    time.Duration // the wait before the retry, when there is one
	}{
		{"honoured", codes.Unavailable, []string{PushbackKey, "30"}, 2, 30 * time.Millisecond},
		{"zero", codes.ResourceExhausted, []string{PushbackKey, "0"}, 2, 0},
		{"negative", codes.Unavailable, []string{PushbackKey, "-1"}, 1, 0},
		{"malformed", codes.Unavailable, []string{PushbackKey, "soon"}, 1, 0},
		{"fraction", codes.Unavailable, []string{PushbackKey, "1.5"}, 1, 0},
		{"two values", codes.Unavailable, []string{PushbackKey, "10", PushbackKey, "20"}, 1, 0},
		{"beyond MaxDelay", codes.Unavailable, []string{PushbackKey, "5000"}, 1, 0},
		// A pushback does not make a status retryable.
		{"not retryable", codes.Internal, []string{PushbackKey, "10"}, 1, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var mu sync.Mutex
			var waits []time.Duration
			reg := registry(t, func(c *resilience.Config) {
				c.Retry.InitialDelay = 200 * time.Millisecond // never what a pushback says
				c.Retry.OnRetry = func(_ int, _ error, d time.Duration) {
					mu.Lock()
					waits = append(waits, d)
					mu.Unlock()
				}
			})
			h := newHealth(step{code: tt.code, trailer: tt.trailer}, step{})
			c := healthClient(t, tcp, h, reg)
			_, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{})
			if got := h.hits.Load(); got != tt.hits {
				t.Fatalf("attempts = %d; want %d (err %v)", got, tt.hits, err)
			}
			mu.Lock()
			defer mu.Unlock()
			if tt.hits == 2 {
				if err != nil || len(waits) != 1 || waits[0] != tt.wait {
					t.Fatalf("err %v, waits %v; want success after one wait of %v", err, waits, tt.wait)
				}
				return
			}
			if status.Code(err) != tt.code || len(waits) != 0 {
				t.Fatalf("err %v, waits %v; want %v and no retry", err, waits, tt.code)
			}
		})
	}
}

// A pushback longer than MaxDelay ends the retries, and the library's error
// passes the server's wish on.
func TestUnaryPushbackBeyondMaxDelayReported(t *testing.T) {
	reg := registry(t, nil)
	h := newHealth(step{code: codes.Unavailable, trailer: []string{PushbackKey, "5000"}})
	c := healthClient(t, bufnet, h, reg)
	_, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{})
	var re *resilience.Error
	if !errors.As(err, &re) || !errors.Is(err, resilience.ErrRetryExhausted) || re.RetryAfter() != 5*time.Second {
		t.Fatalf("err = %v; want ErrRetryExhausted with RetryAfter 5s", err)
	}
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("status.Code = %v; want the server's UNAVAILABLE", status.Code(err))
	}
}

func TestParsePushback(t *testing.T) {
	tests := []struct {
		in   string
		d    time.Duration
		okay bool
	}{
		{"0", 0, true},
		{"250", 250 * time.Millisecond, true},
		{" 7 ", 7 * time.Millisecond, true},
		{"99999999999999999999999", math.MaxInt64, true},
		{"9223372036854775807", math.MaxInt64, true},
		{"", 0, false},
		{"-1", 0, false},
		{"+5", 0, false},
		{"1e3", 0, false},
		{"10ms", 0, false},
		{"0x10", 0, false},
	}
	for _, tt := range tests {
		d, ok := parsePushback(tt.in)
		if d != tt.d || ok != tt.okay {
			t.Errorf("parsePushback(%q) = %v, %v; want %v, %v", tt.in, d, ok, tt.d, tt.okay)
		}
	}
}

// FuzzParsePushback: never a panic, never a negative wait, and a value is
// accepted exactly when it is digits, as gRFC A6's non-negative integer.
func FuzzParsePushback(f *testing.F) {
	for _, s := range []string{"0", "100", "-1", "abc", "1.5", " 12 ", "99999999999999999999", "", "+1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, ok := parsePushback(s)
		if d < 0 {
			t.Fatalf("parsePushback(%q) = %v: negative", s, d)
		}
		trimmed := strings.TrimSpace(s)
		digits := trimmed != "" && strings.Trim(trimmed, "0123456789") == ""
		if ok != digits {
			t.Fatalf("parsePushback(%q) ok = %v; want %v", s, ok, digits)
		}
		if !ok && d != 0 {
			t.Fatalf("parsePushback(%q) = %v, false; want 0", s, d)
		}
	})
}
