package resilience

// The invariants FuzzRegistryBounds checks (fuzz_bounds_test.go).

// walkLocked notes every set, key, breaker and bulkhead the registry
// holds now. w.mu and r.mu are held.
func (w *boundsWorld) walkLocked() {
	note := func(s *svcSet) {
		w.sets[s] = true
		if s.cb != nil {
			w.cbs[s.cb] = true
		}
		if s.bh != nil {
			w.bhs[s.bh] = true
		}
		if t := s.keys.Load(); t != nil {
			for _, e := range t.entries() {
				w.keys[e] = true
				w.cbs[e.cb] = true
				w.bhs[e.bh] = true
			}
		}
	}
	for _, s := range w.r.sets {
		note(s)
	}
	if w.r.other != nil {
		note(w.r.other)
	}
}

// checkAlwaysLocked checks what holds at every moment, calls running or
// not: no evicted set in the table, no retired policy busy. w.mu is held.
func (w *boundsWorld) checkAlwaysLocked(where string) {
	t, r := w.t, w.r
	r.mu.Lock()
	defer r.mu.Unlock()
	w.walkLocked()
	for k, s := range r.sets {
		if s.evicted.Load() {
			t.Errorf("%s: the set of %q (key %s) is evicted but still in the table", where, s.name, k)
		}
		if s.key != k || s.other {
			t.Errorf("%s: the table holds the set of %q (key %s, other %v) under %s", where, s.name, s.key, s.other, k)
		}
	}
	if o := r.other; o != nil && o.evicted.Load() {
		t.Errorf("%s: the overflow set is evicted", where)
	}
	for s := range w.sets {
		if !s.evicted.Load() {
			continue
		}
		if s.cb != nil && !s.cb.retired.Load() || s.bh != nil && !s.bh.retired.Load() {
			t.Errorf("%s: the evicted set of %q has a policy not retired", where, s.name)
		}
		if _, ok := w.pinned[s]; ok {
			t.Errorf("%s: the set of %q, pinned by a getter, was evicted", where, s.name)
		}
		if kt := s.keys.Load(); kt != nil {
			if !kt.retired.Load() {
				t.Errorf("%s: the evicted set of %q has a key table not retired", where, s.name)
			}
			for _, e := range kt.entries() {
				if !e.evicted.Load() || !e.cb.retired.Load() || !e.bh.retired.Load() {
					t.Errorf("%s: the evicted set of %q has key %q not retired", where, s.name, e.key)
				}
			}
		}
	}
	for cb := range w.cbs {
		if cb.retired.Load() && (cb.lastState() != StateClosed || cb.mode.Load() != 0) {
			t.Errorf("%s: a retired breaker of %q is %v (mode %d): an evicted breaker is in use, or was evicted protecting",
				where, cb.name, cb.lastState(), cb.mode.Load())
		}
	}
	for b := range w.bhs {
		if !b.retired.Load() {
			continue
		}
		if st := b.Stats(); st.Active != 0 || st.Waiting != 0 {
			t.Errorf("%s: a retired bulkhead of %q has %d calls inside and %d waiting: an evicted policy is in use",
				where, b.name, st.Active, st.Waiting)
		}
	}
}

