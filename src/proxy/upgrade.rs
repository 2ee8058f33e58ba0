//! The HTTP side of a connection: match the route, check the RFC 6455 upgrade, connect and
//! handshake with the upstream, and only then answer the client with 101 and start the relay.
//! Every refusal is a [`Rejection`], sorted into a status in one place and logged once.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Version};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::close::{CloseSummary, ClosedBy, Side};
use super::leg::Leg;
use super::lifetime::Lifetime;
use super::meter::Meter;
use super::relay::{Relay, Wiring};
use super::{extensions, headers, Shared};
use crate::capture::Capture;
use crate::client_http::{lists_token, Answer, RequestHead};
use crate::config::{CaptureConfig, CaptureMode, Route};
use crate::header_fields::{is_name, HeaderFields};
use crate::metrics::RouteMetrics;
use crate::policy::{
    FrameHooks, PassThrough, PolicyError, UpgradeChanges, UpgradeRequest, UpgradeVerdict,
};
use crate::route::RouteError;
use crate::snapshot::Snapshot;
use crate::upstream::{self, Io, Socket, UpstreamError};
use crate::worker::WorkerCtx;

/// Why an upgrade request was not proxied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Rejection {
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("bad request path: {0}")]
    BadPath(crate::route::PathError),
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
    #[error("origin not allowed: {0}")]
    Origin(String),
    #[error("request body over max_body_size ({0} bytes)")]
    BodyTooLarge(u64),
    #[error("token refused: {0}")]
    Jwt(crate::jwt::Refusal),
    #[error("upstream {url} did not complete its handshake within {timeout:?}")]
    UpstreamTimeout {
        url: String,
        timeout: std::time::Duration,
    },
    #[error("every endpoint of upstream pool {pool:?} is down")]
    AllDown {
        pool: String,
        retry_after: std::time::Duration,
    },
}

impl Rejection {
    pub(crate) fn into_answer(self) -> Answer {
        let message = self.to_string();
        match self {
            Rejection::NoRoute(_) => Answer::text(StatusCode::NOT_FOUND, message),
            // The page's origin is not said back: the refusal is the same for every origin.
            Rejection::Origin(_) => Answer::text(
                StatusCode::FORBIDDEN,
                "this origin may not open WebSocket connections here".into(),
            ),
            Rejection::NotWebSocket => {
                let mut r = Answer::text(
                    StatusCode::UPGRADE_REQUIRED,
                    "this path accepts WebSocket connections only".into(),
                );
                r.headers
                    .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                r.headers
                    .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
                r
            }
            Rejection::Method(_) => {
                let mut r = Answer::text(StatusCode::METHOD_NOT_ALLOWED, message);
                r.headers
                    .insert(header::ALLOW, HeaderValue::from_static("GET"));
                r
            }
            Rejection::BodyTooLarge(_) => Answer::text(StatusCode::PAYLOAD_TOO_LARGE, message),
            Rejection::BadUpgrade(_) | Rejection::BadPath(_) => {
                Answer::text(StatusCode::BAD_REQUEST, message)
            }
            Rejection::Version => {
                let mut r = Answer::text(StatusCode::UPGRADE_REQUIRED, message);
                r.headers.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
                r
            }
            Rejection::Upstream {
                source: UpstreamError::Refused(refusal),
                ..
            } => Answer {
                status: refusal.status,
                headers: headers::refusal(&refusal.headers),
                body: refusal.body,
            },
            Rejection::Policy(rejection) => {
                let (status, body, headers) = *rejection;
                Answer {
                    status,
                    headers,
                    body,
                }
            }
            Rejection::Jwt(refusal) => jwt_refusal(&refusal),
            Rejection::PolicyFailed(_) => Answer::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error in the upgrade policy".into(),
            ),
            Rejection::Upstream { .. } => Answer::text(
                StatusCode::BAD_GATEWAY,
                "bad gateway: upstream unavailable".into(),
            ),
            Rejection::UpstreamTimeout { .. } => Answer::text(
                StatusCode::GATEWAY_TIMEOUT,
                "gateway timeout: upstream did not answer in time".into(),
            ),
            Rejection::AllDown { retry_after, .. } => {
                let mut r = Answer::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service unavailable: every upstream endpoint is down".into(),
                );
                // Whole seconds, rounded up: never "0", which would invite a retry storm.
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                r.headers
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
                r
            }
        }
    }

    /// Logs the refusal, inside the connection's span (which names the client).
    pub(crate) fn log(&self, path: &str) {
        match self {
            Rejection::PolicyFailed(e) => {
                tracing::warn!(path, script = %e.script, error = %e.message, "policy error in on_upgrade")
            }
            Rejection::Upstream { .. }
            | Rejection::UpstreamTimeout { .. }
            | Rejection::AllDown { .. } => {
                tracing::warn!(path, error = %self, "upgrade failed")
            }
            _ => tracing::info!(path, error = %self, "request rejected"),
        }
    }
}

