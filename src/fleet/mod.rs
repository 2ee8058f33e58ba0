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
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::{OnUnavailable, RedisConfig};
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
}

impl Op {
    const ALL: [Op; 6] = [
        Op::Get,
        Op::Set,
        Op::Incr,
        Op::Limit,
        Op::Heartbeat,
        Op::QueueFull,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::Incr => "incr",
            Op::Limit => "limit",
            Op::Heartbeat => "heartbeat",
            Op::QueueFull => "queue_full",
        }
    }
}

/// What `/metrics` shows of the fleet's store.
#[derive(Debug, Clone)]
pub struct FleetSample {
    /// Whether Redis answers.
    pub up: bool,
    /// Failed operations, by `op`.
    pub errors: Vec<(&'static str, u64)>,
}

/// This gateway's handle on the fleet's store.
pub struct Fleet {
    config: RedisConfig,
    /// This instance's name in the fleet.
    instance: String,
    /// `instance#incarnation`: the field of its shares in leased counts. A restarted instance
    /// is a new member: its predecessor's shares go with the predecessor's lease.
    member: String,
    client: redis::Client,
    /// Made by [`Fleet::start`], in the runtime that drives it.
    conn: OnceLock<ConnectionManager>,
    scripts: scripts::Scripts,
    up: AtomicBool,
    errors: [AtomicU64; 6],
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
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| format!("shared.url {}: {e}", config.shown_url()))?;
        let incarnation: u32 = rand::random();
        Ok(Arc::new(Fleet {
            member: format!("{instance}#{incarnation:08x}"),
            instance,
            config: config.clone(),
            client,
            conn: OnceLock::new(),
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
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.config.timeout))
            .set_response_timeout(Some(self.config.timeout))
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(5))
            .set_number_of_retries(3);
        match ConnectionManager::new_lazy_with_config(self.client.clone(), manager) {
            Ok(conn) => {
                let _ = self.conn.set(conn);
            }
            Err(e) => {
                tracing::error!(url = %self.config.shown_url(), error = %e, "shared backend: cannot set up the Redis client");
                return;
            }
        }
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
        loop {
            let every = if self.is_up() {
                self.config.lease / 3
            } else {
                Duration::from_secs(1).min(self.config.lease / 3)
            };
            tokio::time::sleep(every).await;
            self.heartbeat().await;
        }
    }

    /// One heartbeat: renews this member's lease key.
    async fn heartbeat(&self) {
        let Some(mut conn) = self.conn.get().cloned() else {
            return;
        };
        let key = self.live_key(&self.member);
        let ms = self.config.lease.as_millis() as u64;
        let result: redis::RedisResult<()> = redis::cmd("SET")
            .arg(&key)
            .arg(1)
            .arg("PX")
            .arg(ms)
            .query_async(&mut conn)
            .await;
        match result {
            Ok(()) => self.mark_up(),
            Err(e) => {
                self.count(Op::Heartbeat);
                self.mark_down(&e);
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

    fn mark_down(&self, error: &redis::RedisError) {
        if self.up.swap(false, Relaxed) {
            tracing::warn!(url = %self.config.shown_url(), error = %error, "shared backend down: limits follow shared.on_unavailable until it answers again");
        }
    }

    fn count(&self, op: Op) {
        self.errors[op as usize].fetch_add(1, Relaxed);
    }

    /// What `/metrics` shows.
    pub fn sample(&self) -> FleetSample {
        FleetSample {
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
    /// it back).
    fn connection(&self, op: Op) -> Result<ConnectionManager, FleetError> {
        match self.conn.get() {
            Some(conn) if self.is_up() => Ok(conn.clone()),
            _ => {
                self.count(op);
                Err(FleetError::Unavailable)
            }
        }
    }

    /// Maps a failed command: Redis's own refusal goes to the policy; anything else means
    /// Redis is not there.
    fn failed(&self, op: Op, error: redis::RedisError) -> FleetError {
        self.count(op);
        let refused = matches!(
            error.kind(),
            redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
        ) && !error.is_timeout();
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
/// a reconnection too).
fn bounded<T: Send + 'static>(
    timeout: Duration,
    op: impl std::future::Future<Output = Result<T, FleetError>> + Send + 'static,
) -> FleetReply<T> {
    Box::pin(async move {
        tokio::time::timeout(timeout, op)
            .await
            .unwrap_or(Err(FleetError::Unavailable))
    })
}

impl FleetStore for Arc<Fleet> {
    fn get(&self, key: &str) -> FleetReply<Option<SharedValue>> {
        let (me, key) = (self.clone(), key.to_owned());
        bounded(self.config.timeout, async move { me.fetch(&key).await })
    }

    fn set(&self, key: &str, value: Option<SharedValue>, ttl: Option<Duration>) -> FleetReply<()> {
        let (me, key) = (self.clone(), key.to_owned());
        bounded(self.config.timeout, async move {
            me.store(&key, value, ttl).await
        })
    }

    fn incr(
        &self,
        key: &str,
        by: SharedValue,
        ttl: Option<Duration>,
        lease: bool,
    ) -> FleetReply<SharedValue> {
        let (me, key) = (self.clone(), key.to_owned());
        bounded(self.config.timeout, async move {
            me.add(&key, by, ttl, lease).await
        })
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
    /// The Redis client (the registry makes its own connections from it).
    pub(crate) fn client(&self) -> &redis::Client {
        &self.client
    }

    /// `instance#incarnation`.
    pub(crate) fn member(&self) -> &str {
        &self.member
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
