// Command resilience operates the circuit breakers and bulkheads of a running
// service through its admin endpoint, the handler that
// [resilience.AdminHandler] serves:
//
//	resilience [-addr http://127.0.0.1:9090] [-json] [-timeout 5s] <command>
//
// The commands are breakers, bulkheads, reset NAME, open NAME, close NAME,
// keys SERVICE and reset-key SERVICE KEY. The address comes from -addr,
// else from the RESILIENCE_ADMIN_ADDR environment variable, else
// http://127.0.0.1:9090. Output is a table, or the endpoint's own JSON with
// -json.
//
// The breakers table has a row per breaker: its NAME, STATE, whether an
// operator FORCED it, SINCE when, and the counts since its last transition
// (REQUESTS, FAILURES, CONSECUTIVE_FAILURES); then its MODE (normal, or
// shadow for a breaker that never rejects), the calls of its window
// (WINDOW_CALLS), the FAILURE_RATIO among them, the SLOW_CALLS and their
// SLOW_RATIO, its OPEN_PERIOD, and while it is open by itself how long
// until it lets a probe through (PROBE_IN). A ratio reads now/threshold
// ("30%/50%": 30% now, opening at 50%), or just now without a ratio
// trigger; the open period reads now/longest ("16s/1m0s") when it doubles
// after failed probes. "-" means not applicable.
//
// The keys table has a row per key of a service (resilience.WithKey)
// whose breaker is not closed, sorted: the KEY, its STATE, SINCE when, its
// MODE, OPEN_PERIOD and PROBE_IN, as for breakers. A key that is not one
// word (it has a space, say) is printed as a Go string literal, its
// spaces as \x20, so that every cell stays one word. The table is one
// page, of at most -limit keys (the endpoint's default is 100); when more
// follow, a line on stderr gives the command for the next page, with
// -after. Keys are per process, as breakers are: a replica's open keys are
// its own.
//
// With the RESILIENCE_ADMIN_TOKEN environment variable set, every request
// carries it as "Authorization: Bearer <token>", for an endpoint that
// wants one (resilience.AdminConfig.Token, or the service's own
// RESILIENCE_ADMIN_TOKEN). The token is read from the environment only,
// never from a flag, so that it does not show in the process list or the
// shell's history.
//
// The exit status is 0 on success, 1 when the endpoint answered with an
// error (an unknown breaker, say), 2 when it could not be reached, and 64
// (EX_USAGE) when the command line is wrong.
//
// The admin endpoint changes how a service treats its dependencies, so
// services mount it on a loopback or internal listener only: run this
// command on the service's host, or through a tunnel to it.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/resilience-go/resilience"
)

// The exit statuses.
const (
	exitOK          = 0
	exitServer      = 1  // the endpoint answered with an error
	exitUnreachable = 2  // the endpoint could not be reached
	exitUsage       = 64 // EX_USAGE from sysexits.h
)

// defaultAddr is the admin endpoint's address when neither -addr nor
// RESILIENCE_ADMIN_ADDR gives one.
const defaultAddr = "http://127.0.0.1:9090"

// addrEnv is the environment variable read when -addr is not given.
const addrEnv = "RESILIENCE_ADMIN_ADDR"

// tokenEnv is the environment variable that holds the endpoint's token,
// if it has one.
const tokenEnv = "RESILIENCE_ADMIN_TOKEN"

const usage = `Usage: resilience [-addr URL] [-json] [-timeout DURATION] <command>

Look at and operate the circuit breakers and bulkheads of a running service
through its admin endpoint (resilience.AdminHandler).

Commands:
  breakers     list every circuit breaker: state, counts, mode, window
               ratios (now/threshold), open period, time until a probe
  bulkheads    list every bulkhead
  reset NAME   return breaker NAME to closed: counts zeroed, forced state cleared
  open NAME    force breaker NAME open, rejecting every call, until reset
  close NAME   force breaker NAME closed, letting every call through
               uncounted, until reset
  keys SERVICE [-after KEY] [-limit N]
               list the keys of SERVICE (resilience.WithKey) whose breakers
               are not closed, sorted, a page of at most N (1 to 1000,
               default 100) after KEY
  reset-key SERVICE KEY
               return the breaker of SERVICE's key KEY to closed; put --
               before a KEY that starts with a dash

Flags:
  -addr URL          the admin endpoint (default $RESILIENCE_ADMIN_ADDR,
                     else http://127.0.0.1:9090)
  -json              print the endpoint's JSON instead of a table
  -after KEY         keys: start after this key, the last of the page before
  -limit N           keys: at most N keys (1 to 1000)
  -timeout DURATION  give up on the endpoint after this long (default 5s)

Environment:
  RESILIENCE_ADMIN_ADDR   the admin endpoint, when -addr is not given
  RESILIENCE_ADMIN_TOKEN  the endpoint's token, sent as a bearer token

Exit status: 0 success, 1 the endpoint answered with an error (such as an
unknown breaker), 2 the endpoint could not be reached, 64 a usage error.
`

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

