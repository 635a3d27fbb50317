package resilience

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// Package-level names in this file start with bh so that they cannot clash
// with the helpers of the other test files in the package.

var errBhDown = errors.New("downstream failed")

func bhWantStats(t *testing.T, b *Bulkhead, want BulkheadStats) {
	t.Helper()
	if got := b.Stats(); got != want {
		t.Errorf("Stats() = %+v; want %+v", got, want)
	}
}

func bhClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// bhRaiseMax raises most to n if n is larger.
func bhRaiseMax(most *atomic.Int64, n int64) {
	for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
	}
}

// bhCall is one call through a bulkhead, run in its own goroutine. Once
// inside, it stays there until leave is closed.
type bhCall struct {
	entered chan struct{} // closed when the protected function starts
	leave   chan struct{} // close to make the protected function return
	done    chan struct{} // closed when the wrapped call has returned
	v       int
	err     error // valid once done is closed
}

func bhStart(ctx context.Context, b *Bulkhead) *bhCall {
	c := &bhCall{entered: make(chan struct{}), leave: make(chan struct{}), done: make(chan struct{})}
	fn := WithBulkhead(func(context.Context) (int, error) {
		close(c.entered)
		<-c.leave
		return 7, nil
	}, b)
	go func() {
		defer close(c.done)
		c.v, c.err = fn(ctx)
	}()
	return c
}

// finish lets an admitted call return and waits until it has.
func (c *bhCall) finish(t *testing.T) {
	t.Helper()
	close(c.leave)
	<-c.done
	if c.err != nil || c.v != 7 {
		t.Errorf("admitted call = (%d, %v); want (7, nil)", c.v, c.err)
	}
}

func TestNewBulkheadLimit(t *testing.T) {
	t.Parallel()
	tests := []struct {
		limit, want int
	}{
		{0, 10},
		{1, 1},
		{3, 3},
		{64, 64},
	}
	for _, tt := range tests {
		b := mustBulkhead(t, BulkheadConfig{Name: "db", Limit: tt.limit})
		if got := b.Limit(); got != tt.want {
			t.Errorf("NewBulkhead(Limit: %d).Limit() = %d; want %d", tt.limit, got, tt.want)
		}
		if got := b.Name(); got != "db" {
			t.Errorf("Name() = %q; want %q", got, "db")
		}
		bhWantStats(t, b, BulkheadStats{})
	}
}

func TestBulkheadLimitsConcurrency(t *testing.T) {
	t.Parallel()
	tests := []struct {
		limit, want int
	}{
		{1, 1},
		{3, 3},
		{0, 10}, // the default
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("Limit=%d", tt.limit), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b := mustBulkhead(t, BulkheadConfig{Limit: tt.limit})
				var inside, most atomic.Int64
				gate := make(chan struct{})
				fn := WithBulkhead(func(context.Context) (int, error) {
					bhRaiseMax(&most, inside.Add(1))
					<-gate
					inside.Add(-1)
					return 1, nil
				}, b)

				callers := 3*tt.want + 1
				var wg sync.WaitGroup
				errs := make(chan error, callers)
				for range callers {
					wg.Go(func() {
						if _, err := fn(context.Background()); err != nil {
							errs <- err
						}
					})
				}
				synctest.Wait()
				if got := inside.Load(); got != int64(tt.want) {
					t.Errorf("calls inside with %d callers blocked = %d; want %d", callers, got, tt.want)
				}
				bhWantStats(t, b, BulkheadStats{Active: tt.want, Waiting: callers - tt.want})

				close(gate)
				wg.Wait()
				close(errs)
				for err := range errs {
					t.Errorf("call error = %v; want nil", err)
				}
				if got := most.Load(); got != int64(tt.want) {
					t.Errorf("most calls inside at once = %d; want %d", got, tt.want)
				}
				bhWantStats(t, b, BulkheadStats{Completed: uint64(callers)})
			})
		})
	}
}

