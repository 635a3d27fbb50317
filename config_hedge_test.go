package resilience

import (
	"context"
	"errors"
	"reflect"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// The HEDGE_<SERVICE>_* variables and the registry's hedges.

func TestLoadConfigHedges(t *testing.T) {
	cfg, err := LoadConfigWith(LoadOptions{Environment: map[string]string{
		"HEDGE_SEARCH_DELAY":    "50ms",
		"HEDGE_SEARCH_MAX":      "3",
		"HEDGE_SEARCH_QUANTILE": "0.95",
		"HEDGE_SEARCH_BUDGET":   "0.2",
		"HEDGE_AUTH_DELAY":      "0.02", // plain seconds
		"HEDGE_PAYMENTS_DELAY":  "0",    // every hedge at once
	}})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]HedgingConfig{
		"SEARCH":   {Delay: 50 * time.Millisecond, MaxHedges: 3, Quantile: 0.95, Budget: 0.2},
		"AUTH":     {Delay: 20 * time.Millisecond},
		"PAYMENTS": {},
	}
	if !reflect.DeepEqual(cfg.Hedges, want) {
		t.Fatalf("Hedges:\n got  %+v\n want %+v", cfg.Hedges, want)
	}
	if DefaultConfig().Hedges != nil {
		t.Errorf("DefaultConfig().Hedges = %v; want none: nothing is hedged unless named", DefaultConfig().Hedges)
	}
	// Clone copies the map.
	c := cfg.Clone()
	c.Hedges["SEARCH"] = HedgingConfig{}
	if cfg.Hedges["SEARCH"].Delay != 50*time.Millisecond {
		t.Error("changing a clone's Hedges changed the original's")
	}
}

