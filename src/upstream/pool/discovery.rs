//! `[upstream.discovery]`: endpoints from DNS (A/AAAA of `dns`, SRV records of `srv`, each
//! re-resolved every `refresh`), merged with the configured ones. One task per gateway. A
//! failed lookup keeps the last known endpoints and is logged once per outage; an endpoint
//! that disappears from the answers drains (no new connections; its open ones stay).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Pools, Source};
use crate::config::pool::{Discovery, Pool};

/// How often the loop looks again when nothing is due sooner.
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// A resolver asking `nameserver` (or the system's, from /etc/resolv.conf), without a cache:
/// each refresh sees the records as they are now.
fn resolver(discovery: &Discovery) -> Result<TokioResolver, String> {
    let mut builder = match discovery.nameserver {
        Some(addr) => {
            let mut config = ResolverConfig::new();
            config.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
        }
        None => TokioResolver::builder_tokio().map_err(|e| format!("system resolver: {e}"))?,
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.cache_size = 0;
    opts.attempts = 1;
    opts.timeout = discovery.refresh.min(Duration::from_secs(5));
    Ok(builder.build())
}

/// `ws` or `wss` for discovered endpoints: `wss` when the pool has `[upstream.tls]` settings
/// or a `wss://` endpoint of its own.
fn scheme(pool: &Pool) -> &'static str {
    let tls = pool.tls != Default::default()
        || pool.endpoints.iter().any(|e| e.url.starts_with("wss://"));
    if tls {
        "wss"
    } else {
        "ws"
    }
}

fn url(scheme: &str, ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{scheme}://{v4}:{port}"),
        IpAddr::V6(v6) => format!("{scheme}://[{v6}]:{port}"),
    }
}

/// The endpoints `dns` names now.
async fn lookup_dns(
    resolver: &TokioResolver,
    scheme: &str,
    host: &str,
    port: u16,
) -> Result<Vec<(String, u32)>, String> {
    let ips = resolver.lookup_ip(host).await.map_err(|e| e.to_string())?;
    let mut found: Vec<(String, u32)> = ips.iter().map(|ip| (url(scheme, ip, port), 1)).collect();
    found.sort();
    found.dedup();
    Ok(found)
}

/// The endpoints the SRV records of `name` name now (each target resolved; weight 0 as 1).
async fn lookup_srv(
    resolver: &TokioResolver,
    scheme: &str,
    name: &str,
) -> Result<Vec<(String, u32)>, String> {
    let records = resolver.srv_lookup(name).await.map_err(|e| e.to_string())?;
    let mut found = Vec::new();
    for srv in records.iter() {
        let target = srv.target().to_utf8();
        let ips = resolver
            .lookup_ip(target.as_str())
            .await
            .map_err(|e| format!("{target}: {e}"))?;
        for ip in ips.iter() {
            found.push((url(scheme, ip, srv.port()), u32::from(srv.weight()).max(1)));
        }
    }
    found.sort();
    found.dedup_by(|a, b| a.0 == b.0);
    Ok(found)
}

/// Runs DNS discovery until `stop` is cancelled. `current` gives the current snapshot's pools.
pub async fn run(
    pools: Arc<Pools>,
    current: impl Fn() -> Vec<Arc<Pool>> + Send + 'static,
    stop: CancellationToken,
) {
    // Per pool and source: when it is next due, and whether it is in an outage (logged once).
    let mut due: HashMap<(String, Source), (Instant, bool)> = HashMap::new();
    let mut resolvers: HashMap<String, (Discovery, TokioResolver)> = HashMap::new();
    loop {
        let now = Instant::now();
        let mut next = now + IDLE_LOOK;
        for pool in current() {
            let Some(state) = pools.get(&pool.name) else {
                continue;
            };
            // A reload that took a source away drains what it had found.
            let d = pool.discovery.as_ref();
            for (source, wanted) in [
                (Source::Dns, d.is_some_and(|d| d.dns.is_some())),
                (Source::Srv, d.is_some_and(|d| d.srv.is_some())),
            ] {
                if !wanted && due.remove(&(pool.name.clone(), source)).is_some() {
                    state.set_endpoints(source, &[]);
                }
            }
            let Some(discovery) = pool.discovery.clone() else {
                continue;
            };
            // A reload that changes the discovery settings gets a new resolver.
            let fresh = resolvers
                .get(&pool.name)
                .is_none_or(|(d, _)| *d != discovery);
            if fresh {
                match resolver(&discovery) {
                    Ok(r) => {
                        resolvers.insert(pool.name.clone(), (discovery.clone(), r));
                    }
                    Err(e) => {
                        tracing::warn!(pool = %pool.name, error = %e, "DNS discovery cannot start");
                        continue;
                    }
                }
            }
            let resolver = &resolvers[&pool.name].1;
            let scheme = scheme(&pool);
            let sources = [
                (Source::Dns, discovery.dns.is_some()),
                (Source::Srv, discovery.srv.is_some()),
            ];
            for (source, wanted) in sources {
                if !wanted {
                    continue;
                }
                let entry = due
                    .entry((pool.name.clone(), source))
                    .or_insert((now, false));
                if entry.0 > now {
                    next = next.min(entry.0);
                    continue;
                }
                let found = match source {
                    Source::Dns => {
                        let (host, port) = discovery.dns.as_ref().expect("dns is set");
                        lookup_dns(resolver, scheme, host, *port).await
                    }
                    _ => {
                        lookup_srv(
                            resolver,
                            scheme,
                            discovery.srv.as_deref().expect("srv is set"),
                        )
                        .await
                    }
                };
                match found {
                    Ok(found) if !found.is_empty() => {
                        if entry.1 {
                            tracing::info!(pool = %pool.name, source = source.as_str(), "discovery answers again");
                        }
                        entry.1 = false;
                        state.set_endpoints(source, &found);
                    }
                    failed => {
                        state.discovery_failed();
                        let error = failed.err().unwrap_or_else(|| "no records".into());
                        if !entry.1 {
                            tracing::warn!(pool = %pool.name, source = source.as_str(), %error, "discovery failed: keeping the last known endpoints");
                        }
                        entry.1 = true;
                    }
                }
                entry.0 = now + discovery.refresh;
                next = next.min(entry.0);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.cancelled() => break,
        }
    }
}
