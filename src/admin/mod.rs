//! The admin listener (issue 13 §3, §4): health, readiness, `/metrics`, the connection registry's
//! queries and controls, reload and the effective configuration, as JSON over HTTP/1.1 (hyper).
//!
//! Ownership: this module owns the HTTP side only: routing, authentication, parsing and bounding
//! input, and turning outcomes into statuses. What the answers contain comes from the gateway
//! through [`AdminApi`]; connections are reached only through the [`Registry`]'s bounded control
//! channels, so nothing here can block a relay.
//!
//! Choices (documented in docs/operations.md, "Admin API"):
//! - With a token, every request needs `Authorization: Bearer <token>` (compared in constant
//!   time) except `GET /healthz` and `GET /readyz`, which orchestrator probes call without
//!   credentials and which reveal nothing (as Envoy's and Kong's status endpoints). The check
//!   runs before routing, so an unauthenticated caller cannot probe which paths exist.
//! - One request per connection (no keep-alive), headers within [`HEADER_READ_TIMEOUT`], bodies
//!   up to [`MAX_BODY`] within [`BODY_READ_TIMEOUT`], at most [`MAX_CONNECTIONS`] admin
//!   connections at once.
//! - A close without `code` sends 1008 "closed by admin"; codes are checked by
//!   [`check_close`].
//! - `DELETE /admin/connections` needs at least one filter; `POST /admin/broadcast` without one
//!   reaches every connection.
//! - `scope=fleet` on `GET`/`DELETE /admin/connections` and `POST /admin/broadcast` goes to
//!   every instance through Redis ([`AdminApi::fleet`], `src/fleet/registry.rs`): 400 without
//!   `[shared] backend = "redis"`, 503 while Redis is unreachable. `scope=local` (the default)
//!   is this instance alone, as before.

pub use crate::config::admin as config;
mod console;
mod gateway_api;

pub(crate) use gateway_api::GatewayApi;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::CaptureMode;
use crate::fleet::registry::{FleetRegistry, FleetScopeError};
use crate::registry::{check_close, Control, ControlError, Filter, Message, Registry, Target};

pub use config::{AdminConfig, AdminConfigError, RawAdmin};

/// Largest request body (`send`, `broadcast`), in bytes.
pub const MAX_BODY: usize = 1 << 20;
/// Admin connections served at once; further ones wait in the accept backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// A request's head must arrive within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's body must arrive within this time (a slow sender cannot hold a connection slot).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on finishing an in-flight admin request at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Close code and reason of a `DELETE` without `code`.
pub const DEFAULT_CLOSE: (u16, &str) = (1008, "closed by admin");

/// A boxed future, as [`AdminApi::reload`] returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the gateway provides to the admin listener.
pub trait AdminApi: Send + Sync + 'static {
    /// True while the gateway accepts connections (`/readyz` answers 200), false once it is
    /// shutting down (503).
    fn ready(&self) -> bool;

    /// The Prometheus text of `GET /metrics` (normally
    /// [`Metrics::encode`](crate::metrics::Metrics::encode)).
    fn metrics(&self) -> String;

    /// The open connections.
    fn registry(&self) -> &Registry;

    /// Validates, compiles and swaps in the configuration on disk. `Ok` is the new snapshot
    /// number; `Err` is `file:line:column: message`, and nothing changed.
    fn reload(&self) -> BoxFuture<Result<u64, String>>;

    /// The effective configuration, secrets redacted, with its `snapshot` number.
    fn config(&self) -> serde_json::Value;

    /// `scope=fleet` on the registry's endpoints: the registry across the fleet; `None`
    /// (the default) without `[shared] backend = "redis"`, where `scope=fleet` answers 400.
    fn fleet(&self) -> Option<Arc<FleetRegistry>> {
        None
    }

    /// `GET /admin/upstreams`: each `[[upstream]]` pool and its endpoints' live state.
    fn upstreams(&self) -> serde_json::Value {
        json!({ "pools": [] })
    }
}

/// Serves the admin API on `listener` until `shutdown` is cancelled, then lets in-flight
/// requests finish (bounded) and returns. `token`: when `Some`, required as a bearer token.
pub async fn serve(
    listener: TcpListener,
    shutdown: CancellationToken,
    token: Option<String>,
    api: Arc<dyn AdminApi>,
) {
    let handler = Arc::new(Handler {
        api,
        token: token.map(String::into_bytes),
        shutdown: shutdown.clone(),
    });
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler.handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
                }
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await;
}

/// An answer's body: whole, or a stream (the console's server-sent events).
type Body = BoxBody<Bytes, Infallible>;
type Answer = Response<Body>;

