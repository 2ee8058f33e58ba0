//! One WebSocket leg of a relayed connection: reading frames off its socket into whole
//! messages, answering pings, and writing encoded frames out.
//!
//! Buffers are the point of this module. A leg holds no read buffer between frames: reads go
//! into one scratch buffer per worker thread, and only the start of a frame that has not fully
//! arrived is kept by the leg. Its write buffer is released once it is written out. An idle
//! connection therefore holds two sockets, a little state, and no buffers at all.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::buffers::{self, take_scratch};
use super::close::{Ending, Side, Traffic};
use super::frame::{self, ClosePayload, FrameError, OpCode, Role};
use crate::upstream::{Io, Socket};

/// The most a lingering close ([`Leg::fail`]) reads and discards before it drops the socket
/// anyway: more than a peer has in flight when it is cut off mid-message at the default
/// limits, and little work to throw away.
const LINGER_BYTES: usize = 16 << 20;

/// The smallest buffer a partial frame is kept in.
const MIN_PARTIAL: usize = 4 * 1024;

/// Binary frames at least this large are relayed as they arrive (cut-through) on directions
/// no hook looks at, instead of being held until their last byte is in.
const STREAM_MIN: usize = 16 * 1024;

thread_local! {
    /// Masking keys drawn from the thread's CSPRNG in blocks (RFC 6455 §10.3 asks for a
    /// strong source), so that a frame costs four bytes of the block, not a call into it.
    static MASKS: std::cell::RefCell<([u8; 256], usize)> = const { std::cell::RefCell::new(([0; 256], 256)) };
}

/// A fresh masking key.
fn mask_key() -> [u8; 4] {
    MASKS.with(|m| {
        let (block, at) = &mut *m.borrow_mut();
        if *at == block.len() {
            rand::fill(&mut block[..]);
            *at = 0;
        }
        let key = [block[*at], block[*at + 1], block[*at + 2], block[*at + 3]];
        *at += 4;
        key
    })
}

/// The most one read takes in while a frame is being relayed as it arrives.
const STREAM_READ: usize = 32 * 1024;

/// A message being reassembled from fragments.
struct Fragments {
    text: bool,
    data: Vec<u8>,
    /// `data[..checked]` is known to be UTF-8 (text only): each fragment is checked as it
    /// comes, so that bad text fails fast instead of after its last fragment.
    checked: usize,
}

impl Fragments {
    /// Whether the text so far can still be UTF-8 (it may end inside a character).
    fn still_utf8(&mut self) -> bool {
        if !self.text {
            return true;
        }
        match std::str::from_utf8(&self.data[self.checked..]) {
            Ok(_) => {
                self.checked = self.data.len();
                true
            }
            Err(e) if e.error_len().is_none() => {
                self.checked += e.valid_up_to();
                true
            }
            Err(_) => false,
        }
    }
}

/// Frames at the start of a read buffer that are relayed byte for byte, by their length.
#[derive(Clone, Copy)]
enum Run {
    /// No whole frame follows them in the buffer.
    AtEnd(usize),
    /// Another frame follows: one that is not relayed byte for byte, or a bad header.
    Before(usize),
    /// A text frame that is not UTF-8 follows: the leg ends after them.
    BeforeBadUtf8(usize),
}

impl Run {
    fn len(self) -> usize {
        match self {
            Run::AtEnd(len) | Run::Before(len) | Run::BeforeBadUtf8(len) => len,
        }
    }
}

/// A large binary frame being relayed as it arrives.
struct Streaming {
    /// Payload bytes still to come.
    left: usize,
}

/// A hook over whole data messages, given with the sender's own outbox (for replies). It
/// answers whether the read may go on (`false`: a queue is full, the rest of the read waits).
pub(crate) type Hook<'a> = dyn FnMut(Message, &mut Outbox) -> Result<bool, Ending> + 'a;

