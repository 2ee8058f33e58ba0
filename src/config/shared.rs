//! The `[shared]` table: the bounds of `gw.shared`, and where it lives: in this process
//! (`backend = "local"`, the default) or in Redis, shared by a fleet of gateways
//! (`backend = "redis"`, see `src/fleet/`). This module only validates the table.
//!
//! ```toml
//! [shared]
//! backend = "redis"                   # local (default) | redis
//! url = "redis://127.0.0.1:6379/0"    # redis://, rediss:// or redis+sentinel://s1:26379,s2:26379/service/0;
//!                                     # a password in it or in password_file
//! password_file = "redis.password"    # optional, relative to the config file's folder
//! ca_file = "redis-ca.pem"            # optional: the CA of a rediss:// server (default: the web's roots)
//! key_prefix = "fg:"                  # every key framegate writes starts with it
//! instance = "gw-1"                   # this gateway's name in the fleet
//! on_unavailable = "allow"            # allow | deny: what gw.limit answers while Redis is unreachable
//! timeout = "50ms"                    # longest wait for one command
//! frame_staleness = "1s"              # how old a frame policy's gw.shared.get may be
//! lease = "10s"                       # how long this instance's leased counts outlive its last heartbeat
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{defaults, units, ConfigError};

/// Default `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// Default `frame_staleness`.
pub const DEFAULT_FRAME_STALENESS: Duration = Duration::from_secs(1);
/// Default `lease`.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// Default `key_prefix`.
pub const DEFAULT_KEY_PREFIX: &str = "fg:";
/// Longest `instance` name and `key_prefix`, in bytes.
pub const MAX_NAME: usize = 128;

/// serde mirror of `[shared]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShared {
    max_entries: Option<Spanned<i64>>,
    max_bytes: Option<Spanned<String>>,
    backend: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    key_prefix: Option<Spanned<String>>,
    instance: Option<Spanned<String>>,
    on_unavailable: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    frame_staleness: Option<Spanned<String>>,
    lease: Option<Spanned<String>>,
}

/// The validated `[shared]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedConfig {
    /// At most this many keys (the local dictionary; with Redis, the frame-phase cache).
    pub max_entries: usize,
    /// At most this many bytes of keys and values (as counted by `gw.shared`).
    pub max_bytes: usize,
    /// `backend = "redis"`: the fleet's store. `None`: the process's own dictionary.
    pub redis: Option<RedisConfig>,
}

impl Default for SharedConfig {
    fn default() -> Self {
        SharedConfig {
            max_entries: defaults::SHARED_MAX_ENTRIES,
            max_bytes: defaults::SHARED_MAX_BYTES,
            redis: None,
        }
    }
}

/// What limits decide while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUnavailable {
    /// Let the traffic through (the default: an outage of Redis is not an outage of the service).
    #[default]
    Allow,
    /// Refuse it.
    Deny,
}

impl OnUnavailable {
    /// The configuration's word.
    pub fn as_str(self) -> &'static str {
        match self {
            OnUnavailable::Allow => "allow",
            OnUnavailable::Deny => "deny",
        }
    }
}

/// Where the Redis of `url` is.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `redis://` or `rediss://`: the URL names it.
    Direct,
    /// `redis+sentinel://`: the Sentinels name the current primary of `service`.
    Sentinel {
        /// The Sentinels, as `redis://host:port` URLs.
        sentinels: Vec<String>,
        /// The name the Sentinels monitor the primary by.
        service: String,
        /// The database on the primary.
        db: i64,
        /// The primary's user and password, if the URL had them.
        username: Option<String>,
        /// The primary's password.
        password: Option<String>,
    },
}

/// Parses `redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`.
fn sentinel_target(url: &str) -> Result<RedisTarget, String> {
    let rest = &url["redis+sentinel://".len()..];
    let (authority, path) = rest
        .split_once('/')
        .ok_or("no service name after the hosts")?;
    let (credentials, hosts) = match authority.rsplit_once('@') {
        Some((c, h)) => (Some(c), h),
        None => (None, authority),
    };
    let decode =
        |s: &str| percent_decode(s).ok_or_else(|| format!("{s:?} is not valid percent-encoding"));
    let (username, password) = match credentials {
        None => (None, None),
        Some(c) => match c.split_once(':') {
            Some((u, p)) => (
                (!u.is_empty()).then(|| decode(u)).transpose()?,
                Some(decode(p)?),
            ),
            None => (Some(decode(c)?), None),
        },
    };
    let mut sentinels = Vec::new();
    for host in hosts.split(',') {
        let (name, port) = host
            .rsplit_once(':')
            .ok_or_else(|| format!("sentinel {host:?} has no port"))?;
        if name.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("sentinel {host:?} is not host:port"));
        }
        sentinels.push(format!("redis://{host}"));
    }
    let mut parts = path.split('/');
    let service = parts.next().unwrap_or_default().to_owned();
    if service.is_empty() {
        return Err("no service name after the hosts".into());
    }
    let db = match parts.next() {
        None | Some("") => 0,
        Some(db) => db
            .parse()
            .map_err(|_| format!("database {db:?} is not a number"))?,
    };
    Ok(RedisTarget::Sentinel {
        sentinels,
        service,
        db,
        username,
        password,
    })
}

