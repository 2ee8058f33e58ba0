//! The upstream side of HTTP mode: one hyper HTTP/1.1 client connection per client
//! connection, opened with the gateway's own upstream connect (TCP, or TLS with the route's
//! settings) when the first request needs it and reused while both sides keep alive, as NGINX
//! does without an upstream keepalive pool. One connection, used one request at a time, keeps
//! pipelined requests in order. Through an `[[upstream]]` pool, the connection holds its
//! endpoint (counted as open there) and is kept for the next request while that endpoint is
//! the one to use (see [`UpstreamConn::keeps`]).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::upstream::pool::{EndpointGuard, PoolState};
use crate::upstream::{self, Target, UpstreamError};

/// The request body sent upstream: the client's, streamed, within `max_body_size`.
pub(crate) type RequestBody = Limited<Incoming>;

/// Why no upstream connection could be had.
pub(crate) enum OpenError {
    Failed(UpstreamError),
    Timeout(Duration),
}

/// An open upstream connection and where it goes.
pub(crate) struct UpstreamConn {
    /// `https` and the authority: a request for another upstream (a placeholder, or a
    /// policy's `set_upstream`) gets a connection of its own, replacing this one.
    secure: bool,
    authority: String,
    sender: SendRequest<RequestBody>,
    /// Through a pool: the pool and the endpoint, counted open while this lives.
    endpoint: Option<(Arc<PoolState>, EndpointGuard)>,
}

impl UpstreamConn {
    /// Whether this connection goes where `target` does and can take a request.
    pub(crate) fn serves(&self, target: &Target<'_>) -> bool {
        self.secure == target.secure
            && self.authority.eq_ignore_ascii_case(target.authority)
            && !self.sender.is_closed()
    }

    /// Through a pool: whether this connection may take the next request, whose pick would
    /// be `wanted` (`None`: any endpoint of the pool will do): its endpoint is still of
    /// `pool`, up and not draining.
    pub(crate) fn keeps(&self, pool: &Arc<PoolState>, wanted: Option<&str>) -> bool {
        let Some((state, guard)) = &self.endpoint else {
            return false;
        };
        let endpoint = guard.endpoint();
        Arc::ptr_eq(state, pool)
            && endpoint.is_up()
            && !endpoint.is_draining()
            && wanted.is_none_or(|id| id == endpoint.id)
            && !self.sender.is_closed()
    }

    /// Host and port, for `Host`.
    pub(crate) fn authority(&self) -> &str {
        &self.authority
    }

    /// `ws://` or `wss://` and the authority (the upstream's URL without a path).
    pub(crate) fn origin(&self) -> String {
        let scheme = if self.secure { "wss" } else { "ws" };
        format!("{scheme}://{}", self.authority)
    }

    /// The endpoint's opaque id, through a pool.
    pub(crate) fn endpoint_id(&self) -> Option<&str> {
        self.endpoint
            .as_ref()
            .map(|(_, g)| g.endpoint().id.as_str())
    }

    /// Opens a connection to `target`, within `timeout` (the route's `handshake_timeout`).
    pub(crate) async fn open(
        url: &str,
        target: &Target<'_>,
        tls: Option<&Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> Result<UpstreamConn, OpenError> {
        match tokio::time::timeout(timeout, Self::connect(url, target, tls, None)).await {
            Ok(Ok(opened)) => Ok(opened),
            Ok(Err(e)) => Err(OpenError::Failed(e)),
            Err(_) => Err(OpenError::Timeout(timeout)),
        }
    }

    /// Connects to `target` (the caller bounds it), with TLS checked for `server_name` when
    /// given (a pool's `[upstream.tls] server_name`).
    pub(crate) async fn connect(
        url: &str,
        target: &Target<'_>,
        tls: Option<&Arc<rustls::ClientConfig>>,
        server_name: Option<&str>,
    ) -> Result<UpstreamConn, UpstreamError> {
        let io = upstream::open(
            url,
            target.secure,
            target.host,
            target.port,
            tls,
            server_name,
        )
        .await?;
        // As the client side's server: one buffer per write (see `http::serve`).
        let (sender, connection) = http1::Builder::new()
            .writev(false)
            .handshake::<_, RequestBody>(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Exchange(std::io::Error::other(e)))?;
        // The connection's I/O runs beside the client's; it ends when `sender` is dropped
        // (with the client connection, or when replaced) or the upstream closes.
        tokio::task::spawn_local(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream HTTP connection ended with an error");
            }
        });
        Ok(UpstreamConn {
            secure: target.secure,
            authority: target.authority.to_owned(),
            sender,
            endpoint: None,
        })
    }

    /// Marks the connection as going to a pool's endpoint.
    pub(crate) fn through(mut self, pool: Arc<PoolState>, guard: EndpointGuard) -> UpstreamConn {
        self.endpoint = Some((pool, guard));
        self
    }

    /// Sends `request` once the connection is ready. On failure, the request comes back with
    /// the error if it was not sent at all (the connection was closed meanwhile), so that it
    /// can go on a new connection.
    pub(crate) async fn send(
        &mut self,
        request: http::Request<RequestBody>,
    ) -> Result<http::Response<Incoming>, (hyper::Error, Option<http::Request<RequestBody>>)> {
        if let Err(e) = self.sender.ready().await {
            return Err((e, Some(request)));
        }
        self.sender
            .try_send_request(request)
            .await
            .map_err(|mut e| {
                let unsent = e.take_message();
                (e.into_error(), unsent)
            })
    }
}
