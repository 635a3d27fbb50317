package redisstore

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/resilience-go/resilience"
	"go.uber.org/goleak"
)

// The tests run against a real redis-server that TestMain starts on a free
// loopback port, and that the chaos test stops and starts again on the same
// port. Without the binary every test is skipped, saying why.

var srv *server

func TestMain(m *testing.M) {
	// Breakers and stores log to slog.Default; tests that look at the
	// records install their own logger. go-redis logs its reconnections.
	slog.SetDefault(slog.New(slog.DiscardHandler))
	redis.SetLogger(quietLogger{})
	goleak.VerifyTestMain(withServer{m})
}

type quietLogger struct{}

func (quietLogger) Printf(context.Context, string, ...any) {}

// withServer runs the tests between starting and stopping redis-server, so
// that goleak looks for leaks once everything is stopped.
type withServer struct{ m *testing.M }

func (w withServer) Run() int {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		fmt.Fprintln(os.Stderr, "redisstore: redis-server not found; every test is skipped (apt-get install -y redis-server)")
		return w.m.Run()
	}
	dir, err := os.MkdirTemp("", "redisstore-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	srv = &server{bin: bin, dir: dir, port: freePort()}
	if err := srv.start(); err != nil {
		fmt.Fprintln(os.Stderr, "redisstore: cannot start redis-server:", err)
		return 1
	}
	code := w.m.Run()
	srv.stop()
	return code
}

// server is a redis-server process of the tests' own.
type server struct {
	bin, dir string
	port     int

	mu  sync.Mutex
	cmd *exec.Cmd
	log *os.File
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func (s *server) addr() string { return "127.0.0.1:" + strconv.Itoa(s.port) }

// start starts redis-server and waits until it answers PING.
func (s *server) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	logf, err := os.OpenFile(filepath.Join(s.dir, "redis.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(s.bin, "--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", s.dir)
	// Files, not pipes: exec then starts no goroutine that goleak would see.
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return err
	}
	s.cmd, s.log = cmd, logf
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if ping(s.addr()) == nil {
			return nil
		}
		time.Sleep(10 * time.Millisecond) // polling a condition
	}
	return fmt.Errorf("redis-server on %s did not answer PING within 10s", s.addr())
}

// stop kills redis-server, as a crash would, and waits for it to exit.
func (s *server) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGCONT) // in case it was paused
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.log.Close()
	s.cmd, s.log = nil, nil
}

// pause freezes redis-server: connections stay open and nothing answers,
// as with a Redis that is overloaded or swapping.
func (s *server) pause() { s.signal(syscall.SIGSTOP) }

func (s *server) resume() { s.signal(syscall.SIGCONT) }

func (s *server) signal(sig syscall.Signal) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		_ = s.cmd.Process.Signal(sig)
	}
}

// ping speaks RESP by hand, so that the readiness check starts no client.
func ping(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}

// needRedis skips the test if there is no redis-server.
func needRedis(tb testing.TB) {
	tb.Helper()
	if srv == nil {
		tb.Skip("redis-server not installed: apt-get install -y redis-server")
	}
}

var prefixSeq atomic.Int64

// prefix returns a key prefix of the test's own, so tests never see each
// other's keys.
func prefix(tb testing.TB) string {
	return fmt.Sprintf("test%d:%s:", prefixSeq.Add(1), strings.ReplaceAll(tb.Name(), "/", "."))
}

// newClient returns a client of the test's own, closed when the test ends.
func newClient(tb testing.TB, contextTimeouts bool) *redis.Client {
	tb.Helper()
	needRedis(tb)
	c := redis.NewClient(&redis.Options{Addr: srv.addr(), ContextTimeoutEnabled: contextTimeouts})
	tb.Cleanup(func() { c.Close() })
	return c
}

// newStore returns a store with a client of its own; both are closed when
// the test ends (the store first, as Cleanup runs last-in first-out).
// Unless opts says otherwise, OpTimeout is a generous 1s: the tests that
// check coordination must not see a round trip slowed by a busy machine
// taken for an outage (the chaos test sets its own).
func newStore(tb testing.TB, opts Options) *Store {
	tb.Helper()
	if opts.OpTimeout == 0 {
		opts.OpTimeout = time.Second
	}
	s := New(newClient(tb, true), opts)
	tb.Cleanup(func() { s.Close() })
	return s
}

// newRegistry returns a registry built from env, sharing through s.
func newRegistry(tb testing.TB, env map[string]string, s *Store) *resilience.Registry {
	tb.Helper()
	cfg, err := resilience.LoadConfigWith(resilience.LoadOptions{Environment: env})
	if err != nil {
		tb.Fatal(err)
	}
	r, err := resilience.NewRegistry(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	if s != nil {
		r.UseStore(s)
	}
	tb.Cleanup(func() { r.Close() })
	return r
}

// waitFor polls cond until it holds or timeout passes, and returns how long
// it took.
func waitFor(tb testing.TB, timeout time.Duration, what string, cond func() bool) time.Duration {
	tb.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			tb.Fatalf("%s: not within %v", what, timeout)
		}
		time.Sleep(time.Millisecond) // polling a condition
	}
	return time.Since(start)
}

// counter is a slog handler that counts records by message.
type counter struct {
	mu sync.Mutex
	n  map[string]int
}

func (c *counter) Enabled(context.Context, slog.Level) bool { return true }
func (c *counter) Handle(_ context.Context, r slog.Record) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n == nil {
		c.n = map[string]int{}
	}
	c.n[r.Message]++
	return nil
}
func (c *counter) WithAttrs([]slog.Attr) slog.Handler { return c }
func (c *counter) WithGroup(string) slog.Handler      { return c }

func (c *counter) count(substr string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for msg, k := range c.n {
		if strings.Contains(msg, substr) {
			n += k
		}
	}
	return n
}

// downstream is the service every replica calls: it fails while outage is
// set, takes delay per call, and counts the calls each replica sends it and
// the most calls inside at once.
type downstream struct {
	outage    atomic.Bool
	delay     time.Duration
	calls     [3]atomic.Int64
	inside    atomic.Int64
	maxInside atomic.Int64
}

var errDown = fmt.Errorf("downstream unavailable")

func (d *downstream) fn(replica int) resilience.Func[string] {
	return func(ctx context.Context) (string, error) {
		d.calls[replica].Add(1)
		n := d.inside.Add(1)
		defer d.inside.Add(-1)
		for {
			m := d.maxInside.Load()
			if n <= m || d.maxInside.CompareAndSwap(m, n) {
				break
			}
		}
		if d.delay > 0 {
			time.Sleep(d.delay)
		}
		if d.outage.Load() {
			return "", errDown
		}
		return "ok", nil
	}
}

func (d *downstream) total() int64 {
	return d.calls[0].Load() + d.calls[1].Load() + d.calls[2].Load()
}
