//! The connection registry (issue 13 §3): every open WebSocket connection, what the admin API
//! lists, filters and inspects, and the bounded control channel through which the admin closes a
//! connection or sends it a message.
//!
//! Ownership:
//! - [`Registry`] (one per gateway, shared) maps connection ids to entries and indexes their
//!   tags. It takes locks (dashmap shards) only when a connection opens or closes and when the
//!   admin queries: never per message.
//! - A connection owns its [`Registration`] guard: dropping it removes the entry, so an entry
//!   cannot outlive its connection, whatever way the relay ends.
//! - Live counts are an `Arc<`[`ConnStats`]`>` of relaxed atomics with one writer (the relay);
//!   the admin reads them without a lock.
//! - Control messages wait in a mailbox of at most [`CONTROL_CAPACITY`] inside the entry
//!   (`registry/mailbox.rs`); the relay polls its [`ControlReceiver`] on each wake-up. A full
//!   mailbox is reported as [`ControlError::Busy`] (the admin answers 503), never waited on.
//!
//! Everything a connection brings is bounded here: tags ([`Tags`]), the recorded request
//! headers, and the frozen ctx's JSON size. Secrets in the upgrade request (`Authorization`,
//! `Proxy-Authorization`, `Cookie`, an `access_token` query parameter, subprotocols longer than
//! 32 bytes) are masked when the entry is
//! made ([`crate::request_record`]), so they never reach the admin API.

use std::collections::VecDeque;
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dashmap::DashMap;
use serde::Serialize;

mod mailbox;
pub use mailbox::ControlReceiver;
use mailbox::{Mailbox, Refused};

use crate::capture::Capture;
use crate::config::{CaptureConfig, CaptureMode};
use crate::metrics::Direction;
use crate::request_record::mask_query;
pub use crate::request_record::{UpgradeRequest, MAX_HEADERS, MAX_HEADER_BYTES};

/// Control messages one connection may have queued before the admin gets 503.
pub const CONTROL_CAPACITY: usize = 16;
/// Tags one connection may carry.
pub const MAX_TAGS: usize = 16;
/// Longest tag key, in bytes.
pub const MAX_TAG_KEY: usize = 64;
/// Longest tag value, in bytes.
pub const MAX_TAG_VALUE: usize = 256;
/// Largest frozen ctx kept, as JSON bytes; a larger one is shown as omitted.
pub const MAX_CTX_JSON: usize = 64 << 10;
/// Default and largest `limit` of a listing.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest `limit` a listing accepts.
pub const MAX_LIMIT: usize = 10_000;
/// Longest close reason: a close frame's payload is at most 125 bytes, 2 of them the code.
pub const MAX_CLOSE_REASON: usize = 123;
/// Captures of closed connections kept for the console (the newest ones).
pub const RECENT_CAPTURES: usize = 16;

/// Per-connection counters, written by the relay (single writer: relaxed load + store) and read
/// live by the admin.
#[derive(Debug, Default)]
pub struct ConnStats {
    messages: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    /// Where `conn:expire_at` moved the deadline, in milliseconds since the Unix epoch
    /// (0: not moved).
    moved_expiry: AtomicU64,
}

impl ConnStats {
    /// A data message of `bytes` payload bytes was forwarded `direction`. Call it from the
    /// connection's relay only.
    #[inline]
    pub fn message(&self, direction: Direction, bytes: usize) {
        let d = direction as usize;
        let m = &self.messages[d];
        m.store(m.load(Relaxed).wrapping_add(1), Relaxed);
        let b = &self.bytes[d];
        b.store(b.load(Relaxed).wrapping_add(bytes as u64), Relaxed);
    }

    /// Payload bytes of a message still arriving (relayed as it arrives); its
    /// [`message_done`](Self::message_done) follows when its last byte has gone through.
    #[inline]
    pub fn bytes(&self, direction: Direction, bytes: usize) {
        let b = &self.bytes[direction as usize];
        b.store(b.load(Relaxed).wrapping_add(bytes as u64), Relaxed);
    }

    /// A message whose bytes were counted by [`bytes`](Self::bytes) has been forwarded whole.
    #[inline]
    pub fn message_done(&self, direction: Direction) {
        let m = &self.messages[direction as usize];
        m.store(m.load(Relaxed).wrapping_add(1), Relaxed);
    }

