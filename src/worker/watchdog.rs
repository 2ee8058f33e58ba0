//! The watchdog: a plain OS thread, outside every worker's runtime, that notices a worker
//! making no progress (a policy that never returns, a stalled C call, any other block) for
//! `server.watchdog_timeout`. It logs the stall once, marks the worker so that the balancer
//! sends it nothing, and logs its recovery. It cannot unblock a worker: it keeps the rest of
//! the gateway from depending on it.
//!
//! Progress is a heartbeat each worker stores from its own event loop a few times per
//! timeout: nothing on the per-message path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Heartbeats per timeout: detection comes at most a quarter of the timeout late.
const BEATS_PER_TIMEOUT: u32 = 4;

/// What the watchdog knows of each worker.
pub(crate) struct Watchdog {
    epoch: Instant,
    timeout: Duration,
    workers: Vec<Health>,
}

struct Health {
    /// Milliseconds since `epoch` at the worker's last heartbeat.
    beat: AtomicU64,
    /// Set by the watchdog while the worker makes no progress.
    stalled: AtomicBool,
}

/// Stops the watchdog thread when dropped.
pub(crate) struct Stop {
    _sender: mpsc::Sender<()>,
}

impl Watchdog {
    pub(crate) fn new(workers: usize, timeout: Duration) -> Arc<Watchdog> {
        Arc::new(Watchdog {
            epoch: Instant::now(),
            timeout,
            workers: (0..workers)
                .map(|_| Health {
                    beat: AtomicU64::new(0),
                    stalled: AtomicBool::new(false),
                })
                .collect(),
        })
    }

    /// How often a worker should beat.
    pub(crate) fn period(&self) -> Duration {
        (self.timeout / BEATS_PER_TIMEOUT).max(Duration::from_millis(1))
    }

    /// Called by worker `index` from its event loop: it is making progress.
    pub(crate) fn beat(&self, index: usize) {
        self.workers[index]
            .beat
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// Whether worker `index` is stalled now (the balancer skips it).
    pub(crate) fn is_stalled(&self, index: usize) -> bool {
        self.workers[index].stalled.load(Ordering::Relaxed)
    }

    /// The indexes of the workers stalled now.
    pub(crate) fn stalled(&self) -> Vec<usize> {
        (0..self.workers.len())
            .filter(|i| self.is_stalled(*i))
            .collect()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Starts the watchdog thread. Every worker counts as beating now.
    pub(crate) fn spawn(self: &Arc<Self>) -> std::io::Result<Stop> {
        for index in 0..self.workers.len() {
            self.beat(index);
        }
        let (stop, stopped) = mpsc::channel();
        let watchdog = self.clone();
        std::thread::Builder::new()
            .name("framegate-watchdog".into())
            .spawn(move || watchdog.watch(&stopped))?;
        Ok(Stop { _sender: stop })
    }

    fn watch(&self, stopped: &mpsc::Receiver<()>) {
        let timeout = self.timeout.as_millis() as u64;
        // When each stalled worker was last seen making progress.
        let mut since: Vec<Option<u64>> = vec![None; self.workers.len()];
        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(self.period()) {
            let now = self.now_ms();
            for (index, health) in self.workers.iter().enumerate() {
                let beat = health.beat.load(Ordering::Relaxed);
                let silent = now.saturating_sub(beat);
                match since[index] {
                    None if silent > timeout => {
                        since[index] = Some(beat);
                        health.stalled.store(true, Ordering::Relaxed);
                        tracing::error!(
                            worker = index,
                            stalled_for_ms = silent,
                            "worker stalled: no progress for longer than server.watchdog_timeout; \
                             it gets no new connections until it recovers"
                        );
                    }
                    Some(last) if beat > last => {
                        since[index] = None;
                        health.stalled.store(false, Ordering::Relaxed);
                        tracing::warn!(
                            worker = index,
                            stalled_for_ms = beat - last,
                            "worker recovered: it gets new connections again"
                        );
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_worker_is_marked_and_a_beating_one_recovers() {
        let watchdog = Watchdog::new(2, Duration::from_millis(40));
        let stop = watchdog.spawn().unwrap();
        let started = Instant::now();
        // Worker 0 beats, worker 1 does not.
        while !watchdog.is_stalled(1) {
            watchdog.beat(0);
            assert!(started.elapsed() < Duration::from_secs(5), "never marked");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(watchdog.stalled(), vec![1]);
        while watchdog.is_stalled(1) {
            watchdog.beat(0);
            watchdog.beat(1);
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "never recovered"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(watchdog.stalled().is_empty());
        drop(stop);
    }
}
