package resilience

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// Package-level names in this file start with fb so that they cannot clash
// with the helpers of the other test files in the package.

var (
	errFbDown     = errors.New("downstream failed")
	errFbFallback = errors.New("fallback failed")
)

func fbMustCache[T any](t testing.TB, cfg FallbackCacheConfig) *FallbackCache[T] {
	t.Helper()
	c, err := NewFallbackCache[T](cfg)
	if err != nil {
		t.Fatalf("NewFallbackCache(%+v) error = %v", cfg, err)
	}
	return c
}

func fbWantStats[T any](t *testing.T, c *FallbackCache[T], want FallbackCacheStats) {
	t.Helper()
	if got := c.Stats(); got != want {
		t.Errorf("Stats() = %+v; want %+v", got, want)
	}
}

// fbRecorder is a Fallback that records the errors it was called with.
type fbRecorder[T any] struct {
	mu   sync.Mutex
	errs []error
	v    T
	err  error
}

func (r *fbRecorder[T]) fallback(_ context.Context, err error) (T, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs = append(r.errs, err)
	return r.v, r.err
}

func (r *fbRecorder[T]) calls() []error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]error(nil), r.errs...)
}

func TestWithFallbackSuccessPassesThrough(t *testing.T) {
	t.Parallel()
	rec := &fbRecorder[string]{v: "fallback"}
	var gotCtx context.Context
	type key struct{}
	ctx := context.WithValue(context.Background(), key{}, "caller")
	fn := WithFallback(func(ctx context.Context) (string, error) {
		gotCtx = ctx
		return "fresh", nil
	}, rec.fallback)
	v, err := fn(ctx)
	if v != "fresh" || err != nil {
		t.Errorf("fn() = (%q, %v); want (%q, nil)", v, err, "fresh")
	}
	if gotCtx != ctx {
		t.Error("the protected function did not get the caller's context")
	}
	if calls := rec.calls(); len(calls) != 0 {
		t.Errorf("fallback called %d times on success; want 0", len(calls))
	}
}

func TestWithFallbackFailure(t *testing.T) {
	t.Parallel()
	wrapped := fmt.Errorf("get user 7: %w", errFbDown)
	tests := []struct {
		name    string
		fnErr   error
		fbV     string
		fbErr   error
		wantV   string
		wantErr error
	}{
		{"fallback value", errFbDown, "cached", nil, "cached", nil},
		{"wrapped error", wrapped, "cached", nil, "cached", nil},
		{"fallback error", errFbDown, "", errFbFallback, "", errFbFallback},
		{"policy error", &Error{Err: ErrBulkheadFull, Name: "db"}, "busy", nil, "busy", nil},
		{"own timeout", ErrTimeout, "late", nil, "late", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := &fbRecorder[string]{v: tt.fbV, err: tt.fbErr}
			fn := WithFallback(func(context.Context) (string, error) {
				return "partial", tt.fnErr
			}, rec.fallback)
			v, err := fn(context.Background())
			if v != tt.wantV || err != tt.wantErr {
				t.Errorf("fn() = (%q, %v); want (%q, %v)", v, err, tt.wantV, tt.wantErr)
			}
			calls := rec.calls()
			if len(calls) != 1 {
				t.Fatalf("fallback called %d times; want 1", len(calls))
			}
			if calls[0] != tt.fnErr || !errors.Is(calls[0], tt.fnErr) {
				t.Errorf("fallback got error %v; want the original %v", calls[0], tt.fnErr)
			}
			if tt.fbErr != nil && errors.Is(err, tt.fnErr) {
				t.Errorf("error = %v still matches the original %v; want only the fallback's error", err, tt.fnErr)
			}
		})
	}
}

func TestWithFallbackOriginalErrorIdentity(t *testing.T) {
	t.Parallel()
	fn := WithFallback(func(context.Context) (int, error) {
		return 0, fmt.Errorf("query: %w", errFbDown)
	}, func(_ context.Context, err error) (int, error) {
		if !errors.Is(err, errFbDown) {
			t.Errorf("fallback got %v; want an error matching %v", err, errFbDown)
		}
		if want := "query: downstream failed"; err.Error() != want {
			t.Errorf("fallback got %q; want %q", err.Error(), want)
		}
		return 1, nil
	})
	if v, err := fn(context.Background()); v != 1 || err != nil {
		t.Errorf("fn() = (%d, %v); want (1, nil)", v, err)
	}
}

