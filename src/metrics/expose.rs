//! Scrape time: the sum of every worker's sets for a route, and its rendering through
//! `prometheus-client` (a [`Collector`] that writes const counters, gauges and histograms).
//! Runs on the admin thread only; allocating here is fine.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::route::{
    ClosedBy, Direction, DurationHistogram, LifetimeReason, Phase, PolicyErrorKind, RouteMetrics,
    SizeHistogram, DURATION_BUCKETS, SIZE_BUCKETS,
};

/// A histogram summed over workers: per-bucket counts (last = `+Inf`) and the sum in base units.
#[derive(Debug, Clone, Default)]
struct HistTotals {
    buckets: Vec<u64>,
    sum: u64,
}

impl HistTotals {
    fn add<const N: usize>(&mut self, h: &super::route::Histogram<N>) {
        self.buckets.resize(N, 0);
        for (total, c) in self.buckets.iter_mut().zip(&h.buckets) {
            *total += c.get();
        }
        self.sum += h.sum.get();
    }

    fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// One route summed over workers.
#[derive(Debug, Default)]
pub(super) struct RouteTotals {
    opened: u64,
    closed: u64,
    handshakes: BTreeMap<Option<u32>, u64>,
    messages: [[u64; 2]; 2],
    bytes: [u64; 2],
    sizes: [HistTotals; 2],
    /// Key `None` is the overflow bucket.
    closes: BTreeMap<Option<u32>, u64>,
    policy_durations: [HistTotals; 4],
    policy_errors: [[u64; 3]; 4],
    policy_drops: [u64; 2],
    upstream_connect: HistTotals,
    lifetime_closes: [u64; 2],
    /// Key `None` is the overflow bucket.
    http_requests: BTreeMap<Option<u32>, u64>,
    validating: u64,
    validation_failures: [u64; 2],
}

impl RouteTotals {
    /// True once the route has carried a connection. Routes that never did (e.g.
    /// [`UNMATCHED_ROUTE`](super::UNMATCHED_ROUTE), or a route whose upgrades are all refused)
    /// show only their handshakes, closes and policy calls, not pages of zeros.
    fn active(&self) -> bool {
        self.opened > 0
            || self.upstream_connect.count() > 0
            || self.messages.iter().flatten().any(|&n| n > 0)
    }

    /// True once the policy of `phase` ran on this route.
    fn phase_used(&self, phase: usize) -> bool {
        self.policy_durations[phase].count() > 0 || self.policy_errors[phase].iter().any(|&n| n > 0)
    }

    pub(super) fn add(&mut self, r: &RouteMetrics) {
        self.opened += r.opened.get();
        self.closed += r.closed.get();
        let (pairs, overflow) = r.handshakes.read();
        for (status, n) in pairs {
            *self.handshakes.entry(Some(status)).or_default() += n;
        }
        if overflow > 0 {
            *self.handshakes.entry(None).or_default() += overflow;
        }
        for d in 0..2 {
            for t in 0..2 {
                self.messages[d][t] += r.messages[d][t].get();
            }
            // The size histogram's sum is the byte count: kept once.
            self.bytes[d] += r.sizes[d].sum.get();
            add_size(&mut self.sizes[d], &r.sizes[d]);
            self.policy_drops[d] += r.policy_drops[d].get();
            self.validation_failures[d] += r.validation_failures[d].get();
            self.lifetime_closes[d] += r.lifetime_closes[d].get();
        }
        let (pairs, overflow) = r.http_requests.read();
        for (status, n) in pairs {
            *self.http_requests.entry(Some(status)).or_default() += n;
        }
        if overflow > 0 {
            *self.http_requests.entry(None).or_default() += overflow;
        }
        let (pairs, overflow) = r.closes.read();
        for (key, n) in pairs {
            *self.closes.entry(Some(key)).or_default() += n;
        }
        if overflow > 0 {
            *self.closes.entry(None).or_default() += overflow;
        }
        for p in 0..4 {
            add_duration(&mut self.policy_durations[p], &r.policy_durations[p]);
            for k in 0..3 {
                self.policy_errors[p][k] += r.policy_errors[p][k].get();
            }
        }
        add_duration(&mut self.upstream_connect, &r.upstream_connect);
        self.validating += r.validating.get();
    }
}

fn add_size(t: &mut HistTotals, h: &SizeHistogram) {
    t.add(h);
}

fn add_duration(t: &mut HistTotals, h: &DurationHistogram) {
    t.add(h);
}

/// Everything one scrape renders.
#[derive(Debug, Default)]
pub(super) struct Scrape {
    pub(super) routes: BTreeMap<Arc<str>, RouteTotals>,
    pub(super) reloads: [u64; 2],
    pub(super) snapshot: u64,
    pub(super) upstreams: Vec<super::UpstreamSample>,
    pub(super) shared: Option<super::SharedBackendSample>,
}

impl Scrape {
    pub(super) fn render(self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing into a String cannot fail; an Err would be a bug in our collector.
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
            tracing::error!("encoding metrics failed: {e}");
        }
        out
    }
}

