//! Test harness: the real gateway in-process on 127.0.0.1:0, real upstreams and real clients.
#![allow(dead_code)]
// tungstenite's handshake callback returns its large ErrorResponse by design.
#![allow(clippy::result_large_err)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use framegate::{Config, Gateway, Running};
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as HsRequest, Response as HsResponse,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

pub mod admin_http;
pub mod certs;
pub mod cli;
pub mod node;
pub mod redis;

/// A client-side WebSocket over plain TCP.
pub type Client = WebSocketStream<TcpStream>;
/// An upstream-side WebSocket over plain TCP.
pub type UpstreamWs = WebSocketStream<TcpStream>;

/// Upper bound for any single awaited event in tests, so a bug fails instead of hanging.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test if it takes longer than [`EVENT_TIMEOUT`].
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(EVENT_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Starts a gateway. `toml` holds routes (and optionally `[server]` keys via `server`); the
/// listen address is always 127.0.0.1:0.
pub async fn gateway(routes: &str) -> Running {
    gateway_with_server("", routes).await
}

/// Like [`gateway`], with extra `[server]` keys.
pub async fn gateway_with_server(server: &str, routes: &str) -> Running {
    init_logging();
    let toml = format!("[server]\nlisten = [\"127.0.0.1:0\"]\n{server}\n{routes}");
    let config =
        Config::from_toml(&toml, std::path::Path::new("test.toml")).expect("test config is valid");
    Gateway::new(config)
        .expect("gateway builds")
        .start()
        .await
        .expect("gateway starts")
}

/// A gateway started from `config.toml` in `dir`, written from `toml` (so that reloads read
/// that file again, and relative file names resolve in `dir`).
pub async fn start_from(dir: &TempDir, toml: &str) -> Running {
    init_logging();
    let path = dir.write("config.toml", toml);
    let config = Config::load(&path).expect("test config is valid");
    Gateway::new(config)
        .expect("gateway builds")
        .start()
        .await
        .expect("gateway starts")
}

/// Logs to the test's output, at `FRAMEGATE_LOG` (default `warn`); once per process.
fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("FRAMEGATE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// What an upstream saw of a handshake request.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Request target (path and query).
    pub uri: String,
    /// All request headers.
    pub headers: HeaderMap,
}

/// A scripted upstream: every accepted WebSocket is handed to `handler`; every handshake
/// request is reported on `requests`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub requests: mpsc::UnboundedReceiver<SeenRequest>,
}

/// Options for the upstream's handshake answer.
#[derive(Clone, Default)]
pub struct Answer {
    /// Extra response headers on the 101.
    pub headers: Vec<(&'static str, &'static str)>,
    /// Subprotocol to choose, if the client offered it.
    pub protocol: Option<&'static str>,
}

/// Starts an upstream that answers handshakes per `answer` and runs `handler` per connection.
pub async fn upstream<H, F>(answer: Answer, handler: H) -> Upstream
where
    H: Fn(UpstreamWs, SeenRequest) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, requests) = mpsc::unbounded_channel();
    let handler = std::sync::Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            let handler = handler.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut seen = None;
                let callback =
                    |req: &HsRequest, mut resp: HsResponse| -> Result<HsResponse, ErrorResponse> {
                        seen = Some(SeenRequest {
                            uri: req.uri().to_string(),
                            headers: req.headers().clone(),
                        });
                        for (k, v) in &answer.headers {
                            resp.headers_mut().append(*k, v.parse().unwrap());
                        }
                        if let Some(p) = answer.protocol {
                            resp.headers_mut()
                                .insert("sec-websocket-protocol", p.parse().unwrap());
                        }
                        Ok(resp)
                    };
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                let seen = seen.expect("callback ran");
                let _ = tx.send(seen.clone());
                handler(ws, seen).await;
            });
        }
    });
    Upstream { addr, requests }
}

