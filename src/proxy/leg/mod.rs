//! One WebSocket leg of a relayed connection: its socket, its state, and where its messages
//! go. The work is split by reason to change: [`outbox`] encodes and writes frames (the write
//! queue and vectored writes), [`read`] reads frames and dispatches whole messages, and
//! [`closing`] carries out the closing handshakes and the lingering close.
//!
//! Buffers are the point of these modules. A leg holds no read buffer between frames: reads go
//! into one scratch buffer per worker thread, and only the start of a frame that has not fully
//! arrived is kept by the leg. Its write buffer is released once it is written out. An idle
//! connection therefore holds two sockets, a little state, and no buffers at all (with
//! permessage-deflate too, unless a leg keeps its windows: `compression_context_takeover`).

mod closing;
mod outbox;
mod read;

use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;

use super::buffers;
use super::close::{Ending, Side};
use super::deflate::{Deflater, Inflater};
use super::extensions::Agreed;
use super::frame::{self, FrameError, Role};
use super::meter::Tally;
use crate::capture::Capture;
use crate::policy::Data;
use crate::upstream::{Io, Socket};

pub(crate) use outbox::Outbox;
use read::{Fragments, Streaming};

/// A hook over whole data messages, given with how the message arrived and the sender's own
/// outbox (for replies). It answers whether the read may go on (`false`: a queue is full, the
/// rest of the read waits).
pub(crate) type Hook<'a> = dyn FnMut(Data, Arrived, &mut Outbox) -> Result<bool, Ending> + 'a;

/// A check of the whole text messages a direction relays byte for byte (a JSON Schema):
/// given the text, how it arrived, and the bytes queued for the sender and for the other leg,
/// it answers whether the message goes on (`false`: dropped), or ends the connection.
pub(crate) type Check<'a> = dyn FnMut(&str, Arrived, [usize; 2]) -> Result<bool, Ending> + 'a;

/// How a whole message arrived: what the traffic console shows of its frames.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrived {
    /// Frames it came in.
    pub(crate) frames: u32,
    /// Its first frame's masking key (frames from a client).
    pub(crate) mask: Option<[u8; 4]>,
}

/// Where a leg's data messages go.
pub(crate) enum Sink<'a> {
    /// Straight to the other leg, counted in `tally`; large binary frames are relayed as
    /// they arrive.
    Through {
        /// The other leg.
        peer: &'a mut Leg,
        /// The counters of this direction.
        tally: Tally<'a>,
        /// What each whole text message must pass first, if anything.
        check: Option<&'a mut Check<'a>>,
    },
    /// Each whole message to a hook, with this leg's own outbox for replies to the sender.
    Hooks(&'a mut Hook<'a>),
    /// Nowhere: the connection is closing.
    Discard,
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
    /// With permessage-deflate agreed on this leg: inflates the messages it receives (the
    /// outbox compresses those it sends).
    inflate: Option<Inflater>,
    /// Frames waiting to be written to this leg.
    pub(crate) out: Outbox,
    /// Where the messages this leg receives are recorded, while the console captures them.
    pub(crate) capture: Option<Arc<Capture>>,
}

impl Leg {
    /// A leg on `socket`, after its handshake; `deflate`: what it agreed for
    /// permessage-deflate, if it did.
    pub(crate) fn new(
        socket: Socket,
        side: Side,
        max_message_size: usize,
        deflate: Option<Agreed>,
    ) -> Self {
        let mut out = Outbox::new(role_on(side));
        out.deflate = deflate.and_then(Deflater::new);
        Leg {
            io: socket.io,
            side,
            max_message_size,
            partial: BytesMut::from(&socket.pre_read[..]),
            fragments: None,
            stream: None,
            inflate: deflate.map(Inflater::new),
            out,
            capture: None,
        }
    }

    /// Whether this leg agreed permessage-deflate: its messages are compressed both ways.
    pub(crate) fn compresses(&self) -> bool {
        self.inflate.is_some()
    }

    /// The direction of the messages this leg receives.
    fn direction(&self) -> crate::metrics::Direction {
        match self.side {
            Side::Client => crate::metrics::Direction::ClientToUpstream,
            Side::Upstream => crate::metrics::Direction::UpstreamToClient,
        }
    }

    fn role(&self) -> Role {
        role_on(self.side)
    }

    /// The header at the start of `buf`, as this leg receives it, under its size limit.
    fn header(&self, buf: &[u8]) -> Result<Option<frame::Header>, FrameError> {
        frame::parse_header(
            buf,
            self.role(),
            self.max_message_size,
            self.inflate.is_some(),
        )
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

    /// Data messages queued for this leg that were never (fully) written: those still queued
    /// when its close ended, including any whose write failed.
    pub(crate) fn undelivered(&self) -> u64 {
        self.out.undelivered()
    }
}
