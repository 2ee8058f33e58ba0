//! The proxy: the upgrade (both handshakes), the relay loop, lifetimes, and closing.
//!
//! `proxy` sees policies only through [`crate::policy::FrameHooks`]. See docs/lifecycle.md for
//! the life of one connection.

mod buffers;
mod close;
pub(crate) mod frame;
mod headers;
mod leg;
mod lifetime;
mod meter;
mod relay;
mod upgrade;

pub use close::{CloseSummary, ClosedBy, Side, Traffic};

pub(crate) use upgrade::{handle, Accepted, Handled};

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::route::Router;

/// State shared by every connection of one running gateway.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) router: Router,
    /// TLS client settings per route index (`None` for routes without `wss://` upstreams).
    pub(crate) tls: Vec<Option<Arc<rustls::ClientConfig>>>,
    /// Cancelled once, when shutdown starts.
    pub(crate) shutdown: CancellationToken,
    /// Set just before `shutdown` is cancelled: a check that takes no lock, for the relay.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    /// Every connection task, so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    pub(crate) next_id: AtomicU64,
    /// `gw.shared`: the process-wide dictionary of the policies.
    pub(crate) dict: Arc<crate::policy::shared::SharedDict>,
    /// Per-worker counters, summed when `/metrics` is scraped.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// The open connections, for the admin API.
    pub(crate) registry: Arc<crate::registry::Registry>,
}

impl Shared {
    /// Starts graceful shutdown: the flag first, so that every task the token wakes sees it.
    pub(crate) fn begin_shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        self.shutdown.cancel();
    }
}
