package benchmarks

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if any test or benchmark leaves a goroutine behind:
// a timer's, a bulkhead waiter's, or an HTTP connection's.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
