package resilience

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// The admin endpoint's keyed breakers: keys opened for real by failing
// calls through ForService and WithKey, listed and reset over a loopback
// listener.

// oddKey is a key with every character that means something in a URL.
const oddKey = "acme/eu west?x=1&y=%2F#frag"

// openKeys are the keys keyedAdmin opens, sorted.
var openKeys = []string{oddKey, "tenant-a", "tenant-b", "tenant-c"}

// callKey calls service through reg's pipeline under key, failing if fail
// is set, and reports whether the function ran.
func callKey(reg *Registry, service, key string, fail bool) (ran bool, err error) {
	fn := func(context.Context) (int, error) {
		ran = true
		if fail {
			return 0, errBoom
		}
		return 1, nil
	}
	_, err = ForService(reg, service, fn)(WithKey(context.Background(), key))
	return ran, err
}

// keyedAdmin serves NewAdminHandler(cfg) for a registry whose service svc
// has the breakers of openKeys open, one failure each, and that of
// tenant-ok closed; the service plain has a breaker and no key. It returns
// the registry, the server and the handler's log.
func keyedAdmin(t *testing.T, cfg AdminConfig) (*Registry, *httptest.Server, *logBuffer) {
	t.Helper()
	reg := mustRegistry(t, map[string]string{"CIRCUIT_BREAKER_SVC_FAIL_MAX": "1", "RETRY_MAX_ATTEMPTS": "1"})
	for _, k := range []string{"tenant-c", "tenant-a", oddKey, "tenant-b"} {
		if ran, err := callKey(reg, "svc", k, true); !ran || !errors.Is(err, errBoom) {
			t.Fatalf("the failing call under %q: ran %v, %v", k, ran, err)
		}
		if ran, err := callKey(reg, "svc", k, false); ran || !errors.Is(err, ErrCircuitOpen) {
			t.Fatalf("the call after it under %q: ran %v, %v; want rejected, the key's breaker open", k, ran, err)
		}
	}
	if _, err := callKey(reg, "svc", "tenant-ok", false); err != nil {
		t.Fatal(err)
	}
	// The service's own breaker counted none of it.
	if cb := reg.lookupBreaker("svc"); cb == nil || cb.State() != StateClosed {
		t.Fatalf("svc's own breaker = %v; want it built and closed", cb)
	}
	reg.CircuitBreaker("plain")
	logs := &logBuffer{}
	cfg.Registry = reg
	cfg.Logger = slog.New(slog.NewJSONHandler(logs, nil))
	srv := httptest.NewServer(NewAdminHandler(cfg))
	t.Cleanup(srv.Close)
	return reg, srv, logs
}

// getKeys GETs a page of service's open keys with the query q.
func getKeys(t *testing.T, srv *httptest.Server, service, q string) keysPage {
	t.Helper()
	code, _, body := request{method: "GET", path: "/breakers/" + service + "/keys" + q}.do(t, srv)
	var page keysPage
	if err := json.Unmarshal([]byte(body), &page); err != nil || code != 200 {
		t.Fatalf("GET keys of %s%s = %d %s (%v)", service, q, code, body, err)
	}
	return page
}

// openKeyNames lists the open keys of service as the registry reports
// them.
func openKeyNames(reg *Registry, service string) []string {
	return pageKeys(keysPage{OpenKeys: reg.OpenKeys(service, "", 0)})
}

func pageKeys(p keysPage) []string {
	var ks []string
	for _, k := range p.OpenKeys {
		ks = append(ks, k.Key)
	}
	return ks
}

