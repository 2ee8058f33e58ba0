//! Issue 14: `[[upstream]]` pools: balancing over real upstreams, retries before the 101,
//! passive health, 503 when every endpoint is down, sticky cookies, `upstream_path`.

mod support;

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// An upstream that names itself in its first message, then echoes; `stop` kills it (its
/// listener and every connection it holds).
struct Named {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Named {
    async fn start(name: &'static str) -> Named {
        Named::on(name, TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    fn on(name: &'static str, listener: TcpListener) -> Named {
        let addr = listener.local_addr().unwrap();
        let task = named_upstream(name, listener);
        Named { addr, task }
    }

    fn stop(&self) {
        self.task.abort();
    }
}

fn pool(name: &str, endpoints: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|a| format!("\"ws://{a}\"")).collect();
    format!(
        "[[upstream]]\nname = \"{name}\"\nendpoints = [{}]\n{extra}\n",
        list.join(", ")
    )
}

fn pool_route(path: &str, pool: &str, extra: &str) -> String {
    format!("[[route]]\npath = \"{path}\"\nupstream = \"{pool}\"\n{extra}\n")
}

/// Opens a connection and returns it with the name of the endpoint that took it.
async fn open(addr: SocketAddr, path: &str) -> (Client, String) {
    let mut ws = connect(addr, path).await;
    let name = next_text(&mut ws).await;
    (ws, name)
}

fn count(names: &[String], name: &str) -> usize {
    names.iter().filter(|n| *n == name).count()
}

#[tokio::test]
async fn round_robin_follows_weights_exactly_over_whole_rounds() {
    let (a, b, c) = (
        Named::start("a").await,
        Named::start("b").await,
        Named::start("c").await,
    );
    let toml = format!(
        "[[upstream]]\nname = \"chat\"\nendpoints = [\"ws://{}\", {{ url = \"ws://{}\", weight = 2 }}, \"ws://{}\"]\n{}",
        a.addr,
        b.addr,
        c.addr,
        pool_route("/chat", "chat", "")
    );
    // Two workers: the rotation is the pool's, not each worker's.
    let gw = gateway_with_server("workers = 2", &toml).await;
    let mut names = Vec::new();
    for _ in 0..40 {
        let (_ws, name) = open(gw.local_addr(), "/chat").await;
        names.push(name);
    }
    assert_eq!(
        [count(&names, "a"), count(&names, "b"), count(&names, "c")],
        [10, 20, 10],
        "{names:?}"
    );
}

#[tokio::test]
async fn least_connections_counts_open_connections_across_workers() {
    let (a, b, c) = (
        Named::start("a").await,
        Named::start("b").await,
        Named::start("c").await,
    );
    let toml = pool(
        "chat",
        &[a.addr, b.addr, c.addr],
        "balance = \"least_connections\"",
    ) + &pool_route("/chat", "chat", "");
    let gw = gateway_with_server("workers = 2", &toml).await;
    let mut held = Vec::new();
    for _ in 0..9 {
        held.push(open(gw.local_addr(), "/chat").await);
    }
    let names: Vec<String> = held.iter().map(|(_, n)| n.clone()).collect();
    assert_eq!(
        [count(&names, "a"), count(&names, "b"), count(&names, "c")],
        [3, 3, 3]
    );
    // Close b's three; the next three new connections all go to b.
    let mut kept = Vec::new();
    for (mut ws, name) in held {
        if name == "b" {
            ws.close(None).await.unwrap();
            while within("close", ws.next()).await.is_some() {}
        } else {
            kept.push(ws);
        }
    }
    // The count drops when the gateway has finished each connection: wait for it.
    let state = gw.pools().get("chat").unwrap();
    let b_state = state
        .endpoints()
        .into_iter()
        .find(|e| e.url == format!("ws://{}", b.addr))
        .unwrap();
    within("b's connections to end on the gateway", async {
        while b_state.open() != 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    for _ in 0..3 {
        let (ws, name) = open(gw.local_addr(), "/chat").await;
        assert_eq!(name, "b");
        kept.push(ws);
    }
}

#[tokio::test]
async fn random_two_keeps_the_open_connections_even() {
    let (a, b, c) = (
        Named::start("a").await,
        Named::start("b").await,
        Named::start("c").await,
    );
    let toml = pool(
        "chat",
        &[a.addr, b.addr, c.addr],
        "balance = \"random_two\"",
    ) + &pool_route("/chat", "chat", "");
    let gw = gateway(&toml).await;
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(open(gw.local_addr(), "/chat").await);
    }
    let names: Vec<String> = held.iter().map(|(_, n)| n.clone()).collect();
    let counts = [count(&names, "a"), count(&names, "b"), count(&names, "c")];
    // Two choices keep the spread small (a gap of log log n, not the √n of one random
    // choice); the pair may leave out the least loaded, so it is not exact.
    let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
    assert!(spread <= 4, "{counts:?}: {names:?}");
}

#[tokio::test]
async fn hash_sends_the_same_key_to_the_same_endpoint_on_every_worker() {
    let (a, b, c) = (
        Named::start("a").await,
        Named::start("b").await,
        Named::start("c").await,
    );
    let toml = pool(
        "chat",
        &[a.addr, b.addr, c.addr],
        "balance = \"hash\"\nhash_key = \"param:room\"",
    ) + &pool_route("/chat/{room}", "chat", "upstream_path = \"/rooms/{room}\"");
    let gw = gateway_with_server("workers = 2", &toml).await;
    let mut seen_endpoints = std::collections::BTreeSet::new();
    for room in 0..12 {
        let path = format!("/chat/room-{room}");
        let (_ws, first) = open(gw.local_addr(), &path).await;
        for _ in 0..4 {
            let (_ws, again) = open(gw.local_addr(), &path).await;
            assert_eq!(again, first, "room-{room}");
        }
        seen_endpoints.insert(first);
    }
    // Twelve keys spread over more than one endpoint.
    assert!(seen_endpoints.len() > 1, "{seen_endpoints:?}");
}

#[tokio::test]
async fn upstream_path_fills_placeholders_and_keeps_the_query() {
    let mut up = echo().await;
    let toml = pool("chat", &[up.addr], "")
        + &pool_route("/chat/{room}", "chat", "upstream_path = \"/rooms/{room}\"");
    let gw = gateway(&toml).await;
    let _ws = connect(gw.local_addr(), "/chat/lobby?x=1").await;
    let seen = within("handshake", up.requests.recv()).await.unwrap();
    assert_eq!(seen.uri, "/rooms/lobby?x=1");
}

#[tokio::test]
async fn failed_endpoints_are_retried_before_the_101() {
    let refused = closed_port().await;
    let failing =
        raw_upstream(|_| b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec())
            .await;
    let good = Named::start("good").await;
    // Round robin starts at the first endpoint: refused, then 503, then good.
    let toml = pool("chat", &[refused, failing, good.addr], "retries = 2")
        + &pool_route("/chat", "chat", "");
    let gw = gateway(&toml).await;
    for _ in 0..6 {
        let (_ws, name) = open(gw.local_addr(), "/chat").await;
        assert_eq!(name, "good");
    }
    // With fewer retries than bad endpoints, the last failure is answered.
    let toml = pool("chat", &[refused, failing, good.addr], "retries = 0")
        + &pool_route("/chat", "chat", "");
    let gw = gateway(&toml).await;
    let (status, _, _) = raw_http(gw.local_addr(), &upgrade_request("/chat", "")).await;
    assert_eq!(status, 502);
}

#[tokio::test]
async fn a_non_5xx_refusal_is_relayed_not_retried() {
    let forbidding =
        raw_upstream(|_| b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\nno way".to_vec())
            .await;
    let good = Named::start("good").await;
    let toml =
        pool("chat", &[forbidding, good.addr], "retries = 2") + &pool_route("/chat", "chat", "");
    let gw = gateway(&toml).await;
    let (status, _, body) = raw_http(gw.local_addr(), &upgrade_request("/chat", "")).await;
    assert_eq!((status, body.as_str()), (403, "no way"));
    // The next connection goes round to the good one.
    let (_ws, name) = open(gw.local_addr(), "/chat").await;
    assert_eq!(name, "good");
}

#[tokio::test]
async fn all_endpoints_down_gives_503_with_retry_after_at_once() {
    let (x, y) = (closed_port().await, closed_port().await);
    // Passive checks only: three failures in a row mark an endpoint down for 10 seconds.
    let toml = pool("chat", &[x, y], "retries = 1") + &pool_route("/chat", "chat", "");
    let gw = gateway(&toml).await;
    // Each request tries both, and fails on both.
    for _ in 0..3 {
        let (status, _, _) = raw_http(gw.local_addr(), &upgrade_request("/chat", "")).await;
        assert_eq!(status, 502);
    }
    // Now both are down: 503 at once, with when to come back.
    let (status, head, _) = raw_http(gw.local_addr(), &upgrade_request("/chat", "")).await;
    assert_eq!(status, 503);
    let retry_after = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("retry-after: ")
                .or(l.strip_prefix("Retry-After: "))
        })
        .expect("Retry-After");
    let secs: u64 = retry_after.trim().parse().unwrap();
    assert!((9..=10).contains(&secs), "{secs}");
}

#[tokio::test]
async fn a_killed_endpoint_fails_no_handshake_and_is_used_again_once_back() {
    let (a, b) = (Named::start("a").await, Named::start("b").await);
    let b_addr = b.addr;
    let toml = pool(
        "chat",
        &[a.addr, b.addr],
        "retries = 1\n[upstream.health]\ninterval = \"200ms\"\nfails = 1",
    ) + &pool_route("/chat", "chat", "");
    let gw = gateway(&toml).await;
    let (_ws, _) = open(gw.local_addr(), "/chat").await;
    b.stop();
    // b is dead: every handshake still succeeds, on a.
    for _ in 0..10 {
        let (_ws, name) = open(gw.local_addr(), "/chat").await;
        assert_eq!(name, "a");
    }
    // b comes back on the same port: after its backoff it takes connections again.
    let listener = loop {
        match TcpListener::bind(b_addr).await {
            Ok(l) => break l,
            Err(_) => tokio::task::yield_now().await,
        }
    };
    let _b = Named::on("b", listener);
    within("b to be used again", async {
        loop {
            let (_ws, name) = open(gw.local_addr(), "/chat").await;
            if name == "b" {
                break;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn the_sticky_cookie_brings_a_client_back_to_its_endpoint() {
    let (a, b, c) = (
        Named::start("a").await,
        Named::start("b").await,
        Named::start("c").await,
    );
    let toml = pool(
        "chat",
        &[a.addr, b.addr, c.addr],
        "sticky_cookie = \"fg_chat\"",
    ) + &pool_route("/chat", "chat", "");
    let gw = gateway(&toml).await;
    let (mut ws, response) = connect_with(gw.local_addr(), "/chat", &[]).await.unwrap();
    let first = next_text(&mut ws).await;
    let cookie = response
        .headers()
        .get("set-cookie")
        .expect("the 101 sets the sticky cookie")
        .to_str()
        .unwrap()
        .to_owned();
    let pair = cookie.split(';').next().unwrap().to_owned();
    assert!(pair.starts_with("fg_chat="), "{cookie}");
    // Opaque: the address is not in it.
    assert!(!cookie.contains("127.0.0.1"), "{cookie}");
    for _ in 0..6 {
        let (mut ws, _) = connect_with(gw.local_addr(), "/chat", &[("cookie", &pair)])
            .await
            .unwrap();
        assert_eq!(next_text(&mut ws).await, first);
    }
}

#[tokio::test]
async fn set_upstream_may_name_a_pool_and_set_hash_key_overrides_the_key() {
    let (a, b) = (Named::start("a").await, Named::start("b").await);
    let direct = Named::start("direct").await;
    let policy = script(
        "pool_pick",
        r#"return function(req, ctx)
             req:set_upstream("chat")
             req:set_hash_key(req.headers["x-user"] or "none")
           end"#,
    );
    let toml = pool(
        "chat",
        &[a.addr, b.addr],
        "balance = \"hash\"\nhash_key = \"client_ip\"",
    ) + &route("/chat", direct.addr, "", &[("on_upgrade", &policy)]);
    let gw = gateway(&toml).await;
    let mut by_user = std::collections::BTreeMap::new();
    for user in 0..10 {
        let user = format!("u{user}");
        for _ in 0..3 {
            let (mut ws, _) = connect_with(gw.local_addr(), "/chat", &[("x-user", &user)])
                .await
                .unwrap();
            let name = next_text(&mut ws).await;
            assert_ne!(name, "direct");
            assert_eq!(by_user.entry(user.clone()).or_insert(name.clone()), &name);
        }
    }
    let endpoints: std::collections::BTreeSet<_> = by_user.values().collect();
    assert_eq!(endpoints.len(), 2, "{by_user:?}");
}

async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = raw_http(
        admin,
        &format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"),
    )
    .await;
    (status, body)
}

#[tokio::test]
async fn admin_upstreams_and_metrics_show_each_endpoint() {
    let live = Named::start("live").await;
    let dead = closed_port().await;
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}",
        pool("chat", &[dead, live.addr], "retries = 1"),
        pool_route("/chat", "chat", "")
    );
    let gw = gateway(&toml).await;
    let admin = gw.admin_addr().unwrap();
    // Connections until the dead endpoint has failed three times (and is down); each of
    // those was retried on the live one.
    let state = gw.pools().get("chat").unwrap();
    let dead_state = state
        .endpoints()
        .into_iter()
        .find(|e| e.url == format!("ws://{dead}"))
        .unwrap();
    let mut held = Vec::new();
    while !dead_state.marked_down() {
        let (ws, name) = open(gw.local_addr(), "/chat").await;
        assert_eq!(name, "live");
        held.push(ws);
    }
    let open_on_live = held.len();

    let (status, body) = admin_get(admin, "/admin/upstreams").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pool = &v["pools"][0];
    assert_eq!(pool["name"], "chat");
    assert_eq!(pool["retries"], 3);
    let by_url = |addr: SocketAddr| {
        pool["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["url"] == format!("ws://{addr}"))
            .unwrap()
            .clone()
    };
    let (d, l) = (by_url(dead), by_url(live.addr));
    assert_eq!(
        (
            &d["state"],
            &d["source"],
            &d["recent_failures"],
            &d["open_connections"]
        ),
        (&"down".into(), &"config".into(), &3.into(), &0.into())
    );
    assert_eq!(
        (
            &l["state"],
            &l["source"],
            &l["recent_failures"],
            &l["open_connections"]
        ),
        (
            &"up".into(),
            &"config".into(),
            &0.into(),
            &open_on_live.into()
        )
    );

    let (status, text) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        format!("framegate_upstream_endpoint_up{{pool=\"chat\",endpoint=\"ws://{dead}\"}} 0"),
        format!("framegate_upstream_endpoint_up{{pool=\"chat\",endpoint=\"ws://{}\"}} 1", live.addr),
        format!(
            "framegate_upstream_connections_open{{pool=\"chat\",endpoint=\"ws://{}\"}} {open_on_live}",
            live.addr
        ),
        format!(
            "framegate_upstream_failures_total{{pool=\"chat\",endpoint=\"ws://{dead}\",kind=\"connect\"}} 3"
        ),
        "framegate_upstream_retries_total{pool=\"chat\"} 3".to_owned(),
        // A pool from configuration alone has no discovery to fail.
        "framegate_upstream_discovery_failures_total{pool=\"chat\"} 0".to_owned(),
    ] {
        assert!(text.contains(&line), "missing {line} in\n{text}");
    }
    promtool_check(&text);
}

/// `promtool check metrics` on a scrape.
fn promtool_check(text: &str) {
    let out = promtool_check_metrics(text);
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_reload_keeps_endpoint_state_and_drains_a_removed_endpoint() {
    let (a, b, c) = (
        Named::start("a").await,
        Named::start("b").await,
        Named::start("c").await,
    );
    let dir = TempDir::new("pool-reload");
    let config = |endpoints: &[SocketAddr]| {
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n{}{}",
            pool("chat", endpoints, "balance = \"least_connections\""),
            pool_route("/chat", "chat", "")
        )
    };
    let path = dir.write("framegate.toml", &config(&[a.addr, b.addr]));
    let gw = framegate::Gateway::new(framegate::Config::load(&path).unwrap())
        .unwrap()
        .start()
        .await
        .unwrap();
    let (mut on_a, first) = open(gw.local_addr(), "/chat").await;
    let (on_b, second) = open(gw.local_addr(), "/chat").await;
    assert_eq!((first.as_str(), second.as_str()), ("a", "b"));
    // Reload: a stays (with its open connection counted), b goes, c comes.
    dir.write("framegate.toml", &config(&[a.addr, c.addr]));
    gw.reload().await.unwrap();
    let state = gw.pools().get("chat").unwrap();
    let find = |addr: SocketAddr| {
        state
            .endpoints()
            .into_iter()
            .find(|e| e.url == format!("ws://{addr}"))
    };
    assert_eq!(find(a.addr).unwrap().open(), 1);
    let b_state = find(b.addr).expect("b drains while its connection is open");
    assert!(b_state.is_draining());
    // least_connections: a has one, c none, so c; then a and c tie. b takes nothing.
    let (_on_c, third) = open(gw.local_addr(), "/chat").await;
    assert_eq!(third, "c");
    for _ in 0..4 {
        let (_ws, name) = open(gw.local_addr(), "/chat").await;
        assert_ne!(name, "b");
    }
    // The connection on the removed endpoint stays open and works.
    let mut on_b = on_b;
    on_b.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_text(&mut on_b).await, "still here");
    on_a.send(Message::text("and here")).await.unwrap();
    assert_eq!(next_text(&mut on_a).await, "and here");
}

/// An HTTP server for `GET /healthz`: 200 while `healthy`, else 503; each check is reported.
async fn health_server(
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<tokio::time::Instant>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let healthy = healthy.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 1024];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                assert!(head.starts_with(b"GET /healthz HTTP/1.1\r\n"));
                let _ = tx.send(tokio::time::Instant::now());
                let answer: &[u8] = if healthy.load(std::sync::atomic::Ordering::SeqCst) {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                } else {
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
                };
                let _ = stream.write_all(answer).await;
            });
        }
    });
    (addr, rx)
}