// Every bad variable is reported, by name and value; the good ones beside
// them are not.
func TestLoadConfigReportsBadHedges(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  map[string]string
		bad  []string // the variables reported
		why  string   // in the reason of the first
	}{
		{"negative delay", map[string]string{"HEDGE_S_DELAY": "-1s"}, []string{"HEDGE_S_DELAY"}, "negative"},
		{"delay not a duration", map[string]string{"HEDGE_S_DELAY": "soon"}, []string{"HEDGE_S_DELAY"}, "not a duration"},
		{"empty delay", map[string]string{"HEDGE_S_DELAY": ""}, []string{"HEDGE_S_DELAY"}, "unset it"},
		{"blank delay", map[string]string{"HEDGE_S_DELAY": " "}, []string{"HEDGE_S_DELAY"}, "unset it"},
		{"max above 10", map[string]string{"HEDGE_S_DELAY": "1s", "HEDGE_S_MAX": "11"}, []string{"HEDGE_S_MAX"}, "between 0 and 10"},
		{"negative max", map[string]string{"HEDGE_S_DELAY": "1s", "HEDGE_S_MAX": "-1"}, []string{"HEDGE_S_MAX"}, "between 0 and 10"},
		{"max not a number", map[string]string{"HEDGE_S_DELAY": "1s", "HEDGE_S_MAX": "two"}, []string{"HEDGE_S_MAX"}, "whole number"},
		{"quantile 1", map[string]string{"HEDGE_S_DELAY": "1s", "HEDGE_S_QUANTILE": "1"}, []string{"HEDGE_S_QUANTILE"}, "below 1"},
		{"negative quantile", map[string]string{"HEDGE_S_DELAY": "1s", "HEDGE_S_QUANTILE": "-0.1"}, []string{"HEDGE_S_QUANTILE"}, "below 1"},
		{"quantile NaN", map[string]string{"HEDGE_S_DELAY": "1s", "HEDGE_S_QUANTILE": "NaN"}, []string{"HEDGE_S_QUANTILE"}, "below 1"},
		{"quantile Inf", map[string]string{"HEDGE_S_DELAY": "1s", "HEDGE_S_QUANTILE": "Inf"}, []string{"HEDGE_S_QUANTILE"}, "below 1"},
		{"quantile not a number", map[string]string{"HEDGE_S_DELAY": "1s", "HEDGE_S_QUANTILE": "p99"}, []string{"HEDGE_S_QUANTILE"}, "not a number"},
		{"budget 0", map[string]string{"HEDGE_S_DELAY": "1s", "HEDGE_S_BUDGET": "0"}, []string{"HEDGE_S_BUDGET"}, "(0, 1]"},
		{"empty budget", map[string]string{"HEDGE_S_DELAY": "1s", "HEDGE_S_BUDGET": ""}, []string{"HEDGE_S_BUDGET"}, "(0, 1]"},
		{"budget above 1", map[string]string{"HEDGE_S_DELAY": "1s", "HEDGE_S_BUDGET": "1.5"}, []string{"HEDGE_S_BUDGET"}, "(0, 1]"},
		{"budget NaN", map[string]string{"HEDGE_S_DELAY": "1s", "HEDGE_S_BUDGET": "NaN"}, []string{"HEDGE_S_BUDGET"}, "(0, 1]"},
		{"budget not a number", map[string]string{"HEDGE_S_DELAY": "1s", "HEDGE_S_BUDGET": "10%"}, []string{"HEDGE_S_BUDGET"}, "not a number"},
		{"max without delay", map[string]string{"HEDGE_S_MAX": "2"}, []string{"HEDGE_S_MAX"}, "needs HEDGE_S_DELAY"},
		{"quantile without delay", map[string]string{"HEDGE_S_QUANTILE": "0.9"}, []string{"HEDGE_S_QUANTILE"}, "needs HEDGE_S_DELAY"},
		{"budget without delay", map[string]string{"HEDGE_S_BUDGET": "0.1"}, []string{"HEDGE_S_BUDGET"}, "needs HEDGE_S_DELAY"},
		{"all without delay", map[string]string{"HEDGE_S_MAX": "2", "HEDGE_S_QUANTILE": "0.9", "HEDGE_S_BUDGET": "0.1"},
			[]string{"HEDGE_S_MAX", "HEDGE_S_QUANTILE", "HEDGE_S_BUDGET"}, "needs HEDGE_S_DELAY"},
		{"default", map[string]string{"HEDGE_DEFAULT_DELAY": "50ms", "HEDGE_DEFAULT_MAX": "2"},
			[]string{"HEDGE_DEFAULT_DELAY", "HEDGE_DEFAULT_MAX"}, "per service"},
		{"lower-case service", map[string]string{"HEDGE_search_DELAY": "50ms"}, []string{"HEDGE_search_DELAY"}, "upper-case"},
		{"several at once", map[string]string{
			"HEDGE_A_DELAY": "-5ms", "HEDGE_A_MAX": "20", "HEDGE_B_DELAY": "10ms", "HEDGE_B_QUANTILE": "2", "HEDGE_C_BUDGET": "0.5",
		}, []string{"HEDGE_A_DELAY", "HEDGE_A_MAX", "HEDGE_B_QUANTILE", "HEDGE_C_BUDGET"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := LoadConfigWith(LoadOptions{Environment: tc.env})
			if err == nil {
				t.Fatalf("no error; want %v reported", tc.bad)
			}
			if !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("%v does not match ErrInvalidConfig", err)
			}
			if cfg.Hedges != nil {
				t.Errorf("Hedges = %v beside an error; want the defaults, none", cfg.Hedges)
			}
			reported := varErrorsOf(err)
			for i, name := range tc.bad {
				ve, ok := reported[name]
				if !ok {
					t.Errorf("%s=%q not reported; got:\n%v", name, tc.env[name], err)
					continue
				}
				if ve.Value != tc.env[name] {
					t.Errorf("%s reported with value %q; want %q", name, ve.Value, tc.env[name])
				}
				if msg := ve.Error(); !strings.Contains(msg, strconv.Quote(tc.env[name])) || !strings.Contains(msg, name) {
					t.Errorf("%q does not name %s and its value %q", msg, name, tc.env[name])
				}
				if i == 0 && !strings.Contains(ve.Reason, tc.why) {
					t.Errorf("%s: reason %q; want it to say %q", name, ve.Reason, tc.why)
				}
			}
			if len(reported) != len(tc.bad) {
				t.Errorf("reported %d variables; want only %v:\n%v", len(reported), tc.bad, err)
			}
		})
	}
}

