//! One worker's counters for one route: what the relay, the upgrade and the policy engine write
//! into, and what a scrape reads. std only, so that the hot path can be measured on its own.
//!
//! Every counter here has a single writer, the worker thread that owns the set (a connection
//! holds an `Arc` to its route's set for its whole life and always runs on that worker). So a
//! write is a relaxed load and a relaxed store, not a read-modify-write: no lock prefix, no
//! shared cache line with another worker, nothing allocated. The scraper on another thread only
//! loads, and may see a value one event old, which Prometheus tolerates by design.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::atomic::{Ordering::Acquire, Ordering::Release};
use std::time::Duration;

/// A monotonic counter with one writer thread.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        // Single writer (see the module doc): load + store cannot lose an update.
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Upper bounds of `framegate_message_size_bytes`: powers of 4 from 64 B to 16 MiB.
pub const SIZE_BUCKETS: [u64; 10] = [
    64,
    256,
    1 << 10,
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
];

/// Upper bounds of the duration histograms, in seconds: Prometheus' default buckets
/// (5 ms .. 10 s) extended down to 100 µs, because a policy call usually takes well under 1 ms.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// [`DURATION_BUCKETS`] in nanoseconds, so that observing a duration needs no float maths.
const DURATION_BUCKETS_NS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Index of the size bucket holding `bytes`; `SIZE_BUCKETS.len()` is the `+Inf` bucket.
#[inline]
pub(crate) fn size_bucket(bytes: u64) -> usize {
    if bytes <= 64 {
        return 0;
    }
    // bytes <= 2^bits; bucket i holds up to 2^(6 + 2i).
    let bits = 64 - (bytes - 1).leading_zeros() as usize;
    (bits - 6).div_ceil(2).min(SIZE_BUCKETS.len())
}

/// Index of the duration bucket holding `nanos`; `DURATION_BUCKETS.len()` is `+Inf`.
#[inline]
pub(crate) fn duration_bucket(nanos: u64) -> usize {
    DURATION_BUCKETS_NS.partition_point(|&bound| bound < nanos)
}

/// A histogram with fixed buckets: per-bucket (not cumulative) counts plus the sum of the
/// observations in the histogram's base unit (bytes, or nanoseconds for durations).
#[derive(Debug)]
pub(crate) struct Histogram<const N: usize> {
    pub(crate) buckets: [Counter; N],
    pub(crate) sum: Counter,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| Counter::default()),
            sum: Counter::default(),
        }
    }
}

/// Size histogram: one slot per bound plus `+Inf`.
pub(crate) type SizeHistogram = Histogram<{ SIZE_BUCKETS.len() + 1 }>;
/// Duration histogram (sum in nanoseconds): one slot per bound plus `+Inf`.
pub(crate) type DurationHistogram = Histogram<{ DURATION_BUCKETS.len() + 1 }>;

impl SizeHistogram {
    #[inline]
    fn observe(&self, bytes: u64) {
        self.buckets[size_bucket(bytes)].inc();
        self.sum.add(bytes);
    }
}

impl DurationHistogram {
    #[inline]
    fn observe(&self, d: Duration) {
        self.observe_times(d, 1);
    }

    /// Observes `d` as `times` observations (a sample standing for that many).
    #[inline]
    fn observe_times(&self, d: Duration, times: u64) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[duration_bucket(nanos)].add(times);
        self.sum.add(nanos.saturating_mul(times));
    }
}

/// One frame-policy call in this many is timed, and stands for this many calls in
/// `framegate_policy_duration_seconds`. Two clock reads cost 60 to 100 ns on the development
/// machine, against about 1 µs for a short policy call: timing every message would add up to
/// a tenth to the Lua path, sampling adds about one percent. `on_upgrade` and `on_close` run
/// once per connection and are always timed.
pub const POLICY_SAMPLE: u64 = 8;