/// Undoes URL percent-encoding; `None` if it is broken or not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `[shared]` with `backend = "redis"`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Where Redis is: named by `url`, or by Sentinels.
    pub target: RedisTarget,
    /// `ca_file`'s PEM text: the certificate authorities a `rediss://` server's certificate
    /// must chain to, instead of the web's roots.
    pub ca: Option<Vec<u8>>,
    /// `url`, with the password of `password_file` put in (shown without it).
    pub url: String,
    /// `key_prefix`.
    pub key_prefix: String,
    /// `instance`; `None`: the host name and the admin listener's port, chosen at start.
    pub instance: Option<String>,
    /// `on_unavailable`.
    pub on_unavailable: OnUnavailable,
    /// `timeout`: the longest wait for one command.
    pub timeout: Duration,
    /// `frame_staleness`.
    pub frame_staleness: Duration,
    /// `lease`.
    pub lease: Duration,
}

impl RedisConfig {
    /// `url` with its password replaced by `***`, for logs and `/admin/config`.
    pub fn shown_url(&self) -> String {
        match url_password_span(&self.url) {
            Some(span) => format!("{}***{}", &self.url[..span.start], &self.url[span.end..]),
            None => self.url.clone(),
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.shown_url())
            .field("key_prefix", &self.key_prefix)
            .field("instance", &self.instance)
            .field("on_unavailable", &self.on_unavailable)
            .field("timeout", &self.timeout)
            .field("frame_staleness", &self.frame_staleness)
            .field("lease", &self.lease)
            .finish()
    }
}

/// Where the password of `scheme://user:password@host` is, if there is one.
fn url_password_span(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://")? + 3;
    let end = start + url[start..].find(['/', '?']).unwrap_or(url.len() - start);
    let at = start + url[start..end].rfind('@')?;
    let colon = start + url[start..at].find(':')?;
    Some(colon + 1..at)
}

type At<'a> = &'a dyn Fn(std::ops::Range<usize>, String, &str) -> ConfigError;

fn duration(
    v: &Option<Spanned<String>>,
    key: &str,
    default: Duration,
    at: At,
) -> Result<Duration, ConfigError> {
    let Some(v) = v else { return Ok(default) };
    let d = units::parse_duration(v.get_ref()).map_err(|e| {
        at(
            v.span(),
            format!("shared.{key}: {e}"),
            "write a duration like \"50ms\" or \"1s\"",
        )
    })?;
    if d.is_zero() {
        return Err(at(
            v.span(),
            format!("shared.{key} must be more than 0"),
            "",
        ));
    }
    Ok(d)
}

fn name(v: &Spanned<String>, key: &str, at: At) -> Result<String, ConfigError> {
    let text = v.get_ref();
    let fine = text.len() <= MAX_NAME && text.bytes().all(|b| b.is_ascii_graphic());
    if !fine || (key == "instance" && text.is_empty()) {
        return Err(at(
            v.span(),
            format!("shared.{key} {text:?} must be up to {MAX_NAME} visible ASCII characters"),
            "no spaces: it is part of Redis keys",
        ));
    }
    Ok(text.clone())
}

