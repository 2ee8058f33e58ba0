//! The registry across the fleet: `scope=fleet` on `GET /admin/connections`,
//! `DELETE /admin/connections` and `POST /admin/broadcast` (docs/operations.md, "Fleet-wide
//! registry").
//!
//! - Publishing: every third of `shared.lease`, this instance writes a summary of its open
//!   connections (id, route, client address, opened and expiry times, snapshot, counts, tags;
//!   never a payload, a ctx, a request header or the upstream URL) to
//!   `<prefix>reg:<member>`, with a PX of `shared.lease`, and adds itself to the set
//!   `<prefix>reg`: a dead instance's entries vanish with its lease (and readers drop it from
//!   the set); a stopped one deletes both. It starts publishing once it listens for commands. At most [`MAX_PUBLISHED`] connections and
//!   [`MAX_PUBLISHED_BYTES`] of JSON are published (the oldest ids first); past either bound,
//!   the rest are left out and the instance is named in the listing's `truncated`.
//! - Listing: this instance's own connections come from its registry (fresh); every other
//!   member's from its published key (at most a third of the lease old), filtered by the same
//!   [`Filter::matches`] as the local listing.
//! - Kicks and broadcasts go through pub/sub ([`commands`]): a command on `<prefix>cmd`, one
//!   answer per instance on the asker's reply channel, collected for at most [`REPLY_WAIT`].
//!
//! The registry's traffic has its own Redis connection: its values are large next to
//! `gw.shared`'s, and must neither queue in front of a handshake's `incr` nor be held to
//! `shared.timeout`. While the fleet's store is down (its health, see [`Fleet::is_up`]), every
//! `scope=fleet` request fails at once with [`FleetScopeError::Unavailable`].

mod commands;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Fleet;
use crate::registry::{Both, ConnSummary, Control, Filter, Outcome, Registry};

pub use commands::FleetOutcome;

/// Connections one instance publishes at most (the oldest ids first).
pub const MAX_PUBLISHED: usize = 100_000;
/// Bytes of JSON one instance publishes at most.
pub const MAX_PUBLISHED_BYTES: usize = 32 << 20;
/// Members a `scope=fleet` request reads or waits for at most.
pub const MAX_MEMBERS: usize = 1_000;
/// How long a kick or broadcast waits for the other instances' answers.
pub const REPLY_WAIT: Duration = Duration::from_secs(1);
/// Bound on one Redis command of the registry (a publication, a read, a subscription).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on a whole `scope=fleet` listing.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// The live members, at most `ARGV[2]` of them; a member whose publication has expired is
/// removed from the set. `KEYS[1]`: `<prefix>reg`; `ARGV[1]`: `<prefix>reg:`.
const LIVE_MEMBERS: &str = r"
local live = {}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. m) == 1 then
    if #live < tonumber(ARGV[2]) then live[#live + 1] = m end
  else
    redis.call('SREM', KEYS[1], m)
  end
end
return live
";

/// Why a `scope=fleet` request could not be served (the admin answers 503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetScopeError {
    /// Redis does not answer, or did not in time.
    #[error("scope=fleet: the shared backend (Redis) is unreachable ({0}); scope=local still answers for this instance")]
    Unavailable(String),
}

/// One connection as an instance publishes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishedConn {
    /// Connection id (unique within its instance).
    pub id: u64,
    /// Route name.
    pub route: String,
    /// Client address.
    pub client: SocketAddr,
    /// RFC 3339, UTC.
    pub opened_at: String,
    /// RFC 3339, UTC; absent when the route has no `expire`.
    pub expires_at: Option<String>,
    /// The instance's configuration snapshot number.
    pub snapshot: u64,
    /// Messages forwarded each way, as of the publication.
    pub messages: Both,
    /// Payload bytes forwarded each way, as of the publication.
    pub bytes: Both,
    /// Tags, by key.
    pub tags: BTreeMap<String, String>,
}