// varErrorsOf returns the VarErrors of a LoadConfigWith error by variable.
func varErrorsOf(err error) map[string]*VarError {
	m := map[string]*VarError{}
	var walk func(error)
	walk = func(err error) {
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			for _, e := range j.Unwrap() {
				walk(e)
			}
			return
		}
		var ve *VarError
		if errors.As(err, &ve) {
			m[ve.Var] = ve
		}
	}
	walk(err)
	return m
}

// With a prefix, both the variable reported and the one it needs carry it.
func TestLoadConfigHedgesWithPrefix(t *testing.T) {
	_, err := LoadConfigWith(LoadOptions{Prefix: "APP_", Environment: map[string]string{"APP_HEDGE_S_MAX": "2", "HEDGE_S_DELAY": "1s"}})
	ve := varErrorsOf(err)["APP_HEDGE_S_MAX"]
	if ve == nil || !strings.Contains(ve.Reason, "APP_HEDGE_S_DELAY") {
		t.Fatalf("%v; want APP_HEDGE_S_MAX reported as needing APP_HEDGE_S_DELAY", err)
	}
	cfg, err := LoadConfigWith(LoadOptions{Prefix: "APP_", Environment: map[string]string{"APP_HEDGE_S_DELAY": "1s", "HEDGE_T_DELAY": "1s"}})
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string]HedgingConfig{"S": {Delay: time.Second}}; !reflect.DeepEqual(cfg.Hedges, want) {
		t.Fatalf("Hedges = %v; want %v, the unprefixed variable ignored", cfg.Hedges, want)
	}
}

// A Config built in code is checked too, each field named with its value,
// by NewRegistry and by Reload, which then changes nothing.
func TestConfigValidateHedges(t *testing.T) {
	for _, tc := range []struct {
		hc    HedgingConfig
		field string
		value string
	}{
		{HedgingConfig{Delay: -time.Millisecond}, "Config.Hedges[S].Delay", "-1ms"},
		{HedgingConfig{MaxHedges: 11}, "Config.Hedges[S].MaxHedges", "11"},
		{HedgingConfig{MaxHedges: -1}, "Config.Hedges[S].MaxHedges", "-1"},
		{HedgingConfig{Quantile: 1}, "Config.Hedges[S].Quantile", "1"},
		{HedgingConfig{Quantile: -0.5}, "Config.Hedges[S].Quantile", "-0.5"},
		{HedgingConfig{Budget: 1.5}, "Config.Hedges[S].Budget", "1.5"},
		{HedgingConfig{Budget: -0.1}, "Config.Hedges[S].Budget", "-0.1"},
	} {
		cfg := DefaultConfig()
		cfg.Hedges = map[string]HedgingConfig{"S": tc.hc}
		err := cfg.Validate()
		if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.field+" = "+tc.value) {
			t.Errorf("Validate(%+v) = %v; want ErrInvalidConfig naming %s = %s", tc.hc, err, tc.field, tc.value)
		}
		if _, err := NewRegistry(cfg); err == nil {
			t.Errorf("NewRegistry accepted %+v", tc.hc)
		}
	}
	cfg := DefaultConfig()
	cfg.Hedges = map[string]HedgingConfig{"search": {Delay: time.Millisecond}}
	if err := cfg.Validate(); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), `Config.Hedges key = "search"`) {
		t.Errorf("Validate of a key no EnvKey makes = %v; want it named", err)
	}
	reg := mustRegistry(t, map[string]string{"HEDGE_S_DELAY": "10ms"})
	h := reg.Hedge("s")
	bad := reg.Config()
	bad.Hedges["S"] = HedgingConfig{Delay: time.Second, MaxHedges: 11}
	if err := reg.Reload(bad); err == nil {
		t.Fatal("Reload accepted MaxHedges 11")
	}
	if reg.Hedge("s") != h || h.Delay() != 10*time.Millisecond {
		t.Errorf("a refused Reload changed the hedge: delay %v", h.Delay())
	}
	// Every valid setting is one the policy takes.
	for _, hc := range []HedgingConfig{{}, {MaxHedges: 10, Quantile: 0.999, Budget: 1}, {Delay: time.Hour, Budget: 1e-9}} {
		cfg := DefaultConfig()
		cfg.Hedges = map[string]HedgingConfig{"S": hc}
		r, err := NewRegistry(cfg)
		if err != nil {
			t.Fatalf("NewRegistry(%+v) = %v", hc, err)
		}
		if r.Hedge("s") == nil {
			t.Errorf("no hedge for %+v", hc)
		}
	}
}

