package resilience

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"strings"
)

// The admin endpoint's guards: the Host check against DNS rebinding, the
// cross-origin check against CSRF, the bearer token, and the log of every
// action. They run in that order, before any route: a request refused by
// one of them reads nothing and changes nothing.

// The environment variables AdminHandler reads.
const (
	adminTokenEnv = "RESILIENCE_ADMIN_TOKEN"
	adminHostsEnv = "RESILIENCE_ADMIN_HOSTS"
)

// AdminConfig configures [NewAdminHandler]. The zero value is valid: the
// [Default] registry, no token, slog.Default, and only the listener's own
// address and localhost as Host.
type AdminConfig struct {
	// Registry is the registry the endpoint reports and operates. Nil
	// means [Default].
	Registry *Registry

	// Token, if not empty, is a secret every request must carry as
	// "Authorization: Bearer <Token>"; one without it, or with another, is
	// answered 401 Unauthorized with WWW-Authenticate: Bearer. The
	// comparison takes the same time whatever the token sent: both are
	// hashed with SHA-256 and the digests compared with
	// crypto/subtle.ConstantTimeCompare, so that neither a common prefix
	// nor a length tells anything. It must be printable ASCII without
	// spaces (a trailing newline read from a file is an error, not
	// trimmed); make it long and random, such as the output of `openssl
	// rand -hex 32`. Empty means no token: then only the network keeps
	// people out, as before tokens existed.
	Token string

	// Logger receives a record at Warn for every action (a reset, a forced
	// state, chaos started or stopped) and every refused request, with the
	// action, the breaker or service, the remote address and the user
	// agent; never the token. Nil means slog.Default at the time of each
	// record.
	Logger *slog.Logger

	// Hosts are the host names, besides the listener's own address and
	// localhost, that a request's Host header may name: the names people
	// and the resilience command reach the endpoint by, such as
	// "admin.internal" or a Kubernetes service's name. Each is a name or an
	// IP address without a port, matched without regard to case, on any
	// port. A request for another Host is refused with 403, so that a
	// web page whose name was rebound to this listener's address (DNS
	// rebinding) can neither read nor operate it.
	Hosts []string
}

// NewAdminHandler returns the admin endpoint for cfg: the routes and JSON
// that [AdminHandler] documents, the status page for a browser at /, and
// these guards, applied to every request:
//
//   - The Host header must name the address the request was received on
//     (as http.LocalAddrContextKey holds it: 127.0.0.1, [::1], or the
//     interface's address, on any port), localhost, or one of cfg.Hosts;
//     else 403. A listener on a Unix socket takes any Host: no browser
//     reaches it.
//   - A browser's cross-origin request that changes state (any method but
//     GET, HEAD and OPTIONS) is refused with 403 by
//     [http.CrossOriginProtection]: it reads Sec-Fetch-Site, else compares
//     Origin with Host.
//   - With cfg.Token set, every request needs it as a bearer token, else
//     401. The status page itself (GET / asked for as text/html) is the
//     one exception: it holds no data, and asks for the token, which its
//     script keeps in the tab's sessionStorage and sends as a bearer token
//     itself. No cookie is ever set, so a browser never sends the token by
//     itself to a page that did not ask it.
//   - Every action is logged at Warn, with the action, the breaker or the
//     service, the remote address and the user agent; so is every refused
//     request, with the reason.
//
// An invalid cfg (a token with spaces or control characters, a host with
// a port) yields a handler that answers every request with 500 and the
// configuration error, logged once at Error, as [Shed] does. The handler is
// safe for concurrent use.
func NewAdminHandler(cfg AdminConfig) http.Handler {
	a, err := newAdmin(cfg)
	if err != nil {
		logger(cfg.Logger).Error("resilience: the admin endpoint is misconfigured; answering every request with 500", "error", err.Error())
		return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			writeError(w, http.StatusInternalServerError, err.Error())
		})
	}
	return a
}

// adminConfigFromEnv is the configuration AdminHandler builds for r from
// RESILIENCE_ADMIN_TOKEN and RESILIENCE_ADMIN_HOSTS, a comma-separated
// list of names.
func adminConfigFromEnv(r *Registry, getenv func(string) string) AdminConfig {
	cfg := AdminConfig{Registry: r, Token: getenv(adminTokenEnv)}
	for h := range strings.SplitSeq(getenv(adminHostsEnv), ",") {
		if h = strings.TrimSpace(h); h != "" {
			cfg.Hosts = append(cfg.Hosts, h)
		}
	}
	return cfg
}

func newAdmin(cfg AdminConfig) (*admin, error) {
	a := &admin{r: cfg.Registry, log: cfg.Logger, hosts: map[string]bool{}}
	if cfg.Token != "" {
		if !validToken(cfg.Token) {
			// The value is left out of the message: it is a secret.
			return nil, errors.New("resilience: invalid configuration: AdminConfig.Token: must be printable ASCII " +
				"without spaces or control characters (is there a trailing newline, read from a file?)")
		}
		sum := sha256.Sum256([]byte(cfg.Token))
		a.token = &sum
	}
	for _, h := range cfg.Hosts {
		name := strings.ToLower(strings.TrimSuffix(strings.TrimPrefix(h, "["), "]"))
		if name == "" || strings.ContainsAny(name, " \t\r\n/[]@") ||
			(strings.Contains(name, ":") && net.ParseIP(name) == nil) {
			return nil, invalid("AdminConfig.Hosts", h, "must be a host name or an IP address, without a port or a scheme, such as admin.internal")
		}
		a.hosts[name] = true
	}
	csrf := http.NewCrossOriginProtection()
	csrf.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		a.refuse(w, req, http.StatusForbidden, "cross-origin request refused: a browser page of another site cannot change this endpoint's state")
	}))
	a.routes = csrf.Handler(http.HandlerFunc(a.serve))
	return a, nil
}