struct Handler {
    api: Arc<dyn AdminApi>,
    token: Option<Vec<u8>>,
    /// Ends the console's streams when the listener shuts down.
    shutdown: CancellationToken,
}

/// A refusal: its status and the `error` text.
struct Refusal(StatusCode, String);

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal(status, message.into())
    }
}

fn json_answer(status: StatusCode, body: &impl serde::Serialize) -> Answer {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(console::full(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

impl From<Refusal> for Answer {
    fn from(Refusal(status, message): Refusal) -> Answer {
        json_answer(status, &json!({ "error": message }))
    }
}

impl From<FleetScopeError> for Refusal {
    fn from(e: FleetScopeError) -> Refusal {
        Refusal::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

impl From<ControlError> for Refusal {
    fn from(e: ControlError) -> Refusal {
        let status = match e {
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Refusal::new(status, e.to_string())
    }
}

impl Handler {
    async fn handle(&self, req: Request<Incoming>) -> Answer {
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        let answer = match self.route(req).await {
            Ok(a) => a,
            Err(r) => r.into(),
        };
        if answer.status().is_client_error() || answer.status().is_server_error() {
            // Debug: an unauthenticated caller must not be able to fill the log.
            tracing::debug!(%method, %path, status = answer.status().as_u16(), "admin request refused");
        }
        answer
    }

    /// Whether the request carries the token: as a bearer token, or as the password of HTTP
    /// Basic credentials (any user name), which is what a browser sends for the console.
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let Some(value) = req.headers().get(header::AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        let given = if let Some(bearer) = value.strip_prefix(b"Bearer ") {
            bearer.to_vec()
        } else if let Some(basic) = value.strip_prefix(b"Basic ") {
            use base64::Engine;
            let Ok(pair) = base64::engine::general_purpose::STANDARD.decode(basic) else {
                return false;
            };
            match pair.iter().position(|&b| b == b':') {
                Some(colon) => pair[colon + 1..].to_vec(),
                None => return false,
            }
        } else {
            return false;
        };
        // Constant time over the token's bytes; only a length mismatch returns early.
        bool::from(given.as_slice().ct_eq(token))
    }

    /// Whether a browser sent the request from another site (cross-site request forgery: a
    /// page elsewhere posting to a loopback admin, or riding on the console's credentials).
    /// Browsers send `Origin` on every cross-origin request and on same-origin ones other
    /// than GET and HEAD; it must then name this listener, as the `Host` the browser used.
    fn foreign_origin(req: &Request<Incoming>) -> bool {
        let Some(origin) = req.headers().get(header::ORIGIN) else {
            return false;
        };
        let host = req.headers().get(header::HOST).map(|h| h.as_bytes());
        let origin = origin.as_bytes();
        let own = origin
            .strip_prefix(b"http://")
            .or_else(|| origin.strip_prefix(b"https://"));
        !matches!((own, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Answer, Refusal> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let method = req.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/healthz") => {
                return Ok(json_answer(StatusCode::OK, &json!({"status": "ok"})))
            }
            (&Method::GET, "/readyz") => {
                return Ok(if self.api.ready() {
                    json_answer(StatusCode::OK, &json!({"status": "ready"}))
                } else {
                    Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down").into()
                })
            }
            _ => {}
        }
        if Self::foreign_origin(&req) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "the Origin header names another site: the admin API answers its own pages only",
            ));
        }
        let page = path == "/console" || path.starts_with("/console/");
        if !self.authorized(&req) {
            let mut a: Answer = Refusal::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token: send Authorization: Bearer <token>",
            )
            .into();
            // The console's page asks the browser to prompt (any user name, the token as
            // the password); API clients are told the bearer scheme.
            let challenge = if page {
                "Basic realm=\"framegate-admin\", charset=\"UTF-8\""
            } else {
                "Bearer realm=\"framegate-admin\""
            };
            a.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static(challenge),
            );
            return Ok(a);
        }
        if page && method == Method::GET {
            if let Some(a) = console::asset(&path) {
                return Ok(a);
            }
        }
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let api = &self.api;
        match (segments.as_slice(), &method) {
            (["metrics"], &Method::GET) => {
                let mut r = Response::new(console::full(Bytes::from(api.metrics())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
                );
                Ok(r)
            }
            (["admin", "connections"], &Method::GET) => {
                let f = filter(&query, &["scope"])?;
                match self.scope(&query)? {
                    None => Ok(json_answer(StatusCode::OK, &api.registry().list(&f))),
                    Some(fleet) => Ok(json_answer(StatusCode::OK, &fleet.list(&f).await?)),
                }
            }
            (["admin", "connections"], &Method::DELETE) => {
                let f = filter(&query, &["code", "reason", "scope"])?;
                let fleet = self.scope(&query)?;
                if f.is_everything() {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "give a filter (route, client_ip, tag or snapshot) to close many connections",
                    ));
                }
                let (code, reason) = close_params(&query)?;
                let close = Control::Close { code, reason };
                match fleet {
                    None => Ok(json_answer(
                        StatusCode::OK,
                        &api.registry().control_matching(&f, &close),
                    )),
                    Some(fleet) => Ok(json_answer(
                        StatusCode::OK,
                        &fleet.control_matching(&f, &close).await?,
                    )),
                }
            }
            (["admin", "connections", id], &Method::GET) => {
                let id = conn_id(id)?;
                match api.registry().get(id) {
                    Some(d) => Ok(json_answer(StatusCode::OK, &d)),
                    None => Err(ControlError::NotFound(id).into()),
                }
            }
            (["admin", "connections", id], &Method::DELETE) => {
                let id = conn_id(id)?;
                no_other_params(&query, &["code", "reason"])?;
                let (code, reason) = close_params(&query)?;
                let close = Control::Close {
                    code,
                    reason: reason.clone(),
                };
                api.registry().control(id, close)?;
                Ok(json_answer(
                    StatusCode::OK,
                    &json!({"id": id, "code": code, "reason": reason}),
                ))
            }
            (["admin", "connections", id, "send"], &Method::POST) => {
                let id = conn_id(id)?;
                no_other_params(&query, &["to"])?;
                let to = match param(&query, "to").as_deref() {
                    Some("client") => Target::Client,
                    Some("upstream") => Target::Upstream,
                    _ => {
                        return Err(Refusal::new(
                            StatusCode::BAD_REQUEST,
                            "to= must be client or upstream",
                        ))
                    }
                };
                let message = message(req).await?;
                api.registry().control(id, Control::Send { to, message })?;
                Ok(json_answer(
                    StatusCode::OK,
                    &json!({"id": id, "queued": true}),
                ))
            }
            (["admin", "connections", id, "capture"], &Method::POST) => {
                let id = conn_id(id)?;
                no_other_params(&query, &["mode"])?;
                let mode = param(&query, "mode")
                    .as_deref()
                    .and_then(CaptureMode::parse)
                    .ok_or_else(|| bad_request("mode= must be off, metadata or payload"))?;
                api.registry().set_capture(id, mode)?;
                Ok(json_answer(
                    StatusCode::OK,
                    &json!({"id": id, "mode": mode.as_str()}),
                ))
            }
            (["admin", "connections", id, "capture"], &Method::GET) => {
                let id = conn_id(id)?;
                no_other_params(&query, &[])?;
                let capture = self.capture(id)?;
                let mut a = json_answer(StatusCode::OK, &capture.to_json());
                let file = format!("attachment; filename=\"framegate-conn-{id}.json\"");
                if let Ok(v) = header::HeaderValue::from_str(&file) {
                    a.headers_mut().insert(header::CONTENT_DISPOSITION, v);
                }
                Ok(a)
            }
            (["admin", "connections", id, "capture", "stream"], &Method::GET) => {
                let id = conn_id(id)?;
                no_other_params(&query, &["after"])?;
                // A reconnecting EventSource names the last entry it got in Last-Event-ID.
                let resumed = req
                    .headers()
                    .get("last-event-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let after = match param(&query, "after").or(resumed) {
                    None => 0,
                    Some(a) => a
                        .trim()
                        .parse()
                        .map_err(|_| bad_request(format!("after={a:?} is not a number")))?,
                };
                let capture = self.capture(id)?;
                Ok(console::stream(capture, after, self.shutdown.clone()))
            }
            (["admin", "broadcast"], &Method::POST) => {
                let f = filter(&query, &["scope"])?;
                let fleet = self.scope(&query)?;
                let message = message(req).await?;
                let send = Control::Send {
                    to: Target::Client,
                    message,
                };
                match fleet {
                    None => Ok(json_answer(
                        StatusCode::OK,
                        &api.registry().control_matching(&f, &send),
                    )),
                    Some(fleet) => Ok(json_answer(
                        StatusCode::OK,
                        &fleet.control_matching(&f, &send).await?,
                    )),
                }
            }
            (["admin", "reload"], &Method::POST) => match api.reload().await {
                Ok(snapshot) => Ok(json_answer(StatusCode::OK, &json!({"snapshot": snapshot}))),
                Err(e) => Err(Refusal::new(StatusCode::BAD_REQUEST, e)),
            },
            (["admin", "config"], &Method::GET) => Ok(json_answer(StatusCode::OK, &api.config())),
            (["admin", "upstreams"], &Method::GET) => {
                Ok(json_answer(StatusCode::OK, &api.upstreams()))
            }
            (known, _) if allowed(known).is_some() => {
                let mut a: Answer = Refusal::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("{method} is not allowed on {path}"),
                )
                .into();
                if let Some(allow) = allowed(known) {
                    a.headers_mut()
                        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
                }
                Ok(a)
            }
            _ => Err(Refusal::new(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {path}"),
            )),
        }
    }
}

