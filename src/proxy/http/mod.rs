//! HTTP mode: plain HTTP requests on routes with `http = "proxy"` (SignalR's negotiate and
//! its long polling and server-sent events, Socket.IO's polling), proxied to the route's
//! upstream with hyper on both sides. See docs/lifecycle.md ("HTTP on WebSocket routes").
//!
//! The hand-written path (the listener reading heads, `proxy::upgrade`) stays the way in for
//! every connection. When the request it has read is not an upgrade and its route proxies
//! HTTP, the connection moves to hyper for the rest of its life: hyper's HTTP/1.1 server gets
//! the client's stream with the bytes already read put back in front ([`Rewind`]), and each
//! request goes through [`service`]. A later request on that connection that asks for a
//! WebSocket is upgraded by hyper's upgrade mechanism: the gateway's upgrade path runs as
//! usual, hyper writes its 101, and the stream comes back out of hyper to the relay.
//!
//! Owns the connection's HTTP-mode life (keep-alive, timeouts, shutdown); not the relay, not
//! the policies (reached through [`crate::policy::RoutePolicy`] only).

mod body;
mod cors;
mod rewind;
mod service;
mod upstream;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::{Abandoned, Accepted, Shared};
use crate::client_http::RequestHead;
use crate::config::HttpMode;
use crate::snapshot::Snapshot;
use crate::worker::WorkerCtx;

pub(crate) use rewind::Rewind;

/// When the client's side was last busy, for the keep-alive timeout, and whether a write to
/// the client is stuck. Atomics only because hyper's upgrade mechanism wants the stream
/// `Send`; one task uses it.
#[derive(Debug)]
pub(crate) struct Activity {
    /// Requests whose responses have not ended yet.
    in_flight: AtomicUsize,
    /// Since `start`: the last read from the client, or the end of the last response.
    last: AtomicU64,
    /// Since `start`: when the connection last had no request in flight (the end of the last
    /// response, or `start`), from when the next request head is waited for.
    free_since: AtomicU64,
    /// Since `start`: when a write to the client began to wait for room ([`NOT_WAITING`]:
    /// none is waiting).
    write_waiting: AtomicU64,
    start: Instant,
}

/// `Activity::write_waiting` when no write waits.
const NOT_WAITING: u64 = u64::MAX;

impl Default for Activity {
    fn default() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            free_since: AtomicU64::new(0),
            write_waiting: AtomicU64::new(NOT_WAITING),
            start: Instant::now(),
        }
    }
}

impl Activity {
    fn since_start(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(NOT_WAITING - 1)
    }

    fn touch(&self) {
        self.last.store(self.since_start(), Relaxed);
    }

    /// A response has ended: the connection is busy then, and free if no other is going.
    fn response_ended(&self) {
        let now = self.since_start();
        self.last.store(now, Relaxed);
        if self.in_flight.fetch_sub(1, Relaxed) == 1 {
            self.free_since.store(now, Relaxed);
        }
    }

    /// A write to the client found no room.
    fn write_waits(&self) {
        if self.write_waiting.load(Relaxed) == NOT_WAITING {
            self.write_waiting.store(self.since_start(), Relaxed);
        }
    }

    /// A write to the client went through.
    fn write_moved(&self) {
        self.write_waiting.store(NOT_WAITING, Relaxed);
    }

    /// When the connection counts as idle for `keepalive`: `None` while a response is going.
    fn idle_at(&self, keepalive: Duration) -> Option<Instant> {
        (self.in_flight.load(Relaxed) == 0)
            .then(|| self.start + Duration::from_nanos(self.last.load(Relaxed)) + keepalive)
    }

    /// When the next request head, waited for since the connection became free, is late by
    /// `limit`: `None` while a request is in flight.
    fn head_late_at(&self, limit: Duration) -> Option<Instant> {
        (self.in_flight.load(Relaxed) == 0)
            .then(|| self.start + Duration::from_nanos(self.free_since.load(Relaxed)) + limit)
    }

    /// When a write that has waited since then has waited `limit`: `None` when none waits.
    fn stalled_at(&self, limit: Duration) -> Option<Instant> {
        let since = self.write_waiting.load(Relaxed);
        (since != NOT_WAITING).then(|| self.start + Duration::from_nanos(since) + limit)
    }
}

/// Whether the request the listener has read goes to HTTP mode: not a WebSocket upgrade, and
/// routed to a route with `http = "proxy"`. Everything else (upgrades, refusals, 404) takes
/// the hand-written path, exactly as on routes that refuse HTTP.
pub(crate) fn wants(request: &RequestHead, snapshot: &Snapshot) -> bool {
    if request.wants_websocket() {
        return false;
    }
    matches!(
        snapshot.router().find(request.host(), request.path()),
        Ok(found) if found.route.route.http == HttpMode::Proxy
    )
}

/// The bytes the listener has read of a connection: `request`'s head and `rest`, what came
/// after it. hyper reads them first.
pub(crate) fn already_read(request: &RequestHead, rest: &[u8]) -> Bytes {
    let head = request.raw();
    let mut read = BytesMut::with_capacity(head.len() + rest.len());
    read.extend_from_slice(&head);
    read.extend_from_slice(rest);
    read.freeze()
}

