package resiliencegrpc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/resilience-go/resilience"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// replayLimit bounds the messages a stream keeps to replay, in bytes:
// grpc-go's own retry buffer, 256 KiB. Past it a stream is not retried.
const replayLimit = 256 << 10

// StreamClientInterceptor returns an interceptor that runs every stream
// through reg's pipeline for its service, with the status rules, options
// and errors of [UnaryClientInterceptor]. A stream's attempt lasts until
// its first response message: until then a failure is retried by the
// service's policy, on a new stream to which the messages sent so far are
// sent again, in order (copies of them are kept, up to 256 KiB of their
// encoding as grpc-go's own retry does; past that, or once a message that
// is not a proto was sent, the stream is not retried); once a message has been
// received, the stream is the answer, and a later failure goes to the
// caller as it is. NewStream returns once the first attempt's stream is
// open, or with the error that ended the call (an open breaker, say).
//
// The stream holds its bulkhead slot from its first attempt to its end:
// until RecvMsg returns an error (io.EOF included), its context is
// cancelled, or the connection closes, as grpc-go asks of every stream.
// The per-attempt timeout bounds the time to the first message, the
// messages the caller sends before it included; from then on
// TIMEOUT_<SERVICE>_IDLE (default: the attempt's timeout) bounds each
// wait for the next and TIMEOUT_<SERVICE>_STREAM, if set, the whole
// stream, and a stream cut by them fails with DEADLINE_EXCEEDED and an
// error matching resilience.ErrTimeout. Streams are never hedged.
//
// Before the first message, Header returns the header of the attempt then
// open, which a retry may replace, and SendMsg only reports errors that
// are the caller's (a message that cannot be marshalled): a stream that
// ended is reported, and retried, by RecvMsg. The returned stream is safe
// for what a grpc.ClientStream is: one goroutine sending and one
// receiving. The interceptor is safe for concurrent use.
func StreamClientInterceptor(reg *resilience.Registry, opts ...Option) grpc.StreamClientInterceptor {
	c := newClient(reg, opts)
	return func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, full string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		if c.cfg.err != nil {
			return nil, c.cfg.err
		}
		m := c.method(full)
		if m.err != nil {
			return nil, m.err
		}
		s := &clientStream{
			ctx: c.cfg.keyed(ctx, full), m: m, desc: desc, cc: cc, streamer: streamer, opts: opts,
			replayable: true, changed: make(chan struct{}),
		}
		go s.run()
		a, err := s.next(nil)
		if a == nil && err != nil && err != io.EOF {
			return nil, err
		}
		return s, nil
	}
}

type streamKey struct{}

// clientStream is the stream the caller uses. Its attempts run in the
// goroutine of run, inside the pipeline: an attempt opens a stream, sends
// it the messages kept so far, makes it the current one, and waits for the
// caller's RecvMsg to say how its first message went.
type clientStream struct {
	ctx      context.Context
	m        *method
	desc     *grpc.StreamDesc
	cc       *grpc.ClientConn
	streamer grpc.Streamer
	opts     []grpc.CallOption

	committed atomic.Pointer[streamAttempt] // the attempt that is the answer
	kept      *resilience.Kept              // its slot, set before committed

	mu         sync.Mutex
	cur        *streamAttempt // open, and caught up with buf; nil between attempts
	last       *streamAttempt // the latest attempt opened, for Trailer
	buf        []any          // messages sent before the first received
	bufSize    int
	replayable bool // buf holds every message sent
	closeSent  bool
	lastErr    error // the last failed attempt's, for an attempt not made
	done       bool  // the pipeline ended
	final      error // the stream's error once done and not committed
	panicked   any
	changed    chan struct{} // closed, and replaced, on each change above
}

// streamAttempt is one attempt's stream.
type streamAttempt struct {
	cs         grpc.ClientStream
	verdict    chan error    // the first RecvMsg's error; nil: a message came
	decided    chan struct{} // closed once the attempt committed or failed
	sendFailed atomic.Bool   // a send found the stream ended
	receiving  atomic.Bool   // the caller's RecvMsg is waiting on cs
}

// notifyLocked wakes everyone waiting for a change. s.mu is held.
func (s *clientStream) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// run runs the stream's call through the pipeline, in its own goroutine.
func (s *clientStream) run() {
	var res result
	var err error
	defer func() {
		p := recover()
		s.mu.Lock()
		defer s.mu.Unlock()
		s.done, s.cur = true, nil
		switch {
		case p != nil:
			// Handed to the caller's goroutine, where it belongs.
			s.panicked = p
			s.final = status.Error(codes.Internal, fmt.Sprint("resiliencegrpc: panic: ", p))
		case err != nil:
			s.final = callerError(s.m.service, err)
		case s.committed.Load() == nil:
			s.final = res.err
		}
		s.buf = nil
		s.notifyLocked()
	}()
	ctx := context.WithValue(s.ctx, streamKey{}, s)
	res, err = s.m.stream(ctx)
}