impl From<ConnSummary> for PublishedConn {
    fn from(c: ConnSummary) -> PublishedConn {
        PublishedConn {
            id: c.id,
            route: c.route,
            client: c.client,
            opened_at: c.opened_at,
            expires_at: c.expires_at,
            snapshot: c.snapshot,
            messages: c.messages,
            bytes: c.bytes,
            tags: c.tags,
        }
    }
}

/// The value of `<prefix>reg:<member>`, as a listing reads it (it also holds
/// `published_at` and `open`, the number of connections open at the publication).
#[derive(Debug, Deserialize)]
struct Published {
    instance: String,
    truncated: bool,
    connections: Vec<PublishedConn>,
}

/// A connection in a `scope=fleet` listing: where it is, and what its instance published.
#[derive(Debug, Clone, Serialize)]
pub struct FleetConn {
    /// The instance holding it (`shared.instance`).
    pub instance: String,
    /// The rest, as in the local listing (without `upstream`).
    #[serde(flatten)]
    pub conn: PublishedConn,
}

/// A `scope=fleet` listing.
#[derive(Debug, Clone, Serialize)]
pub struct FleetListing {
    /// Matches, by instance and ascending id, at most the filter's `limit`.
    pub connections: Vec<FleetConn>,
    /// Number of matches before the limit.
    pub matched: usize,
    /// The instances read (this one and every member with a live publication).
    pub instances: Vec<String>,
    /// Instances that published only part of their connections (over the bounds).
    pub truncated: Vec<String>,
}

/// This gateway's side of the fleet's registry.
pub struct FleetRegistry {
    fleet: Arc<Fleet>,
    registry: Arc<Registry>,
    /// Made by [`FleetRegistry::start`], for the registry's traffic only.
    /// Its own connection, and the generation of the primary it reaches.
    conn: Mutex<Option<(u64, ConnectionManager)>>,
    /// Whether the last publication went out (its failures are logged once each way).
    published: AtomicBool,
    /// Notified when the first subscription to the fleet's commands is made: an instance
    /// publishes (becomes a member that kicks wait for) only once it listens.
    listening: tokio::sync::Notify,
    /// [`LIVE_MEMBERS`].
    live_members: redis::Script,
    /// Set by [`FleetRegistry::unpublish`]: no publication after it.
    stopped: AtomicBool,
}

impl std::fmt::Debug for FleetRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetRegistry")
            .field("member", &self.fleet.member())
            .finish()
    }
}

impl FleetRegistry {
    /// The fleet-wide view of `registry`, through `fleet`'s Redis. Connects nothing until
    /// [`FleetRegistry::start`].
    pub fn new(fleet: Arc<Fleet>, registry: Arc<Registry>) -> Arc<FleetRegistry> {
        Arc::new(FleetRegistry {
            fleet,
            registry,
            conn: Mutex::new(None),
            published: AtomicBool::new(true),
            listening: tokio::sync::Notify::new(),
            live_members: redis::Script::new(LIVE_MEMBERS),
            stopped: AtomicBool::new(false),
        })
    }

