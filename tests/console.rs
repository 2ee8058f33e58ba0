//! Issue 16 §1: the traffic console in a real browser. Headless Chromium (the system
//! `chromium`, driven by puppeteer-core in tests/js/console_browser.js; no browser download)
//! opens `GET /console` on the gateway's admin listener with its token (HTTP Basic), while real
//! WebSocket clients talk through the gateway to a real echo upstream:
//! - the connections appear in the list and the text filter narrows it;
//! - one connection's Upgrade request (secrets masked) and the upstream's 101, and its
//!   messages with payloads and the Lua policy's decisions (forwarded, replaced with before and
//!   after, dropped), the JSON field `password` masked, binary shown as hex;
//! - direction and type filters, pause, capture switched to metadata and back, the download;
//! - messages sent through the console to the client and to the upstream (echoed back), which
//!   the test's client receives, one of them markup that the page shows as text;
//! - a refused close code shown in the status line, then a close with 4001 "kicked" that the
//!   client receives and the page shows;
//! - a connection on a route without capture: the console turns capture on and sees what
//!   follows.
//!
//! With `CONSOLE_SCREENSHOTS=<dir>` the script saves the screenshots of docs/console.md there.

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use support::node::{chromium, spawn};
use support::*;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "console-test-token-0123456789abcdef";

/// Drops "drop-me", replaces "up" with "UP", forwards the rest.
const FRAME_POLICY: &str = r#"
return function(msg, ctx, conn)
  if msg.data == "drop-me" then return false end
  if msg.data == "up" then return "UP" end
end
"#;

/// Tags the captured route's connections, for the console's text filter.
const UPGRADE_POLICY: &str = r#"
return function(req, ctx)
  req:tag("test", "console-test")
end
"#;

/// A payload the console must show as text (tests/js/console_browser.js sends it upstream).
const MARKUP: &str = r#"<img src=x onerror="window.injected=1"><b>bold</b>"#;

/// What a client received after the test handed it to [`collect`].
#[derive(Debug)]
enum Seen {
    Data(Message),
    Close(Option<CloseFrame>),
}

/// Reads `client` until it closes, reporting each data message and the close frame. Reading
/// also answers the gateway's close at once, so the page sees the close without waiting for
/// a timeout.
fn collect(mut client: Client) -> mpsc::UnboundedReceiver<Seen> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = client.next().await {
            match m {
                Message::Close(frame) => {
                    let _ = tx.send(Seen::Close(frame));
                }
                Message::Text(_) | Message::Binary(_) => {
                    let _ = tx.send(Seen::Data(m));
                }
                _ => {}
            }
        }
    });
    rx
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    within("a message at the test client", rx.recv())
        .await
        .expect("the client's reader reports until the close")
}

/// The message rows the page showed that match `pred`.
fn rows<'a>(messages: &'a Value, pred: impl Fn(&Value) -> bool + 'a) -> Vec<&'a Value> {
    messages
        .as_array()
        .expect("messages is an array")
        .iter()
        .filter(|m| pred(m))
        .collect()
}

