//! Serving client connections: the admission limits and, per client on its worker, the
//! HTTP/1.1 requests up to the upgrade. Accepting is the worker's (`worker/accept.rs`).
//!
//! A connection's life, as far as the limits go:
//! 1. Accepted at once (accepting never pauses), it is *pending* ([`PendingSet`]): sending
//!    its head, idle between kept-alive requests, or queued for a slot. Pending connections
//!    are bounded by `server.max_pending_handshakes`, oldest shed first, and hold no slot.
//! 2. With a complete head it takes one of `server.max_connections` slots, waiting at most
//!    `server.queue_timeout` (then 503 with `Retry-After`), and keeps it while the request is
//!    served and, once upgraded, for the whole relay.
//! 3. A refused request on a kept-alive connection gives its slot back and is pending again,
//!    for at most `server.keepalive_timeout` and `server.keepalive_requests`.
//!
//! Shutdown cuts every pending connection and every upgrade still waiting for its upstream
//! (503); only relays get the graceful close.
//!
//! On a `[[server.tls]]` listener the TLS handshake comes first, in the connection's own task
//! (`listener/tls.rs`): it is pending from accept on, and `server.header_read_timeout` bounds
//! the handshake and the first request head together. A shed TLS connection is dropped during
//! its handshake, and offered its 503 inside TLS after it.

mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::client_http::{self, Answer, ReadError};
use crate::proxy::{self, Accepted, Handled, Shared};
use crate::upstream::Io;
use crate::worker::{ListenKind, Pending, Slot, WorkerCtx};
use tracing::Instrument;

/// `Retry-After` of a 503 at the connection cap: a WebSocket slot frees when a long-lived
/// connection ends, so an immediate retry would mostly be refused again.
const RETRY_AFTER_SECS: &str = "5";

/// [`serve`] as the workers take it ([`crate::worker::ServeFn`]), with the connection's
/// tracing span: the lines logged for the connection carry its client and, once routed, its
/// id, route and snapshot. The HTTP phase runs inside the span; the relay is not polled inside
/// it (see `proxy::Accepted`), and enters it where it logs.
pub(crate) fn serve_boxed(
    stream: TcpStream,
    peer: SocketAddr,
    kind: ListenKind,
    shared: Arc<Shared>,
    worker: Rc<WorkerCtx>,
    slot: Slot,
) -> Pin<Box<dyn Future<Output = ()>>> {
    let span = tracing::info_span!(
        "conn",
        conn = tracing::field::Empty,
        client = %peer,
        route = tracing::field::Empty,
        snapshot = tracing::field::Empty,
    );
    Box::pin(serve(stream, peer, kind, shared, worker, slot, span))
}

/// Serves one client connection on the current worker: on a TLS listener its handshake, then
/// its HTTP requests until one is upgraded, then the relay.
async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    kind: ListenKind,
    shared: Arc<Shared>,
    worker: Rc<WorkerCtx>,
    slot: Slot,
    span: tracing::Span,
) {
    // Held until the connection is gone, relay included.
    let _slot = slot;
    let (mut io, first) = match kind {
        ListenKind::Plain => (Io::Tcp(stream), None),
        ListenKind::Tls(configured) => {
            // Boxed for the same reason as the requests below.
            let handshake = tls::handshake(stream, configured, &shared, &worker);
            match Box::pin(handshake.instrument(span.clone())).await {
                Some(opened) => (opened.io, Some((opened.pending, opened.deadline))),
                None => return,
            }
        }
    };
    // Boxed: the HTTP phase's futures (reading, `on_upgrade`, the TCP and TLS connects) are
    // large and short-lived. Inline, they would size the task of every relayed connection for
    // its whole life; boxed, they are freed when the relay starts.
    let tls = matches!(io, Io::TlsServer(_));
    let next =
        Box::pin(requests(&mut io, peer, first, &shared, &worker).instrument(span.clone())).await;
    match next {
        Some(Next::Relay(accepted, rest, _permit)) => Accepted::run(accepted, io, rest).await,
        // HTTP mode keeps its slot for the rest of the connection, relay included.
        Some(Next::Http(read, _permit)) => {
            let http = proxy::http::serve(io, read, peer, tls, shared, worker).instrument(span);
            if let Some((accepted, io, rest)) = Box::pin(http).await {
                Accepted::run(accepted, io, rest).await;
            }
        }
        None => {}
    }
}

