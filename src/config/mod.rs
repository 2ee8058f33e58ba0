//! `config.toml`: serde structs that mirror the file, validation into types that cannot hold
//! invalid values, and `file:line:column` errors. Takes `&str` so tests need no files.
//! Defaults live in [`defaults`]; docs/configuration.md documents every key.

pub mod admin;
pub mod capture;
mod error;
pub mod jwt;
pub mod pool;
mod raw;
pub mod shared;
mod tls;
mod units;
pub mod validate;

pub use capture::{CaptureConfig, CaptureMode};
pub use error::ConfigError;
pub use jwt::{JwtConfig, JwtKeys, TokenSource};
pub use shared::{OnUnavailable, RedisConfig, RedisTarget, SharedConfig};
pub use tls::{CertificatePair, Place, TlsListener, TlsVersion};
pub use validate::{OnInvalid, SchemaFile, ValidateConfig};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::route::origin::{OriginPattern, Origins};
use crate::route::{PathTemplate, Routable};

/// Default values, in one place.
pub mod defaults {
    use std::time::Duration;

    /// `server.listen`.
    pub const LISTEN: &str = "127.0.0.1:8080";
    /// `server.shutdown_grace`.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    /// `server.max_connections`.
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// `server.header_read_timeout`.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// `server.close_timeout`.
    pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
    /// `server.watchdog_timeout`: a worker without progress this long is reported stalled.
    pub const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(2);
    /// `server.max_pending_handshakes`: connections still sending their request head.
    pub const MAX_PENDING_HANDSHAKES: usize = 1024;
    /// `server.queue_timeout`: how long a request waits for a connection slot at the cap.
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
    /// `server.keepalive_timeout`: idle wait for the next request on a kept-alive connection.
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(15);
    /// `server.keepalive_requests`: requests served on one connection.
    pub const KEEPALIVE_REQUESTS: usize = 100;
    /// `route.mime_type`.
    pub const MIME_TYPE: &str = "application/json";
    /// `route.max_message_size`: 1 MiB.
    pub const MAX_MESSAGE_SIZE: usize = 1 << 20;
    /// `route.max_queued_bytes` at least: 4 MiB (or `max_message_size`, if larger).
    pub const MAX_QUEUED_BYTES: usize = 4 << 20;
    /// `route.compression`: permessage-deflate is offered and accepted on both legs. On by
    /// default since its cost per message came down (compression_level 1 and the threshold;
    /// docs/performance.md, "Twelfth session: the compression default").
    pub const COMPRESSION: bool = true;
    /// `route.compression_level`: zlib's fastest, about a third of the CPU of its default
    /// (6) per 1 KiB JSON message, for about a quarter more bytes (docs/performance.md).
    pub const COMPRESSION_LEVEL: u8 = 1;
    /// `route.compression_threshold`: shorter messages are sent uncompressed (as Node's `ws`).
    pub const COMPRESSION_THRESHOLD: usize = 1024;
    /// `route.max_body_size`: the largest HTTP request body proxied on a route with
    /// `http = "proxy"` (16 MiB).
    pub const MAX_BODY_SIZE: u64 = 16 << 20;
    /// `route.handshake_timeout`.
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// `route.policy_cpu_limit`: time one policy call may run.
    pub const POLICY_CPU_LIMIT: Duration = Duration::from_millis(10);
    /// `route.policy_memory_limit`: how much one policy call may grow its worker's Lua heap.
    pub const POLICY_MEMORY_LIMIT: usize = 16 << 20;
    /// `route.policy_state_limit`: how much `ctx` plus `conn.state` may hold per connection.
    pub const POLICY_STATE_LIMIT: usize = 1 << 20;
    /// `shared.max_entries`: how many keys `gw.shared` may hold.
    pub const SHARED_MAX_ENTRIES: usize = 100_000;
    /// `shared.max_bytes`: how many bytes of keys and values `gw.shared` may hold.
    pub const SHARED_MAX_BYTES: usize = 64 << 20;

    /// `server.workers`: one per CPU.
    pub fn workers() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (or the label given to [`Config::from_toml`]): what a reload
    /// reads again.
    pub origin: PathBuf,
    /// The `[admin]` table; `None`: no admin listener.
    pub admin: Option<admin::AdminConfig>,
    /// The `[server]` table.
    pub server: ServerConfig,
    /// The `[[route]]` tables, in file order.
    pub routes: Vec<Arc<Route>>,
    /// The `[shared]` table: the bounds of `gw.shared`.
    pub shared: SharedConfig,
    /// The `[[upstream]]` pools, in file order.
    pub upstreams: Vec<Arc<pool::Pool>>,
}

/// The `[server]` table.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Addresses to accept plain (`ws://`) connections on.
    pub listen: Vec<SocketAddr>,
    /// The `[[server.tls]]` listeners (`wss://`), in file order.
    pub tls: Vec<TlsListener>,
    /// How long shutdown waits for connections to close before exiting anyway.
    pub shutdown_grace: Duration,
    /// At most this many client connections past their request head at once (requests being
    /// served, upgrades, relays); a request beyond waits up to `queue_timeout`, then gets 503.
    pub max_connections: usize,
    /// At most this many connections still sending a request head (or idle between kept-alive
    /// requests, or queued for a slot); past it the oldest is shed to admit a new one.
    pub max_pending_handshakes: usize,
    /// How long a request waits for a `max_connections` slot before it is answered 503.
    pub queue_timeout: Duration,
    /// Idle wait for the next request on a kept-alive connection; `None`: no keep-alive.
    pub keepalive_timeout: Option<Duration>,
    /// Requests served on one connection; the last answer closes it.
    pub keepalive_requests: usize,
    /// A worker that makes no progress for this long is logged and taken out of the balancer.
    pub watchdog_timeout: Duration,
    /// A client must send its complete upgrade request within this time.
    pub header_read_timeout: Duration,
    /// Bound on each leg's closing handshake; after it the TCP connection is dropped.
    pub close_timeout: Duration,
    /// Worker threads, each with its own runtime and Lua VM.
    pub workers: usize,
    /// Reload when the configuration file or a policy script it names changes.
    pub watch: bool,
    /// Connections still on an older snapshot this long after a reload are closed with 1012,
    /// spread over a further `drain_old`; `None`: they stay until they end.
    pub drain_old: Option<Duration>,
}