func TestWithFallbackCallerCancellation(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// run calls fn with a context that the caller gives up on.
		run  func(fn Func[string]) (v string, err, ctxErr error)
		want error
	}{
		{
			name: "canceled before",
			run: func(fn Func[string]) (string, error, error) {
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				v, err := fn(ctx)
				return v, err, ctx.Err()
			},
			want: context.Canceled,
		},
		{
			name: "canceled while running",
			run: func(fn Func[string]) (string, error, error) {
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				time.AfterFunc(time.Second, cancel)
				v, err := fn(ctx)
				return v, err, ctx.Err()
			},
			want: context.Canceled,
		},
		{
			name: "deadline while running",
			run: func(fn Func[string]) (string, error, error) {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				v, err := fn(ctx)
				return v, err, ctx.Err()
			},
			want: context.DeadlineExceeded,
		},
		{
			name: "deadline passed before",
			run: func(fn Func[string]) (string, error, error) {
				ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
				defer cancel()
				v, err := fn(ctx)
				return v, err, ctx.Err()
			},
			want: context.DeadlineExceeded,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				rec := &fbRecorder[string]{v: "fallback"}
				fn := WithFallback(func(ctx context.Context) (string, error) {
					<-ctx.Done()
					return "", ctx.Err()
				}, rec.fallback)
				v, err, ctxErr := tt.run(fn)
				if err != ctxErr || !errors.Is(err, tt.want) {
					t.Errorf("fn() error = %v; want the caller's own %v", err, tt.want)
				}
				if v != "" {
					t.Errorf("fn() value = %q; want %q", v, "")
				}

				// A function that wraps the context's error, as most do,
				// gets its error passed back as it was too.
				var returned error
				fn = WithFallback(func(ctx context.Context) (string, error) {
					<-ctx.Done()
					returned = fmt.Errorf("query users: %w", ctx.Err())
					return "partial", returned
				}, rec.fallback)
				v, err, _ = tt.run(fn)
				if err != returned || !errors.Is(err, tt.want) {
					t.Errorf("fn() wrapping the context's error: error = %v; want %v passed back", err, returned)
				}
				if v != "partial" {
					t.Errorf("fn() wrapping the context's error: value = %q; want %q", v, "partial")
				}

				if calls := rec.calls(); len(calls) != 0 {
					t.Errorf("fallback called with %v; want it not called", calls)
				}
			})
		})
	}
}

// A deadline that belongs to the protected function, not to the caller, is
// a failure like any other.
func TestWithFallbackInnerDeadlineFallsBack(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		rec := &fbRecorder[string]{v: "fallback"}
		fn := WithFallback(func(ctx context.Context) (string, error) {
			ctx, cancel := context.WithTimeout(ctx, time.Second)
			defer cancel()
			<-ctx.Done()
			return "", ctx.Err()
		}, rec.fallback)
		v, err := fn(context.Background())
		if v != "fallback" || err != nil {
			t.Errorf("fn() = (%q, %v); want (%q, nil)", v, err, "fallback")
		}
		if calls := rec.calls(); len(calls) != 1 || !errors.Is(calls[0], context.DeadlineExceeded) {
			t.Errorf("fallback calls = %v; want one with context.DeadlineExceeded", calls)
		}
	})
}

func TestWithFallbackPanicPropagates(t *testing.T) {
	t.Parallel()
	rec := &fbRecorder[int]{v: 1}
	fn := WithFallback(func(context.Context) (int, error) { panic("boom") }, rec.fallback)
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v; want %q", r, "boom")
			}
		}()
		fn(context.Background())
		t.Error("fn() returned; want it to panic")
	}()
	if calls := rec.calls(); len(calls) != 0 {
		t.Errorf("fallback called with %v on panic; want it not called", calls)
	}
}

func TestWithFallbackNilArgs(t *testing.T) {
	t.Parallel()
	okFn := func(context.Context) (int, error) { return 1, nil }
	tests := []struct {
		name  string
		fn    Func[int]
		fb    Fallback[int]
		field string
	}{
		{"nil fn", nil, FallbackValue(2), "WithFallback fn"},
		{"nil fb", okFn, nil, "WithFallback fb"},
		{"both nil", nil, nil, "WithFallback fn"},
	}
	for _, tt := range tests {
		fn := WithFallback(tt.fn, tt.fb)
		if fn == nil {
			t.Errorf("%s: WithFallback returned a nil Func", tt.name)
			continue
		}
		v, err := fn(context.Background())
		if v != 0 || !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: call = (%d, %v); want (0, ErrInvalidConfig)", tt.name, v, err)
			continue
		}
		if !strings.Contains(err.Error(), tt.field) {
			t.Errorf("%s: error = %q; want it to name %q", tt.name, err, tt.field)
		}
	}
}

