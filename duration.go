package resilience

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// ParseDuration parses a duration as the original design wrote them, plain
// seconds ("60", "0.25"), or as a Go duration ("1m", "1500ms"). Plain
// seconds are rounded to the nanosecond; values beyond time.Duration's range
// are an error, not a wrap-around.
func ParseDuration(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if f, err := strconv.ParseFloat(s, 64); err == nil {
		ns := f * float64(time.Second)
		if math.IsNaN(ns) || ns >= math.MaxInt64 || ns <= math.MinInt64 {
			return 0, fmt.Errorf("duration %q out of range", s)
		}
		return time.Duration(math.Round(ns)), nil
	}
	return time.ParseDuration(s)
}
