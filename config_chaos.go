package resilience

import (
	"slices"
	"strings"
	"time"
)

// The CHAOS_<SERVICE>_* variables, RESILIENCE_CHAOS, and the registry's
// fault injection: each service's pipelines load their injection from a
// cell, so that a Reload, StartChaos or StopChaos changes it for calls
// already wrapped, and no injection costs one atomic load per attempt.

func (c ChaosConfig) validate(key string) error {
	if !validKey(key) {
		return invalid("Config.Chaos key", key, "must be upper-case letters, digits and _, as EnvKey makes them")
	}
	return c.checkAs("Config.Chaos[" + key + "]")
}

// The variables read per service, under CHAOS_<SERVICE>_.
type chaosVars struct {
	ErrorRate   float64       `env:"ERROR_RATE"`
	Latency     time.Duration `env:"LATENCY"`
	LatencyRate float64       `env:"LATENCY_RATE"`
}

const chaosPrefix = "CHAOS_"

// loadChaos reads CHAOS_<SERVICE>_* into cfg.Chaos. Injection is per
// service, never by DEFAULT: a rehearsal names what it breaks.
func (l *loader) loadChaos(cfg *Config) {
	for _, key := range l.names(chaosPrefix, "_ERROR_RATE", "_LATENCY_RATE", "_LATENCY") {
		p := chaosPrefix + key + "_"
		full := l.prefix + p
		if key == reservedKey {
			for _, s := range []string{"ERROR_RATE", "LATENCY", "LATENCY_RATE"} {
				if _, set := l.environ[full+s]; set {
					l.report(full+s, "fault injection is per service, so that a rehearsal breaks only what it names: name the service instead of DEFAULT")
				}
			}
			continue
		}
		var v chaosVars
		l.parse(&v, p)
		_, rateSet := l.environ[full+"LATENCY_RATE"]
		l.check(p+"ERROR_RATE", v.ErrorRate >= 0 && v.ErrorRate <= 1, "must be a share in [0, 1], such as 0.5")
		l.check(p+"LATENCY", v.Latency >= 0, "must not be negative")
		l.check(p+"LATENCY_RATE", v.LatencyRate >= 0 && v.LatencyRate <= 1, "must be a share in [0, 1], such as 0.5")
		if rateSet && v.Latency == 0 {
			l.report(full+"LATENCY_RATE", "needs "+full+"LATENCY, the delay to inject")
		}
		if !rateSet && v.Latency > 0 {
			v.LatencyRate = 1 // _LATENCY alone delays every attempt
		}
		if cfg.Chaos == nil {
			cfg.Chaos = map[string]ChaosConfig{}
		}
		cfg.Chaos[key] = ChaosConfig{ErrorRate: v.ErrorRate, Latency: v.Latency, LatencyRate: v.LatencyRate}
	}
}

// ChaosStatus is one service's fault injection, as [Registry.Status] and
// the admin endpoint report it.
type ChaosStatus struct {
	Service string `json:"service"`
	// Active is whether faults are being injected now: RESILIENCE_CHAOS
	// is true, and the service's injection is configured or started, and
	// not stopped.
	Active      bool    `json:"active"`
	ErrorRate   float64 `json:"error_rate"`
	Latency     string  `json:"latency,omitempty"`
	LatencyRate float64 `json:"latency_rate"`
	// Stopped is set while StopChaos holds the service's configured
	// injection off.
	Stopped bool `json:"stopped"`
}

// serviceChaos is a service's fault injection as the registry keeps it.
type serviceChaos struct {
	name    string
	named   bool // name is a service's own, not the key of its variables
	cell    chaosCell
	started *ChaosConfig // by StartChaos, over the configuration; nil: none
	stopped bool         // by StopChaos: off, whatever the configuration
}

