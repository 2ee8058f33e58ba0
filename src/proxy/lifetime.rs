//! A connection's timers: the absolute deadline (`expire`), the idle timeout, and the pings
//! that find a dead peer (`ping_interval`, `ping_timeout`).
//!
//! All are entries in tokio's timer wheel: no thread per timer, and nothing wakes while a
//! connection waits. No timer is reset per message (that would touch the wheel on the hot
//! path): a read only records the time, once per batch and only when a timer needs it, and a
//! timer that fires re-arms itself from the recorded times.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::close::Side;

/// Which timer ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// The absolute lifetime passed.
    Lifetime,
    /// The token's expiry passed (`route.jwt.expire_with_token`).
    Token,
    /// No data message for the idle timeout.
    Idle,
    /// This leg has sent nothing for `ping_interval`: ping it now.
    Ping(Side),
    /// This leg sent nothing back within `ping_timeout` of its ping.
    Unresponsive(Side),
}

/// `ping_interval` and `ping_timeout`, with when each leg was last heard from.
struct Pings {
    interval: Duration,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    /// The client's leg, then the upstream's.
    legs: [PingLeg; 2],
}

#[derive(Clone, Copy)]
struct PingLeg {
    /// When a read last brought anything from this leg (a pong, or any other frame).
    heard: Instant,
    /// When it was pinged, while that ping is unanswered.
    pinged: Option<Instant>,
}

fn slot(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Upstream => 1,
    }
}

/// The timers of one connection.
pub(crate) struct Lifetime {
    deadline: Option<Pin<Box<Sleep>>>,
    /// Whether the deadline is the token's (it closes with 1008 "token expired").
    token: bool,
    /// The latest a moved deadline may be: the route's `expire` (`None`: unlimited).
    cap: Option<Instant>,
    /// The route follows its token: a moved deadline short of the cap is the token's.
    follows_token: bool,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    last_activity: Instant,
    pings: Option<Box<Pings>>,
}

impl Lifetime {
    /// Starts the timers now. `None` disables a timer; `ping` is `(interval, timeout)`.
    pub(crate) fn start(
        deadline: Option<Instant>,
        idle_timeout: Option<Duration>,
        ping: Option<(Duration, Duration)>,
    ) -> Self {
        let now = Instant::now();
        let heard = PingLeg {
            heard: now,
            pinged: None,
        };
        Lifetime {
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            token: false,
            cap: None,
            follows_token: false,
            idle: idle_timeout.map(|t| (t, Box::pin(tokio::time::sleep_until(now + t)))),
            last_activity: now,
            pings: ping.map(|(interval, timeout)| {
                Box::new(Pings {
                    interval,
                    timeout,
                    sleep: Box::pin(tokio::time::sleep_until(now + interval)),
                    legs: [heard; 2],
                })
            }),
        }
    }

    /// Says whether the deadline is the token's, the latest it may be moved to (the route's
    /// `expire`), and whether the route follows its token (`route.jwt.expire_with_token`).
    pub(crate) fn bind_deadline(&mut self, token: bool, cap: Option<Instant>, follows_token: bool) {
        self.token = token;
        self.cap = cap;
        self.follows_token = follows_token;
    }

    /// Moves the deadline to `at` (`conn:expire_at`), never past the cap; earlier is allowed.
    /// Returns the deadline as set.
    pub(crate) fn move_deadline(&mut self, at: Instant) -> Instant {
        let at = self.cap.map_or(at, |cap| at.min(cap));
        self.token = self.follows_token && self.cap.is_none_or(|cap| at < cap);
        match &mut self.deadline {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        at
    }

    /// When the connection closes now, if it has a deadline.
    #[cfg(test)]
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline.as_ref().map(|d| d.deadline())
    }

    /// Records a read from `from` (one per batch); `data` tells whether it moved a data
    /// message. Pings and pongs keep a leg from being pinged, but are not activity for the
    /// idle timeout. The clock is read only when a timer needs it.
    pub(crate) fn heard(&mut self, from: Side, data: bool) {
        let Some(pings) = &mut self.pings else {
            if data && self.idle.is_some() {
                self.last_activity = Instant::now();
            }
            return;
        };
        let now = Instant::now();
        pings.legs[slot(from)].heard = now;
        if data {
            self.last_activity = now;
        }
    }

    /// Counts `side` as heard from now: it could not be pinged, or its answer could not be
    /// read, for reasons of the other leg's making.
    pub(crate) fn excuse(&mut self, side: Side) {
        if let Some(pings) = &mut self.pings {
            pings.legs[slot(side)] = PingLeg {
                heard: Instant::now(),
                pinged: None,
            };
        }
    }

