//! The HTTP side of a connection: match the route, check the RFC 6455 upgrade, connect and
//! handshake with the upstream, and only then answer the client with 101 and start the relay.
//! Every refusal is a [`Rejection`], sorted into a status in one place and logged once.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::close::{CloseSummary, ClosedBy, Side};
use super::leg::Leg;
use super::lifetime::Lifetime;
use super::relay::Relay;
use super::{headers, Shared};
use crate::policy::{
    FrameHooks, PassThrough, PolicyError, UpgradeChanges, UpgradeRequest, UpgradeVerdict,
};
use crate::upstream::{self, UpstreamError};
use crate::worker::{Slot, WorkerCtx};
use std::rc::Rc;

/// Why an upgrade request was not proxied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Rejection {
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("not a WebSocket upgrade request")]
    NotWebSocket,
    #[error("WebSocket upgrade must use GET, not {0}")]
    Method(Method),
    #[error("bad WebSocket upgrade: {0}")]
    BadUpgrade(&'static str),
    #[error("unsupported Sec-WebSocket-Version (only 13 is supported)")]
    Version,
    #[error("upstream {url}: {source}")]
    Upstream { url: String, source: UpstreamError },
    #[error("policy rejected the upgrade with {}", .0.0)]
    Policy(Box<(StatusCode, Bytes, HeaderMap)>),
    #[error("policy failed: {0}")]
    PolicyFailed(PolicyError),
    #[error("upstream {url} did not complete its handshake within {timeout:?}")]
    UpstreamTimeout {
        url: String,
        timeout: std::time::Duration,
    },
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body + "\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

impl Rejection {
    fn into_response(self) -> Response<Full<Bytes>> {
        let message = self.to_string();
        match self {
            Rejection::NoRoute(_) => text(StatusCode::NOT_FOUND, message),
            Rejection::NotWebSocket => {
                let mut r = text(
                    StatusCode::UPGRADE_REQUIRED,
                    "this path accepts WebSocket connections only".into(),
                );
                r.headers_mut()
                    .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
                r
            }
            Rejection::Method(_) => {
                let mut r = text(StatusCode::METHOD_NOT_ALLOWED, message);
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET"));
                r
            }
            Rejection::BadUpgrade(_) => text(StatusCode::BAD_REQUEST, message),
            Rejection::Version => {
                let mut r = text(StatusCode::UPGRADE_REQUIRED, message);
                r.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
                r
            }
            Rejection::Upstream {
                source: UpstreamError::Refused(refusal),
                ..
            } => {
                let mut r = Response::new(Full::new(refusal.body));
                *r.status_mut() = refusal.status;
                *r.headers_mut() = headers::refusal(&refusal.headers);
                r
            }
            Rejection::Policy(rejection) => {
                let (status, body, headers) = *rejection;
                let mut r = Response::new(Full::new(body));
                *r.status_mut() = status;
                *r.headers_mut() = headers;
                r
            }
            Rejection::PolicyFailed(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error in the upgrade policy".into(),
            ),
            Rejection::Upstream { .. } => text(
                StatusCode::BAD_GATEWAY,
                "bad gateway: upstream unavailable".into(),
            ),
            Rejection::UpstreamTimeout { .. } => text(
                StatusCode::GATEWAY_TIMEOUT,
                "gateway timeout: upstream did not answer in time".into(),
            ),
        }
    }

    fn log(&self, peer: SocketAddr, path: &str) {
        match self {
            Rejection::PolicyFailed(e) => {
                tracing::warn!(client = %peer, path, script = %e.script, error = %e.message, "policy error in on_upgrade")
            }
            Rejection::Upstream { .. } | Rejection::UpstreamTimeout { .. } => {
                tracing::warn!(client = %peer, path, error = %self, "upgrade failed")
            }
            _ => tracing::info!(client = %peer, path, error = %self, "request rejected"),
        }
    }
}

/// Serves one HTTP request on a client connection.
pub(crate) async fn handle(
    mut request: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    worker: Rc<WorkerCtx>,
    slot: Rc<Slot>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    match upgrade(&mut request, peer, shared, worker, slot).await {
        Ok(response) => Ok(response),
        Err(rejection) => {
            rejection.log(peer, request.uri().path());
            Ok(rejection.into_response())
        }
    }
}

/// The request's Host header (or the authority of an absolute-form target).
fn request_host<B>(request: &Request<B>) -> Option<&str> {
    request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks the RFC 6455 §4.2.1 requirements; returns the client's key.
fn validate<B>(request: &Request<B>) -> Result<HeaderValue, Rejection> {
    let headers = request.headers();
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err(Rejection::NotWebSocket);
    }
    if request.method() != Method::GET {
        return Err(Rejection::Method(request.method().clone()));
    }
    if request.version() != Version::HTTP_11 {
        return Err(Rejection::BadUpgrade("HTTP/1.1 is required"));
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err(Rejection::BadUpgrade(
            "Connection header must include \"Upgrade\"",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(Rejection::Version);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or(Rejection::BadUpgrade("missing Sec-WebSocket-Key"))?;
    if !is_websocket_key(key.as_bytes()) {
        return Err(Rejection::BadUpgrade(
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ));
    }
    Ok(key.clone())
}

/// 16 random bytes in base64: 22 alphabet characters and "==".
fn is_websocket_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

async fn upgrade(
    request: &mut Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    worker: Rc<WorkerCtx>,
    slot: Rc<Slot>,
) -> Result<Response<Full<Bytes>>, Rejection> {
    let path = request.uri().path();
    let found = shared
        .router
        .find(request_host(request), path)
        .ok_or_else(|| Rejection::NoRoute(path.to_owned()))?;
    let client_key = validate(request)?;
    let route = found.route;
    let id = shared
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);

    // Phase: on_upgrade. It may reject, or change the upstream, headers, subprotocol, lifetime.
    let (changes, hooks): (UpgradeChanges, Box<dyn FrameHooks>) =
        match worker.policies.get(route.index).and_then(Option::as_ref) {
            None => (UpgradeChanges::default(), Box::new(PassThrough)),
            Some(policy) => {
                let upgrade_request = UpgradeRequest {
                    id,
                    method: request.method().as_str(),
                    path,
                    query: request.uri().query().unwrap_or(""),
                    headers: request.headers(),
                    params: &found.params,
                    client_ip: peer.ip(),
                    scheme: "ws",
                    host: request_host(request),
                };
                match policy.on_upgrade(&upgrade_request) {
                    UpgradeVerdict::Continue { changes, hooks } => (changes, hooks),
                    UpgradeVerdict::Reject {
                        status,
                        body,
                        headers,
                    } => return Err(Rejection::Policy(Box::new((status, body, headers)))),
                    UpgradeVerdict::Failed(error) => return Err(Rejection::PolicyFailed(error)),
                }
            }
        };

    // A URL set by a policy is used as given; the route's own URL gets the client's query.
    let url = match changes.upstream {
        Some(url) => url,
        None => {
            let mut url = route.upstream.render(&found.params);
            if let Some(query) = request.uri().query() {
                url.push(if url.contains('?') { '&' } else { '?' });
                url.push_str(query);
            }
            url
        }
    };
    let mut upstream_headers =
        headers::upstream_request(request.headers(), peer.ip(), request_host(request), "http");
    for (name, value) in changes.headers {
        match value {
            Some(value) => upstream_headers.insert(name, value),
            None => upstream_headers.remove(name),
        };
    }
    if let Some(chosen) = &changes.subprotocol {
        // Only the chosen subprotocol is offered upstream.
        upstream_headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(chosen).expect("an offered subprotocol is a valid header value"),
        );
    }
    let tls = shared.tls.get(route.index).and_then(Option::as_ref);
    let connected = match tokio::time::timeout(
        route.handshake_timeout,
        upstream::connect(&url, upstream_headers, tls),
    )
    .await
    {
        Ok(Ok(connected)) => connected,
        failed => {
            let rejection = match failed {
                Ok(Err(source)) => Rejection::Upstream { url, source },
                _ => Rejection::UpstreamTimeout {
                    url,
                    timeout: route.handshake_timeout,
                },
            };
            // on_upgrade went ahead, so on_close runs too: it may release what on_upgrade took.
            let mut hooks = hooks;
            let mut summary = CloseSummary::new(id, route.name(), peer, String::new());
            summary.reason = rejection.to_string();
            summary.closed_by = ClosedBy::Gateway;
            hooks.on_close(&summary);
            return Err(rejection);
        }
    };

    let mut response = Response::new(Full::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = headers::client_response(&connected.headers);
    let h = response.headers_mut();
    if let Some(chosen) = &changes.subprotocol {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(chosen).expect("an offered subprotocol is a valid header value"),
        );
    }
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(client_key.as_bytes()))
            .expect("base64 is a valid header value"),
    );

    let on_upgrade = hyper::upgrade::on(request);
    let close_timeout = shared.config.server.close_timeout;
    let policy_deadline = changes.expire_at;
    // Only the socket goes into the task (the upstream's headers are done with), so an idle
    // connection holds as little as possible.
    let upstream_leg = Leg::new(connected.socket, Side::Upstream, route.max_message_size);
    let tracker = shared.tracker.clone();
    tracker.spawn_local(async move {
        let _slot = slot;
        let opened = tokio::time::Instant::now();
        let mut summary = CloseSummary::new(id, route.name(), peer, url);
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                let reason = format!("client left during the upgrade: {e}");
                return Box::pin(abandon(upstream_leg, hooks, summary, opened, reason, ClosedBy::Client, close_timeout)).await;
            }
        };
        let client = match upstream::take_apart(upgraded) {
            Ok(socket) => Leg::new(socket, Side::Client, route.max_message_size),
            Err(e) => {
                tracing::warn!(conn = id, error = %e, "cannot start the client WebSocket");
                return Box::pin(abandon(upstream_leg, hooks, summary, opened, e.to_string(), ClosedBy::Gateway, close_timeout)).await;
            }
        };
        tracing::info!(conn = id, route = %summary.route, client = %peer, upstream = %summary.upstream, "connection opened");
        let deadline = earliest(route.expire.map(|e| opened + e), policy_deadline);
        let lifetime = Lifetime::start(deadline, route.idle_timeout);
        let relay = Box::new(Relay::new(client, upstream_leg, lifetime, shared, hooks));
        let (ending, [client_to_upstream, upstream_to_client], mut hooks) = relay.run(close_timeout).await;
        (summary.code, summary.reason) = ending.code_and_reason();
        summary.closed_by = ending.closed_by();
        summary.duration = opened.elapsed();
        summary.client_to_upstream = client_to_upstream;
        summary.upstream_to_client = upstream_to_client;
        hooks.on_close(&summary);
        summary.log();
    });
    Ok(response)
}

