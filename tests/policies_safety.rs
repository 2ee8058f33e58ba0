//! Lua policies, safety: the sandbox, isolation between scripts, the CPU and memory limits of a
//! policy call, `on_policy_error`, and errors that point at the policy's own line.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Sends `text` and returns the reply.
async fn ask(ws: &mut Client, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    next_text(ws).await
}

/// Sends `text` on an echo route and asserts that it comes back.
async fn round_trip(ws: &mut Client, text: &str) {
    assert_eq!(ask(ws, text).await, text, "echo of {text:?}");
}

/// Expects close 1011 "policy error" within 2 seconds of `since`.
async fn expect_policy_error(ws: &mut Client, since: Instant, what: &str) {
    let frame = expect_close(ws).await;
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1011, "policy error"),
        "{what}"
    );
    assert!(
        since.elapsed() < Duration::from_secs(2),
        "{what}: stopped only after {:?}",
        since.elapsed()
    );
}

#[tokio::test]
async fn the_sandbox_hides_what_could_escape_it() {
    let up = echo().await;
    let probe = script(
        "probe.lua",
        r#"
local checks = {
  io = function() return io end,
  ["os.execute"] = function() return os.execute end,
  ["os.exit"] = function() return os.exit end,
  ["os.remove"] = function() return os.remove end,
  ["os.rename"] = function() return os.rename end,
  ["os.getenv"] = function() return os.getenv end,
  ["os.tmpname"] = function() return os.tmpname end,
  loadfile = function() return loadfile end,
  dofile = function() return dofile end,
  require = function() return require end,
  package = function() return package end,
  debug = function() return debug end,
  ["string.dump"] = function() return string.dump end,
  load = function() return load end,
  rawset = function() return rawset end,
  collectgarbage = function() return collectgarbage end,
  ["_G.io"] = function() return _G.io end,
  ["_G.load"] = function() return _G.load end,
}
return function(msg, ctx, conn)
  local present = {}
  for name, get in pairs(checks) do
    if get() ~= nil then present[#present + 1] = name end
  end
  table.sort(present)
  conn:reply("present:" .. table.concat(present, ","))
  conn:reply(table.concat({
    math.type(os.time()), type(os.clock()), os.date("!%Y-%m-%d", 0),
    tostring(os.difftime(10, 4)), type(string.format), type(pcall),
  }, " "))
  return false
end
"#,
    );
    let gw = gateway(&route("/p", up.addr, "", &[("on_client_frame", &probe)])).await;
    let mut ws = connect(gw.local_addr(), "/p").await;
    assert_eq!(
        ask(&mut ws, "probe").await,
        "present:",
        "nothing forbidden is reachable"
    );
    assert_eq!(
        next_text(&mut ws).await,
        "integer number 1970-01-01 6.0 function function",
        "os.time, os.clock, os.date work"
    );
}

#[tokio::test]
async fn string_dump_is_not_reachable_through_string_methods_either() {
    let up = echo().await;
    let probe = script(
        "dump.lua",
        r#"
return function(msg, ctx, conn)
  conn:reply("method:" .. tostring(("").dump ~= nil) .. " metatable:" .. tostring(getmetatable("")))
  return false
end
"#,
    );
    let gw = gateway(&route("/p", up.addr, "", &[("on_client_frame", &probe)])).await;
    let mut ws = connect(gw.local_addr(), "/p").await;
    assert_eq!(ask(&mut ws, "probe").await, "method:false metatable:false");
}

#[tokio::test]
async fn one_script_cannot_change_another_scripts_globals_or_libraries() {
    let up = echo().await;
    let vandal = script(
        "vandal.lua",
        r#"
string.upper = nil
return function(msg, ctx, conn)
  string.upper = nil
  string.lower = function() return "hacked" end
  table.insert = nil
  math.floor = nil
  leaked_global = "from the vandal"
  local gw_ok = pcall(function() gw.now = function() return 0 end end)
  local json_ok = pcall(function() gw.json.encode = nil end)
  local meta_ok = pcall(function() getmetatable("").__index.upper = nil end)
  conn:reply(table.concat({
    tostring(string.upper), tostring(gw_ok), tostring(json_ok), tostring(meta_ok), ("x"):upper(),
  }, " "))
  return false
end
"#,
    );
    let victim = script(
        "victim.lua",
        r#"
return function(msg, ctx, conn)
  conn:reply(table.concat({
    ("x"):upper(), string.upper("y"), string.lower("Z"), ("W"):lower(), tostring(leaked_global),
    tostring(math.floor(2.5)), type(table.insert), tostring(gw.now() > 0), gw.json.encode({ 1 }),
  }, " "))
  return false
end
"#,
    );
    // One worker: both scripts live in the same Lua VM.
    let gw = gateway_with_server(
        "workers = 1\n",
        &format!(
            "{}{}",
            route("/vandal", up.addr, "", &[("on_client_frame", &vandal)]),
            route("/victim", up.addr, "", &[("on_client_frame", &victim)]),
        ),
    )
    .await;
    let mut v = connect(gw.local_addr(), "/vandal").await;
    assert_eq!(
        ask(&mut v, "go").await,
        "nil false false false X",
        "the vandal changed only its own copy; gw and the string metatable are protected"
    );
    let mut w = connect(gw.local_addr(), "/victim").await;
    assert_eq!(
        ask(&mut w, "check").await,
        "X Y z w nil 2 function true [1]"
    );
}

#[tokio::test]
async fn an_endless_frame_policy_is_stopped_and_others_keep_flowing() {
    let up = echo().await;
    let spin = script(
        "spin.lua",
        r#"
return function(msg, ctx, conn)
  if msg.data == "spin" then
    while true do end
  end
end
"#,
    );
    let fine = script("fine.lua", "return function(msg) return nil end\n");
    let gw = gateway_with_server(
        "workers = 1\n",
        &format!(
            "{}{}",
            route(
                "/spin",
                up.addr,
                "policy_cpu_limit = \"20ms\"",
                &[("on_client_frame", &spin)]
            ),
            route("/ok", up.addr, "", &[("on_client_frame", &fine)]),
        ),
    )
    .await;
    let mut ok = connect(gw.local_addr(), "/ok").await;
    round_trip(&mut ok, "before").await;
    let mut spinning = connect(gw.local_addr(), "/spin").await;
    round_trip(&mut spinning, "not yet").await;

    let started = Instant::now();
    spinning.send(Message::text("spin")).await.unwrap();
    ok.send(Message::text("meanwhile")).await.unwrap();
    assert_eq!(next_text(&mut ok).await, "meanwhile");
    expect_policy_error(&mut spinning, started, "endless loop").await;
    round_trip(&mut ok, "after").await;

    // The VM is fine for the next connection on the same route.
    let mut again = connect(gw.local_addr(), "/spin").await;
    round_trip(&mut again, "works again").await;
}

#[tokio::test]
async fn pcall_cannot_swallow_the_cpu_limit() {
    let (gw, ok) = spin_gateway(
        r#"
return function(msg, ctx, conn)
  if msg.data == "spin" then
    while true do
      pcall(function() while true do end end)
    end
  end
end
"#,
    )
    .await;
    assert_spin_is_stopped(
        &gw,
        ok,
        "a policy that catches the CPU-limit error with pcall",
    )
    .await;
}

/// A gateway (one worker) with `/spin` running `lua` as on_client_frame with a 20ms CPU limit,
/// and `/ok`, a plain echo route with a policy; returns it with an open `/ok` client.
async fn spin_gateway(lua: &str) -> (framegate::Running, Client) {
    let up = echo().await;
    let spin = script("spin.lua", lua);
    let fine = script("fine.lua", "return function(msg) return nil end\n");
    let gw = gateway_with_server(
        "workers = 1\n",
        &format!(
            "{}{}",
            route(
                "/spin",
                up.addr,
                "policy_cpu_limit = \"20ms\"",
                &[("on_client_frame", &spin)]
            ),
            route("/ok", up.addr, "", &[("on_client_frame", &fine)]),
        ),
    )
    .await;
    let ok = connect(gw.local_addr(), "/ok").await;
    (gw, ok)
}

/// Sends "spin" on `/spin` and expects 1011 within 3 seconds; then `ok` must still flow.
async fn assert_spin_is_stopped(gw: &framegate::Running, mut ok: Client, what: &str) {
    let mut spinning = connect(gw.local_addr(), "/spin").await;
    let started = Instant::now();
    spinning.send(Message::text("spin")).await.unwrap();
    // Bounded well below the harness timeout: a policy that is never stopped holds the worker.
    let frame = tokio::time::timeout(Duration::from_secs(3), expect_close(&mut spinning))
        .await
        .unwrap_or_else(|_| panic!("{what}: still running after {:?}", started.elapsed()));
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1011, "policy error"),
        "{what}"
    );
    round_trip(&mut ok, "still flowing").await;
}

