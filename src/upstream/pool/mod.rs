//! Upstream pools at run time: the gateway-wide live state of every pool's endpoints (open
//! connections, consecutive failures, down or up), kept by pool name and endpoint URL so that
//! it survives reloads (see [`Pools::sync`]), and the choice of an endpoint for a new
//! connection ([`PoolState::pick`]). The configuration of a pool is in the snapshot
//! ([`crate::config::pool::Pool`]); a connection keeps the snapshot it started with.
//!
//! A pool picks an endpoint; the existing [`crate::upstream::connect`] then runs against it.
//! Nothing here runs per message: the open-connection count is one atomic add when a
//! connection is upgraded and one subtract when it ends.

pub(crate) mod balance;
pub mod discovery;
pub mod etcd;
pub mod health;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::pool::{Balance, Pool};
use crate::config::Config;
use balance::Candidate;

/// How long an endpoint that passive checks marked down waits before it is tried again, when
/// the pool has no active health check.
pub const PASSIVE_BACKOFF: Duration = Duration::from_secs(10);

/// Where an endpoint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The pool's `endpoints`.
    Config,
    /// `[upstream.discovery] dns`.
    Dns,
    /// `[upstream.discovery] srv`.
    Srv,
    /// `[upstream.discovery] etcd`.
    Etcd,
}

impl Source {
    /// As the admin API shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Dns => "dns",
            Source::Srv => "srv",
            Source::Etcd => "etcd",
        }
    }
}

/// Why an attempt on an endpoint failed, as `framegate_upstream_failures_total` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// TCP connect refused, unreachable or unresolved.
    Connect,
    /// The TLS handshake failed.
    Tls,
    /// The attempt ran out of time.
    Timeout,
    /// The HTTP exchange broke, or the 101 broke the WebSocket rules.
    Handshake,
    /// The upstream answered the upgrade with a 5xx.
    Status5xx,
}

impl FailureKind {
    /// Every kind, in label order.
    pub const ALL: [FailureKind; 5] = [
        FailureKind::Connect,
        FailureKind::Tls,
        FailureKind::Timeout,
        FailureKind::Handshake,
        FailureKind::Status5xx,
    ];

    /// The `kind` label.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Tls => "tls",
            FailureKind::Timeout => "timeout",
            FailureKind::Handshake => "handshake",
            FailureKind::Status5xx => "status_5xx",
        }
    }
}

/// One endpoint's live state, shared by every worker.
#[derive(Debug)]
pub struct EndpointState {
    /// `ws://host:port[/base]`.
    pub url: String,
    /// The opaque id the sticky cookie carries.
    pub id: String,
    /// Where it came from.
    pub source: Source,
    weight: AtomicU32,
    /// Open (upgraded) connections, across all workers.
    open: AtomicUsize,
    /// Consecutive failed attempts.
    fails: AtomicU32,
    /// Down until this instant (passive backoff); `None`: up.
    down_until: Mutex<Option<Instant>>,
    /// No longer listed (config or discovery): takes no new connections; its open ones stay.
    draining: AtomicBool,
    /// Smooth round robin's running weight.
    current: AtomicI64,
    /// Failed attempts by [`FailureKind`], for the metrics.
    failures: [AtomicU64; 5],
    /// Down until active checks pass (`[upstream.health]`), whatever `down_until` says.
    held_down: AtomicBool,
    /// Consecutive passed active checks while down.
    passes: AtomicU32,
    /// An active check is running: the next waits for it.
    checking: AtomicBool,
    /// When the next active check is due.
    next_check: Mutex<Option<Instant>>,
}

impl EndpointState {
    fn new(pool: &str, url: &str, weight: u32, source: Source) -> EndpointState {
        EndpointState {
            url: url.to_owned(),
            id: balance::endpoint_id(pool, url),
            source,
            weight: AtomicU32::new(weight),
            open: AtomicUsize::new(0),
            fails: AtomicU32::new(0),
            down_until: Mutex::new(None),
            draining: AtomicBool::new(false),
            current: AtomicI64::new(0),
            failures: Default::default(),
            held_down: AtomicBool::new(false),
            passes: AtomicU32::new(0),
            checking: AtomicBool::new(false),
            next_check: Mutex::new(None),
        }
    }

