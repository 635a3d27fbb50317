package resilience

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestLoadConfigChaos(t *testing.T) {
	cfg, err := LoadConfigWith(LoadOptions{Environment: map[string]string{
		"RESILIENCE_CHAOS":            "true",
		"CHAOS_OPENFGA_ERROR_RATE":    "0.5",
		"CHAOS_LLM_LATENCY":           "2s",
		"CHAOS_REDIS_LATENCY":         "100ms",
		"CHAOS_REDIS_LATENCY_RATE":    "0.25",
		"CHAOS_KEYCLOAK_ERROR_RATE":   "1",
		"CHAOS_KEYCLOAK_LATENCY_RATE": "0",
		"CHAOS_KEYCLOAK_LATENCY":      "1s",
	}})
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.ChaosEnabled {
		t.Error("ChaosEnabled false with RESILIENCE_CHAOS=true")
	}
	want := map[string]ChaosConfig{
		"OPENFGA":  {ErrorRate: 0.5},
		"LLM":      {Latency: 2 * time.Second, LatencyRate: 1}, // _LATENCY alone: every attempt
		"REDIS":    {Latency: 100 * time.Millisecond, LatencyRate: 0.25},
		"KEYCLOAK": {ErrorRate: 1, Latency: time.Second},
	}
	for k, w := range want {
		if got := cfg.Chaos[k]; got != w {
			t.Errorf("Chaos[%s] = %+v, want %+v", k, got, w)
		}
	}
	if len(cfg.Chaos) != len(want) {
		t.Errorf("Chaos has %d services, want %d: %+v", len(cfg.Chaos), len(want), cfg.Chaos)
	}
	if d := DefaultConfig(); d.ChaosEnabled || d.Chaos != nil {
		t.Errorf("DefaultConfig injects: %v %v", d.ChaosEnabled, d.Chaos)
	}
}

func TestLoadConfigChaosErrors(t *testing.T) {
	for _, tc := range []struct {
		env          map[string]string
		name, reason string
	}{
		{map[string]string{"CHAOS_LLM_ERROR_RATE": "1.5"}, "CHAOS_LLM_ERROR_RATE", "must be a share in [0, 1]"},
		{map[string]string{"CHAOS_LLM_ERROR_RATE": "-0.1"}, "CHAOS_LLM_ERROR_RATE", "must be a share in [0, 1]"},
		{map[string]string{"CHAOS_LLM_ERROR_RATE": "half"}, "CHAOS_LLM_ERROR_RATE", "half"},
		{map[string]string{"CHAOS_LLM_LATENCY": "-1s"}, "CHAOS_LLM_LATENCY", "must not be negative"},
		{map[string]string{"CHAOS_LLM_LATENCY": "soon"}, "CHAOS_LLM_LATENCY", "soon"},
		{map[string]string{"CHAOS_LLM_LATENCY_RATE": "0.5"}, "CHAOS_LLM_LATENCY_RATE", "needs CHAOS_LLM_LATENCY"},
		{map[string]string{"CHAOS_LLM_LATENCY": "1s", "CHAOS_LLM_LATENCY_RATE": "2"}, "CHAOS_LLM_LATENCY_RATE", "must be a share in [0, 1]"},
		{map[string]string{"CHAOS_DEFAULT_ERROR_RATE": "1"}, "CHAOS_DEFAULT_ERROR_RATE", "name the service instead of DEFAULT"},
		{map[string]string{"RESILIENCE_CHAOS": "yes please"}, "RESILIENCE_CHAOS", "yes please"},
	} {
		_, err := LoadConfigWith(LoadOptions{Environment: tc.env})
		if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.name) || !strings.Contains(err.Error(), tc.reason) {
			t.Errorf("%v: %v; want ErrInvalidConfig naming %s: %s", tc.env, err, tc.name, tc.reason)
		}
	}
	bad := DefaultConfig()
	bad.Chaos = map[string]ChaosConfig{"LLM": {ErrorRate: 3}}
	if err := bad.Validate(); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "Config.Chaos[LLM].ErrorRate") {
		t.Errorf("Validate: %v, want ErrInvalidConfig naming Config.Chaos[LLM].ErrorRate", err)
	}
}