/// An echo upstream (data messages come back; the close handshake is completed).
pub async fn echo() -> Upstream {
    upstream(Answer::default(), |mut ws, _| async move {
        while let Some(Ok(m)) = ws.next().await {
            if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// Serves WebSockets on `listener`: each connection gets `name` as its first message, then
/// its text messages echoed. Aborting the task ends the listener and every connection.
pub fn named_upstream(name: &'static str, listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            conns.spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let _ = ws.send(Message::text(name)).await;
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

/// An upstream that hands each connection to the test through a channel.
pub async fn captured() -> (Upstream, mpsc::UnboundedReceiver<UpstreamWs>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let up = upstream(Answer::default(), move |ws, _| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(ws);
        }
    })
    .await;
    (up, rx)
}

/// Opens a WebSocket through the gateway at `addr` + `path`.
pub async fn connect(addr: SocketAddr, path: &str) -> Client {
    connect_with(addr, path, &[])
        .await
        .expect("upgrade succeeds")
        .0
}

/// Opens a WebSocket with extra request headers; returns the socket and the 101 response, or
/// the handshake error (e.g. `Error::Http` with the refusal).
pub async fn connect_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Client, tungstenite::handshake::client::Response), tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut request: Request<()> = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let stream = TcpStream::connect(addr).await.unwrap();
    within(
        "client handshake",
        tokio_tungstenite::client_async(request, stream),
    )
    .await
}

/// A hyper HTTP/1.1 client connection to `addr`, its connection driven by a task of its own.
pub async fn http_client(
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<
    http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>,
> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// Runs `promtool check metrics` on a scrape and returns what it said; a missing promtool
/// fails the test with what to install.
pub fn promtool_check_metrics(text: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is needed for this test and could not be run ({e}): \
                 install the Debian package `prometheus` (apt-get install -y prometheus)"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Sends raw bytes as an HTTP request and returns the status code, the head and the body.
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    read_response(&mut stream).await
}

/// Reads one HTTP/1.1 response head and its Content-Length body.
pub async fn read_response(stream: &mut TcpStream) -> (u16, String, String) {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = within("response", stream.read(&mut chunk)).await.unwrap();
        assert!(
            n > 0,
            "connection closed before a full response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = within("response body", stream.read(&mut chunk))
            .await
            .unwrap();
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
    (status, head, body)
}

/// A hand-written upstream: reads each handshake request head and answers with the bytes
/// `answer` makes of it (given the `Sec-WebSocket-Accept` for its key), in one write, then holds
/// the connection open until the gateway closes it.
pub async fn raw_upstream<A>(answer: A) -> SocketAddr
where
    A: Fn(&str) -> Vec<u8> + Send + Sync + 'static,
{
    raw_upstream_then(answer, true).await
}

/// Like [`raw_upstream`], but the upstream hangs up right after its answer.
pub async fn raw_upstream_hanging_up<A>(answer: A) -> SocketAddr
where
    A: Fn(&str) -> Vec<u8> + Send + Sync + 'static,
{
    raw_upstream_then(answer, false).await
}

async fn raw_upstream_then<A>(answer: A, hold: bool) -> SocketAddr
where
    A: Fn(&str) -> Vec<u8> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                let key = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("sec-websocket-key")
                            .then(|| v.trim())
                    })
                    .unwrap_or_default();
                let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
                if stream.write_all(&answer(&accept)).await.is_err() || !hold {
                    return;
                }
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
            });
        }
    });
    addr
}

/// Reads a request head (up to its blank line) from `stream`; `None` when the peer closes
/// first. Bytes past the head in the same read are kept in the returned text.
pub async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    Some(String::from_utf8_lossy(&head).to_string())
}

/// An upstream's 101 head accepting the key whose accept value is `accept`.
pub fn switching_head(accept: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
}

/// A masked client frame: `first` is the first header byte (FIN and opcode); `long` writes the
/// length in the 16-bit form even when it would fit in 7 bits (allowed to parse, not to send).
pub fn masked_frame(first: u8, key: [u8; 4], payload: &[u8], long: bool) -> Vec<u8> {
    let mut frame = vec![first];
    if long || payload.len() >= 126 {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    } else {
        frame.push(0x80 | payload.len() as u8);
    }
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

/// A well-formed upgrade request for `path`, with extra header lines (each ending in \r\n).
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: gateway.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// The next message that is not a ping or pong.
pub async fn next_message(
    ws: &mut WebSocketStream<TcpStream>,
) -> Option<Result<Message, tungstenite::Error>> {
    loop {
        match within("next message", ws.next()).await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => return other,
        }
    }
}

/// Reads until a close frame arrives and returns it (panics on data or a plain end).
pub async fn expect_close(ws: &mut WebSocketStream<TcpStream>) -> CloseFrame {
    loop {
        match next_message(ws).await {
            Some(Ok(Message::Close(Some(frame)))) => return frame,
            Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
            Some(Ok(m)) if m.is_text() || m.is_binary() => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Builds a close frame.
pub fn close_frame(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    }
}

/// A TCP port on loopback with nothing listening.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Writes `lua` to a new file named after `name` in this process's folder under the temp dir
/// and returns its absolute path.
pub fn script_path(name: &str, lua: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("framegate-policies-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}-{name}", NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, lua).unwrap();
    path
}

/// Like [`script_path`], as a quoted TOML string.
pub fn script(name: &str, lua: &str) -> String {
    format!("{:?}", script_path(name, lua).display().to_string())
}

/// A `[[route]]` table to `ws://{upstream}/` with extra keys and `[route.policies]` entries
/// (`hook = quoted path`).
pub fn route(path: &str, upstream: SocketAddr, extra: &str, policies: &[(&str, &str)]) -> String {
    route_to(path, &format!("ws://{upstream}/"), extra, policies)
}

/// Like [`route`], to an upstream URL (which may use the path's placeholders).
pub fn route_to(path: &str, upstream: &str, extra: &str, policies: &[(&str, &str)]) -> String {
    let mut toml = format!("[[route]]\npath = \"{path}\"\nupstream = \"{upstream}\"\n{extra}\n");
    if !policies.is_empty() {
        toml.push_str("[route.policies]\n");
        for (hook, path) in policies {
            toml.push_str(&format!("{hook} = {path}\n"));
        }
    }
    toml
}

/// The next data message as text (panics on anything else).
pub async fn next_text(ws: &mut Client) -> String {
    match next_message(ws).await {
        Some(Ok(Message::Text(t))) => t.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// A folder of its own per test, removed when the test ends.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// Creates a fresh folder under the temp dir, unique to this process, `name` and moment.
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "framegate-test-{}-{name}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes a file in the folder and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
