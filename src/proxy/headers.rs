//! Which handshake headers cross the gateway, each way.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1, plus any named in `Connection`) and the per-leg WebSocket
//! handshake headers never cross; `Sec-WebSocket-Protocol` does. Upstream requests get
//! `X-Forwarded-For` (appended), `X-Forwarded-Proto` and `X-Forwarded-Host`.

use std::io::Write;
use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::client_http::{header_line, lists_token};
use crate::header_fields::{is_name, HeaderFields};

/// Whether `name` (any case) describes one hop or one WebSocket leg, and is never copied
/// across. (The upstream handshake writes its own per-leg headers, with the client's
/// `Sec-WebSocket-Key`.) `Host` and `Content-Length` are not copied either: each leg has its
/// own.
fn is_never_forwarded(name: &[u8]) -> bool {
    // Sorted by length first: most names are turned away by their length alone.
    let candidates: &[&str] = match name.len() {
        2 => &["te"],
        4 => &["host"],
        7 => &["trailer", "upgrade"],
        10 => &["connection", "keep-alive"],
        14 => &["content-length"],
        16 => &["proxy-connection"],
        17 => &["transfer-encoding", "sec-websocket-key"],
        18 => &["proxy-authenticate"],
        19 => &["proxy-authorization"],
        20 => &["sec-websocket-accept"],
        21 => &["sec-websocket-version"],
        24 => &["sec-websocket-extensions"],
        _ => return false,
    };
    candidates.iter().any(|c| is_name(name, c))
}

/// `from` without hop-by-hop, per-leg and `Host`/`Content-Length` headers: `(name, value)`,
/// names as they were sent.
fn end_to_end_iter(from: &HeaderFields) -> impl Iterator<Item = (&[u8], &[u8])> {
    from.iter()
        .filter(|(name, _)| !(is_never_forwarded(name) || named_in_connection(from, name)))
}

/// Whether `from`'s `Connection` header names `name` (which makes it hop-by-hop). Read again
/// for each header rather than collected: there are few of either, and this allocates nothing.
fn named_in_connection(from: &HeaderFields, name: &[u8]) -> bool {
    from.get_all("connection").any(|v| lists_token(v, name))
}

const FORWARDED_FOR: &str = "x-forwarded-for";
const FORWARDED_PROTO: &str = "x-forwarded-proto";
const FORWARDED_HOST: &str = "x-forwarded-host";
const PROTOCOL: &str = "sec-websocket-protocol";

/// The names the gateway writes itself, in the order they are written: static, so that a
/// header map takes them without parsing or copying them.
static OWN_NAMES: [HeaderName; 4] = [
    HeaderName::from_static(FORWARDED_FOR),
    HeaderName::from_static(FORWARDED_PROTO),
    HeaderName::from_static(FORWARDED_HOST),
    http::header::SEC_WEBSOCKET_PROTOCOL,
];

/// What goes upstream besides the client's end-to-end headers.
pub(crate) struct UpstreamRequest<'a> {
    /// The client's address, appended to `X-Forwarded-For`.
    pub(crate) client_ip: IpAddr,
    /// The request's host (an absolute-form target's authority, or else `Host`), for
    /// `X-Forwarded-Host`.
    pub(crate) client_host: Option<&'a str>,
    /// `X-Forwarded-Proto`.
    pub(crate) proto: &'static str,
    /// The policy's `req:set_header` calls, in call order: set (`Some`) or remove (`None`).
    pub(crate) changes: &'a [(HeaderName, Option<HeaderValue>)],
    /// The subprotocol the policy chose: the only one offered upstream.
    pub(crate) subprotocol: Option<&'a str>,
}

impl UpstreamRequest<'_> {
    /// What the upstream gets for `name` where the gateway or the policy decides it, rather
    /// than the client: `Some(None)` removes the header, `None` lets the client's values go
    /// as they are. The chosen subprotocol comes first, then the policy's last word on the
    /// name, then the forwarded headers.
    fn decided<'a>(&'a self, name: &[u8], client: &'a HeaderFields) -> Option<Option<Own<'a>>> {
        let is = |own: &str| is_name(name, own);
        if is(PROTOCOL) {
            if let Some(chosen) = self.subprotocol {
                return Some(Some(Own::Text(chosen)));
            }
        }
        let changed = self.changes.iter().rev().find(|(n, _)| is(n.as_str()));
        if let Some((_, value)) = changed {
            return Some(value.as_ref().map(Own::Value));
        }
        if is(FORWARDED_FOR) {
            Some(Some(Own::ForwardedFor))
        } else if is(FORWARDED_PROTO) {
            Some(Some(Own::Static(self.proto)))
        } else if is(FORWARDED_HOST) {
            // The host the request was routed by: an absolute-form target's authority, which
            // wins over `Host` (RFC 9112 §3.2.2), or else the client's own Host value.
            let host = self
                .client_host
                .filter(|h| crate::upstream::is_header_value(h))
                .map(str::as_bytes)
                .or_else(|| client.get("host"));
            Some(host.map(Own::Bytes))
        } else {
            None
        }
    }
}

