package resilience

import (
	"crypto/sha256"
	"encoding/json"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"
)

// BreakerStatus is one breaker as the admin endpoint reports it.
//
// Durations are Go duration strings, as time.Duration.String writes them
// and the configuration and the resilience command accept them: "8s",
// "1m30s", "250ms".
type BreakerStatus struct {
	Name   string        `json:"name"`
	State  string        `json:"state"`
	Forced bool          `json:"forced"`
	Since  time.Time     `json:"since"`
	Counts BreakerCounts `json:"counts"`

	// Mode is "shadow" for a breaker that never rejects a call (see
	// CircuitBreakerConfig.Shadow), else "normal", as the variable
	// CIRCUIT_BREAKER_<SVC>_MODE names them.
	Mode string `json:"mode"`

	// FailureRatio is Counts.FailureRatio(): the failures among the calls
	// in the window now, from 0 to 1, to set beside
	// Thresholds.FailureRatio.
	FailureRatio float64 `json:"failure_ratio"`

	// SlowCallRatio is Counts.SlowCallRatio(): the slow calls among the
	// calls in the window now, from 0 to 1, to set beside
	// Thresholds.SlowCallRatio.
	SlowCallRatio float64 `json:"slow_call_ratio"`

	// OpenPeriod is the length of the current open period, or of the last
	// one, as [CircuitBreaker.OpenPeriod] reports it: OpenTimeout, doubled
	// for each failed probe in a row up to MaxOpenTimeout, or longer for a
	// retry hint; OpenTimeout again once the breaker has closed. A Go
	// duration string.
	OpenPeriod string `json:"open_period"`

	// RetryAfter is how long until the breaker lets a probe through, as a
	// rejection's [Error.RetryAfter] reports it, rounded up to the
	// millisecond: set only while the breaker is open by itself, empty
	// (and left out) when it is not open or an operator holds it open. A
	// Go duration string.
	RetryAfter string `json:"retry_after,omitempty"`

	// Thresholds are what opens the breaker and for how long.
	Thresholds BreakerThresholds `json:"thresholds"`
}

// BreakerThresholds are a breaker's thresholds as its configuration
// resolved them, defaults applied. A trigger the breaker does not have is
// zero, and left out of the JSON. Durations are Go duration strings.
type BreakerThresholds struct {
	// FailMax is the number of consecutive failures that opens the
	// breaker; 0 when only a ratio does.
	FailMax uint32 `json:"fail_max,omitempty"`

	// FailureRatio is the ratio of failures to calls in the window that
	// opens the breaker; 0 without a failure-ratio trigger.
	FailureRatio float64 `json:"failure_ratio,omitempty"`

	// MinimumThroughput is the number of calls the window must hold before
	// a ratio can open the breaker; 0 without a ratio trigger.
	MinimumThroughput uint32 `json:"minimum_throughput,omitempty"`

	// SamplingWindow is the rolling window the ratios are counted over;
	// empty without one, when the counts run since the last transition.
	SamplingWindow string `json:"sampling_window,omitempty"`

	// SlowCallDuration is how long a successful call must take to count as
	// slow; empty when no call is.
	SlowCallDuration string `json:"slow_call_duration,omitempty"`

	// SlowCallRatio is the ratio of slow calls to calls in the window that
	// opens the breaker; 0 without a slow-call trigger.
	SlowCallRatio float64 `json:"slow_call_ratio,omitempty"`

	// OpenTimeout is the shortest open period, before the first probe.
	OpenTimeout string `json:"open_timeout"`

	// MaxOpenTimeout is the longest an open period grows to after failed
	// probes; empty when every open period is OpenTimeout.
	MaxOpenTimeout string `json:"max_open_timeout,omitempty"`
}

// BulkheadStatus is one bulkhead as the admin endpoint reports it.
type BulkheadStatus struct {
	Name      string `json:"name"`
	Limit     int    `json:"limit"`
	Active    int    `json:"active"`
	Waiting   int    `json:"waiting"`
	Rejected  uint64 `json:"rejected"`
	Completed uint64 `json:"completed"`
}

// Status is the admin endpoint's report of a registry.
type Status struct {
	Enabled   bool             `json:"enabled"`
	Breakers  []BreakerStatus  `json:"breakers"`
	Bulkheads []BulkheadStatus `json:"bulkheads"`
	// ChaosEnabled is RESILIENCE_CHAOS: whether fault injection may run.
	ChaosEnabled bool `json:"chaos_enabled"`
	// Chaos lists every service whose fault injection is configured,
	// started or stopped.
	Chaos []ChaosStatus `json:"chaos"`
	// Services is how many policy sets the registry holds, the overflow
	// set not counted, and MaxServices its cap (RESILIENCE_MAX_SERVICES).
	Services    int `json:"services"`
	MaxServices int `json:"max_services"`
}

