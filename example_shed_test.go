package resilience_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"

	"github.com/resilience-go/resilience"
)

// A server sheds what it cannot serve at once with 503 and Retry-After,
// except its health check, which is never shed.
func ExampleShed() {
	b, _ := resilience.NewBulkhead(resilience.BulkheadConfig{Name: "api", Limit: 1})
	release, _ := b.Acquire(context.Background()) // one request is being served
	h := resilience.Shed(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "ok")
	}), resilience.ShedConfig{
		Bulkhead: b,
		Priority: func(r *http.Request) int {
			if r.URL.Path == "/healthz" {
				return resilience.PriorityHighest
			}
			return 0
		},
	})

	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest("GET", "/chat", nil))
	fmt.Println("/chat:", w.Code, "Retry-After:", w.Header().Get("Retry-After"))

	done := make(chan int)
	go func() {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest("GET", "/healthz", nil))
		done <- w.Code
	}()
	for b.Stats().Waiting == 0 {
		runtime.Gosched() // until the health check waits for the next slot
	}
	release()
	fmt.Println("/healthz:", <-done)
	// Output:
	// /chat: 503 Retry-After: 1
	// /healthz: 200
}