/// A value the gateway writes itself.
enum Own<'a> {
    Text(&'a str),
    Static(&'static str),
    Bytes(&'a [u8]),
    /// A policy's value.
    Value(&'a HeaderValue),
    /// The client's `X-Forwarded-For` values and its address, joined with ", ".
    ForwardedFor,
}

/// Where the upstream request's header fields go: the upgrade writes lines, the HTTP proxy
/// fills a header map.
pub(crate) trait HeaderSink {
    /// One header field.
    fn field(&mut self, name: &[u8], value: &[u8]);
    /// A field the gateway names (its own, or a policy's): a header map takes the name as it
    /// is.
    fn named(&mut self, name: &HeaderName, value: &[u8]) {
        self.field(name.as_str().as_bytes(), value);
    }
    /// A field the gateway names, with a value known when the gateway was built.
    fn named_static(&mut self, name: &HeaderName, value: &'static str) {
        self.named(name, value.as_bytes());
    }
    /// A field the gateway names, with a value the policy made.
    fn named_value(&mut self, name: &HeaderName, value: &HeaderValue) {
        self.named(name, value.as_bytes());
    }
    /// `X-Forwarded-For`: the client's earlier values and its address, joined with ", ".
    fn forwarded_for<'a>(&mut self, prior: impl Iterator<Item = &'a [u8]> + Clone, ip: IpAddr) {
        let mut value = Vec::with_capacity(48);
        for p in prior {
            value.extend_from_slice(p);
            value.extend_from_slice(b", ");
        }
        write_ip(&mut value, ip);
        self.named(&OWN_NAMES[0], &value);
    }
}

/// Header lines (`name: value\r\n` each), written straight from the client's headers.
impl HeaderSink for Vec<u8> {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        header_line(self, name, value);
    }

    fn forwarded_for<'a>(&mut self, prior: impl Iterator<Item = &'a [u8]> + Clone, ip: IpAddr) {
        self.extend_from_slice(b"x-forwarded-for: ");
        for p in prior {
            self.extend_from_slice(p);
            self.extend_from_slice(b", ");
        }
        write_ip(self, ip);
        self.extend_from_slice(b"\r\n");
    }
}

/// A header map; a field `http` would not take (httparse has checked both) is left out.
impl HeaderSink for HeaderMap {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            self.append(name, value);
        }
    }

    fn named(&mut self, name: &HeaderName, value: &[u8]) {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            self.append(name.clone(), value);
        }
    }

    fn named_static(&mut self, name: &HeaderName, value: &'static str) {
        self.append(name.clone(), HeaderValue::from_static(value));
    }

    fn named_value(&mut self, name: &HeaderName, value: &HeaderValue) {
        self.append(name.clone(), value.clone());
    }

    /// Written straight into the value's own buffer, of the exact size (one allocation).
    fn forwarded_for<'a>(&mut self, prior: impl Iterator<Item = &'a [u8]> + Clone, ip: IpAddr) {
        let ip_len = match ip {
            IpAddr::V4(v4) => {
                v4.octets()
                    .iter()
                    .map(|&o| 1 + usize::from(o >= 10) + usize::from(o >= 100))
                    .sum::<usize>()
                    + 3
            }
            IpAddr::V6(_) => 39,
        };
        let prior_len: usize = prior.clone().map(|p| p.len() + 2).sum();
        let mut value = Vec::with_capacity(prior_len + ip_len);
        for p in prior {
            value.extend_from_slice(p);
            value.extend_from_slice(b", ");
        }
        write_ip(&mut value, ip);
        // An IPv6 address may be shorter than the room made for it.
        value.shrink_to_fit();
        if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
            self.append(OWN_NAMES[0].clone(), value);
        }
    }
}

/// Appends the header lines of the upstream request (`name: value\r\n` each): see
/// [`upstream_fields`].
pub(crate) fn upstream_request(
    out: &mut Vec<u8>,
    client: &HeaderFields,
    extra: &UpstreamRequest<'_>,
) {
    upstream_fields(out, client, extra);
}

