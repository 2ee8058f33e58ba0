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

mod watchdog;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::gateway::StartError;
use crate::listener::{PendingSet, Refusals};
use crate::policy::lua::Engine;
use crate::policy::RoutePolicy;
use crate::proxy::Shared;

pub(crate) use watchdog::Watchdog;

/// A connection handed to another worker.
pub(crate) struct Handoff {
    pub(crate) stream: std::net::TcpStream,
    pub(crate) peer: SocketAddr,
    /// Taken by the sender, so that the count is right for the very next placement.
    pub(crate) slot: Slot,
}

/// Another worker's view of a worker.
pub(crate) struct WorkerLink {
    sender: mpsc::UnboundedSender<Handoff>,
    /// Open connections on this worker.
    active: Arc<AtomicUsize>,
}

/// What all workers share: the balancer's view of each, the watchdog and the admission limits.
pub(crate) struct Pool {
    links: Vec<WorkerLink>,
    pub(crate) watchdog: Arc<Watchdog>,
    /// `server.max_connections`: held by a connection from its request head to its end.
    pub(crate) permits: Arc<Semaphore>,
    /// `server.max_pending_handshakes`: connections without a permit yet.
    pub(crate) pending: Arc<PendingSet>,
    /// Requests answered 503 at `max_connections`.
    pub(crate) refusals: Refusals,
}

/// What a worker's connections share: its index, its compiled route policies, the pool.
pub(crate) struct WorkerCtx {
    /// Route policies by route index; `None` for routes without scripts.
    pub(crate) policies: Vec<Option<Rc<dyn RoutePolicy>>>,
    pub(crate) index: usize,
    pub(crate) pool: Arc<Pool>,
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

/// Starts `shared.config.server.workers` workers, each accepting on its own copy of every
/// listener, then the watchdog. Returns once every worker has compiled its policies, or with
/// the first error.
pub(crate) fn start(
    shared: Arc<Shared>,
    listeners: Vec<std::net::TcpListener>,
) -> Result<Workers, StartError> {
    let server = &shared.config.server;
    let count = server.workers;
    let stop = CancellationToken::new();
    let mut receivers = Vec::with_capacity(count);
    let mut links = Vec::with_capacity(count);
    for _ in 0..count {
        let (sender, receiver) = mpsc::unbounded_channel();
        links.push(WorkerLink {
            sender,
            active: Arc::new(AtomicUsize::new(0)),
        });
        receivers.push(receiver);
    }
    let pool = Arc::new(Pool {
        links,
        watchdog: Watchdog::new(count, server.watchdog_timeout),
        permits: Arc::new(Semaphore::new(server.max_connections)),
        pending: PendingSet::new(server.max_pending_handshakes),
        refusals: Refusals::default(),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (exited_tx, exited) = mpsc::channel(1);
    let mut threads = Vec::with_capacity(count);
    for (index, receiver) in receivers.into_iter().enumerate() {
        let own = listeners
            .iter()
            .map(std::net::TcpListener::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StartError::Worker(e.to_string()))?;
        let thread = Thread {
            shared: shared.clone(),
            pool: pool.clone(),
            index,
            receiver,
            listeners: own,
            stop: stop.clone(),
            ready: ready_tx.clone(),
            exited: exited_tx.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("framegate-worker-{index}"))
            .spawn(move || thread.run())
            .map_err(|e| StartError::Worker(e.to_string()))?;
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
                return Err(StartError::Worker(
                    "a worker thread died while starting".into(),
                ))
            }
        }
    }
    let watchdog = pool.watchdog.spawn().map_err(|e| {
        stop.cancel();
        StartError::Worker(e.to_string())
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
    listeners: Vec<std::net::TcpListener>,
    stop: CancellationToken,
    ready: std::sync::mpsc::Sender<Result<(), StartError>>,
    /// Dropped when the thread returns, after its runtime: shutdown waits for that.
    exited: mpsc::Sender<()>,
}

impl Thread {
    fn run(self) {
        let Thread {
            shared,
            pool,
            index,
            mut receiver,
            listeners,
            stop,
            ready,
            exited,
        } = self;
        let _exited = exited;
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = ready.send(Err(StartError::Worker(e.to_string())));
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let engine = match Engine::new(&shared.config, shared.dict.clone()) {
                Ok(engine) => engine,
                Err(e) => {
                    let _ = ready.send(Err(StartError::Policy(e)));
                    return;
                }
            };
            let ctx = Rc::new(WorkerCtx {
                policies: shared
                    .config
                    .routes
                    .iter()
                    .map(|r| engine.route_policy(r))
                    .collect(),
                index,
                pool: pool.clone(),
            });
            if index == 0 {
                shared
                    .tracker
                    .spawn_local(sweep_shared_dict(shared.clone()));
            }
            for listener in listeners {
                let listener = match listener
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpListener::from_std(listener))
                {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready.send(Err(StartError::Worker(e.to_string())));
                        return;
                    }
                };
                let task = crate::listener::accept_loop(listener, shared.clone(), ctx.clone());
                shared.tracker.spawn_local(task);
            }
            let _ = ready.send(Ok(()));
            let mut heartbeat = tokio::time::interval(pool.watchdog.period());
            heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The worker runs its connections until `stop`. A connection handed over during
            // shutdown is still taken: it ends at once, as shutdown cuts pending connections.
            loop {
                tokio::select! {
                    handoff = receiver.recv() => {
                        let Some(Handoff { stream, peer, slot }) = handoff else { break };
                        // `into_std` on the accepting worker left the socket non-blocking.
                        let Ok(stream) = tokio::net::TcpStream::from_std(stream) else { continue };
                        serve(&ctx, &shared, stream, peer, slot);
                    }
                    _ = heartbeat.tick() => pool.watchdog.beat(index),
                    _ = stop.cancelled() => break,
                }
            }
            // Keep the engine alive until every connection on this worker is gone.
            drop(ctx);
            drop(engine);
        });
    }
}

/// Serves `stream` on this worker.
fn serve(
    ctx: &Rc<WorkerCtx>,
    shared: &Arc<Shared>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: Slot,
) {
    let task = crate::listener::serve(stream, peer, shared.clone(), ctx.clone(), slot);
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
pub(crate) fn place(
    ctx: &Rc<WorkerCtx>,
    shared: &Arc<Shared>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) {
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
        return serve(ctx, shared, stream, peer, slot);
    };
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(client = %peer, error = %e, "cannot hand the connection to a worker");
            return;
        }
    };
    let slot = Slot::take(pool, index);
    let handoff = Handoff { stream, peer, slot };
    if let Err(mpsc::error::SendError(handoff)) = pool.links[index].sender.send(handoff) {
        // That worker has stopped (shutdown): serve it here after all.
        drop(handoff.slot);
        if let Ok(stream) = tokio::net::TcpStream::from_std(handoff.stream) {
            serve(ctx, shared, stream, peer, Slot::take(pool, ctx.index));
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
