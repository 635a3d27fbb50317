package resilience

import (
	"fmt"
	"math"
	"strings"
	"sync/atomic"
	"time"
)

// RateLimitConfig is a service's rate limits, RATE_LIMIT_<SERVICE>_*: a
// request limiter and a token limiter that share Per, Burst, MaxWait and
// FailFast.
type RateLimitConfig struct {
	// Requests is RATE_LIMIT_<SERVICE>_REQUESTS, requests per Per. 0 means
	// no request limiter.
	Requests float64
	// Tokens is RATE_LIMIT_<SERVICE>_TOKENS, tokens per Per. 0 means no
	// token limiter.
	Tokens float64
	// Per is RATE_LIMIT_<SERVICE>_PER. 0 means 1m, as providers count.
	Per time.Duration
	// Burst is RATE_LIMIT_<SERVICE>_BURST. 0 means the ceiling of the
	// limit.
	Burst int
	// MaxWait is RATE_LIMIT_<SERVICE>_MAX_WAIT. 0 means until the
	// context is done.
	MaxWait time.Duration
	// FailFast is RATE_LIMIT_<SERVICE>_FAIL_FAST.
	FailFast bool
	// GlobalRequests and GlobalTokens are RATE_LIMIT_<SERVICE>_GLOBAL_REQUESTS
	// and _GLOBAL_TOKENS: the fleet's limits per Per, shared through a
	// store that implements RateStore (the Redis store). 0 means none.
	GlobalRequests float64
	GlobalTokens   float64
}

// limiter returns the RateLimiterConfig of the limit of limit per Per.
func (c RateLimitConfig) limiter(name string, limit float64) RateLimiterConfig {
	per := c.Per
	if per == 0 {
		per = time.Minute
	}
	return RateLimiterConfig{Name: name, Limit: limit, Per: per, Burst: c.Burst, MaxWait: c.MaxWait, FailFast: c.FailFast}
}

func (c RateLimitConfig) validate(key string) error {
	bad := func(f float64) bool { return math.IsNaN(f) || math.IsInf(f, 0) || f < 0 }
	field := "Config.RateLimits[" + key + "]."
	switch {
	case bad(c.Requests):
		return invalid(field+"Requests", c.Requests, "must not be negative")
	case bad(c.Tokens):
		return invalid(field+"Tokens", c.Tokens, "must not be negative")
	case c.Per < 0:
		return invalid(field+"Per", c.Per, "must not be negative")
	case c.Burst < 0:
		return invalid(field+"Burst", c.Burst, "must not be negative")
	case c.MaxWait < 0:
		return invalid(field+"MaxWait", c.MaxWait, "must not be negative")
	case bad(c.GlobalRequests):
		return invalid(field+"GlobalRequests", c.GlobalRequests, "must not be negative")
	case bad(c.GlobalTokens):
		return invalid(field+"GlobalTokens", c.GlobalTokens, "must not be negative")
	}
	return nil
}

// The variables read per service, under RATE_LIMIT_<SERVICE>_.
type rateLimitVars struct {
	Requests float64       `env:"REQUESTS"`
	Tokens   float64       `env:"TOKENS"`
	Per      time.Duration `env:"PER"`
	Burst    int           `env:"BURST"`
	MaxWait  time.Duration `env:"MAX_WAIT"`
	FailFast bool          `env:"FAIL_FAST"`

	GlobalRequests float64 `env:"GLOBAL_REQUESTS"`
	GlobalTokens   float64 `env:"GLOBAL_TOKENS"`
}

const rateLimitPrefix = "RATE_LIMIT_"

// loadRateLimits reads RATE_LIMIT_<SERVICE>_* into cfg.RateLimits.
func (l *loader) loadRateLimits(cfg *Config) {
	// The _GLOBAL_ suffixes first: _GLOBAL_REQUESTS also ends in _REQUESTS.
	for _, key := range l.names(rateLimitPrefix, "_GLOBAL_REQUESTS", "_GLOBAL_TOKENS", "_REQUESTS", "_TOKENS", "_PER", "_BURST", "_MAX_WAIT", "_FAIL_FAST") {
		p := rateLimitPrefix + key + "_"
		if key == reservedKey {
			l.report(l.prefix+p+"REQUESTS", "rate limits are per service: name the service instead of DEFAULT")
			continue
		}
		v := rateLimitVars{Per: time.Minute}
		l.parse(&v, p)
		l.check(p+"REQUESTS", v.Requests > 0 && !math.IsInf(v.Requests, 0), "must be a positive number of requests per RATE_LIMIT_"+key+"_PER")
		l.check(p+"TOKENS", v.Tokens > 0 && !math.IsInf(v.Tokens, 0), "must be a positive number of tokens per RATE_LIMIT_"+key+"_PER")
		l.check(p+"PER", v.Per > 0, "must be positive")
		l.check(p+"BURST", v.Burst >= 1, "must be at least 1")
		l.check(p+"MAX_WAIT", v.MaxWait > 0, "must be positive")
		l.check(p+"GLOBAL_REQUESTS", v.GlobalRequests > 0 && !math.IsInf(v.GlobalRequests, 0) && v.Requests > 0,
			"must be a positive number, beside RATE_LIMIT_"+key+"_REQUESTS, the local limit that applies when the store is away")
		l.check(p+"GLOBAL_TOKENS", v.GlobalTokens > 0 && !math.IsInf(v.GlobalTokens, 0) && v.Tokens > 0,
			"must be a positive number, beside RATE_LIMIT_"+key+"_TOKENS, the local limit that applies when the store is away")
		if v.Requests == 0 && v.Tokens == 0 {
			l.report(l.prefix+p+"REQUESTS", "a rate limit needs RATE_LIMIT_"+key+"_REQUESTS or _TOKENS")
			continue
		}
		if cfg.RateLimits == nil {
			cfg.RateLimits = map[string]RateLimitConfig{}
		}
		cfg.RateLimits[key] = RateLimitConfig(v)
	}
}