/// Ends a connection that never reached the relay: the upstream is told the client is gone,
/// `on_close` runs (it may release what `on_upgrade` took) and the close line is written.
async fn abandon(
    mut upstream: Leg,
    mut hooks: Box<dyn FrameHooks>,
    mut summary: CloseSummary,
    opened: tokio::time::Instant,
    reason: String,
    closed_by: ClosedBy,
    close_timeout: std::time::Duration,
) {
    let _ = tokio::time::timeout(
        close_timeout,
        upstream.close(Some(&frame_for_lost_client())),
    )
    .await;
    summary.reason = reason;
    summary.closed_by = closed_by;
    summary.duration = opened.elapsed();
    hooks.on_close(&summary);
    summary.log();
}

fn frame_for_lost_client() -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
    tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Away,
        reason: super::close::reasons::CLIENT_LOST.into(),
    }
}

/// The earlier of the route's deadline and one a policy asked for (a wall-clock time).
fn earliest(
    route: Option<tokio::time::Instant>,
    policy: Option<std::time::SystemTime>,
) -> Option<tokio::time::Instant> {
    let policy = policy.and_then(|at| {
        let from_now = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        tokio::time::Instant::now().checked_add(from_now)
    });
    match (route, policy) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_keys() {
        assert!(is_websocket_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_websocket_key(b"short=="));
        assert!(!is_websocket_key(b"dGhlIHNhbXBsZSBub25jZQ!="));
    }
}