/// The answer to a request `[route.jwt]` refused: 401 with its `WWW-Authenticate` challenge,
/// or 503 when there are no keys. For every request of a JWT route, upgrade or plain HTTP.
pub(crate) fn jwt_refusal(refusal: &crate::jwt::Refusal) -> Answer {
    let mut r = Answer::text(refusal.status(), format!("unauthorized: {refusal}"));
    if let Some(challenge) = refusal.www_authenticate() {
        r.headers.insert(header::WWW_AUTHENTICATE, challenge);
    }
    r
}

/// What became of a request.
pub(crate) enum Handled {
    /// Not upgraded: the answer to write. The connection may carry another request.
    Answered(Answer),
    /// The upstream accepted the WebSocket: [`Accepted::run`] answers 101 and relays.
    Upgraded(Box<Accepted>),
}

/// Serves one HTTP request on a client connection (`tls`: on a `[[server.tls]]` listener): a
/// refusal is logged here, once.
pub(crate) async fn handle(
    request: &RequestHead,
    peer: SocketAddr,
    tls: bool,
    shared: &Arc<Shared>,
    worker: &WorkerCtx,
) -> Handled {
    let mut metrics = None;
    match upgrade(request, peer, tls, shared, worker, &mut metrics).await {
        Ok(accepted) => Handled::Upgraded(Box::new(accepted)),
        Err(rejection) => {
            rejection.log(request.path());
            let answer = rejection.into_answer();
            let metrics = metrics.as_ref().unwrap_or(worker.metrics.unmatched());
            metrics.handshake(answer.status.as_u16());
            Handled::Answered(answer)
        }
    }
}

/// Whether a comma-separated `name` header lists `token` (any case).
fn has_token(headers: &HeaderFields, name: &str, token: &str) -> bool {
    headers
        .get_all(name)
        .any(|v| lists_token(v, token.as_bytes()))
}

