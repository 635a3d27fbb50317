package resiliencegrpc

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/resilience-go/resilience"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"
)

// recvAll reads a stream to its end: the messages, and the error that
// ended it (nil for io.EOF).
func recvAll(s grpc.ServerStreamingClient[healthpb.HealthCheckResponse]) (int, error) {
	n := 0
	for {
		_, err := s.Recv()
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		n++
	}
}

// A stream that fails before its first message is retried on a new stream;
// the caller sees only the answer.
func TestStreamRetriedBeforeFirstMessage(t *testing.T) {
	for _, nw := range networks {
		t.Run(string(nw), func(t *testing.T) {
			reg := registry(t, breaker(1))
			h := newHealth(step{code: codes.Unavailable}, step{sends: 2})
			c := healthClient(t, nw, h, reg)
			s, err := c.Watch(context.Background(), &healthpb.HealthCheckRequest{})
			if err != nil {
				t.Fatal(err)
			}
			n, err := recvAll(s)
			if err != nil || n != 2 {
				t.Fatalf("received %d, %v; want 2 messages and io.EOF", n, err)
			}
			if got := h.hits.Load(); got != 2 {
				t.Errorf("streams opened on the server = %d; want 2", got)
			}
			if st := reg.CircuitBreaker(healthSvc).State(); st != resilience.StateClosed {
				t.Errorf("breaker = %v; want closed", st)
			}
		})
	}
}

// A stream that fails after its first message is not retried: the caller
// gets the message, then the server's status.
func TestStreamNotRetriedAfterFirstMessage(t *testing.T) {
	for _, nw := range networks {
		t.Run(string(nw), func(t *testing.T) {
			reg := registry(t, nil)
			h := newHealth(step{sends: 1, code: codes.Unavailable}, step{sends: 5})
			c := healthClient(t, nw, h, reg)
			s, err := c.Watch(context.Background(), &healthpb.HealthCheckRequest{})
			if err != nil {
				t.Fatal(err)
			}
			n, err := recvAll(s)
			if n != 1 || status.Code(err) != codes.Unavailable || status.Convert(err).Message() != "scripted Unavailable" {
				t.Fatalf("received %d, %v; want 1 message and the server's UNAVAILABLE", n, err)
			}
			if got := h.hits.Load(); got != 1 {
				t.Errorf("streams opened = %d; want 1", got)
			}
		})
	}
}

// A stream whose attempts time out before a first message is retried, then
// fails with DEADLINE_EXCEEDED matching ErrTimeout.
func TestStreamAttemptTimeout(t *testing.T) {
	reg := registry(t, func(c *resilience.Config) { c.Timeouts[healthKey] = 50 * time.Millisecond })
	h := newHealth(step{block: true})
	c := healthClient(t, bufnet, h, reg)
	s, err := c.Watch(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = recvAll(s)
	if status.Code(err) != codes.DeadlineExceeded || !errors.Is(err, resilience.ErrTimeout) {
		t.Fatalf("err = %v; want DEADLINE_EXCEEDED matching ErrTimeout", err)
	}
	if got := h.hits.Load(); got != 3 {
		t.Errorf("streams opened = %d; want 3", got)
	}
}

// The caller's cancellation before a first message is CANCELED, not
// retried, not counted.
func TestStreamCallerCancelNotCounted(t *testing.T) {
	reg := registry(t, breaker(1))
	entered := make(chan struct{})
	h := newHealth(step{block: true, entered: entered})
	c := healthClient(t, tcp, h, reg)
	ctx, cancel := context.WithCancel(context.Background())
	s, err := c.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		<-entered
		cancel()
	}()
	_, err = recvAll(s)
	if status.Code(err) != codes.Canceled {
		t.Fatalf("err = %v; want CANCELED", err)
	}
	if got := h.hits.Load(); got != 1 {
		t.Errorf("streams opened = %d; want 1", got)
	}
	if c := reg.CircuitBreaker(healthSvc).Counts(); c.TotalFailures != 0 {
		t.Errorf("breaker counts = %+v; want no failure", c)
	}
}

