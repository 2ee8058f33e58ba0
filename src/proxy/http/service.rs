//! One HTTP request on a connection in HTTP mode: route it as an upgrade is routed, run the
//! route's `on_upgrade` with `req.upgrade == false`, and proxy it to the upstream, bodies
//! streamed both ways. An upgrade request, or a request for a route that refuses HTTP, takes
//! the upgrade path (`proxy::handle`) as on any other connection.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use hyper::upgrade::OnUpgrade;

use super::body::{self, InFlightGuard, ResponseBody};
use super::cors::{self, Cors};
use super::upstream::{OpenError, UpstreamConn};
use super::Activity;
use crate::client_http::{head_of_parts, Answer, BadRequest, RequestHead};
use crate::config::{HttpMode, Route};
use crate::metrics::RouteMetrics;
use crate::policy::{UpgradeChanges, UpgradeRequest, UpgradeVerdict};
use crate::proxy::headers::{self, HeaderSink};
use crate::proxy::pooled;
use crate::proxy::{Accepted, Handled, Rejection, Shared};
use crate::route::{RouteError, RouteMatch};
use crate::snapshot::{RouteRuntime, Snapshot};
use crate::upstream::{Target, UpstreamError};
use crate::worker::WorkerCtx;

/// A client connection in HTTP mode, as its requests see it.
pub(crate) struct Conn {
    peer: SocketAddr,
    /// The connection came through a `[[server.tls]]` listener (`wss`/`https` for policies and
    /// `X-Forwarded-Proto`).
    tls: bool,
    shared: Arc<Shared>,
    worker: Rc<WorkerCtx>,
    activity: Arc<Activity>,
    /// The upstream connection, opened by the first request that needs it. Taken out while a
    /// request uses it (hyper serves one request at a time), put back once its response head
    /// has come.
    upstream: Cell<Option<UpstreamConn>>,
    /// Requests served so far, for `keepalive_requests`.
    served: Cell<usize>,
    /// An upgrade hyper is to hand over once it has written the 101.
    upgrade: RefCell<Option<(OnUpgrade, Box<Accepted>)>>,
    /// The metrics of the route the last request went to, found again only for another route
    /// (or the same one after a reload): finding them takes the worker's lock and makes the
    /// route's name.
    metrics: RefCell<Option<(Arc<Route>, Arc<RouteMetrics>)>>,
    /// Where the last request went upstream.
    addressed: RefCell<Addressed>,
}

impl Conn {
    pub(crate) fn new(
        peer: SocketAddr,
        tls: bool,
        shared: Arc<Shared>,
        worker: Rc<WorkerCtx>,
        activity: Arc<Activity>,
    ) -> Self {
        Conn {
            peer,
            tls,
            shared,
            worker,
            activity,
            upstream: Cell::new(None),
            served: Cell::new(0),
            upgrade: RefCell::new(None),
            metrics: RefCell::new(None),
            addressed: RefCell::default(),
        }
    }

    /// The metrics of `route`, this worker's.
    fn route_metrics(&self, route: &Arc<Route>) -> Arc<RouteMetrics> {
        let mut cached = self.metrics.borrow_mut();
        match &*cached {
            Some((of, metrics)) if Arc::ptr_eq(of, route) => metrics.clone(),
            _ => {
                let metrics = self.worker.metrics.route(&route.name());
                *cached = Some((route.clone(), metrics.clone()));
                metrics
            }
        }
    }

    /// The upgrade a request asked for, once hyper has answered it.
    pub(crate) fn take_upgrade(&self) -> Option<(OnUpgrade, Box<Accepted>)> {
        self.upgrade.borrow_mut().take()
    }

