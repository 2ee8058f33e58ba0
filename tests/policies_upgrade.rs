//! Lua policies, upgrade phase: what `on_upgrade` sees in `req`, what its methods change
//! (reject, set_upstream, set_header, select_subprotocol, expire_in/expire_at), the context it
//! hands to the frame phase, and how broken scripts fail (500 at run time, `Gateway::new` at load).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::SinkExt;
use support::*;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};

/// Asserts that the upstream saw no handshake request (so far).
fn assert_no_upstream_request(up: &mut Upstream, why: &str) {
    match up.requests.try_recv() {
        Err(TryRecvError::Empty) => {}
        Ok(seen) => panic!("{why}: the upstream was contacted: {seen:?}"),
        Err(e) => panic!("{why}: upstream channel: {e}"),
    }
}

const INTERNAL_ERROR: &str = "internal error in the upgrade policy";

#[tokio::test]
async fn on_upgrade_sees_every_request_field() {
    let mut up = echo().await;
    let dump = script(
        "dump.lua",
        r#"
return function(req, ctx)
  local h = req.headers
  local values = req:header_values("X-Multi")
  local write_ok, write_err = pcall(function() req.path = "/elsewhere" end)
  local seen = {
    method = req.method,
    path = req.path,
    query_a = req.query.a,
    query_b = req.query.b,
    query_c = req.query.c,
    query_flag = req.query.flag,
    query_type = type(req.query),
    query_string = req.query_string,
    custom_mixed_case = h["X-Custom"],
    custom_lower = h["x-custom"],
    custom_upper = h["X-CUSTOM"],
    multi_joined = h["x-multi"],
    multi_values = table.concat(values, "|"),
    multi_first = values[1],
    multi_count = #values,
    values_type = type(values),
    missing_header = tostring(h["x-missing"]),
    missing_values = #req:header_values("x-missing"),
    room = req.params.room,
    id = req.params.id,
    client_ip = req.client_ip,
    scheme = req.scheme,
    host = req.host,
    subprotocols = table.concat(req.subprotocols, "|"),
    subprotocol_count = #req.subprotocols,
    write_ok = write_ok,
    write_err = tostring(write_err),
  }
  return req:reject(418, gw.json.encode(seen), { ["content-type"] = "application/json" })
end
"#,
    );
    let gw = gateway(&route(
        "/r/{room}/{id}",
        up.addr,
        "",
        &[("on_upgrade", &dump)],
    ))
    .await;
    let (status, head, body) = raw_http(
        gw.local_addr(),
        &upgrade_request(
            "/r/lobby/42?a=1&b=x%20y&a=2&flag&c=a+b",
            "X-Custom: hello\r\nX-Multi: one\r\nX-Multi: two\r\n\
             Sec-WebSocket-Protocol: chat.v1, chat.v2\r\nSec-WebSocket-Protocol: chat.v3\r\n",
        ),
    )
    .await;
    assert_eq!(status, 418, "{head}{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).expect("the policy's JSON dump");
    let field = |k: &str| seen[k].clone();
    assert_eq!(field("method"), "GET");
    assert_eq!(field("path"), "/r/lobby/42", "path without the query");
    assert_eq!(field("query_type"), "table");
    assert_eq!(
        field("query_a"),
        "1",
        "a repeated key keeps its first value"
    );
    assert_eq!(field("query_b"), "x y", "query values are decoded");
    assert_eq!(field("query_c"), "a b", "decoded as a form: + is a space");
    assert_eq!(
        field("query_flag"),
        "",
        "a key without = has an empty value"
    );
    assert_eq!(
        field("query_string"),
        "a=1&b=x%20y&a=2&flag&c=a+b",
        "query_string is raw"
    );
    assert_eq!(field("custom_mixed_case"), "hello");
    assert_eq!(field("custom_lower"), "hello");
    assert_eq!(field("custom_upper"), "hello");
    assert_eq!(field("multi_joined"), "one, two");
    assert_eq!(field("multi_values"), "one|two");
    assert_eq!(field("multi_first"), "one");
    assert_eq!(field("multi_count"), 2);
    assert_eq!(field("values_type"), "table");
    assert_eq!(field("missing_header"), "nil");
    assert_eq!(field("missing_values"), 0);
    assert_eq!(field("room"), "lobby");
    assert_eq!(field("id"), "42");
    assert_eq!(field("client_ip"), "127.0.0.1");
    assert_eq!(field("scheme"), "ws");
    assert_eq!(field("host"), "gateway.test");
    assert_eq!(field("subprotocols"), "chat.v1|chat.v2|chat.v3");
    assert_eq!(field("subprotocol_count"), 3);
    assert_eq!(field("write_ok"), false, "req fields cannot be assigned");
    assert!(
        field("write_err")
            .as_str()
            .unwrap()
            .contains("req is read-only"),
        "{seen}"
    );
    assert_no_upstream_request(&mut up, "the policy rejected");
}

#[tokio::test]
async fn on_upgrade_can_report_what_it_saw_in_an_upstream_header() {
    let mut up = echo().await;
    let report = script(
        "report.lua",
        r#"
return function(req, ctx)
  req:set_header("x-seen", table.concat({
    req.method, req.path, req.query.q, req.params.room, req.client_ip, req.scheme,
    req.headers["X-Token"], #req.subprotocols,
  }, " "))
end
"#,
    );
    let gw = gateway(&route("/c/{room}", up.addr, "", &[("on_upgrade", &report)])).await;
    let (mut ws, _) = connect_with(gw.local_addr(), "/c/blue?q=a%2Bb", &[("x-token", "t1")])
        .await
        .expect("upgrade succeeds");
    let seen = within("upstream request", up.requests.recv())
        .await
        .unwrap();
    assert_eq!(
        seen.headers["x-seen"],
        "GET /c/blue a+b blue 127.0.0.1 ws t1 0"
    );
    assert_eq!(seen.uri, "/?q=a%2Bb", "the route's upstream gets the query");
    ws.send(Message::text("through")).await.unwrap();
    assert_eq!(
        next_message(&mut ws).await.unwrap().unwrap(),
        Message::text("through")
    );
}

#[tokio::test]
async fn reject_answers_with_status_body_and_headers_and_never_contacts_the_upstream() {
    let mut up = echo().await;
    let gate = script(
        "gate.lua",
        r#"
return function(req, ctx)
  if req.query.deny then
    return req:reject(451, "denied: " .. req.query.deny, { ["x-why"] = "policy", ["retry-after"] = 7 })
  end
  if req.query.bare then
    return req:reject(403)
  end
end
"#,
    );
    let gw = gateway(&route("/g", up.addr, "", &[("on_upgrade", &gate)])).await;
    let addr = gw.local_addr();

    let (status, head, body) = raw_http(addr, &upgrade_request("/g?deny=legal", "")).await;
    assert_eq!(status, 451);
    assert_eq!(body, "denied: legal");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("\r\nx-why: policy\r\n"), "{head}");
    assert!(head.contains("\r\nretry-after: 7\r\n"), "{head}");
    assert!(
        !head.contains("content-type"),
        "only the policy's headers: {head}"
    );
    assert_no_upstream_request(&mut up, "rejected with a body");

    let (status, _, body) = raw_http(addr, &upgrade_request("/g?bare=1", "")).await;
    assert_eq!(status, 403);
    assert_eq!(body, "", "no body given, none sent");
    assert_no_upstream_request(&mut up, "rejected without a body");

    // A real client sees the refusal as an HTTP error with the policy's status and body.
    match connect_with(addr, "/g?deny=again", &[]).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 451);
            assert_eq!(response.headers()["x-why"], "policy");
            assert_eq!(response.body().as_deref(), Some(&b"denied: again"[..]));
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    assert_no_upstream_request(&mut up, "rejected a real client");

    // Without a rejection the same route reaches the upstream (the checks above can fail).
    let _ws = connect(addr, "/g").await;
    within("upstream request", up.requests.recv())
        .await
        .expect("allowed request reaches the upstream");
}

