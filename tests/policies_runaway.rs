//! Runaway policies: no policy, by any means, holds its worker much longer than its CPU limit.
//! Each test runs a policy that would hang its worker for good if the CPU limit did not reach
//! it (a loop where Lua turns its hooks off, or inside one long C call), on a gateway with one
//! worker, and checks that the policy call fails and that another connection on the same
//! worker keeps flowing within a bound.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// The CPU limit of the runaway routes.
const LIMIT: &str = "10ms";

/// How long another connection's echo may take while a runaway call is being stopped:
/// 2 x the limit plus the bound for a single C call, with a generous margin for a debug build
/// on a busy machine, yet far below "for good".
const STALL: Duration = Duration::from_secs(1);

/// A gateway with one worker, `/spin` running `lua` as on_client_frame under a 10 ms CPU limit
/// (with `extra` route keys), and `/ok`, an echo route with a policy on the same worker.
async fn runaway_gateway(lua: &str, extra: &str) -> (framegate::Running, Client) {
    let up = echo().await;
    let spin = script("runaway.lua", lua);
    let fine = script("fine.lua", "return function(msg) return nil end\n");
    let gw = gateway_with_server(
        "workers = 1\n",
        &format!(
            "{}{}",
            route(
                "/spin",
                up.addr,
                &format!("policy_cpu_limit = \"{LIMIT}\"\n{extra}"),
                &[("on_client_frame", &spin)]
            ),
            route("/ok", up.addr, "", &[("on_client_frame", &fine)]),
        ),
    )
    .await;
    let mut ok = connect(gw.local_addr(), "/ok").await;
    ok.send(Message::text("warm")).await.unwrap();
    assert_eq!(next_text(&mut ok).await, "warm");
    (gw, ok)
}

/// Sends `text` on `ws`, then a message on `ok`, and asserts that `ok`'s echo comes back
/// within [`STALL`]: the worker was held no longer than that.
async fn assert_worker_free(ws: &mut Client, text: &str, ok: &mut Client, what: &str) {
    let started = Instant::now();
    ws.send(Message::text(text)).await.unwrap();
    ok.send(Message::text("meanwhile")).await.unwrap();
    let echo = tokio::time::timeout(STALL, next_text(ok))
        .await
        .unwrap_or_else(|_| panic!("{what}: the worker was held more than {STALL:?}"));
    assert_eq!(echo, "meanwhile");
    assert!(started.elapsed() < STALL, "{what}: {:?}", started.elapsed());
}

/// Sends "spin" on a new `/spin` connection: the call must fail with 1011 and `ok` must echo
/// within [`STALL`].
async fn assert_stopped(gw: &framegate::Running, ok: &mut Client, what: &str) {
    let mut spinning = connect(gw.local_addr(), "/spin").await;
    assert_worker_free(&mut spinning, "spin", ok, what).await;
    let frame = tokio::time::timeout(STALL, expect_close(&mut spinning))
        .await
        .unwrap_or_else(|_| panic!("{what}: no close within {STALL:?}"));
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1011, "policy error"),
        "{what}"
    );
    ok.send(Message::text("after")).await.unwrap();
    assert_eq!(next_text(ok).await, "after", "{what}");
}

/// A loop in `body` (Lua statements run on "spin") must be stopped.
async fn spin_is_stopped(body: &str, what: &str) {
    let lua = format!(
        "return function(msg, ctx, conn)\n  if msg.data == \"spin\" then\n{body}\n  end\nend\n"
    );
    let (gw, mut ok) = runaway_gateway(&lua, "").await;
    assert_stopped(&gw, &mut ok, what).await;
}

#[tokio::test]
async fn a_loop_in_an_xpcall_message_handler_is_stopped() {
    spin_is_stopped(
        "xpcall(function() while true do end end, function() while true do end end)",
        "a loop in xpcall's handler after a CPU-limit error",
    )
    .await;
}

#[tokio::test]
async fn a_loop_in_an_xpcall_handler_for_an_ordinary_error_is_stopped() {
    spin_is_stopped(
        "xpcall(function() error(\"boom\") end, function() while true do end end)",
        "a loop in xpcall's handler after an ordinary error",
    )
    .await;
}

#[tokio::test]
async fn a_looping_gc_finalizer_is_refused() {
    // Plenty of garbage with finalizers: on a VM that accepted __gc, the collector runs one
    // during this call or a later one, with hooks off.
    spin_is_stopped(
        "for i = 1, 100000 do setmetatable({}, { __gc = function() while true do end end }) end",
        "a looping __gc finalizer",
    )
    .await;
}

