package resilience

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// FuzzRegistryBounds drives a small bounded registry (RESILIENCE_MAX_SERVICES
// and MAX_KEYS of 1 to 6) with random names, keys, outcomes and clock
// jumps, and checks after every operation, and from inside every protected
// call, that the bounds hold and that no evicted policy is in use:
//
//   - the registry holds no more sets, and each key table no more keys,
//     than its cap, or than it held when a Reload lowered the cap (a
//     lowered cap does not evict eagerly, so a table above it never grows);
//   - a key table's count is the number of its entries;
//   - no set or key the tables hold, and no pipeline the registry hands
//     out, is evicted; every live set's breaker and bulkhead is the one
//     the registry's maps hold, so that a Reload reaches it;
//   - a set got through a getter (pinned) is never evicted;
//   - a retired breaker is closed and not forced (an open one was never
//     evicted), and a retired bulkhead has no call inside or waiting,
//     checked from inside the protected calls too: a call never runs in
//     evicted policies;
//   - at rest, the slots taken in every bulkhead ever handed out, evicted
//     ones included, are the calls running plus the response bodies held
//     open, the callers waiting are the calls not yet inside, and the
//     calls counted inside the sets and keys are those not yet returned.
//
// Each input is one synctest bubble, so that the clock jumps are the fake
// clock's and the calls that block are goroutines of the bubble.
func FuzzRegistryBounds(f *testing.F) {
	for _, s := range boundsSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 4 {
			return
		}
		synctest.Test(t, func(t *testing.T) {
			runBounds(t, data)
		})
	})
}

// The names a FuzzRegistryBounds input calls: "a-b" and "A_B" share their
// EnvKey, so their set; "other" is the overflow set's name.
var boundsNames = [8]string{"a", "b", "c", "a-b", "A_B", "other", "d.e", "x"}

// The keys, "" (no key) twice as likely; "other" is the overflow key's.
var boundsKeys = [8]string{"", "", "k1", "k2", "k3", "K1", "other", "k4"}

// The operations of a FuzzRegistryBounds input, two bytes each: the
// operation, and its argument.
const (
	bopCall      = iota // the name's ForService Func, built once and kept; arg: bopArg
	bopCallKept         // the same, twice as likely
	bopFresh            // a ForService Func built for this call; arg: bopArg
	bopTransport        // a Transport request to the name as host; arg: bopArg (block: keep its body open)
	bopRelease          // arg&3: 0 the oldest blocked call, 1 the oldest held body, 2 the newest call, 3 all
	bopJump             // time.Sleep(boundsJump(arg))
	bopGet              // r.CircuitBreaker (arg&1 == 0) or r.Bulkhead of boundsNames[arg>>1&7]: pins the set
	bopReload           // MaxServices 1+arg%6, MaxKeys 1+arg/6%6
	numBops
)

// The outcomes of a call, arg>>6.
const (
	boutOK = iota
	boutFail
	boutBlock // until released, or its attempt's timeout
	// boutFlaky fails its first attempt with errBoundsFlaky, the one error
	// retried, and blocks in the second, which starts 3 idle periods
	// later: meanwhile the call holds no slot, and its set and key are
	// kept only by the count of calls inside. Through Transport, ok.
	boutFlaky
)

// errBoundsFlaky is the error a boutFlaky call's first attempt fails with.
var errBoundsFlaky = errors.New("flaky")

// bopArg is the argument of a call: a name, a key and an outcome.
func bopArg(name, key, out int) byte { return byte(name | key<<3 | out<<6) }

// boundsJump is the clock jump of arg, relative to the idle period.
func boundsJump(arg byte, idle time.Duration) time.Duration {
	return [8]time.Duration{
		time.Millisecond, time.Second, idle / 4, idle / 2, idle, idle + idle/4, 2 * idle, 10 * time.Minute,
	}[arg%8]
}

