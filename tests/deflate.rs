//! permessage-deflate (RFC 7692) through the gateway, negotiated per leg: compressing clients
//! and upstreams (node's `ws`, Python's `websockets`) against plain ones (tokio-tungstenite,
//! which has no deflate), policies on inflated messages, the inflated-size limit, and the
//! framing rules.

mod support;

use std::process::Stdio;

use futures_util::SinkExt;
use support::node::{self, NodeProcess};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// The route keys that turn compression on (the default since the twelfth session, named
/// anyway), without context takeover (the default).
const ON: &str = "compression = true";

/// A node `ws` echo server, with or without permessage-deflate, and its port.
async fn node_server(deflate: bool) -> (NodeProcess, u16) {
    let mut server = node::spawn(
        "deflate_peer.js",
        &["server", if deflate { "1" } else { "0" }],
    );
    let line = server.line().await.expect("the node server starts");
    let port = line
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
    (server, port)
}

/// Runs a node `ws` client through `steps` against `url` and returns every line it printed.
async fn node_client(url: &str, deflate: bool, steps: &str) -> Vec<String> {
    let mut client = node::spawn(
        "deflate_peer.js",
        &["client", url, if deflate { "1" } else { "0" }, steps],
    );
    let mut lines = Vec::new();
    while let Some(line) = client.line().await {
        lines.push(line);
    }
    lines
}

const STEPS: &str = r#"[{"text":"hello"},{"binary":"bytes"},{"fragments":["he","llo ","world"]},
    {"zeros":100000},{"text":"hello"},{"expect":5},{"close":1000}]"#;

const ECHOED: [&str; 5] = [
    "text hello",
    "binary 5 39",
    "text hello world",
    "binary 100000 0",
    "text hello",
];

fn assert_echoed(lines: &[String], answer: &str) {
    // (Lines come without trailing spaces.)
    assert_eq!(lines[0], format!("answer {answer}").trim_end(), "{lines:?}");
    assert_eq!(&lines[1..6], &ECHOED, "{lines:?}");
    assert_eq!(lines[6], "close 1000", "{lines:?}");
}

const NO_TAKEOVER: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

#[tokio::test]
async fn compressing_client_to_plain_upstream() {
    let up = echo().await;
    let gw = gateway(&route("/z", up.addr, ON, &[])).await;
    let url = format!("ws://{}/z", gw.local_addr());
    // tokio-tungstenite would fail on any compressed frame: the gateway inflated them all.
    assert_echoed(&node_client(&url, true, STEPS).await, NO_TAKEOVER);
}