impl Handler {
    /// `scope=`: `None` for `local` (the default), the fleet's registry for `fleet`.
    fn scope(&self, query: &str) -> Result<Option<Arc<FleetRegistry>>, Refusal> {
        match param(query, "scope").as_deref() {
            None | Some("local") => Ok(None),
            Some("fleet") => self
                .api
                .fleet()
                .map(Some)
                .ok_or_else(|| bad_request("scope=fleet needs [shared] backend = \"redis\"")),
            Some(other) => Err(bad_request(format!(
                "scope={other:?} is not one of local, fleet"
            ))),
        }
    }

    /// The capture of connection `id` (open, or recently closed), or 404.
    fn capture(&self, id: u64) -> Result<Arc<crate::capture::Capture>, Refusal> {
        self.api.registry().capture(id).ok_or_else(|| {
            Refusal::new(
                StatusCode::NOT_FOUND,
                format!("connection {id} has no capture: it is not open, or it never recorded (POST /admin/connections/{id}/capture?mode=payload turns it on)"),
            )
        })
    }
}

/// The methods a known path accepts (for 405).
fn allowed(segments: &[&str]) -> Option<&'static str> {
    Some(match segments {
        ["healthz"] | ["readyz"] | ["metrics"] | ["admin", "config"] | ["admin", "upstreams"] => {
            "GET"
        }
        ["admin", "connections"] | ["admin", "connections", _] => "GET, DELETE",
        ["admin", "connections", _, "send"] | ["admin", "broadcast"] | ["admin", "reload"] => {
            "POST"
        }
        ["admin", "connections", _, "capture"] => "GET, POST",
        ["admin", "connections", _, "capture", "stream"] => "GET",
        _ => return None,
    })
}

