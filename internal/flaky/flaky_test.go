package flaky

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// get sends one GET to srv and returns the status, the Retry-After header
// and the body.
func get(t *testing.T, ctx context.Context, srv *Server) (status int, retryAfter, body string, err error) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL()+"/", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		return 0, "", "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("Retry-After"), string(b), err
}

// giveUpOnArrival returns a context that is cancelled as soon as srv has
// received n requests: a client that gives up only once its request is
// surely in the server's hands. (A timeout instead could expire before the
// request arrives on a loaded machine, and the next request would then get
// the outcome meant for this one.)
func giveUpOnArrival(t *testing.T, srv *Server, n int64) context.Context {
	ctx, cancel := context.WithCancel(t.Context())
	t.Cleanup(cancel)
	go func() {
		defer cancel()
		for srv.Requests() < n {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	return ctx
}

// bounded returns a context that ends in 10s, so that a test that goes
// wrong fails instead of hanging.
func bounded(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestStartListensOnLoopback(t *testing.T) {
	t.Parallel()
	srv := Start(Script{})
	defer srv.Close()
	u, err := url.Parse(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	if got := u.Hostname(); got != "127.0.0.1" {
		t.Errorf("URL() host = %q; want 127.0.0.1", got)
	}
}

func TestZeroScriptAnswersOK(t *testing.T) {
	t.Parallel()
	srv := Start(Script{})
	defer srv.Close()
	for i := range 3 {
		status, _, body, err := get(t, bounded(t), srv)
		if err != nil {
			t.Fatalf("request %d: %v", i+1, err)
		}
		if status != http.StatusOK || body != "ok\n" {
			t.Errorf("request %d = %d %q; want 200 %q", i+1, status, body, "ok\n")
		}
	}
	if got := srv.Requests(); got != 3 {
		t.Errorf("Requests() = %d; want 3", got)
	}
	if got := srv.Successes(); got != 3 {
		t.Errorf("Successes() = %d; want 3", got)
	}
}

func TestPlanIsFollowedInOrder(t *testing.T) {
	t.Parallel()
	srv := Start(Script{
		Plan: append([]Outcome{
			Fail(529).WithRetryAfter(1500 * time.Millisecond),
			Fail(http.StatusTooManyRequests).WithRetryAfter(2 * time.Second),
		}, append(Repeat(Fail(http.StatusServiceUnavailable), 2), OK())...),
		Then: Fail(http.StatusInternalServerError),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.WriteString(w, "hello")
		}),
	})
	defer srv.Close()

	want := []struct {
		status     int
		retryAfter string
		body       string
	}{
		{529, "2", "status 529\n"}, // rounded up to whole seconds
		{429, "2", "Too Many Requests\n"},
		{503, "", "Service Unavailable\n"},
		{503, "", "Service Unavailable\n"},
		{200, "", "hello"},
		{500, "", "Internal Server Error\n"}, // Then, past the plan
		{500, "", "Internal Server Error\n"},
	}
	for i, w := range want {
		status, ra, body, err := get(t, bounded(t), srv)
		if err != nil {
			t.Fatalf("request %d: %v", i+1, err)
		}
		if status != w.status || ra != w.retryAfter || body != w.body {
			t.Errorf("request %d = %d, Retry-After %q, %q; want %d, %q, %q",
				i+1, status, ra, body, w.status, w.retryAfter, w.body)
		}
	}
	if got := srv.Requests(); got != int64(len(want)) {
		t.Errorf("Requests() = %d; want %d", got, len(want))
	}
	if got := srv.Successes(); got != 1 {
		t.Errorf("Successes() = %d; want 1", got)
	}
}

func TestSuccessesCountOnlyHandler2xx(t *testing.T) {
	t.Parallel()
	srv := Start(Script{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.URL.Query().Get("s") {
			case "created":
				w.WriteHeader(http.StatusCreated)
			case "bad":
				http.Error(w, "no", http.StatusBadRequest)
			case "empty":
				// Writes nothing: net/http answers 200.
			}
		}),
	})
	defer srv.Close()
	for _, tc := range []struct {
		query string
		want  int
	}{{"created", 201}, {"bad", 400}, {"empty", 200}} {
		resp, err := srv.Client().Get(srv.URL() + "/?s=" + tc.query)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("%s: status %d; want %d", tc.query, resp.StatusCode, tc.want)
		}
	}
	if got := srv.Successes(); got != 2 {
		t.Errorf("Successes() = %d; want 2 (201 and the empty 200)", got)
	}
}

func TestSlowAddsLatency(t *testing.T) {
	t.Parallel()
	const delay = 50 * time.Millisecond
	srv := Start(Script{Plan: []Outcome{Slow(delay)}})
	defer srv.Close()
	start := time.Now()
	status, _, _, err := get(t, bounded(t), srv)
	if err != nil {
		t.Fatal(err)
	}
	if elapsed := time.Since(start); elapsed < delay {
		t.Errorf("slow request took %v; want at least %v", elapsed, delay)
	}
	if status != http.StatusOK {
		t.Errorf("status = %d; want 200", status)
	}
	if got := srv.Successes(); got != 1 {
		t.Errorf("Successes() = %d; want 1", got)
	}
}