func TestBulkheadFailFast(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Name: "llm", Limit: 2, FailFast: true})
		r1, err1 := b.Acquire(context.Background())
		r2, err2 := b.Acquire(context.Background())
		if err1 != nil || err2 != nil {
			t.Fatalf("Acquire() errors = %v, %v; want nil, nil", err1, err2)
		}

		called := false
		fn := WithBulkhead(func(context.Context) (string, error) {
			called = true
			return "ran", nil
		}, b)
		for i := 1; i <= 3; i++ {
			start := time.Now()
			v, err := fn(context.Background())
			if waited := time.Since(start); waited != 0 {
				t.Errorf("rejection %d took %v; want 0", i, waited)
			}
			if v != "" {
				t.Errorf("rejected call value = %q; want %q", v, "")
			}
			if !errors.Is(err, ErrBulkheadFull) {
				t.Fatalf("call on a full FailFast bulkhead error = %v; want ErrBulkheadFull", err)
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("errors.As(%v, *Error) = false; want true", err)
			}
			if e.Name != "llm" {
				t.Errorf("Error.Name = %q; want %q", e.Name, "llm")
			}
			if want := `resilience: "llm": bulkhead is full`; err.Error() != want {
				t.Errorf("Error() = %q; want %q", err.Error(), want)
			}
			bhWantStats(t, b, BulkheadStats{Active: 2, Rejected: uint64(i)})
		}
		if called {
			t.Error("protected function ran on a full FailFast bulkhead")
		}

		// Acquire is turned away the same way.
		if _, err := b.Acquire(context.Background()); !errors.Is(err, ErrBulkheadFull) {
			t.Errorf("Acquire() on a full FailFast bulkhead error = %v; want ErrBulkheadFull", err)
		}
		bhWantStats(t, b, BulkheadStats{Active: 2, Rejected: 4})

		r1()
		if v, err := fn(context.Background()); err != nil || v != "ran" {
			t.Errorf("call after a slot was freed = (%q, %v); want (%q, nil)", v, err, "ran")
		}
		r2()
		bhWantStats(t, b, BulkheadStats{Rejected: 4, Completed: 3})
	})
}

func TestBulkheadFIFO(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Limit: 1})
		release, err := b.Acquire(context.Background())
		if err != nil {
			t.Fatalf("Acquire() error = %v", err)
		}
		const n = 6
		calls := make([]*bhCall, n)
		for i := range calls {
			calls[i] = bhStart(context.Background(), b)
			synctest.Wait() // queued before the next one arrives
		}
		bhWantStats(t, b, BulkheadStats{Active: 1, Waiting: n})

		release()
		for i, c := range calls {
			synctest.Wait()
			for j, other := range calls[i:] {
				if got, want := bhClosed(other.entered), j == 0; got != want {
					t.Errorf("after %d calls left: call %d entered = %v; want %v", i, i+j, got, want)
				}
			}
			bhWantStats(t, b, BulkheadStats{Active: 1, Waiting: n - 1 - i, Completed: uint64(1 + i)})
			c.finish(t)
		}
		bhWantStats(t, b, BulkheadStats{Completed: n + 1})
	})
}

func TestBulkheadMaxQueue(t *testing.T) {
	t.Parallel()
	for _, maxQueue := range []int{1, 2, 5} {
		t.Run(fmt.Sprintf("MaxQueue=%d", maxQueue), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b := mustBulkhead(t, BulkheadConfig{Name: "q", Limit: 1, MaxQueue: maxQueue})
				holder := bhStart(context.Background(), b)
				synctest.Wait()
				waiters := make([]*bhCall, maxQueue)
				for i := range waiters {
					waiters[i] = bhStart(context.Background(), b)
					synctest.Wait() // queued in this order
				}
				bhWantStats(t, b, BulkheadStats{Active: 1, Waiting: maxQueue})

				// The queue is full: the next caller is turned away at once.
				start := time.Now()
				_, err := WithBulkhead(func(context.Context) (int, error) {
					t.Error("protected function ran beyond the queue")
					return 0, nil
				}, b)(context.Background())
				if !errors.Is(err, ErrBulkheadFull) {
					t.Errorf("call beyond a full queue error = %v; want ErrBulkheadFull", err)
				}
				if waited := time.Since(start); waited != 0 {
					t.Errorf("call beyond a full queue waited %v; want 0", waited)
				}
				if _, err := b.Acquire(context.Background()); !errors.Is(err, ErrBulkheadFull) {
					t.Errorf("Acquire() beyond a full queue error = %v; want ErrBulkheadFull", err)
				}
				bhWantStats(t, b, BulkheadStats{Active: 1, Waiting: maxQueue, Rejected: 2})

				// Once a waiter has moved inside, there is room in the queue again.
				holder.finish(t)
				synctest.Wait()
				late := bhStart(context.Background(), b)
				synctest.Wait()
				bhWantStats(t, b, BulkheadStats{Active: 1, Waiting: maxQueue, Rejected: 2, Completed: 1})
				for _, c := range append(waiters, late) {
					synctest.Wait()
					c.finish(t)
				}
				bhWantStats(t, b, BulkheadStats{Rejected: 2, Completed: uint64(maxQueue + 2)})
			})
		})
	}
}