// boundsConfig decodes an input's first four bytes: the caps, the idle
// period, the breakers' FailMax and the bulkheads' limit.
func boundsConfig(h []byte) Config {
	cfg := DefaultConfig()
	cfg.MaxServices = 1 + int(h[0]%6)
	cfg.IdleEvict = time.Duration(1+int(h[1]%60)) * time.Second
	cfg.DefaultCircuitBreaker = CircuitBreakerConfig{
		FailMax: 1 + int(h[2]%2), OpenTimeout: 5 * time.Second, MaxKeys: 1 + int(h[2]/2%6),
	}
	cfg.CircuitBreakers = nil
	cfg.DefaultBulkhead = BulkheadConfig{Limit: 1 + int(h[3]%2), MaxWait: 20 * time.Second}
	cfg.Bulkheads = nil
	// One retry, of errBoundsFlaky only, after 3 idle periods.
	cfg.Retry = RetryConfig{
		MaxAttempts: 2, Strategy: RetryFixed, InitialDelay: 3 * cfg.IdleEvict, MaxDelay: 3 * cfg.IdleEvict,
		DisableJitter: true, RetryIf: func(err error) bool { return errors.Is(err, errBoundsFlaky) },
	}
	cfg.DefaultTimeout = 30 * time.Second
	cfg.Timeouts = nil
	return cfg
}

// boundsSeed builds an input from its header and its operations, each an
// operation and its argument.
func boundsSeed(ms, idleSecs, failMax, maxKeys, limit int, ops ...[2]byte) []byte {
	b := []byte{byte(ms - 1), byte(idleSecs - 1), byte(failMax - 1 + 2*(maxKeys-1)), byte(limit - 1)}
	for _, o := range ops {
		b = append(b, o[0], o[1])
	}
	return b
}

// The indexes of boundsNames and boundsKeys, for the seeds.
const (
	bnA, bnB, bnC, bnAB, bnAB2, bnOther, bnDE, bnX = 0, 1, 2, 3, 4, 5, 6, 7
	bkNone, bkK1, bkK2, bkK3, bkK1Upper, bkOther   = 0, 2, 3, 4, 5, 6
	bkK4                                           = 7
)

