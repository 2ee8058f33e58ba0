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
        let watchdog = config.server.watchdog_timeout;
        for route in config
            .routes
            .iter()
            .filter(|r| r.policy_cpu_limit * 2 >= watchdog)
        {
            tracing::warn!(
                route = %route.name(),
                policy_cpu_limit = ?route.policy_cpu_limit,
                watchdog_timeout = ?watchdog,
                "policy_cpu_limit is at least half of server.watchdog_timeout: a policy call that uses its limit will be reported as a stalled worker"
            );
        }
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

    /// The workers the watchdog reports stalled now (no progress for
    /// `server.watchdog_timeout`), by index; they get no new connections until they recover.
    pub fn stalled_workers(&self) -> Vec<usize> {
        self.workers
            .as_ref()
            .map_or_else(Vec::new, |w| w.pool.watchdog.stalled())
    }

    /// Connections that hold no `max_connections` slot yet: sending a request head, idle
    /// between kept-alive requests, or queued for a slot.
    pub fn pending_connections(&self) -> usize {
        self.workers.as_ref().map_or(0, |w| w.pool.pending.len())
    }

    /// Stops accepting, cuts connections that have not been upgraded (a request head still
    /// arriving, an upgrade waiting for its upstream: 503), closes every relayed connection
    /// with 1001 "server shutting down", and waits for them up to `server.shutdown_grace`.
    /// It then stops the workers; a worker that is stuck (in a policy that never returns) is
    /// abandoned after [`WORKER_EXIT`] rather than waited for, so this always returns.
    pub async fn shutdown(mut self) -> ShutdownOutcome {
        let grace = self.shared.config.server.shutdown_grace;
        tracing::info!(grace = ?grace, "shutting down");
        let deadline = tokio::time::Instant::now() + grace;
        self.shared.begin_shutdown();
        self.shared.tracker.close();
        let outcome = match tokio::time::timeout_at(deadline, self.shared.tracker.wait()).await {
            Ok(()) => ShutdownOutcome::Drained,
            Err(_) => ShutdownOutcome::GraceExpired,
        };
        if let Some(mut workers) = self.workers.take() {
            // Workers stop beating now: that is not a stall.
            drop(workers.watchdog.take());
            workers.stop.cancel();
            let until = deadline.max(tokio::time::Instant::now() + WORKER_EXIT);
            // `None` once every worker thread has returned. No blocking join: a stuck thread
            // would hold this (and the process's exit) for as long as it is stuck.
            let _ = tokio::time::timeout_at(until, workers.exited.recv()).await;
            for (index, thread) in workers.threads.iter().enumerate() {
                if !thread.is_finished() {
                    tracing::error!(
                        worker = index,
                        "worker still busy at the end of shutdown; abandoned"
                    );
                }
            }
        }
        outcome
    }
}

/// How long shutdown waits for the worker threads to return once their connections are done
/// (or the grace has run out): leaving a runtime takes microseconds, unless the thread is
/// stuck.
pub const WORKER_EXIT: std::time::Duration = std::time::Duration::from_millis(100);

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
