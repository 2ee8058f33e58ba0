//! Issue 15 §4: a real browser through a TLS listener. Headless Chromium (the system
//! `chromium`, driven by puppeteer-core in tests/js/browser.js; no browser download) loads a
//! page through the gateway over `https://` (an `http = "proxy"` route) and opens `wss://` to
//! it: text and binary echoes, close codes both ways, a `[route.jwt]` route refused (401)
//! without a token and let in with one, and the echo route's `origins` allow-list letting the
//! page's own origin in and refusing another (403).
//!
//! Chromium trusts the test certificate by its key (`--ignore-certificate-errors-spki-list`,
//! the SHA-256 of the leaf's SubjectPublicKeyInfo; see the script), not by ignoring errors.

mod support;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use framegate::Running;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use support::certs::Ca;
use support::node::{chromium, spawn};
use support::*;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "a-shared-secret-of-at-least-thirty-two-bytes";

/// The page the browser loads (any path): a title the test checks, nothing else.
const PAGE: &str = "<!doctype html><html><head><meta charset=\"utf-8\">\
                    <title>framegate browser test</title></head><body>ok</body></html>";

/// A plain HTTP upstream serving [`PAGE`] for every GET (favicon included), one request per
/// connection.
async fn page_upstream() -> SocketAddr {
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{PAGE}",
        PAGE.len()
    );
    raw_upstream_hanging_up(move |_| answer.clone().into_bytes()).await
}

/// A WebSocket echo that closes with a chosen code on command (`close:<code>:<reason>`) and
/// reports every close frame its clients send on the returned channel.
async fn echo_with_close() -> (Upstream, mpsc::UnboundedReceiver<Option<CloseFrame>>) {
    let (tx, closes) = mpsc::unbounded_channel();
    let up = upstream(Answer::default(), move |mut ws, _| {
        let tx = tx.clone();
        async move {
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Text(t) if t.starts_with("close:") => {
                        let mut parts = t.splitn(3, ':').skip(1);
                        let code = parts.next().and_then(|c| c.parse().ok()).unwrap_or(1000);
                        let reason = parts.next().unwrap_or("").to_string();
                        let _ = ws
                            .send(Message::Close(Some(close_frame(code, &reason))))
                            .await;
                    }
                    Message::Text(_) | Message::Binary(_) => {
                        let Ok(()) = ws.send(m).await else { return };
                    }
                    Message::Close(frame) => {
                        let _ = tx.send(frame);
                    }
                    _ => {}
                }
            }
        }
    })
    .await;
    (up, closes)
}