// The helpers built on WithFallback report a nil function as bad
// configuration, never with their fallback answer: FailOpen(nil) must not
// answer true.
func TestFallbackHelpersNilFn(t *testing.T) {
	t.Parallel()
	c := fbMustCache[string](t, FallbackCacheConfig{})
	tests := []struct {
		name string
		call func() (any, error)
		zero any
	}{
		{"FailOpen", func() (any, error) { return FailOpen(nil)(context.Background()) }, false},
		{"FailClosed", func() (any, error) { return FailClosed(nil)(context.Background()) }, false},
		{"EmptyOnError", func() (any, error) { return EmptyOnError[int](nil)(context.Background()) }, 0},
		{"Record", func() (any, error) { return c.Record("k", nil)(context.Background()) }, ""},
		{"Wrap", func() (any, error) { return c.Wrap("k", nil)(context.Background()) }, ""},
	}
	for _, tt := range tests {
		v, err := tt.call()
		if v != tt.zero || !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s(nil)() = (%v, %v); want (%v, ErrInvalidConfig)", tt.name, v, err, tt.zero)
		}
	}
	if _, _, ok := c.Load("k"); ok {
		t.Error("Load(k) ok = true after Record/Wrap of a nil fn; want nothing stored")
	}
}

func TestFallbackValue(t *testing.T) {
	t.Parallel()
	fb := FallbackValue("default")
	for _, err := range []error{errFbDown, ErrTimeout, nil} {
		if v, gotErr := fb(context.Background(), err); v != "default" || gotErr != nil {
			t.Errorf("FallbackValue(%q)(ctx, %v) = (%q, %v); want (%q, nil)", "default", err, v, gotErr, "default")
		}
	}
	fn := WithFallback(func(context.Context) ([]int, error) { return nil, errFbDown }, FallbackValue([]int{1, 2}))
	if v, err := fn(context.Background()); !reflect.DeepEqual(v, []int{1, 2}) || err != nil {
		t.Errorf("fn() = (%v, %v); want ([1 2], nil)", v, err)
	}
}

func TestFailOpenFailClosed(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		v          bool
		err        error
		wantOpen   bool
		wantClosed bool
	}{
		{"success true", true, nil, true, true},
		{"success false", false, nil, false, false},
		{"error", false, errFbDown, true, false},
		{"error with true", true, errFbDown, true, false},
	}
	for _, tt := range tests {
		fn := func(context.Context) (bool, error) { return tt.v, tt.err }
		if v, err := FailOpen(fn)(context.Background()); v != tt.wantOpen || err != nil {
			t.Errorf("%s: FailOpen(fn)() = (%v, %v); want (%v, nil)", tt.name, v, err, tt.wantOpen)
		}
		if v, err := FailClosed(fn)(context.Background()); v != tt.wantClosed || err != nil {
			t.Errorf("%s: FailClosed(fn)() = (%v, %v); want (%v, nil)", tt.name, v, err, tt.wantClosed)
		}
	}

	// The caller's own cancellation is not turned into an answer.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	canceled := func(ctx context.Context) (bool, error) { return false, ctx.Err() }
	if _, err := FailOpen(canceled)(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("FailOpen(fn)(canceled ctx) error = %v; want context.Canceled", err)
	}
	if _, err := FailClosed(canceled)(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("FailClosed(fn)(canceled ctx) error = %v; want context.Canceled", err)
	}
}

func fbCheckEmptyOnError[T any](t *testing.T, ok, partial T) {
	t.Helper()
	var zero T
	got, err := EmptyOnError(func(context.Context) (T, error) { return partial, errFbDown })(context.Background())
	if err != nil || !reflect.DeepEqual(got, zero) {
		t.Errorf("EmptyOnError(failing fn)() = (%#v, %v); want (%#v, nil)", got, err, zero)
	}
	got, err = EmptyOnError(func(context.Context) (T, error) { return ok, nil })(context.Background())
	if err != nil || !reflect.DeepEqual(got, ok) {
		t.Errorf("EmptyOnError(succeeding fn)() = (%#v, %v); want (%#v, nil)", got, err, ok)
	}
}

func TestEmptyOnError(t *testing.T) {
	t.Parallel()
	t.Run("slice", func(t *testing.T) {
		fbCheckEmptyOnError(t, []string{"a", "b"}, []string{"partial"})
		got, _ := EmptyOnError(func(context.Context) ([]string, error) { return []string{}, errFbDown })(context.Background())
		if got != nil {
			t.Errorf("EmptyOnError([]string) on error = %#v; want nil", got)
		}
	})
	t.Run("map", func(t *testing.T) {
		fbCheckEmptyOnError(t, map[string]int{"a": 1}, map[string]int{"partial": 1})
		got, _ := EmptyOnError(func(context.Context) (map[string]int, error) { return map[string]int{}, errFbDown })(context.Background())
		if got != nil {
			t.Errorf("EmptyOnError(map) on error = %#v; want nil", got)
		}
	})
	t.Run("string", func(t *testing.T) { fbCheckEmptyOnError(t, "ok", "partial") })
	t.Run("int", func(t *testing.T) { fbCheckEmptyOnError(t, 42, -1) })
}

