package cowmap

import (
	"strconv"
	"sync"
	"testing"
)

func TestGetKeepsValues(t *testing.T) {
	var m Map[*int]
	made := 0
	newV := func() *int { made++; v := made; return &v }
	a := m.Get("a", newV, 0)
	if got := m.Get("a", newV, 0); got != a {
		t.Errorf("Get(a) again = %p; want %p", got, a)
	}
	b := m.Get("b", newV, 0)
	if got := m.Get("a", newV, 0); got != a || b == a {
		t.Errorf("Get(a) after b = %p; want %p, distinct from %p", got, a, b)
	}
	if made != 2 {
		t.Errorf("made %d values; want 2", made)
	}
	n := 0
	m.Each(func(string, *int) { n++ })
	if n != 2 {
		t.Errorf("Each saw %d keys; want 2", n)
	}
}

func TestGetLimit(t *testing.T) {
	var m Map[int]
	for i := range 5 {
		m.Get(strconv.Itoa(i), func() int { return i }, 3)
	}
	n := 0
	m.Each(func(string, int) { n++ })
	if n != 3 {
		t.Errorf("held %d keys with limit 3", n)
	}
	if got := m.Get("4", func() int { return 40 }, 3); got != 40 {
		t.Errorf("Get past the limit = %d; want a fresh 40", got)
	}
}

func TestGetConcurrent(t *testing.T) {
	var m Map[*int]
	var wg sync.WaitGroup
	got := make([]*int, 8)
	for i := range got {
		wg.Go(func() { got[i] = m.Get("k", func() *int { return new(int) }, 0) })
	}
	wg.Wait()
	for _, p := range got {
		if p != got[0] {
			t.Fatal("concurrent Get of one key returned different values")
		}
	}
}