    /// Its share of new connections.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Open connections, across all workers.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Failed attempts so far, by kind (in [`FailureKind::ALL`] order).
    pub fn failures(&self) -> [(FailureKind, u64); 5] {
        FailureKind::ALL.map(|k| (k, self.failures[k as usize].load(Ordering::Relaxed)))
    }

    /// Takes new connections: neither draining nor down.
    pub fn is_up(&self) -> bool {
        !self.is_draining() && !self.marked_down()
    }

    /// Consecutive failures so far.
    pub fn recent_failures(&self) -> u32 {
        self.fails.load(Ordering::Relaxed)
    }

    /// Whether it was taken out of the list and only finishes its open connections.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Down, and not yet due to be tried again.
    pub fn is_down(&self, now: Instant) -> bool {
        self.held_down.load(Ordering::Relaxed)
            || self
                .down_until
                .lock()
                .expect("down_until is never poisoned: no panics under it")
                .is_some_and(|until| now < until)
    }

    /// Marked down (whether or not its retry time has come).
    pub fn marked_down(&self) -> bool {
        self.down_until
            .lock()
            .expect("down_until is never poisoned")
            .is_some()
    }

    fn down_until(&self) -> Option<Instant> {
        *self
            .down_until
            .lock()
            .expect("down_until is never poisoned")
    }
}

/// The open-connection count of one endpoint, held by a connection to its end.
#[derive(Debug)]
pub struct EndpointGuard(Arc<EndpointState>);