func TestNewFallbackCacheDefaults(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := fbMustCache[int](t, FallbackCacheConfig{})
		for i := range 1000 {
			c.Store(strconv.Itoa(i), i)
		}
		fbWantStats(t, c, FallbackCacheStats{Entries: 1000})
		if v, _, ok := c.Load("0"); !ok || v != 0 {
			t.Errorf("Load(%q) with 1000 entries = (%d, %v); want (0, true)", "0", v, ok)
		}
		c.Store("1000", 1000)
		fbWantStats(t, c, FallbackCacheStats{Entries: 1000})
		if _, _, ok := c.Load("0"); ok {
			t.Errorf("Load(%q) after the 1001st key ok = true; want the oldest key evicted", "0")
		}
		if v, _, ok := c.Load("1"); !ok || v != 1 {
			t.Errorf("Load(%q) = (%d, %v); want (1, true)", "1", v, ok)
		}

		// MaxAge 0 means no age limit.
		time.Sleep(10000 * time.Hour)
		if v, age, ok := c.Load("1000"); !ok || v != 1000 || age != 10000*time.Hour {
			t.Errorf("Load(%q) after 10000h = (%d, %v, %v); want (1000, 10000h0m0s, true)", "1000", v, age, ok)
		}
	})
}

func TestNewFallbackCacheInvalidConfig(t *testing.T) {
	t.Parallel()
	tests := []struct {
		cfg   FallbackCacheConfig
		field string
		value string
	}{
		{FallbackCacheConfig{MaxEntries: -1}, "FallbackCacheConfig.MaxEntries", "-1"},
		{FallbackCacheConfig{MaxEntries: -5, MaxAge: -time.Second}, "FallbackCacheConfig.MaxEntries", "-5"},
		{FallbackCacheConfig{MaxAge: -time.Minute}, "FallbackCacheConfig.MaxAge", "-1m0s"},
		{FallbackCacheConfig{MaxEntries: 3, MaxAge: -time.Nanosecond}, "FallbackCacheConfig.MaxAge", "-1ns"},
	}
	for _, tt := range tests {
		c, err := NewFallbackCache[string](tt.cfg)
		if c != nil {
			t.Errorf("NewFallbackCache(%+v) = %p; want nil", tt.cfg, c)
		}
		if !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("NewFallbackCache(%+v) error = %v; want ErrInvalidConfig", tt.cfg, err)
			continue
		}
		if want := tt.field + " = " + tt.value; !strings.Contains(err.Error(), want) {
			t.Errorf("NewFallbackCache(%+v) error = %q; want it to contain %q", tt.cfg, err, want)
		}
	}
}

func TestFallbackCacheStoreLoad(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := fbMustCache[string](t, FallbackCacheConfig{})
		if v, age, ok := c.Load("k"); v != "" || age != 0 || ok {
			t.Errorf("Load(missing) = (%q, %v, %v); want (\"\", 0s, false)", v, age, ok)
		}
		c.Store("k", "v1")
		if v, age, ok := c.Load("k"); v != "v1" || age != 0 || !ok {
			t.Errorf("Load(k) = (%q, %v, %v); want (\"v1\", 0s, true)", v, age, ok)
		}
		time.Sleep(3 * time.Second)
		if v, age, ok := c.Load("k"); v != "v1" || age != 3*time.Second || !ok {
			t.Errorf("Load(k) after 3s = (%q, %v, %v); want (\"v1\", 3s, true)", v, age, ok)
		}
		c.Store("k", "v2") // overwrites and restarts the age
		time.Sleep(time.Second)
		if v, age, ok := c.Load("k"); v != "v2" || age != time.Second || !ok {
			t.Errorf("Load(k) after re-store = (%q, %v, %v); want (\"v2\", 1s, true)", v, age, ok)
		}
		if _, _, ok := c.Load("K"); ok {
			t.Error("Load(K) ok = true; want keys to be case-sensitive and K missing")
		}
		fbWantStats(t, c, FallbackCacheStats{Entries: 1})
	})
}

func TestFallbackCacheEviction(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		ops     []string // "s:key" stores key, "l:key" loads it
		present []string
		absent  []string
	}{
		{"oldest evicted", []string{"s:a", "s:b", "s:c", "s:d"}, []string{"b", "c", "d"}, []string{"a"}},
		{"two evicted", []string{"s:a", "s:b", "s:c", "s:d", "s:e"}, []string{"c", "d", "e"}, []string{"a", "b"}},
		{"re-store refreshes", []string{"s:a", "s:b", "s:c", "s:a", "s:d"}, []string{"a", "c", "d"}, []string{"b"}},
		{"re-store does not grow", []string{"s:a", "s:a", "s:a", "s:b", "s:c"}, []string{"a", "b", "c"}, nil},
		{"load does not refresh", []string{"s:a", "s:b", "s:c", "l:a", "s:d"}, []string{"b", "c", "d"}, []string{"a"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := fbMustCache[string](t, FallbackCacheConfig{MaxEntries: 3})
			for _, op := range tt.ops {
				switch key := op[2:]; op[0] {
				case 's':
					c.Store(key, "v-"+key)
				case 'l':
					c.Load(key)
				}
			}
			for _, k := range tt.present {
				if v, _, ok := c.Load(k); !ok || v != "v-"+k {
					t.Errorf("Load(%q) = (%q, %v); want (%q, true)", k, v, ok, "v-"+k)
				}
			}
			for _, k := range tt.absent {
				if v, _, ok := c.Load(k); ok {
					t.Errorf("Load(%q) = (%q, true); want it evicted", k, v)
				}
			}
			fbWantStats(t, c, FallbackCacheStats{Entries: 3})
		})
	}
}

