//! `[[upstream]]`: named pools of WebSocket endpoints that routes name in `upstream`. This
//! module validates the tables into [`Pool`]; the live state of a pool's endpoints (health,
//! open connections, discovered endpoints) is not configuration and lives in
//! [`crate::upstream::pool`], gateway-wide, so that it survives reloads.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Spanned, Validator};

/// `[[upstream]] connect_timeout` when absent.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// `[[upstream]] retries` when absent.
pub const RETRIES: u32 = 2;
/// `[upstream.health] interval` when absent.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// `[upstream.health] fails` when absent (also the passive threshold).
pub const HEALTH_FAILS: u32 = 3;
/// `[upstream.health] passes` when absent.
pub const HEALTH_PASSES: u32 = 2;
/// `[upstream.discovery] refresh` when absent.
pub const DISCOVERY_REFRESH: Duration = Duration::from_secs(5);

/// One validated `[[upstream]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// The name routes use in `upstream`.
    pub name: String,
    /// The configured endpoints, in file order.
    pub endpoints: Vec<Endpoint>,
    /// How an endpoint is chosen.
    pub balance: Balance,
    /// For `balance = "hash"`: where the key comes from.
    pub hash_key: Option<HashKey>,
    /// The cookie naming the endpoint a client was sent to; `None`: no stickiness.
    pub sticky_cookie: Option<String>,
    /// Other endpoints tried when connecting or the handshake fails, before the 101.
    pub retries: u32,
    /// Bound on one attempt (TCP, TLS and the upgrade exchange) on one endpoint.
    pub connect_timeout: Duration,
    /// `[upstream.health]`; `None`: passive checks only.
    pub health: Option<Health>,
    /// Consecutive failures (passive or active) that mark an endpoint down.
    pub fails: u32,
    /// `[upstream.discovery]`.
    pub discovery: Option<Discovery>,
    /// `[upstream.tls]`, for `wss://` endpoints.
    pub tls: PoolTls,
}

/// One configured endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `ws://host:port` or `wss://host:port`, with an optional base path.
    pub url: String,
    /// Relative share of new connections, at least 1.
    pub weight: u32,
}

/// `balance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Smooth weighted round robin (the default).
    #[default]
    RoundRobin,
    /// Fewest open connections, counted across all workers.
    LeastConnections,
    /// Two endpoints drawn at random, the one with fewer open connections taken.
    RandomTwo,
    /// Consistent hashing of `hash_key`.
    Hash,
}

impl Balance {
    /// As written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConnections => "least_connections",
            Balance::RandomTwo => "random_two",
            Balance::Hash => "hash",
        }
    }
}

/// `hash_key`: where a connection's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A path placeholder.
    Param(String),
    /// A request header (its first value).
    Header(String),
    /// A query parameter.
    Query(String),
    /// A cookie.
    Cookie(String),
    /// The client's IP address.
    ClientIp,
    /// A tag set by the on_upgrade policy.
    Tag(String),
}

/// `[upstream.health]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Time between checks of one endpoint.
    pub interval: Duration,
    /// HTTP GET path expecting 2xx; `None`: a WebSocket handshake closed at once.
    pub path: Option<String>,
    /// Consecutive successes that mark a down endpoint up again.
    pub passes: u32,
}

/// `[upstream.discovery]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// `host:port` re-resolved (A/AAAA) every `refresh`.
    pub dns: Option<(String, u16)>,
    /// An SRV name re-resolved every `refresh`.
    pub srv: Option<String>,
    /// An etcd prefix, watched.
    pub etcd: Option<Etcd>,
    /// How often DNS is asked again.
    pub refresh: Duration,
    /// The DNS server to ask; `None`: the system's resolver.
    pub nameserver: Option<std::net::SocketAddr>,
}

/// `[upstream.discovery] etcd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Etcd {
    /// etcd's client URLs.
    pub endpoints: Vec<String>,
    /// Each key under it holds one endpoint URL.
    pub prefix: String,
}

