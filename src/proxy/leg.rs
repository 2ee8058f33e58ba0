//! One WebSocket leg of a relayed connection: reading frames off its socket into whole
//! messages, answering pings, and writing encoded frames out.
//!
//! Buffers are the point of this module. A leg holds no read buffer between frames: reads go
//! into one scratch buffer per worker thread, and only the start of a frame that has not fully
//! arrived is kept by the leg. Its write buffer is released once it is written out. An idle
//! connection therefore holds two sockets, a little state, and no buffers at all.

use std::cell::RefCell;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWrite;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::close::{Ending, Side};
use super::frame::{self, ClosePayload, FrameError, OpCode, Role};
use crate::upstream::{Io, Socket};

/// The scratch read buffer of each worker thread, and the most one read takes in.
const SCRATCH: usize = 64 * 1024;

/// Leftovers up to this size are copied out of the scratch buffer; a larger partial frame
/// keeps the scratch buffer itself (the next read allocates a new one).
const COPY_LEFTOVER: usize = 4 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// Takes this thread's scratch buffer (allocating one if a leg kept the last one).
fn take_scratch() -> BytesMut {
    let mut buf = SCRATCH_BUF.with(|s| std::mem::take(&mut *s.borrow_mut()));
    buf.clear();
    // Reclaims the whole capacity when the buffer is empty and unshared.
    buf.reserve(SCRATCH);
    buf
}

/// Gives a buffer back to this thread if its slot is empty; otherwise it is freed.
fn give_back(buf: BytesMut) {
    if buf.capacity() >= SCRATCH {
        SCRATCH_BUF.with(|s| {
            let mut slot = s.borrow_mut();
            if slot.capacity() == 0 {
                *slot = buf;
            }
        });
    }
}

/// A message being reassembled from fragments.
struct Fragments {
    text: bool,
    data: Vec<u8>,
}

/// Encoded frames waiting to be written to one leg.
pub(crate) struct Outbox {
    buf: Vec<u8>,
    /// `buf[written..]` is still to be written.
    written: usize,
    /// Client legs mask every frame they send.
    masked: bool,
}

impl Outbox {
    fn new(role: Role) -> Self {
        Outbox {
            buf: Vec::new(),
            written: 0,
            masked: role == Role::Client,
        }
    }

    fn mask(&self) -> Option<[u8; 4]> {
        self.masked.then(rand::random::<[u8; 4]>)
    }

    /// Nothing is waiting to be written.
    pub(crate) fn is_empty(&self) -> bool {
        self.written == self.buf.len()
    }

    /// Bytes waiting to be written.
    pub(crate) fn len(&self) -> usize {
        self.buf.len() - self.written
    }

    /// Queues one data message.
    pub(crate) fn push_data(&mut self, text: bool, payload: &[u8]) {
        let opcode = if text { OpCode::Text } else { OpCode::Binary };
        let mask = self.mask();
        frame::encode(&mut self.buf, opcode, payload, mask);
    }

    /// Queues a message a policy produced.
    pub(crate) fn push_message(&mut self, message: &Message) {
        let mask = self.mask();
        match message {
            Message::Text(t) => frame::encode(&mut self.buf, OpCode::Text, t.as_bytes(), mask),
            Message::Binary(b) => frame::encode(&mut self.buf, OpCode::Binary, b, mask),
            Message::Ping(p) => frame::encode(&mut self.buf, OpCode::Ping, p, mask),
            Message::Pong(p) => frame::encode(&mut self.buf, OpCode::Pong, p, mask),
            Message::Close(f) => self.push_close(f.as_ref()),
            Message::Frame(_) => {}
        }
    }

    /// Queues a close frame.
    pub(crate) fn push_close(&mut self, close: Option<&CloseFrame>) {
        let mask = self.mask();
        frame::encode_close(
            &mut self.buf,
            close.map(|f| (u16::from(f.code), f.reason.as_str())),
            mask,
        );
    }

    /// Writes what is queued; ready once all of it is written and flushed.
    fn poll_write(&mut self, io: &mut Io, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        if !self.buf.is_empty() {
            self.buf.clear();
            self.written = 0;
        }
        // A no-op on TCP; TLS writes out its own buffer.
        Pin::new(&mut *io).poll_flush(cx)
    }

