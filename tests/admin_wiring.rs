//! Issue 13 §3 and §4, wired: real gateway, real clients and upstreams, the real admin HTTP layer
//! in front of the gateway's own `Registry` and `Metrics` (`Running::registry`,
//! `Running::metrics`). Kicks, sends, broadcasts, filters, a full queue, tags, and the metrics
//! that real traffic leaves, checked with `promtool` on a scrape taken during traffic.

mod support;

use support::admin_http::{call, Reply};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use framegate::admin::{self, AdminApi, BoxFuture};
use framegate::metrics::Metrics;
use framegate::registry::Registry;
use framegate::Running;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

struct Api {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

impl AdminApi for Api {
    fn ready(&self) -> bool {
        true
    }
    fn metrics(&self) -> String {
        self.metrics.encode()
    }
    fn registry(&self) -> &Registry {
        &self.registry
    }
    fn reload(&self) -> BoxFuture<Result<u64, String>> {
        Box::pin(async { Err("not in this test".to_owned()) })
    }
    fn config(&self) -> Value {
        json!({})
    }
}

/// The admin HTTP layer over this gateway's registry and metrics, on 127.0.0.1:0.
async fn admin_for(gw: &Running) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api = Arc::new(Api {
        registry: gw.registry().clone(),
        metrics: gw.metrics().clone(),
    });
    let shutdown = CancellationToken::new();
    tokio::spawn(admin::serve(listener, shutdown.clone(), None, api));
    (addr, shutdown)
}

async fn get(addr: SocketAddr, uri: &str) -> Reply {
    call(addr, "GET", uri, None, Bytes::new()).await
}

/// A client whose first message has gone through the relay (so it is registered), and the
/// upstream end of it.
async fn relayed(
    gw: &Running,
    path: &str,
    up: &mut tokio::sync::mpsc::UnboundedReceiver<Client>,
) -> (Client, Client) {
    let mut client = connect(gw.local_addrs()[0], path).await;
    let mut upstream = within("upstream connection", up.recv()).await.unwrap();
    client.send(Message::text("hi")).await.unwrap();
    assert!(matches!(next_message(&mut upstream).await, Some(Ok(m)) if m.is_text()));
    (client, upstream)
}

/// The value of one sample line of a scrape, if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.parse().ok()
    })
}

