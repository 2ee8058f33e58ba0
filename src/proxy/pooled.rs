//! Reaching an `[[upstream]]` pool, before the 101 or for an HTTP-mode request: which pool
//! (the route's, or the one `req:set_upstream` named), what the pick needs (hash key, sticky
//! cookie, path), then the attempt loop: the pool picks an endpoint, an attempt (the
//! WebSocket handshake of [`upstream::connect`], or an HTTP connection) runs against it, and a failure that another endpoint may not share
//! (refused TCP, TLS failure, a timed-out attempt, a 5xx answer, a broken handshake) is
//! retried on an endpoint not tried yet, at most `retries` times, within the route's
//! `handshake_timeout`. A non-5xx refusal (401, 403, 404) is the upstream's answer and is
//! relayed. Each outcome feeds the endpoint's passive health.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::upgrade::Rejection;
use crate::config::pool::Pool;
use crate::upstream::pool::{
    endpoint_url, DownRule, EndpointGuard, EndpointState, FailureKind, Pick, PoolState,
};
use crate::upstream::{self, Connected, UpstreamError};

/// What the attempt loop needs besides the request.
#[derive(Clone)]
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

/// An upstream reached through a pool: `T` is what an attempt makes (a WebSocket, or an
/// HTTP connection).
pub(super) struct Reached<T> {
    pub connected: T,
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
) -> Result<Reached<Connected>, Rejection> {
    let server_name = target.pool.tls.server_name.as_deref();
    attempt(target, budget, |url| async move {
        upstream::connect_named(&url, header_lines.to_vec(), key, tls, server_name).await
    })
    .await
}

/// Tries endpoints with `try_one` (given the endpoint's URL with the target's path) until
/// one succeeds, a failure is not worth another endpoint, or `retries` or `budget` are
/// spent. Each attempt is bounded by the pool's `connect_timeout`.
pub(super) async fn attempt<T, F, Fut>(
    target: Target<'_>,
    budget: Duration,
    mut try_one: F,
) -> Result<Reached<T>, Rejection>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, UpstreamError>>,
{
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
        let outcome = tokio::time::timeout(attempt, try_one(url.clone())).await;
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

/// The pool a request goes to: the one `req:set_upstream` named (taken out of
/// `changes.upstream`), else the route's own unless the policy gave a URL.
pub(super) fn chosen(
    changes: &mut crate::policy::UpgradeChanges,
    snapshot: &crate::snapshot::Snapshot,
    route_pool: Option<&Arc<Pool>>,
    route: &crate::config::Route,
) -> Result<Option<Arc<Pool>>, Rejection> {
    match changes.upstream.as_deref() {
        None => Ok(route_pool.cloned()),
        Some(url) if url.contains("://") => Ok(None),
        Some(name) => match snapshot.config.pool(name) {
            Some(pool) => {
                let pool = pool.clone();
                changes.upstream = None;
                Ok(Some(pool))
            }
            None => Err(Rejection::PolicyFailed(crate::policy::PolicyError {
                script: route
                    .policies
                    .on_upgrade
                    .as_ref()
                    .map_or_else(String::new, |p| p.display().to_string()),
                message: format!("req:set_upstream: no [[upstream]] pool is named {name:?}"),
            })),
        },
    }
}

/// What a pool needs to pick an endpoint for this request: its live state, the `hash` key,
/// the sticky cookie's endpoint id, and the path and `query` (as it goes upstream) to ask
/// for.
#[allow(clippy::too_many_arguments)]
pub(super) fn target<'a>(
    pool: &'a Arc<crate::config::pool::Pool>,
    shared: &super::Shared,
    request: &'a crate::client_http::RequestHead,
    params: &[(String, String)],
    path: &str,
    query: &str,
    peer: SocketAddr,
    changes: &crate::policy::UpgradeChanges,
    route: &crate::config::Route,
) -> Result<super::pooled::Target<'a>, Rejection> {
    let state = shared
        .pools
        .get(&pool.name)
        .ok_or_else(|| Rejection::AllDown {
            pool: pool.name.clone(),
            retry_after: std::time::Duration::from_secs(1),
        })?;
    let key = match (&changes.hash_key, &pool.hash_key) {
        (Some(key), _) => Some(key.clone()),
        (None, Some(source)) => {
            super::pool_key::extract(source, request, params, peer, &changes.tags)
        }
        (None, None) => None,
    };
    let sticky = pool
        .sticky_cookie
        .as_deref()
        .and_then(|name| super::pool_key::cookie(&request.headers, name));
    let mut path_and_query = match &route.upstream_path {
        Some(template) => template.render(params),
        None => path.to_owned(),
    };
    // The query as it goes upstream: without a token `[route.jwt] strip` took out.
    if !query.is_empty() {
        path_and_query.push(if path_and_query.contains('?') {
            '&'
        } else {
            '?'
        });
        path_and_query.push_str(query);
    }
    Ok(super::pooled::Target {
        pool,
        state,
        key,
        sticky,
        path_and_query,
    })
}

/// The `Set-Cookie` value of a pool's `sticky_cookie` naming endpoint `id` (opaque, never
/// the address).
pub(super) fn sticky_cookie(name: &str, id: &str) -> String {
    format!("{name}={id}; Path=/; HttpOnly")
}
