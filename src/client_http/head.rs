//! A client's request head, parsed with httparse from the bytes read so far.
//!
//! Header fields are spans of the bytes read, not copies: the head is parsed once, the bytes
//! are frozen, and the fields point into them ([`HeaderFields`]). Only what routing,
//! validation and the policy read is built: the method, the target (as one string), the
//! version and the fields.

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode, Version};

use crate::header_fields::{self, is_name, HeaderFields};

/// A request head may be this long; a longer one is answered with 431.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// As many headers as hyper and NGINX accept by default; more are answered with 431.
const MAX_HEADERS: usize = 100;

/// What is wrong with a client's request head. Each is answered with its
/// [`status`](BadRequest::status) and the connection is closed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadRequest {
    /// Not an HTTP/1.x request head.
    #[error("malformed request head: {0}")]
    Malformed(httparse::Error),
    /// More than [`MAX_HEAD`] bytes without the end of the head.
    #[error("request head longer than {} KiB", MAX_HEAD / 1024)]
    TooLarge,
    /// More headers than accepted.
    #[error("more than {MAX_HEADERS} request headers")]
    TooManyHeaders,
    /// The request target is neither a path nor an absolute URL.
    #[error("bad request target {0:?}")]
    Target(String),
    /// `Content-Length` is not a number, or its values disagree.
    #[error("invalid Content-Length")]
    ContentLength,
    /// An HTTP/1.1 request without `Host` (and without an absolute-form target), or with
    /// more than one (RFC 9112 §3.2).
    #[error("{0}")]
    Host(&'static str),
}

impl BadRequest {
    /// The status the client is answered with.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            BadRequest::TooLarge | BadRequest::TooManyHeaders => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct RequestHead {
    /// The request method.
    pub(crate) method: Method,
    /// HTTP/1.0 or HTTP/1.1.
    pub(crate) version: Version,
    /// Path and query, as sent (the path and query of an absolute-form target).
    target: String,
    /// The authority of an absolute-form target (`GET http://host/path`): the request's host,
    /// whatever `Host` says.
    authority: Option<String>,
    /// The request headers.
    pub(crate) headers: HeaderFields,
    /// Which of `headers` is the first `Host`, if its value is text (see
    /// [`HeaderFields::get_str`]): found once, as routing, the policy and the forwarded
    /// headers each ask for the host.
    host_field: Option<usize>,
    /// The request announces a body (`Transfer-Encoding`, or a `Content-Length` above 0).
    pub(crate) has_body: bool,
    /// The client asked for the connection to end after this request.
    close: bool,
    /// The head's length in the bytes read, which `headers` hold (see [`RequestHead::raw`]).
    len: usize,
}

impl RequestHead {
    /// The request path, without the query.
    pub(crate) fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The query, without `?`, if there is one.
    pub(crate) fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// The host the request is for: the authority of an absolute-form target, which wins
    /// over any `Host` header (RFC 9112 §3.2.2), or else the `Host` header.
    pub(crate) fn host(&self) -> Option<&str> {
        self.authority.as_deref().or_else(|| {
            let value = self.headers.iter().nth(self.host_field?)?.1;
            std::str::from_utf8(value).ok()
        })
    }

    /// The head's bytes as the client sent them, for handing the request to another HTTP
    /// parser (the HTTP proxy's hyper server).
    pub(crate) fn raw(&self) -> Bytes {
        self.headers
            .bytes()
            .slice(..self.len.min(self.headers.bytes().len()))
    }

    /// Whether the request asks for a WebSocket (`Upgrade` lists `websocket`).
    pub(crate) fn wants_websocket(&self) -> bool {
        self.headers
            .get_all("upgrade")
            .any(|v| lists_token(v, b"websocket"))
    }

    /// Whether the connection may carry another request after this one is answered: an
    /// HTTP/1.1 request without `Connection: close` and without a body (which is never read).
    pub(crate) fn keep_alive(&self) -> bool {
        self.version == Version::HTTP_11 && !self.close && !self.has_body
    }
}