/// Checks the RFC 6455 §4.2.1 requirements; returns the client's key.
fn validate(request: &RequestHead) -> Result<&[u8], Rejection> {
    let headers = &request.headers;
    if !has_token(headers, "upgrade", "websocket") {
        return Err(Rejection::NotWebSocket);
    }
    if request.method != Method::GET {
        return Err(Rejection::Method(request.method.clone()));
    }
    if request.version != Version::HTTP_11 {
        return Err(Rejection::BadUpgrade("HTTP/1.1 is required"));
    }
    if !has_token(headers, "connection", "upgrade") {
        return Err(Rejection::BadUpgrade(
            "Connection header must include \"Upgrade\"",
        ));
    }
    if request.has_body {
        return Err(Rejection::BadUpgrade("an upgrade request has no body"));
    }
    if headers.get("sec-websocket-version") != Some(b"13") {
        return Err(Rejection::Version);
    }
    let key = headers
        .get("sec-websocket-key")
        .ok_or(Rejection::BadUpgrade("missing Sec-WebSocket-Key"))?;
    if !is_websocket_key(key) {
        return Err(Rejection::BadUpgrade(
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ));
    }
    Ok(key)
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
    request: &RequestHead,
    peer: SocketAddr,
    tls: bool,
    shared: &Arc<Shared>,
    worker: &WorkerCtx,
    counted: &mut Option<Arc<RouteMetrics>>,
) -> Result<Accepted, Rejection> {
    let host = request.host();
    // The connection's snapshot, taken once: its route, upstream, policies and limits.
    let snapshot = shared.snapshot();
    let found = snapshot
        .router()
        .find(host, request.path())
        .map_err(|e| match e {
            RouteError::NoRoute(path) => Rejection::NoRoute(path),
            RouteError::BadPath(e) => Rejection::BadPath(e),
        })?;
    // Looked up once per connection; the relay keeps it.
    let metrics = counted
        .insert(worker.metrics.route(&found.route.route.name()))
        .clone();
    // Policies see the path the route was matched on.
    let path = &*found.path;
    let client_key = validate(request)?;
    let runtime = found.route;
    let route = runtime.route.clone();
    // Cross-site WebSocket hijacking: a foreign page's upgrade is refused before any policy
    // sees it.
    if !route.allows_origin(request.headers.get_all("origin")) {
        let origin = request.headers.get_all("origin").next().map_or_else(
            || "no Origin header".to_owned(),
            |o| String::from_utf8_lossy(o).into_owned(),
        );
        return Err(Rejection::Origin(origin));
    }
    let id = shared
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // The connection's span (opened by the listener): named here, kept by `Accepted`.
    let span = tracing::Span::current();
    span.record("conn", id);
    span.record("route", tracing::field::display(route.name()));
    span.record("snapshot", snapshot.number);

    // [route.jwt]: the token is verified before any policy runs; a refusal never reaches
    // the upstream. The handshake waits at most its timeout for keys still to be fetched.
    let query = request.query().unwrap_or("");
    let claims = match &runtime.jwt {
        None => None,
        Some(verifier) => Some(
            verifier
                .authorize(&request.headers, query, route.handshake_timeout)
                .await
                .map_err(Rejection::Jwt)?,
        ),
    };

    // Phase: on_upgrade. It may reject, or change the upstream, headers, subprotocol, lifetime.
    let (mut changes, hooks): (UpgradeChanges, Box<dyn FrameHooks>) = match worker
        .policy(&snapshot, &route)
        .map_err(Rejection::PolicyFailed)?
    {
        None => (UpgradeChanges::default(), Box::new(PassThrough)),
        Some(policy) => {
            let upgrade_request = UpgradeRequest {
                id,
                method: request.method.as_str(),
                upgrade: true,
                path,
                query: request.query().unwrap_or(""),
                headers: &request.headers,
                params: &found.params,
                client_ip: peer.ip(),
                scheme: if tls { "wss" } else { "ws" },
                host,
                metrics: Some(&metrics),
                jwt: claims.as_ref().map(|c| &*c.json),
            };
            match policy.on_upgrade(&upgrade_request).settled().await {
                UpgradeVerdict::Continue { changes, hooks } => (changes, hooks),
                UpgradeVerdict::Pending(_) => unreachable!("settled() awaits a pending verdict"),
                UpgradeVerdict::Reject {
                    status,
                    body,
                    headers,
                } => return Err(Rejection::Policy(Box::new((status, body, headers)))),
                UpgradeVerdict::Failed(error) => return Err(Rejection::PolicyFailed(error)),
            }
        }
    };
    // [route.validate]: its schemas check messages before the frame policies see them.
    let hooks =
        crate::policy::validate::wrap(hooks, runtime.validate.as_ref(), Some(metrics.clone()));

    let (query, changed_headers) = super::forward::strip_token(
        runtime.jwt.as_deref(),
        &request.headers,
        query,
        std::mem::take(&mut changes.headers),
    );
    let token_deadline = match (&runtime.jwt, &claims) {
        (Some(verifier), Some(claims)) if verifier.config().expire_with_token => {
            claims.expires.checked_add(verifier.config().leeway)
        }
        _ => None,
    };
    let pool = super::pooled::chosen(&mut changes, &snapshot, runtime.pool.as_ref(), &route)?;
    let url = super::forward::upstream_url(
        changes.upstream.take(),
        &route.upstream,
        &found.params,
        &query,
    );
    // Only the chosen subprotocol, if the policy chose one, is offered upstream.
    let extra = headers::UpstreamRequest {
        client_ip: peer.ip(),
        client_host: host,
        proto: if tls { "https" } else { "http" },
        changes: &changed_headers,
        subprotocol: changes.subprotocol.as_deref(),
    };
    let size: usize = request
        .headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 4)
        .sum();
    let mut upstream_headers = Vec::with_capacity(size + 96);
    headers::upstream_request(&mut upstream_headers, &request.headers, &extra);
    // permessage-deflate: each leg negotiates on its own (the client's offer is not passed on).
    let deflate = route.compression.then_some(extensions::Settings {
        context_takeover: route.compression_context_takeover,
        window_bits: route.compression_window_bits,
        sending: extensions::Sending {
            level: route.compression_level,
            threshold: route.compression_threshold,
        },
    });
    if let Some(settings) = deflate {
        crate::client_http::header_line(
            &mut upstream_headers,
            b"sec-websocket-extensions",
            extensions::upstream_offer(settings).as_bytes(),
        );
    }
    let tls = match &pool {
        Some(pool) => snapshot.pool_tls(&pool.name),
        None => runtime.tls.as_ref(),
    };
    // The client's key goes upstream too, so the upstream's accept value is the client's.
    // `validate` has checked the key: 24 base64 characters, valid UTF-8.
    let key = std::str::from_utf8(client_key).unwrap_or_default();
    let accept = derive_accept_key(client_key);
    let key = upstream::Key {
        key,
        accept: &accept,
    };
    let connecting = tokio::time::Instant::now();
    let pooled = match &pool {
        Some(pool) => Some(super::pooled::target(
            pool,
            shared,
            request,
            &found.params,
            path,
            &query,
            peer,
            &changes,
            &route,
        )?),
        None => None,
    };
    let sticky = pooled.as_ref().and_then(|t| t.pool.sticky_cookie.clone());
    let attempt = match pooled {
        Some(target) => {
            super::pooled::connect(target, &upstream_headers, key, tls, route.handshake_timeout)
                .await
                .map(|r| (r.connected, r.url, Some(r.guard)))
        }
        None => match tokio::time::timeout(
            route.handshake_timeout,
            upstream::connect(&url, upstream_headers, key, tls),
        )
        .await
        {
            Ok(Ok(connected)) => Ok((connected, url, None)),
            Ok(Err(source)) => Err(Rejection::Upstream { url, source }),
            Err(_) => Err(Rejection::UpstreamTimeout {
                url,
                timeout: route.handshake_timeout,
            }),
        },
    };
    // The upstream's answer to the offer; without one, its extensions are not looked at
    // (nothing was offered, and they do not reach the client).
    let attempt = attempt.and_then(|(connected, url, guard)| {
        let Some(settings) = deflate else {
            return Ok((connected, url, guard, None));
        };
        let answers = connected.headers.get_all("sec-websocket-extensions");
        match extensions::accept_upstream(answers, settings) {
            Ok(agreed) => Ok((connected, url, guard, agreed)),
            Err(e) => Err(Rejection::Upstream {
                url,
                source: UpstreamError::BadHandshake(format!("permessage-deflate: {e}")),
            }),
        }
    });
    let (connected, url, endpoint, upstream_deflate) = match attempt {
        Ok(reached) => {
            metrics.upstream_connect(connecting.elapsed());
            reached
        }
        Err(rejection) => {
            // on_upgrade went ahead, so on_close runs too: it may release what on_upgrade took.
            let mut hooks = hooks;
            let mut summary = CloseSummary::new(id, route.name(), peer, String::new());
            summary.reason = rejection.to_string();
            summary.closed_by = ClosedBy::Gateway;
            hooks.on_close(&summary);
            if let Some(rest) = hooks.close_pending() {
                rest.await;
            }
            return Err(rejection);
        }
    };

    let mut hooks = hooks;
    hooks.upstream_chosen(&endpoint_name(
        endpoint
            .as_ref()
            .map_or(url.as_str(), |g| g.endpoint().url.as_str()),
    ));
    // The policy's choice replaces the upstream's (RFC 6455 allows one subprotocol).
    let chosen = changes.subprotocol.as_deref();
    let forwarded = headers::client_response(&connected.headers)
        .filter(|(name, _)| chosen.is_none() || !is_name(name, "sec-websocket-protocol"));
    let mut lines = vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept.as_str()),
    ];
    if let Some(chosen) = chosen {
        lines.push(("Sec-WebSocket-Protocol", chosen));
    }
    let offers = request.headers.get_all("sec-websocket-extensions");
    let client_deflate = deflate.and_then(|settings| extensions::answer_client(offers, settings));
    if let Some((answer, _)) = &client_deflate {
        lines.push(("Sec-WebSocket-Extensions", answer.as_str()));
    }
    // A pool's sticky cookie names the endpoint by its opaque id, never its address.
    let cookie = sticky
        .zip(endpoint.as_ref())
        .map(|(name, guard)| super::pooled::sticky_cookie(&name, &guard.endpoint().id));
    if let Some(cookie) = &cookie {
        lines.push(("Set-Cookie", cookie.as_str()));
    }
    let record = Box::new(record(
        id,
        &route,
        registry_request(request),
        &connected.headers,
        changes.tags,
        changes.ctx_json,
    ));
    let response = crate::client_http::switching_protocols(forwarded, &lines);
    Ok(Accepted {
        response,
        // Only the socket is kept (the upstream's headers are done with), so an idle
        // connection holds as little as possible.
        upstream: Leg::new(
            connected.socket,
            Side::Upstream,
            route.max_message_size,
            upstream_deflate,
        ),
        client_deflate: client_deflate.map(|(_, agreed)| agreed),
        hooks,
        summary: CloseSummary::new(id, route.name(), peer, url),
        route,
        policy_deadline: changes.expire_at,
        token_deadline,
        shared: shared.clone(),
        metrics,
        record,
        snapshot,
        span,
        endpoint,
    })
}