func TestFallbackCacheRecord(t *testing.T) {
	t.Parallel()
	c := fbMustCache[int](t, FallbackCacheConfig{})
	results := []struct {
		v   int
		err error
	}{
		{1, nil},
		{2, errFbDown}, // a failure's value is not stored
		{3, nil},
		{4, errFbDown},
	}
	i := 0
	fn := c.Record("k", func(context.Context) (int, error) {
		r := results[i]
		i++
		return r.v, r.err
	})
	wantCached := []int{1, 1, 3, 3}
	for n, r := range results {
		v, err := fn(context.Background())
		if v != r.v || err != r.err {
			t.Errorf("call %d = (%d, %v); want (%d, %v) passed through", n, v, err, r.v, r.err)
		}
		if got, _, ok := c.Load("k"); !ok || got != wantCached[n] {
			t.Errorf("after call %d: Load(k) = (%d, %v); want (%d, true)", n, got, ok, wantCached[n])
		}
	}
	if _, _, ok := c.Load("other"); ok {
		t.Error("Load(other) ok = true; want Record to store under its own key only")
	}
	// Record never answers failures itself.
	fbWantStats(t, c, FallbackCacheStats{Entries: 1})

	failing := fbMustCache[int](t, FallbackCacheConfig{})
	failing.Record("k", func(context.Context) (int, error) { return 9, errFbDown })(context.Background())
	fbWantStats(t, failing, FallbackCacheStats{})
}

func TestFallbackCacheFallback(t *testing.T) {
	t.Parallel()
	c := fbMustCache[string](t, FallbackCacheConfig{})
	fb := c.Fallback("user:7")

	v, err := fb(context.Background(), errFbDown)
	if v != "" || err != errFbDown {
		t.Errorf("Fallback with nothing cached = (%q, %v); want (\"\", %v)", v, err, errFbDown)
	}
	fbWantStats(t, c, FallbackCacheStats{Misses: 1})

	c.Store("user:7", "alice")
	c.Store("user:8", "bob")
	for i := 1; i <= 2; i++ {
		v, err = fb(context.Background(), errFbDown)
		if v != "alice" || err != nil {
			t.Errorf("Fallback with a cached value = (%q, %v); want (%q, nil)", v, err, "alice")
		}
		fbWantStats(t, c, FallbackCacheStats{Entries: 2, Hits: uint64(i), Misses: 1})
	}

	// Through WithFallback, as it is meant to be used.
	fn := WithFallback(func(context.Context) (string, error) { return "", errFbDown }, c.Fallback("user:8"))
	if v, err := fn(context.Background()); v != "bob" || err != nil {
		t.Errorf("WithFallback(failing fn, Fallback(user:8))() = (%q, %v); want (%q, nil)", v, err, "bob")
	}
	fn = WithFallback(func(context.Context) (string, error) { return "", errFbDown }, c.Fallback("user:9"))
	if v, err := fn(context.Background()); v != "" || err != errFbDown {
		t.Errorf("WithFallback(failing fn, Fallback(user:9))() = (%q, %v); want (\"\", %v)", v, err, errFbDown)
	}
	fbWantStats(t, c, FallbackCacheStats{Entries: 2, Hits: 3, Misses: 2})
}

