//! Issue 17, "Registry across the fleet": `scope=fleet` on `GET /admin/connections`,
//! `DELETE /admin/connections` and `POST /admin/broadcast`, over a real `redis-server` and
//! three in-process gateways (each with its own admin listener), real clients and a real echo
//! upstream; and the binary killed by SIGKILL, whose entries vanish with its lease.

mod support;

use support::admin_http::{call, Reply};

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use support::redis::Redis;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// `on_upgrade`: tags the connection with `?user=` and `?room=`.
const TAG: &str = r#"return function(req, ctx)
  req:tag("user", req.query.user or "nobody")
  if req.query.room then req:tag("room", req.query.room) end
end"#;

const INSTANCES: [&str; 3] = ["gw-1", "gw-2", "gw-3"];

fn config(redis: &Redis, instance: &str, upstream: SocketAddr) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [shared]\nbackend = \"redis\"\nurl = \"{}\"\ninstance = \"{instance}\"\nlease = \"1s\"\n\n{}",
        redis.url(),
        route("/chat", upstream, "", &[("on_upgrade", &script("tag.lua", TAG))])
    )
}

/// The tests that start a fleet run one at a time: together they would be two dozen gateways
/// and their Redis servers on the machine's cores, and a fleet command waits at most 1 s for
/// each instance's answer (an answer starved past it would make the instance `missing`).
static ONE_FLEET_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Three gateways named gw-1..gw-3 on one Redis.
async fn fleet(redis: &Redis, upstream: SocketAddr) -> Vec<framegate::Running> {
    let mut gateways = Vec::new();
    for name in INSTANCES {
        gateways.push(gateway(&config(redis, name, upstream)).await);
    }
    gateways
}

fn admin(gw: &framegate::Running) -> SocketAddr {
    gw.admin_addr().expect("an admin listener")
}

async fn get(gw: &framegate::Running, uri: &str) -> Reply {
    call(admin(gw), "GET", uri, None, Bytes::new()).await
}

/// A client on `gw` whose first message went through (so it is registered).
async fn client(gw: &framegate::Running, query: &str) -> Client {
    let mut ws = connect(gw.local_addrs()[0], &format!("/chat?{query}")).await;
    ws.send(Message::text(PAYLOAD)).await.unwrap();
    assert_eq!(next_text(&mut ws).await, PAYLOAD);
    ws
}

/// What the clients send: it must never reach Redis.
const PAYLOAD: &str = "payload-that-stays-here";

