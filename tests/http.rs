//! The gateway's own HTTP/1.1 request reader, driven with raw bytes on real TCP connections:
//! keep-alive after a refusal, pipelining, `Connection: close` and HTTP/1.0, HEAD, request
//! bodies, oversized and malformed heads, the header read timeout, absolute-form targets,
//! bytes sent with the head, shutdown of idle kept-alive connections, and a client that leaves
//! before its 101.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use framegate::ShutdownOutcome;
use futures_util::SinkExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The answer to a plain request on a route path (see `Rejection::into_answer`).
const WS_ONLY: &str = "this path accepts WebSocket connections only\n";

/// A raw client connection that keeps what it read past one response for the next one.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// One response read off a [`Conn`].
#[derive(Debug)]
struct Response {
    status: u16,
    /// The head, lower-cased.
    head: String,
    body: String,
}

impl Response {
    /// The value of header `name` (lower case), if it is there once or more (first one).
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k == name).then(|| v.trim())
        })
    }

    fn content_length(&self) -> Option<usize> {
        self.header("content-length").map(|v| v.parse().unwrap())
    }
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        Conn {
            stream: within("connect", TcpStream::connect(addr)).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        within("write", self.stream.write_all(bytes.as_ref()))
            .await
            .unwrap();
    }

    /// Reads more bytes into the buffer; false at EOF.
    async fn fill(&mut self, what: &str) -> bool {
        let mut chunk = [0u8; 4096];
        let n = within(what, self.stream.read(&mut chunk))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// Reads one response head; the body (if any) stays in the buffer.
    async fn head(&mut self) -> Response {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(
                self.fill("response head").await,
                "connection closed before a full response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        self.buf.drain(..end);
        assert!(head.starts_with("http/1.1 "), "not a response: {head:?}");
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        Response {
            status,
            head,
            body: String::new(),
        }
    }

    /// Reads one response with its `Content-Length` body.
    async fn response(&mut self) -> Response {
        let mut response = self.head().await;
        let length = response.content_length().unwrap_or(0);
        while self.buf.len() < length {
            assert!(
                self.fill("response body").await,
                "connection closed mid-body"
            );
        }
        response.body = String::from_utf8_lossy(&self.buf[..length]).into_owned();
        self.buf.drain(..length);
        response
    }

    /// Reads until the gateway closes the connection; returns what came before the end.
    async fn read_to_eof(&mut self, what: &str) -> Vec<u8> {
        while self.fill(what).await {}
        std::mem::take(&mut self.buf)
    }

    /// Reads to the end and checks that the gateway closed the connection without a byte, no
    /// sooner than `at_least` after `started` and well within 5 s.
    async fn assert_closed_unanswered(&mut self, started: Instant, at_least: Duration, what: &str) {
        let got = self.read_to_eof(&format!("close of {what}")).await;
        let took = started.elapsed();
        assert!(
            got.is_empty(),
            "{what}: answered {:?}",
            String::from_utf8_lossy(&got)
        );
        assert!(
            took >= at_least,
            "{what}: closed after {took:?}, before the timeout"
        );
        assert!(
            took < Duration::from_secs(5),
            "{what}: closed only after {took:?}"
        );
    }

    /// The connection as a client WebSocket, after a 101 was read off it.
    async fn into_ws(self) -> WebSocketStream<TcpStream> {
        WebSocketStream::from_partially_read(self.stream, self.buf, Role::Client, None).await
    }

    /// Reads a 101 and checks that a message is echoed over the upgraded connection.
    async fn expect_upgrade_and_echo(mut self, text: &str) {
        let switched = self.head().await;
        assert_eq!(switched.status, 101, "{text}: {switched:?}");
        let mut ws = self.into_ws().await;
        ws_echo(&mut ws, text).await;
    }

    /// Reads one unmasked, unfragmented server frame with a short payload.
    async fn frame(&mut self) -> (u8, Vec<u8>) {
        while self.buf.len() < 2 {
            assert!(self.fill("frame header").await, "closed before a frame");
        }
        assert_eq!(self.buf[1] & 0x80, 0, "a server frame is not masked");
        let len = usize::from(self.buf[1] & 0x7f);
        assert!(len < 126, "test frames are short");
        while self.buf.len() < 2 + len {
            assert!(self.fill("frame payload").await, "closed mid-frame");
        }
        let first = self.buf[0];
        let payload = self.buf[2..2 + len].to_vec();
        self.buf.drain(..2 + len);
        (first, payload)
    }
}

/// A final, masked client text frame (payloads under 126 bytes).
fn masked_text(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    assert!(payload.len() < 126);
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

async fn echo_gateway() -> (Upstream, framegate::Running) {
    let up = echo().await;
    let gw = gateway(&route("/echo", up.addr, "", &[])).await;
    (up, gw)
}

async fn ws_echo(ws: &mut Client, text: &str) {
    within("send", ws.send(Message::text(text))).await.unwrap();
    assert_eq!(next_text(ws).await, text);
}

/// A fresh connection through the gateway still upgrades and echoes.
async fn still_serving(addr: SocketAddr, after: &str) {
    let mut ws = connect(addr, "/echo").await;
    ws_echo(&mut ws, &format!("still serving after {after}")).await;
}

/// `bytes` hold exactly one response, then nothing: returns it.
fn only_response(bytes: &[u8]) -> Response {
    let text = String::from_utf8_lossy(bytes).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {text:?}"));
    let head = head.to_ascii_lowercase() + "\r\n\r\n";
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let response = Response {
        status,
        head,
        body: body.to_owned(),
    };
    assert_eq!(
        response.content_length(),
        Some(response.body.len()),
        "one response and nothing after it: {text:?}"
    );
    response
}

// 1.

#[tokio::test]
async fn a_refused_request_keeps_the_connection_for_an_upgrade() {
    let (_up, gw) = echo_gateway().await;
    let mut conn = Conn::open(gw.local_addr()).await;
    conn.send(upgrade_request("/nowhere", "")).await;
    let refused = conn.response().await;
    assert_eq!(refused.status, 404, "{refused:?}");
    assert_eq!(refused.body, "no route for /nowhere\n");
    assert_eq!(refused.header("connection"), None, "{refused:?}");

    conn.send(upgrade_request("/echo", "")).await;
    let switched = conn.head().await;
    assert_eq!(switched.status, 101, "{switched:?}");
    assert_eq!(
        switched.header("sec-websocket-accept"),
        Some("s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{switched:?}"
    );
    let mut ws = conn.into_ws().await;
    ws_echo(&mut ws, "hello over a reused connection").await;
}

// 2.

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (_up, gw) = echo_gateway().await;
    let mut conn = Conn::open(gw.local_addr()).await;
    conn.send(format!(
        "GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n{}",
        upgrade_request("/echo", "")
    ))
    .await;
    let first = conn.response().await;
    assert_eq!(
        (first.status, first.body.as_str()),
        (404, "no route for /first\n")
    );
    let second = conn.response().await;
    assert_eq!(
        (second.status, second.body.as_str()),
        (404, "no route for /second\n")
    );
    conn.expect_upgrade_and_echo("after two pipelined refusals")
        .await;
}

/// RFC 9112 §2.2: a server should ignore empty lines before a request line (some clients send
/// a CRLF after a request), in the same write as a request or on its own.
#[tokio::test]
async fn empty_lines_between_kept_alive_requests_are_skipped() {
    let (_up, gw) = echo_gateway().await;
    let mut conn = Conn::open(gw.local_addr()).await;
    conn.send("GET /first HTTP/1.1\r\nHost: x\r\n\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert_eq!(conn.response().await.body, "no route for /first\n");
    assert_eq!(conn.response().await.body, "no route for /second\n");
    conn.send("\r\n").await;
    conn.send(upgrade_request("/echo", "")).await;
    conn.expect_upgrade_and_echo("after empty lines").await;
}

// 3.

#[tokio::test]
async fn connection_close_and_http_1_0_end_the_connection_after_the_answer() {
    let (_up, gw) = echo_gateway().await;
    let addr = gw.local_addr();
    for (request, status, connection) in [
        (
            "GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            404,
            "close",
        ),
        ("GET /nowhere HTTP/1.0\r\n\r\n", 404, "close"),
        // Only HTTP/1.1 connections are kept, keep-alive or not.
        (
            "GET /nowhere HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            404,
            "close",
        ),
        // The 426's own `Connection: Upgrade` is merged with the close.
        (
            "GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            426,
            "upgrade, close",
        ),
        // An HTTP/1.0 upgrade is refused (and closed).
        (
            "GET /echo HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            400,
            "close",
        ),
    ] {
        let mut conn = Conn::open(addr).await;
        conn.send(request).await;
        let bytes = conn.read_to_eof(&format!("close after {request:?}")).await;
        let response = only_response(&bytes);
        assert_eq!(response.status, status, "{request:?}: {response:?}");
        assert_eq!(
            response.header("connection"),
            Some(connection),
            "{request:?}: {response:?}"
        );
        if status == 400 {
            assert_eq!(
                response.body,
                "bad WebSocket upgrade: HTTP/1.1 is required\n"
            );
        }
    }
}

// 4.

#[tokio::test]
async fn head_requests_get_a_length_but_no_body() {
    let (_up, gw) = echo_gateway().await;
    let mut conn = Conn::open(gw.local_addr()).await;

    // No Upgrade header: 426 (the upgrade check comes before the method check).
    conn.send("HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let plain = conn.head().await;
    assert_eq!(plain.status, 426, "{plain:?}");
    assert_eq!(plain.content_length(), Some(WS_ONLY.len()), "{plain:?}");

    // The kept connection answers the next request right away: had a body followed the head,
    // its bytes would come first.
    conn.send(upgrade_request("/echo", "").replacen("GET", "HEAD", 1))
        .await;
    let upgrade = conn.head().await;
    assert_eq!(upgrade.status, 405, "{upgrade:?}");
    assert_eq!(upgrade.header("allow"), Some("get"), "{upgrade:?}");
    let expected = "WebSocket upgrade must use GET, not HEAD\n";
    assert_eq!(
        upgrade.content_length(),
        Some(expected.len()),
        "{upgrade:?}"
    );

    conn.send("HEAD /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let last = conn.head().await;
    assert_eq!(last.status, 404, "{last:?}");
    assert_eq!(
        last.content_length(),
        Some("no route for /nowhere\n".len()),
        "{last:?}"
    );
    let after = conn.read_to_eof("close after a HEAD").await;
    assert!(
        after.is_empty(),
        "body bytes after HEAD answers: {:?}",
        String::from_utf8_lossy(&after)
    );
}

// 5.

#[tokio::test]
async fn a_request_with_a_body_is_answered_and_closed() {
    let (_up, gw) = echo_gateway().await;
    let addr = gw.local_addr();
    for (request, status, body) in [
        (
            "POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".to_owned(),
            404,
            "no route for /nowhere\n",
        ),
        // The body is never read, so it is never taken for a pipelined request either.
        (
            "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             19\r\nGET /nowhere HTTP/1.1\r\n\r\n\r\n0\r\n\r\n"
                .to_owned(),
            426,
            WS_ONLY,
        ),
        (
            format!("{}abc", upgrade_request("/echo", "Content-Length: 3\r\n")),
            400,
            "bad WebSocket upgrade: an upgrade request has no body\n",
        ),
    ] {
        let mut conn = Conn::open(addr).await;
        conn.send(&request).await;
        let bytes = conn.read_to_eof(&format!("close after {request:?}")).await;
        let response = only_response(&bytes);
        assert_eq!(response.status, status, "{request:?}: {response:?}");
        assert_eq!(response.body, body, "{request:?}");
        let connection = response.header("connection").unwrap_or_default();
        assert!(connection.ends_with("close"), "{request:?}: {response:?}");
    }
    // A zero length is no body: the upgrade goes ahead.
    let mut conn = Conn::open(addr).await;
    conn.send(upgrade_request("/echo", "Content-Length: 0\r\n"))
        .await;
    conn.expect_upgrade_and_echo("no body").await;
}

// 6.

/// Sends `request` (concurrently with reading, as the gateway may answer before it has read
/// everything) and returns all the gateway sent before closing.
async fn send_and_read_to_end(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.split();
    let mut answer = Vec::new();
    let (written, read) = within("answer and close", async {
        tokio::join!(write.write_all(request), read.read_to_end(&mut answer))
    })
    .await;
    read.expect("the answer is read to its end without a reset");
    // The gateway drains what it does not read, so the whole request goes out.
    written.expect("the request is written whole");
    answer
}

#[tokio::test]
async fn oversized_and_malformed_heads_are_refused_and_others_are_still_served() {
    let (_up, gw) = echo_gateway().await;
    let addr = gw.local_addr();

    // A head that never ends within 64 KiB.
    let mut huge = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge.resize(70 * 1024, b'a');
    let response = only_response(&send_and_read_to_end(addr, &huge).await);
    assert_eq!(response.status, 431, "{response:?}");
    assert_eq!(response.body, "request head longer than 64 KiB\n");
    assert_eq!(response.header("connection"), Some("close"));
    still_serving(addr, "a head over 64 KiB").await;

    // A complete head, over 64 KiB.
    let mut complete = huge.clone();
    complete.extend_from_slice(b"\r\n\r\n");
    let response = only_response(&send_and_read_to_end(addr, &complete).await);
    assert_eq!(response.status, 431, "{response:?}");
    still_serving(addr, "a complete head over 64 KiB").await;

    // Just under the limit is fine.
    let mut large = b"GET /nowhere HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    large.resize(60 * 1024, b'a');
    large.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let response = only_response(&send_and_read_to_end(addr, &large).await);
    assert_eq!(response.status, 404, "{response:?}");

    // 101 headers are too many; 100 are not.
    let many = |n: usize| {
        format!(
            "GET /nowhere HTTP/1.1\r\nHost: x\r\n{}Connection: close\r\n\r\n",
            "X-A: 1\r\n".repeat(n - 2)
        )
    };
    let response = only_response(&send_and_read_to_end(addr, many(101).as_bytes()).await);
    assert_eq!(response.status, 431, "{response:?}");
    assert_eq!(response.body, "more than 100 request headers\n");
    still_serving(addr, "101 headers").await;
    let response = only_response(&send_and_read_to_end(addr, many(100).as_bytes()).await);
    assert_eq!(response.status, 404, "{response:?}");

    for (request, body_start) in [
        (
            &b"GET /echo\r\nHost: x\r\n\r\n"[..],
            "malformed request head",
        ),
        (
            b"GET /echo HTTP/1.1 extra\r\n\r\n",
            "malformed request head",
        ),
        (b"GET /ec ho HTTP/1.1\r\n\r\n", "malformed request head"),
        // A TLS ClientHello's first bytes, sent to the plain port.
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            "malformed request head",
        ),
        (
            b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
            "bad request target \"*\"",
        ),
        (
            b"GET /echo HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
            "invalid Content-Length",
        ),
        // RFC 9112 §3.2: an HTTP/1.1 request names exactly one host.
        (b"GET /echo HTTP/1.1\r\n\r\n", "missing Host header"),
        (
            b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "more than one Host header",
        ),
    ] {
        let label = String::from_utf8_lossy(request).into_owned();
        let response = only_response(&send_and_read_to_end(addr, request).await);
        assert_eq!(response.status, 400, "{label:?}: {response:?}");
        assert!(
            response.body.starts_with(body_start),
            "{label:?}: {response:?}"
        );
        assert_eq!(response.header("connection"), Some("close"));
        still_serving(addr, &label).await;
    }
}

// 7.

#[tokio::test]
async fn a_head_that_stops_coming_is_closed_after_the_header_read_timeout() {
    let up = echo().await;
    let gw = gateway_with_server(
        "header_read_timeout = \"300ms\"\nkeepalive_timeout = \"300ms\"\n",
        &route("/echo", up.addr, "", &[]),
    )
    .await;
    let addr = gw.local_addr();
    let timeout = Duration::from_millis(300);

    let started = Instant::now();
    let mut half = Conn::open(addr).await;
    half.send("GET /echo HTTP/1.1\r\nHost: x\r\nUpgr").await;
    half.assert_closed_unanswered(started, timeout, "a half head")
        .await;

    let started = Instant::now();
    let mut silent = Conn::open(addr).await;
    silent
        .assert_closed_unanswered(started, timeout, "a silent connection")
        .await;

    // A kept-alive connection gets keepalive_timeout (here the same) for its next request.
    let mut kept = Conn::open(addr).await;
    kept.send("GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(kept.response().await.status, 404);
    // The timer started when the answer was written, just before it was read here.
    let started = Instant::now();
    kept.assert_closed_unanswered(
        started,
        timeout - Duration::from_millis(50),
        "an idle kept-alive connection",
    )
    .await;

    still_serving(addr, "timeouts").await;
}

/// The timeout bounds the whole head, not the pause between its reads: a client trickling a
/// head that never ends is closed after the timeout too.
#[tokio::test]
async fn a_trickling_head_is_closed_after_the_header_read_timeout() {
    let up = echo().await;
    let gw = gateway_with_server(
        "header_read_timeout = \"300ms\"\n",
        &route("/echo", up.addr, "", &[]),
    )
    .await;
    let started = Instant::now();
    let stream = TcpStream::connect(gw.local_addr()).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    // One byte of a header value every 50 ms (pacing is what is tested here), for up to 5 s.
    let trickle = tokio::spawn(async move {
        write.write_all(b"GET /echo HTTP/1.1\r\nX-Slow: ").await?;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            write.write_all(b"a").await?;
        }
        std::io::Result::Ok(())
    });
    let mut got = Vec::new();
    let ended = within("close of a trickling head", read.read_to_end(&mut got)).await;
    let took = started.elapsed();
    trickle.abort();
    // The trickle may be reset once the gateway has closed; either way the connection ended.
    if let Err(e) = ended {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    assert!(
        got.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        took >= Duration::from_millis(300),
        "closed after {took:?}, before the timeout"
    );
    assert!(took < Duration::from_secs(3), "closed only after {took:?}");
}

// 8.

#[tokio::test]
async fn an_absolute_form_target_is_routed_by_its_path() {
    let (_up, gw) = echo_gateway().await;
    let mut conn = Conn::open(gw.local_addr()).await;
    conn.send(upgrade_request("http://gateway.test/echo", ""))
        .await;
    conn.expect_upgrade_and_echo("absolute form").await;

    // Routed by path: another path in absolute form is not found.
    let mut conn = Conn::open(gw.local_addr()).await;
    conn.send(upgrade_request("ws://gateway.test/nowhere?q=1", ""))
        .await;
    let refused = conn.response().await;
    assert_eq!(refused.status, 404, "{refused:?}");
    assert_eq!(refused.body, "no route for /nowhere\n");
}

#[tokio::test]
async fn an_absolute_form_authority_stands_for_a_missing_host_header() {
    let up = echo().await;
    let elsewhere = closed_port().await;
    let gw = gateway(&format!(
        "{}{}",
        route("/x", up.addr, "host = \"a.example\"", &[]),
        route("/x", elsewhere, "", &[])
    ))
    .await;
    let request = upgrade_request("ws://a.example/x", "").replace("Host: gateway.test\r\n", "");
    let mut conn = Conn::open(gw.local_addr()).await;
    conn.send(request).await;
    conn.expect_upgrade_and_echo("host from the target").await;
}

// 9.

#[tokio::test]
async fn frames_sent_with_the_request_head_are_relayed() {
    let (_up, gw) = echo_gateway().await;
    let mut conn = Conn::open(gw.local_addr()).await;
    let mut bytes = upgrade_request("/echo", "").into_bytes();
    bytes.extend_from_slice(&masked_text("early"));
    bytes.extend_from_slice(&masked_text("bird"));
    conn.send(&bytes).await;
    let switched = conn.head().await;
    assert_eq!(switched.status, 101, "{switched:?}");
    assert_eq!(conn.frame().await, (0x81, b"early".to_vec()));
    assert_eq!(conn.frame().await, (0x81, b"bird".to_vec()));
    // And later frames still flow.
    conn.send(masked_text("later")).await;
    assert_eq!(conn.frame().await, (0x81, b"later".to_vec()));
}

#[tokio::test]
async fn frames_pipelined_after_a_refusal_and_an_upgrade_are_relayed() {
    let (_up, gw) = echo_gateway().await;
    let mut conn = Conn::open(gw.local_addr()).await;
    let mut bytes = upgrade_request("/nowhere", "").into_bytes();
    bytes.extend_from_slice(upgrade_request("/echo", "").as_bytes());
    bytes.extend_from_slice(&masked_text("right away"));
    conn.send(&bytes).await;
    assert_eq!(conn.response().await.status, 404);
    assert_eq!(conn.head().await.status, 101);
    assert_eq!(conn.frame().await, (0x81, b"right away".to_vec()));
}

// 10.

#[tokio::test]
async fn shutdown_closes_an_idle_kept_alive_connection() {
    let up = echo().await;
    let running = gateway_with_server(
        // The header read timeout is long: only shutdown can close the connection in time.
        "header_read_timeout = \"30s\"\nshutdown_grace = \"5s\"\n",
        &route("/echo", up.addr, "", &[]),
    )
    .await;
    let mut conn = Conn::open(running.local_addr()).await;
    conn.send("GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let refused = conn.response().await;
    assert_eq!(refused.status, 404, "{refused:?}");
    assert_eq!(refused.header("connection"), None, "{refused:?}");

    let started = Instant::now();
    let shutdown = tokio::spawn(running.shutdown());
    let got = conn
        .read_to_eof("close of the idle connection at shutdown")
        .await;
    let took = started.elapsed();
    assert!(got.is_empty(), "sent: {:?}", String::from_utf8_lossy(&got));
    assert!(took < Duration::from_secs(2), "closed only after {took:?}");
    let outcome = within("shutdown to return", shutdown).await.unwrap();
    assert_eq!(outcome, ShutdownOutcome::Drained);
}

/// A client that resets its connection while the upstream is still answering: the 101 cannot
/// be written, so the gateway closes the upstream with 1001 "client connection lost".
#[tokio::test]
async fn a_client_gone_before_the_101_gets_the_upstream_closed_with_1001() {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let (asked_tx, asked_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let upstream = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the gateway closed before its request head");
            head.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8(head).unwrap();
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("the gateway sends a key")
            .to_owned();
        asked_tx.send(()).unwrap();
        go_rx.await.unwrap();
        let answer = switching_head(&derive_accept_key(key.as_bytes()));
        s.write_all(answer.as_bytes()).await.unwrap();
        // The gateway's close frame: masked, as the gateway is the client on this leg.
        let mut start = [0u8; 2];
        s.read_exact(&mut start).await.unwrap();
        assert_eq!(start[0], 0x88, "a final close frame");
        assert_ne!(start[1] & 0x80, 0, "masked");
        let mut mask = [0u8; 4];
        s.read_exact(&mut mask).await.unwrap();
        let mut payload = vec![0u8; usize::from(start[1] & 0x7f)];
        s.read_exact(&mut payload).await.unwrap();
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        (
            u16::from_be_bytes([payload[0], payload[1]]),
            String::from_utf8(payload[2..].to_vec()).unwrap(),
        )
    });
    let gw = gateway(&route("/x", up, "", &[])).await;
    let mut client = TcpStream::connect(gw.local_addr()).await.unwrap();
    client
        .write_all(upgrade_request("/x", "").as_bytes())
        .await
        .unwrap();
    within("the request reaches the upstream", asked_rx)
        .await
        .unwrap();
    // Closing with a zero linger time resets the connection. (tokio deprecates `set_linger`
    // because a linger time makes `drop` block; a zero one resets at once and never blocks.)
    #[allow(deprecated)]
    client.set_linger(Some(Duration::ZERO)).unwrap();
    drop(client);
    go_tx.send(()).unwrap();
    let (code, reason) = within("the upstream's close frame", upstream)
        .await
        .unwrap();
    assert_eq!((code, reason.as_str()), (1001, "client connection lost"));
    // The gateway is still serving.
    still_serving_elsewhere(&gw).await;
}

/// Another route on `gw` still answers (a 404 for a path nobody serves).
async fn still_serving_elsewhere(gw: &framegate::Running) {
    let (status, _, _) = raw_http(gw.local_addr(), &upgrade_request("/nowhere", "")).await;
    assert_eq!(status, 404);
}

/// A client that pipelines requests but never reads the answers: once the gateway cannot write
/// an answer within the header read timeout, it drops the connection and its permit, so the
/// next client (here the only one the cap allows) is served.
#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_dropped() {
    let gw = gateway_with_server(
        "max_connections = 1\nheader_read_timeout = \"300ms\"\n",
        "[[route]]\npath = \"/x\"\nupstream = \"ws://127.0.0.1:9/\"\n",
    )
    .await;
    let addr = gw.local_addr();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // A small receive buffer, so that the gateway's writes stall soon.
    socket.set_recv_buffer_size(4096).unwrap();
    let stuck = socket.connect(addr).await.unwrap();
    let (_reader, mut writer) = stuck.into_split();
    // Requests whose answers no buffer holds: the writer stalls too once the gateway stops
    // reading, and ends only when the gateway drops the connection.
    let pipelining = tokio::spawn(async move {
        let request = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n";
        while writer.write_all(request).await.is_ok() {}
    });
    // The only slot is given back between requests, so the next client is served meanwhile.
    let (status, _, body) = within(
        "the next client's answer",
        raw_http(addr, "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"),
    )
    .await;
    assert_eq!((status, body.as_str()), (404, "no route for /nowhere\n"));
    within("the stuck client to be dropped", pipelining)
        .await
        .unwrap();
}
