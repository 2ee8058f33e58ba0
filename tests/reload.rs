//! Issue 13 §1, §2: reloading a running gateway over real sockets. `POST /admin/reload` and
//! `Running::reload` in-process (SIGHUP on the real binary is in tests/signals.rs): old
//! connections keep their snapshot (route, upstream, policies), new ones get the new one; a
//! broken configuration changes nothing; listen addresses follow; `server.watch`; and the load
//! test of §2.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// A frame policy that stamps every upstream-to-client message with `version`.
fn stamp(version: &str) -> String {
    format!("return function(msg) return \"{version}:\" .. msg.text end\n")
}

fn rewrite(dir: &TempDir, toml: &str) -> PathBuf {
    dir.write("config.toml", toml)
}

/// `POST /admin/reload` (or any admin request): status and body.
async fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let (status, _, body) = raw_http(addr, &request).await;
    (status, body)
}

async fn roundtrip(ws: &mut Client, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    next_text(ws).await
}

/// Waits (bounded by `within`) until `gw` runs snapshot `n` or a later one.
async fn await_snapshot(gw: &framegate::Running, n: u64, what: &str) {
    within(what, async {
        while gw.snapshot_number() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// The status a new upgrade request to `path` gets.
async fn status_of(addr: SocketAddr, path: &str) -> u16 {
    raw_http(addr, &upgrade_request(path, "")).await.0
}

const HEAD: &str = "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n";

#[tokio::test]
async fn admin_reload_swaps_policies_routes_and_keeps_old_connections_on_theirs() {
    let up = echo().await;
    let dir = TempDir::new("admin-reload");
    let v1 = dir.write("v1.lua", &stamp("v1"));
    let v2 = dir.write("v2.lua", &stamp("v2"));
    let policy = |p: &PathBuf| format!("{:?}", p.display().to_string());
    let first = format!(
        "{HEAD}{}{}",
        route("/echo", up.addr, "", &[("on_server_frame", &policy(&v1))]),
        route("/gone", up.addr, "", &[]),
    );
    let gw = start_from(&dir, &first).await;
    let addr = gw.local_addr();
    let api = gw.admin_addr().expect("admin listener");
    let mut old_echo = connect(addr, "/echo").await;
    let mut old_gone = connect(addr, "/gone").await;
    assert_eq!(roundtrip(&mut old_echo, "1").await, "v1:1");

    // The second configuration changes the policy, adds /added and removes /gone.
    let second = format!(
        "{HEAD}{}{}",
        route("/echo", up.addr, "", &[("on_server_frame", &policy(&v2))]),
        route("/added", up.addr, "", &[]),
    );
    rewrite(&dir, &second);
    let (status, body) = admin(api, "POST", "/admin/reload").await;
    assert_eq!((status, body.as_str()), (200, r#"{"snapshot":2}"#));
    assert_eq!(gw.snapshot_number(), 2);

    // New connections get the new snapshot; old ones keep theirs, to the end.
    let mut new_echo = connect(addr, "/echo").await;
    assert_eq!(roundtrip(&mut new_echo, "2").await, "v2:2");
    assert_eq!(roundtrip(&mut old_echo, "3").await, "v1:3");
    let mut added = connect(addr, "/added").await;
    assert_eq!(roundtrip(&mut added, "4").await, "4");
    assert_eq!(status_of(addr, "/gone").await, 404);
    assert_eq!(roundtrip(&mut old_gone, "5").await, "5");

    // A broken file changes nothing: 400 with file:line:column, snapshot 2 keeps serving.
    let broken =
        format!("{second}[[route]]\npath = \"/x\"\nupstream = \"ws://h/\"\nexpire = \"soon\"\n");
    rewrite(&dir, &broken);
    let (status, body) = admin(api, "POST", "/admin/reload").await;
    assert_eq!(status, 400, "{body}");
    let line = broken
        .lines()
        .position(|l| l.starts_with("expire"))
        .unwrap()
        + 1;
    assert!(
        body.contains(&format!("config.toml:{line}:10: route.expire")),
        "{body}"
    );
    assert_eq!(gw.snapshot_number(), 2);
    assert_eq!(roundtrip(&mut new_echo, "6").await, "v2:6");
    let mut again = connect(addr, "/echo").await;
    assert_eq!(roundtrip(&mut again, "7").await, "v2:7");

    // A policy that does not compile changes nothing either (its path and line).
    std::fs::write(&v2, "return function(msg) return msg.text ..\n").unwrap();
    rewrite(&dir, &second);
    let (status, body) = admin(api, "POST", "/admin/reload").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("v2.lua:"), "{body}");
    let mut still = connect(addr, "/echo").await;
    assert_eq!(roundtrip(&mut still, "8").await, "v2:8");

    // The effective configuration names its snapshot.
    let (status, body) = admin(api, "GET", "/admin/config").await;
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["snapshot"], 2);
    assert_eq!(config["routes"][1]["path"], "/added");
    // Compression's keys, at their defaults.
    let added = &config["routes"][1];
    assert_eq!(
        (&added["compression_level"], &added["compression_threshold"]),
        (&serde_json::json!(1), &serde_json::json!(1024))
    );

    // Metrics count both outcomes.
    let (_, metrics) = admin(api, "GET", "/metrics").await;
    assert!(metrics.contains("framegate_config_snapshot 2"), "{metrics}");
    assert!(
        metrics.contains("framegate_config_reloads_total{result=\"failure\"} 2"),
        "{metrics}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn listen_addresses_are_added_and_removed_by_a_reload() {
    let up = echo().await;
    let dir = TempDir::new("listen-reload");
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let routes = route("/echo", up.addr, "", &[]);
    let gw = start_from(&dir, &format!("{HEAD}{routes}")).await;
    let first = gw.local_addr();

    let both = HEAD.replace(
        "[\"127.0.0.1:0\"]",
        &format!("[\"127.0.0.1:0\", \"{free}\"]"),
    );
    rewrite(&dir, &format!("{both}{routes}"));
    gw.reload().await.expect("reload adds an address");
    assert_eq!(gw.local_addrs(), vec![first, free]);
    let mut on_added = connect(free, "/echo").await;
    assert_eq!(roundtrip(&mut on_added, "a").await, "a");

    // Removed again: no new connections there, the open one stays; the first address serves.
    rewrite(&dir, &format!("{HEAD}{routes}"));
    gw.reload().await.expect("reload removes an address");
    assert_eq!(gw.local_addrs(), vec![first]);
    within("the removed address to refuse connections", async {
        while tokio::net::TcpStream::connect(free).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(roundtrip(&mut on_added, "b").await, "b");
    let mut on_first = connect(first, "/echo").await;
    assert_eq!(roundtrip(&mut on_first, "c").await, "c");

    // An address that cannot be bound fails the reload, and nothing changes.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let clash = HEAD.replace(
        "[\"127.0.0.1:0\"]",
        &format!("[\"127.0.0.1:0\", \"{taken_addr}\"]"),
    );
    rewrite(
        &dir,
        &format!("{clash}{}", route("/other", up.addr, "", &[])),
    );
    let err = gw.reload().await.expect_err("the address is taken");
    assert!(err.to_string().contains("cannot listen on"), "{err}");
    assert_eq!(gw.snapshot_number(), 3);
    assert_eq!(status_of(first, "/other").await, 404);
    gw.shutdown().await;
}

#[tokio::test]
async fn server_watch_reloads_when_a_policy_script_changes() {
    let up = echo().await;
    let dir = TempDir::new("watch");
    let script = dir.write("stamp.lua", &stamp("v1"));
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nwatch = true\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        route(
            "/echo",
            up.addr,
            "",
            &[(
                "on_server_frame",
                &format!("{:?}", script.display().to_string())
            )]
        )
    );
    let gw = start_from(&dir, &toml).await;
    let mut old = connect(gw.local_addr(), "/echo").await;
    assert_eq!(roundtrip(&mut old, "1").await, "v1:1");
    std::fs::write(&script, stamp("v2")).unwrap();
    await_snapshot(&gw, 2, "the watcher to reload").await;
    let mut new = connect(gw.local_addr(), "/echo").await;
    assert_eq!(roundtrip(&mut new, "2").await, "v2:2");
    assert_eq!(roundtrip(&mut old, "3").await, "v1:3");
    // A broken save is logged and changes nothing; the next good one is picked up.
    std::fs::write(&script, "return function(\n").unwrap();
    let api = gw.admin_addr().unwrap();
    within("the broken save's reload to fail", async {
        loop {
            let (_, metrics) = admin(api, "GET", "/metrics").await;
            if metrics.contains("framegate_config_reloads_total{result=\"failure\"} 1") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(gw.snapshot_number(), 2);
    let mut still = connect(gw.local_addr(), "/echo").await;
    assert_eq!(roundtrip(&mut still, "3").await, "v2:3");
    std::fs::write(&script, stamp("v3")).unwrap();
    await_snapshot(&gw, 3, "the watcher to reload again").await;
    let mut newest = connect(gw.local_addr(), "/echo").await;
    assert_eq!(roundtrip(&mut newest, "4").await, "v3:4");
    assert_eq!(roundtrip(&mut old, "5").await, "v1:5");
    gw.shutdown().await;
}

/// A mounted Kubernetes ConfigMap: each file is a symlink through `..data`, a symlink to a
/// hidden folder, and an update swaps `..data` to a new folder (a new link renamed over it);
/// the files' own names see no event. `server.watch` reloads on the swap.
#[tokio::test]
async fn server_watch_reloads_when_a_configmap_style_symlink_is_swapped() {
    use std::os::unix::fs::symlink;
    let up = echo().await;
    let dir = TempDir::new("watch-configmap");
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nwatch = true\n{}",
        route(
            "/echo",
            up.addr,
            "",
            &[("on_server_frame", "\"stamp.lua\"")]
        )
    );
    let version = |name: &str, stamped: &str| {
        std::fs::create_dir(dir.0.join(name)).unwrap();
        dir.write(&format!("{name}/config.toml"), &toml);
        dir.write(&format!("{name}/stamp.lua"), &stamp(stamped));
    };
    version("..2026_12_05_01", "v1");
    symlink("..2026_12_05_01", dir.0.join("..data")).unwrap();
    for file in ["config.toml", "stamp.lua"] {
        symlink(format!("..data/{file}"), dir.0.join(file)).unwrap();
    }
    let config = framegate::Config::load(&dir.0.join("config.toml")).unwrap();
    let gw = framegate::Gateway::new(config)
        .unwrap()
        .start()
        .await
        .unwrap();
    let mut old = connect(gw.local_addr(), "/echo").await;
    assert_eq!(roundtrip(&mut old, "1").await, "v1:1");

    version("..2026_12_05_02", "v2");
    symlink("..2026_12_05_02", dir.0.join("..data_tmp")).unwrap();
    std::fs::rename(dir.0.join("..data_tmp"), dir.0.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.0.join("..2026_12_05_01")).unwrap();
    await_snapshot(&gw, 2, "the watcher to reload on the swap").await;
    let mut new = connect(gw.local_addr(), "/echo").await;
    assert_eq!(roundtrip(&mut new, "2").await, "v2:2");
    assert_eq!(roundtrip(&mut old, "3").await, "v1:3");
    gw.shutdown().await;
}

/// Connections of the load test (FRAMEGATE_RELOAD_LOAD overrides it), and messages each sends
/// at least. Each keeps sending until the last reload is done, so the message count is bounded
/// by the test's time (about 30 s and 500 000 messages in the debug build on 2 shared cores).
const LOAD_CONNECTIONS: usize = 500;
const LOAD_MIN_MESSAGES: usize = 40;
const LOAD_RELOADS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_nothing_and_keeps_each_connection_on_its_snapshot() {
    let conns: usize = std::env::var("FRAMEGATE_RELOAD_LOAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LOAD_CONNECTIONS);
    let up = echo().await;
    let dir = TempDir::new("reload-load");
    let v1 = dir.write("v1.lua", &stamp("v1"));
    let v2 = dir.write("v2.lua", &stamp("v2"));
    let policy = |p: &PathBuf| format!("{:?}", p.display().to_string());
    let head = "[server]\nlisten = [\"127.0.0.1:0\"]\nmax_connections = 20000\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    // A: /echo stamps v1. B: /echo stamps v2, and /added exists.
    let a = format!(
        "{head}{}",
        route("/echo", up.addr, "", &[("on_server_frame", &policy(&v1))])
    );
    let b = format!(
        "{head}{}{}",
        route("/echo", up.addr, "", &[("on_server_frame", &policy(&v2))]),
        route("/added", up.addr, "", &[])
    );
    let gw = start_from(&dir, &a).await;
    let addr = gw.local_addr();
    let api = gw.admin_addr().unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let exchanged = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let mut ws = connect(addr, "/echo").await;
        let (done, exchanged) = (done.clone(), exchanged.clone());
        tasks.push(tokio::spawn(async move {
            // Pipelined: up to 4 messages in flight, so that reloads meet queued traffic.
            let mut sent = 0usize;
            let mut received = 0usize;
            loop {
                while sent < received + 4
                    && !(done.load(Ordering::Relaxed) && sent >= LOAD_MIN_MESSAGES)
                {
                    ws.send(Message::text(format!("{c}.{sent}"))).await.unwrap();
                    sent += 1;
                }
                if received == sent {
                    break;
                }
                let got = match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
                    other => panic!("connection {c}: message {received}: {other:?}"),
                };
                // In order, none lost or repeated, and always the policy of snapshot 1.
                assert_eq!(got, format!("v1:{c}.{received}"), "connection {c}");
                received += 1;
                exchanged.fetch_add(1, Ordering::Relaxed);
            }
            ws.close(None).await.unwrap();
            received
        }));
    }

    let mut snapshot = 1;
    for n in 0..LOAD_RELOADS {
        // Traffic flows between reloads.
        let before = exchanged.load(Ordering::Relaxed);
        within("traffic between reloads", async {
            while exchanged.load(Ordering::Relaxed) < before + conns {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let to_b = n % 2 == 0;
        rewrite(&dir, if to_b { &b } else { &a });
        let (status, body) = admin(api, "POST", "/admin/reload").await;
        assert_eq!(status, 200, "{body}");
        snapshot += 1;
        assert_eq!(body, format!("{{\"snapshot\":{snapshot}}}"));
        // New connections get the new snapshot's policy and routes.
        let mut fresh = connect(addr, "/echo").await;
        let want = if to_b { "v2:x" } else { "v1:x" };
        assert_eq!(roundtrip(&mut fresh, "x").await, want);
        assert_eq!(
            status_of(addr, "/added").await,
            if to_b { 101 } else { 404 }
        );
        if n == LOAD_RELOADS / 2 {
            // A broken configuration in the middle changes nothing.
            rewrite(&dir, &format!("{b}[server]\n"));
            let (status, body) = admin(api, "POST", "/admin/reload").await;
            assert_eq!(status, 400, "{body}");
            assert!(body.contains("config.toml:"), "{body}");
            assert_eq!(gw.snapshot_number(), snapshot);
        }
    }
    done.store(true, Ordering::Relaxed);
    let mut total = 0;
    for task in tasks {
        total += tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("a load connection finished")
            .expect("a load connection kept every message in order");
    }
    assert!(total >= conns * LOAD_MIN_MESSAGES);
    eprintln!(
        "reload under load: {conns} connections, {total} messages echoed, {LOAD_RELOADS} reloads"
    );
    gw.shutdown().await;
}

/// Needs the connection registry wired into the relay (h13-wire: registration after the 101,
/// `Control::Close` polled by the relay); the drain schedule itself is unit-tested in
/// src/reload/drain.rs.
#[tokio::test]
async fn drain_old_closes_old_connections_with_1012_spread_over_time() {
    let up = echo().await;
    let dir = TempDir::new("drain-old");
    let v1 = dir.write("v1.lua", &stamp("v1"));
    let v2 = dir.write("v2.lua", &stamp("v2"));
    let policy = |p: &PathBuf| format!("{:?}", p.display().to_string());
    let head = "[server]\nlisten = [\"127.0.0.1:0\"]\ndrain_old = \"1s\"\n";
    let gw = start_from(
        &dir,
        &format!(
            "{head}{}",
            route("/echo", up.addr, "", &[("on_server_frame", &policy(&v1))])
        ),
    )
    .await;
    let addr = gw.local_addr();
    let mut old = Vec::new();
    for _ in 0..3 {
        old.push(connect(addr, "/echo").await);
    }
    rewrite(
        &dir,
        &format!(
            "{head}{}",
            route("/echo", up.addr, "", &[("on_server_frame", &policy(&v2))])
        ),
    );
    gw.reload().await.unwrap();
    let reloaded = tokio::time::Instant::now();
    let mut new = connect(addr, "/echo").await;
    let mut at = Vec::new();
    for ws in &mut old {
        let frame = expect_close(ws).await;
        assert_eq!(u16::from(frame.code), 1012);
        assert_eq!(frame.reason.as_str(), "service restart");
        at.push(reloaded.elapsed());
    }
    assert!(at[0] >= Duration::from_secs(1), "{at:?}");
    assert!(
        at[2] >= at[0] + Duration::from_millis(500),
        "spread out: {at:?}"
    );
    assert!(at[2] < Duration::from_secs(3), "{at:?}");
    assert_eq!(roundtrip(&mut new, "still").await, "v2:still");
    gw.shutdown().await;
}

/// A worker stuck in a policy does not hold a reload up: the reload skips it (the watchdog has
/// reported it) and the other worker serves the new snapshot; once the stuck worker is back, it
/// compiles the new snapshot too and serves it.
#[tokio::test]
async fn a_stuck_worker_does_not_hang_a_reload() {
    let up = echo().await;
    let dir = TempDir::new("reload-stuck");
    let v1 = dir.write("v1.lua", &stamp("v1"));
    let v2 = dir.write("v2.lua", &stamp("v2"));
    let spin = dir.write(
        "spin.lua",
        "return function(msg) if msg.text == \"spin\" then while true do end end end\n",
    );
    let policy = |p: &PathBuf| format!("{:?}", p.display().to_string());
    let head = "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\nwatchdog_timeout = \"300ms\"\n";
    let spin_route = route(
        "/spin",
        up.addr,
        "policy_cpu_limit = \"2s\"",
        &[("on_client_frame", &policy(&spin))],
    );
    let config = |v: &PathBuf| {
        format!(
            "{head}{spin_route}{}",
            route("/echo", up.addr, "", &[("on_server_frame", &policy(v))])
        )
    };
    let gw = start_from(&dir, &config(&v1)).await;
    let addr = gw.local_addr();
    let mut spinning = connect(addr, "/spin").await;
    spinning.send(Message::text("spin")).await.unwrap();
    within("the watchdog to report the stall", async {
        while gw.stalled_workers().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    rewrite(&dir, &config(&v2));
    let started = tokio::time::Instant::now();
    assert_eq!(
        gw.reload().await.expect("reload while a worker is stuck"),
        2
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the reload waited for the stuck worker: {:?}",
        started.elapsed()
    );
    let mut fresh = connect(addr, "/echo").await;
    assert_eq!(roundtrip(&mut fresh, "1").await, "v2:1");

    // Back from its 2 s spin, the worker serves snapshot 2 as well.
    within("the stuck worker to recover", async {
        while !gw.stalled_workers().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut after = Vec::new();
    for i in 0..6 {
        let mut ws = connect(addr, "/echo").await;
        assert_eq!(roundtrip(&mut ws, &format!("{i}")).await, format!("v2:{i}"));
        after.push(ws);
    }
    drop(spinning);
    gw.shutdown().await;
}

/// `gw.shared` survives a reload: the old and the new policy count in the same dictionary.
#[tokio::test]
async fn gw_shared_survives_a_reload() {
    let up = echo().await;
    let dir = TempDir::new("reload-shared");
    let counting =
        |v: &str| format!("return function(msg) return \"{v}:\" .. gw.shared:incr(\"seen\") end\n");
    let v1 = dir.write("v1.lua", &counting("v1"));
    let v2 = dir.write("v2.lua", &counting("v2"));
    let policy = |p: &PathBuf| format!("{:?}", p.display().to_string());
    let config = |p: &PathBuf| {
        format!(
            "{HEAD}{}",
            route("/echo", up.addr, "", &[("on_server_frame", &policy(p))])
        )
    };
    let gw = start_from(&dir, &config(&v1)).await;
    let mut old = connect(gw.local_addr(), "/echo").await;
    assert_eq!(roundtrip(&mut old, "x").await, "v1:1");
    rewrite(&dir, &config(&v2));
    gw.reload().await.unwrap();
    let mut new = connect(gw.local_addr(), "/echo").await;
    assert_eq!(roundtrip(&mut new, "x").await, "v2:2");
    assert_eq!(roundtrip(&mut old, "x").await, "v1:3");
    gw.shutdown().await;
}