// StartChaos starts injecting faults into the calls of service through
// the registry (ForService, Transport), as cfg says, or, if cfg is the
// zero value, as CHAOS_<SERVICE>_* says, or else failing every attempt
// with ErrChaos: a whole outage, the usual rehearsal. A cfg that is not
// zero and injects nothing (a Latency without LatencyRate), an empty
// service name or DEFAULT is an error. It needs
// RESILIENCE_CHAOS=true (Config.ChaosEnabled), so that no production
// process injects a fault by accident: without it, or with an invalid
// cfg, it returns an error matching ErrInvalidConfig. The injection lasts
// until StopChaos, across Reloads. It is safe for concurrent use.
func (r *Registry) StartChaos(service string, cfg ChaosConfig) error {
	if err := cfg.checkAs("ChaosConfig"); err != nil {
		return err
	}
	switch {
	case strings.TrimSpace(service) == "":
		return invalid("StartChaos service", service, "must name a service")
	case EnvKey(service) == reservedKey:
		return invalid("StartChaos service", service, "fault injection is per service: name the service instead of DEFAULT")
	}
	zero := cfg.ErrorRate == 0 && cfg.LatencyRate == 0 && cfg.Latency == 0 && cfg.Error == nil
	if !zero && !cfg.on() {
		// Half a configuration is a mistake, not a request for the
		// variables' injection or a whole outage.
		return invalid("ChaosConfig", cfg, "injects nothing: set ErrorRate, or Latency with LatencyRate")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.cfg.ChaosEnabled {
		return invalid("RESILIENCE_CHAOS", r.cfg.ChaosEnabled, "must be true for fault injection: set it only where rehearsals may run")
	}
	s := r.chaosLocked(service)
	if !cfg.on() {
		cfg = r.cfg.Chaos[EnvKey(service)]
		if !cfg.on() {
			cfg = ChaosConfig{ErrorRate: 1}
		}
	}
	s.started, s.stopped = &cfg, false
	r.applyChaosLocked(EnvKey(service), s)
	return nil
}

// StopChaos stops injecting faults into the calls of service, whatever
// its CHAOS_<SERVICE>_* variables say, until StartChaos. It is safe for
// concurrent use.
func (r *Registry) StopChaos(service string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.chaosLocked(service)
	s.started, s.stopped = nil, true
	r.applyChaosLocked(EnvKey(service), s)
}

// chaosLocked returns the registry's entry for a service's injection,
// making it on first use. r.mu is held.
func (r *Registry) chaosLocked(service string) *serviceChaos {
	key := EnvKey(service)
	s, ok := r.chaos[key]
	if !ok {
		s = &serviceChaos{name: service}
		if r.chaos == nil {
			r.chaos = map[string]*serviceChaos{}
		}
		r.chaos[key] = s
		r.applyChaosLocked(key, s)
	}
	if !s.named && service != key {
		// Listed from its variables (CHAOS_PAYMENTS_EU_*) before any
		// call: the first name a call uses ("payments-eu") is its own.
		s.name, s.named = service, true
	}
	return s
}

// effective returns the injection s runs under cfg, if any.
func (s *serviceChaos) effective(key string, cfg *Config) (ChaosConfig, bool) {
	c := cfg.Chaos[key]
	if s.started != nil {
		c = *s.started
	}
	return c, cfg.ChaosEnabled && !s.stopped && c.on()
}

// applyChaosLocked points a service's pipelines at the injection it has
// now. r.mu is held.
func (r *Registry) applyChaosLocked(key string, s *serviceChaos) {
	c, on := s.effective(key, &r.cfg)
	if !on {
		s.cell.Store(nil)
		return
	}
	if cur := s.cell.Load(); cur != nil && cur.cfg == c {
		return
	}
	s.cell.Store(newChaos(c))
}

// reloadChaosLocked applies the configuration to every service's
// injection. r.mu is held.
func (r *Registry) reloadChaosLocked() {
	for key := range r.cfg.Chaos {
		if _, ok := r.chaos[key]; !ok {
			r.chaosLocked(key) // a configured service is listed even before its first call
		}
	}
	for key, s := range r.chaos {
		r.applyChaosLocked(key, s)
	}
}

// chaosStatus reports every service whose injection is configured,
// started or stopped, sorted by name.
func (r *Registry) chaosStatus() []ChaosStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := []ChaosStatus{}
	for key, s := range r.chaos {
		c, on := s.effective(key, &r.cfg)
		if !c.on() && s.started == nil && !s.stopped {
			continue // asked for by a pipeline, never configured
		}
		st := ChaosStatus{Service: s.name, Active: on, ErrorRate: c.ErrorRate, LatencyRate: c.LatencyRate, Stopped: s.stopped}
		if c.Latency > 0 {
			st.Latency = c.Latency.String()
		}
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b ChaosStatus) int { return strings.Compare(a.Service, b.Service) })
	return out
}
