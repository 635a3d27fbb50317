package resilience

import "time"

// RESILIENCE_MAX_SERVICES and RESILIENCE_IDLE_EVICT: the registry's bounds
// (registry_cap.go).

// loadBounds reads the registry's bounds into cfg.
func (l *loader) loadBounds(cfg *Config) {
	v := struct {
		MaxServices int           `env:"RESILIENCE_MAX_SERVICES"`
		IdleEvict   time.Duration `env:"RESILIENCE_IDLE_EVICT"`
	}{defaultMaxServices, defaultIdleEvict}
	l.parse(&v, "")
	l.check("RESILIENCE_MAX_SERVICES", v.MaxServices >= 1, "must be at least 1")
	l.check("RESILIENCE_IDLE_EVICT", v.IdleEvict > 0, "must be positive, such as 10m")
	cfg.MaxServices, cfg.IdleEvict = v.MaxServices, v.IdleEvict
}

// validateBounds reports the bounds a registry would reject.
func (c Config) validateBounds() []error {
	var errs []error
	if c.MaxServices < 0 {
		errs = append(errs, invalid("Config.MaxServices", c.MaxServices, "must not be negative (0 means 1000)"))
	}
	if c.IdleEvict < 0 {
		errs = append(errs, invalid("Config.IdleEvict", c.IdleEvict, "must not be negative (0 means 10m)"))
	}
	return errs
}