/// Waits until the pool's endpoint at `addr` is up (`true`) or down.
async fn endpoint_becomes(gw: &framegate::Running, addr: SocketAddr, up: bool) {
    let state = gw.pools().get("chat").unwrap();
    let endpoint = state
        .endpoints()
        .into_iter()
        .find(|e| e.url == format!("ws://{addr}"))
        .unwrap();
    within(
        &format!("{addr} to be {}", if up { "up" } else { "down" }),
        async {
            while endpoint.is_up() != up {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        },
    )
    .await;
}

#[tokio::test]
async fn active_http_checks_mark_an_endpoint_down_and_up_once_per_gateway() {
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (addr, mut checks) = health_server(healthy.clone()).await;
    let toml = pool(
        "chat",
        &[addr],
        "[upstream.health]\ninterval = \"100ms\"\npath = \"/healthz\"\nfails = 2\npasses = 2",
    ) + &pool_route("/chat", "chat", "");
    // Four workers, one checker: five checks take at least four intervals.
    let gw = gateway_with_server("workers = 4", &toml).await;
    let first = within("a check", checks.recv()).await.unwrap();
    let mut last = first;
    for _ in 0..4 {
        last = within("a check", checks.recv()).await.unwrap();
    }
    assert!(
        last - first >= std::time::Duration::from_millis(390),
        "5 checks in {:?}: more than one checker",
        last - first
    );
    healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    endpoint_becomes(&gw, addr, false).await;
    // Down: no endpoint is tried, 503 at once.
    let (status, _, _) = raw_http(gw.local_addr(), &upgrade_request("/chat", "")).await;
    assert_eq!(status, 503);
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    endpoint_becomes(&gw, addr, true).await;
}

#[tokio::test]
async fn active_websocket_checks_find_a_killed_endpoint_without_client_traffic() {
    let (a, b) = (Named::start("a").await, Named::start("b").await);
    let b_addr = b.addr;
    let toml = pool(
        "chat",
        &[a.addr, b.addr],
        "[upstream.health]\ninterval = \"100ms\"\nfails = 1\npasses = 1",
    ) + &pool_route("/chat", "chat", "");
    let gw = gateway(&toml).await;
    b.stop();
    endpoint_becomes(&gw, b_addr, false).await;
    for _ in 0..4 {
        let (_ws, name) = open(gw.local_addr(), "/chat").await;
        assert_eq!(name, "a");
    }
    let listener = loop {
        match TcpListener::bind(b_addr).await {
            Ok(l) => break l,
            Err(_) => tokio::task::yield_now().await,
        }
    };
    let _b = Named::on("b", listener);
    endpoint_becomes(&gw, b_addr, true).await;
}

#[tokio::test]
async fn frame_policies_see_the_chosen_endpoint_in_ctx_upstream_read_only() {
    let (a, b) = (Named::start("a").await, Named::start("b").await);
    let policy = script(
        "which",
        r#"return function(msg, ctx, conn)
             local wrote = pcall(function() ctx.upstream = "elsewhere" end)
             conn:reply(ctx.upstream .. " " .. tostring(wrote))
             return false
           end"#,
    );
    let toml = pool("chat", &[a.addr, b.addr], "")
        + &format!(
            "[[route]]\npath = \"/chat\"\nupstream = \"chat\"\n[route.policies]\non_client_frame = {policy}\n"
        );
    let gw = gateway(&toml).await;
    for _ in 0..2 {
        let (mut ws, name) = open(gw.local_addr(), "/chat").await;
        let addr = if name == "a" { a.addr } else { b.addr };
        ws.send(Message::text("which?")).await.unwrap();
        assert_eq!(next_text(&mut ws).await, format!("ws://{addr} false"));
    }
    gw.shutdown().await;
}
