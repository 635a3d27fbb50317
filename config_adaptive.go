package resilience

import (
	"strconv"
	"strings"
)

// The BULKHEAD_<RESOURCE>_ADAPTIVE, _MIN_LIMIT and _MAX_LIMIT variables:
// a bulkhead's adaptive limit, BulkheadConfig.Adaptive.

// The bounds read per resource, under BULKHEAD_<RESOURCE>_. _ADAPTIVE is
// read apart: set and empty is not the same as unset.
type adaptiveVars struct {
	MinLimit int `env:"MIN_LIMIT"`
	MaxLimit int `env:"MAX_LIMIT"`
}

// parseAdaptive returns the algorithm a BULKHEAD_<RESOURCE>_ADAPTIVE value
// names, in any case: on is false for an empty value, a fixed limit; ok is
// false for a name it does not know.
func parseAdaptive(s string) (algo AdaptiveAlgorithm, on, ok bool) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "":
		return AdaptiveGradient, false, true
	case AdaptiveGradient.String():
		return AdaptiveGradient, true, true
	case AdaptiveAIMD.String():
		return AdaptiveAIMD, true, true
	}
	return AdaptiveGradient, false, false
}

// loadAdaptive reads the adaptive variables under p (BULKHEAD_<RESOURCE>_,
// without the loader's prefix) of a bulkhead starting at limit, over base,
// the configuration it inherits (its own entry's, or DEFAULT's; nil for a
// fixed limit). It returns a new AdaptiveConfig, or nil for a fixed limit.
//
// As for every bulkhead variable, an unset one keeps base's value, so
// BULKHEAD_DEFAULT_ADAPTIVE makes adaptive every resource that takes
// DEFAULT's settings. A set but empty _ADAPTIVE is a fixed limit, so that
// one resource can opt out of DEFAULT's.
//
// Each check mirrors one of AdaptiveConfig.validate's, so that a bad value
// is reported against its variable rather than as a field of Config.
func (l *loader) loadAdaptive(p string, base *AdaptiveConfig, limit int) *AdaptiveConfig {
	full := l.prefix + p // as the variables are named: check adds l.prefix itself
	var ac AdaptiveConfig
	on := base != nil
	if on {
		ac = *base // Smoothing and Window, which only code sets, come along
	}
	if raw, set := l.environ[full+"ADAPTIVE"]; set {
		algo, yes, ok := parseAdaptive(raw)
		if !ok {
			l.report(full+"ADAPTIVE", "must be gradient or aimd, or empty for a fixed limit")
			// Meant to be on: read the bounds rather than blame them
			// for a missing _ADAPTIVE.
			yes = true
		}
		on, ac.Algorithm = yes, algo
	}
	if !on {
		for _, s := range []string{"MIN_LIMIT", "MAX_LIMIT"} {
			// Empty is unset, as for every other variable.
			if l.environ[full+s] != "" {
				l.report(full+s, "needs "+full+"ADAPTIVE (gradient or aimd), which turns the adaptive limit on")
			}
		}
		return nil
	}

	v := adaptiveVars{MinLimit: ac.MinLimit, MaxLimit: ac.MaxLimit}
	l.parse(&v, p)
	l.check(p+"MIN_LIMIT", v.MinLimit >= 0, "must not be negative (0 means 1)")
	l.check(p+"MAX_LIMIT", v.MaxLimit >= 0, "must not be negative (0 means 10 times the starting limit)")
	ac.MinLimit, ac.MaxLimit = v.MinLimit, v.MaxLimit
	if v.MinLimit < 0 || v.MaxLimit < 0 || l.bad[full+"MIN_LIMIT"] || l.bad[full+"MAX_LIMIT"] {
		return &ac // reported; the combinations below would only repeat it
	}

	lo := max(ac.MinLimit, 1)
	if ac.MaxLimit > 0 && ac.MaxLimit < lo {
		l.blame(
			suspect{p + "MAX_LIMIT", "must not be below the adaptive minimum (" + strconv.Itoa(lo) + ")"},
			suspect{p + "MIN_LIMIT", "must not be above the adaptive maximum (" + strconv.Itoa(ac.MaxLimit) + ")"},
		)
		return &ac
	}
	if limit < 1 || l.bad[full+"LIMIT"] {
		return &ac // LIMIT is reported already
	}
	lo, hi := ac.bounds(limit)
	between := "must be between the adaptive minimum and maximum, " + strconv.Itoa(lo) + " and " + strconv.Itoa(hi)
	start := " (" + strconv.Itoa(limit) + ")"
	switch {
	case limit < lo:
		l.blame(
			suspect{p + "LIMIT", between},
			suspect{p + "MIN_LIMIT", "must not be above the starting limit" + start},
			suspect{p + "ADAPTIVE", "the starting limit" + start + " is below the adaptive minimum (" + strconv.Itoa(lo) + ")"},
		)
	case limit > hi:
		l.blame(
			suspect{p + "LIMIT", between},
			suspect{p + "MAX_LIMIT", "must not be below the starting limit" + start},
			suspect{p + "ADAPTIVE", "the starting limit" + start + " is above the adaptive maximum (" + strconv.Itoa(hi) + ")"},
		)
	}
	return &ac
}

// suspect is a variable (without the loader's prefix) and why it is bad.
type suspect struct{ name, why string }

// blame reports the first of the variables that is set: of those that
// make a bad combination, the one the environment chose. If none is (all
// inherited from DEFAULT, which was then reported), it reports nothing;
// LoadConfigWith's last Validate still refuses the result.
func (l *loader) blame(candidates ...suspect) {
	for _, c := range candidates {
		if _, set := l.environ[l.prefix+c.name]; set {
			l.report(l.prefix+c.name, c.why)
			return
		}
	}
}

// cloneAdaptive gives c's bulkheads adaptive configurations of their own,
// so that a clone does not share them with c. c.Bulkheads is c's already.
func (c *Config) cloneAdaptive() {
	c.DefaultBulkhead.Adaptive = cloneAdaptiveConfig(c.DefaultBulkhead.Adaptive)
	for k, b := range c.Bulkheads {
		if b.Adaptive != nil {
			b.Adaptive = cloneAdaptiveConfig(b.Adaptive)
			c.Bulkheads[k] = b
		}
	}
}

func cloneAdaptiveConfig(a *AdaptiveConfig) *AdaptiveConfig {
	if a == nil {
		return nil
	}
	cp := *a
	return &cp
}