func TestAdminKeysList(t *testing.T) {
	_, srv, _ := keyedAdmin(t, AdminConfig{})
	for _, service := range []string{"svc", "SVC"} {
		page := getKeys(t, srv, service, "")
		if page.Service != "svc" || !slices.Equal(pageKeys(page), openKeys) || page.Next != "" {
			t.Errorf("keys of %s = %+v; want service svc, keys %q, no next", service, page, openKeys)
		}
		for _, k := range page.OpenKeys {
			if k.Name != "svc" || k.State != "open" || k.Forced || k.RetryAfter == "" || k.Thresholds.FailMax != 1 {
				t.Errorf("key %q = %+v; want svc's breaker, open by itself, fail_max 1", k.Key, k)
			}
		}
	}
	_, _, body := request{method: "GET", path: "/breakers/svc/keys?limit=1"}.do(t, srv)
	var raw map[string]any
	json.Unmarshal([]byte(body), &raw)
	checkKeys(t, "the page", raw, []string{"service", "open_keys", "next"}, nil)
	if ks, _ := raw["open_keys"].([]any); len(ks) == 1 {
		k, _ := ks[0].(map[string]any)
		checkKeys(t, "a key", k, []string{"key", "name", "state", "since", "counts", "retry_after"}, nil)
	}

	// A service without keys has an empty list, not null.
	_, _, body = request{method: "GET", path: "/breakers/plain/keys"}.do(t, srv)
	if !strings.Contains(body, `"open_keys": []`) || !strings.Contains(body, `"next": ""`) {
		t.Errorf("keys of plain = %s; want an empty list and no next", body)
	}
}

func TestAdminKeysPaging(t *testing.T) {
	_, srv, _ := keyedAdmin(t, AdminConfig{})
	for _, limit := range []int{1, 2, 3, 4, 1000} {
		var got []string
		pages := 0
		for after := ""; ; {
			page := getKeys(t, srv, "svc", "?limit="+strconv.Itoa(limit)+"&after="+url.QueryEscape(after))
			pages++
			got = append(got, pageKeys(page)...)
			if page.Next == "" {
				break
			}
			if n := len(page.OpenKeys); n != limit || page.Next != page.OpenKeys[n-1].Key {
				t.Fatalf("limit %d after %q: %d keys, next %q; want a full page and its last key", limit, after, n, page.Next)
			}
			if pages > len(openKeys) {
				t.Fatalf("limit %d: more pages than keys: %q", limit, got)
			}
			after = page.Next
		}
		// A page that ends on the last key says so: no next, no empty
		// page after it.
		if want := (len(openKeys) + limit - 1) / limit; !slices.Equal(got, openKeys) || pages != want {
			t.Errorf("limit %d: walked %q in %d pages; want %q in %d", limit, got, pages, openKeys, want)
		}
	}
	if page := getKeys(t, srv, "svc", "?after=tenant-c"); len(page.OpenKeys) != 0 || page.Next != "" {
		t.Errorf("after the last key: %+v; want nothing", page)
	}
}

// TestAdminKeysReset resets one key: a call under it reaches the function
// again, the other keys stay open, and the action is logged with the key.
func TestAdminKeysReset(t *testing.T) {
	reg, srv, logs := keyedAdmin(t, AdminConfig{})
	code, _, body := request{method: "POST", path: "/breakers/svc/keys/reset?key=" + url.QueryEscape(oddKey)}.do(t, srv)
	var ks KeyStatus
	if err := json.Unmarshal([]byte(body), &ks); err != nil || code != 200 ||
		ks.Key != oddKey || ks.Name != "svc" || ks.State != "closed" || ks.RetryAfter != "" {
		t.Fatalf("reset %q = %d %s; want 200 and the key's breaker closed", oddKey, code, body)
	}
	if ran, err := callKey(reg, "svc", oddKey, false); !ran || err != nil {
		t.Errorf("a call under the reset key: ran %v, %v; want it to reach the function", ran, err)
	}
	for _, k := range openKeys[1:] {
		if ran, err := callKey(reg, "svc", k, false); ran || !errors.Is(err, ErrCircuitOpen) {
			t.Errorf("a call under %q: ran %v, %v; want it still rejected", k, ran, err)
		}
	}
	if got := pageKeys(getKeys(t, srv, "svc", "")); !slices.Equal(got, openKeys[1:]) {
		t.Errorf("open keys after the reset = %q; want %q", got, openKeys[1:])
	}

	// A closed key resets too; a key no call used has no breaker.
	if code, _, body := (request{method: "POST", path: "/breakers/SVC/keys/reset?key=tenant-ok"}).do(t, srv); code != 200 {
		t.Errorf("reset tenant-ok = %d %s; want 200", code, body)
	}
	code, _, body = request{method: "POST", path: "/breakers/svc/keys/reset?key=nosuch"}.do(t, srv)
	if code != 404 || !strings.Contains(body, `no breaker for key \"nosuch\" of \"svc\"`) {
		t.Errorf("reset nosuch = %d %s; want 404 naming the key", code, body)
	}

	var got []string
	for _, rec := range logs.records(t) {
		if rec["msg"] == "resilience: admin action" {
			got = append(got, fmt.Sprint(rec["action"], " ", rec["breaker"], " ", rec["key"], " ", rec["status"]))
		}
	}
	want := []string{"reset_key svc " + oddKey + " 200", "reset_key svc tenant-ok 200", "reset_key svc nosuch 404"}
	if !slices.Equal(got, want) {
		t.Errorf("actions logged: %q; want %q", got, want)
	}
}