/// Polls `uri` on `gw` (bounded) until `done` holds for its JSON answer; returns it.
async fn until(
    gw: &framegate::Running,
    uri: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    within(what, async {
        loop {
            let r = get(gw, uri).await;
            if r.status == 200 && done(&r.json()) {
                return r.json();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Waits until every instance in `names` publishes and answers commands, as seen from `gw`:
/// a kick that matches nothing comes back from all of them.
async fn all_listening(gw: &framegate::Running, names: &[&str]) {
    within("every instance answers fleet commands", async {
        loop {
            let r = call(
                admin(gw),
                "DELETE",
                "/admin/connections?tag=user:nobody-at-all&scope=fleet",
                None,
                Bytes::new(),
            )
            .await;
            if r.status == 200 {
                let v = r.json();
                let answered: Vec<&str> = v["instances"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(String::as_str)
                    .collect();
                if answered == names && v["missing"].as_array().unwrap().is_empty() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

fn instances_of(listing: &Value) -> Vec<(String, String)> {
    listing["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["instance"].as_str().unwrap().to_owned(),
                c["tags"]["user"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_fleet_listing_by_tag_names_each_connections_instance() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let redis = Redis::start().await;
    let upstream = echo().await;
    let gws = fleet(&redis, upstream.addr).await;
    let mut gws = gws;
    let _ann1 = client(&gws[0], "user=ann").await;
    let _bob = client(&gws[1], "user=bob").await;
    let ann3 = client(&gws[2], "user=ann").await;

    // Asked on gw-2, which holds none of ann's connections.
    let listing = until(
        &gws[1],
        "/admin/connections?tag=user:ann&scope=fleet",
        "ann's two connections in the fleet listing",
        |v| v["matched"] == 2,
    )
    .await;
    assert_eq!(
        instances_of(&listing),
        [("gw-1".into(), "ann".into()), ("gw-3".into(), "ann".into())]
    );
    let first = &listing["connections"][0];
    for field in [
        "id",
        "route",
        "client",
        "opened_at",
        "snapshot",
        "messages",
        "bytes",
    ] {
        assert!(!first[field].is_null(), "{field} in {first}");
    }
    assert_eq!(first["route"], "/chat");
    assert!(first.get("upstream").is_none(), "no upstream URL in Redis");
    let everyone = until(
        &gws[0],
        "/admin/connections?scope=fleet",
        "all three connections and instances",
        |v| v["matched"] == 3 && v["instances"].as_array().unwrap().len() == 3,
    )
    .await;
    assert_eq!(everyone["instances"], serde_json::json!(INSTANCES));
    assert_eq!(everyone["truncated"], serde_json::json!([]));
    // What Redis holds: one key per instance, leased, with summaries and tags, no payload.
    assert_eq!(
        redis.command(&["SCARD", "fg:reg"]).await.as_deref(),
        Some(":3")
    );
    let member = redis.command(&["SRANDMEMBER", "fg:reg"]).await.unwrap();
    let key = format!("fg:reg:{member}");
    let value = redis.command(&["GET", &key]).await.unwrap();
    assert!(value.contains("\"tags\":{\"user\":"), "{value}");
    assert!(!value.contains(PAYLOAD), "{value}");
    let ttl = redis.command(&["PTTL", &key]).await.unwrap();
    let ttl: i64 = ttl.trim_start_matches(':').parse().unwrap();
    assert!((1..=1000).contains(&ttl), "PTTL {ttl}");
    // The same filters as the local listing: route, client_ip, limit.
    let limited = get(
        &gws[0],
        "/admin/connections?scope=fleet&limit=1&route=/chat",
    )
    .await;
    assert_eq!(limited.status, 200);
    assert_eq!(limited.json()["matched"], 3);
    assert_eq!(limited.json()["connections"].as_array().unwrap().len(), 1);
    let elsewhere = get(&gws[0], "/admin/connections?scope=fleet&client_ip=10.9.9.9").await;
    assert_eq!(elsewhere.json()["matched"], 0);

    // Local scope, explicit or by default, is as before: this instance only, no `instance`.
    for uri in [
        "/admin/connections?tag=user:ann",
        "/admin/connections?tag=user:ann&scope=local",
    ] {
        let local = get(&gws[1], uri).await;
        assert_eq!(local.status, 200);
        assert_eq!(local.json()["matched"], 0, "{uri}");
    }
    let local = get(&gws[0], "/admin/connections?tag=user:ann").await.json();
    assert_eq!(local["matched"], 1);
    assert!(local["connections"][0].get("instance").is_none());
    assert!(local.get("instances").is_none());

    // A shut-down instance takes itself out at once.
    drop(ann3);
    let gw3 = gws.pop().unwrap();
    gw3.shutdown().await;
    assert_eq!(
        redis.command(&["SCARD", "fg:reg"]).await.as_deref(),
        Some(":2")
    );
    let listing = get(&gws[0], "/admin/connections?scope=fleet").await.json();
    assert_eq!(listing["instances"], serde_json::json!(["gw-1", "gw-2"]));

    // Anything else than local or fleet is refused, naming both.
    let bad = get(&gws[0], "/admin/connections?scope=world").await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"]
            .as_str()
            .unwrap()
            .contains("local, fleet"),
        "{}",
        bad.json()
    );
    // Clients gone first: shutdown then has nothing to drain.
    drop((_ann1, _bob));
    for g in gws {
        g.shutdown().await;
    }
}

#[tokio::test]
async fn a_fleet_kick_by_tag_closes_anns_connections_on_every_instance() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let redis = Redis::start().await;
    let upstream = echo().await;
    let gws = fleet(&redis, upstream.addr).await;
    let mut anns = Vec::new();
    for gw in &gws {
        anns.push(client(gw, "user=ann").await);
    }
    let mut bob = client(&gws[1], "user=bob").await;
    all_listening(&gws[0], &INSTANCES).await;

    let r = call(
        admin(&gws[0]),
        "DELETE",
        "/admin/connections?tag=user:ann&scope=fleet&code=4000&reason=kicked",
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let v = r.json();
    for name in INSTANCES {
        assert_eq!(
            v["instances"][name],
            serde_json::json!({"matched": 1, "queued": 1, "skipped": 0}),
            "{v}"
        );
    }
    assert_eq!(
        v["total"],
        serde_json::json!({"matched": 3, "queued": 3, "skipped": 0})
    );
    assert_eq!(v["missing"], serde_json::json!([]));
    for ws in &mut anns {
        assert_eq!(expect_close(ws).await, close_frame(4000, "kicked"));
    }
    // Bob was not kicked and still relays.
    bob.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_text(&mut bob).await, "still here");

    // Without a code, the fleet kick closes as the local one does: 1008 "closed by admin".
    let mut again = client(&gws[2], "user=carl").await;
    let r = call(
        admin(&gws[1]),
        "DELETE",
        "/admin/connections?tag=user:carl&scope=fleet",
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(r.json()["total"]["queued"], 1, "{}", r.json());
    assert_eq!(
        expect_close(&mut again).await,
        close_frame(1008, "closed by admin")
    );
    // A fleet kick needs a filter too, and checks its code as the local one does.
    for uri in [
        "/admin/connections?scope=fleet",
        "/admin/connections?tag=user:ann&scope=fleet&code=1005",
    ] {
        let r = call(admin(&gws[0]), "DELETE", uri, None, Bytes::new()).await;
        assert_eq!(r.status, 400, "{uri}");
    }
    drop((anns, bob, again));
    for g in gws {
        g.shutdown().await;
    }
}

#[tokio::test]
async fn a_fleet_broadcast_reaches_clients_on_every_instance() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let redis = Redis::start().await;
    let upstream = echo().await;
    let gws = fleet(&redis, upstream.addr).await;
    let mut room = Vec::new();
    for gw in &gws {
        room.push(client(gw, "user=u&room=lobby").await);
    }
    let mut outside = client(&gws[0], "user=v&room=kitchen").await;
    all_listening(&gws[2], &INSTANCES).await;

    let r = call(
        admin(&gws[2]),
        "POST",
        "/admin/broadcast?tag=room:lobby&scope=fleet",
        None,
        "hello fleet",
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["total"]["queued"], 3, "{}", r.json());
    assert_eq!(r.json()["instances"]["gw-1"]["queued"], 1);
    for ws in &mut room {
        assert_eq!(next_text(ws).await, "hello fleet");
    }
    // Binary bodies travel too (as base64 in the command).
    let r = call(
        admin(&gws[0]),
        "POST",
        "/admin/broadcast?tag=room:lobby&scope=fleet",
        Some("application/octet-stream"),
        vec![0u8, 1, 2, 255],
    )
    .await;
    assert_eq!(r.json()["total"]["queued"], 3, "{}", r.json());
    for ws in &mut room {
        match within("a binary broadcast", ws.next()).await {
            Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], &[0, 1, 2, 255]),
            other => panic!("expected the binary broadcast, got {other:?}"),
        }
    }
    // The kitchen heard nothing: its next message is its own echo.
    outside.send(Message::text("mine")).await.unwrap();
    assert_eq!(next_text(&mut outside).await, "mine");
    drop((room, outside));
    for g in gws {
        g.shutdown().await;
    }
}

#[tokio::test]
async fn without_redis_fleet_scope_answers_503_and_local_scope_still_works() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let mut redis = Redis::start().await;
    let upstream = echo().await;
    let gws = fleet(&redis, upstream.addr).await;
    let mut anns = Vec::new();
    for gw in &gws {
        anns.push(client(gw, "user=ann").await);
    }
    all_listening(&gws[0], &INSTANCES).await;

    redis.stop();
    for (method, uri) in [
        ("GET", "/admin/connections?tag=user:ann&scope=fleet"),
        ("DELETE", "/admin/connections?tag=user:ann&scope=fleet"),
        ("POST", "/admin/broadcast?tag=user:ann&scope=fleet"),
    ] {
        let r = call(admin(&gws[0]), method, uri, None, "x").await;
        assert_eq!(r.status, 503, "{method} {uri}: {:?}", r.body);
        let error = r.json()["error"].as_str().unwrap().to_owned();
        assert!(
            error.contains("Redis") && error.contains("scope=local"),
            "{error}"
        );
    }
    // Local scope answers as before.
    let local = get(&gws[1], "/admin/connections?tag=user:ann").await;
    assert_eq!(local.status, 200);
    assert_eq!(local.json()["matched"], 1);
    let r = call(
        admin(&gws[1]),
        "POST",
        "/admin/broadcast?tag=user:ann",
        None,
        "local only",
    )
    .await;
    assert_eq!(r.json()["queued"], 1);
    assert_eq!(next_text(&mut anns[1]).await, "local only");

    // Redis comes back (empty): the instances publish and subscribe again.
    redis.restart().await;
    all_listening(&gws[0], &INSTANCES).await;
    until(
        &gws[0],
        "/admin/connections?tag=user:ann&scope=fleet",
        "ann's connections listed again",
        |v| v["matched"] == 3,
    )
    .await;
    let r = call(
        admin(&gws[2]),
        "POST",
        "/admin/broadcast?tag=user:ann&scope=fleet",
        None,
        "back",
    )
    .await;
    assert_eq!(r.json()["total"]["queued"], 3, "{}", r.json());
    for ws in &mut anns {
        assert_eq!(next_text(ws).await, "back");
    }
    drop(anns);
    for g in gws {
        g.shutdown().await;
    }
}

#[tokio::test]
async fn fleet_scope_needs_the_redis_backend() {
    let upstream = echo().await;
    let gw = gateway(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
        route("/chat", upstream.addr, "", &[])
    ))
    .await;
    for (method, uri) in [
        ("GET", "/admin/connections?scope=fleet"),
        ("DELETE", "/admin/connections?route=/chat&scope=fleet"),
        ("POST", "/admin/broadcast?scope=fleet"),
    ] {
        let r = call(admin(&gw), method, uri, None, "x").await;
        assert_eq!(r.status, 400, "{method} {uri}");
        assert_eq!(
            r.json()["error"],
            "scope=fleet needs [shared] backend = \"redis\"",
            "{method} {uri}"
        );
    }
    assert_eq!(get(&gw, "/admin/connections?scope=local").await.status, 200);
    gw.shutdown().await;
}

/// Picks a free loopback port (bound and released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The binary, killed by its PID when dropped (if the test has not killed it).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_killed_instances_entries_vanish_from_the_fleet_listing_within_its_lease() {
    let redis = Redis::start().await;
    let upstream = echo().await;
    let gw = gateway(&config(&redis, "gw-1", upstream.addr)).await;
    let dir = TempDir::new("fleet-registry");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    dir.write("tag.lua", TAG);
    let toml = format!(
        "[server]\nlisten = [\"{addr}\"]\n\n\
         [shared]\nbackend = \"redis\"\nurl = \"{}\"\ninstance = \"gw-doomed\"\nlease = \"1s\"\n\n\
         [[route]]\npath = \"/chat\"\nupstream = \"ws://{}/\"\n[route.policies]\non_upgrade = \"tag.lua\"\n",
        redis.url(),
        upstream.addr
    );
    let config = dir.write("config.toml", &toml);
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_framegate"))
            .arg("--config")
            .arg(&config)
            .env("FRAMEGATE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("framegate starts"),
    );
    within("the binary listens", async {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Some(status) = child.0.try_wait().unwrap() {
                panic!("framegate exited before listening: {status}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut ws = connect(addr, "/chat?user=zed").await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hi");
    let listing = until(
        &gw,
        "/admin/connections?tag=user:zed&scope=fleet",
        "the binary's connection in the fleet listing",
        |v| v["matched"] == 1,
    )
    .await;
    assert_eq!(listing["connections"][0]["instance"], "gw-doomed");

    // SIGKILL: no shutdown, no DEL; the publication outlives it by at most its lease (1s).
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let killed = tokio::time::Instant::now();
    until(
        &gw,
        "/admin/connections?tag=user:zed&scope=fleet",
        "the killed instance's entry gone",
        |v| v["matched"] == 0 && !v["instances"].to_string().contains("gw-doomed"),
    )
    .await;
    let after = killed.elapsed();
    assert_eq!(
        redis.command(&["SCARD", "fg:reg"]).await.as_deref(),
        Some(":1"),
        "the dead member left the set"
    );
    // The lease, plus room for one poll on a busy machine.
    assert!(
        after <= Duration::from_millis(2000),
        "gone {after:?} after the kill; the lease is 1s"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_redis_that_stops_answering_gets_a_bounded_503_not_a_hang() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let redis = Redis::start().await;
    let upstream = echo().await;
    let gws = fleet(&redis, upstream.addr).await;
    let _ann = client(&gws[1], "user=ann").await;
    all_listening(&gws[0], &INSTANCES).await;

    // SIGSTOP: connections stay open and nothing answers. Each request ends within the
    // registry's bounds (2 s a command, 5 s a listing) with 503; local scope answers at once.
    redis.pause(true);
    for (method, uri) in [
        ("GET", "/admin/connections?scope=fleet"),
        ("DELETE", "/admin/connections?tag=user:ann&scope=fleet"),
    ] {
        let asked = tokio::time::Instant::now();
        let r = call(admin(&gws[0]), method, uri, None, Bytes::new()).await;
        assert_eq!(r.status, 503, "{method} {uri}: {:?}", r.body);
        assert!(asked.elapsed() < Duration::from_secs(6), "{method} {uri}");
    }
    let local = get(&gws[1], "/admin/connections?tag=user:ann").await;
    assert_eq!(local.json()["matched"], 1);
    redis.pause(false);
    until(
        &gws[0],
        "/admin/connections?tag=user:ann&scope=fleet",
        "the fleet listing back",
        |v| v["matched"] == 1,
    )
    .await;
    drop(_ann);
    for g in gws {
        g.shutdown().await;
    }
}

#[tokio::test]
async fn an_instance_refuses_a_fleet_close_without_a_filter_from_redis() {
    let redis = Redis::start().await;
    let upstream = echo().await;
    let gw = gateway(&config(&redis, "gw-1", upstream.addr)).await;
    let mut ann = client(&gw, "user=ann").await;
    // An instance publishes once it listens for commands.
    within("gw-1 published", async {
        while redis.command(&["SCARD", "fg:reg"]).await.as_deref() != Some(":1") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Whoever writes to Redis is trusted, but not to close every connection at once: the
    // instance holds the admin's rule too. Commands run in order, so the second one's code is
    // what the client sees.
    let command = |filter: &str, code: u16| {
        format!(
            r#"{{"from":"elsewhere#1","reply":"fg:reply:elsewhere#1:1","filter":{{"route":null,"client_ip":null,"tag":{filter},"snapshot":null,"limit":100}},"action":"close","code":{code},"reason":"r"}}"#
        )
    };
    for (filter, code) in [("null", 4001), (r#"["user","ann"]"#, 4002)] {
        assert_eq!(
            redis
                .command(&["PUBLISH", "fg:cmd", &command(filter, code)])
                .await
                .as_deref(),
            Some(":1"),
            "one subscriber"
        );
    }
    assert_eq!(expect_close(&mut ann).await, close_frame(4002, "r"));
    gw.shutdown().await;
}