/// What becomes of a connection after its HTTP requests on the hand-written path.
enum Next {
    /// An upgrade, with the bytes the client sent after its head, and its slot.
    Relay(Box<Accepted>, Bytes, OwnedSemaphorePermit),
    /// A request for HTTP mode (`route.http = "proxy"`): the bytes read (its head included),
    /// and its slot.
    Http(Bytes, OwnedSemaphorePermit),
}

/// Why a request got no `max_connections` slot.
enum NoSlot {
    /// `queue_timeout` passed.
    Full,
    /// Shed, to admit a newer connection.
    Shed,
    /// Shutdown began.
    Shutdown,
}

/// Reads and answers requests until one is upgraded or goes to HTTP mode: returns it, with
/// the connection's slot, or `None` once the connection is to be closed. Refused requests are
/// answered and, where HTTP/1.1 keep-alive and the keep-alive limits allow, the next request
/// is read. `first`: the connection is pending already (a TLS handshake), and its first head
/// must be complete by this deadline.
async fn requests(
    stream: &mut Io,
    peer: SocketAddr,
    mut first: Option<(Pending, tokio::time::Instant)>,
    shared: &Arc<Shared>,
    worker: &WorkerCtx,
) -> Option<Next> {
    let tls = matches!(stream, Io::TlsServer(_));
    let mut buf = BytesMut::new();
    let mut served = 0usize;
    loop {
        // The HTTP phase's settings come from the current snapshot at each request.
        let snapshot = shared.snapshot();
        let server = &snapshot.config.server;
        let timeout = server.header_read_timeout;
        let (pending, head_timeout) = match first.take() {
            Some((pending, deadline)) => (
                pending,
                deadline.saturating_duration_since(tokio::time::Instant::now()),
            ),
            None => (worker.pool.pending.enter(), timeout),
        };
        let idle = (served > 0).then_some(server.keepalive_timeout).flatten();
        let cut = async {
            tokio::select! {
                _ = shared.shutdown.cancelled() => {}
                _ = pending.shed.cancelled() => {}
            }
        };
        let read = client_http::read_request(stream, &mut buf, idle, head_timeout, cut).await;
        let (request, rest) = match read {
            Ok(Some(read)) => read,
            Ok(None) => return None,
            Err(ReadError::Bad(bad)) => {
                tracing::info!(error = %bad, "request rejected");
                let answer = Answer::text(bad.status(), bad.to_string());
                worker.metrics.unmatched().handshake(answer.status.as_u16());
                finish(stream, &answer.encode(true, false), true, timeout).await;
                return None;
            }
            Err(ReadError::Cut(_)) if pending.shed.is_cancelled() => {
                tracing::debug!("pending connection shed: max_pending_handshakes reached");
                shed(stream);
                return None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
                return None;
            }
        };
        let permit = match slot(shared, server.queue_timeout, worker, &pending).await {
            Ok(permit) => permit,
            Err(why) => {
                let answer = match why {
                    NoSlot::Full => {
                        worker.pool.refusals.count(worker.pool.max_connections);
                        unavailable("the gateway is at its connection limit; retry later", true)
                    }
                    NoSlot::Shed => {
                        tracing::debug!("pending connection shed: max_pending_handshakes reached");
                        shed(stream);
                        return None;
                    }
                    NoSlot::Shutdown => unavailable("server shutting down", false),
                };
                worker.metrics.unmatched().handshake(answer.status.as_u16());
                let bytes = answer.encode(true, request.method == Method::HEAD);
                finish(
                    stream,
                    &bytes,
                    request.has_body || !rest.is_empty(),
                    timeout,
                )
                .await;
                return None;
            }
        };
        drop(pending);
        if proxy::http::wants(&request, &snapshot) {
            return Some(Next::Http(
                proxy::http::already_read(&request, &rest),
                permit,
            ));
        }
        served += 1;
        // An upgrade waiting for its upstream does not hold shutdown up: it is answered 503.
        let handled = tokio::select! {
            biased;
            handled = proxy::handle(&request, peer, tls, shared, worker) => handled,
            _ = shared.shutdown.cancelled() => {
                tracing::info!(path = request.path(), "request cut short by shutdown");
                worker.metrics.unmatched().handshake(503);
                Handled::Answered(unavailable("server shutting down", false))
            }
        };
        let answer = match handled {
            Handled::Upgraded(accepted) => return Some(Next::Relay(accepted, rest, permit)),
            Handled::Answered(answer) => answer,
        };
        let keep_alive = request.keep_alive()
            && !shared.shutdown.is_cancelled()
            && server.keepalive_timeout.is_some()
            && served < server.keepalive_requests;
        let bytes = answer.encode(!keep_alive, request.method == Method::HEAD);
        if !keep_alive {
            finish(
                stream,
                &bytes,
                request.has_body || !rest.is_empty(),
                timeout,
            )
            .await;
            return None;
        }
        // A client that does not read its answers must not hold its connection (and its
        // slot) forever: writing an answer has the header read timeout too.
        let written = tokio::time::timeout(timeout, async {
            stream.write_all(&bytes).await?;
            // A no-op on TCP; TLS may hold its last record until flushed.
            stream.flush().await
        });
        if !matches!(written.await, Ok(Ok(()))) {
            tracing::debug!("HTTP connection ended: the answer could not be written in time");
            return None;
        }
        drop(permit);
        // Bytes of a pipelined next request.
        buf.extend_from_slice(&rest);
    }
}

