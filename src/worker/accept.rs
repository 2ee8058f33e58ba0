//! Each worker's accept loop on each listening socket: accepting never pauses (the admission
//! limits apply once a connection is in, see `listener`), and each accepted connection is
//! placed on a worker.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{place, ServeFn, Serves, WorkerCtx};
use crate::state::Shared;

/// A listening socket made ready for this worker's runtime.
pub(super) fn listener(listener: std::net::TcpListener) -> std::io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Accepts connections until shutdown, or until `until` is cancelled (a reload removed the
/// address: connections already accepted stay), and places each on a worker.
pub(super) async fn accept_loop(
    listener: TcpListener,
    serves: Serves,
    shared: Arc<Shared>,
    here: Rc<WorkerCtx>,
    until: CancellationToken,
    serve: ServeFn,
) {
    let shutdown = shared.shutdown.clone();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
            _ = until.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        // A TLS handshake is the connection's own task's (see `listener`), never this loop's.
        place(&here, &shared, (stream, peer, serves.kind()), serve);
    }
}

/// Listen backlog: room for connection bursts while the accept loop catches up (the kernel caps
/// it at net.core.somaxconn).
const BACKLOG: u32 = 1024;

/// Binds a listening socket for `addr`, for every worker to accept on.
pub(crate) fn bind(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)?.into_std()
}
