//! The duplex loop of one connection: one task, one poll function over both legs, the timers
//! and shutdown. Limits are enforced by the legs while they read, before messages reach the
//! hooks.
//!
//! Backpressure: a leg is read only while the other leg has nothing left to write (and its own
//! queue of replies is short), so each direction holds at most one read's worth of frames; a
//! peer that stops reading slows the other side down to its pace.
//!
//! Routes whose hooks do not look at a direction relay its messages straight from the read
//! buffer into the other leg's write buffer: one copy, no allocation per message.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::close::{Ending, LegClose, Side, Traffic};
use super::leg::{Leg, Outbox, Sink};
use super::lifetime::{Expiry, Lifetime};
use super::Shared;
use crate::policy::{Direction, FrameHooks, Outbound, Verdict};

/// A leg is not read while more than this many bytes of replies wait to be written to it.
const MAX_QUEUED_REPLIES: usize = 64 * 1024;

/// Read-and-write rounds in one poll before the task yields to the other connections.
const ROUNDS: usize = 16;

/// A running relay between a client and an upstream.
pub(crate) struct Relay {
    client: Leg,
    upstream: Leg,
    lifetime: Lifetime,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    hooks: Box<dyn FrameHooks>,
    /// Client-to-upstream, then upstream-to-client.
    traffic: [Traffic; 2],
    /// Whether the hooks look at client-to-upstream, then upstream-to-client messages.
    inspects: [bool; 2],
    /// Messages the hooks send besides their verdicts, towards the client and the upstream.
    /// Empty (unallocated) unless a policy sends.
    replies: [VecDeque<Message>; 2],
    /// Alternates which leg is read first, so neither can starve the other.
    client_first: bool,
    /// Set when shutdown starts; checked on every wake-up (no lock).
    shared: Arc<Shared>,
    /// Whether the shutdown future has been polled once, so that it wakes this task.
    shutdown_armed: bool,
}

impl Relay {
    pub(crate) fn new(
        client: Leg,
        upstream: Leg,
        lifetime: Lifetime,
        shared: Arc<Shared>,
        hooks: Box<dyn FrameHooks>,
    ) -> Self {
        let inspects = [
            hooks.inspects(Direction::ClientToUpstream),
            hooks.inspects(Direction::UpstreamToClient),
        ];
        Relay {
            client,
            upstream,
            lifetime,
            shutdown: Box::pin(shared.shutdown.clone().cancelled_owned()),
            hooks,
            traffic: [Traffic::default(); 2],
            inspects,
            replies: Default::default(),
            client_first: true,
            shared,
            shutdown_armed: false,
        }
    }

    /// Relays until something ends the connection, closes both legs (each closing handshake
    /// bounded by `close_timeout`) and returns why it ended with the traffic counters.
    ///
    /// The relay is boxed: an async function's state would hold it more than once.
    pub(crate) async fn run(
        mut self: Box<Self>,
        close_timeout: Duration,
    ) -> (Ending, [Traffic; 2], Box<dyn FrameHooks>) {
        let ending = poll_fn(|cx| self.poll_relay(cx)).await;
        // The closing handshakes' state is allocated only now, so that it does not add to
        // what every open connection holds.
        Box::pin(self.close(ending, close_timeout)).await
    }

    async fn close(
        self: Box<Self>,
        ending: Ending,
        close_timeout: Duration,
    ) -> (Ending, [Traffic; 2], Box<dyn FrameHooks>) {
        let Relay {
            client,
            upstream,
            traffic: [mut to_upstream, mut to_client],
            hooks,
            ..
        } = *self;
        let (client_plan, upstream_plan) = ending.plan();
        tokio::join!(
            close_leg(client, client_plan, &mut to_client, close_timeout),
            close_leg(upstream, upstream_plan, &mut to_upstream, close_timeout),
        );
        (ending, [to_upstream, to_client], hooks)
    }

