package resilience

import (
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
)

// What a browser asks for when it navigates to a page.
const browserAccept = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"

func TestAdminPageServed(t *testing.T) {
	_, srv, _ := securedAdmin(t, AdminConfig{})
	for _, tc := range []struct {
		accept string
		html   bool
	}{
		{browserAccept, true},
		{"text/html", true},
		{"text/*", true},
		{"application/json;q=0.5, text/html", true},
		{"", false},
		{"*/*", false}, // curl
		{"application/json", false},
		{"text/html;q=0.5, application/json", false},
		{"text/html, application/json", false}, // a tie: JSON
		{"text/html;q=0", false},
		{"image/png", false}, // neither: JSON, which is what there is
	} {
		h := map[string]string{}
		if tc.accept != "" {
			h["Accept"] = tc.accept
		}
		code, hdr, body := request{method: "GET", path: "/", headers: h}.do(t, srv)
		ct := hdr.Get("Content-Type")
		if code != 200 || (ct == "text/html; charset=utf-8") != tc.html || hdr.Get("Vary") != "Accept" {
			t.Errorf("GET / with Accept %q = %d %s, Vary %q; want HTML %v, Vary Accept", tc.accept, code, ct, hdr.Get("Vary"), tc.html)
		}
		if !tc.html && !strings.Contains(body, `"breakers"`) {
			t.Errorf("GET / with Accept %q: body %q; want the JSON status", tc.accept, body)
		}
		if tc.html && !strings.Contains(body, "<!DOCTYPE html>") {
			t.Errorf("GET / with Accept %q: body is not the page", tc.accept)
		}
	}
	// The other routes are JSON whatever the Accept.
	h := map[string]string{"Accept": browserAccept}
	if code, hdr, _ := (request{method: "GET", path: "/breakers", headers: h}).do(t, srv); code != 200 || hdr.Get("Content-Type") != "application/json" {
		t.Errorf("GET /breakers from a browser = %d %s; want JSON", code, hdr.Get("Content-Type"))
	}
	// HEAD: the headers, no body.
	if code, hdr, body := (request{method: "HEAD", path: "/", headers: h}).do(t, srv); code != 200 || hdr.Get("Content-Type") != "text/html; charset=utf-8" || body != "" {
		t.Errorf("HEAD / from a browser = %d %s %q; want the page's headers only", code, hdr.Get("Content-Type"), body)
	}
	// POST / is not the page.
	if code, _, _ := (request{method: "POST", path: "/", headers: h}).do(t, srv); code != 405 {
		t.Errorf("POST / from a browser = %d; want 405", code)
	}
}

// With a token, a browser without it gets the page, which holds no data
// and asks for the token, rather than a JSON 401; the data needs the
// token.
func TestAdminPageWithToken(t *testing.T) {
	_, srv, _ := securedAdmin(t, AdminConfig{Token: testToken})
	code, hdr, body := request{method: "GET", path: "/", headers: map[string]string{"Accept": browserAccept}}.do(t, srv)
	if code != 200 || hdr.Get("Content-Type") != "text/html; charset=utf-8" {
		t.Fatalf("GET / from a browser without the token = %d %s; want the page", code, hdr.Get("Content-Type"))
	}
	if !regexp.MustCompile(`const tokenRequired = +true *;`).MatchString(body) || !strings.Contains(body, `id="login-form"`) {
		t.Error("the page does not know it must ask for the token")
	}
	if strings.Contains(body, "llm") {
		t.Error("the page served without the token holds a breaker's name")
	}
	_, _, open := request{method: "GET", path: "/", headers: map[string]string{"Accept": browserAccept}}.do(t, httptestAdmin(t))
	if !regexp.MustCompile(`const tokenRequired = +false *;`).MatchString(open) {
		t.Error("the page of an endpoint without a token asks for one")
	}
}

func httptestAdmin(t *testing.T) *httptest.Server {
	_, srv, _ := securedAdmin(t, AdminConfig{})
	return srv
}

// The page is self-contained: nothing loaded from elsewhere, and a
// Content-Security-Policy that would block it if it were, with a nonce of
// its own for its one style and one script.
func TestAdminPageSelfContained(t *testing.T) {
	_, srv, _ := securedAdmin(t, AdminConfig{})
	_, hdr, body := request{method: "GET", path: "/", headers: map[string]string{"Accept": browserAccept}}.do(t, srv)
	for _, bad := range []string{"http://", "https://", "src=", "@import", "url(", `rel="stylesheet"`, "<iframe", "<img"} {
		if strings.Contains(body, bad) {
			t.Errorf("the page contains %q: it must load nothing from elsewhere", bad)
		}
	}
	if m := regexp.MustCompile(`href="([^"]*)"`).FindAllStringSubmatch(body, -1); len(m) != 1 || m[0][1] != "data:," {
		t.Errorf("the page's links %q; want only the empty icon, data:,", m)
	}
	csp := hdr.Get("Content-Security-Policy")
	m := regexp.MustCompile(`script-src 'nonce-([A-Za-z0-9_-]{20,})'`).FindStringSubmatch(csp)
	if m == nil || !strings.Contains(csp, "default-src 'none'") || !strings.Contains(csp, "frame-ancestors 'none'") ||
		!strings.Contains(csp, "connect-src 'self'") {
		t.Fatalf("Content-Security-Policy %q; want default-src 'none', a script nonce, connect-src 'self', frame-ancestors 'none'", csp)
	}
	if n := strings.Count(body, `nonce="`+m[1]+`"`); n != 2 || strings.Count(body, "<script") != 1 || strings.Count(body, "<style") != 1 {
		t.Errorf("the nonce is on %d elements of %d scripts and %d styles; want one of each, both with it",
			n, strings.Count(body, "<script"), strings.Count(body, "<style"))
	}
	if hdr.Get("X-Frame-Options") != "DENY" || hdr.Get("Cache-Control") != "no-store" {
		t.Errorf("X-Frame-Options %q, Cache-Control %q; want DENY, no-store", hdr.Get("X-Frame-Options"), hdr.Get("Cache-Control"))
	}
	// A new nonce for each answer.
	_, hdr2, _ := request{method: "GET", path: "/", headers: map[string]string{"Accept": browserAccept}}.do(t, srv)
	if hdr2.Get("Content-Security-Policy") == csp {
		t.Error("two answers share a nonce")
	}
}

func TestAcceptQuality(t *testing.T) {
	for _, tc := range []struct {
		accept   []string
		typ, sub string
		want     float64
	}{
		{nil, "text", "html", 1},
		{[]string{"text/html"}, "application", "json", 0},
		{[]string{"*/*;q=0.8", "text/html;q=0.2"}, "text", "html", 0.2}, // the most specific wins, in any order
		{[]string{"text/*;q=0.3, */*;q=0.9"}, "text", "html", 0.3},
		{[]string{"text/html;q=bad, */*;q=0.1"}, "text", "html", 1}, // a bad q is 1
		{[]string{"garbage;;, */*;q=0.1"}, "text", "html", 0.1},
	} {
		req, _ := http.NewRequest("GET", "/", nil)
		for _, v := range tc.accept {
			req.Header.Add("Accept", v)
		}
		if got := acceptQuality(req, tc.typ, tc.sub); got != tc.want {
			t.Errorf("acceptQuality(Accept %q, %s/%s) = %v; want %v", tc.accept, tc.typ, tc.sub, got, tc.want)
		}
	}
}