func TestBulkheadMaxWait(t *testing.T) {
	t.Parallel()
	const maxWait = 5 * time.Second

	t.Run("expires", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			b := mustBulkhead(t, BulkheadConfig{Name: "slow", Limit: 1, MaxWait: maxWait})
			release, _ := b.Acquire(context.Background())
			defer release()

			start := time.Now()
			called := false
			_, err := WithBulkhead(func(context.Context) (int, error) {
				called = true
				return 0, nil
			}, b)(context.Background())
			if waited := time.Since(start); waited != maxWait {
				t.Errorf("waited %v before rejection; want exactly %v", waited, maxWait)
			}
			if !errors.Is(err, ErrBulkheadFull) {
				t.Errorf("error after MaxWait = %v; want ErrBulkheadFull", err)
			}
			var e *Error
			if !errors.As(err, &e) || e.Name != "slow" {
				t.Errorf("errors.As(%v, *Error) gives %+v; want Name %q", err, e, "slow")
			}
			if called {
				t.Error("protected function ran after MaxWait expired")
			}
			bhWantStats(t, b, BulkheadStats{Active: 1, Rejected: 1})
		})
	})

	t.Run("still waiting just before", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			b := mustBulkhead(t, BulkheadConfig{Limit: 1, MaxWait: maxWait})
			release, _ := b.Acquire(context.Background())
			c := bhStart(context.Background(), b)
			defer close(c.leave) // lets it return if it was wrongly admitted
			time.Sleep(maxWait - time.Nanosecond)
			synctest.Wait()
			if bhClosed(c.done) {
				t.Fatalf("call gave up after %v; want it still waiting until %v", maxWait-time.Nanosecond, maxWait)
			}
			bhWantStats(t, b, BulkheadStats{Active: 1, Waiting: 1})
			time.Sleep(time.Nanosecond)
			synctest.Wait()
			if !bhClosed(c.done) || !errors.Is(c.err, ErrBulkheadFull) {
				t.Errorf("call at MaxWait: done = %v, err = %v; want done with ErrBulkheadFull", bhClosed(c.done), c.err)
			}
			release()
			bhWantStats(t, b, BulkheadStats{Rejected: 1, Completed: 1})
		})
	})

	t.Run("admitted in time", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			b := mustBulkhead(t, BulkheadConfig{Limit: 1, MaxWait: maxWait})
			release, _ := b.Acquire(context.Background())
			go func() {
				time.Sleep(2 * time.Second)
				release()
			}()
			start := time.Now()
			v, err := WithBulkhead(func(context.Context) (int, error) { return 3, nil }, b)(context.Background())
			if v != 3 || err != nil {
				t.Errorf("call admitted before MaxWait = (%d, %v); want (3, nil)", v, err)
			}
			if waited := time.Since(start); waited != 2*time.Second {
				t.Errorf("waited %v; want 2s", waited)
			}
			bhWantStats(t, b, BulkheadStats{Completed: 2})
		})
	})
}