func TestAdminKeysErrors(t *testing.T) {
	reg, srv, _ := keyedAdmin(t, AdminConfig{})
	for _, tc := range []struct {
		method, path string
		code         int
		allow, msg   string
	}{
		{"GET", "/breakers/nope/keys", 404, "", `no circuit breaker named \"nope\"`},
		{"POST", "/breakers/nope/keys/reset?key=tenant-a", 404, "", `no circuit breaker named \"nope\"`},
		{"GET", "/breakers/svc/keys/x", 404, "", "no such path"},
		{"GET", "/breakers/svc/keys/reset/x", 404, "", "no such path"},
		{"POST", "/breakers/svc/keys", 405, "GET", "method POST not allowed"},
		{"GET", "/breakers/svc/keys/reset?key=tenant-a", 405, "POST", "method GET not allowed"},
		{"POST", "/breakers/svc/keys/reset", 400, "", "no key"},
		{"POST", "/breakers/svc/keys/reset?key=", 400, "", "no key"},
		{"POST", "/breakers/svc/keys/reset?key=tenant-a&key=tenant-b", 400, "", "more than one key"},
		{"POST", "/breakers/svc/keys/reset?key=%zz", 400, "", "bad query string"},
		{"GET", "/breakers/svc/keys?limit=0", 400, "", `bad limit \"0\": want an integer from 1 to 1000`},
		{"GET", "/breakers/svc/keys?limit=1001", 400, "", `bad limit \"1001\"`},
		{"GET", "/breakers/svc/keys?limit=-1", 400, "", `bad limit \"-1\"`},
		{"GET", "/breakers/svc/keys?limit=ten", 400, "", `bad limit \"ten\"`},
		{"GET", "/breakers/svc/keys?limit=", 400, "", `bad limit \"\"`},
		{"GET", "/breakers/svc/keys?after=%zz", 400, "", "bad query string"},
	} {
		code, h, body := request{method: tc.method, path: tc.path}.do(t, srv)
		var e map[string]string
		if err := json.Unmarshal([]byte(body), &e); err != nil || code != tc.code || h.Get("Allow") != tc.allow || !strings.Contains(body, tc.msg) {
			t.Errorf("%s %s = %d Allow=%q %s; want %d Allow=%q containing %q", tc.method, tc.path, code, h.Get("Allow"), body, tc.code, tc.allow, tc.msg)
		}
	}
	if got := openKeyNames(reg, "svc"); !slices.Equal(got, openKeys) {
		t.Errorf("open keys after the refused requests = %q; want %q", got, openKeys)
	}
}