/// `scheme://host:port` of an upstream URL: no path or query, no credentials.
fn endpoint_name(url: &str) -> std::borrow::Cow<'_, str> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}{}", &url[..start], &url[start + at + 1..end]).into(),
        None => url[..end].into(),
    }
}

/// What the registry shows of a connection besides its summary, kept until the 101.
struct Record {
    tags: crate::registry::Tags,
    request: crate::registry::UpgradeRequest,
    ctx: serde_json::Value,
    /// The traffic console's capture, when the route records from the start.
    capture: Option<Arc<Capture>>,
}

/// The registry's record of a connection; with a capture (and the upstream's 101 in it) when
/// the route's `[route.capture]` records from the start.
fn record(
    id: u64,
    route: &Route,
    request: crate::registry::UpgradeRequest,
    upstream_headers: &crate::header_fields::HeaderFields,
    tags: crate::registry::Tags,
    ctx: serde_json::Value,
) -> Record {
    let capture = (route.capture.mode != CaptureMode::Off).then(|| {
        let capture = Capture::new(
            id,
            &route.name(),
            route.capture.mode,
            route.capture.clone(),
            Some(request.clone()),
        );
        capture.set_response(
            upstream_headers
                .iter()
                .map(|(n, v)| (std::str::from_utf8(n).unwrap_or("?"), v)),
        );
        capture
    });
    Record {
        tags,
        request,
        ctx,
        capture,
    }
}

