//! Admission across workers: the pending connections (below) and the requests refused at
//! `server.max_connections` ([`Refusals`]).
//!
//! Connections that have not earned a `max_connections` slot yet: still sending a request
//! head, idle between kept-alive requests, or queued for a slot at the cap. They are counted
//! here, across workers, up to `server.max_pending_handshakes`; when that is full, the oldest
//! is shed to admit a new one, so slow clients (slowloris) can neither starve established
//! connections nor lock new ones out. NGINX does the same with its idle keep-alive connections
//! when it runs short of `worker_connections` (`ngx_drain_connections`).
//!
//! Touched twice per connection phase (enter, leave) under one short lock; never per message.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the "shedding" warning may repeat: once per burst, not once per connection.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(10);

/// The pending connections of the whole gateway.
pub(crate) struct PendingSet {
    limit: usize,
    inner: Mutex<Inner>,
    /// Connections shed since start.
    shed: AtomicU64,
}

struct Inner {
    next: u64,
    /// By arrival: the first entry is the oldest. The token tells its connection to go.
    entries: BTreeMap<u64, CancellationToken>,
    last_warning: Option<std::time::Instant>,
}

/// A connection's place in the set; leaving the set is dropping it.
pub(crate) struct Pending {
    set: Arc<PendingSet>,
    id: u64,
    /// Cancelled when this connection is shed.
    pub(crate) shed: CancellationToken,
}

impl PendingSet {
    pub(crate) fn new(limit: usize) -> Arc<PendingSet> {
        Arc::new(PendingSet {
            limit: limit.max(1),
            inner: Mutex::new(Inner {
                next: 0,
                entries: BTreeMap::new(),
                last_warning: None,
            }),
            shed: AtomicU64::new(0),
        })
    }

    /// Adds a connection, shedding the oldest one first if the set is full. The shed
    /// connection's slot is free at once, even if its worker is too busy to notice yet.
    pub(crate) fn enter(self: &Arc<Self>) -> Pending {
        let shed = CancellationToken::new();
        let mut inner = self.lock();
        let mut victims = 0u64;
        while inner.entries.len() >= self.limit {
            let Some((_, victim)) = inner.entries.pop_first() else {
                break;
            };
            victim.cancel();
            victims += 1;
        }
        if victims > 0 {
            let total = self.shed.fetch_add(victims, Ordering::Relaxed) + victims;
            let now = std::time::Instant::now();
            if inner
                .last_warning
                .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
            {
                inner.last_warning = Some(now);
                tracing::warn!(
                    max_pending_handshakes = self.limit,
                    shed_total = total,
                    "max_pending_handshakes reached: shedding the oldest pending connections"
                );
            }
        }
        let id = inner.next;
        inner.next += 1;
        inner.entries.insert(id, shed.clone());
        drop(inner);
        Pending {
            set: self.clone(),
            id,
            shed,
        }
    }

    /// Connections pending now.
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The lock guards a map that no panic can leave half-changed.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.set.lock().entries.remove(&self.id);
    }
}

/// Requests refused at `max_connections`: counted, with a warning at most every
/// [`WARN_EVERY`] (a line per refusal would flood the log when it matters most).
#[derive(Default)]
pub(crate) struct Refusals {
    total: AtomicU64,
    last_warning: Mutex<Option<std::time::Instant>>,
}

impl Refusals {
    pub(crate) fn count(&self, max_connections: usize) {
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_warning.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if last.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
            *last = Some(now);
            tracing::warn!(
                max_connections,
                refused_total = total,
                "max_connections reached: answering 503 to requests that found no slot within server.queue_timeout"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_set_sheds_its_oldest_first() {
        let set = PendingSet::new(2);
        let a = set.enter();
        let b = set.enter();
        assert_eq!(set.len(), 2);
        let c = set.enter();
        assert!(a.shed.is_cancelled());
        assert!(!b.shed.is_cancelled() && !c.shed.is_cancelled());
        assert_eq!(set.len(), 2);
        // Leaving frees a place: nobody is shed for the next one.
        drop(c);
        let d = set.enter();
        assert!(!b.shed.is_cancelled() && !d.shed.is_cancelled());
        drop(a);
        assert_eq!(set.len(), 2);
        assert_eq!(set.shed.load(Ordering::Relaxed), 1);
    }
}
