package resilience

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"
)

// loadAdaptiveOf loads env and returns the Adaptive of the named
// resource's bulkhead.
func loadAdaptiveOf(t *testing.T, env map[string]string, resource string) *AdaptiveConfig {
	t.Helper()
	cfg, err := LoadConfigWith(LoadOptions{Environment: env})
	if err != nil {
		t.Fatalf("LoadConfigWith(%v) = %v", env, err)
	}
	return cfg.BulkheadConfig(resource).Adaptive
}

func fmtAdaptive(a *AdaptiveConfig) string {
	if a == nil {
		return "nil"
	}
	return fmt.Sprintf("&%+v", *a)
}

func TestLoadConfigAdaptive(t *testing.T) {
	t.Parallel()
	aimd := func(lo, hi int) *AdaptiveConfig {
		return &AdaptiveConfig{MinLimit: lo, MaxLimit: hi, Algorithm: AdaptiveAIMD}
	}
	gradient := func(lo, hi int) *AdaptiveConfig {
		return &AdaptiveConfig{MinLimit: lo, MaxLimit: hi, Algorithm: AdaptiveGradient}
	}
	dflt := map[string]string{"BULKHEAD_DEFAULT_ADAPTIVE": "aimd", "BULKHEAD_DEFAULT_MAX_LIMIT": "30"}
	with := func(extra map[string]string) map[string]string {
		m := map[string]string{}
		for k, v := range dflt {
			m[k] = v
		}
		for k, v := range extra {
			m[k] = v
		}
		return m
	}
	for _, tc := range []struct {
		name     string
		env      map[string]string
		resource string
		want     *AdaptiveConfig
	}{
		{"unset", map[string]string{}, "llm", nil},
		{"aimd", map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd"}, "llm", aimd(0, 0)},
		{"gradient", map[string]string{"BULKHEAD_LLM_ADAPTIVE": "gradient"}, "llm", gradient(0, 0)},
		{"upper case", map[string]string{"BULKHEAD_LLM_ADAPTIVE": "AIMD"}, "llm", aimd(0, 0)},
		{"mixed case and spaces", map[string]string{"BULKHEAD_LLM_ADAPTIVE": " Gradient "}, "llm", gradient(0, 0)},
		{"empty", map[string]string{"BULKHEAD_LLM_ADAPTIVE": ""}, "llm", nil},
		{"bounds", map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_MIN_LIMIT": "2", "BULKHEAD_LLM_MAX_LIMIT": "40"}, "llm", aimd(2, 40)},
		{"zero bounds", map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_MIN_LIMIT": "0", "BULKHEAD_LLM_MAX_LIMIT": "0"}, "llm", aimd(0, 0)},
		{"bounds at the limit", map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_LIMIT": "5", "BULKHEAD_LLM_MIN_LIMIT": "5", "BULKHEAD_LLM_MAX_LIMIT": "5"}, "llm", aimd(5, 5)},
		{"empty bound is unset", map[string]string{"BULKHEAD_LLM_MIN_LIMIT": ""}, "llm", nil},
		{"a new resource by _ADAPTIVE alone", map[string]string{"BULKHEAD_S3_ADAPTIVE": "gradient"}, "s3", gradient(0, 0)},
		{"other resources stay fixed", map[string]string{"BULKHEAD_S3_ADAPTIVE": "gradient"}, "llm", nil},
		{"DEFAULT applies to a resource without its own", dflt, "misc", aimd(0, 30)},
		{"DEFAULT does not apply to a resource with its own", dflt, "llm", nil},
		{"DEFAULT under a resource's own variables", with(map[string]string{"BULKHEAD_S3_LIMIT": "3"}), "s3", aimd(0, 30)},
		{"a resource's own bound over DEFAULT's", with(map[string]string{"BULKHEAD_S3_MIN_LIMIT": "2"}), "s3", aimd(2, 30)},
		{"a resource's own algorithm over DEFAULT's", with(map[string]string{"BULKHEAD_S3_ADAPTIVE": "gradient"}), "s3", gradient(0, 30)},
		{"empty opts out of DEFAULT", with(map[string]string{"BULKHEAD_S3_ADAPTIVE": ""}), "s3", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := loadAdaptiveOf(t, tc.env, tc.resource)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("BulkheadConfig(%q).Adaptive = %s; want %s", tc.resource, fmtAdaptive(got), fmtAdaptive(tc.want))
			}
		})
	}
}

// Each resource gets an AdaptiveConfig of its own, not DEFAULT's.
func TestLoadConfigAdaptiveNotShared(t *testing.T) {
	t.Parallel()
	cfg, err := LoadConfigWith(LoadOptions{Environment: map[string]string{"BULKHEAD_DEFAULT_ADAPTIVE": "aimd", "BULKHEAD_S3_LIMIT": "3"}})
	if err != nil {
		t.Fatal(err)
	}
	if d, s := cfg.DefaultBulkhead.Adaptive, cfg.Bulkheads["S3"].Adaptive; d == nil || s == nil || d == s {
		t.Fatalf("DefaultBulkhead.Adaptive = %p, Bulkheads[S3].Adaptive = %p; want two of their own", d, s)
	}
}

func TestLoadConfigAdaptivePrefix(t *testing.T) {
	t.Parallel()
	cfg, err := LoadConfigWith(LoadOptions{Prefix: "MYAPP_", Environment: map[string]string{
		"MYAPP_BULKHEAD_LLM_ADAPTIVE":  "aimd",
		"MYAPP_BULKHEAD_LLM_MAX_LIMIT": "30",
		"BULKHEAD_LLM_ADAPTIVE":        "bad", // another app's: ignored
		"BULKHEAD_DB_ADAPTIVE":         "gradient",
	}})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := cfg.BulkheadConfig("llm").Adaptive, (&AdaptiveConfig{MaxLimit: 30, Algorithm: AdaptiveAIMD}); !reflect.DeepEqual(got, want) {
		t.Errorf("llm Adaptive = %s; want %s", fmtAdaptive(got), fmtAdaptive(want))
	}
	if got := cfg.BulkheadConfig("db").Adaptive; got != nil {
		t.Errorf("db Adaptive = %s from an unprefixed variable; want nil", fmtAdaptive(got))
	}

	// The bound needs the prefixed _ADAPTIVE, not the unprefixed one.
	_, err = LoadConfigWith(LoadOptions{Prefix: "MYAPP_", Environment: map[string]string{
		"MYAPP_BULKHEAD_LLM_MIN_LIMIT": "2",
		"BULKHEAD_LLM_ADAPTIVE":        "aimd",
		"MYAPP_BULKHEAD_DB_ADAPTIVE":   "fast",
	}})
	for _, want := range []string{`MYAPP_BULKHEAD_LLM_MIN_LIMIT="2": needs MYAPP_BULKHEAD_LLM_ADAPTIVE`, `MYAPP_BULKHEAD_DB_ADAPTIVE="fast"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("err = %v; want it to contain %s", err, want)
		}
	}
}

// varErrors returns the VarErrors err joins, and whether it joins
// anything else.
func varErrors(err error) (ves []*VarError, other bool) {
	var errs []error
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	} else if err != nil {
		errs = []error{err}
	}
	for _, e := range errs {
		if ve, ok := e.(*VarError); ok {
			ves = append(ves, ve)
		} else {
			other = true
		}
	}
	return ves, other
}

func TestLoadConfigAdaptiveErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		env    map[string]string
		name   string // the variable the one error names, with its value
		reason string
	}{
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "fast"}, "BULKHEAD_LLM_ADAPTIVE", "must be gradient or aimd"},
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd,gradient"}, "BULKHEAD_LLM_ADAPTIVE", "must be gradient or aimd"},
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "true"}, "BULKHEAD_LLM_ADAPTIVE", "must be gradient or aimd"},
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "fast", "BULKHEAD_LLM_MIN_LIMIT": "2"}, "BULKHEAD_LLM_ADAPTIVE", "must be gradient or aimd"},
		{map[string]string{"BULKHEAD_LLM_MIN_LIMIT": "2"}, "BULKHEAD_LLM_MIN_LIMIT", "needs BULKHEAD_LLM_ADAPTIVE"},
		{map[string]string{"BULKHEAD_LLM_MAX_LIMIT": "20"}, "BULKHEAD_LLM_MAX_LIMIT", "needs BULKHEAD_LLM_ADAPTIVE"},
		{map[string]string{"BULKHEAD_LLM_MAX_LIMIT": "ten"}, "BULKHEAD_LLM_MAX_LIMIT", "needs BULKHEAD_LLM_ADAPTIVE"},
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "", "BULKHEAD_LLM_MIN_LIMIT": "2"}, "BULKHEAD_LLM_MIN_LIMIT", "needs BULKHEAD_LLM_ADAPTIVE"},
		{map[string]string{"BULKHEAD_DEFAULT_MAX_LIMIT": "20"}, "BULKHEAD_DEFAULT_MAX_LIMIT", "needs BULKHEAD_DEFAULT_ADAPTIVE"},
		{map[string]string{"BULKHEAD_NEW_MIN_LIMIT": "1"}, "BULKHEAD_NEW_MIN_LIMIT", "needs BULKHEAD_NEW_ADAPTIVE"},
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_MIN_LIMIT": "-1"}, "BULKHEAD_LLM_MIN_LIMIT", "must not be negative"},
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_MAX_LIMIT": "-5"}, "BULKHEAD_LLM_MAX_LIMIT", "must not be negative"},
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_MIN_LIMIT": "1.5"}, "BULKHEAD_LLM_MIN_LIMIT", "not a whole number"},
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_MAX_LIMIT": "ten"}, "BULKHEAD_LLM_MAX_LIMIT", "not a whole number"},
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_MAX_LIMIT": " "}, "BULKHEAD_LLM_MAX_LIMIT", "not a whole number"},
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_MIN_LIMIT": "5", "BULKHEAD_LLM_MAX_LIMIT": "3"}, "BULKHEAD_LLM_MAX_LIMIT", "must not be below the adaptive minimum (5)"},
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_LIMIT": "3", "BULKHEAD_LLM_MIN_LIMIT": "5"}, "BULKHEAD_LLM_LIMIT", "must be between the adaptive minimum and maximum, 5 and 30"},
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_LIMIT": "50", "BULKHEAD_LLM_MAX_LIMIT": "20"}, "BULKHEAD_LLM_LIMIT", "must be between the adaptive minimum and maximum, 1 and 20"},
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_MIN_LIMIT": "20"}, "BULKHEAD_LLM_MIN_LIMIT", "must not be above the starting limit (10)"},
		{map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_MAX_LIMIT": "5"}, "BULKHEAD_LLM_MAX_LIMIT", "must not be below the starting limit (10)"},
		{map[string]string{"BULKHEAD_DEFAULT_ADAPTIVE": "aimd", "BULKHEAD_DEFAULT_MAX_LIMIT": "20", "BULKHEAD_S3_LIMIT": "30"}, "BULKHEAD_S3_LIMIT", "must be between the adaptive minimum and maximum, 1 and 20"},
		{map[string]string{"BULKHEAD_DEFAULT_ADAPTIVE": "aimd", "BULKHEAD_DEFAULT_MIN_LIMIT": "5", "BULKHEAD_S3_MAX_LIMIT": "3"}, "BULKHEAD_S3_MAX_LIMIT", "must not be below the adaptive minimum (5)"},
		{map[string]string{"BULKHEAD_DEFAULT_ADAPTIVE": "aimd", "BULKHEAD_DEFAULT_MAX_LIMIT": "20", "BULKHEAD_S3_MIN_LIMIT": "25"}, "BULKHEAD_S3_MIN_LIMIT", "must not be above the adaptive maximum (20)"},
		{map[string]string{"BULKHEAD_DEFAULT_ADAPTIVE": "gradient", "BULKHEAD_DEFAULT_LIMIT": "8", "BULKHEAD_DEFAULT_MAX_LIMIT": "6"}, "BULKHEAD_DEFAULT_LIMIT", "must be between the adaptive minimum and maximum, 1 and 6"},
	} {
		t.Run(strings.Join(slicesSortedKeys(tc.env), ","), func(t *testing.T) {
			cfg, err := LoadConfigWith(LoadOptions{Environment: tc.env})
			if !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("err = %v; want ErrInvalidConfig", err)
			}
			ves, other := varErrors(err)
			if len(ves) != 1 || other {
				t.Fatalf("err = %v; want one VarError, naming %s", err, tc.name)
			}
			want := &VarError{Var: tc.name, Value: tc.env[tc.name]}
			if ve := ves[0]; ve.Var != want.Var || ve.Value != want.Value || !strings.Contains(ve.Reason, tc.reason) {
				t.Errorf("err = %v; want %s=%q: ...%s...", err, want.Var, want.Value, tc.reason)
			}
			if want := tc.name + "=" + fmt.Sprintf("%q", tc.env[tc.name]); !strings.Contains(err.Error(), want) {
				t.Errorf("err = %v; want it to say %s", err, want)
			}
			if !reflect.DeepEqual(cfg, DefaultConfig()) {
				t.Errorf("on error the config is %+v; want the defaults", cfg)
			}
		})
	}
}

// Every combination of the variables either loads into a Config that
// builds a registry, or is refused with errors that each name a variable:
// never a panic, never an error only Config.Validate finds.
func TestLoadConfigAdaptiveCombinations(t *testing.T) {
	t.Parallel()
	limits := []string{"", "1", "5", "10", "50"}
	bounds := []string{"", "0", "1", "3", "5", "20", "-1", "x"}
	algos := []string{"", "aimd", "GRADIENT", "other"}
	var n, ok int
	for _, scope := range []string{"LLM", "S3", "DEFAULT"} {
		for _, algo := range append(algos, "unset") {
			for _, limit := range limits {
				for _, lo := range bounds {
					for _, hi := range bounds {
						env := map[string]string{"BULKHEAD_DEFAULT_ADAPTIVE": "aimd", "BULKHEAD_DEFAULT_MAX_LIMIT": "40"}
						if scope == "DEFAULT" {
							env = map[string]string{"BULKHEAD_S3_MAX_QUEUE": "1"}
						}
						p := "BULKHEAD_" + scope + "_"
						if algo != "unset" {
							env[p+"ADAPTIVE"] = algo
						}
						for k, v := range map[string]string{"LIMIT": limit, "MIN_LIMIT": lo, "MAX_LIMIT": hi} {
							if v != "" {
								env[p+k] = v
							}
						}
						n++
						cfg, err := LoadConfigWith(LoadOptions{Environment: env})
						if err != nil {
							if ves, other := varErrors(err); len(ves) == 0 || other {
								t.Errorf("%v: %v; want only VarErrors", env, err)
							}
							continue
						}
						ok++
						r, err := NewRegistry(cfg)
						if err != nil {
							t.Errorf("%v: loaded, but NewRegistry = %v", env, err)
							continue
						}
						b := r.Bulkhead(scope)
						if scope == "DEFAULT" {
							b = r.Bulkhead("s3")
						}
						a := cfg.BulkheadConfig(b.Name()).Adaptive
						if b.Adaptive() != (a != nil) {
							t.Errorf("%v: Adaptive() = %v with Adaptive %s", env, b.Adaptive(), fmtAdaptive(a))
						}
						if a != nil {
							if lo, hi := a.bounds(cfg.BulkheadConfig(b.Name()).Limit); b.Limit() < lo || b.Limit() > hi {
								t.Errorf("%v: Limit() = %d, outside [%d, %d]", env, b.Limit(), lo, hi)
							}
						}
					}
				}
			}
		}
	}
	if ok == 0 || ok == n {
		t.Errorf("%d of %d combinations loaded; want some of each", ok, n)
	}
}

func TestLoadConfigAdaptiveDefaults(t *testing.T) {
	t.Parallel()
	r := mustRegistry(t, map[string]string{"BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_LIMIT": "7"})
	b := r.Bulkhead("llm")
	if !b.Adaptive() || b.Limit() != 7 {
		t.Fatalf("Adaptive() = %v, Limit() = %d; want true, 7", b.Adaptive(), b.Limit())
	}
	lo, hi := adaptiveBounds(b)
	if lo != 1 || hi != 70 {
		t.Errorf("bounds = [%v, %v]; want the defaults [1, 70]: 1 and 10 times the starting limit", lo, hi)
	}
	if got := adaptiveAlgo(b); got != AdaptiveAIMD {
		t.Errorf("algorithm = %v; want aimd", got)
	}
	// Gradient is the default of the type, named in full in the variable.
	r = mustRegistry(t, map[string]string{"BULKHEAD_LLM_ADAPTIVE": "gradient"})
	if got := adaptiveAlgo(r.Bulkhead("llm")); got != AdaptiveGradient {
		t.Errorf("algorithm = %v; want gradient", got)
	}
}

// adaptiveBounds returns the bounds of b's adaptive limit, -1 if it has
// none.
func adaptiveBounds(b *Bulkhead) (lo, hi float64) {
	a := b.adapt.Load()
	if a == nil {
		return -1, -1
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lo, a.hi
}

// adaptiveAlgo returns the algorithm of b's adaptive limit, -1 if it has
// none.
func adaptiveAlgo(b *Bulkhead) AdaptiveAlgorithm {
	a := b.adapt.Load()
	if a == nil {
		return -1
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.algo
}

// Config.Validate checks an Adaptive built in code, of the default
// bulkhead and of each resource's.
func TestValidateAdaptive(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		edit func(*Config)
		want []string // empty: valid
	}{
		{"valid", func(c *Config) {
			c.DefaultBulkhead.Adaptive = &AdaptiveConfig{MinLimit: 2, MaxLimit: 20}
			c.Bulkheads["LLM"] = BulkheadConfig{Limit: 10, Adaptive: &AdaptiveConfig{Algorithm: AdaptiveAIMD, Smoothing: 0.5, Window: time.Second}}
		}, nil},
		{"default limit in bounds", func(c *Config) {
			c.Bulkheads["X"] = BulkheadConfig{Adaptive: &AdaptiveConfig{MaxLimit: 10}}
		}, nil},
		{"resource", func(c *Config) {
			c.Bulkheads["LLM"] = BulkheadConfig{Limit: 10, Adaptive: &AdaptiveConfig{MinLimit: -1}}
		}, []string{"bulkhead LLM", "AdaptiveConfig.MinLimit = -1"}},
		{"default", func(c *Config) {
			c.DefaultBulkhead.Adaptive = &AdaptiveConfig{MaxLimit: 5}
		}, []string{"BulkheadConfig.Limit = 10"}},
		{"algorithm", func(c *Config) {
			c.Bulkheads["X"] = BulkheadConfig{Limit: 1, Adaptive: &AdaptiveConfig{Algorithm: 7}}
		}, []string{"bulkhead X", "AdaptiveConfig.Algorithm"}},
		{"max below min", func(c *Config) {
			c.Bulkheads["X"] = BulkheadConfig{Limit: 4, Adaptive: &AdaptiveConfig{MinLimit: 4, MaxLimit: 3}}
		}, []string{"bulkhead X", "AdaptiveConfig.MaxLimit = 3"}},
		{"smoothing", func(c *Config) {
			c.Bulkheads["X"] = BulkheadConfig{Limit: 4, Adaptive: &AdaptiveConfig{Smoothing: 2}}
		}, []string{"bulkhead X", "AdaptiveConfig.Smoothing"}},
		{"limit below the default bound of a resource without one", func(c *Config) {
			c.Bulkheads["X"] = BulkheadConfig{Adaptive: &AdaptiveConfig{MinLimit: 11}}
		}, []string{"bulkhead X", "BulkheadConfig.Limit = 10"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultConfig()
			tc.edit(&cfg)
			err := cfg.Validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("Validate() = %v; want nil", err)
				}
				if _, err := NewRegistry(cfg); err != nil {
					t.Fatalf("NewRegistry = %v", err)
				}
				return
			}
			if !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("Validate() = %v; want ErrInvalidConfig", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate() = %v; want it to contain %q", err, w)
				}
			}
			if r, err := NewRegistry(cfg); r != nil || err == nil {
				t.Errorf("NewRegistry accepted it")
			}
		})
	}
}

func TestConfigCloneAdaptive(t *testing.T) {
	t.Parallel()
	cfg := DefaultConfig()
	cfg.DefaultBulkhead.Adaptive = &AdaptiveConfig{MaxLimit: 20}
	cfg.Bulkheads["LLM"] = BulkheadConfig{Limit: 10, Adaptive: &AdaptiveConfig{MinLimit: 2}}
	c := cfg.Clone()
	if !reflect.DeepEqual(c, cfg) {
		t.Fatalf("Clone() = %+v; want %+v", c, cfg)
	}
	c.DefaultBulkhead.Adaptive.MaxLimit = 99
	c.Bulkheads["LLM"].Adaptive.MinLimit = 99
	if cfg.DefaultBulkhead.Adaptive.MaxLimit != 20 || cfg.Bulkheads["LLM"].Adaptive.MinLimit != 2 {
		t.Errorf("changing the clone's Adaptive changed the original's: %+v, %+v", *cfg.DefaultBulkhead.Adaptive, *cfg.Bulkheads["LLM"].Adaptive)
	}

	// Through the registry, which keeps a clone: neither the caller's
	// config after NewRegistry nor Config()'s copy reaches it.
	r, err := NewRegistry(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Bulkheads["LLM"].Adaptive.MinLimit = 50
	r.Config().Bulkheads["LLM"].Adaptive.MinLimit = 60
	if got := r.Config().Bulkheads["LLM"].Adaptive.MinLimit; got != 2 {
		t.Errorf("the registry's MinLimit = %d after changing copies; want 2", got)
	}
}

// reloadEnv loads env and reloads r with it.
func reloadEnv(t *testing.T, r *Registry, env map[string]string) {
	t.Helper()
	cfg, err := LoadConfigWith(LoadOptions{Environment: env})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Reload(cfg); err != nil {
		t.Fatalf("Reload(%v) = %v", env, err)
	}
}

func TestReloadAdaptive(t *testing.T) {
	t.Parallel()
	r := mustRegistry(t, map[string]string{"BULKHEAD_LLM_LIMIT": "10"})
	b := r.Bulkhead("llm")
	if b.Adaptive() {
		t.Fatal("adaptive before any variable turned it on")
	}

	// On.
	reloadEnv(t, r, map[string]string{"BULKHEAD_LLM_LIMIT": "10", "BULKHEAD_LLM_ADAPTIVE": "aimd", "BULKHEAD_LLM_MIN_LIMIT": "2", "BULKHEAD_LLM_MAX_LIMIT": "40"})
	if r.Bulkhead("llm") != b {
		t.Fatal("Reload replaced the bulkhead; want it changed in place")
	}
	if !b.Adaptive() {
		t.Fatal("Adaptive() = false after Reload with BULKHEAD_LLM_ADAPTIVE=aimd")
	}
	if l := b.Limit(); l < 2 || l > 40 {
		t.Errorf("Limit() = %d; want it within [2, 40]", l)
	}
	if lo, hi := adaptiveBounds(b); lo != 2 || hi != 40 {
		t.Errorf("bounds = [%v, %v]; want [2, 40]", lo, hi)
	}
	if got := adaptiveAlgo(b); got != AdaptiveAIMD {
		t.Errorf("algorithm = %v; want aimd", got)
	}

	// It learns: three windows with overload take it from 10 to 7.
	a := b.adapt.Load()
	if a == nil {
		t.Fatal("no adaptive limit to feed")
	}
	var now time.Duration
	if got := feed(a, &now, 3, time.Millisecond, 10, true); got != 7 {
		t.Fatalf("learnt limit %d; want 7", got)
	}

	// New bounds and algorithm: what it learnt stays, moved into them.
	reloadEnv(t, r, map[string]string{"BULKHEAD_LLM_LIMIT": "10", "BULKHEAD_LLM_ADAPTIVE": "GRADIENT", "BULKHEAD_LLM_MIN_LIMIT": "2", "BULKHEAD_LLM_MAX_LIMIT": "12"})
	if !b.Adaptive() || b.Limit() != 7 {
		t.Errorf("Adaptive() = %v, Limit() = %d after new bounds [2, 12]; want true and the learnt 7", b.Adaptive(), b.Limit())
	}
	if lo, hi := adaptiveBounds(b); lo != 2 || hi != 12 {
		t.Errorf("bounds = [%v, %v]; want [2, 12]", lo, hi)
	}
	if got := adaptiveAlgo(b); got != AdaptiveGradient {
		t.Errorf("algorithm = %v; want gradient", got)
	}
	reloadEnv(t, r, map[string]string{"BULKHEAD_LLM_LIMIT": "10", "BULKHEAD_LLM_ADAPTIVE": "gradient", "BULKHEAD_LLM_MIN_LIMIT": "8"})
	if l := b.Limit(); l != 8 {
		t.Errorf("Limit() = %d after MIN_LIMIT 8 above the learnt 7; want 8", l)
	}
	reloadEnv(t, r, map[string]string{"BULKHEAD_LLM_LIMIT": "4", "BULKHEAD_LLM_ADAPTIVE": "gradient", "BULKHEAD_LLM_MAX_LIMIT": "5"})
	if l := b.Limit(); l != 5 {
		t.Errorf("Limit() = %d after MAX_LIMIT 5 below the learnt 8; want 5", l)
	}

	// An invalid configuration changes nothing.
	bad := r.Config()
	bad.Bulkheads["LLM"] = BulkheadConfig{Limit: 10, Adaptive: &AdaptiveConfig{MinLimit: -1}}
	if err := r.Reload(bad); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("Reload(invalid Adaptive) = %v; want ErrInvalidConfig", err)
	}
	if !b.Adaptive() || b.Limit() != 5 {
		t.Errorf("Adaptive() = %v, Limit() = %d after a refused Reload; want true, 5", b.Adaptive(), b.Limit())
	}

	// Off: the configured limit again.
	reloadEnv(t, r, map[string]string{"BULKHEAD_LLM_LIMIT": "6"})
	if b.Adaptive() {
		t.Error("Adaptive() = true after Reload without BULKHEAD_LLM_ADAPTIVE")
	}
	if l := b.Limit(); l != 6 {
		t.Errorf("Limit() = %d after turning adaptive off; want the configured 6", l)
	}
}

// BULKHEAD_DEFAULT_ADAPTIVE reaches, on Reload, the live bulkheads of
// resources that take DEFAULT's settings.
func TestReloadAdaptiveDefault(t *testing.T) {
	t.Parallel()
	r := mustRegistry(t, map[string]string{})
	misc, llm := r.Bulkhead("misc"), r.Bulkhead("llm")
	reloadEnv(t, r, map[string]string{"BULKHEAD_DEFAULT_ADAPTIVE": "aimd", "BULKHEAD_DEFAULT_LIMIT": "4", "BULKHEAD_DEFAULT_MAX_LIMIT": "6"})
	if !misc.Adaptive() || misc.Limit() != 4 {
		t.Errorf("misc: Adaptive() = %v, Limit() = %d; want true, 4", misc.Adaptive(), misc.Limit())
	}
	if lo, hi := adaptiveBounds(misc); lo != 1 || hi != 6 {
		t.Errorf("misc: bounds = [%v, %v]; want [1, 6]", lo, hi)
	}
	if llm.Adaptive() {
		t.Error("llm, with a configuration of its own, took DEFAULT's adaptive limit")
	}
	reloadEnv(t, r, map[string]string{"BULKHEAD_DEFAULT_ADAPTIVE": "aimd", "BULKHEAD_MISC_ADAPTIVE": ""})
	if misc.Adaptive() || misc.Limit() != 10 {
		t.Errorf("misc opted out: Adaptive() = %v, Limit() = %d; want false, 10", misc.Adaptive(), misc.Limit())
	}
}