/// The `status` or `code` label of an overflowed keyed count.
const OTHER: &str = "other";

type Labels<'a> = Vec<(&'static str, &'a str)>;

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let routes = &self.routes;

        let mut m = enc.encode_descriptor(
            "framegate_connections_open",
            "WebSocket connections open now.",
            None,
            MetricType::Gauge,
        )?;
        for (name, t) in routes.iter().filter(|(_, t)| t.active()) {
            let open = t.opened.saturating_sub(t.closed) as i64;
            ConstGauge::new(open).encode(m.encode_family(&vec![("route", &**name)])?)?;
        }

        let mut m = enc.encode_descriptor(
            "framegate_connections",
            "WebSocket connections established (both legs upgraded).",
            None,
            MetricType::Counter,
        )?;
        for (name, t) in routes.iter().filter(|(_, t)| t.active()) {
            ConstCounter::new(t.opened).encode(m.encode_family(&vec![("route", &**name)])?)?;
        }

        let mut m = enc.encode_descriptor(
            "framegate_handshakes",
            "Upgrade requests answered, by HTTP status (101 = upgraded).",
            None,
            MetricType::Counter,
        )?;
        for (name, t) in routes {
            for (status, n) in &t.handshakes {
                let status = status.map_or(OTHER.to_owned(), |s| s.to_string());
                let labels: Labels = vec![("route", &**name), ("status", &status)];
                ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
            }
        }

        let mut m = enc.encode_descriptor(
            "framegate_http_requests",
            "Plain HTTP requests on routes with http = \"proxy\", by the status the client got.",
            None,
            MetricType::Counter,
        )?;
        for (name, t) in routes {
            for (status, n) in &t.http_requests {
                let status = status.map_or(OTHER.to_owned(), |s| s.to_string());
                let labels: Labels = vec![("route", &**name), ("status", &status)];
                ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
            }
        }

        let mut m = enc.encode_descriptor(
            "framegate_messages",
            "Data messages forwarded, by direction and type.",
            None,
            MetricType::Counter,
        )?;
        for (name, t) in routes.iter().filter(|(_, t)| t.active()) {
            for d in Direction::ALL {
                for (i, ty) in ["text", "binary"].into_iter().enumerate() {
                    let labels: Labels =
                        vec![("route", &**name), ("direction", d.as_str()), ("type", ty)];
                    ConstCounter::new(t.messages[d as usize][i])
                        .encode(m.encode_family(&labels)?)?;
                }
            }
        }

        let mut m = enc.encode_descriptor(
            "framegate_message_bytes",
            "Payload bytes of forwarded data messages.",
            None,
            MetricType::Counter,
        )?;
        for (name, t) in routes.iter().filter(|(_, t)| t.active()) {
            for d in Direction::ALL {
                let labels: Labels = vec![("route", &**name), ("direction", d.as_str())];
                ConstCounter::new(t.bytes[d as usize]).encode(m.encode_family(&labels)?)?;
            }
        }

        let mut m = enc.encode_descriptor(
            "framegate_message_size_bytes",
            "Payload size of forwarded data messages.",
            None,
            MetricType::Histogram,
        )?;
        let size_bounds: Vec<f64> = SIZE_BUCKETS.iter().map(|&b| b as f64).collect();
        for (name, t) in routes.iter().filter(|(_, t)| t.active()) {
            for d in Direction::ALL {
                let labels: Labels = vec![("route", &**name), ("direction", d.as_str())];
                let h = &t.sizes[d as usize];
                m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                    h.sum as f64,
                    h.count(),
                    &bucket_pairs(&size_bounds, h),
                    None,
                )?;
            }
        }

        let mut m = enc.encode_descriptor(
            "framegate_closes",
            "Established connections closed, by the close code the client got and who closed.",
            None,
            MetricType::Counter,
        )?;
        for (name, t) in routes {
            for (key, n) in &t.closes {
                let (code, by) = match key {
                    Some(k) => ((k >> 2).to_string(), closed_by(k & 3)),
                    None => (OTHER.to_owned(), OTHER),
                };
                let labels: Labels = vec![("route", &**name), ("code", &code), ("closed_by", by)];
                ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
            }
        }

        let mut m = enc.encode_descriptor(
            "framegate_policy_duration_seconds",
            "Time spent in policy hooks.",
            None,
            MetricType::Histogram,
        )?;
        for (name, t) in routes {
            for p in Phase::ALL.into_iter().filter(|&p| t.phase_used(p as usize)) {
                let labels: Labels = vec![("route", &**name), ("phase", p.as_str())];
                encode_seconds(&mut m, &labels, &t.policy_durations[p as usize])?;
            }
        }

        let mut m = enc.encode_descriptor(
            "framegate_policy_errors",
            "Policy hook failures, by phase and kind.",
            None,
            MetricType::Counter,
        )?;
        for (name, t) in routes {
            for p in Phase::ALL.into_iter().filter(|&p| t.phase_used(p as usize)) {
                for k in PolicyErrorKind::ALL {
                    let labels: Labels = vec![
                        ("route", &**name),
                        ("phase", p.as_str()),
                        ("kind", k.as_str()),
                    ];
                    ConstCounter::new(t.policy_errors[p as usize][k as usize])
                        .encode(m.encode_family(&labels)?)?;
                }
            }
        }

        let mut m = enc.encode_descriptor(
            "framegate_policy_drops",
            "Data messages dropped by a policy, by direction.",
            None,
            MetricType::Counter,
        )?;
        for (name, t) in routes.iter().filter(|(_, t)| t.active()) {
            for d in Direction::ALL {
                let labels: Labels = vec![("route", &**name), ("direction", d.as_str())];
                ConstCounter::new(t.policy_drops[d as usize]).encode(m.encode_family(&labels)?)?;
            }
        }

        let mut m = enc.encode_descriptor(
            "framegate_validation_failures",
            "Messages a [route.validate] JSON Schema refused, by direction.",
            None,
            MetricType::Counter,
        )?;
        // Routes that validate (a connection with [route.validate] was opened), or did.
        let validating =
            |t: &RouteTotals| t.validating > 0 || t.validation_failures.iter().any(|&n| n > 0);
        for (name, t) in routes.iter().filter(|(_, t)| validating(t)) {
            for d in Direction::ALL {
                let labels: Labels = vec![("route", &**name), ("direction", d.as_str())];
                ConstCounter::new(t.validation_failures[d as usize])
                    .encode(m.encode_family(&labels)?)?;
            }
        }

        let mut m = enc.encode_descriptor(
            "framegate_upstream_connect_duration_seconds",
            "Time to connect to the upstream and complete its WebSocket handshake.",
            None,
            MetricType::Histogram,
        )?;
        for (name, t) in routes.iter().filter(|(_, t)| t.active()) {
            let labels: Labels = vec![("route", &**name)];
            encode_seconds(&mut m, &labels, &t.upstream_connect)?;
        }

        let mut m = enc.encode_descriptor(
            "framegate_lifetime_closes",
            "Connections closed by a lifetime timer (expire or idle_timeout).",
            None,
            MetricType::Counter,
        )?;
        for (name, t) in routes.iter().filter(|(_, t)| t.active()) {
            for r in LifetimeReason::ALL {
                let labels: Labels = vec![("route", &**name), ("reason", r.as_str())];
                ConstCounter::new(t.lifetime_closes[r as usize])
                    .encode(m.encode_family(&labels)?)?;
            }
        }

        let mut m = enc.encode_descriptor(
            "framegate_config_reloads",
            "Configuration reload attempts, by result.",
            None,
            MetricType::Counter,
        )?;
        for (i, result) in ["success", "failure"].into_iter().enumerate() {
            let labels: Labels = vec![("result", result)];
            ConstCounter::new(self.reloads[i]).encode(m.encode_family(&labels)?)?;
        }

        let m = enc.encode_descriptor(
            "framegate_config_snapshot",
            "Number of the configuration snapshot new connections get.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.snapshot as i64).encode(m)?;
        self.encode_shared(&mut enc)?;
        self.encode_upstreams(&mut enc)
    }
}

