//! Accepting and serving client connections: the accept loop (connection cap, hand-off to a
//! worker) and one hyper HTTP/1.1 connection per client on its worker, with graceful shutdown.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::proxy::{self, Shared};
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

/// Serves one client connection on the current worker.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    worker: Rc<WorkerCtx>,
    slot: Rc<Slot>,
) {
    let header_read_timeout = shared.config.server.header_read_timeout;
    let shutdown = shared.shutdown.clone();
    let service = service_fn(move |request| {
        proxy::handle(request, peer, shared.clone(), worker.clone(), slot.clone())
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(client = %peer, error = %e, "HTTP connection ended with an error");
    }
}