    /// A policy moved the connection's deadline to `at` (`conn:expire_at`, after the cap).
    pub fn expires_at(&self, at: SystemTime) {
        let ms = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis().clamp(1, u64::MAX as u128) as u64);
        self.moved_expiry.store(ms, Relaxed);
    }

    /// Where a policy moved the deadline, if it did.
    fn moved_expiry(&self) -> Option<SystemTime> {
        match self.moved_expiry.load(Relaxed) {
            0 => None,
            ms => Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms)),
        }
    }

    /// The counts so far (the relay's close line reads its totals from here).
    pub fn read(&self) -> Counts {
        let get = |a: &[AtomicU64; 2]| Both {
            client_to_upstream: a[0].load(Relaxed),
            upstream_to_client: a[1].load(Relaxed),
        };
        Counts {
            messages: get(&self.messages),
            bytes: get(&self.bytes),
        }
    }
}

/// A connection's tags, set by `req:tag(key, value)`: bounded in number and size, keys unique.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags(Vec<(Box<str>, Box<str>)>);

/// Why a tag was refused (the Lua API raises it as an error at the caller's line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    /// The key is empty, too long, or has a character outside `[A-Za-z0-9_.-]`.
    #[error("tag key {0:?} must be 1 to {MAX_TAG_KEY} characters of A-Z a-z 0-9 _ . -")]
    BadKey(String),
    /// The value is too long or has a control character.
    #[error(
        "tag value for {0:?} must be at most {MAX_TAG_VALUE} bytes without control characters"
    )]
    BadValue(String),
    /// The connection already has [`MAX_TAGS`] tags.
    #[error("a connection carries at most {MAX_TAGS} tags")]
    TooMany,
}

impl Tags {
    /// Sets `key` to `value` (replacing an earlier value of the same key).
    pub fn insert(&mut self, key: &str, value: &str) -> Result<(), TagError> {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_TAG_KEY
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !key_ok {
            return Err(TagError::BadKey(key.chars().take(MAX_TAG_KEY).collect()));
        }
        if value.len() > MAX_TAG_VALUE || value.chars().any(char::is_control) {
            return Err(TagError::BadValue(key.to_owned()));
        }
        if let Some(slot) = self.0.iter_mut().find(|(k, _)| &**k == key) {
            slot.1 = value.into();
            return Ok(());
        }
        if self.0.len() == MAX_TAGS {
            return Err(TagError::TooMany);
        }
        self.0.push((key.into(), value.into()));
        Ok(())
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| &**k == key).map(|(_, v)| &**v)
    }

    /// `(key, value)` pairs in the order they were first set.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
}

/// What the gateway knows about a connection when its WebSocket is established.
#[derive(Debug)]
pub struct NewConnection {
    /// Process-unique connection id (the one in its log lines).
    pub id: u64,
    /// The route's name (host and path template).
    pub route: String,
    /// The client's address.
    pub client: SocketAddr,
    /// The upstream URL after substitution.
    pub upstream: String,
    /// When the connection was accepted.
    pub opened_at: SystemTime,
    /// When its lifetime ends (`expire`), if it has one.
    pub expires_at: Option<SystemTime>,
    /// The configuration snapshot it runs on.
    pub snapshot: u64,
    /// Tags set by `on_upgrade`.
    pub tags: Tags,
    /// Its upgrade request (already masked).
    pub request: UpgradeRequest,
    /// Its frozen ctx as JSON (`Null` when there is none).
    pub ctx: serde_json::Value,
    /// Its route's `[route.capture]` (what the console may turn on later uses it).
    pub capture_config: Arc<CaptureConfig>,
    /// Its capture, when its route records from the start.
    pub capture: Option<Arc<Capture>>,
}

/// Where an admin message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// To the client, as if the upstream sent it.
    Client,
    /// To the upstream, as if the client sent it.
    Upstream,
}

/// One message the admin injects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message (shared, so that a broadcast does not copy it per connection).
    Text(Arc<str>),
    /// A binary message.
    Binary(bytes::Bytes),
}

/// An instruction for a connection's relay, received on its control channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Close: the client gets `code` and `reason`, the upstream gets 1001 (going away).
    Close {
        /// A code accepted by [`check_close`].
        code: u16,
        /// At most [`MAX_CLOSE_REASON`] bytes.
        reason: String,
    },
    /// Queue `message` towards `to`, like a policy's `conn:send_*`.
    Send {
        /// Which leg gets it.
        to: Target,
        /// What it gets.
        message: Message,
    },
    /// Record into this capture from now on (the console turned capture on).
    Capture(CaptureHandle),
}

