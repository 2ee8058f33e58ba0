//! What a frame policy reads and writes of the fleet's store, without waiting for it.
//!
//! - Reads: [`Cache::get`] answers from this process's copy. A key read for the first time
//!   answers nil and is fetched at once, behind the call; a key read in the last minute is
//!   fetched again every half of `shared.frame_staleness` ([`refresh`]), so that while Redis
//!   answers (within `shared.timeout`, at most half the staleness) a value is never older than
//!   `frame_staleness`. Keys not read for a minute are forgotten. At most `max_entries` keys.
//! - Writes: [`Cache::behind`] applies the write to the copy at once (an `incr` answers the
//!   copy plus the increment) and queues it; [`write`] sends the queue in order, up to 64 in
//!   flight. A full queue refuses the write (`nil, "shared backend queue full"`); a write that
//!   fails because Redis is down is lost. Both are counted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{Fleet, Op};
use crate::policy::shared::{FleetError, SharedValue, Write};

/// Writes queued behind frame policies, at most.
pub(super) const MAX_QUEUED_WRITES: usize = 4096;
/// Keys waiting for their first fetch, at most (more are fetched by the next refresh).
const MAX_MISSES: usize = 1024;
/// A key not read for this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Writes in flight at once.
const WRITES_IN_FLIGHT: usize = 64;
/// Fetches in flight at once, in a refresh.
const FETCHES_IN_FLIGHT: usize = 64;

struct Entry {
    value: Option<SharedValue>,
    /// When Redis last told this value (`None`: not yet).
    fetched: Option<Instant>,
    read: Instant,
}

pub(super) struct Cache {
    entries: DashMap<String, Entry>,
    max: usize,
    misses: mpsc::Sender<String>,
    writes: mpsc::Sender<Write>,
    /// Taken by the refresher.
    missed: Mutex<Option<mpsc::Receiver<String>>>,
    /// Taken by the writer.
    written: Mutex<Option<mpsc::Receiver<Write>>>,
}

impl Cache {
    pub(super) fn new(max: usize) -> Cache {
        let (misses, missed) = mpsc::channel(MAX_MISSES);
        let (writes, written) = mpsc::channel(MAX_QUEUED_WRITES);
        Cache {
            entries: DashMap::new(),
            max,
            misses,
            writes,
            missed: Mutex::new(Some(missed)),
            written: Mutex::new(Some(written)),
        }
    }

    /// The writer's queue, once.
    pub(super) fn take_writes(&self) -> Option<mpsc::Receiver<Write>> {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The queue of keys read for the first time, once.
    fn take_misses(&self) -> Option<mpsc::Receiver<String>> {
        self.missed.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The copy of `key`; a key not known yet is fetched behind the call.
    pub(super) fn get(&self, key: &str) -> Option<SharedValue> {
        let now = Instant::now();
        if let Some(mut entry) = self.entries.get_mut(key) {
            entry.read = now;
            return entry.value.clone();
        }
        if self.entries.len() < self.max && self.misses.try_send(key.to_owned()).is_ok() {
            self.entries.insert(
                key.to_owned(),
                Entry {
                    value: None,
                    fetched: None,
                    read: now,
                },
            );
        }
        None
    }

    /// Redis told `value` for `key` (a fetch, or the answer to a write): kept if the key is.
    pub(super) fn seen(&self, key: &str, value: Option<SharedValue>) {
        if let Some(mut entry) = self.entries.get_mut(key) {
            entry.value = value;
            entry.fetched = Some(Instant::now());
        }
    }

    /// Applies `write` to the copy and queues it.
    pub(super) fn behind(&self, write: Write) -> Result<Option<SharedValue>, FleetError> {
        let permit = self
            .writes
            .try_reserve()
            .map_err(|_| FleetError::QueueFull)?;
        let (key, value) = match &write {
            Write::Set(key, value, _) => (key, value.clone()),
            Write::Incr(key, by, _, _) => {
                let current = self.entries.get(key).and_then(|e| e.value.clone());
                (key, Some(add(current, by)))
            }
        };
        if let Some(mut entry) = self.entries.get_mut(key) {
            entry.value = value.clone();
        }
        permit.send(write);
        Ok(value)
    }

    /// Keys to fetch again now (fetched half the staleness ago, read in the last minute);
    /// forgets those not read for a minute.
    fn due(&self, every: Duration) -> Vec<String> {
        let now = Instant::now();
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.read) < FORGET_AFTER);
        self.entries
            .iter()
            .filter(|e| {
                e.fetched
                    .is_none_or(|at| now.saturating_duration_since(at) >= every)
            })
            .map(|e| e.key().clone())
            .collect()
    }
}