#[tokio::test]
async fn plain_client_to_compressing_upstream() {
    let (mut server, port) = node_server(true).await;
    let gw = gateway(&route_to("/z", &format!("ws://127.0.0.1:{port}/"), ON, &[])).await;
    let (mut ws, response) = connect_with(gw.local_addr(), "/z", &[]).await.unwrap();
    assert!(response.headers().get("sec-websocket-extensions").is_none());
    // The gateway's own offer went upstream, and the upstream accepted it.
    assert_eq!(server.line().await.unwrap(), format!("offer {NO_TAKEOVER}"));
    assert_eq!(
        server.line().await.unwrap(),
        format!("answer {NO_TAKEOVER}")
    );
    for _ in 0..3 {
        ws.send(Message::text("hello hello hello")).await.unwrap();
        assert_eq!(next_text(&mut ws).await, "hello hello hello");
    }
    ws.send(Message::binary(vec![7u8; 70_000])).await.unwrap();
    match next_message(&mut ws).await {
        Some(Ok(Message::Binary(b))) => assert_eq!(b, vec![7u8; 70_000]),
        other => panic!("expected the binary echo, got {other:?}"),
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn both_legs_compress_with_and_without_context_takeover() {
    let (mut server, port) = node_server(true).await;
    let upstream = format!("ws://127.0.0.1:{port}/");
    let gw = gateway(&format!(
        "{}{}",
        route_to("/fresh", &upstream, ON, &[]),
        route_to(
            "/kept",
            &upstream,
            "compression = true\ncompression_context_takeover = true",
            &[]
        )
    ))
    .await;
    let lines = node_client(&format!("ws://{}/fresh", gw.local_addr()), true, STEPS).await;
    assert_echoed(&lines, NO_TAKEOVER);
    assert_eq!(server.line().await.unwrap(), format!("offer {NO_TAKEOVER}"));
    assert_eq!(
        server.line().await.unwrap(),
        format!("answer {NO_TAKEOVER}")
    );
    // Context takeover: the client's window and the gateway's are kept from message to
    // message (the repeated "hello" refers back to the first).
    let lines = node_client(&format!("ws://{}/kept", gw.local_addr()), true, STEPS).await;
    assert_echoed(&lines, "permessage-deflate");
    assert_eq!(server.line().await.unwrap(), "offer permessage-deflate");
    assert_eq!(server.line().await.unwrap(), "answer permessage-deflate");
}

#[tokio::test]
async fn small_windows_are_honoured_on_both_legs() {
    // The upstream asks nothing; the route asks both peers for 9 bits.
    let (mut server, port) = node_server(true).await;
    let upstream = format!("ws://127.0.0.1:{port}/");
    let gw = gateway(&format!(
        "{}{}",
        route_to(
            "/nine",
            &upstream,
            "compression = true\ncompression_window_bits = 9",
            &[]
        ),
        route_to("/z", &upstream, ON, &[])
    ))
    .await;
    // Back-references 3000 bytes away: a peer that inflates with a 512-byte or 1 KiB window
    // fails on them unless the compressor kept to that window.
    let steps = r#"[{"repeated":3000},{"repeated":3000},{"expect":2},{"close":1000}]"#;
    let echoed = |answer: &str| {
        vec![
            format!("answer {answer}"),
            "text 6000 244".to_owned(),
            "text 6000 244".to_owned(),
            "close 1000".to_owned(),
        ]
    };
    let url = format!("ws://{}/nine", gw.local_addr());
    assert_eq!(
        node_client(&url, true, steps).await,
        echoed(&format!(
            "{NO_TAKEOVER}; server_max_window_bits=9; client_max_window_bits=9"
        ))
    );
    let offer = format!("{NO_TAKEOVER}; server_max_window_bits=9");
    assert_eq!(server.line().await.unwrap(), format!("offer {offer}"));
    assert_eq!(server.line().await.unwrap(), format!("answer {offer}"));
    // A client that asks the gateway for a 10-bit window gets it.
    let url = format!("ws://{}/z", gw.local_addr());
    let mut client = node::spawn("deflate_peer.js", &["client", &url, "w10", steps]);
    let mut lines = Vec::new();
    while let Some(line) = client.line().await {
        lines.push(line);
    }
    assert_eq!(
        lines,
        echoed(&format!("{NO_TAKEOVER}; server_max_window_bits=10"))
    );
}

#[tokio::test]
async fn chromium_compresses_to_a_plain_and_to_a_compressing_upstream() {
    let chromium = node::chromium().display().to_string();
    let plain = echo().await;
    let (_server, port) = node_server(true).await;
    // "/plain" with the defaults: compression is on without being asked for.
    let gw = gateway(&format!(
        "{}{}",
        route("/plain", plain.addr, "", &[]),
        route_to("/deflate", &format!("ws://127.0.0.1:{port}/"), ON, &[])
    ))
    .await;
    for path in ["/plain", "/deflate"] {
        let url = format!("ws://{}{path}", gw.local_addr());
        let mut browser = node::spawn("deflate_browser.js", &[&chromium, &url]);
        let line = browser.line().await.unwrap_or_default();
        let seen: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("{path}: {line}"));
        assert_eq!(seen["extensions"], NO_TAKEOVER, "{path}");
        assert_eq!(
            seen["messages"],
            serde_json::json!(["hello", "text 30000", "binary 65536 251"]),
            "{path}"
        );
        assert_eq!(seen["code"], 1000, "{path}");
    }
}

#[tokio::test]
async fn compression_off_declines_on_both_legs() {
    let (mut server, port) = node_server(true).await;
    let gw = gateway(&route_to(
        "/z",
        &format!("ws://127.0.0.1:{port}/"),
        "compression = false",
        &[],
    ))
    .await;
    let lines = node_client(&format!("ws://{}/z", gw.local_addr()), true, STEPS).await;
    assert_echoed(&lines, "");
    // The client's offer is not passed on.
    assert_eq!(server.line().await.unwrap(), "offer");
    assert_eq!(server.line().await.unwrap(), "answer");
}

#[tokio::test]
async fn a_frame_policy_sees_and_changes_the_inflated_message() {
    let (_server, port) = node_server(true).await;
    let upper = script(
        "upper.lua",
        "return function(msg) return string.upper(msg.text) .. ' ' .. #msg.data end",
    );
    let gw = gateway(&route_to(
        "/z",
        &format!("ws://127.0.0.1:{port}/"),
        ON,
        &[("on_client_frame", &upper)],
    ))
    .await;
    let steps = r#"[{"text":"hello"},{"fragments":["a","b","c"]},{"expect":2},{"close":1000}]"#;
    let lines = node_client(&format!("ws://{}/z", gw.local_addr()), true, steps).await;
    assert_eq!(
        lines,
        [
            format!("answer {NO_TAKEOVER}"),
            "text HELLO 5".into(),
            "text ABC 3".into(),
            "close 1000".into()
        ]
    );
}

#[tokio::test]
async fn a_zip_bomb_is_closed_with_1009() {
    let up = echo().await;
    let gw = gateway(&route(
        "/z",
        up.addr,
        "compression = true\nmax_message_size = \"1MiB\"",
        &[],
    ))
    .await;
    // 50 MiB of zeros, about 50 KiB compressed: under the limit on the wire, far over it
    // inflated.
    let steps = r#"[{"text":"small"},{"expect":1},{"zeros":52428800}]"#;
    let lines = node_client(&format!("ws://{}/z", gw.local_addr()), true, steps).await;
    assert_eq!(lines[1], "text small", "{lines:?}");
    assert!(lines[2].starts_with("close 1009"), "{lines:?}");
}

/// A raw client's upgrade to `path` on `gw`, offering `extensions` (a header line or "").
async fn raw_client(gw: std::net::SocketAddr, path: &str, extensions: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(gw).await.unwrap();
    stream
        .write_all(upgrade_request(path, extensions).as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut stream).await.expect("a 101");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (stream, head)
}

/// Reads the close frame's code from the gateway (unmasked), skipping data frames.
async fn close_code(stream: &mut TcpStream) -> u16 {
    loop {
        let mut head = [0u8; 2];
        within("a frame", stream.read_exact(&mut head))
            .await
            .unwrap();
        let len = usize::from(head[1] & 0x7f);
        assert!(len < 126);
        let mut payload = vec![0u8; len];
        within("a payload", stream.read_exact(&mut payload))
            .await
            .unwrap();
        if head[0] & 0x0f == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

/// A masked frame with first byte `b0` (zero masking key) and a short payload.
fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![b0, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn rsv1_breaks_the_protocol_unless_it_starts_an_agreed_message() {
    let up = echo().await;
    // Every message compressed, however short (the default threshold would send the 5-byte
    // echo below as it is).
    let gw = gateway(&route(
        "/z",
        up.addr,
        "compression = true\ncompression_threshold = \"0\"",
        &[],
    ))
    .await;
    // Not negotiated: the client offered nothing.
    let (mut stream, head) = raw_client(gw.local_addr(), "/z", "").await;
    assert!(!head
        .to_ascii_lowercase()
        .contains("sec-websocket-extensions"));
    // "Hello" compressed (RFC 7692 §7.2.3.1).
    let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    stream.write_all(&frame(0xC1, &hello)).await.unwrap();
    assert_eq!(close_code(&mut stream).await, 1002);

    // Negotiated: the compressed "Hello" goes through; RSV1 on a continuation does not.
    let (mut stream, head) = raw_client(
        gw.local_addr(),
        "/z",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    )
    .await;
    assert!(
        head.contains(&format!("Sec-WebSocket-Extensions: {NO_TAKEOVER}")),
        "{head}"
    );
    stream.write_all(&frame(0xC1, &hello)).await.unwrap();
    let mut echoed = [0u8; 9];
    within("the echo", stream.read_exact(&mut echoed))
        .await
        .unwrap();
    assert_eq!(echoed, [0xC1, 7, 0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
    stream.write_all(&frame(0x01, b"a")).await.unwrap();
    stream.write_all(&frame(0xC0, b"b")).await.unwrap();
    assert_eq!(close_code(&mut stream).await, 1002);
}

/// Reads one whole frame from the gateway (unmasked, up to 64 KiB): its first byte and
/// payload.
async fn read_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    within("a frame", stream.read_exact(&mut head))
        .await
        .unwrap();
    let mut len = usize::from(head[1] & 0x7f);
    assert!(len < 127, "a test message under 64 KiB");
    if len == 126 {
        let mut ext = [0u8; 2];
        within("a length", stream.read_exact(&mut ext))
            .await
            .unwrap();
        len = usize::from(u16::from_be_bytes(ext));
    }
    let mut payload = vec![0u8; len];
    within("a payload", stream.read_exact(&mut payload))
        .await
        .unwrap();
    (head[0], payload)
}

/// A masked frame with first byte `b0` (zero masking key) and any payload up to 64 KiB.
fn long_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![b0, 0x80 | 126];
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// A compressed message's payload inflated (the sync tail put back, RFC 7692 §7.2.2).
fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut wire = payload.to_vec();
    wire.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut d = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(1 << 16);
    d.decompress_vec(&wire, &mut out, flate2::FlushDecompress::Sync)
        .expect("valid DEFLATE data");
    out
}

#[tokio::test]
async fn the_threshold_and_the_level_choose_what_is_compressed() {
    let up = echo().await;
    let gw = gateway(&format!(
        "{}{}{}",
        route("/default", up.addr, ON, &[]),
        route(
            "/level0",
            up.addr,
            "compression = true\ncompression_level = 0",
            &[]
        ),
        route(
            "/every",
            up.addr,
            "compression = true\ncompression_level = 9\ncompression_threshold = \"0\"",
            &[]
        ),
    ))
    .await;
    let offer = "Sec-WebSocket-Extensions: permessage-deflate\r\n";
    let json: String = (0..40)
        .map(|i| format!(r#"{{"id":{i},"user":"user{}","status":"filled"}},"#, i % 5))
        .collect();
    assert!(json.len() >= 1024, "{}", json.len());
    let short = "Hello";
    // "Hello" compressed (RFC 7692 §7.2.3.1): every route reads compressed messages.
    let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];

    // The defaults: level 1, messages from 1 KiB compressed, shorter ones sent as they are.
    let (mut s, head) = raw_client(gw.local_addr(), "/default", offer).await;
    assert!(head.contains(NO_TAKEOVER), "{head}");
    s.write_all(&frame(0x81, short.as_bytes())).await.unwrap();
    assert_eq!(read_frame(&mut s).await, (0x81, short.into()));
    s.write_all(&frame(0xC1, &hello)).await.unwrap();
    assert_eq!(read_frame(&mut s).await, (0x81, short.into()));
    s.write_all(&long_frame(0x81, json.as_bytes()))
        .await
        .unwrap();
    let (b0, payload) = read_frame(&mut s).await;
    assert_eq!(b0, 0xC1, "RSV1: compressed");
    assert!(payload.len() < json.len() / 2, "{} bytes", payload.len());
    assert_eq!(inflate(&payload), json.as_bytes());

    // Level 0: agreed (the client may compress), but nothing is sent compressed.
    let (mut s, head) = raw_client(gw.local_addr(), "/level0", offer).await;
    assert!(head.contains(NO_TAKEOVER), "{head}");
    s.write_all(&frame(0xC1, &hello)).await.unwrap();
    assert_eq!(read_frame(&mut s).await, (0x81, short.into()));
    s.write_all(&long_frame(0x81, json.as_bytes()))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut s).await, (0x81, json.clone().into_bytes()));

    // Threshold 0: even "Hello" goes compressed.
    let (mut s, _) = raw_client(gw.local_addr(), "/every", offer).await;
    s.write_all(&frame(0x81, short.as_bytes())).await.unwrap();
    let (b0, payload) = read_frame(&mut s).await;
    assert_eq!((b0, inflate(&payload)), (0xC1, short.into()));
    s.write_all(&long_frame(0x81, json.as_bytes()))
        .await
        .unwrap();
    let (b0, payload) = read_frame(&mut s).await;
    assert_eq!((b0, inflate(&payload)), (0xC1, json.into_bytes()));
}

#[tokio::test]
async fn an_upstream_answer_that_was_not_offered_fails_the_handshake() {
    for answer in [
        "permessage-deflate; client_max_window_bits=10",
        "permessage-deflate; server_max_window_bits=99",
        "x-unknown",
    ] {
        let line = format!("Sec-WebSocket-Extensions: {answer}\r\n");
        let up = raw_upstream(move |accept| {
            let head = switching_head(accept);
            head.replacen("\r\n\r\n", &format!("\r\n{line}\r\n"), 1)
                .into_bytes()
        })
        .await;
        let gw = gateway(&route("/z", up, ON, &[])).await;
        let (status, _, _) = raw_http(gw.local_addr(), &upgrade_request("/z", "")).await;
        assert_eq!(status, 502, "{answer}");
    }
}

/// Runs a Python `websockets` script (compression on by default) and returns its lines.
async fn python(script: &str, args: &[&str]) -> Vec<String> {
    let mut command = std::process::Command::new("python3");
    command
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null());
    let output = within(
        "the python client",
        tokio::task::spawn_blocking(move || command.output()),
    )
    .await
    .unwrap()
    .expect("missing: python3 (apt-get install python3 python3-websockets)");
    assert!(
        output.status.success(),
        "python failed (missing: python3-websockets?): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A child process ended, by its PID, when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a Python `websockets` echo server (compression on by default) and returns it with
/// its port.
async fn python_server() -> (Child, u16) {
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(PY_SERVER)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("missing: python3 (apt-get install python3 python3-websockets)");
    let stdout = child.stdout.take().expect("piped");
    let child = Child(child);
    let line = within(
        "the python server's port",
        tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .map(|_| line)
        }),
    )
    .await
    .unwrap()
    .unwrap();
    let port = line.trim().parse().unwrap_or_else(|_| {
        panic!("python server printed {line:?} (missing: python3-websockets?)")
    });
    (child, port)
}

const PY_SERVER: &str = r#"
import asyncio
from websockets.asyncio.server import serve
async def echo(ws):
    async for m in ws:
        await ws.send(m)
async def main():
    async with serve(echo, "127.0.0.1", 0) as s:
        print(s.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
"#;

const PY_CLIENT: &str = r#"
import asyncio, sys
from websockets.asyncio.client import connect
async def main():
    async with connect(sys.argv[1]) as ws:
        print("answer", ws.response.headers.get("Sec-WebSocket-Extensions", ""))
        for m in ["hello", "hello " * 1000, b"\x00" * 5000]:
            await ws.send(m)
            r = await ws.recv()
            print(type(r).__name__, len(r), r == m)
asyncio.run(main())
"#;

#[tokio::test]
async fn python_websockets_client_and_upstream() {
    // A compressing Python client, through to a plain upstream.
    let up = echo().await;
    let gw = gateway(&route("/z", up.addr, ON, &[])).await;
    let url = format!("ws://{}/z", gw.local_addr());
    let lines = python(PY_CLIENT, &[&url]).await;
    assert_eq!(
        lines,
        [
            &format!("answer {NO_TAKEOVER}"),
            "str 5 True",
            "str 6000 True",
            "bytes 5000 True"
        ]
    );
    // A compressing Python upstream (websockets' server), to a node client with and without
    // deflate.
    let (_server, port) = python_server().await;
    let gw = gateway(&route_to("/z", &format!("ws://127.0.0.1:{port}/"), ON, &[])).await;
    let url = format!("ws://{}/z", gw.local_addr());
    assert_echoed(&node_client(&url, false, STEPS).await, "");
    assert_echoed(&node_client(&url, true, STEPS).await, NO_TAKEOVER);
}

/// What each idle connection costs: `FRAMEGATE_RSS_MODE` is `plain` (compression off),
/// `fresh` (compression on both legs, no context takeover), `kept` (context takeover) or
/// `kept9` (context takeover, `compression_window_bits = 9`);
/// `FRAMEGATE_RSS_CONNS` connections (default 2000) each send one message each way, compressed
/// on both legs unless plain, and then stay idle. Prints this process's RSS growth per
/// connection: the gateway's, plus the test's own client and upstream sockets (the same in
/// every mode, so the difference between modes is compression's). A measurement, run by hand:
///
/// `FRAMEGATE_RSS_MODE=fresh cargo test --test deflate idle_connection_rss -- --ignored --nocapture`
#[tokio::test]
#[ignore = "a measurement, run by hand (docs/configuration.md)"]
async fn idle_connection_rss() {
    let mode = std::env::var("FRAMEGATE_RSS_MODE").unwrap_or_else(|_| "fresh".into());
    let conns: usize = std::env::var("FRAMEGATE_RSS_CONNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    // `compression_threshold = "0"`: the 5-byte messages below are compressed both ways, so
    // that each connection has used a compressor on both legs.
    let (compressed, extra) = match mode.as_str() {
        "plain" => (false, "compression = false"),
        "fresh" => (true, "compression = true\ncompression_threshold = \"0\""),
        "kept" => (
            true,
            "compression = true\ncompression_threshold = \"0\"\ncompression_context_takeover = true",
        ),
        "kept9" => (
            true,
            "compression = true\ncompression_threshold = \"0\"\ncompression_context_takeover = true\ncompression_window_bits = 9",
        ),
        other => panic!("FRAMEGATE_RSS_MODE {other:?}: plain, fresh, kept or kept9"),
    };
    // An upstream that agrees as asked, answers one message, and then holds the connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                let header = |name: &str| {
                    head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                    })
                };
                let key = header("sec-websocket-key").unwrap_or_default();
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                let mut answer = switching_head(&accept);
                if let Some(offer) = header("sec-websocket-extensions") {
                    answer = answer.replacen(
                        "\r\n\r\n",
                        &format!("\r\nSec-WebSocket-Extensions: {offer}\r\n\r\n"),
                        1,
                    );
                }
                stream.write_all(answer.as_bytes()).await.unwrap();
                let mut frame = [0u8; 6 + 7];
                let n = if compressed { 13 } else { 11 };
                stream.read_exact(&mut frame[..n]).await.unwrap();
                let reply: &[u8] = if compressed {
                    &[0xC1, 7, 0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]
                } else {
                    b"\x81\x05Hello"
                };
                stream.write_all(reply).await.unwrap();
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
            });
        }
    });
    let gw = gateway(&route("/z", up, extra, &[])).await;
    let offer = if compressed {
        "Sec-WebSocket-Extensions: permessage-deflate\r\n"
    } else {
        ""
    };
    let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    let open = |gw| async move {
        let (mut stream, _) = raw_client(gw, "/z", offer).await;
        let message = if compressed {
            frame(0xC1, &hello)
        } else {
            frame(0x81, b"Hello")
        };
        stream.write_all(&message).await.unwrap();
        let mut reply = vec![0u8; if compressed { 9 } else { 7 }];
        within("the reply", stream.read_exact(&mut reply))
            .await
            .unwrap();
        stream
    };
    // One first, so that what every connection shares (worker buffers, compressors) is in.
    let mut streams = vec![open(gw.local_addr()).await];
    let rss = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .expect("VmRSS in /proc/self/status")
    };
    let before = rss();
    for _ in 0..conns {
        streams.push(open(gw.local_addr()).await);
    }
    let after = rss();
    println!(
        "mode={mode} conns={conns} rss_before={before}kB rss_after={after}kB per_connection={:.2}kB",
        (after - before) as f64 / conns as f64
    );
}
