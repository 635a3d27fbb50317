package main

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode"

	"go.yaml.in/yaml/v3"
)

const (
	rulesPath     = "../../dashboards/alerts.yml"
	rulesTestPath = "../../dashboards/alerts_test.yml"
	runbookPath   = "../../docs/runbook.md"
	runbookURL    = "https://github.com/resilience-go/resilience/blob/main/docs/runbook.md#"
)

// rule is one rule of dashboards/alerts.yml.
type rule struct {
	Record      string            `yaml:"record"`
	Alert       string            `yaml:"alert"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

type ruleGroup struct {
	Name  string `yaml:"name"`
	Rules []rule `yaml:"rules"`
}

func loadRules(t *testing.T) []ruleGroup {
	t.Helper()
	raw, err := os.ReadFile(rulesPath)
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Groups []ruleGroup `yaml:"groups"`
	}
	if err := yaml.Unmarshal(raw, &f); err != nil {
		t.Fatalf("%s: %v", rulesPath, err)
	}
	if len(f.Groups) == 0 {
		t.Fatalf("%s: no rule groups", rulesPath)
	}
	return f.Groups
}

func alerts(groups []ruleGroup) []rule {
	var as []rule
	for _, g := range groups {
		for _, r := range g.Rules {
			if r.Alert != "" {
				as = append(as, r)
			}
		}
	}
	return as
}

// TestAlertRules checks what promtool does not: every alert has a
// severity, a summary, a description and a runbook_url whose anchor is a
// heading of docs/runbook.md, and dashboards/alerts_test.yml has a case in
// which it fires and one in which it stays quiet.
func TestAlertRules(t *testing.T) {
	as := alerts(loadRules(t))
	if len(as) == 0 {
		t.Fatal("no alerts")
	}
	anchors := runbookAnchors(t)
	for _, a := range as {
		if s := a.Labels["severity"]; !slices.Contains([]string{"critical", "warning", "info"}, s) {
			t.Errorf("%s: severity %q, want critical, warning or info", a.Alert, s)
		}
		for _, k := range []string{"summary", "description", "runbook_url"} {
			if strings.TrimSpace(a.Annotations[k]) == "" {
				t.Errorf("%s: no %s annotation", a.Alert, k)
			}
		}
		u := a.Annotations["runbook_url"]
		anchor, ok := strings.CutPrefix(u, runbookURL)
		if !ok {
			t.Errorf("%s: runbook_url %q is not in %s", a.Alert, u, runbookURL)
		} else if !anchors[anchor] {
			t.Errorf("%s: runbook_url %q: docs/runbook.md has no heading with anchor #%s", a.Alert, u, anchor)
		}
	}

	// The unit tests: a firing and a quiet case for each alert.
	raw, err := os.ReadFile(rulesTestPath)
	if err != nil {
		t.Fatal(err)
	}
	var tf struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string `yaml:"alertname"`
				ExpAlerts []any  `yaml:"exp_alerts"`
			} `yaml:"alert_rule_test"`
		} `yaml:"tests"`
	}
	if err := yaml.Unmarshal(raw, &tf); err != nil {
		t.Fatalf("%s: %v", rulesTestPath, err)
	}
	firing, quiet := map[string]int{}, map[string]int{}
	for _, tc := range tf.Tests {
		for _, at := range tc.AlertRuleTest {
			if len(at.ExpAlerts) > 0 {
				firing[at.Alertname]++
			} else {
				quiet[at.Alertname]++
			}
		}
	}
	for _, a := range as {
		if firing[a.Alert] == 0 || quiet[a.Alert] == 0 {
			t.Errorf("%s: %d firing and %d quiet cases in %s, want at least one of each", a.Alert, firing[a.Alert], quiet[a.Alert], rulesTestPath)
		}
	}
}

// runbookAnchors returns the anchors GitHub gives the headings of
// docs/runbook.md, and checks that the runbook's own links to #anchors
// resolve.
func runbookAnchors(t *testing.T) map[string]bool {
	t.Helper()
	raw, err := os.ReadFile(runbookPath)
	if err != nil {
		t.Fatal(err)
	}
	heading := regexp.MustCompile(`^#{1,6}\s+(.*?)\s*#*\s*$`)
	anchors := map[string]bool{}
	seen := map[string]int{}
	var fence string
	for line := range strings.SplitSeq(string(raw), "\n") {
		trimmed := strings.TrimSpace(line)
		if fence != "" {
			if strings.HasPrefix(trimmed, fence) {
				fence = ""
			}
			continue
		}
		if strings.HasPrefix(trimmed, "```") || strings.HasPrefix(trimmed, "~~~") {
			fence = trimmed[:3]
			continue
		}
		m := heading.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		slug := githubSlug(m[1])
		if n := seen[slug]; n > 0 {
			seen[slug]++
			slug += "-" + strconv.Itoa(n)
		} else {
			seen[slug] = 1
		}
		anchors[slug] = true
	}
	for _, m := range regexp.MustCompile(`\]\(#([^)]+)\)`).FindAllStringSubmatch(string(raw), -1) {
		if !anchors[m[1]] {
			t.Errorf("docs/runbook.md links to #%s, which no heading has", m[1])
		}
	}
	return anchors
}

