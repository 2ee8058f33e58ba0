//! Accepting and serving client connections: the accept loop (connection cap, hand-off to a
//! worker) and, per client on its worker, the HTTP/1.1 requests up to the upgrade.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::client_http::{self, Answer, ReadError};
use crate::proxy::{self, Accepted, Handled, Shared};
use crate::worker::{self, Slot, WorkerCtx, WorkerLink};

/// Accepts connections until shutdown. Each connection holds a permit of `permits` for its
/// whole life, relay included; at the cap, accepting pauses (clients wait in the backlog).
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    here: Rc<WorkerCtx>,
    links: Arc<Vec<WorkerLink>>,
    permits: Arc<Semaphore>,
) {
    let shutdown = shared.shutdown.clone();
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the connection semaphore is never closed"),
            _ = shutdown.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning; the permit is released.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        if let Some((stream, slot)) = worker::place(&links, stream, peer, permit) {
            let task = serve(stream, peer, shared.clone(), here.clone(), slot);
            shared.tracker.spawn_local(task);
        }
    }
}

/// Serves one client connection on the current worker: its HTTP requests until one is
/// upgraded, then the relay.
pub(crate) async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    worker: Rc<WorkerCtx>,
    slot: Rc<Slot>,
) {
    // Held until the connection is gone, relay included.
    let _slot = slot;
    // Boxed: the HTTP phase's futures (reading, `on_upgrade`, the TCP and TLS connects) are
    // large and short-lived. Inline, they would size the task of every relayed connection for
    // its whole life; boxed, they are freed when the relay starts.
    let upgraded = Box::pin(requests(&mut stream, peer, &shared, &worker)).await;
    if let Some((accepted, rest)) = upgraded {
        Accepted::run(accepted, stream, rest).await;
    }
}

/// Reads and answers requests until one is upgraded: returns it, with the bytes the client
/// sent after its head, or `None` once the connection is to be closed. Refused requests are
/// answered and, where HTTP/1.1 keep-alive allows, the next request is read.
async fn requests(
    stream: &mut TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    worker: &WorkerCtx,
) -> Option<(Box<Accepted>, Bytes)> {
    let timeout = shared.config.server.header_read_timeout;
    let mut buf = BytesMut::new();
    loop {
        let read = client_http::read_request(stream, &mut buf, timeout, &shared.shutdown).await;
        let (request, rest) = match read {
            Ok(Some(read)) => read,
            Ok(None) => return None,
            Err(ReadError::Bad(bad)) => {
                tracing::info!(client = %peer, error = %bad, "request rejected");
                let answer = Answer::text(bad.status(), bad.to_string());
                finish(stream, &answer.encode(true, false), true, timeout).await;
                return None;
            }
            Err(e) => {
                tracing::debug!(client = %peer, error = %e, "HTTP connection ended with an error");
                return None;
            }
        };
        let answer = match proxy::handle(&request, peer, shared, worker).await {
            Handled::Upgraded(accepted) => return Some((accepted, rest)),
            Handled::Answered(answer) => answer,
        };
        let keep_alive = request.keep_alive() && !shared.shutdown.is_cancelled();
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
        // permit) forever: writing an answer has the header read timeout too.
        if !matches!(
            tokio::time::timeout(timeout, stream.write_all(&bytes)).await,
            Ok(Ok(()))
        ) {
            tracing::debug!(client = %peer, "HTTP connection ended: the answer could not be written in time");
            return None;
        }
        // Bytes of a pipelined next request.
        buf.extend_from_slice(&rest);
    }
}

/// How long a closing connection's unread input is drained (see [`finish`]).
const LINGER: Duration = Duration::from_secs(1);

/// Writes a last answer (within `timeout`) and closes. If the client may still be sending (a
/// body, pipelined requests), its input is read and dropped for up to [`LINGER`] first: closing
/// a socket with unread input resets the connection, and the client could lose the answer.
async fn finish(stream: &mut TcpStream, answer: &[u8], linger: bool, timeout: Duration) {
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
