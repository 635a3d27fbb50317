package resilience

import (
	"math"
	"strings"
	"time"
)

// The CIRCUIT_BREAKER_<SERVICE>_* variables.

// The variables read per service, under CIRCUIT_BREAKER_<SERVICE>_.
type breakerVars struct {
	FailMax           int           `env:"FAIL_MAX"`
	Timeout           time.Duration `env:"TIMEOUT"`
	HalfOpenMaxCalls  int           `env:"HALF_OPEN_MAX_CALLS"`
	FailureRatio      float64       `env:"FAILURE_RATIO"`
	MinimumThroughput int           `env:"MINIMUM_THROUGHPUT"`
	SamplingWindow    time.Duration `env:"SAMPLING_WINDOW"`
	SlowCallDuration  time.Duration `env:"SLOW_CALL_DURATION"`
	SlowCallRatio     float64       `env:"SLOW_CALL_RATIO"`
	MaxTimeout        time.Duration `env:"MAX_TIMEOUT"`
	MaxKeys           int           `env:"MAX_KEYS"`
	Mode              string        `env:"MODE"`
}

// breakerSuffixes are the variables read per breaker; a suffix that ends
// another (_MAX_TIMEOUT, _TIMEOUT) comes first, so that it is matched first.
var breakerSuffixes = []string{
	"_FAIL_MAX", "_MAX_KEYS", "_MAX_TIMEOUT", "_TIMEOUT", "_HALF_OPEN_MAX_CALLS", "_FAILURE_RATIO", "_MINIMUM_THROUGHPUT",
	"_SAMPLING_WINDOW", "_SLOW_CALL_DURATION", "_SLOW_CALL_RATIO", "_MODE",
}

// loadBreakers reads CIRCUIT_BREAKER_<SERVICE>_* into cfg, DEFAULT first,
// so that it applies to every service without its own.
func (l *loader) loadBreakers(cfg *Config) {
	defaultFailMaxSet := false // CIRCUIT_BREAKER_DEFAULT_FAIL_MAX
	for _, key := range defaultFirst(l.names(breakerPrefix, breakerSuffixes...)) {
		base, ok := cfg.CircuitBreakers[key]
		inherits := !ok || key == reservedKey
		if inherits {
			base = cfg.DefaultCircuitBreaker
		}
		v := breakerVars{
			FailMax: base.FailMax, Timeout: base.OpenTimeout, HalfOpenMaxCalls: base.HalfOpenMaxCalls,
			FailureRatio: base.FailureRatio, MinimumThroughput: base.MinimumThroughput, SamplingWindow: base.SamplingWindow,
			SlowCallDuration: base.SlowCallDuration, SlowCallRatio: base.SlowCallRatio, MaxTimeout: base.MaxOpenTimeout,
			MaxKeys: base.MaxKeys, Mode: breakerMode(base.Shadow),
		}
		p := breakerPrefix + key + "_"
		l.parse(&v, p)
		l.check(p+"FAIL_MAX", v.FailMax >= 1, "must be at least 1")
		l.check(p+"TIMEOUT", v.Timeout > 0, "must be positive")
		l.check(p+"HALF_OPEN_MAX_CALLS", v.HalfOpenMaxCalls >= 0 && v.HalfOpenMaxCalls <= math.MaxUint32, "must not be negative")
		l.check(p+"FAILURE_RATIO", v.FailureRatio > 0 && v.FailureRatio <= 1, "must be a ratio in (0, 1], such as 0.5")
		l.check(p+"MINIMUM_THROUGHPUT", v.MinimumThroughput >= 1 && v.MinimumThroughput <= math.MaxUint32, "must be at least 1")
		l.check(p+"SAMPLING_WINDOW", v.SamplingWindow >= windowBuckets*time.Millisecond, "must be at least 10ms: 10 buckets of at least 1ms")
		l.check(p+"SLOW_CALL_DURATION", v.SlowCallDuration > 0, "must be positive")
		l.check(p+"SLOW_CALL_RATIO", v.SlowCallRatio > 0 && v.SlowCallRatio <= 1, "must be a ratio in (0, 1], such as 0.5")
		l.check(p+"MAX_TIMEOUT", v.MaxTimeout > 0 && v.MaxTimeout >= v.Timeout,
			"must be positive and not below the open timeout ("+v.Timeout.String()+")")
		l.check(p+"SAMPLING_WINDOW", v.SamplingWindow <= maxSamplingWindow, "must be at most 24h")
		if _, set := l.environ[l.prefix+p+"MAX_TIMEOUT"]; !set && v.MaxTimeout > 0 && v.MaxTimeout < v.Timeout {
			// An inherited bound below this service's own TIMEOUT: its
			// open periods do not grow.
			v.MaxTimeout = 0
		}
		l.check(p+"MAX_KEYS", v.MaxKeys >= 0, "must not be negative (0 means 1000)")
		mode := strings.ToLower(strings.TrimSpace(v.Mode))
		l.check(p+"MODE", mode == "normal" || mode == "shadow", "must be normal or shadow")
		// A FailMax nobody set gives way to a ratio: only the ratio opens
		// the breaker then.
		_, failMaxSet := l.environ[l.prefix+p+"FAIL_MAX"]
		failMaxSet = failMaxSet || (key != reservedKey && defaultFailMaxSet)
		if key == reservedKey {
			defaultFailMaxSet = failMaxSet
		}
		if v.FailureRatio > 0 && !failMaxSet {
			v.FailMax = 0
		}
		bc := CircuitBreakerConfig{
			FailMax: v.FailMax, OpenTimeout: v.Timeout, HalfOpenMaxCalls: v.HalfOpenMaxCalls,
			FailureRatio: v.FailureRatio, MinimumThroughput: v.MinimumThroughput, SamplingWindow: v.SamplingWindow,
			SlowCallDuration: v.SlowCallDuration, SlowCallRatio: v.SlowCallRatio, MaxOpenTimeout: v.MaxTimeout,
			MaxKeys: v.MaxKeys, Shadow: mode == "shadow",
		}
		if key == reservedKey {
			cfg.DefaultCircuitBreaker = bc
		} else {
			cfg.CircuitBreakers[key] = bc
		}
	}
}

// breakerMode names a breaker's mode as CIRCUIT_BREAKER_<SVC>_MODE does.
func breakerMode(shadow bool) string {
	if shadow {
		return "shadow"
	}
	return "normal"
}