/// `[upstream.tls]`: files resolved against the configuration's folder, checked to exist.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolTls {
    /// Extra PEM roots.
    pub ca_file: Option<PathBuf>,
    /// The client certificate chain (mTLS).
    pub cert_file: Option<PathBuf>,
    /// Its private key.
    pub key_file: Option<PathBuf>,
    /// SNI and the name checked, when it differs from the endpoint's host.
    pub server_name: Option<String>,
    /// Accept any server certificate (testing only).
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    name: Spanned<String>,
    #[serde(default)]
    endpoints: Vec<Spanned<RawEndpoint>>,
    balance: Option<Spanned<String>>,
    hash_key: Option<Spanned<String>>,
    sticky_cookie: Option<Spanned<String>>,
    retries: Option<Spanned<i64>>,
    connect_timeout: Option<Spanned<String>>,
    health: Option<RawHealth>,
    discovery: Option<Spanned<RawDiscovery>>,
    tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawEndpoint {
    Url(String),
    Weighted { url: String, weight: Option<i64> },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    interval: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    fails: Option<Spanned<i64>>,
    passes: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    dns: Option<Spanned<String>>,
    srv: Option<Spanned<String>>,
    etcd: Option<RawEtcd>,
    refresh: Option<Spanned<String>>,
    nameserver: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    endpoints: Spanned<Vec<String>>,
    prefix: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    server_name: Option<Spanned<String>>,
    insecure_skip_verify: Option<bool>,
}

/// Whether `name` can be a DNS host name (RFC 1123 labels; `_` allowed for SRV names).
fn is_dns_name(name: &str, underscore: bool) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || (underscore && b == b'_'))
        })
}

/// Checks an endpoint URL: `ws://` or `wss://`, a host, no placeholders.
pub(crate) fn check_endpoint_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("endpoint {url:?} is not a valid URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("ws" | "wss")) {
        return Err(format!("endpoint {url:?} must use ws:// or wss://"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("endpoint {url:?} has no host"));
    }
    if url.contains('{') || uri.query().is_some() {
        return Err(format!(
            "endpoint {url:?} may not hold placeholders or a query"
        ));
    }
    Ok(())
}

/// What a PEM file must hold.
#[derive(Clone, Copy)]
enum Pem {
    Certificates,
    Key,
}

