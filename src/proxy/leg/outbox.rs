//! The write side of a leg: frames encoded into one queue per leg, written with vectored
//! writes straight from the read buffer when the queue is empty, and the masking keys of
//! client legs.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWrite;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use super::super::buffers;
use super::super::deflate::Deflater;
use super::super::frame::{self, OpCode, Role};
use crate::policy::Data;
use crate::upstream::Io;

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

/// Encoded frames waiting to be written to one leg.
pub(crate) struct Outbox {
    pub(super) buf: Vec<u8>,
    /// `buf[written..]` is still to be written.
    pub(super) written: usize,
    /// Client legs mask every frame they send.
    masked: bool,
    /// Payload bytes of a streamed frame still to come. Nothing else may be queued meanwhile:
    /// a frame cannot be interrupted.
    open: usize,
    /// Bytes at the start of `buf` that belong to a streamed frame whose header was written
    /// before; frames are aligned from here.
    head_skip: usize,
    /// With permessage-deflate agreed on this leg (and a `compression_level` above 0): data
    /// messages from the route's `compression_threshold` up are sent compressed.
    pub(super) deflate: Option<Deflater>,
}

impl Outbox {
    pub(super) fn new(role: Role) -> Self {
        Outbox {
            buf: Vec::new(),
            written: 0,
            masked: role == Role::Client,
            open: 0,
            head_skip: 0,
            deflate: None,
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
    pub(super) fn push(&mut self, opcode: OpCode, payload: &[u8]) {
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
    pub(super) fn open_binary(&mut self, payload_len: usize, sender_mask: Option<[u8; 4]>) {
        frame::encode_header(self.buf(), OpCode::Binary, payload_len, sender_mask);
        self.open = payload_len;
    }

    /// Sends the next payload bytes of the open frame, as they came (the frame keeps the
    /// sender's masking key), straight from the read buffer (see [`Outbox::write_behind`]).
    pub(super) fn push_chunk(&mut self, io: &mut Io, cx: &mut Context<'_>, chunk: &[u8]) {
        let open_before = self.open;
        self.open -= chunk.len();
        self.write_behind(io, cx, chunk, open_before);
    }

    /// Writes `frames` (whole frames, relayed as they came) straight from the read buffer (see
    /// [`Outbox::write_behind`]). Nothing may be open: `frames` start a frame.
    pub(super) fn write_through(&mut self, io: &mut Io, cx: &mut Context<'_>, frames: &[u8]) {
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
    pub(super) fn push_verbatim(&mut self, frame: &[u8]) {
        self.buf().extend_from_slice(frame);
    }

    /// Queues one data message, compressed on a leg that agreed permessage-deflate unless it
    /// is shorter than the route's `compression_threshold`.
    pub(crate) fn push_data(&mut self, text: bool, payload: &[u8]) {
        let opcode = if text { OpCode::Text } else { OpCode::Binary };
        let Some(mut deflater) = self.deflate.take() else {
            return self.push(opcode, payload);
        };
        let compressed = deflater.deflate(payload, |compressed| {
            let mask = self.mask();
            let buf = self.buf();
            let at = buf.len();
            frame::encode(buf, opcode, compressed, mask);
            buf[at] |= frame::RSV1;
        });
        self.deflate = Some(deflater);
        if compressed.is_none() {
            self.push(opcode, payload);
        }
    }

    /// Queues a data message a hook forwarded or sent.
    pub(crate) fn push_message(&mut self, message: &Data) {
        self.push_data(message.is_text(), message.payload());
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
    pub(super) fn poll_write(
        &mut self,
        io: &mut Io,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
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
    pub(super) fn undelivered(&self) -> u64 {
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
            let Ok(Some(header)) = frame::parse_header(&self.buf[at..], receiver, usize::MAX, true)
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
