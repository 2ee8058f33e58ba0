//! `server.drain_old`: connections still on a snapshot older than the one a reload swapped in
//! are closed with 1012 "service restart" once `drain_old` has passed, spread evenly over a
//! further `drain_old`, so that their clients do not all reconnect at once. The close reaches
//! each relay through its registry control channel.

use std::sync::Arc;
use std::time::Duration;

use crate::proxy::Shared;
use crate::registry::{Control, Filter};

/// The close code and reason of a drained connection.
pub(crate) const DRAIN_CLOSE: (u16, &str) = (1012, "service restart");

/// After a reload to snapshot `current`: waits `after`, then closes the connections still on
/// an older snapshot, spread over another `after`. Ends early at shutdown (which closes every
/// connection anyway).
pub(crate) fn schedule(shared: Arc<Shared>, current: u64, after: Duration) {
    let stop = shared.shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = drain(&shared, current, after) => {}
            _ = stop.cancelled() => {}
        }
    });
}

async fn drain(shared: &Shared, current: u64, after: Duration) {
    let start = tokio::time::Instant::now() + after;
    tokio::time::sleep_until(start).await;
    let all = Filter {
        limit: usize::MAX,
        ..Filter::default()
    };
    let old: Vec<u64> = shared
        .registry
        .list(&all)
        .connections
        .into_iter()
        .filter(|c| c.snapshot < current)
        .map(|c| c.id)
        .collect();
    if old.is_empty() {
        return;
    }
    tracing::info!(
        snapshot = current,
        connections = old.len(),
        over = ?after,
        "server.drain_old: closing the connections still on older snapshots"
    );
    let step = after / u32::try_from(old.len()).unwrap_or(u32::MAX);
    for (i, id) in old.into_iter().enumerate() {
        tokio::time::sleep_until(start + step * u32::try_from(i).unwrap_or(u32::MAX)).await;
        let close = Control::Close {
            code: DRAIN_CLOSE.0,
            reason: DRAIN_CLOSE.1.into(),
        };
        // Gone already, or closing: nothing to do.
        let _ = shared.registry.control(id, close);
    }
}
