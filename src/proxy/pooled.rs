//! Reaching an `[[upstream]]` pool before the 101: the pool picks an endpoint, the plain
//! [`upstream::connect`] runs against it, and a failure that another endpoint may not share
//! (refused TCP, TLS failure, a timed-out attempt, a 5xx answer, a broken handshake) is
//! retried on an endpoint not tried yet, at most `retries` times, within the route's
//! `handshake_timeout`. A non-5xx refusal (401, 403, 404) is the upstream's answer and is
//! relayed. Each outcome feeds the endpoint's passive health.

use std::sync::Arc;
use std::time::Duration;

use super::upgrade::Rejection;
use crate::config::pool::Pool;
use crate::upstream::pool::{
    endpoint_url, DownRule, EndpointGuard, EndpointState, FailureKind, Pick, PoolState,
};
use crate::upstream::{self, Connected, UpstreamError};

/// What the attempt loop needs besides the request.
pub(super) struct Target<'a> {
    pub pool: &'a Pool,
    pub state: Arc<PoolState>,
    /// The `hash` key, when the pool hashes and the request has one.
    pub key: Option<String>,
    /// The endpoint id from the sticky cookie.
    pub sticky: Option<&'a str>,
    /// Path and query to request on the chosen endpoint.
    pub path_and_query: String,
}

/// An upstream reached through a pool.
pub(super) struct Reached {
    pub connected: Connected,
    /// The URL connected to.
    pub url: String,
    /// Counts the connection on its endpoint until dropped.
    pub guard: EndpointGuard,
}

/// What kind of failure `error` is, for the metrics.
fn kind(error: &UpstreamError) -> FailureKind {
    match error {
        UpstreamError::Connect { .. } | UpstreamError::BadUrl { .. } => FailureKind::Connect,
        UpstreamError::Tls { .. } => FailureKind::Tls,
        UpstreamError::Refused(_) => FailureKind::Status5xx,
        _ => FailureKind::Handshake,
    }
}

/// Whether another endpoint may do better than this one did.
fn retryable(error: &UpstreamError) -> bool {
    match error {
        UpstreamError::Refused(refusal) => refusal.status.is_server_error(),
        UpstreamError::BadUrl { .. } => false,
        _ => true,
    }
}

/// Tries endpoints until one accepts the WebSocket, within `budget`.
pub(super) async fn connect(
    target: Target<'_>,
    header_lines: &[u8],
    key: upstream::Key<'_>,
    tls: Option<&Arc<rustls::ClientConfig>>,
    budget: Duration,
) -> Result<Reached, Rejection> {
    let Target {
        pool,
        state,
        key: hash_key,
        sticky,
        path_and_query,
    } = target;
    let deadline = tokio::time::Instant::now() + budget;
    let rule = DownRule::of(pool);
    let mut tried: Vec<Arc<EndpointState>> = Vec::new();
    let mut last: Option<Rejection> = None;
    while tried.len() <= pool.retries as usize {
        let endpoint =
            match state.pick(pool, hash_key.as_deref().map(str::as_bytes), sticky, &tried) {
                Pick::Endpoint(e) => e,
                Pick::AllDown { retry_after } => {
                    return Err(Rejection::AllDown {
                        pool: pool.name.clone(),
                        retry_after,
                    })
                }
                // A pool without endpoints (discovery found none yet) is down as a whole.
                Pick::Exhausted if tried.is_empty() => {
                    return Err(Rejection::AllDown {
                        pool: pool.name.clone(),
                        retry_after: Duration::from_secs(1),
                    })
                }
                Pick::Exhausted => break,
            };
        let url = endpoint_url(&endpoint.url, &path_and_query);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let attempt = left.min(pool.connect_timeout);
        if !tried.is_empty() {
            state.retried();
            tracing::info!(pool = %pool.name, endpoint = %endpoint.url, "retrying on another endpoint");
        }
        let outcome = tokio::time::timeout(
            attempt,
            upstream::connect_named(
                &url,
                header_lines.to_vec(),
                key,
                tls,
                pool.tls.server_name.as_deref(),
            ),
        )
        .await;
        match outcome {
            Ok(Ok(connected)) => {
                state.succeeded(&endpoint);
                return Ok(Reached {
                    connected,
                    url,
                    guard: EndpointGuard::new(endpoint),
                });
            }
            Ok(Err(source)) if !retryable(&source) => {
                // The endpoint answered: it is alive, whatever it said.
                if matches!(source, UpstreamError::Refused(_)) {
                    state.succeeded(&endpoint);
                }
                return Err(Rejection::Upstream { url, source });
            }
            Ok(Err(source)) => {
                tracing::warn!(pool = %pool.name, endpoint = %endpoint.url, error = %source, "upstream attempt failed");
                state.failed(&endpoint, kind(&source), rule);
                last = Some(Rejection::Upstream { url, source });
            }
            Err(_) => {
                tracing::warn!(pool = %pool.name, endpoint = %endpoint.url, timeout = ?attempt, "upstream attempt timed out");
                state.failed(&endpoint, FailureKind::Timeout, rule);
                last = Some(Rejection::UpstreamTimeout {
                    url,
                    timeout: attempt,
                });
            }
        }
        tried.push(endpoint);
    }
    Err(last.unwrap_or_else(|| Rejection::UpstreamTimeout {
        url: format!("pool {}", pool.name),
        timeout: budget,
    }))
}