// RateLimiter returns the request limiter of the named service, built on
// first use from RATE_LIMIT_<SERVICE>_REQUESTS and the rest, or nil when
// the service has no request limit. ForService and Transport take one of
// its permits per attempt. It is safe for concurrent use.
func (r *Registry) RateLimiter(name string) *RateLimiter {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.limiterLocked(name, false)
}

// TokenLimiter returns the token limiter of the named service, built on
// first use from RATE_LIMIT_<SERVICE>_TOKENS and the rest, or nil when the
// service has no token limit. It is safe for concurrent use.
func (r *Registry) TokenLimiter(name string) *RateLimiter {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.limiterLocked(name, true)
}

func limiterKey(key string, tokens bool) string {
	if tokens {
		return "tokens:" + key
	}
	return "requests:" + key
}

// limiterLocked returns, building it if need be, a service's limiter, or
// nil when it has none. r.mu is held.
func (r *Registry) limiterLocked(name string, tokens bool) *RateLimiter {
	key := EnvKey(name)
	c, ok := r.cfg.RateLimits[key]
	limit := c.Requests
	if tokens {
		limit = c.Tokens
	}
	if !ok || limit == 0 {
		return nil
	}
	lk := limiterKey(key, tokens)
	if l, ok := r.limiters[lk]; ok {
		return l
	}
	l, err := NewRateLimiter(c.limiter(name, limit))
	if err != nil {
		return nil // unreachable: validated with the configuration
	}
	l.sw = &r.enabled
	r.attachLimiterLocked(l, key, tokens)
	if r.limiters == nil {
		r.limiters = map[string]*RateLimiter{}
	}
	r.limiters[lk] = l
	return l
}

// attachLimiterLocked shares a service's limiter through the registry's
// store, if the service has a global limit and the store can share one.
// r.mu is held.
func (r *Registry) attachLimiterLocked(l *RateLimiter, key string, tokens bool) {
	c := r.cfg.RateLimits[key]
	global := c.GlobalRequests
	if tokens {
		global = c.GlobalTokens
	}
	rs, ok := r.store.(RateStore)
	if !ok || global <= 0 {
		l.SetGlobal(nil)
		return
	}
	per := c.Per
	if per == 0 {
		per = time.Minute
	}
	burst := c.Burst
	if burst == 0 {
		burst = int(min(math.Ceil(global), math.MaxInt32))
	}
	l.SetGlobal(rs.GlobalRateLimiter(limiterKey(key, tokens), global, per, burst))
}

// limitCellLocked returns the cell through which a service's pipelines
// find its request limiter, which a Reload may add, change or remove. r.mu
// is held.
func (r *Registry) limitCellLocked(name string) *atomic.Pointer[RateLimiter] {
	key := EnvKey(name)
	if c, ok := r.limitCells[key]; ok {
		return c.cell
	}
	c := limitCell{name: name, cell: new(atomic.Pointer[RateLimiter])}
	c.cell.Store(r.limiterLocked(name, false))
	if r.limitCells == nil {
		r.limitCells = map[string]limitCell{}
	}
	r.limitCells[key] = c
	return c.cell
}

// limitCell is a service's request limiter as its pipelines see it.
type limitCell struct {
	name string // the service's name as first asked for
	cell *atomic.Pointer[RateLimiter]
}

// reloadLimitersLocked applies the configuration to the limiters built so
// far, keeping what they granted, and points the pipelines at the request
// limiter each service has now. r.mu is held.
func (r *Registry) reloadLimitersLocked() {
	for lk, l := range r.limiters {
		kind, key, _ := strings.Cut(lk, ":")
		c, ok := r.cfg.RateLimits[key]
		limit := c.Requests
		if kind == "tokens" {
			limit = c.Tokens
		}
		if !ok || limit == 0 {
			delete(r.limiters, lk)
			continue
		}
		if err := l.reconfigure(c.limiter(l.name, limit)); err != nil {
			panic(fmt.Sprintf("resilience: a validated rate limit was refused: %v", err)) // unreachable
		}
		r.attachLimiterLocked(l, key, kind == "tokens")
	}
	for _, c := range r.limitCells {
		c.cell.Store(r.limiterLocked(c.name, false))
	}
}
