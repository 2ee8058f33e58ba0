//! The fleet: `gw.shared` and `gw.limit` in Redis, shared by every gateway that names the
//! same Redis and `key_prefix` (`[shared] backend = "redis"`).
//!
//! - [`Fleet`] implements the policy engine's [`FleetStore`]: what may wait (`on_upgrade`,
//!   `on_close`) is one script or command, bounded by `shared.timeout`; what a frame policy
//!   calls never waits: reads come from [`cache`], writes are sent behind by its writer, and
//!   `gw.limit` takes tokens leased beforehand ([`limit`]).
//! - Health: a command that fails for want of Redis marks the backend down (logged once);
//!   while it is down, operations fail at once instead of each waiting for the timeout, and a
//!   probe every second brings it back up (logged once). `framegate_shared_backend_up` and
//!   `framegate_shared_errors_total{op}` count it.
//! - Leases: this instance's heartbeat renews `<prefix>live:<member>` every third of
//!   `shared.lease`; leased counts (see [`scripts`]) keep a member's shares while that key lives.
//!
//! The policy engine sees none of this but the trait; no socket is touched outside this module.

mod cache;
mod limit;
pub mod registry;
mod scripts;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::{OnUnavailable, RedisConfig, RedisTarget};
use crate::policy::shared::{
    decode, encode, FleetError, FleetReply, FleetStore, SharedValue, Write,
};

/// The operations counted by `framegate_shared_errors_total{op}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Op {
    /// `gw.shared.get` (and the frame cache's fetches).
    Get = 0,
    /// `gw.shared.set` and `delete`.
    Set,
    /// `gw.shared.incr`.
    Incr,
    /// `gw.limit`'s leases.
    Limit,
    /// The heartbeat and the probe.
    Heartbeat,
    /// A frame policy's write refused because the queue of writes was full.
    QueueFull,
    /// The fleet-wide registry's publication or subscription.
    Registry,
}

impl Op {
    const ALL: [Op; 7] = [
        Op::Get,
        Op::Set,
        Op::Incr,
        Op::Limit,
        Op::Heartbeat,
        Op::QueueFull,
        Op::Registry,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::Incr => "incr",
            Op::Limit => "limit",
            Op::Heartbeat => "heartbeat",
            Op::QueueFull => "queue_full",
            Op::Registry => "registry",
        }
    }
}

thread_local! {
    /// A worker thread's own connections, by [`Fleet::id`] (one per gateway in the process)
    /// and the generation of the primary they reach.
    static WORKER_CONNECTIONS: std::cell::RefCell<Vec<(u64, u64, ConnectionManager)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A Redis primary and the gateway's connection to it.
struct Primary {
    client: redis::Client,
    conn: ConnectionManager,
    generation: u64,
}

/// Numbers the [`Fleet`]s of this process.
static NEXT_FLEET: AtomicU64 = AtomicU64::new(1);

/// This gateway's handle on the fleet's store.
pub struct Fleet {
    /// Tells this gateway's worker connections from another's in the same process.
    id: u64,
    config: RedisConfig,
    /// This instance's name in the fleet.
    instance: String,
    /// `instance#incarnation`: the field of its shares in leased counts. A restarted instance
    /// is a new member: its predecessor's shares go with the predecessor's lease.
    member: String,
    /// The Redis it talks to now: set by [`Fleet::start`] (in the runtime that drives its
    /// connection), replaced when the Sentinels name another primary.
    primary: ArcSwapOption<Primary>,
    /// Numbers the primaries installed, so that worker connections to an old one are dropped.
    generation: AtomicU64,
    scripts: scripts::Scripts,
    up: AtomicBool,
    errors: [AtomicU64; 7],
    cache: cache::Cache,
    leases: limit::Leases,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("url", &self.config.shown_url())
            .field("member", &self.member)
            .finish()
    }
}

/// The default instance name: the host's name and `port` (the admin listener's).
pub fn default_instance(port: Option<u16>) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "framegate".to_owned());
    match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    }
}

impl Fleet {
    /// A handle on the store `config` names, for the instance `instance`. Connects nothing:
    /// [`Fleet::start`] does, and until then every operation fails as unavailable.
    pub fn new(
        config: &RedisConfig,
        instance: String,
        max_cached: usize,
    ) -> Result<Arc<Fleet>, String> {
        if config.target == RedisTarget::Direct {
            redis::Client::open(config.url.as_str())
                .map_err(|e| format!("shared.url {}: {e}", config.shown_url()))?;
        }
        let incarnation: u32 = rand::random();
        Ok(Arc::new(Fleet {
            id: NEXT_FLEET.fetch_add(1, Relaxed),
            member: format!("{instance}#{incarnation:08x}"),
            instance,
            config: config.clone(),
            primary: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            scripts: scripts::Scripts::new(),
            up: AtomicBool::new(false),
            errors: Default::default(),
            cache: cache::Cache::new(max_cached),
            leases: limit::Leases::default(),
        }))
    }

