package browser

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"log/slog"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/resilience-go/resilience"
)

var updateDocs = flag.Bool("update-docs", false, "copy the screenshot to docs/status-page.png, the README's")

const token = "9d2e4b7c1a8f4e6d8c3b5a7f9e1d2c4b"

// chromium returns the path of the browser, skipping the test without one
// unless it runs in CI, where a missing browser is a failure.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if path, err := exec.LookPath(name); err == nil {
			return path
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("no chromium in PATH: .ci/run installs Debian's chromium package, and CI must run this test")
	}
	t.Skip("no chromium in PATH: apt-get install --no-install-recommends chromium to run this test")
	return ""
}

// browser starts a headless Chromium and returns a tab's context, ended
// when the test ends.
func browser(t *testing.T) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium(t)),
		chromedp.WindowSize(1200, 820),
	)
	if os.Geteuid() == 0 {
		opts = append(opts, chromedp.NoSandbox) // Chromium's sandbox refuses root
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	ctx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	t.Cleanup(cancelAlloc)
	ctx, cancelTab := chromedp.NewContext(ctx)
	t.Cleanup(cancelTab)
	// Start the browser and open the tab now, on the test's context: one
	// started by a step's shorter context would end with the step.
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("starting chromium: %v", err)
	}
	return ctx
}

