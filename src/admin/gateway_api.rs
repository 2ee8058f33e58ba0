//! The gateway's side of the admin API: [`AdminApi`] over a running gateway's shared state,
//! its reloader and its current snapshot.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};

use super::{AdminApi, BoxFuture};
use crate::config::{Config, OnPolicyError, Route};
use crate::fleet::registry::FleetRegistry;
use crate::registry::Registry;
use crate::reload::Reloader;
use crate::state::Shared;

/// [`AdminApi`] for one running gateway.
pub(crate) struct GatewayApi {
    shared: Arc<Shared>,
    reloader: Arc<Reloader>,
    /// `scope=fleet`: with `[shared] backend = "redis"` only.
    fleet: Option<Arc<FleetRegistry>>,
}

impl GatewayApi {
    pub(crate) fn new(
        shared: Arc<Shared>,
        reloader: Arc<Reloader>,
        fleet: Option<Arc<FleetRegistry>>,
    ) -> GatewayApi {
        GatewayApi {
            shared,
            reloader,
            fleet,
        }
    }
}

impl AdminApi for GatewayApi {
    fn ready(&self) -> bool {
        !self.shared.stopping.load(Ordering::Acquire)
    }

    fn metrics(&self) -> String {
        let shared = self.shared.fleet.as_ref().map(|fleet| fleet.sample());
        self.shared
            .metrics
            .encode_all(upstream_samples(&self.shared.pools), shared)
    }

    fn upstreams(&self) -> Value {
        let pools: Vec<Value> = self
            .shared
            .pools
            .all()
            .iter()
            .map(|pool| {
                let endpoints: Vec<Value> = pool
                    .endpoints()
                    .iter()
                    .map(|e| {
                        let state = if e.is_draining() {
                            "draining"
                        } else if e.marked_down() {
                            "down"
                        } else {
                            "up"
                        };
                        json!({
                            "url": redact_url(&e.url),
                            "id": e.id,
                            "state": state,
                            "source": e.source.as_str(),
                            "open_connections": e.open(),
                            "recent_failures": e.recent_failures(),
                        })
                    })
                    .collect();
                json!({
                    "name": pool.name,
                    "retries": pool.retries(),
                    "discovery_failures": pool.discovery_failures(),
                    "endpoints": endpoints,
                })
            })
            .collect();
        json!({ "pools": pools })
    }

    fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    fn fleet(&self) -> Option<Arc<FleetRegistry>> {
        self.fleet.clone()
    }

    fn reload(&self) -> BoxFuture<Result<u64, String>> {
        let reloader = self.reloader.clone();
        Box::pin(async move { reloader.reload().await.map_err(|e| e.one_line()) })
    }

    fn config(&self) -> Value {
        let snapshot = self.shared.snapshot();
        let mut value = effective(&snapshot.config);
        value["snapshot"] = json!(snapshot.number);
        value
    }
}

/// The pools' numbers for a scrape, read from their live state (no per-message work: the
/// counts are kept as connections open and close, and summed here).
fn upstream_samples(pools: &crate::upstream::pool::Pools) -> Vec<crate::metrics::UpstreamSample> {
    pools
        .all()
        .iter()
        .map(|pool| crate::metrics::UpstreamSample {
            pool: pool.name.clone(),
            retries: pool.retries(),
            discovery_failures: pool.discovery_failures(),
            endpoints: pool
                .endpoints()
                .iter()
                .map(|e| crate::metrics::EndpointSample {
                    endpoint: redact_url(&e.url),
                    up: e.is_up(),
                    open: e.open(),
                    failures: e.failures().iter().map(|(k, n)| (k.as_str(), *n)).collect(),
                })
                .collect(),
        })
        .collect()
}

/// The effective configuration as JSON, defaults filled in. Secrets are left out: the admin
/// token itself (only its file is named) and any password in an upstream URL.
fn effective(config: &Config) -> Value {
    let s = &config.server;
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let od = |d: Option<std::time::Duration>| d.map(|d| humantime::format_duration(d).to_string());
    json!({
        "file": config.origin.display().to_string(),
        "server": {
            "listen": s.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "tls": s.tls.iter().map(|t| json!({
                "listen": t.listen.to_string(),
                "certificates": t.certificates.iter().map(|c| json!({
                    "cert_file": c.cert_file.display().to_string(),
                    "key_file": c.key_file.display().to_string(),
                })).collect::<Vec<_>>(),
                "min_version": t.min_version.as_str(),
            })).collect::<Vec<_>>(),
            "workers": s.workers,
            "max_connections": s.max_connections,
            "max_pending_handshakes": s.max_pending_handshakes,
            "queue_timeout": d(s.queue_timeout),
            "keepalive_timeout": od(s.keepalive_timeout),
            "keepalive_requests": s.keepalive_requests,
            "header_read_timeout": d(s.header_read_timeout),
            "close_timeout": d(s.close_timeout),
            "shutdown_grace": d(s.shutdown_grace),
            "watchdog_timeout": d(s.watchdog_timeout),
            "watch": s.watch,
            "drain_old": od(s.drain_old),
        },
        "shared": {
            "max_entries": config.shared.max_entries,
            "max_bytes": config.shared.max_bytes,
            "backend": if config.shared.redis.is_some() { "redis" } else { "local" },
            "redis": config.shared.redis.as_ref().map(|r| json!({
                "url": r.shown_url(),
                "key_prefix": r.key_prefix,
                "instance": r.instance,
                "on_unavailable": r.on_unavailable.as_str(),
                "timeout": d(r.timeout),
                "frame_staleness": d(r.frame_staleness),
                "lease": d(r.lease),
            })),
        },
        "admin": config.admin.as_ref().map(|a| json!({
            "listen": a.listen.to_string(),
            "token_file": a.token_file.as_ref().map(|p| p.display().to_string()),
            "token": a.token.as_ref().map(|_| "<redacted>"),
        })),
        "routes": config.routes.iter().map(|r| route(r)).collect::<Vec<_>>(),
    })
}

