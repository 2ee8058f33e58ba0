//! Issue 16 §1, the traffic console's backend over real sockets: `[route.capture]`, the capture
//! endpoints of the admin listener (JSON and server-sent events), turning capture on for a
//! running connection, masking, the console page's authentication and its CSRF guard. The page
//! itself runs in headless Chromium in tests/console.rs.

mod support;

use support::admin_http::{request, Reply};

use std::net::SocketAddr;

use base64::Engine;
use bytes::Bytes;
use futures_util::SinkExt;
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "console-token-0123456789";

/// A gateway with an admin listener (token required) and `routes`.
async fn gateway_with_admin(dir: &TempDir, routes: &str) -> (framegate::Running, SocketAddr) {
    dir.write("admin.token", TOKEN);
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n{routes}"
    );
    let gw = start_from(dir, &toml).await;
    let admin = gw.admin_addr().expect("admin listener");
    (gw, admin)
}

async fn call(addr: SocketAddr, method: &str, uri: &str, headers: &[(&str, &str)]) -> Reply {
    let host = addr.to_string();
    let mut with_host = vec![("host", host.as_str())];
    with_host.extend_from_slice(headers);
    request(addr, method, uri, &with_host, Bytes::new()).await
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

async fn get(addr: SocketAddr, uri: &str) -> Reply {
    call(addr, "GET", uri, &[("authorization", &bearer())]).await
}

async fn post(addr: SocketAddr, uri: &str) -> Reply {
    call(addr, "POST", uri, &[("authorization", &bearer())]).await
}

/// The id of the only open connection, once it is registered (just after its 101 went out).
async fn only_connection(admin: SocketAddr) -> u64 {
    within("the connection's entry", async {
        loop {
            let list = get(admin, "/admin/connections").await.json();
            assert!(list["matched"].as_u64() <= Some(1), "{list}");
            if let Some(id) = list["connections"][0]["id"].as_u64() {
                return id;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// Polls the capture until `done` holds (the relay records as it goes, the admin reads
/// whenever asked: there is no event to wait for but the entries themselves).
async fn capture_until(admin: SocketAddr, id: u64, done: impl Fn(&Value) -> bool) -> Value {
    within("the capture's entries", async {
        loop {
            let c = get(admin, &format!("/admin/connections/{id}/capture")).await;
            assert_eq!(c.status, 200, "{:?}", c.body);
            let c = c.json();
            if done(&c) {
                return c;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

fn entries(c: &Value) -> &Vec<Value> {
    c["entries"].as_array().unwrap()
}

const POLICY: &str = r#"
return function(msg, ctx, conn)
  if msg.text == "drop-me" then return false end
  if msg.text == "up" then return "UP" end
  if msg.text == "ask" then conn:reply("answer"); return false end
end
"#;

#[tokio::test]
async fn a_captured_route_records_each_message_its_decision_and_the_handshake() {
    let up = echo().await;
    let dir = TempDir::new("capture-route");
    let policy = script("capture.lua", POLICY);
    let (gw, admin) = gateway_with_admin(
        &dir,
        &route(
            "/cap",
            up.addr,
            "[route.capture]\nmode = \"payload\"\nmax_payload = \"40B\"",
            &[("on_client_frame", &policy)],
        ),
    )
    .await;
    let mut ws = connect(gw.local_addr(), "/cap").await;
    for m in [
        r#"{"user":"ann","password":"hunter2"}"#,
        "up",
        "drop-me",
        "ask",
    ] {
        ws.send(Message::text(m)).await.unwrap();
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    // The echo answers the JSON, "UP" and the binary; the policy answers "ask".
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(
            next_message(&mut ws)
                .await
                .expect("a message")
                .expect("no error"),
        );
    }
    assert!(got.contains(&Message::text("answer")), "{got:?}");
    let id = only_connection(admin).await;
    let c = capture_until(admin, id, |c| entries(c).len() >= 9).await;
    assert_eq!(c["mode"], "payload");
    assert_eq!(c["route"], "/cap");
    // The handshake: the request (the key is there, the password is nowhere) and the 101.
    let req = &c["request"];
    assert_eq!(req["method"], "GET");
    assert!(
        req["headers"]
            .to_string()
            .to_lowercase()
            .contains("sec-websocket-key"),
        "{req}"
    );
    let res = &c["response"];
    assert_eq!(res["status"], 101);
    assert!(
        res["headers"]
            .to_string()
            .to_lowercase()
            .contains("sec-websocket-accept"),
        "{res}"
    );

    let from_client: Vec<&Value> = entries(&c)
        .iter()
        .filter(|e| e["direction"] == "client_to_upstream" && e["from"] == "client")
        .collect();
    let json = from_client[0];
    assert_eq!(json["type"], "text");
    assert_eq!(json["decision"], "forwarded");
    assert_eq!(json["payload"], r#"{"user":"ann","password":"<redacted>"}"#);
    assert_eq!(json["truncated"], false);
    assert_eq!(json["frames"], 1);
    assert_eq!(json["mask"].as_str().map(str::len), Some(8), "{json}");
    assert!(json["policy_us"].is_u64(), "{json}");
    let up_entry = from_client[1];
    assert_eq!(up_entry["decision"], "replaced");
    assert_eq!(up_entry["payload"], "up");
    assert_eq!(up_entry["after"]["payload"], "UP");
    assert_eq!(from_client[2]["decision"], "dropped");
    assert_eq!(from_client[3]["decision"], "replied");
    let binary = from_client[4];
    assert_eq!(
        (binary["type"].as_str(), binary["encoding"].as_str()),
        (Some("binary"), Some("base64"))
    );
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(binary["payload"].as_str().unwrap())
            .unwrap(),
        [0, 1, 2, 255]
    );
    // The policy's reply, and the upstream's echoes, unmasked and in order.
    assert!(entries(&c).iter().any(|e| e["from"] == "policy"
        && e["decision"] == "sent"
        && e["direction"] == "upstream_to_client"
        && e["payload"] == "answer"));
    let echoed: Vec<&Value> = entries(&c)
        .iter()
        .filter(|e| e["from"] == "upstream")
        .collect();
    assert_eq!(echoed[1]["payload"], "UP");
    assert_eq!(echoed[0]["mask"], Value::Null);
    assert!(gw.shutdown().await == framegate::ShutdownOutcome::Drained);
}

#[tokio::test]
async fn the_console_turns_capture_on_for_a_running_connection_and_off_again() {
    let up = echo().await;
    let dir = TempDir::new("capture-live");
    let (gw, admin) = gateway_with_admin(&dir, &route("/plain", up.addr, "", &[])).await;
    let mut ws = connect(gw.local_addr(), "/plain").await;
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "before");
    let id = only_connection(admin).await;
    // Nothing recorded yet, and nothing to show.
    assert_eq!(
        get(admin, &format!("/admin/connections/{id}")).await.json()["capture"]["mode"],
        "off"
    );
    assert_eq!(
        get(admin, &format!("/admin/connections/{id}/capture"))
            .await
            .status,
        404
    );

    let on = post(
        admin,
        &format!("/admin/connections/{id}/capture?mode=metadata"),
    )
    .await;
    assert_eq!(
        (on.status, on.json()["mode"].as_str()),
        (200, Some("metadata"))
    );
    assert_eq!(
        get(admin, &format!("/admin/connections/{id}")).await.json()["capture"]["mode"],
        "metadata"
    );
    // The relay takes the capture at its next wake-up: this message (and its echo) or a later one.
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "after");
    let c = capture_until(admin, id, |c| entries(c).len() >= 2).await;
    let e = &entries(&c)[0];
    assert_eq!(
        (e["type"].as_str(), e["size"].as_u64()),
        (Some("text"), Some(5))
    );
    assert!(
        e.get("payload").is_none(),
        "metadata mode keeps no payload: {e}"
    );
    // A capture turned on later has the request but not the upstream's 101.
    assert_eq!(c["response"], Value::Null);
    assert_eq!(c["request"]["method"], "GET");

    post(
        admin,
        &format!("/admin/connections/{id}/capture?mode=payload"),
    )
    .await;
    ws.send(Message::text("shown")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "shown");
    let c = capture_until(admin, id, |c| {
        entries(c).iter().any(|e| e["payload"] == "shown")
    })
    .await;
    let n = entries(&c).len();
    post(admin, &format!("/admin/connections/{id}/capture?mode=off")).await;
    ws.send(Message::text("hidden")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hidden");
    // A ping and its answer later: everything before is in order, nothing after "off".
    assert_eq!(
        entries(
            &get(admin, &format!("/admin/connections/{id}/capture"))
                .await
                .json()
        )
        .len(),
        n
    );

    let bad = post(admin, &format!("/admin/connections/{id}/capture?mode=all")).await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        post(admin, "/admin/connections/999999/capture?mode=payload")
            .await
            .status,
        404
    );
    drop(ws);
    gw.shutdown().await;
}

/// Reads server-sent events from `stream` until it ends, which it does after `event: closed`.
/// (Each event arrives whole in one chunk; the chunks' size lines are skipped.)
async fn events_until_closed(stream: &mut tokio::net::TcpStream) -> Vec<(String, Value)> {
    let mut raw = Vec::new();
    within("the stream's end", stream.read_to_end(&mut raw))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains("event: closed"), "{text}");
    text.split("\n\n")
        .filter_map(|block| {
            let name = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name.to_owned(), serde_json::from_str(data).unwrap()))
        })
        .collect()
}

#[tokio::test]
async fn the_stream_tells_a_late_reader_what_it_lost_then_shows_the_kick() {
    let up = echo().await;
    let dir = TempDir::new("capture-stream");
    let (gw, admin) = gateway_with_admin(
        &dir,
        &route(
            "/s",
            up.addr,
            "[route.capture]\nmode = \"payload\"\nkeep = 3",
            &[],
        ),
    )
    .await;
    let mut ws = connect(gw.local_addr(), "/s").await;
    for i in 0..3 {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        assert_eq!(next_text(&mut ws).await, format!("m{i}"));
    }
    let id = only_connection(admin).await;
    // Six entries were made (three each way); the ring keeps three.
    capture_until(admin, id, |c| c["lost"] == 3).await;
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let head = format!(
        "GET /admin/connections/{id}/capture/stream HTTP/1.1\r\nhost: {admin}\r\nauthorization: {}\r\n\r\n",
        bearer()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let kick = call(
        admin,
        "DELETE",
        &format!("/admin/connections/{id}?code=4001&reason=kicked"),
        &[("authorization", &bearer())],
    )
    .await;
    assert_eq!(kick.status, 200);
    assert_eq!(expect_close(&mut ws).await.code, 4001.into());
    let events = events_until_closed(&mut stream).await;
    assert_eq!(
        events[0],
        ("lost".to_owned(), serde_json::json!({"lost": 3}))
    );
    let seqs: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "entry")
        .map(|(_, e)| e["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert_eq!(seqs[0], 4);
    let (name, closed) = events.last().unwrap();
    assert_eq!(name, "closed");
    assert_eq!(
        (closed["code"].as_u64(), closed["reason"].as_str()),
        (Some(4001), Some("kicked"))
    );
    assert_eq!(closed["by"], "admin");
    assert!(events.iter().any(|(n, e)| n == "entry" && e["seq"] == 6));
    // A browser's EventSource resumes after the last id it got.
    let mut again = tokio::net::TcpStream::connect(admin).await.unwrap();
    let head = format!(
        "GET /admin/connections/{id}/capture/stream HTTP/1.1\r\nhost: {admin}\r\nauthorization: {}\r\nlast-event-id: 5\r\n\r\n",
        bearer()
    );
    again.write_all(head.as_bytes()).await.unwrap();
    let resumed = events_until_closed(&mut again).await;
    let names: Vec<(&str, Option<u64>)> = resumed
        .iter()
        .map(|(n, e)| (n.as_str(), e["seq"].as_u64()))
        .collect();
    // The close frames framegate sent each leg are entries too.
    assert_eq!(
        names,
        [
            ("entry", Some(6)),
            ("entry", Some(7)),
            ("entry", Some(8)),
            ("closed", None)
        ]
    );
    let kick = &resumed[1].1;
    assert_eq!(
        (
            kick["from"].as_str(),
            kick["type"].as_str(),
            kick["code"].as_u64()
        ),
        (Some("gateway"), Some("close"), Some(4001))
    );
    assert_eq!(kick["direction"], "upstream_to_client");
    // The capture of a closed connection stays readable for a while (the last 16).
    let after = get(admin, &format!("/admin/connections/{id}/capture")).await;
    assert_eq!(after.status, 200);
    assert_eq!(after.json()["closed"]["code"], 4001);
    assert!(after.headers["content-disposition"]
        .to_str()
        .unwrap()
        .contains(&format!("framegate-conn-{id}.json")));
    gw.shutdown().await;
}

#[tokio::test]
async fn fragments_pings_and_the_clients_close_are_recorded_as_they_came() {
    let up = echo().await;
    let dir = TempDir::new("capture-raw");
    let (gw, admin) = gateway_with_admin(
        &dir,
        &route("/raw", up.addr, "[route.capture]\nmode = \"payload\"", &[]),
    )
    .await;
    let mut tcp = tokio::net::TcpStream::connect(gw.local_addr())
        .await
        .unwrap();
    tcp.write_all(upgrade_request("/raw", "").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut tcp).await.expect("a 101");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let key = [9, 8, 7, 6];
    let mut wire = Vec::new();
    wire.extend(masked(0x01, b"hel", key)); // text, not final
    wire.extend(masked(0x00, b"lo ", key)); // continuation
    wire.extend(masked(0x80, b"you", key)); // final continuation
    wire.extend(masked(0x89, b"are you there", key)); // ping
    tcp.write_all(&wire).await.unwrap();
    let id = only_connection(admin).await;
    capture_until(admin, id, |c| {
        entries(c).iter().any(|e| e["type"] == "ping")
    })
    .await;
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend(b"done");
    tcp.write_all(&masked(0x88, &close, key)).await.unwrap();
    let c = capture_until(admin, id, |c| !c["closed"].is_null()).await;
    let from_client: Vec<&Value> = entries(&c)
        .iter()
        .filter(|e| e["from"] == "client")
        .collect();
    let text = from_client[0];
    assert_eq!(
        (text["payload"].as_str(), text["frames"].as_u64()),
        (Some("hello you"), Some(3))
    );
    assert_eq!(text["mask"], "09080706");
    let ping = from_client[1];
    assert_eq!(
        (ping["type"].as_str(), ping["size"].as_u64()),
        (Some("ping"), Some(13))
    );
    let close = from_client[2];
    assert_eq!(close["type"], "close");
    assert_eq!(
        (close["code"].as_u64(), close["reason"].as_str()),
        (Some(1000), Some("done"))
    );
    assert_eq!(c["closed"]["by"], "client");
    gw.shutdown().await;
}

/// A masked client frame; `first` is its first header byte (FIN and opcode).
fn masked(first: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![first, 0x80 | payload.len() as u8];
    f.extend(key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

#[tokio::test]
async fn the_console_page_wants_the_token_and_answers_its_own_site_only() {
    let up = echo().await;
    let dir = TempDir::new("capture-page");
    let (gw, admin) = gateway_with_admin(&dir, &route("/p", up.addr, "", &[])).await;
    // A browser is asked for credentials (Basic: any user, the token as the password).
    let bare = call(admin, "GET", "/console", &[]).await;
    assert_eq!(bare.status, 401);
    assert!(bare.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic "));
    // API clients are told the bearer scheme.
    let api = call(admin, "GET", "/admin/connections", &[]).await;
    assert!(api.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer "));
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("admin:{TOKEN}"))
    );
    let wrong = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:not-the-token-at-all")
    );
    assert_eq!(
        call(admin, "GET", "/console", &[("authorization", &wrong)])
            .await
            .status,
        401
    );
    let page = call(admin, "GET", "/console", &[("authorization", &basic)]).await;
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    for asset in ["/console/console.js", "/console/console.css"] {
        assert_eq!(
            call(admin, "GET", asset, &[("authorization", &basic)])
                .await
                .status,
            200
        );
    }
    // Basic credentials work for the API too (the page's own requests).
    let list = call(
        admin,
        "GET",
        "/admin/connections",
        &[("authorization", &basic)],
    )
    .await;
    assert_eq!(list.status, 200);
    // Another site's page cannot use them (a browser always names the page's origin).
    let forged = call(
        admin,
        "POST",
        "/admin/broadcast",
        &[("authorization", &basic), ("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(forged.status, 403);
    assert!(String::from_utf8_lossy(&forged.body).contains("Origin"));
    let own = format!("http://{admin}");
    let same = call(
        admin,
        "GET",
        "/admin/connections",
        &[("authorization", &basic), ("origin", &own)],
    )
    .await;
    assert_eq!(same.status, 200);
    gw.shutdown().await;
}
