package resilience

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Config is the whole configuration of a [Registry]: the original design's
// environment variables, parsed. [LoadConfig] fills it from the environment;
// [DefaultConfig] gives the design's defaults. Maps are keyed by [EnvKey] of
// the service, resource or operation name.
type Config struct {
	// Enabled is RESILIENCE_ENABLED. When false, the registry's policies and
	// ForService pass calls straight through.
	Enabled bool

	// Retry is RETRY_MAX_ATTEMPTS, RETRY_EXPONENTIAL_BASE (Multiplier),
	// RETRY_EXPONENTIAL_MAX (MaxDelay) and RETRY_JITTER.
	Retry RetryConfig

	// DefaultTimeout is TIMEOUT_DEFAULT, for operations without their own.
	DefaultTimeout time.Duration
	// Timeouts holds TIMEOUT_<OP> per operation type.
	Timeouts map[string]time.Duration

	// DefaultCircuitBreaker is CIRCUIT_BREAKER_DEFAULT_*, for services
	// without their own.
	DefaultCircuitBreaker CircuitBreakerConfig
	// CircuitBreakers holds CIRCUIT_BREAKER_<SERVICE>_FAIL_MAX, _TIMEOUT
	// (OpenTimeout), _HALF_OPEN_MAX_CALLS, _FAILURE_RATIO,
	// _MINIMUM_THROUGHPUT, _SAMPLING_WINDOW, _SLOW_CALL_DURATION,
	// _SLOW_CALL_RATIO, _MAX_TIMEOUT (MaxOpenTimeout) and _MODE (normal or
	// shadow) per service. A _FAILURE_RATIO without a _FAIL_MAX of its own
	// or of DEFAULT leaves only the ratio to open the breaker.
	CircuitBreakers map[string]CircuitBreakerConfig

	// TotalTimeouts holds TIMEOUT_<OP>_TOTAL per operation type: the
	// bound of a whole call, retries and waits included. None by default;
	// TIMEOUT_DEFAULT_TOTAL applies to operations without their own.
	TotalTimeouts map[string]time.Duration
	// IdleTimeouts holds TIMEOUT_<OP>_IDLE: the longest wait for the next
	// bytes of a response body streamed through Transport. Default: the
	// attempt's timeout.
	IdleTimeouts map[string]time.Duration
	// StreamTimeouts holds TIMEOUT_<OP>_STREAM: the bound of a whole
	// response body streamed through Transport. None by default.
	StreamTimeouts map[string]time.Duration

	// RateLimits holds RATE_LIMIT_<SERVICE>_* per service: see
	// RateLimitConfig. A service without an entry is not rate limited.
	RateLimits map[string]RateLimitConfig

	// ChaosEnabled is RESILIENCE_CHAOS: fault injection (Chaos,
	// [Registry.StartChaos]) takes effect only while it is true, so that
	// no variable left behind injects a fault by accident.
	ChaosEnabled bool
	// Chaos holds CHAOS_<SERVICE>_ERROR_RATE, _LATENCY and _LATENCY_RATE
	// (1 when only _LATENCY is set) per service: faults injected into the
	// service's attempts, for rehearsals. See ChaosConfig.
	Chaos map[string]ChaosConfig

	// Hedges holds HEDGE_<SERVICE>_DELAY, _MAX (MaxHedges), _QUANTILE and
	// _BUDGET per service: see HedgingConfig. A service without an entry
	// is not hedged: a hedge sends a call twice, so hedging is for the
	// services whose calls are safe to repeat, named one by one.
	Hedges map[string]HedgingConfig

	// MaxServices is RESILIENCE_MAX_SERVICES: the most policy sets (a
	// service's breaker, bulkhead and pipelines) the registry holds. Past
	// it, the least recently used idle set is evicted, and when none is,
	// new names share the set named "other". 0 means 1000.
	MaxServices int
	// IdleEvict is RESILIENCE_IDLE_EVICT: how long a service or a key
	// goes without a call before its policies may be evicted. 0 means
	// 10 minutes.
	IdleEvict time.Duration

	// StoreURL is RESILIENCE_STORE_URL, or RESILIENCE_REDIS_URL: where the
	// registry shares breaker state and global bulkhead slots with the other
	// processes of its fleet, through the Store registered for the URL's
	// scheme (import github.com/resilience-go/resilience/redisstore for
	// redis:// and rediss://). Empty means nothing is shared.
	StoreURL string

	// DefaultBulkhead is BULKHEAD_DEFAULT_*, for resources without their own.
	DefaultBulkhead BulkheadConfig
	// Bulkheads holds BULKHEAD_<RESOURCE>_LIMIT, _MAX_QUEUE, _MAX_WAIT,
	// _FAIL_FAST, _GLOBAL_LIMIT, and _ADAPTIVE (gradient or aimd),
	// _MIN_LIMIT and _MAX_LIMIT (Adaptive) per resource.
	Bulkheads map[string]BulkheadConfig
}