// validToken reports whether t can be sent as a bearer token as it is:
// visible ASCII, no spaces.
func validToken(t string) bool {
	for i := 0; i < len(t); i++ {
		if t[i] <= ' ' || t[i] > '~' {
			return false
		}
	}
	return true
}

func logger(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.Default()
	}
	return l
}

// ServeHTTP runs the guards, then the routes.
func (a *admin) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if !a.hostAllowed(req) {
		a.refuse(w, req, http.StatusForbidden, "Host "+quote(req.Host)+" is not this listener's address, localhost "+
			"or a configured name: reach the endpoint by its address, or add the name to AdminConfig.Hosts "+
			"(RESILIENCE_ADMIN_HOSTS for AdminHandler)")
		return
	}
	a.routes.ServeHTTP(w, req)
}

// hostAllowed reports whether req's Host names this listener, so that a
// page whose name was rebound to this address, whose requests say its own
// name, is refused. The port is not compared: a tunnel or a port forward
// changes it, and a rebound name is refused whatever its port.
func (a *admin) hostAllowed(req *http.Request) bool {
	local, _ := req.Context().Value(http.LocalAddrContextKey).(net.Addr)
	if local != nil && local.Network() == "unix" {
		return true
	}
	host := req.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.ToLower(strings.TrimSuffix(strings.TrimPrefix(host, "["), "]"))
	if host == "" {
		return false
	}
	if host == "localhost" || a.hosts[host] {
		return true
	}
	ip := net.ParseIP(host)
	if ip == nil || local == nil {
		return false
	}
	if tcp, ok := local.(*net.TCPAddr); ok {
		return tcp.IP.Equal(ip)
	}
	if h, _, err := net.SplitHostPort(local.String()); err == nil {
		return net.ParseIP(h).Equal(ip)
	}
	return false
}

// authorized reports whether req carries the token, if one is set. See
// tokenMatches for the comparison.
func (a *admin) authorized(req *http.Request) bool {
	if a.token == nil {
		return true
	}
	return tokenMatches(a.token, bearer(req))
}

// tokenMatches reports whether sent is the token whose digest is want. It
// hashes sent, so that what is compared is always two SHA-256 digests,
// whatever the length of sent and however much of it is right; see
// digestsEqual.
func tokenMatches(want *[sha256.Size]byte, sent string) bool {
	got := sha256.Sum256([]byte(sent))
	return digestsEqual(&got, want)
}

// digestsEqual compares two digests in constant time: its operands are of
// one fixed length by their type, and ConstantTimeCompare reads every byte
// of both, so the time it takes tells nothing of where they differ. The
// digests are of the tokens, not the tokens, so that the length of the
// right one does not show either.
func digestsEqual(a, b *[sha256.Size]byte) bool {
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1
}

// bearer returns the token of req's "Authorization: Bearer" header, or ""
// for none. The scheme is matched without regard to case (RFC 9110,
// section 11.1).
func bearer(req *http.Request) string {
	scheme, token, ok := strings.Cut(req.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return ""
	}
	return strings.TrimSpace(token)
}

// unauthorized answers 401 with the challenge of RFC 6750.
func (a *admin) unauthorized(w http.ResponseWriter, req *http.Request) {
	challenge := `Bearer realm="resilience admin"`
	msg := "this endpoint wants a token: send Authorization: Bearer <token> (RESILIENCE_ADMIN_TOKEN for the resilience command)"
	if bearer(req) != "" {
		challenge += `, error="invalid_token"`
		msg = "wrong token"
	}
	w.Header().Set("WWW-Authenticate", challenge)
	a.refuse(w, req, http.StatusUnauthorized, msg)
}

// refuse answers a request a guard refused, and logs it at Warn.
func (a *admin) refuse(w http.ResponseWriter, req *http.Request, code int, msg string) {
	logger(a.log).LogAttrs(req.Context(), slog.LevelWarn, "resilience: admin request refused",
		slog.Int("status", code), slog.String("reason", msg), slog.String("method", req.Method),
		slog.String("path", req.URL.Path), slog.String("host", req.Host),
		slog.String("remote_addr", req.RemoteAddr), slog.String("user_agent", req.UserAgent()))
	writeError(w, code, msg)
}

// logAction logs an action at Warn: what it did (action), to what (kind is
// "breaker" or "service", name), for whom, and its outcome: the status
// answered, and the error if it failed.
func (a *admin) logAction(req *http.Request, action, kind, name string, code int, err error) {
	attrs := []slog.Attr{
		slog.String("action", action), slog.String(kind, name),
		slog.String("remote_addr", req.RemoteAddr), slog.String("user_agent", req.UserAgent()),
		slog.Int("status", code),
	}
	if err != nil {
		attrs = append(attrs, slog.String("error", err.Error()))
	}
	logger(a.log).LogAttrs(req.Context(), slog.LevelWarn, "resilience: admin action", attrs...)
}
