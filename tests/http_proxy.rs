//! HTTP on WebSocket routes (`route.http = "proxy"`): plain HTTP requests proxied to the
//! route's upstream with hyper on both sides. A real gateway, a real hyper upstream (which also
//! takes WebSocket upgrades, for the connection that upgrades after HTTP) and raw TCP or hyper
//! clients.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use support::http_client as client;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

type Body = BoxBody<Bytes, Infallible>;

fn text(body: impl Into<String>) -> Response<Body> {
    Response::new(Full::new(Bytes::from(body.into())).boxed())
}

/// What the test upstream was asked, for the tests to look at.
struct Seen {
    method: String,
    uri: String,
    headers: http::HeaderMap,
}

/// The test upstream: a hyper HTTP/1.1 server.
/// - `/count`: reads the body and answers its length (`progress` gets each frame's size);
/// - `/stream?n=N`: N bytes in 64 KiB frames, sent through a channel of one frame, so that
///   `sent` counts what hyper has taken;
/// - `/events`: server-sent events, one per message on `events`, until it closes;
/// - WebSocket upgrades: an echo;
/// - anything else: `method path` as text.
struct HttpUpstream {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
    connections: Arc<AtomicUsize>,
    progress: mpsc::UnboundedReceiver<usize>,
    sent: Arc<AtomicUsize>,
    events: mpsc::UnboundedSender<String>,
}

async fn http_upstream() -> HttpUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let (progress_tx, progress) = mpsc::unbounded_channel();
    let (events, events_rx) = mpsc::unbounded_channel::<String>();
    let events_rx = Arc::new(tokio::sync::Mutex::new(events_rx));
    let connections = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let (c, s) = (connections.clone(), sent.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let (seen_tx, progress_tx, sent, events_rx) = (
                seen_tx.clone(),
                progress_tx.clone(),
                s.clone(),
                events_rx.clone(),
            );
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (seen_tx, progress_tx, sent, events_rx) = (
                    seen_tx.clone(),
                    progress_tx.clone(),
                    sent.clone(),
                    events_rx.clone(),
                );
                async move {
                    let _ = seen_tx.send(Seen {
                        method: req.method().to_string(),
                        uri: req.uri().to_string(),
                        headers: req.headers().clone(),
                    });
                    Ok::<_, Infallible>(answer(req, progress_tx, sent, events_rx).await)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    HttpUpstream {
        addr,
        seen,
        connections,
        progress,
        sent,
        events,
    }
}

async fn answer(
    mut req: Request<Incoming>,
    progress: mpsc::UnboundedSender<usize>,
    sent: Arc<AtomicUsize>,
    events: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>>,
) -> Response<Body> {
    if let Some(key) = req.headers().get("sec-websocket-key") {
        let accept = derive_accept_key(key.as_bytes());
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let io = TokioIo::new(upgrade.await.unwrap());
            let mut ws =
                tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_text() || msg.is_binary() {
                    let _ = ws.send(msg).await;
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-accept", accept)
            .body(Full::new(Bytes::new()).boxed())
            .unwrap();
    }
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/count" => {
            let mut body = req.into_body();
            let mut total = 0;
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    total += data.len();
                    let _ = progress.send(data.len());
                }
            }
            text(total.to_string())
        }
        "/stream" => {
            let n: usize = req.uri().query().unwrap()[2..].parse().unwrap();
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let mut left = n;
                while left > 0 {
                    let part = chunk.slice(..left.min(chunk.len()));
                    left -= part.len();
                    let len = part.len();
                    if tx.send(Ok(Frame::data(part))).await.is_err() {
                        return;
                    }
                    sent.fetch_add(len, Ordering::SeqCst);
                }
            });
            let stream = tokio_stream_of(rx);
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        "/events" => {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            tokio::spawn(async move {
                let mut events = events.lock().await;
                while let Some(event) = events.recv().await {
                    let frame = Frame::data(Bytes::from(format!("data: {event}\n\n")));
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("connection", "keep-alive, x-hop")
                .header("x-hop", "secret")
                .body(BodyExt::boxed(StreamBody::new(tokio_stream_of(rx))))
                .unwrap()
        }
        _ => text(format!("{} {}", req.method(), req.uri())),
    }
}

/// A stream of an mpsc receiver's items.
fn tokio_stream_of<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
}