// DefaultConfig returns the original design's defaults: resilience enabled;
// 3 attempts, base 2, at most 10s, with jitter; timeouts of 30s by default,
// 60s for llm, 5s for auth, 10s for db and 15s for http; breakers opening
// after 5 failures for 60s, openfga after 10 for 30s; bulkheads of 10 calls,
// llm 10, openfga 50, redis 100, db 20.
func DefaultConfig() Config {
	return Config{
		Enabled:        true,
		MaxServices:    defaultMaxServices,
		IdleEvict:      defaultIdleEvict,
		Retry:          RetryConfig{MaxAttempts: 3, Multiplier: 2, MaxDelay: 10 * time.Second},
		DefaultTimeout: defaultTimeout,
		Timeouts: map[string]time.Duration{
			"LLM": 60 * time.Second, "AUTH": 5 * time.Second, "DB": 10 * time.Second, "HTTP": 15 * time.Second,
		},
		DefaultCircuitBreaker: CircuitBreakerConfig{FailMax: 5, OpenTimeout: 60 * time.Second},
		CircuitBreakers: map[string]CircuitBreakerConfig{
			"OPENFGA": {FailMax: 10, OpenTimeout: 30 * time.Second},
		},
		DefaultBulkhead: BulkheadConfig{Limit: 10},
		Bulkheads: map[string]BulkheadConfig{
			"LLM": {Limit: 10}, "OPENFGA": {Limit: 50}, "REDIS": {Limit: 100}, "DB": {Limit: 20},
		},
	}
}

// Clone returns a deep copy of c, so that changing its maps does not change
// c's.
func (c Config) Clone() Config {
	c.Timeouts = maps.Clone(c.Timeouts)
	c.CircuitBreakers = maps.Clone(c.CircuitBreakers)
	c.Bulkheads = maps.Clone(c.Bulkheads)
	c.RateLimits = maps.Clone(c.RateLimits)
	c.Hedges = maps.Clone(c.Hedges)
	c.Chaos = maps.Clone(c.Chaos)
	c.TotalTimeouts = maps.Clone(c.TotalTimeouts)
	c.IdleTimeouts = maps.Clone(c.IdleTimeouts)
	c.StreamTimeouts = maps.Clone(c.StreamTimeouts)
	c.cloneAdaptive()
	return c
}

// EnvKey returns the key a name has in variable names and in Config's maps:
// upper-cased, with '-' and '.' as '_'. EnvKey("payments-eu") is
// "PAYMENTS_EU", read from CIRCUIT_BREAKER_PAYMENTS_EU_FAIL_MAX and so on.
func EnvKey(name string) string {
	return strings.Map(func(r rune) rune {
		switch r {
		case '-', '.':
			return '_'
		}
		return r
	}, strings.ToUpper(name))
}

// CircuitBreakerConfig returns the configuration of the named service's
// breaker: its own if set, else the default, with Name set to name.
func (c Config) CircuitBreakerConfig(name string) CircuitBreakerConfig {
	cfg, ok := c.CircuitBreakers[EnvKey(name)]
	if !ok {
		cfg = c.DefaultCircuitBreaker
	}
	cfg.Name = name
	return cfg
}

