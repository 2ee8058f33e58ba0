//! Worker threads, as in NGINX and OpenResty: each worker is one OS thread running a
//! current-thread tokio runtime with its own Lua VM. A connection lives on one worker from
//! accept to close, so its policy state never crosses threads and needs no locks.
//!
//! Every worker accepts for itself from the shared listening sockets, as NGINX workers do: a
//! worker that is stuck (a policy that never returns) accepts nothing, and the others take
//! its share. A worker that has more open connections than the least loaded healthy
//! one hands a new connection over (a re-registration on the other runtime), so long-lived
//! WebSockets stay balanced; otherwise a connection is served where it was accepted, at no
//! extra cost. The [`watchdog`] marks stalled workers so that nothing is handed to them.

//!
//! Each worker also keeps the compiled policies of every snapshot that still has connections
//! on it ([`Engines`]), and answers the reloader's [`Command`]s: compile the next snapshot
//! before it is swapped in, forget the ones no connection uses, accept on an added address.
//!
//! Layering: `gateway` starts the workers and `listener` serves connections on them; this
//! module knows neither (the connection handler is given to [`start`] as a [`ServeFn`]).

mod accept;
mod admission;
mod watchdog;

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::Route;
use crate::policy::lua::{Engine, LoadError};
use crate::policy::shared::Backend;
use crate::policy::{PolicyError, RoutePolicy};
use crate::snapshot::Snapshot;
use crate::state::Shared;

pub(crate) use accept::bind;
pub(crate) use admission::{Pending, PendingSet, Refusals};
pub(crate) use watchdog::Watchdog;

/// Why the workers could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkerError {
    /// A policy script failed to compile on a worker.
    #[error(transparent)]
    Policy(#[from] LoadError),
    /// A thread, runtime or socket could not be set up.
    #[error("cannot start a worker thread: {0}")]
    Start(String),
}

/// What a listening socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenKind {
    /// Plain HTTP/1.1 (`ws://`): `server.listen`.
    Plain,
    /// TLS (`wss://`): the `[[server.tls]]` listener configured with this address, whose
    /// certificates each connection takes from the snapshot current when it comes in.
    Tls(SocketAddr),
}

/// What a listening socket serves, shared by every worker's accept loop on it and read at
/// each accept: a reload that turns a fixed address from plain to TLS (or back) flips it, and
/// the socket stays, so that no connection is refused or served the old way in between.
#[derive(Debug, Clone)]
pub(crate) struct Serves {
    configured: SocketAddr,
    tls: Arc<std::sync::atomic::AtomicBool>,
}

impl Serves {
    /// A socket configured as `configured`, plain or TLS.
    pub(crate) fn new(configured: SocketAddr, tls: bool) -> Serves {
        Serves {
            configured,
            tls: Arc::new(std::sync::atomic::AtomicBool::new(tls)),
        }
    }

    /// What the next connection accepted gets.
    pub(crate) fn kind(&self) -> ListenKind {
        if self.is_tls() {
            ListenKind::Tls(self.configured)
        } else {
            ListenKind::Plain
        }
    }

    /// The address as configured.
    pub(crate) fn configured(&self) -> SocketAddr {
        self.configured
    }

    /// Whether it serves TLS now.
    pub(crate) fn is_tls(&self) -> bool {
        self.tls.load(Ordering::Relaxed)
    }

    /// Switches what the socket serves (a reload, once the new snapshot is in).
    pub(crate) fn set_tls(&self, tls: bool) {
        self.tls.store(tls, Ordering::Relaxed);
    }
}

/// Serves one client connection on the worker that runs it (the listener's `serve`).
pub(crate) type ServeFn = fn(
    tokio::net::TcpStream,
    SocketAddr,
    ListenKind,
    Arc<Shared>,
    Rc<WorkerCtx>,
    Slot,
) -> Pin<Box<dyn Future<Output = ()>>>;

/// What the reloader asks of a worker.
pub(crate) enum Command {
    /// Compile this snapshot's policies now, before it is swapped in, and answer.
    Prepare {
        snapshot: Arc<Snapshot>,
        done: oneshot::Sender<Result<(), LoadError>>,
    },
    /// `current` is the snapshot new connections get: forget the compiled policies of every
    /// other one (connections still on them keep theirs alive).
    Settle { current: u64 },
    /// Start accepting on this socket (an address added by a reload) until `stop`.
    Listen {
        listener: std::net::TcpListener,
        serves: Serves,
        stop: CancellationToken,
    },
}

/// Commands queued per worker: a reload sends at most three, and reloads run one at a time.
const COMMAND_QUEUE: usize = 16;

