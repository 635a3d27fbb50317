package resilience

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"maps"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

func TestEnvKey(t *testing.T) {
	for in, want := range map[string]string{"payments": "PAYMENTS", "payments-eu": "PAYMENTS_EU", "api.v2": "API_V2", "LLM": "LLM"} {
		if got := EnvKey(in); got != want {
			t.Errorf("EnvKey(%q) = %q; want %q", in, got, want)
		}
	}
}

func TestParseDuration(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"60", time.Minute, true},
		{"0.25", 250 * time.Millisecond, true},
		{" 30 ", 30 * time.Second, true},
		{"1e-9", time.Nanosecond, true},
		{"1m", time.Minute, true},
		{"1500ms", 1500 * time.Millisecond, true},
		{"1h2m3s", time.Hour + 2*time.Minute + 3*time.Second, true},
		{"-5", -5 * time.Second, true},
		{"", 0, false},
		{"abc", 0, false},
		{"10 seconds", 0, false},
		{"NaN", 0, false},
		{"Inf", 0, false},
		{"1e300", 0, false},
		{"9223372037", 0, false}, // just past time.Duration's range
	} {
		got, err := ParseDuration(tc.in)
		if (err == nil) != tc.ok || (tc.ok && got != tc.want) {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestLoadConfigDefaults(t *testing.T) {
	cfg, err := LoadConfigWith(LoadOptions{Environment: map[string]string{}})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cfg, DefaultConfig()) {
		t.Fatalf("empty environment: %+v\nwant the defaults %+v", cfg, DefaultConfig())
	}
	// The seed's values.
	if !cfg.Enabled || cfg.Retry.MaxAttempts != 3 || cfg.Retry.Multiplier != 2 || cfg.Retry.MaxDelay != 10*time.Second || cfg.Retry.DisableJitter {
		t.Errorf("retry defaults %+v", cfg.Retry)
	}
	for op, want := range map[string]time.Duration{"default": 30 * time.Second, "llm": time.Minute, "auth": 5 * time.Second, "db": 10 * time.Second, "http": 15 * time.Second, "other": 30 * time.Second} {
		if got := cfg.Timeout(op); got != want {
			t.Errorf("Timeout(%q) = %v; want %v", op, got, want)
		}
	}
	for name, want := range map[string]int{"llm": 10, "openfga": 50, "redis": 100, "db": 20, "other": 10} {
		if got := cfg.BulkheadConfig(name).Limit; got != want {
			t.Errorf("bulkhead %s limit = %d; want %d", name, got, want)
		}
	}
	if c := cfg.CircuitBreakerConfig("llm"); c.FailMax != 5 || c.OpenTimeout != time.Minute || c.Name != "llm" {
		t.Errorf("llm breaker %+v", c)
	}
	if c := cfg.CircuitBreakerConfig("openfga"); c.FailMax != 10 || c.OpenTimeout != 30*time.Second {
		t.Errorf("openfga breaker %+v", c)
	}
}

// Every variable, through the process environment with t.Setenv.
func TestLoadConfigEveryVariable(t *testing.T) {
	for _, tc := range []struct {
		env   map[string]string
		check func(Config) bool
	}{
		{map[string]string{"RESILIENCE_ENABLED": "false"}, func(c Config) bool { return !c.Enabled }},
		{map[string]string{"RESILIENCE_ENABLED": "0"}, func(c Config) bool { return !c.Enabled }},
		{map[string]string{"RESILIENCE_ENABLED": "true"}, func(c Config) bool { return c.Enabled }},
		{map[string]string{"CIRCUIT_BREAKER_LLM_FAIL_MAX": "7"}, func(c Config) bool { return c.CircuitBreakerConfig("llm").FailMax == 7 }},
		{map[string]string{"CIRCUIT_BREAKER_LLM_TIMEOUT": "45"}, func(c Config) bool { return c.CircuitBreakerConfig("llm").OpenTimeout == 45*time.Second }},
		{map[string]string{"CIRCUIT_BREAKER_OPENFGA_FAIL_MAX": "3", "CIRCUIT_BREAKER_OPENFGA_TIMEOUT": "2m"}, func(c Config) bool {
			b := c.CircuitBreakerConfig("openfga")
			return b.FailMax == 3 && b.OpenTimeout == 2*time.Minute
		}},
		{map[string]string{"CIRCUIT_BREAKER_PAYMENTS_EU_FAIL_MAX": "2"}, func(c Config) bool {
			return c.CircuitBreakerConfig("payments-eu").FailMax == 2 && c.CircuitBreakerConfig("payments-eu").OpenTimeout == time.Minute
		}},
		{map[string]string{"CIRCUIT_BREAKER_KEYCLOAK_HALF_OPEN_MAX_CALLS": "3"}, func(c Config) bool { return c.CircuitBreakerConfig("keycloak").HalfOpenMaxCalls == 3 }},
		{map[string]string{"CIRCUIT_BREAKER_DEFAULT_FAIL_MAX": "8", "CIRCUIT_BREAKER_API_TIMEOUT": "5"}, func(c Config) bool {
			_, isService := c.CircuitBreakers["DEFAULT"]
			return !isService && c.CircuitBreakerConfig("anything").FailMax == 8 && c.CircuitBreakerConfig("api").FailMax == 8 &&
				c.CircuitBreakerConfig("api").OpenTimeout == 5*time.Second && c.CircuitBreakerConfig("openfga").FailMax == 10
		}},
		{map[string]string{"RETRY_MAX_ATTEMPTS": "5"}, func(c Config) bool { return c.Retry.MaxAttempts == 5 }},
		{map[string]string{"RETRY_EXPONENTIAL_BASE": "1.5"}, func(c Config) bool { return c.Retry.Multiplier == 1.5 }},
		{map[string]string{"RETRY_EXPONENTIAL_MAX": "30"}, func(c Config) bool { return c.Retry.MaxDelay == 30*time.Second }},
		{map[string]string{"RETRY_EXPONENTIAL_MAX": "10.0"}, func(c Config) bool { return c.Retry.MaxDelay == 10*time.Second }},
		{map[string]string{"RETRY_EXPONENTIAL_MAX": "0.5"}, func(c Config) bool {
			// Only the maximum, below 1s: the first delay is the maximum.
			r, err := NewRetry(c.Retry)
			return err == nil && r.params().initial == 500*time.Millisecond
		}},
		{map[string]string{"RETRY_JITTER": "false"}, func(c Config) bool { return c.Retry.DisableJitter }},
		{map[string]string{"TIMEOUT_DEFAULT": "20"}, func(c Config) bool { return c.Timeout("reports") == 20*time.Second && c.Timeout("llm") == time.Minute }},
		{map[string]string{"TIMEOUT_LLM": "90"}, func(c Config) bool { return c.Timeout("llm") == 90*time.Second }},
		{map[string]string{"TIMEOUT_AUTH": "0.5"}, func(c Config) bool { return c.Timeout("auth") == 500*time.Millisecond }},
		{map[string]string{"TIMEOUT_DB": "2s"}, func(c Config) bool { return c.Timeout("db") == 2*time.Second }},
		{map[string]string{"TIMEOUT_HTTP": "1m30s"}, func(c Config) bool { return c.Timeout("http") == 90*time.Second }},
		{map[string]string{"TIMEOUT_VECTOR_SEARCH": "250ms"}, func(c Config) bool { return c.Timeout("vector-search") == 250*time.Millisecond }},
		{map[string]string{"BULKHEAD_LLM_LIMIT": "4"}, func(c Config) bool { return c.BulkheadConfig("llm").Limit == 4 }},
		{map[string]string{"BULKHEAD_OPENFGA_LIMIT": "60", "BULKHEAD_REDIS_LIMIT": "200", "BULKHEAD_DB_LIMIT": "5"}, func(c Config) bool {
			return c.BulkheadConfig("openfga").Limit == 60 && c.BulkheadConfig("redis").Limit == 200 && c.BulkheadConfig("db").Limit == 5
		}},
		{map[string]string{"BULKHEAD_S3_LIMIT": "3", "BULKHEAD_S3_MAX_QUEUE": "9", "BULKHEAD_S3_MAX_WAIT": "0.1", "BULKHEAD_S3_FAIL_FAST": "true"}, func(c Config) bool {
			return c.BulkheadConfig("s3") == BulkheadConfig{Name: "s3", Limit: 3, MaxQueue: 9, MaxWait: 100 * time.Millisecond, FailFast: true}
		}},
		{map[string]string{"BULKHEAD_DEFAULT_LIMIT": "2"}, func(c Config) bool {
			return c.BulkheadConfig("misc").Limit == 2 && c.BulkheadConfig("llm").Limit == 10
		}},
	} {
		t.Run(strings.Join(slicesSortedKeys(tc.env), ","), func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			cfg, err := LoadConfig()
			if err != nil {
				t.Fatalf("LoadConfig() error: %v", err)
			}
			if !tc.check(cfg) {
				t.Fatalf("LoadConfig() = %+v; the setting was not applied", cfg)
			}
		})
	}
}

func slicesSortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range maps.Keys(m) {
		keys = append(keys, k)
	}
	sortStrings(keys)
	return keys
}

func sortStrings(s []string) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

func TestLoadConfigAllBadAtOnce(t *testing.T) {
	env := map[string]string{
		"RESILIENCE_ENABLED":                    "maybe",
		"RETRY_MAX_ATTEMPTS":                    "three",
		"RETRY_EXPONENTIAL_BASE":                "0.5",
		"RETRY_EXPONENTIAL_MAX":                 "-1",
		"RETRY_JITTER":                          "sometimes",
		"TIMEOUT_DEFAULT":                       "0",
		"TIMEOUT_LLM":                           "soon",
		"CIRCUIT_BREAKER_LLM_FAIL_MAX":          "0",
		"CIRCUIT_BREAKER_PAYMENTS_TIMEOUT":      "10 seconds",
		"CIRCUIT_BREAKER_X_HALF_OPEN_MAX_CALLS": "-1",
		"BULKHEAD_DB_LIMIT":                     "-3",
		"BULKHEAD_REDIS_MAX_WAIT":               "forever",
		"BULKHEAD_S3_MAX_QUEUE":                 "1.5",
		"RETRY_UNRELATED":                       "ignored",
	}
	cfg, err := LoadConfigWith(LoadOptions{Environment: env})
	if err == nil {
		t.Fatal("no error")
	}
	if !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("error does not match ErrInvalidConfig")
	}
	msg := err.Error()
	for _, want := range []string{
		`RESILIENCE_ENABLED="maybe": not a boolean`,
		`RETRY_MAX_ATTEMPTS="three": not a whole number`,
		`RETRY_EXPONENTIAL_BASE="0.5": the exponential base must be at least 1`,
		`RETRY_EXPONENTIAL_MAX="-1": must be positive`,
		`RETRY_JITTER="sometimes": not a boolean`,
		`TIMEOUT_DEFAULT="0": must be positive`,
		`TIMEOUT_LLM="soon": not a duration`,
		`CIRCUIT_BREAKER_LLM_FAIL_MAX="0": must be at least 1`,
		`CIRCUIT_BREAKER_PAYMENTS_TIMEOUT="10 seconds": not a duration`,
		`CIRCUIT_BREAKER_X_HALF_OPEN_MAX_CALLS="-1": must not be negative`,
		`BULKHEAD_DB_LIMIT="-3": must be at least 1`,
		`BULKHEAD_REDIS_MAX_WAIT="forever": not a duration`,
		`BULKHEAD_S3_MAX_QUEUE="1.5": not a whole number`,
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error lacks %q:\n%s", want, msg)
		}
	}
	if strings.Contains(msg, "RETRY_UNRELATED") {
		t.Errorf("error mentions an unrelated variable:\n%s", msg)
	}
	var ve *VarError
	if !errors.As(err, &ve) || ve.Var == "" {
		t.Errorf("errors.As(*VarError) = %v", ve)
	}
	if !reflect.DeepEqual(cfg, DefaultConfig()) {
		t.Errorf("on error the config is %+v; want the defaults, not half a configuration", cfg)
	}
}