// The variables, through the registry, make the hedge's parameters.
func TestRegistryHedgeParams(t *testing.T) {
	for _, tc := range []struct {
		env  map[string]string
		want hedgeParams // budget: only whether there is one
		rat  float64     // the budget's ratio, if any
	}{
		{map[string]string{"HEDGE_S_DELAY": "20ms"}, hedgeParams{delay: 20 * time.Millisecond, max: 1}, 0},
		{map[string]string{"HEDGE_S_DELAY": "0", "HEDGE_S_MAX": "0"}, hedgeParams{max: 1}, 0},
		{map[string]string{"HEDGE_S_DELAY": "1", "HEDGE_S_MAX": "10"}, hedgeParams{delay: time.Second, max: 10}, 0},
		{map[string]string{"HEDGE_S_DELAY": "5ms", "HEDGE_S_QUANTILE": "0.95"}, hedgeParams{delay: 5 * time.Millisecond, max: 1, quantile: 0.95}, 0},
		{map[string]string{"HEDGE_S_DELAY": "5ms", "HEDGE_S_QUANTILE": "0"}, hedgeParams{delay: 5 * time.Millisecond, max: 1}, 0},
		{map[string]string{"HEDGE_S_DELAY": "5ms", "HEDGE_S_BUDGET": "1"}, hedgeParams{delay: 5 * time.Millisecond, max: 1}, 1},
		{map[string]string{"HEDGE_S_DELAY": "5ms", "HEDGE_S_BUDGET": "0.05"}, hedgeParams{delay: 5 * time.Millisecond, max: 1}, 0.05},
	} {
		h := mustRegistry(t, tc.env).Hedge("s")
		if h == nil {
			t.Errorf("%v: no hedge", tc.env)
			continue
		}
		got := *h.params.Load()
		var rat float64
		if got.budget != nil {
			rat = got.budget.ratio
			if got.budget.floor != 0 || got.budget.window != 10*time.Second {
				t.Errorf("%v: budget floor %v, window %v; want no floor over RetryBudget's default 10s", tc.env, got.budget.floor, got.budget.window)
			}
		}
		got.budget = nil
		if got != tc.want || rat != tc.rat {
			t.Errorf("%v: params %+v, budget ratio %v; want %+v, %v", tc.env, got, rat, tc.want, tc.rat)
		}
		if h.Name() != "s" {
			t.Errorf("Name() = %q; want the service's name, s", h.Name())
		}
	}
	reg := mustRegistry(t, map[string]string{"HEDGE_PAYMENTS_EU_DELAY": "1s"})
	if h := reg.Hedge("payments-eu"); h == nil || h != reg.Hedge("PAYMENTS_EU") {
		t.Error("payments-eu and PAYMENTS_EU do not share one hedge")
	}
	if reg.Hedge("payments") != nil {
		t.Error("a hedge for a service with no HEDGE_ variable")
	}
}

// hedgeProbe calls a service's ForService function, built once, whose
// first attempt of each call waits until its context is done and whose
// later attempts answer at once with their number.
type hedgeProbe struct {
	fn  Func[int]
	cur atomic.Pointer[slowFirst]
}

func newHedgeProbe(reg *Registry, service string) *hedgeProbe {
	p := &hedgeProbe{}
	p.fn = ForService(reg, service, func(ctx context.Context) (int, error) { return p.cur.Load().fn(ctx) })
	return p
}

