//! Lua policies, string patterns: a backtracking `string.find`/`gsub` stops at the route's
//! `policy_cpu_limit` like any Lua loop, and the worker's other connections keep flowing; the
//! pattern functions still work as Lua's, through `string.*` and string methods alike.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Runs the pathological pattern named by the message; echoes anything else.
const PATHOLOGICAL: &str = r#"
return function(msg, ctx, conn)
  if msg.data == "find" then
    -- About 2.5 s inside Lua's C string.find (debug build).
    string.find(string.rep("a", 100), ".-.-.-.-b")
  elseif msg.data == "gsub" then
    -- About 2 s inside Lua's C string.gsub (debug build).
    local s = string.rep("a", 200)
    s:gsub(".-.-.-b", "x")
  elseif msg.data == "match" then
    -- Far longer than any test: 30000 starting points, each backtracking four times.
    string.rep("a", 30000):match(".-.-.-.-b")
  end
end
"#;

/// A gateway with one worker: `/spin` runs [`PATHOLOGICAL`] under a 10 ms CPU limit, `/ok`
/// is a plain echo route with a policy, on the same worker.
async fn pattern_gateway() -> (framegate::Running, Upstream) {
    let up = echo().await;
    let spin = script("patterns.lua", PATHOLOGICAL);
    let fine = script("fine.lua", "return function(msg) return nil end\n");
    let gw = gateway_with_server(
        "workers = 1\n",
        &format!(
            "{}{}",
            route(
                "/spin",
                up.addr,
                "policy_cpu_limit = \"10ms\"",
                &[("on_client_frame", &spin)]
            ),
            route("/ok", up.addr, "", &[("on_client_frame", &fine)]),
        ),
    )
    .await;
    (gw, up)
}

/// Sends `what` on a `/spin` connection and, at once, a message on `ok`: the echo must come
/// back within `bound` (the worker was not held), and `/spin` must close with 1011.
async fn assert_stall_is_bounded(gw: &framegate::Running, ok: &mut Client, what: &str) {
    let bound = Duration::from_millis(200);
    let mut spinning = connect(gw.local_addr(), "/spin").await;
    let started = Instant::now();
    spinning.send(Message::text(what)).await.unwrap();
    ok.send(Message::text("meanwhile")).await.unwrap();
    // Bounded well below the C functions' seconds, so that a stalled worker fails the test
    // instead of only slowing it down.
    let echo = tokio::time::timeout(Duration::from_secs(3), next_text(ok))
        .await
        .unwrap_or_else(|_| panic!("{what}: the worker was held for over 3 s"));
    let stalled = started.elapsed();
    assert_eq!(echo, "meanwhile");
    assert!(
        stalled < bound,
        "{what}: the other connection waited {stalled:?}"
    );
    let frame = tokio::time::timeout(Duration::from_secs(3), expect_close(&mut spinning))
        .await
        .unwrap_or_else(|_| panic!("{what}: no close after {:?}", started.elapsed()));
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1011, "policy error"),
        "{what}"
    );
    assert!(
        started.elapsed() < bound,
        "{what}: closed only after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_backtracking_find_stops_at_the_cpu_limit_and_the_worker_keeps_serving() {
    let (gw, _up) = pattern_gateway().await;
    let mut ok = connect(gw.local_addr(), "/ok").await;
    assert_eq!(ask(&mut ok, "before").await, "before");
    assert_stall_is_bounded(&gw, &mut ok, "find").await;
    assert_stall_is_bounded(&gw, &mut ok, "match").await;
    // The VM serves the route's next connection normally.
    let mut again = connect(gw.local_addr(), "/spin").await;
    assert_eq!(ask(&mut again, "works again").await, "works again");
}

#[tokio::test]
async fn a_backtracking_gsub_stops_at_the_cpu_limit_and_the_worker_keeps_serving() {
    let (gw, _up) = pattern_gateway().await;
    let mut ok = connect(gw.local_addr(), "/ok").await;
    assert_stall_is_bounded(&gw, &mut ok, "gsub").await;
    assert_eq!(ask(&mut ok, "after").await, "after");
}

#[tokio::test]
async fn pattern_functions_work_as_lua_s_in_policies() {
    let up = echo().await;
    let policy = script(
        "rewrite.lua",
        r#"
return function(msg, ctx, conn)
  local words = {}
  for w in msg.data:gmatch("%a+") do words[#words + 1] = w end
  local first, last = string.find(msg.data, "(%d+)")
  local key, value = msg.data:match("(%w+)=(%w+)")
  local swapped, n = msg.data:gsub("(%w+)=(%w+)", "%2=%1")
  local upper = msg.data:gsub("%a+", function(w) if w == "id" then return w:upper() end end)
  local ok, err = pcall(string.find, msg.data, "%")
  return table.concat({
    #words, tostring(first), tostring(last), key, value, swapped, n, upper, tostring(ok), err,
  }, "|")
end
"#,
    );
    let gw = gateway(&route("/p", up.addr, "", &[("on_client_frame", &policy)])).await;
    let mut ws = connect(gw.local_addr(), "/p").await;
    assert_eq!(
        ask(&mut ws, "id=42 name=ann").await,
        "3|4|5|id|42|42=id ann=name|2|ID=42 name=ann|false|malformed pattern (ends with '%')"
    );
}

/// Sends `text` and returns the reply.
async fn ask(ws: &mut Client, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    next_text(ws).await
}