/// A WebSocket upgrade asked for on a connection in HTTP mode, once hyper has written its 101:
/// the upgrade to relay, the client's stream, and the bytes read past the request.
pub(crate) type Upgrade<S> = (Box<Accepted>, S, Bytes);

/// Serves a client connection in HTTP mode, from its first request (`read`: the bytes already
/// read, the head included) until it closes, or until a request on it is upgraded, which is
/// returned for the relay.
pub(crate) async fn serve<S>(
    stream: S,
    read: Bytes,
    peer: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    worker: Rc<WorkerCtx>,
) -> Option<Upgrade<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let snapshot = shared.snapshot();
    let server = &snapshot.config.server;
    let activity = Arc::new(Activity::default());
    let io = TokioIo::new(Rewind::new(read, stream, activity.clone()));
    let conn = Rc::new(service::Conn::new(
        peer,
        tls,
        shared.clone(),
        worker,
        activity.clone(),
    ));
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |request| {
            let conn = conn.clone();
            async move { Ok::<_, std::convert::Infallible>(conn.handle(request).await) }
        })
    };
    let keepalive = server.keepalive_timeout;
    let close_timeout = server.close_timeout;
    // A client that does not read what it is sent must not hold its connection (and the
    // upstream's) forever: a write that cannot go on for this long ends the connection, as
    // writing an answer on the hand-written path is bounded.
    let write_timeout = server.header_read_timeout;
    // The next request head must have come this long after the last response ended: the
    // idle wait and the head together (the idle wait alone is bounded below). Kept here
    // rather than by hyper's `header_read_timeout`, which makes, registers and drops a timer
    // for every request; this loop looks at it only when it wakes for its own timer.
    let header_timeout = server.header_read_timeout + keepalive.unwrap_or_default();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(keepalive.is_some())
        .header_read_timeout(None)
        // One buffer per write (a small body is copied behind its head) rather than a
        // vectored write of the head and each body chunk: fewer instructions per response.
        .writev(false)
        .max_buf_size(crate::client_http::MAX_HEAD.max(8192));
    drop(snapshot);
    let connection = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(connection);
    let mut stopping = false;
    let ended = loop {
        // While a response is going, looked at again after `keepalive_timeout`.
        let idle_at = keepalive.map(|k| activity.idle_at(k).unwrap_or(Instant::now() + k));
        // A write that starts waiting is seen within two `write_timeout`s.
        let stalled_at = activity
            .stalled_at(write_timeout)
            .unwrap_or(Instant::now() + write_timeout);
        let wake = match idle_at.filter(|_| !stopping) {
            Some(idle_at) => idle_at.min(stalled_at),
            None => stalled_at,
        };
        let wake = activity
            .head_late_at(header_timeout)
            .map_or(wake, |late| late.min(wake));
        tokio::select! {
            ended = connection.as_mut() => break ended,
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                // Looked at again: a read, a write or a response may have come meanwhile.
                if activity.stalled_at(write_timeout).is_some_and(|at| at <= now) {
                    tracing::debug!("HTTP connection ended: the client read nothing for header_read_timeout");
                    return None;
                }
                if activity.head_late_at(header_timeout).is_some_and(|at| at <= now) {
                    tracing::debug!("HTTP connection ended: no request head within header_read_timeout");
                    return None;
                }
                let idle = keepalive.and_then(|k| activity.idle_at(k));
                if !stopping && idle.is_some_and(|at| at <= now) {
                    tracing::debug!("HTTP connection idle for keepalive_timeout; closing");
                    stopping = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
            () = shared.shutdown.cancelled(), if !stopping => {
                connection.as_mut().graceful_shutdown();
                // A response still going (a long poll) gets `close_timeout` to end.
                let _ = tokio::time::timeout(close_timeout, connection.as_mut()).await;
                if let Some((_, accepted)) = conn.take_upgrade() {
                    accepted.abandon(Abandoned::shutdown()).await;
                }
                return None;
            }
        }
    };
    // What `on_upgrade` took, `on_close` gives back, whatever became of the 101.
    let (on_upgrade, accepted) = conn.take_upgrade()?;
    if let Err(e) = ended {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
        accepted
            .abandon(Abandoned::client_left(format!(
                "client left during the upgrade: {e}"
            )))
            .await;
        return None;
    }
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            accepted
                .abandon(Abandoned::client_left(format!(
                    "client left during the upgrade: {e}"
                )))
                .await;
            return None;
        }
    };
    let parts = match upgraded.downcast::<TokioIo<Rewind<S>>>() {
        Ok(parts) => parts,
        Err(_) => {
            accepted
                .abandon(Abandoned::gateway(
                    "the upgraded stream is not the client's".into(),
                ))
                .await;
            return None;
        }
    };
    let (stream, unread) = parts.io.into_inner().into_parts();
    let rest = match (unread.is_empty(), parts.read_buf.is_empty()) {
        (true, _) => parts.read_buf,
        (false, true) => unread,
        (false, false) => [unread, parts.read_buf].concat().into(),
    };
    Some((accepted, stream, rest))
}
