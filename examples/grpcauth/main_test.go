package main

import (
	"os"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// Example runs the demo: its output is the same on every run, and is the
// one in resiliencegrpc/README.md.
func Example() {
	if err := run(os.Stdout); err != nil {
		panic(err)
	}
	// Output:
	// grpcauth: fail-closed permission checks over gRPC
	// policies for "authz": 3 attempts of 100ms each; the breaker opens after 2 failed calls for 200ms
	//
	// -- authz is up
	//   user:alice#admin@organization:acme   -> allowed (authz answered, 1 request); breaker closed
	//   user:bob#admin@organization:acme     -> denied  (authz answered, 1 request); breaker closed
	//
	// -- authz degrades: every other request is UNAVAILABLE, retried after its 10ms pushback
	//   user:alice#admin@organization:acme   -> allowed (authz answered, 2 requests); breaker closed
	//
	// -- a malformed permission: INVALID_ARGUMENT, neither retried nor counted
	//   user:alice admin                     -> denied  (fail-closed: InvalidArgument from authz, 1 attempt); breaker closed
	//
	// -- authz slows down past the attempt's timeout: DEADLINE_EXCEEDED, retried and counted
	//   user:alice#admin@organization:acme   -> denied  (fail-closed: DeadlineExceeded after 3 attempts); breaker closed
	//
	// -- authz is down: UNAVAILABLE
	//   user:alice#admin@organization:acme   -> denied  (fail-closed: Unavailable after 3 attempts); breaker open
	//   user:alice#admin@organization:acme   -> denied  (fail-closed: Unavailable, the breaker is open, authz was not called); breaker open
	//
	// -- authz recovers; the breaker's open timeout passes
	//   user:alice#admin@organization:acme   -> allowed (authz answered, 1 request); breaker closed
	//
	// authz received 12 requests
}
