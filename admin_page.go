package resilience

import (
	"bytes"
	"crypto/rand"
	_ "embed"
	"encoding/base64"
	"html/template"
	"mime"
	"net/http"
	"strconv"
	"strings"
)

// The admin endpoint's status page: one HTML document with its style and
// script inline, embedded in the binary, served for GET / to a client that
// prefers text/html to JSON. It holds no data: its script fetches the JSON
// status every two seconds, with the token the page asked for, and posts
// the actions to the JSON routes, so that the page passes the same guards
// as the resilience command.

//go:embed admin_page.html
var adminPageSource string

var adminPage = template.Must(template.New("admin_page.html").Parse(adminPageSource))

// adminPageData is what the template fills in.
type adminPageData struct {
	// Nonce allows the page's one style and one script under its
	// Content-Security-Policy, which allows nothing else.
	Nonce string
	// TokenRequired is whether the endpoint has a token: the page then
	// asks for it before its first fetch, unless the tab has it already.
	TokenRequired bool
}

// servePage writes the status page. Its Content-Security-Policy lets it run
// only its own inline script and style (by a nonce drawn for this answer),
// fetch only from its own origin, load nothing, submit no form and be
// framed by no one (so that no other site can overlay its buttons).
func (a *admin) servePage(w http.ResponseWriter, req *http.Request) {
	var n [18]byte
	rand.Read(n[:]) // never fails (crypto/rand, Go 1.24+)
	nonce := base64.RawURLEncoding.EncodeToString(n[:])
	var buf bytes.Buffer
	if err := adminPage.Execute(&buf, adminPageData{Nonce: nonce, TokenRequired: a.token != nil}); err != nil {
		writeError(w, http.StatusInternalServerError, "status page: "+err.Error())
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Security-Policy", "default-src 'none'; script-src 'nonce-"+nonce+"'; style-src 'nonce-"+nonce+"'; "+
		"connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
	h.Set("X-Frame-Options", "DENY")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Content-Length", strconv.Itoa(buf.Len()))
	w.WriteHeader(http.StatusOK)
	if req.Method != http.MethodHead {
		w.Write(buf.Bytes())
	}
}

// wantsHTML reports whether req's Accept header prefers text/html to
// application/json, as a browser's navigation does ("text/html,...,
// */*;q=0.8"). No Accept, "*/*" (curl) and "application/json" (the
// resilience command, the page's own script) all mean JSON: on a tie, JSON
// wins. Each type's quality is that of the most specific range that
// matches it (RFC 9110, section 12.5.1).
func wantsHTML(req *http.Request) bool {
	html, json := acceptQuality(req, "text", "html"), acceptQuality(req, "application", "json")
	return html > json
}

// acceptQuality returns the quality req's Accept header gives the media
// type typ/sub: that of the most specific range that matches it, 0 if
// none does, and 1 (any type) without an Accept header.
func acceptQuality(req *http.Request, typ, sub string) float64 {
	values := req.Header.Values("Accept")
	if len(values) == 0 {
		return 1
	}
	q, specificity := 0.0, -1
	for _, v := range values {
		for r := range strings.SplitSeq(v, ",") {
			mt, params, err := mime.ParseMediaType(strings.TrimSpace(r))
			if err != nil {
				continue
			}
			rt, rs, _ := strings.Cut(mt, "/")
			s := -1
			switch {
			case rt == typ && rs == sub:
				s = 2
			case rt == typ && rs == "*":
				s = 1
			case rt == "*" && rs == "*":
				s = 0
			}
			if s <= specificity {
				continue
			}
			rq := 1.0
			if qs, ok := params["q"]; ok {
				if f, err := strconv.ParseFloat(qs, 64); err == nil && f >= 0 && f <= 1 {
					rq = f
				}
			}
			q, specificity = rq, s
		}
	}
	return q
}
