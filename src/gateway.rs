//! A gateway as a value: build it from a [`Config`], start it on its listen addresses, and shut
//! it down gracefully. `main` and the integration tests both drive it through this API.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::policy::lua::{Engine, LoadError};
use crate::policy::shared::SharedDict;
use crate::proxy::Shared;
use crate::upstream;
use crate::worker::{self, Workers};

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
    /// A policy script failed to load (syntax error, or it does not return a function).
    #[error(transparent)]
    Policy(#[from] LoadError),
    /// A worker thread could not start.
    #[error("cannot start a worker thread: {0}")]
    Worker(String),
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
    /// Prepares everything that can fail before listening: routing, TLS settings, and the
    /// compilation of every policy script.
    pub fn new(config: Config) -> Result<Gateway, StartError> {
        let dict = Arc::new(SharedDict::new(&config.shared));
        // Compile every script once here, so that a broken one fails `check` and start-up
        // with its path and line; the workers compile their own copies.
        Engine::new(&config, dict.clone())?;
        let tls = config
            .routes
            .iter()
            .map(|route| {
                // A route's on_upgrade policy may pick a wss:// upstream too.
                let needs_tls = route.upstream.as_str().starts_with("wss://")
                    || route.policies.on_upgrade.is_some();
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
                stopping: std::sync::atomic::AtomicBool::new(false),
                dict,
            }),
        })
    }

    /// Binds every `server.listen` address, starts the workers and starts accepting.
    pub async fn start(self) -> Result<Running, StartError> {
        let mut listeners = Vec::new();
        for addr in &self.shared.config.server.listen {
            let listener = bind(*addr).map_err(|source| StartError::Bind {
                addr: *addr,
                source,
            })?;
            listeners.push(listener);
        }
        let local_addrs = listeners
            .iter()
            .map(|l| l.local_addr().expect("a bound listener has an address"))
            .collect();
        let shared = self.shared.clone();
        // Worker start-up blocks on thread creation and script compilation.
        let workers = tokio::task::spawn_blocking(move || worker::start(shared, listeners))
            .await
            .map_err(|e| StartError::Worker(e.to_string()))??;
        Ok(Running {
            shared: self.shared,
            local_addrs,
            workers: Some(workers),
        })
    }
}

/// How long shutdown waits for the worker threads to end, at least, once their connections
/// are gone (a stuck one is left behind at the end of the grace period, or after this).
const STOP_WORKERS_WITHIN: std::time::Duration = std::time::Duration::from_millis(100);

/// A started gateway. Dropping it without [`Running::shutdown`] stops it abruptly.
pub struct Running {
    shared: Arc<Shared>,
    local_addrs: Vec<SocketAddr>,
    workers: Option<Workers>,
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// Every connection closed within the grace period.
    Drained,
    /// The grace period ran out with connections still open; they were dropped.
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

    /// The workers the watchdog holds for stuck, by index (they get no new connections).
    pub fn stuck_workers(&self) -> Vec<usize> {
        self.workers.as_ref().map_or_else(Vec::new, |w| {
            (0..w.heartbeats.len())
                .filter(|&i| w.heartbeats[i].is_stuck())
                .collect()
        })
    }

    /// Stops accepting, closes every connection with 1001 "server shutting down", waits for
    /// them up to `server.shutdown_grace`, then stops the workers.
    pub async fn shutdown(mut self) -> ShutdownOutcome {
        let grace = self.shared.config.server.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        tracing::info!(grace = ?grace, "shutting down");
        self.shared.begin_shutdown();
        self.shared.tracker.close();
        let outcome = match tokio::time::timeout(grace, self.shared.tracker.wait()).await {
            Ok(()) => ShutdownOutcome::Drained,
            Err(_) => ShutdownOutcome::GraceExpired,
        };
        if let Some(workers) = self.workers.take() {
            workers.stop.cancel();
            // A worker stuck in a call that never returns (see crate::watchdog) would hold
            // the process for ever: it is left behind at the end of the grace period.
            let until = deadline.max(tokio::time::Instant::now() + STOP_WORKERS_WITHIN);
            for thread in workers.threads {
                while !thread.is_finished() && tokio::time::Instant::now() < until {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                if thread.is_finished() {
                    let _ = thread.join();
                } else {
                    tracing::error!(
                        worker = thread.thread().name().unwrap_or("?"),
                        "a worker thread did not stop; shutting down without it"
                    );
                }
            }
        }
        outcome
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(workers) = self.workers.take() {
            self.shared.begin_shutdown();
            workers.stop.cancel();
        }
    }
}

/// Listen backlog: room for connection bursts while the accept loop catches up (the kernel caps
/// it at net.core.somaxconn).
const BACKLOG: u32 = 1024;

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)?.into_std()
}
