//! The TLS handshake of one client connection on a `wss://` listener (`[[server.tls]]`),
//! with the rustls configuration its snapshot holds (src/snapshot/tls.rs: certificates, SNI).
//!
//! The handshake runs in the connection's own task, never in the accept loop. It counts as a
//! pending connection (`server.max_pending_handshakes`), and `server.header_read_timeout`
//! bounds the handshake and the first request head together, from the moment the connection
//! was accepted.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::state::Shared;
use crate::upstream::Io;
use crate::worker::{Pending, WorkerCtx};

/// A TLS connection past its handshake, with what is left of its first request's time.
pub(super) struct Opened {
    pub(super) io: Io,
    /// The connection's place among the pending ones, kept for its first request head.
    pub(super) pending: Pending,
    /// When the first request head must be complete (`header_read_timeout` after accept).
    pub(super) deadline: Instant,
}

/// Runs the TLS handshake of a connection accepted on the TLS listener configured as
/// `configured`, with the current snapshot's certificates. `None`: the connection is over
/// (handshake failed, timed out, shed, or shutdown began); why is logged at debug level.
pub(super) async fn handshake(
    stream: TcpStream,
    configured: SocketAddr,
    shared: &Shared,
    worker: &WorkerCtx,
) -> Option<Opened> {
    let snapshot = shared.snapshot();
    let timeout = snapshot.config.server.header_read_timeout;
    let deadline = Instant::now() + timeout;
    let Some(config) = snapshot.tls_config(configured) else {
        // The listener was removed by a reload just as this connection came in.
        tracing::debug!("TLS listener no longer configured; connection dropped");
        return None;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
    drop(snapshot);
    let pending = worker.pool.pending.enter();
    let result = tokio::select! {
        biased;
        accepted = acceptor.accept(stream) => accepted,
        _ = tokio::time::sleep_until(deadline) => {
            tracing::debug!(timeout = ?timeout, "TLS handshake not complete within server.header_read_timeout");
            return None;
        }
        _ = pending.shed.cancelled() => {
            tracing::debug!("pending TLS handshake shed: max_pending_handshakes reached");
            return None;
        }
        _ = shared.shutdown.cancelled() => return None,
    };
    match result {
        Ok(tls) => Some(Opened {
            io: Io::TlsServer(Box::new(tls)),
            pending,
            deadline,
        }),
        Err(e) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
    }
}

/// Offers `bytes` (a last answer) on a TLS connection without waiting: what the socket takes
/// now, followed by the TLS close alert.
pub(super) fn offer(tls: &mut tokio_rustls::server::TlsStream<TcpStream>, bytes: &[u8]) {
    use std::io::Write;
    let (tcp, connection) = tls.get_mut();
    let _ = connection.writer().write_all(bytes);
    connection.send_close_notify();
    let mut socket = NonBlocking(tcp);
    while connection.wants_write() {
        match connection.write_tls(&mut socket) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// A TCP stream as a `std::io::Write` that never blocks (`WouldBlock` instead).
struct NonBlocking<'a>(&'a TcpStream);

impl std::io::Write for NonBlocking<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