// BulkheadConfig returns the configuration of the named resource's
// bulkhead: its own if set, else the default, with Name set to name.
func (c Config) BulkheadConfig(name string) BulkheadConfig {
	cfg, ok := c.Bulkheads[EnvKey(name)]
	if !ok {
		cfg = c.DefaultBulkhead
	}
	cfg.Name = name
	return cfg
}

// Timeout returns the timeout of an operation type: its own if set, else
// DefaultTimeout, else 30s.
func (c Config) Timeout(operation string) time.Duration {
	if d, ok := c.Timeouts[EnvKey(operation)]; ok && d > 0 {
		return d
	}
	if c.DefaultTimeout > 0 {
		return c.DefaultTimeout
	}
	return defaultTimeout
}

// Validate reports every setting of c that a policy would reject, all at
// once.
func (c Config) Validate() error {
	var errs []error
	if _, err := NewRetry(c.Retry); err != nil {
		errs = append(errs, err)
	}
	if c.DefaultTimeout < 0 {
		errs = append(errs, invalid("Config.DefaultTimeout", c.DefaultTimeout, "must not be negative"))
	}
	for field, m := range map[string]map[string]time.Duration{"TotalTimeouts": c.TotalTimeouts, "IdleTimeouts": c.IdleTimeouts, "StreamTimeouts": c.StreamTimeouts} {
		for _, k := range slices.Sorted(maps.Keys(m)) {
			if d := m[k]; d <= 0 {
				errs = append(errs, invalid("Config."+field+"["+k+"]", d, "must be positive"))
			}
		}
	}
	for _, k := range slices.Sorted(maps.Keys(c.Timeouts)) {
		if d := c.Timeouts[k]; d <= 0 {
			errs = append(errs, invalid("Config.Timeouts["+k+"]", d, "must be positive"))
		}
	}
	if _, _, err := c.DefaultCircuitBreaker.resolve(); err != nil {
		errs = append(errs, err)
	}
	for _, k := range slices.Sorted(maps.Keys(c.CircuitBreakers)) {
		if _, _, err := c.CircuitBreakers[k].resolve(); err != nil {
			errs = append(errs, fmt.Errorf("circuit breaker %s: %w", k, err))
		}
	}
	if err := validateEach(c.RateLimits); err != nil {
		errs = append(errs, err)
	}
	if err := validateEach(c.Chaos); err != nil {
		errs = append(errs, err)
	}
	if err := validateEach(c.Hedges); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, c.validateBounds()...)
	if err := c.DefaultBulkhead.validate(); err != nil {
		errs = append(errs, err)
	}
	for _, k := range slices.Sorted(maps.Keys(c.Bulkheads)) {
		if err := c.Bulkheads[k].validate(); err != nil {
			errs = append(errs, fmt.Errorf("bulkhead %s: %w", k, err))
		}
	}
	return errors.Join(errs...)
}

// LoadOptions changes where [LoadConfigWith] reads variables.
type LoadOptions struct {
	// Prefix is put before every variable name: with "MYAPP_", the loader
	// reads MYAPP_RETRY_MAX_ATTEMPTS instead of RETRY_MAX_ATTEMPTS. Empty
	// means the original design's names.
	Prefix string

	// Environment, if not nil, is read instead of the process environment:
	// for tests, or for configuration that comes from elsewhere.
	Environment map[string]string
}

// LoadConfig reads the configuration from the process environment, over
// [DefaultConfig]. It is LoadConfigWith(LoadOptions{}).
func LoadConfig() (Config, error) { return LoadConfigWith(LoadOptions{}) }

// VarError reports a variable that could not be used: its name, its value
// and why. LoadConfigWith returns one per bad variable, joined; each matches
// [ErrInvalidConfig].
type VarError struct {
	Var, Value, Reason string
}

// Error says `NAME="value": why`, quoting a name that is not a plain key.
func (e *VarError) Error() string {
	name := e.Var
	if !validKey(name) {
		name = strconv.Quote(name)
	}
	return name + "=" + strconv.Quote(e.Value) + ": " + e.Reason
}

// validKey reports whether s is made of upper-case letters, digits and '_'
// only, as every key EnvKey makes of a name in variables is.
func validKey(s string) bool {
	for _, r := range s {
		if (r < 'A' || r > 'Z') && (r < '0' || r > '9') && r != '_' {
			return false
		}
	}
	return true
}

