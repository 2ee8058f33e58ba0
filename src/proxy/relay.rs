//! The duplex loop of one connection: one task, one poll function over both legs, the timers
//! and shutdown. Limits are enforced by the WebSocket codec before messages reach the hooks.
//!
//! Backpressure: a leg is read only while the other leg has nothing queued (and its own queue of
//! policy replies is short), so each direction holds at most one message plus the codec's write
//! buffer; a peer that stops reading slows the other side down to its pace.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::close::{Ending, LegClose, Side, Traffic};
use super::lifetime::{Expiry, Lifetime};
use crate::policy::{Direction, FrameHooks, Outbound, Verdict};
use crate::upstream::WsStream;

/// At most this many messages are read between two flushes.
const FLUSH_BATCH: usize = 32;

/// A leg is not read while more than this many policy replies wait to be written to it.
const MAX_QUEUED_REPLIES: usize = 64;

/// One WebSocket leg with the messages waiting to be written to it.
struct Leg {
    ws: WsStream,
    outbox: VecDeque<Message>,
    unflushed: bool,
    /// Data messages taken from the outbox whose write failed.
    lost: u64,
}

impl Leg {
    fn new(ws: WsStream) -> Self {
        Leg {
            ws,
            outbox: VecDeque::new(),
            unflushed: false,
            lost: 0,
        }
    }

