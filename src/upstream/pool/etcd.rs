//! `[upstream.discovery] etcd`: endpoints from the keys under a prefix in etcd (the v3 API
//! over gRPC, with the etcd-client crate), merged with the configured ones as
//! [`Source::Etcd`]. Each key's value is one `ws://` or `wss://` URL. The keys are watched,
//! not polled: a range get, then a watch from the revision after it, so that no change made
//! between the two is lost.
//!
//! One supervisor per gateway ([`run`]) keeps one watch task per pool that has an `etcd`
//! source, restarting it only when a reload changes its settings. A lost or failed session
//! keeps the last known endpoints (logged once per outage, as DNS discovery does), and is
//! tried again after a backoff from 100 ms doubling up to `refresh`, with a fresh get and
//! watch. A deleted key's endpoint drains (no new connections; its open ones stay); so does
//! every etcd endpoint of a pool whose reload drops its `etcd` source.
//!
//! Everything is bounded: at most [`MAX_KEYS`] keys are taken, a value is at most
//! [`MAX_VALUE`] bytes, and the connect, the get and the watch's creation each have the
//! pool's `connect_timeout`; an open watch is kept alive by HTTP/2 pings under that timeout.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, TlsOptions, WatchOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{PoolState, Pools, Source};
use crate::config::pool::{check_endpoint_url, Etcd, Pool};

/// How often the supervisor looks at the current snapshot's pools, and a watch task checks
/// that its pool's live state is still the one it filled (a reload may remove a pool and add
/// it again) and lets draining endpoints that have no connections left go.
const IDLE_LOOK: Duration = Duration::from_secs(1);
/// Keys taken per pool (good or bad); more are ignored (logged once while over).
pub const MAX_KEYS: usize = 1_000;
/// The longest value taken, in bytes; a longer one is ignored like any bad value.
pub const MAX_VALUE: usize = 2_048;
/// The first wait before a failed session is tried again; it doubles up to `refresh`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// What a watch task needs from the pool's configuration: a reload that keeps all of it keeps
/// the watch as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    etcd: Etcd,
    /// The bound on each gRPC call (the pool's `connect_timeout`).
    timeout: Duration,
    /// The longest backoff between sessions (`[upstream.discovery] refresh`).
    refresh: Duration,
}

impl Settings {
    fn of(pool: &Pool) -> Option<Settings> {
        let discovery = pool.discovery.as_ref()?;
        Some(Settings {
            etcd: discovery.etcd.clone()?,
            timeout: pool.connect_timeout,
            refresh: discovery.refresh,
        })
    }
}