// Faults are injected only while RESILIENCE_CHAOS=true: CHAOS_<SVC>_*
// left behind in an environment inject nothing without it.
func TestRegistryChaosOnlyWhileEnabled(t *testing.T) {
	var ran atomic.Int64
	fn := func(context.Context) (int, error) { ran.Add(1); return 1, nil }
	env := map[string]string{"CHAOS_OPENFGA_ERROR_RATE": "1", "RETRY_MAX_ATTEMPTS": "1"}
	r := mustRegistry(t, env)
	f := ForService(r, "openfga", fn)
	if _, err := f(context.Background()); err != nil {
		t.Fatalf("without RESILIENCE_CHAOS: %v, want the call to run", err)
	}
	if err := r.StartChaos("openfga", ChaosConfig{}); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "RESILIENCE_CHAOS") {
		t.Errorf("StartChaos without RESILIENCE_CHAOS: %v, want ErrInvalidConfig naming RESILIENCE_CHAOS", err)
	}
	env["RESILIENCE_CHAOS"] = "true"
	reloadEnv(t, r, env)
	if _, err := f(context.Background()); !errors.Is(err, ErrChaos) {
		t.Errorf("with RESILIENCE_CHAOS=true after a Reload: %v, want ErrChaos", err)
	}
	if n := ran.Load(); n != 1 {
		t.Errorf("the function ran %d times, want once (before chaos was enabled)", n)
	}
}

func TestRegistryStartStopChaos(t *testing.T) {
	var ran atomic.Int64
	r := mustRegistry(t, map[string]string{"RESILIENCE_CHAOS": "true", "RETRY_MAX_ATTEMPTS": "1"})
	f := ForService(r, "keycloak", func(context.Context) (int, error) { ran.Add(1); return 1, nil })
	if _, err := f(context.Background()); err != nil {
		t.Fatal(err)
	}
	// Started with nothing configured: a whole outage.
	if err := r.StartChaos("keycloak", ChaosConfig{}); err != nil {
		t.Fatal(err)
	}
	if _, err := f(context.Background()); !errors.Is(err, ErrChaos) {
		t.Errorf("after StartChaos: %v, want ErrChaos", err)
	}
	if err := r.StartChaos("keycloak", ChaosConfig{ErrorRate: 7}); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "ChaosConfig.ErrorRate") {
		t.Errorf("StartChaos with a bad rate: %v, want ErrInvalidConfig naming ChaosConfig.ErrorRate", err)
	}
	if err := r.StartChaos("keycloak", ChaosConfig{Latency: time.Second}); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "injects nothing") {
		t.Errorf("StartChaos with a Latency and no LatencyRate: %v, want ErrInvalidConfig: injects nothing", err)
	}
	// A Reload keeps what StartChaos started.
	reloadEnv(t, r, map[string]string{"RESILIENCE_CHAOS": "true", "RETRY_MAX_ATTEMPTS": "1"})
	if _, err := f(context.Background()); !errors.Is(err, ErrChaos) {
		t.Errorf("after a Reload: %v, want ErrChaos still", err)
	}
	st := r.Status()
	if !st.ChaosEnabled || len(st.Chaos) != 1 || !st.Chaos[0].Active || st.Chaos[0].ErrorRate != 1 {
		t.Errorf("Status: chaos_enabled %v, %+v; want keycloak active at error rate 1", st.ChaosEnabled, st.Chaos)
	}
	r.StopChaos("keycloak")
	if _, err := f(context.Background()); err != nil {
		t.Errorf("after StopChaos: %v, want the call to run", err)
	}
	if n := ran.Load(); n != 2 {
		t.Errorf("the function ran %d times, want 2", n)
	}
}

// StopChaos holds a configured injection off, even across a Reload.
func TestRegistryStopChaosOverridesTheVariables(t *testing.T) {
	env := map[string]string{"RESILIENCE_CHAOS": "true", "CHAOS_LLM_ERROR_RATE": "1", "RETRY_MAX_ATTEMPTS": "1"}
	r := mustRegistry(t, env)
	f := ForService(r, "llm", func(context.Context) (int, error) { return 1, nil })
	if _, err := f(context.Background()); !errors.Is(err, ErrChaos) {
		t.Fatalf("configured: %v, want ErrChaos", err)
	}
	r.StopChaos("llm")
	reloadEnv(t, r, env)
	if _, err := f(context.Background()); err != nil {
		t.Errorf("stopped, after a Reload: %v, want the call to run", err)
	}
	if st := r.Status().Chaos; len(st) != 1 || st[0].Active || !st[0].Stopped {
		t.Errorf("Status().Chaos = %+v, want llm listed, stopped, inactive", st)
	}
}

func chaosAdmin(t *testing.T, env map[string]string) (*Registry, *httptest.Server) {
	t.Helper()
	r := mustRegistry(t, env)
	srv := httptest.NewServer(AdminHandler(r))
	t.Cleanup(srv.Close)
	return r, srv
}