/// Checks `[shared]`. `base` (the config file's folder) anchors a relative `password_file`;
/// the password is read now, so that `framegate check` fails on a missing file.
pub(super) fn check(raw: RawShared, base: &Path, at: At) -> Result<SharedConfig, ConfigError> {
    let max_entries = match &raw.max_entries {
        None => defaults::SHARED_MAX_ENTRIES,
        Some(n) if *n.get_ref() >= 1 => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
        Some(n) => {
            return Err(at(
                n.span(),
                "shared.max_entries must be at least 1".into(),
                "",
            ))
        }
    };
    let max_bytes = match &raw.max_bytes {
        None => defaults::SHARED_MAX_BYTES,
        Some(v) => {
            let n = units::parse_size(v.get_ref()).map_err(|e| {
                at(
                    v.span(),
                    format!("shared.max_bytes: {e}"),
                    "write a size like \"16MiB\"",
                )
            })?;
            if n < 1024 {
                return Err(at(
                    v.span(),
                    "shared.max_bytes must be at least 1KiB".into(),
                    "",
                ));
            }
            usize::try_from(n).unwrap_or(usize::MAX)
        }
    };
    let redis = match raw.backend.as_ref().map(|b| (b, b.get_ref().as_str())) {
        None | Some((_, "local")) => {
            // Keys of the Redis backend in a local table are mistakes: say so.
            let stray = [
                ("url", raw.url.as_ref().map(|v| v.span())),
                (
                    "password_file",
                    raw.password_file.as_ref().map(|v| v.span()),
                ),
                ("key_prefix", raw.key_prefix.as_ref().map(|v| v.span())),
                ("instance", raw.instance.as_ref().map(|v| v.span())),
                (
                    "on_unavailable",
                    raw.on_unavailable.as_ref().map(|v| v.span()),
                ),
                ("timeout", raw.timeout.as_ref().map(|v| v.span())),
                (
                    "frame_staleness",
                    raw.frame_staleness.as_ref().map(|v| v.span()),
                ),
                ("lease", raw.lease.as_ref().map(|v| v.span())),
                ("ca_file", raw.ca_file.as_ref().map(|v| v.span())),
            ];
            if let Some((key, Some(span))) = stray.into_iter().find(|(_, s)| s.is_some()) {
                return Err(at(
                    span,
                    format!("shared.{key} needs backend = \"redis\""),
                    "the local backend keeps gw.shared in this process; set backend = \"redis\" to share it with a fleet",
                ));
            }
            None
        }
        Some((_, "redis")) => Some(redis(&raw, base, at)?),
        Some((b, other)) => {
            return Err(at(
                b.span(),
                format!("shared.backend {other:?} is not one of local, redis"),
                "local (the default) keeps gw.shared in this process; redis shares it with a fleet",
            ))
        }
    };
    Ok(SharedConfig {
        max_entries,
        max_bytes,
        redis,
    })
}

