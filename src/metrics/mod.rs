//! Prometheus metrics (issue 13 §4): per-worker counter sets that the relay writes without a
//! lock, an allocation or a shared atomic, summed across workers when `/metrics` is scraped.
//!
//! Ownership:
//! - [`Metrics`] (one per gateway, shared) knows every worker's sets and the gateway-wide
//!   values (`framegate_config_reloads_total`, `framegate_config_snapshot`). Its
//!   [`encode`](Metrics::encode) sums the workers and writes the Prometheus text format through
//!   the `prometheus-client` crate (see `expose`).
//! - [`WorkerMetrics`] (one per worker thread) hands out that worker's [`RouteMetrics`] by route
//!   name, creating a set on first use; that look-up takes a lock and is done once per
//!   connection, never per message.
//! - [`RouteMetrics`] is written only by its worker (single writer: relaxed load + store), so a
//!   connection must use the set it got from its own worker's [`WorkerMetrics`].
//!
//! The `route` label is always the route's name (`Route::name()`: host and path template), never
//! a client address or a connection id, so that series stay bounded by the configuration.
//! Handshakes that match no route are counted under [`UNMATCHED_ROUTE`].
//!
//! Wiring (for the gateway): `Metrics::new()` once; `metrics.worker(i)` moved into worker `i`;
//! `worker.route(&route.name())` when a connection's route is known, kept in the connection;
//! then the event methods of [`RouteMetrics`]; `metrics.encode()` for `GET /metrics`.

mod expose;
mod route;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

pub use route::{
    ClosedBy, Direction, LifetimeReason, Phase, PolicyErrorKind, RouteMetrics, DURATION_BUCKETS,
    POLICY_SAMPLE, SIZE_BUCKETS,
};

/// The `route` label of handshakes that matched no route (answered 404). Route names always
/// contain a `/`, so this cannot collide with one.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The `route` label that absorbs routes past [`MAX_ROUTES`] per worker.
pub const OVERFLOW_ROUTE: &str = "other";

/// Distinct route names one worker keeps sets for. Names come from the configuration, so this is
/// only reached if something passes unbounded names; past it, events count under
/// [`OVERFLOW_ROUTE`] rather than growing the table and every scrape.
pub const MAX_ROUTES: usize = 4096;

/// The outcome of a configuration reload (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// The new snapshot was validated, compiled and swapped in.
    Success = 0,
    /// Validation or compilation failed; nothing changed.
    Failure = 1,
}

impl ReloadResult {
    /// The `result` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Success => "success",
            ReloadResult::Failure => "failure",
        }
    }
}

/// Every worker's counter sets, and the gateway-wide values.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Index = worker number. Locked when a worker is added and when a scrape walks them.
    workers: Mutex<Vec<Arc<WorkerShard>>>,
    /// `[success, failure]`; reloads are rare, so shared atomics are fine here.
    reloads: [AtomicU64; 2],
    snapshot: AtomicU64,
}

/// One worker's sets, by route name.
#[derive(Debug, Default)]
struct WorkerShard {
    routes: Mutex<HashMap<Arc<str>, Arc<RouteMetrics>>>,
}

/// One worker's handle: gives out that worker's [`RouteMetrics`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    shard: Arc<WorkerShard>,
    /// The [`UNMATCHED_ROUTE`] set, looked up once: refusals before routing count here.
    unmatched: Arc<RouteMetrics>,
}

impl Metrics {
    /// An empty set of metrics (no workers yet).
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// The handle of worker `index` (created on first call; later calls return the same sets).
    /// Give each worker thread its own index: the sets it hands out have a single writer.
    pub fn worker(&self, index: usize) -> WorkerMetrics {
        let mut workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        if workers.len() <= index {
            workers.resize_with(index + 1, Default::default);
        }
        let shard = workers[index].clone();
        drop(workers);
        let unmatched = route_in(&shard, UNMATCHED_ROUTE);
        WorkerMetrics { shard, unmatched }
    }

    /// Counts one reload attempt.
    pub fn config_reload(&self, result: ReloadResult) {
        self.reloads[result as usize].fetch_add(1, Relaxed);
    }

    /// Sets `framegate_config_snapshot`, the number of the snapshot new connections get.
    pub fn set_snapshot(&self, number: u64) {
        self.snapshot.store(number, Relaxed);
    }