func TestSlowFailure(t *testing.T) {
	t.Parallel()
	srv := Start(Script{Plan: []Outcome{{Delay: 10 * time.Millisecond, Status: 503}}})
	defer srv.Close()
	status, _, _, err := get(t, bounded(t), srv)
	if err != nil {
		t.Fatal(err)
	}
	if status != http.StatusServiceUnavailable {
		t.Errorf("status = %d; want 503", status)
	}
}

func TestSlowEndsWhenClientGivesUp(t *testing.T) {
	t.Parallel()
	srv := Start(Script{Plan: []Outcome{Slow(time.Hour)}})
	defer srv.Close()
	_, _, _, err := get(t, giveUpOnArrival(t, srv, 1), srv)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v; want context.Canceled", err)
	}
	// The next request is served normally: the slow one did not block it.
	status, _, _, err := get(t, bounded(t), srv)
	if err != nil || status != http.StatusOK {
		t.Fatalf("next request = %d, %v; want 200", status, err)
	}
	if got := srv.Successes(); got != 1 {
		t.Errorf("Successes() = %d; want 1 (the slow request was never answered)", got)
	}
}

func TestHangUntilClientGivesUp(t *testing.T) {
	t.Parallel()
	srv := Start(Script{Plan: []Outcome{Hang()}})
	defer srv.Close()
	_, _, _, err := get(t, giveUpOnArrival(t, srv, 1), srv)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v; want context.Canceled", err)
	}
	// The next request is past the plan: answered.
	status, _, _, err := get(t, bounded(t), srv)
	if err != nil || status != http.StatusOK {
		t.Fatalf("next request = %d, %v; want 200", status, err)
	}
	if got := srv.Successes(); got != 1 {
		t.Errorf("Successes() = %d; want 1", got)
	}
}

func TestCloseReleasesHangingRequests(t *testing.T) {
	t.Parallel()
	srv := Start(Script{Then: Hang()})
	const n = 3
	errs := make(chan error, n)
	for range n {
		go func() {
			_, _, _, err := get(t, context.Background(), srv) // Close alone must end it
			errs <- err
		}()
	}
	// Wait until every request has arrived and hangs.
	for srv.Requests() < n {
		time.Sleep(time.Millisecond)
	}
	done := make(chan struct{})
	go func() {
		srv.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return while requests were hanging")
	}
	for range n {
		if err := <-errs; err == nil {
			t.Error("a hanging request got an answer when the server closed; want an error")
		}
	}
	srv.Close() // a second Close does nothing
}

func TestConcurrentRequestsFollowThePlan(t *testing.T) {
	t.Parallel()
	const n = 40
	plan := append(Repeat(Fail(503), n/2), Repeat(OK(), n/2)...)
	srv := Start(Script{Plan: plan, Then: Fail(500)})
	defer srv.Close()
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		counts = map[int]int{}
	)
	for range n {
		wg.Go(func() {
			status, _, _, err := get(t, bounded(t), srv)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			counts[status]++
			mu.Unlock()
		})
	}
	wg.Wait()
	if counts[503] != n/2 || counts[200] != n/2 || len(counts) != 2 {
		t.Errorf("statuses = %v; want %d x 503 and %d x 200", counts, n/2, n/2)
	}
	if got := srv.Requests(); got != n {
		t.Errorf("Requests() = %d; want %d", got, n)
	}
	if got := srv.Successes(); got != n/2 {
		t.Errorf("Successes() = %d; want %d", got, n/2)
	}
}

func TestScriptIsCopied(t *testing.T) {
	t.Parallel()
	plan := []Outcome{Fail(503)}
	srv := Start(Script{Plan: plan})
	defer srv.Close()
	plan[0] = OK()
	status, _, _, err := get(t, bounded(t), srv)
	if err != nil {
		t.Fatal(err)
	}
	if status != 503 {
		t.Errorf("status = %d; want 503: changing the plan after Start must not matter", status)
	}
}

func TestRepeat(t *testing.T) {
	t.Parallel()
	if got := Repeat(Fail(503), 0); len(got) != 0 {
		t.Errorf("Repeat(_, 0) has %d outcomes; want 0", len(got))
	}
	if got := Repeat(Fail(503), -1); len(got) != 0 {
		t.Errorf("Repeat(_, -1) has %d outcomes; want 0", len(got))
	}
	got := Repeat(Fail(503).WithRetryAfter(time.Second), 2)
	want := Outcome{Status: 503, RetryAfter: time.Second}
	if len(got) != 2 || got[0] != want || got[1] != want {
		t.Errorf("Repeat = %+v; want two of %+v", got, want)
	}
}

func TestBodyOfStatusWithoutText(t *testing.T) {
	t.Parallel()
	srv := Start(Script{Plan: []Outcome{Fail(599)}})
	defer srv.Close()
	_, _, body, err := get(t, bounded(t), srv)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(body, "599") {
		t.Errorf("body = %q; want it to name the status", body)
	}
}
