//! The duplex loop of one connection: one task, one poll function over both legs, the timers
//! and shutdown. Limits are enforced by the legs while they read, before messages reach the
//! hooks.
//!
//! Backpressure: a leg is read only while the other leg has nothing left to write (and its own
//! queue of replies is short), so each direction holds at most one read's worth of frames; a
//! peer that stops reading slows the other side down to its pace. Policies add to a leg's
//! queue only within `route.max_queued_bytes` (they are told the room left, and a read stops
//! after the message that fills it), so no policy can make a connection hold more.
//!
//! Routes whose hooks do not look at a direction relay its messages straight from the read
//! buffer into the other leg's write buffer: one copy, no allocation per message.
//!
//! The admin API reaches the relay only through the connection's bounded control channel
//! (see [`crate::registry`]), polled once per wake-up, never per message: a close ends the
//! relay like a policy's, and a message is queued like a policy's `conn:send_*`, within
//! `route.max_queued_bytes` (one that does not fit waits, see [`Relay::poll_control`]).

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::close::{Ending, LegClose, Side, Traffic};
use super::leg::{Arrived, Leg, Outbox, Sink};
use super::lifetime::{Expiry, Lifetime};
use super::meter::Meter;
use super::Shared;
use crate::capture::{self, Capture, Decision, Seen};
use crate::metrics;
use crate::policy::{Data, Direction, FrameHooks, Outbound, Verdict};
use crate::registry::{self, Control, Target, CONTROL_CAPACITY};

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
    /// Whether client-to-upstream, then upstream-to-client messages are reassembled (for the
    /// hooks, or to be inflated or compressed: permessage-deflate on either leg).
    inspects: [bool; 2],
    /// Whether the hooks look at client-to-upstream, then upstream-to-client messages.
    hooked: [bool; 2],
    /// Whether the hooks only check the text messages of a direction (a JSON Schema): they
    /// are then relayed byte for byte after [`FrameHooks::check`], not reassembled.
    checked: [bool; 2],
    /// Messages the hooks send besides their verdicts, towards the client and the upstream.
    /// Empty (unallocated) unless a policy sends.
    replies: [VecDeque<Data>; 2],
    /// Alternates which leg is read first, so neither can starve the other.
    client_first: bool,
    /// Set when shutdown starts; checked on every wake-up (no lock).
    shared: Arc<Shared>,
    /// Whether the shutdown future has been polled once, so that it wakes this task.
    shutdown_armed: bool,
    /// `route.max_queued_bytes`: the most a policy may leave queued for a leg.
    max_queued: usize,
    /// This connection's counters (registry and metrics).
    meter: Meter,
    /// The admin's control messages; `None` once the registry dropped its sender.
    control: Option<registry::ControlReceiver>,
    /// Admin messages taken off the channel that did not fit their leg's queue yet, in order;
    /// at most [`CONTROL_CAPACITY`] (the channel is not read while this is full).
    held: VecDeque<(Target, registry::Message)>,
    /// A close time a hook asked for (`conn:expire_at`), applied after the read that asked.
    expire_at: Option<std::time::SystemTime>,
    /// The traffic console's capture, while it records (the legs hold it too).
    capture: Option<Arc<Capture>>,
}

/// What the upgrade hands the relay besides the legs: its counters, its control channel and
/// its capture, when its route records from the start.
pub(crate) struct Wiring {
    pub(crate) meter: Meter,
    pub(crate) control: Option<registry::ControlReceiver>,
    pub(crate) capture: Option<Arc<Capture>>,
}

