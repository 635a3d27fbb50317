package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// output collects what run writes, from its goroutine, for the test's.
type output struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (o *output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.Write(p)
}

func (o *output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// waitFor polls until cond holds or d has passed, and reports which.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// buildCLI builds cmd/resilience into a temporary directory.
func buildCLI(t *testing.T, ctx context.Context) string {
	t.Helper()
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command in PATH")
	}
	bin := filepath.Join(t.TempDir(), "resilience")
	cmd := exec.CommandContext(ctx, gobin, "build", "-o", bin, "github.com/resilience-go/resilience/cmd/resilience")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// TestAdmin runs the service and drives its admin endpoint with the
// resilience CLI, as an operator would.
func TestAdmin(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a binary and runs for a few seconds")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	bin := buildCLI(t, ctx)

	svcCtx, stop := context.WithCancel(ctx)
	defer stop()
	var out output
	done := make(chan error, 1)
	go func() { done <- run(svcCtx, "127.0.0.1:0", &out) }()
	defer func() {
		stop()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("run did not return within 10s of its context's end")
		}
	}()

	addrLine := regexp.MustCompile(`(?m)^admin endpoint: (http://127\.0\.0\.1:[0-9]+) \(loopback only\)$`)
	var url string
	if !waitFor(10*time.Second, func() bool {
		m := addrLine.FindStringSubmatch(out.String())
		if m != nil {
			url = m[1]
		}
		return m != nil
	}) {
		t.Fatalf("run did not report its admin address; output:\n%s", out.String())
	}
	if want := "go run ./cmd/resilience -addr " + url + " breakers"; !strings.Contains(out.String(), want) {
		t.Errorf("output lacks the hint %q; output:\n%s", want, out.String())
	}

	// resilience runs the CLI and returns its exit status and output.
	resilienceCLI := func(args ...string) (int, string, string) {
		cmd := exec.CommandContext(ctx, bin, append([]string{"-addr", url}, args...)...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		var ee *exec.ExitError
		switch {
		case err == nil:
			return 0, stdout.String(), stderr.String()
		case errors.As(err, &ee):
			return ee.ExitCode(), stdout.String(), stderr.String()
		}
		t.Fatalf("resilience %q: %v", args, err)
		return 0, "", ""
	}
	// inventory returns the inventory row of a breakers table.
	inventory := func(table string) []string {
		for line := range strings.Lines(table) {
			if f := strings.Fields(line); len(f) > 0 && f[0] == "inventory" {
				return f
			}
		}
		return nil
	}

	// The outage starts a second in; three failed calls open the breaker.
	var table string
	if !waitFor(15*time.Second, func() bool {
		_, table, _ = resilienceCLI("breakers")
		r := inventory(table)
		return r != nil && r[1] == "open"
	}) {
		t.Fatalf("the inventory breaker did not open; last table:\n%s\noutput:\n%s", table, out.String())
	}
	if !strings.Contains(table, "pricing ") {
		t.Errorf("breakers lacks pricing:\n%s", table)
	}

	for _, tc := range []struct{ cmd, state, forced string }{
		{"open", "open", "true"},
		{"close", "closed", "true"},
		{"reset", "closed", "false"},
	} {
		code, stdout, stderr := resilienceCLI(tc.cmd, "inventory")
		r := inventory(stdout)
		if code != 0 || r == nil || r[1] != tc.state || r[2] != tc.forced {
			t.Errorf("resilience %s inventory: exit %d, stdout %q, stderr %q; want state %s, forced %s",
				tc.cmd, code, stdout, stderr, tc.state, tc.forced)
		}
		if tc.cmd == "open" {
			// The service sees the forced state on its next tick.
			if !waitFor(5*time.Second, func() bool {
				return strings.Contains(out.String(), "breaker inventory: open, forced until reset\n")
			}) {
				t.Errorf("the service did not report the forced-open breaker; output:\n%s", out.String())
			}
		}
	}

	code, stdout, _ := resilienceCLI("-json", "bulkheads")
	var bs []resilience.BulkheadStatus
	if err := json.Unmarshal([]byte(stdout), &bs); code != 0 || err != nil {
		t.Fatalf("resilience -json bulkheads: exit %d, %v; output %q", code, err, stdout)
	}
	if len(bs) != 2 || bs[0].Name != "inventory" || bs[0].Limit != 4 || bs[1].Name != "pricing" || bs[1].Completed == 0 {
		t.Errorf("bulkheads = %+v; want inventory and pricing, limit 4, pricing used", bs)
	}

	code, _, stderr := resilienceCLI("reset", "nosuch")
	if code != 1 || !strings.Contains(stderr, `no circuit breaker named "nosuch"`) {
		t.Errorf("resilience reset nosuch: exit %d, stderr %q; want 1 and the endpoint's error", code, stderr)
	}

	stop()
	if !waitFor(10*time.Second, func() bool { return strings.Contains(out.String(), "stopping: ") }) {
		t.Errorf("run did not report stopping; output:\n%s", out.String())
	}
	for _, want := range []string{
		"downstream inventory: down, answering 503\n",
		"breaker inventory: open\n",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q; output:\n%s", want, out.String())
		}
	}
	if strings.Contains(out.String(), "\x1b[") {
		t.Errorf("output to a buffer has colours; output:\n%s", out.String())
	}
}

func TestRefusesPublicAddress(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	var out output
	err := run(ctx, "0.0.0.0:0", &out)
	if err == nil || !strings.Contains(err.Error(), "not a loopback address") {
		t.Errorf("run on 0.0.0.0:0 = %v; want a refusal", err)
	}
}

func TestAddressInUse(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	var first output
	done := make(chan error, 1)
	go func() { done <- run(ctx, "127.0.0.1:0", &first) }()
	addrLine := regexp.MustCompile(`admin endpoint: http://(127\.0\.0\.1:[0-9]+) `)
	var addr string
	if !waitFor(5*time.Second, func() bool {
		m := addrLine.FindStringSubmatch(first.String())
		if m != nil {
			addr = m[1]
		}
		return m != nil
	}) {
		t.Fatal("run did not report its address")
	}
	var other output
	if err := run(ctx, addr, &other); err == nil {
		t.Error("a second run on the same address succeeded")
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("first run: %v", err)
	}
}