/// The upgrade request as the registry keeps it (secrets masked there).
fn registry_request(request: &RequestHead) -> crate::registry::UpgradeRequest {
    let headers = request
        .headers
        .iter()
        .map(|(n, v)| (std::str::from_utf8(n).unwrap_or("?"), v));
    let target = match request.query() {
        Some(query) => format!("{}?{query}", request.path()),
        None => request.path().to_owned(),
    };
    crate::registry::UpgradeRequest::new(request.method.as_str(), &target, headers)
}

/// An upgrade the upstream has accepted, waiting for the client's 101.
pub(crate) struct Accepted {
    /// The 101, encoded.
    response: Vec<u8>,
    upstream: Leg,
    /// What the client leg agreed for permessage-deflate, if it did.
    client_deflate: Option<extensions::Agreed>,
    hooks: Box<dyn FrameHooks>,
    /// The close line, filled in as the connection ends.
    summary: CloseSummary,
    route: Arc<Route>,
    /// A close time `on_upgrade` asked for.
    policy_deadline: Option<std::time::SystemTime>,
    /// The token's expiry (plus leeway), with `route.jwt.expire_with_token`.
    token_deadline: Option<std::time::SystemTime>,
    shared: Arc<Shared>,
    /// The route's counters on this worker.
    metrics: Arc<RouteMetrics>,
    /// For the registry entry.
    record: Box<Record>,
    /// The snapshot the connection was routed with, kept to its end.
    snapshot: Arc<Snapshot>,
    /// The connection's tracing span. The relay is not polled inside it (entering a span
    /// takes the log filter's lock, and would cost that on every message): it is entered
    /// where the connection logs.
    span: tracing::Span,
    /// With a pool: the endpoint's open-connection count, held to the connection's end.
    endpoint: Option<crate::upstream::pool::EndpointGuard>,
}

