package resilience

import "errors"

// checkError is a result that a Check rejected: to the retry, the hedge,
// the breaker and the fallback it is a failure like any error, retryable
// unless the Check's error says otherwise with a Retryable() bool method,
// and waited for as its RetryAfter() time.Duration method, if any, asks.
type checkError struct{ err error }

func (e *checkError) Error() string { return e.err.Error() }
func (e *checkError) Unwrap() error { return e.err }

// Retryable makes a rejected result worth another attempt by default: the
// Check said the answer was bad, not that asking again is pointless.
func (e *checkError) Retryable() bool {
	var r interface{ Retryable() bool }
	if errors.As(e.err, &r) {
		return r.Retryable()
	}
	return true
}