// call returns the call's value, its duration on the bubble's clock, how
// many attempts it made, and its error.
func (p *hedgeProbe) call(ctx context.Context) (int, time.Duration, int, error) {
	s := &slowFirst{}
	p.cur.Store(s)
	start := time.Now()
	v, err := p.fn(ctx)
	took := time.Since(start)
	s.mu.Lock()
	defer s.mu.Unlock()
	return v, took, s.calls, err
}

func TestForServiceHedgesFromEnvironment(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := mustRegistry(t, map[string]string{
			"HEDGE_SEARCH_DELAY": "20ms", "TIMEOUT_SEARCH": "1s", "TIMEOUT_PLAIN": "1s", "RETRY_MAX_ATTEMPTS": "1",
		})
		v, took, calls, err := newHedgeProbe(reg, "search").call(context.Background())
		if err != nil || v != 2 {
			t.Fatalf("got %v, %v; want the hedge's answer, 2", v, err)
		}
		if took != 20*time.Millisecond || calls != 2 {
			t.Errorf("took %v with %d attempts; want the hedge sent after HEDGE_SEARCH_DELAY, 20ms, 2 attempts", took, calls)
		}
		// A service without the variable is not hedged: its first
		// attempt runs to its timeout alone.
		_, took, calls, err = newHedgeProbe(reg, "plain").call(context.Background())
		if !errors.Is(err, ErrTimeout) || took != time.Second || calls != 1 {
			t.Errorf("unhedged service: %v after %v with %d attempts; want ErrTimeout after 1s, 1 attempt", err, took, calls)
		}
	})
}

// HEDGE_<SVC>_MAX unset sends one hedge; set, it sends that many, one
// every delay.
func TestForServiceHedgeMax(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := mustRegistry(t, map[string]string{
			"HEDGE_ONE_DELAY": "20ms", "HEDGE_THREE_DELAY": "20ms", "HEDGE_THREE_MAX": "3",
			"TIMEOUT_ONE": "1s", "TIMEOUT_THREE": "1s", "RETRY_MAX_ATTEMPTS": "1",
		})
		for _, tc := range []struct {
			service string
			want    int // the attempt that answers
			took    time.Duration
		}{
			{"three", 4, 60 * time.Millisecond},
			{"one", 0, time.Second + 20*time.Millisecond}, // the hedge's own timeout ends the call
		} {
			var calls atomic.Int32
			fn := ForService(reg, tc.service, func(ctx context.Context) (int, error) {
				n := int(calls.Add(1))
				if n < 4 {
					<-ctx.Done()
					return 0, ctx.Err()
				}
				return n, nil
			})
			start := time.Now()
			v, err := fn(context.Background())
			took := time.Since(start)
			if tc.want == 0 {
				if err == nil || calls.Load() != 2 || took != tc.took {
					t.Errorf("%s: %v, %v after %v with %d attempts; want a failure after %v, 2 attempts", tc.service, v, err, took, calls.Load(), tc.took)
				}
				continue
			}
			if err != nil || v != tc.want || took != tc.took {
				t.Errorf("%s: %v, %v after %v; want %d after %v", tc.service, v, err, took, tc.want, tc.took)
			}
		}
	})
}

// HEDGE_<SVC>_BUDGET caps the hedges at its ratio of calls, with no floor.
func TestForServiceHedgeBudget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := mustRegistry(t, map[string]string{"HEDGE_SEARCH_DELAY": "10ms", "HEDGE_SEARCH_BUDGET": "0.5", "RETRY_MAX_ATTEMPTS": "1"})
		var total atomic.Int32
		var cur atomic.Pointer[atomic.Int32] // the attempts of the call
		fn := ForService(reg, "search", func(ctx context.Context) (int, error) {
			total.Add(1)
			if cur.Load().Add(1) == 1 {
				// Answers after the hedge, if one was sent.
				select {
				case <-ctx.Done():
					return 0, ctx.Err()
				case <-time.After(30 * time.Millisecond):
				}
			}
			return 1, nil
		})
		const n = 300 // in 10s, the budget's window
		for range n {
			cur.Store(new(atomic.Int32))
			if _, err := fn(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
		hedges := int(total.Load()) - n
		// Without a budget 300; with RetryBudget's default ratio, 0.1,
		// 30; with its default floor of 100 per 10s, 250.
		if want := n / 2; hedges != want {
			t.Errorf("%d slow calls sent %d hedges; want %d, half the calls", n, hedges, want)
		}
	})
}