    /// Starts publishing and listening for commands on the current runtime, until `stop`.
    /// [`FleetRegistry::unpublish`] at the end of a shutdown takes this instance out.
    pub fn start(self: &Arc<Self>, stop: CancellationToken) {
        let me = self.clone();
        let stopped = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stopped.cancelled() => {}
                () = me.publish_every() => {}
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = commands::serve(&me) => {}
            }
        });
    }

    /// This instance's name in the fleet.
    pub fn instance(&self) -> &str {
        self.fleet.instance()
    }

    /// `<prefix>reg:<member>`: a member's publication.
    fn key(&self, member: &str) -> String {
        format!("{}reg:{member}", self.fleet.key_prefix())
    }

    /// `<prefix>reg`: the set of members that have published (the dead ones are dropped by
    /// the readers, see [`LIVE_MEMBERS`]).
    fn members_key(&self) -> String {
        format!("{}reg", self.fleet.key_prefix())
    }

    /// The connection, while the fleet's store is up.
    fn connection(&self) -> Result<ConnectionManager, FleetScopeError> {
        match self.current() {
            Some(conn) if self.fleet.is_up() => Ok(conn),
            _ => Err(FleetScopeError::Unavailable(
                "it did not answer the last command; the gateway retries every second".into(),
            )),
        }
    }

    /// A client of the primary the fleet talks to now, for subscriptions.
    pub(super) fn client(&self) -> Result<redis::Client, FleetScopeError> {
        self.fleet.primary().map(|(_, c)| c).ok_or_else(|| {
            FleetScopeError::Unavailable("the gateway has not reached Redis yet".into())
        })
    }

    /// The registry's own connection to the primary the fleet talks to now, made again when
    /// a failover installed another; `None` before the fleet knows any.
    pub(super) fn current(&self) -> Option<ConnectionManager> {
        let (generation, client) = self.fleet.primary()?;
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((made_for, c)) = conn.as_ref() {
            if *made_for == generation {
                return Some(c.clone());
            }
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(5))
            .set_number_of_retries(3);
        match ConnectionManager::new_lazy_with_config(client, config) {
            Ok(c) => {
                *conn = Some((generation, c.clone()));
                Some(c)
            }
            Err(e) => {
                tracing::error!(error = %e, "fleet registry: cannot set up its Redis connection");
                None
            }
        }
    }

    async fn publish_every(&self) {
        let every = self.fleet.lease() / 3;
        self.listening.notified().await;
        loop {
            if self.fleet.is_up() {
                self.publish().await;
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Writes this instance's publication.
    async fn publish(&self) {
        let Ok(mut conn) = self.connection() else {
            return;
        };
        if self.stopped.load(Relaxed) {
            return;
        }
        let registry = self.registry.clone();
        let instance = self.instance().to_owned();
        // Listing and serialising up to MAX_PUBLISHED entries is not for the runtime's threads.
        let Ok(value) = tokio::task::spawn_blocking(move || {
            publication(&registry, &instance, MAX_PUBLISHED, MAX_PUBLISHED_BYTES)
        })
        .await
        else {
            return;
        };
        let ms = self.fleet.lease().as_millis() as u64;
        let result: redis::RedisResult<()> = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.key(self.fleet.member()))
            .arg(value)
            .arg("PX")
            .arg(ms)
            .ignore()
            .cmd("SADD")
            .arg(self.members_key())
            .arg(self.fleet.member())
            .ignore()
            .query_async(&mut conn)
            .await;
        match result {
            Ok(()) => {
                if !self.published.swap(true, Relaxed) {
                    tracing::info!("fleet registry: publishing again");
                }
            }
            Err(e) => {
                self.fleet.registry_failed();
                if self.published.swap(false, Relaxed) {
                    tracing::warn!(error = %e, "fleet registry: cannot publish this instance's connections; other instances stop listing them when its lease runs out");
                }
            }
        }
    }

    /// Deletes this instance's publication and leaves the set (at the end of a shutdown,
    /// within [`COMMAND_TIMEOUT`], best effort: else the lease removes it).
    pub async fn unpublish(&self) {
        self.stopped.store(true, Relaxed);
        let Some(mut conn) = self.current() else {
            return;
        };
        let mut gone = redis::pipe();
        gone.atomic()
            .cmd("DEL")
            .arg(self.key(self.fleet.member()))
            .ignore()
            .cmd("SREM")
            .arg(self.members_key())
            .arg(self.fleet.member())
            .ignore();
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, gone.query_async::<()>(&mut conn)).await;
    }

    /// Every member with a live publication but this one: `(member, instance)`, at most
    /// [`MAX_MEMBERS`]. One script reads the set of members and drops those whose
    /// publication has expired (instances that died); no scan of the keyspace.
    async fn members(
        &self,
        conn: &mut ConnectionManager,
    ) -> Result<BTreeMap<String, String>, FleetScopeError> {
        let live: Vec<String> = self
            .live_members
            .key(self.members_key())
            .arg(self.key(""))
            .arg(MAX_MEMBERS + 1)
            .invoke_async(conn)
            .await
            .map_err(unavailable)?;
        Ok(live
            .into_iter()
            .filter(|m| m != self.fleet.member())
            .take(MAX_MEMBERS)
            .map(|m| {
                let instance = m.rsplit_once('#').map_or(m.as_str(), |(i, _)| i).to_owned();
                (m, instance)
            })
            .collect())
    }

    /// `GET /admin/connections?scope=fleet`.
    pub async fn list(&self, f: &Filter) -> Result<FleetListing, FleetScopeError> {
        tokio::time::timeout(LIST_TIMEOUT, self.list_unbounded(f))
            .await
            .unwrap_or_else(|_| {
                Err(FleetScopeError::Unavailable(format!(
                    "the listing took over {LIST_TIMEOUT:?}"
                )))
            })
    }

    async fn list_unbounded(&self, f: &Filter) -> Result<FleetListing, FleetScopeError> {
        let mut conn = self.connection()?;
        let members = self.members(&mut conn).await?;
        let own = self.registry.list(f);
        let mut instances = BTreeSet::from([self.instance().to_owned()]);
        let mut truncated = BTreeSet::new();
        let mut matched = own.matched;
        let mut found: Vec<FleetConn> = own
            .connections
            .into_iter()
            .map(|c| FleetConn {
                instance: self.instance().to_owned(),
                conn: c.into(),
            })
            .collect();
        for member in members.keys() {
            let value: Option<Vec<u8>> = redis::cmd("GET")
                .arg(self.key(member))
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            // Gone since the scan (its lease ran out), or not ours to read: skipped.
            let Some(published) = value.and_then(|v| serde_json::from_slice::<Published>(&v).ok())
            else {
                continue;
            };
            instances.insert(published.instance.clone());
            if published.truncated {
                truncated.insert(published.instance.clone());
            }
            let mut kept = 0;
            for c in published.connections {
                let hit = f.matches(&c.route, c.client.ip(), c.snapshot, |k| {
                    c.tags.get(k).map(String::as_str)
                });
                if !hit {
                    continue;
                }
                matched += 1;
                if kept < f.limit {
                    kept += 1;
                    found.push(FleetConn {
                        instance: published.instance.clone(),
                        conn: c,
                    });
                }
            }
        }
        found.sort_by(|a, b| (&a.instance, a.conn.id).cmp(&(&b.instance, b.conn.id)));
        found.truncate(f.limit);
        Ok(FleetListing {
            connections: found,
            matched,
            instances: instances.into_iter().collect(),
            truncated: truncated.into_iter().collect(),
        })
    }

    /// `DELETE /admin/connections?scope=fleet` (a close) and `POST /admin/broadcast?scope=fleet`
    /// (a send): `control` for every connection matching `f` on every instance.
    pub async fn control_matching(
        &self,
        f: &Filter,
        control: &Control,
    ) -> Result<FleetOutcome, FleetScopeError> {
        commands::ask(self, f, control).await
    }

    /// What this instance does with a command: the local registry's bulk action.
    fn local(&self, f: &Filter, control: &Control) -> Outcome {
        self.registry.control_matching(f, control)
    }
}