/// Whether `bytes` hold the end of a line followed by an empty one: the end of a head.
pub(crate) fn has_empty_line(bytes: &[u8]) -> bool {
    // Visits the line ends only (a dozen in a head), not every byte.
    memchr::memchr_iter(b'\n', bytes).any(|at| match bytes.get(at + 1) {
        Some(b'\n') => true,
        Some(b'\r') => bytes.get(at + 2) == Some(&b'\n'),
        _ => false,
    })
}

/// Checks the start of a head for what can already be wrong with it (garbage fails at once).
pub(crate) fn check_start(buf: &[u8]) -> Result<(), BadRequest> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::Request::new(&mut slots).parse(buf) {
        Ok(_) => Ok(()),
        Err(e) => Err(classify(e)),
    }
}

fn classify(e: httparse::Error) -> BadRequest {
    match e {
        httparse::Error::TooManyHeaders => BadRequest::TooManyHeaders,
        e => BadRequest::Malformed(e),
    }
}

/// Parses the head at the start of `buf`, which holds an empty line (see [`has_empty_line`]).
/// On success the bytes read are taken out of `buf`; the head is returned with the bytes that
/// came after it. `Ok(None)`: the empty line was not the end of a head (empty lines before a
/// request line are skipped), so `buf` is left as it was.
pub(crate) fn parse(buf: &mut BytesMut) -> Result<Option<(RequestHead, Bytes)>, BadRequest> {
    let read = buf.split().freeze();
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut slots);
    let len = match request.parse(&read) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Complete(_)) => return Err(BadRequest::TooLarge),
        Ok(httparse::Status::Partial) => {
            buf.extend_from_slice(&read);
            return Ok(None);
        }
        Err(e) => return Err(classify(e)),
    };
    // httparse has checked each part; the conversions below only re-state that for `http`.
    let malformed = BadRequest::Malformed;
    let method = request
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(malformed(httparse::Error::Token))?;
    let version = match request.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // httparse has checked every name and value; the fields are their spans in `read`.
    let headers =
        HeaderFields::from_spans(read.clone(), header_fields::spans(&read, request.headers));
    let target = request.path.unwrap_or("/");
    let head = RequestHead::checked(method, version, target, headers, len)?;
    Ok(Some((head, read.slice(len..))))
}

