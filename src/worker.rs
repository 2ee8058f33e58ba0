//! Worker threads, as in NGINX and OpenResty: each worker is one OS thread running a
//! current-thread tokio runtime with its own Lua VM. A connection lives on one worker from
//! accept to close, so its policy state never crosses threads and needs no locks.
//!
//! The accept loops run on worker 0 and give each new connection to the worker with the fewest
//! open connections: worker 0 keeps it if that is itself, and hands it over otherwise.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::gateway::StartError;
use crate::policy::lua::Engine;
use crate::policy::RoutePolicy;
use crate::proxy::Shared;

/// A connection handed to a worker.
pub(crate) struct Handoff {
    pub(crate) stream: std::net::TcpStream,
    pub(crate) peer: SocketAddr,
    pub(crate) permit: OwnedSemaphorePermit,
}

/// The dispatcher's view of a worker.
pub(crate) struct WorkerLink {
    sender: mpsc::UnboundedSender<Handoff>,
    /// Open connections on this worker.
    active: Arc<AtomicUsize>,
    /// Whether the worker still makes progress (see [`crate::watchdog`]).
    heartbeat: Arc<crate::watchdog::Heartbeat>,
}

/// What a worker's connections share: its index and its compiled route policies.
pub(crate) struct WorkerCtx {
    /// Route policies by route index; `None` for routes without scripts.
    pub(crate) policies: Vec<Option<Rc<dyn RoutePolicy>>>,
}

/// Held by a connection for its whole life (HTTP phase and relay): the connection-cap permit
/// and this worker's open-connection count.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    active: Arc<AtomicUsize>,
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
    /// Each worker's heartbeat, by index (see [`crate::watchdog`]).
    pub(crate) heartbeats: Vec<Arc<crate::watchdog::Heartbeat>>,
}

/// Starts `shared.config.server.workers` workers; worker 0 also runs the accept loops.
/// Returns once every worker has compiled its policies, or with the first error.
pub(crate) fn start(
    shared: Arc<Shared>,
    listeners: Vec<std::net::TcpListener>,
) -> Result<Workers, StartError> {
    let count = shared.config.server.workers;
    let stop = CancellationToken::new();
    let mut receivers = Vec::with_capacity(count);
    let mut links = Vec::with_capacity(count);
    for _ in 0..count {
        let (sender, receiver) = mpsc::unbounded_channel();
        links.push(WorkerLink {
            sender,
            active: Arc::new(AtomicUsize::new(0)),
            heartbeat: crate::watchdog::Heartbeat::new(),
        });
        receivers.push(receiver);
    }
    let actives: Vec<_> = links.iter().map(|l| l.active.clone()).collect();
    let heartbeats: Vec<_> = links.iter().map(|l| l.heartbeat.clone()).collect();
    let links = Arc::new(links);
    let permits = Arc::new(Semaphore::new(shared.config.server.max_connections));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut listeners = Some(listeners);
    let mut threads = Vec::with_capacity(count);
    for (index, receiver) in receivers.into_iter().enumerate() {
        let shared = shared.clone();
        let stop = stop.clone();
        let ready = ready_tx.clone();
        let active = actives[index].clone();
        let heartbeat = heartbeats[index].clone();
        let accept = listeners
            .take()
            .map(|l| (l, links.clone(), permits.clone()));
        let thread = std::thread::Builder::new()
            .name(format!("framegate-worker-{index}"))
            .spawn(move || run(shared, receiver, active, heartbeat, accept, stop, ready))
            .map_err(|e| StartError::Worker(e.to_string()))?;
        threads.push(thread);
    }
    drop(ready_tx);
    let stuck_after = crate::watchdog::stuck_after(&shared.config);
    crate::watchdog::spawn(heartbeats.clone(), stuck_after, stop.clone())
        .map_err(|e| StartError::Worker(e.to_string()))?;
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
    Ok(Workers {
        threads,
        stop,
        heartbeats,
    })
}

type AcceptDuty = (
    Vec<std::net::TcpListener>,
    Arc<Vec<WorkerLink>>,
    Arc<Semaphore>,
);

fn run(
    shared: Arc<Shared>,
    mut receiver: mpsc::UnboundedReceiver<Handoff>,
    active: Arc<AtomicUsize>,
    heartbeat: Arc<crate::watchdog::Heartbeat>,
    accept: Option<AcceptDuty>,
    stop: CancellationToken,
    ready: std::sync::mpsc::Sender<Result<(), StartError>>,
) {
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
    local.spawn_local(crate::watchdog::beat(heartbeat, stop.clone()));
    local.block_on(&runtime, async move {
        let engine = match Engine::new(&shared.config, shared.dict.clone()) {
            Ok(engine) => engine,
            Err(e) => {
                let _ = ready.send(Err(StartError::Policy(e)));
                return;
            }
        };
        let ctx = Rc::new(WorkerCtx {
            policies: shared.config.routes.iter().map(|r| engine.route_policy(r)).collect(),
        });
                if let Some((listeners, links, permits)) = accept {
            shared.tracker.spawn_local(sweep_shared_dict(shared.clone()));
            for listener in listeners {
                let listener = match listener.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(listener)) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready.send(Err(StartError::Worker(e.to_string())));
                        return;
                    }
                };
                let task = crate::listener::accept_loop(listener, shared.clone(), ctx.clone(), links.clone(), permits.clone());
                shared.tracker.spawn_local(task);
            }
        }
        let _ = ready.send(Ok(()));
        // The hand-off channel closes when the accept loops end at shutdown; the worker keeps
        // running its connections until `stop`.
        let mut accepting = true;
        loop {
            tokio::select! {
                handoff = receiver.recv(), if accepting => {
                    let Some(Handoff { stream, peer, permit }) = handoff else {
                        accepting = false;
                        continue;
                    };
                    let slot = Rc::new(Slot { _permit: permit, active: active.clone() });
                    // `into_std` on the accepting worker left the socket non-blocking.
                    let Ok(stream) = tokio::net::TcpStream::from_std(stream) else { continue };
                    let task = crate::listener::serve(stream, peer, shared.clone(), ctx.clone(), slot);
                    shared.tracker.spawn_local(task);
                }
                _ = stop.cancelled() => break,
            }
        }
        // Keep the engine alive until every connection on this worker is gone.
        drop(ctx);
        drop(engine);
    });
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

/// Picks the worker with the fewest open connections for a stream accepted on worker 0. If
/// that is worker 0 itself, the stream stays where it is registered and is returned with its
/// slot, to be served here; otherwise it is handed over (deregistered here, registered there).
pub(crate) fn place(
    links: &[WorkerLink],
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) -> Option<(tokio::net::TcpStream, Rc<Slot>)> {
    // A stuck worker gets nothing new, unless every worker is stuck.
    let (index, link) = links
        .iter()
        .enumerate()
        .min_by_key(|(_, l)| (l.heartbeat.is_stuck(), l.active.load(Ordering::Relaxed)))
        .expect("there is at least one worker");
    link.active.fetch_add(1, Ordering::Relaxed);
    if index == 0 {
        let slot = Slot {
            _permit: permit,
            active: link.active.clone(),
        };
        return Some((stream, Rc::new(slot)));
    }
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(e) => {
            link.active.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(client = %peer, error = %e, "cannot hand the connection to a worker");
            return None;
        }
    };
    if link
        .sender
        .send(Handoff {
            stream,
            peer,
            permit,
        })
        .is_err()
    {
        link.active.fetch_sub(1, Ordering::Relaxed);
        tracing::warn!(worker = index, "worker has stopped; connection dropped");
    }
    None
}
