package redisstore

import (
	"context"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/resilience-go/resilience"
)

// The shared state of a breaker is a hash at <prefix>cb:{KEY}, KEY being
// the EnvKey of its name, so that "payments-eu" and "PAYMENTS_EU" are one
// breaker here as they are in a Registry:
//
//	state   "open" or "closed"; half-open is not shared, since each
//	        replica gets there on its own clock
//	until   when the open ends, unix ms: its start plus the breaker's
//	        OpenPeriod, which a failed probe doubles and a retry hint
//	        lengthens (0: not known, from an older replica)
//	at      when the transition happened, unix ms, by Redis's clock
//	origin  the replica that made it
//	epoch   set when the hash is created, so that a Redis that lost its
//	        data is told from one that did not
//	gen     incremented on every write
//
// Every write is published on <prefix>breakers as
// "epoch gen state until at origin KEY". The half-open probe lock is
// <prefix>cb:{KEY}:probe, holding the id of the replica that probes.
//
// The hash expires the idle period (SetIdle) after its last write, or when
// the open it holds ends if that is later: a breaker no longer in use
// leaves nothing behind, and a shared open is never lost before its end,
// however short the idle period. A hash gone is a closed breaker to every
// replica, as it is to one that never saw it.

// expectWindow is how long a transition caused by applying a remote state
// is waited for, so that it is not published back as a new one. It is
// nearly always delivered before Trip or Reset returns; a miss only costs a
// write that Redis turns into a no-op.
const expectWindow = 250 * time.Millisecond

// breaker is the store's side of one local circuit breaker: the
// BreakerSync the breaker calls, and what the worker knows of it.
type breaker struct {
	s    *Store
	cb   *resilience.CircuitBreaker
	key  string // EnvKey of the breaker's name
	hkey string // the shared state
	pkey string // the probe lock

	// Set on the call path or by StateChanged.
	probing   atomic.Bool  // this replica holds the probe lock
	probeExp  atomic.Int64 // unix ns: when that lock expires
	denyUntil atomic.Int64 // unix ns: another replica probes until then
	holdUntil atomic.Int64 // unix ms: a shared open lasts until then; 0: none
	dirty     atomic.Bool  // a local transition is not in Redis yet

	// The worker's alone.
	epoch    string // the last shared state seen
	gen      int64
	openedAt time.Time // when the local breaker last opened
	heldAt   time.Time // when holdUntil was last set from a shared open
	announce bool      // publish the local state if it is not closed
	expects  []expectation
}

// expectation is a transition the worker caused by applying a remote
// state, not to be published back. Several may be pending: an open applied,
// then a close, before the first transition's event is handled.
type expectation struct {
	to resilience.State
	by time.Time
}

// event is a local transition, queued by StateChanged for the worker.
type event struct {
	b        *breaker
	from, to resilience.State
	at       time.Time
	period   time.Duration // the breaker's OpenPeriod as of the transition
}

// shared is a breaker state as Redis holds it.
type shared struct {
	missing       bool
	state         string
	until, at     int64
	origin, epoch string
	gen           int64
}

// message is a state another replica published.
type message struct {
	key string
	v   shared
}

// BreakerSync returns the sync for cb, and tracks cb so that states seen
// elsewhere are applied to it with Trip and Reset. Asking again for the same
// breaker returns the same sync. It calls nothing on cb and never waits, as
// the Registry calls it under its own lock.
func (s *Store) BreakerSync(cb *resilience.CircuitBreaker) resilience.BreakerSync {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b, ok := s.breakers[cb]; ok {
		return b
	}
	key := resilience.EnvKey(cb.Name())
	hkey := s.opts.KeyPrefix + "cb:{" + key + "}"
	b := &breaker{s: s, cb: cb, key: key, hkey: hkey, pkey: hkey + ":probe", announce: true}
	s.breakers[cb] = b
	s.byKey[key] = append(s.byKey[key], b)
	s.poke() // read the shared state now, not a SyncInterval from now
	return b
}

// StateChanged hands the transition to the worker and returns at once. When
// the queue is full, the worker publishes the breaker's state as it then is
// on its next poll instead.
func (b *breaker) StateChanged(name string, from, to resilience.State) {
	if b.s.closed.Load() {
		return
	}
	select {
	case b.s.events <- event{b, from, to, time.Now(), b.cb.OpenPeriod()}:
	default:
		b.dirty.Store(true)
	}
}