/// A capture sent to a relay; equal when it is the same capture.
#[derive(Debug, Clone)]
pub struct CaptureHandle(pub Arc<Capture>);

impl PartialEq for CaptureHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for CaptureHandle {}

/// Why a control message was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No open connection has that id (or it is closing and no longer reads its channel).
    #[error("no open connection {0}")]
    NotFound(u64),
    /// The connection's control queue is full.
    #[error("connection {0} has {CONTROL_CAPACITY} control messages queued already; try again")]
    Busy(u64),
}

/// Why a close code or reason is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseError {
    /// Not a code an operator may send.
    #[error("close code {0} is not allowed: use 1000, 1001, 1008, 1011, 1012, 1013 or 3000-4999")]
    Code(u16),
    /// Longer than a close frame can carry.
    #[error("close reason is {0} bytes; at most {MAX_CLOSE_REASON} fit in a close frame")]
    Reason(usize),
}

/// Checks a close code and reason the admin asked for. Allowed: 1000 (normal), 1001 (going
/// away), 1008 (policy violation), 1011 (internal error), 1012 (service restart), 1013 (try
/// again later), and 3000-4999 (registered and private use). Refused: codes that must never be
/// sent (1005, 1006, 1015), codes that describe a protocol fault of the peer (1002, 1003, 1007,
/// 1009, 1010), and anything unassigned.
pub fn check_close(code: u16, reason: &str) -> Result<(), CloseError> {
    if !matches!(code, 1000 | 1001 | 1008 | 1011 | 1012 | 1013 | 3000..=4999) {
        return Err(CloseError::Code(code));
    }
    if reason.len() > MAX_CLOSE_REASON {
        return Err(CloseError::Reason(reason.len()));
    }
    Ok(())
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// An entry with that id exists already (ids must be unique).
    #[error("connection {0} is registered already")]
    DuplicateId(u64),
}

/// One registered connection.
#[derive(Debug)]
struct Entry {
    id: u64,
    route: String,
    client: SocketAddr,
    upstream: String,
    opened_at: SystemTime,
    expires_at: Option<SystemTime>,
    snapshot: u64,
    tags: Tags,
    request: UpgradeRequest,
    ctx: Result<serde_json::Value, usize>,
    stats: Arc<ConnStats>,
    mailbox: Mailbox,
    capture_config: Arc<CaptureConfig>,
    /// Set while (or once) the connection records; the lock orders the console's requests.
    capture: Mutex<Option<Arc<Capture>>>,
}

/// Messages and bytes both ways.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Both {
    /// From the client to the upstream.
    pub client_to_upstream: u64,
    /// From the upstream to the client.
    pub upstream_to_client: u64,
}

/// A connection's live counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Data messages forwarded.
    pub messages: Both,
    /// Payload bytes forwarded.
    pub bytes: Both,
}

/// A connection as listed by `GET /admin/connections`.
#[derive(Debug, Clone, Serialize)]
pub struct ConnSummary {
    /// Connection id.
    pub id: u64,
    /// Route name.
    pub route: String,
    /// Client address.
    pub client: SocketAddr,
    /// Upstream URL.
    pub upstream: String,
    /// RFC 3339, UTC.
    pub opened_at: String,
    /// RFC 3339, UTC; absent when the route has no `expire`.
    pub expires_at: Option<String>,
    /// Configuration snapshot number.
    pub snapshot: u64,
    /// Messages forwarded each way.
    pub messages: Both,
    /// Payload bytes forwarded each way.
    pub bytes: Both,
    /// Tags, by key.
    pub tags: BTreeMap<String, String>,
}

/// A connection as shown by `GET /admin/connections/{id}`: the summary plus its request and ctx.
#[derive(Debug, Clone, Serialize)]
pub struct ConnDetail {
    /// Everything the listing shows.
    #[serde(flatten)]
    pub summary: ConnSummary,
    /// The upgrade request, secrets masked.
    pub request: UpgradeRequest,
    /// The frozen ctx (`null` when omitted).
    pub ctx: serde_json::Value,
    /// Why `ctx` is `null` although the connection has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctx_omitted: Option<String>,
    /// `{"mode": "off" | "metadata" | "payload"}`: what the console's capture records.
    pub capture: serde_json::Value,
}