impl Accepted {
    /// Takes the encoded 101 out, for a connection where another HTTP stack writes it (the
    /// HTTP proxy's hyper server); [`Accepted::run`] then writes nothing before relaying.
    pub(crate) fn take_response(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.response)
    }

    /// Ends an upgrade that never reached the relay (where another HTTP stack wrote the 101):
    /// the upstream is told, `on_close` runs and the close line is written.
    pub(crate) async fn abandon(self: Box<Self>, why: Abandoned) {
        let close_timeout = self.snapshot.config.server.close_timeout;
        let Accepted {
            upstream,
            hooks,
            summary,
            span,
            ..
        } = *self;
        let opened = tokio::time::Instant::now();
        Box::pin(abandon(
            upstream,
            hooks,
            summary,
            opened,
            why,
            close_timeout,
            span,
        ))
        .await;
    }

    /// Answers the client with 101 on `stream` (TCP, or TLS from a `[[server.tls]]` listener)
    /// and relays until the connection ends; `pre_read` holds the bytes the client sent after
    /// its request head.
    pub(crate) async fn run(self: Box<Self>, mut stream: Io, pre_read: Bytes) {
        // Out of the box at once: a box moved out of in an async fn is freed only when the
        // future ends, and this one lasts as long as the connection.
        fn unbox(accepted: Box<Accepted>) -> Accepted {
            *accepted
        }
        let Accepted {
            response,
            upstream,
            client_deflate,
            hooks,
            mut summary,
            route,
            policy_deadline,
            token_deadline,
            shared,
            metrics,
            record,
            snapshot,
            span,
            endpoint,
        } = unbox(self);
        let close_timeout = snapshot.config.server.close_timeout;
        let opened = tokio::time::Instant::now();
        metrics.handshake(101);
        // A no-op flush on TCP; TLS may hold the last record until flushed.
        let written = match stream.write_all(&response).await {
            Ok(()) => stream.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            let why = Abandoned::client_left(format!("client left during the upgrade: {e}"));
            return Box::pin(abandon(
                upstream,
                hooks,
                summary,
                opened,
                why,
                close_timeout,
                span,
            ))
            .await;
        }
        drop(response);
        let client = Leg::new(
            Socket {
                io: stream,
                pre_read,
            },
            Side::Client,
            route.max_message_size,
            client_deflate,
        );
        span.in_scope(|| tracing::info!(upstream = %summary.upstream, "connection opened"));
        let cap = route.expire.map(|e| opened + e);
        let own = earliest(cap, policy_deadline);
        // The token's expiry closes with 1008 "token expired" when it comes first.
        let token = earliest(None, token_deadline).filter(|t| own.is_none_or(|o| *t < o));
        let deadline = token.or(own);
        let pings = route.ping_interval.map(|i| (i, route.ping_timeout));
        let mut lifetime = Lifetime::start(deadline, route.idle_timeout, pings);
        let follows_token = route.jwt.as_ref().is_some_and(|j| j.expire_with_token);
        lifetime.bind_deadline(token.is_some(), cap, follows_token);
        metrics.connection_opened();
        let (registration, wiring) = register(
            &shared,
            &summary,
            *record,
            deadline,
            snapshot.number,
            metrics.clone(),
            &route.capture,
        );
        let relay = Box::new(Relay::new(
            client,
            upstream,
            lifetime,
            shared,
            hooks,
            route.max_queued_bytes,
            wiring,
        ));
        let (ending, [client_to_upstream, upstream_to_client], mut hooks) =
            relay.run(close_timeout).await;
        drop(registration);
        (summary.code, summary.reason) = ending.code_and_reason();
        summary.closed_by = ending.closed_by();
        summary.duration = opened.elapsed();
        summary.client_to_upstream = client_to_upstream;
        summary.upstream_to_client = upstream_to_client;
        count_close(&metrics, &ending, &summary);
        span.in_scope(|| hooks.on_close(&summary));
        if let Some(rest) = hooks.close_pending() {
            tracing::Instrument::instrument(rest, span.clone()).await;
        }
        span.in_scope(|| summary.log());
        // The snapshot (and, through the hooks just dropped, this worker's VM state for it)
        // is released here, with the connection, and so is its endpoint's count.
        drop(snapshot);
        drop(endpoint);
    }
}