#[tokio::test]
async fn set_upstream_sends_traffic_elsewhere_without_the_client_query() {
    let mut configured = echo().await;
    let mut chosen = echo().await;
    let router = script(
        "router.lua",
        &format!(
            r#"
return function(req, ctx)
  if req.query.to == "chosen" then
    req:set_upstream("ws://{}/picked/" .. req.params.room .. "?by=policy")
  end
end
"#,
            chosen.addr
        ),
    );
    let gw = gateway(&format!(
        "[[route]]\npath = \"/room/{{room}}\"\nupstream = \"ws://{}/configured/{{room}}\"\n\
         [route.policies]\non_upgrade = {router}\n",
        configured.addr
    ))
    .await;

    let mut ws = connect(gw.local_addr(), "/room/red?to=chosen&secret=1").await;
    let seen = within("chosen upstream request", chosen.requests.recv())
        .await
        .unwrap();
    assert_eq!(
        seen.uri, "/picked/red?by=policy",
        "the policy's URL is used as given, without the client's query"
    );
    ws.send(Message::text("via chosen")).await.unwrap();
    assert_eq!(
        next_message(&mut ws).await.unwrap().unwrap(),
        Message::text("via chosen")
    );
    assert_no_upstream_request(&mut configured, "the policy chose another upstream");

    // Without set_upstream the route's own URL (with the client's query) is used.
    let _plain = connect(gw.local_addr(), "/room/red?x=1").await;
    let seen = within("configured upstream request", configured.requests.recv())
        .await
        .unwrap();
    assert_eq!(seen.uri, "/configured/red?x=1");
}

