package resilience

import (
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func statusResponse(r *http.Request, code int, h http.Header) *http.Response {
	if h == nil {
		h = http.Header{}
	}
	return &http.Response{StatusCode: code, Header: h, Body: io.NopCloser(strings.NewReader("x")), ContentLength: -1, Request: r}
}

// A 429 that says the provider's request window is spent until 2s from now
// pauses every goroutine of the service: the server sees no request then.
func TestTransportSpentWindowPausesTheService(t *testing.T) {
	for _, tc := range []struct {
		name   string
		header func(now time.Time) http.Header
	}{
		{"openai", func(time.Time) http.Header {
			return http.Header{"X-Ratelimit-Remaining-Requests": {"0"}, "X-Ratelimit-Reset-Requests": {"2s"}}
		}},
		{"anthropic", func(now time.Time) http.Header {
			return http.Header{"Anthropic-Ratelimit-Tokens-Remaining": {"0"},
				"Anthropic-Ratelimit-Tokens-Reset": {now.Add(2 * time.Second).UTC().Format(time.RFC3339)}}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				reg := mustRegistry(t, map[string]string{"RETRY_MAX_ATTEMPTS": "3", "RETRY_EXPONENTIAL_MAX": "0.1", "RETRY_JITTER": "false"})
				var mu sync.Mutex
				var sent []time.Duration
				start := time.Now()
				client := &http.Client{Transport: &Transport{Registry: reg, Base: roundTripFunc(func(r *http.Request) (*http.Response, error) {
					mu.Lock()
					defer mu.Unlock()
					sent = append(sent, time.Since(start))
					if len(sent) == 1 {
						return statusResponse(r, http.StatusTooManyRequests, tc.header(time.Now())), nil
					}
					return statusResponse(r, http.StatusOK, nil), nil
				})}}
				get := func() {
					resp, err := client.Get("http://api.provider/")
					if err != nil {
						t.Error(err)
						return
					}
					resp.Body.Close()
				}
				get() // the 429, then its retry waits out the pause
				var wg sync.WaitGroup
				for range 5 {
					wg.Go(get)
				}
				wg.Wait()
				for _, at := range sent[1:] {
					if at < 2*time.Second {
						t.Errorf("a request at %v, inside the 2s the provider asked for; all: %v", at, sent)
					}
				}
				if len(sent) != 7 {
					t.Errorf("%d requests; want 7: the 429, its retry and 5 more", len(sent))
				}
			})
		})
	}
}

func TestTransportShouldRetryHeader(t *testing.T) {
	for _, tc := range []struct {
		name      string
		code      int
		header    string
		method    string
		wantCalls int
	}{
		{"false stops a 503", http.StatusServiceUnavailable, "false", http.MethodGet, 1},
		{"true retries a 409", http.StatusConflict, "true", http.MethodGet, 3},
		{"true retries a 500 to a POST", http.StatusInternalServerError, "true", http.MethodPost, 3},
		{"529 is retried like 503", statusOverloaded, "", http.MethodGet, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				reg := mustRegistry(t, map[string]string{"RETRY_MAX_ATTEMPTS": "3", "RETRY_EXPONENTIAL_MAX": "0.1"})
				calls := 0
				client := &http.Client{Transport: &Transport{Registry: reg, Base: roundTripFunc(func(r *http.Request) (*http.Response, error) {
					calls++
					h := http.Header{}
					if tc.header != "" {
						h.Set("X-Should-Retry", tc.header)
					}
					return statusResponse(r, tc.code, h), nil
				})}}
				req, _ := http.NewRequestWithContext(context.Background(), tc.method, "http://api.provider/", strings.NewReader("{}"))
				resp, err := client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if calls != tc.wantCalls {
					t.Errorf("%d requests; want %d", calls, tc.wantCalls)
				}
			})
		})
	}
}