func boundsSeeds() [][]byte {
	call := func(n, k, out int) [2]byte { return [2]byte{bopCall, bopArg(n, k, out)} }
	fresh := func(n, k, out int) [2]byte { return [2]byte{bopFresh, bopArg(n, k, out)} }
	tr := func(n, k, out int) [2]byte { return [2]byte{bopTransport, bopArg(n, k, out)} }
	jump := func(i byte) [2]byte { return [2]byte{bopJump, i} }
	const jIdle4, jIdle2, jIdle, j2Idle, j10m = 2, 3, 4, 6, 7
	release := func(how byte) [2]byte { return [2]byte{bopRelease, how} }
	getCB := func(n int) [2]byte { return [2]byte{bopGet, byte(n << 1)} }
	getBH := func(n int) [2]byte { return [2]byte{bopGet, byte(n<<1 | 1)} }
	reload := func(ms, mk int) [2]byte { return [2]byte{bopReload, byte(ms - 1 + 6*(mk-1))} }
	return [][]byte{
		// The cap, the overflow set, and eviction of the least recently
		// used once idle.
		boundsSeed(2, 10, 1, 2, 1,
			call(bnA, bkNone, boutOK), call(bnB, bkNone, boutOK), call(bnC, bkNone, boutOK),
			jump(j10m), call(bnC, bkNone, boutOK), fresh(bnDE, bkNone, boutOK), call(bnA, bkNone, boutOK),
			jump(jIdle2), call(bnX, bkNone, boutOK), jump(j2Idle), call(bnB, bkNone, boutOK)),
		// A bulkhead with a call inside and an open breaker keep their
		// sets; the waiting caller keeps its set too.
		boundsSeed(2, 5, 1, 2, 1,
			call(bnA, bkNone, boutBlock), call(bnA, bkNone, boutBlock), call(bnB, bkNone, boutFail),
			jump(j10m), call(bnC, bkNone, boutOK), fresh(bnX, bkNone, boutOK),
			release(0), jump(jIdle4), release(3), jump(j2Idle), jump(j2Idle), call(bnC, bkNone, boutOK),
			call(bnB, bkNone, boutOK), jump(j10m), call(bnB, bkNone, boutOK), call(bnX, bkNone, boutOK)),
		// Keys: the cap, the overflow key, a busy key that keeps its set,
		// and eviction of idle keys.
		boundsSeed(3, 8, 1, 2, 2,
			call(bnA, bkK1, boutOK), call(bnA, bkK2, boutOK), call(bnA, bkK3, boutOK), call(bnA, bkOther, boutFail),
			call(bnA, bkK1, boutBlock), jump(j10m), call(bnA, bkK4, boutOK), call(bnB, bkK1Upper, boutOK),
			call(bnC, bkNone, boutOK), fresh(bnX, bkK2, boutOK), release(3), jump(j10m), jump(j10m),
			call(bnA, bkK3, boutOK), call(bnDE, bkK2, boutOK), call(bnA, bkK4, boutFail)),
		// A Reload lowers the caps below what the tables hold, then
		// raises them again.
		boundsSeed(6, 4, 2, 6, 1,
			call(bnA, bkK1, boutOK), call(bnA, bkK2, boutOK), call(bnA, bkK3, boutOK), call(bnB, bkNone, boutOK),
			call(bnC, bkNone, boutOK), call(bnDE, bkNone, boutOK), call(bnX, bkNone, boutOK),
			reload(2, 1), call(bnAB, bkNone, boutOK), jump(j10m), call(bnAB, bkK4, boutOK),
			call(bnA, bkK4, boutOK), reload(5, 3), jump(j10m), call(bnB, bkK2, boutOK), call(bnC, bkK1, boutOK)),
		// Transport: hosts with the same EnvKey, a body held open across
		// the idle period, failing statuses.
		boundsSeed(2, 6, 1, 3, 1,
			tr(bnAB, bkNone, boutOK), tr(bnAB2, bkK1, boutBlock), tr(bnC, bkNone, boutFail), jump(j10m),
			tr(bnX, bkK2, boutOK), call(bnDE, bkNone, boutOK), release(1), jump(j10m),
			tr(bnX, bkK2, boutOK), tr(bnAB, bkK1, boutFail), jump(j2Idle), call(bnA, bkK3, boutOK)),
		// Getters pin sets, also one a sweep had listed as idle.
		boundsSeed(2, 10, 1, 2, 1,
			call(bnA, bkNone, boutOK), jump(jIdle2), call(bnB, bkNone, boutOK), jump(j2Idle),
			getCB(bnA), call(bnC, bkNone, boutOK), jump(j10m), getBH(bnB), call(bnX, bkNone, boutOK),
			call(bnDE, bkNone, boutOK)),
		// A service named "other", beside the overflow set.
		boundsSeed(1, 3, 1, 1, 1,
			call(bnOther, bkNone, boutOK), call(bnA, bkNone, boutOK), call(bnA, bkK1, boutFail),
			jump(j10m), call(bnB, bkNone, boutOK), call(bnOther, bkK2, boutOK), reload(2, 2),
			tr(bnOther, bkNone, boutOK), jump(j10m), call(bnC, bkNone, boutOK), call(bnX, bkNone, boutOK)),
		// Blocked calls time out with the clock: their breakers open,
		// then close through half-open once the clock passes their open.
		boundsSeed(3, 20, 1, 2, 1,
			call(bnA, bkK1, boutBlock), call(bnB, bkNone, boutBlock), call(bnC, bkNone, boutBlock),
			jump(jIdle), jump(jIdle), call(bnX, bkNone, boutOK), jump(jIdle), call(bnA, bkK1, boutOK),
			call(bnB, bkNone, boutOK), jump(j10m), call(bnDE, bkK2, boutOK), call(bnX, bkNone, boutOK)),
		// A call between its attempts holds no slot and no open breaker:
		// only the count of calls inside keeps its set and its key.
		boundsSeed(1, 5, 2, 1, 1,
			call(bnA, bkNone, boutFlaky), fresh(bnB, bkK1, boutOK), jump(jIdle), jump(jIdle4),
			call(bnC, bkNone, boutOK), release(0), jump(j2Idle), call(bnC, bkNone, boutOK),
			jump(j2Idle), call(bnB, bkK2, boutOK), fresh(bnB, bkK1, boutFlaky), jump(jIdle), jump(jIdle4),
			call(bnB, bkK3, boutOK), call(bnX, bkNone, boutOK), jump(j2Idle), call(bnB, bkK2, boutFlaky), release(3)),
	}
}