/// A connection handed to another worker.
pub(crate) struct Handoff {
    pub(crate) stream: std::net::TcpStream,
    pub(crate) peer: SocketAddr,
    pub(crate) kind: ListenKind,
    /// Taken by the sender, so that the count is right for the very next placement.
    pub(crate) slot: Slot,
}

/// Another worker's view of a worker.
pub(crate) struct WorkerLink {
    sender: mpsc::UnboundedSender<Handoff>,
    /// The reloader's commands.
    pub(crate) commands: mpsc::Sender<Command>,
    /// Open connections on this worker.
    active: Arc<AtomicUsize>,
}

/// What all workers share: the balancer's view of each, the watchdog and the admission limits.
pub(crate) struct Pool {
    pub(crate) links: Vec<WorkerLink>,
    pub(crate) watchdog: Arc<Watchdog>,
    /// `server.max_connections`: held by a connection from its request head to its end.
    pub(crate) permits: Arc<Semaphore>,
    /// Its size (as started: a reload does not change it).
    pub(crate) max_connections: usize,
    /// `server.max_pending_handshakes`: connections without a permit yet.
    pub(crate) pending: Arc<PendingSet>,
    /// Requests answered 503 at `max_connections`.
    pub(crate) refusals: Refusals,
}

/// What a worker's connections share: its index, its compiled policies, the pool.
pub(crate) struct WorkerCtx {
    /// The compiled policies of each live snapshot.
    engines: RefCell<Engines>,
    /// `gw.shared`'s backend, for compiling.
    backend: Backend,
    pub(crate) index: usize,
    pub(crate) pool: Arc<Pool>,
    /// This worker's metric sets (single writer: only this worker's connections use them).
    pub(crate) metrics: crate::metrics::WorkerMetrics,
}

/// One worker's compiled policies, by snapshot number. Holds the current snapshot's (and one
/// being prepared); a connection holds its own through its hooks, so an older snapshot's VM
/// state goes when its last connection on this worker ends.
#[derive(Default)]
struct Engines(HashMap<u64, Rc<Engine>>);

impl WorkerCtx {
    /// The compiled policies of `route` in `snapshot` on this worker; `Ok(None)` for a route
    /// without scripts. Called once per connection, right after it took `snapshot`: that is
    /// the current one, so older entries are forgotten here.
    pub(crate) fn policy(
        &self,
        snapshot: &Arc<Snapshot>,
        route: &Route,
    ) -> Result<Option<Rc<dyn RoutePolicy>>, PolicyError> {
        if route.policies.is_empty() {
            return Ok(None);
        }
        let engine = self.engine(snapshot).map_err(|e| PolicyError {
            script: e.script.display().to_string(),
            message: e.message,
        })?;
        Ok(engine.route_policy(route))
    }

    /// This worker's engine for `snapshot`, compiled now if it was not prepared (a worker that
    /// was stalled during the reload).
    fn engine(&self, snapshot: &Arc<Snapshot>) -> Result<Rc<Engine>, LoadError> {
        let mut engines = self.engines.borrow_mut();
        engines.0.retain(|n, _| *n >= snapshot.number);
        if let Some(engine) = engines.0.get(&snapshot.number) {
            return Ok(engine.clone());
        }
        let engine = Rc::new(compile(snapshot, &self.backend)?);
        engines.0.insert(snapshot.number, engine.clone());
        Ok(engine)
    }

    /// Answers one reloader command.
    fn command(self: &Rc<Self>, command: Command, shared: &Arc<Shared>, serve: ServeFn) {
        match command {
            Command::Prepare { snapshot, done } => {
                let compiled = compile(&snapshot, &self.backend).map(|engine| {
                    self.engines
                        .borrow_mut()
                        .0
                        .insert(snapshot.number, Rc::new(engine));
                });
                let _ = done.send(compiled);
            }
            Command::Settle { current } => self.engines.borrow_mut().0.retain(|n, _| *n == current),
            Command::Listen {
                listener,
                serves,
                stop,
            } => match accept::listener(listener) {
                Ok(listener) => {
                    let task = accept::accept_loop(
                        listener,
                        serves,
                        shared.clone(),
                        self.clone(),
                        stop,
                        serve,
                    );
                    shared.tracker.spawn_local(task);
                }
                Err(e) => {
                    tracing::error!(worker = self.index, error = %e, "cannot accept on an added address")
                }
            },
        }
    }
}

/// Compiles `snapshot`'s policies in a new VM of this thread.
fn compile(snapshot: &Snapshot, backend: &Backend) -> Result<Engine, LoadError> {
    Engine::with_sources(&snapshot.config, &snapshot.sources, backend.clone())
}

/// Held by a connection for its whole life: this worker's open-connection count.
pub(crate) struct Slot {
    active: Arc<AtomicUsize>,
}

