//! Issue 14: `[upstream.discovery] etcd` over a real etcd: Debian's `etcd-server` (etcd 3.4)
//! started by the test on two loopback ports with a data dir of its own, killed by PID at the
//! end; keys put and deleted with the etcd-client crate while the gateway runs.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_client::Client as EtcdClient;
use futures_util::SinkExt;
use support::*;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const ETCD: &str = "/usr/bin/etcd";
const PREFIX: &str = "/services/chat/";

/// A free loopback port (bound, then released for etcd to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An etcd serving clients on 127.0.0.1:port, its data in `dir`; killed when dropped.
struct Etcd {
    child: Option<Child>,
    port: u16,
    peer: u16,
    dir: TempDir,
}

impl Etcd {
    async fn start() -> Etcd {
        let mut etcd = Etcd {
            child: None,
            port: free_port(),
            peer: free_port(),
            dir: TempDir::new("etcd"),
        };
        etcd.spawn().await;
        etcd
    }

    /// Starts the process (again, on the same ports and data dir) and waits until it answers.
    async fn spawn(&mut self) {
        assert!(
            std::path::Path::new(ETCD).exists(),
            "{ETCD} is missing: install etcd-server (apt-get install etcd-server)"
        );
        let (client, peer) = (
            format!("http://127.0.0.1:{}", self.port),
            format!("http://127.0.0.1:{}", self.peer),
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.0.join("etcd.log"))
            .unwrap();
        let child = Command::new(ETCD)
            .args([
                "--name",
                "default",
                "--data-dir",
                &self.dir.0.join("data").display().to_string(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("default={peer}"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {ETCD} ({e}): install etcd-server (apt-get install etcd-server)"
                )
            });
        self.child = Some(child);
        within("etcd to answer", async {
            loop {
                if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!(
                        "etcd exited ({status}): {}",
                        std::fs::read_to_string(self.dir.0.join("etcd.log")).unwrap_or_default()
                    );
                }
                let answered = tokio::time::timeout(Duration::from_secs(1), async {
                    let mut c = EtcdClient::connect([self.url()], None).await?;
                    c.get("/", None).await
                })
                .await;
                if matches!(answered, Ok(Ok(_))) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn client(&self) -> EtcdClient {
        within("an etcd client", EtcdClient::connect([self.url()], None))
            .await
            .unwrap()
    }

    async fn put(&self, key: &str, value: &str) {
        let mut c = self.client().await;
        within("an etcd put", c.put(format!("{PREFIX}{key}"), value, None))
            .await
            .unwrap();
    }

    async fn delete(&self, key: &str) {
        let mut c = self.client().await;
        within("an etcd delete", c.delete(format!("{PREFIX}{key}"), None))
            .await
            .unwrap();
    }

    /// Kills the process by its PID.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An upstream that names itself in its first message, then echoes text.
async fn named(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    named_upstream(name, listener);
    addr
}

/// The pool `chat` with an etcd source at `etcd_url` and `prefix`, and the route `/chat`.
fn config(etcd_url: &str, prefix: &str, extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[upstream]]\nname = \"chat\"\n{extra}\n\
         [upstream.discovery]\netcd = {{ endpoints = [\"{etcd_url}\"], prefix = \"{prefix}\" }}\nrefresh = \"200ms\"\n\
         [[route]]\npath = \"/chat\"\nupstream = \"chat\"\n"
    )
}

fn ws(addr: SocketAddr) -> String {
    format!("ws://{addr}")
}

/// Waits until the pool lists `url` as taking connections (`up`), or until it takes none
/// (draining, or gone once it has no connection left).
async fn listed(gw: &framegate::Running, url: &str, up: bool) {
    let what = format!("{url} to be {}", if up { "listed" } else { "drained" });
    within(&what, async {
        loop {
            if let Some(state) = gw.pools().get("chat") {
                let e = state.endpoints().into_iter().find(|e| e.url == url);
                let taking = e.is_some_and(|e| !e.is_draining());
                if taking == up {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Opens `/chat` and reads the endpoint's name.
async fn name_of(addr: SocketAddr) -> (Client, String) {
    let mut ws = connect(addr, "/chat").await;
    let name = next_text(&mut ws).await;
    (ws, name)
}

/// The names of `n` new connections, sorted.
async fn names(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut all = Vec::new();
    for _ in 0..n {
        all.push(name_of(addr).await.1);
    }
    all.sort();
    all
}

/// A connection on the endpoint named `name` (new ones until one lands there).
async fn held_on(addr: SocketAddr, name: &str) -> Client {
    within(&format!("a connection on {name}"), async {
        loop {
            let (ws, got) = name_of(addr).await;
            if got == name {
                return ws;
            }
        }
    })
    .await
}

async fn admin_upstreams(gw: &framegate::Running) -> serde_json::Value {
    let (status, _, body) = raw_http(
        gw.admin_addr().unwrap(),
        "GET /admin/upstreams HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn echoes(held: &mut Client, text: &str) {
    held.send(Message::text(text)).await.unwrap();
    assert_eq!(next_text(held).await, text);
}

/// etcd with keys `a` and `b` naming two upstreams, and a gateway that lists both.
async fn two_keys() -> (Etcd, framegate::Running, SocketAddr, SocketAddr) {
    let (a, b) = (named("a").await, named("b").await);
    let etcd = Etcd::start().await;
    etcd.put("a", &ws(a)).await;
    etcd.put("b", &ws(b)).await;
    let gw = gateway(&config(&etcd.url(), PREFIX, "")).await;
    listed(&gw, &ws(a), true).await;
    listed(&gw, &ws(b), true).await;
    (etcd, gw, a, b)
}

#[tokio::test]
async fn keys_put_before_start_are_the_pools_endpoints_with_source_etcd() {
    let (_etcd, gw, _, _) = two_keys().await;

    let v = admin_upstreams(&gw).await;
    let endpoints = v["pools"][0]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 2, "{v}");
    for e in endpoints {
        assert_eq!((&e["source"], &e["state"]), (&"etcd".into(), &"up".into()));
    }
    assert_eq!(names(gw.local_addr(), 4).await, ["a", "a", "b", "b"]);
}

#[tokio::test]
async fn a_key_put_while_running_takes_connections_and_a_new_value_replaces_its_endpoint() {
    let (a, b, c) = (named("a").await, named("b").await, named("c").await);
    let etcd = Etcd::start().await;
    etcd.put("a", &ws(a)).await;
    let gw = gateway(&config(&etcd.url(), PREFIX, "")).await;
    listed(&gw, &ws(a), true).await;
    assert_eq!(names(gw.local_addr(), 2).await, ["a", "a"]);

    // A new key: round robin across both.
    etcd.put("b", &ws(b)).await;
    listed(&gw, &ws(b), true).await;
    assert_eq!(names(gw.local_addr(), 4).await, ["a", "a", "b", "b"]);

    // Key a now names c: a drains, c takes its share.
    let mut held = held_on(gw.local_addr(), "a").await;
    etcd.put("a", &ws(c)).await;
    listed(&gw, &ws(c), true).await;
    listed(&gw, &ws(a), false).await;
    assert_eq!(names(gw.local_addr(), 4).await, ["b", "b", "c", "c"]);
    echoes(&mut held, "still through a").await;
}

#[tokio::test]
async fn a_deleted_key_drains_its_endpoint() {
    let (etcd, gw, _, b) = two_keys().await;
    let mut held = held_on(gw.local_addr(), "b").await;

    etcd.delete("b").await;
    listed(&gw, &ws(b), false).await;
    // Its open connection stays; new ones go elsewhere.
    echoes(&mut held, "still open").await;
    assert_eq!(names(gw.local_addr(), 3).await, ["a", "a", "a"]);
    let v = admin_upstreams(&gw).await;
    let drained = v["pools"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == ws(b))
        .cloned()
        .unwrap();
    assert_eq!(
        (&drained["state"], &drained["open_connections"]),
        (&"draining".into(), &1.into()),
        "{v}"
    );
    echoes(&mut held, "still open").await;

    // Once its last connection ends, it leaves the list.
    drop(held);
    within("the drained endpoint to go", async {
        let state = gw.pools().get("chat").unwrap();
        while state.endpoints().iter().any(|e| e.url == ws(b)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn an_etcd_outage_keeps_the_endpoints_and_the_watch_resumes() {
    let (a, b) = (named("a").await, named("b").await);
    let mut etcd = Etcd::start().await;
    etcd.put("a", &ws(a)).await;
    let gw = gateway(&config(&etcd.url(), PREFIX, "")).await;
    listed(&gw, &ws(a), true).await;
    let (mut held, _) = name_of(gw.local_addr()).await;

    // etcd goes away: the last known endpoints stay, upgrades still succeed.
    etcd.stop();
    assert_eq!(names(gw.local_addr(), 3).await, ["a", "a", "a"]);
    echoes(&mut held, "through the outage").await;
    let state = gw.pools().get("chat").unwrap();
    assert!(state
        .endpoints()
        .iter()
        .any(|e| e.url == ws(a) && e.is_up()));

    // Back on the same port and data: a key put now is seen (a fresh get and watch).
    etcd.spawn().await;
    etcd.put("b", &ws(b)).await;
    listed(&gw, &ws(b), true).await;
    listed(&gw, &ws(a), true).await;
    assert_eq!(names(gw.local_addr(), 4).await, ["a", "a", "b", "b"]);
    echoes(&mut held, "after the outage").await;
}

#[tokio::test]
async fn bad_values_are_ignored_and_the_good_keys_still_work() {
    let a = named("a").await;
    let etcd = Etcd::start().await;
    etcd.put("bad-scheme", "http://x").await;
    etcd.put("garbage", "garbage").await;
    let gw = gateway(&config(&etcd.url(), PREFIX, "")).await;
    // Nothing usable yet: the all-down 503 with Retry-After, at once.
    let (status, head, _) = raw_http(gw.local_addr(), &upgrade_request("/chat", "")).await;
    assert_eq!(status, 503, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );

    etcd.put("a", &ws(a)).await;
    listed(&gw, &ws(a), true).await;
    assert_eq!(gw.pools().get("chat").unwrap().endpoints().len(), 1);
    assert_eq!(names(gw.local_addr(), 2).await, ["a", "a"]);

    // A good key turned bad is dropped: its endpoint drains.
    etcd.put("a", "ws://").await;
    listed(&gw, &ws(a), false).await;
}

#[tokio::test]
async fn an_etcd_only_pool_with_etcd_unreachable_answers_503_with_retry_after() {
    let nothing = closed_port().await;
    let gw = gateway(&config(&format!("http://{nothing}"), PREFIX, "")).await;
    for _ in 0..2 {
        let (status, head, _) = raw_http(gw.local_addr(), &upgrade_request("/chat", "")).await;
        assert_eq!(status, 503, "{head}");
        assert!(
            head.to_ascii_lowercase().contains("retry-after: 1"),
            "{head}"
        );
    }
}

#[tokio::test]
async fn reloads_keep_the_watch_and_a_new_prefix_or_no_etcd_drains_the_old_keys() {
    let (a, b, c) = (named("a").await, named("b").await, named("c").await);
    let etcd = Etcd::start().await;
    etcd.put("a", &ws(a)).await;
    let mut other = etcd.client().await;
    other
        .put("/services/other/c", ws(c), None)
        .await
        .expect("put under another prefix");
    let dir = TempDir::new("pool-etcd-reload");
    let toml = |prefix: &str, extra: &str| {
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n{}",
            config(&etcd.url(), prefix, extra)
        )
    };
    let gw = start_from(&dir, &toml(PREFIX, "")).await;
    listed(&gw, &ws(a), true).await;
    let (mut held, name) = name_of(gw.local_addr()).await;
    assert_eq!(name, "a");

    // Same etcd settings, another pool setting: the connection and the watch stay.
    dir.write("config.toml", &toml(PREFIX, "retries = 1"));
    gw.reload().await.expect("the reload succeeds");
    echoes(&mut held, "after a reload").await;
    etcd.put("b", &ws(b)).await;
    listed(&gw, &ws(b), true).await;
    listed(&gw, &ws(a), true).await;

    // Another prefix: its keys replace the old ones, which drain.
    dir.write("config.toml", &toml("/services/other/", "retries = 1"));
    gw.reload().await.expect("the reload succeeds");
    listed(&gw, &ws(c), true).await;
    listed(&gw, &ws(a), false).await;
    listed(&gw, &ws(b), false).await;
    echoes(&mut held, "after another reload").await;
    assert_eq!(names(gw.local_addr(), 2).await, ["c", "c"]);

    // No etcd source any more: its endpoints drain, the configured one takes over.
    let d = named("d").await;
    dir.write(
        "config.toml",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[[upstream]]\nname = \"chat\"\nendpoints = [\"{}\"]\n\
             [[route]]\npath = \"/chat\"\nupstream = \"chat\"\n",
            ws(d)
        ),
    );
    gw.reload().await.expect("the reload succeeds");
    listed(&gw, &ws(c), false).await;
    echoes(&mut held, "after the last reload").await;
    assert_eq!(names(gw.local_addr(), 2).await, ["d", "d"]);
}
