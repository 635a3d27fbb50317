package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/variants"
	grafana "github.com/grafana/grafana-foundation-sdk/go/dashboard"
	"github.com/grafana/grafana-foundation-sdk/go/gauge"
	"github.com/grafana/grafana-foundation-sdk/go/heatmap"
	"github.com/grafana/grafana-foundation-sdk/go/piechart"
	"github.com/grafana/grafana-foundation-sdk/go/prometheus"
	"github.com/grafana/grafana-foundation-sdk/go/stat"
	"github.com/grafana/grafana-foundation-sdk/go/table"
	"github.com/grafana/grafana-foundation-sdk/go/timeseries"
)

const dashboardPath = "../../dashboards/resilience.json"

// The rows the original design's dashboard section asks for, the rate
// limiters' since RateLimiter, hedging and failover's since Hedge and
// Failover, and load shedding's since Shed.
var wantRows = []string{"Circuit breakers", "Retries", "Timeouts", "Bulkheads", "Load shedding", "Rate limiters", "Fallbacks", "Hedging and failover"}

type dashboard struct {
	ID            *int `json:"id"`
	SchemaVersion int  `json:"schemaVersion"`
	Templating    struct {
		List []variable `json:"list"`
	} `json:"templating"`
	Panels []panel `json:"panels"`
}

type variable struct {
	Name       string          `json:"name"`
	Type       string          `json:"type"`
	Query      json.RawMessage `json:"query"`
	Definition string          `json:"definition"`
	Datasource *datasource     `json:"datasource"`
	IncludeAll bool            `json:"includeAll"`
	AllValue   string          `json:"allValue"`
}

type datasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type panel struct {
	ID         int         `json:"id"`
	Type       string      `json:"type"`
	Title      string      `json:"title"`
	Datasource *datasource `json:"datasource"`
	GridPos    struct {
		H, W, X, Y int
	} `json:"gridPos"`
	Targets []struct {
		RefID      string      `json:"refId"`
		Expr       string      `json:"expr"`
		Datasource *datasource `json:"datasource"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // a collapsed row's
}

var wantDatasource = datasource{Type: "prometheus", UID: "${datasource}"}

func loadDashboard(t *testing.T) (dashboard, []byte) {
	t.Helper()
	raw, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	return d, raw
}

// allPanels returns the dashboard's panels, rows' nested panels included.
func allPanels(d dashboard) []panel {
	var ps []panel
	for _, p := range d.Panels {
		ps = append(ps, p)
		ps = append(ps, p.Panels...)
	}
	return ps
}

// query is one PromQL expression of the dashboard, as Grafana would send it
// for a 30s rate interval and range and every job.
type query struct {
	panel, expr string
}

// queries returns every targets[].expr of the dashboard with its template
// variables substituted.
func queries(t *testing.T, d dashboard) []query {
	t.Helper()
	vars := map[string]string{
		"__rate_interval": "30s",
		"__interval":      "30s",
		"__range":         "30s",
	}
	for _, v := range d.Templating.List {
		if v.Type == "query" {
			vars[v.Name] = v.AllValue
		}
	}
	ref := regexp.MustCompile(`\$\{(\w+)\}|\$(\w+)`)
	var qs []query
	for _, p := range allPanels(d) {
		for _, tg := range p.Targets {
			expr := ref.ReplaceAllStringFunc(tg.Expr, func(s string) string {
				name := strings.Trim(s, "${}")
				if v, ok := vars[name]; ok {
					return v
				}
				return s // $1 of label_replace, say
			})
			qs = append(qs, query{panel: fmt.Sprintf("%d %q %s", p.ID, p.Title, tg.RefID), expr: expr})
		}
	}
	return qs
}

// TestDashboard checks that dashboards/resilience.json imports as it is into
// any Grafana with a Prometheus data source: a current schema, the data
// source chosen by a variable, no database ids, and a query for every
// instrument of metrics.go.
func TestDashboard(t *testing.T) {
	d, raw := loadDashboard(t)
	if d.SchemaVersion < 39 {
		t.Errorf("schemaVersion = %d, want 39 or later", d.SchemaVersion)
	}
	if d.ID != nil {
		t.Errorf("id = %d, want null: Grafana assigns it", *d.ID)
	}

	var hasDatasource bool
	for _, v := range d.Templating.List {
		if v.Name == "datasource" {
			var q string
			_ = json.Unmarshal(v.Query, &q)
			if v.Type != "datasource" || q != "prometheus" {
				t.Errorf("variable datasource is a %q of %q, want a datasource variable of prometheus", v.Type, q)
			}
			hasDatasource = true
			continue
		}
		if v.Datasource == nil || *v.Datasource != wantDatasource {
			t.Errorf("variable %s: datasource = %+v, want %+v", v.Name, v.Datasource, wantDatasource)
		}
		if v.Type == "query" && (!v.IncludeAll || v.AllValue == "") {
			t.Errorf("variable %s: want an All option with an allValue", v.Name)
		}
	}
	if !hasDatasource {
		t.Error("no datasource template variable")
	}

	// No numeric id but the panels', no uid but ${datasource} in a
	// datasource and the dashboard's own: anything else is an id of the
	// Grafana it was exported from.
	var generic map[string]any
	if err := json.Unmarshal(raw, &generic); err != nil {
		t.Fatal(err)
	}
	var walk func(path string, v any, inPanel bool)
	walk = func(path string, v any, inPanel bool) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				p := path + "." + k
				switch k {
				case "id":
					if _, ok := x.(float64); ok && !inPanel {
						t.Errorf("%s: numeric id outside a panel", p)
					}
				case "uid":
					if path != "" && x != "${datasource}" {
						t.Errorf("%s = %v: a hard-coded uid", p, x)
					}
				case "datasource":
					b, _ := json.Marshal(x)
					var ds datasource
					if err := json.Unmarshal(b, &ds); err != nil || ds != wantDatasource {
						t.Errorf("%s = %s, want %+v", p, b, wantDatasource)
					}
				}
				walk(p, x, false)
			}
		case []any:
			for i, x := range v {
				walk(fmt.Sprintf("%s[%d]", path, i), x, strings.HasSuffix(path, "panels"))
			}
		}
	}
	walk("", generic, false)

	ids := map[int]bool{}
	var rows []string
	for _, p := range allPanels(d) {
		if p.ID <= 0 || ids[p.ID] {
			t.Errorf("panel %q: id %d is not a new positive number", p.Title, p.ID)
		}
		ids[p.ID] = true
		if p.GridPos.W <= 0 || p.GridPos.X+p.GridPos.W > 24 || p.GridPos.H <= 0 {
			t.Errorf("panel %q: gridPos %+v is off the 24-column grid", p.Title, p.GridPos)
		}
		if p.Type == "row" {
			rows = append(rows, p.Title)
			continue
		}
		if p.Datasource == nil || *p.Datasource != wantDatasource {
			t.Errorf("panel %q: datasource = %+v, want %+v", p.Title, p.Datasource, wantDatasource)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			if strings.TrimSpace(tg.Expr) == "" {
				t.Errorf("panel %q: target %s has no expr", p.Title, tg.RefID)
			}
			if !strings.Contains(tg.Expr, `job=~"$job"`) {
				t.Errorf("panel %q: target %s ignores the job variable: %s", p.Title, tg.RefID, tg.Expr)
			}
			if tg.Datasource == nil || *tg.Datasource != wantDatasource {
				t.Errorf("panel %q: target %s: datasource = %+v, want %+v", p.Title, tg.RefID, tg.Datasource, wantDatasource)
			}
		}
	}
	for _, want := range wantRows {
		if !slices.Contains(rows, want) {
			t.Errorf("no row %q; rows: %q", want, rows)
		}
	}

	// Every instrument is on the dashboard, by its Prometheus name.
	qs := queries(t, d)
	for _, in := range instruments(t) {
		name := in.promName
		if in.promType == "histogram" {
			name += "_bucket"
		}
		used := regexp.MustCompile(`\b` + name + `\b`)
		if !slices.ContainsFunc(qs, func(q query) bool { return used.MatchString(q.expr) }) {
			t.Errorf("no query uses %s (%s)", name, in.otelName)
		}
	}
	for _, q := range qs {
		if strings.Contains(q.expr, "$__") || strings.Contains(q.expr, "$job") {
			t.Errorf("panel %s: a variable is left in %s", q.panel, q.expr)
		}
	}
}

// TestDashboardSchema decodes the dashboard strictly with the types Grafana
// generates from its own schema (the Grafana Foundation SDK): a field
// missing, unknown or of the wrong type, in the dashboard, in a panel's
// options or in a Prometheus query, fails.
func TestDashboardSchema(t *testing.T) {
	d, raw := loadDashboard(t)
	// The panel types the dashboard uses, and Prometheus's queries: only
	// these, rather than the SDK's every plugin, which take a minute more to
	// compile.
	panels := map[string]variants.PanelcfgConfig{
		"gauge":      gauge.VariantConfig(),
		"heatmap":    heatmap.VariantConfig(),
		"piechart":   piechart.VariantConfig(),
		"stat":       stat.VariantConfig(),
		"table":      table.VariantConfig(),
		"timeseries": timeseries.VariantConfig(),
	}
	runtime := cog.NewRuntime()
	for _, cfg := range panels {
		runtime.RegisterPanelcfgVariant(cfg)
	}
	runtime.RegisterDataqueryVariant(prometheus.VariantConfig())
	for _, p := range allPanels(d) {
		if _, ok := panels[p.Type]; !ok && p.Type != "row" {
			t.Errorf("panel %q is a %s: register its type above so that its options are checked", p.Title, p.Type)
		}
	}

	// The dashboard is in Grafana's classic JSON model (a schemaVersion,
	// panels with gridPos), which is what imports as it is into current
	// Grafana; dashboardv2 describes a different, newer format.
	//lint:ignore SA1019 the classic model is the one this dashboard uses
	var g grafana.Dashboard
	err := g.UnmarshalJSONStrict(raw)
	// It returns its error list even when empty.
	var errs cog.BuildErrors
	if errors.As(err, &errs) && len(errs) == 0 {
		err = nil
	}
	if err != nil {
		t.Fatalf("%s does not match Grafana's schema:\n%v", dashboardPath, err)
	}
	if err := g.Validate(); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
}