impl Slot {
    /// Counts a connection on worker `index`.
    fn take(pool: &Pool, index: usize) -> Slot {
        let active = pool.links[index].active.clone();
        active.fetch_add(1, Ordering::Relaxed);
        Slot { active }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Running worker threads.
pub(crate) struct Workers {
    pub(crate) threads: Vec<JoinHandle<()>>,
    /// Cancelled to make every worker leave its runtime (after shutdown's grace).
    pub(crate) stop: CancellationToken,
    /// Ends (`recv` gives `None`) once every worker thread has returned.
    pub(crate) exited: mpsc::Receiver<()>,
    pub(crate) pool: Arc<Pool>,
    /// Stops the watchdog thread when dropped.
    pub(crate) watchdog: Option<watchdog::Stop>,
}

/// A listening socket, what it serves, and the token that stops accepting on it.
pub(crate) type Listener = (std::net::TcpListener, Serves, CancellationToken);

/// Starts `server.workers` workers, each accepting on its own copy of every listener (each
/// until its token is cancelled), then the watchdog. Returns once every worker has compiled
/// the current snapshot's policies, or with the first error.
pub(crate) fn start(
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
    serve: ServeFn,
) -> Result<Workers, WorkerError> {
    let snapshot = shared.snapshot();
    let server = &snapshot.config.server;
    let count = server.workers;
    let stop = CancellationToken::new();
    let mut receivers = Vec::with_capacity(count);
    let mut links = Vec::with_capacity(count);
    for _ in 0..count {
        let (sender, receiver) = mpsc::unbounded_channel();
        let (commands, command_receiver) = mpsc::channel(COMMAND_QUEUE);
        links.push(WorkerLink {
            sender,
            commands,
            active: Arc::new(AtomicUsize::new(0)),
        });
        receivers.push((receiver, command_receiver));
    }
    let pool = Arc::new(Pool {
        links,
        watchdog: Watchdog::new(count, server.watchdog_timeout),
        permits: Arc::new(Semaphore::new(server.max_connections)),
        max_connections: server.max_connections,
        pending: PendingSet::new(server.max_pending_handshakes),
        refusals: Refusals::default(),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (exited_tx, exited) = mpsc::channel(1);
    let mut threads = Vec::with_capacity(count);
    for (index, (receiver, commands)) in receivers.into_iter().enumerate() {
        let own = listeners
            .iter()
            .map(|(l, serves, stop)| l.try_clone().map(|l| (l, serves.clone(), stop.clone())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| WorkerError::Start(e.to_string()))?;
        let thread = Thread {
            shared: shared.clone(),
            pool: pool.clone(),
            index,
            receiver,
            commands,
            listeners: own,
            stop: stop.clone(),
            ready: ready_tx.clone(),
            exited: exited_tx.clone(),
            serve,
        };
        let thread = std::thread::Builder::new()
            .name(format!("framegate-worker-{index}"))
            .spawn(move || thread.run())
            .map_err(|e| WorkerError::Start(e.to_string()))?;
        threads.push(thread);
    }
    drop((ready_tx, exited_tx, listeners));
    for _ in 0..count {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                stop.cancel();
                return Err(e);
            }
            Err(_) => {
                return Err(WorkerError::Start(
                    "a worker thread died while starting".into(),
                ))
            }
        }
    }
    let watchdog = pool.watchdog.spawn().map_err(|e| {
        stop.cancel();
        WorkerError::Start(e.to_string())
    })?;
    Ok(Workers {
        threads,
        stop,
        exited,
        pool,
        watchdog: Some(watchdog),
    })
}

/// One worker thread's start-up kit.
struct Thread {
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    index: usize,
    receiver: mpsc::UnboundedReceiver<Handoff>,
    commands: mpsc::Receiver<Command>,
    listeners: Vec<Listener>,
    stop: CancellationToken,
    ready: std::sync::mpsc::Sender<Result<(), WorkerError>>,
    /// Dropped when the thread returns, after its runtime: shutdown waits for that.
    exited: mpsc::Sender<()>,
    serve: ServeFn,
}

impl Thread {
    fn run(self) {
        let Thread {
            shared,
            pool,
            index,
            mut receiver,
            mut commands,
            listeners,
            stop,
            ready,
            exited,
            serve,
        } = self;
        let _exited = exited;
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = ready.send(Err(WorkerError::Start(e.to_string())));
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let ctx = Rc::new(WorkerCtx {
                engines: RefCell::default(),
                backend: shared.backend.clone(),
                index,
                pool: pool.clone(),
                metrics: shared.metrics.worker(index),
            });
            if let Err(e) = ctx.engine(&shared.snapshot()) {
                let _ = ready.send(Err(WorkerError::Policy(e)));
                return;
            }
            if index == 0 {
                shared
                    .tracker
                    .spawn_local(sweep_shared_dict(shared.clone()));
            }
            for (listener, serves, until) in listeners {
                let listener = match accept::listener(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready.send(Err(WorkerError::Start(e.to_string())));
                        return;
                    }
                };
                let task = accept::accept_loop(
                    listener,
                    serves,
                    shared.clone(),
                    ctx.clone(),
                    until,
                    serve,
                );
                shared.tracker.spawn_local(task);
            }
            let _ = ready.send(Ok(()));
            let mut heartbeat = tokio::time::interval(pool.watchdog.period());
            heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The worker's own loop is a task of its own: `LocalSet::block_on` polls its main
            // future each time any task of the worker wakes (for every read of every
            // connection), and this loop's `select!` costs several hundred instructions. The
            // main future only waits for the loop's end, which is one atomic load.
            let main = tokio::task::spawn_local(async move {
                // The worker runs its connections until `stop`. A connection handed over during
                // shutdown is still taken: it ends at once, as shutdown cuts pending connections.
                loop {
                    tokio::select! {
                        handoff = receiver.recv() => {
                            let Some(Handoff { stream, peer, kind, slot }) = handoff else { break };
                            // `into_std` on the accepting worker left the socket non-blocking.
                            let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                                continue;
                            };
                            run(&ctx, &shared, (stream, peer, kind), slot, serve);
                        }
                        Some(command) = commands.recv() => ctx.command(command, &shared, serve),
                        _ = heartbeat.tick() => pool.watchdog.beat(index),
                        _ = stop.cancelled() => break,
                    }
                }
                drop(ctx);
            });
            let _ = main.await;
        });
    }
}