    /// Answers one request.
    pub(crate) async fn handle(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        let guard = InFlightGuard::new(&self.activity);
        let served = self.served.get() + 1;
        self.served.set(served);
        // Each request is routed with the current snapshot, as each request of the
        // hand-written path is.
        let snapshot = self.shared.snapshot();
        let last = served >= snapshot.config.server.keepalive_requests
            || self.shared.shutdown.is_cancelled();
        let mut response = self.respond(request, &snapshot, guard).await;
        if last {
            // hyper closes the connection after a response that says so.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    async fn respond(
        &self,
        mut request: Request<Incoming>,
        snapshot: &Arc<Snapshot>,
        guard: InFlightGuard,
    ) -> Response<ResponseBody> {
        let head = match head_of(&request) {
            Ok(head) => head,
            Err(bad) => {
                tracing::info!(error = %bad, "request rejected");
                self.worker
                    .metrics
                    .unmatched()
                    .handshake(bad.status().as_u16());
                return answer(Answer::text(bad.status(), bad.to_string()));
            }
        };
        if head.wants_websocket() {
            let on_upgrade = hyper::upgrade::on(&mut request);
            return match super::super::handle(
                &head,
                self.peer,
                self.tls,
                &self.shared,
                &self.worker,
            )
            .await
            {
                Handled::Answered(refused) => answer(refused),
                Handled::Upgraded(mut accepted) => {
                    let response = switching_protocols(&accepted.take_response());
                    *self.upgrade.borrow_mut() = Some((on_upgrade, accepted));
                    response
                }
            };
        }
        let found = match snapshot.router().find(head.host(), head.path()) {
            Ok(found) => found,
            Err(e) => {
                let rejection = match e {
                    RouteError::NoRoute(path) => Rejection::NoRoute(path),
                    RouteError::BadPath(e) => Rejection::BadPath(e),
                };
                return self.refuse(rejection, &head, self.worker.metrics.unmatched(), false);
            }
        };
        let route = found.route.route.clone();
        let metrics = self.route_metrics(&route);
        if route.http == HttpMode::Refuse {
            // As the hand-written path answers it: a refused upgrade.
            return self.refuse(Rejection::NotWebSocket, &head, &metrics, false);
        }
        let listed = route.origins.is_some();
        let allowed = route.allows_origin(head.headers.get_all("origin"));
        let allowed_origin = match cors::check(&head, listed, allowed) {
            Cors::Pass => None,
            Cors::Allowed(origin) => Some(origin),
            Cors::Preflight(response) => {
                metrics.http_request(response.status().as_u16());
                return response;
            }
            Cors::Forbidden(origin) => {
                tracing::info!(
                    path = head.path(),
                    origin,
                    "request rejected: origin not allowed"
                );
                metrics.http_request(StatusCode::FORBIDDEN.as_u16());
                return answer(Answer::text(
                    StatusCode::FORBIDDEN,
                    "this origin may not make requests here".into(),
                ));
            }
        };
        let mut response = match self
            .forward(request, &head, &found, snapshot, &metrics, guard)
            .await
        {
            Ok(response) => response,
            Err(rejection) => return self.refuse(rejection, &head, &metrics, true),
        };
        if let Some(origin) = allowed_origin {
            cors::allow(response.headers_mut(), origin);
        }
        metrics.http_request(response.status().as_u16());
        tracing::debug!(
            method = %head.method,
            path = head.path(),
            status = response.status().as_u16(),
            "HTTP request proxied"
        );
        response
    }

    /// Logs a refusal once, counts it, and answers it.
    fn refuse(
        &self,
        rejection: Rejection,
        head: &RequestHead,
        metrics: &RouteMetrics,
        http: bool,
    ) -> Response<ResponseBody> {
        rejection.log(head.path());
        let refused = rejection.into_answer();
        match http {
            true => metrics.http_request(refused.status.as_u16()),
            false => metrics.handshake(refused.status.as_u16()),
        }
        answer(refused)
    }

    /// Runs the route's `on_upgrade` and sends the request upstream.
    async fn forward(
        &self,
        request: Request<Incoming>,
        head: &RequestHead,
        found: &RouteMatch<'_, RouteRuntime>,
        snapshot: &Arc<Snapshot>,
        metrics: &Arc<RouteMetrics>,
        guard: InFlightGuard,
    ) -> Result<Response<ResponseBody>, Rejection> {
        let route = &found.route.route;
        // By its Content-Length, a body over the limit is refused before anything else.
        if request.body().size_hint().lower() > route.max_body_size {
            return Err(Rejection::BodyTooLarge(route.max_body_size));
        }
        // [route.jwt] guards HTTP requests as it guards upgrades: verified before the policy,
        // a refusal never reaches the upstream.
        let query = head.query().unwrap_or("");
        let claims = match &found.route.jwt {
            None => None,
            Some(verifier) => Some(
                verifier
                    .authorize(&head.headers, query, route.handshake_timeout)
                    .await
                    .map_err(Rejection::Jwt)?,
            ),
        };
        let mut changes = self
            .policy(head, found, snapshot, metrics, claims.as_ref())
            .await?;
        let pool = pooled::chosen(&mut changes, snapshot, found.route.pool.as_ref(), route)?;
        let (query, changed_headers) = crate::proxy::forward::strip_token(
            found.route.jwt.as_deref(),
            &head.headers,
            query,
            std::mem::take(&mut changes.headers),
        );
        let extra = headers::UpstreamRequest {
            client_ip: self.peer.ip(),
            client_host: head.host(),
            proto: if self.tls { "https" } else { "http" },
            changes: &changed_headers,
            subprotocol: None,
        };
        let mut fields = headers::upstream_map(request.headers(), &head.headers, &extra);
        // hyper's server has met the client's expectation (100 Continue when the body is
        // first read); the upstream gets the body without one.
        fields.remove(header::EXPECT);
        let (parts, client_body) = request.into_parts();
        let limit = usize::try_from(route.max_body_size).unwrap_or(usize::MAX);
        let mut upstream_request = Request::new(Limited::new(client_body, limit));
        *upstream_request.method_mut() = parts.method;
        *upstream_request.version_mut() = Version::HTTP_11;
        *upstream_request.headers_mut() = fields;

        let mut response = match pool {
            Some(pool) => {
                let target = pooled::target(
                    &pool,
                    &self.shared,
                    head,
                    &found.params,
                    &found.path,
                    &query,
                    self.peer,
                    &changes,
                    route,
                )?;
                self.send_pooled(upstream_request, target, snapshot, route)
                    .await?
            }
            None => {
                let url = crate::proxy::forward::upstream_url(
                    changes.upstream,
                    &route.upstream,
                    &found.params,
                    &query,
                );
                let target = Target::of(&url).map_err(|reason| bad_url(&url, reason))?;
                self.addressed.borrow_mut().address(
                    &mut upstream_request,
                    &url,
                    target.authority,
                    &target.path_and_query,
                )?;
                match self.send(upstream_request, &url, &target, found).await {
                    Ok(response) => response,
                    Err(SendError::Open(OpenError::Timeout(timeout))) => {
                        return Err(Rejection::UpstreamTimeout { url, timeout })
                    }
                    Err(SendError::Open(OpenError::Failed(source))) => {
                        return Err(Rejection::Upstream { url, source })
                    }
                    Err(SendError::Exchange(e)) => return Err(exchange_failed(e, &url, route)),
                }
            }
        };
        headers::http_response(response.headers_mut());
        let (parts, upstream_body) = response.into_parts();
        Ok(Response::from_parts(
            parts,
            body::upstream(upstream_body, guard),
        ))
    }

    /// The route's `on_upgrade`, run for a plain HTTP request: its refusal answers the request,
    /// its header changes and `set_upstream` apply to it.
    async fn policy(
        &self,
        head: &RequestHead,
        found: &RouteMatch<'_, RouteRuntime>,
        snapshot: &Arc<Snapshot>,
        metrics: &Arc<RouteMetrics>,
        claims: Option<&crate::jwt::Claims>,
    ) -> Result<UpgradeChanges, Rejection> {
        let route: &Route = &found.route.route;
        let Some(policy) = self
            .worker
            .policy(snapshot, route)
            .map_err(Rejection::PolicyFailed)?
        else {
            return Ok(UpgradeChanges::default());
        };
        let id = self
            .shared
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let request = UpgradeRequest {
            id,
            method: head.method.as_str(),
            upgrade: false,
            path: &found.path,
            query: head.query().unwrap_or(""),
            headers: &head.headers,
            params: &found.params,
            client_ip: self.peer.ip(),
            scheme: if self.tls { "wss" } else { "ws" },
            host: head.host(),
            metrics: Some(metrics),
            jwt: claims.map(|c| &*c.json),
        };
        match policy.on_upgrade(&request).settled().await {
            UpgradeVerdict::Continue { changes, .. } => Ok(changes),
            UpgradeVerdict::Pending(_) => unreachable!("settled() awaits a pending verdict"),
            UpgradeVerdict::Reject {
                status,
                body,
                headers,
            } => Err(Rejection::Policy(Box::new((status, body, headers)))),
            UpgradeVerdict::Failed(error) => Err(Rejection::PolicyFailed(error)),
        }
    }

    /// Sends `request` through a pool: on the connection's upstream connection while its
    /// endpoint is the one to use (the sticky cookie's, the hash key's, or, with neither,
    /// any endpoint that is up), else on a new connection to an endpoint the pool picks, with
    /// its retries (connecting only: a request that was sent is never sent again). With a
    /// `sticky_cookie`, a response from another endpoint than the cookie named sets it.
    async fn send_pooled(
        &self,
        mut request: Request<super::upstream::RequestBody>,
        target: pooled::Target<'_>,
        snapshot: &Arc<Snapshot>,
        route: &Route,
    ) -> Result<Response<Incoming>, Rejection> {
        let pool = target.pool;
        let state = target.state.clone();
        let wanted = match (target.sticky, &target.key) {
            (Some(id), _) => Some(id.to_owned()),
            (None, Some(key)) if pool.balance == crate::config::pool::Balance::Hash => {
                match state.pick(pool, Some(key.as_bytes()), None, &[]) {
                    crate::upstream::pool::Pick::Endpoint(e) => Some(e.id.clone()),
                    _ => None,
                }
            }
            _ => None,
        };
        let had = target.sticky.map(str::to_owned);
        let path_and_query = target.path_and_query.clone();
        let tls = snapshot.pool_tls(&pool.name);
        let server_name = pool.tls.server_name.as_deref();
        let budget = route.handshake_timeout;
        let cookie = pool.sticky_cookie.clone();
        let reached = |target| {
            let state = state.clone();
            async move {
                let reached = pooled::attempt(target, budget, |url| async move {
                    let t = Target::of(&url).map_err(|reason| UpstreamError::BadUrl {
                        url: url.clone(),
                        reason: reason.to_owned(),
                    })?;
                    UpstreamConn::connect(&url, &t, tls, server_name).await
                })
                .await?;
                Ok::<_, Rejection>((reached.connected.through(state, reached.guard), reached.url))
            }
        };
        let (mut conn, url, reused) = match self.upstream.take() {
            Some(conn) if conn.keeps(&state, wanted.as_deref()) => {
                let url = format!("{}{}", conn.origin(), path_and_query);
                (conn, url, true)
            }
            _ => {
                let (conn, url) = reached(target.clone()).await?;
                (conn, url, false)
            }
        };
        self.addressed.borrow_mut().address(
            &mut request,
            &url,
            conn.authority(),
            &path_and_query,
        )?;
        let response = match conn.send(request).await {
            Ok(response) => response,
            Err((_, Some(unsent))) if reused => {
                // The kept connection closed before taking it: a new one, picked afresh.
                let (fresh, url) = reached(target).await?;
                conn = fresh;
                let mut unsent = unsent;
                self.addressed.borrow_mut().address(
                    &mut unsent,
                    &url,
                    conn.authority(),
                    &path_and_query,
                )?;
                conn.send(unsent)
                    .await
                    .map_err(|(e, _)| exchange_failed(e, &url, route))?
            }
            Err((e, _)) => return Err(exchange_failed(e, &url, route)),
        };
        let mut response = response;
        if let (Some(name), Some(id)) = (&cookie, conn.endpoint_id()) {
            if had.as_deref() != Some(id) {
                if let Ok(value) = HeaderValue::from_str(&pooled::sticky_cookie(name, id)) {
                    response.headers_mut().append(header::SET_COOKIE, value);
                }
            }
        }
        self.upstream.set(Some(conn));
        Ok(response)
    }

    /// Sends `request` on the connection's upstream connection, opening one if there is none
    /// for `target`. A request that a kept-alive connection closed before taking goes once
    /// more, on a new connection.
    async fn send(
        &self,
        request: Request<super::upstream::RequestBody>,
        url: &str,
        target: &Target<'_>,
        found: &RouteMatch<'_, RouteRuntime>,
    ) -> Result<Response<Incoming>, SendError> {
        let runtime = &found.route;
        let timeout = runtime.route.handshake_timeout;
        let open = || UpstreamConn::open(url, target, runtime.tls.as_ref(), timeout);
        let (mut conn, reused) = match self.upstream.take() {
            Some(conn) if conn.serves(target) => (conn, true),
            _ => (open().await.map_err(SendError::Open)?, false),
        };
        let response = match conn.send(request).await {
            Ok(response) => response,
            Err((_, Some(unsent))) if reused => {
                conn = open().await.map_err(SendError::Open)?;
                conn.send(unsent)
                    .await
                    .map_err(|(e, _)| SendError::Exchange(e))?
            }
            Err((e, _)) => return Err(SendError::Exchange(e)),
        };
        self.upstream.set(Some(conn));
        Ok(response)
    }
}

/// Why a request got no response from the upstream.
enum SendError {
    Open(OpenError),
    Exchange(hyper::Error),
}

/// A URL that cannot be requested.
fn bad_url(url: &str, reason: &str) -> Rejection {
    Rejection::Upstream {
        url: url.to_owned(),
        source: UpstreamError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        },
    }
}