fn redis(raw: &RawShared, base: &Path, at: At) -> Result<RedisConfig, ConfigError> {
    let backend_span = raw.backend.as_ref().map(|b| b.span()).unwrap_or_default();
    let Some(url) = &raw.url else {
        return Err(at(
            backend_span,
            "shared.backend = \"redis\" needs shared.url".into(),
            "for example url = \"redis://127.0.0.1:6379/0\"",
        ));
    };
    let mut text = url.get_ref().trim().to_owned();
    if !["redis://", "rediss://", "redis+sentinel://"]
        .iter()
        .any(|s| text.starts_with(s))
    {
        return Err(at(
            url.span(),
            format!("shared.url {text:?} is not a redis://, rediss:// or redis+sentinel:// URL"),
            "for example url = \"redis://127.0.0.1:6379/0\"",
        ));
    }
    if let Some(file) = &raw.password_file {
        if url_password_span(&text).is_some() {
            return Err(at(
                file.span(),
                "shared.password_file: the url has a password already".into(),
                "keep the password in one place: the file, out of the configuration",
            ));
        }
        let path = base.join(file.get_ref());
        let password = std::fs::read_to_string(&path).map_err(|e| {
            at(
                file.span(),
                format!(
                    "shared.password_file {}: cannot read it: {e}",
                    path.display()
                ),
                "",
            )
        })?;
        let password = password.trim();
        if password.is_empty() {
            return Err(at(
                file.span(),
                format!("shared.password_file {} is empty", path.display()),
                "",
            ));
        }
        let encoded: String = form_urlencoded::byte_serialize(password.as_bytes()).collect();
        let start = text.find("://").map_or(0, |i| i + 3);
        let user_end = text[start..]
            .find(['/', '?'])
            .map_or(text.len(), |i| start + i);
        let (user, rest) = match text[start..user_end].rfind('@') {
            Some(i) => (text[start..start + i].to_owned(), &text[start + i + 1..]),
            None => (String::new(), &text[start..]),
        };
        text = format!("{}{user}:{encoded}@{rest}", &text[..start]);
    }
    let target = if text.starts_with("redis+sentinel://") {
        sentinel_target(&text).map_err(|e| {
            at(
                url.span(),
                format!("shared.url: {e}"),
                "write redis+sentinel://[:password@]host:port[,host:port...]/service[/db]",
            )
        })?
    } else {
        redis::parse_redis_url(&text).ok_or_else(|| {
            at(
                url.span(),
                "shared.url is not a valid Redis URL".into(),
                "for example url = \"redis://:password@127.0.0.1:6379/0\"",
            )
        })?;
        RedisTarget::Direct
    };
    let ca = match &raw.ca_file {
        None => None,
        Some(file) => {
            if !text.starts_with("rediss://") {
                return Err(at(
                    file.span(),
                    "shared.ca_file needs a rediss:// url".into(),
                    "the CA checks the certificate of a Redis spoken to over TLS",
                ));
            }
            let path = base.join(file.get_ref());
            let pem = std::fs::read(&path).map_err(|e| {
                at(
                    file.span(),
                    format!("shared.ca_file {}: cannot read it: {e}", path.display()),
                    "",
                )
            })?;
            let certs = rustls_pemfile::certs(&mut &pem[..])
                .filter(Result::is_ok)
                .count();
            if certs == 0 {
                return Err(at(
                    file.span(),
                    format!("shared.ca_file {} holds no PEM certificate", path.display()),
                    "",
                ));
            }
            Some(pem)
        }
    };
    let key_prefix = match &raw.key_prefix {
        None => DEFAULT_KEY_PREFIX.to_owned(),
        Some(v) => name(v, "key_prefix", at)?,
    };
    let instance = raw
        .instance
        .as_ref()
        .map(|v| name(v, "instance", at))
        .transpose()?;
    let on_unavailable = match raw.on_unavailable.as_ref() {
        None => OnUnavailable::Allow,
        Some(v) => match v.get_ref().as_str() {
            "allow" => OnUnavailable::Allow,
            "deny" => OnUnavailable::Deny,
            other => {
                return Err(at(
                    v.span(),
                    format!("shared.on_unavailable {other:?} is not one of allow, deny"),
                    "allow lets traffic through while Redis is unreachable; deny refuses it",
                ))
            }
        },
    };
    let timeout = duration(&raw.timeout, "timeout", DEFAULT_TIMEOUT, at)?;
    let frame_staleness = duration(
        &raw.frame_staleness,
        "frame_staleness",
        DEFAULT_FRAME_STALENESS,
        at,
    )?;
    let lease = duration(&raw.lease, "lease", DEFAULT_LEASE, at)?;
    if lease < Duration::from_secs(1) {
        let span = raw.lease.as_ref().map(|v| v.span()).unwrap_or_default();
        return Err(at(
            span,
            "shared.lease must be at least 1s".into(),
            "heartbeats go out every third of it",
        ));
    }
    Ok(RedisConfig {
        target,
        ca,
        url: text,
        key_prefix,
        instance,
        on_unavailable,
        timeout,
        frame_staleness,
        lease,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_name_the_sentinels_and_the_service() {
        let t =
            sentinel_target("redis+sentinel://:p%40ss@10.0.0.1:26379,s2:26380/mymaster/2").unwrap();
        assert!(
            t == RedisTarget::Sentinel {
                sentinels: vec!["redis://10.0.0.1:26379".into(), "redis://s2:26380".into()],
                service: "mymaster".into(),
                db: 2,
                username: None,
                password: Some("p@ss".into()),
            }
        );
        for bad in [
            "redis+sentinel://h:1",
            "redis+sentinel://h/m",
            "redis+sentinel://h:1/",
            "redis+sentinel://h:1/m/x",
            "redis+sentinel://h:port/m",
        ] {
            assert!(sentinel_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_are_not_shown() {
        let c = RedisConfig {
            target: RedisTarget::Direct,
            ca: None,
            url: "redis://user:s3cret@127.0.0.1:6379/0".into(),
            key_prefix: "fg:".into(),
            instance: None,
            on_unavailable: OnUnavailable::Allow,
            timeout: DEFAULT_TIMEOUT,
            frame_staleness: DEFAULT_FRAME_STALENESS,
            lease: DEFAULT_LEASE,
        };
        assert_eq!(c.shown_url(), "redis://user:***@127.0.0.1:6379/0");
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(url_password_span("redis://127.0.0.1:6379/0"), None);
        assert_eq!(url_password_span("redis://h:1/0?x=a:b@c"), None);
    }
}