/// An accepted connection: its socket, its client's address, and what its listener serves.
pub(crate) type Incoming = (tokio::net::TcpStream, SocketAddr, ListenKind);

/// Serves `stream` on this worker.
fn run(
    ctx: &Rc<WorkerCtx>,
    shared: &Arc<Shared>,
    (stream, peer, kind): Incoming,
    slot: Slot,
    serve: ServeFn,
) {
    let task = serve(stream, peer, kind, shared.clone(), ctx.clone(), slot);
    shared.tracker.spawn_local(task);
}

/// Removes expired `gw.shared` entries now and then, so keys nobody touches again do not stay.
async fn sweep_shared_dict(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {
                shared.dict.sweep().await;
            }
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// Whether a worker with `mine` open connections should hand a new one to a healthy worker
/// with `least`. Exact while the counts are small (a tie stays here), then within an eighth,
/// so that at scale the hand-off (and its re-registration) is the exception while long-lived
/// WebSockets stay spread evenly.
fn overloaded(mine: usize, least: usize) -> bool {
    mine > least + least / 8
}

/// Places a stream this worker has just accepted: served here, unless this worker is
/// busier than the least loaded healthy one, which then gets it.
fn place(ctx: &Rc<WorkerCtx>, shared: &Arc<Shared>, incoming: Incoming, serve: ServeFn) {
    let (stream, peer, kind) = incoming;
    let pool = &ctx.pool;
    let mine = pool.links[ctx.index].active.load(Ordering::Relaxed);
    let target = pool
        .links
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != ctx.index && !pool.watchdog.is_stalled(*i))
        .map(|(i, l)| (i, l.active.load(Ordering::Relaxed)))
        .min_by_key(|(_, active)| *active);
    let Some((index, least)) = target.filter(|(_, least)| overloaded(mine, *least)) else {
        let slot = Slot::take(pool, ctx.index);
        return run(ctx, shared, (stream, peer, kind), slot, serve);
    };
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(client = %peer, error = %e, "cannot hand the connection to a worker");
            return;
        }
    };
    let slot = Slot::take(pool, index);
    let handoff = Handoff {
        stream,
        peer,
        kind,
        slot,
    };
    if let Err(mpsc::error::SendError(handoff)) = pool.links[index].sender.send(handoff) {
        // That worker has stopped (shutdown): serve it here after all.
        drop(handoff.slot);
        if let Ok(stream) = tokio::net::TcpStream::from_std(handoff.stream) {
            run(
                ctx,
                shared,
                (stream, peer, kind),
                Slot::take(pool, ctx.index),
                serve,
            );
        }
    } else {
        tracing::trace!(
            from = ctx.index,
            to = index,
            mine,
            least,
            "connection handed over"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_offs_are_the_exception() {
        assert!(!overloaded(0, 0));
        assert!(!overloaded(1, 1));
        assert!(overloaded(1, 0));
        assert!(overloaded(8, 7));
        assert!(!overloaded(1012, 900));
        assert!(overloaded(1013, 900));
    }
}
