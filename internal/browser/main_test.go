package browser

import (
	"log/slog"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	// Breakers log their transitions to slog.Default; the test reads the
	// admin endpoint's own log, which it gives a logger of its own.
	slog.SetDefault(slog.New(slog.DiscardHandler))
	goleak.VerifyTestMain(m)
}