/// The head hyper's server has parsed (HTTP mode), with the fields, checks and routing of
/// [`parse`]: the method, the target (absolute-form as a whole URL, else its path and query)
/// and the fields as hyper keeps them (names in lower case, the values of a repeated name
/// together). Nothing is encoded or parsed again; the fields' bytes are copied once, into one
/// buffer. The head's own bytes are hyper's: [`RequestHead::raw`] is empty.
pub(crate) fn of_parts(
    method: &Method,
    version: Version,
    uri: &http::Uri,
    fields: &http::HeaderMap,
) -> Result<RequestHead, BadRequest> {
    if fields.len() > MAX_HEADERS {
        return Err(BadRequest::TooManyHeaders);
    }
    let absolute;
    let target = match uri.scheme() {
        Some(_) => {
            absolute = uri.to_string();
            absolute.as_str()
        }
        None => uri.path_and_query().map_or("/", |p| p.as_str()),
    };
    let version = match version {
        Version::HTTP_10 => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // As long as the head [`parse`] would have read: `METHOD target HTTP/1.x`, the fields
    // as `name: value` lines, the empty line.
    let lines: usize = fields
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if method.as_str().len() + target.len() + 11 + lines + 2 > MAX_HEAD {
        return Err(BadRequest::TooLarge);
    }
    let headers = HeaderFields::of_map(fields);
    RequestHead::checked(method.clone(), version, target, headers, 0)
}

impl RequestHead {
    /// A head of `method`, `version`, the request target `target` and `headers`, checked as
    /// every request head is: the target (origin or absolute form), `Content-Length`, `Host`.
    fn checked(
        method: Method,
        version: Version,
        target: &str,
        headers: HeaderFields,
        len: usize,
    ) -> Result<RequestHead, BadRequest> {
        let (target, authority) = split_target(target)?;
        let mut close = version == Version::HTTP_10;
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut hosts = 0;
        let mut host_field = None;
        for (i, (name, value)) in headers.iter().enumerate() {
            if is_name(name, "content-length") {
                for part in value.split(|b| *b == b',') {
                    let n = parse_length(part.trim_ascii()).ok_or(BadRequest::ContentLength)?;
                    if length.replace(n).is_some_and(|prior| prior != n) {
                        return Err(BadRequest::ContentLength);
                    }
                }
            } else if is_name(name, "transfer-encoding") {
                chunked = true;
            } else if is_name(name, "connection") {
                // HTTP/1.0 connections are closed after their answer whatever they ask for, so
                // only `close` matters here.
                close |= lists_token(value, b"close");
            } else if is_name(name, "host") {
                if hosts == 0 && header_fields::is_text_value(value) {
                    host_field = Some(i);
                }
                hosts += 1;
            }
        }
        match hosts {
            0 if version == Version::HTTP_11 && authority.is_none() => {
                return Err(BadRequest::Host("missing Host header"));
            }
            0 | 1 => {}
            _ => return Err(BadRequest::Host("more than one Host header")),
        }
        Ok(RequestHead {
            method,
            version,
            target,
            authority,
            headers,
            host_field,
            has_body: chunked || length.is_some_and(|n| n > 0),
            close,
            len,
        })
    }
}

/// The origin-form target of a request, and the authority if it came in absolute form.
fn split_target(target: &str) -> Result<(String, Option<String>), BadRequest> {
    let bad = || BadRequest::Target(target.chars().take(100).collect());
    // A fragment is never part of a request target (RFC 9112 §3.2); placed into an upstream
    // URL, it would cut it short.
    if target.contains('#') {
        return Err(bad());
    }
    if target.starts_with('/') {
        return Ok((target.to_owned(), None));
    }
    let uri: http::Uri = target.parse().map_err(|_| bad())?;
    match (uri.scheme(), uri.authority()) {
        // RFC 9110 §4.2.4: userinfo in an http(s) URI is an error; it would also be taken
        // for part of the host.
        (Some(_), Some(authority)) if authority.as_str().contains('@') => Err(bad()),
        (Some(_), Some(authority)) if authority.host().is_empty() => Err(bad()),
        (Some(_), Some(authority)) => {
            let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
            let path = if path.is_empty() { "/" } else { path };
            Ok((path.to_owned(), Some(authority.as_str().to_owned())))
        }
        _ => Err(bad()),
    }
}

/// Whether the comma-separated header value `value` lists `token`, in any case (as
/// `Connection: keep-alive, Upgrade` lists `upgrade`).
pub(crate) fn lists_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|listed| listed.trim_ascii().eq_ignore_ascii_case(token))
}

