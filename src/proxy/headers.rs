//! Which handshake headers cross the gateway, each way.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1, plus any named in `Connection`) and the per-leg WebSocket
//! handshake headers never cross; `Sec-WebSocket-Protocol` does. Upstream requests get
//! `X-Forwarded-For` (appended), `X-Forwarded-Proto` and `X-Forwarded-Host`.

use std::io::Write;
use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop or one WebSocket leg, never copied across. (The upstream
/// handshake writes its own per-leg headers, with the client's `Sec-WebSocket-Key`.)
const NEVER_FORWARDED: [HeaderName; 13] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_EXTENSIONS,
    header::SEC_WEBSOCKET_ACCEPT,
];

/// `from` without hop-by-hop, per-leg and `Host`/`Content-Length` headers.
fn end_to_end_iter(from: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    from.iter().filter(|(name, _)| {
        !(NEVER_FORWARDED.contains(name)
            || *name == header::HOST
            || *name == header::CONTENT_LENGTH
            || named_in_connection(from, name))
    })
}

/// Copies `from` without hop-by-hop, per-leg and `Host`/`Content-Length` headers.
fn end_to_end(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(from.len() + 3);
    for (name, value) in end_to_end_iter(from) {
        out.append(name.clone(), value.clone());
    }
    out
}

/// Whether `from`'s `Connection` header names `name` (which makes it hop-by-hop). Read again
/// for each header rather than collected: there are few of either, and this allocates nothing.
fn named_in_connection(from: &HeaderMap, name: &HeaderName) -> bool {
    from.get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|token| {
            token
                .trim_ascii()
                .eq_ignore_ascii_case(name.as_str().as_bytes())
        })
}

/// The headers to send upstream for a client's upgrade request.
pub(crate) fn upstream_request(
    client: &HeaderMap,
    client_ip: IpAddr,
    client_host: Option<&str>,
    proto: &'static str,
) -> HeaderMap {
    let mut out = end_to_end(client);
    let mut forwarded_for = Vec::with_capacity(48);
    for prior in client.get_all("x-forwarded-for") {
        forwarded_for.extend_from_slice(prior.as_bytes());
        forwarded_for.extend_from_slice(b", ");
    }
    // An IP address is digits, dots, colons and hex letters: a valid header value.
    let _ = write!(forwarded_for, "{client_ip}");
    out.remove("x-forwarded-for");
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(forwarded_for)) {
        out.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    out.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(proto),
    );
    // The client's own Host value is shared, not copied; an absolute-form target's authority
    // is copied.
    let host = client
        .get(header::HOST)
        .cloned()
        .or_else(|| client_host.and_then(|h| HeaderValue::from_str(h).ok()));
    match host {
        Some(h) => {
            out.insert(HeaderName::from_static("x-forwarded-host"), h);
        }
        None => {
            out.remove("x-forwarded-host");
        }
    }
    out
}

/// The upstream's 101 headers that go back to the client (`Set-Cookie`, the chosen
/// subprotocol…), read where they are: the 101 is written from them directly.
pub(crate) fn client_response(
    upstream: &HeaderMap,
) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    end_to_end_iter(upstream)
}

/// The upstream's headers on a refused handshake, relayed with its status and body.
pub(crate) fn refusal(upstream: &HeaderMap) -> HeaderMap {
    end_to_end(upstream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn strips_hop_by_hop_and_per_leg_headers() {
        let client = map(&[
            ("host", "gw.example"),
            ("connection", "Upgrade, X-Private"),
            ("x-private", "secret"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "abc"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-extensions", "permessage-deflate"),
            ("sec-websocket-protocol", "chat, superchat"),
            ("authorization", "Bearer t"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
        ]);
        let out = upstream_request(
            &client,
            "10.0.0.9".parse().unwrap(),
            Some("gw.example"),
            "http",
        );
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
    fn appends_to_existing_forwarded_for() {
        let client = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        let out = upstream_request(&client, "3.3.3.3".parse().unwrap(), None, "http");
        assert_eq!(out["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3");
    }
}