// boundsWorld is one FuzzRegistryBounds input's registry and what the
// test knows of it.
type boundsWorld struct {
	t    *testing.T
	r    *Registry
	kept map[string]Func[int]

	mu sync.Mutex // guards what follows; taken before r.mu
	// Everything the tables ever held, evicted or not.
	sets     map[*svcSet]bool
	keys     map[*keyEntry]bool
	cbs      map[*CircuitBreaker]bool
	bhs      map[*Bulkhead]bool
	lastSets int               // len(r.sets) at the last check
	lastKeys map[*keyTable]int // t.n at the last check
	pinned   map[*svcSet]string
	// The calls: blocked goroutines' release channels, oldest first,
	// bodies held open, and counts.
	blocked     []chan struct{}
	bodies      []io.Closer
	inFn        int // calls running the protected function or the base
	inBackoff   int // flaky calls whose first attempt failed, until their second starts
	pending     int // goroutine calls not returned
	pendingKeys int // those with a key
	wg          sync.WaitGroup
	step        string
}

func runBounds(t *testing.T, data []byte) {
	cfg := boundsConfig(data[:4])
	r, err := NewRegistry(cfg)
	if err != nil {
		t.Fatalf("NewRegistry: %v", err)
	}
	defer r.Close()
	w := &boundsWorld{
		t: t, r: r, kept: map[string]Func[int]{},
		sets: map[*svcSet]bool{}, keys: map[*keyEntry]bool{},
		cbs: map[*CircuitBreaker]bool{}, bhs: map[*Bulkhead]bool{},
		lastKeys: map[*keyTable]int{}, pinned: map[*svcSet]string{},
	}
	defer func() {
		// Every blocked call ends before the bubble does.
		w.mu.Lock()
		bl, bodies := w.blocked, w.bodies
		w.blocked, w.bodies = nil, nil
		w.mu.Unlock()
		for _, c := range bl {
			close(c)
		}
		for _, b := range bodies {
			b.Close()
		}
		w.wg.Wait()
	}()
	ops := data[4:]
	for i := 0; i+1 < len(ops) && i < 128; i += 2 {
		op, arg := ops[i]%numBops, ops[i+1]
		w.do(op, arg)
		synctest.Wait()
		w.check(fmt.Sprintf("after op %d (%s)", i/2, w.step))
		if t.Failed() {
			t.Logf("config: MaxServices %d, IdleEvict %v, FailMax %d, MaxKeys %d, bulkhead limit %d; ops %v",
				cfg.MaxServices, cfg.IdleEvict, cfg.DefaultCircuitBreaker.FailMax, cfg.DefaultCircuitBreaker.MaxKeys,
				cfg.DefaultBulkhead.Limit, describeBops(ops[:i+2], cfg.IdleEvict))
			return
		}
	}
	// Release everything, and wait out the retries' delays: nothing is
	// left inside.
	w.do(bopRelease, 3)
	w.wg.Wait()
	synctest.Wait()
	w.check("after the release of every call")
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.pending != 0 || w.inFn != 0 {
		t.Errorf("%d calls pending, %d inside, after every release", w.pending, w.inFn)
	}
}