fn bad_request(message: impl Into<String>) -> Refusal {
    Refusal::new(StatusCode::BAD_REQUEST, message)
}

fn filter(query: &str, allow: &[&str]) -> Result<Filter, Refusal> {
    Filter::from_query(query, allow).map_err(|e| bad_request(e.0))
}

fn param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn no_other_params(query: &str, allow: &[&str]) -> Result<(), Refusal> {
    match form_urlencoded::parse(query.as_bytes()).find(|(k, _)| !allow.contains(&&**k)) {
        Some((k, _)) => Err(bad_request(format!("unknown parameter {k:?}"))),
        None => Ok(()),
    }
}

fn conn_id(text: &str) -> Result<u64, Refusal> {
    text.parse()
        .map_err(|_| bad_request(format!("connection id {text:?} is not a number")))
}

/// `code` and `reason` of a close, defaults applied, checked.
fn close_params(query: &str) -> Result<(u16, String), Refusal> {
    let code = match param(query, "code") {
        None => DEFAULT_CLOSE.0,
        Some(c) => c
            .parse()
            .map_err(|_| bad_request(format!("close code {c:?} is not a number")))?,
    };
    let reason = param(query, "reason").unwrap_or_else(|| DEFAULT_CLOSE.1.to_owned());
    check_close(code, &reason).map_err(|e| bad_request(e.to_string()))?;
    Ok((code, reason))
}

/// The request body as one message: binary with `Content-Type: application/octet-stream`,
/// otherwise text (which must be UTF-8).
async fn message(req: Request<Incoming>) -> Result<Message, Refusal> {
    let binary = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/octet-stream"));
    let too_big = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_big());
    }
    let body = Limited::new(req.into_body(), MAX_BODY).collect();
    let body = tokio::time::timeout(BODY_READ_TIMEOUT, body)
        .await
        .map_err(|_| {
            Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {BODY_READ_TIMEOUT:?}"),
            )
        })?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_big()
            } else {
                bad_request(format!("reading the body failed: {e}"))
            }
        })?
        .to_bytes();
    if binary {
        return Ok(Message::Binary(body));
    }
    String::from_utf8(body.to_vec())
        .map(|text| Message::Text(text.into()))
        .map_err(|_| {
            bad_request("a text message must be UTF-8; send binary with Content-Type: application/octet-stream")
        })
}