/// A `Content-Length` value: digits only.
pub(crate) fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Option<(RequestHead, Bytes)>, BadRequest> {
        parse(&mut BytesMut::from(text))
    }

    fn head(text: &str) -> RequestHead {
        parse_str(text).unwrap().unwrap().0
    }

    #[test]
    fn parses_an_upgrade_and_keeps_what_follows() {
        let (head, rest) = parse_str(
            "GET /chat/room?x=1&y=2 HTTP/1.1\r\nHost: gw.example\r\nUpgrade: websocket\r\n\
             X-Custom: a b\r\n\r\n\x01\x05hello",
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.path(), "/chat/room");
        assert_eq!(head.query(), Some("x=1&y=2"));
        assert_eq!(head.host(), Some("gw.example"));
        assert_eq!(head.headers.get("x-custom"), Some(&b"a b"[..]));
        assert!(head.keep_alive());
        assert_eq!(&rest[..], b"\x01\x05hello");
    }

    #[test]
    fn absolute_form_targets_give_path_and_authority() {
        let head = head("GET ws://gw.example:8080/a/b?q HTTP/1.1\r\n\r\n");
        assert_eq!(head.path(), "/a/b");
        assert_eq!(head.query(), Some("q"));
        assert_eq!(head.host(), Some("gw.example:8080"));
        // The target's authority wins over the Host header (RFC 9112 §3.2.2).
        let head = head_with_host();
        assert_eq!(head.host(), Some("gw.example"));
        assert_eq!(head.headers.get_str("host"), Some("other"));
        for bad in [
            "GET * HTTP/1.1\r\n\r\n",
            "GET http://user@gw.example/ HTTP/1.1\r\nHost: gw.example\r\n\r\n",
            "GET http://user:pw@gw.example/ HTTP/1.1\r\n\r\n",
            "GET /a#b HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /a?x=1#b HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            assert!(
                matches!(parse_str(bad), Err(BadRequest::Target(_))),
                "{bad}"
            );
        }
    }

    fn head_with_host() -> RequestHead {
        head("GET http://gw.example/ HTTP/1.1\r\nHost: other\r\n\r\n")
    }

    #[test]
    fn keep_alive_follows_version_connection_and_body() {
        assert!(
            !head("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, close\r\n\r\n").keep_alive()
        );
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive());
        // Only HTTP/1.1 connections are kept, whatever an HTTP/1.0 client asks for.
        assert!(!head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive());
        let with_body = head("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc");
        assert!(with_body.has_body && !with_body.keep_alive());
        assert!(!head("GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n").has_body);
        assert!(head("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n").has_body);
    }

    #[test]
    fn bad_heads_get_their_status() {
        for (text, status) in [
            ("\x16\x03\x01\x00garbage\r\n\r\n", StatusCode::BAD_REQUEST),
            (
                "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 2\r\n\r\n",
                StatusCode::BAD_REQUEST,
            ),
            (
                "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
                StatusCode::BAD_REQUEST,
            ),
            (
                "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
                StatusCode::BAD_REQUEST,
            ),
        ] {
            let e = parse_str(text).unwrap_err();
            assert_eq!(e.status(), status, "{text:?}: {e}");
        }
        let many = format!(
            "GET / HTTP/1.1\r\nHost: h\r\n{}\r\n",
            "X-A: 1\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(
            parse_str(&many).unwrap_err().status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert!(check_start(b"\x16\x03\x01").is_err());
        assert!(check_start(b"GET /pa").is_ok());
    }

    #[test]
    fn leading_empty_lines_are_not_a_head() {
        let mut buf = BytesMut::from("\r\n\r\n");
        assert!(parse(&mut buf).unwrap().is_none());
        assert_eq!(&buf[..], b"\r\n\r\n");
        buf.extend_from_slice(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(parse(&mut buf).unwrap().unwrap().0.path(), "/");
    }

    #[test]
    fn tokens_are_found_in_lists_in_any_case() {
        assert!(lists_token(b"keep-alive, Upgrade", b"upgrade"));
        assert!(lists_token(b" close ", b"close"));
        assert!(!lists_token(b"upgrades", b"upgrade"));
        assert!(!lists_token(b"", b"close"));
    }

    #[test]
    fn empty_lines_are_found_across_reads() {
        assert!(has_empty_line(b"\r\n\r\n"));
        assert!(has_empty_line(b"x\n\n"));
        assert!(!has_empty_line(b"GET / HTTP/1.1\r\nHost: a\r\n"));
        assert!(has_empty_line(b"GET / HTTP/1.1\r\nHost: a\n\r\nrest"));
        assert!(!has_empty_line(b"Host: a\r\n\r"));
        assert!(!has_empty_line(b"\n"));
        assert!(!has_empty_line(b""));
    }
}