func post(t *testing.T, url, body string) (int, string) {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestAdminChaos(t *testing.T) {
	r, srv := chaosAdmin(t, map[string]string{"RESILIENCE_CHAOS": "true", "CHAOS_LLM_LATENCY": "2s", "RETRY_MAX_ATTEMPTS": "1"})
	f := ForService(r, "openfga", func(context.Context) (bool, error) { return true, nil })

	code, body := post(t, srv.URL+"/chaos/openfga/on", `{"error_rate": 1}`)
	var st ChaosStatus
	if err := json.Unmarshal([]byte(body), &st); err != nil || code != http.StatusOK || !st.Active || st.ErrorRate != 1 {
		t.Fatalf("POST on: %d %s; want 200 and openfga active at error rate 1", code, body)
	}
	if _, err := f(context.Background()); !errors.Is(err, ErrChaos) {
		t.Errorf("after POST on: %v, want ErrChaos", err)
	}
	code, _, body = do(t, http.MethodGet, srv.URL+"/chaos")
	var all []ChaosStatus
	if err := json.Unmarshal([]byte(body), &all); err != nil || code != http.StatusOK || len(all) != 2 || all[0].Service != "LLM" || all[0].Latency != "2s" || all[1].Service != "openfga" {
		t.Errorf("GET /chaos: %d %s; want LLM (configured, never called) and openfga", code, body)
	}
	// Once called by its own name, a configured service is listed by it.
	ForService(r, "llm", func(context.Context) (int, error) { return 1, nil })
	if st := r.Status().Chaos; len(st) != 2 || st[0].Service != "llm" {
		t.Errorf("Status().Chaos = %+v, want llm listed by the name its calls use", st)
	}
	if code, body = post(t, srv.URL+"/chaos/openfga/off", ""); code != http.StatusOK || !strings.Contains(body, `"stopped": true`) {
		t.Errorf("POST off: %d %s", code, body)
	}
	if _, err := f(context.Background()); err != nil {
		t.Errorf("after POST off: %v, want the call to run", err)
	}
	for _, tc := range []struct {
		path, body string
		code       int
		says       string
	}{
		{"/chaos/openfga/on", `{"error_rate": 2}`, http.StatusBadRequest, "ErrorRate"},
		{"/chaos/openfga/on", `{"latency": "soon"}`, http.StatusBadRequest, "soon"},
		{"/chaos/openfga/on", `{"rate": 1}`, http.StatusBadRequest, "unknown field"},
		// Half a body is a mistake, never a whole outage.
		{"/chaos/openfga/on", `{"latency_rate": 0.5}`, http.StatusBadRequest, "needs a Latency"},
		{"/chaos/openfga/on", `{"error_rate": 0}`, http.StatusBadRequest, "injects nothing"},
		{"/chaos/openfga/on", `{"latency": "0s"}`, http.StatusBadRequest, "needs a Latency"},
		{"/chaos/openfga/on", `{"error_rate": 0.1}garbage`, http.StatusBadRequest, "after the JSON value"},
		{"/chaos/openfga/on", `{"error_rate": 0.1}{"error_rate": 1}`, http.StatusBadRequest, "after the JSON value"},
		{"/chaos//on", ``, http.StatusBadRequest, "must name a service"},
		{"/chaos/default/on", ``, http.StatusBadRequest, "instead of DEFAULT"},
		{"/chaos/openfga/explode", ``, http.StatusNotFound, "use on or off"},
	} {
		if code, body := post(t, srv.URL+tc.path, tc.body); code != tc.code || !strings.Contains(body, tc.says) {
			t.Errorf("POST %s %s: %d %s; want %d saying %q", tc.path, tc.body, code, body, tc.code, tc.says)
		}
	}
	if code, _, _ := do(t, http.MethodGet, srv.URL+"/chaos/openfga/on"); code != http.StatusMethodNotAllowed {
		t.Errorf("GET /chaos/openfga/on: %d, want 405", code)
	}
}

// Without RESILIENCE_CHAOS=true the admin endpoint cannot start a fault:
// 409, and nothing injected.
func TestAdminChaosRefusedWhenNotEnabled(t *testing.T) {
	r, srv := chaosAdmin(t, nil)
	code, body := post(t, srv.URL+"/chaos/openfga/on", "")
	if code != http.StatusConflict || !strings.Contains(body, "RESILIENCE_CHAOS") {
		t.Errorf("POST on: %d %s; want 409 naming RESILIENCE_CHAOS", code, body)
	}
	if _, err := ForService(r, "openfga", func(context.Context) (int, error) { return 1, nil })(context.Background()); err != nil {
		t.Errorf("call after a refused start: %v", err)
	}
}