#[tokio::test]
async fn set_header_adds_replaces_and_removes_upstream_request_headers() {
    let mut up = echo().await;
    let headers = script(
        "headers.lua",
        r#"
return function(req, ctx)
  req:set_header("x-added", "yes")
  req:set_header("X-Replaced", "new")
  req:set_header("x-number", 42)
  req:set_header("x-remove", nil)
  req:set_header("authorization", nil)
  req:set_header("x-set-then-removed", "a")
  req:set_header("x-set-then-removed", nil)
  req:set_header("X-Forwarded-For", "203.0.113.9")
end
"#,
    );
    let gw = gateway(&route("/h", up.addr, "", &[("on_upgrade", &headers)])).await;
    let _ws = connect_with(
        gw.local_addr(),
        "/h",
        &[
            ("x-replaced", "old"),
            ("x-replaced", "older"),
            ("x-remove", "bye"),
            ("authorization", "Bearer secret"),
            ("x-kept", "kept"),
        ],
    )
    .await
    .expect("upgrade succeeds");
    let seen = within("upstream request", up.requests.recv())
        .await
        .unwrap();
    let h = &seen.headers;
    assert_eq!(h["x-added"], "yes");
    let replaced: Vec<_> = h.get_all("x-replaced").iter().collect();
    assert_eq!(replaced, ["new"], "set_header replaces every value");
    assert_eq!(h["x-number"], "42");
    assert!(
        h.get("x-remove").is_none(),
        "removed by set_header(name, nil)"
    );
    assert!(h.get("authorization").is_none());
    assert!(
        h.get("x-set-then-removed").is_none(),
        "calls apply in order"
    );
    assert_eq!(
        h["x-kept"], "kept",
        "other client headers still go upstream"
    );
    let forwarded: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
    assert_eq!(
        forwarded,
        ["203.0.113.9"],
        "policies can override the forwarded headers"
    );
}

#[tokio::test]
async fn set_header_refuses_headers_the_gateway_manages() {
    let mut up = echo().await;
    let managed = script(
        "managed.lua",
        r#"
return function(req, ctx)
  if req.query.probe then
    local ok, err = pcall(function() req:set_header(req.query.name, "x") end)
    return req:reject(400, tostring(ok) .. " " .. tostring(err))
  end
  req:set_header(req.query.name, "forged")
end
"#,
    );
    let gw = gateway(&route("/m", up.addr, "", &[("on_upgrade", &managed)])).await;
    let addr = gw.local_addr();
    for name in [
        "sec-websocket-key",
        "Sec-WebSocket-Version",
        "sec-websocket-accept",
        "sec-websocket-extensions",
        "host",
        "Connection",
        "upgrade",
        "content-length",
        "transfer-encoding",
    ] {
        let (status, _, body) =
            raw_http(addr, &upgrade_request(&format!("/m?name={name}"), "")).await;
        assert_eq!(status, 500, "setting {name}");
        assert_eq!(body.trim(), INTERNAL_ERROR, "setting {name}");
        let (status, _, body) = raw_http(
            addr,
            &upgrade_request(&format!("/m?name={name}&probe=1"), ""),
        )
        .await;
        assert_eq!(status, 400, "probing {name}");
        assert!(body.starts_with("false "), "{name}: {body}");
        assert!(
            body.contains("managed by the gateway"),
            "{name}: error text {body:?}"
        );
    }
    assert_no_upstream_request(&mut up, "every managed header failed the upgrade");
    // An ordinary header on the same route works.
    let _ws = connect(addr, "/m?name=x-fine").await;
    let seen = within("upstream request", up.requests.recv())
        .await
        .unwrap();
    assert_eq!(seen.headers["x-fine"], "forged");
}