/// Gives `out` the upstream request's header fields: the client's end-to-end headers,
/// `X-Forwarded-For` (appended to), `X-Forwarded-Proto` and `X-Forwarded-Host`, then the
/// policy's changes and the chosen subprotocol, which replace every value of their name.
/// Read straight from the client's headers. Hop-by-hop and per-leg headers never appear (the
/// policy cannot set them either), so the upstream request adds its own.
pub(crate) fn upstream_fields(
    out: &mut impl HeaderSink,
    client: &HeaderFields,
    extra: &UpstreamRequest<'_>,
) {
    for (name, value) in end_to_end_iter(client) {
        if extra.decided(name, client).is_none() {
            out.field(name, value);
        }
    }
    own_fields(out, client, extra);
}

/// The upstream HTTP request's header map (HTTP mode): the fields [`upstream_fields`] gives,
/// in the same order, with the client's fields taken from `client_map`, hyper's parse of
/// the request that `client` was made from (see `HeaderFields::of_map`): their names and
/// values are shared, not parsed or copied again.
pub(crate) fn upstream_map(
    client_map: &HeaderMap,
    client: &HeaderFields,
    extra: &UpstreamRequest<'_>,
) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(client_map.len() + OWN_NAMES.len());
    for (name, value) in client_map {
        let name_bytes = name.as_str().as_bytes();
        if !(is_never_forwarded(name_bytes) || named_in_connection(client, name_bytes))
            && extra.decided(name_bytes, client).is_none()
        {
            out.append(name.clone(), value.clone());
        }
    }
    own_fields(&mut out, client, extra);
    out
}

/// The fields the gateway or the policy decides (see [`UpstreamRequest::decided`]): the
/// forwarded headers, the chosen subprotocol, the policy's changes; each name once.
fn own_fields(out: &mut impl HeaderSink, client: &HeaderFields, extra: &UpstreamRequest<'_>) {
    let names = || {
        let changed = extra.changes.iter().map(|(name, _)| name);
        OWN_NAMES.iter().chain(changed)
    };
    for (i, name) in names().enumerate() {
        // Each name once: a name the policy changed twice, or one the gateway also sets,
        // is written where it first comes. (All of these names are lower case.)
        if names().take(i).any(|earlier| earlier == name) {
            continue;
        }
        match extra.decided(name.as_str().as_bytes(), client) {
            Some(Some(Own::Text(v))) => out.named(name, v.as_bytes()),
            Some(Some(Own::Static(v))) => out.named_static(name, v),
            Some(Some(Own::Bytes(v))) => out.named(name, v),
            Some(Some(Own::Value(v))) => out.named_value(name, v),
            Some(Some(Own::ForwardedFor)) => {
                out.forwarded_for(client.get_all(FORWARDED_FOR), extra.client_ip)
            }
            Some(None) | None => {}
        }
    }
}

/// Appends `ip` as text: digits, dots, colons and hex letters, a valid header value. An IPv4
/// address is written by hand, as `Display` costs about 1k instructions.
fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// The upstream's 101 headers that go back to the client (`Set-Cookie`, the chosen
/// subprotocol…), read where they are: the 101 is written from them directly.
pub(crate) fn client_response(upstream: &HeaderFields) -> impl Iterator<Item = (&[u8], &[u8])> {
    end_to_end_iter(upstream)
}

/// Whether a response header describes one hop (RFC 9110 §7.6.1) and is not relayed on an
/// HTTP response. `Content-Length` is relayed: it is the length of the body hyper forwards
/// (and the only length a `HEAD` response has).
fn is_hop_by_hop(name: &[u8]) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ]
    .iter()
    .any(|h| is_name(name, h))
}