func TestLoadConfigPrefix(t *testing.T) {
	env := map[string]string{
		"MYAPP_RETRY_MAX_ATTEMPTS":           "6",
		"MYAPP_CIRCUIT_BREAKER_LLM_FAIL_MAX": "2",
		"MYAPP_TIMEOUT_DB":                   "3",
		"MYAPP_BULKHEAD_LLM_LIMIT":           "1",
		"RETRY_MAX_ATTEMPTS":                 "9", // another app's: ignored
		"TIMEOUT_DB":                         "bad",
	}
	cfg, err := LoadConfigWith(LoadOptions{Prefix: "MYAPP_", Environment: env})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Retry.MaxAttempts != 6 || cfg.CircuitBreakerConfig("llm").FailMax != 2 || cfg.Timeout("db") != 3*time.Second || cfg.BulkheadConfig("llm").Limit != 1 {
		t.Fatalf("prefixed variables not applied: %+v", cfg)
	}
	_, err = LoadConfigWith(LoadOptions{Prefix: "MYAPP_", Environment: map[string]string{"MYAPP_RETRY_MAX_ATTEMPTS": "x"}})
	if err == nil || !strings.Contains(err.Error(), `MYAPP_RETRY_MAX_ATTEMPTS="x"`) {
		t.Fatalf("err = %v; want it to name the prefixed variable", err)
	}
}