func TestBulkheadContextWhileWaiting(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		maxWait time.Duration
		ctx     func() (context.Context, context.CancelFunc)
		want    error
		waitFor time.Duration
	}{
		{
			name: "canceled",
			ctx: func() (context.Context, context.CancelFunc) {
				ctx, cancel := context.WithCancel(context.Background())
				time.AfterFunc(3*time.Second, cancel)
				return ctx, cancel
			},
			want:    context.Canceled,
			waitFor: 3 * time.Second,
		},
		{
			name: "deadline",
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), 4*time.Second)
			},
			want:    context.DeadlineExceeded,
			waitFor: 4 * time.Second,
		},
		{
			name:    "deadline before MaxWait",
			maxWait: time.Minute,
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), time.Second)
			},
			want:    context.DeadlineExceeded,
			waitFor: time.Second,
		},
		{
			name: "already canceled",
			ctx: func() (context.Context, context.CancelFunc) {
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				return ctx, cancel
			},
			want:    context.Canceled,
			waitFor: 0,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b := mustBulkhead(t, BulkheadConfig{Limit: 1, MaxWait: tt.maxWait})
				release, _ := b.Acquire(context.Background())
				ctx, cancel := tt.ctx()
				defer cancel()

				start := time.Now()
				called := false
				_, err := WithBulkhead(func(context.Context) (int, error) {
					called = true
					return 0, nil
				}, b)(ctx)
				if err != ctx.Err() || !errors.Is(err, tt.want) {
					t.Errorf("error = %v; want the context's own error %v", err, tt.want)
				}
				if errors.Is(err, ErrBulkheadFull) {
					t.Errorf("error = %v also matches ErrBulkheadFull; want only the context's error", err)
				}
				if waited := time.Since(start); waited != tt.waitFor {
					t.Errorf("waited %v; want %v", waited, tt.waitFor)
				}
				if called {
					t.Error("protected function ran although the caller gave up")
				}
				// The waiter is gone and the caller's choice is not a rejection.
				bhWantStats(t, b, BulkheadStats{Active: 1})

				// Acquire gives the context's error and a usable no-op release.
				rel, err := b.Acquire(ctx)
				if err != ctx.Err() {
					t.Errorf("Acquire() error = %v; want %v", err, ctx.Err())
				}
				rel()
				bhWantStats(t, b, BulkheadStats{Active: 1})

				// The slot is still usable by the next caller.
				release()
				if _, err := WithBulkhead(func(context.Context) (int, error) { return 1, nil }, b)(context.Background()); err != nil {
					t.Errorf("call after the waiter left error = %v; want nil", err)
				}
				bhWantStats(t, b, BulkheadStats{Completed: 2})
			})
		})
	}
}

func TestBulkheadHeadWaiterGivesUp(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		cfg  BulkheadConfig
		ctx  func() (context.Context, context.CancelFunc)
		want error
	}{
		{
			name: "canceled",
			cfg:  BulkheadConfig{Limit: 1},
			ctx: func() (context.Context, context.CancelFunc) {
				ctx, cancel := context.WithCancel(context.Background())
				time.AfterFunc(time.Second, cancel)
				return ctx, cancel
			},
			want: context.Canceled,
		},
		{
			name: "deadline",
			cfg:  BulkheadConfig{Limit: 2},
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), time.Second)
			},
			want: context.DeadlineExceeded,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b := mustBulkhead(t, tt.cfg)
				holders := make([]*bhCall, b.Limit())
				for i := range holders {
					holders[i] = bhStart(context.Background(), b)
				}
				synctest.Wait()
				ctx, cancel := tt.ctx()
				defer cancel()
				head := bhStart(ctx, b)
				synctest.Wait()
				behind := []*bhCall{bhStart(context.Background(), b)}
				synctest.Wait()
				behind = append(behind, bhStart(context.Background(), b))
				synctest.Wait()
				bhWantStats(t, b, BulkheadStats{Active: b.Limit(), Waiting: 3})

				time.Sleep(time.Second) // the head gives up
				synctest.Wait()
				if !bhClosed(head.done) || !errors.Is(head.err, tt.want) {
					t.Fatalf("head waiter: done = %v, err = %v; want done with %v", bhClosed(head.done), head.err, tt.want)
				}
				bhWantStats(t, b, BulkheadStats{Active: b.Limit(), Waiting: 2})

				holders[0].finish(t)
				synctest.Wait()
				if !bhClosed(behind[0].entered) || bhClosed(behind[1].entered) {
					t.Errorf("after one slot freed: entered = %v, %v; want true, false",
						bhClosed(behind[0].entered), bhClosed(behind[1].entered))
				}
				for _, c := range append(holders[1:], behind...) {
					synctest.Wait()
					c.finish(t)
				}
				bhWantStats(t, b, BulkheadStats{Completed: uint64(b.Limit() + 2)})
			})
		})
	}
}