/// A route with `http = "proxy"` to the same path on `upstream` (`/` for a template).
fn proxy_route(path: &str, upstream: SocketAddr, extra: &str) -> String {
    let upstream_path = if path.contains('{') { "/" } else { path };
    route_to(
        path,
        &format!("ws://{upstream}{upstream_path}"),
        &format!("http = \"proxy\"\n{extra}"),
        &[],
    )
}

fn get(path: &str) -> Request<BoxBody<Bytes, Infallible>> {
    Request::get(path)
        .header("host", "gateway.test")
        .body(Full::new(Bytes::new()).boxed())
        .unwrap()
}

async fn body_text(response: Response<Incoming>) -> String {
    let bytes = within("a response body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn requests_keep_alive_and_carry_forwarded_headers_without_hop_by_hop_ones() {
    let mut up = http_upstream().await;
    let gw = gateway(&proxy_route("/api/{*rest}", up.addr, "")).await;
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    let request = "GET /api/a?x=1 HTTP/1.1\r\nHost: gateway.test\r\nConnection: keep-alive, X-Private\r\n\
                   X-Private: 1\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 10.0.0.1\r\nAuthorization: Bearer t\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!((status, body.as_str()), (200, "GET /?x=1"));
    let seen = within("the upstream request", up.seen.recv())
        .await
        .unwrap();
    assert_eq!(seen.method, "GET");
    let h = &seen.headers;
    assert_eq!(h["host"], up.addr.to_string());
    assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "gateway.test");
    assert_eq!(h["authorization"], "Bearer t");
    for gone in ["x-private", "keep-alive", "upgrade"] {
        assert!(h.get(gone).is_none(), "{gone} went upstream");
    }
    // The same client connection, and the same upstream connection.
    stream
        .write_all(b"GET /api/b HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!((status, body.as_str()), (200, "GET /"));
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    let seen = within("the upstream request", up.seen.recv())
        .await
        .unwrap();
    assert_eq!(seen.uri, "/");
    gw.shutdown().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = http_upstream().await;
    let upstream_path = format!("ws://{}/n/{{n}}", up.addr);
    let gw = gateway(&route_to("/p/{n}", &upstream_path, "http = \"proxy\"", &[])).await;
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    let mut all = String::new();
    for n in 1..=5 {
        all.push_str(&format!("GET /p/{n} HTTP/1.1\r\nHost: g\r\n\r\n"));
    }
    stream.write_all(all.as_bytes()).await.unwrap();
    for n in 1..=5 {
        let (status, _, body) = read_response(&mut stream).await;
        assert_eq!((status, body), (200, format!("GET /n/{n}")));
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn request_bodies_stream_with_content_length_and_chunked() {
    let mut up = http_upstream().await;
    let gw = gateway(&proxy_route("/count", up.addr, "")).await;
    let mut sender = client(gw.local_addr()).await;

    // Content-Length: sent as it is.
    let body = Full::new(Bytes::from(vec![7u8; 300_000])).boxed();
    let request = Request::post("/count")
        .header("host", "g")
        .body(body)
        .unwrap();
    let response = within("a response", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(body_text(response).await, "300000");
    let seen = within("the upstream request", up.seen.recv())
        .await
        .unwrap();
    assert_eq!(seen.headers["content-length"], "300000");
    while up.progress.try_recv().is_ok() {}

    // Chunked, streamed: the upstream has each part before the client sends the next.
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let request = Request::post("/count")
        .header("host", "g")
        .body(BodyExt::boxed(StreamBody::new(tokio_stream_of(rx))))
        .unwrap();
    let response = tokio::spawn(sender.send_request(request));
    for _ in 0..4 {
        tx.send(Ok(Frame::data(Bytes::from(vec![1u8; 100_000]))))
            .await
            .unwrap();
        let mut got = 0;
        while got < 100_000 {
            got += within("the part upstream", up.progress.recv())
                .await
                .unwrap();
        }
    }
    drop(tx);
    let response = within("a response", response).await.unwrap().unwrap();
    assert_eq!(body_text(response).await, "400000");
    let seen = within("the upstream request", up.seen.recv())
        .await
        .unwrap();
    assert_eq!(seen.headers["transfer-encoding"], "chunked");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_large_response_streams_with_backpressure() {
    let up = http_upstream().await;
    let gw = gateway(&proxy_route("/stream", up.addr, "")).await;
    let total = 256 << 20;
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    stream
        .write_all(format!("GET /stream?n={total} HTTP/1.1\r\nHost: g\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // The client reads nothing: the upstream's body stops moving once the sockets' buffers
    // and hyper's are full, far short of the whole body.
    let mut last = usize::MAX;
    loop {
        let before = up.sent.load(Ordering::SeqCst);
        let moved = async {
            while up.sent.load(Ordering::SeqCst) == before {
                tokio::task::yield_now().await;
            }
        };
        if tokio::time::timeout(std::time::Duration::from_millis(300), moved)
            .await
            .is_err()
            && before == last
        {
            break;
        }
        last = up.sent.load(Ordering::SeqCst);
    }
    eprintln!("the upstream stalled after {last} bytes, the client reading nothing");
    assert!(
        last < 64 << 20,
        "{last} bytes left the upstream though the client read nothing"
    );
    // Then all of it arrives.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while got < total {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("the whole body within a minute")
            .unwrap();
        assert!(n > 0, "closed after {got} bytes");
        got += n;
    }
    assert!(got >= total);
    gw.shutdown().await;
}

#[tokio::test]
async fn bodies_over_max_body_size_get_413() {
    let mut up = http_upstream().await;
    let gw = gateway(&proxy_route("/count", up.addr, "max_body_size = \"64KiB\"")).await;
    // By Content-Length: at once, before any body byte.
    let (status, _, body) = raw_http(
        gw.local_addr(),
        "POST /count HTTP/1.1\r\nHost: g\r\nContent-Length: 1000000\r\n\r\n",
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("max_body_size"), "{body}");

    // Chunked: while streaming, once past the limit.
    let mut sender = client(gw.local_addr()).await;
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let request = Request::post("/count")
        .header("host", "g")
        .body(BodyExt::boxed(StreamBody::new(tokio_stream_of(rx))))
        .unwrap();
    let response = tokio::spawn(sender.send_request(request));
    for _ in 0..3 {
        if tx
            .send(Ok(Frame::data(Bytes::from(vec![1u8; 40_000]))))
            .await
            .is_err()
        {
            break;
        }
    }
    let response = within("a response", response).await.unwrap().unwrap();
    assert_eq!(response.status(), 413);
    drop(tx);
    // Under the limit, it passes.
    let mut sender = client(gw.local_addr()).await;
    let request = Request::post("/count")
        .header("host", "g")
        .body(Full::new(Bytes::from(vec![0u8; 60_000])).boxed())
        .unwrap();
    let response = within("a response", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(body_text(response).await, "60000");
    while up.seen.try_recv().is_ok() {}
    gw.shutdown().await;
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let up = http_upstream().await;
    let gw = gateway(&proxy_route("/events", up.addr, "")).await;
    let mut sender = client(gw.local_addr()).await;
    let response = within("the response head", sender.send_request(get("/events")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(response.headers().get("x-hop").is_none());
    let mut body = response.into_body();
    for n in 0..3 {
        up.events.send(format!("event {n}")).unwrap();
        let frame = within("an event", body.frame()).await.unwrap().unwrap();
        let data = frame.into_data().unwrap();
        assert_eq!(&data[..], format!("data: event {n}\n\n").as_bytes());
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn an_upstream_that_is_down_gets_502() {
    let port = closed_port().await;
    let gw = gateway(&proxy_route("/api", port, "")).await;
    let (status, _, body) = raw_http(
        gw.local_addr(),
        "GET /api HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 502, "{body}");
    gw.shutdown().await;
}

#[tokio::test]
async fn on_upgrade_guards_http_requests_with_req_upgrade_false() {
    let mut up = http_upstream().await;
    let policy = script(
        "http_guard.lua",
        r#"
return function(req, ctx)
  if req.headers["authorization"] ~= "Bearer ok" then
    return req:reject(401, "token required", { ["WWW-Authenticate"] = "Bearer" })
  end
  req:set_header("x-upgrade", tostring(req.upgrade))
  req:set_header("x-method", req.method)
  req:set_header("authorization", nil)
end
"#,
    );
    let gw = gateway(&route(
        "/api",
        up.addr,
        "http = \"proxy\"",
        &[("on_upgrade", &policy)],
    ))
    .await;
    let (status, head, body) = raw_http(
        gw.local_addr(),
        "POST /api HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\n\r\nhi",
    )
    .await;
    assert_eq!(status, 401, "{head}{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
    assert_eq!(body, "token required");
    let (status, _, body) = raw_http(
        gw.local_addr(),
        "POST /api HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer ok\r\nContent-Length: 2\r\n\r\nhi",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "POST /"));
    let seen = within("the upstream request", up.seen.recv())
        .await
        .unwrap();
    assert_eq!(seen.headers["x-upgrade"], "false");
    assert_eq!(seen.headers["x-method"], "POST");
    assert!(seen.headers.get("authorization").is_none());
    gw.shutdown().await;
}

#[tokio::test]
async fn a_route_without_http_still_answers_426() {
    let up = http_upstream().await;
    let gw = gateway(&route("/ws", up.addr, "", &[])).await;
    let (status, head, _) = raw_http(gw.local_addr(), "GET /ws HTTP/1.1\r\nHost: g\r\n\r\n").await;
    assert_eq!(status, 426, "{head}");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_connection_in_http_mode_can_upgrade_and_relay() {
    let mut up = http_upstream().await;
    let mark = script(
        "http_mark.lua",
        "return function(req, ctx)\n  req:set_header(\"x-upgrade\", tostring(req.upgrade))\nend\n",
    );
    let gw = gateway(&route_to(
        "/both",
        &format!("ws://{}/both", up.addr),
        "http = \"proxy\"",
        &[("on_upgrade", &mark)],
    ))
    .await;
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    stream
        .write_all(b"GET /both?poll=1 HTTP/1.1\r\nHost: g\r\n\r\n")
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!((status, body.as_str()), (200, "GET /both?poll=1"));
    // The next request on the same connection asks for the WebSocket.
    let (mut ws, response) = within(
        "the upgrade",
        tokio_tungstenite::client_async("ws://g/both", stream),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hello");
    ws.close(None).await.unwrap();
    // The same policy saw both: the HTTP request, then the upgrade.
    for upgrade in ["false", "true"] {
        let seen = within("the upstream request", up.seen.recv())
            .await
            .unwrap();
        assert_eq!(seen.headers["x-upgrade"], upgrade);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn http_requests_are_counted_by_route_and_status() {
    let up = http_upstream().await;
    let gw = gateway(&proxy_route("/m", up.addr, "")).await;
    let (status, _, _) = raw_http(gw.local_addr(), "GET /m HTTP/1.1\r\nHost: g\r\n\r\n").await;
    assert_eq!(status, 200);
    let metrics = gw.metrics().encode();
    assert!(
        metrics.contains(r#"framegate_http_requests_total{route="/m",status="200"} 1"#),
        "{metrics}"
    );
    gw.shutdown().await;
}

/// Reads until the gateway closes `stream`, within the tests' event timeout.
async fn closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    within("the gateway closing the connection", async {
        while !matches!(stream.read(&mut buf).await, Ok(0) | Err(_)) {}
    })
    .await;
}

#[tokio::test]
async fn keepalive_timeout_closes_an_idle_connection_but_not_one_with_a_response_going() {
    let up = http_upstream().await;
    let gw = gateway_with_server(
        "keepalive_timeout = \"300ms\"\n",
        &[
            proxy_route("/events", up.addr, ""),
            proxy_route("/a", up.addr, ""),
            proxy_route("/count", up.addr, ""),
        ]
        .concat(),
    )
    .await;
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    stream
        .write_all(b"GET /a HTTP/1.1\r\nHost: g\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200);
    let idle_from = tokio::time::Instant::now();
    closed(&mut stream).await;
    assert!(idle_from.elapsed() >= std::time::Duration::from_millis(250));

    // A request whose body takes longer than keepalive_timeout is not cut; once it is
    // answered, the connection is idle and closed.
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    stream
        .write_all(b"POST /count HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    stream.write_all(b"2\r\nhi\r\n0\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200);
    closed(&mut stream).await;

    // An event stream quieter than keepalive_timeout stays open.
    let mut sender = client(gw.local_addr()).await;
    let response = within("the response head", sender.send_request(get("/events")))
        .await
        .unwrap();
    let mut body = response.into_body();
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(700), body.frame()).await;
    assert!(quiet.is_err(), "the event stream ended: {quiet:?}");
    up.events.send("late".into()).unwrap();
    let frame = within("an event", body.frame()).await.unwrap().unwrap();
    assert_eq!(&frame.into_data().unwrap()[..], b"data: late\n\n");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_request_head_that_trickles_in_is_cut_after_keepalive_and_header_read_timeout() {
    let up = http_upstream().await;
    let gw = gateway_with_server(
        "keepalive_timeout = \"300ms\"\nheader_read_timeout = \"300ms\"\n",
        &proxy_route("/a", up.addr, ""),
    )
    .await;
    let stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(b"GET /a HTTP/1.1\r\nHost: g\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 1024];
    let n = within("the first response", reader.read(&mut head))
        .await
        .unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &head[..n]);
    // The next head comes a byte at a time, each within keepalive_timeout: the connection is
    // never idle, but its head is late once keepalive_timeout and header_read_timeout have
    // passed since the response.
    let free_from = tokio::time::Instant::now();
    let trickle = tokio::spawn(async move {
        for byte in b"GET /a HTTP/1.1\r\nHost: g\r\nX-Slow: ".iter().cycle() {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    let mut rest = Vec::new();
    within("the gateway closing the connection", async {
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = reader.read(&mut buf).await {
            rest.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let after = free_from.elapsed();
    assert!(rest.is_empty(), "answered: {rest:?}");
    assert!(
        after >= std::time::Duration::from_millis(550),
        "cut after {after:?}"
    );
    trickle.abort();
    gw.shutdown().await;
}

#[tokio::test]
async fn keepalive_requests_bounds_the_requests_on_one_connection() {
    let up = http_upstream().await;
    let gw = gateway_with_server("keepalive_requests = 2\n", &proxy_route("/a", up.addr, "")).await;
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    for n in 1..=2 {
        stream
            .write_all(b"GET /a HTTP/1.1\r\nHost: g\r\n\r\n")
            .await
            .unwrap();
        let (status, head, _) = read_response(&mut stream).await;
        assert_eq!(status, 200);
        // The first request was read by the listener, the second by hyper: together, two.
        assert_eq!(
            head.to_ascii_lowercase().contains("connection: close"),
            n == 2,
            "{head}"
        );
    }
    closed(&mut stream).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_connection_in_http_mode_holds_its_slot_until_it_closes() {
    let up = http_upstream().await;
    let gw = gateway_with_server(
        "max_connections = 1\nqueue_timeout = \"200ms\"\n",
        &proxy_route("/a", up.addr, ""),
    )
    .await;
    let mut first = TcpStream::connect(gw.local_addr()).await.unwrap();
    first
        .write_all(b"GET /a HTTP/1.1\r\nHost: g\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut first).await.0, 200);
    let (status, head, _) = raw_http(gw.local_addr(), "GET /a HTTP/1.1\r\nHost: g\r\n\r\n").await;
    assert_eq!(status, 503, "{head}");
    drop(first);
    within("a free slot", async {
        loop {
            let (status, _, _) = raw_http(
                gw.local_addr(),
                "GET /a HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
            )
            .await;
            if status == 200 {
                break;
            }
        }
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_an_idle_connection_in_http_mode() {
    let up = http_upstream().await;
    let gw = gateway(&proxy_route("/a", up.addr, "")).await;
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    stream
        .write_all(b"GET /a HTTP/1.1\r\nHost: g\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await.0, 200);
    let stopping = tokio::spawn(gw.shutdown());
    closed(&mut stream).await;
    within("shutdown", stopping).await.unwrap();
}

#[tokio::test]
async fn head_responses_keep_their_length_and_policy_failures_get_500() {
    let up = http_upstream().await;
    let broken = script(
        "http_broken.lua",
        "return function(req, ctx)\n  if req.method == \"DELETE\" then error(\"boom\") end\nend\n",
    );
    let gw = gateway(&route_to(
        "/a",
        &format!("ws://{}/a", up.addr),
        "http = \"proxy\"",
        &[("on_upgrade", &broken)],
    ))
    .await;
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    stream
        .write_all(b"HEAD /a HTTP/1.1\r\nHost: g\r\n\r\nDELETE /a HTTP/1.1\r\nHost: g\r\n\r\n")
        .await
        .unwrap();
    // HEAD: the length of the GET body ("HEAD /a" is 7 bytes), and no body.
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = within("a response", stream.read(&mut chunk)).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-length: 7"), "{head}");
    // What follows is the DELETE's answer, not a HEAD body.
    let rest = String::from_utf8_lossy(&buf[head_end..]).to_string();
    let mut more = rest.into_bytes();
    while !more.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 4096];
        let n = within("a response", stream.read(&mut chunk)).await.unwrap();
        assert!(n > 0);
        more.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&more).to_string();
    assert!(text.starts_with("HTTP/1.1 500"), "{text}");
    gw.shutdown().await;
}

#[tokio::test]
async fn expect_100_continue_is_met_by_the_gateway() {
    let mut up = http_upstream().await;
    let gw = gateway(&proxy_route("/count", up.addr, "")).await;
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    stream
        .write_all(
            b"POST /count HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = within("100 Continue", stream.read(&mut buf)).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    stream.write_all(b"hello").await.unwrap();
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!((status, body.as_str()), (200, "5"));
    let seen = within("the upstream request", up.seen.recv())
        .await
        .unwrap();
    assert!(seen.headers.get("expect").is_none());
    gw.shutdown().await;
}

#[tokio::test]
async fn set_upstream_sends_an_http_request_to_the_http_url_of_a_ws_one() {
    let mut up = http_upstream().await;
    let elsewhere = script(
        "http_elsewhere.lua",
        &format!(
            "return function(req, ctx)\n  req:set_upstream(\"ws://{}/chosen?by=policy\")\nend\n",
            up.addr
        ),
    );
    let closed = closed_port().await;
    let gw = gateway(&route(
        "/a",
        closed,
        "http = \"proxy\"",
        &[("on_upgrade", &elsewhere)],
    ))
    .await;
    let (status, _, body) =
        raw_http(gw.local_addr(), "GET /a?x=1 HTTP/1.1\r\nHost: g\r\n\r\n").await;
    assert_eq!((status, body.as_str()), (200, "GET /chosen?by=policy"));
    let seen = within("the upstream request", up.seen.recv())
        .await
        .unwrap();
    assert_eq!(seen.headers["host"], up.addr.to_string());
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_that_reads_nothing_is_cut_after_header_read_timeout() {
    let up = http_upstream().await;
    let gw = gateway_with_server(
        "header_read_timeout = \"300ms\"\n",
        &proxy_route("/stream", up.addr, ""),
    )
    .await;
    let total = 256usize << 20;
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    stream
        .write_all(format!("GET /stream?n={total} HTTP/1.1\r\nHost: g\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // Reading nothing for longer than the timeout: the gateway's writes wait, then it gives up.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    within("the end of what was sent", async {
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            got += n;
        }
    })
    .await;
    assert!(
        got < total,
        "the whole body came: the connection was not cut"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn an_upstream_that_closes_kept_alive_connections_is_reconnected() {
    // Answers one request per connection, then closes it without saying so first (as an
    // upstream whose keep-alive timeout has passed does).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                let body = format!("c{n}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    let gw = gateway(&proxy_route("/a", addr, "")).await;
    let mut stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    for n in 1..=3 {
        stream
            .write_all(b"GET /a HTTP/1.1\r\nHost: g\r\n\r\n")
            .await
            .unwrap();
        let (status, _, body) = read_response(&mut stream).await;
        assert_eq!((status, body), (200, format!("c{n}")));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    gw.shutdown().await;
}

/// `origins` guards HTTP requests too: a listed origin's preflight is answered by the gateway
/// (the upstream never sees it) and its requests carry `Access-Control-Allow-Origin`; any
/// other origin gets 403 before the upstream is asked.
#[tokio::test]
async fn origins_answer_preflights_and_refuse_foreign_origins_on_http_requests() {
    let mut up = http_upstream().await;
    let gw = gateway(&proxy_route(
        "/api/{*rest}",
        up.addr,
        "origins = [\"https://app.example.com\"]",
    ))
    .await;
    let addr = gw.local_addr();
    let ask = |request: String| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        read_response(&mut stream).await
    };
    let (status, head, _) = ask(
        "OPTIONS /api/a HTTP/1.1\r\nHost: gateway.test\r\nOrigin: https://app.example.com\r\n\
         Access-Control-Request-Method: POST\r\n\r\n"
            .into(),
    )
    .await;
    assert_eq!(status, 204, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("access-control-allow-origin: https://app.example.com"),
        "{head}"
    );
    let (status, head, body) = ask(
        "GET /api/a HTTP/1.1\r\nHost: gateway.test\r\nOrigin: https://app.example.com\r\n\r\n"
            .into(),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "GET /"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("access-control-allow-origin: https://app.example.com"),
        "{head}"
    );
    // Only the GET reached the upstream.
    let seen = within("the upstream request", up.seen.recv())
        .await
        .unwrap();
    assert_eq!(seen.method, "GET");
    let (status, head, _) = ask(
        "GET /api/a HTTP/1.1\r\nHost: gateway.test\r\nOrigin: https://evil.example\r\n\r\n".into(),
    )
    .await;
    assert_eq!(status, 403, "{head}");
    assert!(
        up.seen.try_recv().is_err(),
        "a foreign origin reached the upstream"
    );
    gw.shutdown().await;
}