func TestFallbackCacheMaxAge(t *testing.T) {
	t.Parallel()
	const maxAge = time.Minute
	tests := []struct {
		name  string
		fb    func(*FallbackCache[int], string) Fallback[int]
		stale bool
	}{
		{"Fallback", (*FallbackCache[int]).Fallback, false},
		{"StaleFallback", (*FallbackCache[int]).StaleFallback, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				c := fbMustCache[int](t, FallbackCacheConfig{MaxAge: maxAge})
				fb := tt.fb(c, "k")
				c.Store("k", 5)

				time.Sleep(maxAge) // exactly MaxAge old: still served
				v, err := fb(context.Background(), errFbDown)
				if v != 5 || (err != nil) != tt.stale {
					t.Errorf("at MaxAge: fallback = (%d, %v); want value 5", v, err)
				}
				if got, age, ok := c.Load("k"); got != 5 || age != maxAge || !ok {
					t.Errorf("at MaxAge: Load(k) = (%d, %v, %v); want (5, %v, true)", got, age, ok, maxAge)
				}

				time.Sleep(time.Nanosecond) // now older than MaxAge
				v, err = fb(context.Background(), errFbDown)
				if v != 0 || err != errFbDown {
					t.Errorf("past MaxAge: fallback = (%d, %v); want (0, %v)", v, err, errFbDown)
				}
				if got, age, ok := c.Load("k"); got != 0 || age != maxAge+time.Nanosecond || ok {
					t.Errorf("past MaxAge: Load(k) = (%d, %v, %v); want (0, %v, false)", got, age, ok, maxAge+time.Nanosecond)
				}
				stale := uint64(0)
				if tt.stale {
					stale = 1
				}
				fbWantStats(t, c, FallbackCacheStats{Entries: 1, Hits: 1, Stale: stale, Misses: 1})

				// A fresh store makes it servable again.
				c.Store("k", 6)
				if v, _ := fb(context.Background(), errFbDown); v != 6 {
					t.Errorf("after a fresh Store: fallback value = %d; want 6", v)
				}
			})
		})
	}
}

func TestFallbackCacheStaleFallback(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := fbMustCache[string](t, FallbackCacheConfig{})
		fb := c.StaleFallback("cfg")
		cause := fmt.Errorf("read config: %w", errFbDown)

		v, err := fb(context.Background(), cause)
		if v != "" || err != cause {
			t.Errorf("StaleFallback with nothing cached = (%q, %v); want (\"\", %v)", v, err, cause)
		}
		if errors.Is(err, ErrStale) {
			t.Errorf("StaleFallback with nothing cached error = %v matches ErrStale; want only the original", err)
		}
		fbWantStats(t, c, FallbackCacheStats{Misses: 1})

		c.Store("cfg", "v1")
		time.Sleep(90 * time.Second)
		v, err = fb(context.Background(), cause)
		if v != "v1" {
			t.Errorf("StaleFallback value = %q; want %q", v, "v1")
		}
		if !errors.Is(err, ErrStale) {
			t.Errorf("StaleFallback error = %v; want ErrStale", err)
		}
		if !errors.Is(err, errFbDown) {
			t.Errorf("StaleFallback error = %v; want it to match the original %v", err, errFbDown)
		}
		var e *Error
		if !errors.As(err, &e) {
			t.Fatalf("errors.As(%v, *Error) = false; want true", err)
		}
		if e.Age != 90*time.Second || e.Cause != cause || e.Err != ErrStale {
			t.Errorf("Error = %+v; want Err ErrStale, Age 1m30s, Cause %v", e, cause)
		}
		if want := "resilience: stale value served (age 1m30s): read config: downstream failed"; err.Error() != want {
			t.Errorf("Error() = %q; want %q", err.Error(), want)
		}
		fbWantStats(t, c, FallbackCacheStats{Entries: 1, Hits: 1, Stale: 1, Misses: 1})

		// Through WithFallback: the caller sees the value and the staleness.
		get := WithFallback(func(context.Context) (string, error) { return "", errFbDown }, fb)
		time.Sleep(10 * time.Second)
		v, err = get(context.Background())
		if v != "v1" || !errors.Is(err, ErrStale) || !errors.As(err, &e) || e.Age != 100*time.Second {
			t.Errorf("WithFallback(failing fn, StaleFallback)() = (%q, %v); want (%q, ErrStale with age 1m40s)", v, err, "v1")
		}
		fbWantStats(t, c, FallbackCacheStats{Entries: 1, Hits: 2, Stale: 2, Misses: 1})
	})
}

func TestFallbackCacheStats(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := fbMustCache[int](t, FallbackCacheConfig{MaxEntries: 2, MaxAge: time.Hour})
		fbWantStats(t, c, FallbackCacheStats{})
		ctx := context.Background()

		c.Fallback("a")(ctx, errFbDown) // miss
		fbWantStats(t, c, FallbackCacheStats{Misses: 1})
		c.Store("a", 1)
		c.Fallback("a")(ctx, errFbDown)      // hit
		c.StaleFallback("a")(ctx, errFbDown) // hit, stale
		fbWantStats(t, c, FallbackCacheStats{Entries: 1, Hits: 2, Stale: 1, Misses: 1})
		c.Store("b", 2)
		c.Store("c", 3)                      // evicts a
		c.Fallback("a")(ctx, errFbDown)      // miss
		c.StaleFallback("a")(ctx, errFbDown) // miss
		fbWantStats(t, c, FallbackCacheStats{Entries: 2, Hits: 2, Stale: 1, Misses: 3})
		time.Sleep(2 * time.Hour)
		c.StaleFallback("b")(ctx, errFbDown) // too old: miss
		fbWantStats(t, c, FallbackCacheStats{Entries: 2, Hits: 2, Stale: 1, Misses: 4})
		c.Load("b") // Load counts nothing
		fbWantStats(t, c, FallbackCacheStats{Entries: 2, Hits: 2, Stale: 1, Misses: 4})
	})
}