    /// Hands queued messages to the codec (which writes once its buffer is full); ready when the
    /// outbox is empty. Flushing is separate, so that a burst is written with few syscalls.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), tungstenite::Error>> {
        while !self.outbox.is_empty() {
            ready!(self.ws.poll_ready_unpin(cx))?;
            let message = self.outbox.pop_front().expect("outbox checked non-empty");
            let is_data = message.is_text() || message.is_binary();
            if let Err(e) = self.ws.start_send_unpin(message) {
                self.lost += u64::from(is_data);
                return Poll::Ready(Err(e));
            }
            self.unflushed = true;
        }
        Poll::Ready(Ok(()))
    }

    /// Flushes what was handed to the codec.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), tungstenite::Error>> {
        if self.unflushed {
            ready!(self.ws.poll_flush_unpin(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Sends and flushes everything queued.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), tungstenite::Error>> {
        ready!(self.poll_send(cx))?;
        self.poll_flush(cx)
    }
}

/// What the poll function saw.
enum Event {
    Data(Side, Message),
    End(Ending),
}

/// A running relay between a client and an upstream.
pub(crate) struct Relay {
    client: Leg,
    upstream: Leg,
    lifetime: Lifetime,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    hooks: Box<dyn FrameHooks>,
    /// Client-to-upstream, then upstream-to-client.
    traffic: [Traffic; 2],
    /// Alternates which leg is read first, so neither can starve the other.
    client_first: bool,
    /// Messages read since the last flush.
    unflushed_batch: usize,
}

impl Relay {
    pub(crate) fn new(
        client: WsStream,
        upstream: WsStream,
        lifetime: Lifetime,
        shutdown: WaitForCancellationFutureOwned,
        hooks: Box<dyn FrameHooks>,
    ) -> Self {
        Relay {
            client: Leg::new(client),
            upstream: Leg::new(upstream),
            lifetime,
            shutdown: Box::pin(shutdown),
            hooks,
            traffic: [Traffic::default(); 2],
            client_first: true,
            unflushed_batch: 0,
        }
    }

    /// Relays until something ends the connection, closes both legs (each closing handshake
    /// bounded by `close_timeout`) and returns why it ended with the traffic counters.
    pub(crate) async fn run(
        mut self,
        close_timeout: Duration,
    ) -> (Ending, [Traffic; 2], Box<dyn FrameHooks>) {
        let ending = loop {
            match poll_fn(|cx| self.poll_event(cx)).await {
                Event::Data(from, message) => {
                    if let Some(ending) = self.on_data(from, message) {
                        break ending;
                    }
                }
                Event::End(ending) => break ending,
            }
        };
        let Relay {
            client,
            upstream,
            traffic: [mut to_upstream, mut to_client],
            hooks,
            ..
        } = self;
        let (client_plan, upstream_plan) = ending.plan();
        tokio::join!(
            close_leg(client, client_plan, &mut to_client, close_timeout),
            close_leg(upstream, upstream_plan, &mut to_upstream, close_timeout),
        );
        (ending, [to_upstream, to_client], hooks)
    }

    fn on_data(&mut self, from: Side, message: Message) -> Option<Ending> {
        self.lifetime.touch();
        let (direction, slot) = match from {
            Side::Client => (Direction::ClientToUpstream, 0),
            Side::Upstream => (Direction::UpstreamToClient, 1),
        };
        let out = Outbound {
            to_client: &mut self.client.outbox,
            to_upstream: &mut self.upstream.outbox,
        };
        match self.hooks.on_message(direction, message, out) {
            Verdict::Forward(message) => {
                let traffic = &mut self.traffic[slot];
                traffic.messages += 1;
                traffic.bytes += message.len() as u64;
                self.leg(from.other()).outbox.push_back(message);
                None
            }
            Verdict::Drop => {
                self.traffic[slot].dropped_by_policy += 1;
                None
            }
            Verdict::Close(frame) => Some(Ending::Policy(frame)),
        }
    }

    fn leg(&mut self, side: Side) -> &mut Leg {
        match side {
            Side::Client => &mut self.client,
            Side::Upstream => &mut self.upstream,
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        for side in [Side::Client, Side::Upstream] {
            if let Poll::Ready(Err(e)) = self.leg(side).poll_send(cx) {
                return Poll::Ready(Event::End(Ending::from_read_error(side, Some(e))));
            }
        }
        // Read while data is ready, up to a batch; flush once nothing more is ready (or the
        // batch is full), so bursts share write syscalls while a lone message goes out at once.
        if self.unflushed_batch < FLUSH_BATCH {
            self.client_first = !self.client_first;
            let order = if self.client_first {
                [Side::Client, Side::Upstream]
            } else {
                [Side::Upstream, Side::Client]
            };
            for side in order {
                // Replies a policy queued towards `side` itself count against it too, so a
                // sender that does not read its replies is throttled as well.
                if self.leg(side.other()).outbox.is_empty()
                    && self.leg(side).outbox.len() <= MAX_QUEUED_REPLIES
                {
                    if let Poll::Ready(event) = self.poll_read(side, cx) {
                        self.unflushed_batch += 1;
                        return Poll::Ready(event);
                    }
                }
            }
        }
        // Shutdown and the timers are polled once per batch, not per message: their wake-ups
        // stay registered in between, and polling the shutdown token takes a lock.
        if self.shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Event::End(Ending::Shutdown));
        }
        if let Poll::Ready(expiry) = self.lifetime.poll_expired(cx) {
            return Poll::Ready(Event::End(match expiry {
                Expiry::Lifetime => Ending::Expired,
                Expiry::Idle => Ending::Idle,
            }));
        }
        let batch_full = self.unflushed_batch >= FLUSH_BATCH;
        self.unflushed_batch = 0;
        for side in [Side::Client, Side::Upstream] {
            if let Poll::Ready(Err(e)) = self.leg(side).poll_flush(cx) {
                return Poll::Ready(Event::End(Ending::from_read_error(side, Some(e))));
            }
        }
        if batch_full {
            // The legs were not read this time, so no read wake-up is registered: come back
            // at once to read the rest.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Reads the next data message or end from `side`; pings and pongs are answered by the
    /// codec on their own leg and go no further.
    fn poll_read(&mut self, side: Side, cx: &mut Context<'_>) -> Poll<Event> {
        loop {
            let next = ready!(self.leg(side).ws.poll_next_unpin(cx));
            return Poll::Ready(match next {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => Event::Data(side, m),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(frame))) => Event::End(Ending::Closed(side, frame)),
                Some(Err(e)) => Event::End(Ending::from_read_error(side, Some(e))),
                None => Event::End(Ending::from_read_error(side, None)),
            });
        }
    }
}

/// Closes one leg per `plan`, bounded by `timeout`, then drops its socket at once (without
/// waiting for the other leg). Data messages that were queued for it but never written are
/// counted as undelivered.
async fn close_leg(mut leg: Leg, plan: LegClose, traffic: &mut Traffic, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, close_handshake(&mut leg, plan)).await;
    let unsent = leg
        .outbox
        .iter()
        .filter(|m| m.is_text() || m.is_binary())
        .count() as u64;
    traffic.undelivered += unsent + leg.lost;
}

async fn close_handshake(leg: &mut Leg, plan: LegClose) {
    match plan {
        LegClose::Drop => return,
        LegClose::Finish => {
            // The peer's close frame came first: nothing may be sent after our reply, so what
            // is queued stays undelivered.
            if leg.ws.flush().await.is_err() {
                return;
            }
        }
        LegClose::Send(frame) => {
            leg.outbox.push_back(Message::Close(frame));
            if poll_fn(|cx| leg.poll_write(cx)).await.is_err() {
                return;
            }
        }
    }
    // Wait for the peer's close reply, or for it to drop the connection.
    while let Some(Ok(_)) = leg.ws.next().await {}
}