func (m *method) attemptStream(ctx context.Context) (result, error) {
	s, _ := ctx.Value(streamKey{}).(*clientStream)
	if s == nil {
		return result{}, errNoCall // unreachable
	}
	s.mu.Lock()
	replayable, lastErr := s.replayable, s.lastErr
	s.mu.Unlock()
	if lastErr != nil && (!replayable || finalOf(lastErr) != nil) {
		// Messages were dropped from the buffer since the last attempt
		// failed, and another would send a part of them; or gRFC A6's
		// pushback or the method's idempotency said not to try again,
		// whatever a RetryIf says.
		return result{}, resilience.Permanent(lastErr)
	}
	cs, err := s.streamer(ctx, s.desc, s.cc, m.full, s.opts...)
	if err != nil {
		perr, neutral := judge(ctx, err, nil, m.idempotent)
		if neutral {
			return result{err: err}, nil
		}
		s.failed(perr)
		return result{}, perr
	}
	a := &streamAttempt{cs: cs, verdict: make(chan error, 1), decided: make(chan struct{})}
	defer close(a.decided)
	if !s.publish(a) {
		// The messages outgrew the buffer before this retry caught up:
		// it would miss some. Its stream ends with the attempt's context.
		s.mu.Lock()
		lastErr = s.lastErr
		s.mu.Unlock()
		return result{}, resilience.Permanent(lastErr)
	}
	v, ended := awaitVerdict(ctx, a)
	switch {
	case v == nil:
		s.commit(a, resilience.KeepAttempt(ctx))
		return result{}, nil
	case v == io.EOF:
		// The stream ended well without a message: an answer.
		s.retire(a)
		return result{err: io.EOF}, nil
	}
	s.retire(a)
	var trailer metadata.MD
	if !ended {
		trailer = cs.Trailer() // RecvMsg returned its error: the trailer is in
	}
	perr, neutral := judge(ctx, v, trailer, m.idempotent)
	if neutral {
		return result{err: v}, nil
	}
	s.mu.Lock()
	if ae := (*attemptError)(nil); errors.As(perr, &ae) && !s.replayable {
		ae.retryable = false
	}
	s.mu.Unlock()
	s.failed(perr)
	return result{}, perr
}

// awaitVerdict waits for the first RecvMsg's verdict on a, or for the end
// of the attempt's context or of a's stream, and returns the verdict or
// the status of the context that ended it (ended set). A verdict that
// came with the end is preferred: its message, or its status and trailer,
// are the stream's.
func awaitVerdict(ctx context.Context, a *streamAttempt) (v error, ended bool) {
	var done context.Context
	select {
	case v = <-a.verdict:
		return v, false
	case <-ctx.Done():
		// The attempt's timeout, or the caller gave up, before a
		// message: the stream ends with the attempt's context.
		done = ctx
	case <-a.cs.Context().Done():
		if a.receiving.Load() {
			// The caller's RecvMsg ended the stream: its verdict, with
			// the server's status, is on its way.
			select {
			case v = <-a.verdict:
				return v, false
			case <-ctx.Done():
				done = ctx
			}
			break
		}
		// grpc-go ended the stream before a message, no RecvMsg
		// waiting (ClientConn.Close): the attempt ends now, giving back
		// its slot, not with the attempt's timeout.
		done = a.cs.Context()
	}
	select {
	case v = <-a.verdict:
		return v, false
	default:
		return ctxStatus(done.Err()), true
	}
}

func (s *clientStream) failed(err error) {
	s.mu.Lock()
	s.lastErr = err
	s.mu.Unlock()
}

// publish sends the kept messages to a new attempt's stream and makes it
// the current one once it has caught up: the caller's sends meanwhile are
// kept, and sent by this loop, so that the order holds and only one
// goroutine sends on the stream at a time. It returns false, publishing
// nothing, when the buffer was dropped before the stream caught up.
func (s *clientStream) publish(a *streamAttempt) bool {
	n := 0
	for {
		s.mu.Lock()
		if !s.replayable && s.lastErr != nil {
			// A retry, and the messages sent before it were dropped.
			s.mu.Unlock()
			return false
		}
		if a.sendFailed.Load() || n >= len(s.buf) {
			closeSend := s.closeSent && !a.sendFailed.Load()
			s.cur, s.last = a, a
			s.notifyLocked()
			s.mu.Unlock()
			if closeSend {
				a.cs.CloseSend()
			}
			return true
		}
		batch := s.buf[n:]
		s.mu.Unlock()
		for _, msg := range batch {
			if err := a.cs.SendMsg(msg); err != nil {
				// The stream ended: RecvMsg will say how.
				a.sendFailed.Store(true)
				break
			}
		}
		n += len(batch)
	}
}

// commit makes a the answer: no more retries, the buffer dropped, and the
// slot kept until the stream ends.
func (s *clientStream) commit(a *streamAttempt, kept *resilience.Kept) {
	s.kept = kept
	if kept != nil {
		// The stream's context ends when grpc-go finishes the stream, on
		// every path it documents: RecvMsg's error, a cancellation, the
		// connection's close.
		context.AfterFunc(a.cs.Context(), kept.Release)
	}
	s.mu.Lock()
	s.buf = nil
	s.committed.Store(a)
	s.notifyLocked()
	s.mu.Unlock()
}