/// A running watch task; dropping it stops the task.
struct Watch {
    settings: Settings,
    task: JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs etcd discovery until `stop` is cancelled. `current` gives the current snapshot's pools.
pub async fn run(
    pools: Arc<Pools>,
    current: impl Fn() -> Vec<Arc<Pool>> + Send + 'static,
    stop: CancellationToken,
) {
    let mut watches: HashMap<String, Watch> = HashMap::new();
    loop {
        let wanted: HashMap<String, Settings> = current()
            .iter()
            .filter_map(|p| Some((p.name.clone(), Settings::of(p)?)))
            .collect();
        let names: Vec<String> = watches.keys().cloned().collect();
        for name in names {
            let settings = wanted.get(&name);
            if settings == Some(&watches[&name].settings) {
                continue;
            }
            let mut old = watches.remove(&name).expect("listed above");
            // Wait for the old task's end, so that it cannot apply an older list after the
            // new task's first one: it applies between awaits, never across one.
            old.task.abort();
            let _ = (&mut old.task).await;
            if settings.is_none() {
                if let Some(state) = pools.get(&name) {
                    state.set_endpoints(Source::Etcd, &[]);
                }
            }
        }
        for (name, settings) in wanted {
            if watches.contains_key(&name) {
                continue;
            }
            let task = tokio::spawn(watch_pool(pools.clone(), name.clone(), settings.clone()));
            watches.insert(name, Watch { settings, task });
        }
        tokio::select! {
            _ = tokio::time::sleep(IDLE_LOOK) => {}
            _ = stop.cancelled() => break,
        }
    }
}

/// Why a session ended.
enum Ended {
    /// etcd could not be reached, or the connection was lost: an outage.
    Failed(String),
    /// The watch was cancelled by etcd (a compaction past its revision): get and watch again.
    Resync(String),
}

/// The watch of one pool: sessions (get, then watch) one after another, until aborted.
async fn watch_pool(pools: Arc<Pools>, name: String, settings: Settings) {
    let mut keys = Keys::new(name.clone());
    let mut applied = Applied::default();
    let mut outage = false;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let Err(ended) = session(&pools, &settings, &mut keys, &mut applied, &mut outage).await;
        match ended {
            Ended::Resync(why) => {
                tracing::info!(pool = %name, source = "etcd", %why, "etcd watch restarted");
                backoff = FIRST_BACKOFF;
            }
            Ended::Failed(error) => {
                if let Some(state) = pools.get(&name) {
                    state.discovery_failed();
                }
                if !outage {
                    tracing::warn!(pool = %name, source = "etcd", %error, "discovery failed: keeping the last known endpoints");
                    backoff = FIRST_BACKOFF;
                }
                outage = true;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(settings.refresh.max(FIRST_BACKOFF));
    }
}

/// Bounds `f` by the call timeout.
async fn bounded<T>(
    what: &str,
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Ended> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Ended::Failed(format!("{what}: {e}"))),
        Err(_) => Err(Ended::Failed(format!(
            "{what}: no answer within {timeout:?}"
        ))),
    }
}

/// One session: connect, get every key under the prefix, then watch from the next revision
/// until the watch breaks. It only ends with why.
async fn session(
    pools: &Pools,
    settings: &Settings,
    keys: &mut Keys,
    applied: &mut Applied,
    outage: &mut bool,
) -> Result<std::convert::Infallible, Ended> {
    let Settings { etcd, timeout, .. } = settings;
    let timeout = *timeout;
    let mut options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_keep_alive(timeout.max(Duration::from_secs(1)), timeout)
        .with_keep_alive_while_idle(true);
    if etcd.endpoints.iter().all(|e| e.starts_with("https://")) {
        options = options.with_tls(TlsOptions::new().with_enabled_roots());
    }
    let mut client = bounded(
        "connect",
        timeout,
        Client::connect(&etcd.endpoints, Some(options)),
    )
    .await?;
    let prefix = etcd.prefix.as_bytes();
    let got = bounded(
        "get",
        timeout,
        client.get(
            prefix,
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_limit(MAX_KEYS as i64 + 1),
            ),
        ),
    )
    .await?;
    let revision = got
        .header()
        .map(|h| h.revision())
        .ok_or_else(|| Ended::Failed("get: the answer has no header".into()))?;
    let fits = got.kvs().len() <= MAX_KEYS && !got.more();
    keys.replace(got.kvs().iter().map(|kv| (kv.key(), kv.value())), fits);
    applied.apply(pools, keys);
    if *outage {
        tracing::info!(pool = %keys.pool, source = "etcd", "discovery answers again");
        *outage = false;
    }
    let mut stream = bounded(
        "watch",
        timeout,
        client.watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        ),
    )
    .await?;
    let mut look = tokio::time::interval(IDLE_LOOK);
    loop {
        // Both branches are cancel safe: the stream keeps its state between polls.
        let message = tokio::select! {
            m = stream.message() => m,
            _ = look.tick() => {
                applied.refresh(pools, keys);
                continue;
            }
        };
        let response = match message {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Ended::Failed("watch: etcd closed the stream".into())),
            Err(e) => return Err(Ended::Failed(format!("watch: {e}"))),
        };
        if response.canceled() {
            return Err(Ended::Resync(format!(
                "cancelled by etcd (compacted to revision {}): {}",
                response.compact_revision(),
                response.cancel_reason()
            )));
        }
        if response.events().is_empty() {
            continue;
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => keys.put(kv.key(), kv.value()),
                EventType::Delete => keys.delete(kv.key()),
            }
        }
        applied.apply(pools, keys);
    }
}