fn route(r: &Route) -> Value {
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let od = |d: Option<std::time::Duration>| d.map(|d| humantime::format_duration(d).to_string());
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    json!({
        "name": r.name(),
        "path": r.path.as_str(),
        "host": r.host,
        "upstream": redact_url(r.upstream.as_str()),
        "mime_type": r.mime_type,
        "expire": od(r.expire),
        "idle_timeout": od(r.idle_timeout),
        "ping_interval": od(r.ping_interval),
        "ping_timeout": d(r.ping_timeout),
        "max_queued_bytes": r.max_queued_bytes,
        "max_message_size": r.max_message_size,
        "handshake_timeout": d(r.handshake_timeout),
        "policies": {
            "on_upgrade": path(&r.policies.on_upgrade),
            "on_client_frame": path(&r.policies.on_client_frame),
            "on_server_frame": path(&r.policies.on_server_frame),
            "on_close": path(&r.policies.on_close),
        },
        "on_policy_error": match r.on_policy_error {
            OnPolicyError::Close => "close",
            OnPolicyError::Pass => "pass",
            OnPolicyError::Drop => "drop",
        },
        "policy_cpu_limit": d(r.policy_cpu_limit),
        "policy_memory_limit": r.policy_memory_limit,
        "policy_state_limit": r.policy_state_limit,
        "upstream_tls": {
            "ca_file": path(&r.upstream_tls.ca_file),
            "insecure_skip_verify": r.upstream_tls.insecure_skip_verify,
        },
        "allow_encoded_slash": r.allow_encoded_slash,
        "origins": r.origins.as_ref().map(|o| o.patterns.iter().map(ToString::to_string).collect::<Vec<_>>()),
        "allow_missing_origin": r.origins.as_ref().is_some_and(|o| o.allow_missing),
        "http": match r.http {
            crate::config::HttpMode::Refuse => "refuse",
            crate::config::HttpMode::Proxy => "proxy",
        },
        "max_body_size": r.max_body_size,
        "jwt": r.jwt.as_deref().map(jwt),
        "validate": r.validate.as_ref().map(|v| json!({
            "client": v.client.as_ref().map(|f| f.path.display().to_string()),
            "server": v.server.as_ref().map(|f| f.path.display().to_string()),
            "on_invalid": v.on_invalid.as_str(),
        })),
        "compression": r.compression,
        "compression_context_takeover": r.compression_context_takeover,
        "compression_window_bits": r.compression_window_bits,
        "compression_level": r.compression_level,
        "compression_threshold": r.compression_threshold,
        "capture": {
            "mode": r.capture.mode.as_str(),
            "max_payload": r.capture.max_payload,
            "keep": r.capture.keep,
            "mask": r.capture.mask,
        },
    })
}

/// `[route.jwt]` as configured; key files by name, never their bytes.
fn jwt(j: &crate::config::JwtConfig) -> Value {
    use crate::config::jwt::{JwtKeys, TokenSource};
    let (keys, source) = match &j.keys {
        JwtKeys::Issuer(url) => ("issuer", url.clone()),
        JwtKeys::JwksUrl(url) => ("jwks_url", url.clone()),
        JwtKeys::PublicKey(k) => ("public_key_file", k.path.display().to_string()),
        JwtKeys::Secret(k) => ("secret_file", k.path.display().to_string()),
    };
    json!({
        keys: source,
        "audience": j.audience,
        "algorithms": j.algorithms.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>(),
        "from": j.from.iter().map(|f| match f {
            TokenSource::Header(h) => format!("header:{h}"),
            TokenSource::Query(q) => format!("query:{q}"),
            TokenSource::Cookie(c) => format!("cookie:{c}"),
        }).collect::<Vec<_>>(),
        "leeway": humantime::format_duration(j.leeway).to_string(),
        "required": j.required.iter().map(|(k, v)| (k.clone(), v.join(" "))).collect::<std::collections::BTreeMap<_, _>>(),
        "expire_with_token": j.expire_with_token,
        "strip": j.strip,
        "ca_file": j.ca_file.as_ref().map(|p| p.display().to_string()),
    })
}

/// `ws://user:secret@host/` shows as `ws://user:<redacted>@host/`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let hidden = if userinfo.contains(':') {
                ":<redacted>"
            } else {
                ""
            };
            format!("{scheme}://{user}{hidden}@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_upstream_urls_are_redacted() {
        assert_eq!(
            redact_url("ws://ann:s3cret@h:1/p?x=1"),
            "ws://ann:<redacted>@h:1/p?x=1"
        );
        assert_eq!(redact_url("ws://h:1/p@x"), "ws://h:1/p@x");
        assert_eq!(redact_url("ws://ann@h/"), "ws://ann@h/");
    }
}