// AllowProbe takes the half-open probe lock: true if this replica got it or
// holds it, or if Redis did not answer within OpTimeout; false if another
// replica holds it, or while a shared open lasts (see apply). A refusal is
// remembered for as long as the other lock lasts, at most SyncInterval, so
// the replicas that do not probe do not ask Redis on every call.
func (b *breaker) AllowProbe(ctx context.Context, name string) bool {
	s := b.s
	if s.closed.Load() {
		return true
	}
	// Known locally, so honoured while Redis is down too: the downstream
	// asked the fleet to wait (a retry hint), or the fleet's last probe
	// failed, until then.
	if time.Now().UnixMilli() < b.holdUntil.Load() {
		return false
	}
	if !s.usable() {
		return true
	}
	now := time.Now().UnixNano()
	if b.probing.Load() && now < b.probeExp.Load() {
		return true
	}
	if now < b.denyUntil.Load() {
		return false
	}
	take := func(ctx context.Context) ([]any, error) {
		v, err := probeScript.Run(ctx, s.client, []string{b.pkey, b.hkey}, s.id, s.opts.ProbeTTL.Milliseconds()).Slice()
		if err == nil && len(v) > 0 && v[0] == int64(1) {
			// Also when the caller has stopped waiting: the lock is
			// released on the next transition out of half-open.
			b.probeExp.Store(time.Now().Add(s.opts.ProbeTTL).UnixNano())
			b.probing.Store(true)
		}
		return v, err
	}
	v, err := bounded(s, ctx, take, nil)
	if err != nil {
		if !callerGaveUp(ctx, err) {
			s.markDown(err)
		}
		return true // local fallback: every replica may probe
	}
	s.markOK()
	code, arg := probeAnswer(v)
	wait := time.Duration(arg) * time.Millisecond
	switch code {
	case 1:
		return true
	case 2:
		// The shared open lasts until arg: this replica went half-open on
		// its own clock before the fleet's open ended (it missed the
		// message, or it is on its way). Hold the probes until then, and
		// have the worker bring the breaker itself in line.
		arg = b.capHold(arg)
		for {
			h := b.holdUntil.Load()
			if h >= arg || b.holdUntil.CompareAndSwap(h, arg) {
				break
			}
		}
		wait = time.Until(time.UnixMilli(arg))
		s.poke()
	}
	b.denyUntil.Store(time.Now().Add(min(wait, s.opts.SyncInterval)).UnixNano())
	return false
}

// probeAnswer reads probeScript's reply: its code and its value.
func probeAnswer(v []any) (code, arg int64) {
	if len(v) > 0 {
		code, _ = v[0].(int64)
	}
	if len(v) > 1 {
		arg, _ = v[1].(int64)
	}
	return code, arg
}

func (b *breaker) expect(to resilience.State) {
	b.expects = append(b.expects, expectation{to, time.Now().Add(expectWindow)})
}

// expected reports whether the transition to the state at the time was
// caused by the worker, and forgets that expectation. A transition made
// after its expectation's window is never taken for it, so old
// expectations only cost memory: they are dropped after a minute.
func (b *breaker) expected(to resilience.State, at time.Time) bool {
	found := false
	keep := b.expects[:0]
	for _, e := range b.expects {
		switch {
		case !found && e.to == to && at.Before(e.by):
			found = true
		case time.Since(e.by) < time.Minute:
			keep = append(keep, e)
		}
	}
	b.expects = keep
	return found
}

// handleEvent publishes a local transition, unless the worker caused it by
// applying a remote state.
func (s *Store) handleEvent(ev event) {
	b := ev.b
	if ev.to == resilience.StateOpen {
		b.openedAt = ev.at
	}
	expected := b.expected(ev.to, ev.at)
	if ev.to == resilience.StateHalfOpen {
		return
	}
	if ev.to == resilience.StateClosed && ev.at.After(b.heldAt) {
		// Closed here, by a probe that the hold let through, an operator's
		// Reset, or a close applied, after the shared open that set the
		// hold: nothing holds the probes any more.
		b.holdUntil.Store(0)
	}
	b.denyUntil.Store(0)
	held := b.probing.Swap(false)
	if expected {
		if held {
			s.releaseProbe(b)
		}
		return
	}
	s.publish(b, ev.to, ev.from == resilience.StateHalfOpen, time.Time{}, ev.period)
}

