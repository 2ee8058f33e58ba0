//! Lua policies, frame phase: the `msg` and `conn` objects, what a frame policy's return value
//! does, the read-only `ctx`, the `gw` table (log, json, now, shared) and `on_close`.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value as Json};
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// A gateway with one route `/p` to a captured upstream, one client and its upstream leg.
async fn pair(extra: &str, policies: &[(&str, &str)]) -> (framegate::Running, Client, UpstreamWs) {
    let (up, mut conns) = captured().await;
    let gw = gateway(&route("/p", up.addr, extra, policies)).await;
    let client = connect(gw.local_addr(), "/p").await;
    let upstream = within("upstream connection", conns.recv()).await.unwrap();
    (gw, client, upstream)
}

/// The next data message, parsed as JSON.
async fn next_json(ws: &mut Client) -> Json {
    let text = next_text(ws).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

/// Sends `text` and returns the reply parsed as JSON.
async fn ask(ws: &mut Client, text: &str) -> Json {
    ws.send(Message::text(text)).await.unwrap();
    next_json(ws).await
}

/// Reads a leg to its end, so that its side of the closing handshake completes at once, then
/// drops it (an upstream, as the server, ends TCP first; the gateway waits for that).
async fn finish(mut ws: Client) {
    while let Some(Ok(_)) = within("the leg to end", ws.next()).await {}
}

/// Asserts the close frame's code and reason.
fn assert_close(
    frame: &tokio_tungstenite::tungstenite::protocol::CloseFrame,
    code: u16,
    reason: &str,
    leg: &str,
) {
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (code, reason),
        "{leg}"
    );
}

/// Reports what the policy sees of `msg`, to the client, and drops the message.
const DESCRIBE: &str = r#"
return function(msg, ctx, conn)
  local j = msg.json
  -- A string, so that it works on routes without a JSON codec too.
  conn:send_client((gw.json.encode({
    type = msg.type,
    data = msg.text and msg.data or nil,
    size = msg.size,
    direction = msg.direction,
    mime = msg.mime,
    text_is_nil = msg.text == nil,
    json_is_nil = j == nil,
    json_error = msg.json_error,
    json_error_is_nil = msg.json_error == nil,
    nested = type(j) == "table" and type(j.a) == "table" and j.a.b or nil,
    list_len = type(j) == "table" and type(j.list) == "table" and #j.list or nil,
    same_table = j ~= nil and rawequal(msg.json, j),
    write_ok = pcall(function() msg.data = "x" end),
  })))
  return false
end
"#;