func TestValidateAndNewRegistryInvalid(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Retry.Multiplier = 0.1
	cfg.Timeouts["LLM"] = -1
	cfg.CircuitBreakers["X"] = CircuitBreakerConfig{FailMax: -1}
	cfg.Bulkheads["Y"] = BulkheadConfig{Limit: -1}
	cfg.DefaultBulkhead.MaxWait = -1
	cfg.DefaultCircuitBreaker.OpenTimeout = -1
	cfg.DefaultTimeout = -1
	r, err := NewRegistry(cfg)
	if r != nil || err == nil {
		t.Fatal("NewRegistry accepted an invalid config")
	}
	for _, want := range []string{"RetryConfig.Multiplier = 0.1", "Config.Timeouts[LLM] = -1ns", "circuit breaker X", "bulkhead Y", "BulkheadConfig.MaxWait", "CircuitBreakerConfig.OpenTimeout", "Config.DefaultTimeout"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

func TestRegistrySharesInstances(t *testing.T) {
	r := mustRegistry(t, map[string]string{"CIRCUIT_BREAKER_PAYMENTS_EU_FAIL_MAX": "2", "BULKHEAD_LLM_LIMIT": "3"})
	if r.CircuitBreaker("payments-eu") != r.CircuitBreaker("PAYMENTS_EU") {
		t.Error("breakers for the same key differ")
	}
	if r.CircuitBreaker("a") == r.CircuitBreaker("b") {
		t.Error("different services share a breaker")
	}
	if r.Bulkhead("llm") != r.Bulkhead("LLM") || r.Bulkhead("llm").Limit() != 3 {
		t.Error("bulkhead not shared or not configured")
	}
	if r.Retry() != mustRetryOf(r) || r.Retry().MaxAttempts() != 3 {
		t.Error("retry not shared")
	}
	if r.Timeout("llm") != time.Minute || !r.Enabled() {
		t.Error("timeout or enabled wrong")
	}
	cfg := r.Config()
	cfg.Timeouts["LLM"] = time.Second // a copy: must not change the registry
	if r.Timeout("llm") != time.Minute {
		t.Error("Config() returned the registry's own map")
	}
}

// ForService end to end: the breaker is the registry's, the attempts come
// from the environment, the timeout is per attempt.
func TestForServiceEndToEnd(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := mustRegistry(t, map[string]string{
			"RETRY_MAX_ATTEMPTS":                "4",
			"RETRY_EXPONENTIAL_MAX":             "0.1",
			"CIRCUIT_BREAKER_PAYMENTS_FAIL_MAX": "2",
			"TIMEOUT_PAYMENTS":                  "1",
			"BULKHEAD_PAYMENTS_LIMIT":           "1",
		})
		var calls, inside, maxInside atomic.Int32
		fn := ForService(r, "payments", func(ctx context.Context) (string, error) {
			calls.Add(1)
			n := inside.Add(1)
			defer inside.Add(-1)
			if n > maxInside.Load() {
				maxInside.Store(n)
			}
			<-ctx.Done() // hangs until the per-attempt timeout
			return "", ctx.Err()
		})
		start := time.Now()
		_, err := fn(context.Background())
		if !errors.Is(err, ErrRetryExhausted) || !errors.Is(err, ErrTimeout) || calls.Load() != 4 {
			t.Fatalf("err = %v after %d calls; want exhausted timeouts after 4", err, calls.Load())
		}
		if el := time.Since(start); el < 4*time.Second || el > 4*time.Second+400*time.Millisecond {
			t.Errorf("took %v; want 4 one-second attempts plus short waits", el)
		}
		fn(context.Background())
		if r.CircuitBreaker("payments").State() != StateOpen {
			t.Fatal("the registry's breaker did not open after FailMax exhausted calls")
		}
		if _, err := fn(context.Background()); !errors.Is(err, ErrCircuitOpen) {
			t.Fatalf("err = %v; want ErrCircuitOpen", err)
		}
		var wg sync.WaitGroup
		r.CircuitBreaker("payments").Reset()
		for range 3 {
			wg.Go(func() { fn(context.Background()) })
		}
		wg.Wait()
		if maxInside.Load() != 1 {
			t.Errorf("max inside = %d; want the bulkhead limit 1", maxInside.Load())
		}
	})
}