// A neutral status ends a stream at once, as the server sent it.
func TestStreamNeutralStatus(t *testing.T) {
	reg := registry(t, breaker(1))
	h := newHealth(step{code: codes.PermissionDenied})
	c := healthClient(t, bufnet, h, reg)
	s, err := c.Watch(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := recvAll(s); status.Code(err) != codes.PermissionDenied || h.hits.Load() != 1 {
		t.Fatalf("err = %v, hits %d; want PERMISSION_DENIED once", err, h.hits.Load())
	}
	if st := reg.CircuitBreaker(healthSvc).State(); st != resilience.StateClosed {
		t.Errorf("breaker = %v; want closed", st)
	}
}

// An open breaker rejects NewStream itself, without reaching the server.
func TestStreamRejectedByOpenBreaker(t *testing.T) {
	reg := registry(t, func(c *resilience.Config) {
		breaker(1)(c)
		c.Retry.MaxAttempts = 1
	})
	h := newHealth(step{code: codes.Unavailable})
	c := healthClient(t, bufnet, h, reg)
	s, err := c.Watch(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := recvAll(s); status.Code(err) != codes.Unavailable {
		t.Fatalf("first stream: %v; want UNAVAILABLE", err)
	}
	_, err = c.Watch(context.Background(), &healthpb.HealthCheckRequest{})
	if !errors.Is(err, resilience.ErrCircuitOpen) || status.Code(err) != codes.Unavailable {
		t.Fatalf("NewStream with the breaker open: %v; want UNAVAILABLE matching ErrCircuitOpen", err)
	}
	if got := h.hits.Load(); got != 1 {
		t.Errorf("streams opened = %d; want 1", got)
	}
}

// The bulkhead slot is held from the first attempt until the stream ends:
// read to its end, or cancelled.
func TestStreamHoldsSlotUntilEnd(t *testing.T) {
	reg := registry(t, func(c *resilience.Config) {
		c.Bulkheads[healthKey] = resilience.BulkheadConfig{Limit: 1, FailFast: true}
		c.Retry.MaxAttempts = 1
	})
	b := reg.Bulkhead(healthSvc)
	h := newHealth(step{sends: 1, block: true}, step{sends: 1})
	c := healthClient(t, tcp, h, reg)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := c.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatal(err)
	}
	if got := b.Stats().Active; got != 1 {
		t.Fatalf("after the first message: Active = %d; want 1", got)
	}
	if _, err := c.Watch(context.Background(), &healthpb.HealthCheckRequest{}); !errors.Is(err, resilience.ErrBulkheadFull) {
		t.Fatalf("a second stream while the first is open: %v; want ErrBulkheadFull", err)
	}
	cancel()
	waitFor(t, "the cancelled stream's slot to be given back", func() bool { return b.Stats().Active == 0 })

	// Read to its end: given back by the RecvMsg that returns io.EOF.
	s, err = c.Watch(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatal(err)
	}
	if got := b.Stats().Active; got != 1 {
		t.Fatalf("Active = %d; want 1", got)
	}
	if _, err := s.Recv(); err != io.EOF {
		t.Fatalf("Recv = %v; want io.EOF", err)
	}
	if got := b.Stats().Active; got != 0 {
		t.Fatalf("after io.EOF: Active = %d; want 0", got)
	}
}

// waitFor waits for cond, which another goroutine makes true, for at most
// 10s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// inputServer is grpc_testing's TestService, whose StreamingInputCall
// fails its first stream after reading every message, and sums the
// payloads of the next.
type inputServer struct {
	testpb.UnimplementedTestServiceServer
	mu      sync.Mutex
	streams [][]int // payload sizes each stream received
	calls   atomic.Int32
}

func (s *inputServer) StreamingInputCall(ss grpc.ClientStreamingServer[testpb.StreamingInputCallRequest, testpb.StreamingInputCallResponse]) error {
	n := s.calls.Add(1)
	var sizes []int
	sum := 0
	for {
		m, err := ss.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		sizes = append(sizes, len(m.GetPayload().GetBody()))
		sum += len(m.GetPayload().GetBody())
	}
	s.mu.Lock()
	s.streams = append(s.streams, sizes)
	s.mu.Unlock()
	if n == 1 {
		return status.Error(codes.Unavailable, "first stream fails")
	}
	return ss.SendAndClose(&testpb.StreamingInputCallResponse{AggregatedPayloadSize: int32(sum)})
}

// inputStream serves an inputServer on nw and opens a StreamingInputCall
// to it through the stream interceptor.
func inputStream(t *testing.T, nw network) (*inputServer, grpc.ClientStreamingClient[testpb.StreamingInputCallRequest, testpb.StreamingInputCallResponse]) {
	t.Helper()
	srv := &inputServer{}
	cc := serve(t, nw, func(s *grpc.Server) { testpb.RegisterTestServiceServer(s, srv) }, nil,
		grpc.WithStreamInterceptor(StreamClientInterceptor(registry(t, nil))))
	s, err := testpb.NewTestServiceClient(cc).StreamingInputCall(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return srv, s
}

// The messages sent before the first response are sent again, in order,
// to the retried stream.
func TestStreamReplaysSentMessages(t *testing.T) {
	for _, nw := range networks {
		t.Run(string(nw), func(t *testing.T) {
			srv, s := inputStream(t, nw)
			want := []int{1, 2, 3, 4}
			for _, n := range want {
				if err := s.Send(&testpb.StreamingInputCallRequest{Payload: &testpb.Payload{Body: make([]byte, n)}}); err != nil {
					t.Fatal(err)
				}
			}
			resp, err := s.CloseAndRecv()
			if err != nil || resp.GetAggregatedPayloadSize() != 10 {
				t.Fatalf("CloseAndRecv = %v, %v; want 10", resp, err)
			}
			srv.mu.Lock()
			defer srv.mu.Unlock()
			if len(srv.streams) != 2 {
				t.Fatalf("streams = %v; want 2", srv.streams)
			}
			for i, got := range srv.streams {
				if len(got) != len(want) {
					t.Fatalf("stream %d received %v; want %v", i, got, want)
				}
				for j := range got {
					if got[j] != want[j] {
						t.Fatalf("stream %d received %v; want %v", i, got, want)
					}
				}
			}
		})
	}
}

// Past the replay buffer's bound, a stream is not retried: it could not
// send everything again.
func TestStreamBeyondReplayLimitNotRetried(t *testing.T) {
	srv, s := inputStream(t, bufnet)
	for range 3 {
		if err := s.Send(&testpb.StreamingInputCallRequest{Payload: &testpb.Payload{Body: make([]byte, replayLimit/2)}}); err != nil {
			t.Fatal(err)
		}
	}
	_, err := s.CloseAndRecv()
	if status.Code(err) != codes.Unavailable || srv.calls.Load() != 1 {
		t.Fatalf("err = %v, streams %d; want UNAVAILABLE from one stream", err, srv.calls.Load())
	}
}

// duplexServer's FullDuplexCall fails every stream at once.
type duplexServer struct {
	testpb.UnimplementedTestServiceServer
	calls atomic.Int32
}

func (s *duplexServer) FullDuplexCall(grpc.BidiStreamingServer[testpb.StreamingOutputCallRequest, testpb.StreamingOutputCallResponse]) error {
	s.calls.Add(1)
	return status.Error(codes.Unavailable, "down")
}

// Messages sent while a retry waits are kept for it; past the buffer's
// bound the retry is not made, since it would miss some.
func TestStreamOverflowWhileRetryWaits(t *testing.T) {
	retrying := make(chan struct{}, 1)
	reg := registry(t, func(c *resilience.Config) {
		c.Retry.InitialDelay = 200 * time.Millisecond
		c.Retry.OnRetry = func(int, error, time.Duration) { retrying <- struct{}{} }
	})
	srv := &duplexServer{}
	cc := serve(t, bufnet, func(s *grpc.Server) { testpb.RegisterTestServiceServer(s, srv) }, nil,
		grpc.WithStreamInterceptor(StreamClientInterceptor(reg)))
	s, err := testpb.NewTestServiceClient(cc).FullDuplexCall(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	recvErr := make(chan error, 1)
	go func() {
		_, err := s.Recv()
		recvErr <- err
	}()
	<-retrying // the first stream failed; the retry waits
	for range 3 {
		msg := &testpb.StreamingOutputCallRequest{Payload: &testpb.Payload{Body: make([]byte, replayLimit/2)}}
		if err := s.Send(msg); err != nil {
			t.Fatalf("Send while the retry waits: %v; want it kept", err)
		}
	}
	err = <-recvErr
	if status.Code(err) != codes.Unavailable || srv.calls.Load() != 1 {
		t.Fatalf("Recv = %v after %d streams; want UNAVAILABLE after 1", err, srv.calls.Load())
	}
}

// A stream idle past TIMEOUT_<SERVICE>_IDLE after its first message is cut:
// DEADLINE_EXCEEDED matching ErrTimeout, its slot given back.
func TestStreamIdleTimeout(t *testing.T) {
	reg := registry(t, func(c *resilience.Config) {
		c.IdleTimeouts = map[string]time.Duration{healthKey: 100 * time.Millisecond}
		c.Bulkheads[healthKey] = resilience.BulkheadConfig{Limit: 1}
	})
	h := newHealth(step{sends: 1, block: true})
	c := healthClient(t, tcp, h, reg)
	s, err := c.Watch(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatal(err)
	}
	_, err = s.Recv()
	if status.Code(err) != codes.DeadlineExceeded || !errors.Is(err, resilience.ErrTimeout) {
		t.Fatalf("Recv after 100ms idle: %v; want DEADLINE_EXCEEDED matching ErrTimeout", err)
	}
	if got := reg.Bulkhead(healthSvc).Stats().Active; got != 0 {
		t.Fatalf("Active = %d; want 0", got)
	}
}

// echoServer's FullDuplexCall answers each message with one of the same
// size, until the client closes its side.
type echoServer struct {
	testpb.UnimplementedTestServiceServer
}

func (echoServer) FullDuplexCall(ss grpc.BidiStreamingServer[testpb.StreamingOutputCallRequest, testpb.StreamingOutputCallResponse]) error {
	for {
		m, err := ss.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := ss.Send(&testpb.StreamingOutputCallResponse{Payload: m.GetPayload()}); err != nil {
			return err
		}
	}
}

// A bidirectional stream carries on as usual after its first message.
func TestStreamBidiAfterCommit(t *testing.T) {
	reg := registry(t, nil)
	cc := serve(t, bufnet, func(s *grpc.Server) { testpb.RegisterTestServiceServer(s, echoServer{}) }, nil,
		grpc.WithStreamInterceptor(StreamClientInterceptor(reg)))
	s, err := testpb.NewTestServiceClient(cc).FullDuplexCall(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 3; i++ {
		if err := s.Send(&testpb.StreamingOutputCallRequest{Payload: &testpb.Payload{Body: make([]byte, i)}}); err != nil {
			t.Fatal(err)
		}
		m, err := s.Recv()
		if err != nil || len(m.GetPayload().GetBody()) != i {
			t.Fatalf("echo %d: %v, %v", i, m, err)
		}
	}
	if err := s.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != io.EOF {
		t.Fatalf("Recv after CloseSend: %v; want io.EOF", err)
	}
}

// TestStreamReplayAliasesCallerMessages: a caller that reuses its request
// message, or the buffer its payload points to (the upload idiom, as
// grpc-go, which encodes in SendMsg, allows), got the last value replayed
// N times to the retried stream. The stream keeps copies.
func TestStreamReplayAliasesCallerMessages(t *testing.T) {
	srv, s := inputStream(t, bufnet)
	msg := &testpb.StreamingInputCallRequest{Payload: &testpb.Payload{}}
	buf := make([]byte, 3)
	for i := 1; i <= 3; i++ {
		msg.Payload.Body = buf[:i] // the same message and the same buffer
		if err := s.Send(msg); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := s.CloseAndRecv()
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if err != nil || resp.GetAggregatedPayloadSize() != 6 || len(srv.streams) != 2 {
		t.Errorf("streams received %v; sum %d, err %v; want [[1 2 3] [1 2 3]], 6", srv.streams, resp.GetAggregatedPayloadSize(), err)
	}
}

// failThenEcho's FullDuplexCall fails its first stream after reading two
// messages, and echoes on the next.
type failThenEcho struct {
	testpb.UnimplementedTestServiceServer
	calls atomic.Int32
}

func (s *failThenEcho) FullDuplexCall(ss grpc.BidiStreamingServer[testpb.StreamingOutputCallRequest, testpb.StreamingOutputCallResponse]) error {
	if s.calls.Add(1) == 1 {
		ss.Recv()
		ss.Recv()
		return status.Error(codes.Unavailable, "down")
	}
	return echoServer{}.FullDuplexCall(ss)
}

// TestStreamReplayRacesCallerBuffer: the retry's goroutine marshalled the
// kept messages while the caller refilled the buffer they pointed to, a
// data race (run with -race).
func TestStreamReplayRacesCallerBuffer(t *testing.T) {
	reg := registry(t, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cc := serve(t, bufnet, func(s *grpc.Server) { testpb.RegisterTestServiceServer(s, &failThenEcho{}) }, nil,
		grpc.WithStreamInterceptor(StreamClientInterceptor(reg)))
	s, err := testpb.NewTestServiceClient(cc).FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	received := make(chan int)
	go func() {
		n := 0
		defer func() { received <- n }()
		for {
			m, err := s.Recv()
			if err != nil {
				return
			}
			if b := m.GetPayload().GetBody(); len(b) > 0 && b[0] != b[len(b)-1] {
				t.Errorf("an echo mixes two messages' bytes: %d, %d", b[0], b[len(b)-1])
			}
			n++
		}
	}()
	buf := make([]byte, 1024)
	const sent = 200
	for i := range sent {
		for j := range buf {
			buf[j] = byte(i)
		}
		if err := s.Send(&testpb.StreamingOutputCallRequest{Payload: &testpb.Payload{Body: buf}}); err != nil {
			t.Fatal(err)
		}
	}
	s.CloseSend()
	if n := <-received; n != sent {
		t.Errorf("echoes = %d; want %d", n, sent)
	}
}

// TestStreamNonProtoMessageCountedAsKiB: a message that is not a proto was
// kept as a 1 KiB guess, and replayed as the pointer it is. Its size and
// copy are unknown: the stream is not replayed once one is sent.
func TestStreamNonProtoMessageCountedAsKiB(t *testing.T) {
	s := &clientStream{replayable: true}
	s.keepLocked(&testpb.Empty{})
	if !s.replayable || len(s.buf) != 1 {
		t.Fatalf("after a proto: replayable %v, %d kept; want true, 1", s.replayable, len(s.buf))
	}
	s.keepLocked(&struct{ b []byte }{})
	if s.replayable || s.buf != nil {
		t.Errorf("after a message that is not a proto: replayable %v, %d kept; want false, none", s.replayable, len(s.buf))
	}
}

// TestStreamConnCloseBeforeFirstMessage: a stream whose ClientConn closed
// before its first message kept its slot and its goroutine until the
// attempt's timeout, which then counted against the breaker.
func TestStreamConnCloseBeforeFirstMessage(t *testing.T) {
	reg := registry(t, func(c *resilience.Config) {
		breaker(1)(c)
		c.Timeouts[healthKey] = 5 * time.Second
		c.Bulkheads[healthKey] = resilience.BulkheadConfig{Limit: 1, FailFast: true}
	})
	b := reg.Bulkhead(healthSvc)
	entered := make(chan struct{})
	h := newHealth(step{block: true, entered: entered})
	cc := serve(t, bufnet, func(s *grpc.Server) { healthpb.RegisterHealthServer(s, h) }, nil,
		grpc.WithStreamInterceptor(StreamClientInterceptor(reg)))
	if _, err := healthpb.NewHealthClient(cc).Watch(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	<-entered
	cc.Close()
	deadline := time.Now().Add(time.Second)
	for b.Stats().Active != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the slot is still held 1s after ClientConn.Close; want it given back")
		}
		time.Sleep(time.Millisecond)
	}
	if st := reg.CircuitBreaker(healthSvc).State(); st != resilience.StateClosed {
		t.Errorf("breaker = %v after ClientConn.Close; want closed: nothing failed", st)
	}
}

// fakeStream is a grpc.ClientStream of which only Context works.
type fakeStream struct {
	grpc.ClientStream
	ctx context.Context
}

func (f fakeStream) Context() context.Context { return f.ctx }

// TestStreamFirstMessageLostToTimeout: a first message and the attempt's
// timeout arriving together were a coin toss; the message wins.
func TestStreamFirstMessageLostToTimeout(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for range 100 {
		a := &streamAttempt{cs: fakeStream{ctx: context.Background()}, verdict: make(chan error, 1)}
		a.verdict <- nil
		if v, ended := awaitVerdict(ctx, a); v != nil || ended {
			t.Fatalf("awaitVerdict = %v, ended %v; want the first message's nil verdict", v, ended)
		}
	}
}
