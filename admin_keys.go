package resilience

import (
	"errors"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
)

// The admin endpoint's routes for keyed breakers (WithKey): a page of the
// keys of a service whose breakers are not closed, and a reset of one
// key's breaker. A key can hold any character, a slash or a space too, so
// it travels in the query string, never in the path.

// The page size of GET /breakers/{name}/keys: the default, and the most a
// request can ask for, so that one answer stays small however many keys a
// service has (CIRCUIT_BREAKER_<SERVICE>_MAX_KEYS can be raised well past
// it).
const (
	defaultKeysLimit = 100
	maxKeysLimit     = 1000
)

// keysPage is the answer of GET /breakers/{name}/keys. Next is the last
// key of the page, to send as after for the next page, or empty when no
// open key follows.
type keysPage struct {
	Service  string      `json:"service"`
	OpenKeys []KeyStatus `json:"open_keys"`
	Next     string      `json:"next"`
}

// serveKeys serves GET /breakers/{name}/keys and POST
// /breakers/{name}/keys/reset; rest is the path after keys. The reset is
// logged, as "reset_key" with the key, whether it succeeded or not.
func (a *admin) serveKeys(w http.ResponseWriter, req *http.Request, r *Registry, name string, rest []string) {
	if len(rest) > 1 || (len(rest) == 1 && rest[0] != "reset") {
		writeError(w, http.StatusNotFound, "no such path "+quote(req.URL.Path)+": use /breakers/{name}/keys or /breakers/{name}/keys/reset?key=K")
		return
	}
	cb := r.lookupBreaker(name)
	if cb == nil {
		writeError(w, http.StatusNotFound, "no circuit breaker named "+quote(name))
		return
	}
	// The breaker's own name, not the path's: the overflow set's keys are
	// found under "other" only, however the path spells it.
	service := cb.Name()
	if len(rest) == 0 {
		if allow(w, req, http.MethodGet) {
			a.listKeys(w, req, r, service)
		}
		return
	}
	if allow(w, req, http.MethodPost) {
		a.resetKey(w, req, r, service)
	}
}

// listKeys answers a page of service's open keys, asking OpenKeys for one
// key more than the page holds to learn whether another page follows.
func (a *admin) listKeys(w http.ResponseWriter, req *http.Request, r *Registry, service string) {
	q, err := url.ParseQuery(req.URL.RawQuery)
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad query string: "+err.Error())
		return
	}
	limit := defaultKeysLimit
	if q.Has("limit") {
		s := q.Get("limit")
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > maxKeysLimit {
			writeError(w, http.StatusBadRequest, "bad limit "+quote(s)+": want an integer from 1 to "+strconv.Itoa(maxKeysLimit))
			return
		}
		limit = n
	}
	keys := r.OpenKeys(service, q.Get("after"), limit+1)
	page := keysPage{Service: service, OpenKeys: keys}
	if len(keys) > limit {
		page.OpenKeys = keys[:limit]
		page.Next = keys[limit-1].Key
	}
	writeJSON(w, http.StatusOK, page)
}

// resetKey resets the breaker of the key the query names, and answers its
// status. A key with no breaker (never used, or evicted once idle) is a
// 404: ResetKey builds none.
func (a *admin) resetKey(w http.ResponseWriter, req *http.Request, r *Registry, service string) {
	q, err := url.ParseQuery(req.URL.RawQuery)
	key := q.Get("key")
	switch {
	case err != nil:
		err = errors.New("bad query string: " + err.Error())
	case key == "":
		err = errors.New("no key: use /breakers/{name}/keys/reset?key=K, the key URL-encoded " +
			"(the service's own breaker is reset with /breakers/{name}/reset)")
	case len(q["key"]) > 1:
		err = errors.New("more than one key: reset one key at a time")
	}
	if err != nil {
		a.logKeyAction(req, service, key, http.StatusBadRequest, err)
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	// The breaker is looked up first, for the answer; ResetKey resets it.
	// Should the key be evicted and built anew in between, the new one is
	// reset and the old one reported: closed either way.
	cb := r.keyBreaker(service, key)
	if cb == nil || !r.ResetKey(service, key) {
		err := errors.New("no breaker for key " + quote(key) + " of " + quote(service) +
			": no call used it, or it was evicted once idle and closed")
		a.logKeyAction(req, service, key, http.StatusNotFound, err)
		writeError(w, http.StatusNotFound, err.Error())
		return
	}
	a.logKeyAction(req, service, key, http.StatusOK, nil)
	writeJSON(w, http.StatusOK, KeyStatus{Key: key, BreakerStatus: breakerStatus(cb)})
}

// logKeyAction logs a key's reset as logAction logs the other actions,
// with the key as well.
func (a *admin) logKeyAction(req *http.Request, service, key string, code int, err error) {
	withKey := &admin{log: logger(a.log).With(slog.String("key", key))}
	withKey.logAction(req, "reset_key", "breaker", service, code, err)
}

// keyBreaker returns the breaker of service's key as ResetKey finds it,
// the overflow key's for "other" when no key of that name has one, or nil.
func (r *Registry) keyBreaker(service, key string) *CircuitBreaker {
	t := r.keyTable(service)
	if t == nil {
		return nil
	}
	if v, ok := t.m.Load(key); ok {
		return v.(*keyEntry).cb
	}
	if o := t.other.Load(); o != nil && key == overflowName {
		return o.cb
	}
	return nil
}