/// Counts keyed by a small number the writer learns at run time (an HTTP status, a close code
/// with who closed), without a lock or an allocation: slots are claimed in order by the single
/// writer and published with `len`. Past `N` distinct keys everything lands in an overflow count,
/// so a peer sending every close code in turn cannot grow the table or the scrape.
#[derive(Debug)]
pub(crate) struct KeyedCounts<const N: usize> {
    keys: [AtomicU32; N],
    counts: [Counter; N],
    len: AtomicUsize,
    overflow: Counter,
}

impl<const N: usize> Default for KeyedCounts<N> {
    fn default() -> Self {
        KeyedCounts {
            keys: std::array::from_fn(|_| AtomicU32::new(0)),
            counts: std::array::from_fn(|_| Counter::default()),
            len: AtomicUsize::new(0),
            overflow: Counter::default(),
        }
    }
}

impl<const N: usize> KeyedCounts<N> {
    pub(crate) fn inc(&self, key: u32) {
        let len = self.len.load(Relaxed);
        for i in 0..len {
            if self.keys[i].load(Relaxed) == key {
                self.counts[i].inc();
                return;
            }
        }
        if len == N {
            self.overflow.inc();
            return;
        }
        self.keys[len].store(key, Relaxed);
        self.counts[len].inc();
        // Release: a scraper that sees the new length also sees the key and its first count.
        self.len.store(len + 1, Release);
    }

    /// `(key, count)` for every key seen, and the overflow count.
    pub(crate) fn read(&self) -> (impl Iterator<Item = (u32, u64)> + '_, u64) {
        let len = self.len.load(Acquire);
        let pairs = (0..len).map(|i| (self.keys[i].load(Relaxed), self.counts[i].get()));
        (pairs, self.overflow.get())
    }
}

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client to the upstream.
    ClientToUpstream = 0,
    /// From the upstream to the client.
    UpstreamToClient = 1,
}

impl Direction {
    /// Both, in label order.
    pub const ALL: [Direction; 2] = [Direction::ClientToUpstream, Direction::UpstreamToClient];

    /// The `direction` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToUpstream => "client_to_upstream",
            Direction::UpstreamToClient => "upstream_to_client",
        }
    }
}

/// Who ended a connection (the `closed_by` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClosedBy {
    /// The client closed, dropped or broke the protocol.
    Client = 0,
    /// The upstream did.
    Upstream = 1,
    /// framegate did (lifetime, policy, admin, shutdown, reload drain).
    Gateway = 2,
}

impl ClosedBy {
    /// All, in label order.
    pub const ALL: [ClosedBy; 3] = [ClosedBy::Client, ClosedBy::Upstream, ClosedBy::Gateway];

    /// The `closed_by` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Client => "client",
            ClosedBy::Upstream => "upstream",
            ClosedBy::Gateway => "gateway",
        }
    }
}

/// A policy phase (the `phase` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// `on_upgrade`.
    Upgrade = 0,
    /// `on_client_frame`.
    ClientFrame = 1,
    /// `on_server_frame`.
    ServerFrame = 2,
    /// `on_close`.
    Close = 3,
}

impl Phase {
    /// All, in label order.
    pub const ALL: [Phase; 4] = [
        Phase::Upgrade,
        Phase::ClientFrame,
        Phase::ServerFrame,
        Phase::Close,
    ];

    /// The `phase` label value: the hook's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Upgrade => "on_upgrade",
            Phase::ClientFrame => "on_client_frame",
            Phase::ServerFrame => "on_server_frame",
            Phase::Close => "on_close",
        }
    }
}

/// How a policy call failed (the `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyErrorKind {
    /// A Lua error raised by the script.
    Error = 0,
    /// The call ran past `policy_cpu_limit`.
    CpuLimit = 1,
    /// The call grew the heap past `policy_memory_limit`.
    MemoryLimit = 2,
}

impl PolicyErrorKind {
    /// All, in label order.
    pub const ALL: [PolicyErrorKind; 3] = [
        PolicyErrorKind::Error,
        PolicyErrorKind::CpuLimit,
        PolicyErrorKind::MemoryLimit,
    ];