/// One `[[route]]`: a path resolver.
#[derive(Debug, Clone)]
pub struct Route {
    /// Position in the file, from 0; used in logs and as the tie-breaker.
    pub index: usize,
    /// The path template requests must match.
    pub path: PathTemplate,
    /// If set, only requests with this Host (case-insensitive, port ignored) match.
    pub host: Option<String>,
    /// Where to connect, with the path's placeholders substituted; with a pool, its name.
    pub upstream: UpstreamUrl,
    /// The `[[upstream]]` pool `upstream` names, if it names one.
    pub pool: Option<String>,
    /// With a pool: the path (and query) on the chosen endpoint, with the path's
    /// placeholders; `None`: the client's path as requested.
    pub upstream_path: Option<UpstreamUrl>,
    /// Hint for policies on how to decode message bodies.
    pub mime_type: String,
    /// Absolute connection lifetime; `None` is unlimited.
    pub expire: Option<Duration>,
    /// Close after this long without a data message either way; `None` disables it.
    pub idle_timeout: Option<Duration>,
    /// Ping a leg that has sent nothing for this long; `None` disables pings.
    pub ping_interval: Option<Duration>,
    /// A pinged leg that sends nothing back for this long is dropped as dead.
    pub ping_timeout: Duration,
    /// The most bytes a policy's sends may leave queued for one leg.
    pub max_queued_bytes: usize,
    /// Largest message (after reassembly) accepted from either side.
    pub max_message_size: usize,
    /// Bound on connecting to the upstream and completing its handshake (504 after it).
    pub handshake_timeout: Duration,
    /// Lua scripts bound to this route (resolved paths that exist).
    pub policies: Policies,
    /// What a failing frame policy does to its connection.
    pub on_policy_error: OnPolicyError,
    /// Time one policy call may run before it is stopped.
    pub policy_cpu_limit: Duration,
    /// How much one policy call may grow its worker's Lua heap.
    pub policy_memory_limit: usize,
    /// How much `ctx` plus `conn.state` may hold, per connection.
    pub policy_state_limit: usize,
    /// TLS settings for `wss://` upstreams.
    pub upstream_tls: UpstreamTls,
    /// Placeholder values may hold `%2F`, `%5C` and `\` (passed on encoded); dot segments are
    /// refused all the same.
    pub allow_encoded_slash: bool,
    /// The `Origin` allow-list (`origins`, `allow_missing_origin`); `None`: any origin.
    pub origins: Option<Origins>,
    /// What plain HTTP requests (not upgrades) matching the route get.
    pub http: HttpMode,
    /// The largest HTTP request body proxied (`http = "proxy"`); larger ones get 413.
    pub max_body_size: u64,
    /// `[route.jwt]`: upgrades must carry a valid token (see `src/jwt/`).
    pub jwt: Option<Arc<JwtConfig>>,
    /// `[route.validate]`: JSON Schemas for text messages (see `src/policy/validate/`).
    pub validate: Option<Arc<ValidateConfig>>,
    /// `compression`: permessage-deflate negotiated with the client and with the upstream,
    /// each leg on its own.
    pub compression: bool,
    /// `compression_context_takeover`: windows kept from message to message (better ratio,
    /// a compressor and a decompressor per connection) instead of one per worker thread.
    pub compression_context_takeover: bool,
    /// `compression_window_bits` (9 to 15): the largest window the gateway compresses with,
    /// and asks its peers to compress with where they let it ask.
    pub compression_window_bits: u8,
    /// `compression_level` (0 to 9): zlib's level for the messages the gateway compresses;
    /// 0 sends every message uncompressed.
    pub compression_level: u8,
    /// `compression_threshold`: messages shorter than this are sent uncompressed.
    pub compression_threshold: usize,
    /// `[route.capture]`: what the traffic console records of its connections (see
    /// `src/capture/`); shared by every connection of the route.
    pub capture: Arc<CaptureConfig>,
}

/// `route.http`: what a plain HTTP request (not a WebSocket upgrade) on the route gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpMode {
    /// 426 Upgrade Required (the default): the route takes WebSockets only.
    #[default]
    Refuse,
    /// Proxied to the route's upstream over HTTP (for SignalR negotiate, Socket.IO polling).
    Proxy,
}

impl Routable for Route {
    fn path(&self) -> &PathTemplate {
        &self.path
    }
    fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }
    fn index(&self) -> usize {
        self.index
    }
    fn allow_encoded_slash(&self) -> bool {
        self.allow_encoded_slash
    }
}

impl Route {
    /// Whether this route lets in a request whose `Origin` header values are `values` (all of
    /// them, in order): always without `origins`; with it, one origin that a pattern matches,
    /// or none at all with `allow_missing_origin`. See [`crate::route::origin`].
    pub fn allows_origin<'a>(&self, values: impl Iterator<Item = &'a [u8]>) -> bool {
        crate::route::origin::origin_allowed(self.origins.as_ref(), values)
    }

    /// A short name for logs: the path template, plus the host when there is one.
    pub fn name(&self) -> String {
        // Made per connection (for its close line), so without `format!`.
        let path = self.path.as_str();
        match &self.host {
            Some(h) => [h.as_str(), path].concat(),
            None => path.to_owned(),
        }
    }
}

/// What happens to a connection when a frame policy fails (error, CPU or memory limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnPolicyError {
    /// Close both legs with 1011 (the default).
    #[default]
    Close,
    /// Forward the message unchanged.
    Pass,
    /// Drop the message (counted).
    Drop,
}

/// The `[route.policies]` table: paths of Lua scripts, resolved against the config file's folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policies {
    /// Runs on the HTTP upgrade request.
    pub on_upgrade: Option<PathBuf>,
    /// Runs on each client-to-server message.
    pub on_client_frame: Option<PathBuf>,
    /// Runs on each server-to-client message.
    pub on_server_frame: Option<PathBuf>,
    /// Runs once when the connection ends.
    pub on_close: Option<PathBuf>,
}

impl Policies {
    /// True when no script is bound.
    pub fn is_empty(&self) -> bool {
        *self == Policies::default()
    }
}

/// The `[route.upstream_tls]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// Extra PEM root certificates to trust besides the built-in web roots.
    pub ca_file: Option<PathBuf>,
    /// Accept any server certificate (testing only; logged as a warning at start-up).
    pub insecure_skip_verify: bool,
}

/// An upstream URL template such as `ws://10.0.0.5:9001/rooms/{room}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    source: String,
}