/// An upstream's HTTP response headers as they go to the client: without hop-by-hop headers
/// and those its `Connection` names.
pub(crate) fn http_response(upstream: &mut HeaderMap) {
    let named: Vec<HeaderName> = upstream
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok())
        .collect();
    let hop: Vec<HeaderName> = upstream
        .keys()
        .filter(|n| is_hop_by_hop(n.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in hop.iter().chain(&named) {
        upstream.remove(name);
    }
}

/// The upstream's headers on a refused handshake, relayed with its status and body.
pub(crate) fn refusal(upstream: &HeaderFields) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in end_to_end_iter(upstream) {
        // httparse has checked both; a field `http` would not take is left out.
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            out.append(name, value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The upstream request's header lines for `client`, read back into a map.
    fn upstream(
        client: &HeaderFields,
        ip: &str,
        host: Option<&str>,
        changes: &[(HeaderName, Option<HeaderValue>)],
        subprotocol: Option<&str>,
    ) -> HeaderMap {
        let mut lines = Vec::new();
        let extra = UpstreamRequest {
            client_ip: ip.parse().unwrap(),
            client_host: host,
            proto: "http",
            changes,
            subprotocol,
        };
        upstream_request(&mut lines, client, &extra);
        let text = String::from_utf8(lines).unwrap();
        let mut out = HeaderMap::new();
        for line in text.split_terminator("\r\n") {
            let (name, value) = line.split_once(": ").expect("name: value");
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            out.append(name, HeaderValue::from_str(value).unwrap());
        }
        out
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderFields {
        HeaderFields::from_pairs(pairs.iter().copied())
    }

    #[test]
    fn strips_hop_by_hop_and_per_leg_headers() {
        let client = map(&[
            ("Host", "gw.example"),
            ("Connection", "Upgrade, X-Private"),
            ("X-PRIVATE", "secret"),
            ("upgrade", "websocket"),
            ("Sec-WebSocket-Key", "abc"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-extensions", "permessage-deflate"),
            ("sec-websocket-protocol", "chat, superchat"),
            ("authorization", "Bearer t"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
        ]);
        let out = upstream(&client, "10.0.0.9", Some("gw.example"), &[], None);
        for gone in [
            "host",
            "connection",
            "x-private",
            "upgrade",
            "sec-websocket-key",
            "sec-websocket-version",
            "sec-websocket-extensions",
        ] {
            assert!(out.get(gone).is_none(), "{gone} should not be forwarded");
        }
        assert_eq!(out["sec-websocket-protocol"], "chat, superchat");
        assert_eq!(out["authorization"], "Bearer t");
        assert_eq!(out.get_all("cookie").iter().count(), 2);
        assert_eq!(out["x-forwarded-for"], "10.0.0.9");
        assert_eq!(out["x-forwarded-proto"], "http");
        assert_eq!(out["x-forwarded-host"], "gw.example");
    }

    #[test]
    fn forwarded_names_keep_the_case_they_were_sent_in() {
        let client = map(&[("X-Custom-Thing", "1"), ("cookie", "a=1")]);
        let extra = UpstreamRequest {
            client_ip: "10.0.0.9".parse().unwrap(),
            client_host: None,
            proto: "http",
            changes: &[],
            subprotocol: None,
        };
        let mut lines = Vec::new();
        upstream_request(&mut lines, &client, &extra);
        let text = String::from_utf8(lines).unwrap();
        assert!(
            text.starts_with("X-Custom-Thing: 1\r\ncookie: a=1\r\n"),
            "{text}"
        );
    }

    #[test]
    fn appends_to_existing_forwarded_for() {
        let client = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        let out = upstream(&client, "3.3.3.3", None, &[], None);
        assert_eq!(out["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3");
    }

    #[test]
    fn the_policy_and_the_chosen_subprotocol_have_the_last_word_once_per_name() {
        let client = map(&[
            ("Authorization", "Bearer a"),
            ("X-Forwarded-Proto", "https"),
            ("sec-websocket-protocol", "chat, superchat"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("x-kept", "k"),
        ]);
        let set = |name: &'static str, value: Option<&'static str>| {
            (
                HeaderName::from_static(name),
                value.map(HeaderValue::from_static),
            )
        };
        let changes = [
            set("authorization", Some("Bearer b")),
            set("x-forwarded-proto", Some("custom")),
            set("cookie", None),
            set("x-new", Some("1")),
            set("x-new", Some("2")),
            set("x-forwarded-host", None),
        ];
        let out = upstream(&client, "10.0.0.9", Some("gw"), &changes, Some("chat"));
        let all = |name: &str| -> Vec<_> { out.get_all(name).iter().collect() };
        assert_eq!(all("authorization"), ["Bearer b"]);
        assert_eq!(all("x-forwarded-proto"), ["custom"]);
        assert!(all("cookie").is_empty());
        assert_eq!(all("x-new"), ["2"]);
        assert!(all("x-forwarded-host").is_empty());
        assert_eq!(all("sec-websocket-protocol"), ["chat"]);
        assert_eq!(all("x-forwarded-for"), ["10.0.0.9"]);
        assert_eq!(all("x-kept"), ["k"]);
        assert_eq!(out.len(), 6);
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "10.0.0.9",
            "127.0.0.1",
            "192.168.100.255",
            "::1",
            "fe80::1:2",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().into_bytes());
        }
    }
}