impl Scrape {
    /// The fleet's store's families, with `[shared] backend = "redis"` only.
    fn encode_shared(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let m = enc.encode_descriptor(
            "framegate_shared_backend_up",
            "1 while the fleet's store (Redis) answers, 0 while it does not.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(shared.up)).encode(m)?;
        let mut m = enc.encode_descriptor(
            "framegate_shared_errors",
            "Operations on the fleet's store that failed (Redis down or slow, a refusal, a full queue of writes), by op.",
            None,
            MetricType::Counter,
        )?;
        for (op, n) in &shared.errors {
            let labels: Labels = vec![("op", op)];
            ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// The `[[upstream]]` pools' families, read from their live state at scrape time.
    fn encode_upstreams(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A gateway without pools does not list their (empty) families.
        if self.upstreams.is_empty() {
            return Ok(());
        }
        let endpoints = || {
            self.upstreams
                .iter()
                .flat_map(|p| p.endpoints.iter().map(move |e| (&*p.pool, e)))
        };
        let mut m = enc.encode_descriptor(
            "framegate_upstream_endpoint_up",
            "1 if the pool's endpoint takes new connections, 0 if it is down or draining.",
            None,
            MetricType::Gauge,
        )?;
        for (pool, e) in endpoints() {
            let labels: Labels = vec![("pool", pool), ("endpoint", &e.endpoint)];
            ConstGauge::new(i64::from(e.up)).encode(m.encode_family(&labels)?)?;
        }
        let mut m = enc.encode_descriptor(
            "framegate_upstream_connections_open",
            "Upgraded connections open on the pool's endpoint, across all workers.",
            None,
            MetricType::Gauge,
        )?;
        for (pool, e) in endpoints() {
            let labels: Labels = vec![("pool", pool), ("endpoint", &e.endpoint)];
            ConstGauge::new(e.open as i64).encode(m.encode_family(&labels)?)?;
        }
        let mut m = enc.encode_descriptor(
            "framegate_upstream_failures",
            "Failed attempts on the pool's endpoint before the 101, by kind.",
            None,
            MetricType::Counter,
        )?;
        for (pool, e) in endpoints() {
            for (kind, n) in &e.failures {
                let labels: Labels =
                    vec![("pool", pool), ("endpoint", &e.endpoint), ("kind", kind)];
                ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
            }
        }
        // The per-pool counters.
        let per_pool: [(&str, &str, PoolCount); 2] = [
            (
                "framegate_upstream_retries",
                "Attempts on another endpoint of the pool after a failed one.",
                |p| p.retries,
            ),
            (
                "framegate_upstream_discovery_failures",
                "Discovery lookups (DNS, SRV) and etcd sessions of the pool that failed; its last known endpoints stayed.",
                |p| p.discovery_failures,
            ),
        ];
        for (name, help, value) in per_pool {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in &self.upstreams {
                let labels: Labels = vec![("pool", &p.pool)];
                ConstCounter::new(value(p)).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// One per-pool counter's value in a pool's sample.
type PoolCount = fn(&super::UpstreamSample) -> u64;

fn closed_by(bits: u32) -> &'static str {
    ClosedBy::ALL
        .get(bits as usize)
        .map_or(OTHER, |c| c.as_str())
}

/// `(upper bound, count in that bucket)`, `+Inf` last; the encoder makes them cumulative.
fn bucket_pairs(bounds: &[f64], h: &HistTotals) -> Vec<(f64, u64)> {
    let mut pairs: Vec<(f64, u64)> = bounds
        .iter()
        .copied()
        .chain(std::iter::once(f64::INFINITY))
        .zip(h.buckets.iter().copied().chain(std::iter::repeat(0)))
        .collect();
    pairs.truncate(bounds.len() + 1);
    pairs
}

/// A duration histogram whose sum is kept in nanoseconds, written in seconds.
fn encode_seconds(
    m: &mut prometheus_client::encoding::MetricEncoder,
    labels: &Labels,
    h: &HistTotals,
) -> Result<(), std::fmt::Error> {
    m.encode_family(labels)?.encode_histogram::<NoLabelSet>(
        h.sum as f64 / 1e9,
        h.count(),
        &bucket_pairs(&DURATION_BUCKETS, h),
        None,
    )
}
