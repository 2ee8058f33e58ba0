//! A connection's two timers: the absolute deadline (`expire`) and the idle timeout.
//!
//! Both are entries in tokio's timer wheel: no thread per timer, and nothing wakes while a
//! connection waits. The idle timer is not reset per message (that would touch the wheel on the
//! hot path): a message only records the time, and when the timer fires it re-arms itself if
//! there was activity since.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Which timer ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// The absolute lifetime passed.
    Lifetime,
    /// No data message for the idle timeout.
    Idle,
}

/// The deadline and idle timers of one connection.
pub(crate) struct Lifetime {
    deadline: Option<Pin<Box<Sleep>>>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    last_activity: Instant,
}

impl Lifetime {
    /// Starts the timers now. `None` disables a timer.
    pub(crate) fn start(deadline: Option<Instant>, idle_timeout: Option<Duration>) -> Self {
        let now = Instant::now();
        Lifetime {
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            idle: idle_timeout.map(|t| (t, Box::pin(tokio::time::sleep_until(now + t)))),
            last_activity: now,
        }
    }

    /// Records a data message (either direction).
    pub(crate) fn touch(&mut self) {
        if self.idle.is_some() {
            self.last_activity = Instant::now();
        }
    }

    /// Ready when a timer has run out; registers for wake-up otherwise.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Expiry> {
        if let Some(deadline) = &mut self.deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Expiry::Lifetime);
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
        let mut l = Lifetime::start(Some(start + Duration::from_secs(30)), None);
        assert_eq!(poll_fn(|cx| l.poll_expired(cx)).await, Expiry::Lifetime);
        assert_eq!(start.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn activity_postpones_idle_expiry() {
        let start = Instant::now();
        let mut l = Lifetime::start(None, Some(Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_secs(7)).await;
        l.touch();
        assert_eq!(poll_fn(|cx| l.poll_expired(cx)).await, Expiry::Idle);
        assert_eq!(start.elapsed(), Duration::from_secs(17));
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
                let mut l = Lifetime::start(Some(deadline), Some(Duration::from_secs(3600)));
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