/// Where a leg's data messages go.
pub(crate) enum Sink<'a> {
    /// Straight to the other leg, counted in `traffic`; large binary frames are relayed as
    /// they arrive.
    Through {
        /// The other leg.
        peer: &'a mut Leg,
        /// The counters of this direction.
        traffic: &'a mut Traffic,
    },
    /// Each whole message to a hook, with this leg's own outbox for replies to the sender.
    Hooks(&'a mut Hook<'a>),
    /// Nowhere: the connection is closing.
    Discard,
}

/// Encoded frames waiting to be written to one leg.
pub(crate) struct Outbox {
    buf: Vec<u8>,
    /// `buf[written..]` is still to be written.
    written: usize,
    /// Client legs mask every frame they send.
    masked: bool,
    /// Payload bytes of a streamed frame still to come. Nothing else may be queued meanwhile:
    /// a frame cannot be interrupted.
    open: usize,
    /// Bytes at the start of `buf` that belong to a streamed frame whose header was written
    /// before; frames are aligned from here.
    head_skip: usize,
}

impl Outbox {
    fn new(role: Role) -> Self {
        Outbox {
            buf: Vec::new(),
            written: 0,
            masked: role == Role::Client,
            open: 0,
            head_skip: 0,
        }
    }

    fn mask(&self) -> Option<[u8; 4]> {
        self.masked.then(mask_key)
    }

    /// Nothing is waiting to be written.
    pub(crate) fn is_empty(&self) -> bool {
        self.written == self.buf.len()
    }

    /// Bytes waiting to be written.
    pub(crate) fn len(&self) -> usize {
        self.buf.len() - self.written
    }

    /// The buffer to encode into, taken from the thread's pool when the leg holds none.
    fn buf(&mut self) -> &mut Vec<u8> {
        if self.buf.capacity() == 0 {
            self.buf = buffers::take_write();
        }
        &mut self.buf
    }

    /// Queues one frame.
    fn push(&mut self, opcode: OpCode, payload: &[u8]) {
        let mask = self.mask();
        frame::encode(self.buf(), opcode, payload, mask);
    }

    /// Queues a ping with no payload (the gateway's own, to find a dead peer).
    pub(crate) fn push_ping(&mut self) {
        self.push(OpCode::Ping, &[]);
    }

    /// A streamed frame is half-way through: no other frame may be queued before it ends.
    pub(crate) fn is_mid_frame(&self) -> bool {
        self.open > 0
    }

    /// Queues the header of a binary frame whose payload follows in [`Outbox::push_chunk`]
    /// calls, with the masking key the sender used (`None` from a server), as in
    /// [`Outbox::push_verbatim`]: the payload then goes out exactly as it came, with no XOR
    /// pass.
    fn open_binary(&mut self, payload_len: usize, sender_mask: Option<[u8; 4]>) {
        frame::encode_header(self.buf(), OpCode::Binary, payload_len, sender_mask);
        self.open = payload_len;
    }

    /// Sends the next payload bytes of the open frame, as they came (the frame keeps the
    /// sender's masking key), straight from the read buffer (see [`Outbox::write_behind`]).
    fn push_chunk(&mut self, io: &mut Io, cx: &mut Context<'_>, chunk: &[u8]) {
        let open_before = self.open;
        self.open -= chunk.len();
        self.write_behind(io, cx, chunk, open_before);
    }

    /// Writes `frames` (whole frames, relayed as they came) straight from the read buffer (see
    /// [`Outbox::write_behind`]). Nothing may be open: `frames` start a frame.
    fn write_through(&mut self, io: &mut Io, cx: &mut Context<'_>, frames: &[u8]) {
        debug_assert_eq!(self.open, 0, "a streamed frame is open");
        self.write_behind(io, cx, frames, 0);
    }

