//! Connecting to an upstream: TCP (or TLS for `wss://`), then the WebSocket client handshake
//! over hyper, so that a refusal's status, headers and body can be relayed to the client.
//!
//! Owns nothing of the client leg: it takes the headers to send and returns either an open
//! WebSocket with the upstream's 101 headers, or a typed error the proxy sorts into a status.

mod tls;

pub use tls::client_config;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// The socket under a WebSocket leg. After the upgrade, hyper's connection is taken apart
/// (`Upgraded::downcast`) so that its buffers are freed and reads and writes go straight to the
/// socket, without a boxed I/O object in between.
pub enum Io {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS to a `wss://` upstream.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
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
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
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

/// Takes hyper's upgraded connection apart into the socket and any bytes already read past the
/// handshake.
pub fn take_apart(upgraded: Upgraded) -> Result<Socket, UpstreamError> {
    let (io, pre_read) = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => (Io::Tcp(parts.io.into_inner()), parts.read_buf),
        Err(upgraded) => {
            match upgraded.downcast::<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>() {
                Ok(parts) => (Io::Tls(Box::new(parts.io.into_inner())), parts.read_buf),
                Err(_) => {
                    return Err(UpstreamError::BadHandshake(
                        "unexpected connection type after the upgrade".into(),
                    ))
                }
            }
        }
    };
    Ok(Socket { io, pre_read })
}

/// Bodies of refused handshakes are relayed up to this size.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

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
    /// The HTTP exchange failed (connection dropped, malformed response).
    #[error("upstream handshake failed: {0}")]
    Http(#[from] hyper::Error),
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
    pub headers: HeaderMap,
    /// The upstream's body (truncated to 64 KiB).
    pub body: Bytes,
}

/// An upstream that accepted the WebSocket handshake, and the headers of its 101 response.
pub struct Connected {
    /// The upstream's socket, ready for frames.
    pub socket: Socket,
    /// The upstream's 101 response headers.
    pub headers: HeaderMap,
}

/// Connects to `url` (`ws://` or `wss://`) and performs the client handshake, sending `headers`
/// (the per-leg handshake headers are added here). The caller bounds it with a timeout.
pub async fn connect(
    url: &str,
    mut headers: HeaderMap,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Connected, UpstreamError> {
    let bad = |reason: &str| UpstreamError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
    let secure = uri.scheme_str() == Some("wss");
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = format!("{host}:{port}");
    let tcp = TcpStream::connect((bare_host, port))
        .await
        .map_err(|source| UpstreamError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);

    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let key = generate_key();
    headers.insert(http::header::HOST, header_value(authority)?);
    headers.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    headers.insert(
        http::header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    headers.insert(http::header::SEC_WEBSOCKET_KEY, header_value(&key)?);
    let mut request = Request::get(target)
        .body(Empty::<Bytes>::new())
        .map_err(|e| bad(&e.to_string()))?;
    let offered = headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .cloned()
        .collect::<Vec<_>>();
    *request.headers_mut() = headers;

    let upgraded = if secure {
        let config = tls.ok_or_else(|| bad("no TLS configuration for this route"))?;
        let name = rustls::pki_types::ServerName::try_from(bare_host.to_owned())
            .map_err(|_| bad("host is not a valid TLS server name"))?;
        let stream = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| UpstreamError::Tls { addr, source })?;
        handshake(stream, request, &key, &offered).await?
    } else {
        handshake(tcp, request, &key, &offered).await?
    };
    let (io, headers) = upgraded;
    Ok(Connected {
        socket: take_apart(io)?,
        headers,
    })
}

/// Reads up to `limit` bytes of a body; a longer body is truncated, a failing one cut short.
async fn read_prefix(mut body: hyper::body::Incoming, limit: usize) -> Bytes {
    let mut collected = bytes::BytesMut::new();
    while collected.len() < limit {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let room = limit - collected.len();
                    collected.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            _ => break,
        }
    }
    collected.freeze()
}

fn header_value(s: &str) -> Result<HeaderValue, UpstreamError> {
    HeaderValue::from_str(s).map_err(|_| UpstreamError::BadUrl {
        url: s.to_owned(),
        reason: "not a valid header value".into(),
    })
}

/// Sends the upgrade request over `io` and waits for the upstream's answer.
async fn handshake<IO>(
    io: IO,
    request: Request<Empty<Bytes>>,
    key: &str,
    offered: &[HeaderValue],
) -> Result<(Upgraded, HeaderMap), UpstreamError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        // Ends with the upgrade (the I/O moves to `Upgraded`) or with an error seen by `send_request`.
        let _ = conn.with_upgrades().await;
    });
    let mut response = sender.send_request(request).await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let body = read_prefix(response.into_body(), MAX_REFUSAL_BODY).await;
        return Err(UpstreamError::Refused(Box::new(Refusal {
            status,
            headers,
            body,
        })));
    }
    let headers = response.headers();
    let accept = headers.get(http::header::SEC_WEBSOCKET_ACCEPT);
    if accept.map(|v| v.as_bytes()) != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
        return Err(UpstreamError::BadHandshake(
            "wrong or missing Sec-WebSocket-Accept".into(),
        ));
    }
    if let Some(chosen) = headers.get(http::header::SEC_WEBSOCKET_PROTOCOL) {
        let chosen = chosen.to_str().unwrap_or("").trim();
        let was_offered = offered.iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|p| p.trim() == chosen)
        });
        if !was_offered {
            return Err(UpstreamError::BadHandshake(format!(
                "upstream chose subprotocol {chosen:?}, which the client did not offer"
            )));
        }
    }
    let headers = headers.clone();
    let upgraded = hyper::upgrade::on(&mut response).await?;
    Ok((upgraded, headers))
}