func TestDisabledPassesStraightThrough(t *testing.T) {
	r := mustRegistry(t, map[string]string{"RESILIENCE_ENABLED": "false", "CIRCUIT_BREAKER_X_FAIL_MAX": "1", "BULKHEAD_X_LIMIT": "1", "BULKHEAD_X_FAIL_FAST": "true"})
	calls := 0
	fail := func(context.Context) (int, error) { calls++; return 0, errBoom }
	for _, fn := range []Func[int]{
		ForService(r, "x", fail),
		WithCircuitBreaker(fail, r.CircuitBreaker("x")),
		WithRetry(fail, r.Retry()),
	} {
		calls = 0
		for range 3 {
			if _, err := fn(context.Background()); err != errBoom {
				t.Fatalf("err = %v; want errBoom as it was", err)
			}
		}
		if calls != 3 {
			t.Fatalf("calls = %d; want 3 (no retries, no breaker)", calls)
		}
	}
	// The bulkhead too: a held slot does not block.
	release, _ := r.Bulkhead("x").Acquire(context.Background())
	defer release()
	if _, err := WithBulkhead(okFunc, r.Bulkhead("x"))(context.Background()); err != nil {
		t.Fatalf("disabled bulkhead rejected: %v", err)
	}
	if r.CircuitBreaker("x").State() != StateClosed {
		t.Error("disabled breaker changed state")
	}
}

