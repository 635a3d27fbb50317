package resilience

import (
	"bytes"
	"errors"
	"io"
	"net/http"
)

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

// checkResponse runs check on resp. check may read the body: what it reads
// is recorded, and the body is put back whole, what was read first, so
// that the caller reads the response as it came. Only what check read is
// buffered: a streamed body stays streamed.
func checkResponse(resp *http.Response, check func(*http.Response) error) error {
	orig := resp.Body
	var peek *peekBody
	if orig != nil && orig != http.NoBody {
		peek = &peekBody{ReadCloser: orig}
		resp.Body = peek
	}
	err := check(resp)
	if peek != nil {
		resp.Body = orig
		if peek.buf.Len() > 0 || peek.err != nil {
			resp.Body = &replayBody{Reader: io.MultiReader(&peek.buf, &errReader{peek.err, orig}), ReadCloser: orig}
		}
	}
	if err != nil {
		return &checkError{err}
	}
	return nil
}

// peekBody records what is read through it.
type peekBody struct {
	io.ReadCloser
	buf bytes.Buffer
	err error // the error that ended a read, kept for the caller
}

func (p *peekBody) Read(b []byte) (int, error) {
	n, err := p.ReadCloser.Read(b)
	p.buf.Write(b[:n])
	if err != nil && p.err == nil {
		p.err = err
	}
	return n, err
}

// Close is not passed on: the body belongs to the caller, who closes it.
func (p *peekBody) Close() error { return nil }

// errReader returns err once the recorded bytes are read, if the peek
// ended with one, else reads on from r.
type errReader struct {
	err error
	r   io.Reader
}

func (e *errReader) Read(b []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	return e.r.Read(b)
}

// replayBody is a checked body: the bytes the check read, then the rest.
type replayBody struct {
	io.Reader
	io.ReadCloser
}

func (r *replayBody) Read(b []byte) (int, error) { return r.Reader.Read(b) }