    /// Ready when a timer has run out; registers for wake-up otherwise.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Expiry> {
        if let Some(deadline) = &mut self.deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(if self.token {
                    Expiry::Token
                } else {
                    Expiry::Lifetime
                });
            }
        }
        if let Some((timeout, sleep)) = &mut self.idle {
            while sleep.as_mut().poll(cx).is_ready() {
                let due = self.last_activity + *timeout;
                if due <= Instant::now() {
                    return Poll::Ready(Expiry::Idle);
                }
                sleep.as_mut().reset(due);
            }
        }
        if let Some(pings) = &mut self.pings {
            while pings.sleep.as_mut().poll(cx).is_ready() {
                let now = Instant::now();
                let mut next = now + pings.interval;
                for (i, side) in [Side::Client, Side::Upstream].into_iter().enumerate() {
                    let leg = &mut pings.legs[i];
                    // Anything read since the ping answers it: the pong, or data before it.
                    if leg.pinged.is_some_and(|at| leg.heard >= at) {
                        leg.pinged = None;
                    }
                    let due = match leg.pinged {
                        Some(at) => at + pings.timeout,
                        None => leg.heard + pings.interval,
                    };
                    if due <= now {
                        // The sleep stays expired: the next poll looks again, after the
                        // relay has acted on this leg.
                        return Poll::Ready(match leg.pinged {
                            Some(_) => Expiry::Unresponsive(side),
                            None => {
                                leg.pinged = Some(now);
                                Expiry::Ping(side)
                            }
                        });
                    }
                    next = next.min(due);
                }
                pings.sleep.as_mut().reset(next);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test(start_paused = true)]
    async fn deadline_fires_at_its_time() {
        let start = Instant::now();
        let mut l = Lifetime::start(Some(start + Duration::from_secs(30)), None, None);
        assert_eq!(poll_fn(|cx| l.poll_expired(cx)).await, Expiry::Lifetime);
        assert_eq!(start.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_moved_deadline_stays_within_the_cap_and_says_whose_it_is() {
        let start = Instant::now();
        let cap = start + Duration::from_secs(60);
        let mut l = Lifetime::start(Some(start + Duration::from_secs(10)), None, None);
        l.bind_deadline(true, Some(cap), true);
        l.move_deadline(start + Duration::from_secs(30));
        assert_eq!(poll_fn(|cx| l.poll_expired(cx)).await, Expiry::Token);
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        l.move_deadline(start + Duration::from_secs(600));
        assert_eq!(l.deadline(), Some(cap));
        assert_eq!(poll_fn(|cx| l.poll_expired(cx)).await, Expiry::Lifetime);
        assert_eq!(start.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn activity_postpones_idle_expiry() {
        let start = Instant::now();
        let mut l = Lifetime::start(None, Some(Duration::from_secs(10)), None);
        tokio::time::sleep(Duration::from_secs(7)).await;
        l.heard(Side::Client, true);
        assert_eq!(poll_fn(|cx| l.poll_expired(cx)).await, Expiry::Idle);
        assert_eq!(start.elapsed(), Duration::from_secs(17));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_leg_is_pinged_and_then_found_unresponsive() {
        let start = Instant::now();
        let (interval, timeout) = (Duration::from_secs(30), Duration::from_secs(10));
        let mut l = Lifetime::start(None, None, Some((interval, timeout)));
        tokio::time::sleep(Duration::from_secs(20)).await;
        l.heard(Side::Upstream, false);
        let expired = poll_fn(|cx| l.poll_expired(cx)).await;
        assert_eq!(expired, Expiry::Ping(Side::Client));
        assert_eq!(start.elapsed(), interval);
        // The client answers within its timeout.
        tokio::time::sleep(Duration::from_secs(5)).await;
        l.heard(Side::Client, false);
        let expired = poll_fn(|cx| l.poll_expired(cx)).await;
        assert_eq!(expired, Expiry::Ping(Side::Upstream));
        assert_eq!(start.elapsed(), Duration::from_secs(50));
        // The upstream never does.
        let expired = poll_fn(|cx| l.poll_expired(cx)).await;
        assert_eq!(expired, Expiry::Unresponsive(Side::Upstream));
        assert_eq!(start.elapsed(), Duration::from_secs(50) + timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn pongs_are_not_activity_for_the_idle_timeout() {
        let start = Instant::now();
        let mut l = Lifetime::start(None, Some(Duration::from_secs(10)), None);
        tokio::time::sleep(Duration::from_secs(7)).await;
        l.heard(Side::Client, false);
        assert_eq!(poll_fn(|cx| l.poll_expired(cx)).await, Expiry::Idle);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    /// 100,000 connections' deadlines, spread over 10 s, each one a task waiting on its own
    /// timer: every one fires at its own deadline, with no thread per timer.
    #[tokio::test(start_paused = true)]
    async fn a_hundred_thousand_deadlines_fire_on_time() {
        const N: u64 = 100_000;
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..N {
            let deadline = start + Duration::from_micros(i * 100);
            tasks.spawn(async move {
                let mut l = Lifetime::start(Some(deadline), Some(Duration::from_secs(3600)), None);
                poll_fn(|cx| l.poll_expired(cx)).await;
                Instant::now() - deadline
            });
        }
        let mut fired = 0;
        while let Some(lateness) = tasks.join_next().await {
            // The timer wheel's resolution is 1 ms.
            assert!(lateness.unwrap() <= Duration::from_millis(1));
            fired += 1;
        }
        assert_eq!(fired, N);
    }
}