// retire ends a's turn as the current stream.
func (s *clientStream) retire(a *streamAttempt) {
	s.mu.Lock()
	if s.cur == a {
		s.cur = nil
		s.notifyLocked()
	}
	s.mu.Unlock()
}

// next waits for an open attempt other than prev, or for the end: it
// returns the attempt, or nil and the stream's error.
func (s *clientStream) next(prev *streamAttempt) (*streamAttempt, error) {
	for {
		if a := s.committed.Load(); a != nil {
			return a, nil
		}
		s.mu.Lock()
		if p := s.panicked; p != nil {
			s.panicked = nil
			s.mu.Unlock()
			panic(p)
		}
		if s.cur != nil && s.cur != prev {
			a := s.cur
			s.mu.Unlock()
			return a, nil
		}
		if s.done {
			err := s.final
			s.mu.Unlock()
			return nil, err
		}
		ch := s.changed
		s.mu.Unlock()
		<-ch
	}
}

// RecvMsg receives the next message. Before the first, a failure is
// reported to the attempt, which the pipeline retries or ends.
func (s *clientStream) RecvMsg(msg any) error {
	var prev *streamAttempt
	for {
		if a := s.committed.Load(); a != nil {
			return s.recvCommitted(a, msg)
		}
		a, err := s.next(prev)
		if a == nil {
			return err
		}
		if s.committed.Load() == a {
			return s.recvCommitted(a, msg)
		}
		a.receiving.Store(true)
		rerr := a.cs.RecvMsg(msg)
		select {
		case a.verdict <- rerr:
		default:
		}
		<-a.decided
		if s.committed.Load() == a {
			return rerr // nil: the first message
		}
		// Failed, or abandoned by its timeout: a message it brought is
		// dropped, and the next attempt, or the end, decides.
		prev = a
	}
}

func (s *clientStream) recvCommitted(a *streamAttempt, msg any) error {
	err := a.cs.RecvMsg(msg)
	if err == nil {
		s.kept.Touch()
		return nil
	}
	expired := s.kept.Expired()
	s.kept.Release()
	if expired {
		return &Error{
			st:  status.New(codes.DeadlineExceeded, "resiliencegrpc: the stream's idle or stream timeout expired"),
			err: &resilience.Error{Err: resilience.ErrTimeout, Name: s.m.service, Cause: err},
		}
	}
	return err
}

// SendMsg sends a message. Before the first message is received it is
// also kept, to be sent again to a retried stream.
func (s *clientStream) SendMsg(msg any) error {
	if a := s.committed.Load(); a != nil {
		return a.cs.SendMsg(msg)
	}
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		if a := s.committed.Load(); a != nil {
			return a.cs.SendMsg(msg)
		}
		return io.EOF // as grpc-go says of an ended stream: RecvMsg has its status
	}
	if s.replayable {
		s.keepLocked(msg)
	}
	a := s.cur
	s.mu.Unlock()
	if a == nil || a.sendFailed.Load() {
		return nil // kept, for the attempt to come
	}
	err := a.cs.SendMsg(msg)
	if err == io.EOF {
		a.sendFailed.Store(true)
		return nil
	}
	return err
}

// keepLocked keeps a copy of msg to replay, which the caller may change
// or reuse once SendMsg returns, as grpc-go, which encodes it in SendMsg,
// allows. A message that is not a proto, whose size and copy are
// unknown, ends the replay, as outgrowing the buffer does. s.mu is held.
func (s *clientStream) keepLocked(msg any) {
	pm, ok := msg.(proto.Message)
	if ok {
		s.bufSize += proto.Size(pm)
	}
	if !ok || s.bufSize > replayLimit {
		s.buf, s.replayable = nil, false
		return
	}
	s.buf = append(s.buf, proto.Clone(pm))
}

// CloseSend closes the sending side, of the retried streams too.
func (s *clientStream) CloseSend() error {
	if a := s.committed.Load(); a != nil {
		return a.cs.CloseSend()
	}
	s.mu.Lock()
	s.closeSent = true
	a := s.cur
	s.mu.Unlock()
	if a == nil || a.sendFailed.Load() {
		return nil
	}
	return a.cs.CloseSend()
}

// Header returns the header of the answering stream, or before the first
// message, of the attempt open now.
func (s *clientStream) Header() (metadata.MD, error) {
	a, err := s.next(nil)
	if a == nil {
		if err == nil || err == io.EOF {
			err = errors.New("resiliencegrpc: the stream ended before a header")
		}
		return nil, err
	}
	return a.cs.Header()
}

// Trailer returns the trailer of the latest attempt's stream.
func (s *clientStream) Trailer() metadata.MD {
	if a := s.committed.Load(); a != nil {
		return a.cs.Trailer()
	}
	s.mu.Lock()
	a := s.last
	s.mu.Unlock()
	if a == nil {
		return nil
	}
	return a.cs.Trailer()
}

// Context returns the answering stream's context, or the caller's before.
func (s *clientStream) Context() context.Context {
	if a := s.committed.Load(); a != nil {
		return a.cs.Context()
	}
	return s.ctx
}
