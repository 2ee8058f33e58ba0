//! Reloading: read the configuration file again, validate it exactly as `framegate check`
//! does, compile its policies on every worker, and only then swap the new [`Snapshot`] in.
//! Listen addresses follow; connections on older snapshots stay (or, with `server.drain_old`,
//! are closed with 1012 later, spread out). Triggers: SIGHUP (`main.rs`), `POST /admin/reload`,
//! and `server.watch` (`reload/watch.rs`). docs/operations.md documents the semantics.

pub(crate) mod drain;
pub(crate) mod watch;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, ServerConfig};
use crate::metrics::ReloadResult;
use crate::policy::lua::{Engine, LoadError};
use crate::snapshot::{Snapshot, SnapshotError};
use crate::state::Shared;
use crate::worker::{self, Command, Pool, Serves};

/// A bound listener as the reloader keeps it: bound address, what it serves (with its
/// configured address), and the token that stops accepting on it.
pub(crate) type Bound = (SocketAddr, Serves, CancellationToken);

/// Why a reload changed nothing. Its text is what `POST /admin/reload` answers and what is
/// logged: `file:line:column: message` for configuration errors, `script:line: message` for
/// policies.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration file is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A route's TLS settings or a policy script failed.
    #[error("{0}")]
    Snapshot(#[from] SnapshotError),
    /// A new listen address could not be bound.
    #[error("{origin}: cannot listen on {addr}: {source}")]
    Bind {
        /// The configuration file.
        origin: String,
        /// The address from `server.listen`.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A worker failed to compile the policies (or the reload could not run).
    #[error("{0}")]
    Worker(String),
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

impl ReloadError {
    /// The error on one line (a configuration error's hint follows `; hint: `): what is
    /// logged and what `POST /admin/reload` answers.
    pub fn one_line(&self) -> String {
        self.to_string().replace("\n  hint: ", "; hint: ")
    }
}

impl From<LoadError> for ReloadError {
    fn from(e: LoadError) -> Self {
        ReloadError::Snapshot(SnapshotError::Policy(e))
    }
}

/// A listen address and the token that stops every worker's accept loop on it.
struct Listening {
    /// As configured (port 0 stays 0, so that the same text is the same address), and
    /// whether it is TLS: together, what identifies a listener across reloads.
    serves: Serves,
    /// As bound.
    local: SocketAddr,
    stop: CancellationToken,
}

impl Listening {
    fn key(&self) -> (SocketAddr, bool) {
        (self.serves.configured(), self.serves.is_tls())
    }
}

/// How a reload changes the listeners, prepared before anything changes.
struct ListenPlan {
    /// New listeners: configured address, whether TLS, and the socket bound for them.
    added: Vec<(SocketAddr, bool, std::net::TcpListener)>,
    /// Fixed addresses that turn from plain to TLS or back: they keep their socket.
    switched: Vec<SocketAddr>,
}

/// Every listener of `server`: configured address, and whether it is TLS.
fn wanted(server: &ServerConfig) -> Vec<(SocketAddr, bool)> {
    let plain = server.listen.iter().map(|a| (*a, false));
    plain
        .chain(server.tls.iter().map(|t| (t.listen, true)))
        .collect()
}

/// Reloads one running gateway; one reload at a time.
pub(crate) struct Reloader {
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    listening: Mutex<Vec<Listening>>,
    /// Held for a whole reload: two triggers at once run one after the other.
    running: tokio::sync::Mutex<()>,
    /// The `[server]` settings the gateway started with, for the keys that need a restart.
    started: ServerConfig,
    /// The admin settings the gateway started with (they need a restart too).
    started_admin: Option<crate::config::admin::AdminConfig>,
    started_shared: crate::config::SharedConfig,
    /// Woken after each successful reload (the file watcher follows the new file list).
    pub(crate) reloaded: tokio::sync::Notify,
}

/// How long a reload waits for each worker's compile before going on without it: a worker the
/// watchdog has not reported yet may be stuck, and must not hang the reload.
fn prepare_timeout(server: &ServerConfig) -> Duration {
    server.watchdog_timeout.max(Duration::from_secs(1))
}

impl Reloader {
    /// A reloader for `shared`, whose workers are `pool`, listening on `listening`
    /// (bound address, what it serves, stop token).
    pub(crate) fn new(shared: Arc<Shared>, pool: Arc<Pool>, listening: Vec<Bound>) -> Reloader {
        let snapshot = shared.snapshot();
        Reloader {
            started: snapshot.config.server.clone(),
            started_admin: snapshot.config.admin.clone(),
            started_shared: snapshot.config.shared.clone(),
            shared,
            pool,
            listening: Mutex::new(
                listening
                    .into_iter()
                    .map(|(local, serves, stop)| Listening {
                        serves,
                        local,
                        stop,
                    })
                    .collect(),
            ),
            running: tokio::sync::Mutex::new(()),
            reloaded: tokio::sync::Notify::new(),
        }
    }

    /// The bound listen addresses: `server.listen` in order, then the `[[server.tls]]` ones.
    pub(crate) fn local_addrs(&self) -> Vec<SocketAddr> {
        self.lock_listening().iter().map(|l| l.local).collect()
    }

    /// The bound addresses of the `[[server.tls]]` listeners, in file order.
    pub(crate) fn tls_addrs(&self) -> Vec<SocketAddr> {
        let listening = self.lock_listening();
        let tls = listening.iter().filter(|l| l.serves.is_tls());
        tls.map(|l| l.local).collect()
    }

    fn lock_listening(&self) -> std::sync::MutexGuard<'_, Vec<Listening>> {
        self.listening.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops accepting on every address (at shutdown).
    pub(crate) fn stop_listening(&self) {
        for l in self.lock_listening().iter() {
            l.stop.cancel();
        }
    }

    /// Reloads the configuration file. `Ok`: the new snapshot's number. `Err`: nothing
    /// changed; the error has been logged (once) and counted.
    pub(crate) async fn reload(&self) -> Result<u64, ReloadError> {
        let _one_at_a_time = self.running.lock().await;
        let result = if self.shared.shutdown.is_cancelled() {
            Err(ReloadError::ShuttingDown)
        } else {
            self.attempt().await
        };
        match &result {
            Ok(number) => {
                self.shared.metrics.config_reload(ReloadResult::Success);
                self.shared.metrics.set_snapshot(*number);
                self.reloaded.notify_waiters();
            }
            Err(e) => {
                self.shared.metrics.config_reload(ReloadResult::Failure);
                tracing::error!(
                    snapshot = self.shared.snapshot().number,
                    "reload failed, nothing changed: {}",
                    e.one_line()
                );
            }
        }
        result
    }

    async fn attempt(&self) -> Result<u64, ReloadError> {
        let old = self.shared.snapshot();
        let number = old.number + 1;
        let origin = old.config.origin.clone();
        let dict = self.shared.dict.clone();
        // What `framegate check` does: load, build (scripts read, TLS loaded), compile once.
        let built = tokio::task::spawn_blocking(move || -> Result<Snapshot, ReloadError> {
            let config = Config::load(&origin)?;
            let snapshot = Snapshot::build(config, number)?;
            Engine::with_sources(&snapshot.config, &snapshot.sources, dict)?;
            Ok(snapshot)
        })
        .await
        .map_err(|e| ReloadError::Worker(format!("the reload task failed: {e}")))??;
        let snapshot = Arc::new(built);
        let plan = self.bind_added(&snapshot)?;
        if let Err(e) = self.prepare(&snapshot).await {
            self.settle(old.number);
            return Err(e);
        }
        // Pools first: the new snapshot's routes may name a pool it adds.
        self.shared.pools.sync(&snapshot.config);
        self.shared.current.store(snapshot.clone());
        self.settle(number);
        let (started, stopped) = self.apply_listen(&snapshot.config.server, plan);
        crate::snapshot::warn_about(&snapshot.config);
        let changes = snapshot.changes_since(&old);
        let restart = self.needs_restart(&snapshot.config);
        tracing::info!(
            snapshot = number,
            routes_added = ?changes.added,
            routes_removed = ?changes.removed,
            routes_changed = ?changes.changed,
            listen_added = ?started,
            listen_removed = ?stopped,
            "configuration reloaded"
        );
        if !restart.is_empty() {
            tracing::warn!(
                snapshot = number,
                keys = ?restart,
                "these settings changed but only take effect after a restart; the running values stay"
            );
        }
        if let Some(after) = snapshot.config.server.drain_old {
            drain::schedule(self.shared.clone(), number, after);
        }
        Ok(number)
    }

    /// Binds the addresses the new configuration adds, before anything changes: one that
    /// cannot be bound fails the reload. A fixed address that only changes between plain and
    /// TLS keeps its socket (and its accept loops).
    fn bind_added(&self, snapshot: &Snapshot) -> Result<ListenPlan, ReloadError> {
        let listening = self.lock_listening();
        let wanted = wanted(&snapshot.config.server);
        let mut plan = ListenPlan {
            added: Vec::new(),
            switched: Vec::new(),
        };
        for &(addr, tls) in &wanted {
            if listening.iter().any(|l| l.key() == (addr, tls))
                || plan.added.iter().any(|(a, t, _)| (*a, *t) == (addr, tls))
            {
                continue;
            }
            let other_kind_goes = addr.port() != 0
                && listening.iter().any(|l| l.key() == (addr, !tls))
                && !wanted.contains(&(addr, !tls));
            if other_kind_goes {
                plan.switched.push(addr);
                continue;
            }
            let listener = worker::bind(addr).map_err(|source| ReloadError::Bind {
                origin: snapshot.config.origin.display().to_string(),
                addr,
                source,
            })?;
            plan.added.push((addr, tls, listener));
        }
        Ok(plan)
    }

    /// Has every worker compile `snapshot`. A worker the watchdog reports stalled, or that
    /// does not answer within [`prepare_timeout`], is not waited for: it compiles the snapshot
    /// when it gets to it (its request is queued), or at its first connection on it.
    async fn prepare(&self, snapshot: &Arc<Snapshot>) -> Result<(), ReloadError> {
        let mut answers = Vec::new();
        for (index, link) in self.pool.links.iter().enumerate() {
            if self.pool.watchdog.is_stalled(index) {
                tracing::warn!(
                    worker = index,
                    "worker stalled: it will compile the new policies when it recovers"
                );
                continue;
            }
            let (done, answer) = oneshot::channel();
            let command = Command::Prepare {
                snapshot: snapshot.clone(),
                done,
            };
            match link.commands.try_send(command) {
                Ok(()) => answers.push((index, answer)),
                Err(_) => tracing::warn!(
                    worker = index,
                    "worker not taking commands: it will compile the new policies at its first connection"
                ),
            }
        }
        let deadline = tokio::time::Instant::now() + prepare_timeout(&self.started);
        for (index, answer) in answers {
            match tokio::time::timeout_at(deadline, answer).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(e.into()),
                // The worker has stopped (shutdown).
                Ok(Err(_)) => return Err(ReloadError::ShuttingDown),
                Err(_) => tracing::warn!(
                    worker = index,
                    "worker did not compile the new policies in time (stuck?); going on without it"
                ),
            }
        }
        Ok(())
    }

    /// Tells every worker which snapshot is current, so that it forgets the others.
    fn settle(&self, current: u64) {
        for link in &self.pool.links {
            let _ = link.commands.try_send(Command::Settle { current });
        }
    }

    /// Switches the listeners of `plan` between plain and TLS, starts accepting on the added
    /// ones (on every worker) and stops accepting on the ones the new `server` no longer has.
    /// Returns the bound addresses started and stopped.
    fn apply_listen(
        &self,
        server: &ServerConfig,
        plan: ListenPlan,
    ) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        let wanted = wanted(server);
        let mut listening = self.lock_listening();
        for l in listening.iter() {
            if plan.switched.contains(&l.serves.configured()) {
                let tls = !l.serves.is_tls();
                l.serves.set_tls(tls);
                tracing::info!(addr = %l.local, tls, "listener switched");
            }
        }
        let mut stopped = Vec::new();
        listening.retain(|l| {
            let keep = wanted.contains(&l.key());
            if !keep {
                l.stop.cancel();
                stopped.push(l.local);
            }
            keep
        });
        let mut started = Vec::new();
        for (configured, tls, listener) in plan.added {
            let Ok(local) = listener.local_addr() else {
                continue;
            };
            let serves = Serves::new(configured, tls);
            let stop = CancellationToken::new();
            for (index, link) in self.pool.links.iter().enumerate() {
                let Ok(own) = listener.try_clone() else {
                    tracing::error!(worker = index, addr = %local, "cannot share the new listening socket");
                    continue;
                };
                let command = Command::Listen {
                    listener: own,
                    serves: serves.clone(),
                    stop: stop.clone(),
                };
                if link.commands.try_send(command).is_err() {
                    tracing::warn!(worker = index, addr = %local, "worker not taking commands: it does not accept on the added address");
                }
            }
            tracing::info!(addr = %local, tls, "listening");
            started.push(local);
            listening.push(Listening {
                serves,
                local,
                stop,
            });
        }
        // Keep the configuration's order: server.listen, then [[server.tls]].
        listening.sort_by_key(|l| wanted.iter().position(|w| *w == l.key()));
        (started, stopped)
    }

    /// The keys whose change needs a restart and that differ from the running values.
    fn needs_restart(&self, new: &Config) -> Vec<&'static str> {
        let (a, b) = (&self.started, &new.server);
        let mut keys = Vec::new();
        if a.workers != b.workers {
            keys.push("server.workers");
        }
        if a.max_connections != b.max_connections {
            keys.push("server.max_connections");
        }
        if a.max_pending_handshakes != b.max_pending_handshakes {
            keys.push("server.max_pending_handshakes");
        }
        if a.watchdog_timeout != b.watchdog_timeout {
            keys.push("server.watchdog_timeout");
        }
        if self.started_shared != new.shared {
            keys.push("[shared]");
        }
        if self.started_admin != new.admin {
            keys.push("[admin]");
        }
        keys
    }
}
