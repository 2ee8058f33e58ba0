//! A fleet of gateways sharing `gw.shared` and `gw.limit` through a real `redis-server`
//! (`[shared] backend = "redis"`): three in-process gateways (and the binary, where one must
//! die by SIGKILL), real clients, a real echo upstream.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::redis::Redis;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// `on_upgrade`: at most 3 connections per `?user=` across the fleet, with a leased count.
const LIMIT_UPGRADE: &str = r#"
return function(req, ctx)
  local user = req.query.user or "anon"
  local n, err = gw.shared:incr("conns:" .. user, 1, nil, { lease = true })
  if not n then
    if gw.shared.on_unavailable == "deny" then
      return req:reject(503, "fleet store unavailable: " .. err)
    end
    return
  end
  if n > 3 then
    gw.shared:incr("conns:" .. user, -1, nil, { lease = true })
    return req:reject(429, "too many connections for " .. user)
  end
  ctx.user = user
end
"#;

/// `on_close`: gives the connection's count back.
const LIMIT_CLOSE: &str = r#"
return function(ctx, conn, info)
  if ctx.user then gw.shared:incr("conns:" .. ctx.user, -1, nil, { lease = true }) end
end
"#;

/// A `[shared]` table for `redis`. Its `timeout` is 2 s unless `extra` sets one: the tests
/// that count exactly must not see a command of a loaded CI machine miss the default 50 ms
/// (that marks Redis down, and limits then follow `on_unavailable`).
fn shared_table(redis: &Redis, instance: &str, extra: &str) -> String {
    let timeout = if extra.contains("timeout") {
        ""
    } else {
        "timeout = \"2s\"\n"
    };
    format!(
        "[shared]\nbackend = \"redis\"\nurl = \"{}\"\ninstance = \"{instance}\"\n{timeout}{extra}\n",
        redis.url()
    )
}

fn limited_route(upstream: SocketAddr) -> String {
    route(
        "/chat",
        upstream,
        "",
        &[
            ("on_upgrade", &script("limit-upgrade.lua", LIMIT_UPGRADE)),
            ("on_close", &script("limit-close.lua", LIMIT_CLOSE)),
        ],
    )
}