// Reload turns a service's hedging on, changes it in place, and turns it
// off, for pipelines built before it; a Hedge a caller holds stays live.
func TestReloadHedges(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		env := map[string]string{"TIMEOUT_SEARCH": "1s", "RETRY_MAX_ATTEMPTS": "1"}
		reg := mustRegistry(t, env)
		probe := newHedgeProbe(reg, "search")
		reload := func() {
			t.Helper()
			cfg, err := LoadConfigWith(LoadOptions{Environment: env})
			if err != nil {
				t.Fatal(err)
			}
			if err := reg.Reload(cfg); err != nil {
				t.Fatal(err)
			}
		}
		expect := func(step string, hedged bool, delay time.Duration) {
			t.Helper()
			v, took, calls, err := probe.call(context.Background())
			switch {
			case hedged && (err != nil || v != 2 || took != delay):
				t.Errorf("%s: %v, %v after %v; want the hedge's 2 after %v", step, v, err, took, delay)
			case !hedged && (!errors.Is(err, ErrTimeout) || took != time.Second || calls != 1):
				t.Errorf("%s: %v after %v with %d attempts; want ErrTimeout after 1s, unhedged", step, err, took, calls)
			}
		}
		if reg.Hedge("search") != nil {
			t.Fatal("a hedge before any HEDGE_ variable")
		}
		expect("before", false, 0)

		env["HEDGE_SEARCH_DELAY"] = "20ms"
		env["HEDGE_SEARCH_BUDGET"] = "1"
		reload()
		h := reg.Hedge("search")
		if h == nil || h.Delay() != 20*time.Millisecond {
			t.Fatalf("after turning hedging on: %v", h)
		}
		budget := h.params.Load().budget
		expect("on", true, 20*time.Millisecond)

		env["HEDGE_SEARCH_DELAY"] = "50ms"
		reload()
		if reg.Hedge("search") != h || h.Delay() != 50*time.Millisecond {
			t.Fatalf("after changing the delay: hedge %p (was %p), delay %v; want the same hedge, 50ms", reg.Hedge("search"), h, h.Delay())
		}
		if h.params.Load().budget != budget {
			t.Error("a Reload that kept the budget's ratio replaced the budget and lost its counts")
		}
		expect("changed", true, 50*time.Millisecond)

		env["HEDGE_SEARCH_BUDGET"] = "0.25"
		reload()
		if b := h.params.Load().budget; b == budget || b.ratio != 0.25 {
			t.Error("a new budget ratio did not take")
		}

		delete(env, "HEDGE_SEARCH_DELAY")
		delete(env, "HEDGE_SEARCH_BUDGET")
		reload()
		if reg.Hedge("search") != nil {
			t.Fatal("a hedge after its variables were removed")
		}
		expect("off", false, 0)

		env["HEDGE_SEARCH_DELAY"] = "30ms"
		reload()
		if reg.Hedge("search") != h || h.Delay() != 30*time.Millisecond {
			t.Fatal("turned on again, the service has another hedge than the one its callers hold")
		}
		expect("on again", true, 30*time.Millisecond)
	})
}

// A disabled registry does not hedge: ForService calls straight through.
func TestDisabledRegistryDoesNotHedge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := mustRegistry(t, map[string]string{"HEDGE_SEARCH_DELAY": "20ms", "RESILIENCE_ENABLED": "false"})
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_, took, calls, err := newHedgeProbe(reg, "search").call(ctx)
		if !errors.Is(err, context.DeadlineExceeded) || took != 100*time.Millisecond || calls != 1 {
			t.Errorf("%v after %v with %d attempts; want the caller's deadline, one attempt", err, took, calls)
		}
	})
}
