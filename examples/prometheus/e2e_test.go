package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The end-to-end test's timings. Prometheus scrapes every second; the
// queries are evaluated once the example has gone through a whole cycle of
// its downstream (an outage and a recovery) under Prometheus's eye, and
// again every 2s until they all answer or the deadline passes.
const (
	scrapeInterval = time.Second
	settle         = cycle + 4*time.Second
	queryDeadline  = 45 * time.Second
)

// TestPrometheus runs a real Prometheus (Debian's prometheus package)
// scraping the example, and evaluates every query of
// dashboards/resilience.json through its HTTP API: each must return at
// least one series with a number. The Prometheus loads the rules of
// dashboards/alerts.yml too: each must evaluate without error, each
// recording rule must give a number, and the example's breakers, which
// open every cycle, must fire ResilienceCircuitBreakerOpened, but not its
// shadow breaker.
func TestPrometheus(t *testing.T) {
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Skip("prometheus not installed: apt-get install prometheus")
	}
	d, _ := loadDashboard(t)
	qs := queries(t, d)

	metricsURL, err := url.Parse(start(t))
	if err != nil {
		t.Fatal(err)
	}
	api := startPrometheus(t, bin, metricsURL.Host)

	up := waitForTarget(t, api, 30*time.Second)
	t.Logf("target up after %v", up)

	// The job variable's query, label_values(metric, label), as Grafana
	// asks it.
	labelValues := regexp.MustCompile(`^label_values\((\w+),\s*(\w+)\)$`)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		m := labelValues.FindStringSubmatch(v.Definition)
		if m == nil {
			t.Errorf("variable %s: cannot evaluate %q", v.Name, v.Definition)
			continue
		}
		var values []string
		if err := apiGet(api+"/api/v1/label/"+m[2]+"/values?"+url.Values{"match[]": {m[1]}}.Encode(), &values); err != nil {
			t.Errorf("variable %s: %v", v.Name, err)
		} else if len(values) == 0 {
			t.Errorf("variable %s: %s has no values", v.Name, v.Definition)
		}
	}

	time.Sleep(settle)
	deadline := time.Now().Add(queryDeadline)
	var failed []string
	for {
		failed = failed[:0]
		for _, q := range qs {
			if err := evaluate(api, q.expr); err != nil {
				failed = append(failed, fmt.Sprintf("panel %s: %v\n\t%s", q.panel, err, q.expr))
			}
		}
		if len(failed) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(2 * time.Second)
	}
	if len(failed) > 0 {
		t.Fatalf("%d of %d queries failed:\n%s", len(failed), len(qs), strings.Join(failed, "\n"))
	}
	t.Logf("all %d queries of %s returned data", len(qs), dashboardPath)

	checkRules(t, api, time.Now().Add(queryDeadline))
}

// checkRules checks, until deadline, that Prometheus has loaded and
// evaluated every rule of dashboards/alerts.yml without error, that each
// recording rule has data, and which breakers fired
// ResilienceCircuitBreakerOpened.
func checkRules(t *testing.T, api string, deadline time.Time) {
	t.Helper()
	var records, alertNames []string
	for _, g := range loadRules(t) {
		for _, r := range g.Rules {
			if r.Record != "" {
				records = append(records, r.Record)
			} else {
				alertNames = append(alertNames, r.Alert)
			}
		}
	}
	var failed []string
	for {
		failed = failed[:0]
		var rules struct {
			Groups []struct {
				Name  string `json:"name"`
				Rules []struct {
					Name      string `json:"name"`
					Type      string `json:"type"`
					Health    string `json:"health"`
					LastError string `json:"lastError"`
				} `json:"rules"`
			} `json:"groups"`
		}
		loaded := map[string]bool{}
		if err := apiGet(api+"/api/v1/rules", &rules); err != nil {
			failed = append(failed, "rules: "+err.Error())
		}
		for _, g := range rules.Groups {
			for _, r := range g.Rules {
				loaded[r.Name] = true
				if r.Health != "ok" {
					failed = append(failed, fmt.Sprintf("group %s: %s %s: health %q %s", g.Name, r.Type, r.Name, r.Health, r.LastError))
				}
			}
		}
		for _, name := range append(slices.Clone(records), alertNames...) {
			if !loaded[name] {
				failed = append(failed, "rule "+name+" not loaded")
			}
		}
		for _, name := range records {
			if err := evaluate(api, name); err != nil {
				failed = append(failed, fmt.Sprintf("recording rule %s: %v", name, err))
			}
		}
		var active struct {
			Alerts []struct {
				Labels map[string]string `json:"labels"`
				State  string            `json:"state"`
			} `json:"alerts"`
		}
		if err := apiGet(api+"/api/v1/alerts", &active); err != nil {
			failed = append(failed, "alerts: "+err.Error())
		}
		opened := map[string]bool{}
		for _, a := range active.Alerts {
			if a.Labels["service"] == "profile" {
				failed = append(failed, fmt.Sprintf("alert %s (%s) for the shadow breaker profile", a.Labels["alertname"], a.State))
			}
			if a.Labels["alertname"] == "ResilienceCircuitBreakerOpened" && a.State == "firing" {
				opened[a.Labels["service"]] = true
			}
		}
		for _, s := range []string{"completion-primary", "pricing", "recommender"} {
			if !opened[s] {
				failed = append(failed, "ResilienceCircuitBreakerOpened not firing for "+s)
			}
		}
		if len(failed) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(2 * time.Second)
	}
	if len(failed) > 0 {
		t.Fatalf("rules of %s:\n%s", rulesPath, strings.Join(failed, "\n"))
	}
	t.Logf("all %d recording rules and %d alerts of %s loaded, evaluated and answered", len(records), len(alertNames), rulesPath)
}