// publish writes a local state to Redis; at is when the breaker entered it,
// or zero for now by Redis's clock, and period, for an open, how long it
// lasts: the breaker's OpenPeriod, so that the other replicas learn a
// failed probe's doubled period or a retry hint's longer one. A failure
// leaves the breaker dirty, for the poll to publish once Redis is back.
func (s *Store) publish(b *breaker, to resilience.State, leftHalfOpen bool, at time.Time, period time.Duration) {
	if !s.usable() {
		b.dirty.Store(true)
		return
	}
	state := "closed"
	if to == resilience.StateOpen {
		state = "open"
	}
	atArg := ""
	if !at.IsZero() {
		atArg = strconv.FormatInt(at.UnixMilli(), 10)
	}
	left := "0"
	if leftHalfOpen {
		left = "1"
	}
	ctx, cancel := s.bg()
	defer cancel()
	res, err := publishScript.Run(ctx, s.client, []string{b.hkey, b.pkey},
		state, period.Milliseconds(), atArg, s.id, newEpoch(), s.channel, b.key,
		s.idleTTL().Milliseconds(), left, s.opts.SyncInterval.Milliseconds()).Slice()
	if err != nil {
		b.dirty.Store(true)
		s.markDown(err)
		return
	}
	s.markOK()
	if len(res) >= 3 && res[0] == int64(1) {
		// Our own write: skip it when it comes back.
		b.epoch, _ = res[1].(string)
		b.gen, _ = res[2].(int64)
	}
	if len(res) == 4 && to == resilience.StateOpen {
		// An open in force already, from another replica: end ours with
		// it, earlier or later, so that this replica goes half-open with
		// the fleet and not a full OpenTimeout after its own trip.
		if until, _ := res[3].(int64); until > time.Now().UnixMilli() && !b.cb.Forced() {
			s.adoptOpen(b, until)
		}
	}
}

// capHold bounds a shared open's end, unix ms, by the longest open the
// local breaker allows from now (MaxOpenTimeout, or 10x OpenTimeout for a
// retry hint), as OpenFor bounds the breaker itself: the end comes from
// another replica's clock, and one clock far ahead must not hold the
// fleet open, with no probe, for as long as it is wrong.
func (b *breaker) capHold(until int64) int64 {
	longest := max(b.cb.MaxOpenPeriod(), 0)
	return min(until, time.Now().Add(longest).UnixMilli())
}

// adoptOpen makes the shared open that lasts until the unix ms until the
// local breaker's: it is open until then, whatever its own clock says, and
// sends no probe before. The worker alone calls it.
func (s *Store) adoptOpen(b *breaker, until int64) {
	until = b.capHold(until)
	b.holdUntil.Store(until)
	b.heldAt = time.Now()
	if b.cb.OpenFor(time.Until(time.UnixMilli(until))) {
		// From closed or half-open (another replica's probe failed): the
		// transition is this one, not to be published back. It is queued
		// for this worker, which handles it after this returns.
		b.expect(resilience.StateOpen)
	}
}

// republish publishes the breaker's current local state: after a failed or
// dropped publish (dirty), or, if it is not closed, when the breaker is new
// to the store or Redis is back (announce). A closed state is never
// announced: a replica that just started must not close the others.
func (s *Store) republish(b *breaker) {
	dirty := b.dirty.Swap(false)
	announce := b.announce
	b.announce = false
	if !dirty && !announce {
		return
	}
	switch st := b.cb.State(); {
	case st == resilience.StateHalfOpen:
	case st == resilience.StateClosed && !dirty:
	default:
		s.publish(b, st, false, b.cb.Since(), b.cb.OpenPeriod())
	}
}

func (s *Store) releaseProbe(b *breaker) {
	if !s.usable() {
		return // it expires after ProbeTTL
	}
	ctx, cancel := s.bg()
	defer cancel()
	if err := releaseProbeScript.Run(ctx, s.client, []string{b.pkey}, s.id).Err(); err != nil {
		s.markDown(err)
	}
}

