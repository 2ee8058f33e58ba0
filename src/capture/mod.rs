//! The traffic console's captures (issue 16 §1): what one connection's messages looked like,
//! kept in a bounded ring for the admin API and the console page.
//!
//! Ownership and cost:
//! - A connection has a [`Capture`] only when its route's `[route.capture] mode` is not `off`,
//!   or once the console turned it on. Without one, the relay's only added work is a check of
//!   an `Option` per message.
//! - The relay writes entries ([`Capture::record`], or a [`Recorder`] for the messages of one
//!   read: one lock and one clock reading for all of them); the admin reads them
//!   ([`Capture::read`]). They share one short mutex per capture: a record copies at most
//!   `max_payload` bytes and holds the lock only to write the entry; a reader clones what it
//!   takes (payloads are reference-counted [`Bytes`]). No reader ever makes the relay wait
//!   for it: the ring overwrites its oldest entry, in place, to make room, and a reader that
//!   fell behind is told how many it lost.
//! - A payload is kept as it came off the wire, cut at `max_payload`: one copy, into the
//!   ring's chunks (`Chunks`: one allocation per chunk, not per message). Undoing the
//!   WebSocket masking and replacing the `mask` fields of JSON text ([`mask`]) happen when an
//!   entry is shown ([`Capture::show`]), on the admin's side: the secrets are in the gateway's
//!   memory anyway, as the messages it relays are, and never leave it through the admin API.

pub mod mask;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::config::{CaptureConfig, CaptureMode};
use crate::metrics::Direction;
use crate::request_record::UpgradeRequest;

/// Who put a message on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// The client sent it.
    Client,
    /// The upstream sent it.
    Upstream,
    /// A frame policy sent it (`conn:send_*`, a reply).
    Policy,
    /// The admin API sent it (the console's "send").
    Admin,
    /// framegate itself: the close frames it sends when it ends a connection.
    Gateway,
}

impl From {
    fn as_str(self) -> &'static str {
        match self {
            From::Client => "client",
            From::Upstream => "upstream",
            From::Policy => "policy",
            From::Admin => "admin",
            From::Gateway => "gateway",
        }
    }
}

/// A message's or control frame's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A text message.
    Text,
    /// A binary message.
    Binary,
    /// A ping (the gateway answers the client's and the upstream's itself).
    Ping,
    /// A pong.
    Pong,
    /// A close frame.
    Close,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Binary => "binary",
            Kind::Ping => "ping",
            Kind::Pong => "pong",
            Kind::Close => "close",
        }
    }
}

/// What became of a data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Passed on as it came.
    Forwarded,
    /// A policy passed on something else (the entry's `after`).
    Replaced,
    /// A policy (or the schema layer) dropped it.
    Dropped,
    /// Dropped, and the policy answered its sender.
    Replied,
    /// The policy closed the connection on it.
    Closed,
    /// Sent by a policy or the admin (see [`From`]).
    Sent,
}

impl Decision {
    fn as_str(self) -> &'static str {
        match self {
            Decision::Forwarded => "forwarded",
            Decision::Replaced => "replaced",
            Decision::Dropped => "dropped",
            Decision::Replied => "replied",
            Decision::Closed => "closed",
            Decision::Sent => "sent",
        }
    }
}