#[tokio::test]
async fn select_subprotocol_offers_only_the_chosen_one_upstream_and_answers_the_client() {
    let mut up = upstream(
        Answer {
            protocol: Some("b"),
            ..Answer::default()
        },
        |_ws, _| async move {
            // Hold the connection open while the test looks at it.
            std::future::pending::<()>().await;
        },
    )
    .await;
    let pick = script(
        "pick.lua",
        r#"
return function(req, ctx)
  req:select_subprotocol(req.query.pick)
end
"#,
    );
    let gw = gateway(&route("/s", up.addr, "", &[("on_upgrade", &pick)])).await;

    let (_ws, response) = connect_with(
        gw.local_addr(),
        "/s?pick=b",
        &[("sec-websocket-protocol", "a, b")],
    )
    .await
    .expect("upgrade succeeds");
    assert_eq!(response.headers()["sec-websocket-protocol"], "b");
    let seen = within("upstream request", up.requests.recv())
        .await
        .unwrap();
    let offered: Vec<_> = seen
        .headers
        .get_all("sec-websocket-protocol")
        .iter()
        .collect();
    assert_eq!(offered, ["b"], "only the selected subprotocol is offered");

    let (status, _, body) = raw_http(
        gw.local_addr(),
        &upgrade_request("/s?pick=c", "Sec-WebSocket-Protocol: a, b\r\n"),
    )
    .await;
    assert_eq!(
        status, 500,
        "selecting a subprotocol the client did not offer"
    );
    assert_eq!(body.trim(), INTERNAL_ERROR);
    assert_no_upstream_request(&mut up, "the selection failed");

    let (status, _, _) = raw_http(
        gw.local_addr(),
        &upgrade_request("/s?pick=B", "Sec-WebSocket-Protocol: a, b\r\n"),
    )
    .await;
    assert_eq!(status, 500, "subprotocol names are case-sensitive");
}

#[tokio::test]
async fn the_selected_subprotocol_reaches_the_client_whatever_the_upstream_answers() {
    // This upstream answers without any subprotocol.
    let mut up = echo().await;
    let pick = script(
        "pick.lua",
        "return function(req, ctx) req:select_subprotocol(\"b\") end\n",
    );
    let gw = gateway(&route("/s", up.addr, "", &[("on_upgrade", &pick)])).await;
    let (mut ws, response) =
        connect_with(gw.local_addr(), "/s", &[("sec-websocket-protocol", "a, b")])
            .await
            .expect("upgrade succeeds");
    assert_eq!(response.headers()["sec-websocket-protocol"], "b");
    let seen = within("upstream request", up.requests.recv())
        .await
        .unwrap();
    assert_eq!(seen.headers["sec-websocket-protocol"], "b");
    ws.send(Message::text("flows")).await.unwrap();
    assert_eq!(
        next_message(&mut ws).await.unwrap().unwrap(),
        Message::text("flows")
    );
}

/// Connects, then waits for the client's close frame; returns it with the time since `started`.
async fn closes_after(
    addr: SocketAddr,
    path: &str,
) -> (tungstenite::protocol::CloseFrame, Duration) {
    let started = Instant::now();
    let mut ws = connect(addr, path).await;
    let frame = expect_close(&mut ws).await;
    (frame, started.elapsed())
}

fn assert_expired(frame: &tungstenite::protocol::CloseFrame, elapsed: Duration, what: &str) {
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1001, "connection lifetime expired"),
        "{what}"
    );
    assert!(
        elapsed >= Duration::from_millis(250),
        "{what}: closed too early, after {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "{what}: closed too late, after {elapsed:?}"
    );
}

#[tokio::test]
async fn expire_in_shortens_the_route_lifetime() {
    let up = echo().await;
    let short = script("short.lua", "return function(req) req:expire_in(0.3) end\n");
    let gw = gateway(&route(
        "/e",
        up.addr,
        "expire = \"1h\"",
        &[("on_upgrade", &short)],
    ))
    .await;
    let (frame, elapsed) = closes_after(gw.local_addr(), "/e").await;
    assert_expired(&frame, elapsed, "expire_in(0.3)");
}

#[tokio::test]
async fn expire_at_takes_a_unix_time() {
    let up = echo().await;
    let at = script(
        "at.lua",
        "return function(req) req:expire_at(gw.now() + 0.3) end\n",
    );
    let gw = gateway(&route(
        "/e",
        up.addr,
        "expire = \"1h\"",
        &[("on_upgrade", &at)],
    ))
    .await;
    let (frame, elapsed) = closes_after(gw.local_addr(), "/e").await;
    assert_expired(&frame, elapsed, "expire_at(now + 0.3)");
}