// githubSlug is the anchor GitHub gives a Markdown heading: the text of
// links kept, lower case, punctuation but hyphens and underscores removed,
// spaces made hyphens.
func githubSlug(heading string) string {
	heading = regexp.MustCompile(`\[([^\]]*)\]\([^)]*\)`).ReplaceAllString(heading, "$1")
	var b strings.Builder
	for _, r := range strings.ToLower(heading) {
		switch {
		case r == ' ':
			b.WriteRune('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r) || unicode.IsMark(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}

func TestGithubSlug(t *testing.T) {
	for in, want := range map[string]string{
		"Rehearsing a failure (drill)":              "rehearsing-a-failure-drill",
		"When `FAILURE_RATIO` nears its threshold":  "when-failure_ratio-nears-its-threshold",
		"1. Wait (the default)":                     "1-wait-the-default",
		"2. Reset: the downstream has recovered":    "2-reset-the-downstream-has-recovered",
		"ResilienceCircuitBreakerOpenTooLong":       "resiliencecircuitbreakeropentoolong",
		"See [the guide](troubleshooting.md) first": "see-the-guide-first",
	} {
		if got := githubSlug(in); got != want {
			t.Errorf("githubSlug(%q) = %q, want %q", in, got, want)
		}
	}
}

// The panels of the dashboard's "Alert thresholds" row, each with the alert
// whose threshold it draws.
var thresholdPanels = map[string]string{
	"Time not closed":                   "ResilienceCircuitBreakerOpenTooLong",
	"Opens from closed in 15 minutes":   "ResilienceCircuitBreakerFlapping",
	"Mean time to recovery (last hour)": "ResilienceCircuitBreakerSlowRecovery",
	"Retry success rate":                "ResilienceRetrySuccessRateLow",
	"Timeout violations per call":       "ResilienceTimeoutsHigh",
	"Bulkhead rejections per call":      "ResilienceBulkheadRejectionsHigh",
	"Fallbacks per call":                "ResilienceFallbackUsageHigh",
}

// threshold is the number an alert compares with: the first comparison in
// its expression, or, for an alert on a state held for a while, its for
// duration in seconds.
func threshold(t *testing.T, a rule) float64 {
	t.Helper()
	if strings.HasSuffix(strings.TrimSpace(a.Expr), "> 0") && a.For != "" {
		d, err := time.ParseDuration(a.For)
		if err != nil {
			t.Fatalf("%s: for %q: %v", a.Alert, a.For, err)
		}
		return d.Seconds()
	}
	m := regexp.MustCompile(`[<>]=?\s*([0-9.]+)`).FindStringSubmatch(a.Expr)
	if m == nil {
		t.Fatalf("%s: no threshold in %q", a.Alert, a.Expr)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestDashboardThresholds checks that the dashboard draws the alerts'
// thresholds: each panel of thresholdPanels shows its thresholds, one of
// which is its alert's.
func TestDashboardThresholds(t *testing.T) {
	byName := map[string]rule{}
	for _, a := range alerts(loadRules(t)) {
		byName[a.Alert] = a
	}
	_, raw := loadDashboard(t)
	var d struct {
		Panels []struct {
			Title       string `json:"title"`
			FieldConfig struct {
				Defaults struct {
					Custom struct {
						ThresholdsStyle struct {
							Mode string `json:"mode"`
						} `json:"thresholdsStyle"`
					} `json:"custom"`
					Thresholds struct {
						Steps []struct {
							Color string   `json:"color"`
							Value *float64 `json:"value"`
						} `json:"steps"`
					} `json:"thresholds"`
				} `json:"defaults"`
			} `json:"fieldConfig"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatal(err)
	}
	found := map[string]bool{}
	for _, p := range d.Panels {
		name, ok := thresholdPanels[p.Title]
		if !ok {
			continue
		}
		found[p.Title] = true
		a, ok := byName[name]
		if !ok {
			t.Errorf("panel %q: no alert %s in %s", p.Title, name, rulesPath)
			continue
		}
		want := threshold(t, a)
		fc := p.FieldConfig.Defaults
		if m := fc.Custom.ThresholdsStyle.Mode; m == "" || m == "off" {
			t.Errorf("panel %q: thresholdsStyle.mode %q: the threshold is not drawn", p.Title, m)
		}
		var steps []float64
		for _, s := range fc.Thresholds.Steps {
			if s.Value != nil {
				steps = append(steps, *s.Value)
			}
		}
		if !slices.Contains(steps, want) {
			t.Errorf("panel %q: threshold steps %v, want %v, the threshold of %s", p.Title, steps, want, name)
		}
	}
	for title := range thresholdPanels {
		if !found[title] {
			t.Errorf("no panel %q in %s", title, dashboardPath)
		}
	}
}
