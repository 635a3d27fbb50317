package term

import (
	"bytes"
	"os"
	"testing"

	"github.com/resilience-go/resilience"
)

func TestPaint(t *testing.T) {
	for s, want := range map[resilience.State]string{
		resilience.StateClosed:   "\x1b[32mclosed\x1b[0m",
		resilience.StateHalfOpen: "\x1b[33mhalf-open\x1b[0m",
		resilience.StateOpen:     "\x1b[31mopen\x1b[0m",
	} {
		if got := Paint(s, true); got != want {
			t.Errorf("Paint(%v, true) = %q; want %q", s, got, want)
		}
		if got := Paint(s, false); got != s.String() {
			t.Errorf("Paint(%v, false) = %q", s, got)
		}
	}
}

func TestIsTerminal(t *testing.T) {
	if IsTerminal(&bytes.Buffer{}) {
		t.Error("a buffer is not a terminal")
	}
	f, err := os.CreateTemp(t.TempDir(), "out")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if IsTerminal(f) {
		t.Error("a regular file is not a terminal")
	}
}
