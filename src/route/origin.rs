//! The `Origin` allow-list of a route (`origins`, `allow_missing_origin`): the defence against
//! cross-site WebSocket hijacking. A browser sends the page's origin with every WebSocket
//! upgrade, and sends the site's cookies whatever that origin is; a route that authenticates
//! by cookie must therefore check the origin itself.
//!
//! Origins are compared as browsers serialize them (RFC 6454 §6.1): scheme, host and port,
//! with the scheme and host case-insensitive and a default port (80 for `http`/`ws`, 443 for
//! `https`/`wss`) the same as no port. A pattern's host may start with `*.`, which stands for
//! one or more labels: `https://*.example.com` matches `https://a.example.com` and
//! `https://a.b.example.com`, not `https://example.com`.
//!
//! [`Origins::allows`] is the one question callers ask ("does this route let this `Origin` in");
//! the upgrade asks it before any policy runs, and CORS answers may ask it too.

use std::fmt;
use std::net::Ipv6Addr;

/// A route's allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origins {
    /// The allowed origins, as patterns.
    pub patterns: Vec<OriginPattern>,
    /// Whether a request without an `Origin` header (a native client) may in.
    pub allow_missing: bool,
}

impl Origins {
    /// Whether a request whose `Origin` header values are `values` (all of them, in order) is
    /// allowed. A missing header is allowed only with `allow_missing`; more than one `Origin`
    /// header, a value that is not a serialized origin (such as `null`) and an origin that no
    /// pattern matches are refused.
    pub fn allows<'a>(&self, mut values: impl Iterator<Item = &'a [u8]>) -> bool {
        let Some(first) = values.next() else {
            return self.allow_missing;
        };
        if values.next().is_some() {
            return false;
        }
        match Origin::parse(first) {
            Some(origin) => self.patterns.iter().any(|p| p.matches(&origin)),
            None => false,
        }
    }
}

/// Whether a route with allow-list `origins` (`None`: no `origins` key, any origin) lets in a
/// request with these `Origin` header values. The function CORS answers and the upgrade share.
pub fn origin_allowed<'a>(
    origins: Option<&Origins>,
    values: impl Iterator<Item = &'a [u8]>,
) -> bool {
    origins.is_none_or(|o| o.allows(values))
}

/// The host part of an origin or a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    /// A name or an IPv4 address, lower-case.
    Name(String),
    /// An IPv6 address (written in brackets).
    V6(Ipv6Addr),
}

/// A serialized origin, as a browser sends it: `scheme://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: Host,
    /// The port, with a scheme's default filled in (`None`: no port and no known default).
    port: Option<u16>,
}

/// One entry of `origins`: an origin whose host may start with `*.`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    /// As written (for messages and the effective configuration).
    text: String,
    /// Lower-case; `host` is the part after `*.` when `wildcard`.
    origin: Origin,
    wildcard: bool,
}

impl fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// A host name (or IPv4 address) of LDH labels, without a trailing dot.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Splits `scheme://host[:port]` into its parts; `Err` says what is wrong.
fn split(text: &str) -> Result<(&str, &str, Option<&str>), &'static str> {
    let (scheme, rest) = text.split_once("://").ok_or("it has no scheme")?;
    if !is_scheme(scheme) {
        return Err("its scheme is not valid");
    }
    if rest.contains(['/', '?', '#']) {
        return Err("an origin has no path, query or fragment (not even a trailing \"/\")");
    }
    if rest.contains('@') {
        return Err("an origin has no user name or password");
    }
    if let Some(v6) = rest.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or("unclosed '[' in the host")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after the IPv6 address")?),
        };
        return Ok((scheme, &rest[..addr.len() + 2], port));
    }
    Ok(match rest.rsplit_once(':') {
        Some((host, port)) => (scheme, host, Some(port)),
        None => (scheme, rest, None),
    })
}

fn parse_port(port: Option<&str>, scheme: &str) -> Result<Option<u16>, &'static str> {
    match port {
        None => Ok(default_port(scheme)),
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => p
            .parse::<u16>()
            .map(Some)
            .map_err(|_| "the port is not between 0 and 65535"),
        Some(_) => Err("the port is not a number"),
    }
}

fn parse_host(host: &str) -> Result<Host, &'static str> {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6
            .parse::<Ipv6Addr>()
            .map(Host::V6)
            .map_err(|_| "the IPv6 address is not valid");
    }
    if !host.is_ascii() {
        return Err("the host is not ASCII (write an internationalized name in its xn-- form, as browsers send it)");
    }
    let lower = host.to_ascii_lowercase();
    if !is_name(&lower) {
        return Err("the host is not a host name or IP address");
    }
    Ok(Host::Name(lower))
}

impl Origin {
    /// Parses an `Origin` header value; `None` for anything that is not a serialized tuple
    /// origin (`null`, a value with a path, a bad port, …).
    pub fn parse(value: &[u8]) -> Option<Origin> {
        let text = std::str::from_utf8(value).ok()?.trim_matches([' ', '\t']);
        let (scheme, host, port) = split(text).ok()?;
        let scheme = scheme.to_ascii_lowercase();
        let port = parse_port(port, &scheme).ok()?;
        let host = parse_host(host).ok()?;
        Some(Origin { scheme, host, port })
    }
}