impl Validator<'_> {
    /// A PEM file that exists and holds what it must, checked here so that a bad one is
    /// reported at its key.
    fn pem_file(
        &self,
        v: &Option<Spanned<String>>,
        what: Pem,
    ) -> Result<Option<PathBuf>, ConfigError> {
        let name = match what {
            Pem::Certificates => "certificate file",
            Pem::Key => "key file",
        };
        let Some(path) = self.existing_file(v, name)? else {
            return Ok(None);
        };
        let at = v.as_ref().expect("a path was given");
        let bytes = std::fs::read(&path).map_err(|e| {
            self.err(
                at,
                format!("cannot read {name} {}: {e}", path.display()),
                "",
            )
        })?;
        let ok = match what {
            Pem::Certificates => {
                let certs: Result<Vec<_>, _> =
                    rustls_pemfile::certs(&mut bytes.as_slice()).collect();
                matches!(certs, Ok(c) if !c.is_empty())
            }
            Pem::Key => matches!(
                rustls_pemfile::private_key(&mut bytes.as_slice()),
                Ok(Some(_))
            ),
        };
        if !ok {
            return Err(self.err(
                at,
                format!(
                    "{name} {} holds no PEM {}",
                    path.display(),
                    match what {
                        Pem::Certificates => "certificate",
                        Pem::Key => "private key",
                    }
                ),
                "a PEM file: -----BEGIN CERTIFICATE----- or -----BEGIN PRIVATE KEY-----",
            ));
        }
        Ok(Some(path))
    }

    /// The `[[upstream]]` tables; names are unique.
    pub(super) fn pools(&self, raw: Vec<RawPool>) -> Result<Vec<Pool>, ConfigError> {
        let mut pools: Vec<Pool> = Vec::with_capacity(raw.len());
        for r in raw {
            let at = r.name.clone();
            let pool = self.pool(r)?;
            if pools.iter().any(|p| p.name == pool.name) {
                return Err(self.err(
                    &at,
                    format!("upstream {:?} is defined twice", pool.name),
                    "give each [[upstream]] its own name",
                ));
            }
            pools.push(pool);
        }
        Ok(pools)
    }

    fn count(
        &self,
        v: &Option<Spanned<i64>>,
        key: &str,
        min: i64,
        default: u32,
    ) -> Result<u32, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) if (min..=1_000_000).contains(n.get_ref()) => Ok(*n.get_ref() as u32),
            Some(n) => Err(self.err(n, format!("{key} must be between {min} and 1000000"), "")),
        }
    }

    fn pool(&self, raw: RawPool) -> Result<Pool, ConfigError> {
        let name = raw.name.get_ref().clone();
        if name.is_empty()
            || name.contains("://")
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(self.err(
                &raw.name,
                format!("upstream name {name:?} is not a pool name"),
                "use letters, digits, '_', '-' and '.', like \"chat\"",
            ));
        }
        let mut endpoints = Vec::with_capacity(raw.endpoints.len());
        for e in &raw.endpoints {
            let (url, weight) = match e.get_ref() {
                RawEndpoint::Url(url) => (url.clone(), 1),
                RawEndpoint::Weighted { url, weight } => (url.clone(), weight.unwrap_or(1)),
            };
            check_endpoint_url(&url).map_err(|m| {
                self.err(e, format!("upstream {name:?}: {m}"), "write it like \"ws://127.0.0.1:9101\" or { url = \"wss://chat-1.internal:9443\", weight = 2 }")
            })?;
            if !(1..=1000).contains(&weight) {
                return Err(self.err(
                    e,
                    format!("upstream {name:?}: weight must be between 1 and 1000"),
                    "",
                ));
            }
            if endpoints.iter().any(|x: &Endpoint| x.url == url) {
                return Err(self.err(
                    e,
                    format!("upstream {name:?}: endpoint {url:?} is listed twice"),
                    "raise its weight instead",
                ));
            }
            endpoints.push(Endpoint {
                url,
                weight: weight as u32,
            });
        }
        let balance = match &raw.balance {
            None => Balance::default(),
            Some(b) => match b.get_ref().as_str() {
                "round_robin" => Balance::RoundRobin,
                "least_connections" => Balance::LeastConnections,
                "random_two" => Balance::RandomTwo,
                "hash" => Balance::Hash,
                other => {
                    return Err(self.err(
                        b,
                        format!("upstream.balance {other:?} is not one of round_robin, least_connections, random_two, hash"),
                        "round_robin is the default",
                    ))
                }
            },
        };
        let hash_key = match &raw.hash_key {
            None if balance == Balance::Hash => {
                return Err(self.err(
                    raw.balance.as_ref().expect("balance = \"hash\" was written"),
                    format!("upstream {name:?}: balance = \"hash\" needs hash_key"),
                    "e.g. hash_key = \"param:room\", \"header:X-User\", \"cookie:sid\" or \"client_ip\"",
                ))
            }
            None => None,
            Some(k) if balance != Balance::Hash => {
                return Err(self.err(
                    k,
                    format!("upstream {name:?}: hash_key needs balance = \"hash\""),
                    "set balance = \"hash\", or leave hash_key out",
                ))
            }
            Some(k) => Some(self.hash_key(k)?),
        };
        let sticky_cookie = match &raw.sticky_cookie {
            None => None,
            Some(c)
                if c.get_ref().is_empty()
                    || !c
                        .get_ref()
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) =>
            {
                return Err(self.err(
                    c,
                    format!(
                        "upstream.sticky_cookie {:?} is not a cookie name",
                        c.get_ref()
                    ),
                    "use letters, digits and '_', like \"fg_chat\"",
                ))
            }
            Some(c) => Some(c.get_ref().clone()),
        };
        let retries = self.count(&raw.retries, "upstream.retries", 0, RETRIES)?;
        let connect_timeout = self.positive_duration(
            &raw.connect_timeout,
            "upstream.connect_timeout",
            CONNECT_TIMEOUT,
        )?;
        let (health, fails) = match raw.health {
            None => (None, HEALTH_FAILS),
            Some(h) => {
                let path = match h.path {
                    Some(p)
                        if !p.get_ref().starts_with('/')
                            || p.get_ref().contains(char::is_whitespace) =>
                    {
                        return Err(self.err(
                            &p,
                            "upstream.health.path must be a path starting with '/'".into(),
                            "like \"/healthz\"",
                        ))
                    }
                    p => p.map(Spanned::into_inner),
                };
                (
                    Some(Health {
                        interval: self.positive_duration(
                            &h.interval,
                            "upstream.health.interval",
                            HEALTH_INTERVAL,
                        )?,
                        path,
                        passes: self.count(
                            &h.passes,
                            "upstream.health.passes",
                            1,
                            HEALTH_PASSES,
                        )?,
                    }),
                    self.count(&h.fails, "upstream.health.fails", 1, HEALTH_FAILS)?,
                )
            }
        };
        let discovery = raw
            .discovery
            .map(|d| self.discovery(&name, d))
            .transpose()?;
        if endpoints.is_empty() && discovery.is_none() {
            return Err(self.err(
                &raw.name,
                format!("upstream {name:?} has no endpoints and no discovery"),
                "list endpoints = [\"ws://127.0.0.1:9101\"], or add [upstream.discovery]",
            ));
        }
        let tls = match raw.tls {
            None => PoolTls::default(),
            Some(t) => {
                if t.cert_file.is_some() != t.key_file.is_some() {
                    let at = t
                        .cert_file
                        .as_ref()
                        .or(t.key_file.as_ref())
                        .expect("one is set");
                    return Err(self.err(
                        at,
                        "upstream.tls: cert_file and key_file go together".into(),
                        "give both for a client certificate, or neither",
                    ));
                }
                let server_name = match t.server_name {
                    Some(s)
                        if !is_dns_name(s.get_ref(), false)
                            && s.get_ref().parse::<std::net::IpAddr>().is_err() =>
                    {
                        return Err(self.err(
                            &s,
                            format!(
                                "upstream.tls.server_name {:?} is not a DNS name",
                                s.get_ref()
                            ),
                            "like \"chat.internal\"",
                        ))
                    }
                    s => s.map(Spanned::into_inner),
                };
                PoolTls {
                    ca_file: self.pem_file(&t.ca_file, Pem::Certificates)?,
                    cert_file: self.pem_file(&t.cert_file, Pem::Certificates)?,
                    key_file: self.pem_file(&t.key_file, Pem::Key)?,
                    server_name,
                    insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
                }
            }
        };
        Ok(Pool {
            name,
            endpoints,
            balance,
            hash_key,
            sticky_cookie,
            retries,
            connect_timeout,
            health,
            fails,
            discovery,
            tls,
        })
    }

    fn hash_key(&self, k: &Spanned<String>) -> Result<HashKey, ConfigError> {
        let text = k.get_ref();
        let named = |prefix: &str| {
            text.strip_prefix(prefix)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
        };
        let key = if text == "client_ip" {
            Some(HashKey::ClientIp)
        } else if let Some(n) = named("param:") {
            Some(HashKey::Param(n))
        } else if let Some(n) = named("header:") {
            Some(HashKey::Header(n.to_ascii_lowercase()))
        } else if let Some(n) = named("query:") {
            Some(HashKey::Query(n))
        } else if let Some(n) = named("cookie:") {
            Some(HashKey::Cookie(n))
        } else {
            named("tag:").map(HashKey::Tag)
        };
        key.ok_or_else(|| {
            self.err(
                k,
                format!("upstream.hash_key {text:?} is not a key source"),
                "one of param:NAME, header:NAME, query:NAME, cookie:NAME, client_ip, tag:NAME",
            )
        })
    }

    fn discovery(
        &self,
        pool: &str,
        table: Spanned<RawDiscovery>,
    ) -> Result<Discovery, ConfigError> {
        let span = Spanned::new(table.span(), ());
        let d = table.into_inner();
        let dns = match &d.dns {
            None => None,
            Some(v) => {
                let (host, port) = v.get_ref().rsplit_once(':').ok_or_else(|| {
                    self.err(
                        v,
                        format!(
                            "upstream {pool:?}: discovery.dns {:?} needs a port",
                            v.get_ref()
                        ),
                        "write it like \"chat.internal:9102\"",
                    )
                })?;
                let port: u16 = port.parse().map_err(|_| {
                    self.err(
                        v,
                        format!(
                            "upstream {pool:?}: discovery.dns port {port:?} is not a port number"
                        ),
                        "",
                    )
                })?;
                if !is_dns_name(host, false) {
                    return Err(self.err(
                        v,
                        format!("upstream {pool:?}: discovery.dns {host:?} is not a DNS name"),
                        "letters, digits and '-' in dot-separated labels, like \"chat.internal\"",
                    ));
                }
                Some((host.to_owned(), port))
            }
        };
        let srv = match &d.srv {
            None => None,
            Some(v) if !is_dns_name(v.get_ref(), true) => {
                return Err(self.err(
                    v,
                    format!(
                        "upstream {pool:?}: discovery.srv {:?} is not a DNS name",
                        v.get_ref()
                    ),
                    "like \"_ws._tcp.chat.service.consul\"",
                ))
            }
            Some(v) => Some(v.get_ref().clone()),
        };
        let etcd = match d.etcd {
            None => None,
            Some(e) => {
                if e.endpoints.get_ref().is_empty() {
                    return Err(self.err(
                        &e.endpoints,
                        format!("upstream {pool:?}: discovery.etcd.endpoints is empty"),
                        "like [\"http://127.0.0.1:2379\"]",
                    ));
                }
                if let Some(bad) = e
                    .endpoints
                    .get_ref()
                    .iter()
                    .find(|u| !(u.starts_with("http://") || u.starts_with("https://")))
                {
                    return Err(self.err(&e.endpoints, format!("upstream {pool:?}: etcd endpoint {bad:?} must be an http:// or https:// URL"), ""));
                }
                let tls = e
                    .endpoints
                    .get_ref()
                    .iter()
                    .filter(|u| u.starts_with("https://"));
                if tls.count() % e.endpoints.get_ref().len() != 0 {
                    return Err(self.err(
                        &e.endpoints,
                        format!(
                            "upstream {pool:?}: discovery.etcd.endpoints mix http:// and https://"
                        ),
                        "one etcd cluster: give every endpoint the same scheme",
                    ));
                }
                if e.prefix.get_ref().is_empty() {
                    return Err(self.err(
                        &e.prefix,
                        format!("upstream {pool:?}: discovery.etcd.prefix is empty"),
                        "like \"/services/chat/\"",
                    ));
                }
                Some(Etcd {
                    endpoints: e.endpoints.into_inner(),
                    prefix: e.prefix.into_inner(),
                })
            }
        };
        let nameserver = match &d.nameserver {
            None => None,
            Some(v) => Some(v.get_ref().parse().map_err(|_| {
                self.err(v, format!("upstream {pool:?}: discovery.nameserver {:?} is not an IP address and port", v.get_ref()), "like \"127.0.0.1:5353\"")
            })?),
        };
        if dns.is_none() && srv.is_none() && etcd.is_none() {
            return Err(self.err(
                &span,
                format!("upstream {pool:?}: [upstream.discovery] names no source"),
                "give dns, srv or etcd",
            ));
        }
        Ok(Discovery {
            dns,
            srv,
            etcd,
            refresh: self.positive_duration(
                &d.refresh,
                "upstream.discovery.refresh",
                DISCOVERY_REFRESH,
            )?,
            nameserver,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn load(src: &str) -> Result<Config, ConfigError> {
        Config::from_toml(src, Path::new("test.toml"))
    }

    const ROUTE: &str = "[[route]]\npath = \"/chat/{room}\"\nupstream = \"chat\"\n";

    #[test]
    fn a_full_pool_loads() {
        let c = load(
            r#"
[[upstream]]
name = "chat"
endpoints = ["ws://127.0.0.1:9101", { url = "ws://127.0.0.1:9102", weight = 2 }]
balance = "hash"
hash_key = "param:room"
sticky_cookie = "fg_chat"
retries = 1
connect_timeout = "1s"
[upstream.health]
interval = "2s"
path = "/healthz"
fails = 4
passes = 2
[upstream.discovery]
dns = "chat.internal:9102"
srv = "_ws._tcp.chat.service.consul"
etcd = { endpoints = ["http://127.0.0.1:2379"], prefix = "/services/chat/" }
refresh = "5s"
nameserver = "127.0.0.1:5353"

[[route]]
path = "/chat/{room}"
upstream = "chat"
upstream_path = "/rooms/{room}"
"#,
        )
        .unwrap();
        let pool = c.pool("chat").unwrap();
        assert_eq!(pool.endpoints[1].weight, 2);
        assert_eq!(pool.balance, Balance::Hash);
        assert_eq!(pool.hash_key, Some(HashKey::Param("room".into())));
        assert_eq!(pool.retries, 1);
        assert_eq!(pool.fails, 4);
        let d = pool.discovery.as_ref().unwrap();
        assert_eq!(d.dns, Some(("chat.internal".into(), 9102)));
        assert_eq!(d.nameserver, Some("127.0.0.1:5353".parse().unwrap()));
        let route = &c.routes[0];
        assert_eq!(route.pool.as_deref(), Some("chat"));
        let params = [("room".to_owned(), "a".to_owned())];
        assert_eq!(
            route.upstream_path.as_ref().unwrap().render(&params),
            "/rooms/a"
        );
    }

    #[test]
    fn mistakes_are_reported_at_their_key() {
        let pool = |body: &str| format!("[[upstream]]\nname = \"chat\"\n{body}\n{ROUTE}");
        for (src, at, want) in [
            (
                "[[route]]\npath = \"/\"\nupstream = \"chats\"\n".to_owned(),
                "test.toml:3:12",
                "upstream \"chats\" is neither a ws:// or wss:// URL nor a defined [[upstream]] pool",
            ),
            (
                pool("endpoints = [\"ws://a:1\"]\nhash_key = \"param:room\""),
                "test.toml:4:12",
                "hash_key needs balance = \"hash\"",
            ),
            (
                pool("endpoints = [\"ws://a:1\"]\nbalance = \"hash\""),
                "test.toml:4:11",
                "balance = \"hash\" needs hash_key",
            ),
            (
                pool("endpoints = [\"ws://a:1\"]\nbalance = \"hash\"\nhash_key = \"body\""),
                "test.toml:5:12",
                "is not a key source",
            ),
            (
                pool("endpoints = [\"http://a:1\"]"),
                "test.toml:3:14",
                "must use ws:// or wss://",
            ),
            (
                pool("endpoints = [\"ws://a:1\"]\n[upstream.discovery]\ndns = \"bad_name!.x:80\""),
                "test.toml:5:7",
                "is not a DNS name",
            ),
            (
                pool("endpoints = [\"ws://a:1\"]\n[upstream.discovery]\nsrv = \"-x..y\""),
                "test.toml:5:7",
                "is not a DNS name",
            ),
            (
                pool("endpoints = [\"ws://a:1\"]\n[upstream.tls]\nca_file = \"missing.pem\""),
                "test.toml:5:11",
                "not found",
            ),
            (
                pool("endpoints = [\"ws://a:1\"]\n[upstream.tls]\ncert_file = \"Cargo.toml\""),
                "test.toml:5:13",
                "cert_file and key_file go together",
            ),
            (
                pool("endpoints = []"),
                "test.toml:2:8",
                "has no endpoints and no discovery",
            ),
            (
                pool("[upstream.discovery]\netcd = { endpoints = [\"http://a:2379\", \"https://b:2379\"], prefix = \"/s/\" }"),
                "test.toml:4:22",
                "mix http:// and https://",
            ),
            (
                format!(
                    "[[upstream]]\nname = \"chat\"\nendpoints = [\"ws://a:1\"]\n{ROUTE}[route.upstream_tls]\ninsecure_skip_verify = true\n"
                ),
                "test.toml:6:12",
                "has [route.upstream_tls]",
            ),
            (
                "[[route]]\npath = \"/\"\nupstream = \"ws://h/\"\nupstream_path = \"/x\"\n".to_owned(),
                "test.toml:4:17",
                "upstream_path needs upstream to name",
            ),
        ] {
            let e = load(&src).unwrap_err().to_string();
            assert!(e.contains(at) && e.contains(want), "for {src}\ngot {e}\nwant {at} {want}");
        }
    }

    #[test]
    fn an_etcd_only_pool_needs_no_endpoints() {
        let c = load(&format!(
            "[[upstream]]\nname = \"chat\"\n[upstream.discovery]\netcd = {{ endpoints = [\"http://127.0.0.1:2379\"], prefix = \"/services/chat/\" }}\n{ROUTE}"
        ))
        .unwrap();
        let pool = c.pool("chat").unwrap();
        assert!(pool.endpoints.is_empty());
        let etcd = pool.discovery.as_ref().unwrap().etcd.as_ref().unwrap();
        assert_eq!(etcd.prefix, "/services/chat/");
    }

    #[test]
    fn unreadable_certificates_are_reported_at_their_key() {
        let dir = std::env::temp_dir().join(format!("fg-pool-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("junk.pem"), "not a certificate").unwrap();
        let src = "[[upstream]]\nname = \"chat\"\nendpoints = [\"wss://a:1\"]\n[upstream.tls]\nca_file = \"junk.pem\"\n";
        let e = Config::from_toml(src, &dir.join("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.toml:5:11") && e.contains("holds no PEM certificate"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