    /// The `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyErrorKind::Error => "error",
            PolicyErrorKind::CpuLimit => "cpu_limit",
            PolicyErrorKind::MemoryLimit => "memory_limit",
        }
    }
}

/// Which lifetime timer ended a connection (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LifetimeReason {
    /// The route's `expire` deadline.
    Expire = 0,
    /// The route's `idle_timeout`.
    Idle = 1,
}

impl LifetimeReason {
    /// All, in label order.
    pub const ALL: [LifetimeReason; 2] = [LifetimeReason::Expire, LifetimeReason::Idle];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LifetimeReason::Expire => "expire",
            LifetimeReason::Idle => "idle",
        }
    }
}

/// Distinct handshake statuses kept per route and worker before the rest count as `other`.
pub(crate) const STATUS_SLOTS: usize = 32;
/// Distinct `(code, closed_by)` pairs kept per route and worker before the rest count as `other`.
pub(crate) const CLOSE_SLOTS: usize = 64;

/// One worker's counters for one route. Get it from
/// [`WorkerMetrics::route`](super::WorkerMetrics::route) once per connection, when its route is
/// known, and call these methods on that worker only (see the module doc).
#[derive(Debug, Default)]
pub struct RouteMetrics {
    pub(crate) opened: Counter,
    pub(crate) closed: Counter,
    pub(crate) handshakes: KeyedCounts<STATUS_SLOTS>,
    /// `[direction][text = 0, binary = 1]`.
    pub(crate) messages: [[Counter; 2]; 2],
    /// Also `framegate_message_bytes_total` (their sum), so bytes are counted once.
    pub(crate) sizes: [SizeHistogram; 2],
    /// Keyed by `code << 2 | closed_by`.
    pub(crate) closes: KeyedCounts<CLOSE_SLOTS>,
    pub(crate) policy_durations: [DurationHistogram; 4],
    /// Frame-policy calls so far, by phase: picks the calls that are timed.
    pub(crate) policy_calls: [Counter; 4],
    pub(crate) policy_errors: [[Counter; 3]; 4],
    pub(crate) policy_drops: [Counter; 2],
    pub(crate) upstream_connect: DurationHistogram,
    pub(crate) lifetime_closes: [Counter; 2],
    /// Plain HTTP requests proxied or refused on a route with `http = "proxy"`, by status.
    pub(crate) http_requests: KeyedCounts<STATUS_SLOTS>,
    /// Upgrades that got `[route.validate]`'s layer: the route's validation family is listed
    /// once this is not zero, its zeros included.
    pub(crate) validating: Counter,
    /// Messages a `[route.validate]` schema refused, by direction.
    pub(crate) validation_failures: [Counter; 2],
}

impl RouteMetrics {
    /// A WebSocket connection on this route is established (both legs upgraded). Pair it with
    /// exactly one [`connection_closed`](Self::connection_closed):
    /// `framegate_connections_open` is opened minus closed.
    pub fn connection_opened(&self) {
        self.opened.inc();
    }

    /// An established connection ended: `code` is the close code the client was sent (or
    /// received, when the client closed); 1006 when its socket just dropped.
    pub fn connection_closed(&self, code: u16, closed_by: ClosedBy) {
        self.closed.inc();
        self.closes.inc(u32::from(code) << 2 | closed_by as u32);
    }

    /// An upgrade request on this route was answered with `status` (101 when it succeeded).
    pub fn handshake(&self, status: u16) {
        self.handshakes.inc(u32::from(status));
    }

    /// A plain HTTP request on this route (`http = "proxy"`) was answered with `status`.
    pub fn http_request(&self, status: u16) {
        self.http_requests.inc(u32::from(status));
    }

    /// A data message of `bytes` payload bytes was forwarded. The per-message call: three
    /// single-writer counter updates (type, size bucket, size sum, which is also the byte
    /// count), no lock, no allocation.
    #[inline]
    pub fn message(&self, direction: Direction, is_text: bool, bytes: usize) {
        let d = direction as usize;
        let bytes = bytes as u64;
        self.messages[d][usize::from(!is_text)].inc();
        self.sizes[d].observe(bytes);
    }

