//! Issue 16 §2: `[route.validate]`, JSON Schemas per direction, over real sockets: the gateway
//! in-process, a real upstream and a real client; `framegate check` on broken schemas through
//! the binary.

mod support;

use futures_util::SinkExt;
use serde_json::Value as Json;
use tokio_tungstenite::tungstenite::Message;

use support::*;

/// Messages from the client: `{"type":"chat","text":"…"}`.
const CHAT_IN: &str = r#"{
  "type": "object",
  "required": ["type", "text"],
  "properties": {
    "type": {"const": "chat"},
    "text": {"type": "string", "maxLength": 100}
  }
}"#;

/// Messages from the upstream: `{"type":"chat"|"joined", …}`.
const CHAT_OUT: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["type"],
  "properties": {"type": {"enum": ["chat", "joined"]}}
}"#;

/// `[route.validate]` for the last route, with the schemas written into `dir`.
fn validate(dir: &TempDir, client: Option<&str>, server: Option<&str>, on_invalid: &str) -> String {
    let mut toml = String::from("[route.validate]\n");
    for (key, schema) in [("client", client), ("server", server)] {
        if let Some(schema) = schema {
            let path = dir.write(&format!("{key}.json"), schema);
            toml += &format!("{key} = {:?}\n", path.display().to_string());
        }
    }
    toml + &format!("on_invalid = {on_invalid:?}\n")
}

/// A gateway with one validated route, `/v`, to a captured upstream (and an admin listener).
async fn validated(
    dir: &TempDir,
    client: Option<&str>,
    server: Option<&str>,
    on_invalid: &str,
) -> (
    framegate::Running,
    tokio::sync::mpsc::UnboundedReceiver<UpstreamWs>,
) {
    let (up, conns) = captured().await;
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}",
        route("/v", up.addr, "", &[]),
        validate(dir, client, server, on_invalid)
    );
    (gateway(&toml).await, conns)
}

/// A client on `path` and the upstream end of its connection.
async fn pair(
    gw: &framegate::Running,
    path: &str,
    conns: &mut tokio::sync::mpsc::UnboundedReceiver<UpstreamWs>,
) -> (Client, UpstreamWs) {
    let client = connect(gw.local_addrs()[0], path).await;
    let upstream = within("the upstream connection", conns.recv())
        .await
        .unwrap();
    (client, upstream)
}

async fn send(ws: &mut Client, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}

/// The gateway's `/metrics`, checked by promtool.
async fn metrics(gw: &framegate::Running) -> String {
    let request = "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
    let (status, _, body) = raw_http(gw.admin_addr().unwrap(), request).await;
    assert_eq!(status, 200);
    let out = promtool_check_metrics(&body);
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scrape ---\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    body
}

/// The value of the sample `series` in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn valid_messages_pass_unchanged_both_ways() {
    let dir = TempDir::new("valid");
    let (gw, mut conns) = validated(&dir, Some(CHAT_IN), Some(CHAT_OUT), "close").await;
    let (mut client, mut upstream) = pair(&gw, "/v", &mut conns).await;
    // Byte for byte: the gateway validates, it does not re-encode.
    let text = "{ \"text\" : \"hé\",\n \"type\":\"chat\" }";
    send(&mut client, text).await;
    assert_eq!(next_text(&mut upstream).await, text);
    let text = r#"{"type":"joined","who":"ann"}"#;
    upstream.send(Message::text(text)).await.unwrap();
    assert_eq!(next_text(&mut client).await, text);
    // Binary messages are not checked: they pass as before.
    client
        .send(Message::binary(&b"\xff\x00"[..]))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::binary(&b"\xff\x00"[..])
    );
}

