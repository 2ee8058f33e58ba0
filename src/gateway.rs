//! A gateway as a value: build it from a [`Config`], start it on its listen addresses, and shut
//! it down gracefully. `main` and the integration tests both drive it through this API.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::proxy::Shared;
use crate::{listener, upstream};

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address from `server.listen`.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A route's TLS settings could not be loaded.
    #[error("route {route}: {message}")]
    Tls {
        /// The route's name.
        route: String,
        /// What went wrong.
        message: String,
    },
}

/// A validated gateway, ready to start.
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// Prepares everything that can fail before listening: routing and TLS settings.
    pub fn new(config: Config) -> Result<Gateway, StartError> {
        let tls = config
            .routes
            .iter()
            .map(|route| {
                let needs_tls = route.upstream.as_str().starts_with("wss://");
                needs_tls
                    .then(|| upstream::client_config(&route.upstream_tls))
                    .transpose()
                    .map_err(|message| StartError::Tls {
                        route: route.name(),
                        message,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for route in config
            .routes
            .iter()
            .filter(|r| r.upstream_tls.insecure_skip_verify)
        {
            tracing::warn!(route = %route.name(), "upstream_tls.insecure_skip_verify is on: upstream certificates are not checked");
        }
        Ok(Gateway {
            shared: Arc::new(Shared {
                router: config.router(),
                config,
                tls,
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
                next_id: AtomicU64::new(1),
            }),
        })
    }

    /// Binds every `server.listen` address and starts accepting.
    pub async fn start(self) -> Result<Running, StartError> {
        let mut listeners = Vec::new();
        for addr in &self.shared.config.server.listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    addr: *addr,
                    source,
                })?;
            listeners.push(listener);
        }
        let local_addrs = listeners
            .iter()
            .map(|l| l.local_addr().expect("a bound listener has an address"))
            .collect();
        let permits = Arc::new(Semaphore::new(self.shared.config.server.max_connections));
        let mut accept_loops = tokio::task::JoinSet::new();
        for listener in listeners {
            accept_loops.spawn(listener::accept_loop(
                listener,
                self.shared.clone(),
                permits.clone(),
            ));
        }
        Ok(Running {
            shared: self.shared,
            local_addrs,
            accept_loops,
        })
    }
}

/// A started gateway.
pub struct Running {
    shared: Arc<Shared>,
    local_addrs: Vec<SocketAddr>,
    accept_loops: tokio::task::JoinSet<()>,
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// Every connection closed within the grace period.
    Drained,
    /// The grace period ran out with connections still open; they are abandoned.
    GraceExpired,
}

impl Running {
    /// The bound addresses, in `server.listen` order (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The first bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addrs[0]
    }

    /// Stops accepting, closes every connection with 1001 "server shutting down", and waits for
    /// them up to `server.shutdown_grace`.
    pub async fn shutdown(mut self) -> ShutdownOutcome {
        self.shutdown_within(self.shared.config.server.shutdown_grace)
            .await
    }

    async fn shutdown_within(&mut self, grace: Duration) -> ShutdownOutcome {
        tracing::info!(grace = ?grace, "shutting down");
        self.shared.shutdown.cancel();
        while self.accept_loops.join_next().await.is_some() {}
        self.shared.tracker.close();
        match tokio::time::timeout(grace, self.shared.tracker.wait()).await {
            Ok(()) => ShutdownOutcome::Drained,
            Err(_) => ShutdownOutcome::GraceExpired,
        }
    }

    /// Runs until SIGINT or SIGTERM, then shuts down gracefully.
    pub async fn run_until_signal(self) -> std::io::Result<ShutdownOutcome> {
        wait_for_signal().await?;
        Ok(self.shutdown().await)
    }
}

#[cfg(unix)]
async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_signal() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}
