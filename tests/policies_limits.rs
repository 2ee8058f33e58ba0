//! What a policy may make the gateway hold: `route.policy_state_limit` (ctx plus conn.state,
//! per connection) and the bounds of `gw.shared` (`[shared] max_entries` and `max_bytes`).

mod support;

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// Sends `text` and returns the reply.
async fn ask(ws: &mut Client, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    next_text(ws).await
}

#[tokio::test]
async fn a_ctx_over_the_state_limit_fails_the_upgrade() {
    let up = echo().await;
    let keep = script(
        "keep.lua",
        r#"
return function(req, ctx)
  ctx.blob = string.rep("x", tonumber(req.query.kib) * 1024)
end
"#,
    );
    let frames = script("frames.lua", "return function(msg) return nil end\n");
    let gw = gateway(&route(
        "/p",
        up.addr,
        "policy_state_limit = \"1MiB\"",
        &[("on_upgrade", &keep), ("on_client_frame", &frames)],
    ))
    .await;
    let (status, _, body) = raw_http(gw.local_addr(), &upgrade_request("/p?kib=2048", "")).await;
    assert_eq!(
        (status, body.trim()),
        (500, "internal error in the upgrade policy"),
        "a 2 MiB ctx is over the 1 MiB limit"
    );
    let mut ws = connect(gw.local_addr(), "/p?kib=100").await;
    assert_eq!(
        ask(&mut ws, "fine").await,
        "fine",
        "a 100 KiB ctx is within it"
    );
}

#[tokio::test]
async fn conn_state_over_the_state_limit_fails_the_call_and_is_emptied() {
    let up = echo().await;
    let grow = script(
        "grow.lua",
        r#"
return function(msg, ctx, conn)
  local s = conn.state
  s.list = s.list or {}
  s.list[#s.list + 1] = string.rep("x", 200 * 1024)
  return tostring(#s.list)
end
"#,
    );
    let gw = gateway(&route(
        "/p",
        up.addr,
        "policy_state_limit = \"1MiB\"\non_policy_error = \"pass\"",
        &[("on_client_frame", &grow)],
    ))
    .await;
    let mut ws = connect(gw.local_addr(), "/p").await;
    let mut kept = 0;
    loop {
        match ask(&mut ws, "grow").await.as_str() {
            // The failing call's message passes unchanged (on_policy_error = "pass").
            "grow" => break,
            n => kept = n.parse::<usize>().unwrap(),
        }
        assert!(
            kept < 8,
            "conn.state kept {kept} x 200 KiB past a 1 MiB limit"
        );
    }
    assert!(kept >= 4, "stopped too early, at {kept} x 200 KiB");
    assert_eq!(ask(&mut ws, "grow").await, "1", "conn.state was emptied");
}

#[tokio::test]
async fn gw_shared_refuses_keys_past_max_entries() {
    let up = echo().await;
    let fill = script(
        "fill.lua",
        r#"
return function(msg, ctx, conn)
  local out = {}
  for i = 1, 12 do
    local ok, err = gw.shared:set("k" .. i, i)
    out[#out + 1] = tostring(ok) .. ":" .. tostring(err)
  end
  local n, err = gw.shared:incr("counter")
  out[#out + 1] = tostring(n) .. ":" .. tostring(err)
  out[#out + 1] = tostring(gw.shared:set("k1", "replaced")) .. ":" .. gw.shared:get("k1")
  gw.shared:delete("k2")
  out[#out + 1] = tostring(gw.shared:incr("counter")) .. ":" .. tostring(gw.shared:get("k12"))
  return table.concat(out, " ")
end
"#,
    );
    let gw = gateway(&format!(
        "{}[shared]\nmax_entries = 10\n",
        route("/p", up.addr, "", &[("on_client_frame", &fill)])
    ))
    .await;
    let mut ws = connect(gw.local_addr(), "/p").await;
    let full = "nil:gw.shared is full";
    let mut expected: Vec<String> = (1..=10).map(|_| "true:nil".to_string()).collect();
    expected.extend([full.to_string(), full.to_string(), full.to_string()]);
    expected.push("true:replaced".into());
    expected.push("1:nil".into());
    assert_eq!(ask(&mut ws, "fill").await, expected.join(" "));
}

#[tokio::test]
async fn gw_shared_refuses_values_past_max_bytes() {
    let up = echo().await;
    let big = script(
        "big.lua",
        r#"
return function(msg, ctx, conn)
  local a, e1 = gw.shared:set("small", string.rep("x", 1000))
  local b, e2 = gw.shared:set("big", string.rep("x", 5000))
  return table.concat({ tostring(a), tostring(e1), tostring(b), tostring(e2),
    tostring(gw.shared:get("big")) }, " ")
end
"#,
    );
    let gw = gateway(&format!(
        "{}[shared]\nmax_bytes = \"4KiB\"\n",
        route("/p", up.addr, "", &[("on_client_frame", &big)])
    ))
    .await;
    let mut ws = connect(gw.local_addr(), "/p").await;
    assert_eq!(
        ask(&mut ws, "go").await,
        "true nil nil gw.shared is full nil"
    );
}

#[test]
fn shared_and_state_limit_keys_are_checked() {
    let route = "[[route]]\npath = \"/a\"\nupstream = \"ws://127.0.0.1:9/\"\n";
    for (toml, expected) in [
        (
            format!("{route}policy_state_limit = \"1KiB\"\n"),
            "route.policy_state_limit must be at least 64KiB",
        ),
        (
            format!("{route}[shared]\nmax_entries = 0\n"),
            "shared.max_entries must be at least 1",
        ),
        (
            format!("{route}[shared]\nmax_bytes = \"lots\"\n"),
            "shared.max_bytes:",
        ),
        (
            format!("{route}[shared]\nmax_keys = 5\n"),
            "unknown field `max_keys`",
        ),
    ] {
        let error = framegate::Config::from_toml(&toml, std::path::Path::new("t.toml"))
            .expect_err(&toml)
            .to_string();
        assert!(error.contains(expected), "{error:?} lacks {expected:?}");
    }
}