// TestAdminKeysGuards: the keys' routes pass the guards of every route.
func TestAdminKeysGuards(t *testing.T) {
	reg, srv, _ := keyedAdmin(t, AdminConfig{Token: testToken})
	reset := "/breakers/svc/keys/reset?key=tenant-a"
	for _, tc := range []struct {
		name string
		rq   request
		code int
	}{
		{"list without the token", request{method: "GET", path: "/breakers/svc/keys"}, 401},
		{"reset without the token", request{method: "POST", path: reset}, 401},
		{"reset with another token", request{method: "POST", path: reset, headers: map[string]string{"Authorization": "Bearer x" + testToken}}, 401},
		{"reset from another site", request{method: "POST", path: reset, headers: map[string]string{
			"Authorization": "Bearer " + testToken, "Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example",
		}}, 403},
		{"reset for another Host", request{method: "POST", path: reset, host: "evil.example",
			headers: map[string]string{"Authorization": "Bearer " + testToken}}, 403},
	} {
		if code, _, body := tc.rq.do(t, srv); code != tc.code {
			t.Errorf("%s = %d %s; want %d", tc.name, code, body, tc.code)
		}
	}
	if got := openKeyNames(reg, "svc"); !slices.Equal(got, openKeys) {
		t.Fatalf("open keys after the refused resets = %q; want %q", got, openKeys)
	}
	auth := map[string]string{"Authorization": "Bearer " + testToken}
	if code, _, body := (request{method: "POST", path: reset, headers: auth}).do(t, srv); code != 200 {
		t.Fatalf("reset with the token = %d %s", code, body)
	}
	if got := openKeyNames(reg, "svc"); !slices.Equal(got, []string{oddKey, "tenant-b", "tenant-c"}) {
		t.Errorf("open keys after the reset with the token = %q; want tenant-a gone", got)
	}
}

// TestAdminKeysOverflow: keys past CIRCUIT_BREAKER_<SVC>_MAX_KEYS share
// the key "other", and services past RESILIENCE_MAX_SERVICES the set
// "other", whose keys are listed under that name, however it is spelt.
func TestAdminKeysOverflow(t *testing.T) {
	reg := mustRegistry(t, map[string]string{
		"RESILIENCE_MAX_SERVICES":        "1",
		"CIRCUIT_BREAKER_SVC_FAIL_MAX":   "1",
		"CIRCUIT_BREAKER_SVC_MAX_KEYS":   "1",
		"CIRCUIT_BREAKER_OTHER_FAIL_MAX": "1",
		"RETRY_MAX_ATTEMPTS":             "1",
	})
	callKey(reg, "svc", "k1", true)
	callKey(reg, "svc", "k2", true)  // no room: the key "other"
	callKey(reg, "late", "t1", true) // no room: the set "other"
	srv := httptest.NewServer(NewAdminHandler(AdminConfig{Registry: reg, Logger: slog.New(slog.DiscardHandler)}))
	defer srv.Close()

	if got := pageKeys(getKeys(t, srv, "svc", "")); !slices.Equal(got, []string{"k1", overflowName}) {
		t.Errorf("keys of svc = %q; want k1 and %s", got, overflowName)
	}
	for _, name := range []string{"other", "OTHER"} {
		if page := getKeys(t, srv, name, ""); page.Service != overflowName || !slices.Equal(pageKeys(page), []string{"t1"}) {
			t.Errorf("keys of %s = %+v; want the overflow set's: t1", name, page)
		}
	}
	if code, _, body := (request{method: "GET", path: "/breakers/late/keys"}).do(t, srv); code != 404 {
		t.Errorf("keys of late, a service without a set = %d %s; want 404", code, body)
	}

	// Resetting the overflow key lets the keys that share it through.
	if code, _, body := (request{method: "POST", path: "/breakers/svc/keys/reset?key=other"}).do(t, srv); code != 200 {
		t.Fatalf("reset svc's key other = %d %s", code, body)
	}
	if ran, err := callKey(reg, "svc", "k3", false); !ran || err != nil {
		t.Errorf("a call under k3, sharing the key other: ran %v, %v; want it through", ran, err)
	}
	if ran, _ := callKey(reg, "svc", "k1", false); ran {
		t.Error("a call under k1 ran; want it rejected, its breaker still open")
	}
	if code, _, body := (request{method: "POST", path: "/breakers/other/keys/reset?key=t1"}).do(t, srv); code != 200 {
		t.Fatalf("reset the overflow set's key t1 = %d %s", code, body)
	}
	if ran, err := callKey(reg, "late", "t1", false); !ran || err != nil {
		t.Errorf("a call of late under t1 after its reset: ran %v, %v; want it through", ran, err)
	}
}