func TestReload(t *testing.T) {
	r := mustRegistry(t, map[string]string{"CIRCUIT_BREAKER_X_FAIL_MAX": "5", "BULKHEAD_X_LIMIT": "1", "TIMEOUT_X": "1"})
	cb, b := r.CircuitBreaker("x"), r.Bulkhead("x")
	fail := WithCircuitBreaker(failFunc, cb)
	fail(context.Background())

	cfg := r.Config()
	cfg.CircuitBreakers["X"] = CircuitBreakerConfig{FailMax: 2, OpenTimeout: time.Minute}
	cfg.Bulkheads["X"] = BulkheadConfig{Limit: 3}
	cfg.Retry.MaxAttempts = 7
	cfg.Timeouts["X"] = 2 * time.Second
	if err := r.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	if r.CircuitBreaker("x") != cb || r.Bulkhead("x") != b {
		t.Fatal("Reload replaced live instances")
	}
	// FailMax applies at once and the count so far is kept.
	fail(context.Background())
	if cb.State() != StateOpen {
		t.Errorf("after 2 failures with FailMax reloaded to 2: %v; want open", cb.State())
	}
	if b.Limit() != 3 || r.Retry().MaxAttempts() != 7 || r.Timeout("x") != 2*time.Second {
		t.Errorf("reload not applied: limit %d, attempts %d, timeout %v", b.Limit(), r.Retry().MaxAttempts(), r.Timeout("x"))
	}
	bad := r.Config()
	bad.Bulkheads["X"] = BulkheadConfig{Limit: -1}
	bad.Retry.MaxAttempts = 1
	if err := r.Reload(bad); err == nil || b.Limit() != 3 || r.Retry().MaxAttempts() != 7 {
		t.Errorf("invalid reload: err %v, limit %d, attempts %d; want an error and nothing changed", err, b.Limit(), r.Retry().MaxAttempts())
	}
	off := r.Config()
	off.Enabled = false
	r.Reload(off)
	if _, err := WithCircuitBreaker(okFunc, cb)(context.Background()); err != nil || r.Enabled() {
		t.Errorf("disabled by reload, open breaker still rejects: %v", err)
	}
}

// Reload under concurrent calls: no call dropped, the bulkhead grows and
// shrinks, -race clean.
func TestReloadUnderConcurrentCalls(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := mustRegistry(t, map[string]string{"BULKHEAD_W_LIMIT": "2", "TIMEOUT_W": "10"})
		var inside, over atomic.Int32
		var limit atomic.Int32
		limit.Store(8)
		fn := ForService(r, "w", func(ctx context.Context) (int, error) {
			n := inside.Add(1)
			defer inside.Add(-1)
			if n > limit.Load() {
				over.Add(1)
			}
			time.Sleep(time.Millisecond)
			return 1, nil
		})
		var ok atomic.Int32
		var wg sync.WaitGroup
		for range 16 {
			wg.Go(func() {
				for range 50 {
					if v, err := fn(context.Background()); err == nil && v == 1 {
						ok.Add(1)
					}
				}
			})
		}
		for i := range 20 {
			time.Sleep(3 * time.Millisecond)
			cfg := r.Config()
			cfg.Bulkheads["W"] = BulkheadConfig{Limit: 1 + i%8}
			cfg.CircuitBreakers["W"] = CircuitBreakerConfig{FailMax: 1 + i%3, OpenTimeout: time.Second}
			cfg.Retry.MaxAttempts = 1 + i%4
			if err := r.Reload(cfg); err != nil {
				t.Fatal(err)
			}
		}
		wg.Wait()
		if ok.Load() != 16*50 {
			t.Fatalf("%d of %d calls succeeded; reload dropped calls", ok.Load(), 16*50)
		}
		if over.Load() != 0 {
			t.Fatalf("%d calls over the largest limit", over.Load())
		}
		if s := r.Bulkhead("w").Stats(); s.Active != 0 || s.Waiting != 0 || s.Completed != 16*50 {
			t.Fatalf("Stats = %+v after the run", s)
		}
	})
}