// run is the whole command: it parses args, reads the environment through
// env, writes results to stdout and messages to stderr, and returns the exit
// status.
func run(args []string, env func(string) string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("resilience", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported below, on one line
	addr := fs.String("addr", "", "")
	asJSON := fs.Bool("json", false, "")
	timeout := fs.Duration("timeout", 5*time.Second, "")
	after := fs.String("after", "", "")
	limit := fs.Int("limit", 0, "")

	// Flags may come before or after the command: `resilience breakers
	// -json` is as good as `resilience -json breakers`.
	var words []string
	for rest := args; ; {
		if err := fs.Parse(rest); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fmt.Fprint(stdout, usage)
				return exitOK
			}
			return usageError(stderr, err.Error())
		}
		rest = fs.Args()
		if len(rest) == 0 {
			break
		}
		words = append(words, rest[0])
		rest = rest[1:]
	}
	if *timeout <= 0 {
		return usageError(stderr, "-timeout must be positive, not "+timeout.String())
	}
	if len(words) == 0 {
		return usageError(stderr, "no command")
	}
	paged := map[string]bool{}
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "after" || f.Name == "limit" {
			paged[f.Name] = true
		}
	})
	if len(paged) > 0 && words[0] != "keys" {
		return usageError(stderr, "-after and -limit go with keys only")
	}
	if paged["limit"] && *limit < 1 {
		return usageError(stderr, "-limit must be at least 1, not "+strconv.Itoa(*limit))
	}

	var (
		method, path string
		print        func(w io.Writer, body []byte) error
	)
	cmd, operands := words[0], words[1:]
	switch cmd {
	case "breakers", "bulkheads":
		if len(operands) != 0 {
			return usageError(stderr, cmd+" takes no arguments")
		}
		method, path = http.MethodGet, "/"+cmd
		if cmd == "breakers" {
			print = printBreakers
		} else {
			print = printBulkheads
		}
	case "reset", "open", "close":
		if len(operands) != 1 || operands[0] == "" {
			return usageError(stderr, cmd+" takes one breaker name")
		}
		method, path = http.MethodPost, "/breakers/"+url.PathEscape(operands[0])+"/"+cmd
		print = printBreaker
	case "keys":
		if len(operands) != 1 || operands[0] == "" {
			return usageError(stderr, "keys takes one service name")
		}
		q := url.Values{}
		if *after != "" {
			q.Set("after", *after)
		}
		if paged["limit"] {
			q.Set("limit", strconv.Itoa(*limit))
		}
		method, path = http.MethodGet, "/breakers/"+url.PathEscape(operands[0])+"/keys"
		if len(q) > 0 {
			path += "?" + q.Encode()
		}
		next := "resilience keys " + shellQuote(operands[0])
		if paged["limit"] {
			next += " -limit " + strconv.Itoa(*limit)
		}
		print = func(w io.Writer, body []byte) error { return printKeys(w, stderr, next, body) }
	case "reset-key":
		if len(operands) != 2 || operands[0] == "" || operands[1] == "" {
			return usageError(stderr, "reset-key takes a service name and a key")
		}
		method = http.MethodPost
		path = "/breakers/" + url.PathEscape(operands[0]) + "/keys/reset?key=" + url.QueryEscape(operands[1])
		print = printKey
	default:
		return usageError(stderr, "unknown command "+strconv.Quote(cmd))
	}

	base := *addr
	if base == "" {
		base = env(addrEnv)
	}
	if base == "" {
		base = defaultAddr
	}
	base, err := normalize(base)
	if err != nil {
		return usageError(stderr, err.Error())
	}

	token := env(tokenEnv)
	if !validToken(token) {
		return usageError(stderr, tokenEnv+" must be printable ASCII without spaces or control characters (is there a trailing newline?)")
	}

	body, status, err := call(method, base+path, token, *timeout)
	if err != nil {
		fmt.Fprintf(stderr, "resilience: cannot reach the admin endpoint at %s: %v\n", base, err)
		return exitUnreachable
	}
	if status == http.StatusUnauthorized {
		msg := "the admin endpoint wants a token: set " + tokenEnv
		if token != "" {
			msg = "the admin endpoint refused the token in " + tokenEnv
		}
		fmt.Fprintf(stderr, "resilience: %s (HTTP %d from %s)\n", msg, status, base)
		return exitServer
	}
	if status != http.StatusOK {
		fmt.Fprintf(stderr, "resilience: %s (HTTP %d from %s)\n", serverError(body), status, base)
		return exitServer
	}
	if *asJSON {
		if _, err := stdout.Write(body); err != nil {
			fmt.Fprintf(stderr, "resilience: %v\n", err)
			return exitServer
		}
		return exitOK
	}
	if err := print(stdout, body); err != nil {
		fmt.Fprintf(stderr, "resilience: reading the answer of %s: %v\n", base, err)
		return exitServer
	}
	return exitOK
}