/// An HS256 token for the JWT route, valid for a minute.
fn token() -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({ "sub": "browser", "exp": now + 60 }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// `framegate_handshakes_total{route,status}` from the admin API's `/metrics` (0 when absent).
async fn handshakes(gw: &Running, route: &str, status: u16) -> u64 {
    let name = format!("framegate_handshakes_total{{route=\"{route}\",status=\"{status}\"}}");
    let request = "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
    let (status, _, body) = raw_http(gw.admin_addr().unwrap(), request).await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(&name)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn chromium_loads_a_page_over_https_and_talks_wss_through_the_gateway() {
    let chromium = chromium();
    let ca = Ca::new();
    let dir = TempDir::new("browser");
    ca.leaf(&["localhost", "127.0.0.1"]).write(&dir, "gateway");
    dir.write("hs.secret", SECRET);
    let page = page_upstream().await;
    let (up, mut closes) = echo_with_close().await;
    // A free port, fixed in the configuration: the echo route's allow-list names it.
    let port = closed_port().await.port();
    let origin = format!("https://localhost:{port}");
    let routes = [
        route_to(
            "/app/{*rest}",
            &format!("ws://{page}/app/{{rest}}"),
            "http = \"proxy\"",
            &[],
        ),
        route("/echo", up.addr, &format!("origins = [{origin:?}]"), &[]),
        route(
            "/private",
            up.addr,
            "[route.jwt]\nsecret_file = \"hs.secret\"\nfrom = [\"query:access_token\"]\nstrip = true",
            &[],
        ),
    ]
    .concat();
    let toml = format!(
        "[server]\nlisten = []\n\
         [[server.tls]]\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"gateway.pem\"\nkey_file = \"gateway.key\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n{routes}"
    );
    let gw = start_from(&dir, &toml).await;
    assert_eq!(gw.tls_addrs()[0].port(), port);

    let cert = dir.0.join("gateway.pem").display().to_string();
    let token = token();
    let mut browser = spawn(
        "browser.js",
        &[
            &chromium.display().to_string(),
            &origin,
            &format!("https://127.0.0.1:{port}"),
            &cert,
            &token,
        ],
    );
    let launched = browser.line().await.unwrap_or_default();
    assert!(launched.starts_with("launched "), "{launched}");
    let line = browser.line().await.unwrap_or_default();
    let seen: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line}"));
    let ended = within("the browser script to end", async {
        tokio::task::spawn_blocking(move || browser.child.wait())
            .await
            .unwrap()
    })
    .await
    .expect("the browser script ran");
    assert!(ended.success(), "the browser script failed: {ended}");

    // The page, through the `http = "proxy"` route over https://.
    assert_eq!(seen["page"]["status"], 200, "{seen}");
    assert_eq!(seen["page"]["title"], "framegate browser test", "{seen}");

    // Text and binary echoes, then the server's close code and reason as the page saw them.
    let echo = &seen["echo"];
    assert_eq!(echo["origin"], origin.as_str(), "{seen}");
    assert_eq!(echo["opened"], true, "{seen}");
    assert_eq!(
        echo["messages"],
        serde_json::json!(["hello ☃", [0, 1, 2, 253, 254, 255]]),
        "{seen}"
    );
    assert_eq!(echo["close"]["code"], 4001, "{seen}");
    assert_eq!(echo["close"]["reason"], "bye", "{seen}");
    assert_eq!(echo["close"]["wasClean"], true, "{seen}");

    // The page closes with its own code: the upstream gets it, the page sees it echoed.
    let client_close = &seen["client_close"];
    assert_eq!(client_close["messages"], serde_json::json!(["once more"]));
    assert_eq!(client_close["close"]["code"], 4002, "{seen}");
    // (The upstream also sees the page answer its own 4001 with 4001.)
    let frame = within("the page's 4002 at the upstream", async {
        loop {
            match closes.recv().await.expect("the upstream runs") {
                Some(frame) if u16::from(frame.code) == 4002 => return frame,
                _ => continue,
            }
        }
    })
    .await;
    assert_eq!(frame.reason.as_str(), "page done");

    // No token: the gateway refused with 401; a browser shows only an error and 1006.
    let refused = &seen["no_token"];
    assert_eq!(refused["opened"], false, "{seen}");
    assert_eq!(refused["error"], true, "{seen}");
    assert_eq!(refused["close"]["code"], 1006, "{seen}");
    assert_eq!(handshakes(&gw, "/private", 401).await, 1);
    // With the token in the query string: in, and echoing.
    let authorized = &seen["token"];
    assert_eq!(authorized["opened"], true, "{seen}");
    assert_eq!(authorized["messages"], serde_json::json!(["with a token"]));
    assert_eq!(authorized["close"]["code"], 4003, "{seen}");
    assert_eq!(handshakes(&gw, "/private", 101).await, 1);

    // The same page from https://127.0.0.1:<port>: not on the echo route's allow-list.
    let other = &seen["other_origin"];
    assert_eq!(
        other["origin"],
        format!("https://127.0.0.1:{port}").as_str(),
        "{seen}"
    );
    assert_eq!(other["opened"], false, "{seen}");
    assert_eq!(other["close"]["code"], 1006, "{seen}");
    assert_eq!(handshakes(&gw, "/echo", 403).await, 1);
    assert_eq!(handshakes(&gw, "/echo", 101).await, 2);
    gw.shutdown().await;
}