// startPrometheus starts Prometheus scraping target every second, stops it
// when the test ends, and returns the URL of its API.
func startPrometheus(t *testing.T, bin, target string) string {
	t.Helper()
	dir := t.TempDir()
	rules, err := filepath.Abs(rulesPath)
	if err != nil {
		t.Fatal(err)
	}
	config := fmt.Sprintf(`global:
  scrape_interval: %[1]s
  scrape_timeout: %[1]s
  evaluation_interval: %[1]s
rule_files:
  - %[3]q
scrape_configs:
  - job_name: resilience-example
    static_configs:
      - targets: [%[2]q]
`, scrapeInterval, target, rules)
	configPath := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(configPath, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	var out bytes.Buffer
	cmd := exec.Command(bin,
		"--config.file="+configPath,
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr,
		"--log.level=warn",
	)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("prometheus output:\n%s", out.String())
		}
	})
	return "http://" + addr
}

// freeAddr returns a loopback address with a port free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// waitForTarget waits until Prometheus has scraped its one target
// successfully, and returns how long that took.
func waitForTarget(t *testing.T, api string, limit time.Duration) time.Duration {
	t.Helper()
	began := time.Now()
	var last string
	for time.Since(began) < limit {
		var targets struct {
			ActiveTargets []struct {
				Health    string `json:"health"`
				LastError string `json:"lastError"`
			} `json:"activeTargets"`
		}
		if err := apiGet(api+"/api/v1/targets", &targets); err != nil {
			last = err.Error()
		} else if len(targets.ActiveTargets) == 0 {
			last = "no active target"
		} else if tg := targets.ActiveTargets[0]; tg.Health != "up" {
			last = "target " + tg.Health + " " + tg.LastError
		} else {
			return time.Since(began)
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("prometheus target not up after %v: %s", limit, last)
	return 0
}

// apiGet gets a Prometheus API URL and decodes its data into v.
func apiGet(u string, v any) error {
	body, err := get(u)
	if err != nil {
		return err
	}
	var resp struct {
		Status string          `json:"status"`
		Error  string          `json:"error"`
		Data   json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal([]byte(body), &resp); err != nil {
		return err
	}
	if resp.Status != "success" {
		return fmt.Errorf("%s: %s", resp.Status, resp.Error)
	}
	return json.Unmarshal(resp.Data, v)
}

// evaluate runs expr as an instant query and reports an error unless it
// returns at least one series whose value is a number (not NaN, which a
// ratio of no traffic or a quantile of empty buckets gives).
func evaluate(api, expr string) error {
	var data struct {
		ResultType string `json:"resultType"`
		Result     []struct {
			Metric map[string]string `json:"metric"`
			Value  [2]any            `json:"value"`
		} `json:"result"`
	}
	if err := apiGet(api+"/api/v1/query?"+url.Values{"query": {expr}}.Encode(), &data); err != nil {
		return err
	}
	if data.ResultType != "vector" {
		return fmt.Errorf("result type %s, want vector", data.ResultType)
	}
	if len(data.Result) == 0 {
		return fmt.Errorf("no data")
	}
	for _, r := range data.Result {
		s, _ := r.Value[1].(string)
		if f, err := strconv.ParseFloat(s, 64); err == nil && !math.IsNaN(f) && !math.IsInf(f, 0) {
			return nil
		}
	}
	return fmt.Errorf("%d series, none with a number", len(data.Result))
}