#[tokio::test]
async fn an_endless_loop_in_a_coroutine_is_stopped() {
    let (gw, ok) = spin_gateway(
        r#"
return function(msg, ctx, conn)
  if msg.data == "spin" then
    coroutine.wrap(function() while true do end end)()
  end
end
"#,
    )
    .await;
    assert_spin_is_stopped(&gw, ok, "an endless loop inside a coroutine").await;
}

#[tokio::test]
async fn a_catastrophic_string_pattern_is_stopped_by_the_cpu_limit() {
    // Backtracking over 25 `a*` items: far longer than any CPU limit, all inside string.find.
    let (gw, ok) = spin_gateway(
        r#"
return function(msg, ctx, conn)
  if msg.data == "spin" then
    return tostring(string.find(string.rep("a", 25), string.rep("a*", 25) .. "b"))
  end
end
"#,
    )
    .await;
    assert_spin_is_stopped(&gw, ok, "a backtracking string pattern").await;
}

#[tokio::test]
async fn an_endless_upgrade_policy_gives_500_and_others_keep_flowing() {
    let up = echo().await;
    let spin = script(
        "spin.lua",
        "return function(req, ctx)\n  while true do end\nend\n",
    );
    let fine = script("fine.lua", "return function(msg) return nil end\n");
    let gw = gateway_with_server(
        "workers = 1\n",
        &format!(
            "{}{}",
            route(
                "/spin",
                up.addr,
                "policy_cpu_limit = \"20ms\"",
                &[("on_upgrade", &spin)]
            ),
            route("/ok", up.addr, "", &[("on_client_frame", &fine)]),
        ),
    )
    .await;
    let mut ok = connect(gw.local_addr(), "/ok").await;
    let started = Instant::now();
    let (status, _, body) = raw_http(gw.local_addr(), &upgrade_request("/spin", "")).await;
    assert_eq!(status, 500);
    assert_eq!(body.trim(), "internal error in the upgrade policy");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    round_trip(&mut ok, "unaffected").await;
}