// The default registry with an invalid environment: the built-in defaults
// whole, said once through slog with every bad variable.
func TestDefaultRegistryInvalidEnvironment(t *testing.T) {
	var buf bytes.Buffer
	old := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&buf, nil)))
	t.Cleanup(func() { slog.SetDefault(old) })

	t.Setenv("RETRY_MAX_ATTEMPTS", "lots")
	t.Setenv("BULKHEAD_LLM_LIMIT", "0")
	r := newDefaultRegistry(LoadConfig)
	if !reflect.DeepEqual(r.Config(), DefaultConfig()) {
		t.Errorf("config = %+v; want the defaults", r.Config())
	}
	out := buf.String()
	if strings.Count(out, "level=WARN") != 1 || !strings.Contains(out, "RETRY_MAX_ATTEMPTS") || !strings.Contains(out, "BULKHEAD_LLM_LIMIT") {
		t.Errorf("log = %q; want one warning naming both variables", out)
	}
}

func TestDefaultRegistryAndGetters(t *testing.T) {
	t.Setenv("CIRCUIT_BREAKER_GETTERS_FAIL_MAX", "4")
	resetDefault()
	t.Cleanup(resetDefault)
	if GetCircuitBreaker("getters") != Default().CircuitBreaker("getters") || GetBulkhead("llm") != Default().Bulkhead("llm") {
		t.Error("getters do not use the default registry")
	}
	if GetResilienceConfig().CircuitBreakerConfig("getters").FailMax != 4 {
		t.Error("default registry not built from the environment")
	}
	t.Setenv("TIMEOUT_LLM", "1")
	resetDefault()
	if TimeoutFor("llm") != time.Second {
		t.Errorf("TimeoutFor(llm) = %v; want the environment's 1s", TimeoutFor("llm"))
	}
	// nil registry in ForService means the default one.
	if v, err := ForService[int](nil, "getters", okFunc)(context.Background()); v != 1 || err != nil {
		t.Errorf("ForService(nil) = %v, %v", v, err)
	}
	if _, err := ForService[int](nil, "x", nil)(context.Background()); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("ForService nil fn: %v", err)
	}
}

func resetDefault() {
	defaultRegistry.once = sync.Once{}
	defaultRegistry.r = nil
}

// mustRetryOf fetches the registry's retry policy a second time.
func mustRetryOf(r *Registry) *Retry { return r.Retry() }

// A reload that changes OpenTimeout starts the breaker afresh, but a state
// an operator forced stays forced.
func TestReloadKeepsForcedState(t *testing.T) {
	r := mustRegistry(t, map[string]string{"CIRCUIT_BREAKER_X_TIMEOUT": "10"})
	cb := r.CircuitBreaker("x")
	cb.ForceOpen()
	cfg := r.Config()
	cfg.CircuitBreakers["X"] = CircuitBreakerConfig{FailMax: 5, OpenTimeout: 20 * time.Second}
	if err := r.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	if !cb.Forced() || cb.State() != StateOpen {
		t.Fatalf("after reload: forced %v, %v; want still forced open", cb.Forced(), cb.State())
	}
	cb.Reset()
	if cb.settings.Timeout != 20*time.Second {
		t.Fatalf("OpenTimeout %v; want the reloaded 20s", cb.settings.Timeout)
	}
}

// Validating a configuration builds no breaker or bulkhead that the
// metrics would then observe.
func TestValidateBuildsNothing(t *testing.T) {
	observed.mu.Lock()
	before := len(observed.breakers) + len(observed.bulkheads)
	observed.mu.Unlock()
	for range 10 {
		if err := DefaultConfig().Validate(); err != nil {
			t.Fatal(err)
		}
	}
	observed.mu.Lock()
	after := len(observed.breakers) + len(observed.bulkheads)
	observed.mu.Unlock()
	if after != before {
		t.Fatalf("Validate added %d observed policies", after-before)
	}
}
