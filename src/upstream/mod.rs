//! Connecting to an upstream: TCP (or TLS for `wss://`), then the WebSocket client handshake,
//! written and read directly on the socket: one write for the request head, the answer parsed
//! as it arrives (see `response`), and a refusal's status, headers and body kept so that they
//! can be relayed to the client. No HTTP client sits in between, as one would cost a task,
//! channels and buffers per upgrade for an exchange that is over after one response.
//!
//! Owns nothing of the client leg but the socket types ([`Io`], [`Socket`]) both legs share.
//! [`connect`] takes the headers to send and returns either an open WebSocket with the
//! upstream's 101 headers, or a typed error the proxy sorts into a status.

pub mod pool;
pub(crate) mod response;
mod tls;

pub use response::BadResponse;
pub use tls::{client_config, pool_client_config};

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::header_fields::HeaderFields;
use response::Answer;

/// The socket under a WebSocket leg, either leg: reads and writes go straight to it, without a
/// boxed I/O object in between. Plain connections are `Tcp` on both legs, so the match costs
/// them nothing beyond the branch they always took.
pub enum Io {
    /// Plain TCP, either leg.
    Tcp(TcpStream),
    /// TLS to a `wss://` upstream.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// TLS from a client on a `[[server.tls]]` listener.
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::TlsServer(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::TlsServer(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Io::TlsServer(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
            Io::TlsServer(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
            Io::TlsServer(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::TlsServer(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A socket after its handshake, with any bytes already read past the handshake.
pub struct Socket {
    /// The socket.
    pub io: Io,
    /// Bytes that arrived with the handshake (the start of the first frames).
    pub pre_read: Bytes,
}

/// Why the upstream could not be reached or refused the WebSocket.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The URL could not be used (bad host or port after substitution).
    #[error("invalid upstream URL {url:?}: {reason}")]
    BadUrl {
        /// The URL after placeholder substitution.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// TCP connect failed (refused, unreachable, name not resolved).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// host:port that was tried.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS handshake with a `wss://` upstream failed.
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        /// host:port that was tried.
        addr: String,
        /// The I/O error carrying the TLS alert.
        source: std::io::Error,
    },
    /// Sending the upgrade request or reading the answer failed (connection reset, …).
    #[error("upstream handshake failed: {0}")]
    Exchange(#[source] std::io::Error),
    /// The upstream's answer was not a valid HTTP/1.x response, or stopped short of its head.
    #[error("upstream sent a bad response: {0}")]
    BadResponse(#[from] BadResponse),
    /// The upstream answered the upgrade with a status other than 101.
    #[error("upstream refused the upgrade with {}", .0.status)]
    Refused(Box<Refusal>),
    /// The upstream sent 101 but broke the WebSocket handshake rules.
    #[error("upstream handshake invalid: {0}")]
    BadHandshake(String),
}

/// An upstream's non-101 answer to the upgrade, relayed to the client as it is.
#[derive(Debug)]
pub struct Refusal {
    /// The upstream's status.
    pub status: StatusCode,
    /// The upstream's headers.
    pub headers: HeaderFields,
    /// The upstream's body, truncated to 64 KiB (and cut short if the upstream broke off).
    pub body: Bytes,
}

/// An upstream that accepted the WebSocket handshake, and the headers of its 101 response.
pub struct Connected {
    /// The upstream's socket, ready for frames.
    pub socket: Socket,
    /// The upstream's 101 response headers.
    pub headers: HeaderFields,
}

/// The WebSocket key to send upstream, and the `Sec-WebSocket-Accept` the upstream must answer.
#[derive(Debug, Clone, Copy)]
pub struct Key<'a> {
    /// `Sec-WebSocket-Key`: the client's own, passed on as NGINX and HAProxy do, so that one
    /// key and one accept value serve both legs.
    pub key: &'a str,
    /// The accept value derived from `key` (RFC 6455 §4.2.2), computed once for both legs.
    pub accept: &'a str,
}

/// Connects to `url` (`ws://` or `wss://`) and performs the client handshake, sending `headers`
/// (the per-leg handshake headers are added here) and `key`. The caller bounds it with a
/// timeout.
pub async fn connect(
    url: &str,
    header_lines: Vec<u8>,
    key: Key<'_>,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Connected, UpstreamError> {
    connect_named(url, header_lines, key, tls, None).await
}

/// [`connect`], with the TLS server name (SNI, and the name the certificate must carry) set
/// to `server_name` instead of the URL's host: a pool's `[upstream.tls] server_name`.
pub async fn connect_named(
    url: &str,
    header_lines: Vec<u8>,
    key: Key<'_>,
    tls: Option<&Arc<rustls::ClientConfig>>,
    server_name: Option<&str>,
) -> Result<Connected, UpstreamError> {
    let bad = |reason: &str| UpstreamError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let Target {
        secure,
        authority,
        host: bare_host,
        port,
        path_and_query: target,
    } = Target::of(url).map_err(bad)?;
    if !is_header_value(authority) {
        return Err(bad("the host is not a valid header value"));
    }
    let request = request_head(&target, authority, key.key, &header_lines);
    let name = server_name.unwrap_or(bare_host);
    let mut io = dial(secure, (bare_host, name), port, tls, bad).await?;
    let (headers, pre_read) = handshake(&mut io, &request, key.accept, &header_lines).await?;
    Ok(Connected {
        socket: Socket { io, pre_read },
        headers,
    })
}

/// Opens the socket to an upstream: TCP, then TLS with `tls` when `secure` (`wss://`, or
/// `https://` for the HTTP proxy), the certificate checked for `server_name` or else
/// `bare_host`. `url` is for errors only. The caller bounds it with a timeout.
pub(crate) async fn open(
    url: &str,
    secure: bool,
    bare_host: &str,
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
    server_name: Option<&str>,
) -> Result<Io, UpstreamError> {
    let bad = |reason: &str| UpstreamError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let name = server_name.unwrap_or(bare_host);
    dial(secure, (bare_host, name), port, tls, bad).await
}

/// A plain HTTP/1.1 `GET path` to the endpoint `url` (`ws://` as `http://`, `wss://` as
/// `https://`): the status of its answer, for active health checks. The caller bounds it.
pub async fn http_get_status(
    url: &str,
    path: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    server_name: Option<&str>,
) -> Result<StatusCode, UpstreamError> {
    let bad = |reason: &str| UpstreamError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let target = Target::of(url).map_err(bad)?;
    let name = server_name.unwrap_or(target.host);
    let mut io = dial(target.secure, (target.host, name), target.port, tls, bad).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: framegate-health\r\nConnection: close\r\n\r\n",
        target.authority
    );
    io.write_all(request.as_bytes())
        .await
        .map_err(UpstreamError::Exchange)?;
    io.flush().await.map_err(UpstreamError::Exchange)?;
    match response::read(&mut io).await? {
        Answer::Refused(answer) => Ok(answer.status),
        Answer::Switching { .. } => Ok(StatusCode::SWITCHING_PROTOCOLS),
    }
}

/// TCP to `host:port`, then TLS when `secure`, checking the certificate for `name`.
async fn dial(
    secure: bool,
    (bare_host, name): (&str, &str),
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
    bad: impl Fn(&str) -> UpstreamError,
) -> Result<Io, UpstreamError> {
    let addr = || match bare_host.contains(':') {
        true => format!("[{bare_host}]:{port}"),
        false => format!("{bare_host}:{port}"),
    };
    let tcp = TcpStream::connect((bare_host, port))
        .await
        .map_err(|source| UpstreamError::Connect {
            addr: addr(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(if secure {
        let config = tls.ok_or_else(|| bad("no TLS configuration for this route"))?;
        let name = rustls::pki_types::ServerName::try_from(name.to_owned())
            .map_err(|_| bad("host is not a valid TLS server name"))?;
        // Boxed: the TLS handshake's state is large, and inline it would size the HTTP
        // phase of every connection, `ws://` upstreams included.
        let stream = Box::pin(tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp))
            .await
            .map_err(|source| UpstreamError::Tls {
                addr: addr(),
                source,
            })?;
        Io::Tls(Box::new(stream))
    } else {
        Io::Tcp(tcp)
    })
}

/// What the upstream handshake (and the HTTP proxy) needs of a `ws://` or `wss://` URL.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Target<'a> {
    /// `wss://`.
    pub(crate) secure: bool,
    /// Host and port as written, for `Host`.
    pub(crate) authority: &'a str,
    /// The host to connect to, without an IPv6 address's brackets.
    pub(crate) host: &'a str,
    pub(crate) port: u16,
    /// The request target: path and query, `/` if the URL has no path.
    pub(crate) path_and_query: std::borrow::Cow<'a, str>,
}

impl<'a> Target<'a> {
    /// Splits `url`: the configuration or `req:set_upstream` has checked it with
    /// `http::Uri`, which this split agrees with. (Parsing it again with `http::Uri` for each
    /// connection copied it and cost about 1,300 instructions.)
    pub(crate) fn of(url: &'a str) -> Result<Target<'a>, &'static str> {
        // Byte searches only: `str`'s pattern searches cost several hundred instructions here.
        let scheme = |prefix: &str| {
            url.get(..prefix.len())
                .filter(|s| s.eq_ignore_ascii_case(prefix))
                .map(|_| &url[prefix.len()..])
        };
        let (secure, rest) = match (scheme("wss://"), scheme("ws://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            _ => return Err("not a ws:// or wss:// URL"),
        };
        let end = rest.bytes().position(|b| b == b'/' || b == b'?');
        let (authority, path) = rest.split_at(end.unwrap_or(rest.len()));
        if !path.bytes().all(|b| b.is_ascii_graphic() || b >= 0x80) || path.contains('#') {
            return Err("the path is not a valid request target");
        }
        let path_and_query = match path {
            "" => "/".into(),
            query if query.starts_with('?') => format!("/{query}").into(),
            path => path.into(),
        };
        // Credentials, if any, are not part of the host.
        let at = authority.bytes().rposition(|b| b == b'@');
        let host_port = at.map_or(authority, |at| &authority[at + 1..]);
        let (host, port) = match host_port.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or("unclosed '[' in the host")?;
                (host, after.strip_prefix(':'))
            }
            None => match host_port.bytes().rposition(|b| b == b':') {
                Some(colon) => (&host_port[..colon], Some(&host_port[colon + 1..])),
                None => (host_port, None),
            },
        };
        if host.is_empty() {
            return Err("no host");
        }
        let port = match port {
            None | Some("") => {
                if secure {
                    443
                } else {
                    80
                }
            }
            Some(digits) => digits.parse().map_err(|_| "the port is not a number")?,
        };
        Ok(Target {
            secure,
            authority,
            host,
            port,
            path_and_query,
        })
    }
}

/// Whether `s` can be sent as a header value as it is (visible ASCII, spaces and tabs).
pub(crate) fn is_header_value(s: &str) -> bool {
    crate::header_fields::is_text_value(s.as_bytes())
}

/// The upgrade request's head, whole, so that it goes out in one write: the request line,
/// `Host`, the header `lines` (`name: value\r\n` each, without per-leg headers; see
/// `proxy::headers::upstream_request`), and the gateway's own per-leg headers.
fn request_head(target: &str, host: &str, key: &str, lines: &[u8]) -> Vec<u8> {
    let mut head = Vec::with_capacity(160 + target.len() + host.len() + lines.len());
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    head.extend_from_slice(host.as_bytes());
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(lines);
    head.extend_from_slice(
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: ",
    );
    head.extend_from_slice(key.as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    head
}

/// Sends the upgrade request over `io` and reads the upstream's answer. On 101, returns its
/// headers and the bytes that came after them.
async fn handshake<IO>(
    io: &mut IO,
    request: &[u8],
    accept: &str,
    sent: &[u8],
) -> Result<(HeaderFields, Bytes), UpstreamError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    io.write_all(request)
        .await
        .map_err(UpstreamError::Exchange)?;
    // TCP sends at once; TLS may hold the last record until flushed.
    io.flush().await.map_err(UpstreamError::Exchange)?;
    match response::read(io).await? {
        Answer::Refused(refusal) => Err(UpstreamError::Refused(Box::new(refusal))),
        Answer::Switching { headers, rest } => {
            check_accept(&headers, accept, sent)?;
            Ok((headers, rest))
        }
    }
}

/// The values of header `name` (lower case) among header `lines` as they were sent
/// (`name: value\r\n` each).
fn values_in_lines<'a>(lines: &'a [u8], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    lines.split(|b| *b == b'\n').filter_map(move |line| {
        let line = line.strip_suffix(b"\r")?;
        let colon = line.iter().position(|b| *b == b':')?;
        let (n, v) = line.split_at(colon);
        n.eq_ignore_ascii_case(name.as_bytes())
            .then(|| v[1..].trim_ascii())
    })
}

/// Checks a 101 against the accept value expected for the key sent and against the
/// subprotocols offered (RFC 6455 §4.1).
fn check_accept(headers: &HeaderFields, expected: &str, sent: &[u8]) -> Result<(), UpstreamError> {
    if headers.get("sec-websocket-accept") != Some(expected.as_bytes()) {
        return Err(UpstreamError::BadHandshake(
            "wrong or missing Sec-WebSocket-Accept".into(),
        ));
    }
    if let Some(chosen) = headers.get("sec-websocket-protocol") {
        let chosen = chosen.trim_ascii();
        let was_offered = values_in_lines(sent, "sec-websocket-protocol")
            .any(|v| v.split(|b| *b == b',').any(|p| p.trim_ascii() == chosen));
        if !was_offered {
            return Err(UpstreamError::BadHandshake(format!(
                "upstream chose subprotocol {:?}, which the client did not offer",
                String::from_utf8_lossy(chosen)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_as_http_uri_splits_them() {
        for url in [
            "ws://127.0.0.1:9001/chat?room=a&x=1",
            "wss://backend.internal/ws",
            "ws://backend",
            "WS://Backend:80",
            "ws://[::1]:9001/a/b",
            "wss://[fe80::1]/",
            "ws://user:pw@host:1234/p",
            "ws://host:/p",
            "ws://host/caf\u{e9}/%20x",
        ] {
            let uri: http::Uri = url.parse().unwrap();
            let target = Target::of(url).unwrap();
            let secure = uri.scheme_str().unwrap().eq_ignore_ascii_case("wss");
            assert_eq!(target.secure, secure, "{url}");
            let host = uri.host().unwrap();
            assert_eq!(
                target.host,
                host.trim_start_matches('[').trim_end_matches(']')
            );
            let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
            assert_eq!(target.port, port, "{url}");
            assert_eq!(target.authority, uri.authority().unwrap().as_str(), "{url}");
            let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
            assert_eq!(target.path_and_query, pq, "{url}");
        }
        assert_eq!(Target::of("ws://h?x=1").unwrap().path_and_query, "/?x=1");
        for bad in [
            "http://h/",
            "ws:/h",
            "ws://",
            "ws://:80/",
            "ws://h:x/",
            "ws://[::1/",
            "ws://h/a b",
            "ws://h/a#f",
        ] {
            assert!(Target::of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_are_found_in_header_lines_in_any_case() {
        let lines = b"x-a: 1\r\nsec-websocket-protocol:  chat \r\nSec-WebSocket-Protocol: b\r\n";
        let found: Vec<_> = values_in_lines(lines, "sec-websocket-protocol").collect();
        assert_eq!(found, [&b"chat"[..], b"b"]);
    }
}