#[tokio::test]
async fn a_policy_allocating_without_bound_is_stopped_and_others_keep_flowing() {
    let up = echo().await;
    let hog = script(
        "hog.lua",
        r#"
return function(msg, ctx, conn)
  if msg.data == "hog" then
    local t = {}
    while true do t[#t + 1] = string.rep("x", 1000) end
  end
end
"#,
    );
    let fine = script("fine.lua", "return function(msg) return nil end\n");
    // A generous CPU limit, so that only the memory limit can stop the hog in time.
    let gw = gateway_with_server(
        "workers = 1\n",
        &format!(
            "{}{}",
            route(
                "/hog",
                up.addr,
                "policy_memory_limit = \"1MiB\"\npolicy_cpu_limit = \"30s\"",
                &[("on_client_frame", &hog)]
            ),
            route("/ok", up.addr, "", &[("on_client_frame", &fine)]),
        ),
    )
    .await;
    let mut ok = connect(gw.local_addr(), "/ok").await;
    let mut hog_ws = connect(gw.local_addr(), "/hog").await;
    round_trip(&mut hog_ws, "small").await;
    let started = Instant::now();
    hog_ws.send(Message::text("hog")).await.unwrap();
    ok.send(Message::text("meanwhile")).await.unwrap();
    assert_eq!(next_text(&mut ok).await, "meanwhile");
    expect_policy_error(&mut hog_ws, started, "unbounded allocation").await;
    round_trip(&mut ok, "after").await;
    let mut again = connect(gw.local_addr(), "/hog").await;
    round_trip(&mut again, "works again").await;
}

#[tokio::test]
async fn on_policy_error_pass_forwards_and_drop_drops() {
    let (up, mut conns) = captured().await;
    let flaky = script(
        "flaky.lua",
        r#"
return function(msg, ctx, conn)
  if msg.data == "fail" then error("this message breaks the policy") end
  if msg.data == "bad return" then return 42 end
  return msg.data .. " (checked)"
end
"#,
    );
    let gw = gateway(&format!(
        "{}{}",
        route(
            "/pass",
            up.addr,
            "on_policy_error = \"pass\"",
            &[("on_client_frame", &flaky)]
        ),
        route(
            "/drop",
            up.addr,
            "on_policy_error = \"drop\"",
            &[("on_client_frame", &flaky)]
        ),
    ))
    .await;

    let mut pass = connect(gw.local_addr(), "/pass").await;
    let mut pass_up = within("upstream", conns.recv()).await.unwrap();
    for text in ["fail", "bad return"] {
        pass.send(Message::text(text)).await.unwrap();
        assert_eq!(
            next_message(&mut pass_up).await.unwrap().unwrap(),
            Message::text(text),
            "pass forwards the message unchanged"
        );
    }
    pass.send(Message::text("ok")).await.unwrap();
    assert_eq!(
        next_message(&mut pass_up).await.unwrap().unwrap(),
        Message::text("ok (checked)")
    );

    let mut drop_ws = connect(gw.local_addr(), "/drop").await;
    let mut drop_up = within("upstream", conns.recv()).await.unwrap();
    drop_ws.send(Message::text("fail")).await.unwrap();
    drop_ws.send(Message::text("bad return")).await.unwrap();
    drop_ws.send(Message::text("next")).await.unwrap();
    assert_eq!(
        next_message(&mut drop_up).await.unwrap().unwrap(),
        Message::text("next (checked)"),
        "the failing messages were dropped and the connection stays open"
    );
}

#[test]
fn on_policy_error_must_be_close_pass_or_drop() {
    let toml = "[[route]]\npath = \"/a\"\nupstream = \"ws://127.0.0.1:9/\"\non_policy_error = \"explode\"\n";
    let error = framegate::Config::from_toml(toml, std::path::Path::new("test.toml"))
        .expect_err("explode is refused")
        .to_string();
    for word in ["explode", "close", "pass", "drop"] {
        assert!(error.contains(word), "{error:?} lacks {word}");
    }
    assert!(error.starts_with("test.toml:4:"), "{error}");
}

#[tokio::test]
async fn misuse_errors_point_at_the_policys_own_line() {
    let up = echo().await;
    let path = script_path(
        "misuse.lua",
        r#"return function(msg, ctx, conn)
  local ok, err = pcall(function()
    conn:reply(true)
  end)
  local ok2, err2 = pcall(function()
    return ctx.request.path:nonexistent()
  end)
  conn:reply(tostring(ok) .. " " .. tostring(err))
  conn:reply(tostring(ok2) .. " " .. tostring(err2))
  return false
end
"#,
    );
    let shown = path.display().to_string();
    let gw = gateway(&route(
        "/p",
        up.addr,
        "on_policy_error = \"pass\"",
        &[("on_client_frame", &format!("{shown:?}"))],
    ))
    .await;
    let mut ws = connect(gw.local_addr(), "/p").await;
    let reply = ask(&mut ws, "go").await;
    assert!(reply.starts_with("false "), "{reply}");
    assert!(
        reply.contains(&format!(
            "{shown}:3: conn:reply expects a string or a table"
        )),
        "the error should name the policy's line 3: {reply}"
    );

    let plain = next_text(&mut ws).await;
    assert!(plain.starts_with("false "), "{plain}");
    assert!(
        plain.contains(&format!("{shown}:6: ")),
        "a plain Lua error names the line too: {plain}"
    );
}

#[tokio::test]
async fn gw_shared_works_called_with_a_dot_or_a_colon() {
    let up = echo().await;
    let path = script_path(
        "dot.lua",
        r#"return function(msg, ctx, conn)
  gw.shared.set("dot", "d")
  gw.shared:set("colon", "c")
  gw.shared.incr("n", 2)
  gw.shared:incr("n", 3)
  local ok, err = pcall(function() return gw.shared:get(42) end)
  conn:reply(gw.shared:get("dot") .. gw.shared.get("colon") .. gw.shared.get("n") .. " " .. tostring(ok) .. " " .. tostring(err))
  return false
end
"#,
    );
    let shown = path.display().to_string();
    let gw = gateway(&route(
        "/p",
        up.addr,
        "",
        &[("on_client_frame", &format!("{shown:?}"))],
    ))
    .await;
    let mut ws = connect(gw.local_addr(), "/p").await;
    let reply = ask(&mut ws, "go").await;
    assert!(reply.starts_with("dc5 false "), "{reply}");
    // Misuse still names the policy's line.
    assert!(
        reply.contains(&format!(
            "{shown}:6: gw.shared:get expects a string key, got integer"
        )),
        "{reply}"
    );
}

#[tokio::test]
async fn an_absurd_ttl_disturbs_neither_the_worker_nor_other_connections() {
    let up = echo().await;
    let huge = script(
        "huge.lua",
        r#"
return function(msg, ctx, conn)
  if msg.data == "huge ttl" then gw.shared:set("k", 1, 1e300) end
  if msg.data == "huge incr ttl" then gw.shared:incr("k2", 1, math.maxinteger) end
  if msg.data == "read" then
    gw.shared:incr("k3")
    return tostring(gw.shared:get("k3"))
  end
end
"#,
    );
    let gw = gateway_with_server(
        "workers = 1\n",
        &route("/h", up.addr, "", &[("on_client_frame", &huge)]),
    )
    .await;
    let mut other = connect(gw.local_addr(), "/h").await;
    round_trip(&mut other, "before").await;
    for text in ["huge ttl", "huge incr ttl"] {
        let mut ws = connect(gw.local_addr(), "/h").await;
        ws.send(Message::text(text)).await.unwrap();
        // Whatever happens to this connection (docs/policies.md, Known limits: it may be
        // aborted), it must not take the worker, the VM or gw.shared down.
        let _ = within("the absurd call to finish", ws.next()).await;
        round_trip(&mut other, "after").await;
        let mut fresh = connect(gw.local_addr(), "/h").await;
        round_trip(&mut fresh, "fresh").await;
    }
    let mut reader = connect(gw.local_addr(), "/h").await;
    assert_eq!(ask(&mut reader, "read").await, "1", "gw.shared still works");
}