#[tokio::test]
async fn close_ends_both_legs_with_1007_and_the_first_error() {
    let dir = TempDir::new("close");
    let (gw, mut conns) = validated(&dir, Some(CHAT_IN), None, "close").await;
    let (mut client, mut upstream) = pair(&gw, "/v", &mut conns).await;
    send(&mut client, r#"{"type":"chat","text":5}"#).await;
    let frame = expect_close(&mut client).await;
    assert_eq!(u16::from(frame.code), 1007);
    assert_eq!(frame.reason.as_str(), r#"/text: 5 is not of type "string""#);
    // The upstream is told the same, and never sees the message.
    match next_message(&mut upstream).await {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1007),
        other => panic!("the upstream got {other:?} instead of a close"),
    }
}

#[tokio::test]
async fn a_long_first_error_is_cut_to_fit_the_close_reason() {
    let dir = TempDir::new("long-reason");
    let (gw, mut conns) = validated(&dir, Some(CHAT_IN), None, "close").await;
    let (mut client, _upstream) = pair(&gw, "/v", &mut conns).await;
    let long = format!(r#"{{"type":"chat","text":"{}"}}"#, "é".repeat(200));
    send(&mut client, &long).await;
    let frame = expect_close(&mut client).await;
    assert_eq!(u16::from(frame.code), 1007);
    let reason = frame.reason.as_str();
    assert!(reason.len() <= 123, "{} bytes", reason.len());
    assert!(
        reason.starts_with("/text: \"éé") && reason.ends_with('…'),
        "{reason}"
    );
}

#[tokio::test]
async fn text_that_is_not_json_is_invalid() {
    let dir = TempDir::new("not-json");
    let (gw, mut conns) = validated(&dir, Some(CHAT_IN), None, "close").await;
    let (mut client, _upstream) = pair(&gw, "/v", &mut conns).await;
    send(&mut client, "hello").await;
    let frame = expect_close(&mut client).await;
    assert_eq!(u16::from(frame.code), 1007);
    assert!(
        frame.reason.as_str().starts_with("invalid JSON: expected"),
        "{}",
        frame.reason
    );
}

#[tokio::test]
async fn drop_counts_the_message_and_the_next_one_passes() {
    let dir = TempDir::new("drop");
    let (gw, mut conns) = validated(&dir, Some(CHAT_IN), None, "drop").await;
    let (mut client, mut upstream) = pair(&gw, "/v", &mut conns).await;
    send(&mut client, r#"{"type":"shout","text":"HI"}"#).await;
    send(&mut client, r#"{"type":"chat","text":"hi"}"#).await;
    assert_eq!(
        next_text(&mut upstream).await,
        r#"{"type":"chat","text":"hi"}"#
    );
    let text = metrics(&gw).await;
    let series = |name: &str, direction: &str| {
        sample(
            &text,
            &format!("{name}{{route=\"/v\",direction=\"{direction}\"}}"),
        )
    };
    assert_eq!(
        series("framegate_validation_failures_total", "client_to_upstream"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        series("framegate_validation_failures_total", "upstream_to_client"),
        Some(0.0)
    );
    assert_eq!(
        series("framegate_policy_drops_total", "client_to_upstream"),
        Some(1.0)
    );
    // Forwarded messages only: the dropped one is not among them.
    assert_eq!(
        sample(
            &text,
            r#"framegate_messages_total{route="/v",direction="client_to_upstream",type="text"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn reply_tells_the_sender_and_the_upstream_never_sees_the_message() {
    let dir = TempDir::new("reply");
    let (gw, mut conns) = validated(&dir, Some(CHAT_IN), None, "reply").await;
    let (mut client, mut upstream) = pair(&gw, "/v", &mut conns).await;
    send(&mut client, "not json").await;
    let reply: Json = serde_json::from_str(&next_text(&mut client).await).unwrap();
    assert_eq!(reply["error"], "invalid message");
    assert!(
        reply["detail"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON: "),
        "{reply}"
    );
    send(&mut client, r#"{"type":"chat"}"#).await;
    let reply = next_text(&mut client).await;
    assert_eq!(
        reply,
        r#"{"error":"invalid message","detail":"\"text\" is a required property"}"#
    );
    send(&mut client, r#"{"type":"chat","text":"hi"}"#).await;
    assert_eq!(
        next_text(&mut upstream).await,
        r#"{"type":"chat","text":"hi"}"#,
        "the first message the upstream sees is the valid one"
    );
}

#[tokio::test]
async fn the_server_schema_checks_the_upstreams_messages() {
    let dir = TempDir::new("server");
    let (gw, mut conns) = validated(&dir, None, Some(CHAT_OUT), "close").await;
    let (mut client, mut upstream) = pair(&gw, "/v", &mut conns).await;
    // No client schema: anything goes that way.
    send(&mut client, "free text").await;
    assert_eq!(next_text(&mut upstream).await, "free text");
    upstream
        .send(Message::text(r#"{"type":"joined"}"#))
        .await
        .unwrap();
    assert_eq!(next_text(&mut client).await, r#"{"type":"joined"}"#);
    upstream
        .send(Message::text(r#"{"type":"secret"}"#))
        .await
        .unwrap();
    let frame = expect_close(&mut client).await;
    assert_eq!(u16::from(frame.code), 1007);
    assert!(
        frame.reason.as_str().starts_with("/type: "),
        "{}",
        frame.reason
    );
}

#[tokio::test]
async fn reply_goes_back_to_the_upstream_that_sent_the_message() {
    let dir = TempDir::new("server-reply");
    let (gw, mut conns) = validated(&dir, None, Some(CHAT_OUT), "reply").await;
    let (mut client, mut upstream) = pair(&gw, "/v", &mut conns).await;
    upstream.send(Message::text("[1]")).await.unwrap();
    let reply: Json = serde_json::from_str(&next_text(&mut upstream).await).unwrap();
    assert_eq!(reply["error"], "invalid message");
    assert_eq!(reply["detail"], r#"[1] is not of type "object""#);
    upstream
        .send(Message::text(r#"{"type":"chat"}"#))
        .await
        .unwrap();
    assert_eq!(next_text(&mut client).await, r#"{"type":"chat"}"#);
}

#[tokio::test]
async fn a_draft_7_schema_is_read_as_draft_7() {
    // Draft 7's `items` list checks each position (2020-12 calls it `prefixItems`).
    let tuple = r#"{
      "$schema": "http://json-schema.org/draft-07/schema#",
      "type": "array",
      "items": [{"const": "chat"}, {"type": "string"}],
      "additionalItems": false
    }"#;
    let dir = TempDir::new("draft7");
    let (gw, mut conns) = validated(&dir, Some(tuple), None, "close").await;
    let (mut client, mut upstream) = pair(&gw, "/v", &mut conns).await;
    send(&mut client, r#"["chat","hi"]"#).await;
    assert_eq!(next_text(&mut upstream).await, r#"["chat","hi"]"#);
    send(&mut client, r#"["chat",5]"#).await;
    let frame = expect_close(&mut client).await;
    assert_eq!(u16::from(frame.code), 1007);
    assert_eq!(frame.reason.as_str(), r#"/1: 5 is not of type "string""#);
}

#[tokio::test]
async fn a_route_without_validate_is_unchanged() {
    let dir = TempDir::new("plain");
    let up = echo().await;
    let gw = gateway(&format!(
        "{}{}{}",
        route("/v", up.addr, "", &[]),
        validate(&dir, Some(CHAT_IN), None, "close"),
        route("/plain", up.addr, "", &[]),
    ))
    .await;
    let mut ws = connect(gw.local_addrs()[0], "/plain").await;
    for text in ["not json", r#"{"type":"shout"}"#] {
        send(&mut ws, text).await;
        assert_eq!(next_text(&mut ws).await, text);
    }
}

/// Validation runs before the frame policy: the policy sees valid messages only.
#[tokio::test]
async fn validation_runs_before_the_frame_policy() {
    let dir = TempDir::new("before-policy");
    let up = echo().await;
    let policy = script(
        "stamp.lua",
        "return function(msg) local m = msg.json; m.seen = true; return m end",
    );
    let gw = gateway(&format!(
        "{}{}",
        route("/v", up.addr, "", &[("on_client_frame", &policy)]),
        validate(&dir, Some(CHAT_IN), None, "reply"),
    ))
    .await;
    let mut ws = connect(gw.local_addrs()[0], "/v").await;
    // A policy that indexes msg.json would fail (1011) on text that is not JSON.
    send(&mut ws, "oops").await;
    let reply: Json = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert_eq!(reply["error"], "invalid message");
    send(&mut ws, r#"{"type":"chat","text":"hi"}"#).await;
    let echoed: Json = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert_eq!(echoed["seen"], true);
}

/// A reload with a broken schema keeps the old snapshot; one with a fixed schema takes effect
/// for new connections, while an open connection keeps its snapshot's schema.
#[tokio::test]
async fn reload_swaps_schemas_for_new_connections_only() {
    let dir = TempDir::new("reload");
    let (up, mut conns) = captured().await;
    let v1 = r#"{"type": "object", "required": ["type"]}"#;
    let v2 = r#"{"type": "object", "required": ["kind"]}"#;
    dir.write("in.json", v1);
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n{}[route.validate]\nclient = \"in.json\"\n",
        route("/v", up.addr, "", &[])
    );
    let gw = start_from(&dir, &config).await;
    let (mut old, mut old_up) = pair(&gw, "/v", &mut conns).await;

    let broken = dir.write("in.json", "{\"required\": [\"kind\"\n");
    let err = gw
        .reload()
        .await
        .expect_err("a broken schema fails the reload");
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("{}:2:1: not JSON: ", broken.display())),
        "{shown}"
    );
    // Still v1 for new connections.
    let (mut c, mut c_up) = pair(&gw, "/v", &mut conns).await;
    send(&mut c, r#"{"type":"a"}"#).await;
    assert_eq!(next_text(&mut c_up).await, r#"{"type":"a"}"#);

    dir.write("in.json", v2);
    gw.reload().await.expect("the fixed schema reloads");
    let (mut new, mut new_up) = pair(&gw, "/v", &mut conns).await;
    send(&mut new, r#"{"kind":"a"}"#).await;
    assert_eq!(next_text(&mut new_up).await, r#"{"kind":"a"}"#);
    send(&mut new, r#"{"type":"a"}"#).await;
    assert_eq!(u16::from(expect_close(&mut new).await.code), 1007);

    // The connection opened before the reloads still checks against v1.
    send(&mut old, r#"{"type":"a"}"#).await;
    assert_eq!(next_text(&mut old_up).await, r#"{"type":"a"}"#);
    send(&mut old, r#"{"kind":"a"}"#).await;
    let frame = expect_close(&mut old).await;
    assert_eq!(u16::from(frame.code), 1007);
    assert_eq!(frame.reason.as_str(), r#""type" is a required property"#);
}

/// `framegate check` on a configuration whose route names `schema` (written as `s.json`).
fn check_with(dir: &TempDir, schema: Option<&str>, route_keys: &str) -> cli::Output {
    if let Some(schema) = schema {
        dir.write("s.json", schema);
    }
    let config = dir.write(
        "config.toml",
        &format!(
            "[[route]]\npath = \"/v\"\nupstream = \"ws://127.0.0.1:9/\"\n{route_keys}[route.validate]\nclient = \"s.json\"\n"
        ),
    );
    cli::framegate(
        &["check", "--config", &config.display().to_string()],
        &dir.0,
    )
}

#[test]
fn check_locates_bad_schema_files() {
    let dir = TempDir::new("check");
    let config = dir.0.join("config.toml").display().to_string();
    let schema = dir.0.join("s.json").display().to_string();

    let out = check_with(&dir, Some(CHAT_IN), "");
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim_end(), format!("{config}: OK"));

    // Not JSON: the schema file's own line and column.
    let out = check_with(
        &dir,
        Some("{\n  \"type\": \"object\",\n  \"required\": [\"a\"\n}\n"),
        "",
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    assert!(
        out.stderr
            .contains(&format!("{schema}:4:1: not JSON: expected `,` or `]`")),
        "{}",
        out.stderr
    );

    // An invalid schema: its file and the place in it.
    let out = check_with(
        &dir,
        Some("{\n  \"properties\": {\n    \"n\": {\"minimum\": \"five\"}\n  }\n}\n"),
        "",
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!(
            "{schema}:3:22: invalid JSON Schema at /properties/n/minimum: \"five\" is not of type \"number\""
        )),
        "{}",
        out.stderr
    );

    // A missing file: the key's place in the configuration.
    std::fs::remove_file(&schema).unwrap();
    let out = check_with(&dir, None, "");
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!(
            "{config}:5:10: route.validate.client \"s.json\": cannot read"
        )),
        "{}",
        out.stderr
    );

    // A route whose messages are not JSON cannot be validated.
    let out = check_with(&dir, Some(CHAT_IN), "mime_type = \"text/plain\"\n");
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!(
            "{config}:5:1: [route.validate] needs a JSON mime_type; this route's is \"text/plain\""
        )),
        "{}",
        out.stderr
    );
}

/// The repository's `/checked/{room}` route (config.toml, docs/cookbook.md): the shipped
/// schemas in schemas/, the sample chat upstream, `on_invalid = "reply"`.
#[tokio::test]
async fn the_shipped_chat_schemas_check_the_sample_chat() {
    let chat = framegate::samples::spawn_chat("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let schema = |name: &str| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas")
            .join(name);
        format!("{:?}", path.display().to_string())
    };
    let gw = gateway(&format!(
        "{}[route.validate]\nclient = {}\nserver = {}\non_invalid = \"reply\"\n",
        route_to(
            "/checked/{room}",
            &format!("ws://{chat}/rooms/{{room}}"),
            "",
            &[]
        ),
        schema("chat-in.json"),
        schema("chat-out.json"),
    ))
    .await;
    let mut ann = connect(gw.local_addrs()[0], "/checked/lobby").await;
    send(&mut ann, r#"{"type":"chat","text":"hi"}"#).await;
    assert_eq!(next_text(&mut ann).await, r#"{"type":"chat","text":"hi"}"#);
    send(&mut ann, r#"{"type":"chat","text":"hi","from":"admin"}"#).await;
    assert_eq!(
        next_text(&mut ann).await,
        r#"{"error":"invalid message","detail":"Additional properties are not allowed ('from' was unexpected)"}"#
    );
    send(&mut ann, "hello").await;
    assert_eq!(
        next_text(&mut ann).await,
        r#"{"error":"invalid message","detail":"invalid JSON: expected value at line 1 column 1"}"#
    );
}

/// With `server.watch`, saving a schema file reloads the configuration.
#[tokio::test]
async fn server_watch_reloads_when_a_schema_changes() {
    let dir = TempDir::new("watch");
    let up = echo().await;
    dir.write("in.json", r#"{"type": "object", "required": ["type"]}"#);
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nwatch = true\n{}[route.validate]\nclient = \"in.json\"\n",
        route("/v", up.addr, "", &[])
    );
    let gw = start_from(&dir, &config).await;
    let mut old = connect(gw.local_addrs()[0], "/v").await;
    dir.write("in.json", r#"{"type": "object", "required": ["kind"]}"#);
    within("the watcher to reload", async {
        while gw.snapshot_number() < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut new = connect(gw.local_addrs()[0], "/v").await;
    send(&mut new, r#"{"kind":"a"}"#).await;
    assert_eq!(next_text(&mut new).await, r#"{"kind":"a"}"#);
    send(&mut old, r#"{"type":"a"}"#).await;
    assert_eq!(next_text(&mut old).await, r#"{"type":"a"}"#);
    gw.shutdown().await;
}

/// A direction with a schema and no frame policy is relayed byte for byte after the check.
/// Frames written in one go, with refused messages among them, in every form a message may
/// take (a whole frame, a length written long, fragments): the valid ones reach the upstream
/// in order, the refused ones are dropped and counted.
#[tokio::test]
async fn checked_messages_in_one_read_keep_their_order() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = TempDir::new("batch");
    let (gw, mut conns) = validated(&dir, Some(CHAT_IN), None, "drop").await;
    let mut raw = tokio::net::TcpStream::connect(gw.local_addrs()[0])
        .await
        .unwrap();
    raw.write_all(upgrade_request("/v", "").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    within("the 101", async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 1024];
            let n = raw.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before the 101");
            head.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let mut upstream = within("the upstream connection", conns.recv())
        .await
        .unwrap();
    const KEY: [u8; 4] = [0x0f, 0xa0, 0x33, 0xc4];
    let ok = |n: u32| format!(r#"{{"type":"chat","text":"m{n}"}}"#);
    let bad = br#"{"type":"shout","text":"x"}"#;
    let (ok4, bad_half) = (ok(4), bad.len() / 2);
    let frames = [
        masked_frame(0x81, KEY, ok(1).as_bytes(), false),
        masked_frame(0x81, KEY, bad, false),
        masked_frame(0x81, KEY, ok(2).as_bytes(), false),
        masked_frame(0x81, KEY, ok(3).as_bytes(), true),
        masked_frame(0x81, KEY, bad, true),
        masked_frame(0x01, KEY, &ok4.as_bytes()[..5], false),
        masked_frame(0x80, KEY, &ok4.as_bytes()[5..], false),
        masked_frame(0x01, KEY, &bad[..bad_half], false),
        masked_frame(0x80, KEY, &bad[bad_half..], false),
        masked_frame(0x81, KEY, b"not json", false),
        masked_frame(0x81, KEY, ok(5).as_bytes(), false),
    ];
    raw.write_all(&frames.concat()).await.unwrap();
    for n in 1..=5 {
        assert_eq!(next_text(&mut upstream).await, ok(n));
    }
    let text = metrics(&gw).await;
    assert_eq!(
        sample(
            &text,
            r#"framegate_validation_failures_total{route="/v",direction="client_to_upstream"}"#
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"framegate_messages_total{route="/v",direction="client_to_upstream",type="text"}"#
        ),
        Some(5.0)
    );
}