    /// Sums every worker's sets and renders them in the Prometheus text format (0.0.4), as
    /// served on `GET /metrics` with [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        self.encode_with(Vec::new())
    }

    /// [`Metrics::encode`], with the `[[upstream]]` pools' families from `upstreams`.
    pub fn encode_with(&self, upstreams: Vec<UpstreamSample>) -> String {
        self.encode_all(upstreams, None)
    }

    /// [`Metrics::encode_with`], with the fleet's store's families from `shared`
    /// (`[shared] backend = "redis"`).
    pub fn encode_all(
        &self,
        upstreams: Vec<UpstreamSample>,
        shared: Option<SharedBackendSample>,
    ) -> String {
        let shards: Vec<Arc<WorkerShard>> = self
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut scrape = expose::Scrape {
            reloads: [self.reloads[0].load(Relaxed), self.reloads[1].load(Relaxed)],
            snapshot: self.snapshot.load(Relaxed),
            upstreams,
            shared,
            ..Default::default()
        };
        for shard in shards {
            // Copy the worker's list out so its lock is not held while summing.
            let routes: Vec<(Arc<str>, Arc<RouteMetrics>)> = shard
                .routes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (name, set) in routes {
                scrape.routes.entry(name).or_default().add(&set);
            }
        }
        scrape.render()
    }
}

/// One pool's numbers at scrape time, read from its live state by the caller (the metrics
/// do not own pools).
#[derive(Debug, Clone, Default)]
pub struct UpstreamSample {
    /// The pool's name.
    pub pool: String,
    /// Attempts on another endpoint after a failed one.
    pub retries: u64,
    /// Failed discovery lookups and etcd sessions.
    pub discovery_failures: u64,
    /// Its endpoints.
    pub endpoints: Vec<EndpointSample>,
}

/// The fleet's store at scrape time (`[shared] backend = "redis"`), read by the caller.
#[derive(Debug, Clone, Default)]
pub struct SharedBackendSample {
    /// Whether Redis answers.
    pub up: bool,
    /// Failed operations, by `op`.
    pub errors: Vec<(&'static str, u64)>,
}

/// One endpoint's numbers at scrape time.
#[derive(Debug, Clone, Default)]
pub struct EndpointSample {
    /// The endpoint's URL.
    pub endpoint: String,
    /// Takes new connections.
    pub up: bool,
    /// Upgraded connections open on it.
    pub open: usize,
    /// Failed attempts, by kind.
    pub failures: Vec<(&'static str, u64)>,
}

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

impl WorkerMetrics {
    /// This worker's set for the route named `name`, created on first use. Call it once per
    /// connection (it takes a lock) and keep the `Arc` for the connection's life.
    pub fn route(&self, name: &str) -> Arc<RouteMetrics> {
        route_in(&self.shard, name)
    }