// TestBulkheadGrantWhileGivingUp covers a waiter whose context is done at the
// moment a slot is handed to it: the slot must pass on to the next waiter.
func TestBulkheadGrantWhileGivingUp(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Limit: 1})
		if _, err := b.Acquire(context.Background()); err != nil {
			t.Fatalf("Acquire() error = %v", err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		head := bhStart(ctx, b)
		synctest.Wait()
		next := bhStart(context.Background(), b)
		synctest.Wait()

		// With the lock held, wake the head through its context, then give
		// the slot back exactly as release does. The head has already chosen
		// ctx.Done, so it finds the slot handed over when it gets the lock.
		b.mu.Lock()
		cancel()
		b.completed.Add(1)
		b.active--
		b.grantLocked()
		b.mu.Unlock()

		synctest.Wait()
		if !errors.Is(head.err, context.Canceled) || bhClosed(head.entered) {
			t.Errorf("head: entered = %v, err = %v; want not entered, context.Canceled", bhClosed(head.entered), head.err)
		}
		if !bhClosed(next.entered) {
			t.Fatal("next waiter did not get the slot the head gave up")
		}
		bhWantStats(t, b, BulkheadStats{Active: 1, Completed: 1})
		next.finish(t)
		bhWantStats(t, b, BulkheadStats{Completed: 2})
	})
}

func TestBulkheadSetLimit(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Limit: 1})
		for _, bad := range []int{0, -2} {
			err := b.SetLimit(bad)
			if !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("SetLimit(%d) error = %v; want ErrInvalidConfig", bad, err)
			} else if want := fmt.Sprintf("Bulkhead.SetLimit limit = %d", bad); !strings.Contains(err.Error(), want) {
				t.Errorf("SetLimit(%d) error = %q; want it to contain %q", bad, err, want)
			}
			if got := b.Limit(); got != 1 {
				t.Errorf("Limit() after SetLimit(%d) = %d; want 1 (unchanged)", bad, got)
			}
		}

		calls := make([]*bhCall, 6)
		for i := range calls {
			calls[i] = bhStart(context.Background(), b)
			synctest.Wait() // arrive in this order
		}
		entered := func() []bool {
			got := make([]bool, len(calls))
			for i, c := range calls {
				got[i] = bhClosed(c.entered)
			}
			return got
		}
		check := func(step string, want []bool, stats BulkheadStats) {
			t.Helper()
			synctest.Wait()
			if got := entered(); !slices.Equal(got, want) {
				t.Errorf("%s: entered = %v; want %v", step, got, want)
			}
			bhWantStats(t, b, stats)
		}
		check("Limit 1", []bool{true, false, false, false, false, false}, BulkheadStats{Active: 1, Waiting: 5})

		// Growing admits the waiters at the head of the queue at once.
		if err := b.SetLimit(4); err != nil {
			t.Fatalf("SetLimit(4) error = %v", err)
		}
		if got := b.Limit(); got != 4 {
			t.Errorf("Limit() = %d; want 4", got)
		}
		check("grown to 4", []bool{true, true, true, true, false, false}, BulkheadStats{Active: 4, Waiting: 2})

		// Shrinking interrupts no one and admits no one until the calls
		// inside are fewer than the new limit.
		if err := b.SetLimit(2); err != nil {
			t.Fatalf("SetLimit(2) error = %v", err)
		}
		check("shrunk to 2", []bool{true, true, true, true, false, false}, BulkheadStats{Active: 4, Waiting: 2})
		calls[0].finish(t)
		check("3 inside", []bool{true, true, true, true, false, false}, BulkheadStats{Active: 3, Waiting: 2, Completed: 1})
		calls[1].finish(t)
		check("2 inside", []bool{true, true, true, true, false, false}, BulkheadStats{Active: 2, Waiting: 2, Completed: 2})
		calls[2].finish(t)
		check("1 inside", []bool{true, true, true, true, true, false}, BulkheadStats{Active: 2, Waiting: 1, Completed: 3})
		for _, c := range calls[3:] {
			synctest.Wait()
			c.finish(t)
		}
		bhWantStats(t, b, BulkheadStats{Completed: 6})
	})
}