/// Where the last request of a connection went: its `Host` value and request target. A
/// connection's requests mostly go to the same host, often to the same target: checking a host
/// and parsing a target again cost about a thousand instructions.
#[derive(Default)]
struct Addressed {
    host: Option<HeaderValue>,
    /// A target in origin form, parsed from exactly its `path_and_query`.
    target: Option<Uri>,
}

impl Addressed {
    /// Points `request` at the upstream: its `Host` and request target.
    fn address<B>(
        &mut self,
        request: &mut Request<B>,
        url: &str,
        authority: &str,
        path_and_query: &str,
    ) -> Result<(), Rejection> {
        let host = match &self.host {
            Some(host) if host.as_bytes() == authority.as_bytes() => host.clone(),
            _ => {
                let host = HeaderValue::from_str(authority)
                    .map_err(|_| bad_url(url, "the host is not a valid header value"))?;
                self.host.insert(host).clone()
            }
        };
        request.headers_mut().insert(header::HOST, host);
        let same = |uri: &Uri| {
            uri.scheme().is_none()
                && uri.path_and_query().map(|pq| pq.as_str()) == Some(path_and_query)
        };
        *request.uri_mut() = match &self.target {
            Some(target) if same(target) => target.clone(),
            _ => {
                let target: Uri = path_and_query
                    .parse()
                    .map_err(|_| bad_url(url, "the path is not a valid request target"))?;
                self.target.insert(target).clone()
            }
        };
        Ok(())
    }
}