func TestFallbackCacheWrap(t *testing.T) {
	t.Parallel()
	c := fbMustCache[string](t, FallbackCacheConfig{})
	type result struct {
		v   string
		err error
	}
	steps := []struct {
		fn   result // what the protected function returns
		want result // what the caller gets
	}{
		{result{"", errFbDown}, result{"", errFbDown}}, // nothing cached yet
		{result{"a", nil}, result{"a", nil}},
		{result{"", errFbDown}, result{"a", nil}},
		{result{"b", nil}, result{"b", nil}},
		{result{"x", errFbDown}, result{"b", nil}},
		{result{"y", errFbDown}, result{"b", nil}},
	}
	i := 0
	fn := c.Wrap("k", func(context.Context) (string, error) {
		r := steps[i].fn
		return r.v, r.err
	})
	for ; i < len(steps); i++ {
		v, err := fn(context.Background())
		if got := (result{v, err}); got != steps[i].want {
			t.Errorf("call %d = %+v; want %+v", i, got, steps[i].want)
		}
	}
	fbWantStats(t, c, FallbackCacheStats{Entries: 1, Hits: 3, Misses: 1})

	// Another key has its own value.
	other := c.Wrap("other", func(context.Context) (string, error) { return "", errFbDown })
	if v, err := other(context.Background()); v != "" || err != errFbDown {
		t.Errorf("Wrap(other)() = (%q, %v); want (\"\", %v)", v, err, errFbDown)
	}

	// The caller's own cancellation is passed back, not answered from the cache.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	canceled := c.Wrap("k", func(ctx context.Context) (string, error) { return "", ctx.Err() })
	if v, err := canceled(ctx); v != "" || err != context.Canceled {
		t.Errorf("Wrap(k)(canceled ctx) = (%q, %v); want (\"\", context.Canceled)", v, err)
	}
	fbWantStats(t, c, FallbackCacheStats{Entries: 1, Hits: 3, Misses: 2})
}

func TestFallbackCacheConcurrent(t *testing.T) {
	t.Parallel()
	const (
		goroutines = 16
		ops        = 500
		maxEntries = 4
	)
	c := fbMustCache[int](t, FallbackCacheConfig{MaxEntries: maxEntries, MaxAge: time.Hour})
	keys := []string{"a", "b", "c", "d", "e", "f"}
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range ops {
				k := keys[(g+i)%len(keys)]
				switch i % 5 {
				case 0:
					c.Store(k, i)
				case 1:
					c.Load(k)
				case 2:
					c.Fallback(k)(context.Background(), errFbDown)
				case 3:
					c.StaleFallback(k)(context.Background(), errFbDown)
				case 4:
					c.Wrap(k, func(context.Context) (int, error) { return i, nil })(context.Background())
				}
				if s := c.Stats(); s.Entries > maxEntries {
					t.Errorf("Stats().Entries = %d; want at most %d", s.Entries, maxEntries)
					return
				}
			}
		})
	}
	wg.Wait()
	s := c.Stats()
	const fallbacks = goroutines * ops * 2 / 5 // cases 2 and 3
	if s.Hits+s.Misses != fallbacks {
		t.Errorf("Stats() = %+v: Hits+Misses = %d; want %d", s, s.Hits+s.Misses, fallbacks)
	}
	if s.Stale > s.Hits || s.Entries != maxEntries {
		t.Errorf("Stats() = %+v; want Stale <= Hits and Entries == %d", s, maxEntries)
	}
}

func BenchmarkWithFallback(b *testing.B) {
	ctx := context.Background()
	b.Run("success", func(b *testing.B) {
		fn := WithFallback(func(context.Context) (int, error) { return 1, nil }, FallbackValue(2))
		b.ReportAllocs()
		for b.Loop() {
			if v, _ := fn(ctx); v != 1 {
				b.Fatalf("fn() = %d; want 1", v)
			}
		}
	})
	b.Run("fallback", func(b *testing.B) {
		fn := WithFallback(func(context.Context) (int, error) { return 0, errFbDown }, FallbackValue(2))
		b.ReportAllocs()
		for b.Loop() {
			if v, _ := fn(ctx); v != 2 {
				b.Fatalf("fn() = %d; want 2", v)
			}
		}
	})
	b.Run("cache hit", func(b *testing.B) {
		c := fbMustCache[int](b, FallbackCacheConfig{})
		c.Store("k", 3)
		fn := WithFallback(func(context.Context) (int, error) { return 0, errFbDown }, c.Fallback("k"))
		b.ReportAllocs()
		for b.Loop() {
			if v, _ := fn(ctx); v != 3 {
				b.Fatalf("fn() = %d; want 3", v)
			}
		}
	})
}