/// `current + by`, as `incr` adds (a value that is not a number counts as 0).
fn add(current: Option<SharedValue>, by: &SharedValue) -> SharedValue {
    match (current, by) {
        (Some(SharedValue::Int(a)), SharedValue::Int(b)) => a
            .checked_add(*b)
            .map_or(SharedValue::Float(a as f64 + *b as f64), SharedValue::Int),
        (Some(SharedValue::Int(a)), SharedValue::Float(b)) => SharedValue::Float(a as f64 + b),
        (Some(SharedValue::Float(a)), SharedValue::Int(b)) => SharedValue::Float(a + *b as f64),
        (Some(SharedValue::Float(a)), SharedValue::Float(b)) => SharedValue::Float(a + b),
        (_, by) => by.clone(),
    }
}

/// Fetches keys read for the first time at once, and every key due every half of
/// `shared.frame_staleness`.
pub(super) async fn refresh(fleet: &Arc<Fleet>) {
    let Some(mut missed) = fleet.cache.take_misses() else {
        return;
    };
    let every = fleet.config.frame_staleness / 2;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let keys = tokio::select! {
            key = missed.recv() => {
                let Some(key) = key else { return };
                let mut keys = vec![key];
                while keys.len() < FETCHES_IN_FLIGHT {
                    match missed.try_recv() {
                        Ok(key) => keys.push(key),
                        Err(_) => break,
                    }
                }
                keys
            }
            _ = tick.tick() => fleet.cache.due(every),
        };
        if !fleet.is_up() {
            continue;
        }
        futures_util::stream::iter(keys)
            .for_each_concurrent(FETCHES_IN_FLIGHT, |key| async move {
                match tokio::time::timeout(fleet.config.timeout, fleet.fetch(&key)).await {
                    Ok(Ok(value)) => fleet.cache.seen(&key, value),
                    // Counted where it failed.
                    Ok(Err(_)) => {}
                    Err(_) => {
                        fleet.timed_out(Op::Get);
                    }
                }
            })
            .await;
    }
}

/// Sends the writes of frame policies, in the order they were made.
pub(super) async fn write(fleet: &Arc<Fleet>, written: mpsc::Receiver<Write>) {
    let writes =
        futures_util::stream::unfold(
            written,
            |mut rx| async move { rx.recv().await.map(|w| (w, rx)) },
        );
    writes
        .map(|w| async move {
            let timeout = fleet.config.timeout;
            let (op, done) = match w {
                Write::Set(key, value, ttl) => (
                    Op::Set,
                    tokio::time::timeout(timeout, fleet.store(&key, value, ttl)).await,
                ),
                Write::Incr(key, by, ttl, lease) => (
                    Op::Incr,
                    tokio::time::timeout(timeout, async {
                        fleet.add(&key, by, ttl, lease).await.map(|_| ())
                    })
                    .await,
                ),
            };
            // A failure is counted where it happened (and Redis marked down if it is); no
            // answer within the timeout is counted here.
            if done.is_err() {
                fleet.timed_out(op);
            }
        })
        .buffered(WRITES_IN_FLIGHT)
        .for_each(|()| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_fetched_when_first_read_and_writes_apply_at_once() {
        let cache = Cache::new(2);
        assert_eq!(cache.get("a"), None);
        let mut missed = cache.take_misses().unwrap();
        assert_eq!(missed.try_recv().unwrap(), "a");
        cache.seen("a", Some(SharedValue::Int(4)));
        assert_eq!(cache.get("a"), Some(SharedValue::Int(4)));
        assert_eq!(
            cache
                .behind(Write::Incr("a".into(), SharedValue::Int(2), None, false))
                .unwrap(),
            Some(SharedValue::Int(6))
        );
        assert_eq!(cache.get("a"), Some(SharedValue::Int(6)));
        // Bounded: a third key is not kept.
        cache.get("b");
        cache.get("c");
        assert_eq!(cache.entries.len(), 2);
    }

    #[test]
    fn a_full_queue_refuses_writes() {
        let cache = Cache::new(10);
        for _ in 0..MAX_QUEUED_WRITES {
            cache.behind(Write::Set("k".into(), None, None)).unwrap();
        }
        assert_eq!(
            cache.behind(Write::Set("k".into(), None, None)),
            Err(FleetError::QueueFull)
        );
    }
}
