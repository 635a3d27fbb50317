package resilience

import (
	"fmt"
	"math"
	"strings"
	"sync/atomic"
	"time"
)

// The HEDGE_<SERVICE>_* variables, and the registry's hedges.

// HedgingConfig is a service's hedging, HEDGE_<SERVICE>_*: the settings of
// the [Hedge] a [Registry] builds for the service. It holds values only,
// no live state, so that a Config can be copied and compared; the
// registry builds the budget.
type HedgingConfig struct {
	// Delay is HEDGE_<SERVICE>_DELAY, as HedgeConfig.Delay: how long an
	// attempt may go without an answer before a hedge is sent beside it.
	// 0 sends the hedges at once; it must not be negative. Setting the
	// variable is what turns hedging on for the service.
	Delay time.Duration
	// MaxHedges is HEDGE_<SERVICE>_MAX, as HedgeConfig.MaxHedges: the
	// most hedges per attempt. 0 means 1; at most 10.
	MaxHedges int
	// Quantile is HEDGE_<SERVICE>_QUANTILE, as HedgeConfig.Quantile: in
	// (0, 1), the delay follows that quantile of recent latencies, never
	// below Delay. 0 means Delay alone.
	Quantile float64
	// Budget is HEDGE_<SERVICE>_BUDGET: in (0, 1], the hedge gets a
	// [RetryBudget] of its own with that Ratio over the default window of
	// 10s and no floor, so that hedges add at most that share of the
	// service's calls, whatever the rate. (A retry budget's floor keeps a
	// quiet service retrying its rare failures; a hedge needs no such
	// thing, and a floor of 10 a second would let a quiet service double
	// its load.) 0 means no budget.
	Budget float64
}

// policy returns the HedgeConfig of the service's hedge, with budget.
func (c HedgingConfig) policy(name string, budget *RetryBudget) HedgeConfig {
	return HedgeConfig{Name: name, Delay: c.Delay, MaxHedges: c.MaxHedges, Quantile: c.Quantile, Budget: budget}
}

func (c HedgingConfig) validate(key string) error {
	field := "Config.Hedges[" + key + "]."
	switch {
	case !validKey(key):
		// It could never match a service's EnvKey: say so rather than
		// hedge nothing.
		return invalid("Config.Hedges key", key, "must be upper-case letters, digits and _, as EnvKey makes them")
	case c.Delay < 0:
		return invalid(field+"Delay", c.Delay, "must not be negative")
	case c.MaxHedges < 0 || c.MaxHedges > maxHedges:
		return invalid(field+"MaxHedges", c.MaxHedges, "must be between 0 and 10")
	case math.IsNaN(c.Quantile) || c.Quantile < 0 || c.Quantile >= 1:
		return invalid(field+"Quantile", c.Quantile, "must be 0, or above 0 and below 1")
	case math.IsNaN(c.Budget) || c.Budget < 0 || c.Budget > 1:
		return invalid(field+"Budget", c.Budget, "must be 0 (no budget) or a ratio in (0, 1]")
	}
	// What the policy itself refuses, should it ever refuse more.
	if _, err := c.policy(key, nil).params(); err != nil {
		return fmt.Errorf("hedge %s: %w", key, err)
	}
	return nil
}

// The variables read per service, under HEDGE_<SERVICE>_.
type hedgeVars struct {
	Delay    time.Duration `env:"DELAY"`
	Max      int           `env:"MAX"`
	Quantile float64       `env:"QUANTILE"`
	Budget   float64       `env:"BUDGET"`
}

const hedgePrefix = "HEDGE_"

// loadHedges reads HEDGE_<SERVICE>_* into cfg.Hedges. A hedge sends a call
// twice, which only a call that is safe to repeat allows: hedging is on
// only for a service whose _DELAY is set, never by DEFAULT.
func (l *loader) loadHedges(cfg *Config) {
	for _, key := range l.names(hedgePrefix, "_DELAY", "_MAX", "_QUANTILE", "_BUDGET") {
		p := hedgePrefix + key + "_"
		full := l.prefix + p // as the variables are named: check adds l.prefix itself
		delay, on := l.environ[full+"DELAY"]
		if key == reservedKey || !on {
			why := "needs " + full + "DELAY, which turns hedging on for the service"
			if key == reservedKey {
				why = "hedging is per service, for calls that are safe to send twice: name the service instead of DEFAULT"
			}
			for _, s := range []string{"DELAY", "MAX", "QUANTILE", "BUDGET"} {
				if _, set := l.environ[full+s]; set {
					l.report(full+s, why)
				}
			}
			continue
		}
		if strings.TrimSpace(delay) == "" {
			// Left at 0, it would send every hedge at once.
			l.report(full+"DELAY", "must be a duration, such as 50ms: unset it to turn hedging off")
		}
		var v hedgeVars
		l.parse(&v, p)
		l.check(p+"DELAY", v.Delay >= 0, "must not be negative")
		l.check(p+"MAX", v.Max >= 0 && v.Max <= maxHedges, "must be between 0 and 10 (0 means 1)")
		l.check(p+"QUANTILE", v.Quantile >= 0 && v.Quantile < 1, "must be 0 (none), or above 0 and below 1, such as 0.95")
		l.check(p+"BUDGET", v.Budget > 0 && v.Budget <= 1, "must be a ratio in (0, 1], such as 0.1: hedges per call")
		if cfg.Hedges == nil {
			cfg.Hedges = map[string]HedgingConfig{}
		}
		cfg.Hedges[key] = HedgingConfig{Delay: v.Delay, MaxHedges: v.Max, Quantile: v.Quantile, Budget: v.Budget}
	}
}

