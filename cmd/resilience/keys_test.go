package main

import (
	"encoding/json"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestKeys(t *testing.T) {
	f := newKeyFixture(t)
	code, out, errs := cli(nil, "-addr", f.url, "keys", "llm")
	if code != exitOK || errs != "" {
		t.Fatalf("keys llm: exit %d, stderr %q", code, errs)
	}
	rows := table(t, out)
	if got, want := strings.Join(rows[0], " "), "KEY STATE SINCE MODE OPEN_PERIOD PROBE_IN"; got != want {
		t.Errorf("header = %q; want %q", got, want)
	}
	// Sorted; the key with a space printed as one word.
	if got, want := column(t, out), []string{"-dash", `"eu\x20west/1"`, "t-a", "t-b"}; !slices.Equal(got, want) {
		t.Errorf("keys printed %q; want %q:\n%s", got, want, out)
	}
	r := row(t, out, "t-a")
	since, err := time.Parse(time.RFC3339, r[2])
	if r[1] != "open" || err != nil || time.Since(since) > time.Minute || strings.Join(r[3:5], " ") != "normal 1h0m0s" {
		t.Errorf("t-a row = %q; want open, since about now, normal, 1h0m0s", r)
	}
	if probe, err := time.ParseDuration(r[5]); err != nil || probe > time.Hour || probe < time.Hour-time.Minute {
		t.Errorf("t-a PROBE_IN = %q; want a little under 1h", r[5])
	}

	// Page by page: the command for the next page on stderr, then none.
	code, out, errs = cli(nil, "-addr", f.url, "keys", "llm", "--limit", "2")
	want := "resilience: more open keys follow: resilience keys llm -limit 2 -after 'eu west/1'\n"
	if code != exitOK || !slices.Equal(column(t, out), []string{"-dash", `"eu\x20west/1"`}) || errs != want {
		t.Errorf("keys llm --limit 2: exit %d, stdout\n%s\nstderr %q; want 2 keys and %q", code, out, errs, want)
	}
	code, out, errs = cli(nil, "-addr", f.url, "keys", "llm", "--limit", "2", "--after", "eu west/1")
	if code != exitOK || !slices.Equal(column(t, out), []string{"t-a", "t-b"}) || errs != "" {
		t.Errorf("the second page: exit %d, stdout\n%s\nstderr %q; want t-a, t-b and no next", code, out, errs)
	}
	code, out, errs = cli(nil, "-addr", f.url, "-json", "keys", "llm", "-limit", "1", "-after", "-dash")
	var page keysPage
	if code != exitOK || errs != "" || json.Unmarshal([]byte(out), &page) != nil || page.Service != "llm" ||
		len(page.OpenKeys) != 1 || page.OpenKeys[0].Key != "eu west/1" || page.Next != "eu west/1" {
		t.Errorf("-json keys llm -limit 1 -after -dash: exit %d, stdout %q, stderr %q; want the page's JSON", code, out, errs)
	}
	code, out, errs = cli(nil, "-addr", f.url, "keys", "llm", "-limit", "1001")
	if code != exitServer || out != "" || !strings.Contains(errs, `bad limit "1001"`) {
		t.Errorf("keys llm -limit 1001: exit %d, stdout %q, stderr %q; want %d and the endpoint's error", code, out, errs, exitServer)
	}
	code, _, errs = cli(nil, "-addr", f.url, "keys", "nope")
	if code != exitServer || !strings.Contains(errs, `no circuit breaker named "nope"`) {
		t.Errorf("keys nope: exit %d, stderr %q; want %d and the endpoint's error", code, errs, exitServer)
	}
}

// TestResetKey resets keys, one with a space and one with a leading dash,
// and checks the output, the calls under them, and the other keys.
func TestResetKey(t *testing.T) {
	f := newKeyFixture(t)
	for _, args := range [][]string{{"eu west/1"}, {"--", "-dash"}} {
		key := args[len(args)-1]
		code, out, errs := cli(nil, append([]string{"-addr", f.url, "reset-key", "llm"}, args...)...)
		rows := table(t, out)
		if code != exitOK || errs != "" || len(rows) != 2 || rows[1][1] != "closed" || rows[1][5] != "-" {
			t.Fatalf("reset-key llm %q: exit %d, stdout\n%s\nstderr %q; want its row, closed", args, code, out, errs)
		}
		if ran, err := f.call(t, key, nil); !ran || err != nil {
			t.Errorf("a call under %q after reset-key: ran %v, %v; want it through", key, ran, err)
		}
	}
	if ran, _ := f.call(t, "t-a", nil); ran {
		t.Error("a call under t-a ran; want it rejected, its breaker still open")
	}
	if code, out, _ := cli(nil, "-addr", f.url, "keys", "llm"); code != exitOK || !slices.Equal(column(t, out), []string{"t-a", "t-b"}) {
		t.Errorf("keys after the resets: exit %d\n%s\nwant t-a and t-b", code, out)
	}

	for _, tc := range []struct{ service, key, want string }{
		{"llm", "nosuch", `resilience: no breaker for key "nosuch" of "llm"`},
		{"nope", "t-a", `resilience: no circuit breaker named "nope" (HTTP 404`},
	} {
		code, out, errs := cli(nil, "-addr", f.url, "reset-key", tc.service, tc.key)
		if code != exitServer || out != "" || !strings.HasPrefix(errs, tc.want) {
			t.Errorf("reset-key %s %s: exit %d, stdout %q, stderr %q; want %d and %q", tc.service, tc.key, code, out, errs, exitServer, tc.want)
		}
	}
}

func TestKeyCell(t *testing.T) {
	for _, tc := range []struct{ key, want string }{
		{"t-a", "t-a"},
		{"acme/eu?x=1&y=%2F", "acme/eu?x=1&y=%2F"},
		{"eu west", `"eu\x20west"`},
		{"tab\there", `"tab\there"`},
		{`"quoted"`, `"\"quoted\""`},
		{"", `""`},
		{"zürich", "zürich"},
	} {
		got := keyCell(tc.key)
		if back, err := strconv.Unquote(got); got != tc.want || (got != tc.key && (err != nil || back != tc.key)) {
			t.Errorf("keyCell(%q) = %s; want %s, which reads back", tc.key, got, tc.want)
		}
	}
}