/// A request that got no response: its body went over `max_body_size`, or the upstream
/// connection failed.
fn exchange_failed(e: hyper::Error, url: &str, route: &Route) -> Rejection {
    if is_over_limit(&e) {
        return Rejection::BodyTooLarge(route.max_body_size);
    }
    Rejection::Upstream {
        url: url.to_owned(),
        source: UpstreamError::Exchange(std::io::Error::other(e)),
    }
}

/// Whether sending failed because the client's body went over `max_body_size`.
fn is_over_limit(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = source {
        if error.is::<LengthLimitError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// The request head as the gateway's own parser gives it (the same checks, fields and
/// routing as an upgrade), from what hyper parsed.
fn head_of(request: &Request<Incoming>) -> Result<RequestHead, BadRequest> {
    head_of_parts(
        request.method(),
        request.version(),
        request.uri(),
        request.headers(),
    )
}

/// An answer of the gateway's own, as hyper sends it (hyper writes the framing headers).
fn answer(answer: Answer) -> Response<ResponseBody> {
    let mut response = Response::new(body::full(answer.body));
    *response.status_mut() = answer.status;
    for (name, value) in &answer.headers {
        if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    response
}

/// The upgrade path's encoded 101 as a response for hyper to write.
fn switching_protocols(encoded: &[u8]) -> Response<ResponseBody> {
    let mut response = Response::new(body::full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut slots);
    // The gateway encoded it: it parses.
    if parsed.parse(encoded).is_ok() {
        for field in parsed.headers.iter() {
            response
                .headers_mut()
                .field(field.name.as_bytes(), field.value);
        }
    }
    response
}