    /// Moves messages both ways until the connection ends.
    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<Ending> {
        let mut busy = false;
        for _ in 0..ROUNDS {
            if let Err(ending) = self.flush(cx) {
                return Poll::Ready(ending);
            }
            busy = false;
            self.client_first = !self.client_first;
            let order = if self.client_first {
                [Side::Client, Side::Upstream]
            } else {
                [Side::Upstream, Side::Client]
            };
            for from in order {
                match self.poll_read(from, cx) {
                    Poll::Ready(Ok(())) => busy = true,
                    Poll::Ready(Err(ending)) => return Poll::Ready(ending),
                    Poll::Pending => {}
                }
            }
            if !busy {
                break;
            }
        }
        if let Err(ending) = self.flush(cx) {
            return Poll::Ready(ending);
        }
        // Polling the shutdown token takes a lock: it is polled once, so that cancelling it
        // wakes this task, and after that the flag set before the cancel is enough.
        if !self.shutdown_armed {
            self.shutdown_armed = true;
            if self.shutdown.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ending::Shutdown);
            }
        }
        if self.shared.stopping.load(Ordering::Acquire) {
            return Poll::Ready(Ending::Shutdown);
        }
        if let Poll::Ready(expiry) = self.lifetime.poll_expired(cx) {
            return Poll::Ready(match expiry {
                Expiry::Lifetime => Ending::Expired,
                Expiry::Idle => Ending::Idle,
            });
        }
        if busy {
            // Still data to read, but others get their turn first.
            cx.waker().wake_by_ref();
        } else {
            self.client.release_buffers();
            self.upstream.release_buffers();
        }
        Poll::Pending
    }

    /// Writes what is queued on both legs, as far as the sockets take it.
    fn flush(&mut self, cx: &mut Context<'_>) -> Result<(), Ending> {
        for leg in [&mut self.client, &mut self.upstream] {
            if let Poll::Ready(Err(ending)) = leg.poll_flush(cx) {
                return Err(ending);
            }
        }
        Ok(())
    }

    /// Reads one batch from `from`, if the other leg has written out what it was given.
    fn poll_read(&mut self, from: Side, cx: &mut Context<'_>) -> Poll<Result<(), Ending>> {
        let (reader, writer) = match from {
            Side::Client => (&mut self.client, &mut self.upstream),
            Side::Upstream => (&mut self.upstream, &mut self.client),
        };
        // Replies a policy queued towards the sender itself count against it too, so a sender
        // that does not read its replies is throttled as well. A leg the other one is
        // streaming a frame into is not read either: its pongs could not be queued.
        if !writer.out.is_empty()
            || reader.out.len() > MAX_QUEUED_REPLIES
            || reader.out.is_mid_frame()
        {
            return Poll::Pending;
        }
        let slot = match from {
            Side::Client => 0,
            Side::Upstream => 1,
        };
        let traffic = &mut self.traffic[slot];
        let received = if !self.inspects[slot] {
            reader.poll_receive(
                cx,
                Sink::Through {
                    peer: writer,
                    traffic,
                },
            )
        } else {
            let hooks = &mut self.hooks;
            let replies = &mut self.replies;
            let mut hook = |message: Message, own: &mut Outbox| {
                let [to_client, to_upstream] = &mut *replies;
                let direction = match from {
                    Side::Client => Direction::ClientToUpstream,
                    Side::Upstream => Direction::UpstreamToClient,
                };
                let verdict = hooks.on_message(
                    direction,
                    message,
                    Outbound {
                        to_client: &mut *to_client,
                        to_upstream: &mut *to_upstream,
                    },
                );
                // Replies go out before the verdict's message.
                let (own_replies, other_replies) = match from {
                    Side::Client => (to_client, to_upstream),
                    Side::Upstream => (to_upstream, to_client),
                };
                drain_into(own_replies, own);
                drain_into(other_replies, &mut writer.out);
                match verdict {
                    Verdict::Forward(message) => {
                        traffic.messages += 1;
                        traffic.bytes += message.len() as u64;
                        writer.out.push_message(&message);
                        Ok(())
                    }
                    Verdict::Drop => {
                        traffic.dropped_by_policy += 1;
                        Ok(())
                    }
                    Verdict::Close(frame) => Err(Ending::Policy(frame)),
                }
            };
            reader.poll_receive(cx, Sink::Hooks(&mut hook))
        };
        match received {
            Poll::Ready(Ok(active)) => {
                if active {
                    // Once per batch: the idle timer needs no finer time than that.
                    self.lifetime.touch();
                }
                Poll::Ready(Ok(()))
            }
            other => other.map_ok(|_| ()),
        }
    }
}

fn drain_into(queue: &mut VecDeque<Message>, out: &mut Outbox) {
    // Most calls reply nothing: an empty queue is not even drained (a drain costs about 50
    // instructions to set up and drop).
    if queue.is_empty() {
        return;
    }
    for message in queue.drain(..) {
        out.push_message(&message);
    }
}

/// Closes one leg per `plan`, bounded by `timeout`, then drops its socket at once (without
/// waiting for the other leg). Data messages that were queued for it but never written are
/// counted as undelivered.
async fn close_leg(mut leg: Leg, plan: LegClose, traffic: &mut Traffic, timeout: Duration) {
    // A frame streamed into this leg was cut short: no close frame can follow it.
    let plan = if leg.out.is_mid_frame() {
        LegClose::Drop
    } else {
        plan
    };
    let handshake = async {
        match &plan {
            LegClose::Drop => {}
            LegClose::Finish(reply) => leg.finish(reply.as_ref()).await,
            LegClose::Send(frame) => leg.close(frame.as_ref()).await,
        }
    };
    let _ = tokio::time::timeout(timeout, handshake).await;
    traffic.undelivered += leg.undelivered();
}