impl UpstreamUrl {
    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Substitutes path placeholders. Validation guarantees every placeholder has a value, and
    /// the router has checked the values (no dot segments, no encoded slashes unless allowed).
    /// In the query part, the characters that would split or end a parameter are
    /// percent-encoded, so a value stays one parameter value: `/chat/a&admin=1` on
    /// `?room={room}` gives `?room=a%26admin%3D1`, not a second parameter.
    pub fn render(&self, params: &[(String, String)]) -> String {
        if !self.source.contains('{') {
            return self.source.clone();
        }
        let mut out = String::with_capacity(self.source.len() + 16);
        let mut rest = self.source.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = rest[open..].find('}').map(|c| open + c);
            let Some(close) = close else { break };
            let name = &rest[open + 1..close];
            let name = name.strip_prefix('*').unwrap_or(name);
            if let Some((_, value)) = params.iter().find(|(n, _)| n == name) {
                if out.contains('?') {
                    push_query_value(&mut out, value);
                } else {
                    out.push_str(value);
                }
            }
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        out
    }

    /// The placeholder names used, in order.
    fn placeholders(&self) -> Result<Vec<&str>, String> {
        let mut names = Vec::new();
        let mut rest = self.source.as_str();
        while let Some(open) = rest.find('{') {
            let Some(len) = rest[open..].find('}') else {
                return Err("unclosed '{' in upstream URL".into());
            };
            let name = &rest[open + 1..open + len];
            let name = name.strip_prefix('*').unwrap_or(name);
            names.push(name);
            rest = &rest[open + len + 1..];
        }
        Ok(names)
    }
}

/// Appends `value` to a URL's query, with `&`, `;`, `=`, `+` and `#` percent-encoded (each
/// means the same once decoded, and none can split the parameter).
fn push_query_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '&' => out.push_str("%26"),
            ';' => out.push_str("%3B"),
            '=' => out.push_str("%3D"),
            '+' => out.push_str("%2B"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: path.to_path_buf(),
            line: 0,
            column: 0,
            message: format!("cannot read configuration: {e}"),
            hint: Some("pass the file with --config PATH".into()),
        })?;
        Config::from_toml(&source, path)
    }

    /// Parses and validates `source`; `origin` names it in errors and anchors relative paths.
    pub fn from_toml(source: &str, origin: &Path) -> Result<Config, ConfigError> {
        let raw: raw::File = toml::from_str(source).map_err(|e| {
            ConfigError::at(
                origin,
                source,
                e.span(),
                e.message().trim().to_owned(),
                Some("see docs/configuration.md for every key and its format".into()),
            )
        })?;
        let base = origin.parent().unwrap_or(Path::new(""));
        let v = Validator {
            origin,
            source,
            base,
        };
        let server = v.server(raw.server.unwrap_or_default())?;
        let upstreams: Vec<_> = v.pools(raw.upstream)?.into_iter().map(Arc::new).collect();
        let routes = raw
            .route
            .into_iter()
            .enumerate()
            .map(|(i, r)| v.route(i, r, &upstreams).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = shared::check(raw.shared.unwrap_or_default(), base, &|s, m, h| {
            v.at(s, m, h)
        })?;
        let admin = raw
            .admin
            .map(|a| a.check(origin, source, base))
            .transpose()?;
        Ok(Config {
            origin: origin.to_path_buf(),
            admin,
            server,
            routes,
            shared,
            upstreams,
        })
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&Arc<pool::Pool>> {
        self.upstreams.iter().find(|p| p.name == name)
    }

    /// Every JSON Schema file `[route.validate]` tables name, each once, in file order.
    pub fn schemas(&self) -> Vec<&Path> {
        let mut seen: Vec<&Path> = Vec::new();
        let files = self.routes.iter().filter_map(|r| r.validate.as_deref());
        for file in files.flat_map(|v| [&v.client, &v.server]).flatten() {
            if !seen.contains(&file.path.as_path()) {
                seen.push(&file.path);
            }
        }
        seen
    }

    /// Every policy script the configuration names, each once, in file order.
    pub fn scripts(&self) -> Vec<&Path> {
        let mut seen = Vec::new();
        for route in &self.routes {
            let p = &route.policies;
            for path in [
                &p.on_upgrade,
                &p.on_client_frame,
                &p.on_server_frame,
                &p.on_close,
            ]
            .into_iter()
            .flatten()
            {
                if !seen.contains(&path.as_path()) {
                    seen.push(path.as_path());
                }
            }
        }
        seen
    }
}

/// Turns raw values into validated ones, reporting errors at the value's position.
struct Validator<'a> {
    origin: &'a Path,
    source: &'a str,
    base: &'a Path,
}

type Spanned<T> = toml::Spanned<T>;

