//! A gateway as a value: build it from a [`Config`], start it on its listen addresses, and shut
//! it down gracefully. `main` and the integration tests both drive it through this API.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use crate::admin::{self, GatewayApi};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::lua::{Engine, LoadError};
use crate::policy::shared::SharedDict;
use crate::registry::Registry;
use crate::reload::{ReloadError, Reloader};
use crate::snapshot::{Snapshot, SnapshotError};
use crate::state::Shared;
use crate::worker::{self, Serves, WorkerError, Workers};

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
    /// A TLS listener's certificate or key could not be loaded (`file:line:column` of its key).
    #[error(transparent)]
    Certificate(crate::config::ConfigError),
    /// A `[route.validate]` schema does not compile (its file, and where in it).
    #[error(transparent)]
    Schema(crate::config::ConfigError),
    /// `[shared] backend = "redis"` could not be set up.
    #[error("[shared]: {0}")]
    Shared(String),
}

/// A validated gateway, ready to start.
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// Prepares everything that can fail before listening: routing, TLS settings, and the
    /// compilation of every policy script. This is what `framegate check` runs, and what a
    /// reload runs before it swaps anything.
    pub fn new(config: Config) -> Result<Gateway, StartError> {
        let dict = Arc::new(SharedDict::new(&config.shared));
        let fleet = match &config.shared.redis {
            None => None,
            Some(redis) => {
                let instance = redis.instance.clone().unwrap_or_else(|| {
                    crate::fleet::default_instance(config.admin.as_ref().map(|a| a.listen.port()))
                });
                Some(
                    crate::fleet::Fleet::new(redis, instance, config.shared.max_entries)
                        .map_err(StartError::Shared)?,
                )
            }
        };
        let backend = match &fleet {
            None => crate::policy::shared::Backend::from(dict.clone()),
            Some(fleet) => crate::policy::shared::Backend::Fleet(Arc::new(fleet.clone())),
        };
        let snapshot = Snapshot::build(config, 1).map_err(StartError::from_snapshot)?;
        // Compile every script once here, so that a broken one fails `check` and start-up
        // with its path and line; the workers compile their own copies.
        Engine::with_sources(&snapshot.config, &snapshot.sources, dict.clone())?;
        crate::snapshot::warn_about(&snapshot.config);
        let metrics = Metrics::new();
        metrics.set_snapshot(snapshot.number);
        let pools = crate::upstream::pool::Pools::new();
        pools.sync(&snapshot.config);
        Ok(Gateway {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(snapshot),
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
                next_id: AtomicU64::new(1),
                stopping: std::sync::atomic::AtomicBool::new(false),
                dict,
                backend,
                fleet,
                metrics,
                registry: Registry::new(),
                pools,
            }),
        })
    }

    /// Binds every `server.listen` address (and the admin listener, if configured), starts
    /// the workers and starts accepting. Must run inside a tokio runtime, which serves the
    /// admin API and the reloads.
    pub async fn start(self) -> Result<Running, StartError> {
        let snapshot = self.shared.snapshot();
        let mut listening = Vec::new();
        let mut listeners = Vec::new();
        let server = &snapshot.config.server;
        let wanted = server.listen.iter().map(|a| (*a, false));
        let wanted = wanted.chain(server.tls.iter().map(|t| (t.listen, true)));
        for (addr, tls) in wanted {
            let bind_error = |source| StartError::Bind { addr, source };
            let listener = worker::bind(addr).map_err(bind_error)?;
            let local = listener.local_addr().map_err(bind_error)?;
            let serves = Serves::new(addr, tls);
            let stop = CancellationToken::new();
            listeners.push((listener, serves.clone(), stop.clone()));
            listening.push((local, serves, stop));
        }
        let admin = match &snapshot.config.admin {
            None => None,
            Some(admin) => {
                let listener =
                    tokio::net::TcpListener::bind(admin.listen)
                        .await
                        .map_err(|source| StartError::Bind {
                            addr: admin.listen,
                            source,
                        })?;
                Some((listener, admin.token.clone()))
            }
        };
        // The fleet's store, before the workers accept: the first upgrades find Redis up (if
        // it answers within shared.timeout), not an uncounted "unavailable". Its connection,
        // heartbeat, frame cache and writer run on this runtime until the end of shutdown
        // (on_close policies may still use it while draining).
        let background = CancellationToken::new();
        if let Some(fleet) = &self.shared.fleet {
            fleet.start(background.clone()).await;
        }
        let shared = self.shared.clone();
        // Worker start-up blocks on thread creation and script compilation.
        let workers = tokio::task::spawn_blocking(move || {
            worker::start(shared, listeners, crate::listener::serve_boxed)
        })
        .await
        .map_err(|e| StartError::Worker(e.to_string()))
        .and_then(|started| {
            started.map_err(|e| match e {
                WorkerError::Policy(e) => StartError::Policy(e),
                WorkerError::Start(e) => StartError::Worker(e),
            })
        })
        // A gateway that does not start stops what it started.
        .inspect_err(|_| background.cancel())?;
        let reloader = Arc::new(Reloader::new(
            self.shared.clone(),
            workers.pool.clone(),
            listening,
        ));
        // The admin listener and the file watcher stop at the end of shutdown (`background`),
        // so that `/readyz` answers 503 while connections drain.
        // `scope=fleet` on the admin's registry endpoints (src/fleet/registry.rs).
        let fleet_registry = self.shared.fleet.as_ref().map(|fleet| {
            crate::fleet::registry::FleetRegistry::new(fleet.clone(), self.shared.registry.clone())
        });
        let admin_addr = match admin {
            None => None,
            Some((listener, token)) => {
                let addr = listener.local_addr().ok();
                let api = Arc::new(GatewayApi::new(
                    self.shared.clone(),
                    reloader.clone(),
                    fleet_registry.clone(),
                ));
                tokio::spawn(admin::serve(listener, background.clone(), token, api));
                if let Some(addr) = addr {
                    tracing::info!(%addr, "admin API listening");
                }
                addr
            }
        };
        if snapshot.config.server.watch {
            crate::reload::watch::start(reloader.clone(), background.clone());
        }
        if let Some(registry) = &fleet_registry {
            registry.start(background.clone());
        }
        // Active health checks: one task for the whole gateway, whatever its worker count.
        let shared = self.shared.clone();
        tokio::spawn(crate::upstream::pool::health::run(
            self.shared.pools.clone(),
            move || {
                let snapshot = shared.snapshot();
                snapshot
                    .config
                    .upstreams
                    .iter()
                    .map(|p| (p.clone(), snapshot.pool_tls(&p.name).cloned()))
                    .collect()
            },
            background.clone(),
        ));
        // DNS discovery: one task for the whole gateway too.
        let shared = self.shared.clone();
        tokio::spawn(crate::upstream::pool::discovery::run(
            self.shared.pools.clone(),
            move || shared.snapshot().config.upstreams.clone(),
            background.clone(),
        ));
        // etcd discovery: one supervisor for the whole gateway, one watch per pool under it.
        let shared = self.shared.clone();
        tokio::spawn(crate::upstream::pool::etcd::run(
            self.shared.pools.clone(),
            move || shared.snapshot().config.upstreams.clone(),
            background.clone(),
        ));
        Ok(Running {
            shared: self.shared,
            reloader,
            admin_addr,
            background,
            workers: Some(workers),
            fleet_registry,
        })
    }
}