    /// This worker's set for answers given before a route was known (a bad request head, the
    /// connection cap, shutdown) or when none matched: `route="unmatched"`. No lock.
    pub fn unmatched(&self) -> &Arc<RouteMetrics> {
        &self.unmatched
    }
}

fn route_in(shard: &WorkerShard, name: &str) -> Arc<RouteMetrics> {
    let mut routes = shard.routes.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(set) = routes.get(name) {
        return set.clone();
    }
    let name = if routes.len() >= MAX_ROUTES {
        OVERFLOW_ROUTE
    } else {
        name
    };
    routes.entry(Arc::from(name)).or_default().clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The value of the sample line `series` (name and labels exactly as rendered).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.parse().ok()
        })
    }

    #[test]
    fn scrape_sums_two_workers() {
        let metrics = Metrics::new();
        let (w0, w1) = (metrics.worker(0), metrics.worker(1));
        let (a0, a1) = (w0.route("/chat"), w1.route("/chat"));
        let b1 = w1.route("example.com/feed");
        assert!(
            Arc::ptr_eq(&a0, &w0.route("/chat")),
            "one set per route and worker"
        );
        assert!(!Arc::ptr_eq(&a0, &a1), "workers do not share sets");

        for r in [&a0, &a1, &a1, &b1] {
            r.handshake(101);
            r.connection_opened();
        }
        w0.route(UNMATCHED_ROUTE).handshake(404);
        a0.message(Direction::ClientToUpstream, true, 10);
        a1.message(Direction::ClientToUpstream, true, 300);
        a1.message(Direction::ClientToUpstream, false, 70_000);
        a1.message(Direction::UpstreamToClient, true, 5);
        a0.connection_closed(1000, ClosedBy::Client);
        a1.connection_closed(1000, ClosedBy::Client);
        a1.connection_closed(4000, ClosedBy::Gateway);
        a1.lifetime_close(LifetimeReason::Idle);
        a0.policy_call(Phase::ClientFrame, Duration::from_micros(50));
        a1.policy_call(Phase::ClientFrame, Duration::from_millis(3));
        a1.policy_error(Phase::ClientFrame, PolicyErrorKind::CpuLimit);
        a0.policy_drop(Direction::UpstreamToClient);
        a0.upstream_connect(Duration::from_millis(20));
        metrics.config_reload(ReloadResult::Success);
        metrics.config_reload(ReloadResult::Failure);
        metrics.config_reload(ReloadResult::Success);
        metrics.set_snapshot(3);

        let text = metrics.encode();
        let v = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series}\n{text}"));
        assert_eq!(v(r#"framegate_connections_total{route="/chat"}"#), 3.0);
        assert_eq!(v(r#"framegate_connections_open{route="/chat"}"#), 0.0);
        assert_eq!(
            v(r#"framegate_connections_open{route="example.com/feed"}"#),
            1.0
        );
        assert_eq!(
            v(r#"framegate_handshakes_total{route="/chat",status="101"}"#),
            3.0
        );
        assert_eq!(
            v(r#"framegate_handshakes_total{route="unmatched",status="404"}"#),
            1.0
        );
        let c2u = r#"route="/chat",direction="client_to_upstream""#;
        assert_eq!(
            v(&format!("framegate_messages_total{{{c2u},type=\"text\"}}")),
            2.0
        );
        assert_eq!(
            v(&format!(
                "framegate_messages_total{{{c2u},type=\"binary\"}}"
            )),
            1.0
        );
        assert_eq!(
            v(&format!("framegate_message_bytes_total{{{c2u}}}")),
            70_310.0
        );
        assert_eq!(
            v(&format!(
                "framegate_message_size_bytes_bucket{{{c2u},le=\"64\"}}"
            )),
            1.0
        );
        assert_eq!(
            v(&format!(
                "framegate_message_size_bytes_bucket{{{c2u},le=\"1024\"}}"
            )),
            2.0
        );
        assert_eq!(
            v(&format!(
                "framegate_message_size_bytes_bucket{{{c2u},le=\"+Inf\"}}"
            )),
            3.0
        );
        assert_eq!(
            v(&format!("framegate_message_size_bytes_count{{{c2u}}}")),
            3.0
        );
        assert_eq!(
            v(&format!("framegate_message_size_bytes_sum{{{c2u}}}")),
            70_310.0
        );
        assert_eq!(
            v(r#"framegate_closes_total{route="/chat",code="1000",closed_by="client"}"#),
            2.0
        );
        assert_eq!(
            v(r#"framegate_closes_total{route="/chat",code="4000",closed_by="gateway"}"#),
            1.0
        );
        assert_eq!(
            v(r#"framegate_lifetime_closes_total{route="/chat",reason="idle"}"#),
            1.0
        );
        let frame = r#"route="/chat",phase="on_client_frame""#;
        assert_eq!(
            v(&format!(
                "framegate_policy_duration_seconds_count{{{frame}}}"
            )),
            2.0
        );
        assert_eq!(
            v(&format!(
                "framegate_policy_duration_seconds_bucket{{{frame},le=\"0.0001\"}}"
            )),
            1.0
        );
        assert!(
            (v(&format!("framegate_policy_duration_seconds_sum{{{frame}}}")) - 0.00305).abs()
                < 1e-9
        );
        assert_eq!(
            v(&format!(
                "framegate_policy_errors_total{{{frame},kind=\"cpu_limit\"}}"
            )),
            1.0
        );
        assert_eq!(
            v(r#"framegate_policy_drops_total{route="/chat",direction="upstream_to_client"}"#),
            1.0
        );
        assert_eq!(
            v(r#"framegate_upstream_connect_duration_seconds_count{route="/chat"}"#),
            1.0
        );
        assert_eq!(
            v(r#"framegate_config_reloads_total{result="success"}"#),
            2.0
        );
        assert_eq!(
            v(r#"framegate_config_reloads_total{result="failure"}"#),
            1.0
        );
        assert_eq!(v("framegate_config_snapshot"), 3.0);
        for name in [
            "framegate_connections_open gauge",
            "framegate_connections_total counter",
            "framegate_message_size_bytes histogram",
            "framegate_policy_duration_seconds histogram",
            "framegate_upstream_connect_duration_seconds histogram",
            "framegate_config_snapshot gauge",
        ] {
            assert!(text.contains(&format!("# TYPE {name}\n")), "{name}\n{text}");
        }
        assert!(
            !text.contains("# EOF"),
            "Prometheus text format, not OpenMetrics"
        );
        // A route that never carried a connection shows its handshakes only, not pages of zeros.
        assert!(
            !text.contains(r#"framegate_messages_total{route="unmatched""#),
            "{text}"
        );
        assert!(
            !text.contains(r#"phase="on_upgrade""#),
            "unused phases are left out\n{text}"
        );
    }

    /// Two worker threads write their own sets while a third scrapes: scrapes never go backwards,
    /// and once the writers are done the scrape is the exact sum.
    #[test]
    fn concurrent_workers_and_scrapes() {
        let metrics = Metrics::new();
        let n = 200_000u64;
        let writers: Vec<_> = (0..2)
            .map(|i| {
                let worker = metrics.worker(i);
                std::thread::spawn(move || {
                    let set = worker.route("/chat");
                    for _ in 0..n {
                        set.message(Direction::UpstreamToClient, false, 3);
                    }
                })
            })
            .collect();
        let series = r#"framegate_messages_total{route="/chat",direction="upstream_to_client",type="binary"}"#;
        let mut last = 0.0;
        while !writers.iter().all(|w| w.is_finished()) {
            let now = sample(&metrics.encode(), series).unwrap_or(0.0);
            assert!(now >= last, "{now} < {last}");
            last = now;
        }
        for w in writers {
            w.join().unwrap();
        }
        let text = metrics.encode();
        assert_eq!(sample(&text, series), Some(2.0 * n as f64));
        let bytes =
            r#"framegate_message_bytes_total{route="/chat",direction="upstream_to_client"}"#;
        assert_eq!(sample(&text, bytes), Some(6.0 * n as f64));
    }

    /// `framegate_validation_failures_total` is listed for routes that validate, zeros included,
    /// and for no other.
    #[test]
    fn validation_failures_are_listed_for_validating_routes() {
        let metrics = Metrics::new();
        let w = metrics.worker(0);
        let (checked, plain) = (w.route("/checked"), w.route("/plain"));
        for r in [&checked, &plain] {
            r.connection_opened();
        }
        checked.validating_connection();
        checked.validation_failure(Direction::UpstreamToClient);
        checked.validation_failure(Direction::UpstreamToClient);
        let text = metrics.encode();
        let series = |d: &str| {
            format!("framegate_validation_failures_total{{route=\"/checked\",direction=\"{d}\"}}")
        };
        assert_eq!(sample(&text, &series("upstream_to_client")), Some(2.0));
        assert_eq!(sample(&text, &series("client_to_upstream")), Some(0.0));
        assert!(
            !text.contains(r#"framegate_validation_failures_total{route="/plain""#),
            "{text}"
        );
        assert!(text.contains("# TYPE framegate_validation_failures_total counter\n"));
    }

    #[test]
    fn route_table_is_bounded() {
        let metrics = Metrics::new();
        let w = metrics.worker(0);
        // The worker's `unmatched` set takes one of the slots.
        for i in 0..MAX_ROUTES - 1 + 10 {
            w.route(&format!("/r{i}")).connection_opened();
        }
        let text = metrics.encode();
        assert_eq!(
            sample(&text, r#"framegate_connections_total{route="other"}"#),
            Some(10.0)
        );
    }

    /// Reports the cost of the per-message call. In a debug build this only shows the order of
    /// magnitude; the figure in docs/performance.md comes from an optimised build (see there).
    #[test]
    fn message_cost() {
        let metrics = Metrics::new();
        let set = metrics.worker(0).route("/bench");
        let n = 2_000_000u64;
        let start = std::time::Instant::now();
        for i in 0..n {
            set.message(
                Direction::ClientToUpstream,
                i & 1 == 0,
                (i & 0xffff) as usize,
            );
        }
        let per_call = start.elapsed().as_nanos() as f64 / n as f64;
        eprintln!("RouteMetrics::message: {per_call:.1} ns/call");
        let sum: u64 = set.messages[0].iter().map(|c| c.get()).sum();
        assert_eq!(sum, n);
    }
}