func usageError(stderr io.Writer, msg string) int {
	fmt.Fprintf(stderr, "resilience: %s\n\n%s", msg, usage)
	return exitUsage
}

// normalize checks the endpoint's address and returns it without a trailing
// slash. An address without a scheme ("127.0.0.1:9090") means http. A path
// is kept, for an endpoint mounted under a prefix with http.StripPrefix.
func normalize(addr string) (string, error) {
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	u, err := url.Parse(addr)
	if err != nil {
		return "", fmt.Errorf("bad admin address %q: %v", addr, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", fmt.Errorf("bad admin address %q: want http://host:port", addr)
	}
	return strings.TrimRight(u.String(), "/"), nil
}

// validToken reports whether token can be sent in a header as it is:
// visible ASCII, no spaces. The empty token, none, is valid.
func validToken(token string) bool {
	for i := 0; i < len(token); i++ {
		if token[i] <= ' ' || token[i] > '~' {
			return false
		}
	}
	return true
}

// call makes one request, with token as a bearer token unless it is empty,
// and returns the body and status of the answer. An error means no answer
// came: the endpoint could not be reached in time.
func call(method, target, token string, timeout time.Duration) (body []byte, status int, err error) {
	// A transport of its own, without keep-alives, so that nothing is left
	// running once the one request is done.
	tr := &http.Transport{Proxy: http.ProxyFromEnvironment, DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: timeout}
	req, err := http.NewRequest(method, target, nil)
	if err != nil {
		return nil, 0, err
	}
	req.Header.Set("Accept", "application/json")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err // the URL is in the message already
		}
		return nil, 0, err
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, 0, err
	}
	return body, resp.StatusCode, nil
}

// serverError returns the "error" text of an error answer, or as much of the
// body as makes sense when it is not the admin endpoint's JSON (a proxy's
// error page, say).
func serverError(body []byte) string {
	var e struct {
		Error string `json:"error"`
	}
	if json.Unmarshal(body, &e) == nil && e.Error != "" {
		return e.Error
	}
	s := strings.Join(strings.Fields(string(body)), " ")
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	if s == "" {
		s = "empty answer"
	}
	return "unexpected answer: " + s
}

func printBreakers(w io.Writer, body []byte) error {
	var bs []resilience.BreakerStatus
	if err := decode(body, &bs); err != nil {
		return err
	}
	return breakerTable(w, bs)
}

func printBreaker(w io.Writer, body []byte) error {
	var b resilience.BreakerStatus
	if err := decode(body, &b); err != nil {
		return err
	}
	return breakerTable(w, []resilience.BreakerStatus{b})
}