    /// Data messages queued and not (fully) written, found by walking the frames this leg
    /// encoded itself.
    fn undelivered(&self) -> u64 {
        let mut count = 0;
        let mut at = 0;
        while at < self.buf.len() {
            let receiver = if self.masked {
                Role::Server
            } else {
                Role::Client
            };
            let Ok(Some(header)) = frame::parse_header(&self.buf[at..], receiver, usize::MAX)
            else {
                break;
            };
            let end = at + header.frame_len();
            if end > self.written && matches!(header.opcode, OpCode::Text | OpCode::Binary) {
                count += 1;
            }
            at = end;
        }
        count
    }
}

/// One WebSocket leg.
pub(crate) struct Leg {
    io: Io,
    side: Side,
    role: Role,
    max_message_size: usize,
    /// The start of a frame that has not fully arrived; empty (unallocated) between frames.
    partial: BytesMut,
    fragments: Option<Fragments>,
    /// Frames waiting to be written to this leg.
    pub(crate) out: Outbox,
}

impl Leg {
    /// A leg on `socket`, after its handshake.
    pub(crate) fn new(socket: Socket, side: Side, max_message_size: usize) -> Self {
        let role = match side {
            Side::Client => Role::Server,
            Side::Upstream => Role::Client,
        };
        Leg {
            io: socket.io,
            side,
            role,
            max_message_size,
            partial: BytesMut::from(&socket.pre_read[..]),
            fragments: None,
            out: Outbox::new(role),
        }
    }

