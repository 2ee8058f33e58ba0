//! `server.drain_old`: connections still on a snapshot older than the one a reload swapped in
//! are closed with 1012 "service restart" once `drain_old` has passed, spread evenly over a
//! further `drain_old`, so that their clients do not all reconnect at once. The close reaches
//! each relay through its registry control channel.

use std::sync::Arc;
use std::time::Duration;

use crate::registry::{Control, Filter, Registry};
use crate::state::Shared;

/// The close code and reason of a drained connection.
pub(crate) const DRAIN_CLOSE: (u16, &str) = (1012, "service restart");

/// After a reload to snapshot `current`: waits `after`, then closes the connections still on
/// an older snapshot, spread over another `after`. Ends early at shutdown (which closes every
/// connection anyway).
pub(crate) fn schedule(shared: Arc<Shared>, current: u64, after: Duration) {
    let stop = shared.shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = drain(&shared.registry, current, after) => {}
            _ = stop.cancelled() => {}
        }
    });
}

async fn drain(registry: &Registry, current: u64, after: Duration) {
    let start = tokio::time::Instant::now() + after;
    tokio::time::sleep_until(start).await;
    let all = Filter {
        limit: usize::MAX,
        ..Filter::default()
    };
    let old: Vec<u64> = registry
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
        let _ = registry.control(id, close);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{NewConnection, Tags, UpgradeRequest};
    use std::time::SystemTime;

    fn conn(id: u64, snapshot: u64) -> NewConnection {
        NewConnection {
            id,
            route: "/r".into(),
            client: "127.0.0.1:1".parse().unwrap(),
            upstream: "ws://127.0.0.1:9/".into(),
            opened_at: SystemTime::UNIX_EPOCH,
            expires_at: None,
            snapshot,
            tags: Tags::default(),
            request: UpgradeRequest::new("GET", "/r", []),
            ctx: serde_json::Value::Null,
            capture_config: Default::default(),
            capture: None,
        }
    }

    /// Old connections get 1012 one by one, `after` after the reload and spread over another
    /// `after`; connections on the current snapshot are left alone.
    #[tokio::test(start_paused = true)]
    async fn old_connections_are_closed_with_1012_spread_over_drain_old() {
        let registry = Registry::new();
        let mut old: Vec<_> = (1..=4)
            .map(|id| registry.register(conn(id, 1)).unwrap())
            .collect();
        let mut current = registry.register(conn(5, 2)).unwrap();
        let start = tokio::time::Instant::now();
        let after = Duration::from_secs(8);
        let task = tokio::spawn({
            let registry = registry.clone();
            async move { drain(&registry, 2, after).await }
        });
        for (i, conn) in old.iter_mut().enumerate() {
            let control = conn.control.recv().await.unwrap();
            assert_eq!(
                control,
                Control::Close {
                    code: 1012,
                    reason: "service restart".into()
                }
            );
            // 8 s, then one every 2 s (8 s over 4 connections).
            assert_eq!(start.elapsed(), after + Duration::from_secs(2 * i as u64));
        }
        task.await.unwrap();
        assert!(current.control.try_recv().is_none());
    }
}