// Status reports every breaker and bulkhead the registry has built, sorted
// by name. It is safe for concurrent use.
func (r *Registry) Status() Status {
	r.mu.Lock()
	breakers := make([]*CircuitBreaker, 0, len(r.breakers))
	for _, cb := range r.breakers {
		breakers = append(breakers, cb)
	}
	bulkheads := make([]*Bulkhead, 0, len(r.bulkheads))
	for _, b := range r.bulkheads {
		bulkheads = append(bulkheads, b)
	}
	r.mu.Unlock()

	st := Status{Enabled: r.Enabled(), Breakers: []BreakerStatus{}, Bulkheads: []BulkheadStatus{}}
	for _, cb := range breakers {
		st.Breakers = append(st.Breakers, breakerStatus(cb))
	}
	for _, b := range bulkheads {
		s := b.Stats()
		st.Bulkheads = append(st.Bulkheads, BulkheadStatus{
			Name: b.Name(), Limit: b.Limit(), Active: s.Active, Waiting: s.Waiting, Rejected: s.Rejected, Completed: s.Completed,
		})
	}
	cfg := r.Config()
	st.ChaosEnabled = cfg.ChaosEnabled
	st.Services, st.MaxServices = r.Services(), cfg.maxServices()
	st.Chaos = r.chaosStatus()
	slices.SortFunc(st.Breakers, func(a, b BreakerStatus) int { return strings.Compare(a.Name, b.Name) })
	slices.SortFunc(st.Bulkheads, func(a, b BulkheadStatus) int { return strings.Compare(a.Name, b.Name) })
	return st
}

// lookupBreaker returns the breaker already built for name, if any: the
// admin endpoint acts on breakers, it does not make them.
func (r *Registry) lookupBreaker(name string) *CircuitBreaker {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.breakers[EnvKey(name)]
}

// AdminHandler returns an HTTP handler to look at and operate a registry's
// breakers and bulkheads, for people on call and for the resilience CLI.
// A nil r means [Default]. It serves JSON:
//
//	GET  /                         the whole Status (a browser asking for
//	                               text/html gets the status page instead)
//	GET  /breakers                 every breaker: name, state, forced, since, counts,
//	                               mode, failure and slow-call ratios, open period,
//	                               time until a probe, thresholds
//	GET  /bulkheads                every bulkhead: limit, active, waiting, rejected, completed
//	GET  /breakers/{name}          one breaker
//	POST /breakers/{name}/reset    back to closed, counts zeroed, any forced state cleared
//	POST /breakers/{name}/open     forced open until reset
//	POST /breakers/{name}/close    forced closed until reset
//	GET  /breakers/{name}/keys     the keys of the service (WithKey) whose breakers are
//	                               not closed, sorted, a page at a time:
//	                               {"service", "open_keys": [KeyStatus...], "next"};
//	                               ?limit=N (1 to 1000, default 100) and ?after=K, the
//	                               page's "next", empty after the last page
//	POST /breakers/{name}/keys/reset?key=K
//	                               the key's breaker back to closed (Registry.ResetKey);
//	                               404 for a key without one. Keys go URL-encoded in the
//	                               query string: they may hold any character
//	GET  /chaos                    every service's fault injection
//	POST /chaos/{service}/on       start injecting faults (Registry.StartChaos), as an
//	                               optional JSON body says: {"error_rate": 1,
//	                               "latency": "2s", "latency_rate": 0.5}; 409 unless
//	                               RESILIENCE_CHAOS=true
//	POST /chaos/{service}/off      stop injecting faults (Registry.StopChaos)
//
// Errors are JSON too, {"error": "..."}, with 404 for an unknown breaker,
// key or path, 400 for a bad query parameter, and 405 (and an Allow
// header) for a wrong method.
//
// AdminHandler is [NewAdminHandler] with r, the token of the
// RESILIENCE_ADMIN_TOKEN environment variable (empty or unset: no token),
// and the host names of RESILIENCE_ADMIN_HOSTS, separated by commas; both
// are read once, here, so a change to them takes a new handler. Every
// request passes NewAdminHandler's guards: a Host of this listener, no
// cross-origin browser request that changes state, the token if one is
// set, and each action logged at Warn to slog.Default.
//
// The handler changes how a service treats its dependencies, so mount it
// where only operators can reach it: on a separate listener bound to
// localhost or an internal interface, with a token, never on a public
// port as it is. Mounted under a prefix, with http.StripPrefix, keep the
// prefix's trailing slash ("/admin/"), which the status page's links are
// relative to.
func AdminHandler(r *Registry) http.Handler {
	return NewAdminHandler(adminConfigFromEnv(r, os.Getenv))
}

// admin is the admin endpoint: its guards, in admin_security.go, then its
// routes, here.
type admin struct {
	r      *Registry
	log    *slog.Logger       // nil: slog.Default at the time of each record
	token  *[sha256.Size]byte // the digest of the token; nil: no token
	hosts  map[string]bool    // AdminConfig.Hosts, lower-case, without brackets
	routes http.Handler       // serve, behind http.CrossOriginProtection
}

