package resilience_test

import (
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"

	"github.com/resilience-go/resilience"
)

// An admin endpoint with a token, on a loopback listener: a request
// without the token is refused, one with it is served, and a request for
// another Host, as a page whose name was rebound to this address would
// send, is refused too.
func ExampleNewAdminHandler() {
	reg, _ := resilience.NewRegistry(resilience.DefaultConfig())
	reg.CircuitBreaker("payments")
	srv := httptest.NewServer(resilience.NewAdminHandler(resilience.AdminConfig{
		Registry: reg,
		Token:    "3f1c9e0b7a4d4c2e9b8f6a5d4c3b2a19", // in production: os.Getenv, a secret store
		Logger:   slog.New(slog.DiscardHandler),      // in production: the service's logger
		Hosts:    []string{"admin.internal"},
	}))
	defer srv.Close()

	get := func(host, token string) int {
		req, _ := http.NewRequest("GET", srv.URL+"/breakers/payments", nil)
		if host != "" {
			req.Host = host
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := srv.Client().Do(req)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	fmt.Println("no token:", get("", ""))
	fmt.Println("the token:", get("", "3f1c9e0b7a4d4c2e9b8f6a5d4c3b2a19"))
	fmt.Println("a configured name:", get("admin.internal:9090", "3f1c9e0b7a4d4c2e9b8f6a5d4c3b2a19"))
	fmt.Println("a rebound name:", get("evil.example.com", "3f1c9e0b7a4d4c2e9b8f6a5d4c3b2a19"))
	// Output:
	// no token: 401
	// the token: 200
	// a configured name: 200
	// a rebound name: 403
}