impl EndpointGuard {
    /// Counts a connection on `endpoint` until dropped.
    pub fn new(endpoint: Arc<EndpointState>) -> EndpointGuard {
        endpoint.open.fetch_add(1, Ordering::Relaxed);
        EndpointGuard(endpoint)
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.0
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One pool's live state.
#[derive(Debug)]
pub struct PoolState {
    /// The pool's name.
    pub name: String,
    endpoints: RwLock<Vec<Arc<EndpointState>>>,
    /// Serialises smooth round robin's update of every candidate's running weight.
    round_robin: Mutex<()>,
    /// Rotates least_connections' ties.
    ties: AtomicUsize,
    /// Attempts on another endpoint after a failed one.
    retries: AtomicU64,
    /// Discovery lookups (DNS, SRV) and etcd sessions that failed; the endpoints stayed.
    discovery_failures: AtomicU64,
}

/// What a pick found.
#[derive(Debug)]
pub enum Pick {
    /// Try this endpoint.
    Endpoint(Arc<EndpointState>),
    /// Every endpoint is down: answer 503 with `Retry-After` (seconds) at once.
    AllDown {
        /// When the first one is due to be tried again.
        retry_after: Duration,
    },
    /// Every endpoint has been tried already (or the pool has none).
    Exhausted,
}

impl PoolState {
    fn new(name: &str) -> PoolState {
        PoolState {
            name: name.to_owned(),
            endpoints: RwLock::new(Vec::new()),
            round_robin: Mutex::new(()),
            ties: AtomicUsize::new(0),
            retries: AtomicU64::new(0),
            discovery_failures: AtomicU64::new(0),
        }
    }

    /// Every endpoint, draining ones included.
    pub fn endpoints(&self) -> Vec<Arc<EndpointState>> {
        self.endpoints
            .read()
            .expect("endpoints never poisoned")
            .clone()
    }

    /// Sets the endpoints from `source` to `listed` (URL, weight): new ones are added, listed
    /// ones keep their state (and take the new weight), and ones no longer listed are
    /// drained: no new connections, and they go once their last connection has ended.
    pub fn set_endpoints(&self, source: Source, listed: &[(String, u32)]) {
        let mut endpoints = self.endpoints.write().expect("endpoints never poisoned");
        for e in endpoints.iter().filter(|e| e.source == source) {
            let kept = listed.iter().find(|(url, _)| *url == e.url);
            e.draining.store(kept.is_none(), Ordering::Relaxed);
            if let Some((_, w)) = kept {
                e.weight.store(*w, Ordering::Relaxed);
            }
        }
        for (url, weight) in listed {
            if !endpoints.iter().any(|e| e.url == *url) {
                endpoints.push(Arc::new(EndpointState::new(
                    &self.name, url, *weight, source,
                )));
            }
        }
        endpoints.retain(|e| !e.is_draining() || e.open() > 0);
    }

    /// Chooses an endpoint for a new connection: `sticky` (a cookie's endpoint id) first if
    /// it is up, then by `pool.balance` (`key` for `hash`) among the endpoints that are up,
    /// not draining, and not in `tried`.
    pub fn pick(
        &self,
        pool: &Pool,
        key: Option<&[u8]>,
        sticky: Option<&str>,
        tried: &[Arc<EndpointState>],
    ) -> Pick {
        let now = Instant::now();
        let endpoints = self.endpoints.read().expect("endpoints never poisoned");
        let live: Vec<&Arc<EndpointState>> =
            endpoints.iter().filter(|e| !e.is_draining()).collect();
        let up: Vec<&Arc<EndpointState>> =
            live.iter().copied().filter(|e| !e.is_down(now)).collect();
        if up.is_empty() && tried.is_empty() && !live.is_empty() {
            let first = live.iter().filter_map(|e| e.down_until()).min();
            let wait = first.map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
            return Pick::AllDown {
                retry_after: wait.max(Duration::from_secs(1)),
            };
        }
        let open: Vec<&Arc<EndpointState>> = up
            .into_iter()
            .filter(|e| !tried.iter().any(|t| Arc::ptr_eq(t, e)))
            .collect();
        if open.is_empty() {
            return Pick::Exhausted;
        }
        if let Some(id) = sticky {
            if let Some(e) = open.iter().find(|e| e.id == id) {
                return Pick::Endpoint(Arc::clone(e));
            }
        }
        let candidates: Vec<Candidate<'_>> = open
            .iter()
            .map(|e| Candidate {
                url: &e.url,
                weight: e.weight.load(Ordering::Relaxed),
                open: e.open(),
            })
            .collect();
        let chosen = match (pool.balance, key) {
            (Balance::Hash, Some(key)) => balance::hash(&candidates, key),
            (Balance::RoundRobin, _) | (Balance::Hash, None) => {
                let _turn = self.round_robin.lock().expect("round robin never poisoned");
                let mut current: Vec<i64> = open
                    .iter()
                    .map(|e| e.current.load(Ordering::Relaxed))
                    .collect();
                let i = balance::smooth_round_robin(&candidates, &mut current);
                for (e, c) in open.iter().zip(current) {
                    e.current.store(c, Ordering::Relaxed);
                }
                i
            }
            (Balance::LeastConnections, _) => {
                let start = self.ties.fetch_add(1, Ordering::Relaxed);
                balance::least_connections(&candidates, start % candidates.len())
            }
            (Balance::RandomTwo, _) => balance::random_two(&candidates, &mut rand::rng()),
        };
        Pick::Endpoint(Arc::clone(open[chosen]))
    }

    /// Attempts on another endpoint after a failed one, so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Counts an attempt on another endpoint after a failed one.
    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Discovery lookups and etcd sessions that failed (the last known endpoints stayed).
    pub fn discovery_failures(&self) -> u64 {
        self.discovery_failures.load(Ordering::Relaxed)
    }

    /// Counts a failed discovery lookup or etcd session.
    pub fn discovery_failed(&self) {
        self.discovery_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A failed attempt on `endpoint`: `rule.fails` in a row mark it down (see [`DownRule`]).
    pub fn failed(&self, endpoint: &EndpointState, kind: FailureKind, rule: DownRule) {
        endpoint.failures[kind as usize].fetch_add(1, Ordering::Relaxed);
        self.missed(endpoint, rule);
    }

    /// A failed attempt or check: counts towards `rule.fails`.
    fn missed(&self, endpoint: &EndpointState, rule: DownRule) {
        let DownRule {
            fails,
            backoff,
            active,
        } = rule;
        endpoint.passes.store(0, Ordering::Relaxed);
        let n = endpoint.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= fails {
            if active {
                endpoint.held_down.store(true, Ordering::Relaxed);
            }
            let mut down = endpoint
                .down_until
                .lock()
                .expect("down_until is never poisoned");
            if down.is_none() {
                tracing::warn!(pool = %self.name, endpoint = %endpoint.url, failures = n, "upstream endpoint marked down");
            }
            *down = Some(Instant::now() + backoff);
        }
    }

    /// An active check on `endpoint` passed: `passes` in a row bring a down one back up.
    pub fn check_passed(&self, endpoint: &EndpointState, passes: u32) {
        if !endpoint.marked_down() {
            endpoint.fails.store(0, Ordering::Relaxed);
            return;
        }
        if endpoint.passes.fetch_add(1, Ordering::Relaxed) + 1 >= passes {
            self.succeeded(endpoint);
        }
    }

    /// An active check on `endpoint` failed.
    pub fn check_failed(&self, endpoint: &EndpointState, rule: DownRule) {
        self.missed(endpoint, rule);
    }

    /// A successful handshake on `endpoint`: it is up.
    pub fn succeeded(&self, endpoint: &EndpointState) {
        endpoint.fails.store(0, Ordering::Relaxed);
        endpoint.passes.store(0, Ordering::Relaxed);
        endpoint.held_down.store(false, Ordering::Relaxed);
        let mut down = endpoint
            .down_until
            .lock()
            .expect("down_until is never poisoned");
        if down.take().is_some() {
            tracing::info!(pool = %self.name, endpoint = %endpoint.url, "upstream endpoint up again");
        }
    }
}

/// When failures mark an endpoint down, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct DownRule {
    /// Consecutive failures that mark it down.
    pub fails: u32,
    /// How long before it is tried again (without active checks), or the estimate given in
    /// `Retry-After` (with them).
    pub backoff: Duration,
    /// With `[upstream.health]`: it stays down until `passes` checks in a row pass.
    pub active: bool,
}

impl DownRule {
    /// The rule of `pool`.
    pub fn of(pool: &Pool) -> DownRule {
        match &pool.health {
            Some(h) => DownRule {
                fails: pool.fails,
                backoff: h.interval * h.passes,
                active: true,
            },
            None => DownRule {
                fails: pool.fails,
                backoff: PASSIVE_BACKOFF,
                active: false,
            },
        }
    }
}

/// Every pool's live state, gateway-wide, by name. A reload keeps the state of the pools whose
/// name it keeps.
#[derive(Debug, Default)]
pub struct Pools {
    by_name: RwLock<HashMap<String, Arc<PoolState>>>,
}

impl Pools {
    /// No pools yet.
    pub fn new() -> Arc<Pools> {
        Arc::default()
    }

    /// Brings the live state in line with `config`: new pools are added, kept pools keep
    /// their endpoints' state and take the configured list, removed pools go (their open
    /// connections hold their endpoints' counts to their end).
    pub fn sync(&self, config: &Config) {
        let mut by_name = self.by_name.write().expect("pools never poisoned");
        by_name.retain(|name, _| config.pool(name).is_some());
        for pool in &config.upstreams {
            let state = by_name
                .entry(pool.name.clone())
                .or_insert_with(|| Arc::new(PoolState::new(&pool.name)));
            let listed: Vec<(String, u32)> = pool
                .endpoints
                .iter()
                .map(|e| (e.url.clone(), e.weight))
                .collect();
            state.set_endpoints(Source::Config, &listed);
        }
    }

    /// The live state of the pool `name`.
    pub fn get(&self, name: &str) -> Option<Arc<PoolState>> {
        self.by_name
            .read()
            .expect("pools never poisoned")
            .get(name)
            .cloned()
    }

    /// Every pool, by name.
    pub fn all(&self) -> Vec<Arc<PoolState>> {
        let mut all: Vec<_> = self
            .by_name
            .read()
            .expect("pools never poisoned")
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

/// The URL to connect to on `endpoint`: its base, then `path` (which starts with `/`).
pub fn endpoint_url(endpoint: &str, path: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    let mut url = String::with_capacity(base.len() + path.len());
    url.push_str(base);
    url.push_str(path);
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: DownRule = DownRule {
        fails: 1,
        backoff: Duration::from_secs(30),
        active: false,
    };

    fn config(endpoints: &str) -> Config {
        let toml = format!(
            "[[upstream]]\nname = \"p\"\nendpoints = [{endpoints}]\n[[route]]\npath = \"/\"\nupstream = \"p\"\n"
        );
        Config::from_toml(&toml, std::path::Path::new("t.toml")).unwrap()
    }

    #[tokio::test]
    async fn state_survives_a_reload_and_removed_endpoints_drain() {
        let pools = Pools::new();
        let c1 = config("\"ws://a:1\", \"ws://b:1\"");
        pools.sync(&c1);
        let state = pools.get("p").unwrap();
        let a = state.endpoints()[0].clone();
        let guard = EndpointGuard::new(a.clone());
        state.failed(&a, FailureKind::Connect, RULE);
        // Reload without b and with c: a keeps its count and its failure.
        pools.sync(&config("\"ws://a:1\", \"ws://c:1\""));
        let again = pools.get("p").unwrap();
        assert!(Arc::ptr_eq(&state, &again));
        let a2 = again
            .endpoints()
            .into_iter()
            .find(|e| e.url == "ws://a:1")
            .unwrap();
        assert!(Arc::ptr_eq(&a, &a2));
        assert_eq!(a2.open(), 1);
        assert!(a2.marked_down());
        let urls: Vec<_> = again.endpoints().iter().map(|e| e.url.clone()).collect();
        assert_eq!(urls, ["ws://a:1", "ws://c:1"]);
        // a removed while it has a connection: draining, then gone once it ends.
        pools.sync(&config("\"ws://c:1\""));
        assert!(a.is_draining());
        assert_eq!(again.endpoints().len(), 2);
        drop(guard);
        pools.sync(&config("\"ws://c:1\""));
        assert_eq!(again.endpoints().len(), 1);
    }

    #[tokio::test]
    async fn all_down_is_told_apart_from_all_tried() {
        let pools = Pools::new();
        let c = config("\"ws://a:1\", \"ws://b:1\"");
        pools.sync(&c);
        let pool = c.pool("p").unwrap();
        let state = pools.get("p").unwrap();
        let [a, b] = [state.endpoints()[0].clone(), state.endpoints()[1].clone()];
        let Pick::Endpoint(first) = state.pick(pool, None, None, &[]) else {
            panic!("an endpoint is up")
        };
        let Pick::Endpoint(second) = state.pick(pool, None, None, std::slice::from_ref(&first))
        else {
            panic!("another endpoint is up")
        };
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(matches!(
            state.pick(pool, None, None, &[first, second]),
            Pick::Exhausted
        ));
        state.failed(&a, FailureKind::Connect, RULE);
        state.failed(&b, FailureKind::Connect, RULE);
        assert!(matches!(
            state.pick(pool, None, None, &[]),
            Pick::AllDown { retry_after } if retry_after > Duration::from_secs(28)
        ));
        // A sticky id goes to its endpoint while it is up.
        state.succeeded(&b);
        state.succeeded(&a);
        for _ in 0..4 {
            let Pick::Endpoint(e) = state.pick(pool, None, Some(&b.id), &[]) else {
                panic!()
            };
            assert!(Arc::ptr_eq(&e, &b));
        }
    }
}