// describeBops spells out an input's operations, for a failure's log.
func describeBops(ops []byte, idle time.Duration) string {
	var b strings.Builder
	for i := 0; i+1 < len(ops); i += 2 {
		op, arg := ops[i]%numBops, ops[i+1]
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(describeBop(op, arg, idle))
	}
	return b.String()
}

func describeBop(op, arg byte, idle time.Duration) string {
	name, key, out := boundsNames[arg&7], boundsKeys[arg>>3&7], [4]string{"ok", "fail", "block", "flaky"}[arg>>6]
	switch op {
	case bopCall, bopCallKept:
		return fmt.Sprintf("call %q key %q %s", name, key, out)
	case bopFresh:
		return fmt.Sprintf("fresh call %q key %q %s", name, key, out)
	case bopTransport:
		return fmt.Sprintf("transport %q key %q %s", name, key, out)
	case bopRelease:
		return [4]string{"release oldest call", "close oldest body", "release newest call", "release all"}[arg&3]
	case bopJump:
		return fmt.Sprintf("sleep %v", boundsJump(arg, idle))
	case bopGet:
		return fmt.Sprintf("%s(%q)", [2]string{"CircuitBreaker", "Bulkhead"}[arg&1], boundsNames[arg>>1&7])
	case bopReload:
		return fmt.Sprintf("reload MaxServices %d MaxKeys %d", 1+arg%6, 1+arg/6%6)
	}
	return "?"
}

// do runs one operation.
func (w *boundsWorld) do(op, arg byte) {
	w.step = describeBop(op, arg, w.r.Config().IdleEvict)
	name, key, out := boundsNames[arg&7], boundsKeys[arg>>3&7], int(arg>>6)
	switch op {
	case bopCall, bopCallKept:
		w.call(w.keptFunc(name, out), key, out)
	case bopFresh:
		w.call(ForService(w.r, name, w.fn(out)), key, out)
	case bopTransport:
		w.transport(name, key, out)
	case bopRelease:
		w.release(arg & 3)
	case bopJump:
		time.Sleep(boundsJump(arg, w.r.Config().IdleEvict))
	case bopGet:
		n := boundsNames[arg>>1&7]
		var cb *CircuitBreaker
		var bh *Bulkhead
		if arg&1 == 0 {
			cb = w.r.CircuitBreaker(n)
		} else {
			bh = w.r.Bulkhead(n)
		}
		w.mu.Lock()
		w.r.mu.Lock()
		if s := w.r.sets[EnvKey(n)]; s != nil && (cb != nil && s.cb == cb || bh != nil && s.bh == bh) {
			w.pinned[s] = n
		} else if o := w.r.other; o == nil || cb != nil && o.cb != cb || bh != nil && o.bh != bh {
			w.t.Errorf("%s: the getter returned neither the set's policy nor the overflow set's", w.step)
		}
		w.r.mu.Unlock()
		w.mu.Unlock()
	case bopReload:
		cfg := w.r.Config()
		cfg.MaxServices = 1 + int(arg%6)
		cfg.DefaultCircuitBreaker.MaxKeys = 1 + int(arg/6%6)
		if err := w.r.Reload(cfg); err != nil {
			w.t.Fatalf("Reload: %v", err)
		}
	}
}

// keptFunc returns the name's kept ForService Func for an outcome.
func (w *boundsWorld) keptFunc(name string, out int) Func[int] {
	k := fmt.Sprintf("%s/%d", name, out)
	f := w.kept[k]
	if f == nil {
		f = ForService(w.r, name, w.fn(out))
		w.kept[k] = f
	}
	return f
}

// fn is a protected function with an outcome: it checks, once inside its
// bulkhead, that no evicted policy is in use, and again as it ends.
func (w *boundsWorld) fn(out int) Func[int] {
	return func(ctx context.Context) (int, error) {
		c, _ := ctx.Value(boundsCallKey{}).(*boundsCall)
		w.enterFn("inside a call", c)
		defer w.leaveFn("at a call's end")
		switch out {
		case boutFail:
			return 0, errBoom
		case boutFlaky:
			if c.attempts == 1 {
				w.mu.Lock()
				c.backoff = true
				w.inBackoff++
				w.mu.Unlock()
				return 0, errBoundsFlaky
			}
			fallthrough
		case boutBlock:
			select {
			case <-c.rel:
				return 1, nil
			case <-ctx.Done():
				return 0, ctx.Err()
			}
		}
		return 1, nil
	}
}