/// Takes a `max_connections` slot for a request whose head has arrived, waiting up to
/// `queue_timeout` in arrival order. While it waits the connection is still pending: it can
/// be shed, and shutdown ends the wait.
async fn slot(
    shared: &Shared,
    queue_timeout: Duration,
    worker: &WorkerCtx,
    pending: &Pending,
) -> Result<OwnedSemaphorePermit, NoSlot> {
    let permits = &worker.pool.permits;
    if let Ok(permit) = permits.clone().try_acquire_owned() {
        return Ok(permit);
    }
    tokio::select! {
        permit = tokio::time::timeout(queue_timeout, permits.clone().acquire_owned()) => match permit {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(NoSlot::Full),
        },
        _ = pending.shed.cancelled() => Err(NoSlot::Shed),
        _ = shared.shutdown.cancelled() => Err(NoSlot::Shutdown),
    }
}

/// A 503 that closes the connection; at the cap it says when to retry.
fn unavailable(message: &str, retry: bool) -> Answer {
    let mut answer = Answer::text(StatusCode::SERVICE_UNAVAILABLE, message.into());
    if retry {
        answer.headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECS),
        );
    }
    answer
}

/// Ends a shed connection without waiting on it: the 503 is offered once, without blocking
/// and without lingering, since shedding happens when slow clients are too many already.
fn shed(stream: &mut Io) {
    let answer = unavailable("too many pending connections; retry later", true);
    let bytes = answer.encode(true, false);
    match stream {
        Io::Tcp(tcp) => {
            let _ = tcp.try_write(&bytes);
        }
        Io::TlsServer(tls) => tls::offer(tls, &bytes),
        Io::Tls(_) => {}
    }
}

/// How long a closing connection's unread input is drained (see [`finish`]).
const LINGER: Duration = Duration::from_secs(1);

/// Writes a last answer (within `timeout`) and closes. If the client may still be sending (a
/// body, pipelined requests), its input is read and dropped for up to [`LINGER`] first: closing
/// a socket with unread input resets the connection, and the client could lose the answer.
async fn finish(stream: &mut Io, answer: &[u8], linger: bool, timeout: Duration) {
    let written = tokio::time::timeout(timeout, async {
        stream.write_all(answer).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    if linger {
        let drain = async {
            // On the heap, and only here: as an array it would make every connection's HTTP
            // phase 4 KiB larger.
            let mut sink = vec![0u8; 4096];
            let mut left = client_http::MAX_HEAD;
            while let Ok(n @ 1..) = stream.read(&mut sink).await {
                left = left.saturating_sub(n);
                if left == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
}
