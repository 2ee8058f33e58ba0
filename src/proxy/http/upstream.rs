//! The upstream side of HTTP mode: one hyper HTTP/1.1 client connection per client
//! connection, opened with the gateway's own upstream connect (TCP, or TLS with the route's
//! settings) when the first request needs it and reused while both sides keep alive, as NGINX
//! does without an upstream keepalive pool. One connection, used one request at a time, keeps
//! pipelined requests in order.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

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
}

impl UpstreamConn {
    /// Whether this connection goes where `target` does and can take a request.
    pub(crate) fn serves(&self, target: &Target<'_>) -> bool {
        self.secure == target.secure
            && self.authority.eq_ignore_ascii_case(target.authority)
            && !self.sender.is_closed()
    }

    /// Opens a connection to `target`, within `timeout` (the route's `handshake_timeout`).
    pub(crate) async fn open(
        url: &str,
        target: &Target<'_>,
        tls: Option<&Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> Result<UpstreamConn, OpenError> {
        let opening = async {
            let io = upstream::open(url, target.secure, target.host, target.port, tls).await?;
            http1::Builder::new()
                .handshake::<_, RequestBody>(TokioIo::new(io))
                .await
                .map_err(|e| UpstreamError::Exchange(std::io::Error::other(e)))
        };
        let (sender, connection) = match tokio::time::timeout(timeout, opening).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => return Err(OpenError::Failed(e)),
            Err(_) => return Err(OpenError::Timeout(timeout)),
        };
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
        })
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
