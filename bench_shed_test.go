package resilience

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
)

// benchRW is a ResponseWriter that keeps nothing, so that the benchmarks
// measure the handlers, not the recorder.
type benchRW struct{ h http.Header }

func (w *benchRW) Header() http.Header         { return w.h }
func (w *benchRW) Write(p []byte) (int, error) { return len(p), nil }
func (w *benchRW) WriteHeader(int)             {}

// BenchmarkShed measures Shed on its idle path, a bulkhead never full,
// against the bare handler: compare with benchstat -col /shed.
func BenchmarkShed(b *testing.B) {
	bare := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusNoContent) })
	handlers := []struct {
		name string
		h    func(b *testing.B) http.Handler
	}{
		{"bare", func(*testing.B) http.Handler { return bare }},
		{"on", func(b *testing.B) http.Handler {
			return Shed(bare, ShedConfig{Bulkhead: mustBulkhead(b, BulkheadConfig{Name: "bench-shed", Limit: 1024})})
		}},
	}
	for _, mode := range []string{"serial", "parallel"} {
		for _, hc := range handlers {
			b.Run("mode="+mode+"/shed="+hc.name, func(b *testing.B) {
				h := hc.h(b)
				b.ReportAllocs()
				if mode == "serial" {
					w, r := &benchRW{h: http.Header{}}, httptest.NewRequest(http.MethodGet, "/", nil)
					for b.Loop() {
						h.ServeHTTP(w, r)
					}
					return
				}
				b.RunParallel(func(pb *testing.PB) {
					w, r := &benchRW{h: http.Header{}}, httptest.NewRequest(http.MethodGet, "/", nil)
					for pb.Next() {
						h.ServeHTTP(w, r)
					}
				})
			})
		}
	}
}

// BenchmarkAdaptiveBulkhead measures what an adaptive limit adds to a
// bulkhead's call: compare with benchstat -col /bulkhead.
func BenchmarkAdaptiveBulkhead(b *testing.B) {
	configs := []struct {
		name string
		cfg  BulkheadConfig
	}{
		{"fixed", BulkheadConfig{Name: "bench-fixed", Limit: 1024}},
		{"adaptive", BulkheadConfig{Name: "bench-adaptive", Limit: 1024, Adaptive: &AdaptiveConfig{}}},
	}
	for _, mode := range []string{"serial", "parallel"} {
		for _, c := range configs {
			b.Run("mode="+mode+"/bulkhead="+c.name, func(b *testing.B) {
				bh := mustBulkhead(b, c.cfg)
				fn := Compose(checksCtx, Stack[int]{Bulkhead: bh})
				ctx := context.Background()
				b.ReportAllocs()
				if mode == "serial" {
					for b.Loop() {
						if _, err := fn(ctx); err != nil {
							b.Fatal(err)
						}
					}
					return
				}
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						if _, err := fn(ctx); err != nil {
							b.Error(err)
							return
						}
					}
				})
			})
		}
	}
}