impl StartError {
    fn from_snapshot(e: SnapshotError) -> StartError {
        match e {
            SnapshotError::Tls { route, message } => StartError::Tls { route, message },
            SnapshotError::Jwt { route, message } => StartError::Tls {
                route,
                message: format!("[route.jwt]: {message}"),
            },
            SnapshotError::Policy(e) => StartError::Policy(e),
            SnapshotError::Certificate(e) => StartError::Certificate(e),
            SnapshotError::Schema(e) => StartError::Schema(e),
        }
    }
}

/// A started gateway. Dropping it without [`Running::shutdown`] stops it abruptly.
pub struct Running {
    shared: Arc<Shared>,
    reloader: Arc<Reloader>,
    admin_addr: Option<SocketAddr>,
    /// Stops the admin listener and the file watcher.
    background: CancellationToken,
    workers: Option<Workers>,
    /// Unpublished at the end of a shutdown, so that the fleet stops listing this instance.
    fleet_registry: Option<Arc<crate::fleet::registry::FleetRegistry>>,
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
    /// The bound addresses (useful with port 0): `server.listen` in order, then the
    /// `[[server.tls]]` listeners in file order. A reload may change them.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.reloader.local_addrs()
    }

    /// The bound addresses of the `[[server.tls]]` (`wss://`) listeners, in file order.
    pub fn tls_addrs(&self) -> Vec<SocketAddr> {
        self.reloader.tls_addrs()
    }

    /// The gateway's metrics (what `GET /metrics` encodes).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.shared.metrics
    }

    /// The gateway's open connections (what the admin API lists and controls).
    pub fn registry(&self) -> &Arc<crate::registry::Registry> {
        &self.shared.registry
    }

    /// The `[[upstream]]` pools' live state (what `GET /admin/upstreams` shows).
    pub fn pools(&self) -> &Arc<crate::upstream::pool::Pools> {
        &self.shared.pools
    }

    /// The first bound address (the first of `server.listen`, or with none, the first TLS
    /// listener's).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addrs()[0]
    }

    /// The admin listener's bound address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Reloads the configuration file (as SIGHUP does): validates and compiles everything,
    /// then swaps the new snapshot in. Returns its number; on error nothing changed.
    pub async fn reload(&self) -> Result<u64, ReloadError> {
        self.reloader.reload().await
    }

    /// The number of the snapshot new connections get.
    pub fn snapshot_number(&self) -> u64 {
        self.shared.snapshot().number
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
        let grace = self.shared.snapshot().config.server.shutdown_grace;
        tracing::info!(grace = ?grace, "shutting down");
        let deadline = tokio::time::Instant::now() + grace;
        self.shared.begin_shutdown();
        self.reloader.stop_listening();
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
            if tokio::time::timeout_at(until, workers.exited.recv())
                .await
                .is_ok()
            {
                // Every worker has dropped its runtime; its OS thread ends a moment later.
                let threads = &workers.threads;
                let _ = tokio::time::timeout_at(until, async {
                    while threads.iter().any(|t| !t.is_finished()) {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                })
                .await;
            }
            for (index, thread) in workers.threads.iter().enumerate() {
                if !thread.is_finished() {
                    tracing::error!(
                        worker = index,
                        "worker still busy at the end of shutdown; abandoned"
                    );
                }
            }
        }
        if let Some(registry) = &self.fleet_registry {
            registry.unpublish().await;
        }
        self.background.cancel();
        outcome
    }
}

/// How long shutdown waits for the worker threads to return once their connections are done
/// (or the grace has run out): leaving a runtime takes microseconds, unless the thread is
/// stuck.
pub const WORKER_EXIT: std::time::Duration = std::time::Duration::from_millis(100);

impl Drop for Running {
    fn drop(&mut self) {
        self.background.cancel();
        if let Some(workers) = self.workers.take() {
            self.shared.begin_shutdown();
            workers.stop.cancel();
        }
    }
}
