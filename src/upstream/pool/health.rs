//! Active health checks (`[upstream.health]`): one task per gateway (not per worker) checks
//! every endpoint of every pool that has the table, each `interval`: an HTTP `GET path`
//! expecting 2xx, or without `path` a WebSocket handshake closed at once. `fails` failed checks
//! in a row mark an endpoint down; `passes` passed ones bring it back.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{DownRule, EndpointState, PoolState, Pools};
use crate::config::pool::Pool;

/// How often the checker looks again when nothing is due sooner (so a reload that adds a
/// pool is picked up within it).
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// A pool as the checker sees it: its configuration and TLS client settings, from the
/// current snapshot.
pub type Checked = (Arc<Pool>, Option<Arc<rustls::ClientConfig>>);

/// Runs the checks until `stop` is cancelled. `current` gives the current snapshot's pools.
pub async fn run(
    pools: Arc<Pools>,
    current: impl Fn() -> Vec<Checked> + Send + 'static,
    stop: CancellationToken,
) {
    let mut checks = tokio::task::JoinSet::new();
    loop {
        let now = Instant::now();
        let mut next = now + IDLE_LOOK;
        for (pool, tls) in current() {
            let Some(health) = pool.health.clone() else {
                continue;
            };
            let Some(state) = pools.get(&pool.name) else {
                continue;
            };
            for endpoint in state.endpoints() {
                if endpoint.is_draining() {
                    continue;
                }
                let mut due = endpoint
                    .next_check
                    .lock()
                    .expect("next_check is never poisoned");
                let at = *due.get_or_insert(now);
                if at > now {
                    next = next.min(at);
                    continue;
                }
                *due = Some(now + health.interval);
                next = next.min(now + health.interval);
                drop(due);
                if endpoint.checking.swap(true, Ordering::AcqRel) {
                    continue;
                }
                let (pool, state, tls) = (pool.clone(), state.clone(), tls.clone());
                checks.spawn(check(pool, state, endpoint, tls));
            }
        }
        // Finished checks are collected as they end; the set stays bounded by the endpoints.
        while checks.try_join_next().is_some() {}
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.cancelled() => break,
        }
    }
    checks.abort_all();
}

/// One check of one endpoint, bounded by the interval and the pool's `connect_timeout`.
async fn check(
    pool: Arc<Pool>,
    state: Arc<PoolState>,
    endpoint: Arc<EndpointState>,
    tls: Option<Arc<rustls::ClientConfig>>,
) {
    let health = pool
        .health
        .as_ref()
        .expect("only pools with health are checked");
    let limit = health.interval.min(pool.connect_timeout);
    let server_name = pool.tls.server_name.as_deref();
    let probe = async {
        match &health.path {
            Some(path) => {
                crate::upstream::http_get_status(&endpoint.url, path, tls.as_ref(), server_name)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|status| match status.is_success() {
                        true => Ok(()),
                        false => Err(format!("GET {path} answered {status}")),
                    })
            }
            None => websocket(&endpoint.url, tls.as_ref(), server_name).await,
        }
    };
    let outcome = match tokio::time::timeout(limit, probe).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {limit:?}")),
    };
    match outcome {
        Ok(()) => state.check_passed(&endpoint, health.passes),
        Err(error) => {
            tracing::debug!(pool = %pool.name, endpoint = %endpoint.url, %error, "health check failed");
            state.check_failed(&endpoint, DownRule::of(&pool));
        }
    }
    endpoint.checking.store(false, Ordering::Release);
}

/// A WebSocket handshake on the endpoint's base URL, then a close frame at once.
async fn websocket(
    url: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    server_name: Option<&str>,
) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    // A fixed key is fine here: nothing is relayed on this connection.
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let target = crate::upstream::Key {
        key,
        accept: &accept,
    };
    let mut connected = crate::upstream::connect_named(url, Vec::new(), target, tls, server_name)
        .await
        .map_err(|e| e.to_string())?;
    // Close 1000, masked with a zero key, as a client must mask (RFC 6455 §5.3).
    let close = [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8];
    let _ = connected.socket.io.write_all(&close).await;
    let _ = connected.socket.io.shutdown().await;
    Ok(())
}
