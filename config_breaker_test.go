package resilience

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

// The breaker variables of the ratio and slow-call triggers, the open
// period and the mode.

func TestLoadConfigBreakerTriggers(t *testing.T) {
	cfg, err := LoadConfigWith(LoadOptions{Environment: map[string]string{
		"CIRCUIT_BREAKER_DEFAULT_SAMPLING_WINDOW":     "20",
		"CIRCUIT_BREAKER_LLM_FAILURE_RATIO":           "0.5",
		"CIRCUIT_BREAKER_LLM_MINIMUM_THROUGHPUT":      "40",
		"CIRCUIT_BREAKER_LLM_SLOW_CALL_DURATION":      "30s",
		"CIRCUIT_BREAKER_LLM_SLOW_CALL_RATIO":         "0.8",
		"CIRCUIT_BREAKER_LLM_TIMEOUT":                 "10",
		"CIRCUIT_BREAKER_LLM_MAX_TIMEOUT":             "5m",
		"CIRCUIT_BREAKER_AUTH_MODE":                   "shadow",
		"CIRCUIT_BREAKER_AUTH_FAILURE_RATIO":          "0.25",
		"CIRCUIT_BREAKER_AUTH_FAIL_MAX":               "3",
		"CIRCUIT_BREAKER_PAYMENTS_SLOW_CALL_DURATION": "2s",
	}})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]CircuitBreakerConfig{
		// A ratio without FAIL_MAX: only the ratio opens it.
		"LLM": {FailureRatio: 0.5, MinimumThroughput: 40, SamplingWindow: 20 * time.Second, SlowCallDuration: 30 * time.Second,
			SlowCallRatio: 0.8, OpenTimeout: 10 * time.Second, MaxOpenTimeout: 5 * time.Minute},
		"AUTH": {FailMax: 3, FailureRatio: 0.25, SamplingWindow: 20 * time.Second, OpenTimeout: time.Minute, Shadow: true},
		// No ratio: FailMax stays 5.
		"PAYMENTS": {FailMax: 5, SamplingWindow: 20 * time.Second, SlowCallDuration: 2 * time.Second, OpenTimeout: time.Minute},
	}
	for k, w := range want {
		if got := cfg.CircuitBreakers[k]; !reflect.DeepEqual(got, w) {
			t.Errorf("%s:\n got  %+v\n want %+v", k, got, w)
		}
	}
}

// A FAIL_MAX set for DEFAULT is set for every service that inherits it,
// so it stays beside a service's own ratio.
func TestLoadConfigDefaultFailMaxStaysBesideRatio(t *testing.T) {
	cfg, err := LoadConfigWith(LoadOptions{Environment: map[string]string{
		"CIRCUIT_BREAKER_DEFAULT_FAIL_MAX":  "7",
		"CIRCUIT_BREAKER_LLM_FAILURE_RATIO": "0.5",
		"CIRCUIT_BREAKER_DEFAULT_MODE":      "SHADOW",
	}})
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.CircuitBreakers["LLM"]; got.FailMax != 7 || got.FailureRatio != 0.5 || !got.Shadow {
		t.Fatalf("LLM: %+v; want FailMax 7 beside the ratio, in shadow mode", got)
	}
}

func TestLoadConfigReportsBadBreakerTriggers(t *testing.T) {
	env := map[string]string{
		"CIRCUIT_BREAKER_LLM_FAILURE_RATIO":      "1.5",
		"CIRCUIT_BREAKER_LLM_SLOW_CALL_RATIO":    "0",
		"CIRCUIT_BREAKER_LLM_MINIMUM_THROUGHPUT": "0",
		"CIRCUIT_BREAKER_LLM_SAMPLING_WINDOW":    "5ms",
		"CIRCUIT_BREAKER_LLM_SLOW_CALL_DURATION": "-1s",
		"CIRCUIT_BREAKER_LLM_TIMEOUT":            "30",
		"CIRCUIT_BREAKER_LLM_MAX_TIMEOUT":        "10s",
		"CIRCUIT_BREAKER_LLM_MODE":               "metrics-only",
		"CIRCUIT_BREAKER_DB_FAILURE_RATIO":       "half",
	}
	_, err := LoadConfigWith(LoadOptions{Environment: env})
	if err == nil {
		t.Fatal("no error")
	}
	for name := range env {
		if name == "CIRCUIT_BREAKER_LLM_TIMEOUT" {
			continue
		}
		var found bool
		for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
			var ve *VarError
			if errors.As(e, &ve) && ve.Var == name && ve.Value == env[name] {
				found = true
			}
		}
		if !found {
			t.Errorf("%s=%q not reported; got:\n%v", name, env[name], err)
		}
	}
	if strings.Contains(err.Error(), "CIRCUIT_BREAKER_LLM_TIMEOUT=") {
		t.Errorf("the good TIMEOUT was reported:\n%v", err)
	}
}

// CIRCUIT_BREAKER_LLM_MAX_TIMEOUT must not be taken for a TIMEOUT of a
// service called LLM_MAX.
func TestLoadConfigMaxTimeoutIsNotAServiceTimeout(t *testing.T) {
	cfg, err := LoadConfigWith(LoadOptions{Environment: map[string]string{"CIRCUIT_BREAKER_LLM_MAX_TIMEOUT": "2m"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := cfg.CircuitBreakers["LLM_MAX"]; ok {
		t.Fatal("a service LLM_MAX was made up")
	}
	if got := cfg.CircuitBreakers["LLM"].MaxOpenTimeout; got != 2*time.Minute {
		t.Fatalf("LLM MaxOpenTimeout = %v; want 2m", got)
	}
}

func TestReloadAppliesTriggersKeepingWindowCounts(t *testing.T) {
	env := map[string]string{
		"CIRCUIT_BREAKER_LLM_FAILURE_RATIO": "0.9", "CIRCUIT_BREAKER_LLM_MINIMUM_THROUGHPUT": "10", "RETRY_MAX_ATTEMPTS": "1",
	}
	reg := mustRegistry(t, env)
	fn := ForService(reg, "llm", failFunc)
	ok := ForService(reg, "llm", okFunc)
	for range 5 {
		fn(context.Background())
		ok(context.Background())
	}
	cb := reg.CircuitBreaker("llm")
	if cb.State() != StateClosed {
		t.Fatalf("state %v at a ratio of 0.5; want closed below 0.9", cb.State())
	}
	env["CIRCUIT_BREAKER_LLM_FAILURE_RATIO"] = "0.5"
	env["CIRCUIT_BREAKER_LLM_MODE"] = "shadow"
	cfg, err := LoadConfigWith(LoadOptions{Environment: env})
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	if c := cb.Counts(); c.WindowCalls != 10 || c.WindowFailures != 5 {
		t.Fatalf("counts after Reload %+v; want the window's 10 calls kept", c)
	}
	fn(context.Background()) // 6 of 11
	if cb.State() != StateOpen || !cb.Shadow() {
		t.Fatalf("state %v, shadow %v; want open on the reloaded ratio, in shadow mode", cb.State(), cb.Shadow())
	}
	if _, err := fn(context.Background()); !errors.Is(err, errBoom) {
		t.Fatalf("%v; want the call let through by the shadow breaker", err)
	}
}
