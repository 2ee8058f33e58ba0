//! The upgrade request as the admin API and the traffic console show it (the registry keeps
//! one per open connection, a capture one per recorded connection): secrets masked when it is
//! made (`Authorization`, `Proxy-Authorization`, `Cookie`, an `access_token` query parameter,
//! subprotocols longer than 32 bytes), headers bounded in count and bytes.

use serde::Serialize;

/// Request headers kept per connection (the gateway already bounds the request head).
pub const MAX_HEADERS: usize = 100;
/// Header bytes (names and values) kept per connection.
pub const MAX_HEADER_BYTES: usize = 16 << 10;
/// What replaces a masked secret.
const MASK: &str = "<redacted>";

/// The upgrade request as the admin sees it: secrets masked, size bounded.
///
/// Every open connection keeps one, so it is compact: the headers are one string of
/// `name: value` lines (a header field can hold neither CR nor LF), split when the admin asks
/// for them, instead of two strings per field.
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    /// The request method (always GET for a WebSocket upgrade).
    pub method: Box<str>,
    /// The request target with any `access_token` query parameter masked.
    pub target: Box<str>,
    /// `name: value\n` per field, in arrival order, secrets masked, at most [`MAX_HEADERS`].
    lines: Box<str>,
    /// True when headers past the bounds were left out.
    pub headers_truncated: bool,
}

impl UpgradeRequest {
    /// Records `method`, `target` and `headers` (raw values; non-UTF-8 bytes are shown as U+FFFD),
    /// masking `Authorization`, `Proxy-Authorization`, `Cookie`, the `access_token` parameter and
    /// subprotocols too long to be names (tokens carried as subprotocols).
    pub fn new<'a>(
        method: &str,
        target: &str,
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> UpgradeRequest {
        let mut lines = String::new();
        let mut truncated = false;
        for (kept, (name, value)) in headers.into_iter().enumerate() {
            let secret = ["authorization", "proxy-authorization", "cookie"]
                .iter()
                .any(|s| name.eq_ignore_ascii_case(s));
            let value = if secret {
                MASK.into()
            } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
                mask_long_protocols(&String::from_utf8_lossy(value)).into()
            } else {
                String::from_utf8_lossy(value)
            };
            // Bounded by name and value, as before: the separators are not counted.
            let bytes = lines.len() - 3 * kept + name.len() + value.len();
            if kept == MAX_HEADERS || bytes > MAX_HEADER_BYTES || has_line_break(name, &value) {
                truncated = true;
                break;
            }
            lines.push_str(name);
            lines.push_str(": ");
            lines.push_str(&value);
            lines.push('\n');
        }
        UpgradeRequest {
            method: method.into(),
            target: mask_query(target).into(),
            lines: lines.into_boxed_str(),
            headers_truncated: truncated,
        }
    }

    /// `(name, value)` pairs in arrival order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines
            .lines()
            .map(|line| line.split_once(": ").unwrap_or((line, "")))
    }
}

/// Whether a field would break the line format (the request parser refuses such fields).
fn has_line_break(name: &str, value: &str) -> bool {
    name.contains(['\r', '\n']) || value.contains(['\r', '\n'])
}

impl Serialize for UpgradeRequest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct Headers<'a>(&'a UpgradeRequest);
        impl Serialize for Headers<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_seq(self.0.headers())
            }
        }
        let fields = if self.headers_truncated { 4 } else { 3 };
        let mut out = serializer.serialize_struct("UpgradeRequest", fields)?;
        out.serialize_field("method", &self.method)?;
        out.serialize_field("target", &self.target)?;
        out.serialize_field("headers", &Headers(self))?;
        if self.headers_truncated {
            out.serialize_field("headers_truncated", &true)?;
        }
        out.end()
    }
}

/// The longest subprotocol shown as it is. Browsers can send no `Authorization` header with a
/// WebSocket, so pages carry tokens as subprotocols (`["access_token", "<jwt>"]`, or
/// Kubernetes's `base64url.bearer.authorization.k8s.io.<token>`); protocol names are short.
const MAX_SHOWN_PROTOCOL: usize = 32;

/// A `Sec-WebSocket-Protocol` value with each item longer than [`MAX_SHOWN_PROTOCOL`] masked.
fn mask_long_protocols(value: &str) -> String {
    value
        .split(',')
        .map(|item| match item.trim() {
            long if long.len() > MAX_SHOWN_PROTOCOL => MASK,
            short => short,
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `target` with the value of every `access_token` query parameter replaced by the mask.
pub(crate) fn mask_query(target: &str) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| {
            let raw_key = pair.split_once('=').map_or(pair, |(k, _)| k);
            let key: String = form_urlencoded::parse(raw_key.as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            if key.eq_ignore_ascii_case("access_token") {
                format!("{raw_key}={MASK}")
            } else {
                pair.to_owned()
            }
        })
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked() {
        let r = UpgradeRequest::new(
            "GET",
            "/chat?room=1&access_token=s3cret&x=2",
            [
                ("Host", &b"example.com"[..]),
                ("Authorization", b"Bearer s3cret"),
                ("cookie", b"sid=s3cret"),
                ("Proxy-Authorization", b"Basic s3cret"),
                (
                    "Sec-WebSocket-Protocol",
                    b"graphql-ws, base64url.bearer.authorization.k8s.io.s3cret0123456789",
                ),
            ],
        );
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("s3cret"), "{json}");
        assert_eq!(&*r.target, "/chat?room=1&access_token=<redacted>&x=2");
        let headers: Vec<_> = r.headers().collect();
        assert_eq!(headers[0], ("Host", "example.com"));
        assert_eq!(headers[1].1, MASK);
        assert_eq!(headers[4].1, format!("graphql-ws, {MASK}"));
    }

    #[test]
    fn headers_are_bounded() {
        let big = vec![b'x'; 1000];
        let many: Vec<(&str, &[u8])> = (0..200).map(|_| ("X-Big", &big[..])).collect();
        let r = UpgradeRequest::new("GET", "/", many);
        assert!(r.headers_truncated);
        assert!(r.headers().count() <= MAX_HEADERS);
        assert!(r.headers().map(|(n, v)| n.len() + v.len()).sum::<usize>() <= MAX_HEADER_BYTES);
    }
}