impl Relay {
    pub(crate) fn new(
        client: Leg,
        upstream: Leg,
        lifetime: Lifetime,
        shared: Arc<Shared>,
        hooks: Box<dyn FrameHooks>,
        max_queued: usize,
        wiring: Wiring,
    ) -> Self {
        let hooked = [
            hooks.inspects(Direction::ClientToUpstream),
            hooks.inspects(Direction::UpstreamToClient),
        ];
        // Compressed messages cannot be relayed byte for byte: they are inflated, and
        // compressed again for a leg that agreed to it.
        let deflate = client.compresses() || upstream.compresses();
        let checked = [
            hooks.checks_only(Direction::ClientToUpstream),
            hooks.checks_only(Direction::UpstreamToClient),
        ]
        .map(|c| c && !deflate);
        let inspects = [0, 1].map(|d| (hooked[d] && !checked[d]) || deflate);
        let (mut client, mut upstream) = (client, upstream);
        client.capture = wiring.capture.clone();
        upstream.capture = wiring.capture.clone();
        Relay {
            client,
            upstream,
            lifetime,
            shutdown: Box::pin(shared.shutdown.clone().cancelled_owned()),
            hooks,
            traffic: [Traffic::default(); 2],
            inspects,
            hooked,
            checked,
            replies: Default::default(),
            client_first: true,
            shared,
            shutdown_armed: false,
            max_queued,
            meter: wiring.meter,
            control: wiring.control,
            held: VecDeque::new(),
            expire_at: None,
            capture: wiring.capture,
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
            mut client,
            mut upstream,
            traffic: [mut to_upstream, mut to_client],
            hooks,
            inspects,
            checked,
            meter,
            capture,
            ..
        } = *self;
        let (client_plan, upstream_plan) = ending.plan();
        if let Some(capture) = capture {
            record_end(&capture, &ending, [&client_plan, &upstream_plan]);
        }
        match (&client_plan, &upstream_plan) {
            // The client broke the rules: the upstream is told first, and what it still
            // sends until its close reply (answers to the client's earlier messages) reaches
            // the client before the client's close frame, as it would through a plain TCP
            // proxy. Not on a route whose policy looks at those messages: they could not pass
            // through it any more.
            (LegClose::Fail(_), LegClose::Send(frame))
                if !inspects[1]
                    && !checked[1]
                    && !client.out.is_mid_frame()
                    && !upstream.out.is_mid_frame() =>
            {
                let deadline = tokio::time::Instant::now() + close_timeout;
                let replied = tokio::time::timeout_at(
                    deadline,
                    upstream.close_into(
                        frame.as_ref(),
                        Some((
                            &mut client,
                            meter.tally(metrics::Direction::UpstreamToClient),
                        )),
                    ),
                )
                .await;
                let upstream_end = async {
                    // Owned here, so that the socket goes as soon as its own close is done.
                    let mut upstream = upstream;
                    if let Ok(true) = replied {
                        let _ = tokio::time::timeout_at(deadline, upstream.wait_for_end()).await;
                    }
                    to_upstream.undelivered += upstream.undelivered();
                };
                tokio::join!(
                    upstream_end,
                    close_leg(client, client_plan, &mut to_client, close_timeout),
                );
            }
            _ => {
                tokio::join!(
                    close_leg(client, client_plan, &mut to_client, close_timeout),
                    close_leg(upstream, upstream_plan, &mut to_upstream, close_timeout),
                );
            }
        }
        // The forwarded counts were kept once, in the registry's counters.
        let counts = meter.conn.read();
        to_upstream.messages = counts.messages.client_to_upstream;
        to_upstream.bytes = counts.bytes.client_to_upstream;
        to_client.messages = counts.messages.upstream_to_client;
        to_client.bytes = counts.bytes.upstream_to_client;
        (ending, [to_upstream, to_client], hooks)
    }

    /// Moves messages both ways until the connection ends.
    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<Ending> {
        if self.control.is_some() || !self.held.is_empty() {
            if let Err(ending) = self.poll_control(cx) {
                return Poll::Ready(ending);
            }
        }
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
        // Once per wake-up, and only when a policy asked: a wall-clock time for the timers.
        if let Some(at) = self.expire_at.take() {
            let from_now = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            let now = tokio::time::Instant::now();
            let set = self.lifetime.move_deadline(
                now.checked_add(from_now)
                    .unwrap_or(now + Duration::from_secs(86_400 * 365)),
            );
            // The registry shows the deadline as set (the route's `expire` caps it).
            let wall = std::time::SystemTime::now() + set.saturating_duration_since(now);
            self.meter.conn.expires_at(wall);
        }
        while let Poll::Ready(expiry) = self.lifetime.poll_expired(cx) {
            match expiry {
                Expiry::Lifetime => return Poll::Ready(Ending::Expired),
                Expiry::Token => return Poll::Ready(Ending::TokenExpired),
                Expiry::Idle => return Poll::Ready(Ending::Idle),
                Expiry::Ping(side) => {
                    let leg = self.leg(side);
                    // A ping cannot interrupt a frame being streamed into the leg.
                    if leg.out.is_mid_frame() {
                        self.lifetime.excuse(side);
                    } else {
                        leg.out.push_ping();
                        if let Poll::Ready(Err(ending)) = leg.poll_flush(cx) {
                            return Poll::Ready(ending);
                        }
                    }
                }
                Expiry::Unresponsive(side) => {
                    // Its answer may be waiting unread, held back because the other leg has
                    // not taken what it was given (that leg is pinged on its own).
                    if !self.leg(side.other()).out.is_empty() || self.leg(side).out.is_mid_frame() {
                        self.lifetime.excuse(side);
                    } else {
                        return Poll::Ready(Ending::Unresponsive(side));
                    }
                }
            }
        }
        // An admin message waiting for room it now has (the queue emptied in this poll).
        let room = self.held.front().is_some_and(|(to, m)| self.fits(*to, m));
        if busy || room {
            // Still data to read, but others get their turn first.
            cx.waker().wake_by_ref();
        } else {
            self.client.release_buffers();
            self.upstream.release_buffers();
        }
        Poll::Pending
    }

