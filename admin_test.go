package resilience

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func adminServer(t *testing.T) (*Registry, *httptest.Server) {
	t.Helper()
	reg := mustRegistry(t, map[string]string{"CIRCUIT_BREAKER_LLM_FAIL_MAX": "1", "BULKHEAD_LLM_LIMIT": "4"})
	WithCircuitBreaker(failFunc, reg.CircuitBreaker("llm"))(context.Background())
	reg.CircuitBreaker("openfga")
	reg.Bulkhead("llm")
	srv := httptest.NewServer(AdminHandler(reg))
	t.Cleanup(srv.Close)
	return reg, srv
}

func do(t *testing.T, method, url string) (int, http.Header, string) {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s %s: Content-Type %q", method, url, ct)
	}
	return resp.StatusCode, resp.Header, string(b)
}

func TestAdminStatus(t *testing.T) {
	_, srv := adminServer(t)
	code, _, body := do(t, "GET", srv.URL+"/")
	if code != 200 {
		t.Fatalf("GET / = %d %s", code, body)
	}
	var st Status
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatal(err)
	}
	if !st.Enabled || len(st.Breakers) != 2 || st.Breakers[0].Name != "llm" || st.Breakers[0].State != "open" ||
		st.Breakers[0].Counts.Requests != 0 || st.Breakers[1].Name != "openfga" || st.Breakers[1].State != "closed" {
		t.Errorf("breakers %+v", st.Breakers)
	}
	if len(st.Bulkheads) != 1 || st.Bulkheads[0] != (BulkheadStatus{Name: "llm", Limit: 4}) {
		t.Errorf("bulkheads %+v", st.Bulkheads)
	}
	if st.Services != 2 || st.MaxServices != 1000 {
		t.Errorf("services %d of %d; want 2 (llm, openfga) of 1000", st.Services, st.MaxServices)
	}
	for _, path := range []string{"/breakers", "/bulkheads", "/breakers/llm", "/breakers/LLM"} {
		if code, _, body := do(t, "GET", srv.URL+path); code != 200 || !strings.Contains(body, `"llm"`) {
			t.Errorf("GET %s = %d %s", path, code, body)
		}
	}
}

func TestAdminActions(t *testing.T) {
	reg, srv := adminServer(t)
	cb := reg.CircuitBreaker("llm")
	for _, tc := range []struct {
		action, state string
		forced        bool
	}{
		{"reset", "closed", false},
		{"open", "open", true},
		{"close", "closed", true},
		{"reset", "closed", false},
	} {
		code, _, body := do(t, "POST", srv.URL+"/breakers/llm/"+tc.action)
		var bs BreakerStatus
		json.Unmarshal([]byte(body), &bs)
		if code != 200 || bs.State != tc.state || bs.Forced != tc.forced {
			t.Fatalf("POST %s = %d %s; want %s forced=%v", tc.action, code, body, tc.state, tc.forced)
		}
		if cb.State().String() != tc.state || cb.Forced() != tc.forced {
			t.Fatalf("after %s the breaker is %v forced=%v", tc.action, cb.State(), cb.Forced())
		}
	}
}

func TestAdminErrors(t *testing.T) {
	_, srv := adminServer(t)
	for _, tc := range []struct {
		method, path string
		code         int
		allow, msg   string
	}{
		{"GET", "/breakers/nope", 404, "", `no circuit breaker named \"nope\"`},
		{"POST", "/breakers/nope/reset", 404, "", "no circuit breaker"},
		{"POST", "/breakers/llm/explode", 404, "", "unknown action"},
		{"GET", "/breakers/llm/reset", 405, "POST", "method GET not allowed"},
		{"DELETE", "/breakers", 405, "GET", "method DELETE not allowed"},
		{"POST", "/", 405, "GET", "not allowed"},
		{"GET", "/metrics", 404, "", "no such path"},
		{"GET", "/breakers/llm/reset/x", 404, "", "no such path"},
	} {
		code, h, body := do(t, tc.method, srv.URL+tc.path)
		var e map[string]string
		if err := json.Unmarshal([]byte(body), &e); err != nil || !strings.Contains(body, tc.msg) || code != tc.code || h.Get("Allow") != tc.allow {
			t.Errorf("%s %s = %d Allow=%q %s; want %d Allow=%q containing %q", tc.method, tc.path, code, h.Get("Allow"), body, tc.code, tc.allow, tc.msg)
		}
	}
}