    /// Writes `bytes` after whatever is queued, in one vectored write; only what the socket
    /// does not take is copied into the queue. `open_from_bytes` counts the bytes, from the
    /// start of `bytes` on, of a streamed frame still open before them (0 when `bytes` start a
    /// frame): when the queue empties, what is left of that frame comes first in it.
    fn write_behind(
        &mut self,
        io: &mut Io,
        cx: &mut Context<'_>,
        bytes: &[u8],
        open_from_bytes: usize,
    ) {
        let queued = &self.buf[self.written..];
        let slices = [IoSlice::new(queued), IoSlice::new(bytes)];
        let mut sent = 0;
        if let Poll::Ready(Ok(n)) = Pin::new(&mut *io).poll_write_vectored(cx, &slices) {
            let from_queue = n.min(queued.len());
            self.written += from_queue;
            sent = n - from_queue;
        }
        if self.written == self.buf.len() {
            self.buf.clear();
            self.written = 0;
            self.head_skip = open_from_bytes.saturating_sub(sent);
        }
        let rest = &bytes[sent..];
        if !rest.is_empty() {
            self.buf().extend_from_slice(rest);
        }
    }

    /// Queues a whole frame as it came from the other leg: header, masking key and masked
    /// payload alike. A client's frames thus reach the upstream with the client's own masking
    /// key, as through a TCP proxy, and a server's unmasked frames reach the client unchanged.
    fn push_verbatim(&mut self, frame: &[u8]) {
        self.buf().extend_from_slice(frame);
    }

    /// Queues one data message.
    pub(crate) fn push_data(&mut self, text: bool, payload: &[u8]) {
        self.push(if text { OpCode::Text } else { OpCode::Binary }, payload);
    }

    /// Queues a message a policy produced.
    pub(crate) fn push_message(&mut self, message: &Message) {
        match message {
            Message::Text(t) => self.push(OpCode::Text, t.as_bytes()),
            Message::Binary(b) => self.push(OpCode::Binary, b),
            Message::Ping(p) => self.push(OpCode::Ping, p),
            Message::Pong(p) => self.push(OpCode::Pong, p),
            Message::Close(f) => self.push_close(f.as_ref()),
            Message::Frame(_) => {}
        }
    }

    /// Queues a close frame.
    pub(crate) fn push_close(&mut self, close: Option<&CloseFrame>) {
        let mask = self.mask();
        frame::encode_close(
            self.buf(),
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
            // The rest of an open frame comes first in the emptied buffer.
            self.head_skip = self.open;
        }
        // A no-op on TCP; TLS writes out its own buffer.
        Pin::new(&mut *io).poll_flush(cx)
    }