/// The status of an upgrade attempt: 101, or the refusal's.
async fn attempt(addr: SocketAddr, path: &str) -> (u16, Option<Client>) {
    match connect_with(addr, path, &[]).await {
        Ok((ws, _)) => (101, Some(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            (response.status().as_u16(), None)
        }
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

/// Retries `attempt` until it gets `want` (the fleet's count changes behind a close).
async fn until_status(addr: SocketAddr, path: &str, want: u16) -> Option<Client> {
    within(&format!("an upgrade answered {want}"), async {
        loop {
            let (status, ws) = attempt(addr, path).await;
            if status == want {
                return ws;
            }
            drop(ws);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

async fn echo_once(ws: &mut Client, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(next_text(ws).await, text);
}

#[tokio::test]
async fn a_connection_limit_per_user_holds_across_three_instances() {
    let redis = Redis::start().await;
    let upstream = echo().await;
    let mut gateways = Vec::new();
    for name in ["gw-1", "gw-2", "gw-3"] {
        let toml = format!(
            "{}{}",
            shared_table(&redis, name, ""),
            limited_route(upstream.addr)
        );
        gateways.push(gateway(&toml).await);
    }
    let addrs: Vec<SocketAddr> = gateways.iter().map(|g| g.local_addrs()[0]).collect();
    // One connection of ann on each instance: three in all.
    let mut open = Vec::new();
    for addr in &addrs {
        let (status, ws) = attempt(*addr, "/chat?user=ann").await;
        assert_eq!(status, 101);
        open.push(ws.unwrap());
    }
    // A fourth, on any instance, is refused; another user is not.
    for addr in &addrs {
        assert_eq!(attempt(*addr, "/chat?user=ann").await.0, 429);
    }
    let (status, bob) = attempt(addrs[0], "/chat?user=bob").await;
    assert_eq!(status, 101);
    // The connections relay.
    for ws in &mut open {
        echo_once(ws, "hello").await;
    }
    assert_eq!(
        redis.command(&["HLEN", "fg:s:conns:ann"]).await.as_deref(),
        Some(":3"),
        "one share per instance"
    );
    // Closing one (on gw-2) gives its count back: ann may connect again, on gw-3.
    let mut closed = open.remove(1);
    closed.close(None).await.unwrap();
    while closed.next().await.is_some() {}
    let again = until_status(addrs[2], "/chat?user=ann", 101).await;
    assert!(again.is_some());
    assert_eq!(attempt(addrs[0], "/chat?user=ann").await.0, 429);
    drop((bob, again, open));
    for g in gateways {
        g.shutdown().await;
    }
}

/// A framegate process started from a config file, killed (SIGKILL, by PID) when dropped.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn counts_of_an_instance_killed_without_on_close_come_back_within_its_lease() {
    let redis = Redis::start().await;
    let upstream = echo().await;
    let dir = TempDir::new("fleet-kill");
    let port = free_port();
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n{}{}",
        shared_table(&redis, "victim", "lease = \"2s\""),
        limited_route(upstream.addr)
    );
    let config = dir.write("config.toml", &toml);
    let mut victim = Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_framegate"))
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("framegate starts"),
    );
    let victim_addr = SocketAddr::from(([127, 0, 0, 1], port));
    within("the process to listen", async {
        while tokio::net::TcpStream::connect(victim_addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The process is up once it answers an upgrade.
    let first = until_status(victim_addr, "/chat?user=cy", 101).await;
    let (status, second) = attempt(victim_addr, "/chat?user=cy").await;
    assert_eq!(status, 101);
    // A survivor in this process holds the third.
    let survivor = gateway(&format!(
        "{}{}",
        shared_table(&redis, "survivor", "lease = \"2s\""),
        limited_route(upstream.addr)
    ))
    .await;
    let addr = survivor.local_addrs()[0];
    let (status, third) = attempt(addr, "/chat?user=cy").await;
    assert_eq!(status, 101);
    let (status, _) = attempt(addr, "/chat?user=cy").await;
    assert_eq!(
        status,
        429,
        "shares {:?}, leases {:?}",
        redis.command(&["HGETALL", "fg:s:conns:cy"]).await,
        redis.command(&["KEYS", "fg:live:*"]).await
    );
    // SIGKILL: no on_close runs, nothing is given back by the victim.
    victim.0.kill().unwrap();
    victim.0.wait().unwrap();
    drop((first, second));
    // Its lease (2 s) runs out and its two connections stop counting.
    let started = std::time::Instant::now();
    let back = until_status(addr, "/chat?user=cy", 101).await;
    println!(
        "the killed instance's counts went after {:?}",
        started.elapsed()
    );
    let (status, _fifth) = attempt(addr, "/chat?user=cy").await;
    assert_eq!(status, 101, "two places came back");
    assert_eq!(attempt(addr, "/chat?user=cy").await.0, 429);
    drop((back, third));
    survivor.shutdown().await;
}

/// `on_client_frame`: counts every message in the fleet (a write sent behind) and answers
/// what it reads of the count (the frame cache).
const COUNT_FRAME: &str = r#"
return function(msg, ctx, conn)
  if msg.text == "read" then
    conn:reply("count=" .. tostring(gw.shared:get("messages")))
    return false
  end
  gw.shared:incr("messages", 1)
end
"#;

#[tokio::test]
async fn redis_stopped_and_restarted_under_traffic_loses_no_relayed_message() {
    let mut redis = Redis::start().await;
    let upstream = echo().await;
    let mut gateways = Vec::new();
    for (name, on_unavailable) in [("allowing", "allow"), ("denying", "deny")] {
        let toml = format!(
            "{}{}{}",
            shared_table(
                &redis,
                name,
                &format!("on_unavailable = \"{on_unavailable}\"\ntimeout = \"500ms\"")
            ),
            limited_route(upstream.addr),
            route(
                "/count",
                upstream.addr,
                "",
                &[("on_client_frame", &script("count.lua", COUNT_FRAME))]
            ),
        );
        gateways.push(gateway(&toml).await);
    }
    let allowing = gateways[0].local_addrs()[0];
    let denying = gateways[1].local_addrs()[0];
    let (status, ws) = attempt(allowing, "/chat?user=dee").await;
    assert_eq!(status, 101);
    let mut chat = ws.unwrap();
    let mut counting = connect(allowing, "/count").await;
    let mut sent = 0;
    for _ in 0..20 {
        echo_once(&mut counting, "m").await;
        sent += 1;
    }
    // The writes behind reach Redis, and the frame cache reads them back.
    within("the count to reach Redis", async {
        while redis.command(&["GET", "fg:s:messages"]).await.as_deref() != Some("20") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    within("the frame cache to show the count", async {
        loop {
            counting.send(Message::text("read")).await.unwrap();
            if next_text(&mut counting).await == "count=20" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    // Redis goes away: relayed traffic goes on, upgrades follow on_unavailable.
    redis.stop();
    for i in 0..50 {
        echo_once(&mut chat, &format!("during {i}")).await;
        echo_once(&mut counting, "m").await;
        sent += 1;
    }
    let started = std::time::Instant::now();
    let (status, during) = attempt(allowing, "/chat?user=dee").await;
    assert_eq!(
        status, 101,
        "on_unavailable = allow lets the upgrade through"
    );
    let (status, _) = attempt(denying, "/chat?user=dee").await;
    assert_eq!(status, 503, "on_unavailable = deny refuses it");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no upgrade hangs while Redis is down: {:?}",
        started.elapsed()
    );
    let metrics = gateways[0].metrics().encode();
    drop(metrics);

    // Redis comes back (empty): the gateways reconnect by themselves and use it again.
    redis.restart().await;
    within("the gateways to use Redis again", async {
        loop {
            let (status, ws) = attempt(denying, "/chat?user=eve").await;
            if status == 101 {
                return ws;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(
        redis.command(&["HLEN", "fg:s:conns:eve"]).await.as_deref(),
        Some(":1")
    );
    for i in 0..20 {
        echo_once(&mut chat, &format!("after {i}")).await;
    }
    assert!(sent >= 70);
    drop((chat, counting, during));
    for g in gateways {
        g.shutdown().await;
    }
}

#[tokio::test]
async fn a_paused_redis_costs_an_upgrade_at_most_the_timeout() {
    let redis = Redis::start().await;
    let upstream = echo().await;
    let gw = gateway(&format!(
        "{}{}",
        shared_table(&redis, "patient", "timeout = \"100ms\""),
        limited_route(upstream.addr)
    ))
    .await;
    let addr = gw.local_addrs()[0];
    assert_eq!(attempt(addr, "/chat?user=fay").await.0, 101);
    // SIGSTOP: the connection stays open and nothing answers.
    redis.pause(true);
    let started = std::time::Instant::now();
    let (status, _ws) = attempt(addr, "/chat?user=fay").await;
    let waited = started.elapsed();
    redis.pause(false);
    assert_eq!(status, 101, "on_unavailable = allow");
    assert!(
        waited < Duration::from_secs(1),
        "the upgrade waited {waited:?} for a paused Redis (timeout 100ms)"
    );
    gw.shutdown().await;
}

/// `on_client_frame`: a fleet-wide limit of 20 messages a second (burst 20); a refused
/// message is answered "refused", an admitted one goes to the echo.
const RATE_FRAME: &str = r#"
return function(msg, ctx, conn)
  if not gw.limit("room:messages", 20, 20) then
    conn:reply("refused")
    return false
  end
end
"#;

#[tokio::test]
async fn a_fleet_rate_limit_holds_within_its_documented_overshoot() {
    let redis = Redis::start().await;
    let upstream = echo().await;
    let mut clients = Vec::new();
    let mut gateways = Vec::new();
    for name in ["r-1", "r-2", "r-3"] {
        let toml = format!(
            "{}{}",
            shared_table(&redis, name, ""),
            route(
                "/limited",
                upstream.addr,
                "",
                &[("on_client_frame", &script("rate.lua", RATE_FRAME))]
            ),
        );
        let gw = gateway(&toml).await;
        clients.push(connect(gw.local_addrs()[0], "/limited").await);
        gateways.push(gw);
    }
    // Each client offers 100 messages a second for 1.5 s: 450 in all, 15 times the rate.
    let started = std::time::Instant::now();
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    for i in 0..150 {
        pace.tick().await;
        for client in &mut clients {
            client.send(Message::text(format!("{i}"))).await.unwrap();
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Every message gets one answer: its echo, or "refused".
    let mut admitted = 0;
    for client in &mut clients {
        for _ in 0..150 {
            if next_text(client).await != "refused" {
                admitted += 1;
            }
        }
    }
    // docs/policies.md: burst + rate × (T + 0.25 s) + instances × batch (batch = 1 at 20/s);
    // T runs from the first message to the last marker.
    let bound = 20.0 + 20.0 * (elapsed + 0.25) + 3.0;
    println!("admitted {admitted} of 450 in {elapsed:.3}s (bound {bound:.0})");
    assert!(
        f64::from(admitted) <= bound,
        "admitted {admitted}, bound {bound}"
    );
    let floor = 20.0 * elapsed * 0.8;
    assert!(
        f64::from(admitted) >= floor,
        "the fleet admits about its rate: {admitted}, at least {floor:.0}"
    );
    drop(clients);
    for g in gateways {
        g.shutdown().await;
    }
}

#[tokio::test]
async fn the_local_backend_is_unchanged_and_has_gw_limit() {
    let upstream = echo().await;
    let probe = r#"
return function(msg, ctx, conn)
  local admitted = 0
  for i = 1, 10 do if gw.limit("k", 1, 3) then admitted = admitted + 1 end end
  conn:reply(tostring(gw.shared.on_unavailable) .. " " .. admitted .. " " .. gw.shared:incr("n", 2))
  return false
end
"#;
    let gw = gateway(&route(
        "/p",
        upstream.addr,
        "",
        &[("on_client_frame", &script("local.lua", probe))],
    ))
    .await;
    let mut ws = connect(gw.local_addrs()[0], "/p").await;
    ws.send(Message::text("go")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "nil 3 2");
    gw.shutdown().await;
}

#[tokio::test]
async fn concurrent_upgrades_that_wait_for_redis_count_exactly() {
    let redis = Redis::start().await;
    let upstream = echo().await;
    let gw = gateway_with_server(
        "workers = 1",
        &format!(
            "{}{}",
            shared_table(&redis, "busy", ""),
            limited_route(upstream.addr)
        ),
    )
    .await;
    let addr = gw.local_addrs()[0];
    // Twenty upgrades of one user at once on one worker: each waits for Redis in its turn.
    let attempts: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { attempt(addr, "/chat?user=gil").await }))
        .collect();
    let mut statuses = Vec::new();
    let mut open = Vec::new();
    for a in attempts {
        let (status, ws) = a.await.unwrap();
        statuses.push(status);
        open.extend(ws);
    }
    statuses.sort();
    assert_eq!(
        statuses.iter().filter(|s| **s == 101).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        17,
        "{statuses:?}"
    );
    for ws in &mut open {
        echo_once(ws, "still here").await;
    }
    drop(open);
    gw.shutdown().await;
}

#[tokio::test]
async fn metrics_show_the_backend_going_down_and_up() {
    let mut redis = Redis::start().await;
    let upstream = echo().await;
    let gw = gateway(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}",
        shared_table(&redis, "watched", ""),
        limited_route(upstream.addr)
    ))
    .await;
    let admin = gw.admin_addr().unwrap();
    let metrics = || async move {
        let (status, _, body) = raw_http(admin, "GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(status, 200);
        body
    };
    let text = metrics().await;
    assert!(text.contains("framegate_shared_backend_up 1"), "{text}");
    let checked = promtool_check_metrics(&text);
    assert!(checked.status.success(), "{checked:?}");
    redis.stop();
    // The next use fails, marks it down, and counts the operation.
    let (status, _ws) = attempt(gw.local_addrs()[0], "/chat?user=hal").await;
    assert_eq!(status, 101, "allowed while down");
    let text = metrics().await;
    assert!(text.contains("framegate_shared_backend_up 0"), "{text}");
    assert!(
        text.lines().any(
            |l| l.starts_with("framegate_shared_errors_total{op=\"incr\"}") && !l.ends_with(" 0")
        ),
        "{text}"
    );
    redis.restart().await;
    within("the probe to bring it back", async {
        while !metrics().await.contains("framegate_shared_backend_up 1") {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    gw.shutdown().await;
}

#[test]
fn shared_config_errors_point_at_the_value() {
    let cases = [
        (
            "[shared]\nbackend = \"redis\"\n",
            "2:11",
            "needs shared.url",
        ),
        (
            "[shared]\nbackend = \"memcached\"\n",
            "2:11",
            "is not one of local, redis",
        ),
        (
            "[shared]\nbackend = \"redis\"\nurl = \"redis://x\"\non_unavailable = \"maybe\"\n",
            "4:18",
            "is not one of allow, deny",
        ),
        (
            "[shared]\nurl = \"redis://x\"\n",
            "2:7",
            "needs backend = \"redis\"",
        ),
        (
            "[shared]\nbackend = \"redis\"\nurl = \"http://x\"\n",
            "3:7",
            "is not a redis://, rediss:// or redis+sentinel:// URL",
        ),
        (
            "[shared]\nbackend = \"redis\"\nurl = \"redis://x\"\ntimeout = \"0s\"\n",
            "4:11",
            "must be more than 0",
        ),
    ];
    for (toml, at, message) in cases {
        let e = framegate::Config::from_toml(toml, std::path::Path::new("f.toml")).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with(&format!("f.toml:{at}: ")), "{text}");
        assert!(text.contains(message), "{text}");
    }
    let ok = framegate::Config::from_toml(
        "[shared]\nbackend = \"redis\"\nurl = \"redis://:pw@127.0.0.1:6379/0\"\n",
        std::path::Path::new("f.toml"),
    )
    .unwrap();
    let redis = ok.shared.redis.unwrap();
    assert_eq!(redis.key_prefix, "fg:");
    assert!(!format!("{redis:?}").contains("pw"));
}

/// `on_upgrade`: waits for Redis twice, then reads `req` and tells the upstream what it read.
const INTERLEAVED: &str = r#"
return function(req, ctx)
  local before = req.query.user .. "/" .. req.headers["x-id"]
  gw.shared:incr("interleaved", 1)
  gw.shared:get("interleaved")
  local after = req.query.user .. "/" .. req.headers["x-id"] .. "/" .. req.path
  req:set_header("x-seen", before .. "|" .. after)
  ctx.user = req.query.user
end
"#;

#[tokio::test]
async fn upgrades_that_wait_at_once_each_keep_their_own_req() {
    let redis = Redis::start().await;
    let mut up = echo().await;
    let gw = gateway_with_server(
        "workers = 1",
        &format!(
            "{}{}",
            shared_table(&redis, "interleaving", ""),
            route(
                "/room/{name}",
                up.addr,
                "",
                &[("on_upgrade", &script("interleaved.lua", INTERLEAVED))]
            )
        ),
    )
    .await;
    let addr = gw.local_addrs()[0];
    let attempts: Vec<_> = (0..16)
        .map(|i| {
            tokio::spawn(async move {
                let id = i.to_string();
                let path = format!("/room/r{i}?user=u{i}");
                connect_with(addr, &path, &[("x-id", &id)]).await.unwrap().0
            })
        })
        .collect();
    let mut open = Vec::new();
    for a in attempts {
        open.push(a.await.unwrap());
    }
    for _ in 0..16 {
        let seen = within("the upstream's request", up.requests.recv())
            .await
            .unwrap();
        let user = seen.uri.split("user=").nth(1).unwrap().to_owned();
        let i = user.trim_start_matches('u');
        let header = seen.headers["x-seen"].to_str().unwrap();
        assert_eq!(header, format!("u{i}/{i}|u{i}/{i}//room/r{i}"), "{seen:?}");
    }
    assert_eq!(
        redis.command(&["GET", "fg:s:interleaved"]).await.as_deref(),
        Some("16")
    );
    drop(open);
    gw.shutdown().await;
}

/// `on_upgrade`: gw.shared waits from a metamethod and under pcall (Lua 5.4 yields across
/// them), but not from a C function's callback (a table.sort comparator): that call fails
/// alone, and the policy's next call waits as usual.
const THROUGH_A_METAMETHOD: &str = r#"
return function(req, ctx)
  gw.shared:set("x", "from redis")
  local lookup = setmetatable({}, { __index = function(t, k) return gw.shared:get(k) end })
  local ok, via_meta = pcall(function() return lookup.x end)
  local sorted, err = pcall(table.sort, { "b", "a" }, function(a, b)
    return gw.shared:get(a) == nil and a < b
  end)
  local n = gw.shared:incr("after-sort", 1)
  req:set_header("x-seen", tostring(ok) .. "|" .. tostring(via_meta) .. "|" .. tostring(sorted)
    .. "|" .. tostring(err):match("attempt to yield across a C%-call boundary") .. "|" .. n)
end
"#;

#[tokio::test]
async fn a_gw_shared_call_that_cannot_wait_fails_alone() {
    let redis = Redis::start().await;
    let mut up = echo().await;
    let gw = gateway(&format!(
        "{}{}",
        shared_table(&redis, "meta", ""),
        route(
            "/m",
            up.addr,
            "",
            &[("on_upgrade", &script("meta.lua", THROUGH_A_METAMETHOD))]
        )
    ))
    .await;
    let (status, ws) = attempt(gw.local_addrs()[0], "/m").await;
    assert_eq!(status, 101);
    let seen = within("the upstream's request", up.requests.recv())
        .await
        .unwrap();
    let header = seen.headers["x-seen"].to_str().unwrap();
    assert_eq!(
        header,
        "true|from redis|false|attempt to yield across a C-call boundary|1"
    );
    drop(ws);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_sentinel_failover_moves_the_fleet_to_the_new_primary() {
    let mut primary = Redis::start().await;
    let replica = Redis::replica_of(&primary).await;
    let sentinel = Redis::sentinel(&primary, "fleetmaster").await;
    // The replica has synced, and the Sentinel knows it.
    primary.command(&["SET", "synced", "1"]).await;
    within("the replica to sync", async {
        while replica.command(&["GET", "synced"]).await.as_deref() != Some("1") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    within("the Sentinel to know the replica", async {
        loop {
            let replicas = sentinel
                .command(&["SENTINEL", "REPLICAS", "fleetmaster"])
                .await;
            if replicas.is_some_and(|r| r.contains(&replica.addr.port().to_string())) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let upstream = echo().await;
    let url = format!("redis+sentinel://{}/fleetmaster/0", sentinel.addr);
    let gw = gateway(&format!(
        "[shared]\nbackend = \"redis\"\nurl = \"{url}\"\ninstance = \"sentinel-client\"\ntimeout = \"500ms\"\n{}",
        limited_route(upstream.addr)
    ))
    .await;
    let addr = gw.local_addrs()[0];
    let (status, first) = attempt(addr, "/chat?user=ivy").await;
    assert_eq!(status, 101);
    assert_eq!(
        primary
            .command(&["HVALS", "fg:s:conns:ivy"])
            .await
            .as_deref(),
        Some("1")
    );
    // The primary dies; the Sentinel promotes the replica; the gateway follows.
    primary.stop();
    let mut open: Vec<Client> = first.into_iter().collect();
    within("writes to reach the promoted replica", async {
        loop {
            let (status, ws) = attempt(addr, "/chat?user=ivy").await;
            assert_eq!(status, 101, "allowed throughout (on_unavailable = allow)");
            open.extend(ws);
            let vals = replica.command(&["HVALS", "fg:s:conns:ivy"]).await;
            if vals.as_deref().is_some_and(|v| v != "1" && !v.is_empty()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let text = gw.metrics().encode();
    drop(text);
    drop(open);
    gw.shutdown().await;
}

/// `on_upgrade`: tells the upstream what one `incr` answered.
const REPORT_INCR: &str = r#"
return function(req, ctx)
  local n, err = gw.shared:incr("tls", 1)
  req:set_header("x-n", tostring(n) .. " " .. tostring(err))
end
"#;

#[tokio::test]
async fn rediss_checks_the_servers_certificate_against_ca_file() {
    let ca = support::certs::Ca::new();
    let dir = TempDir::new("rediss");
    ca.leaf(&["localhost"]).write(&dir, "redis");
    dir.write("ca.pem", &ca.pem);
    let redis = Redis::start_tls(&dir.0.join("redis.pem"), &dir.0.join("redis.key")).await;
    let mut up = echo().await;
    let url = format!("rediss://localhost:{}/0", redis.addr.port());
    let route = route(
        "/tls",
        up.addr,
        "",
        &[("on_upgrade", &script("report.lua", REPORT_INCR))],
    );
    // With the CA: the incr goes through TLS.
    let trusting = start_from(
        &dir,
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[shared]\nbackend = \"redis\"\nurl = \"{url}\"\nca_file = \"ca.pem\"\ntimeout = \"2s\"\n{route}"
        ),
    )
    .await;
    let (status, ws) = attempt(trusting.local_addrs()[0], "/tls").await;
    assert_eq!(status, 101);
    let seen = within("the upstream's request", up.requests.recv())
        .await
        .unwrap();
    assert_eq!(seen.headers["x-n"], "1 nil");
    drop(ws);
    trusting.shutdown().await;
    // Without it, the certificate is not trusted: Redis is unavailable, and the policy says so.
    let doubting = gateway(&format!(
        "[shared]\nbackend = \"redis\"\nurl = \"{url}\"\n{route}"
    ))
    .await;
    let (status, ws) = attempt(doubting.local_addrs()[0], "/tls").await;
    assert_eq!(status, 101);
    let seen = within("the upstream's request", up.requests.recv())
        .await
        .unwrap();
    assert_eq!(seen.headers["x-n"], "nil shared backend unavailable");
    drop(ws);
    doubting.shutdown().await;
}