#[tokio::test]
async fn expire_in_cannot_lengthen_the_route_lifetime() {
    let up = echo().await;
    let long = script(
        "long.lua",
        "return function(req) req:expire_in(3600) req:expire_at(gw.now() + 7200) end\n",
    );
    let gw = gateway(&route(
        "/e",
        up.addr,
        "expire = \"300ms\"",
        &[("on_upgrade", &long)],
    ))
    .await;
    let (frame, elapsed) = closes_after(gw.local_addr(), "/e").await;
    assert_expired(&frame, elapsed, "route expire 300ms with expire_in(3600)");
}

#[tokio::test]
async fn the_earliest_of_several_expiry_requests_wins() {
    let up = echo().await;
    let both = script(
        "both.lua",
        "return function(req) req:expire_in(0.3) req:expire_in(60) end\n",
    );
    let gw = gateway(&route("/e", up.addr, "", &[("on_upgrade", &both)])).await;
    let (frame, elapsed) = closes_after(gw.local_addr(), "/e").await;
    assert_expired(&frame, elapsed, "expire_in(0.3) then expire_in(60)");
}

#[tokio::test]
async fn expire_at_in_the_past_closes_the_connection_as_soon_as_it_opens() {
    let up = echo().await;
    let past = script(
        "past.lua",
        "return function(req) req:expire_at(gw.now() - 10) end\n",
    );
    let gw = gateway(&route(
        "/e",
        up.addr,
        "expire = \"1h\"",
        &[("on_upgrade", &past)],
    ))
    .await;
    let (frame, elapsed) = closes_after(gw.local_addr(), "/e").await;
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1001, "connection lifetime expired")
    );
    assert!(elapsed < Duration::from_secs(1), "closed after {elapsed:?}");
}

/// Starts a gateway whose route `template` runs `on_upgrade` and then `on_client_frame`,
/// upgrades on `path` with `headers`, sends one message and returns the frame policy's JSON
/// reply (the frame policy reports what it saw with `conn:reply`).
async fn reply_after_upgrade(
    template: &str,
    path: &str,
    headers: &[(&str, &str)],
    on_upgrade: &str,
    on_client_frame: &str,
) -> serde_json::Value {
    let up = echo().await;
    let gw = gateway(&route(
        template,
        up.addr,
        "",
        &[
            ("on_upgrade", on_upgrade),
            ("on_client_frame", on_client_frame),
        ],
    ))
    .await;
    let (mut ws, _) = connect_with(gw.local_addr(), path, headers)
        .await
        .expect("upgrade succeeds");
    ws.send(Message::text("show")).await.unwrap();
    let reply = next_message(&mut ws).await.unwrap().unwrap();
    serde_json::from_str(reply.to_text().unwrap()).unwrap()
}

#[tokio::test]
async fn ctx_from_on_upgrade_reaches_frame_policies_with_the_request() {
    let login = script(
        "login.lua",
        r#"
return function(req, ctx)
  ctx.user = req.query.user
  ctx.claims = { role = "admin", scopes = { "read", "write" } }
end
"#,
    );
    let show = script(
        "show.lua",
        r#"
return function(msg, ctx, conn)
  local r = ctx.request
  conn:reply({
    user = ctx.user,
    role = ctx.claims.role,
    scopes = table.concat(ctx.claims.scopes, ","),
    path = r.path,
    room = r.params.room,
    query_user = r.query.user,
    query_string = r.query_string,
    header_mixed = r.headers["X-Custom"],
    header_lower = r.headers["x-custom"],
    client_ip = r.client_ip,
    method = r.method,
  })
  return false
end
"#,
    );
    let seen = reply_after_upgrade(
        "/ctx/{room}",
        "/ctx/green?user=ann",
        &[("x-custom", "c1")],
        &login,
        &show,
    )
    .await;
    assert_eq!(
        seen,
        serde_json::json!({
            "user": "ann",
            "role": "admin",
            "scopes": "read,write",
            "path": "/ctx/green",
            "room": "green",
            "query_user": "ann",
            "query_string": "user=ann",
            "header_mixed": "c1",
            "header_lower": "c1",
            "client_ip": "127.0.0.1",
            "method": "GET",
        })
    );
}