/// One message as the relay saw it, borrowed: [`Capture::record`] copies what it keeps.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    /// Which way it went.
    pub direction: Direction,
    /// Who sent it.
    pub from: From,
    /// Its type.
    pub kind: Kind,
    /// Its payload size in bytes (the whole message, also when `payload` is only its start).
    pub size: usize,
    /// Frames it arrived in.
    pub frames: u32,
    /// The masking key of its first frame (client frames).
    pub mask: Option<[u8; 4]>,
    /// Its payload, or its start.
    pub payload: &'a [u8],
    /// Set when `payload` is still masked with this key (a frame relayed byte for byte).
    pub masked_with: Option<[u8; 4]>,
    /// What became of it.
    pub decision: Option<Decision>,
    /// How long the policy took over it.
    pub policy: Option<Duration>,
    /// What a policy replaced it with.
    pub after: Option<(bool, &'a [u8])>,
    /// A close frame's code and reason.
    pub close: Option<(u16, &'a str)>,
}

impl<'a> Seen<'a> {
    /// A data message from its sender, with the rest left for the caller to fill in.
    pub fn data(direction: Direction, text: bool, payload: &'a [u8]) -> Seen<'a> {
        Seen {
            direction,
            from: match direction {
                Direction::ClientToUpstream => From::Client,
                Direction::UpstreamToClient => From::Upstream,
            },
            kind: if text { Kind::Text } else { Kind::Binary },
            size: payload.len(),
            frames: 1,
            mask: None,
            payload,
            masked_with: None,
            decision: Some(Decision::Forwarded),
            policy: None,
            after: None,
            close: None,
        }
    }
}

/// A payload as kept: its start, at most `max_payload` bytes.
#[derive(Debug, Clone)]
struct Kept {
    /// As it came: still WebSocket-masked with `masked_with` when that is set, and with its
    /// secrets in. Both are undone when it is shown (the admin's work, not the relay's).
    bytes: Bytes,
    masked_with: Option<[u8; 4]>,
    truncated: bool,
}

/// What a policy passed on instead of a message.
#[derive(Debug, Clone)]
struct After {
    size: usize,
    text: bool,
    /// `None` in `metadata` mode.
    kept: Option<Kept>,
}

/// The parts of an entry that few messages have, boxed so that the common entry stays small
/// (it is written into the ring, over the oldest one, once per message).
#[derive(Debug, Clone)]
struct Rare {
    after: Option<After>,
    close: Option<(u16, Box<str>)>,
}

/// One recorded message.
#[derive(Debug, Clone)]
pub struct Entry {
    seq: u64,
    /// When it was recorded (converted to milliseconds only when shown). The messages of one
    /// read share the time of that read.
    time: SystemTime,
    meta: Meta,
    /// `None` in `metadata` mode.
    payload: Option<Kept>,
    rare: Option<Box<Rare>>,
}

/// What `metadata` mode keeps of a message.
#[derive(Debug, Clone, Copy)]
struct Meta {
    size: usize,
    policy_us: Option<u32>,
    frames: u32,
    mask: Option<[u8; 4]>,
    direction: Direction,
    from: From,
    kind: Kind,
    decision: Option<Decision>,
}

impl Entry {
    /// Its sequence number (1, 2, …) within its capture.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The entry as the admin API shows it, the `names` fields of JSON payloads masked (see
    /// [`Capture::show`]).
    fn to_json(&self, names: &[String]) -> Value {
        let mut m = Map::new();
        m.insert("seq".into(), self.seq.into());
        let time_ms = self
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        m.insert("time_ms".into(), time_ms.into());
        m.insert("direction".into(), self.meta.direction.as_str().into());
        m.insert("from".into(), self.meta.from.as_str().into());
        m.insert("type".into(), self.meta.kind.as_str().into());
        m.insert("size".into(), self.meta.size.into());
        m.insert("frames".into(), self.meta.frames.into());
        m.insert(
            "mask".into(),
            self.meta
                .mask
                .map_or(Value::Null, |k| Value::String(hex(&k))),
        );
        m.insert(
            "decision".into(),
            self.meta
                .decision
                .map_or(Value::Null, |d| d.as_str().into()),
        );
        m.insert(
            "policy_us".into(),
            self.meta.policy_us.map_or(Value::Null, Value::from),
        );
        if let Some(p) = &self.payload {
            p.put(&mut m, self.meta.kind == Kind::Text, names);
        }
        let rare = self.rare.as_deref();
        if let Some(a) = rare.and_then(|r| r.after.as_ref()) {
            let mut after = Map::new();
            after.insert("size".into(), a.size.into());
            if let Some(kept) = &a.kept {
                kept.put(&mut after, a.text, names);
            }
            m.insert("after".into(), Value::Object(after));
        }
        if let Some((code, reason)) = rare.and_then(|r| r.close.as_ref()) {
            m.insert("code".into(), (*code).into());
            m.insert("reason".into(), (**reason).into());
        }
        Value::Object(m)
    }
}

impl Kept {
    /// Adds the payload as shown: unmasked, and with the `names` fields of JSON text masked.
    fn put(&self, m: &mut Map<String, Value>, text: bool, names: &[String]) {
        let mut bytes = self.bytes.to_vec();
        if let Some(key) = self.masked_with {
            crate::masking::apply_mask(&mut bytes, key);
        }
        if text {
            if let Some(masked) = mask::json_fields(&bytes, names) {
                bytes = masked;
            }
        }
        let (payload, encoding) = match std::str::from_utf8(&bytes) {
            Ok(shown) if text => (shown.to_owned(), "utf8"),
            _ => (
                base64::engine::general_purpose::STANDARD.encode(&bytes),
                "base64",
            ),
        };
        m.insert("payload".into(), payload.into());
        m.insert("encoding".into(), encoding.into());
        m.insert("truncated".into(), self.truncated.into());
    }
}

/// Whether the payload byte at `at` (still masked with `key`, if given) continues a UTF-8
/// character.
fn is_continuation(byte: u8, key: Option<[u8; 4]>, at: usize) -> bool {
    let byte = key.map_or(byte, |k| byte ^ k[at & 3]);
    byte & 0xC0 == 0x80
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How a connection ended, as its capture shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The close code of the connection's close line (1006 for a dropped connection, even when
    /// the other side was sent 1011 or 1001).
    pub code: u16,
    /// Its reason.
    pub reason: String,
    /// `client`, `upstream`, `gateway` (framegate: a lifetime, a policy, a limit, shutdown) or
    /// `admin` (a close from the admin API, the console's kick).
    pub by: &'static str,
}

impl Closed {
    /// As the admin API shows it.
    pub fn to_json(&self) -> Value {
        json!({"code": self.code, "reason": self.reason, "by": self.by})
    }
}

/// What a reader got: entries after the one it had, how many it missed, and the end.
#[derive(Debug, Default)]
pub struct Batch {
    /// Entries in order.
    pub entries: Vec<Entry>,
    /// Entries that were forgotten before the reader took them.
    pub lost: u64,
    /// Set once the connection has ended and every entry was read.
    pub closed: Option<Closed>,
}

#[derive(Debug, Default)]
struct Ring {
    /// Up to `keep` entries; once full, a new entry takes the oldest one's place (in place:
    /// nothing moves), and the oldest is at `oldest`.
    slots: Vec<Slot>,
    oldest: usize,
    /// The sequence number the next entry gets, from 1.
    next: u64,
    closed: Option<Closed>,
    chunks: Chunks,
}

/// An entry as the ring holds it: its payload (`payload` mode) a place in [`Chunks`].
#[derive(Debug)]
struct Slot {
    seq: u64,
    time: SystemTime,
    meta: Meta,
    /// The chunk that was being filled when the entry was recorded (its payload's, if it has
    /// one): chunks before the oldest entry's are no longer needed.
    chunk: u64,
    payload: Option<Stored>,
    rare: Option<Box<Rare>>,
}

/// Where a kept payload is, in its slot's chunk.
#[derive(Debug, Clone, Copy)]
struct Stored {
    start: u32,
    len: u32,
    masked_with: Option<[u8; 4]>,
    truncated: bool,
}

/// Kept payloads, copied one after another into chunks of [`CHUNK`] bytes (a longer payload
/// gets a chunk of its own size). Entries refer to them by place, so recording a payload is
/// a copy and no allocation, reference count or release per message. A full chunk is sealed
/// into a shared [`Bytes`] (no copy), from which a reader cuts its entries' payloads by
/// reference: the relay never waits for a reader's copy, except of the chunk being filled. A
/// chunk is freed, whole, once the ring holds no entry from it (and no reader holds a payload
/// cut from it). A capture holds at most about twice what its entries keep, plus a chunk.
#[derive(Debug, Default)]
struct Chunks {
    /// The sealed chunks, from id `first` on.
    sealed: VecDeque<Bytes>,
    first: u64,
    /// The chunk being filled, id `first + sealed.len()`.
    filling: Vec<u8>,
}

/// The size of a chunk of kept payloads.
const CHUNK: usize = 16 * 1024;

impl Chunks {
    /// The id of the chunk being filled.
    fn current(&self) -> u64 {
        self.first + self.sealed.len() as u64
    }

    /// Copies `bytes` in; returns the chunk's id and where they start in it.
    fn put(&mut self, bytes: &[u8]) -> (u64, usize) {
        if self.filling.capacity() - self.filling.len() < bytes.len() {
            let new = Vec::with_capacity(CHUNK.max(bytes.len()));
            let full = std::mem::replace(&mut self.filling, new);
            // The first chunk replaces an empty `Vec` and takes its id.
            if full.capacity() > 0 {
                self.sealed.push_back(Bytes::from(full));
            }
        }
        let start = self.filling.len();
        self.filling.extend_from_slice(bytes);
        (self.current(), start)
    }

    /// The bytes at `start` in chunk `id`, while it is held: cut from a sealed chunk (shared),
    /// or copied from the chunk being filled (at most one chunk's worth under the lock).
    fn get(&self, id: u64, start: usize, len: usize) -> Bytes {
        let range = start..start + len;
        match id.checked_sub(self.first).map(|i| i as usize) {
            Some(i) if i < self.sealed.len() && range.end <= self.sealed[i].len() => {
                self.sealed[i].slice(range)
            }
            Some(i) if i == self.sealed.len() => self
                .filling
                .get(range)
                .map_or_else(Bytes::new, Bytes::copy_from_slice),
            _ => Bytes::new(),
        }
    }

    /// Frees the sealed chunks before chunk `id`.
    fn forget_before(&mut self, id: u64) {
        while self.first < id && !self.sealed.is_empty() {
            self.sealed.pop_front();
            self.first += 1;
        }
    }
}

/// One connection's capture.
#[derive(Debug)]
pub struct Capture {
    id: u64,
    route: Box<str>,
    mode: AtomicU8,
    config: Arc<CaptureConfig>,
    request: Option<UpgradeRequest>,
    /// The upstream's 101 headers, when the capture was on at the upgrade.
    response: OnceLock<Vec<(String, String)>>,
    ring: Mutex<Ring>,
}

fn mode_code(mode: CaptureMode) -> u8 {
    match mode {
        CaptureMode::Off => 0,
        CaptureMode::Metadata => 1,
        CaptureMode::Payload => 2,
    }
}

impl Capture {
    /// A capture of connection `id` on `route`, recording per `mode` with the route's settings.
    pub fn new(
        id: u64,
        route: &str,
        mode: CaptureMode,
        config: Arc<CaptureConfig>,
        request: Option<UpgradeRequest>,
    ) -> Arc<Capture> {
        Arc::new(Capture {
            id,
            route: route.into(),
            mode: AtomicU8::new(mode_code(mode)),
            config,
            request,
            response: OnceLock::new(),
            ring: Mutex::new(Ring {
                next: 1,
                ..Ring::default()
            }),
        })
    }

    /// The connection's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What it records now.
    pub fn mode(&self) -> CaptureMode {
        match self.mode.load(Relaxed) {
            0 => CaptureMode::Off,
            1 => CaptureMode::Metadata,
            _ => CaptureMode::Payload,
        }
    }

    /// Changes what it records from now on (kept entries stay).
    pub fn set_mode(&self, mode: CaptureMode) {
        self.mode.store(mode_code(mode), Relaxed);
    }

    /// Records the upstream's 101 headers (once).
    pub fn set_response<'a>(&self, headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) {
        let headers = headers
            .into_iter()
            .take(crate::request_record::MAX_HEADERS)
            .map(|(n, v)| (n.to_owned(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        let _ = self.response.set(headers);
    }

    /// Records one message, if the capture is on. Out of line: the relay calls it from several
    /// places of its message loop, which stays as small as it is without a capture.
    #[inline(never)]
    pub fn record(&self, seen: &Seen<'_>) {
        if let Some(mut recorder) = self.recorder() {
            recorder.record(seen);
        }
    }

    /// A recorder for the messages of one read (they share its time and one lock), or `None`
    /// while the capture is off or after the connection ended.
    pub fn recorder(&self) -> Option<Recorder<'_>> {
        let mode = self.mode();
        if mode == CaptureMode::Off {
            return None;
        }
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.closed.is_some() {
            return None;
        }
        Some(Recorder {
            keep: self.config.keep,
            max_payload: (mode == CaptureMode::Payload).then_some(self.config.max_payload),
            time: SystemTime::now(),
            ring,
        })
    }
    /// Marks the end of the connection; later records are ignored.
    pub fn finish(&self, closed: Closed) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.closed.is_none() {
            ring.closed = Some(closed);
        }
    }

    /// Up to `max` entries after sequence number `after`, how many after it are gone, and the
    /// end once everything before it was read.
    pub fn read(&self, after: u64, max: usize) -> Batch {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let first = ring.next - ring.slots.len() as u64;
        let lost = first.saturating_sub(after + 1);
        let skip = (after + 1).saturating_sub(first) as usize;
        let (newer, older) = ring.slots.split_at(ring.oldest);
        let entries: Vec<Entry> = older
            .iter()
            .chain(newer)
            .skip(skip)
            .take(max)
            .map(|slot| Entry {
                seq: slot.seq,
                time: slot.time,
                meta: slot.meta,
                payload: slot.payload.map(|p| Kept {
                    bytes: ring
                        .chunks
                        .get(slot.chunk, p.start as usize, p.len as usize),
                    masked_with: p.masked_with,
                    truncated: p.truncated,
                }),
                rare: slot.rare.clone(),
            })
            .collect();
        let read_all = entries.last().map_or(ring.next, |e| e.seq + 1) == ring.next;
        Batch {
            entries,
            lost,
            closed: if read_all { ring.closed.clone() } else { None },
        }
    }

    /// One of this capture's entries as the admin API shows it: unmasked, its secrets masked.
    pub fn show(&self, entry: &Entry) -> Value {
        entry.to_json(&self.config.mask)
    }

    /// The whole capture as `GET /admin/connections/{id}/capture` shows it.
    pub fn to_json(&self) -> Value {
        let batch = self.read(0, usize::MAX);
        let masked = |name: &str| {
            self.config
                .mask
                .iter()
                .any(|m| m.eq_ignore_ascii_case(name))
        };
        let headers = |pairs: &mut dyn Iterator<Item = (&str, &str)>| -> Value {
            pairs
                .map(|(n, v)| json!([n, if masked(n) { "<redacted>" } else { v }]))
                .collect()
        };
        let request = self.request.as_ref().map_or(Value::Null, |r| {
            json!({
                "method": &*r.method,
                "target": &*r.target,
                "headers": headers(&mut r.headers()),
            })
        });
        let response = self.response.get().map_or(Value::Null, |h| {
            json!({
                "status": 101,
                "headers": headers(&mut h.iter().map(|(n, v)| (n.as_str(), v.as_str()))),
            })
        });
        json!({
            "id": self.id,
            "route": &*self.route,
            "mode": self.mode().as_str(),
            "max_payload": self.config.max_payload,
            "keep": self.config.keep,
            "request": request,
            "response": response,
            "entries": batch.entries.iter().map(|e| self.show(e)).collect::<Vec<_>>(),
            "lost": batch.lost,
            "closed": batch.closed.as_ref().map_or(Value::Null, Closed::to_json),
        })
    }
}

/// Records the messages of one read: the capture's lock held and the time read once.
pub struct Recorder<'a> {
    keep: usize,
    /// `Some` in `payload` mode.
    max_payload: Option<usize>,
    time: SystemTime,
    ring: MutexGuard<'a, Ring>,
}

impl Recorder<'_> {
    /// Records one message.
    pub fn record(&mut self, seen: &Seen<'_>) {
        let max_payload = self.max_payload.filter(|_| seen.kind != Kind::Close);
        let payload = max_payload.map(|max| {
            cut(
                max,
                (seen.size, seen.kind == Kind::Text),
                seen.payload,
                seen.masked_with,
            )
        });
        let rare = (seen.after.is_some() || seen.close.is_some()).then(|| {
            Box::new(Rare {
                after: seen.after.map(|(text, bytes)| After {
                    size: bytes.len(),
                    text,
                    kept: max_payload.map(|max| {
                        let cut = cut(max, (bytes.len(), text), bytes, None);
                        Kept {
                            bytes: Bytes::copy_from_slice(cut.bytes),
                            masked_with: None,
                            truncated: cut.truncated,
                        }
                    }),
                }),
                close: seen.close.map(|(c, r)| (c, r.into())),
            })
        });
        let meta = Meta {
            size: seen.size,
            policy_us: seen
                .policy
                .map(|d| d.as_micros().min(u32::MAX.into()) as u32),
            frames: seen.frames,
            mask: seen.mask,
            direction: seen.direction,
            from: seen.from,
            kind: seen.kind,
            decision: seen.decision,
        };
        self.push(meta, payload, rare);
    }

    /// Records a data message relayed as its sender wrote it, in one frame: what
    /// [`Recorder::record`] does with [`Seen::data`], the frame's `mask` as its masking key and
    /// `payload` still masked with it. Not a call of `record`: building and reading back a
    /// whole `Seen` per frame cost 85 more instructions per 1 KiB message (1,165 against 1,077
    /// in `metadata` mode, `bench/callgrind_msg.sh`).
    #[inline]
    pub fn relayed(
        &mut self,
        direction: Direction,
        text: bool,
        payload: &[u8],
        mask: Option<[u8; 4]>,
    ) {
        let kept = self
            .max_payload
            .map(|max| cut(max, (payload.len(), text), payload, mask));
        let seen = Seen::data(direction, text, payload);
        let meta = Meta {
            size: payload.len(),
            policy_us: None,
            frames: 1,
            mask,
            direction,
            from: seen.from,
            kind: seen.kind,
            decision: seen.decision,
        };
        self.push(meta, kept, None);
    }

    /// Adds an entry, with its payload's kept start; once the ring is full, in the oldest
    /// one's place.
    #[inline(always)]
    fn push(&mut self, meta: Meta, payload: Option<Cut<'_>>, rare: Option<Box<Rare>>) {
        let ring = &mut *self.ring;
        let seq = ring.next;
        ring.next += 1;
        let (chunk, payload) = match payload {
            None => (ring.chunks.current(), None),
            Some(cut) => {
                let (chunk, start) = ring.chunks.put(cut.bytes);
                let stored = Stored {
                    // Within a chunk, which is at most `MAX_MAX_PAYLOAD` or `CHUNK` long.
                    start: start as u32,
                    len: cut.bytes.len() as u32,
                    masked_with: cut.masked_with,
                    truncated: cut.truncated,
                };
                (chunk, Some(stored))
            }
        };
        if ring.slots.len() < self.keep {
            ring.slots.push(Slot {
                seq,
                time: self.time,
                meta,
                chunk,
                payload,
                rare,
            });
            return;
        }
        let oldest = ring.oldest;
        ring.oldest = if oldest + 1 == self.keep {
            0
        } else {
            oldest + 1
        };
        let slot = &mut ring.slots[oldest];
        slot.seq = seq;
        slot.time = self.time;
        slot.meta = meta;
        slot.chunk = chunk;
        slot.payload = payload;
        // Tested first, so that an entry without one drops nothing.
        if slot.rare.is_some() || rare.is_some() {
            slot.rare = rare;
        }
        let still_needed = ring.slots[ring.oldest].chunk;
        ring.chunks.forget_before(still_needed);
    }
}