// breakerTable prints bs as a table. The columns an older endpoint does not
// report are "-"; every cell is one word, for awk and cut.
func breakerTable(w io.Writer, bs []resilience.BreakerStatus) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATE\tFORCED\tSINCE\tREQUESTS\tFAILURES\tCONSECUTIVE_FAILURES\t"+
		"MODE\tWINDOW_CALLS\tFAILURE_RATIO\tSLOW_CALLS\tSLOW_RATIO\tOPEN_PERIOD\tPROBE_IN")
	for _, b := range bs {
		th := b.Thresholds
		slowCalls, slowRatio := "-", "-"
		if th.SlowCallDuration != "" {
			slowCalls, slowRatio = strconv.FormatUint(uint64(b.Counts.WindowSlowCalls), 10), ratioCell(b.SlowCallRatio, th.SlowCallRatio)
		}
		openPeriod := orDash(b.OpenPeriod)
		if b.OpenPeriod != "" && th.MaxOpenTimeout != "" {
			openPeriod += "/" + th.MaxOpenTimeout
		}
		fmt.Fprintf(tw, "%s\t%s\t%t\t%s\t%d\t%d\t%d\t%s\t%d\t%s\t%s\t%s\t%s\t%s\n", b.Name, b.State, b.Forced,
			b.Since.UTC().Format(time.RFC3339), b.Counts.Requests, b.Counts.TotalFailures, b.Counts.ConsecutiveFailures,
			orDash(b.Mode), b.Counts.WindowCalls, ratioCell(b.FailureRatio, th.FailureRatio), slowCalls, slowRatio,
			openPeriod, orDash(b.RetryAfter))
	}
	return tw.Flush()
}

// ratioCell prints a ratio now beside the threshold that opens the breaker,
// as percentages: "30%/50%", or "30%" without a threshold.
func ratioCell(now, threshold float64) string {
	if threshold == 0 {
		return percent(now)
	}
	return percent(now) + "/" + percent(threshold)
}

// percent prints a ratio as a percentage to a tenth at most: "30%", "33.3%".
func percent(r float64) string {
	s := strconv.FormatFloat(r*100, 'f', 1, 64)
	return strings.TrimSuffix(s, ".0") + "%"
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func printBulkheads(w io.Writer, body []byte) error {
	var bs []resilience.BulkheadStatus
	if err := decode(body, &bs); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tLIMIT\tACTIVE\tWAITING\tREJECTED\tCOMPLETED")
	for _, b := range bs {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\n", b.Name, b.Limit, b.Active, b.Waiting, b.Rejected, b.Completed)
	}
	return tw.Flush()
}

func decode(body []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("not the admin endpoint's JSON: %v", err)
	}
	return nil
}

// keysPage is the answer of GET /breakers/{name}/keys.
type keysPage struct {
	Service  string                 `json:"service"`
	OpenKeys []resilience.KeyStatus `json:"open_keys"`
	Next     string                 `json:"next"`
}

// printKeys prints a page of open keys, and, when another page follows,
// the command that prints it to stderr, so that stdout stays the table:
// next is that command without its -after.
func printKeys(w, stderr io.Writer, next string, body []byte) error {
	var page keysPage
	if err := decode(body, &page); err != nil {
		return err
	}
	if err := keyTable(w, page.OpenKeys); err != nil {
		return err
	}
	if page.Next != "" {
		fmt.Fprintf(stderr, "resilience: more open keys follow: %s -after %s\n", next, shellQuote(page.Next))
	}
	return nil
}

func printKey(w io.Writer, body []byte) error {
	var k resilience.KeyStatus
	if err := decode(body, &k); err != nil {
		return err
	}
	return keyTable(w, []resilience.KeyStatus{k})
}

// keyTable prints keys as a table, with the columns of breakerTable that
// tell a key's breaker from another's.
func keyTable(w io.Writer, keys []resilience.KeyStatus) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tSTATE\tSINCE\tMODE\tOPEN_PERIOD\tPROBE_IN")
	for _, k := range keys {
		openPeriod := orDash(k.OpenPeriod)
		if k.OpenPeriod != "" && k.Thresholds.MaxOpenTimeout != "" {
			openPeriod += "/" + k.Thresholds.MaxOpenTimeout
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", keyCell(k.Key), k.State, k.Since.UTC().Format(time.RFC3339),
			orDash(k.Mode), openPeriod, orDash(k.RetryAfter))
	}
	return tw.Flush()
}

// keyCell prints a key as one word: as it is, or, when it has a space, a
// character that does not print, or a leading quote, or is empty, as a Go
// string literal (strconv.Unquote reads it back) with its spaces as \x20.
func keyCell(k string) string {
	if k == "" || strings.HasPrefix(k, `"`) || strings.ContainsFunc(k, func(r rune) bool { return unicode.IsSpace(r) || !unicode.IsPrint(r) }) {
		return strings.ReplaceAll(strconv.Quote(k), " ", `\x20`)
	}
	return k
}

// shellQuote quotes s for a POSIX shell, unless it needs none.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@+=,") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