impl Validator<'_> {
    /// A size of at least `min` (`min_text` in the error), or `default` when absent.
    fn size_at_least(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: usize,
        (min, min_text): (u64, &str),
    ) -> Result<usize, ConfigError> {
        let Some(v) = value else {
            return Ok(default);
        };
        let n = units::parse_size(v.get_ref())
            .map_err(|e| self.err(v, format!("{key}: {e}"), "write a size like \"16MiB\""))?;
        if n < min {
            return Err(self.err(v, format!("{key} must be at least {min_text}"), ""));
        }
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn err<T>(&self, at: &Spanned<T>, message: String, hint: &str) -> ConfigError {
        self.at(at.span(), message, hint)
    }

    /// An error at byte `span` of the file; an empty `hint` gives none.
    fn at(&self, span: std::ops::Range<usize>, message: String, hint: &str) -> ConfigError {
        ConfigError::at(
            self.origin,
            self.source,
            Some(span),
            message,
            (!hint.is_empty()).then(|| hint.to_owned()),
        )
    }

    fn duration(&self, value: &Spanned<String>, key: &str) -> Result<Duration, ConfigError> {
        units::parse_duration(value.get_ref()).map_err(|e| {
            self.err(
                value,
                format!("{key}: {e}"),
                "write a duration like \"500ms\", \"10s\", \"5m\" or \"1h 30m\"",
            )
        })
    }

    /// A duration where absent or zero means "off".
    fn optional_duration(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
    ) -> Result<Option<Duration>, ConfigError> {
        match value {
            None => Ok(None),
            Some(v) => Ok(Some(self.duration(v, key)?).filter(|d| !d.is_zero())),
        }
    }

    /// A duration that must be greater than zero; absent gives `default`.
    fn positive_duration(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = value else { return Ok(default) };
        let d = self.duration(v, key)?;
        if d.is_zero() {
            return Err(self.err(
                v,
                format!("{key} must be greater than 0"),
                &format!(
                    "leave it out for the default ({})",
                    humantime::format_duration(default)
                ),
            ));
        }
        Ok(d)
    }

    fn server(&self, raw: raw::Server) -> Result<ServerConfig, ConfigError> {
        let tls_tables = raw.tls.unwrap_or_default();
        let listen = match raw.listen {
            // With TLS listeners only, no plain one.
            None if !tls_tables.is_empty() => Vec::new(),
            None => vec![defaults::LISTEN
                .parse()
                .expect("default listen address parses")],
            Some(list) => {
                if list.get_ref().is_empty() && tls_tables.is_empty() {
                    return Err(self.err(
                        &list,
                        "server.listen is empty".into(),
                        "give at least one address, like [\"0.0.0.0:8080\"], or a [[server.tls]] listener",
                    ));
                }
                list.get_ref()
                    .iter()
                    .map(|a| {
                        a.get_ref().parse::<SocketAddr>().map_err(|_| {
                            self.err(
                                a,
                                format!(
                                    "server.listen: {:?} is not an IP address and port",
                                    a.get_ref()
                                ),
                                "write it like \"0.0.0.0:8080\" or \"[::1]:8080\"",
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        let max_connections = match raw.max_connections {
            None => defaults::MAX_CONNECTIONS,
            Some(n) if *n.get_ref() >= 1 => *n.get_ref() as usize,
            Some(n) => {
                return Err(self.err(&n, "server.max_connections must be at least 1".into(), ""))
            }
        };
        let workers = match raw.workers {
            None => defaults::workers(),
            Some(n) if (1..=1024).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                return Err(self.err(
                    &n,
                    "server.workers must be between 1 and 1024".into(),
                    "leave it out to get one worker per CPU",
                ))
            }
        };
        let count = |value: Option<Spanned<i64>>, key: &str, default: usize| match value {
            None => Ok(default),
            Some(n) if *n.get_ref() >= 1 => Ok(*n.get_ref() as usize),
            Some(n) => Err(self.err(&n, format!("server.{key} must be at least 1"), "")),
        };
        let max_pending_handshakes = count(
            raw.max_pending_handshakes,
            "max_pending_handshakes",
            defaults::MAX_PENDING_HANDSHAKES,
        )?;
        let keepalive_requests = count(
            raw.keepalive_requests,
            "keepalive_requests",
            defaults::KEEPALIVE_REQUESTS,
        )?;
        let keepalive_timeout = match &raw.keepalive_timeout {
            None => Some(defaults::KEEPALIVE_TIMEOUT),
            some => self.optional_duration(some, "server.keepalive_timeout")?,
        };
        let drain_old = self.optional_duration(&raw.drain_old, "server.drain_old")?;
        let tls = self.tls_listeners(tls_tables, &listen)?;
        Ok(ServerConfig {
            tls,
            watch: raw.watch.unwrap_or(false),
            drain_old,
            workers,
            max_pending_handshakes,
            keepalive_requests,
            keepalive_timeout,
            queue_timeout: raw
                .queue_timeout
                .map(|v| self.duration(&v, "server.queue_timeout"))
                .transpose()?
                .unwrap_or(defaults::QUEUE_TIMEOUT),
            watchdog_timeout: self.positive_duration(
                &raw.watchdog_timeout,
                "server.watchdog_timeout",
                defaults::WATCHDOG_TIMEOUT,
            )?,
            listen,
            shutdown_grace: raw
                .shutdown_grace
                .map(|v| self.duration(&v, "server.shutdown_grace"))
                .transpose()?
                .unwrap_or(defaults::SHUTDOWN_GRACE),
            max_connections,
            header_read_timeout: self.positive_duration(
                &raw.header_read_timeout,
                "server.header_read_timeout",
                defaults::HEADER_READ_TIMEOUT,
            )?,
            close_timeout: self.positive_duration(
                &raw.close_timeout,
                "server.close_timeout",
                defaults::CLOSE_TIMEOUT,
            )?,
        })
    }

    fn route(
        &self,
        index: usize,
        raw: raw::Route,
        pools: &[Arc<pool::Pool>],
    ) -> Result<Route, ConfigError> {
        let path = PathTemplate::parse(raw.path.get_ref()).map_err(|e| {
            self.err(
                &raw.path,
                e,
                "placeholders are whole segments: /chat/{room} or /files/{*rest}",
            )
        })?;
        let (upstream, pool, upstream_path) = self.route_upstream(&raw, &path, pools)?;
        let host = match raw.host {
            Some(h)
                if h.get_ref().trim().is_empty()
                    || h.get_ref() == "."
                    || h.get_ref().contains(['/', ' ']) =>
            {
                return Err(self.err(
                    &h,
                    format!("route.host {:?} is not a host name", h.get_ref()),
                    "write a bare host like \"chat.example.com\" (no scheme, no path)",
                ));
            }
            Some(h)
                if (h.get_ref().contains(':') && !h.get_ref().starts_with('['))
                    || h.get_ref().contains("]:") =>
            {
                return Err(self.err(
                    &h,
                    format!("route.host {:?} has a port", h.get_ref()),
                    "hosts are matched without their port: write the bare host",
                ));
            }
            // `admin.example.com.` is the same name as `admin.example.com`.
            Some(h) => Some(crate::route::name_key(h.get_ref())),
            None => None,
        };
        let mime_type = match raw.mime_type {
            Some(m) if !m.get_ref().contains('/') => {
                return Err(self.err(
                    &m,
                    format!("route.mime_type {:?} is not a MIME type", m.get_ref()),
                    "write it like \"application/json\" or \"text/plain\"",
                ));
            }
            Some(m) => m.into_inner().to_ascii_lowercase(),
            None => defaults::MIME_TYPE.to_owned(),
        };
        let compression_window_bits = match &raw.compression_window_bits {
            None => 15,
            Some(n) if (9..=15).contains(n.get_ref()) => *n.get_ref() as u8,
            Some(n) => {
                return Err(self.err(
                    n,
                    "route.compression_window_bits must be between 9 and 15".into(),
                    "a window of 2^bits bytes: 15 is 32 KiB, 9 is 512 bytes",
                ))
            }
        };
        let (compression_level, compression_threshold) =
            self.compression_sending(&raw.compression_level, &raw.compression_threshold)?;
        let max_message_size = match raw.max_message_size {
            None => defaults::MAX_MESSAGE_SIZE,
            Some(v) => {
                let n = units::parse_size(v.get_ref()).map_err(|e| {
                    self.err(
                        &v,
                        format!("route.max_message_size: {e}"),
                        "write a size like \"64KiB\" or \"1MiB\"",
                    )
                })?;
                if n == 0 || n > (1 << 30) {
                    return Err(self.err(
                        &v,
                        "route.max_message_size must be between 1 byte and 1GiB".into(),
                        "",
                    ));
                }
                n as usize
            }
        };
        let handshake_timeout = self.positive_duration(
            &raw.handshake_timeout,
            "route.handshake_timeout",
            defaults::HANDSHAKE_TIMEOUT,
        )?;
        let policies = match raw.policies {
            None => Policies::default(),
            Some(p) => Policies {
                on_upgrade: self.script(&p.on_upgrade)?,
                on_client_frame: self.script(&p.on_client_frame)?,
                on_server_frame: self.script(&p.on_server_frame)?,
                on_close: self.script(&p.on_close)?,
            },
        };
        let upstream_tls = match raw.upstream_tls {
            None => UpstreamTls::default(),
            Some(t) => UpstreamTls {
                ca_file: self.existing_file(&t.ca_file, "CA file")?,
                insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
            },
        };
        let on_policy_error = match raw.on_policy_error {
            None => OnPolicyError::default(),
            Some(v) => match v.get_ref().as_str() {
                "close" => OnPolicyError::Close,
                "pass" => OnPolicyError::Pass,
                "drop" => OnPolicyError::Drop,
                other => return Err(self.err(&v, format!("route.on_policy_error {other:?} is not one of close, pass, drop"), "close (the default) ends the connection with 1011; pass forwards the message; drop drops it")),
            },
        };
        let policy_cpu_limit = self.positive_duration(
            &raw.policy_cpu_limit,
            "route.policy_cpu_limit",
            defaults::POLICY_CPU_LIMIT,
        )?;
        let policy_memory_limit = self.size_at_least(
            &raw.policy_memory_limit,
            "route.policy_memory_limit",
            defaults::POLICY_MEMORY_LIMIT,
            (64 * 1024, "64KiB"),
        )?;
        let policy_state_limit = self.size_at_least(
            &raw.policy_state_limit,
            "route.policy_state_limit",
            defaults::POLICY_STATE_LIMIT,
            (64 * 1024, "64KiB"),
        )?;
        let ping_interval = self.optional_duration(&raw.ping_interval, "route.ping_interval")?;
        let ping_timeout = match (&raw.ping_timeout, ping_interval) {
            (Some(v), None) => {
                return Err(self.err(
                    v,
                    "route.ping_timeout needs route.ping_interval".into(),
                    "set ping_interval too, e.g. ping_interval = \"30s\"",
                ))
            }
            // Its default is the interval, which the hint names.
            (Some(_), Some(interval)) => {
                self.positive_duration(&raw.ping_timeout, "route.ping_timeout", interval)?
            }
            (None, interval) => interval.unwrap_or_default(),
        };
        let max_queued_bytes = match raw.max_queued_bytes {
            None => defaults::MAX_QUEUED_BYTES.max(max_message_size),
            Some(v) => {
                let n = units::parse_size(v.get_ref()).map_err(|e| {
                    self.err(
                        &v,
                        format!("route.max_queued_bytes: {e}"),
                        "write a size like \"4MiB\"",
                    )
                })?;
                if !(64 * 1024..=(1 << 30)).contains(&n) {
                    return Err(self.err(
                        &v,
                        "route.max_queued_bytes must be between 64KiB and 1GiB".into(),
                        "",
                    ));
                }
                n as usize
            }
        };
        let origins = self.origins(raw.origins, raw.allow_missing_origin)?;
        let http = match raw.http {
            None => HttpMode::default(),
            Some(v) => match v.get_ref().as_str() {
                "refuse" => HttpMode::Refuse,
                "proxy" => HttpMode::Proxy,
                other => return Err(self.err(&v, format!("route.http {other:?} is not one of refuse, proxy"), "refuse (the default) answers plain HTTP requests with 426; proxy sends them to the route's upstream")),
            },
        };
        let max_body_size = match raw.max_body_size {
            None => defaults::MAX_BODY_SIZE,
            Some(v) => units::parse_size(v.get_ref()).map_err(|e| {
                self.err(
                    &v,
                    format!("route.max_body_size: {e}"),
                    "write a size like \"16MiB\" (\"0B\" refuses every request body)",
                )
            })?,
        };
        let jwt = match raw.jwt {
            None => None,
            Some(j) => {
                let at = |span, message: String, hint: &str| {
                    ConfigError::at(
                        self.origin,
                        self.source,
                        Some(span),
                        message,
                        (!hint.is_empty()).then(|| hint.to_owned()),
                    )
                };
                Some(Arc::new(jwt::check(j, &at, self.base)?))
            }
        };
        let validate = raw
            .validate
            .map(|v| validate::check(v, &mime_type, &|s, m, h| self.at(s, m, h), self.base))
            .transpose()?
            .map(Arc::new);
        let capture = match raw.capture {
            None => CaptureConfig::default(),
            Some(c) => capture::check(c, &|s, m, h| self.at(s, m, h))?,
        };
        Ok(Route {
            capture: Arc::new(capture),
            validate,
            origins,
            http,
            max_body_size,
            jwt,
            ping_interval,
            ping_timeout,
            max_queued_bytes,
            on_policy_error,
            policy_cpu_limit,
            policy_memory_limit,
            policy_state_limit,
            index,
            path,
            host,
            upstream,
            pool,
            upstream_path,
            mime_type,
            expire: self.optional_duration(&raw.expire, "route.expire")?,
            idle_timeout: self.optional_duration(&raw.idle_timeout, "route.idle_timeout")?,
            max_message_size,
            handshake_timeout,
            policies,
            upstream_tls,
            allow_encoded_slash: raw.allow_encoded_slash.unwrap_or(false),
            compression: raw.compression.unwrap_or(defaults::COMPRESSION),
            compression_context_takeover: raw.compression_context_takeover.unwrap_or(false),
            compression_window_bits,
            compression_level,
            compression_threshold,
        })
    }

    /// `compression_level` and `compression_threshold`.
    fn compression_sending(
        &self,
        level: &Option<Spanned<i64>>,
        threshold: &Option<Spanned<String>>,
    ) -> Result<(u8, usize), ConfigError> {
        let level = match level {
            None => defaults::COMPRESSION_LEVEL,
            Some(n) if (0..=9).contains(n.get_ref()) => *n.get_ref() as u8,
            Some(n) => {
                return Err(self.err(
                    n,
                    "route.compression_level must be between 0 and 9".into(),
                    "1 is the fastest, 9 the smallest; 0 sends every message uncompressed",
                ))
            }
        };
        let threshold = match threshold {
            None => defaults::COMPRESSION_THRESHOLD,
            Some(v) => {
                let n = units::parse_size(v.get_ref()).map_err(|e| {
                    self.err(
                        v,
                        format!("route.compression_threshold: {e}"),
                        "write a size like \"1KiB\", or \"0\" to compress every message",
                    )
                })?;
                if n > (1 << 30) {
                    return Err(self.err(
                        v,
                        "route.compression_threshold must be at most 1GiB".into(),
                        "",
                    ));
                }
                n as usize
            }
        };
        Ok((level, threshold))
    }

    /// `origins` and `allow_missing_origin`.
    fn origins(
        &self,
        list: Option<Spanned<Vec<Spanned<String>>>>,
        allow_missing: Option<Spanned<bool>>,
    ) -> Result<Option<Origins>, ConfigError> {
        let Some(list) = list else {
            if let Some(v) = allow_missing {
                return Err(self.err(
                    &v,
                    "route.allow_missing_origin needs route.origins".into(),
                    "without origins every request is allowed, with or without an Origin header",
                ));
            }
            return Ok(None);
        };
        let allow_missing = allow_missing.is_some_and(|v| *v.get_ref());
        if list.get_ref().is_empty() && !allow_missing {
            return Err(self.err(
                &list,
                "route.origins is empty: every request would be refused".into(),
                "list the origins to let in, like [\"https://app.example.com\"], or leave origins out to allow any",
            ));
        }
        let patterns = list
            .get_ref()
            .iter()
            .map(|p| {
                OriginPattern::parse(p.get_ref()).map_err(|e| {
                    self.err(
                        p,
                        format!("route.origins: {e}"),
                        "write scheme://host[:port], like \"https://app.example.com\" or \"https://*.example.com\"",
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Origins {
            patterns,
            allow_missing,
        }))
    }

    /// `upstream` (a URL, or a pool's name) and `upstream_path`.
    fn route_upstream(
        &self,
        raw: &raw::Route,
        path: &PathTemplate,
        pools: &[Arc<pool::Pool>],
    ) -> Result<(UpstreamUrl, Option<String>, Option<UpstreamUrl>), ConfigError> {
        let name = raw.upstream.get_ref();
        if name.contains("://") {
            if let Some(p) = &raw.upstream_path {
                return Err(self.err(
                    p,
                    "route.upstream_path needs upstream to name an [[upstream]] pool".into(),
                    "with a URL, write the path in the URL itself",
                ));
            }
            return Ok((self.upstream(&raw.upstream, path)?, None, None));
        }
        if !pools.iter().any(|p| p.name == *name) {
            let known: Vec<_> = pools.iter().map(|p| format!("{:?}", p.name)).collect();
            let hint = match known.is_empty() {
                true => {
                    "no [[upstream]] pool is defined; or write a ws:// or wss:// URL".to_owned()
                }
                false => format!(
                    "defined pools: {}; or write a ws:// or wss:// URL",
                    known.join(", ")
                ),
            };
            return Err(self.err(
                &raw.upstream,
                format!("upstream {name:?} is neither a ws:// or wss:// URL nor a defined [[upstream]] pool"),
                &hint,
            ));
        }
        if raw.upstream_tls.is_some() {
            return Err(self.err(
                &raw.upstream,
                format!("route names the pool {name:?} and has [route.upstream_tls]"),
                "a pool's TLS settings go in its [upstream.tls] table",
            ));
        }
        let upstream_path = match &raw.upstream_path {
            None => None,
            Some(p) if !p.get_ref().starts_with('/') => {
                return Err(self.err(
                    p,
                    format!("route.upstream_path {:?} must start with '/'", p.get_ref()),
                    "like \"/rooms/{room}\"",
                ))
            }
            Some(p) => {
                // Checked as the path of a URL on a fixed host.
                let probe = Spanned::new(p.span(), format!("ws://pool{}", p.get_ref()));
                self.upstream(&probe, path)?;
                Some(UpstreamUrl {
                    source: p.get_ref().clone(),
                })
            }
        };
        Ok((
            UpstreamUrl {
                source: name.clone(),
            },
            Some(name.clone()),
            upstream_path,
        ))
    }

    fn upstream(
        &self,
        raw: &Spanned<String>,
        path: &PathTemplate,
    ) -> Result<UpstreamUrl, ConfigError> {
        let url = UpstreamUrl {
            source: raw.get_ref().clone(),
        };
        let names = url.placeholders().map_err(|e| self.err(raw, e, ""))?;
        for name in &names {
            if !path.param_names().any(|p| p == *name) {
                let defined: Vec<_> = path.param_names().map(|n| format!("{{{n}}}")).collect();
                let hint = if defined.is_empty() {
                    format!("the path {} defines no placeholders", path)
                } else {
                    format!("the path {} defines {}", path, defined.join(", "))
                };
                return Err(self.err(raw, format!("upstream uses placeholder {{{name}}} that the route's path does not define"), &hint));
            }
        }
        if let Some(authority) = raw
            .get_ref()
            .split("://")
            .nth(1)
            .map(|rest| rest.split('/').next().unwrap_or(""))
        {
            if authority.contains('{') {
                return Err(self.err(raw, "placeholders are not allowed in the upstream's host or port".into(), "a client could choose where the gateway connects; route dynamically with an on_upgrade policy (req:set_upstream) instead"));
            }
        }
        // Check the shape with every placeholder replaced by a plausible value.
        let probe: Vec<(String, String)> = names
            .iter()
            .map(|n| (n.to_string(), "x".to_owned()))
            .collect();
        let rendered = url.render(&probe);
        let hint = "write it like \"ws://127.0.0.1:9001/path\" or \"wss://backend.internal/ws\"";
        let uri: http::Uri = rendered.parse().map_err(|e| {
            self.err(
                raw,
                format!("upstream {:?} is not a valid URL: {e}", raw.get_ref()),
                hint,
            )
        })?;
        match uri.scheme_str() {
            Some("ws") | Some("wss") => {}
            _ => {
                return Err(self.err(
                    raw,
                    format!("upstream {:?} must use ws:// or wss://", raw.get_ref()),
                    hint,
                ))
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(self.err(
                raw,
                format!("upstream {:?} has no host", raw.get_ref()),
                hint,
            ));
        }
        Ok(url)
    }

    fn script(&self, value: &Option<Spanned<String>>) -> Result<Option<PathBuf>, ConfigError> {
        self.existing_file(value, "policy script")
    }

    fn existing_file(
        &self,
        value: &Option<Spanned<String>>,
        what: &str,
    ) -> Result<Option<PathBuf>, ConfigError> {
        let Some(v) = value else { return Ok(None) };
        let path = self.base.join(v.get_ref());
        if !path.is_file() {
            return Err(self.err(
                v,
                format!(
                    "{what} {:?} not found (looked for {})",
                    v.get_ref(),
                    path.display()
                ),
                "paths are relative to the folder of the configuration file",
            ));
        }
        Ok(Some(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(src: &str) -> Result<Config, ConfigError> {
        Config::from_toml(src, Path::new("test.toml"))
    }

    fn error(src: &str) -> String {
        load(src).unwrap_err().to_string()
    }

    #[test]
    fn compression_keys() {
        let route = |extra: &str| {
            format!("[[route]]\npath = \"/e\"\nupstream = \"ws://127.0.0.1:9001/\"\n{extra}")
        };
        let r = &load(&route("")).unwrap().routes[0];
        assert_eq!(
            (
                r.compression,
                r.compression_context_takeover,
                r.compression_window_bits
            ),
            (defaults::COMPRESSION, false, 15)
        );
        let r = &load(&route(
            "compression = true\ncompression_context_takeover = true\ncompression_window_bits = 9\n",
        ))
        .unwrap()
        .routes[0];
        assert_eq!(
            (
                r.compression,
                r.compression_context_takeover,
                r.compression_window_bits
            ),
            (true, true, 9)
        );
        let e = error(&route("compression_window_bits = 8\n"));
        assert!(
            e.contains("test.toml:4:") && e.contains("between 9 and 15"),
            "{e}"
        );
        let r = &load(&route("")).unwrap().routes[0];
        assert_eq!(
            (r.compression_level, r.compression_threshold),
            (defaults::COMPRESSION_LEVEL, defaults::COMPRESSION_THRESHOLD)
        );
        let r = &load(&route(
            "compression_level = 0\ncompression_threshold = \"0\"\n",
        ))
        .unwrap()
        .routes[0];
        assert_eq!((r.compression_level, r.compression_threshold), (0, 0));
        let r = &load(&route(
            "compression_level = 9\ncompression_threshold = \"4KiB\"\n",
        ))
        .unwrap()
        .routes[0];
        assert_eq!((r.compression_level, r.compression_threshold), (9, 4096));
        let e = error(&route("compression_level = 10\n"));
        assert!(
            e.contains("test.toml:4:21") && e.contains("between 0 and 9"),
            "{e}"
        );
        let e = error(&route(
            "compression = true\ncompression_threshold = \"lots\"\n",
        ));
        assert!(
            e.contains("test.toml:5:25") && e.contains("route.compression_threshold: invalid size"),
            "{e}"
        );
        let e = error(&route("compression_threshold = 1024\n"));
        assert!(e.contains("test.toml:4:"), "{e}");
    }

    #[test]
    fn pings_and_the_queue_bound() {
        let route = |extra: &str| {
            format!("[[route]]\npath = \"/e\"\nupstream = \"ws://127.0.0.1:9001/\"\n{extra}")
        };
        let r = &load(&route("")).unwrap().routes[0];
        assert_eq!(r.ping_interval, None);
        assert_eq!(r.max_queued_bytes, 4 << 20);
        let r = &load(&route(
            "ping_interval = \"30s\"\nmax_message_size = \"8MiB\"\n",
        ))
        .unwrap()
        .routes[0];
        assert_eq!(r.ping_interval, Some(Duration::from_secs(30)));
        assert_eq!(
            r.ping_timeout,
            Duration::from_secs(30),
            "defaults to the interval"
        );
        assert_eq!(r.max_queued_bytes, 8 << 20, "at least max_message_size");
        let r = &load(&route(
            "ping_interval = \"30s\"\nping_timeout = \"5s\"\nmax_queued_bytes = \"64KiB\"\n",
        ))
        .unwrap()
        .routes[0];
        assert_eq!(r.ping_timeout, Duration::from_secs(5));
        assert_eq!(r.max_queued_bytes, 64 << 10);
        assert!(error(&route("ping_timeout = \"5s\"\n")).contains("needs route.ping_interval"));
        assert!(
            error(&route("ping_interval = \"30s\"\nping_timeout = \"0s\"\n"))
                .contains("route.ping_timeout must be greater than 0")
        );
        // The hint names the real default: the interval, not 0s.
        assert!(
            error(&route("ping_interval = \"30s\"\nping_timeout = \"0s\"\n"))
                .contains("leave it out for the default (30s)")
        );
        assert!(error(&route("max_queued_bytes = \"1KiB\"\n")).contains("between 64KiB and 1GiB"));
    }

    #[test]
    fn minimal_route_gets_defaults() {
        let c = load("[[route]]\npath = \"/echo\"\nupstream = \"ws://127.0.0.1:9001/\"\n").unwrap();
        let r = &c.routes[0];
        assert_eq!(r.mime_type, "application/json");
        assert_eq!(r.max_message_size, 1 << 20);
        assert_eq!(r.expire, None);
        assert_eq!(c.server.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(10));
        assert_eq!(c.server.watchdog_timeout, Duration::from_secs(2));
        assert_eq!(c.server.max_pending_handshakes, 1024);
        assert_eq!(c.server.queue_timeout, Duration::from_secs(1));
        assert_eq!(c.server.keepalive_timeout, Some(Duration::from_secs(15)));
        assert_eq!(c.server.keepalive_requests, 100);
        let off = load("[server]\nkeepalive_timeout = \"0s\"\nqueue_timeout = \"0s\"\n").unwrap();
        assert_eq!(off.server.keepalive_timeout, None);
        assert_eq!(off.server.queue_timeout, Duration::ZERO);
    }

    #[test]
    fn full_route() {
        let c = load(
            r#"
[server]
listen = ["0.0.0.0:8080", "[::1]:8081"]
shutdown_grace = "3s"
[[route]]
path = "/chat/{room}"
host = "chat.example.com"
upstream = "ws://127.0.0.1:9001/rooms/{room}"
mime_type = "text/plain"
expire = "1h"
idle_timeout = "0s"
max_message_size = "64KiB"
"#,
        )
        .unwrap();
        let r = &c.routes[0];
        assert_eq!(r.expire, Some(Duration::from_secs(3600)));
        assert_eq!(r.idle_timeout, None);
        assert_eq!(r.max_message_size, 65536);
        assert_eq!(
            r.upstream.render(&[("room".into(), "lobby".into())]),
            "ws://127.0.0.1:9001/rooms/lobby"
        );
        assert_eq!(c.server.listen.len(), 2);
    }

    #[test]
    fn catch_all_placeholder_substitutes_with_or_without_star() {
        let c = load("[[route]]\npath = \"/f/{*rest}\"\nupstream = \"ws://h/x/{*rest}\"\n[[route]]\npath = \"/g/{*rest}\"\nupstream = \"ws://h/y/{rest}\"\n").unwrap();
        let params = [("rest".to_owned(), "a/b".to_owned())];
        assert_eq!(c.routes[0].upstream.render(&params), "ws://h/x/a/b");
        assert_eq!(c.routes[1].upstream.render(&params), "ws://h/y/a/b");
    }

    #[test]
    fn a_value_in_the_query_stays_one_parameter() {
        let c = load("[[route]]\npath = \"/c/{room}\"\nupstream = \"ws://h/x/{room}?room={room}&tenant=a\"\n").unwrap();
        let params = [("room".to_owned(), "a&tenant=b;c+d#e".to_owned())];
        assert_eq!(
            c.routes[0].upstream.render(&params),
            "ws://h/x/a&tenant=b;c+d#e?room=a%26tenant%3Db%3Bc%2Bd%23e&tenant=a"
        );
    }

    #[test]
    fn allow_encoded_slash_and_dotted_hosts() {
        let c = load("[[route]]\npath = \"/a/{x}\"\nhost = \"Admin.Example.com.\"\nupstream = \"ws://h/{x}\"\nallow_encoded_slash = true\n[[route]]\npath = \"/b\"\nupstream = \"ws://h/\"\n").unwrap();
        assert!(c.routes[0].allow_encoded_slash);
        assert_eq!(c.routes[0].host.as_deref(), Some("admin.example.com"));
        assert!(!c.routes[1].allow_encoded_slash);
        let e = error("[[route]]\npath = \"/a\"\nhost = \".\"\nupstream = \"ws://h/\"\n");
        assert!(e.contains("is not a host name"), "{e}");
    }

    #[test]
    fn unknown_key_is_located() {
        let e = error("[[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\nexpires = \"1h\"\n");
        assert!(
            e.starts_with("test.toml:4:1: unknown field `expires`"),
            "{e}"
        );
    }

    #[test]
    fn undefined_placeholder_is_located_with_hint() {
        let e = error("[[route]]\npath = \"/chat/{room}\"\nupstream = \"ws://h/{user}\"\n");
        assert!(
            e.starts_with("test.toml:3:12: upstream uses placeholder {user}"),
            "{e}"
        );
        assert!(
            e.contains("hint: the path /chat/{room} defines {room}"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_rejected() {
        let cases = [
            ("[[route]]\npath = \"chat\"\nupstream = \"ws://h/\"\n", "test.toml:2:8: path template"),
            ("[[route]]\npath = \"/a\"\nupstream = \"http://h/\"\n", "must use ws:// or wss://"),
            ("[[route]]\npath = \"/a\"\nupstream = \"ws:// bad\"\n", "not a valid URL"),
            ("[[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\nexpire = \"soon\"\n", "test.toml:4:10: route.expire: invalid duration"),
            ("[[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\nmax_message_size = \"big\"\n", "route.max_message_size: invalid size"),
            ("[server]\nlisten = [\"localhost\"]\n", "test.toml:2:11: server.listen"),
            ("[[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\n[route.policies]\non_upgrade = \"nope.lua\"\n", "test.toml:5:14: policy script \"nope.lua\" not found"),
            ("[[route]]\npath = \"/a\"\n", "missing field `upstream`"),
            ("[[route]]\npath = \"/{h}\"\nupstream = \"ws://{h}:80/\"\n", "not allowed in the upstream's host"),
            ("[[route]]\npath = \"/a\"\nhost = \"x.com:80\"\nupstream = \"ws://h/\"\n", "has a port"),
            ("[server]\nclose_timeout = \"0s\"\n", "server.close_timeout must be greater than 0"),
            ("[server]\nwatchdog_timeout = \"0s\"\n", "server.watchdog_timeout must be greater than 0"),
            ("[server]\nmax_pending_handshakes = 0\n", "server.max_pending_handshakes must be at least 1"),
            ("[server]\nkeepalive_requests = -1\n", "server.keepalive_requests must be at least 1"),
            ("[server]\nqueue_timeout = \"soon\"\n", "server.queue_timeout: invalid duration"),
            ("[[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\non_policy_error = \"explode\"\n", "not one of close, pass, drop"),
            ("[[route]\n", "test.toml:1:"),
            ("[[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\norigins = [\"https://a.com\", \"a.com\"]\n", "test.toml:4:29: route.origins: \"a.com\" is not an origin: it has no scheme"),
            ("[[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\norigins = [\"https://*.a.*.com\"]\n", "whole first label"),
            ("[[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\norigins = []\n", "test.toml:4:11: route.origins is empty"),
            ("[[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\nallow_missing_origin = true\n", "test.toml:4:24: route.allow_missing_origin needs route.origins"),
            ("[server]\nlisten = [\"127.0.0.1:8443\"]\n[[server.tls]]\nlisten = \"127.0.0.1:8443\"\ncert_file = \"a\"\nkey_file = \"b\"\n", "test.toml:4:10: server.tls.listen: 127.0.0.1:8443 is already a listen address"),
            ("[[server.tls]]\nlisten = \"h:1\"\ncert_file = \"a\"\nkey_file = \"b\"\n", "test.toml:2:10: server.tls.listen: \"h:1\" is not an IP address and port"),
            ("[[server.tls]]\nlisten = \"127.0.0.1:0\"\ncert_file = \"nope.pem\"\nkey_file = \"b\"\n", "test.toml:3:13: certificate file \"nope.pem\" not found"),
            ("[[server.tls]]\nlisten = \"127.0.0.1:0\"\nkey_file = \"b\"\n", "missing field `cert_file`"),
        ];
        for (src, want) in cases {
            let e = error(src);
            assert!(e.contains(want), "for {src:?}: got {e:?}, want {want:?}");
        }
    }
}