/// Waits until `series` reads `want` in the gateway's scrape (close metrics are counted just
/// after the close handshakes end, which the peers see first).
async fn metric_reaches(gw: &Running, series: &str, want: f64) {
    within(&format!("{series} == {want}"), async {
        loop {
            if sample(&gw.metrics().encode(), series) == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Waits until the registry holds `n` connections.
async fn registered(gw: &Running, n: usize) {
    within(&format!("{n} registered connections"), async {
        while gw.registry().len() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

const TAG_BY_QUERY: &str = r#"return function(req, ctx)
  req:tag("user", req.query.user or "nobody")
  ctx.user = req.query.user
end"#;

#[tokio::test]
async fn kick_gives_the_client_its_code_and_the_upstream_1001() {
    let (up, mut ups) = captured().await;
    let gw = gateway(&route("/chat", up.addr, "", &[])).await;
    let (admin, _stop) = admin_for(&gw).await;
    let (mut client, mut upstream) = relayed(&gw, "/chat", &mut ups).await;
    let list = get(admin, "/admin/connections").await.json();
    let id = list["connections"][0]["id"].as_u64().unwrap();
    assert_eq!(list["connections"][0]["messages"]["client_to_upstream"], 1);

    let r = call(
        admin,
        "DELETE",
        &format!("/admin/connections/{id}?code=4000&reason=kicked"),
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(expect_close(&mut client).await, close_frame(4000, "kicked"));
    let frame = expect_close(&mut upstream).await;
    assert_eq!(u16::from(frame.code), 1001, "{frame:?}");
    registered(&gw, 0).await;
    metric_reaches(
        &gw,
        r#"framegate_closes_total{route="/chat",code="4000",closed_by="gateway"}"#,
        1.0,
    )
    .await;
    let r = call(
        admin,
        "DELETE",
        &format!("/admin/connections/{id}"),
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(
        r.status, 404,
        "a closed connection is gone from the registry"
    );
}

#[tokio::test]
async fn kick_by_tag_closes_every_match_and_returns_the_count() {
    let up = echo().await;
    let gw = gateway(&route(
        "/chat",
        up.addr,
        "",
        &[("on_upgrade", &script("tag.lua", TAG_BY_QUERY))],
    ))
    .await;
    let (admin, _stop) = admin_for(&gw).await;
    let addr = gw.local_addrs()[0];
    let mut ann1 = connect(addr, "/chat?user=ann").await;
    let mut ann2 = connect(addr, "/chat?user=ann").await;
    let mut bob = connect(addr, "/chat?user=bob").await;
    for ws in [&mut ann1, &mut ann2, &mut bob] {
        ws.send(Message::text("x")).await.unwrap();
        assert_eq!(next_text(ws).await, "x");
    }
    registered(&gw, 3).await;
    let r = call(
        admin,
        "DELETE",
        "/admin/connections?tag=user:ann",
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["matched"], 2);
    assert_eq!(r.json()["queued"], 2);
    for ws in [&mut ann1, &mut ann2] {
        let frame = expect_close(ws).await;
        assert_eq!(u16::from(frame.code), 1008, "{frame:?}");
    }
    // Bob is untouched.
    bob.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_text(&mut bob).await, "still here");
    registered(&gw, 1).await;
    let r = call(
        admin,
        "DELETE",
        "/admin/connections?tag=user:ann",
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(r.json()["matched"], 0);
}

#[tokio::test]
async fn send_reaches_the_client_and_the_upstream() {
    let (up, mut ups) = captured().await;
    let gw = gateway(&route("/chat", up.addr, "", &[])).await;
    let (admin, _stop) = admin_for(&gw).await;
    let (mut client, mut upstream) = relayed(&gw, "/chat", &mut ups).await;
    let id = get(admin, "/admin/connections").await.json()["connections"][0]["id"]
        .as_u64()
        .unwrap();

    let r = call(
        admin,
        "POST",
        &format!("/admin/connections/{id}/send?to=client"),
        None,
        "maintenance in 5 minutes",
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(next_text(&mut client).await, "maintenance in 5 minutes");

    let r = call(
        admin,
        "POST",
        &format!("/admin/connections/{id}/send?to=upstream"),
        Some("application/octet-stream"),
        vec![0u8, 159, 146, 150],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    match next_message(&mut upstream).await {
        Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], &[0u8, 159, 146, 150]),
        other => panic!("expected the binary message, got {other:?}"),
    }
    // The relay goes on both ways.
    client.send(Message::text("after")).await.unwrap();
    assert_eq!(next_text(&mut upstream).await, "after");
    upstream.send(Message::text("back")).await.unwrap();
    assert_eq!(next_text(&mut client).await, "back");
}

#[tokio::test]
async fn broadcast_and_filters_pick_by_route_tag_and_client() {
    let up = echo().await;
    let tag = script("tag.lua", TAG_BY_QUERY);
    let gw = gateway(&format!(
        "{}{}",
        route("/a", up.addr, "", &[("on_upgrade", &tag)]),
        route("/b", up.addr, "", &[("on_upgrade", &tag)]),
    ))
    .await;
    let (admin, _stop) = admin_for(&gw).await;
    let addr = gw.local_addrs()[0];
    let mut a_ann = connect(addr, "/a?user=ann").await;
    let mut a_bob = connect(addr, "/a?user=bob").await;
    let mut b_ann = connect(addr, "/b?user=ann").await;
    for ws in [&mut a_ann, &mut a_bob, &mut b_ann] {
        ws.send(Message::text("x")).await.unwrap();
        assert_eq!(next_text(ws).await, "x");
    }
    registered(&gw, 3).await;

    let ids = |r: &Reply| -> usize { r.json()["connections"].as_array().unwrap().len() };
    assert_eq!(ids(&get(admin, "/admin/connections?route=/a").await), 2);
    assert_eq!(ids(&get(admin, "/admin/connections?tag=user:ann").await), 2);
    assert_eq!(
        ids(&get(admin, "/admin/connections?route=/b&tag=user:ann").await),
        1
    );
    assert_eq!(
        ids(&get(admin, "/admin/connections?client_ip=127.0.0.1").await),
        3
    );
    assert_eq!(
        ids(&get(admin, "/admin/connections?client_ip=10.9.9.9").await),
        0
    );
    let snapshot = gw.snapshot_number();
    let on = |n: u64| format!("/admin/connections?snapshot={n}");
    assert_eq!(ids(&get(admin, &on(snapshot)).await), 3);
    assert_eq!(ids(&get(admin, &on(snapshot + 1)).await), 0);
    let limited = get(admin, "/admin/connections?limit=1").await.json();
    assert_eq!(limited["matched"], 3);
    assert_eq!(limited["connections"].as_array().unwrap().len(), 1);

    // Detail: tags, the ctx on_upgrade built, the request with its secrets masked.
    let id = get(admin, "/admin/connections?route=/b").await.json()["connections"][0]["id"]
        .as_u64()
        .unwrap();
    let detail = get(admin, &format!("/admin/connections/{id}")).await.json();
    assert_eq!(detail["tags"], json!({"user": "ann"}));
    assert_eq!(detail["ctx"], json!({"user": "ann"}));
    assert_eq!(detail["route"], "/b");
    assert_eq!(detail["snapshot"], snapshot);
    assert_eq!(detail["request"]["target"], "/b?user=ann");

    let r = call(admin, "POST", "/admin/broadcast?route=/a", None, "to /a").await;
    assert_eq!(r.json()["matched"], 2, "{:?}", r.body);
    assert_eq!(next_text(&mut a_ann).await, "to /a");
    assert_eq!(next_text(&mut a_bob).await, "to /a");
    let r = call(
        admin,
        "POST",
        "/admin/broadcast?tag=user:ann",
        None,
        "to ann",
    )
    .await;
    assert_eq!(r.json()["matched"], 2, "{:?}", r.body);
    assert_eq!(next_text(&mut a_ann).await, "to ann");
    assert_eq!(next_text(&mut b_ann).await, "to ann");
    // Bob got only the route broadcast: his next message is his own echo.
    a_bob.send(Message::text("mine")).await.unwrap();
    assert_eq!(next_text(&mut a_bob).await, "mine");
}

/// Secrets never reach the registry.
#[tokio::test]
async fn detail_masks_authorization_cookie_and_access_token() {
    let up = echo().await;
    let gw = gateway(&route("/chat", up.addr, "", &[])).await;
    let (admin, _stop) = admin_for(&gw).await;
    let (mut ws, _) = connect_with(
        gw.local_addrs()[0],
        "/chat?access_token=tok-SECRET&room=1",
        &[
            ("authorization", "Bearer jwt-SECRET"),
            ("cookie", "sid=c-SECRET"),
        ],
    )
    .await
    .unwrap();
    ws.send(Message::text("x")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "x");
    registered(&gw, 1).await;
    let id = get(admin, "/admin/connections").await.json()["connections"][0]["id"]
        .as_u64()
        .unwrap();
    let r = get(admin, &format!("/admin/connections/{id}")).await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(!text.contains("SECRET"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
}

/// A client that reads nothing: the admin's messages fill its leg's queue, then the held ones,
/// then the control channel; then the admin is answered 503. Once the client reads, every
/// accepted message arrives, in order.
#[tokio::test]
async fn a_full_queue_answers_503_and_loses_nothing_accepted() {
    let (up, mut ups) = captured().await;
    let gw = gateway(&route(
        "/chat",
        up.addr,
        "max_queued_bytes = \"64KiB\"",
        &[],
    ))
    .await;
    let (admin, _stop) = admin_for(&gw).await;
    let (mut client, _upstream) = relayed(&gw, "/chat", &mut ups).await;
    let id = get(admin, "/admin/connections").await.json()["connections"][0]["id"]
        .as_u64()
        .unwrap();
    let chunk = "x".repeat(256 << 10);
    let mut accepted = 0usize;
    let mut refused = None;
    for i in 0..400 {
        let body = format!("{i:04}{chunk}");
        let r = call(
            admin,
            "POST",
            &format!("/admin/connections/{id}/send?to=client"),
            None,
            body,
        )
        .await;
        if r.status == 503 {
            refused = Some(r.json()["error"].as_str().unwrap().to_owned());
            break;
        }
        assert_eq!(r.status, 200, "{:?}", r.body);
        accepted += 1;
    }
    let refused = refused.expect("a client that reads nothing fills its queue");
    assert!(refused.contains("queued"), "{refused}");
    for i in 0..accepted {
        let text = next_text(&mut client).await;
        assert_eq!(&text[..4], format!("{i:04}"), "in order");
        assert_eq!(text.len(), 4 + chunk.len());
    }
    // And the connection goes on.
    let r = call(
        admin,
        "POST",
        &format!("/admin/connections/{id}/send?to=client"),
        None,
        "after",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(next_text(&mut client).await, "after");
}

#[tokio::test]
async fn tags_are_read_only_in_frame_policies_and_on_close() {
    let up = echo().await;
    let frame = script(
        "frame.lua",
        r#"return function(msg, ctx, conn)
  if msg.data == "write" then conn.tags.user = "mallory" end
  return "user=" .. tostring(conn.tags.user)
end"#,
    );
    let close = script(
        "close.lua",
        r#"return function(ctx, conn, info)
  assert(conn.tags.user == "ann", "on_close sees the tags")
end"#,
    );
    let gw = gateway(&route(
        "/chat",
        up.addr,
        "",
        &[
            ("on_upgrade", &script("tag.lua", TAG_BY_QUERY)),
            ("on_client_frame", &frame),
            ("on_close", &close),
        ],
    ))
    .await;
    let addr = gw.local_addrs()[0];
    let mut ws = connect(addr, "/chat?user=ann").await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "user=ann");
    // Writing to conn.tags is a policy error (on_policy_error defaults to close: 1011).
    ws.send(Message::text("write")).await.unwrap();
    let frame = expect_close(&mut ws).await;
    assert_eq!(u16::from(frame.code), 1011, "{frame:?}");
    metric_reaches(
        &gw,
        r#"framegate_policy_errors_total{route="/chat",phase="on_client_frame",kind="error"}"#,
        1.0,
    )
    .await;
    // on_close ran and its assertion on conn.tags held.
    metric_reaches(
        &gw,
        r#"framegate_policy_duration_seconds_count{route="/chat",phase="on_close"}"#,
        1.0,
    )
    .await;
    let text = gw.metrics().encode();
    assert_eq!(
        sample(
            &text,
            r#"framegate_policy_errors_total{route="/chat",phase="on_close",kind="error"}"#
        ),
        Some(0.0),
        "{text}"
    );
}

/// `req:tag` refuses what the registry cannot index, as a policy error at the script's line.
#[tokio::test]
async fn bad_tags_fail_the_upgrade_at_the_scripts_line() {
    let up = echo().await;
    let gw = gateway(&route(
        "/chat",
        up.addr,
        "",
        &[(
            "on_upgrade",
            &script(
                "badtag.lua",
                "return function(req, ctx)\n  req:tag(\"has:colon\", \"v\")\nend",
            ),
        )],
    ))
    .await;
    let err = connect_with(gw.local_addrs()[0], "/chat", &[])
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 500),
        other => panic!("expected 500, got {other:?}"),
    }
    let text = gw.metrics().encode();
    assert_eq!(
        sample(
            &text,
            r#"framegate_handshakes_total{route="/chat",status="500"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"framegate_policy_errors_total{route="/chat",phase="on_upgrade",kind="error"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

/// Real traffic, then every metric it should have moved.
#[tokio::test]
async fn metrics_count_real_traffic() {
    // The CPU limit is generous so that "eat" meets the memory limit first even on a loaded
    // machine (the limit is wall-clock time; 20 ms made "eat" a CPU-limit error at times).
    let up = echo().await;
    let drop_odd = script(
        "drop.lua",
        r#"return function(msg, ctx, conn)
  if msg.data == "drop" then return false end
  if msg.data == "spin" then while true do end end
  if msg.data == "eat" then local t = {} for i = 1, 1e7 do t[i] = i end end
end"#,
    );
    let gw = gateway(&format!(
        "{}{}{}{}",
        route("/echo", up.addr, "", &[]),
        route(
            "/policy",
            up.addr,
            "on_policy_error = \"drop\"\npolicy_cpu_limit = \"200ms\"\npolicy_memory_limit = \"1MiB\"",
            &[("on_client_frame", &drop_odd)],
        ),
        route("/idle", up.addr, "idle_timeout = \"200ms\"", &[]),
        route("/expire", up.addr, "expire = \"200ms\"", &[]),
    ))
    .await;
    let addr = gw.local_addrs()[0];

    let mut ws = connect(addr, "/echo").await;
    for text in ["a", "bb", "ccc"] {
        ws.send(Message::text(text)).await.unwrap();
        assert_eq!(next_text(&mut ws).await, text);
    }
    ws.send(Message::binary(vec![7u8; 100_000])).await.unwrap();
    assert!(
        matches!(next_message(&mut ws).await, Some(Ok(Message::Binary(b))) if b.len() == 100_000)
    );
    ws.close(Some(close_frame(1000, "bye"))).await.unwrap();
    while let Some(Ok(_)) = within("close", ws.next()).await {}

    let mut p = connect(addr, "/policy").await;
    for text in ["drop", "spin", "eat", "kept"] {
        p.send(Message::text(text)).await.unwrap();
    }
    assert_eq!(next_text(&mut p).await, "kept");

    let mut idle = connect(addr, "/idle").await;
    assert_eq!(u16::from(expect_close(&mut idle).await.code), 1001);

    let mut expiring = connect(addr, "/expire").await;
    assert_eq!(u16::from(expect_close(&mut expiring).await.code), 1001);

    let (status, _, _) = raw_http(addr, &upgrade_request("/nowhere", "")).await;
    assert_eq!(status, 404);
    // A head the gateway cannot parse is answered before any route is known.
    let (status, _, _) =
        raw_http(addr, "GET /echo HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n").await;
    assert_eq!(status, 400);
    // Routed, but not a WebSocket upgrade.
    let (status, _, _) = raw_http(addr, "GET /echo HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(status, 426);

    let e = r#"route="/echo""#;
    metric_reaches(
        &gw,
        &format!("framegate_closes_total{{{e},code=\"1000\",closed_by=\"client\"}}"),
        1.0,
    )
    .await;
    metric_reaches(
        &gw,
        r#"framegate_lifetime_closes_total{route="/idle",reason="idle"}"#,
        1.0,
    )
    .await;
    metric_reaches(
        &gw,
        r#"framegate_lifetime_closes_total{route="/expire",reason="expire"}"#,
        1.0,
    )
    .await;
    let text = gw.metrics().encode();
    let v = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series}\n{text}"));
    let c2u = format!("{e},direction=\"client_to_upstream\"");
    let u2c = format!("{e},direction=\"upstream_to_client\"");
    assert_eq!(
        v(&format!("framegate_messages_total{{{c2u},type=\"text\"}}")),
        3.0
    );
    assert_eq!(
        v(&format!(
            "framegate_messages_total{{{c2u},type=\"binary\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(&format!("framegate_messages_total{{{u2c},type=\"text\"}}")),
        3.0
    );
    assert_eq!(
        v(&format!(
            "framegate_messages_total{{{u2c},type=\"binary\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(&format!("framegate_message_bytes_total{{{c2u}}}")),
        100_006.0
    );
    assert_eq!(
        v(&format!("framegate_message_bytes_total{{{u2c}}}")),
        100_006.0
    );
    assert_eq!(
        v(&format!(
            "framegate_message_size_bytes_bucket{{{c2u},le=\"64\"}}"
        )),
        3.0
    );
    assert_eq!(
        v(&format!("framegate_message_size_bytes_count{{{c2u}}}")),
        4.0
    );
    assert_eq!(
        v(&format!("framegate_handshakes_total{{{e},status=\"101\"}}")),
        1.0
    );
    assert_eq!(v(&format!("framegate_connections_total{{{e}}}")), 1.0);
    assert_eq!(v(&format!("framegate_connections_open{{{e}}}")), 0.0);
    assert_eq!(
        v(&format!(
            "framegate_upstream_connect_duration_seconds_count{{{e}}}"
        )),
        1.0
    );
    assert_eq!(
        v(r#"framegate_handshakes_total{route="unmatched",status="404"}"#),
        1.0
    );
    assert_eq!(
        v(r#"framegate_handshakes_total{route="unmatched",status="400"}"#),
        1.0
    );
    assert_eq!(
        v(&format!("framegate_handshakes_total{{{e},status=\"426\"}}")),
        1.0
    );
    assert_eq!(v(r#"framegate_connections_open{route="/policy"}"#), 1.0);
    // drop (the policy's verdict), spin and eat (on_policy_error = "drop"): three drops.
    assert_eq!(
        v(r#"framegate_policy_drops_total{route="/policy",direction="client_to_upstream"}"#),
        3.0
    );
    let p = r#"route="/policy",phase="on_client_frame""#;
    assert_eq!(
        v(&format!(
            "framegate_policy_errors_total{{{p},kind=\"cpu_limit\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(&format!(
            "framegate_policy_errors_total{{{p},kind=\"memory_limit\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(&format!(
            "framegate_policy_errors_total{{{p},kind=\"error\"}}"
        )),
        0.0
    );
    assert_eq!(
        v(&format!("framegate_policy_duration_seconds_count{{{p}}}")),
        // One call in POLICY_SAMPLE is timed (the first one) and stands for that many.
        framegate::metrics::POLICY_SAMPLE as f64
    );
    assert!(v(&format!("framegate_policy_duration_seconds_sum{{{p}}}")) > 0.0);
    assert_eq!(
        v(r#"framegate_closes_total{route="/idle",code="1001",closed_by="gateway"}"#),
        1.0
    );
}

/// `promtool check metrics` on a scrape taken through the admin listener while messages flow.
#[tokio::test]
async fn promtool_accepts_a_scrape_taken_during_traffic() {
    let up = echo().await;
    let gw = gateway(&format!(
        "{}{}",
        route("/echo", up.addr, "", &[]),
        route(
            "/policy",
            up.addr,
            "",
            &[(
                "on_client_frame",
                &script("p.lua", "return function(msg) end")
            )],
        ),
    ))
    .await;
    let (admin, _stop) = admin_for(&gw).await;
    let addr = gw.local_addrs()[0];
    let stop = CancellationToken::new();
    let mut flows = Vec::new();
    for path in ["/echo", "/policy"] {
        let mut ws = connect(addr, path).await;
        ws.send(Message::text("warm-up")).await.unwrap();
        assert_eq!(next_text(&mut ws).await, "warm-up");
        let stop = stop.clone();
        flows.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                ws.send(Message::text(format!("m{n}"))).await.unwrap();
                assert_eq!(next_text(&mut ws).await, format!("m{n}"));
                n += 1;
            }
            ws.close(None).await.unwrap();
            n
        }));
    }
    let _ = raw_http(addr, &upgrade_request("/nowhere", "")).await;
    let scrape = get(admin, "/metrics").await;
    assert_eq!(scrape.status, 200);
    stop.cancel();
    for flow in flows {
        assert!(within("traffic", flow).await.unwrap() > 0);
    }
    let text = String::from_utf8(scrape.body.to_vec()).unwrap();
    assert!(
        text.contains("framegate_messages_total{route=\"/policy\""),
        "{text}"
    );
    let out = promtool_check_metrics(&text);
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A ctx past the registry's bound is not copied into it: the detail says so.
#[tokio::test]
async fn a_large_ctx_is_omitted_from_the_registry() {
    let up = echo().await;
    let big = script(
        "big.lua",
        "return function(req, ctx)\n  ctx.blob = string.rep(\"x\", 100000)\nend",
    );
    let gw = gateway(&route("/chat", up.addr, "", &[("on_upgrade", &big)])).await;
    let (admin, _stop) = admin_for(&gw).await;
    let mut ws = connect(gw.local_addrs()[0], "/chat").await;
    ws.send(Message::text("x")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "x");
    registered(&gw, 1).await;
    let id = get(admin, "/admin/connections").await.json()["connections"][0]["id"]
        .as_u64()
        .unwrap();
    let detail = get(admin, &format!("/admin/connections/{id}")).await.json();
    let ctx = detail["ctx"].as_str().unwrap_or_else(|| panic!("{detail}"));
    assert!(ctx.starts_with("ctx omitted: over 65536 bytes"), "{ctx}");
}

/// `conn:expire_at` moves the deadline the registry shows, never past the route's `expire`.
#[tokio::test]
async fn expires_at_follows_conn_expire_at_within_the_route_s_expire() {
    let up = echo().await;
    let policy = script(
        "move_deadline.lua",
        r#"return function(msg, ctx, conn)
  conn:expire_at(gw.now() + tonumber(msg.data))
  conn:reply("moved")
  return false
end"#,
    );
    let gw = gateway(&route(
        "/chat",
        up.addr,
        "expire = \"1h\"",
        &[("on_client_frame", &policy)],
    ))
    .await;
    let (admin, _stop) = admin_for(&gw).await;
    let mut client = connect(gw.local_addr(), "/chat").await;
    // The client has its 101 a moment before the relay registers the connection.
    registered(&gw, 1).await;
    let expires = |list: Value| {
        let at = list["connections"][0]["expires_at"]
            .as_str()
            .unwrap()
            .to_owned();
        let at = humantime::parse_rfc3339(&at).unwrap();
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .as_secs()
    };
    let first = expires(get(admin, "/admin/connections").await.json());
    assert!(
        (3590..=3600).contains(&first),
        "the route's expire: {first}"
    );
    for (asked, lo, hi) in [("60", 55, 60), ("7200", 3590, 3600), ("120", 115, 120)] {
        client.send(Message::text(asked)).await.unwrap();
        assert_eq!(next_text(&mut client).await, "moved");
        // The relay applies the new deadline after the read that asked for it, which may
        // come a moment after the reply reached the client: wait for the registry to show it.
        within(
            &format!("expires_at after expire_at(now + {asked})"),
            async {
                loop {
                    let now = expires(get(admin, "/admin/connections").await.json());
                    if (lo..=hi).contains(&now) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            },
        )
        .await;
    }
    gw.shutdown().await;
}
