// Command plots draws the figures of docs/RELIABILITY.md from the CSV files
// the chaos scenarios write. It is a nested module, so that gonum/plot never
// enters the library's module graph.
//
// For now it draws one figure, the adaptive bulkhead's limit over time
// from TestAdaptiveLimit's samples, for one run or several side by side:
//
//	cd internal/chaos && CHAOS_ADAPTIVE_CSV=/tmp/adaptive.csv go test -count=1 -run '^TestAdaptiveLimit$' -v .
//	cd internal/plots && go run . -in gradient=/tmp/adaptive.csv -out ../../docs/adaptive-limit.png
package main

import (
	"encoding/csv"
	"errors"
	"flag"
	"fmt"
	"image/color"
	"io"
	"log"
	"os"
	"slices"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// sample is one row of the CSV: the state every 100ms.
type sample struct {
	t        float64 // seconds since the test started
	phase    string
	limit    float64 // 0: no bulkhead in this phase
	inflight float64 // the server's requests in flight
	capacity float64 // the server's capacity
	calls    int     // admitted calls that ended in the 100ms before
	p99      float64 // their p99, in ms
	p50      float64
}

func main() {
	log.SetFlags(0)
	var runs runList
	flag.Var(&runs, "in", "a CSV written by TestAdaptiveLimit (CHAOS_ADAPTIVE_CSV), as label=path; repeat it to draw runs side by side")
	out := flag.String("out", "../../docs/adaptive-limit.png", "the PNG to write")
	title := flag.String("title", "", "a line under the plot's title, such as the run's date and machine")
	flag.Parse()
	if len(runs) == 0 {
		log.Fatal("plots: -in is required")
	}
	for i := range runs {
		s, err := readSamples(runs[i].path)
		if err != nil {
			log.Fatalf("plots: %v", err)
		}
		runs[i].samples = s
	}
	if err := drawAdaptive(runs, *title, *out); err != nil {
		log.Fatalf("plots: %v", err)
	}
}

// run is one CSV to draw, and its label in the legend.
type run struct {
	label, path string
	samples     []sample
}

// runList is the repeated -in flag.
type runList []run

func (l *runList) String() string { return fmt.Sprint(len(*l), " runs") }

func (l *runList) Set(v string) error {
	label, path, ok := strings.Cut(v, "=")
	if !ok || label == "" || path == "" {
		return fmt.Errorf("%q: want label=path", v)
	}
	*l = append(*l, run{label: label, path: path})
	return nil
}

func readSamples(path string) ([]sample, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := csv.NewReader(f)
	head, err := r.Read()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	col := map[string]int{}
	for i, h := range head {
		col[h] = i
	}
	for _, h := range []string{"t_s", "phase", "limit", "server_inflight", "server_capacity", "calls", "p50_ms", "p99_ms"} {
		if _, ok := col[h]; !ok {
			return nil, fmt.Errorf("%s: no column %q", path, h)
		}
	}
	var samples []sample
	for line := 2; ; line++ {
		rec, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		var s sample
		var errs []error
		num := func(name string) float64 {
			v, err := strconv.ParseFloat(rec[col[name]], 64)
			errs = append(errs, err)
			return v
		}
		s.t, s.phase = num("t_s"), rec[col["phase"]]
		s.limit, s.inflight, s.capacity = num("limit"), num("server_inflight"), num("server_capacity")
		s.calls, s.p50, s.p99 = int(num("calls")), num("p50_ms"), num("p99_ms")
		if err := errors.Join(errs...); err != nil {
			return nil, fmt.Errorf("%s:%d: %w", path, line, err)
		}
		samples = append(samples, s)
	}
	if len(samples) == 0 {
		return nil, fmt.Errorf("%s: no samples", path)
	}
	return samples, nil
}

var (
	gray   = color.RGBA{R: 150, G: 150, B: 150, A: 255}
	green  = color.RGBA{R: 44, G: 160, B: 44, A: 255}
	colors = []color.Color{
		color.RGBA{R: 214, G: 39, B: 40, A: 255},  // red
		color.RGBA{R: 31, G: 119, B: 180, A: 255}, // blue
		color.RGBA{R: 255, G: 127, B: 14, A: 255}, // orange
	}
)

// drawAdaptive draws two panels over the same time axis: each run's
// bulkhead limit, with the server's capacity and the band [6, 12] the
// limit must settle in; and each run's p99 of the calls of each 100ms,
// with 2x and 5x the uncongested latency of the first run. The phases are
// those of the first run.
func drawAdaptive(runs []run, subtitle, out string) error {
	first := runs[0].samples
	var capacity plotter.XYs
	var uncongested []float64
	var bounds []float64 // the times the phase changed
	var names []string   // the phase that begins at each bound
	prev := ""
	t1 := 0.0
	for _, r := range runs {
		t1 = max(t1, r.samples[len(r.samples)-1].t)
	}
	for _, s := range first {
		if s.phase != prev {
			bounds, names, prev = append(bounds, s.t), append(names, s.phase), s.phase
		}
		if s.phase == "uncongested" && s.calls > 0 {
			uncongested = append(uncongested, s.p50)
		}
		capacity = append(capacity, plotter.XY{X: s.t, Y: s.capacity})
	}
	if len(uncongested) == 0 {
		return errors.New("no uncongested phase in the first run's samples")
	}
	slices.Sort(uncongested)
	base := uncongested[len(uncongested)/2]
	const t0, topMax = 0.0, 140 // room for the legend above a limit of 100

	top := plot.New()
	top.Title.Text = "TestAdaptiveLimit: 50 clients, server capacity 8, then 16"
	if subtitle != "" {
		top.Title.Text += "\n" + subtitle
	}
	top.Y.Label.Text = "concurrency limit"
	top.Add(plotter.NewGrid())
	band, err := plotter.NewPolygon(plotter.XYs{{X: t0, Y: 6}, {X: t1, Y: 6}, {X: t1, Y: 12}, {X: t0, Y: 12}})
	if err != nil {
		return err
	}
	band.Color = color.NRGBA{R: 44, G: 160, B: 44, A: 60}
	band.LineStyle.Color = color.Transparent
	top.Add(band)
	top.Legend.Add("target band [6, 12]", band)
	if err := addLine(top, capacity, green, 1.5, []vg.Length{vg.Points(4), vg.Points(2)}, "server capacity"); err != nil {
		return err
	}
	top.Legend.Top = true

	bottom := plot.New()
	bottom.X.Label.Text = "seconds"
	bottom.Y.Label.Text = "p99 per 100ms (ms)"
	bottom.Add(plotter.NewGrid())
	bottom.Legend.Top = true

	maxP99 := 0.0
	for i, r := range runs {
		var limit, p99 plotter.XYs
		for _, s := range r.samples {
			if s.limit > 0 {
				limit = append(limit, plotter.XY{X: s.t, Y: s.limit})
			}
			if s.calls > 0 {
				p99 = append(p99, plotter.XY{X: s.t, Y: s.p99})
				maxP99 = max(maxP99, s.p99)
			}
		}
		c := colors[i%len(colors)]
		if err := addLine(top, limit, c, 1.5, nil, "limit: "+r.label); err != nil {
			return err
		}
		if err := addLine(bottom, p99, c, 1, nil, "p99: "+r.label); err != nil {
			return err
		}
	}
	for _, k := range []float64{2, 5} {
		guide := plotter.XYs{{X: t0, Y: k * base}, {X: t1, Y: k * base}}
		if err := addLine(bottom, guide, gray, 1, []vg.Length{vg.Points(3), vg.Points(3)}, fmt.Sprintf("%gx uncongested (%.1fms)", k, k*base)); err != nil {
			return err
		}
	}

	for _, p := range []*plot.Plot{top, bottom} {
		for i, b := range bounds[1:] {
			l, err := plotter.NewLine(plotter.XYs{{X: b, Y: 0}, {X: b, Y: 1e3}})
			if err != nil {
				return err
			}
			l.Color, l.Dashes = gray, []vg.Length{vg.Points(1), vg.Points(2)}
			p.Add(l)
			if p == top {
				labels, err := plotter.NewLabels(plotter.XYLabels{
					XYs:    []plotter.XY{{X: b + 0.15, Y: topMax / 2}},
					Labels: []string{names[i+1]},
				})
				if err != nil {
					return err
				}
				p.Add(labels)
			}
		}
	}
	// The phase lines run past the panels: the axes are set after they
	// were added, and lines are clipped to them.
	for _, p := range []*plot.Plot{top, bottom} {
		p.X.Min, p.X.Max = t0, t1
		p.Y.Min = 0
	}
	top.Y.Max = topMax
	bottom.Y.Max = min(max(1.4*maxP99, 6*base), 200)

	const w, h = 9 * vg.Inch, 6.5 * vg.Inch
	img := vgimg.NewWith(vgimg.UseWH(w, h), vgimg.UseDPI(90))
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: 2, Cols: 1, PadTop: vg.Points(4), PadBottom: vg.Points(4), PadX: vg.Points(4), PadY: vg.Points(6)}
	canvases := plot.Align([][]*plot.Plot{{top}, {bottom}}, tiles, dc)
	top.Draw(canvases[0][0])
	bottom.Draw(canvases[1][0])
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func addLine(p *plot.Plot, xys plotter.XYs, c color.Color, width float64, dashes []vg.Length, name string) error {
	if len(xys) == 0 {
		return nil
	}
	l, err := plotter.NewLine(xys)
	if err != nil {
		return err
	}
	l.Color, l.Width, l.Dashes = c, vg.Points(width), dashes
	p.Add(l)
	p.Legend.Add(name, l)
	return nil
}