/// The endpoint a key's value names, or why it names none.
fn endpoint_of(value: &[u8]) -> Result<String, String> {
    if value.len() > MAX_VALUE {
        return Err(format!(
            "the value is {} bytes, more than {MAX_VALUE}",
            value.len()
        ));
    }
    let text = std::str::from_utf8(value).map_err(|_| "the value is not UTF-8".to_owned())?;
    let url = text.trim();
    check_endpoint_url(url)?;
    Ok(url.to_owned())
}

/// The keys under one pool's prefix that hold a good endpoint, within [`MAX_KEYS`].
struct Keys {
    pool: String,
    /// Key to endpoint URL.
    good: BTreeMap<Vec<u8>, String>,
    /// Keys with a bad value, with that value: each is logged once until its value changes.
    bad: HashMap<Vec<u8>, Vec<u8>>,
    /// Whether a key was refused for [`MAX_KEYS`] (logged once until the keys fit again).
    over: bool,
}

impl Keys {
    fn new(pool: String) -> Keys {
        Keys {
            pool,
            good: BTreeMap::new(),
            bad: HashMap::new(),
            over: false,
        }
    }

    /// The keys a get found (at most [`MAX_KEYS`] taken), replacing what was known; `fits`:
    /// the get found no more than that.
    fn replace<'a>(&mut self, found: impl Iterator<Item = (&'a [u8], &'a [u8])>, fits: bool) {
        self.good.clear();
        let mut bad = HashMap::new();
        for (key, value) in found.take(MAX_KEYS) {
            if let Some(value) = self.judge(key, value) {
                bad.insert(key.to_vec(), value);
            }
        }
        // A key that is gone or good again is logged afresh if it turns bad later.
        self.bad = bad;
        self.note_bound(fits);
    }

    /// A put: the key's endpoint is added or replaced, or the key dropped if its value is bad.
    fn put(&mut self, key: &[u8], value: &[u8]) {
        let known = self.good.contains_key(key) || self.bad.contains_key(key);
        if !known && self.good.len() + self.bad.len() >= MAX_KEYS {
            self.note_bound(false);
            return;
        }
        self.good.remove(key);
        match self.judge(key, value) {
            Some(value) => {
                self.bad.insert(key.to_vec(), value);
            }
            None => {
                self.bad.remove(key);
            }
        }
    }

    fn delete(&mut self, key: &[u8]) {
        self.good.remove(key);
        self.bad.remove(key);
        if self.good.len() + self.bad.len() < MAX_KEYS {
            self.over = false;
        }
    }

    /// Takes `key` into `good` if its value is an endpoint; else logs it (unless its value was
    /// already logged) and returns the bad value to remember.
    fn judge(&mut self, key: &[u8], value: &[u8]) -> Option<Vec<u8>> {
        match endpoint_of(value) {
            Ok(url) => {
                self.good.insert(key.to_vec(), url);
                None
            }
            Err(error) => {
                let value = value[..value.len().min(MAX_VALUE + 1)].to_vec();
                if self.bad.get(key) != Some(&value) {
                    tracing::warn!(pool = %self.pool, source = "etcd", key = %String::from_utf8_lossy(key), %error, "etcd key ignored: its value is not a ws:// or wss:// endpoint");
                }
                Some(value)
            }
        }
    }

    fn note_bound(&mut self, fits: bool) {
        if !fits && !self.over {
            tracing::warn!(pool = %self.pool, source = "etcd", max = MAX_KEYS, "more keys under the etcd prefix than are taken: the rest are ignored");
        }
        self.over = !fits;
    }

    /// The endpoints, each once, with weight 1.
    fn listed(&self) -> Vec<(String, u32)> {
        let mut urls: Vec<(String, u32)> = self.good.values().map(|u| (u.clone(), 1)).collect();
        urls.sort();
        urls.dedup();
        urls
    }
}

/// The pool state the keys were last applied to.
#[derive(Default)]
struct Applied(Option<Arc<PoolState>>);