/// Registers an established connection; its entry goes when the returned guard is dropped.
fn register(
    shared: &Shared,
    summary: &CloseSummary,
    record: Record,
    deadline: Option<tokio::time::Instant>,
    snapshot: u64,
    metrics: Arc<RouteMetrics>,
    capture_config: &Arc<CaptureConfig>,
) -> (Option<crate::registry::Registration>, Wiring) {
    let Record {
        tags,
        request,
        ctx,
        capture,
    } = record;
    let now = std::time::SystemTime::now();
    let expires_at =
        deadline.map(|d| now + d.saturating_duration_since(tokio::time::Instant::now()));
    let entry = crate::registry::NewConnection {
        id: summary.id,
        route: summary.route.clone(),
        client: summary.client,
        upstream: summary.upstream.clone(),
        opened_at: now,
        expires_at,
        snapshot,
        tags,
        request,
        ctx,
        capture_config: capture_config.clone(),
        capture: capture.clone(),
    };
    match shared.registry.register(entry) {
        Ok(r) => (
            Some(r.guard),
            Wiring {
                meter: Meter {
                    route: metrics,
                    conn: r.stats,
                },
                control: Some(r.control),
                capture,
            },
        ),
        // Ids are unique per process, so this cannot happen; the connection still runs.
        Err(e) => {
            tracing::error!(conn = summary.id, error = %e, "connection not registered");
            let meter = Meter {
                route: metrics,
                conn: Arc::default(),
            };
            (
                None,
                Wiring {
                    meter,
                    control: None,
                    capture,
                },
            )
        }
    }
}

/// The close metrics of an established connection.
fn count_close(metrics: &RouteMetrics, ending: &super::close::Ending, summary: &CloseSummary) {
    use super::close::Ending;
    use crate::metrics::{ClosedBy as By, LifetimeReason};
    let by = match summary.closed_by {
        ClosedBy::Client => By::Client,
        ClosedBy::Upstream => By::Upstream,
        ClosedBy::Gateway => By::Gateway,
    };
    metrics.connection_closed(summary.code, by);
    match ending {
        Ending::Expired | Ending::TokenExpired => metrics.lifetime_close(LifetimeReason::Expire),
        Ending::Idle => metrics.lifetime_close(LifetimeReason::Idle),
        _ => {}
    }
}

/// Why an upgrade ended before its relay: the close line's reason, who ended it, and the
/// close frame the upstream gets.
pub(crate) struct Abandoned {
    reason: String,
    closed_by: ClosedBy,
    upstream: &'static str,
}

impl Abandoned {
    /// The client left (or its 101 could not be written): the upstream gets 1001
    /// `client connection lost`.
    pub(crate) fn client_left(reason: String) -> Abandoned {
        Abandoned {
            reason,
            closed_by: ClosedBy::Client,
            upstream: super::close::reasons::CLIENT_LOST,
        }
    }

    /// The gateway is shutting down: 1001 `server shutting down`, as for a relayed connection.
    pub(crate) fn shutdown() -> Abandoned {
        Abandoned {
            reason: super::close::reasons::SHUTDOWN.to_owned(),
            closed_by: ClosedBy::Gateway,
            upstream: super::close::reasons::SHUTDOWN,
        }
    }

    /// The gateway cannot go on with the client's stream (`reason` says why).
    pub(crate) fn gateway(reason: String) -> Abandoned {
        Abandoned {
            reason,
            closed_by: ClosedBy::Gateway,
            upstream: super::close::reasons::CLIENT_LOST,
        }
    }
}

/// Ends a connection that never reached the relay: the upstream is told with a 1001,
/// `on_close` runs (it may release what `on_upgrade` took) and the close line is written.
async fn abandon(
    mut upstream: Leg,
    mut hooks: Box<dyn FrameHooks>,
    mut summary: CloseSummary,
    opened: tokio::time::Instant,
    why: Abandoned,
    close_timeout: std::time::Duration,
    span: tracing::Span,
) {
    let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Away,
        reason: why.upstream.into(),
    };
    let _ = tokio::time::timeout(close_timeout, upstream.close(Some(&frame))).await;
    summary.reason = why.reason;
    summary.closed_by = why.closed_by;
    summary.duration = opened.elapsed();
    span.in_scope(|| hooks.on_close(&summary));
    if let Some(rest) = hooks.close_pending() {
        tracing::Instrument::instrument(rest, span.clone()).await;
    }
    span.in_scope(|| summary.log());
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

    #[test]
    fn endpoint_names_keep_scheme_host_and_port_only() {
        assert_eq!(
            endpoint_name("ws://10.0.0.1:9000/rooms/a?x=1"),
            "ws://10.0.0.1:9000"
        );
        assert_eq!(endpoint_name("wss://h:1"), "wss://h:1");
        assert_eq!(endpoint_name("ws://u:secret@h:1/p"), "ws://h:1");
        assert_eq!(endpoint_name("ws://[::1]:9?q"), "ws://[::1]:9");
    }
}