    /// This instance's name in the fleet.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// `shared.timeout`.
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// Connects (lazily: a Redis that is down now is retried with backoff) and starts the
    /// heartbeat, the frame cache's refresher and the writer, on the current runtime, until
    /// `stop`. Waits at most `shared.timeout` for a first heartbeat.
    pub async fn start(self: &Arc<Fleet>, stop: tokio_util::sync::CancellationToken) {
        self.resolve().await;
        self.heartbeat().await;
        let me = self.clone();
        let stopped = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stopped.cancelled() => {}
                () = me.beat() => {}
            }
        });
        let writes = self.cache.take_writes();
        let me = self.clone();
        let stopped = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stopped.cancelled() => {}
                () = cache::refresh(&me) => {}
            }
        });
        if let Some(writes) = writes {
            let me = self.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = cache::write(&me, writes) => {}
                }
            });
        }
    }

    /// Renews the lease every third of `shared.lease`; while Redis is down, probes every
    /// second.
    async fn beat(&self) {
        let every = self.config.lease / 3;
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1).min(every)).await;
            if !self.is_up() {
                // After a failover the Sentinels name another primary.
                self.resolve().await;
            } else if last.elapsed() < every {
                continue;
            }
            self.heartbeat().await;
            last = tokio::time::Instant::now();
        }
    }

    /// Finds the Redis to talk to: the URL's, or the primary the Sentinels name now. A new
    /// one replaces the connections to the old.
    async fn resolve(&self) {
        let RedisTarget::Sentinel {
            sentinels,
            service,
            db,
            username,
            password,
        } = &self.config.target
        else {
            if self.primary.load().is_none() {
                let client = match &self.config.ca {
                    None => redis::Client::open(self.config.url.as_str()),
                    Some(ca) => redis::Client::build_with_tls(
                        self.config.url.as_str(),
                        redis::TlsCertificates {
                            client_tls: None,
                            root_cert: Some(ca.clone()),
                        },
                    ),
                };
                match client {
                    Ok(client) => self.install(client),
                    Err(e) => {
                        tracing::error!(url = %self.config.shown_url(), error = %e, "shared backend: cannot set up the Redis client")
                    }
                }
            }
            return;
        };
        let mut info = redis::RedisConnectionInfo::default().set_db(*db);
        if let Some(user) = username {
            info = info.set_username(user);
        }
        if let Some(password) = password {
            info = info.set_password(password);
        }
        let node =
            redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
        let asked = async {
            let mut sentinel = redis::sentinel::SentinelClient::build(
                sentinels.clone(),
                service,
                Some(node),
                redis::sentinel::SentinelServerType::Master,
            )?;
            sentinel.async_get_client().await
        };
        // The Sentinels are asked one after the other: give them a few timeouts.
        match tokio::time::timeout(self.config.timeout * 4, asked).await {
            Ok(Ok(client)) => {
                let current = self.primary.load();
                let same = current.as_ref().is_some_and(|p| {
                    p.client.get_connection_info().addr() == client.get_connection_info().addr()
                });
                if !same {
                    tracing::info!(primary = %client.get_connection_info().addr(), service = %service, "shared backend: the Sentinels name the primary");
                    self.install(client);
                }
            }
            Ok(Err(e)) => {
                self.count(Op::Heartbeat);
                self.mark_down(&format!("no primary from the Sentinels: {e}"));
            }
            Err(_) => {
                self.timed_out(Op::Heartbeat);
            }
        }
    }

    /// Makes `client`'s Redis the one to talk to.
    fn install(&self, client: redis::Client) {
        match ConnectionManager::new_lazy_with_config(client.clone(), self.manager_config()) {
            Ok(conn) => {
                let generation = self.generation.fetch_add(1, Relaxed) + 1;
                self.primary.store(Some(Arc::new(Primary {
                    client,
                    conn,
                    generation,
                })));
            }
            Err(e) => {
                tracing::error!(url = %self.config.shown_url(), error = %e, "shared backend: cannot set up the Redis client")
            }
        }
    }

    /// One heartbeat: renews this member's lease key.
    async fn heartbeat(&self) {
        let Some(mut conn) = self.primary.load().as_ref().map(|p| p.conn.clone()) else {
            return;
        };
        let key = self.live_key(&self.member);
        let ms = self.config.lease.as_millis() as u64;
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(1).arg("PX").arg(ms);
        let set = cmd.query_async::<()>(&mut conn);
        match tokio::time::timeout(self.config.timeout, set).await {
            Ok(Ok(())) => self.mark_up(),
            Ok(Err(e)) => {
                self.count(Op::Heartbeat);
                self.mark_down(&e);
            }
            Err(_) => {
                self.timed_out(Op::Heartbeat);
            }
        }
    }

    /// Whether Redis answered the last command.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Relaxed) {
            tracing::info!(url = %self.config.shown_url(), instance = %self.instance, "shared backend up");
        }
    }

    fn mark_down(&self, error: &dyn std::fmt::Display) {
        if self.up.swap(false, Relaxed) {
            tracing::warn!(url = %self.config.shown_url(), error = %error, "shared backend down: limits follow shared.on_unavailable until it answers again");
        }
    }

    /// An operation got no answer within `shared.timeout`: Redis counts as down.
    fn timed_out(&self, op: Op) -> FleetError {
        self.count(op);
        self.mark_down(&format!(
            "no answer within shared.timeout ({:?})",
            self.config.timeout
        ));
        FleetError::Unavailable
    }

    fn count(&self, op: Op) {
        self.errors[op as usize].fetch_add(1, Relaxed);
    }

    /// What `/metrics` shows.
    pub fn sample(&self) -> crate::metrics::SharedBackendSample {
        crate::metrics::SharedBackendSample {
            up: self.is_up(),
            errors: Op::ALL
                .iter()
                .map(|op| (op.as_str(), self.errors[*op as usize].load(Relaxed)))
                .collect(),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}s:{key}", self.config.key_prefix)
    }

    fn live_key(&self, member: &str) -> String {
        format!("{}live:{member}", self.config.key_prefix)
    }

    fn live_prefix(&self) -> String {
        format!("{}live:", self.config.key_prefix)
    }

    /// The connection, when Redis is up; else the operation fails at once (the probe brings
    /// it back). A worker thread gets one of its own, driven by its own runtime: a policy's
    /// command then goes out and its answer comes back without waking another thread.
    fn connection(&self, op: Op) -> Result<ConnectionManager, FleetError> {
        let primary = self.primary.load();
        let primary = match primary.as_ref() {
            Some(primary) if self.is_up() => primary,
            _ => {
                self.count(op);
                return Err(FleetError::Unavailable);
            }
        };
        let shared = &primary.conn;
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        if !on_worker {
            return Ok(shared.clone());
        }
        WORKER_CONNECTIONS.with(|conns| {
            let mut conns = conns.borrow_mut();
            if let Some((_, generation, conn)) = conns.iter().find(|(id, _, _)| *id == self.id) {
                if *generation == primary.generation {
                    return Ok(conn.clone());
                }
            }
            // A connection to an older primary goes.
            conns.retain(|(id, _, _)| *id != self.id);
            match ConnectionManager::new_lazy_with_config(
                primary.client.clone(),
                self.manager_config(),
            ) {
                Ok(conn) => {
                    conns.push((self.id, primary.generation, conn.clone()));
                    Ok(conn)
                }
                Err(_) => Ok(shared.clone()),
            }
        })
    }

    /// How every connection to Redis is made and kept.
    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.config.timeout))
            .set_response_timeout(Some(self.config.timeout))
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(5))
            .set_number_of_retries(3)
    }

    /// Maps a failed command: Redis's own refusal goes to the policy; anything else means
    /// Redis is not there.
    fn failed(&self, op: Op, error: redis::RedisError) -> FleetError {
        self.count(op);
        // A replica (the old primary, after a failover) refuses writes: that is a Redis to
        // leave, not a refusal for the policy.
        let read_only = error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
        let refused = matches!(
            error.kind(),
            redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
        ) && !error.is_timeout()
            && !read_only;
        if refused {
            let detail = error.detail().unwrap_or("refused").to_owned();
            return FleetError::Refused(detail);
        }
        self.mark_down(&error);
        FleetError::Unavailable
    }

    /// Reads `key` (the script sums a leased count's live shares).
    async fn fetch(self: &Arc<Self>, key: &str) -> Result<Option<SharedValue>, FleetError> {
        let mut conn = self.connection(Op::Get)?;
        let text: Option<Vec<u8>> = self
            .scripts
            .get
            .key(self.key(key))
            .arg(self.live_prefix())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.failed(Op::Get, e))?;
        Ok(text.as_deref().and_then(decode))
    }

    async fn store(
        self: &Arc<Self>,
        key: &str,
        value: Option<SharedValue>,
        ttl: Option<Duration>,
    ) -> Result<(), FleetError> {
        let mut conn = self.connection(Op::Set)?;
        let cmd = match &value {
            None => {
                let mut c = redis::cmd("DEL");
                c.arg(self.key(key));
                c
            }
            Some(value) => {
                let mut c = redis::cmd("SET");
                c.arg(self.key(key)).arg(encode(value));
                if let Some(ttl) = ttl {
                    c.arg("PX").arg((ttl.as_millis() as u64).max(1));
                }
                c
            }
        };
        let result: redis::RedisResult<()> = cmd.query_async(&mut conn).await;
        result.map_err(|e| self.failed(Op::Set, e))?;
        self.cache.seen(key, value);
        Ok(())
    }

    async fn add(
        self: &Arc<Self>,
        key: &str,
        by: SharedValue,
        ttl: Option<Duration>,
        lease: bool,
    ) -> Result<SharedValue, FleetError> {
        let mut conn = self.connection(Op::Incr)?;
        let (amount, float) = match &by {
            SharedValue::Int(i) => (i.to_string(), ""),
            SharedValue::Float(f) => (format!("{f:?}"), "f"),
            _ => return Err(FleetError::Refused("the increment must be a number".into())),
        };
        let ttl_ms = ttl.map_or(0, |t| (t.as_millis() as u64).max(1));
        let text: Vec<u8> = if lease {
            self.scripts
                .incr_leased
                .key(self.key(key))
                .arg(amount)
                .arg(ttl_ms)
                .arg(&self.member)
                .arg(self.live_prefix())
                .arg(float)
                .invoke_async(&mut conn)
                .await
        } else {
            self.scripts
                .incr
                .key(self.key(key))
                .arg(amount)
                .arg(ttl_ms)
                .arg(float)
                .invoke_async(&mut conn)
                .await
        }
        .map_err(|e| self.failed(Op::Incr, e))?;
        let value = decode(&text).ok_or_else(|| FleetError::Refused("not a number".into()))?;
        self.cache.seen(key, Some(value.clone()));
        Ok(value)
    }
}