impl Entry {
    fn capture_mode(&self) -> CaptureMode {
        self.capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(CaptureMode::Off, |c| c.mode())
    }

    fn summary(&self) -> ConnSummary {
        let counts = self.stats.read();
        ConnSummary {
            id: self.id,
            route: self.route.clone(),
            client: self.client,
            upstream: self.upstream.clone(),
            opened_at: rfc3339(self.opened_at),
            expires_at: self.stats.moved_expiry().or(self.expires_at).map(rfc3339),
            snapshot: self.snapshot,
            messages: counts.messages,
            bytes: counts.bytes,
            tags: self
                .tags
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }
    }

    fn matches(&self, f: &Filter) -> bool {
        f.matches(&self.route, self.client.ip(), self.snapshot, |k| {
            self.tags.get(k)
        })
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Which connections a query or a bulk action applies to. All given conditions must hold.
/// Serialised as JSON in the fleet's commands (`src/fleet/registry/commands.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Filter {
    /// Route name, exactly.
    pub route: Option<String>,
    /// Client IP address (any port).
    pub client_ip: Option<IpAddr>,
    /// Tag `(key, value)`.
    pub tag: Option<(String, String)>,
    /// Snapshot number.
    pub snapshot: Option<u64>,
    /// At most this many connections listed (bulk actions ignore it).
    pub limit: usize,
}

impl Default for Filter {
    fn default() -> Self {
        Filter {
            route: None,
            client_ip: None,
            tag: None,
            snapshot: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

/// A query string the filter cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(pub String);

impl Filter {
    /// Parses `route=`, `client_ip=`, `tag=key:value`, `snapshot=`, `limit=` (1 to
    /// [`MAX_LIMIT`]) from a query string; `allow` lists the other keys the caller handles.
    pub fn from_query(query: &str, allow: &[&str]) -> Result<Filter, FilterError> {
        let mut f = Filter::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let bad = |what: &str| FilterError(format!("{key}={value:?}: {what}"));
            match &*key {
                "route" => f.route = Some(value.into_owned()),
                "client_ip" => {
                    f.client_ip = Some(value.parse().map_err(|_| bad("not an IP address"))?)
                }
                "tag" => {
                    let (k, v) = value
                        .split_once(':')
                        .ok_or_else(|| bad("write tag=key:value"))?;
                    f.tag = Some((k.to_owned(), v.to_owned()));
                }
                "snapshot" => {
                    f.snapshot = Some(value.parse().map_err(|_| bad("not a snapshot number"))?)
                }
                "limit" => {
                    f.limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| bad(&format!("must be 1 to {MAX_LIMIT}")))?
                }
                k if allow.contains(&k) => {}
                _ => return Err(FilterError(format!("unknown parameter {key:?}"))),
            }
        }
        Ok(f)
    }

    /// Whether a connection of `route`, from `client`, on `snapshot`, whose tag values `tag`
    /// looks up, meets every condition (the limit aside). The registry's own entries and the
    /// fleet's published ones (`src/fleet/registry.rs`) are matched by this one rule.
    pub fn matches<'t>(
        &self,
        route: &str,
        client: IpAddr,
        snapshot: u64,
        tag: impl Fn(&str) -> Option<&'t str>,
    ) -> bool {
        self.route.as_deref().is_none_or(|r| r == route)
            // Canonical forms, so that 10.0.0.1 also finds ::ffff:10.0.0.1 on a dual-stack listener.
            && self
                .client_ip
                .is_none_or(|ip| ip.to_canonical() == client.to_canonical())
            && self.snapshot.is_none_or(|s| s == snapshot)
            && self
                .tag
                .as_ref()
                .is_none_or(|(k, v)| tag(k) == Some(v.as_str()))
    }

    /// True when no condition is set (a bulk action would hit every connection).
    pub fn is_everything(&self) -> bool {
        self.route.is_none()
            && self.client_ip.is_none()
            && self.tag.is_none()
            && self.snapshot.is_none()
    }
}

/// A listing: the first `limit` matches by id (oldest first), and how many matched in all.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// Matches, by ascending id.
    pub connections: Vec<ConnSummary>,
    /// Number of matches before the limit.
    pub matched: usize,
}

/// The result of a bulk action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Outcome {
    /// Connections that matched the filter.
    pub matched: usize,
    /// Of those, connections whose control message was queued.
    pub queued: usize,
    /// Of those, connections whose queue was full (or that were closing).
    pub skipped: usize,
}