// serviceHedge is a service's hedge as the registry keeps it.
type serviceHedge struct {
	name string // the service's name as first asked for
	// h is built the first time the service has a hedge, and kept while
	// it has none, so that a caller holding it sees it live again if a
	// Reload gives the service a hedge again.
	h *Hedge
	// cell holds h while the service has a hedge, else nil: what the
	// service's pipelines load per call.
	cell atomic.Pointer[Hedge]
}

// Hedge returns the hedge of the named service, built on first use from
// HEDGE_<SERVICE>_DELAY and the rest, or nil when the service has no
// hedge. The registry's pipelines for the service (ForService's, and
// Transport's for requests it may send twice) send its hedges. A Reload
// changes it in place, so a caller that holds it sees the change; one
// that removes the service's hedge stops the pipelines hedging, and one
// that adds it back reuses it. It is safe for concurrent use.
func (r *Registry) Hedge(service string) *Hedge {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.hedgeLocked(service).cell.Load()
}

// hedgeCellLocked returns the cell through which a service's pipelines
// find its hedge, which a Reload may add, change or remove. r.mu is held.
func (r *Registry) hedgeCellLocked(service string) *atomic.Pointer[Hedge] {
	return &r.hedgeLocked(service).cell
}

// hedgeLocked returns the registry's entry for a service's hedge, making
// it, and the hedge if the service has one, on first use. r.mu is held.
func (r *Registry) hedgeLocked(service string) *serviceHedge {
	key := EnvKey(service)
	s, ok := r.hedges[key]
	if !ok {
		s = &serviceHedge{name: service}
		if r.hedges == nil {
			r.hedges = map[string]*serviceHedge{}
		}
		r.hedges[key] = s
		r.applyHedgeLocked(key, s)
	}
	return s
}

// applyHedgeLocked gives a service's hedge the current configuration: it
// builds or reconfigures it, or empties the cell when the service has no
// hedge. r.mu is held.
func (r *Registry) applyHedgeLocked(key string, s *serviceHedge) {
	c, ok := r.cfg.Hedges[key]
	if !ok {
		s.cell.Store(nil)
		return
	}
	var cur *hedgeParams
	if s.h != nil {
		cur = s.h.params.Load()
	}
	p, err := c.policy(s.name, hedgeBudget(c, cur)).params()
	if err != nil {
		// Unreachable: Validate checked c. Not hedging is the safe side.
		s.cell.Store(nil)
		return
	}
	if s.h == nil {
		s.h = &Hedge{name: s.name, sw: &r.enabled}
	}
	s.h.reconfigure(p)
	s.cell.Store(s.h)
}

// hedgeBudget returns the budget of a hedge configured by c whose current
// parameters are cur (nil for a new hedge): cur's, when its ratio is c's,
// so that a Reload keeps what it counted; else a new one, or nil for none.
func hedgeBudget(c HedgingConfig, cur *hedgeParams) *RetryBudget {
	if c.Budget == 0 {
		return nil
	}
	if cur != nil && cur.budget != nil && cur.budget.ratio == c.Budget {
		return cur.budget
	}
	b, err := NewRetryBudget(RetryBudgetConfig{Ratio: c.Budget, MinPerSecond: -1})
	if err != nil {
		return nil // unreachable: Validate checked c.Budget
	}
	return b
}

// reloadHedgesLocked applies the configuration to the hedges built so
// far, in place, and points the pipelines at the hedge each service has
// now. r.mu is held.
func (r *Registry) reloadHedgesLocked() {
	for key, s := range r.hedges {
		r.applyHedgeLocked(key, s)
	}
}
