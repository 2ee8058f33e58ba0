//! The running gateway's state that every connection shares: the current snapshot, the
//! shutdown signal, the connection registry, the metrics, the pools' live state and the
//! policies' `gw.shared` backend. The gateway makes it once; workers, the proxy, the reloader
//! and the admin API hold it, so it belongs to none of them.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::snapshot::Snapshot;

/// State shared by every connection of one running gateway. What the configuration decides is
/// in the current [`Snapshot`], which a reload replaces; the rest survives reloads.
pub(crate) struct Shared {
    /// The snapshot new connections get. A connection loads it once, when its request head is
    /// routed, and keeps that `Arc` to its end.
    pub(crate) current: ArcSwap<Snapshot>,
    /// Cancelled once, when shutdown starts.
    pub(crate) shutdown: CancellationToken,
    /// Set just before `shutdown` is cancelled: a check that takes no lock, for the relay.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    /// Every connection task, so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    pub(crate) next_id: AtomicU64,
    /// `gw.shared`: the process-wide dictionary of the policies.
    pub(crate) dict: Arc<crate::policy::shared::SharedDict>,
    /// Where the policies' `gw.shared` and `gw.limit` live: `dict`, or the fleet's store.
    pub(crate) backend: crate::policy::shared::Backend,
    /// `[shared] backend = "redis"`: the fleet's store (its health, its metrics).
    pub(crate) fleet: Option<Arc<crate::fleet::Fleet>>,
    /// The Prometheus metrics, summed over the workers at scrape time.
    pub(crate) metrics: Arc<Metrics>,
    /// Every open connection, for the admin API and `server.drain_old`.
    pub(crate) registry: Arc<Registry>,
    /// The `[[upstream]]` pools' live state (endpoint health, open connections), kept across
    /// reloads by pool name; synced with each new snapshot before it is swapped in.
    pub(crate) pools: Arc<crate::upstream::pool::Pools>,
}

impl Shared {
    /// The current snapshot (an `Arc` to keep).
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Starts graceful shutdown: the flag first, so that every task the token wakes sees it.
    pub(crate) fn begin_shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        self.shutdown.cancel();
    }
}