// serve serves the routes, once the Host and cross-origin checks passed.
func (a *admin) serve(w http.ResponseWriter, req *http.Request) {
	r := a.r
	if r == nil {
		r = Default()
	}
	parts := strings.Split(strings.Trim(req.URL.Path, "/"), "/")
	if len(parts) == 1 && parts[0] == "" {
		parts = nil
	}
	if len(parts) == 0 {
		w.Header().Add("Vary", "Accept")
		if (req.Method == http.MethodGet || req.Method == http.MethodHead) && wantsHTML(req) {
			a.servePage(w, req)
			return
		}
	}
	if !a.authorized(req) {
		a.unauthorized(w, req)
		return
	}
	switch {
	case len(parts) == 0:
		if allow(w, req, http.MethodGet) {
			writeJSON(w, http.StatusOK, r.Status())
		}
	case len(parts) == 1 && parts[0] == "breakers":
		if allow(w, req, http.MethodGet) {
			writeJSON(w, http.StatusOK, r.Status().Breakers)
		}
	case len(parts) == 1 && parts[0] == "bulkheads":
		if allow(w, req, http.MethodGet) {
			writeJSON(w, http.StatusOK, r.Status().Bulkheads)
		}
	case parts[0] == "breakers" && len(parts) >= 3 && parts[2] == "keys":
		a.serveKeys(w, req, r, parts[1], parts[3:])
	case parts[0] == "breakers" && (len(parts) == 2 || len(parts) == 3):
		cb := r.lookupBreaker(parts[1])
		if cb == nil {
			writeError(w, http.StatusNotFound, "no circuit breaker named "+quote(parts[1]))
			return
		}
		if len(parts) == 2 {
			if allow(w, req, http.MethodGet) {
				writeJSON(w, http.StatusOK, breakerStatus(cb))
			}
			return
		}
		var act func()
		switch parts[2] {
		case "reset":
			act = cb.Reset
		case "open":
			act = cb.ForceOpen
		case "close":
			act = cb.ForceClose
		default:
			writeError(w, http.StatusNotFound, "unknown action "+quote(parts[2])+": use reset, open or close")
			return
		}
		if allow(w, req, http.MethodPost) {
			act()
			a.logAction(req, parts[2], "breaker", cb.Name(), http.StatusOK, nil)
			writeJSON(w, http.StatusOK, breakerStatus(cb))
		}
	case parts[0] == "chaos" && (len(parts) == 1 || len(parts) == 3):
		a.serveChaos(w, req, r, parts[1:])
	default:
		writeError(w, http.StatusNotFound, "no such path "+quote(req.URL.Path))
	}
}

// breakerStatus reports cb. Its state is asked first, so that an open
// period that has ended shows as half-open, with no time left until a
// probe.
func breakerStatus(cb *CircuitBreaker) BreakerStatus {
	state, forced := cb.State(), cb.Forced()
	c := cb.Counts()
	r := cb.rule.Load()
	bs := BreakerStatus{
		Name: cb.Name(), State: state.String(), Forced: forced, Since: cb.Since().UTC(), Counts: c,
		Mode: breakerMode(r.shadow), FailureRatio: c.FailureRatio(), SlowCallRatio: c.SlowCallRatio(),
		OpenPeriod: cb.OpenPeriod().String(), Thresholds: breakerThresholds(cb, r),
	}
	if state == StateOpen && !forced {
		if d := cb.untilProbe(); d >= 0 {
			bs.RetryAfter = (d + time.Millisecond - 1).Truncate(time.Millisecond).String()
		}
	}
	return bs
}

// breakerThresholds reports the triggers of r, cb's rule, as
// breakerRule.attrs logs them.
func breakerThresholds(cb *CircuitBreaker, r *breakerRule) BreakerThresholds {
	cb.setMu.Lock()
	window := cb.shape.window
	cb.setMu.Unlock()
	t := BreakerThresholds{FailMax: r.failMax, FailureRatio: r.ratio, OpenTimeout: r.open.String()}
	if r.ratio > 0 || r.slowRatio > 0 {
		t.MinimumThroughput = r.minCalls
	}
	if window > 0 {
		t.SamplingWindow = window.String()
	}
	if r.slowRatio > 0 {
		t.SlowCallDuration, t.SlowCallRatio = r.slow.String(), r.slowRatio
	}
	if r.maxOpen > r.open {
		t.MaxOpenTimeout = r.maxOpen.String()
	}
	return t
}

func allow(w http.ResponseWriter, req *http.Request, method string) bool {
	if req.Method == method || (method == http.MethodGet && req.Method == http.MethodHead) {
		return true
	}
	w.Header().Set("Allow", method)
	writeError(w, http.StatusMethodNotAllowed, "method "+req.Method+" not allowed: use "+method)
	return false
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, map[string]string{"error": msg})
}

func quote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}