// Is makes every VarError match ErrInvalidConfig.
func (e *VarError) Is(target error) bool { return target == ErrInvalidConfig }

// The variables read once per configuration, with the Config fields they set.
type globalVars struct {
	Enabled        bool          `env:"RESILIENCE_ENABLED"`
	Chaos          bool          `env:"RESILIENCE_CHAOS"`
	StoreURL       string        `env:"RESILIENCE_STORE_URL"`
	RedisURL       string        `env:"RESILIENCE_REDIS_URL"`
	MaxAttempts    int           `env:"RETRY_MAX_ATTEMPTS"`
	Base           float64       `env:"RETRY_EXPONENTIAL_BASE"`
	Max            time.Duration `env:"RETRY_EXPONENTIAL_MAX"`
	Jitter         bool          `env:"RETRY_JITTER"`
	DefaultTimeout time.Duration `env:"TIMEOUT_DEFAULT"`
}

// The variables read per resource, under BULKHEAD_<RESOURCE>_.
type bulkheadVars struct {
	Limit       int           `env:"LIMIT"`
	MaxQueue    int           `env:"MAX_QUEUE"`
	MaxWait     time.Duration `env:"MAX_WAIT"`
	FailFast    bool          `env:"FAIL_FAST"`
	GlobalLimit int           `env:"GLOBAL_LIMIT"`
}

// bulkheadSuffixes are the variables read per bulkhead; a suffix that ends
// another (_GLOBAL_LIMIT, _LIMIT) comes first, so that it is matched first.
// _ADAPTIVE, _MIN_LIMIT and _MAX_LIMIT are read by loadAdaptive.
var bulkheadSuffixes = []string{
	"_GLOBAL_LIMIT", "_MIN_LIMIT", "_MAX_LIMIT", "_LIMIT", "_MAX_QUEUE", "_MAX_WAIT", "_FAIL_FAST", "_ADAPTIVE",
}

const (
	breakerPrefix  = "CIRCUIT_BREAKER_"
	bulkheadPrefix = "BULKHEAD_"
	timeoutPrefix  = "TIMEOUT_"
	reservedKey    = "DEFAULT" // names the defaults, never a service
)