/// Bounds `op` by `shared.timeout` (the client's own timeouts bound each command; this bounds
/// a reconnection too): past it, Redis counts as down.
fn bounded<T: Send + 'static>(
    fleet: &Arc<Fleet>,
    counted: Op,
    op: impl std::future::Future<Output = Result<T, FleetError>> + Send + 'static,
) -> FleetReply<T> {
    let fleet = fleet.clone();
    Box::pin(async move {
        match tokio::time::timeout(fleet.config.timeout, op).await {
            Ok(done) => done,
            Err(_) => Err(fleet.timed_out(counted)),
        }
    })
}

impl FleetStore for Arc<Fleet> {
    fn get(&self, key: &str) -> FleetReply<Option<SharedValue>> {
        let (me, key) = (self.clone(), key.to_owned());
        bounded(self, Op::Get, async move { me.fetch(&key).await })
    }

    fn set(&self, key: &str, value: Option<SharedValue>, ttl: Option<Duration>) -> FleetReply<()> {
        let (me, key) = (self.clone(), key.to_owned());
        bounded(
            self,
            Op::Set,
            async move { me.store(&key, value, ttl).await },
        )
    }

    fn incr(
        &self,
        key: &str,
        by: SharedValue,
        ttl: Option<Duration>,
        lease: bool,
    ) -> FleetReply<SharedValue> {
        let (me, key) = (self.clone(), key.to_owned());
        bounded(
            self,
            Op::Incr,
            async move { me.add(&key, by, ttl, lease).await },
        )
    }

