//! What the relay counts per forwarded message, counted once and published from there: the
//! connection's live counts in the registry ([`ConnStats`], also the totals of its close line)
//! and its route's Prometheus counters on this worker ([`RouteMetrics`]). Both are
//! single-writer sets owned by this connection's worker: relaxed loads and stores, no lock, no
//! allocation, no shared atomic.

use std::sync::Arc;

use crate::metrics::{Direction, RouteMetrics};
use crate::registry::ConnStats;

/// One connection's counters.
pub(crate) struct Meter {
    /// The route's set on this worker, looked up once when the route was matched.
    pub(crate) route: Arc<RouteMetrics>,
    /// The connection's live counts (the registry entry reads the same `Arc`).
    pub(crate) conn: Arc<ConnStats>,
}

impl Meter {
    /// The counters of one direction.
    pub(crate) fn tally(&self, direction: Direction) -> Tally<'_> {
        Tally {
            meter: self,
            direction,
        }
    }
}

/// The counters of one direction of one connection.
#[derive(Clone, Copy)]
pub(crate) struct Tally<'a> {
    meter: &'a Meter,
    direction: Direction,
}

impl Tally<'_> {
    /// A whole data message of `bytes` payload bytes was forwarded.
    #[inline]
    pub(crate) fn message(self, text: bool, bytes: usize) {
        self.meter.route.message(self.direction, text, bytes);
        self.meter.conn.message(self.direction, bytes);
    }

    /// `bytes` more of a binary message relayed as it arrives went through.
    #[inline]
    pub(crate) fn chunk(self, bytes: usize) {
        self.meter.conn.bytes(self.direction, bytes);
    }

    /// The last chunk of a streamed binary message of `total` payload bytes went through.
    #[inline]
    pub(crate) fn streamed(self, total: usize) {
        self.meter.route.message(self.direction, false, total);
        self.meter.conn.message_done(self.direction);
    }

    /// A policy dropped a message.
    pub(crate) fn policy_drop(self) {
        self.meter.route.policy_drop(self.direction);
    }
}