#[tokio::test]
async fn msg_describes_client_and_server_messages() {
    let describe = script("describe.lua", DESCRIBE);
    let (_gw, mut client, mut upstream) = pair(
        "",
        &[
            ("on_client_frame", &describe),
            ("on_server_frame", &describe),
        ],
    )
    .await;

    let body = r#"{"a":{"b":"deep"},"list":[1,2,3]}"#;
    let seen = ask(&mut client, body).await;
    assert_eq!(seen["type"], "text");
    assert_eq!(seen["data"], body);
    assert_eq!(seen["size"], body.len());
    assert_eq!(seen["direction"], "client");
    assert_eq!(seen["mime"], "application/json");
    assert_eq!(seen["text_is_nil"], false);
    assert_eq!(seen["json_is_nil"], false);
    assert_eq!(seen["json_error_is_nil"], true);
    assert_eq!(seen["nested"], "deep");
    assert_eq!(seen["list_len"], 3);
    assert_eq!(seen["same_table"], true, "msg.json is decoded once");
    assert_eq!(seen["write_ok"], false, "msg is read-only");

    let seen = ask(&mut client, "not json").await;
    assert_eq!(seen["json_is_nil"], true);
    let error = seen["json_error"].as_str().expect("json_error is a string");
    assert!(error.contains("invalid JSON"), "{error}");
    assert_eq!(seen["data"], "not json");

    // A binary message is never decoded as JSON, even when its bytes are JSON.
    client
        .send(Message::binary(&br#"{"a":{"b":1}}"#[..]))
        .await
        .unwrap();
    let seen = next_json(&mut client).await;
    assert_eq!(seen["type"], "binary");
    assert_eq!(seen["json_is_nil"], true);
    assert_eq!(seen["json_error"], "binary message");
    assert_eq!(seen["size"], 13);
    assert_eq!(seen["data"], r#"{"a":{"b":1}}"#, "msg.text of UTF-8 bytes");

    client
        .send(Message::binary(vec![0xff, 0x00, 0x80, 0x7f]))
        .await
        .unwrap();
    let seen = next_json(&mut client).await;
    assert_eq!(seen["type"], "binary");
    assert_eq!(seen["size"], 4);
    assert_eq!(seen["text_is_nil"], true, "msg.text is nil for non-UTF-8");

    // From the upstream: direction "server".
    upstream
        .send(Message::text(r#"{"a":{"b":"up"}}"#))
        .await
        .unwrap();
    let seen = next_json(&mut client).await;
    assert_eq!(seen["direction"], "server");
    assert_eq!(seen["nested"], "up");
    assert_eq!(seen["type"], "text");
}

#[tokio::test]
async fn a_kept_msg_does_not_keep_its_message() {
    // docs/policies.md: msg is valid only during the call; one msg object serves every message
    // of a connection, so a kept msg shows the message being handled, or an empty one.
    let keep = script(
        "keep.lua",
        r#"
return function(msg, ctx, conn)
  local kept = conn.state.kept
  conn.state.kept = msg
  if kept == nil then
    conn:reply("first: " .. msg.data)
  else
    conn:reply("kept reads: " .. kept.data .. ", current: " .. msg.data)
  end
  return false
end
"#,
    );
    let after = script(
        "after.lua",
        r#"
return function(ctx, conn, info)
  local kept = conn.state.kept
  gw.shared:set("after", "[" .. kept.data .. "] " .. kept.size .. " " .. tostring(kept.json))
end
"#,
    );
    let reader = script(
        "reader.lua",
        "return function(msg, ctx, conn) conn:reply(tostring(gw.shared:get(msg.data))) return false end\n",
    );
    let up = echo().await;
    let gw = gateway(&format!(
        "{}{}",
        route(
            "/p",
            up.addr,
            "",
            &[("on_client_frame", &keep), ("on_close", &after)]
        ),
        route("/read", up.addr, "", &[("on_client_frame", &reader)]),
    ))
    .await;
    let mut client = connect(gw.local_addr(), "/p").await;
    client.send(Message::text("one")).await.unwrap();
    assert_eq!(next_text(&mut client).await, "first: one");
    client.send(Message::text(r#"{"n":2}"#)).await.unwrap();
    assert_eq!(
        next_text(&mut client).await,
        r#"kept reads: {"n":2}, current: {"n":2}"#
    );
    client.close(None).await.unwrap();
    finish(client).await;
    assert_eq!(
        read_shared(gw.local_addr(), "after").await,
        "[] 0 nil",
        "after its call a msg is empty: the payload was released"
    );
}

#[tokio::test]
async fn msg_mime_follows_the_route() {
    let describe = script("describe.lua", DESCRIBE);
    let (up, _conns) = captured().await;
    let gw = gateway(&format!(
        "{}{}",
        route(
            "/plain",
            up.addr,
            "mime_type = \"text/plain\"",
            &[("on_client_frame", &describe)]
        ),
        route(
            "/vendor",
            up.addr,
            "mime_type = \"application/vnd.example+json\"",
            &[("on_client_frame", &describe)]
        ),
    ))
    .await;

    let mut plain = connect(gw.local_addr(), "/plain").await;
    let seen = ask(&mut plain, r#"{"a":{"b":1}}"#).await;
    assert_eq!(seen["mime"], "text/plain");
    assert_eq!(seen["json_is_nil"], true, "text/plain is not decoded");
    assert_eq!(seen["json_error"], "mime type text/plain has no decoder");

    let mut vendor = connect(gw.local_addr(), "/vendor").await;
    let seen = ask(&mut vendor, r#"{"a":{"b":"v"}}"#).await;
    assert_eq!(seen["mime"], "application/vnd.example+json");
    assert_eq!(seen["nested"], "v", "+json types are decoded as JSON");
}

const DECIDE: &str = r#"
return function(msg, ctx, conn)
  local d = msg.data
  if d == "drop" then return false end
  if d == "string" then return "replaced é" end
  if d == "table" then return { replaced = true, list = { 1, 2 }, name = "t" } end
  if d == "true" then return true end
  if msg.json and msg.json.id then
    local m = msg.json
    m.seen = true
    return m
  end
  if msg.type == "binary" and d:sub(1, 1) == "R" then return "bin\0\255" end
  return nil
end
"#;

#[tokio::test]
async fn return_values_decide_what_is_forwarded() {
    let decide = script("decide.lua", DECIDE);
    let (_gw, mut client, mut upstream) = pair(
        "",
        &[("on_client_frame", &decide), ("on_server_frame", &decide)],
    )
    .await;

    // nil: unchanged, byte for byte.
    client.send(Message::text("keep é ☃")).await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("keep é ☃")
    );
    let raw = vec![0u8, 159, 146, 150, 255, 10];
    client.send(Message::binary(raw.clone())).await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::binary(raw)
    );

    // false: dropped; the next message still flows and the dropped one never arrives.
    client.send(Message::text("drop")).await.unwrap();
    client.send(Message::text("after drop")).await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("after drop")
    );

    // true: forwarded like nil.
    client.send(Message::text("true")).await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("true")
    );

    // A string: that payload, still a text message.
    client.send(Message::text("string")).await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("replaced é")
    );

    // A string for a binary message: a binary message with those bytes.
    client
        .send(Message::binary(&b"R\x01\x02"[..]))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::binary(&b"bin\x00\xff"[..])
    );

    // A table: JSON, as text.
    client.send(Message::text("table")).await.unwrap();
    match next_message(&mut upstream).await.unwrap().unwrap() {
        Message::Text(t) => assert_eq!(
            serde_json::from_str::<Json>(&t).unwrap(),
            json!({"replaced": true, "list": [1, 2], "name": "t"})
        ),
        other => panic!("expected a text message, got {other:?}"),
    }

    // Integers stay exact through decoding and re-encoding.
    client
        .send(Message::text(
            r#"{"id":9007199254740993,"big":-9223372036854775807,"f":1.5}"#,
        ))
        .await
        .unwrap();
    match next_message(&mut upstream).await.unwrap().unwrap() {
        Message::Text(t) => {
            let v: Json = serde_json::from_str(&t).unwrap();
            assert_eq!(v["id"].as_u64(), Some(9_007_199_254_740_993), "{t}");
            assert_eq!(v["big"].as_i64(), Some(-9_223_372_036_854_775_807), "{t}");
            assert_eq!(v["f"], 1.5);
            assert_eq!(v["seen"], true);
        }
        other => panic!("expected a text message, got {other:?}"),
    }

    // The same rules apply to messages from the upstream.
    upstream.send(Message::text("drop")).await.unwrap();
    upstream.send(Message::text("string")).await.unwrap();
    assert_eq!(next_text(&mut client).await, "replaced é");
    upstream.send(Message::text("unchanged")).await.unwrap();
    assert_eq!(next_text(&mut client).await, "unchanged");
}

#[tokio::test]
async fn returning_a_table_on_a_text_plain_route_is_a_policy_error() {
    let decide = script("decide.lua", DECIDE);
    let (_gw, mut client, mut upstream) = pair(
        "mime_type = \"text/plain\"",
        &[("on_client_frame", &decide)],
    )
    .await;
    client.send(Message::text("string")).await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("replaced é"),
        "strings are fine on text/plain"
    );
    client.send(Message::text("table")).await.unwrap();
    assert_close(
        &expect_close(&mut client).await,
        1011,
        "policy error",
        "client",
    );
    assert_close(
        &expect_close(&mut upstream).await,
        1011,
        "policy error",
        "upstream",
    );
}

#[tokio::test]
async fn conn_id_is_a_number_and_conn_state_is_per_connection() {
    let (up, _conns) = captured().await;
    let count = script(
        "count.lua",
        r#"
return function(msg, ctx, conn)
  local s = conn.state
  s.count = (s.count or 0) + 1
  local previous = s.last
  s.last = msg.data
  local replaced = pcall(function() conn.state = {} end)
  conn:reply({ id = conn.id, id_type = math.type(conn.id), count = s.count, previous = previous,
    replaced = replaced })
  return false
end
"#,
    );
    let gw = gateway(&route("/p", up.addr, "", &[("on_client_frame", &count)])).await;
    let mut a = connect(gw.local_addr(), "/p").await;
    let mut b = connect(gw.local_addr(), "/p").await;

    let a1 = ask(&mut a, "a1").await;
    let b1 = ask(&mut b, "b1").await;
    let a2 = ask(&mut a, "a2").await;
    let a3 = ask(&mut a, "a3").await;
    let b2 = ask(&mut b, "b2").await;

    assert_eq!(a1["id_type"], "integer");
    assert_eq!(
        a1["replaced"], false,
        "conn.state itself cannot be replaced"
    );
    assert!(a1["id"].is_u64(), "{a1}");
    assert_eq!(a1["id"], a3["id"], "one id per connection");
    assert_ne!(a1["id"], b1["id"], "connections have different ids");
    assert_eq!(
        [&a1["count"], &a2["count"], &a3["count"]],
        [&json!(1), &json!(2), &json!(3)]
    );
    assert_eq!([&b1["count"], &b2["count"]], [&json!(1), &json!(2)]);
    assert_eq!(a1.get("previous"), None);
    assert_eq!(a3["previous"], "a2");
    assert_eq!(
        b2["previous"], "b1",
        "state is not shared between connections"
    );
}

const SENDS: &str = r#"
return function(msg, ctx, conn)
  local d, dir = msg.data, msg.direction
  if d == "reply" then conn:reply("reply:" .. dir) return false end
  if d == "send_client" then conn:send_client("send_client:" .. dir) return false end
  if d == "send_server" then conn:send_server("send_server:" .. dir) return false end
  if d == "table" then
    conn:send_server({ to = "server" })
    conn:send_client({ to = "client" })
    return false
  end
  if d == "before" then conn:send_server("first:" .. dir) return nil end
end
"#;

#[tokio::test]
async fn conn_reply_and_send_reach_the_right_leg() {
    let sends = script("sends.lua", SENDS);
    let (_gw, mut client, mut upstream) = pair(
        "",
        &[("on_client_frame", &sends), ("on_server_frame", &sends)],
    )
    .await;

    client.send(Message::text("reply")).await.unwrap();
    assert_eq!(
        next_text(&mut client).await,
        "reply:client",
        "reply goes back to the sender"
    );
    client.send(Message::text("send_client")).await.unwrap();
    assert_eq!(next_text(&mut client).await, "send_client:client");
    client.send(Message::text("send_server")).await.unwrap();
    // The upstream's first message: neither the replies nor the dropped originals reached it.
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("send_server:client")
    );

    client.send(Message::text("table")).await.unwrap();
    let to_server = next_message(&mut upstream).await.unwrap().unwrap();
    assert!(to_server.is_text(), "tables are sent as JSON text");
    assert_eq!(
        serde_json::from_str::<Json>(to_server.to_text().unwrap()).unwrap(),
        json!({"to": "server"})
    );
    assert_eq!(next_json(&mut client).await, json!({"to": "client"}));

    // Messages a policy sends go out before the message it forwards.
    client.send(Message::text("before")).await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("first:client")
    );
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("before")
    );

    // In on_server_frame, reply goes back to the upstream.
    upstream.send(Message::text("reply")).await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("reply:server")
    );
    upstream.send(Message::text("send_server")).await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("send_server:server")
    );
    upstream.send(Message::text("send_client")).await.unwrap();
    assert_eq!(next_text(&mut client).await, "send_client:server");
}