    fn cached(&self, key: &str) -> Option<SharedValue> {
        self.cache.get(key)
    }

    fn behind(&self, write: Write) -> Result<Option<SharedValue>, FleetError> {
        self.cache
            .behind(write)
            .inspect_err(|_| self.count(Op::QueueFull))
    }

    fn limit(&self, key: &str, rate: f64, burst: f64) -> bool {
        if !self.is_up() {
            return self.config.on_unavailable == OnUnavailable::Allow;
        }
        limit::take(self, key, rate, burst)
    }

    fn on_unavailable(&self) -> OnUnavailable {
        self.config.on_unavailable
    }
}

/// What the fleet-wide registry ([`registry`]) needs of this handle.
impl Fleet {
    /// The Redis it talks to now, and that primary's generation (the registry makes its own
    /// connections from it, and makes them again when a failover installs another).
    pub(crate) fn primary(&self) -> Option<(u64, redis::Client)> {
        self.primary
            .load()
            .as_ref()
            .map(|p| (p.generation, p.client.clone()))
    }

    /// `instance#incarnation`.
    pub(crate) fn member(&self) -> &str {
        &self.member
    }

    /// Counts a failure of the registry's publication or subscription.
    pub(crate) fn registry_failed(&self) {
        self.count(Op::Registry);
    }

    /// `shared.key_prefix`.
    pub(crate) fn key_prefix(&self) -> &str {
        &self.config.key_prefix
    }

    /// `shared.lease`.
    pub(crate) fn lease(&self) -> Duration {
        self.config.lease
    }
}
