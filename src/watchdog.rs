//! The worker watchdog. A worker whose thread stops making progress (a policy call that
//! escaped every limit, or a bug) would keep its connections and, with the fewest open
//! connections, draw new ones that it never serves. Each worker beats its [`Heartbeat`] every
//! [`BEAT`]; a watchdog thread looks at the heartbeats as often, logs a worker that missed
//! them for longer than the longest legitimate stall, and marks it stuck: the balancer gives
//! it no new connection until it beats again. Shutdown does not wait for a stuck worker past
//! `server.shutdown_grace` (see `Running::shutdown`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// How often a worker beats, and how often the watchdog looks.
pub(crate) const BEAT: Duration = Duration::from_millis(100);

/// The watchdog's clock: milliseconds since the first look at it.
fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One worker's heartbeat, and whether the watchdog holds it for stuck.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    last: AtomicU64,
    stuck: AtomicBool,
}

impl Heartbeat {
    pub(crate) fn new() -> Arc<Heartbeat> {
        Arc::new(Heartbeat {
            last: AtomicU64::new(now_ms()),
            stuck: AtomicBool::new(false),
        })
    }

    /// Whether the balancer should leave this worker out.
    pub(crate) fn is_stuck(&self) -> bool {
        self.stuck.load(Ordering::Relaxed)
    }
}

/// How long a worker may miss its beats before it counts as stuck: twice the longest policy
/// CPU limit (a call plus its overrun) plus a second for everything else, and at least 2 s, so
/// that a busy machine is not taken for a stuck worker.
pub(crate) fn stuck_after(config: &Config) -> Duration {
    let longest = config
        .routes
        .iter()
        .map(|r| r.policy_cpu_limit)
        .max()
        .unwrap_or_default();
    (longest * 2 + Duration::from_secs(1)).max(Duration::from_secs(2))
}

/// A worker's beating, until `stop`: run on the worker's own runtime, so that it beats only
/// while the worker thread gets back to its scheduler.
pub(crate) async fn beat(heartbeat: Arc<Heartbeat>, stop: CancellationToken) {
    let mut every = tokio::time::interval(BEAT);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => heartbeat.last.store(now_ms(), Ordering::Relaxed),
            _ = stop.cancelled() => return,
        }
    }
}

/// Starts the watchdog thread over `heartbeats` (by worker index); it ends with `stop`.
pub(crate) fn spawn(
    heartbeats: Vec<Arc<Heartbeat>>,
    stuck_after: Duration,
    stop: CancellationToken,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("framegate-watchdog".into())
        .spawn(move || {
            while !stop.is_cancelled() {
                std::thread::sleep(BEAT);
                look(&heartbeats, stuck_after, now_ms());
            }
        })
        .map(drop)
}

/// One look at every heartbeat at `now`: logs each change of a worker's state once.
fn look(heartbeats: &[Arc<Heartbeat>], stuck_after: Duration, now: u64) {
    for (worker, heartbeat) in heartbeats.iter().enumerate() {
        let silent =
            Duration::from_millis(now.saturating_sub(heartbeat.last.load(Ordering::Relaxed)));
        let stuck = silent > stuck_after;
        if stuck == heartbeat.stuck.swap(stuck, Ordering::Relaxed) {
            continue;
        }
        if stuck {
            tracing::error!(
                worker,
                silent = ?silent,
                "worker is stuck: its thread has made no progress; it gets no new connections until it does"
            );
        } else {
            tracing::warn!(worker, silent = ?silent, "worker recovered: it gets new connections again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_worker_is_stuck_until_it_beats_again() {
        let heartbeats = vec![Heartbeat::new(), Heartbeat::new()];
        let now = now_ms() + 5_000;
        heartbeats[0].last.store(now - 100, Ordering::Relaxed);
        look(&heartbeats, Duration::from_secs(2), now);
        assert!(!heartbeats[0].is_stuck());
        assert!(heartbeats[1].is_stuck(), "silent for 5 s");
        heartbeats[1].last.store(now, Ordering::Relaxed);
        look(&heartbeats, Duration::from_secs(2), now);
        assert!(!heartbeats[1].is_stuck(), "beating again");
    }
}
