package resilience

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// chunkServer sends a chunk every gap for total, stalling once for stall
// after the first second if stall is positive.
func chunkServer(t *testing.T, gap, total, stall time.Duration) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		start := time.Now()
		stalled := false
		for time.Since(start) < total {
			if _, err := io.WriteString(w, "data: token\n\n"); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			wait := gap
			if stall > 0 && !stalled && time.Since(start) > time.Second {
				wait, stalled = stall, true
			}
			select {
			case <-r.Context().Done():
				return
			case <-time.After(wait): // the stream's pace, not a synchronisation
			}
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// An LLM answer streamed for 3s, a chunk every 100ms, through a 1s attempt
// timeout and a 500ms idle timeout, is read whole; one that stalls for 1s
// is cut with ErrTimeout and gives its slot back.
func TestTransportStreamOutlivesAttemptTimeout(t *testing.T) {
	env := map[string]string{"TIMEOUT_DEFAULT": "1", "TIMEOUT_DEFAULT_IDLE": "0.5", "BULKHEAD_DEFAULT_LIMIT": "1"}
	t.Run("steady", func(t *testing.T) {
		reg := transportRegistry(t, env)
		srv := chunkServer(t, 100*time.Millisecond, 3*time.Second, 0)
		resp, err := client(reg, srv.Client().Transport).Get(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatalf("after %v and %d bytes: %v; want the whole stream", time.Since(start), len(body), err)
		}
		if time.Since(start) < 2*time.Second {
			t.Fatalf("the stream ended after %v; want about 3s", time.Since(start))
		}
		if s := reg.Bulkhead("127.0.0.1").Stats(); s.Active != 0 {
			t.Fatalf("%+v after the stream; want the slot back", s)
		}
	})
	t.Run("stalled", func(t *testing.T) {
		reg := transportRegistry(t, env)
		srv := chunkServer(t, 100*time.Millisecond, 3*time.Second, time.Second)
		resp, err := client(reg, srv.Client().Transport).Get(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		_, err = io.ReadAll(resp.Body)
		if !errors.Is(err, ErrTimeout) {
			t.Fatalf("%v; want ErrTimeout from the idle timeout", err)
		}
		waitFor(t, 2*time.Second, "slot not given back after the idle timeout", func() bool {
			return reg.Bulkhead("127.0.0.1").Stats().Active == 0
		})
	})
}