// Bug 12 of the pipeline issue: when a fallback panicked, the call
// disappeared from resilience.calls.
func TestPanickingFallbackIsRecorded(t *testing.T) {
	name := uniqueName("fallback-panics")
	fn := Compose(failFunc, Stack[int]{Name: name, Fallback: func(context.Context, error) (int, error) {
		panic("fallback bug")
	}})
	mustPanic(t, func() { fn(context.Background()) })
	if got := callsRecorded(name); got["failure"] != 1 || len(got) != 1 {
		t.Errorf("resilience.calls = %v; want the call recorded once, as a failure", got)
	}
}

// Found in review of the pipeline change; it failed before the fix.
// FallbackCache.Wrap around a protected Func wraps a closure (Record's), so
// the edge registry never sees that it nests a protected call: the call is
// recorded by both edges.
func TestFallbackCacheWrapOfProtectedFuncRecordsOnce(t *testing.T) {
	const name = "cache-wrap"
	cache, err := NewFallbackCache[int](FallbackCacheConfig{})
	if err != nil {
		t.Fatal(err)
	}
	inner := Compose(func(context.Context) (int, error) { return 7, nil }, Stack[int]{Name: name})
	fn := cache.Wrap("k", inner)
	before := callsRecorded(name)["success"]
	if _, err := fn(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := callsRecorded(name)["success"] - before; got != 1 {
		t.Errorf("one call through cache.Wrap(Compose(...)) recorded %d times in resilience.calls; want 1", got)
	}
}

// Found in review of the pipeline change; it failed before the fix.
// The package's own FallbackCache example, WithFallback(cache.Record(key,
// fn), cache.StaleFallback(key)), with fn a protected Func: Record's
// closure hides fn from the edge registry, so the call is recorded twice,
// once under fn's name and once under "unnamed" (the outer edge cannot
// see fn's name either). Under a retry, the inner is recorded once per
// attempt, bug 8 of the issue again.
func TestFallbackCacheRecordOfProtectedFuncRecordsOnce(t *testing.T) {
	const name = "record"
	cache, err := NewFallbackCache[int](FallbackCacheConfig{})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	inner := Compose(func(context.Context) (int, error) {
		n++
		if n%3 != 0 {
			return 0, errBoom
		}
		return 1, nil
	}, Stack[int]{Name: name})
	r := mustRetry(t, RetryConfig{MaxAttempts: 3, Strategy: RetryFixed, InitialDelay: time.Nanosecond, MaxDelay: time.Nanosecond})
	for _, tc := range []struct {
		how string
		fn  Func[int]
	}{
		{"WithFallback(cache.Record(k, Compose(...)), cache.StaleFallback(k)) then WithRetry", WithRetry(WithFallback(cache.Record("k", inner), cache.StaleFallback("k")), r)},
		{"Compose(cache.Record(k, Compose(...)), Stack{Name, Retry})", Compose(cache.Record("k", inner), Stack[int]{Name: name, Retry: r})},
	} {
		n = 0
		before := callsRecorded(name)
		beforeU := callsRecorded(unnamed)
		if _, err := tc.fn(context.Background()); err != nil {
			t.Fatal(err)
		}
		after, afterU := callsRecorded(name), callsRecorded(unnamed)
		got := fmt.Sprintf("%s success:%d failure:%d, unnamed:%d", name, after["success"]-before["success"], after["failure"]-before["failure"],
			afterU["success"]+afterU["failure"]-beforeU["success"]-beforeU["failure"])
		if want := name + " success:1 failure:0, unnamed:0"; got != want {
			t.Errorf("%s: one call (3 attempts) recorded as %q; want %q", tc.how, got, want)
		}
	}
}

// sliceErrors is an error of an uncomparable type, as slice-typed
// validation errors are (go-playground's ValidationErrors).
type sliceErrors []error

func (e sliceErrors) Error() string { return "invalid" }

// Found in review: applyFallback compared the fallback's error with the
// call's by ==, which panics for an error of an uncomparable type that the
// fallback hands back (a cache miss does).
func TestFallbackUncomparableErrorDoesNotPanic(t *testing.T) {
	cache, err := NewFallbackCache[int](FallbackCacheConfig{})
	if err != nil {
		t.Fatal(err)
	}
	fn := WithFallback(func(context.Context) (int, error) { return 0, sliceErrors{errBoom} }, cache.Fallback("missing"))
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("a cache miss on an uncomparable error panicked: %v", r)
		}
	}()
	if _, err := fn(context.Background()); fmt.Sprintf("%T", err) != "resilience.sliceErrors" {
		t.Errorf("err = %v (%T); want the original error back", err, err)
	}
}