/// `req`'s table fields are made when first read: they are read-only at every level, they
/// iterate and count like tables, and one kept in `ctx` keeps its content in the frame phase.
#[tokio::test]
async fn req_table_fields_are_read_only_iterable_and_survive_in_ctx() {
    let keep = script(
        "keep.lua",
        r#"
return function(req, ctx)
  local ok, err = pcall(function() req.headers["x-new"] = "1" end)
  local qok = pcall(function() req.query.a = "2" end)
  local keys = {}
  for k, v in pairs(req.query) do keys[#keys + 1] = k .. "=" .. v end
  table.sort(keys)
  ctx.seen = {
    header_write = tostring(ok) .. " " .. tostring(err),
    query_write = qok,
    query_pairs = table.concat(keys, "&"),
    protocols = #req.subprotocols .. " " .. tostring(req.subprotocols[1]),
    metatable = getmetatable(req.headers),
  }
  ctx.headers = req.headers
  ctx.params = req.params
end
"#,
    );
    let show = script(
        "show.lua",
        r#"
return function(msg, ctx, conn)
  local s = ctx.seen
  conn:reply({
    header_write = s.header_write, query_write = s.query_write, query_pairs = s.query_pairs,
    protocols = s.protocols, metatable = s.metatable,
    kept_header = ctx.headers["X-Custom"], kept_param = ctx.params.room,
  })
  return false
end
"#,
    );
    let seen = reply_after_upgrade(
        "/keep/{room}",
        "/keep/blue?b=2&a=1",
        &[("x-custom", "c1")],
        &keep,
        &show,
    )
    .await;
    assert!(
        seen["header_write"].as_str().unwrap().starts_with("false ")
            && seen["header_write"]
                .as_str()
                .unwrap()
                .contains("req is read-only"),
        "{seen}"
    );
    assert_eq!(seen["query_write"], false, "{seen}");
    assert_eq!(seen["query_pairs"], "a=1&b=2", "{seen}");
    assert_eq!(seen["protocols"], "0 nil", "{seen}");
    assert_eq!(seen["metatable"], "req", "{seen}");
    assert_eq!(seen["kept_header"], "c1", "{seen}");
    assert_eq!(seen["kept_param"], "blue", "{seen}");
}

#[tokio::test]
async fn a_runtime_error_in_on_upgrade_gives_500_without_contacting_the_upstream() {
    let mut up = echo().await;
    let broken = script(
        "broken.lua",
        r#"
return function(req, ctx)
  if req.query.how == "error" then error("boom") end
  if req.query.how == "nil" then local t = nil; return t.field end
  if req.query.how == "misuse" then req:reject("not a status") end
end
"#,
    );
    let gw = gateway(&route("/b", up.addr, "", &[("on_upgrade", &broken)])).await;
    for how in ["error", "nil", "misuse"] {
        let (status, _, body) = raw_http(
            gw.local_addr(),
            &upgrade_request(&format!("/b?how={how}"), ""),
        )
        .await;
        assert_eq!(status, 500, "{how}");
        assert_eq!(body.trim(), INTERNAL_ERROR, "{how}");
    }
    assert_no_upstream_request(&mut up, "the policy failed");
    // The VM is fine afterwards.
    let _ws = connect(gw.local_addr(), "/b?how=fine").await;
    within("upstream request", up.requests.recv())
        .await
        .expect("a good request still goes through");
}

/// The error `Gateway::new` gives for a route with `hook = script`.
fn load_error(hook: &str, script: &str) -> String {
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\
         [[route]]\npath = \"/x\"\nupstream = \"ws://127.0.0.1:9/\"\n\
         [route.policies]\n{hook} = {script}\n"
    );
    let config = framegate::Config::from_toml(&toml, std::path::Path::new("test.toml"))
        .expect("the configuration itself is valid");
    match framegate::Gateway::new(config) {
        Ok(_) => panic!("a broken script was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_syntax_error_fails_start_up_with_the_path_and_line() {
    let path = script_path(
        "syntax.lua",
        "return function(req, ctx)\n  local ok = true\n  local = 5\nend\n",
    );
    let shown = path.display().to_string();
    let error = load_error("on_upgrade", &format!("{shown:?}"));
    assert!(
        error.contains(&format!("{shown}:3:")),
        "error should name {shown}:3: but is {error:?}"
    );
}

#[test]
fn a_syntax_error_in_a_deeply_nested_script_names_the_whole_path() {
    // Lua shortens chunk names to 60 bytes in its messages; the gateway's error must still
    // say which file is broken.
    let path = script_path(
        "a-policy-with-a-rather-long-descriptive-file-name-for-this-test.lua",
        "return function(msg, ctx, conn)\n  return (\nend\n",
    );
    let shown = path.display().to_string();
    assert!(shown.len() > 60, "the path must be long for this test");
    let error = load_error("on_client_frame", &format!("{shown:?}"));
    assert!(
        error.contains(&format!("{shown}:3:")),
        "error should name {shown}:3: but is {error:?}"
    );
}

#[test]
fn a_script_that_does_not_return_a_function_fails_start_up() {
    let path = script_path("value.lua", "local x = 1\nreturn { x = x }\n");
    let shown = path.display().to_string();
    let error = load_error("on_client_frame", &format!("{shown:?}"));
    assert!(error.contains("must return a function"), "{error}");
    assert!(error.contains(&shown), "{error}");

    let path = script_path("nothing.lua", "local x = 1\n");
    let error = load_error("on_upgrade", &format!("{:?}", path.display().to_string()));
    assert!(error.contains("must return a function"), "{error}");
}

#[test]
fn an_error_while_loading_a_script_fails_start_up_with_the_path_and_line() {
    let path = script_path(
        "toplevel.lua",
        "local a = 1\nlocal b = nil\nlocal c = b.field\nreturn function() end\n",
    );
    let shown = path.display().to_string();
    let error = load_error("on_close", &format!("{shown:?}"));
    assert!(
        error.contains(&format!("{shown}:3:")),
        "error should name {shown}:3: but is {error:?}"
    );
}

/// Header views look each header up when read; `pairs` still sees every header (lower-case
/// names, repeated values joined), in `on_upgrade` and in `ctx.request.headers` alike, and
/// each view is read-only with its own message.
#[tokio::test]
async fn header_views_iterate_and_are_read_only_in_both_phases() {
    let upgrade = script(
        "hv_upgrade.lua",
        r#"
local function names(h)
  local keys = {}
  for k, v in pairs(h) do keys[#keys + 1] = k .. "=" .. v end
  table.sort(keys)
  return table.concat(keys, ";")
end
return function(req, ctx)
  ctx.upgrade_names = names(req.headers)
  ctx.upgrade_type = type(req.headers) .. " " .. #req.headers
  ctx.same_view = rawequal(req.headers, req.headers)
  ctx.number_key = tostring(req.headers[1])
end
"#,
    );
    let frames = script(
        "hv_frames.lua",
        r#"
return function(msg, ctx, conn)
  local h = ctx.request.headers
  local count = 0
  for k, v in pairs(h) do
    if k == "x-multi" then count = count + 1 end
  end
  local ok, err = pcall(function() h["x-new"] = "1" end)
  conn:reply({
    upgrade_names = ctx.upgrade_names, upgrade_type = ctx.upgrade_type,
    same_view = ctx.same_view, number_key = ctx.number_key,
    any_case = h["X-CUSTOM"], multi = h["x-multi"], multi_seen = count,
    write = tostring(ok) .. " " .. tostring(err),
  })
  return false
end
"#,
    );
    let seen = reply_after_upgrade(
        "/hv",
        "/hv",
        &[("x-custom", "c1"), ("x-multi", "one"), ("x-multi", "two")],
        &upgrade,
        &frames,
    )
    .await;
    let names = seen["upgrade_names"].as_str().unwrap();
    assert!(names.contains("x-custom=c1;"), "{seen}");
    assert!(names.contains("x-multi=one, two"), "{seen}");
    assert!(names.contains("sec-websocket-key="), "{seen}");
    assert_eq!(seen["upgrade_type"], "table 0", "{seen}");
    assert_eq!(seen["same_view"], true, "{seen}");
    assert_eq!(seen["number_key"], "nil", "{seen}");
    assert_eq!(seen["any_case"], "c1", "{seen}");
    assert_eq!(seen["multi"], "one, two", "{seen}");
    assert_eq!(seen["multi_seen"], 1, "{seen}");
    let write = seen["write"].as_str().unwrap();
    assert!(
        write.starts_with("false ") && write.contains("ctx is read-only"),
        "{seen}"
    );
}

/// One `req` serves every `on_upgrade` call of a worker, refilled for each (as `msg` is for
/// each message): a `req` kept past its call refuses to be used, with a message that says why.
#[tokio::test]
async fn a_req_kept_past_its_call_refuses_use() {
    let keep = script(
        "keep_req.lua",
        r#"
return function(req, ctx)
  ctx.req = req
  ctx.path = req.path
end
"#,
    );
    let show = script(
        "use_req.lua",
        r#"
return function(msg, ctx, conn)
  local ok, err = pcall(function() return ctx.req.path end)
  local mok, merr = pcall(function() return ctx.req:header_values("host") end)
  local hok, herr = pcall(function() return ctx.req.headers.host end)
  conn:reply({ kept_path = ctx.path, read = tostring(ok) .. " " .. tostring(err),
               method = tostring(mok) .. " " .. tostring(merr),
               headers = tostring(hok) .. " " .. tostring(herr) })
  return false
end
"#,
    );
    let seen = reply_after_upgrade("/kr", "/kr", &[], &keep, &show).await;
    assert_eq!(seen["kept_path"], "/kr", "{seen}");
    for (field, what) in [
        ("read", "req"),
        ("method", "req"),
        ("headers", "req.headers"),
    ] {
        let text = seen[field].as_str().unwrap();
        assert!(
            text.starts_with("false ")
                && text.contains(&format!("{what} is valid only during its on_upgrade call")),
            "{field}: {seen}"
        );
    }
}

/// `req.headers` kept in `ctx`, at any depth, keeps its headers in the frame phase; kept
/// anywhere else it refuses use once its call has ended, in the frame phase and in the next
/// connection's `on_upgrade` alike, rather than reading another request's headers.
#[tokio::test]
async fn req_headers_kept_in_ctx_survive_and_kept_elsewhere_refuse_use() {
    let up = echo().await;
    let keep = script(
        "keep_headers.lua",
        r#"
local stash
return function(req, ctx)
  if stash then
    local ok, err = pcall(function() return stash["x-custom"] end)
    ctx.previous = tostring(ok) .. " " .. tostring(err)
  end
  stash = req.headers
  ctx.h = req.headers
  ctx.nested = { deeper = { h = req.headers } }
  ctx.read_stash = function() return stash["x-custom"] end
  ctx.pairs_stash = function() for k in pairs(stash) do return k end end
end
"#,
    );
    let show = script(
        "show_headers.lua",
        r#"
return function(msg, ctx, conn)
  local rok, rerr = pcall(ctx.read_stash)
  local pok, perr = pcall(ctx.pairs_stash)
  local n = 0
  for _ in pairs(ctx.h) do n = n + 1 end
  local wok, werr = pcall(function() ctx.h["x-new"] = "1" end)
  conn:reply({
    previous = ctx.previous, direct = ctx.h["X-Custom"], nested = ctx.nested.deeper.h["x-custom"],
    same = rawequal(ctx.h, ctx.nested.deeper.h), count = n, write = tostring(wok) .. " " .. tostring(werr),
    read = tostring(rok) .. " " .. tostring(rerr), pairs = tostring(pok) .. " " .. tostring(perr),
  })
  return false
end
"#,
    );
    let gw = gateway_with_server(
        "workers = 1",
        &route(
            "/kh",
            up.addr,
            "",
            &[("on_upgrade", &keep), ("on_client_frame", &show)],
        ),
    )
    .await;
    let mut replies = Vec::new();
    for value in ["first", "second"] {
        let (mut ws, _) = connect_with(gw.local_addr(), "/kh", &[("x-custom", value)])
            .await
            .expect("upgrade succeeds");
        ws.send(Message::text("show")).await.unwrap();
        let reply = next_message(&mut ws).await.unwrap().unwrap();
        replies.push(serde_json::from_str::<serde_json::Value>(reply.to_text().unwrap()).unwrap());
    }
    let stale = "req.headers is valid only during its on_upgrade call";
    for (seen, value) in replies.iter().zip(["first", "second"]) {
        assert_eq!(seen["direct"], value, "{seen}");
        assert_eq!(seen["nested"], value, "{seen}");
        assert_eq!(seen["same"], true, "{seen}");
        assert!(seen["count"].as_u64().unwrap() >= 5, "{seen}");
        let write = seen["write"].as_str().unwrap();
        assert!(
            write.starts_with("false ") && write.contains("req is read-only"),
            "{seen}"
        );
        for field in ["read", "pairs"] {
            let text = seen[field].as_str().unwrap();
            assert!(
                text.starts_with("false ") && text.contains(stale),
                "{field}: {seen}"
            );
        }
    }
    assert!(replies[0]["previous"].is_null(), "{}", replies[0]);
    let previous = replies[1]["previous"].as_str().unwrap();
    assert!(
        previous.starts_with("false ") && previous.contains(stale),
        "{previous}"
    );
}