type TagKey = (Box<str>, Box<str>);

/// The open connections of a gateway.
#[derive(Debug, Default)]
pub struct Registry {
    conns: DashMap<u64, Arc<Entry>>,
    /// `(key, value)` -> ids carrying that tag.
    by_tag: DashMap<TagKey, HashSet<u64>>,
    /// Captures of the last [`RECENT_CAPTURES`] closed connections that had one, oldest first.
    recent: Mutex<VecDeque<Arc<Capture>>>,
}

/// What a connection gets when it registers.
#[derive(Debug)]
pub struct Registered {
    /// Removes the entry when dropped: keep it for the connection's life.
    pub guard: Registration,
    /// Control messages for this connection; the relay polls it on each wake-up.
    pub control: ControlReceiver,
    /// The counters the relay updates per forwarded message.
    pub stats: Arc<ConnStats>,
}

/// Keeps a connection's entry; dropping it unregisters the connection.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// Adds a connection (call it once its WebSocket is established).
    pub fn register(self: &Arc<Self>, conn: NewConnection) -> Result<Registered, RegisterError> {
        let stats = Arc::new(ConnStats::default());
        let ctx = match json_len(&conn.ctx) {
            n if n <= MAX_CTX_JSON => Ok(conn.ctx),
            n => Err(n),
        };
        let entry = Arc::new(Entry {
            id: conn.id,
            route: conn.route,
            client: conn.client,
            // The route's URL carries the client's query, so its access_token too.
            upstream: mask_query(&conn.upstream),
            opened_at: conn.opened_at,
            expires_at: conn.expires_at,
            snapshot: conn.snapshot,
            tags: conn.tags,
            request: conn.request,
            ctx,
            stats: stats.clone(),
            mailbox: Mailbox::default(),
            capture_config: conn.capture_config,
            capture: Mutex::new(conn.capture),
        });
        match self.conns.entry(conn.id) {
            dashmap::Entry::Occupied(_) => return Err(RegisterError::DuplicateId(conn.id)),
            dashmap::Entry::Vacant(v) => {
                v.insert(entry.clone());
            }
        }
        for (k, v) in entry.tags.iter() {
            self.by_tag
                .entry((k.into(), v.into()))
                .or_default()
                .insert(conn.id);
        }
        Ok(Registered {
            guard: Registration {
                registry: self.clone(),
                id: conn.id,
            },
            control: ControlReceiver::new(entry),
            stats,
        })
    }

    fn remove(&self, id: u64) {
        let Some((_, entry)) = self.conns.remove(&id) else {
            return;
        };
        let capture = entry
            .capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(capture) = capture {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == RECENT_CAPTURES {
                recent.pop_front();
            }
            recent.push_back(capture);
        }
        for (k, v) in entry.tags.iter() {
            let key: TagKey = (k.into(), v.into());
            if let dashmap::Entry::Occupied(mut ids) = self.by_tag.entry(key) {
                ids.get_mut().remove(&id);
                if ids.get().is_empty() {
                    ids.remove();
                }
            }
        }
    }

    /// Number of registered connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// True when no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Every entry matching `f`, by ascending id. Uses the tag index when `f` has a tag.
    fn matching(&self, f: &Filter) -> Vec<Arc<Entry>> {
        let mut found: Vec<Arc<Entry>> = match &f.tag {
            Some((k, v)) => {
                let ids: Vec<u64> = self
                    .by_tag
                    .get(&(Box::from(k.as_str()), Box::from(v.as_str())))
                    .map(|ids| ids.iter().copied().collect())
                    .unwrap_or_default();
                ids.into_iter()
                    .filter_map(|id| self.conns.get(&id).map(|e| e.clone()))
                    .filter(|e| e.matches(f))
                    .collect()
            }
            None => self
                .conns
                .iter()
                .filter(|e| e.matches(f))
                .map(|e| e.clone())
                .collect(),
        };
        found.sort_unstable_by_key(|e| e.id);
        found
    }

    /// Lists connections matching `f`, at most `f.limit` of them.
    pub fn list(&self, f: &Filter) -> Listing {
        let found = self.matching(f);
        Listing {
            matched: found.len(),
            connections: found.iter().take(f.limit).map(|e| e.summary()).collect(),
        }
    }

    /// One connection with its request and ctx.
    pub fn get(&self, id: u64) -> Option<ConnDetail> {
        let e = self.conns.get(&id)?.clone();
        Some(ConnDetail {
            summary: e.summary(),
            request: e.request.clone(),
            ctx: e.ctx.clone().unwrap_or(serde_json::Value::Null),
            ctx_omitted: e
                .ctx
                .as_ref()
                .err()
                .map(|n| format!("ctx is {n} bytes of JSON, over the {MAX_CTX_JSON}-byte limit")),
            capture: serde_json::json!({ "mode": e.capture_mode().as_str() }),
        })
    }

    /// The capture of connection `id`: open, or among the last [`RECENT_CAPTURES`] closed.
    pub fn capture(&self, id: u64) -> Option<Arc<Capture>> {
        if let Some(e) = self.conns.get(&id).map(|e| e.value().clone()) {
            if let Some(c) = e.capture.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                return Some(c);
            }
        }
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().rev().find(|c| c.id() == id).cloned()
    }

    /// Sets what connection `id` records from now on: the console's capture switch. The first
    /// time it is turned on, a capture is made with the route's settings and handed to the
    /// relay through the control channel (so a full channel answers [`ControlError::Busy`]).
    pub fn set_capture(
        &self,
        id: u64,
        mode: CaptureMode,
    ) -> Result<Option<Arc<Capture>>, ControlError> {
        let entry = self
            .conns
            .get(&id)
            .map(|e| e.value().clone())
            .ok_or(ControlError::NotFound(id))?;
        let mut slot = entry.capture.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = &*slot {
            c.set_mode(mode);
            return Ok(Some(c.clone()));
        }
        if mode == CaptureMode::Off {
            return Ok(None);
        }
        let capture = Capture::new(
            id,
            &entry.route,
            mode,
            entry.capture_config.clone(),
            Some(entry.request.clone()),
        );
        entry
            .mailbox
            .push(Control::Capture(CaptureHandle(capture.clone())))
            .map_err(|e| match e {
                Refused::Full => ControlError::Busy(id),
                Refused::Closed => ControlError::NotFound(id),
            })?;
        *slot = Some(capture.clone());
        Ok(Some(capture))
    }

    /// Queues `control` for connection `id` without waiting.
    pub fn control(&self, id: u64, control: Control) -> Result<(), ControlError> {
        let entry = self
            .conns
            .get(&id)
            .map(|e| e.value().clone())
            .ok_or(ControlError::NotFound(id))?;
        entry.mailbox.push(control).map_err(|e| match e {
            Refused::Full => ControlError::Busy(id),
            Refused::Closed => ControlError::NotFound(id),
        })
    }

    /// Queues `control` for every connection matching `f` (ignoring `f.limit`).
    pub fn control_matching(&self, f: &Filter, control: &Control) -> Outcome {
        let found = self.matching(f);
        let mut outcome = Outcome {
            matched: found.len(),
            ..Outcome::default()
        };
        for e in found {
            match e.mailbox.push(control.clone()) {
                Ok(()) => outcome.queued += 1,
                Err(_) => outcome.skipped += 1,
            }
        }
        outcome
    }
}

