//! The read side of a leg: reading its socket into the thread's scratch buffer, parsing
//! frames, answering pings, and handing each data message to its [`Sink`]: relayed byte for
//! byte or as it arrives where no hook looks, reassembled and checked for the hooks otherwise.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use super::super::buffers::{self, take_scratch};
use super::super::close::{Ending, Side};
use super::super::deflate::InflateError;
use super::super::frame::{self, ClosePayload, FrameError, OpCode};
use super::super::meter::Tally;
use super::{Arrived, Check, Leg, Sink};
use crate::capture::{Capture, Kind, Seen};
use crate::policy::{self, Data};

/// The smallest buffer a partial frame is kept in.
const MIN_PARTIAL: usize = 4 * 1024;

/// Binary frames at least this large are relayed as they arrive (cut-through) on directions
/// no hook looks at, instead of being held until their last byte is in.
const STREAM_MIN: usize = 16 * 1024;

/// The most one read takes in while a frame is being relayed as it arrives.
const STREAM_READ: usize = 32 * 1024;

/// A message being reassembled from fragments.
pub(super) struct Fragments {
    text: bool,
    /// Compressed (RSV1 on its first frame): inflated, and its text checked, once whole.
    compressed: bool,
    data: Vec<u8>,
    /// `data[..checked]` is known to be UTF-8 (text only): each fragment is checked as it
    /// comes, so that bad text fails fast instead of after its last fragment.
    checked: usize,
    /// Frames so far and the first one's masking key (for the traffic console).
    arrived: Arrived,
}