#[tokio::test]
async fn gc_metamethods_are_refused_with_the_policys_line() {
    let up = echo().await;
    let path = script_path(
        "gc.lua",
        r#"return function(msg, ctx, conn)
  local ok, err = pcall(function()
    local t = setmetatable({}, { __gc = function() end })
  end)
  local mt = {}
  local t = setmetatable({}, mt)
  local ok2, err2 = pcall(function()
    mt.__gc = function() end
  end)
  return tostring(ok) .. " " .. tostring(err) .. "|" .. tostring(ok2) .. " " .. tostring(err2)
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
    ws.send(Message::text("go")).await.unwrap();
    let reply = next_text(&mut ws).await;
    assert_eq!(
        reply,
        format!(
            "false {shown}:3: setmetatable: __gc metamethods are not allowed in policies (they would run outside the CPU limit)\
             |false {shown}:8: a metatable: __gc metamethods are not allowed in policies (they would run outside the CPU limit)"
        )
    );
}

#[tokio::test]
async fn an_error_value_with_a_looping_tostring_is_stopped() {
    spin_is_stopped(
        "error(setmetatable({}, { __tostring = function() while true do end end }))",
        "an uncaught error value whose __tostring loops",
    )
    .await;
}

#[tokio::test]
async fn an_error_value_with_a_looping_tostring_inside_pcall_is_stopped() {
    spin_is_stopped(
        "local ok, e = pcall(error, setmetatable({}, { __tostring = function() while true do end end }))\n\
         return tostring(e)",
        "a caught error value whose __tostring loops",
    )
    .await;
}

#[tokio::test]
async fn close_handlers_that_keep_declaring_more_are_stopped() {
    let lua = r#"
local mt = {}
mt.__close = function()
  local again <close> = setmetatable({}, mt)
  while true do end
end
return function(msg, ctx, conn)
  if msg.data == "spin" then
    local first <close> = setmetatable({}, mt)
    while true do end
  end
end
"#;
    let (gw, mut ok) = runaway_gateway(lua, "").await;
    assert_stopped(&gw, &mut ok, "__close handlers that chain").await;
}

#[tokio::test]
async fn a_looping_close_handler_of_a_wrapped_coroutine_is_stopped() {
    spin_is_stopped(
        "coroutine.wrap(function()\n\
           local x <close> = setmetatable({}, { __close = function() while true do end end })\n\
           while true do end\n\
         end)()",
        "a looping __close in a coroutine.wrap that the limit stopped",
    )
    .await;
}

#[tokio::test]
async fn a_close_metamethod_added_to_a_metatable_later_is_refused() {
    // A generic for's fourth value is a to-be-closed variable: on a VM that let a metatable
    // get __close after setmetatable, the loop's CPU-limit error would run it with hooks off.
    let lua = r#"
local mt = {}
local obj = setmetatable({}, mt)
return function(msg, ctx, conn)
  if msg.data == "spin" then
    mt.__close = function() while true do end end
    for _ in function() return true end, nil, nil, obj do
      local n = 0
      for i = 1, 1000 do n = n + i end
    end
  end
end
"#;
    let (gw, mut ok) = runaway_gateway(lua, "").await;
    assert_stopped(&gw, &mut ok, "a __close added to a metatable in use").await;
}

#[tokio::test]
async fn metatables_stay_usable_for_ordinary_objects() {
    let up = echo().await;
    let objects = script(
        "objects.lua",
        r#"
local Point = {}
Point.__index = Point
Point.__tostring = function(p) return "(" .. p.x .. "," .. p.y .. ")" end
function Point.new(x, y) return setmetatable({ x = x, y = y }, Point) end
function Point:sum() return self.x + self.y end
return function(msg, ctx, conn)
  local p = Point.new(1, 2)
  local again = setmetatable({}, Point) -- a sealed metatable is reused as it is
  local ok, err = pcall(function() setmetatable(Point, {}) end)
  local ok2, err2 = pcall(function() local m = setmetatable({}, { __index = Point }); setmetatable({}, m) end)
  local hidden = getmetatable(gw.json.decode("[1]"))
  return table.concat({ tostring(p), p:sum(), tostring(getmetatable(p) == Point), tostring(again.sum ~= nil),
    tostring(ok), err:match("metatable cannot have a metatable of its own") or err, tostring(ok2), tostring(hidden) }, " ")
end
"#,
    );
    let gw = gateway(&route("/p", up.addr, "", &[("on_client_frame", &objects)])).await;
    let mut ws = connect(gw.local_addr(), "/p").await;
    ws.send(Message::text("go")).await.unwrap();
    assert_eq!(
        next_text(&mut ws).await,
        "(1,2) 3 true true false metatable cannot have a metatable of its own false false"
    );
}

#[tokio::test]
async fn an_error_swallowed_by_a_gateway_function_does_not_extend_the_call() {
    // gw.log turns an argument into text with its __tostring; a loop there must not make the
    // policy outlive its limit, call after call.
    spin_is_stopped(
        "local bad = setmetatable({}, { __tostring = function() while true do end end })\n\
         while true do gw.log.debug(bad) end",
        "a loop whose every round swallows the CPU-limit error",
    )
    .await;
}

/// A route whose policy runs the Lua expression named by each message (see `C_CALLS`) and
/// replies with what it returned.
const C_CALLS: &str = r#"
local lying = function() return setmetatable({}, { __len = function() return 1e15 end }) end
local calls = {
  ["rep empty"] = function() return #string.rep("", 1e12) end,
  ["rep empty sep"] = function() return #("").rep("", 1e12, "") end,
  ["rep"] = function() return #string.rep("ab", 100000, ",") end,
  ["move nils"] = function() return table.move({}, 1, 1e12, 2) end,
  ["insert lying"] = function() return table.insert(lying(), 1, "x") end,
  ["remove lying"] = function() return table.remove(lying(), 1) end,
  ["unpack"] = function() return select('#', table.unpack({}, 1, 20000)) end,
  ["json dag"] = function()
    local t = {}
    for i = 1, 40 do t = { t, t } end
    local text, err = gw.json.encode(t)
    return tostring(text) .. " " .. tostring(err)
  end,
}
return function(msg, ctx, conn)
  local call = calls[msg.data]
  if call then return tostring(call()) end
end
"#;

/// Sends `name` to the C-call route and returns its reply, or `None` if the call failed
/// (close 1011); either way, the worker must have been free for `ok` within [`STALL`].
async fn c_call(gw: &framegate::Running, ok: &mut Client, name: &str) -> Option<String> {
    let mut ws = connect(gw.local_addr(), "/spin").await;
    assert_worker_free(&mut ws, name, ok, name).await;
    match next_message(&mut ws).await {
        Some(Ok(Message::Text(t))) => Some(t.to_string()),
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1011, "{name}");
            None
        }
        other => panic!("{name}: {other:?}"),
    }
}

