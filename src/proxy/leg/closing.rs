//! Closing a leg: sending its close frame after what is queued, waiting for the peer's
//! reply (passing on what it still sends), and the lingering close after a protocol error.

use std::pin::Pin;
use std::task::{ready, Poll};

use bytes::BytesMut;
use tokio::io::AsyncWrite;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use super::super::buffers::{self, take_scratch};
use super::super::frame::Role;
use super::super::meter::Tally;
use super::{Leg, Sink};

/// The most a lingering close ([`Leg::fail`]) reads and discards before it drops the socket
/// anyway: more than a peer has in flight when it is cut off mid-message at the default
/// limits, and little work to throw away.
const LINGER_BYTES: usize = 16 << 20;

impl Leg {
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
    /// `tally`) instead of discarding them. False if the connection failed.
    pub(crate) async fn close_into(
        &mut self,
        frame: Option<&CloseFrame>,
        mut peer: Option<(&mut Leg, Tally<'_>)>,
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
                Some((leg, tally)) => Sink::Through {
                    peer: leg,
                    tally: *tally,
                    check: None,
                },
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