// check checks, with every call settled (inside its function, queued for
// a slot, or returned), the bounds and the counts.
func (w *boundsWorld) check(where string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.checkAlwaysLocked(where)
	t, r := w.t, w.r
	r.mu.Lock()
	defer r.mu.Unlock()

	// The caps, or what a table held when a Reload lowered its cap.
	if n, c := len(r.sets), r.cfg.maxServices(); n > max(c, w.lastSets) {
		t.Errorf("%s: %d sets; the cap is %d, and there were %d", where, n, c, w.lastSets)
	}
	w.lastSets = len(r.sets)
	tables := map[*keyTable]*svcSet{}
	for _, s := range r.sets {
		if kt := s.keys.Load(); kt != nil {
			tables[kt] = s
		}
	}
	if o := r.other; o != nil {
		if kt := o.keys.Load(); kt != nil {
			tables[kt] = o
		}
	}
	for kt, s := range tables {
		if kt.retired.Load() {
			t.Errorf("%s: the live set of %q has a retired key table", where, s.name)
		}
		n := 0
		kt.m.Range(func(k, v any) bool {
			n++
			e := v.(*keyEntry)
			if e.key != k.(string) {
				t.Errorf("%s: %q's key table holds key %q under %q", where, s.name, e.key, k)
			}
			if e.evicted.Load() {
				t.Errorf("%s: %q's key table holds evicted key %q", where, s.name, e.key)
			}
			return true
		})
		if o := kt.other.Load(); o != nil && o.evicted.Load() {
			t.Errorf("%s: %q's overflow key is evicted", where, s.name)
		}
		if n != kt.n {
			t.Errorf("%s: %q's key table counts %d keys and holds %d", where, s.name, kt.n, n)
		}
		c := r.cfg.CircuitBreakerConfig(s.name).maxKeys()
		if prev, ok := w.lastKeys[kt]; n > c && (!ok || n > prev) {
			t.Errorf("%s: %q has %d keys; the cap is %d, and there were %d", where, s.name, n, c, prev)
		}
		w.lastKeys[kt] = n
	}
	for kt := range w.lastKeys {
		if tables[kt] == nil {
			delete(w.lastKeys, kt)
		}
	}

	// What the registry hands out is live, and reached by Reload.
	r.pipelines.Range(func(k, v any) bool {
		pk, p := k.(pipeKey), v.(*pipeline)
		if p.use.evicted.Load() {
			t.Errorf("%s: the pipeline of %q is evicted", where, pk.service)
		}
		if p.set.other || r.sets[p.set.key] != p.set || EnvKey(pk.service) != p.set.key || p.use != &p.set.usage {
			t.Errorf("%s: the pipeline of %q is not its live set's", where, pk.service)
		}
		return true
	})
	live := map[*CircuitBreaker]bool{}
	liveBH := map[*Bulkhead]bool{}
	each := func(s *svcSet) {
		if s.cb != nil {
			live[s.cb] = true
			if r.breakers[s.key] != s.cb {
				t.Errorf("%s: the breaker of the live set %q (key %s, other %v) is not the registry's: a Reload misses it",
					where, s.name, s.key, s.other)
			}
		}
		if s.bh != nil {
			liveBH[s.bh] = true
			if r.bulkheads[s.key] != s.bh {
				t.Errorf("%s: the bulkhead of the live set %q (key %s, other %v) is not the registry's: a Reload misses it",
					where, s.name, s.key, s.other)
			}
		}
	}
	for _, s := range r.sets {
		each(s)
	}
	if r.other != nil {
		each(r.other)
	}
	for k, cb := range r.breakers {
		if !live[cb] || cb.retired.Load() {
			t.Errorf("%s: the registry's breaker %s (%q) is no live set's", where, k, cb.name)
		}
	}
	for k, b := range r.bulkheads {
		if !liveBH[b] || b.retired.Load() {
			t.Errorf("%s: the registry's bulkhead %s (%q) is no live set's", where, k, b.name)
		}
	}

	// The calls: every slot taken, in any bulkhead ever handed out, is a
	// call running or a body held open (which its idle timeout may have
	// closed); every caller queued is a call not yet inside; every call
	// counted inside a set or a key has not returned.
	active, waiting := 0, 0
	for b := range w.bhs {
		st := b.Stats()
		active += st.Active
		waiting += st.Waiting
	}
	if active < w.inFn || active > w.inFn+len(w.bodies) {
		t.Errorf("%s: %d slots taken; want the %d calls running plus at most the %d bodies held", where, active, w.inFn, len(w.bodies))
	}
	if most := w.pending - w.inFn; waiting > most || waiting < most-w.inBackoff {
		t.Errorf("%s: %d callers waiting for a slot; want the %d calls not returned and not running, less at most the %d between attempts",
			where, waiting, most, w.inBackoff)
	}
	var inSets, inKeys int64
	for s := range w.sets {
		inSets += s.inflight.Load()
		if s.evicted.Load() && s.inflight.Load() != 0 {
			t.Errorf("%s: the evicted set of %q counts %d calls inside", where, s.name, s.inflight.Load())
		}
	}
	for e := range w.keys {
		inKeys += e.inflight.Load()
		if e.evicted.Load() && e.inflight.Load() != 0 {
			t.Errorf("%s: the evicted key %q counts %d calls inside", where, e.key, e.inflight.Load())
		}
	}
	if inSets != int64(w.pending) || inKeys != int64(w.pendingKeys) {
		t.Errorf("%s: the sets count %d calls inside and the keys %d; want the %d calls not returned, %d of them keyed",
			where, inSets, inKeys, w.pending, w.pendingKeys)
	}
}