/// Length of `v` as compact JSON, without building the string.
fn json_len(v: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Serialising a Value into a writer that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, v);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64, route: &str, client: &str, tags: &[(&str, &str)]) -> NewConnection {
        let mut t = Tags::default();
        for (k, v) in tags {
            t.insert(k, v).unwrap();
        }
        NewConnection {
            id,
            route: route.into(),
            client: client.parse().unwrap(),
            upstream: "ws://127.0.0.1:9001/".into(),
            opened_at: SystemTime::UNIX_EPOCH,
            expires_at: None,
            snapshot: 1,
            tags: t,
            request: UpgradeRequest::new("GET", "/chat", []),
            ctx: serde_json::Value::Null,
            capture_config: Arc::default(),
            capture: None,
        }
    }

    #[test]
    fn tags_are_bounded_and_checked() {
        let mut t = Tags::default();
        assert!(matches!(t.insert("", "x"), Err(TagError::BadKey(_))));
        assert!(matches!(t.insert("a:b", "x"), Err(TagError::BadKey(_))));
        assert!(matches!(
            t.insert(&"k".repeat(65), "x"),
            Err(TagError::BadKey(_))
        ));
        assert!(matches!(
            t.insert("k", &"v".repeat(257)),
            Err(TagError::BadValue(_))
        ));
        assert!(matches!(t.insert("k", "a\nb"), Err(TagError::BadValue(_))));
        for i in 0..MAX_TAGS {
            t.insert(&format!("k{i}"), "v").unwrap();
        }
        t.insert("k0", "replaced").unwrap();
        assert_eq!(t.get("k0"), Some("replaced"));
        assert_eq!(t.insert("one-more", "v"), Err(TagError::TooMany));
    }

    #[test]
    fn filters_index_and_guard() {
        let reg = Registry::new();
        let a = reg
            .register(conn(3, "/chat", "10.0.0.1:5000", &[("user", "ann")]))
            .unwrap();
        let b = reg
            .register(conn(1, "/chat", "10.0.0.2:5000", &[("user", "bob")]))
            .unwrap();
        let c = reg
            .register(conn(
                2,
                "/feed",
                "[::ffff:10.0.0.1]:6000",
                &[("user", "ann")],
            ))
            .unwrap();
        assert_eq!(
            reg.register(conn(2, "/x", "10.0.0.9:1", &[])).unwrap_err(),
            RegisterError::DuplicateId(2)
        );
        let ids = |q: &str| -> Vec<u64> {
            let f = Filter::from_query(q, &[]).unwrap();
            reg.list(&f).connections.iter().map(|c| c.id).collect()
        };
        assert_eq!(ids(""), vec![1, 2, 3]);
        assert_eq!(ids("route=/chat"), vec![1, 3]);
        assert_eq!(ids("client_ip=10.0.0.1"), vec![2, 3]);
        assert_eq!(ids("tag=user:ann"), vec![2, 3]);
        assert_eq!(ids("tag=user:ann&route=/feed"), vec![2]);
        assert_eq!(ids("snapshot=2"), Vec::<u64>::new());
        assert_eq!(ids("limit=1"), vec![1]);
        assert!(Filter::from_query("limit=0", &[]).is_err());
        assert!(Filter::from_query("tag=nocolon", &[]).is_err());
        assert!(Filter::from_query("client_ip=nope", &[]).is_err());
        assert!(Filter::from_query("colour=red", &[]).is_err());

        a.stats.message(Direction::ClientToUpstream, 5);
        a.stats.message(Direction::ClientToUpstream, 7);
        let d = reg.get(3).unwrap();
        assert_eq!(d.summary.messages.client_to_upstream, 2);
        assert_eq!(d.summary.bytes.client_to_upstream, 12);

        drop(c);
        assert_eq!(ids("tag=user:ann"), vec![3]);
        drop((a, b));
        assert!(reg.is_empty());
        assert!(reg.by_tag.is_empty(), "index emptied with the entries");
    }

    #[test]
    fn control_channel_is_bounded() {
        let reg = Registry::new();
        let mut r = reg
            .register(conn(7, "/chat", "10.0.0.1:5000", &[]))
            .unwrap();
        let close = Control::Close {
            code: 4000,
            reason: "kicked".into(),
        };
        for _ in 0..CONTROL_CAPACITY {
            reg.control(7, close.clone()).unwrap();
        }
        assert_eq!(reg.control(7, close.clone()), Err(ControlError::Busy(7)));
        assert_eq!(r.control.try_recv().unwrap(), close);
        reg.control(7, close.clone()).unwrap();
        assert_eq!(
            reg.control(8, close.clone()),
            Err(ControlError::NotFound(8))
        );
        drop(r.control);
        assert_eq!(reg.control(7, close), Err(ControlError::NotFound(7)));
    }

    #[test]
    fn oversized_ctx_is_omitted() {
        let reg = Registry::new();
        let mut c = conn(1, "/chat", "10.0.0.1:5000", &[]);
        c.ctx = serde_json::json!({ "blob": "x".repeat(MAX_CTX_JSON) });
        let _r = reg.register(c).unwrap();
        let d = reg.get(1).unwrap();
        assert!(d.ctx.is_null());
        assert!(d.ctx_omitted.unwrap().contains("over the"));
    }

    #[test]
    fn close_codes() {
        for ok in [1000, 1001, 1008, 1011, 1012, 1013, 3000, 4000, 4999] {
            assert_eq!(check_close(ok, "bye"), Ok(()), "{ok}");
        }
        for bad in [0, 999, 1002, 1005, 1006, 1015, 2000, 2999, 5000] {
            assert_eq!(check_close(bad, ""), Err(CloseError::Code(bad)), "{bad}");
        }
        assert!(check_close(4000, &"r".repeat(124)).is_err());
    }
}