    /// A policy hook ran for `duration` (wall time, including when it failed).
    #[inline]
    pub fn policy_call(&self, phase: Phase, duration: Duration) {
        self.policy_durations[phase as usize].observe(duration);
    }

    /// Whether this call of a frame hook is one to time (one in [`POLICY_SAMPLE`], the first
    /// one included); counts the call. Pass its duration to
    /// [`policy_call_sampled`](Self::policy_call_sampled).
    #[inline]
    pub fn policy_call_timed(&self, phase: Phase) -> bool {
        let calls = &self.policy_calls[phase as usize];
        let n = calls.get();
        calls.inc();
        n % POLICY_SAMPLE == 0
    }

    /// A sampled frame-hook call ran for `duration`: observed as [`POLICY_SAMPLE`] calls.
    #[inline]
    pub fn policy_call_sampled(&self, phase: Phase, duration: Duration) {
        self.policy_durations[phase as usize].observe_times(duration, POLICY_SAMPLE);
    }

    /// A policy hook failed.
    pub fn policy_error(&self, phase: Phase, kind: PolicyErrorKind) {
        self.policy_errors[phase as usize][kind as usize].inc();
    }

    /// A policy (or `on_policy_error = "drop"`) dropped a message travelling `direction`.
    pub fn policy_drop(&self, direction: Direction) {
        self.policy_drops[direction as usize].inc();
    }

    /// Connecting to the upstream and completing its handshake took `duration` (observed on
    /// success only; failures show up as 502/504 in `handshake`).
    pub fn upstream_connect(&self, duration: Duration) {
        self.upstream_connect.observe(duration);
    }

    /// An upgrade on this route got `[route.validate]`'s layer (before its upstream is
    /// reached); once per connection. Only decides that the validation family is listed.
    pub fn validating_connection(&self) {
        self.validating.inc();
    }

    /// A message travelling `direction` failed its `[route.validate]` schema.
    pub fn validation_failure(&self, direction: Direction) {
        self.validation_failures[direction as usize].inc();
    }

    /// A lifetime timer closed a connection (also call `connection_closed`).
    pub fn lifetime_close(&self, reason: LifetimeReason) {
        self.lifetime_closes[reason as usize].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_buckets_are_inclusive_upper_bounds() {
        assert_eq!(size_bucket(0), 0);
        assert_eq!(size_bucket(64), 0);
        assert_eq!(size_bucket(65), 1);
        assert_eq!(size_bucket(256), 1);
        assert_eq!(size_bucket(257), 2);
        for (i, &bound) in SIZE_BUCKETS.iter().enumerate() {
            assert_eq!(size_bucket(bound), i, "{bound}");
            assert_eq!(size_bucket(bound + 1), i + 1, "{bound}+1");
        }
        assert_eq!(size_bucket(u64::MAX), SIZE_BUCKETS.len());
    }

    #[test]
    fn duration_buckets_are_inclusive_upper_bounds() {
        assert_eq!(duration_bucket(0), 0);
        assert_eq!(duration_bucket(100_000), 0);
        assert_eq!(duration_bucket(100_001), 1);
        for (i, &s) in DURATION_BUCKETS.iter().enumerate() {
            let ns = (s * 1e9).round() as u64;
            assert_eq!(DURATION_BUCKETS_NS[i], ns);
            assert_eq!(duration_bucket(ns), i);
        }
        assert_eq!(duration_bucket(u64::MAX), DURATION_BUCKETS.len());
    }

    #[test]
    fn keyed_counts_overflow_instead_of_growing() {
        let k = KeyedCounts::<2>::default();
        k.inc(7);
        k.inc(7);
        k.inc(9);
        k.inc(11);
        k.inc(12);
        let (pairs, overflow) = k.read();
        assert_eq!(pairs.collect::<Vec<_>>(), vec![(7, 2), (9, 1)]);
        assert_eq!(overflow, 2);
    }
}
