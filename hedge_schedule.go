package resilience

import (
	"container/heap"
	"sync"
	"time"
)

// A hedge's schedule sends the hedges of all its races from one timer. A
// timer per call would cost more than the rest of the hedge together: every
// arming of a timer that becomes the earliest wakes the runtime's poller,
// a system call. With one timer per hedge, a call that answers before its
// delay costs a push and a removal on a heap of the calls in flight, and
// the timer is reset only when a call is due before every other.
//
// A timer made in a testing/synctest bubble runs on the bubble's fake
// clock and must never be touched from outside it (the runtime treats that
// as fatal), so races in a bubble arm a timer of their own instead.
type schedule struct {
	mu    sync.Mutex
	due   raceHeap
	timer *time.Timer
	armed time.Duration // when the timer fires; 0: it is not armed
}

// arm schedules the hedge of round n after r.delay. r.mu is held.
func (r *race) arm(h *Hedge, n uint64) {
	if r.delay < 0 {
		return // noHedgeYet
	}
	now := monotonic()
	if r.bubble = now < 0; r.bubble {
		// Before the package was loaded: a synctest bubble, whose fake
		// clock starts in 2000.
		r.timer = time.AfterFunc(r.delay, func() { r.fire(n) })
		return
	}
	r.scheduled = n
	h.sched.add(r, now, now+r.delay)
}

// disarm unschedules r's next hedge. r.mu is held.
func (r *race) disarm(h *Hedge) {
	if r.timer != nil {
		r.timer.Stop()
		r.timer = nil
		return
	}
	if !r.bubble {
		h.sched.remove(r)
	}
}

func (s *schedule) add(r *race, now, due time.Duration) {
	s.mu.Lock()
	r.due = due
	heap.Push(&s.due, r)
	if s.armed == 0 || due < s.armed {
		s.armed = due
		d := due - now
		if s.timer == nil {
			s.timer = time.AfterFunc(d, s.fire)
		} else {
			s.timer.Reset(d)
		}
	}
	s.mu.Unlock()
}

func (s *schedule) remove(r *race) {
	s.mu.Lock()
	if r.index >= 0 {
		heap.Remove(&s.due, int(r.index))
	}
	s.mu.Unlock()
}

// fire sends the hedges that are due, each in a goroutine of its own, and
// arms the timer for the next.
func (s *schedule) fire() {
	type send struct {
		r *race
		n uint64
	}
	var due []send
	s.mu.Lock()
	now := monotonic()
	for len(s.due) > 0 && s.due[0].due <= now {
		r := heap.Pop(&s.due).(*race)
		// r.round is read under r.mu elsewhere; the round a race is on
		// the heap for is the one its arm saw, which fire checks again.
		due = append(due, send{r, r.scheduled})
	}
	s.armed = 0
	if len(s.due) > 0 {
		s.armed = s.due[0].due
		s.timer.Reset(s.armed - now)
	}
	s.mu.Unlock()
	for _, d := range due {
		go d.r.fire(d.n)
	}
}

// raceHeap orders races by when their next hedge is due.
type raceHeap []*race

func (h raceHeap) Len() int           { return len(h) }
func (h raceHeap) Less(i, j int) bool { return h[i].due < h[j].due }
func (h raceHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = int32(i), int32(j)
}

func (h *raceHeap) Push(x any) {
	r := x.(*race)
	r.index = int32(len(*h))
	*h = append(*h, r)
}

func (h *raceHeap) Pop() any {
	old := *h
	r := old[len(old)-1]
	old[len(old)-1] = nil
	r.index = -1
	*h = old[:len(old)-1]
	return r
}