#[tokio::test]
async fn long_c_calls_end_within_the_limit() {
    // 1 MiB of memory per call: the C calls bounded by memory are bounded by this too.
    let (gw, mut ok) = runaway_gateway(C_CALLS, "policy_memory_limit = \"1MiB\"").await;
    assert_eq!(
        c_call(&gw, &mut ok, "rep empty").await.as_deref(),
        Some("0")
    );
    assert_eq!(
        c_call(&gw, &mut ok, "rep empty sep").await.as_deref(),
        Some("0")
    );
    assert_eq!(
        c_call(&gw, &mut ok, "rep").await.as_deref(),
        Some("299999"),
        "a long string.rep still gives the same string"
    );
    for stopped in ["move nils", "insert lying", "remove lying"] {
        assert_eq!(c_call(&gw, &mut ok, stopped).await, None, "{stopped}");
    }
    assert_eq!(
        c_call(&gw, &mut ok, "unpack").await.as_deref(),
        Some("20000")
    );
    // Stopped by the memory limit's room or by the CPU limit, whichever comes first.
    if let Some(dag) = c_call(&gw, &mut ok, "json dag").await {
        assert!(
            dag.starts_with("nil cannot encode as JSON: the text would exceed"),
            "{dag}"
        );
    }
}

/// Prints how long the longest single C calls that the sandbox leaves in C take (each at its
/// bound: 4096 elements, 4 KiB of encoding, 16 KiB of decoding). By hand, for docs/policies.md:
/// `cargo test --test policies_runaway measure_c_call_bounds -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn measure_c_call_bounds() {
    let up = echo().await;
    let bench = script(
        "bench.lua",
        r#"
local N = 4096
local function time(f)
  local best = math.huge
  for _ = 1, 3 do
    local c = os.clock()
    f()
    best = math.min(best, os.clock() - c)
  end
  return string.format("%.3f ms", best * 1000)
end
return function(msg, ctx, conn)
  local nums, strs = {}, {}
  for i = 1, N do nums[i] = (i * 7919) % N; strs[i] = string.format("%032d", (i * 7919) % N) end
  local out = {}
  local function add(name, f) conn:reply(name .. ": " .. time(f)) end
  add("table.sort 4096 numbers", function() local t = table.move(nums, 1, N, 1, {}); table.sort(t) end)
  add("table.sort 4096 strings", function() local t = table.move(strs, 1, N, 1, {}); table.sort(t) end)
  add("table.insert front of 4096", function() local t = table.move(nums, 1, N - 1, 1, {}); table.insert(t, 1, 0) end)
  add("table.move 4096 through a header view", function() table.move(ctx.request.headers, 1, N, 1, {}) end)
  add("table.unpack 4096 through a header view", function() table.unpack(ctx.request.headers, 1, N) end)
  add("table.concat 4096 strings", function() table.concat(strs, ",") end)
  add("string.rep 4096 x 1 byte", function() string.rep("x", N) end)
  add("gw.json.encode 4 KiB of nested arrays", function()
    local t = {} for i = 1, 10 do t = { t, t } end gw.json.encode(t) end)
  add("gw.json.decode 16 KiB", function() gw.json.decode("[" .. string.rep("1,", 8000) .. "1]") end)
  return false
end
"#,
    );
    let gw = gateway(&route(
        "/b",
        up.addr,
        "policy_cpu_limit = \"10s\"\npolicy_memory_limit = \"256MiB\"",
        &[("on_client_frame", &bench)],
    ))
    .await;
    let mut ws = connect(gw.local_addr(), "/b").await;
    ws.send(Message::text("go")).await.unwrap();
    for _ in 0..9 {
        println!("{}", next_text(&mut ws).await);
    }
}