impl Applied {
    /// Sets the pool's etcd endpoints to `keys`.
    fn apply(&mut self, pools: &Pools, keys: &Keys) {
        self.0 = pools.get(&keys.pool);
        if let Some(state) = &self.0 {
            state.set_endpoints(Source::Etcd, &keys.listed());
        }
    }

    /// Applies again when the pool's state is a new one (a reload removed the pool and added
    /// it back), or when a drained endpoint may have lost its last connection.
    fn refresh(&mut self, pools: &Pools, keys: &Keys) {
        let now = pools.get(&keys.pool);
        let same = match (&now, &self.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        let draining = now.as_ref().is_some_and(|s| {
            s.endpoints()
                .iter()
                .any(|e| e.source == Source::Etcd && e.is_draining() && e.open() == 0)
        });
        if !same || draining {
            self.apply(pools, keys);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_must_be_websocket_urls_within_the_bound() {
        assert_eq!(
            endpoint_of(b" ws://127.0.0.1:9101\n").unwrap(),
            "ws://127.0.0.1:9101"
        );
        assert_eq!(
            endpoint_of(b"wss://chat-1.internal:9443/base").unwrap(),
            "wss://chat-1.internal:9443/base"
        );
        for bad in [
            &b"http://x"[..],
            b"garbage",
            b"",
            b"ws://",
            b"ws://h:1/?q=1",
            b"\xff\xfe",
        ] {
            assert!(endpoint_of(bad).is_err(), "{bad:?}");
        }
        let long = format!("ws://h:1/{}", "a".repeat(MAX_VALUE));
        assert!(endpoint_of(long.as_bytes()).unwrap_err().contains("bytes"));
    }

    #[test]
    fn puts_replace_deletes_remove_and_bad_values_drop_the_key() {
        let mut keys = Keys::new("p".into());
        keys.replace(
            [
                (&b"/s/a"[..], &b"ws://a:1"[..]),
                (b"/s/b", b"http://b:1"),
                (b"/s/c", b"ws://c:1"),
            ]
            .into_iter(),
            true,
        );
        let urls = |k: &Keys| k.listed().into_iter().map(|(u, _)| u).collect::<Vec<_>>();
        assert_eq!(urls(&keys), ["ws://a:1", "ws://c:1"]);
        assert!(keys.bad.contains_key(&b"/s/b"[..]));
        keys.put(b"/s/a", b"ws://a:2");
        keys.put(b"/s/b", b"ws://b:1");
        keys.put(b"/s/c", b"garbage");
        assert_eq!(urls(&keys), ["ws://a:2", "ws://b:1"]);
        assert!(keys.bad.contains_key(&b"/s/c"[..]) && !keys.bad.contains_key(&b"/s/b"[..]));
        keys.delete(b"/s/a");
        // Two keys naming one endpoint list it once.
        keys.put(b"/s/d", b"ws://b:1");
        assert_eq!(urls(&keys), ["ws://b:1"]);
    }

    #[test]
    fn at_most_max_keys_are_taken() {
        let mut keys = Keys::new("p".into());
        let all: Vec<(Vec<u8>, Vec<u8>)> = (0..MAX_KEYS + 1)
            .map(|i| {
                (
                    format!("/s/{i:05}").into_bytes(),
                    format!("ws://h:{}", 1 + i).into_bytes(),
                )
            })
            .collect();
        keys.replace(all.iter().map(|(k, v)| (k.as_slice(), v.as_slice())), false);
        assert_eq!(keys.good.len(), MAX_KEYS);
        assert!(keys.over);
        keys.put(b"/s/zzz", b"ws://new:1");
        assert_eq!(keys.good.len(), MAX_KEYS);
        assert!(!keys.good.contains_key(&b"/s/zzz"[..]));
        // A put on a key already taken still replaces it.
        keys.put(b"/s/00000", b"ws://moved:1");
        assert_eq!(keys.good[&b"/s/00000"[..]], "ws://moved:1");
        keys.delete(b"/s/00001");
        keys.put(b"/s/zzz", b"ws://new:1");
        assert_eq!(keys.good.len(), MAX_KEYS);
        assert!(keys.good.contains_key(&b"/s/zzz"[..]));
    }
}