    /// Data messages queued and not (fully) written, found by walking the frames this leg
    /// encoded itself.
    fn undelivered(&self) -> u64 {
        // A streamed frame begun in an earlier buffer: not delivered while still open or not
        // written to its end.
        let mut count =
            u64::from(self.head_skip > 0 && (self.open > 0 || self.head_skip > self.written));
        let receiver = if self.masked {
            Role::Server
        } else {
            Role::Client
        };
        let mut at = self.head_skip;
        while at < self.buf.len() {
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

/// Whether the payload of the whole `frame` is UTF-8. A masked payload is unmasked to be
/// checked, then masked again with its own key, so that the frame is left as it came.
fn is_utf8(frame: &mut [u8], header: &frame::Header) -> bool {
    let payload = &mut frame[header.header_len..];
    let Some(key) = header.mask else {
        return std::str::from_utf8(payload).is_ok();
    };
    frame::apply_mask(payload, key);
    let valid = std::str::from_utf8(payload).is_ok();
    frame::apply_mask(payload, key);
    valid
}

/// Passes one whole data message on to the other leg (hooks get theirs from `Leg::message`;
/// a closing leg drops it).
fn pass_through(sink: &mut Sink<'_>, text: bool, payload: &[u8]) {
    if let Sink::Through { peer, traffic } = sink {
        traffic.messages += 1;
        traffic.bytes += payload.len() as u64;
        peer.out.push_data(text, payload);
    }
}

/// framegate's end of a leg on `side`: it accepted the client leg and opened the upstream one.
fn role_on(side: Side) -> Role {
    match side {
        Side::Client => Role::Server,
        Side::Upstream => Role::Client,
    }
}

/// One WebSocket leg.
pub(crate) struct Leg {
    io: Io,
    side: Side,
    max_message_size: usize,
    /// The start of a frame that has not fully arrived; empty (unallocated) between frames.
    partial: BytesMut,
    fragments: Option<Fragments>,
    stream: Option<Streaming>,
    /// Frames waiting to be written to this leg.
    pub(crate) out: Outbox,
}

impl Leg {
    /// A leg on `socket`, after its handshake.
    pub(crate) fn new(socket: Socket, side: Side, max_message_size: usize) -> Self {
        Leg {
            io: socket.io,
            side,
            max_message_size,
            partial: BytesMut::from(&socket.pre_read[..]),
            fragments: None,
            stream: None,
            out: Outbox::new(role_on(side)),
        }
    }

    fn role(&self) -> Role {
        role_on(self.side)
    }

    /// The header at the start of `buf`, as this leg receives it, under its size limit.
    fn header(&self, buf: &[u8]) -> Result<Option<frame::Header>, FrameError> {
        frame::parse_header(buf, self.role(), self.max_message_size)
    }

    /// Writes what is queued to this leg. An error ends the connection as this leg gone.
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Ending>> {
        match ready!(self.out.poll_write(&mut self.io, cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(_) => Poll::Ready(Err(Ending::Gone(self.side))),
        }
    }

    /// Gives the write buffer back if nothing waits in it, so an idle leg holds none.
    pub(crate) fn release_buffers(&mut self) {
        if self.out.is_empty() && self.out.buf.capacity() > 0 {
            buffers::give_back_write(std::mem::take(&mut self.out.buf));
            self.out.written = 0;
        }
    }

    /// Reads what the socket has and passes each data message to `sink`. Pings are answered
    /// here and pongs dropped.
    ///
    /// Ready with `Ok(active)` after one read's worth of frames, `active` telling whether any
    /// data moved; with `Err` when the leg ended (a close frame, a dropped connection, a
    /// protocol error, a message over the limit) or a hook stopped it.
    pub(crate) fn poll_receive(
        &mut self,
        cx: &mut Context<'_>,
        mut sink: Sink<'_>,
    ) -> Poll<Result<bool, Ending>> {
        let scratch = self.partial.is_empty();
        let mut buf = if scratch {
            take_scratch()
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            // Room for the rest of the frame (unless it will be relayed as it arrives), but at
            // most one scratch buffer's worth ahead of what has arrived: a header alone must
            // not make framegate hold the whole announced size.
            let want = match self.header(&buf) {
                Ok(Some(h)) if !self.streams(&h, &sink) => h.frame_len().saturating_sub(buf.len()),
                _ => 0,
            };
            buf.reserve(want.clamp(MIN_PARTIAL, buffers::SCRATCH));
            buf
        };
        // Bytes handed over with the handshake are parsed before the socket is read.
        if buf.is_empty() || !self.can_progress(&buf, &sink) {
            // Mid-way through a relayed frame, reads are kept small: the bytes go straight
            // out again, and 32 KiB at a time cost the kernel less than 128 KiB (measured:
            // about a quarter less system time per 64 KiB message).
            let room = if self.stream.is_some() {
                STREAM_READ
            } else {
                usize::MAX
            };
            let read = tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut (&mut buf).limit(room),
            );
            match read {
                Poll::Pending => {
                    self.keep(buf, scratch);
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    self.keep(buf, scratch);
                    return Poll::Ready(Err(Ending::Gone(self.side)));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
        let result = self.parse_frames(cx, &mut buf, &mut sink);
        self.keep(buf, scratch);
        Poll::Ready(result)
    }

    /// The frames at the start of `buf` that are relayed byte for byte (see
    /// [`Leg::relays_verbatim`]), counted in `traffic`; `first` is the first one's header, a
    /// whole frame that is.
    fn verbatim_run(&self, buf: &mut BytesMut, first: frame::Header, traffic: &mut Traffic) -> Run {
        let mut len = 0;
        let mut header = first;
        loop {
            let frame = &mut buf[len..len + header.frame_len()];
            if header.opcode == OpCode::Text && !is_utf8(frame, &header) {
                return Run::BeforeBadUtf8(len);
            }
            traffic.messages += 1;
            traffic.bytes += header.payload_len as u64;
            len += header.frame_len();
            header = match self.header(&buf[len..]) {
                Ok(Some(h)) if self.relays_verbatim(&h) && buf.len() - len >= h.frame_len() => h,
                Ok(Some(h)) if buf.len() - len < h.frame_len() => return Run::AtEnd(len),
                Ok(None) => return Run::AtEnd(len),
                _ => return Run::Before(len),
            };
        }
    }

    /// Whether the whole frame `header` starts, in a direction no hook looks at, is relayed
    /// byte for byte: a final data frame outside a fragmented message, its length written in
    /// the fewest bytes. Anything else is unmasked, checked and encoded again.
    fn relays_verbatim(&self, header: &frame::Header) -> bool {
        matches!(header.opcode, OpCode::Text | OpCode::Binary)
            && header.fin
            && self.fragments.is_none()
            && header.is_minimal()
    }

    /// Whether the frame `header` starts is relayed as it arrives: a large, final binary frame
    /// outside a fragmented message, in a direction no hook looks at.
    fn streams(&self, header: &frame::Header, sink: &Sink<'_>) -> bool {
        matches!(sink, Sink::Through { .. })
            && header.opcode == OpCode::Binary
            && header.fin
            && header.payload_len >= STREAM_MIN
            && self.fragments.is_none()
    }

    /// Whether `buf` can be parsed further without reading: it starts with a whole frame, with
    /// a frame that is relayed as it arrives, or with a header that is already an error.
    fn can_progress(&self, buf: &[u8], sink: &Sink<'_>) -> bool {
        if self.stream.is_some() {
            return true;
        }
        match self.header(buf) {
            Ok(Some(h)) => buf.len() >= h.frame_len() || self.streams(&h, sink),
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// Keeps the unparsed rest of `buf` (the start of a frame) as this leg's partial frame.
    /// Out of the scratch buffer it is copied into a buffer of its own, with room for the rest
    /// of the frame (up to 128 KiB at a time) so that it is read in place, and the scratch
    /// buffer goes back to the thread. A partial buffer that empties is freed.
    fn keep(&mut self, mut buf: BytesMut, scratch: bool) {
        if !scratch {
            if buf.is_empty() {
                buffers::give_back_partial(buf);
            } else {
                self.partial = buf;
            }
            return;
        }
        if !buf.is_empty() {
            let frame_len = match self.header(&buf) {
                Ok(Some(h)) => h.frame_len(),
                _ => 0,
            };
            // Sized for the frame, up to one scratch buffer beyond what has arrived.
            let size = frame_len
                .min(buf.len() + buffers::SCRATCH)
                .max(buf.len())
                .max(MIN_PARTIAL);
            let mut partial = buffers::take_partial(size);
            partial.extend_from_slice(&buf);
            self.partial = partial;
            buf.clear();
        }
        buffers::give_back_scratch(buf);
    }

    fn parse_frames(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        sink: &mut Sink<'_>,
    ) -> Result<bool, Ending> {
        let mut active = false;
        loop {
            if let Some(stream) = &mut self.stream {
                let n = stream.left.min(buf.len());
                if n == 0 {
                    return Ok(active);
                }
                if let Sink::Through { peer, traffic } = sink {
                    let Leg { io, out, .. } = &mut **peer;
                    out.push_chunk(io, cx, &buf[..n]);
                    traffic.bytes += n as u64;
                    if n == stream.left {
                        traffic.messages += 1;
                    }
                }
                stream.left -= n;
                if stream.left == 0 {
                    self.stream = None;
                }
                buf.advance(n);
                active = true;
                continue;
            }
            let header = match self.header(buf) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(active),
                Err(e) => return Err(self.frame_error(e)),
            };
            // A large binary frame goes through as it arrives, whole or not.
            let streams = self.streams(&header, sink);
            if let (true, Sink::Through { peer, .. }) = (streams, &mut *sink) {
                peer.out.open_binary(header.payload_len, header.mask);
                self.stream = Some(Streaming {
                    left: header.payload_len,
                });
                buf.advance(header.header_len);
                continue;
            }
            if buf.len() < header.frame_len() {
                return Ok(active);
            }
            if let Sink::Through { peer, traffic } = sink {
                if self.relays_verbatim(&header) {
                    let run = self.verbatim_run(buf, header, traffic);
                    let Leg { io, out, .. } = &mut **peer;
                    match run {
                        // The run ends the read's whole frames: written out at once.
                        Run::AtEnd(len) => out.write_through(io, cx, &buf[..len]),
                        // Other frames follow, or a bad one: queued, to go out first.
                        Run::Before(len) | Run::BeforeBadUtf8(len) if len > 0 => {
                            out.push_verbatim(&buf[..len])
                        }
                        _ => {}
                    }
                    buf.advance(run.len());
                    if let Run::BeforeBadUtf8(_) = run {
                        return Err(Ending::BadUtf8(self.side));
                    }
                    active = true;
                    continue;
                }
            }
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
                        active = true;
                        if let Sink::Hooks(hook) = sink {
                            // The hook gets the payload where it lies in the read buffer:
                            // shared, not copied.
                            let frame = buf.split_to(header.frame_len()).freeze();
                            let message = self.message(text, frame.slice(header.header_len..))?;
                            if !hook(message, &mut self.out)? {
                                return Ok(true);
                            }
                            continue;
                        }
                        if text && std::str::from_utf8(payload).is_err() {
                            return Err(Ending::BadUtf8(self.side));
                        }
                        pass_through(sink, text, payload);
                    } else {
                        let mut fragments = Fragments {
                            text,
                            data: payload.to_vec(),
                            checked: 0,
                        };
                        if !fragments.still_utf8() {
                            return Err(Ending::BadUtf8(self.side));
                        }
                        self.fragments = Some(fragments);
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
                    if !fragments.still_utf8() {
                        return Err(Ending::BadUtf8(self.side));
                    }
                    if header.fin {
                        let Fragments { text, data, .. } =
                            self.fragments.take().expect("fragments checked above");
                        active = true;
                        if let Sink::Hooks(hook) = sink {
                            let message = self.message(text, Bytes::from(data))?;
                            if !hook(message, &mut self.out)? {
                                buf.advance(header.frame_len());
                                return Ok(true);
                            }
                        } else {
                            if text && std::str::from_utf8(&data).is_err() {
                                return Err(Ending::BadUtf8(self.side));
                            }
                            pass_through(sink, text, &data);
                        }
                    }
                }
                OpCode::Ping => self.out.push(OpCode::Pong, payload),
                OpCode::Pong => {}
                OpCode::Close => {
                    let ending = self.close_received(payload);
                    // Nothing may follow a close frame (RFC 6455 §5.5.1), so nothing is kept:
                    // a kept frame would cost a partial buffer on every close.
                    buf.clear();
                    return Err(ending);
                }
            }
            buf.advance(header.frame_len());
        }
    }

    /// A message for the hooks; text is checked to be UTF-8 here.
    fn message(&self, text: bool, payload: Bytes) -> Result<Message, Ending> {
        if text {
            Utf8Bytes::try_from(payload)
                .map(Message::Text)
                .map_err(|_| Ending::BadUtf8(self.side))
        } else {
            Ok(Message::Binary(payload))
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
            // A code no peer may send is the sender's protocol error: it gets 1002, and the
            // other leg is told its peer failed (not handed a 1002 it did not commit).
            Ok(ClosePayload::Forbidden(code)) => Ending::Protocol(
                self.side,
                format!("close frame with the forbidden code {code}"),
            ),
            Err(frame::CloseError::Truncated) => {
                self.protocol("close frame with a one-byte payload")
            }
            Err(frame::CloseError::BadUtf8) => Ending::BadCloseReason(self.side),
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
        if self.close_into(frame, None).await && self.role() == Role::Client {
            self.wait_for_end().await;
        }
    }

    /// The first half of [`Leg::close`]: sends `frame` and waits for the peer's close (or the
    /// end), passing the data messages the peer still sends on to `peer` (counted in
    /// `traffic`) instead of discarding them. False if the connection failed.
    pub(crate) async fn close_into(
        &mut self,
        frame: Option<&CloseFrame>,
        mut peer: Option<(&mut Leg, &mut Traffic)>,
    ) -> bool {
        if !self.send_close(frame).await {
            return false;
        }
        // Until the peer's close (or the end). As in the relay, this leg is read only once
        // `peer` has written out what it was given: a peer that does not read holds this
        // leg's last messages back (until the caller's time limit), it does not pile them up.
        while std::future::poll_fn(|cx| {
            if let Some((leg, _)) = &mut peer {
                if !leg.out.is_empty() {
                    match leg.poll_flush(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(_)) => peer = None,
                    }
                }
            }
            let sink = match &mut peer {
                Some((leg, traffic)) => Sink::Through { peer: leg, traffic },
                None => Sink::Discard,
            };
            self.poll_receive(cx, sink)
        })
        .await
        .is_ok()
        {}
        true
    }

    /// The peer broke the protocol: sends `frame` after what is queued, then closes the
    /// writing half and discards what the peer still sends until it hangs up, at most
    /// [`LINGER_BYTES`] (the caller bounds the time). Dropping a socket with unread input
    /// makes the kernel send a reset, which can destroy the close frame before the peer reads
    /// it: this is NGINX's lingering close. The peer's frames are not parsed any more (the
    /// stream broke at an unknown point), so its own close frame cannot end the wait; the
    /// closed writing half is what tells it to hang up.
    pub(crate) async fn fail(&mut self, frame: Option<&CloseFrame>) {
        if !self.send_close(frame).await {
            return;
        }
        let _ = std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)).await;
        let mut discarded = self.partial.len();
        // Nothing read from now on is kept.
        self.partial = BytesMut::new();
        self.fragments = None;
        let _ = std::future::poll_fn(|cx| loop {
            if discarded >= LINGER_BYTES {
                return Poll::Ready(());
            }
            let mut buf = take_scratch();
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut buf);
            buffers::give_back_scratch(buf);
            match ready!(read) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(n) => discarded += n,
            }
        })
        .await;
    }

    /// The peer's close came first: answers it with `reply` and finishes.
    pub(crate) async fn finish(&mut self, reply: Option<&CloseFrame>) {
        if self.send_close(reply).await && self.role() == Role::Client {
            self.wait_for_end().await;
        }
    }

    /// Writes what is queued and then `frame`; false if the connection failed.
    async fn send_close(&mut self, frame: Option<&CloseFrame>) -> bool {
        self.out.push_close(frame);
        std::future::poll_fn(|cx| self.poll_flush(cx)).await.is_ok()
    }

    /// Reads and discards until the peer ends the connection.
    pub(crate) async fn wait_for_end(&mut self) {
        let _ = std::future::poll_fn(|cx| loop {
            let mut buf = take_scratch();
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut buf);
            buffers::give_back_scratch(buf);
            match ready!(read) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) => continue,
            }
        })
        .await;
    }
}
