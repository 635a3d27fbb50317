// Package term colours breaker states for the examples' terminal output:
// the original design's "visual circuit breaker state in logs".
package term

import (
	"io"
	"os"

	"github.com/resilience-go/resilience"
)

// The ANSI colours of the breaker states.
const (
	green  = "\x1b[32m"
	yellow = "\x1b[33m"
	red    = "\x1b[31m"
	reset  = "\x1b[0m"
)

// IsTerminal reports whether w is a terminal that should get colours: an
// *os.File that is a character device, with NO_COLOR (https://no-color.org)
// unset. Anything else, a file, a pipe or a test's buffer, gets plain text.
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok || os.Getenv("NO_COLOR") != "" {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// Paint returns a breaker state's name, coloured when color is true: green
// for closed, yellow for half-open, red for open.
func Paint(s resilience.State, color bool) string {
	if !color {
		return s.String()
	}
	c := green
	switch s {
	case resilience.StateHalfOpen:
		c = yellow
	case resilience.StateOpen:
		c = red
	}
	return c + s.String() + reset
}
