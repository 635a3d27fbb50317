package resilience

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"time"
)

// chaosRequest is the optional body of POST /chaos/{service}/on.
type chaosRequest struct {
	ErrorRate   float64 `json:"error_rate"`
	Latency     string  `json:"latency"`
	LatencyRate float64 `json:"latency_rate"`
}

// serveChaos serves GET /chaos and POST /chaos/{service}/on and /off;
// parts is the path after /chaos. Each action is logged, as "chaos_on"
// or "chaos_off", whether it succeeded or not.
func (a *admin) serveChaos(w http.ResponseWriter, req *http.Request, r *Registry, parts []string) {
	if len(parts) == 0 {
		if allow(w, req, http.MethodGet) {
			writeJSON(w, http.StatusOK, r.chaosStatus())
		}
		return
	}
	service, action := parts[0], parts[1]
	if action != "on" && action != "off" {
		writeError(w, http.StatusNotFound, "unknown action "+quote(action)+": use on or off")
		return
	}
	if !allow(w, req, http.MethodPost) {
		return
	}
	if action == "off" {
		r.StopChaos(service)
		a.logAction(req, "chaos_off", "service", service, http.StatusOK, nil)
		writeJSON(w, http.StatusOK, chaosOf(r, service))
		return
	}
	cfg, err := readChaosRequest(req)
	if err != nil {
		a.logAction(req, "chaos_on", "service", service, http.StatusBadRequest, err)
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if err := r.StartChaos(service, cfg); err != nil {
		code := http.StatusBadRequest
		if !r.Config().ChaosEnabled {
			code = http.StatusConflict // not the request's fault: the process's setting
		}
		a.logAction(req, "chaos_on", "service", service, code, err)
		writeError(w, code, err.Error())
		return
	}
	a.logAction(req, "chaos_on", "service", service, http.StatusOK, nil)
	writeJSON(w, http.StatusOK, chaosOf(r, service))
}

// readChaosRequest reads the optional body of POST /chaos/{service}/on.
func readChaosRequest(req *http.Request) (ChaosConfig, error) {
	var body chaosRequest
	dec := json.NewDecoder(io.LimitReader(req.Body, 4<<10))
	dec.DisallowUnknownFields()
	const want = `: want {"error_rate": 1, "latency": "2s", "latency_rate": 0.5}, or no body for the service's CHAOS_<SERVICE>_* or a whole outage`
	err := dec.Decode(&body)
	switch {
	case errors.Is(err, io.EOF):
		return ChaosConfig{}, nil // no body
	case err != nil:
		return ChaosConfig{}, errors.New("body: " + err.Error() + want)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return ChaosConfig{}, errors.New("body: data after the JSON value" + want)
	}
	if body == (chaosRequest{}) {
		return ChaosConfig{}, errors.New("body: injects nothing" + want)
	}
	cfg := ChaosConfig{ErrorRate: body.ErrorRate, LatencyRate: body.LatencyRate}
	if body.Latency != "" {
		d, err := time.ParseDuration(body.Latency)
		if err != nil {
			return ChaosConfig{}, invalid("latency", body.Latency, "must be a duration, such as 2s")
		}
		cfg.Latency = d
		if cfg.LatencyRate == 0 {
			cfg.LatencyRate = 1
		}
	}
	return cfg, nil
}

// chaosOf reports one service's fault injection.
func chaosOf(r *Registry, service string) ChaosStatus {
	key := EnvKey(service)
	for _, s := range r.chaosStatus() {
		if EnvKey(s.Service) == key {
			return s
		}
	}
	return ChaosStatus{Service: service}
}