// LoadConfigWith reads the configuration from opts.Environment (or the
// process environment), over [DefaultConfig]. Service, resource and
// operation names are discovered from the variable names. Durations accept
// plain seconds ("60", "0.25") as well as Go durations ("1m", "1500ms").
//
// Every bad variable is reported at once, each as a [*VarError] naming the
// variable, its value and why; the returned Config is then the defaults, not
// half a configuration. LoadConfigWith never panics.
func LoadConfigWith(opts LoadOptions) (Config, error) {
	environ := opts.Environment
	if environ == nil {
		environ = processEnv()
	}
	l := loader{prefix: opts.Prefix, environ: environ}
	cfg := DefaultConfig()

	g := globalVars{
		Enabled: cfg.Enabled, Chaos: cfg.ChaosEnabled, MaxAttempts: cfg.Retry.MaxAttempts, Base: cfg.Retry.Multiplier,
		Max: cfg.Retry.MaxDelay, Jitter: true, DefaultTimeout: cfg.DefaultTimeout,
	}
	l.parse(&g, "")
	l.check("RETRY_MAX_ATTEMPTS", g.MaxAttempts >= 1, "must be at least 1")
	l.check("RETRY_EXPONENTIAL_BASE", g.Base >= 1, "the exponential base must be at least 1")
	l.check("RETRY_EXPONENTIAL_MAX", g.Max > 0, "must be positive")
	l.check("TIMEOUT_DEFAULT", g.DefaultTimeout > 0, "must be positive")
	cfg.Enabled = g.Enabled
	cfg.ChaosEnabled = g.Chaos
	cfg.Retry = RetryConfig{MaxAttempts: g.MaxAttempts, Multiplier: g.Base, MaxDelay: g.Max, DisableJitter: !g.Jitter}
	cfg.DefaultTimeout = g.DefaultTimeout
	cfg.StoreURL = g.StoreURL
	if cfg.StoreURL == "" {
		cfg.StoreURL = g.RedisURL
	}

	for _, key := range l.names(timeoutPrefix, "") {
		if key == reservedKey {
			continue // TIMEOUT_DEFAULT, read above
		}
		if m, op := phaseTimeouts(&cfg, key); m != nil {
			var d time.Duration
			name := timeoutPrefix + key
			l.parseOne(name, &d)
			l.check(name, d > 0, "must be positive")
			if *m == nil {
				*m = map[string]time.Duration{}
			}
			(*m)[op] = d
			continue
		}
		v := struct {
			D time.Duration `env:"TIMEOUT"`
		}{cfg.Timeout(key)}
		name := timeoutPrefix + key
		l.parseOne(name, &v.D)
		l.check(name, v.D > 0, "must be positive")
		cfg.Timeouts[key] = v.D
	}

	l.loadBreakers(&cfg)

	for _, key := range defaultFirst(l.names(bulkheadPrefix, bulkheadSuffixes...)) {
		base, ok := cfg.Bulkheads[key]
		if !ok || key == reservedKey {
			base = cfg.DefaultBulkhead
		}
		v := bulkheadVars{Limit: base.Limit, MaxQueue: base.MaxQueue, MaxWait: base.MaxWait, FailFast: base.FailFast, GlobalLimit: base.GlobalLimit}
		p := bulkheadPrefix + key + "_"
		l.parse(&v, p)
		l.check(p+"LIMIT", v.Limit >= 1, "must be at least 1")
		l.check(p+"MAX_QUEUE", v.MaxQueue >= 0, "must not be negative")
		l.check(p+"MAX_WAIT", v.MaxWait >= 0, "must not be negative")
		l.check(p+"GLOBAL_LIMIT", v.GlobalLimit >= 0, "must not be negative")
		bc := BulkheadConfig{Limit: v.Limit, MaxQueue: v.MaxQueue, MaxWait: v.MaxWait, FailFast: v.FailFast, GlobalLimit: v.GlobalLimit}
		bc.Adaptive = l.loadAdaptive(p, base.Adaptive, v.Limit)
		if key == reservedKey {
			cfg.DefaultBulkhead = bc
		} else {
			cfg.Bulkheads[key] = bc
		}
	}

	l.loadRateLimits(&cfg)
	l.loadHedges(&cfg)
	l.loadChaos(&cfg)
	l.loadBounds(&cfg)

	if len(l.errs) > 0 {
		return DefaultConfig(), errors.Join(l.errs...)
	}
	// A last check of the combination, such as a MaxDelay the policies
	// reject; reported against the variables.
	if err := cfg.Validate(); err != nil {
		return DefaultConfig(), err
	}
	return cfg, nil
}

func processEnv() map[string]string {
	m := make(map[string]string)
	for _, kv := range os.Environ() {
		if k, v, ok := strings.Cut(kv, "="); ok {
			m[k] = v
		}
	}
	return m
}

// phaseTimeouts returns the map a TIMEOUT_<OP>_TOTAL, _IDLE or _STREAM
// variable goes in, and its operation, or nil for TIMEOUT_<OP>.
func phaseTimeouts(cfg *Config, key string) (*map[string]time.Duration, string) {
	for suffix, m := range map[string]*map[string]time.Duration{
		"_TOTAL": &cfg.TotalTimeouts, "_IDLE": &cfg.IdleTimeouts, "_STREAM": &cfg.StreamTimeouts,
	} {
		if op, ok := strings.CutSuffix(key, suffix); ok && op != "" {
			return m, op
		}
	}
	return nil, ""
}

// phaseTimeout returns an operation's entry of m, else DEFAULT's, else 0.
func phaseTimeout(m map[string]time.Duration, operation string) time.Duration {
	if d, ok := m[EnvKey(operation)]; ok {
		return d
	}
	return m[reservedKey]
}

// validateEach validates every entry of a per-service map, in key order,
// and joins the errors.
func validateEach[V interface{ validate(key string) error }](m map[string]V) error {
	var errs []error
	for _, k := range slices.Sorted(maps.Keys(m)) {
		if err := m[k].validate(k); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