impl Fragments {
    /// Whether the text so far can still be UTF-8 (it may end inside a character).
    fn still_utf8(&mut self) -> bool {
        if !self.text || self.compressed {
            return true;
        }
        // simdutf8's std-compatible check: it also tells where a cut character starts.
        match simdutf8::compat::from_utf8(&self.data[self.checked..]) {
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
enum Run {
    /// No whole frame follows them in the buffer.
    AtEnd(usize),
    /// Another frame follows: one that is not relayed byte for byte, or a bad header.
    Before(usize),
    /// A text frame its check dropped follows, this long.
    BeforeDropped(usize, usize),
    /// A text frame follows that ends the leg: not UTF-8, or closed by its check.
    BeforeEnding(usize, Ending),
}

impl Run {
    fn len(&self) -> usize {
        match self {
            Run::AtEnd(len)
            | Run::Before(len)
            | Run::BeforeDropped(len, _)
            | Run::BeforeEnding(len, _) => *len,
        }
    }
}

/// A large binary frame being relayed as it arrives.
pub(super) struct Streaming {
    /// Payload bytes still to come.
    left: usize,
    /// The frame's payload length, counted when its last byte has gone through.
    total: usize,
}

/// Whether the payload of the whole `frame` is UTF-8. A masked payload is unmasked to be
/// checked, then masked again with its own key, so that the frame is left as it came.
fn is_utf8(frame: &mut [u8], header: &frame::Header) -> bool {
    let payload = &mut frame[header.header_len..];
    let Some(key) = header.mask else {
        return policy::is_utf8(payload);
    };
    frame::apply_mask(payload, key);
    let valid = policy::is_utf8(payload);
    frame::apply_mask(payload, key);
    valid
}

/// Whether the whole text `frame` passes `check`: its payload is unmasked, read as UTF-8 and
/// shown to the check, then masked again with its own key, so that the frame is left as it
/// came. `queued`: the bytes waiting for the sender and for the other leg.
fn check_frame(
    frame: &mut [u8],
    header: &frame::Header,
    side: Side,
    check: &mut Check<'_>,
    queued: [usize; 2],
) -> Result<bool, Ending> {
    let payload = &mut frame[header.header_len..];
    if let Some(key) = header.mask {
        frame::apply_mask(payload, key);
    }
    let arrived = Arrived {
        frames: 1,
        mask: header.mask,
    };
    let passed = match simdutf8::basic::from_utf8(payload) {
        Ok(text) => check(text, arrived, queued),
        Err(_) => Err(Ending::BadUtf8(side)),
    };
    if let Some(key) = header.mask {
        frame::apply_mask(payload, key);
    }
    passed
}

impl Leg {
    /// Passes one whole data message on to the other leg, once its text has passed the
    /// sink's check, if there is one (hooks get theirs from `Leg::message`; a closing leg drops
    /// it). `Err` when the check ends the connection.
    fn pass_through(
        &self,
        sink: &mut Sink<'_>,
        text: bool,
        payload: &[u8],
        arrived: Arrived,
    ) -> Result<(), Ending> {
        if let Sink::Through { peer, tally, check } = sink {
            if let (true, Some(check)) = (text, check) {
                let Ok(text) = simdutf8::basic::from_utf8(payload) else {
                    return Err(Ending::BadUtf8(self.side));
                };
                if !check(text, arrived, [self.out.len(), peer.out.len()])? {
                    return Ok(());
                }
            }
            tally.message(text, payload.len());
            peer.out.push_data(text, payload);
            if let Some(capture) = &self.capture {
                capture.record(&Seen {
                    frames: arrived.frames,
                    mask: arrived.mask,
                    ..Seen::data(self.direction(), text, payload)
                });
            }
        }
        Ok(())
    }

    /// Records a control frame (its payload unmasked already), while the console captures.
    fn record_control(&self, kind: Kind, payload: &[u8], mask: Option<[u8; 4]>) {
        let Some(capture) = &self.capture else {
            return;
        };
        let reason;
        let close = match (kind, payload) {
            (Kind::Close, [hi, lo, rest @ ..]) => {
                reason = String::from_utf8_lossy(rest);
                Some((u16::from_be_bytes([*hi, *lo]), &*reason))
            }
            (Kind::Close, _) => Some((1005, "")),
            _ => None,
        };
        capture.record(&Seen {
            kind,
            mask,
            decision: None,
            close,
            ..Seen::data(self.direction(), false, payload)
        });
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
    /// [`Leg::relays_verbatim`]), counted in `tally`; `first` is the first one's header, a
    /// whole frame that is.
    fn verbatim_run(
        &self,
        buf: &mut BytesMut,
        first: frame::Header,
        tally: Tally<'_>,
        mut check: Option<&mut Check<'_>>,
        peer_queued: usize,
    ) -> Run {
        let mut len = 0;
        let mut header = first;
        loop {
            let frame = &mut buf[len..len + header.frame_len()];
            if header.opcode == OpCode::Text {
                match check.as_deref_mut() {
                    None if !is_utf8(frame, &header) => {
                        return Run::BeforeEnding(len, Ending::BadUtf8(self.side))
                    }
                    None => {}
                    Some(check) => {
                        let queued = [self.out.len(), peer_queued];
                        match check_frame(frame, &header, self.side, check, queued) {
                            Ok(true) => {}
                            Ok(false) => return Run::BeforeDropped(len, header.frame_len()),
                            Err(ending) => return Run::BeforeEnding(len, ending),
                        }
                    }
                }
            }
            tally.message(header.opcode == OpCode::Text, header.payload_len);
            len += header.frame_len();
            header = match self.header(&buf[len..]) {
                Ok(Some(h)) if self.relays_verbatim(&h) && buf.len() - len >= h.frame_len() => h,
                Ok(Some(h)) if buf.len() - len < h.frame_len() => return Run::AtEnd(len),
                Ok(None) => return Run::AtEnd(len),
                _ => return Run::Before(len),
            };
        }
    }

    /// Records each frame of a run relayed byte for byte (`run`: whole, checked frames), in
    /// a pass of its own made only while the console captures, and out of line, so that the
    /// run's loop stays as it is without a capture. One lock and one clock reading for the run.
    #[inline(never)]
    fn record_run(&self, capture: &Capture, run: &[u8]) {
        let Some(mut recorder) = capture.recorder() else {
            return;
        };
        let direction = self.direction();
        let mut at = 0;
        while let Some(header) = run.get(at..).and_then(frame::reread_header) {
            let end = (at + header.frame_len()).min(run.len());
            recorder.relayed(
                direction,
                header.opcode == OpCode::Text,
                &run[at + header.header_len..end],
                header.mask,
            );
            at = end;
        }
    }

    /// Whether the whole frame `header` starts, in a direction no hook looks at, is relayed
    /// byte for byte: a final data frame outside a fragmented message, its length written in
    /// the fewest bytes. Anything else is unmasked, checked and encoded again.
    fn relays_verbatim(&self, header: &frame::Header) -> bool {
        matches!(header.opcode, OpCode::Text | OpCode::Binary)
            && header.fin
            && !header.compressed
            && self.fragments.is_none()
            && header.is_minimal()
    }

    /// Whether the frame `header` starts is relayed as it arrives: a large, final binary frame
    /// outside a fragmented message, in a direction no hook looks at.
    fn streams(&self, header: &frame::Header, sink: &Sink<'_>) -> bool {
        matches!(sink, Sink::Through { .. })
            && header.opcode == OpCode::Binary
            && header.fin
            && !header.compressed
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
                if let Sink::Through { peer, tally, .. } = sink {
                    let Leg { io, out, .. } = &mut **peer;
                    out.push_chunk(io, cx, &buf[..n]);
                    tally.chunk(n);
                    if n == stream.left {
                        tally.streamed(stream.total);
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
                if let Some(capture) = &self.capture {
                    // Recorded as it starts: the payload is what has arrived of it so far.
                    let end = buf.len().min(header.frame_len());
                    capture.record(&Seen {
                        size: header.payload_len,
                        mask: header.mask,
                        masked_with: header.mask,
                        ..Seen::data(self.direction(), false, &buf[header.header_len..end])
                    });
                }
                peer.out.open_binary(header.payload_len, header.mask);
                self.stream = Some(Streaming {
                    left: header.payload_len,
                    total: header.payload_len,
                });
                buf.advance(header.header_len);
                continue;
            }
            if buf.len() < header.frame_len() {
                return Ok(active);
            }
            if let Sink::Through { peer, tally, check } = sink {
                if self.relays_verbatim(&header) {
                    let peer_queued = peer.out.len();
                    let run =
                        self.verbatim_run(buf, header, *tally, check.as_deref_mut(), peer_queued);
                    let len = run.len();
                    if let Some(capture) = &self.capture {
                        self.record_run(capture, &buf[..len]);
                    }
                    let Leg { io, out, .. } = &mut **peer;
                    match run {
                        // The run ends the read's whole frames: written out at once.
                        Run::AtEnd(len) => out.write_through(io, cx, &buf[..len]),
                        // Other frames follow, or a refused one: queued, to go out first.
                        _ if len > 0 => out.push_verbatim(&buf[..len]),
                        _ => {}
                    }
                    buf.advance(len);
                    match run {
                        Run::BeforeEnding(_, ending) => return Err(ending),
                        Run::BeforeDropped(_, dropped) => buf.advance(dropped),
                        _ => {}
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
                    let arrived = Arrived {
                        frames: 1,
                        mask: header.mask,
                    };
                    if header.fin && header.compressed {
                        active = true;
                        let data = self.inflate(payload)?;
                        if !self.deliver(sink, text, data, arrived)? {
                            buf.advance(header.frame_len());
                            return Ok(true);
                        }
                    } else if header.fin {
                        active = true;
                        if let Sink::Hooks(hook) = sink {
                            // The hook gets the payload where it lies in the read buffer:
                            // shared, not copied.
                            let frame = buf.split_to(header.frame_len()).freeze();
                            let message = self.message(text, frame.slice(header.header_len..))?;
                            if !hook(message, arrived, &mut self.out)? {
                                return Ok(true);
                            }
                            continue;
                        }
                        if text && !policy::is_utf8(payload) {
                            return Err(Ending::BadUtf8(self.side));
                        }
                        self.pass_through(sink, text, payload, arrived)?;
                    } else {
                        let mut fragments = Fragments {
                            text,
                            compressed: header.compressed,
                            data: payload.to_vec(),
                            checked: 0,
                            arrived,
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
                    fragments.arrived.frames = fragments.arrived.frames.saturating_add(1);
                    if !fragments.still_utf8() {
                        return Err(Ending::BadUtf8(self.side));
                    }
                    if header.fin {
                        let Fragments {
                            text,
                            compressed,
                            data,
                            arrived,
                            ..
                        } = self.fragments.take().expect("fragments checked above");
                        active = true;
                        if compressed {
                            let data = self.inflate(&data)?;
                            if !self.deliver(sink, text, data, arrived)? {
                                buf.advance(header.frame_len());
                                return Ok(true);
                            }
                        } else if let Sink::Hooks(hook) = sink {
                            let message = self.message(text, Bytes::from(data))?;
                            if !hook(message, arrived, &mut self.out)? {
                                buf.advance(header.frame_len());
                                return Ok(true);
                            }
                        } else {
                            if text && !policy::is_utf8(&data) {
                                return Err(Ending::BadUtf8(self.side));
                            }
                            self.pass_through(sink, text, &data, arrived)?;
                        }
                    }
                }
                OpCode::Ping => {
                    self.record_control(Kind::Ping, payload, header.mask);
                    self.out.push(OpCode::Pong, payload)
                }
                OpCode::Pong => self.record_control(Kind::Pong, payload, header.mask),
                OpCode::Close => {
                    self.record_control(Kind::Close, payload, header.mask);
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

    /// Inflates a compressed message's payload under `max_message_size`: one that would
    /// inflate past it fails with 1009 as soon as it does (a zip bomb costs the limit only).
    fn inflate(&mut self, payload: &[u8]) -> Result<Vec<u8>, Ending> {
        let Some(inflater) = &mut self.inflate else {
            return Err(self.protocol("compressed message without permessage-deflate"));
        };
        inflater
            .inflate(payload, self.max_message_size)
            .map_err(|e| match e {
                InflateError::TooBig => Ending::TooBig(self.side),
                InflateError::Corrupt => self.protocol("compressed data that does not inflate"),
            })
    }

    /// Hands an inflated message to `sink`: the hooks' answer (whether the read may go on),
    /// or `true`.
    fn deliver(
        &mut self,
        sink: &mut Sink<'_>,
        text: bool,
        data: Vec<u8>,
        arrived: Arrived,
    ) -> Result<bool, Ending> {
        if let Sink::Hooks(hook) = sink {
            let message = self.message(text, Bytes::from(data))?;
            return hook(message, arrived, &mut self.out);
        }
        if text && !policy::is_utf8(&data) {
            return Err(Ending::BadUtf8(self.side));
        }
        self.pass_through(sink, text, &data, arrived)?;
        Ok(true)
    }

    /// A message for the hooks; text is checked to be UTF-8 here.
    fn message(&self, text: bool, payload: Bytes) -> Result<Data, Ending> {
        if text {
            Data::checked_text(payload).ok_or(Ending::BadUtf8(self.side))
        } else {
            Ok(Data::binary(payload))
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
}