func TestBulkheadReleasesSlot(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		fn      func(context.Context) (int, error)
		wantV   int
		wantErr error
	}{
		{"return", func(context.Context) (int, error) { return 5, nil }, 5, nil},
		{"error", func(context.Context) (int, error) { return 6, errBhDown }, 6, errBhDown},
		{"panic", func(context.Context) (int, error) { panic(errBhDown) }, 0, nil},
		{"Goexit", func(context.Context) (int, error) { runtime.Goexit(); return 0, nil }, 0, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			// FailFast, so a leaked slot shows as a rejection, not a hang.
			b := mustBulkhead(t, BulkheadConfig{Limit: 1, FailFast: true})
			fn := WithBulkhead(tt.fn, b)

			var (
				v         int
				err       error
				recovered any
				returned  bool
			)
			done := make(chan struct{})
			go func() { // its own goroutine, for Goexit
				defer close(done)
				defer func() { recovered = recover() }()
				v, err = fn(context.Background())
				returned = true
			}()
			<-done

			switch tt.name {
			case "panic":
				if recovered != errBhDown {
					t.Errorf("recovered %v; want the panic value %v", recovered, errBhDown)
				}
			case "Goexit":
				if returned || recovered != nil {
					t.Errorf("after Goexit: returned = %v, recovered = %v; want false, nil", returned, recovered)
				}
			default:
				if v != tt.wantV || err != tt.wantErr {
					t.Errorf("fn() = (%d, %v); want (%d, %v)", v, err, tt.wantV, tt.wantErr)
				}
			}
			bhWantStats(t, b, BulkheadStats{Completed: 1})
			if _, err := WithBulkhead(func(context.Context) (int, error) { return 1, nil }, b)(context.Background()); err != nil {
				t.Errorf("next call error = %v; want nil (slot not given back)", err)
			}
			bhWantStats(t, b, BulkheadStats{Completed: 2})
		})
	}
}

func TestBulkheadStatsScenario(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Limit: 2, MaxQueue: 2, MaxWait: 10 * time.Second})
		bhWantStats(t, b, BulkheadStats{})

		a := bhStart(context.Background(), b)
		bb := bhStart(context.Background(), b)
		synctest.Wait()
		bhWantStats(t, b, BulkheadStats{Active: 2})

		c := bhStart(context.Background(), b)
		synctest.Wait()
		d := bhStart(context.Background(), b)
		synctest.Wait()
		bhWantStats(t, b, BulkheadStats{Active: 2, Waiting: 2})

		e := bhStart(context.Background(), b) // the queue is full
		synctest.Wait()
		if !bhClosed(e.done) || !errors.Is(e.err, ErrBulkheadFull) {
			t.Errorf("call beyond the queue: done = %v, err = %v; want done with ErrBulkheadFull", bhClosed(e.done), e.err)
		}
		bhWantStats(t, b, BulkheadStats{Active: 2, Waiting: 2, Rejected: 1})

		a.finish(t)
		synctest.Wait()
		if !bhClosed(c.entered) {
			t.Error("first waiter did not enter when a slot was freed")
		}
		bhWantStats(t, b, BulkheadStats{Active: 2, Waiting: 1, Rejected: 1, Completed: 1})

		time.Sleep(10 * time.Second) // d has now waited its MaxWait
		synctest.Wait()
		if !bhClosed(d.done) || !errors.Is(d.err, ErrBulkheadFull) {
			t.Errorf("waiter past MaxWait: done = %v, err = %v; want done with ErrBulkheadFull", bhClosed(d.done), d.err)
		}
		bhWantStats(t, b, BulkheadStats{Active: 2, Rejected: 2, Completed: 1})

		bb.finish(t)
		bhWantStats(t, b, BulkheadStats{Active: 1, Rejected: 2, Completed: 2})
		c.finish(t)
		bhWantStats(t, b, BulkheadStats{Rejected: 2, Completed: 3})
	})
}

func TestBulkheadAcquire(t *testing.T) {
	t.Parallel()

	t.Run("release twice frees one slot", func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Limit: 2, FailFast: true})
		r1, err := b.Acquire(context.Background())
		if err != nil {
			t.Fatalf("Acquire() error = %v", err)
		}
		r2, err := b.Acquire(context.Background())
		if err != nil {
			t.Fatalf("Acquire() error = %v", err)
		}
		bhWantStats(t, b, BulkheadStats{Active: 2})
		r1()
		r1()
		bhWantStats(t, b, BulkheadStats{Active: 1, Completed: 1})

		// One slot is free, not two.
		r3, err := b.Acquire(context.Background())
		if err != nil {
			t.Fatalf("Acquire() with one slot free error = %v", err)
		}
		if _, err := b.Acquire(context.Background()); !errors.Is(err, ErrBulkheadFull) {
			t.Errorf("Acquire() with r2 and r3 held error = %v; want ErrBulkheadFull", err)
		}
		r2()
		r3()
		r3()
		r2()
		bhWantStats(t, b, BulkheadStats{Rejected: 1, Completed: 3})
	})

	t.Run("release on error is a no-op", func(t *testing.T) {
		b := mustBulkhead(t, BulkheadConfig{Limit: 1, FailFast: true})
		held, _ := b.Acquire(context.Background())
		release, err := b.Acquire(context.Background())
		if !errors.Is(err, ErrBulkheadFull) {
			t.Fatalf("Acquire() on a full bulkhead error = %v; want ErrBulkheadFull", err)
		}
		if release == nil {
			t.Fatal("Acquire() returned a nil release with its error")
		}
		release()
		release()
		bhWantStats(t, b, BulkheadStats{Active: 1, Rejected: 1})
		held()
		bhWantStats(t, b, BulkheadStats{Rejected: 1, Completed: 1})
	})

	t.Run("waits for a slot", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			b := mustBulkhead(t, BulkheadConfig{Limit: 1})
			held, _ := b.Acquire(context.Background())
			time.AfterFunc(time.Minute, held)
			start := time.Now()
			release, err := b.Acquire(context.Background())
			if err != nil {
				t.Fatalf("Acquire() error = %v", err)
			}
			if waited := time.Since(start); waited != time.Minute {
				t.Errorf("Acquire() waited %v; want 1m", waited)
			}
			bhWantStats(t, b, BulkheadStats{Active: 1, Completed: 1})
			release()
			bhWantStats(t, b, BulkheadStats{Completed: 2})
		})
	})
}