// fixture is a registry with a breaker of each state, counts, a busy
// bulkhead and a chaos switch, served by NewAdminHandler with a token on a
// loopback server.
type fixture struct {
	reg  *resilience.Registry
	url  string
	logs *syncBuffer
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	cfg, err := resilience.LoadConfigWith(resilience.LoadOptions{Environment: map[string]string{
		"RESILIENCE_CHAOS":                     "true",
		"CIRCUIT_BREAKER_PAYMENTS_FAIL_MAX":    "3",
		"CIRCUIT_BREAKER_PAYMENTS_TIMEOUT":     "1h",
		"CIRCUIT_BREAKER_AUTH_FAIL_MAX":        "5",
		"CIRCUIT_BREAKER_INVENTORY_FAIL_MAX":   "5",
		"CIRCUIT_BREAKER_SEARCH_FAIL_MAX":      "1",
		"CIRCUIT_BREAKER_SEARCH_TIMEOUT":       "1ms",
		"BULKHEAD_LLM_LIMIT":                   "10",
		"BULKHEAD_EMBEDDINGS_LIMIT":            "4",
		"CHAOS_SEARCH_ERROR_RATE":              "0.2",
		"CHAOS_SEARCH_LATENCY":                 "300ms",
		"CHAOS_SEARCH_LATENCY_RATE":            "0.5",
		"CIRCUIT_BREAKER_RECOMMENDATIONS_MODE": "shadow",
	}})
	if err != nil {
		t.Fatal(err)
	}
	reg, err := resilience.NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	call := func(name string, fail bool) {
		resilience.WithCircuitBreaker(func(context.Context) (int, error) {
			if fail {
				return 0, errors.New("down")
			}
			return 1, nil
		}, reg.CircuitBreaker(name))(ctx)
	}
	for range 40 {
		call("auth", false)
	}
	call("auth", true)
	for range 12 {
		call("inventory", false)
	}
	for range 3 {
		call("payments", true) // open for an hour
	}
	call("search", true) // open for 1ms, then half-open
	call("recommendations", false)
	if got := reg.CircuitBreaker("payments").State(); got != resilience.StateOpen {
		t.Fatalf("payments is %v; want open", got)
	}
	for range 3 {
		release, err := reg.Bulkhead("llm").Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(release)
	}
	reg.Bulkhead("embeddings")

	logs := &syncBuffer{}
	srv := httptest.NewServer(resilience.NewAdminHandler(resilience.AdminConfig{
		Registry: reg, Token: token, Logger: slog.New(slog.NewTextHandler(logs, nil)),
	}))
	t.Cleanup(srv.Close)
	return &fixture{reg: reg, url: srv.URL, logs: logs}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// stateCell is a breaker's state as the page shows it.
type stateCell struct {
	Text   string `json:"text"`
	Class  string `json:"class"`
	Color  string `json:"color"`
	Forced bool   `json:"forced"`
}

func readState(t *testing.T, ctx context.Context, breaker string) stateCell {
	t.Helper()
	c, err := chromedp.Run(ctx, chromedp.Evaluate[stateCell](`(() => {
		const row = document.querySelector('tr[data-breaker="`+breaker+`"]');
		const s = row.querySelector('.state');
		return {text: s.textContent, class: s.className, color: getComputedStyle(s).color,
			forced: row.querySelector('.badge-forced') !== null};
	})()`))
	if err != nil {
		t.Fatalf("reading the state of %s: %v", breaker, err)
	}
	return c
}

func row(name string) string { return `tr[data-breaker="` + name + `"]` }

// TestStatusPage signs in with the token, sees an open breaker shown as
// open in red, resets it with its button and sees it closed, in the page
// and in the registry; then forces one open and sees the page follow a
// change made elsewhere, by its own refresh.
func TestStatusPage(t *testing.T) {
	f := newFixture(t)
	ctx := browser(t)

	// Without the token in the tab, the page asks for it; a wrong one is
	// refused.
	if err := do(t, ctx,
		chromedp.Navigate(f.url+"/"),
		chromedp.WaitVisible(chromedp.ID("login-form")),
		chromedp.SendKeys(chromedp.ID("token"), "wrong"),
		chromedp.Click(chromedp.CSS("#login-form button")),
		chromedp.WaitVisible(chromedp.ID("login")),
	); err != nil {
		t.Fatal(err)
	}
	msg, err := chromedp.Run(ctx, chromedp.Poll[string](`document.getElementById('login-error').textContent || null`))
	if err != nil || !strings.Contains(msg, "refused") {
		t.Fatalf("after a wrong token the page says %q (%v); want it refused", msg, err)
	}

	if err := do(t, ctx,
		chromedp.SendKeys(chromedp.ID("token"), token),
		chromedp.Click(chromedp.CSS("#login-form button")),
		chromedp.WaitVisible(chromedp.CSS(row("payments")+" .state-open")),
		chromedp.WaitVisible(chromedp.CSS(`tr[data-bulkhead="llm"]`)),
		chromedp.WaitVisible(chromedp.CSS(`tr[data-service="SEARCH"]`)),
	); err != nil {
		t.Fatal(err)
	}
	open, closed := readState(t, ctx, "payments"), readState(t, ctx, "auth")
	if open.Text != "open" || !strings.Contains(open.Class, "state-open") || open.Forced {
		t.Errorf("payments shows %+v; want open, in the open class, not forced", open)
	}
	if closed.Text != "closed" || !strings.Contains(closed.Class, "state-closed") {
		t.Errorf("auth shows %+v; want closed", closed)
	}
	if open.Color == closed.Color || open.Color == "" {
		t.Errorf("open and closed are both in colour %q", open.Color)
	}
	if half := readState(t, ctx, "search"); half.Text != "half-open" || !strings.Contains(half.Class, "state-half-open") {
		t.Errorf("search shows %+v; want half-open", half)
	}
	cells, err := chromedp.Run(ctx, chromedp.Evaluate[[]string](
		`Array.from(document.querySelectorAll('tr[data-bulkhead="llm"] td, tr[data-service="SEARCH"] td')).map((c) => c.textContent.trim())`))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(cells, "|"); !strings.HasPrefix(got, "llm|3|0|10|0|0|SEARCH|injecting|20%|300ms|50%") {
		t.Errorf("bulkhead and chaos cells = %q; want llm 3 active of 10, SEARCH injecting 20%%, 300ms at 50%%", got)
	}

	shot, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	writeScreenshot(t, shot)

	// Reset closes payments, through the JSON route and its guards.
	if err := do(t, ctx,
		chromedp.Click(chromedp.CSS(row("payments")+` button[data-action="reset"]`)),
		chromedp.WaitVisible(chromedp.CSS(row("payments")+" .state-closed")),
	); err != nil {
		t.Fatal(err)
	}
	if s := readState(t, ctx, "payments"); s.Text != "closed" || s.Forced {
		t.Errorf("after reset payments shows %+v; want closed", s)
	}
	if got := f.reg.CircuitBreaker("payments").State(); got != resilience.StateClosed {
		t.Errorf("after reset the payments breaker is %v; want closed", got)
	}
	logs := f.logs.String()
	if !strings.Contains(logs, "action=reset breaker=payments") || !strings.Contains(logs, "HeadlessChrome") {
		t.Errorf("the reset is not logged with the browser's user agent:\n%s", logs)
	}

	// Force open, from the page.
	if err := do(t, ctx,
		chromedp.Click(chromedp.CSS(row("auth")+` button[data-action="open"]`)),
		chromedp.WaitVisible(chromedp.CSS(row("auth")+" .state-open")),
	); err != nil {
		t.Fatal(err)
	}
	if s := readState(t, ctx, "auth"); !s.Forced || !f.reg.CircuitBreaker("auth").Forced() {
		t.Errorf("after force open auth shows %+v; want forced, as the breaker is", s)
	}

	// Stop the chaos of SEARCH, from the page.
	if err := do(t, ctx,
		chromedp.Click(chromedp.CSS(`tr[data-service="SEARCH"] .act-chaos-off`)),
		chromedp.WaitVisible(chromedp.CSS(`tr[data-service="SEARCH"] .act-chaos-on`)),
	); err != nil {
		t.Fatal(err)
	}
	if st := f.reg.Status().Chaos; len(st) != 1 || st[0].Active || !st[0].Stopped {
		t.Errorf("after stop the chaos is %+v; want SEARCH stopped", st)
	}
	if !strings.Contains(f.logs.String(), "action=chaos_off service=SEARCH") {
		t.Errorf("the chaos stop is not logged:\n%s", f.logs)
	}

	// A change made elsewhere shows at the next refresh.
	f.reg.CircuitBreaker("inventory").ForceOpen()
	if err := do(t, ctx, chromedp.WaitVisible(chromedp.CSS(row("inventory")+" .state-open"))); err != nil {
		t.Fatalf("the page did not refresh itself: %v", err)
	}
}

// do runs steps, each within 15s; when one fails, it logs the page's text
// and writes its screenshot to testdata/failure.png, to see what the
// browser showed instead.
func do(t *testing.T, ctx context.Context, steps ...chromedp.Action[chromedp.Void]) error {
	t.Helper()
	for _, step := range steps {
		sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		_, err := chromedp.Run(sctx, step)
		cancel()
		if err != nil {
			text, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body.innerText`))
			t.Logf("the page shows:\n%s", text)
			if png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100)); err == nil && os.MkdirAll("testdata", 0o755) == nil {
				os.WriteFile(filepath.Join("testdata", "failure.png"), png, 0o644)
				t.Logf("screenshot: testdata/failure.png")
			}
			return err
		}
	}
	return nil
}

// writeScreenshot writes the page's screenshot to testdata, and to docs
// with -update-docs.
func writeScreenshot(t *testing.T, png []byte) {
	t.Helper()
	if !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) {
		t.Fatalf("the screenshot is not a PNG: % x", png[:min(8, len(png))])
	}
	if err := os.MkdirAll("testdata", 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join("testdata", "status-page.png")
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", path)
	if *updateDocs {
		docs := filepath.Join("..", "..", "docs", "status-page.png")
		if err := os.WriteFile(docs, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot: %s", docs)
	}
}