    /// Carries out the admin's control messages. A close ends the relay at once (also behind
    /// held messages). A message is queued on its leg like a policy's `conn:send_*`: only within
    /// `max_queued_bytes` and not inside a frame being streamed; one that does not fit is held,
    /// in order, until it does. While [`CONTROL_CAPACITY`] messages are held the channel is not
    /// read, so it fills and the admin is answered 503: every queue stays bounded.
    fn poll_control(&mut self, cx: &mut Context<'_>) -> Result<(), Ending> {
        while let Some((to, message)) = self.held.front() {
            if !self.fits(*to, message) {
                break;
            }
            let (to, message) = self.held.pop_front().expect("front checked above");
            self.push_admin(to, &message);
        }
        while self.held.len() < CONTROL_CAPACITY {
            let Some(control) = &mut self.control else {
                break;
            };
            match control.poll_recv(cx) {
                Poll::Pending => break,
                // The registry dropped the sender: nothing more can come.
                Poll::Ready(None) => self.control = None,
                Poll::Ready(Some(Control::Close { code, reason })) => {
                    return Err(Ending::Admin(CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.into(),
                    }));
                }
                Poll::Ready(Some(Control::Capture(handle))) => {
                    self.client.capture = Some(handle.0.clone());
                    self.upstream.capture = Some(handle.0.clone());
                    self.capture = Some(handle.0);
                }
                Poll::Ready(Some(Control::Send { to, message })) => {
                    if self.held.is_empty() && self.fits(to, &message) {
                        self.push_admin(to, &message);
                    } else {
                        self.held.push_back((to, message));
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether an admin message fits its leg's queue now. An empty queue takes any message
    /// (the admin's body limit bounds it), so that a large one cannot wait forever.
    fn fits(&self, to: Target, message: &registry::Message) -> bool {
        let out = match to {
            Target::Client => &self.client.out,
            Target::Upstream => &self.upstream.out,
        };
        let len = match message {
            registry::Message::Text(t) => t.len(),
            registry::Message::Binary(b) => b.len(),
        };
        !out.is_mid_frame() && (out.is_empty() || out.len() + len <= self.max_queued)
    }

    fn push_admin(&mut self, to: Target, message: &registry::Message) {
        let (out, direction) = match to {
            Target::Client => (&mut self.client.out, metrics::Direction::UpstreamToClient),
            Target::Upstream => (&mut self.upstream.out, metrics::Direction::ClientToUpstream),
        };
        let (text, payload) = match message {
            registry::Message::Text(t) => (true, t.as_bytes()),
            registry::Message::Binary(b) => (false, &b[..]),
        };
        out.push_data(text, payload);
        if let Some(capture) = &self.capture {
            capture.record(&Seen {
                from: capture::From::Admin,
                decision: Some(Decision::Sent),
                ..Seen::data(direction, text, payload)
            });
        }
    }

    fn leg(&mut self, side: Side) -> &mut Leg {
        match side {
            Side::Client => &mut self.client,
            Side::Upstream => &mut self.upstream,
        }
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
        let (slot, direction) = match from {
            Side::Client => (0, metrics::Direction::ClientToUpstream),
            Side::Upstream => (1, metrics::Direction::UpstreamToClient),
        };
        let tally = self.meter.tally(direction);
        let received = if !self.inspects[slot] && !self.checked[slot] {
            reader.poll_receive(
                cx,
                Sink::Through {
                    peer: writer,
                    tally,
                    check: None,
                },
            )
        } else if !self.inspects[slot] {
            // Checked only: relayed byte for byte after the check; what the check sends (a
            // reply to an invalid message) is queued behind the read.
            let hooks = &mut self.hooks;
            let replies = &mut self.replies;
            let max_queued = self.max_queued;
            let traffic = &mut self.traffic[slot];
            let capture = self.capture.as_deref();
            let mut check = |text: &str, arrived: Arrived, [own, other]: [usize; 2]| {
                let [to_client, to_upstream] = &mut *replies;
                let waiting = |q: &VecDeque<Data>| q.iter().map(Data::len).sum::<usize>();
                let own_room = max_queued.saturating_sub(own);
                let other_room = max_queued.saturating_sub(other);
                let (direction, room_to_client, room_to_upstream) = match from {
                    Side::Client => (
                        Direction::ClientToUpstream,
                        own_room.saturating_sub(waiting(to_client)),
                        other_room.saturating_sub(waiting(to_upstream)),
                    ),
                    Side::Upstream => (
                        Direction::UpstreamToClient,
                        other_room.saturating_sub(waiting(to_client)),
                        own_room.saturating_sub(waiting(to_upstream)),
                    ),
                };
                let started = capture.map(|_| std::time::Instant::now());
                let verdict = match hooks.check(
                    direction,
                    text,
                    Outbound {
                        to_client: &mut *to_client,
                        to_upstream: &mut *to_upstream,
                        room_to_client,
                        room_to_upstream,
                        expire_at: &mut None,
                    },
                ) {
                    None | Some(Verdict::Forward(_)) => return Ok(true),
                    Some(verdict) => verdict,
                };
                if let (Some(capture), Some(started)) = (capture, started) {
                    let (own_replies, other_replies) = match from {
                        Side::Client => (&*to_client, &*to_upstream),
                        Side::Upstream => (&*to_upstream, &*to_client),
                    };
                    record_hooked(
                        capture,
                        Hooked {
                            direction: direction_of(from),
                            before: (true, text.as_bytes()),
                            arrived,
                            took: started.elapsed(),
                            verdict: &verdict,
                            own_replies,
                            other_replies,
                        },
                    );
                }
                match verdict {
                    Verdict::Close(frame) => Err(Ending::Policy(frame)),
                    _ => {
                        traffic.dropped_by_policy += 1;
                        tally.policy_drop();
                        Ok(false)
                    }
                }
            };
            let received = reader.poll_receive(
                cx,
                Sink::Through {
                    peer: writer,
                    tally,
                    check: Some(&mut check),
                },
            );
            let [to_client, to_upstream] = &mut self.replies;
            let (own, other) = match from {
                Side::Client => (to_client, to_upstream),
                Side::Upstream => (to_upstream, to_client),
            };
            drain_into(own, &mut reader.out);
            drain_into(other, &mut writer.out);
            received
        } else {
            let hooks = &mut self.hooks;
            let hooked = self.hooked[slot];
            let replies = &mut self.replies;
            let max_queued = self.max_queued;
            let traffic = &mut self.traffic[slot];
            let expire_at = &mut self.expire_at;
            let capture = self.capture.as_deref();
            let mut hook = |message: Data, arrived: Arrived, own: &mut Outbox| {
                if !hooked {
                    // Reassembled only to be inflated or compressed.
                    tally.message(message.is_text(), message.len());
                    writer.out.push_message(&message);
                    if let Some(capture) = capture {
                        let (text, payload) = body(&message);
                        capture.record(&Seen {
                            frames: arrived.frames,
                            mask: arrived.mask,
                            ..Seen::data(direction_of(from), text, payload)
                        });
                    }
                    return Ok(writer.out.len() < max_queued);
                }
                let [to_client, to_upstream] = &mut *replies;
                let own_room = max_queued.saturating_sub(own.len());
                let other_room = max_queued.saturating_sub(writer.out.len());
                let (direction, room_to_client, room_to_upstream) = match from {
                    Side::Client => (Direction::ClientToUpstream, own_room, other_room),
                    Side::Upstream => (Direction::UpstreamToClient, other_room, own_room),
                };
                // The console's view: the message before the policy, and the policy's time.
                let before = capture.map(|_| (message.clone(), std::time::Instant::now()));
                let verdict = hooks.on_message(
                    direction,
                    message,
                    Outbound {
                        to_client: &mut *to_client,
                        to_upstream: &mut *to_upstream,
                        room_to_client,
                        room_to_upstream,
                        expire_at: &mut *expire_at,
                    },
                );
                // Replies go out before the verdict's message.
                let (own_replies, other_replies) = match from {
                    Side::Client => (to_client, to_upstream),
                    Side::Upstream => (to_upstream, to_client),
                };
                if let (Some(capture), Some((before, started))) = (capture, before) {
                    record_hooked(
                        capture,
                        Hooked {
                            direction: direction_of(from),
                            before: body(&before),
                            arrived,
                            took: started.elapsed(),
                            verdict: &verdict,
                            own_replies,
                            other_replies,
                        },
                    );
                }
                drain_into(own_replies, own);
                drain_into(other_replies, &mut writer.out);
                match verdict {
                    Verdict::Forward(message) => {
                        tally.message(message.is_text(), message.len());
                        writer.out.push_message(&message);
                    }
                    Verdict::Drop => {
                        traffic.dropped_by_policy += 1;
                        tally.policy_drop();
                    }
                    Verdict::Close(frame) => return Err(Ending::Policy(frame)),
                }
                // A full queue ends the read here: the rest waits until it is written out.
                Ok(writer.out.len() < max_queued && own.len() < max_queued)
            };
            reader.poll_receive(cx, Sink::Hooks(&mut hook))
        };
        match received {
            Poll::Ready(Ok(active)) => {
                // Once per batch: the timers need no finer time than that.
                self.lifetime.heard(from, active);
                Poll::Ready(Ok(()))
            }
            other => other.map_ok(|_| ()),
        }
    }
}

/// Records the close frames framegate sends each leg, then the connection's end: who ended
/// it is `admin` for a close from the admin API (the console's kick), else as logged.
fn record_end(capture: &Capture, ending: &Ending, plans: [&LegClose; 2]) {
    let towards = [
        metrics::Direction::UpstreamToClient,
        metrics::Direction::ClientToUpstream,
    ];
    for (plan, direction) in plans.into_iter().zip(towards) {
        let (LegClose::Send(frame) | LegClose::Finish(frame) | LegClose::Fail(frame)) = plan else {
            continue;
        };
        let (code, reason) = frame
            .as_ref()
            .map_or((1005, ""), |f| (u16::from(f.code), f.reason.as_str()));
        capture.record(&Seen {
            from: capture::From::Gateway,
            kind: capture::Kind::Close,
            decision: Some(Decision::Sent),
            close: Some((code, reason)),
            size: if frame.is_some() { 2 + reason.len() } else { 0 },
            ..Seen::data(direction, false, &[])
        });
    }
    let (code, reason) = ending.code_and_reason();
    let by = match ending {
        Ending::Admin(_) => "admin",
        _ => ending.closed_by().as_str(),
    };
    capture.finish(capture::Closed { code, reason, by });
}

/// The direction of the messages read from `side`.
fn direction_of(side: Side) -> metrics::Direction {
    match side {
        Side::Client => metrics::Direction::ClientToUpstream,
        Side::Upstream => metrics::Direction::UpstreamToClient,
    }
}

/// Whether a message is text, and its payload.
fn body(message: &Data) -> (bool, &[u8]) {
    (message.is_text(), message.payload())
}

/// A message a frame policy looked at, for the console.
struct Hooked<'a> {
    direction: metrics::Direction,
    /// The message as it came: whether text, and its payload.
    before: (bool, &'a [u8]),
    arrived: Arrived,
    took: Duration,
    verdict: &'a Verdict,
    own_replies: &'a VecDeque<Data>,
    other_replies: &'a VecDeque<Data>,
}

/// Records a message with the policy's decision, then what the policy sent besides.
fn record_hooked(capture: &Capture, h: Hooked<'_>) {
    let (text, payload) = h.before;
    let (decision, after) = match h.verdict {
        Verdict::Forward(m) if body(m) == (text, payload) => (Decision::Forwarded, None),
        Verdict::Forward(m) => (Decision::Replaced, Some(body(m))),
        Verdict::Drop if !h.own_replies.is_empty() => (Decision::Replied, None),
        Verdict::Drop => (Decision::Dropped, None),
        Verdict::Close(_) => (Decision::Closed, None),
    };
    capture.record(&Seen {
        frames: h.arrived.frames,
        mask: h.arrived.mask,
        decision: Some(decision),
        policy: Some(h.took),
        after,
        ..Seen::data(h.direction, text, payload)
    });
    let back = match h.direction {
        metrics::Direction::ClientToUpstream => metrics::Direction::UpstreamToClient,
        metrics::Direction::UpstreamToClient => metrics::Direction::ClientToUpstream,
    };
    for (direction, queue) in [(back, h.own_replies), (h.direction, h.other_replies)] {
        for reply in queue {
            let (text, payload) = body(reply);
            capture.record(&Seen {
                from: capture::From::Policy,
                decision: Some(Decision::Sent),
                ..Seen::data(direction, text, payload)
            });
        }
    }
}

fn drain_into(queue: &mut VecDeque<Data>, out: &mut Outbox) {
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
            LegClose::Fail(frame) => leg.fail(frame.as_ref()).await,
        }
    };
    let _ = tokio::time::timeout(timeout, handshake).await;
    traffic.undelivered += leg.undelivered();
}
