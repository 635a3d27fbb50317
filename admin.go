package resilience

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"time"
)

// BreakerStatus is one breaker as the admin endpoint reports it.
type BreakerStatus struct {
	Name   string        `json:"name"`
	State  string        `json:"state"`
	Forced bool          `json:"forced"`
	Since  time.Time     `json:"since"`
	Counts BreakerCounts `json:"counts"`
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
		st.Breakers = append(st.Breakers, BreakerStatus{
			Name: cb.Name(), State: cb.State().String(), Forced: cb.Forced(), Since: cb.Since().UTC(), Counts: cb.Counts(),
		})
	}
	for _, b := range bulkheads {
		s := b.Stats()
		st.Bulkheads = append(st.Bulkheads, BulkheadStatus{
			Name: b.Name(), Limit: b.Limit(), Active: s.Active, Waiting: s.Waiting, Rejected: s.Rejected, Completed: s.Completed,
		})
	}
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
//	GET  /                         the whole Status
//	GET  /breakers                 every breaker: name, state, forced, since, counts
//	GET  /bulkheads                every bulkhead: limit, active, waiting, rejected, completed
//	GET  /breakers/{name}          one breaker
//	POST /breakers/{name}/reset    back to closed, counts zeroed, any forced state cleared
//	POST /breakers/{name}/open     forced open until reset
//	POST /breakers/{name}/close    forced closed until reset
//
// Errors are JSON too, {"error": "..."}, with 404 for an unknown breaker
// or path and 405 (and an Allow header) for a wrong method.
//
// The handler changes how a service treats its dependencies, so mount it
// where only operators can reach it: on a separate listener bound to
// localhost or an internal interface, or behind the service's own
// authentication, never on a public port as it is.
func AdminHandler(r *Registry) http.Handler {
	return &admin{r: r}
}

type admin struct{ r *Registry }

func (a *admin) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r := a.r
	if r == nil {
		r = Default()
	}
	parts := strings.Split(strings.Trim(req.URL.Path, "/"), "/")
	if len(parts) == 1 && parts[0] == "" {
		parts = nil
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
			writeJSON(w, http.StatusOK, breakerStatus(cb))
		}
	default:
		writeError(w, http.StatusNotFound, "no such path "+quote(req.URL.Path))
	}
}

func breakerStatus(cb *CircuitBreaker) BreakerStatus {
	return BreakerStatus{Name: cb.Name(), State: cb.State().String(), Forced: cb.Forced(), Since: cb.Since().UTC(), Counts: cb.Counts()}
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