    /// Writes what is queued to this leg. An error ends the connection as this leg gone.
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Ending>> {
        match ready!(self.out.poll_write(&mut self.io, cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(_) => Poll::Ready(Err(Ending::Gone(self.side))),
        }
    }

    /// Frees the write buffer if nothing waits in it, so an idle leg holds none.
    pub(crate) fn release_buffers(&mut self) {
        if self.out.is_empty() && self.out.buf.capacity() > 0 {
            self.out.buf = Vec::new();
            self.out.written = 0;
        }
    }

    /// Reads what the socket has and hands each whole data message to `deliver` with this
    /// leg's own outbox (for replies to the sender). Pings are answered here and pongs dropped.
    ///
    /// Ready with `Ok` after one read's worth of frames; with `Err` when the leg ended (a close
    /// frame, a dropped connection, a protocol error, a message over the limit) or `deliver`
    /// stopped it.
    pub(crate) fn poll_receive<F>(
        &mut self,
        cx: &mut Context<'_>,
        mut deliver: F,
    ) -> Poll<Result<(), Ending>>
    where
        F: FnMut(bool, &[u8], &mut Outbox) -> Result<(), Ending>,
    {
        let mut buf = if self.partial.is_empty() {
            take_scratch()
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            // Room for the rest of the frame at once (its size was checked against the limit).
            let want = match frame::parse_header(&buf, self.role, self.max_message_size) {
                Ok(Some(h)) => h.frame_len().saturating_sub(buf.len()),
                _ => 0,
            };
            buf.reserve(want.max(COPY_LEFTOVER));
            buf
        };
        // Bytes handed over with the handshake are parsed before the socket is read.
        if buf.is_empty() || !self.has_whole_frame(&buf) {
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut buf) {
                Poll::Pending => {
                    self.keep(buf);
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    self.keep(buf);
                    return Poll::Ready(Err(Ending::Gone(self.side)));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
        let result = self.parse_frames(&mut buf, &mut deliver);
        self.keep(buf);
        Poll::Ready(result)
    }

    /// Whether `buf` starts with a whole frame (or a header that is already an error).
    fn has_whole_frame(&self, buf: &[u8]) -> bool {
        match frame::parse_header(buf, self.role, self.max_message_size) {
            Ok(Some(h)) => buf.len() >= h.frame_len(),
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// Keeps the unparsed rest of `buf` as this leg's partial frame, and gives the scratch
    /// buffer back when the leg does not need it.
    fn keep(&mut self, mut buf: BytesMut) {
        if buf.is_empty() {
            give_back(buf);
        } else if buf.len() <= COPY_LEFTOVER && buf.capacity() >= SCRATCH {
            self.partial = BytesMut::from(&buf[..]);
            buf.clear();
            give_back(buf);
        } else {
            self.partial = buf;
        }
    }

    fn parse_frames<F>(&mut self, buf: &mut BytesMut, deliver: &mut F) -> Result<(), Ending>
    where
        F: FnMut(bool, &[u8], &mut Outbox) -> Result<(), Ending>,
    {
        loop {
            let header = match frame::parse_header(buf, self.role, self.max_message_size) {
                Ok(Some(h)) if buf.len() >= h.frame_len() => h,
                Ok(_) => return Ok(()),
                Err(e) => return Err(self.frame_error(e)),
            };
            let payload = &mut buf[header.header_len..header.frame_len()];
            if let Some(key) = header.mask {
                frame::apply_mask(payload, key);
            }
            let payload = &buf[header.header_len..header.frame_len()];
            match header.opcode {
                OpCode::Text | OpCode::Binary => {
                    if self.fragments.is_some() {
                        return Err(self.protocol("data frame inside a fragmented message"));
                    }
                    let text = header.opcode == OpCode::Text;
                    if header.fin {
                        if text && std::str::from_utf8(payload).is_err() {
                            return Err(Ending::BadUtf8(self.side));
                        }
                        deliver(text, payload, &mut self.out)?;
                    } else {
                        self.fragments = Some(Fragments {
                            text,
                            data: payload.to_vec(),
                        });
                    }
                }
                OpCode::Continuation => {
                    let Some(fragments) = &mut self.fragments else {
                        return Err(self.protocol("continuation frame without a message"));
                    };
                    if fragments.data.len() + payload.len() > self.max_message_size {
                        return Err(Ending::TooBig(self.side));
                    }
                    fragments.data.extend_from_slice(payload);
                    if header.fin {
                        let Fragments { text, data } =
                            self.fragments.take().expect("fragments checked above");
                        if text && std::str::from_utf8(&data).is_err() {
                            return Err(Ending::BadUtf8(self.side));
                        }
                        deliver(text, &data, &mut self.out)?;
                    }
                }
                OpCode::Ping => {
                    let mask = self.out.mask();
                    frame::encode(&mut self.out.buf, OpCode::Pong, payload, mask);
                }
                OpCode::Pong => {}
                OpCode::Close => return Err(self.close_received(payload)),
            }
            buf.advance(header.frame_len());
        }
    }

    fn close_received(&self, payload: &[u8]) -> Ending {
        match frame::parse_close(payload) {
            Ok(ClosePayload::Empty) => Ending::Closed(self.side, None),
            Ok(ClosePayload::Code(code, reason)) => Ending::Closed(
                self.side,
                Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                }),
            ),
            // As tungstenite does: the close is answered, and passed on, as a protocol error.
            Ok(ClosePayload::Forbidden(_)) => Ending::Closed(
                self.side,
                Some(CloseFrame {
                    code: CloseCode::Protocol,
                    reason: "Protocol violation".into(),
                }),
            ),
            Err(frame::CloseError::Truncated) => {
                self.protocol("close frame with a one-byte payload")
            }
            Err(frame::CloseError::BadUtf8) => Ending::BadUtf8(self.side),
        }
    }

    fn frame_error(&self, error: FrameError) -> Ending {
        match error {
            FrameError::TooBig => Ending::TooBig(self.side),
            FrameError::Protocol(what) => self.protocol(what),
        }
    }

    fn protocol(&self, what: &str) -> Ending {
        Ending::Protocol(self.side, what.to_owned())
    }

    /// Data messages queued for this leg that were never (fully) written: those still queued
    /// when its close ended, including any whose write failed.
    pub(crate) fn undelivered(&self) -> u64 {
        self.out.undelivered()
    }

    /// Queues a close frame, writes everything, and waits for the peer's close (or for the
    /// connection to end). A server leg drops the connection once the peer's close is in; a
    /// client leg waits for the server to end it, as RFC 6455 §7.1.1 asks.
    pub(crate) async fn close(&mut self, frame: Option<&CloseFrame>) {
        self.out.push_close(frame);
        if std::future::poll_fn(|cx| self.poll_flush(cx))
            .await
            .is_err()
        {
            return;
        }
        // Until the peer's close (or the end): what it still sends is discarded.
        while std::future::poll_fn(|cx| self.poll_receive(cx, |_, _, _| Ok(())))
            .await
            .is_ok()
        {}
        if self.role == Role::Client {
            self.wait_for_end().await;
        }
    }

    /// The peer's close came first: answers it with `reply` and finishes.
    pub(crate) async fn finish(&mut self, reply: Option<&CloseFrame>) {
        self.out.push_close(reply);
        if std::future::poll_fn(|cx| self.poll_flush(cx))
            .await
            .is_err()
        {
            return;
        }
        if self.role == Role::Client {
            self.wait_for_end().await;
        }
    }

    /// Reads and discards until the peer ends the connection.
    async fn wait_for_end(&mut self) {
        let _ = std::future::poll_fn(|cx| loop {
            let mut buf = take_scratch();
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut buf);
            give_back(buf);
            match ready!(read) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) => continue,
            }
        })
        .await;
    }
}