#[tokio::test]
async fn the_console_shows_live_traffic_and_controls_a_connection_in_chromium() {
    let chromium = chromium();
    let dir = TempDir::new("console");
    dir.write("admin.token", &format!("{TOKEN}\n"));
    let up = echo().await;
    let routes = [
        route(
            "/captured",
            up.addr,
            "[route.capture]\nmode = \"payload\"",
            &[
                ("on_upgrade", &script("tag.lua", UPGRADE_POLICY)),
                ("on_client_frame", &script("frames.lua", FRAME_POLICY)),
            ],
        ),
        route("/plain", up.addr, "", &[]),
    ]
    .concat();
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n\n{routes}"
    );
    let gw = start_from(&dir, &toml).await;
    let addr = gw.local_addrs()[0];
    let admin = gw.admin_addr().expect("an admin listener");

    // The captured connection: a JSON message with a password, one the policy rewrites, one it
    // drops, and a binary one; each echo awaited so that all have gone through.
    let (mut a, _) = connect_with(addr, "/captured", &[("Cookie", "sid=cookie-SECRET")])
        .await
        .expect("upgrade succeeds");
    let hello = r#"{"hello":"world","password":"hunter2"}"#;
    a.send(Message::text(hello)).await.unwrap();
    assert_eq!(next_text(&mut a).await, hello);
    a.send(Message::text("up")).await.unwrap();
    assert_eq!(next_text(&mut a).await, "UP");
    a.send(Message::text("drop-me")).await.unwrap();
    let bytes = vec![0u8, 1, 2, 0xfe, 0xff];
    a.send(Message::binary(bytes.clone())).await.unwrap();
    match next_message(&mut a).await {
        Some(Ok(Message::Binary(b))) => assert_eq!(b.to_vec(), bytes, "the binary echo"),
        other => panic!("expected the binary echo (drop-me dropped), got {other:?}"),
    }
    let a_local = a.get_ref().local_addr().unwrap();
    let mut a_seen = collect(a);

    // The plain connection: no capture on its route.
    let mut b = connect(addr, "/plain").await;
    b.send(Message::text("plain hi")).await.unwrap();
    assert_eq!(next_text(&mut b).await, "plain hi");
    let mut b_seen = collect(b);

    let base = format!("http://{admin}");
    let mut browser = spawn(
        "console_browser.js",
        &[
            &chromium.display().to_string(),
            &base,
            TOKEN,
            "/captured",
            "/plain",
        ],
    );
    let launched = browser.line().await.unwrap_or_default();
    assert!(launched.starts_with("launched "), "{launched}");
    let line = loop {
        let line = browser.line().await.unwrap_or_default();
        if !line.starts_with("step ") {
            break line;
        }
    };
    let seen: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line}"));
    let ended = within("the browser script to end", async {
        tokio::task::spawn_blocking(move || browser.child.wait())
            .await
            .unwrap()
    })
    .await
    .expect("the browser script ran");
    assert!(ended.success(), "the browser script failed: {ended}");
    assert_eq!(seen["page_errors"], serde_json::json!([]), "{seen}");

    // Credentials: none gets a Basic challenge; the page loads with them.
    assert_eq!(seen["unauthenticated"]["status"], 401, "{seen}");
    assert!(
        seen["unauthenticated"]["www_authenticate"]
            .as_str()
            .is_some_and(|v| v.starts_with("Basic realm=\"framegate-admin\"")),
        "{seen}"
    );
    assert_eq!(seen["page"]["status"], 200, "{seen}");
    assert_eq!(seen["page"]["title"], "framegate traffic console", "{seen}");

    // The list and its filter.
    let row = &seen["row"];
    assert_eq!(row["route"], "/captured", "{seen}");
    assert_eq!(row["client"], a_local.to_string().as_str(), "{seen}");
    assert_eq!(
        row["upstream"],
        format!("ws://{}/", up.addr).as_str(),
        "{seen}"
    );
    assert_eq!(row["tags"], "test:console-test", "{seen}");
    assert_eq!(row["msgs"], "3 / 3", "3 forwarded each way: {seen}");
    assert_eq!(seen["filter"]["captured_hidden"], false, "{seen}");
    assert_eq!(seen["filter"]["plain_hidden"], true, "{seen}");

    // The handshake: the request with its cookie masked, and the upstream's 101.
    let detail = &seen["detail"];
    let id = row["id"].as_u64().expect("a numeric id");
    assert_eq!(detail["id"], format!("#{id}").as_str(), "{seen}");
    assert_eq!(detail["capture_mode"], "payload", "{seen}");
    assert_eq!(detail["request_line"], "GET /captured", "{seen}");
    let cookie = detail["request_headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0].as_str().unwrap().eq_ignore_ascii_case("cookie"));
    assert_eq!(
        cookie.map(|h| &h[1]),
        Some(&Value::from("<redacted>")),
        "{seen}"
    );
    assert!(!seen.to_string().contains("cookie-SECRET"), "{seen}");
    assert_eq!(detail["response_line"], "HTTP/1.1 101", "{seen}");
    let response_headers = detail["response_headers"].to_string().to_lowercase();
    assert!(response_headers.contains("sec-websocket-accept"), "{seen}");

    // The messages: payloads and decisions as the policy made them.
    let messages = &seen["messages"];
    let json_in = rows(messages, |m| {
        m["direction"] == "client_to_upstream"
            && m["payload"].as_str().is_some_and(|p| p.contains("hello"))
    });
    assert_eq!(json_in.len(), 1, "{seen}");
    let json_in = json_in[0];
    assert_eq!(json_in["decision"], "forwarded", "{seen}");
    assert_eq!(json_in["type"], "text", "{seen}");
    assert_eq!(json_in["kind"], "json", "shown as pretty JSON: {seen}");
    let mask = json_in["mask"].as_str().unwrap();
    assert!(
        mask.len() == 8 && mask.chars().all(|c| c.is_ascii_hexdigit()),
        "a client frame's masking key: {seen}"
    );
    assert!(
        json_in["payload"]
            .as_str()
            .unwrap()
            .contains("\"password\": \"<redacted>\""),
        "{seen}"
    );
    assert!(
        !seen.to_string().contains("hunter2"),
        "the password is masked everywhere: {seen}"
    );
    let replaced = rows(messages, |m| m["decision"] == "replaced");
    assert_eq!(replaced.len(), 1, "{seen}");
    assert_eq!(replaced[0]["before"], "up", "{seen}");
    assert_eq!(replaced[0]["after"], "UP", "{seen}");
    let dropped = rows(messages, |m| m["decision"] == "dropped");
    assert_eq!(dropped.len(), 1, "{seen}");
    assert_eq!(dropped[0]["payload"], "drop-me", "{seen}");
    let binary_out = rows(messages, |m| {
        m["type"] == "binary" && m["direction"] == "upstream_to_client"
    });
    assert_eq!(binary_out.len(), 1, "{seen}");
    assert_eq!(binary_out[0]["kind"], "hex", "{seen}");
    assert!(
        binary_out[0]["payload"]
            .as_str()
            .unwrap()
            .contains("00 01 02 fe ff"),
        "{seen}"
    );
    assert_eq!(binary_out[0]["mask"], "", "upstream frames are not masked");

    // Filters and pause.
    let directions = seen["direction_filter"].as_array().unwrap();
    assert!(!directions.is_empty(), "{seen}");
    assert!(
        directions.iter().all(|d| d == "upstream_to_client"),
        "{seen}"
    );
    assert!(
        seen["type_filter"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t != "text"),
        "{seen}"
    );
    assert!(
        seen["pause"]["count"]
            .as_str()
            .unwrap()
            .contains("paused · 1 new"),
        "{seen}"
    );
    assert_eq!(seen["pause"]["shown_while_paused"], false, "{seen}");

    // Markup in a payload stays text.
    assert_eq!(seen["markup"]["elements"], 0, "{seen}");
    assert_eq!(seen["markup"]["injected"], false, "{seen}");

    // The download.
    let download = &seen["download"];
    assert_eq!(
        download["name"],
        format!("framegate-conn-{id}.json").as_str(),
        "{seen}"
    );
    assert_eq!(download["id"], id, "{seen}");
    assert_eq!(download["mode"], "payload", "{seen}");
    assert!(download["entries"].as_u64().unwrap() >= 12, "{seen}");
    assert_eq!(download["has_password"], false, "{seen}");

    // The refused close code, in the status line with the API's error text.
    let bad = seen["bad_close"].as_str().unwrap();
    assert!(
        bad.contains("400") && bad.contains("close code 1005 is not allowed"),
        "{seen}"
    );

    // What the console sent reached the client, in order, then the close.
    let mut got = Vec::new();
    let close = loop {
        match next_seen(&mut a_seen).await {
            Seen::Data(m) => got.push(m),
            Seen::Close(frame) => break frame.expect("a close frame with a code"),
        }
    };
    assert_eq!(
        got,
        vec![
            Message::text("while paused"),
            Message::text("to the upstream"),
            Message::text(MARKUP),
            Message::binary(vec![0xc0u8, 0xff, 0xee]),
            Message::text("metadata only"),
        ]
    );
    assert_eq!(u16::from(close.code), 4001);
    assert_eq!(close.reason.as_str(), "kicked");
    assert_eq!(seen["closed"], "closed 4001 kicked (by admin)", "{seen}");
    // The sent messages as the page showed them.
    let after = &seen["after_close"];
    let sent = rows(after, |m| m["decision"] == "sent" && m["from"] == "admin");
    assert_eq!(sent.len(), 5, "{seen}");
    // Then the close frames framegate sent each side.
    let closes = rows(after, |m| m["from"] == "gateway");
    assert_eq!(closes.len(), 2, "{seen}");
    assert_eq!(closes[0]["type"], "close 4001 kicked", "{seen}");
    assert_eq!(
        rows(after, |m| m["decision"] == "sent"
            && m["no_payload"] == true)
        .len(),
        1,
        "the message sent under metadata capture has no payload: {seen}"
    );

    // The plain connection: capture turned on by the console, then an echo seen.
    let plain = &seen["plain"];
    assert!(
        plain["before"]
            .as_str()
            .unwrap()
            .starts_with("Capture is off"),
        "{seen}"
    );
    assert_eq!(
        plain["response_line"], "not recorded",
        "capture was off at its upgrade: {seen}"
    );
    let late = rows(&plain["messages"], |m| {
        m["direction"] == "upstream_to_client" && m["payload"] == "late capture"
    });
    assert_eq!(late.len(), 1, "{seen}");
    assert_eq!(late[0]["decision"], "forwarded", "{seen}");
    match next_seen(&mut b_seen).await {
        Seen::Data(m) => assert_eq!(m, Message::text("late capture")),
        Seen::Close(frame) => panic!("the plain client closed: {frame:?}"),
    }

    // Kicked while the pointer was over the list: its row stayed, marked closed (and no longer
    // counted), until the pointer left.
    let gone = &seen["gone"];
    assert_eq!(gone["kicked"], 200, "{seen}");
    assert_eq!(gone["kept"]["age"], "closed", "{seen}");
    assert_eq!(gone["kept"]["count"], "(0)", "{seen}");
    assert_eq!(gone["removed"], true, "{seen}");
    match next_seen(&mut b_seen).await {
        Seen::Close(frame) => assert_eq!(
            frame.map(|f| (u16::from(f.code), f.reason.to_string())),
            Some((4002, "gone".to_owned()))
        ),
        Seen::Data(m) => panic!("expected the kick, got {m:?}"),
    }
    gw.shutdown().await;
}