// boundsCall is a call that runs on a goroutine of its own: released by
// closing rel.
type boundsCall struct {
	rel      chan struct{}
	attempts int  // w.mu
	backoff  bool // between its attempts; w.mu
}

type boundsCallKey struct{}

func (w *boundsWorld) enterFn(where string, c *boundsCall) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.inFn++
	if c != nil {
		c.attempts++
		if c.backoff {
			c.backoff = false
			w.inBackoff--
		}
	}
	w.checkAlwaysLocked(where)
}

func (w *boundsWorld) leaveFn(where string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.inFn--
	w.checkAlwaysLocked(where)
}

// call runs f with key, on a goroutine of its own if it blocks or
// retries.
func (w *boundsWorld) call(f Func[int], key string, out int) {
	ctx := context.Background()
	if key != "" {
		ctx = WithKey(ctx, key)
	}
	if out != boutBlock && out != boutFlaky {
		f(ctx)
		return
	}
	c := &boundsCall{rel: make(chan struct{})}
	ctx = context.WithValue(ctx, boundsCallKey{}, c)
	w.mu.Lock()
	w.blocked = append(w.blocked, c.rel)
	w.pending++
	if key != "" {
		w.pendingKeys++
	}
	w.mu.Unlock()
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		f(ctx)
		w.mu.Lock()
		if c.backoff {
			// Its second attempt never started: the bulkhead or the
			// breaker refused it.
			c.backoff = false
			w.inBackoff--
		}
		w.pending--
		if key != "" {
			w.pendingKeys--
		}
		w.mu.Unlock()
	}()
}

// transport sends a request to name as its host through a Transport whose
// base answers at once: 200, or 500 for a failing outcome. A blocking
// outcome keeps the response's body, and its slot, open.
func (w *boundsWorld) transport(name, key string, out int) {
	tr := &Transport{
		Registry: w.r,
		Base: roundTripFunc(func(req *http.Request) (*http.Response, error) {
			w.enterFn("inside a Transport attempt", nil)
			defer w.leaveFn("at a Transport attempt's end")
			code := http.StatusOK
			if out == boutFail {
				code = http.StatusInternalServerError
			}
			return &http.Response{StatusCode: code, Body: io.NopCloser(strings.NewReader("body")), Request: req}, nil
		}),
		Key: func(*http.Request) string { return key },
	}
	req, err := http.NewRequest(http.MethodGet, "http://"+name+"/", nil)
	if err != nil {
		w.t.Fatal(err)
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return
	}
	if out == boutBlock {
		w.mu.Lock()
		w.bodies = append(w.bodies, resp.Body)
		w.mu.Unlock()
		return
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
}

// release ends blocked calls or closes held bodies.
func (w *boundsWorld) release(how byte) {
	w.mu.Lock()
	var rels []chan struct{}
	var bodies []io.Closer
	switch how {
	case 0:
		if len(w.blocked) > 0 {
			rels, w.blocked = w.blocked[:1], w.blocked[1:]
		}
	case 1:
		if len(w.bodies) > 0 {
			bodies, w.bodies = w.bodies[:1], w.bodies[1:]
		}
	case 2:
		if n := len(w.blocked); n > 0 {
			rels, w.blocked = w.blocked[n-1:], w.blocked[:n-1]
		}
	case 3:
		rels, bodies, w.blocked, w.bodies = w.blocked, w.bodies, nil, nil
	}
	w.mu.Unlock()
	for _, c := range rels {
		close(c)
	}
	for _, b := range bodies {
		b.Close()
	}
}