/// This instance's publication as JSON: its connections, the oldest ids first, at most
/// `max` of them in at most `max_bytes` (of their JSON).
fn publication(registry: &Registry, instance: &str, max: usize, max_bytes: usize) -> Vec<u8> {
    let all = Filter {
        limit: max,
        ..Filter::default()
    };
    let listing = registry.list(&all);
    let mut truncated = listing.matched > listing.connections.len();
    let mut conns: Vec<u8> = Vec::new();
    for (i, c) in listing.connections.into_iter().enumerate() {
        let Ok(json) = serde_json::to_vec(&PublishedConn::from(c)) else {
            continue;
        };
        if conns.len() + json.len() + 1 > max_bytes {
            truncated = true;
            break;
        }
        if i > 0 {
            conns.push(b',');
        }
        conns.extend_from_slice(&json);
    }
    let head = serde_json::json!({
        "instance": instance,
        "published_at": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "open": listing.matched,
        "truncated": truncated,
    })
    .to_string();
    // `{...head fields..., "connections": [conns]}`
    let mut out = Vec::with_capacity(head.len() + conns.len() + 20);
    out.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
    out.extend_from_slice(b",\"connections\":[");
    out.extend_from_slice(&conns);
    out.extend_from_slice(b"]}");
    out
}

fn unavailable(e: redis::RedisError) -> FleetScopeError {
    FleetScopeError::Unavailable(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{NewConnection, Tags, UpgradeRequest};

    fn conn(id: u64) -> NewConnection {
        let mut tags = Tags::default();
        tags.insert("user", "ann").unwrap();
        NewConnection {
            id,
            route: "/chat".into(),
            client: "10.0.0.1:5000".parse().unwrap(),
            upstream: "ws://u:secret@127.0.0.1:9/".into(),
            opened_at: SystemTime::UNIX_EPOCH,
            expires_at: None,
            snapshot: 1,
            tags,
            request: UpgradeRequest::new("GET", "/chat", [("Cookie", &b"s3cret"[..])]),
            ctx: serde_json::json!({"token": "s3cret"}),
            capture_config: Arc::default(),
            capture: None,
        }
    }

    #[test]
    fn a_publication_past_its_bounds_keeps_the_oldest_and_says_truncated() {
        let registry = Registry::new();
        let _held: Vec<_> = (1..=5)
            .map(|id| registry.register(conn(id)).unwrap())
            .collect();
        let by_count: Published =
            serde_json::from_slice(&publication(&registry, "gw-1", 2, MAX_PUBLISHED_BYTES))
                .unwrap();
        assert!(by_count.truncated);
        let ids: Vec<u64> = by_count.connections.iter().map(|c| c.id).collect();
        assert_eq!(ids, [1, 2]);
        let one = serde_json::to_vec(&by_count.connections[0]).unwrap().len();
        let by_bytes: Published =
            serde_json::from_slice(&publication(&registry, "gw-1", 100, 3 * one + 2)).unwrap();
        assert!(by_bytes.truncated);
        assert_eq!(by_bytes.connections.len(), 3);
        let whole: Published =
            serde_json::from_slice(&publication(&registry, "gw-1", 100, 1 << 20)).unwrap();
        assert!(!whole.truncated);
        assert_eq!(whole.connections.len(), 5);
    }

    #[test]
    fn a_publication_reads_back_and_filters_like_the_registry() {
        let registry = Registry::new();
        let _held = registry.register(conn(7)).unwrap();
        let bytes = publication(&registry, "gw-1", MAX_PUBLISHED, MAX_PUBLISHED_BYTES);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(!text.contains("secret"), "{text}");
        let p: Published = serde_json::from_slice(&bytes).unwrap();
        assert_eq!((p.instance.as_str(), p.truncated), ("gw-1", false));
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["open"], 1);
        let c = &p.connections[0];
        let f = Filter::from_query("tag=user:ann&client_ip=10.0.0.1", &[]).unwrap();
        assert!(f.matches(&c.route, c.client.ip(), c.snapshot, |k| c
            .tags
            .get(k)
            .map(String::as_str)));
        let f = Filter::from_query("tag=user:bob", &[]).unwrap();
        assert!(!f.matches(&c.route, c.client.ip(), c.snapshot, |k| c
            .tags
            .get(k)
            .map(String::as_str)));
    }
}
