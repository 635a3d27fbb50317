package resilience

import (
	"context"
	"errors"
	"net/http"
	"reflect"
	"testing"
	"time"
)

func TestLoadConfigRateLimits(t *testing.T) {
	cfg, err := LoadConfigWith(LoadOptions{Environment: map[string]string{
		"RATE_LIMIT_LLM_REQUESTS":   "500",
		"RATE_LIMIT_LLM_TOKENS":     "30000",
		"RATE_LIMIT_LLM_BURST":      "20",
		"RATE_LIMIT_LLM_MAX_WAIT":   "10s",
		"RATE_LIMIT_AUTH_REQUESTS":  "50",
		"RATE_LIMIT_AUTH_PER":       "1s",
		"RATE_LIMIT_AUTH_FAIL_FAST": "true",
	}})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]RateLimitConfig{
		"LLM":  {Requests: 500, Tokens: 30000, Per: time.Minute, Burst: 20, MaxWait: 10 * time.Second},
		"AUTH": {Requests: 50, Per: time.Second, FailFast: true},
	}
	if !reflect.DeepEqual(cfg.RateLimits, want) {
		t.Fatalf("RateLimits:\n got  %+v\n want %+v", cfg.RateLimits, want)
	}
}

func TestLoadConfigReportsBadRateLimits(t *testing.T) {
	env := map[string]string{
		"RATE_LIMIT_LLM_REQUESTS":     "-5",
		"RATE_LIMIT_LLM_PER":          "0",
		"RATE_LIMIT_LLM_BURST":        "lots",
		"RATE_LIMIT_DB_MAX_WAIT":      "1s", // no REQUESTS nor TOKENS
		"RATE_LIMIT_DEFAULT_REQUESTS": "10",
	}
	_, err := LoadConfigWith(LoadOptions{Environment: env})
	for _, name := range []string{"RATE_LIMIT_LLM_REQUESTS", "RATE_LIMIT_LLM_PER", "RATE_LIMIT_LLM_BURST", "RATE_LIMIT_DB_REQUESTS", "RATE_LIMIT_DEFAULT_REQUESTS"} {
		var found bool
		for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
			var ve *VarError
			if errors.As(e, &ve) && ve.Var == name {
				found = true
			}
		}
		if !found {
			t.Errorf("%s not reported; got:\n%v", name, err)
		}
	}
}

// ForService and Transport take a permit of the service's request limiter
// per attempt, and a Reload changes the limit live, for pipelines built
// before it too.
func TestRegistryRateLimitsEveryEntryPoint(t *testing.T) {
	env := map[string]string{"RATE_LIMIT_LLM_REQUESTS": "2", "RATE_LIMIT_LLM_FAIL_FAST": "true", "RETRY_MAX_ATTEMPTS": "1"}
	reg := mustRegistry(t, env)
	fn := ForService(reg, "llm", okFunc)
	client := &http.Client{Transport: &Transport{Registry: reg, Base: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		return okResponse(r, http.StatusOK), nil
	})}}
	if reg.RateLimiter("llm") == nil || reg.TokenLimiter("llm") != nil || reg.RateLimiter("db") != nil {
		t.Fatal("want a request limiter for llm only")
	}
	fn(context.Background())
	resp, err := client.Get("http://llm/")
	if err != nil {
		t.Fatalf("Transport, second permit: %v", err)
	}
	resp.Body.Close()
	if _, err := fn(context.Background()); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("ForService, third call: %v; want ErrRateLimited", err)
	}
	if _, err := client.Get("http://llm/"); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("Transport, third call: %v; want ErrRateLimited", err)
	}
	// Reload: the limit of the db service appears for a pipeline built
	// without one.
	db := ForService(reg, "db", okFunc)
	env["RATE_LIMIT_DB_REQUESTS"] = "1"
	env["RATE_LIMIT_DB_FAIL_FAST"] = "true"
	cfg, err := LoadConfigWith(LoadOptions{Environment: env})
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	db(context.Background())
	if _, err := db(context.Background()); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("db after the Reload added its limit: %v; want ErrRateLimited", err)
	}
	reg.Reload(DefaultConfig())
	if _, err := db(context.Background()); err != nil {
		t.Fatalf("db after the Reload removed its limit: %v", err)
	}
}

func TestLoadConfigGlobalRateLimits(t *testing.T) {
	cfg, err := LoadConfigWith(LoadOptions{Environment: map[string]string{
		"RATE_LIMIT_LLM_REQUESTS": "20", "RATE_LIMIT_LLM_GLOBAL_REQUESTS": "30",
	}})
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.RateLimits["LLM"]; got.GlobalRequests != 30 || got.Requests != 20 {
		t.Fatalf("LLM %+v; want a global limit of 30 beside the local 20", got)
	}
	if _, ok := cfg.RateLimits["LLM_GLOBAL"]; ok {
		t.Fatal("_GLOBAL_REQUESTS taken for the REQUESTS of a service LLM_GLOBAL")
	}
	_, err = LoadConfigWith(LoadOptions{Environment: map[string]string{"RATE_LIMIT_DB_GLOBAL_TOKENS": "1000", "RATE_LIMIT_DB_REQUESTS": "5"}})
	var ve *VarError
	if !errors.As(err, &ve) || ve.Var != "RATE_LIMIT_DB_GLOBAL_TOKENS" {
		t.Fatalf("%v; want RATE_LIMIT_DB_GLOBAL_TOKENS reported: no local token limit beside it", err)
	}
}