// apply brings the local breaker in line with a shared state: an open seen
// elsewhere trips it until the shared open ends, a close seen elsewhere
// after it opened resets it. Nothing is applied to a breaker held by
// ForceOpen or ForceClose.
func (s *Store) apply(b *breaker, v shared, fromPoll bool) {
	if v.missing {
		if b.epoch != "" {
			// Redis lost the state (restarted without its data): tell it
			// ours again if it is not closed.
			b.epoch, b.gen = "", 0
			b.announce = true
		}
		return
	}
	if v.epoch == b.epoch && (v.gen == b.gen || !fromPoll && v.gen < b.gen) {
		return // seen already, or older than what the poll read
	}
	b.epoch, b.gen = v.epoch, v.gen
	if v.origin == s.id || b.cb.Forced() {
		return
	}
	switch v.state {
	case "open":
		if v.until > 0 && v.until <= time.Now().UnixMilli() {
			return // over already
		}
		if v.until == 0 {
			// An end not known (an older replica): the local open period.
			if b.cb.State() != resilience.StateOpen {
				b.expect(resilience.StateOpen)
				b.cb.Trip()
			}
			return
		}
		// The shared open is the fleet's: the local breaker is open until
		// it ends, no longer and no shorter, whatever state it is in.
		// Open already, for a shorter period (another
		// replica's failed probe, a retry hint) or a longer one (it
		// tripped on its own after the fleet): its end moves, with no
		// transition, so nothing is published and nothing echoes. Closed,
		// or half-open (another replica's probe failed): it opens until
		// then. And no probe from here before that end, even if Redis
		// goes away meanwhile: a probe that got through early and
		// succeeded would close the whole fleet before the end another
		// replica was told (a retry hint) or chose (a failed probe's
		// doubled period).
		s.adoptOpen(b, v.until)
	case "closed":
		b.holdUntil.Store(0) // whatever held the probes is over
		st := b.cb.State()
		if st == resilience.StateClosed {
			return
		}
		opened := b.openedAt
		if st == resilience.StateOpen {
			opened = b.cb.Since()
		}
		if !opened.IsZero() && v.at < opened.UnixMilli() {
			return // our open is newer than that close
		}
		b.expect(resilience.StateClosed)
		b.cb.Reset()
	}
}

func (s *Store) handleMessage(m *message) {
	s.mu.Lock()
	bs := append([]*breaker(nil), s.byKey[m.key]...)
	s.mu.Unlock()
	for _, b := range bs {
		s.apply(b, m.v, false)
	}
}

// poll reads every tracked breaker's shared state in one pipeline and
// applies what changed, then publishes what Redis is missing. While Redis
// is down it only checks whether it is back.
func (s *Store) poll() {
	if s.closed.Load() {
		return
	}
	ctx, cancel := s.bg()
	defer cancel()
	s.mu.Lock()
	bs := make([]*breaker, 0, len(s.breakers))
	for _, b := range s.breakers {
		bs = append(bs, b)
	}
	s.mu.Unlock()
	if s.down.Load() {
		if err := s.client.Ping(ctx).Err(); err != nil {
			return
		}
		s.markUp()
		s.loadScripts(ctx)
		for _, b := range bs {
			b.announce = true
		}
	}
	if len(bs) == 0 {
		return
	}
	cmds := make([]*redis.SliceCmd, len(bs))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, b := range bs {
			cmds[i] = p.HMGet(ctx, b.hkey, "state", "until", "at", "origin", "epoch", "gen")
		}
		return nil
	})
	if err != nil {
		s.markDown(err)
		return
	}
	s.markOK()
	for i, b := range bs {
		s.apply(b, parseHash(cmds[i].Val()), true)
	}
	for _, b := range bs {
		s.republish(b)
	}
}

func parseHash(vals []any) shared {
	str := func(i int) string {
		if i < len(vals) {
			if v, ok := vals[i].(string); ok {
				return v
			}
		}
		return ""
	}
	v := shared{state: str(0), origin: str(3), epoch: str(4)}
	if v.state == "" || v.epoch == "" {
		return shared{missing: true}
	}
	v.until, _ = strconv.ParseInt(str(1), 10, 64)
	v.at, _ = strconv.ParseInt(str(2), 10, 64)
	v.gen, _ = strconv.ParseInt(str(5), 10, 64)
	return v
}

func parseMessage(p string) (*message, bool) {
	f := strings.SplitN(p, " ", 7)
	if len(f) != 7 {
		return nil, false
	}
	m := &message{key: f[6], v: shared{epoch: f[0], state: f[2], origin: f[5]}}
	var err [4]error
	m.v.gen, err[0] = strconv.ParseInt(f[1], 10, 64)
	m.v.until, err[1] = strconv.ParseInt(f[3], 10, 64)
	m.v.at, err[2] = strconv.ParseInt(f[4], 10, 64)
	for _, e := range err {
		if e != nil {
			return nil, false
		}
	}
	return m, true
}

func newEpoch() string {
	return strconv.FormatInt(time.Now().UnixNano(), 36)
}