func TestNewBulkheadInvalidConfig(t *testing.T) {
	t.Parallel()
	tests := []struct {
		cfg   BulkheadConfig
		field string
		value string
	}{
		{BulkheadConfig{Limit: -1}, "BulkheadConfig.Limit", "-1"},
		{BulkheadConfig{Limit: -7, MaxQueue: -2}, "BulkheadConfig.Limit", "-7"},
		{BulkheadConfig{MaxQueue: -3}, "BulkheadConfig.MaxQueue", "-3"},
		{BulkheadConfig{MaxWait: -time.Second}, "BulkheadConfig.MaxWait", "-1s"},
		{BulkheadConfig{Limit: 1, MaxQueue: 1, MaxWait: -250 * time.Millisecond}, "BulkheadConfig.MaxWait", "-250ms"},
	}
	for _, tt := range tests {
		b, err := NewBulkhead(tt.cfg)
		if b != nil {
			t.Errorf("NewBulkhead(%+v) = %p; want nil", tt.cfg, b)
		}
		if !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("NewBulkhead(%+v) error = %v; want ErrInvalidConfig", tt.cfg, err)
			continue
		}
		if want := tt.field + " = " + tt.value; !strings.Contains(err.Error(), want) {
			t.Errorf("NewBulkhead(%+v) error = %q; want it to contain %q", tt.cfg, err, want)
		}
	}
}

func TestWithBulkheadNilArgs(t *testing.T) {
	t.Parallel()
	b := mustBulkhead(t, BulkheadConfig{})
	tests := []struct {
		name  string
		fn    Func[string]
		b     *Bulkhead
		field string
	}{
		{"nil fn", nil, b, "WithBulkhead fn"},
		{"nil bulkhead", func(context.Context) (string, error) { return "x", nil }, nil, "WithBulkhead b"},
		{"both nil", nil, nil, "WithBulkhead fn"},
	}
	for _, tt := range tests {
		fn := WithBulkhead(tt.fn, tt.b)
		if fn == nil {
			t.Errorf("%s: WithBulkhead returned a nil Func", tt.name)
			continue
		}
		v, err := fn(context.Background())
		if v != "" || !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: call = (%q, %v); want (\"\", ErrInvalidConfig)", tt.name, v, err)
			continue
		}
		if !strings.Contains(err.Error(), tt.field) {
			t.Errorf("%s: error = %q; want it to name %q", tt.name, err, tt.field)
		}
	}
	bhWantStats(t, b, BulkheadStats{})
}

func TestBulkheadSharedAcrossTypes(t *testing.T) {
	t.Parallel()
	b := mustBulkhead(t, BulkheadConfig{Limit: 1, FailFast: true})
	s := WithBulkhead(func(context.Context) (string, error) { return "s", nil }, b)
	n := WithBulkhead(func(ctx context.Context) (int, error) {
		// The string call shares the single slot, so it is turned away.
		if _, err := s(ctx); !errors.Is(err, ErrBulkheadFull) {
			t.Errorf("nested call error = %v; want ErrBulkheadFull", err)
		}
		return 1, nil
	}, b)
	if v, err := n(context.Background()); v != 1 || err != nil {
		t.Errorf("int call = (%d, %v); want (1, nil)", v, err)
	}
	if v, err := s(context.Background()); v != "s" || err != nil {
		t.Errorf("string call = (%q, %v); want (\"s\", nil)", v, err)
	}
	bhWantStats(t, b, BulkheadStats{Rejected: 1, Completed: 2})
}