#[tokio::test]
async fn a_call_may_send_at_most_64_messages() {
    let flood = script(
        "flood.lua",
        r#"
return function(msg, ctx, conn)
  for i = 1, 64 do conn:send_client(tostring(i)) end
  local ok, err = pcall(function() conn:send_client("65") end)
  return tostring(ok) .. " " .. tostring(err)
end
"#,
    );
    let (_gw, mut client, mut upstream) = pair("", &[("on_client_frame", &flood)]).await;
    client.send(Message::text("go")).await.unwrap();
    for i in 1..=64 {
        assert_eq!(next_text(&mut client).await, i.to_string());
    }
    match next_message(&mut upstream).await.unwrap().unwrap() {
        Message::Text(t) => {
            assert!(t.starts_with("false "), "{t}");
            assert!(t.contains("at most 64 messages per call"), "{t}");
        }
        other => panic!("expected a text message, got {other:?}"),
    }
}

#[tokio::test]
async fn conn_close_closes_both_legs_with_the_code_and_reason() {
    let closer = script(
        "closer.lua",
        r#"
return function(msg, ctx, conn)
  if msg.data == "close" then
    conn:send_client("last words")
    conn:close(4321, "policy says bye")
    return false
  end
  if msg.data == "close-default" then conn:close() end
end
"#,
    );
    let (up, mut conns) = captured().await;
    let gw = gateway(&route("/p", up.addr, "", &[("on_client_frame", &closer)])).await;
    let mut client = connect(gw.local_addr(), "/p").await;
    let mut upstream = within("upstream connection", conns.recv()).await.unwrap();
    client.send(Message::text("close")).await.unwrap();
    assert_eq!(
        next_text(&mut client).await,
        "last words",
        "sends before the close are delivered"
    );
    assert_close(
        &expect_close(&mut client).await,
        4321,
        "policy says bye",
        "client",
    );
    assert_close(
        &expect_close(&mut upstream).await,
        4321,
        "policy says bye",
        "upstream",
    );

    let mut client = connect(gw.local_addr(), "/p").await;
    let mut upstream = within("upstream connection", conns.recv()).await.unwrap();
    client.send(Message::text("close-default")).await.unwrap();
    assert_close(
        &expect_close(&mut client).await,
        1000,
        "",
        "client, default code",
    );
    // The message being handled is not forwarded, although the policy returned nil.
    match next_message(&mut upstream).await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_close(&frame, 1000, "", "upstream, default code")
        }
        other => panic!("expected the close frame first, got {other:?}"),
    }
}

