package resilience

import (
	"context"
	"errors"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// Regressions found in review of the flow control, each named after what
// broke.

// R1: Charge loops n/Burst times: a huge (bad) n hangs the caller.

func TestRateLimiterChargeHugeReturns(t *testing.T) {
	l, _ := NewRateLimiter(RateLimiterConfig{Limit: 1, Burst: 1})
	done := make(chan struct{})
	go func() { l.Charge(math.MaxInt); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("Charge(math.MaxInt) did not return within 2s")
	}
}

// R2: given-back tokens are credit on top of a full bucket: 2x Burst at once.

func TestRateLimiterGiveBackNeverExceedsBurst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tl, _ := NewRateLimiter(RateLimiterConfig{Limit: 100, Per: time.Minute, Burst: 100})
		f := Compose(func(context.Context) (int, error) { return 0, nil }, Stack[int]{
			TokenLimiter: tl, Tokens: func(context.Context) int { return 100 }, TokensUsed: func(int) int { return 0 }})
		if _, err := f(context.Background()); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Minute) // quiet spell: bucket full again
		got := 0
		for tl.Allow(100) {
			got += 100
			if got > 1000 {
				break
			}
		}
		if got > 100 {
			t.Fatalf("granted %d permits at one instant, Burst is 100", got)
		}
	})
}

// R3: a permit wait refused because of TotalTimeout ends with ErrRateLimited, not ErrTimeout.

func TestTotalTimeoutRefusedPermitWaitIsTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l, _ := NewRateLimiter(RateLimiterConfig{Limit: 1, Per: time.Minute, Burst: 1})
		l.Allow(1) // next permit in 60s
		f := Compose(func(context.Context) (int, error) { return 1, nil }, Stack[int]{RateLimiter: l, TotalTimeout: 5 * time.Second})
		_, err := f(context.Background())
		if !errors.Is(err, ErrTimeout) {
			t.Fatalf("err = %v; want match ErrTimeout (wait would outlast TotalTimeout)", err)
		}
	})
}

// R4: Transport with a total timeout: the total-timeout context outlives the closed body.

func TestRateLimiterPauseUntilFarFuture(t *testing.T) {
	l, _ := NewRateLimiter(RateLimiterConfig{Limit: 10, Burst: 10})
	l.PauseUntil(time.Now().AddDate(300, 0, 0))
	if l.Allow(1) {
		t.Fatal("permit granted during a pause until 300 years from now")
	}
}

// R6: a provider's far-future reset overflows UnixNano: the 429 pauses nothing.

func TestTransportFarResetPausesTheService(t *testing.T) {
	for _, h := range []http.Header{
		{"Anthropic-Ratelimit-Requests-Remaining": {"0"}, "Anthropic-Ratelimit-Requests-Reset": {"9999-12-31T23:59:59Z"}},
		{"X-Ratelimit-Remaining-Requests": {"0"}, "X-Ratelimit-Reset-Requests": {"2000000h"}},
	} {
		reg := mustRegistry(t, map[string]string{"RETRY_MAX_ATTEMPTS": "1"})
		var sent atomic.Int32
		client := &http.Client{Transport: &Transport{Registry: reg, Base: roundTripFunc(func(r *http.Request) (*http.Response, error) {
			if sent.Add(1) == 1 {
				return statusResponse(r, http.StatusTooManyRequests, h), nil
			}
			return statusResponse(r, http.StatusOK, nil), nil
		})}}
		resp, err := client.Get("http://api.provider/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://api.provider/", nil)
		resp, err = client.Do(req)
		cancel()
		if err == nil {
			resp.Body.Close()
		}
		if sent.Load() != 1 {
			t.Errorf("%v: second request sent during the provider's pause (err=%v)", h, err)
		}
	}
}

// R7: with a total timeout, the failing response Transport hands back after

// its retries is already cancelled: its body cannot be read.

func TestTotalTimeoutLastStatusBodyReadable(t *testing.T) {
	big := strings.Repeat("e", 1<<20)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
		for i := 0; i < 4; i++ {
			io.WriteString(w, big[:len(big)/4])
			w.(http.Flusher).Flush()
			time.Sleep(20 * time.Millisecond)
		}
	}))
	defer srv.Close()
	for _, total := range []string{"none", "1h"} {
		env := map[string]string{"RETRY_MAX_ATTEMPTS": "2", "RETRY_EXPONENTIAL_MAX": "0.01", "RETRY_JITTER": "false"}
		if total != "none" {
			env["TIMEOUT_DEFAULT_TOTAL"] = total
		}
		reg := mustRegistry(t, env)
		tr := &http.Transport{}
		client := &http.Client{Transport: &Transport{Registry: reg, Base: tr}}
		resp, err := client.Get(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		tr.CloseIdleConnections()
		if err != nil || len(b) != len(big) {
			t.Errorf("total=%s: status %d, read %d bytes, err %v", total, resp.StatusCode, len(b), err)
		}
	}
}