// A rejection returns the bulkhead's one preallocated *Error, so turning
// callers away under overload costs no garbage.
func TestBulkheadRejectionAllocatesNothing(t *testing.T) {
	b := mustBulkhead(t, BulkheadConfig{Name: "hot", Limit: 1, FailFast: true})
	release, err := b.Acquire(context.Background())
	if err != nil {
		t.Fatalf("Acquire() error = %v", err)
	}
	defer release()
	fn := WithBulkhead(func(context.Context) (int, error) { return 1, nil }, b)
	ctx := context.Background()
	var first error
	allocs := testing.AllocsPerRun(100, func() {
		_, err := fn(ctx)
		if first == nil {
			first = err
		} else if err != first {
			t.Errorf("rejection error = %p; want the same *Error every time (%p)", err, first)
		}
	})
	if !errors.Is(first, ErrBulkheadFull) {
		t.Fatalf("call on a full FailFast bulkhead error = %v; want ErrBulkheadFull", first)
	}
	if allocs != 0 {
		t.Errorf("allocations per rejection = %v; want 0", allocs)
	}
}

func TestBulkheadStress(t *testing.T) {
	t.Parallel()
	const (
		limit      = 3
		goroutines = 50
		calls      = 100
	)
	b := mustBulkhead(t, BulkheadConfig{Limit: limit, MaxQueue: 0})
	var inside, most atomic.Int64
	fn := WithBulkhead(func(context.Context) (int, error) {
		bhRaiseMax(&most, inside.Add(1))
		runtime.Gosched()
		inside.Add(-1)
		return 1, nil
	}, b)

	var wg sync.WaitGroup
	var failed atomic.Int64
	for range goroutines {
		wg.Go(func() {
			for range calls {
				if _, err := fn(context.Background()); err != nil {
					failed.Add(1)
				}
				_ = b.Stats()
			}
		})
	}
	wg.Wait()

	if got := failed.Load(); got != 0 {
		t.Errorf("%d calls failed; want 0", got)
	}
	if got := most.Load(); got < 1 || got > limit {
		t.Errorf("most calls inside at once = %d; want 1..%d", got, limit)
	}
	bhWantStats(t, b, BulkheadStats{Completed: goroutines * calls})
}

func BenchmarkWithBulkhead(b *testing.B) {
	bh := mustBulkhead(b, BulkheadConfig{Limit: 10})
	fn := WithBulkhead(func(context.Context) (int, error) { return 1, nil }, bh)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := fn(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkWithBulkheadParallel(b *testing.B) {
	bh := mustBulkhead(b, BulkheadConfig{Limit: 10})
	fn := WithBulkhead(func(context.Context) (int, error) { return 1, nil }, bh)
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := fn(ctx); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func BenchmarkBulkheadFull(b *testing.B) {
	bh := mustBulkhead(b, BulkheadConfig{Limit: 1, FailFast: true})
	release, err := bh.Acquire(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	defer release()
	fn := WithBulkhead(func(context.Context) (int, error) { return 1, nil }, bh)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := fn(ctx); err == nil {
			b.Fatal("call on a full bulkhead succeeded")
		}
	}
}

// Bug 7 of the pipeline issue: with RESILIENCE_ENABLED=false, Acquire on a
// registry bulkhead still limited and rejected callers, against "pass calls
// straight through". One switch per registry is read by Acquire too.
func TestDisabledRegistryBulkheadAcquirePassesThrough(t *testing.T) {
	reg := mustRegistry(t, map[string]string{
		"RESILIENCE_ENABLED": "false", "BULKHEAD_ONE_LIMIT": "1", "BULKHEAD_ONE_FAIL_FAST": "true",
	})
	b := reg.Bulkhead("one")
	var releases []func()
	for i := range 3 {
		release, err := b.Acquire(context.Background())
		if err != nil {
			t.Fatalf("Acquire %d on a disabled registry: %v", i+1, err)
		}
		releases = append(releases, release)
	}
	for _, r := range releases {
		r()
	}
	if s := b.Stats(); s.Active != 0 || s.Rejected != 0 {
		t.Errorf("stats %+v; a disabled bulkhead takes nothing", s)
	}
}