#[tokio::test]
async fn ctx_is_read_only_in_frame_policies_but_readable_in_every_way() {
    let login = script(
        "login.lua",
        r#"
return function(req, ctx)
  ctx.user = "ann"
  ctx.claims = { role = "admin", level = 3 }
  ctx.list = { 10, 20, 30 }
end
"#,
    );
    let probe = script(
        "probe.lua",
        r#"
return function(msg, ctx, conn)
  local function attempt(f)
    local ok, err = pcall(f)
    return tostring(ok) .. " " .. tostring(err)
  end
  local claims = {}
  for k, v in pairs(ctx.claims) do claims[#claims + 1] = k .. "=" .. tostring(v) end
  table.sort(claims)
  local sum, count = 0, 0
  for _, v in ipairs(ctx.list) do sum, count = sum + v, count + 1 end
  conn:reply({
    new_key = attempt(function() ctx.x = 1 end),
    nested = attempt(function() ctx.claims.role = "x" end),
    existing = attempt(function() ctx.user = "y" end),
    insert = attempt(function() table.insert(ctx.list, 1) end),
    request = attempt(function() ctx.request.path = "/x" end),
    metatable = attempt(function() setmetatable(ctx, nil) end),
    user = ctx.user,
    role = ctx.claims.role,
    x = tostring(ctx.x),
    claims = table.concat(claims, ","),
    len = #ctx.list,
    sum = sum,
    count = count,
    concat = table.concat(ctx.list, "+"),
    unpacked = select('#', table.unpack(ctx.list)),
    raw_user = tostring(rawget(ctx, "user")),
    next_is_nil = next(ctx) == nil,
    metatable_name = getmetatable(ctx),
  })
  return false
end
"#,
    );
    let (_gw, mut client, _upstream) =
        pair("", &[("on_upgrade", &login), ("on_client_frame", &probe)]).await;
    let seen = ask(&mut client, "probe").await;
    for key in ["new_key", "nested", "existing", "insert", "request"] {
        let outcome = seen[key].as_str().unwrap();
        assert!(
            outcome.starts_with("false "),
            "{key}: the write succeeded: {outcome}"
        );
        assert!(outcome.contains("ctx is read-only"), "{key}: {outcome}");
    }
    assert!(
        seen["metatable"].as_str().unwrap().starts_with("false "),
        "{seen}"
    );
    assert_eq!(seen["user"], "ann", "failed writes change nothing");
    assert_eq!(seen["role"], "admin");
    assert_eq!(seen["x"], "nil");
    assert_eq!(seen["claims"], "level=3,role=admin", "pairs sees through");
    assert_eq!(seen["len"], 3, "# sees through");
    assert_eq!(seen["sum"], 60, "ipairs sees through");
    assert_eq!(seen["count"], 3);
    assert_eq!(seen["concat"], "10+20+30", "table functions see through");
    assert_eq!(seen["unpacked"], 3);
    assert_eq!(seen["raw_user"], "nil", "rawget sees the empty proxy");
    assert_eq!(seen["next_is_nil"], true, "next sees the empty proxy");
    assert_eq!(seen["metatable_name"], "ctx");
}

#[tokio::test]
async fn gw_log_json_and_now() {
    let tools = script(
        "tools.lua",
        r#"
return function(msg, ctx, conn)
  gw.log.info("policy says", 1, true, nil)
  gw.log.warn("careful")
  gw.log.debug("details")
  gw.log.error("bad but fine")
  print("printed")
  local original = { name = "ann", list = { 1, 2, 3 }, nested = { ok = true, pi = 3.5 } }
  local encoded, encode_err = gw.json.encode(original)
  local back = gw.json.decode(encoded)
  local bad, bad_err = gw.json.decode("{not json")
  local unencodable, unencodable_err = gw.json.encode({ f = print })
  local with_null = gw.json.decode('{"n":null,"empty":[]}')
  local decode_number_ok, decode_number_err = pcall(gw.json.decode, 5)
  conn:reply({
    encoded = encoded,
    encode_err_is_nil = encode_err == nil,
    back_name = back.name,
    back_len = #back.list,
    back_third = back.list[3],
    back_ok = back.nested.ok,
    back_pi = back.nested.pi,
    bad_is_nil = bad == nil,
    bad_err = bad_err,
    unencodable_is_nil = unencodable == nil,
    unencodable_err_type = type(unencodable_err),
    null_eq = with_null.n == gw.json.null,
    decode_number_ok = decode_number_ok,
    decode_number_err = tostring(decode_number_err),
    null_encoded = gw.json.encode({ v = gw.json.null }),
    empty_array = gw.json.encode(with_null.empty),
    now = gw.now(),
    now_type = math.type(gw.now()),
  })
  return false
end
"#,
    );
    let (_gw, mut client, _upstream) = pair("", &[("on_client_frame", &tools)]).await;
    let seen = ask(&mut client, "go").await;
    let encoded: Json = serde_json::from_str(seen["encoded"].as_str().unwrap()).unwrap();
    assert_eq!(
        encoded,
        json!({"name": "ann", "list": [1, 2, 3], "nested": {"ok": true, "pi": 3.5}})
    );
    assert_eq!(seen["encode_err_is_nil"], true);
    assert_eq!(seen["back_name"], "ann");
    assert_eq!(seen["back_len"], 3);
    assert_eq!(seen["back_third"], 3);
    assert_eq!(seen["back_ok"], true);
    assert_eq!(seen["back_pi"], 3.5);
    assert_eq!(seen["bad_is_nil"], true, "bad JSON gives nil, not an error");
    let bad_err = seen["bad_err"].as_str().expect("and an error message");
    assert!(bad_err.contains("invalid JSON"), "{bad_err}");
    assert_eq!(seen["unencodable_is_nil"], true);
    assert_eq!(seen["unencodable_err_type"], "string");
    assert_eq!(seen["null_eq"], true, "JSON null decodes to gw.json.null");
    assert_eq!(
        seen["decode_number_ok"], false,
        "decoding a non-string is misuse"
    );
    assert!(
        seen["decode_number_err"]
            .as_str()
            .unwrap()
            .contains("gw.json.decode expects a string"),
        "{seen}"
    );
    assert_eq!(seen["null_encoded"], r#"{"v":null}"#);
    assert_eq!(
        seen["empty_array"], "[]",
        "a decoded empty array stays an array"
    );
    assert_eq!(seen["now_type"], "float");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let policy_now = seen["now"].as_f64().unwrap();
    assert!(
        (now - policy_now).abs() < 5.0,
        "gw.now() {policy_now} vs {now}"
    );
}

/// A frame policy that runs `gw.shared` operations sent as JSON and replies with the result.
/// `vm` numbers the Lua VM (one per worker) that loaded the script.
const SHARED_OPS: &str = r#"
local vm = gw.shared:incr("vm-seq")
return function(msg, ctx, conn)
  local m = msg.json
  local r, err
  if m.op == "set" then gw.shared:set(m.k, m.v, m.ttl)
  elseif m.op == "get" then r = gw.shared:get(m.k)
  elseif m.op == "incr" then r, err = gw.shared:incr(m.k, m.by)
  elseif m.op == "delete" then gw.shared:delete(m.k)
  elseif m.op == "settable" then
    local ok, e = pcall(function() gw.shared:set(m.k, {}) end)
    r, err = ok, tostring(e)
  end
  conn:reply({ value = r, kind = type(r), math = math.type(r), err = err, vm = vm })
  return false
end
"#;

async fn shared_gateway(workers: usize) -> framegate::Running {
    let up = echo().await;
    let ops = script("shared.lua", SHARED_OPS);
    gateway_with_server(
        &format!("workers = {workers}\n"),
        &route("/s", up.addr, "", &[("on_client_frame", &ops)]),
    )
    .await
}

#[tokio::test]
async fn gw_shared_get_set_incr_delete() {
    let gw = shared_gateway(1).await;
    let mut ws = connect(gw.local_addr(), "/s").await;

    let missing = ask(&mut ws, r#"{"op":"get","k":"nothing"}"#).await;
    assert_eq!(missing["kind"], "nil");

    ask(&mut ws, r#"{"op":"set","k":"s","v":"text"}"#).await;
    ask(&mut ws, r#"{"op":"set","k":"i","v":5}"#).await;
    ask(&mut ws, r#"{"op":"set","k":"f","v":2.5}"#).await;
    ask(&mut ws, r#"{"op":"set","k":"b","v":false}"#).await;
    let s = ask(&mut ws, r#"{"op":"get","k":"s"}"#).await;
    assert_eq!(
        (&s["value"], &s["kind"]),
        (&json!("text"), &json!("string"))
    );
    let i = ask(&mut ws, r#"{"op":"get","k":"i"}"#).await;
    assert_eq!((&i["value"], &i["math"]), (&json!(5), &json!("integer")));
    let f = ask(&mut ws, r#"{"op":"get","k":"f"}"#).await;
    assert_eq!((&f["value"], &f["math"]), (&json!(2.5), &json!("float")));
    let b = ask(&mut ws, r#"{"op":"get","k":"b"}"#).await;
    assert_eq!(
        (&b["value"], &b["kind"]),
        (&json!(false), &json!("boolean"))
    );

    let n = ask(&mut ws, r#"{"op":"incr","k":"i"}"#).await;
    assert_eq!(n["value"], 6, "incr adds 1 by default");
    let n = ask(&mut ws, r#"{"op":"incr","k":"i","by":-10}"#).await;
    assert_eq!(n["value"], -4);
    let n = ask(&mut ws, r#"{"op":"incr","k":"fresh","by":3}"#).await;
    assert_eq!(n["value"], 3, "a missing key starts from 0");
    let n = ask(&mut ws, r#"{"op":"incr","k":"s"}"#).await;
    assert_eq!(n["kind"], "nil", "incr of a string fails softly");
    assert!(n["err"].as_str().unwrap().contains("not a number"), "{n}");

    ask(&mut ws, r#"{"op":"delete","k":"s"}"#).await;
    let s = ask(&mut ws, r#"{"op":"get","k":"s"}"#).await;
    assert_eq!(s["kind"], "nil", "deleted");

    ask(&mut ws, r#"{"op":"set","k":"gone","v":"x"}"#).await;
    ask(&mut ws, r#"{"op":"set","k":"gone"}"#).await;
    let gone = ask(&mut ws, r#"{"op":"get","k":"gone"}"#).await;
    assert_eq!(gone["kind"], "nil", "setting nil deletes");

    let table = ask(&mut ws, r#"{"op":"settable","k":"t"}"#).await;
    assert_eq!(table["value"], false, "storing a table raises an error");
    assert!(
        table["err"]
            .as_str()
            .unwrap()
            .contains("values are strings, numbers or booleans"),
        "{table}"
    );
}

#[tokio::test]
async fn gw_shared_values_expire_after_their_ttl() {
    let gw = shared_gateway(1).await;
    let mut ws = connect(gw.local_addr(), "/s").await;
    let set_at = Instant::now();
    ask(&mut ws, r#"{"op":"set","k":"t","v":"soon gone","ttl":0.2}"#).await;
    ask(&mut ws, r#"{"op":"set","k":"kept","v":"stays"}"#).await;
    let now = ask(&mut ws, r#"{"op":"get","k":"t"}"#).await;
    assert_eq!(now["value"], "soon gone", "alive before its TTL");
    // Time itself is under test: poll until the value is gone.
    let gone_after = within("the TTL to pass", async {
        loop {
            let seen = ask(&mut ws, r#"{"op":"get","k":"t"}"#).await;
            if seen["kind"] == "nil" {
                return set_at.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        gone_after >= Duration::from_millis(200),
        "expired early, after {gone_after:?}"
    );
    assert!(
        gone_after < Duration::from_secs(2),
        "expired late, after {gone_after:?}"
    );
    let kept = ask(&mut ws, r#"{"op":"get","k":"kept"}"#).await;
    assert_eq!(kept["value"], "stays", "values without a TTL stay");
}

#[tokio::test]
async fn gw_shared_incr_is_atomic_across_connections_on_different_workers() {
    const N: usize = 200;
    let gw = shared_gateway(2).await;
    let mut a = connect(gw.local_addr(), "/s").await;
    // While `a` is open, the next connection goes to the other worker.
    let mut b = connect(gw.local_addr(), "/s").await;
    let vm_a = ask(&mut a, r#"{"op":"get","k":"x"}"#).await["vm"].clone();
    let vm_b = ask(&mut b, r#"{"op":"get","k":"x"}"#).await["vm"].clone();
    assert_ne!(
        vm_a, vm_b,
        "the two connections run in different workers' VMs"
    );

    let hammer = |mut ws: Client| async move {
        for _ in 0..N {
            ws.send(Message::text(r#"{"op":"incr","k":"hits"}"#))
                .await
                .unwrap();
        }
        for _ in 0..N {
            next_json(&mut ws).await;
        }
        ws
    };
    let (mut a, _b) = tokio::join!(tokio::spawn(hammer(a)), tokio::spawn(hammer(b)));
    let a = a.as_mut().unwrap();
    let total = ask(a, r#"{"op":"get","k":"hits"}"#).await;
    assert_eq!(total["value"], 2 * N);
}

#[tokio::test]
async fn gw_shared_values_are_visible_across_connections_and_workers() {
    let gw = shared_gateway(2).await;
    let mut writer = connect(gw.local_addr(), "/s").await;
    let mut reader = connect(gw.local_addr(), "/s").await;
    let mut third = connect(gw.local_addr(), "/s").await;
    let vm_w = ask(&mut writer, r#"{"op":"get","k":"-"}"#).await["vm"].clone();
    let vm_r = ask(&mut reader, r#"{"op":"get","k":"-"}"#).await["vm"].clone();
    assert_ne!(vm_w, vm_r, "writer and reader are on different workers");

    ask(&mut writer, r#"{"op":"set","k":"flag","v":true}"#).await;
    ask(&mut writer, r#"{"op":"set","k":"name","v":"from writer"}"#).await;
    for ws in [&mut reader, &mut third] {
        assert_eq!(ask(ws, r#"{"op":"get","k":"flag"}"#).await["value"], true);
        assert_eq!(
            ask(ws, r#"{"op":"get","k":"name"}"#).await["value"],
            "from writer"
        );
    }
    ask(&mut reader, r#"{"op":"delete","k":"flag"}"#).await;
    assert_eq!(
        ask(&mut writer, r#"{"op":"get","k":"flag"}"#).await["kind"],
        "nil"
    );
}

const RECORD_CLOSE: &str = r#"
return function(ctx, conn, info)
  local tag = ctx.request.query.tag
  local reply_ok, reply_err = pcall(function() conn:reply("too late") end)
  local close_ok, close_err = pcall(function() conn:close(1000) end)
  gw.shared:incr("calls:" .. tag)
  gw.shared:set("info:" .. tag, gw.json.encode({
    code = info.code, reason = info.reason, by = info.by, duration = info.duration,
    messages_in = info.messages_in, bytes_in = info.bytes_in,
    messages_out = info.messages_out, bytes_out = info.bytes_out,
    dropped_in = info.dropped_in, dropped_out = info.dropped_out,
    id_type = math.type(conn.id), state_seen = conn.state.seen,
    reply_ok = reply_ok, reply_err = tostring(reply_err),
    close_ok = close_ok, close_err = tostring(close_err),
  }))
end
"#;

const CLOSE_FRAMES: &str = r#"
return function(msg, ctx, conn)
  conn.state.seen = (conn.state.seen or 0) + 1
  if msg.data == "drop" then return false end
  if msg.data == "grow" then return "grown message" end
  if msg.data == "ping" then conn:reply("pong") return false end
  if msg.data == "close-me" then conn:close(4002, "policy close") end
end
"#;

/// Reads a `gw.shared` key through the `/read` route, polling until it is set.
async fn read_shared(addr: SocketAddr, key: &str) -> String {
    let mut ws = connect(addr, "/read").await;
    within(&format!("gw.shared {key} to be set"), async {
        loop {
            ws.send(Message::text(key)).await.unwrap();
            let value = next_text(&mut ws).await;
            if value != "nil" {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

async fn close_gateway() -> (
    framegate::Running,
    tokio::sync::mpsc::UnboundedReceiver<UpstreamWs>,
) {
    let (up, conns) = captured().await;
    let other = echo().await;
    let record = script("record.lua", RECORD_CLOSE);
    let frames = script("frames.lua", CLOSE_FRAMES);
    let reader = script(
        "reader.lua",
        "return function(msg, ctx, conn) conn:reply(tostring(gw.shared:get(msg.data))) return false end\n",
    );
    let gw = gateway(&format!(
        "{}{}",
        route(
            "/t",
            up.addr,
            "",
            &[
                ("on_client_frame", &frames),
                ("on_server_frame", &frames),
                ("on_close", &record)
            ]
        ),
        route("/read", other.addr, "", &[("on_client_frame", &reader)]),
    ))
    .await;
    (gw, conns)
}

#[tokio::test]
async fn on_close_runs_once_with_code_reason_who_and_counters() {
    let (gw, mut conns) = close_gateway().await;
    let addr = gw.local_addr();

    // Ended by the client, after traffic both ways and one dropped message.
    let mut client = connect(addr, "/t?tag=client").await;
    let mut upstream = within("upstream connection", conns.recv()).await.unwrap();
    client.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("hello")
    );
    upstream.send(Message::text("hello!")).await.unwrap();
    assert_eq!(next_text(&mut client).await, "hello!");
    // Counted with its size after the policy.
    client.send(Message::text("grow")).await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("grown message")
    );
    // A policy's own reply is not counted as forwarded traffic.
    client.send(Message::text("ping")).await.unwrap();
    assert_eq!(next_text(&mut client).await, "pong");
    client.send(Message::text("drop")).await.unwrap();
    client.close(Some(close_frame(4000, "bye"))).await.unwrap();
    assert_close(&expect_close(&mut upstream).await, 4000, "bye", "upstream");
    finish(upstream).await;
    finish(client).await;
    let info: Json = serde_json::from_str(&read_shared(addr, "info:client").await).unwrap();
    assert_eq!(info["code"], 4000);
    assert_eq!(info["reason"], "bye");
    assert_eq!(info["by"], "client");
    assert_eq!(info["messages_in"], 2);
    assert_eq!(info["bytes_in"], 5 + 13);
    assert_eq!(info["messages_out"], 1);
    assert_eq!(info["bytes_out"], 6);
    assert_eq!(info["dropped_in"], 2);
    assert_eq!(info["dropped_out"], 0);
    let duration = info["duration"].as_f64().unwrap();
    assert!(duration > 0.0 && duration < 10.0, "duration {duration}");
    assert_eq!(info["id_type"], "integer");
    assert_eq!(info["state_seen"], 5, "conn.state carries into on_close");
    assert_eq!(
        info["reply_ok"], false,
        "conn:reply cannot be used in on_close"
    );
    assert!(
        info["reply_err"].as_str().unwrap().contains("on_close"),
        "{info}"
    );
    assert_eq!(
        info["close_ok"], false,
        "conn:close cannot be used in on_close"
    );
    assert_eq!(
        read_shared(addr, "calls:client").await,
        "1",
        "on_close ran once"
    );

    // Ended by the upstream.
    let mut client = connect(addr, "/t?tag=upstream").await;
    let mut upstream = within("upstream connection", conns.recv()).await.unwrap();
    upstream
        .close(Some(close_frame(4001, "upstream bye")))
        .await
        .unwrap();
    assert_close(
        &expect_close(&mut client).await,
        4001,
        "upstream bye",
        "client",
    );
    finish(client).await;
    finish(upstream).await;
    let info: Json = serde_json::from_str(&read_shared(addr, "info:upstream").await).unwrap();
    assert_eq!(
        (&info["code"], &info["by"]),
        (&json!(4001), &json!("upstream"))
    );
    assert_eq!(info["reason"], "upstream bye");
    assert_eq!(info["messages_in"], 0);

    // Ended by the gateway (a policy's conn:close).
    let mut client = connect(addr, "/t?tag=gateway").await;
    let mut upstream = within("upstream connection", conns.recv()).await.unwrap();
    client.send(Message::text("close-me")).await.unwrap();
    assert_close(
        &expect_close(&mut client).await,
        4002,
        "policy close",
        "client",
    );
    assert_close(
        &expect_close(&mut upstream).await,
        4002,
        "policy close",
        "upstream",
    );
    finish(client).await;
    finish(upstream).await;
    let info: Json = serde_json::from_str(&read_shared(addr, "info:gateway").await).unwrap();
    assert_eq!(
        (&info["code"], &info["by"]),
        (&json!(4002), &json!("gateway"))
    );
    assert_eq!(info["reason"], "policy close");
    assert_eq!(read_shared(addr, "calls:upstream").await, "1");
    assert_eq!(read_shared(addr, "calls:gateway").await, "1");
}

#[tokio::test]
async fn on_close_runs_when_the_upstream_cannot_be_reached() {
    let record = script("record.lua", RECORD_CLOSE);
    let mark = script(
        "mark.lua",
        "return function(req, ctx) ctx.marked = true end\n",
    );
    let reader = script(
        "reader.lua",
        "return function(msg, ctx, conn) conn:reply(tostring(gw.shared:get(msg.data))) return false end\n",
    );
    let up = echo().await;
    let down = closed_port().await;
    let gw = gateway(&format!(
        "{}{}",
        route(
            "/t",
            down,
            "",
            &[("on_upgrade", &mark), ("on_close", &record)]
        ),
        route("/read", up.addr, "", &[("on_client_frame", &reader)]),
    ))
    .await;
    let (status, _, _) = raw_http(gw.local_addr(), &upgrade_request("/t?tag=down", "")).await;
    assert_eq!(status, 502);
    let info: Json =
        serde_json::from_str(&read_shared(gw.local_addr(), "info:down").await).unwrap();
    assert_eq!(info["by"], "gateway");
    assert_eq!(info["code"], 1006);
    assert!(
        info["reason"].as_str().unwrap().contains("cannot connect"),
        "{info}"
    );
    assert_eq!(info["duration"], 0.0);
    assert_eq!(info["messages_in"], 0);
    assert_eq!(info["messages_out"], 0);
    assert_eq!(read_shared(gw.local_addr(), "calls:down").await, "1");
}

#[tokio::test]
async fn on_close_does_not_run_after_a_rejected_or_failed_upgrade() {
    let record = script("record.lua", RECORD_CLOSE);
    let gate = script(
        "gate.lua",
        r#"
return function(req, ctx)
  if req.query.tag == "rejected" then return req:reject(403, "no") end
  if req.query.tag == "failed" then error("upgrade policy fails") end
end
"#,
    );
    let reader = script(
        "reader.lua",
        "return function(msg, ctx, conn) conn:reply(tostring(gw.shared:get(msg.data))) return false end\n",
    );
    let up = echo().await;
    let gw = gateway(&format!(
        "{}{}",
        route(
            "/t",
            up.addr,
            "",
            &[("on_upgrade", &gate), ("on_close", &record)]
        ),
        route("/read", up.addr, "", &[("on_client_frame", &reader)]),
    ))
    .await;
    let addr = gw.local_addr();
    let (status, _, _) = raw_http(addr, &upgrade_request("/t?tag=rejected", "")).await;
    assert_eq!(status, 403);
    let (status, _, _) = raw_http(addr, &upgrade_request("/t?tag=failed", "")).await;
    assert_eq!(status, 500);
    // A connection that did open: once its on_close has run, the others would have too.
    let mut opened = connect(addr, "/t?tag=opened").await;
    opened.close(None).await.unwrap();
    finish(opened).await;
    assert_eq!(read_shared(addr, "calls:opened").await, "1");
    let mut reader = connect(addr, "/read").await;
    for tag in ["rejected", "failed"] {
        reader
            .send(Message::text(format!("calls:{tag}")))
            .await
            .unwrap();
        assert_eq!(
            next_text(&mut reader).await,
            "nil",
            "on_close ran for {tag}"
        );
    }
}

#[tokio::test]
async fn messages_a_policy_drops_still_count_as_activity() {
    let decide = script("decide.lua", DECIDE);
    let (_gw, mut client, mut upstream) =
        pair("idle_timeout = \"300ms\"", &[("on_client_frame", &decide)]).await;
    // Time is under test: dropped messages every 100ms for 600ms keep the connection alive.
    let started = Instant::now();
    for _ in 0..6 {
        client.send(Message::text("drop")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.send(Message::text("still open")).await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("still open"),
        "open after {:?} with only dropped messages",
        started.elapsed()
    );
    let frame = expect_close(&mut client).await;
    assert_close(
        &frame,
        1001,
        "idle timeout",
        "client, once the messages stop",
    );
}

#[tokio::test]
async fn control_frames_never_reach_policies_and_fragments_arrive_whole() {
    let counter = script(
        "counter.lua",
        r#"
return function(msg, ctx, conn)
  conn.state.calls = (conn.state.calls or 0) + 1
  conn:reply(msg.type .. " " .. msg.size .. " " .. conn.state.calls .. " " .. (msg.text or "?"))
  return false
end
"#,
    );
    let (_gw, mut client, mut upstream) = pair(
        "",
        &[("on_client_frame", &counter), ("on_server_frame", &counter)],
    )
    .await;

    client
        .send(Message::Ping(Bytes::from_static(b"p1")))
        .await
        .unwrap();
    match within("pong", client.next()).await {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"p1"),
        other => panic!("expected a pong, got {other:?}"),
    }
    client
        .send(Message::Pong(Bytes::from_static(b"unsolicited")))
        .await
        .unwrap();
    client.send(Message::text("report")).await.unwrap();
    assert_eq!(
        next_text(&mut client).await,
        "text 6 1 report",
        "the policy saw only the data message"
    );

    // A fragmented text message, with a ping between its fragments, reaches the policy whole.
    for (payload, op, fin) in [
        (&b"hel"[..], OpCode::Data(Data::Text), false),
        (&b"lo "[..], OpCode::Data(Data::Continue), false),
    ] {
        client
            .send(Message::Frame(Frame::message(
                Bytes::from_static(payload),
                op,
                fin,
            )))
            .await
            .unwrap();
    }
    client
        .send(Message::Ping(Bytes::from_static(b"between")))
        .await
        .unwrap();
    client
        .send(Message::Frame(Frame::message(
            Bytes::from_static(b"world"),
            OpCode::Data(Data::Continue),
            true,
        )))
        .await
        .unwrap();
    assert_eq!(next_text(&mut client).await, "text 11 2 hello world");

    // A fragmented binary message: msg.size is the total.
    for i in 0..3 {
        let op = if i == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        client
            .send(Message::Frame(Frame::message(vec![b'z'; 100], op, i == 2)))
            .await
            .unwrap();
    }
    assert_eq!(
        next_text(&mut client).await,
        format!("binary 300 3 {}", "z".repeat(300))
    );

    // The upstream's ping is answered on its leg and is not a policy call either.
    upstream
        .send(Message::Ping(Bytes::from_static(b"up")))
        .await
        .unwrap();
    match within("upstream pong", upstream.next()).await {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"up"),
        other => panic!("expected a pong, got {other:?}"),
    }
    upstream.send(Message::text("from up")).await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("text 7 4 from up"),
        "on_server_frame's reply goes back to the upstream; one call per data message"
    );
}
