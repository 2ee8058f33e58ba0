//! The example policies shipped in policies/, through the real gateway: auth.lua, validate.lua,
//! redact.lua, ratelimit.lua, limit_connections.lua with release_connection.lua.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value as Json};
use support::*;
use tokio_tungstenite::tungstenite::{self, Message};

/// A shipped example policy, as a quoted absolute path for TOML.
fn example(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("policies")
        .join(name);
    assert!(path.is_file(), "{} is missing", path.display());
    format!("{:?}", path.display().to_string())
}

fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/")
}

async fn next_json(ws: &mut Client) -> Json {
    let text = next_text(ws).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

/// The status, headers and body of a refused upgrade.
async fn refusal(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, String) {
    match connect_with(addr, path, headers).await {
        Err(tungstenite::Error::Http(response)) => (
            response.status().as_u16(),
            response.headers().clone(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        other => panic!("expected {path} to be refused, got {:?}", other.map(|_| ())),
    }
}

/// The chat route of config.toml.
fn chat_route() -> String {
    route_to(
        "/chat/{room}",
        "ws://127.0.0.1:9002/rooms/{room}",
        "",
        &[
            ("on_upgrade", &example("auth.lua")),
            ("on_client_frame", &example("validate.lua")),
            ("on_server_frame", &example("redact.lua")),
        ],
    )
}

#[tokio::test]
async fn auth_rejects_missing_unknown_and_unauthorised_tokens() {
    let gw = gateway(&chat_route()).await;
    let addr = gw.local_addr();

    let (status, headers, body) = refusal(addr, "/chat/lobby", &[]).await;
    assert_eq!((status, body.as_str()), (401, "missing token"));
    assert_eq!(headers["www-authenticate"], "Bearer");

    let (status, _, body) = refusal(addr, "/chat/lobby?access_token=nope", &[]).await;
    assert_eq!((status, body.as_str()), (403, "unknown token"));

    let (status, _, body) =
        refusal(addr, "/chat/lobby", &[("authorization", "Bearer mallory")]).await;
    assert_eq!((status, body.as_str()), (403, "unknown token"));

    let (status, _, body) = refusal(addr, "/chat/admin?access_token=bob-token", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (403, "the admin room is for admins")
    );

    let (status, _, body) = refusal(
        addr,
        "/chat/admin",
        &[("authorization", "Bearer bob-token")],
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (403, "the admin room is for admins")
    );
}

#[tokio::test]
async fn auth_validate_and_redact_together_with_the_sample_chat() {
    // auth.lua routes to the sample chat on its fixed port; skip if something else holds it.
    let chat: SocketAddr = "127.0.0.1:9002".parse().unwrap();
    if let Err(e) = framegate::samples::spawn_chat(chat).await {
        eprintln!("skipping the success path of auth.lua: cannot bind {chat}: {e}");
        return;
    }
    let gw = gateway(&chat_route()).await;
    let addr = gw.local_addr();
    let mut ann = connect(addr, "/chat/admin?access_token=ann-token").await;
    let (mut bob, _) = connect_with(
        addr,
        "/chat/lobby",
        &[("authorization", "Bearer bob-token")],
    )
    .await
    .expect("bob may join the lobby");

    // Messages are validated, stamped with the sender, broadcast, and redacted on the way out.
    ann.send(Message::text(
        r#"{"type":"chat","text":"hi","email":"ann@example.com","phone":"555"}"#,
    ))
    .await
    .unwrap();
    assert_eq!(
        next_json(&mut ann).await,
        json!({"type": "chat", "text": "hi", "from": "ann", "email": "[redacted]", "phone": "[redacted]"})
    );
    bob.send(Message::text(r#"{"type":"chat","text":"yo"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut bob).await,
        json!({"type": "chat", "text": "yo", "from": "bob"}),
        "bob is in another room of the tenant: he gets only his own message"
    );
}

/// An on_upgrade script that sets ctx.user from the query, as auth.lua would.
fn login() -> String {
    script(
        "login.lua",
        "return function(req, ctx) ctx.user = req.query.user end\n",
    )
}

#[tokio::test]
async fn validate_replies_to_invalid_messages_stamps_valid_ones_and_kicks() {
    let (up, mut conns) = captured().await;
    let gw = gateway(&route_to(
        "/v",
        &ws_url(up.addr),
        "",
        &[
            ("on_upgrade", &login()),
            ("on_client_frame", &example("validate.lua")),
        ],
    ))
    .await;
    let mut client = connect(gw.local_addr(), "/v?user=ann").await;
    let mut upstream = within("upstream connection", conns.recv()).await.unwrap();

    client.send(Message::text("not json")).await.unwrap();
    let reply = next_json(&mut client).await;
    assert_eq!(reply["error"], "invalid message");
    assert!(
        reply["detail"].as_str().unwrap().contains("invalid JSON"),
        "{reply}"
    );

    client.send(Message::text("[1,2]")).await.unwrap();
    let reply = next_json(&mut client).await;
    assert_eq!(
        reply,
        json!({"error": "invalid message", "detail": "a JSON object with a string \"type\" is required"})
    );
    client.send(Message::text(r#"{"type":3}"#)).await.unwrap();
    assert_eq!(next_json(&mut client).await["error"], "invalid message");

    client
        .send(Message::text(r#"{"type":"chat","text":"hello"}"#))
        .await
        .unwrap();
    // The upstream's first message is the valid one: nothing invalid was forwarded.
    match next_message(&mut upstream).await.unwrap().unwrap() {
        Message::Text(t) => assert_eq!(
            serde_json::from_str::<Json>(&t).unwrap(),
            json!({"type": "chat", "text": "hello", "from": "ann"})
        ),
        other => panic!("expected text, got {other:?}"),
    }

    client
        .send(Message::text(r#"{"type":"kick"}"#))
        .await
        .unwrap();
    let frame = expect_close(&mut client).await;
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1008, "not allowed")
    );
    let frame = expect_close(&mut upstream).await;
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1008, "not allowed")
    );
}

#[tokio::test]
async fn redact_hides_email_and_phone_in_messages_to_clients() {
    let (up, mut conns) = captured().await;
    let gw = gateway(&route_to(
        "/r",
        &ws_url(up.addr),
        "",
        &[("on_server_frame", &example("redact.lua"))],
    ))
    .await;
    let mut client = connect(gw.local_addr(), "/r").await;
    let mut upstream = within("upstream connection", conns.recv()).await.unwrap();

    upstream
        .send(Message::text(
            r#"{"text":"call me","email":"a@b.c","phone":"+1 555 0100","n":[1,2]}"#,
        ))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut client).await,
        json!({"text": "call me", "email": "[redacted]", "phone": "[redacted]", "n": [1, 2]})
    );
    // Untouched messages are forwarded byte for byte.
    upstream
        .send(Message::text(r#"{ "text" : "no secrets" }"#))
        .await
        .unwrap();
    assert_eq!(next_text(&mut client).await, r#"{ "text" : "no secrets" }"#);
    upstream
        .send(Message::text("plain text a@b.c"))
        .await
        .unwrap();
    assert_eq!(next_text(&mut client).await, "plain text a@b.c");
    // Client messages are not redacted (the policy is on_server_frame only).
    client
        .send(Message::text(r#"{"email":"mine"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text(r#"{"email":"mine"}"#)
    );
}

/// How far into the current wall-clock second we are (ratelimit.lua counts per
/// `math.floor(gw.now())`).
fn into_second() -> Duration {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    Duration::from_nanos(u64::from(now.subsec_nanos()))
}

/// Sleeps until the next whole second of wall-clock time, plus a little.
async fn sleep_to_next_second() {
    tokio::time::sleep(Duration::from_secs(1) - into_second() + Duration::from_millis(20)).await;
}

#[tokio::test]
async fn ratelimit_echoes_five_messages_a_second_and_warns_once() {
    let up = echo().await;
    let gw = gateway(&route_to(
        "/echo",
        &ws_url(up.addr),
        "",
        &[("on_client_frame", &example("ratelimit.lua"))],
    ))
    .await;
    let mut ws = connect(gw.local_addr(), "/echo").await;
    // Time is what is under test: all seven messages must fall into the same second.
    if into_second() > Duration::from_millis(500) {
        sleep_to_next_second().await;
    }
    for i in 1..=7 {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
    }
    let mut echoed = Vec::new();
    let mut warnings = Vec::new();
    for _ in 0..6 {
        let text = next_text(&mut ws).await;
        if text.starts_with('m') {
            echoed.push(text);
        } else {
            warnings.push(text);
        }
    }
    assert_eq!(echoed, ["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(
        warnings,
        [r#"{"error":"rate limit: at most 5 messages per second"}"#]
    );
    // In the next second the limit starts over; m6 and m7 were dropped, not delayed, and no
    // second warning was sent.
    sleep_to_next_second().await;
    ws.send(Message::text("m8")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "m8");
}

#[tokio::test]
async fn limit_connections_allows_ten_per_ip_and_release_gives_slots_back() {
    let up = echo().await;
    let gw = gateway(&route_to(
        "/echo",
        &ws_url(up.addr),
        "",
        &[
            ("on_upgrade", &example("limit_connections.lua")),
            ("on_close", &example("release_connection.lua")),
        ],
    ))
    .await;
    let addr = gw.local_addr();
    let mut open = Vec::new();
    for _ in 0..10 {
        open.push(connect(addr, "/echo").await);
    }
    let (status, _, body) = refusal(addr, "/echo", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (429, "too many connections from 127.0.0.1")
    );
    let (status, _, _) = refusal(addr, "/echo", &[]).await;
    assert_eq!(status, 429, "a refused attempt does not free a slot");

    // Close one properly; its on_close gives the slot back.
    let mut leaving = open.pop().unwrap();
    leaving.close(None).await.unwrap();
    while let Some(Ok(_)) = within("close handshake", leaving.next()).await {}
    let mut replacement = within("a slot to be released", async {
        loop {
            match connect_with(addr, "/echo", &[]).await {
                Ok((ws, _)) => return ws,
                Err(tungstenite::Error::Http(r)) if r.status() == 429 => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("unexpected error {e}"),
            }
        }
    })
    .await;
    replacement.send(Message::text("in")).await.unwrap();
    assert_eq!(next_text(&mut replacement).await, "in");
    let (status, _, _) = refusal(addr, "/echo", &[]).await;
    assert_eq!(status, 429, "ten again: the limit still holds");
}