/// The start of a payload as kept.
struct Cut<'a> {
    bytes: &'a [u8],
    /// The key `bytes` are still masked with.
    masked_with: Option<[u8; 4]>,
    /// Whether `bytes` are less than the whole message.
    truncated: bool,
}

/// The start of a payload as kept: at most `max` bytes, text cut at a character boundary
/// (`size`: the whole message's; `payload` may be only its start).
fn cut(
    max: usize,
    (size, text): (usize, bool),
    payload: &[u8],
    masked_with: Option<[u8; 4]>,
) -> Cut<'_> {
    let mut cut = payload.len().min(max);
    // Text (UTF-8 already: the relay checked it) is cut at a character boundary.
    while text && cut < payload.len() && cut > 0 && is_continuation(payload[cut], masked_with, cut)
    {
        cut -= 1;
    }
    Cut {
        bytes: &payload[..cut],
        masked_with,
        truncated: cut < size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(keep: usize, max_payload: usize) -> Arc<Capture> {
        let config = CaptureConfig {
            mode: CaptureMode::Payload,
            keep,
            max_payload,
            ..CaptureConfig::default()
        };
        Capture::new(1, "/r", CaptureMode::Payload, Arc::new(config), None)
    }

    fn text(c: &Capture, s: &str) {
        c.record(&Seen::data(Direction::ClientToUpstream, true, s.as_bytes()));
    }

    #[test]
    fn the_ring_forgets_the_oldest_and_readers_learn_how_many() {
        let c = capture(3, 100);
        for i in 0..5 {
            text(&c, &i.to_string());
        }
        let b = c.read(0, 10);
        assert_eq!(
            b.entries.iter().map(Entry::seq).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert_eq!(b.lost, 2);
        let b = c.read(4, 10);
        assert_eq!((b.entries.len(), b.lost), (1, 0));
        assert!(b.closed.is_none());
        c.finish(Closed {
            code: 4001,
            reason: "kicked".into(),
            by: "gateway",
        });
        text(&c, "late");
        // The end shows once every entry was read.
        assert!(c.read(3, 1).closed.is_none());
        let b = c.read(5, 10);
        assert!(b.entries.is_empty());
        assert_eq!(b.closed.unwrap().code, 4001);
    }

    #[test]
    fn payloads_are_unmasked_cut_at_a_character_and_their_secrets_masked() {
        let c = capture(10, 8);
        let key = [1, 2, 3, 4];
        let mut wire = "héllo wörld".as_bytes().to_vec();
        crate::masking::apply_mask(&mut wire, key);
        let mut seen = Seen::data(Direction::ClientToUpstream, true, &wire);
        seen.masked_with = Some(key);
        seen.mask = Some(key);
        c.record(&seen);
        let e = c.show(&c.read(0, 1).entries[0]);
        assert_eq!(e["payload"], "héllo w");
        assert_eq!(e["truncated"], true);
        assert_eq!(e["size"], 13);
        assert_eq!(e["mask"], "01020304");

        let c = capture(10, 100);
        text(&c, r#"{"password":"hunter2"}"#);
        c.record(&Seen::data(Direction::UpstreamToClient, false, &[0, 255]));
        let b = c.read(0, 10);
        assert_eq!(
            c.show(&b.entries[0])["payload"],
            r#"{"password":"<redacted>"}"#
        );
        let bin = c.show(&b.entries[1]);
        assert_eq!(
            (bin["payload"].as_str(), bin["encoding"].as_str()),
            (Some("AP8="), Some("base64"))
        );
    }

    #[test]
    fn payloads_stay_right_as_chunks_fill_and_are_freed() {
        let c = capture(4, 6000);
        let payload = |i: usize| -> Vec<u8> {
            // 100 B to 6,000 B (some longer than a chunk's room, some cut), each its own bytes.
            let len = [100, 3000, 5999, 7000, 16_000][i % 5];
            (0..len).map(|j| (i * 7 + j) as u8).collect()
        };
        for i in 0..200 {
            c.record(&Seen::data(Direction::UpstreamToClient, false, &payload(i)));
            let b = c.read(0, 10);
            assert_eq!(b.entries.len(), (i + 1).min(4));
            for e in &b.entries {
                let want = payload(e.seq() as usize - 1);
                let kept = e.payload.as_ref().unwrap();
                let n = want.len().min(6000);
                assert_eq!(&kept.bytes[..], &want[..n], "entry {}", e.seq());
                assert_eq!(kept.truncated, want.len() > 6000);
            }
            // The chunks held stay bounded: those of the four entries kept, and the last.
            let ring = c.ring.lock().unwrap();
            let sealed: usize = ring.chunks.sealed.iter().map(Bytes::len).sum();
            let held = sealed + ring.chunks.filling.capacity();
            drop(ring);
            assert!(held <= 4 * 6000 * 2 + CHUNK, "{held} bytes held");
        }
        // What a reader takes from a sealed chunk is that chunk's memory, not a copy made
        // while the relay waits for the lock.
        let b = c.read(0, 10);
        let ring = c.ring.lock().unwrap();
        let shared = b.entries.iter().filter(|e| {
            let at = e.payload.as_ref().unwrap().bytes.as_ptr();
            ring.chunks
                .sealed
                .iter()
                .any(|chunk| chunk.as_ptr_range().contains(&at))
        });
        assert!(shared.count() > 0);
    }

    #[test]
    fn metadata_mode_keeps_no_payload_and_off_records_nothing() {
        let c = capture(10, 100);
        c.set_mode(CaptureMode::Metadata);
        text(&c, "secret");
        let e = c.show(&c.read(0, 1).entries[0]);
        assert!(e.get("payload").is_none());
        assert_eq!(e["size"], 6);
        c.set_mode(CaptureMode::Off);
        text(&c, "more");
        assert_eq!(c.read(0, 10).entries.len(), 1);
    }
}
