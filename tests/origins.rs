//! Issue 15 §3: a route's `Origin` allow-list (`origins`, `allow_missing_origin`) over real
//! sockets: a foreign origin and a missing one get 403 before any policy runs, listed origins
//! and wildcard matches get through, and a route without the list lets anything in.

mod support;

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::{self, Message};

/// An `on_upgrade` policy that counts its runs in `gw.shared` under `key`.
fn counting(key: &str) -> String {
    script(
        "count.lua",
        &format!("return function(req) gw.shared:incr({key:?}) end\n"),
    )
}

/// A route whose `on_upgrade` answers 418 with the count under `key` (or 0).
fn counter_route(key: &str) -> String {
    let policy = script(
        "read.lua",
        &format!(
            "return function(req) req:reject(418, tostring(gw.shared:get({key:?}) or 0)) end\n"
        ),
    );
    format!(
        "[[route]]\npath = \"/count\"\nupstream = \"ws://127.0.0.1:9/\"\n[route.policies]\non_upgrade = {policy}\n"
    )
}

/// How many times the counting policy ran.
async fn ran(addr: std::net::SocketAddr) -> String {
    let (status, _, body) = raw_http(addr, &upgrade_request("/count", "")).await;
    assert_eq!(status, 418);
    body
}

/// The status an upgrade to `path` with these extra header lines gets.
async fn status(addr: std::net::SocketAddr, path: &str, extra: &str) -> (u16, String) {
    let (status, _, body) = raw_http(addr, &upgrade_request(path, extra)).await;
    (status, body)
}

#[tokio::test]
async fn only_listed_origins_get_through_and_refusals_run_no_policy() {
    let up = echo().await;
    let routes = format!(
        "{}{}",
        route(
            "/app",
            up.addr,
            "origins = [\"https://app.example.com\", \"https://*.example.org\", \"http://localhost:3000\"]",
            &[("on_upgrade", &counting("app"))],
        ),
        counter_route("app"),
    );
    let gw = gateway(&routes).await;
    let addr = gw.local_addr();
    for foreign in [
        "https://evil.example",
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://example.org",
        "https://app.example.com.evil.example",
        "null",
        "http://localhost:3001",
    ] {
        let (code, body) = status(addr, "/app", &format!("Origin: {foreign}\r\n")).await;
        assert_eq!(code, 403, "{foreign}: {body}");
        assert!(
            !body.contains(foreign),
            "the refusal does not echo the origin"
        );
    }
    // No Origin at all: refused too (allow_missing_origin is off).
    assert_eq!(status(addr, "/app", "").await.0, 403);
    // Two Origin headers: refused.
    let two = "Origin: https://app.example.com\r\nOrigin: https://app.example.com\r\n";
    assert_eq!(status(addr, "/app", two).await.0, 403);
    assert_eq!(ran(addr).await, "0", "no policy ran on a refusal");

    for allowed in [
        "https://app.example.com",
        "HTTPS://App.Example.COM:443",
        "https://a.example.org",
        "https://a.b.example.org",
        "http://localhost:3000",
    ] {
        let (mut ws, _) = connect_with(addr, "/app", &[("origin", allowed)])
            .await
            .unwrap_or_else(|e| panic!("{allowed}: {e}"));
        ws.send(Message::text(allowed)).await.unwrap();
        assert_eq!(next_text(&mut ws).await, allowed);
    }
    assert_eq!(ran(addr).await, "5");
}

#[tokio::test]
async fn allow_missing_origin_lets_native_clients_in_but_not_foreign_pages() {
    let up = echo().await;
    let routes = format!(
        "{}{}{}",
        route(
            "/native",
            up.addr,
            "origins = [\"https://app.example.com\"]\nallow_missing_origin = true",
            &[],
        ),
        route(
            "/native-only",
            up.addr,
            "origins = []\nallow_missing_origin = true",
            &[],
        ),
        route("/open", up.addr, "", &[]),
    );
    let gw = gateway(&routes).await;
    let addr = gw.local_addr();
    // tungstenite sends no Origin: a native client.
    let mut ws = connect(addr, "/native").await;
    ws.send(Message::text("native")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "native");
    connect_with(addr, "/native", &[("origin", "https://app.example.com")])
        .await
        .unwrap();
    let refused = connect_with(addr, "/native", &[("origin", "https://evil.example")]).await;
    match refused {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|(_, r)| r.status())),
    }
    // An empty list with allow_missing_origin: native clients only.
    connect(addr, "/native-only").await;
    let (code, _) = status(addr, "/native-only", "Origin: https://app.example.com\r\n").await;
    assert_eq!(code, 403);
    // Without origins, anything goes, as before.
    connect_with(addr, "/open", &[("origin", "https://evil.example")])
        .await
        .unwrap();
    connect(addr, "/open").await;
}