impl OriginPattern {
    /// Parses an entry of `origins`: `scheme://host[:port]`, where the host may start with
    /// `*.`. `Err` says what is wrong with it.
    pub fn parse(text: &str) -> Result<OriginPattern, String> {
        let bad = |why: &str| format!("{text:?} is not an origin: {why}");
        if text == "null" || text == "*" {
            return Err(format!(
                "{text:?} is not allowed in origins: list the origins to let in (leave origins out to allow any)"
            ));
        }
        let (scheme, host, port) = split(text).map_err(bad)?;
        let scheme = scheme.to_ascii_lowercase();
        let port = parse_port(port, &scheme).map_err(bad)?;
        let (wildcard, host) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host),
        };
        if host.contains('*') {
            return Err(bad(
                "'*' is allowed only as a whole first label, as in https://*.example.com",
            ));
        }
        let host = parse_host(host).map_err(bad)?;
        if wildcard
            && !matches!(host, Host::Name(ref n) if n.parse::<std::net::Ipv4Addr>().is_err())
        {
            return Err(bad(
                "'*.' stands for labels of a host name, not of an IP address",
            ));
        }
        Ok(OriginPattern {
            text: text.to_owned(),
            origin: Origin { scheme, host, port },
            wildcard,
        })
    }

    /// Whether `origin` matches: same scheme and port, and the same host or, for `*.`, a host
    /// that ends with `.` and the pattern's rest (one or more labels before it).
    pub fn matches(&self, origin: &Origin) -> bool {
        let p = &self.origin;
        if p.scheme != origin.scheme || p.port != origin.port {
            return false;
        }
        match (&p.host, &origin.host, self.wildcard) {
            (Host::Name(suffix), Host::Name(name), true) => name
                .strip_suffix(suffix.as_str())
                .and_then(|labels| labels.strip_suffix('.'))
                .is_some_and(|labels| !labels.is_empty()),
            (a, b, false) => a == b,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(patterns: &[&str], allow_missing: bool, origin: Option<&str>) -> bool {
        let origins = Origins {
            patterns: patterns
                .iter()
                .map(|p| OriginPattern::parse(p).unwrap())
                .collect(),
            allow_missing,
        };
        origins.allows(origin.map(str::as_bytes).into_iter())
    }

    #[test]
    fn exact_origins_compare_as_browsers_serialize_them() {
        let list = ["https://app.example.com", "http://localhost:3000"];
        for ok in [
            "https://app.example.com",
            "https://APP.Example.com",
            "HTTPS://app.example.com:443",
            "http://localhost:3000",
        ] {
            assert!(allows(&list, false, Some(ok)), "{ok}");
        }
        for refused in [
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://app.example.com/",
            "https://app.example.com.evil.com",
            "https://evilapp.example.com",
            "http://localhost",
            "http://localhost:3001",
            "null",
            "",
            "https://user@app.example.com",
        ] {
            assert!(!allows(&list, false, Some(refused)), "{refused}");
        }
        // A pattern with the default port written out is the same origin.
        assert!(allows(&["https://a.com:443"], false, Some("https://a.com")));
        assert!(allows(
            &["http://[::1]:8080"],
            false,
            Some("http://[0:0::1]:8080")
        ));
    }

    #[test]
    fn a_wildcard_stands_for_one_or_more_labels() {
        let list = ["https://*.example.com"];
        assert!(allows(&list, false, Some("https://a.example.com")));
        assert!(allows(&list, false, Some("https://a.b.example.com")));
        assert!(!allows(&list, false, Some("https://example.com")));
        assert!(!allows(&list, false, Some("https://aexample.com")));
        assert!(!allows(&list, false, Some("https://a.example.com.evil")));
        assert!(!allows(&list, false, Some("http://a.example.com")));
        assert!(!allows(&list, false, Some("https://a.example.com:8443")));
    }

    #[test]
    fn a_missing_origin_needs_allow_missing_and_two_origins_are_refused() {
        assert!(!allows(&["https://a.com"], false, None));
        assert!(allows(&["https://a.com"], true, None));
        let origins = Origins {
            patterns: vec![OriginPattern::parse("https://a.com").unwrap()],
            allow_missing: true,
        };
        let two: [&[u8]; 2] = [b"https://a.com", b"https://a.com"];
        assert!(!origins.allows(two.into_iter()));
        // No list at all: anything.
        assert!(origin_allowed(None, std::iter::empty()));
        assert!(origin_allowed(None, [b"null" as &[u8]].into_iter()));
    }

    #[test]
    fn bad_patterns_say_why() {
        for (pattern, want) in [
            ("app.example.com", "no scheme"),
            ("https://app.example.com/", "no path"),
            ("https://a.*.com", "whole first label"),
            ("https://*example.com", "whole first label"),
            ("https://*.1.2.3.4", "not of an IP address"),
            ("https://a.com:99999", "between 0 and 65535"),
            ("https://a.com:x", "not a number"),
            ("https://bücher.de", "not ASCII"),
            ("null", "not allowed"),
            ("*", "not allowed"),
            ("https://", "not a host name"),
        ] {
            let e = OriginPattern::parse(pattern).unwrap_err();
            assert!(e.contains(want), "{pattern}: {e}");
        }
    }
}
