//! Issue 14: `[upstream.discovery]` over a real DNS server: dnsmasq (Debian `dnsmasq-base`)
//! started by the test on a loopback port; records changed by rewriting its hosts file and
//! sending SIGHUP; SRV records from its configuration.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use futures_util::SinkExt;
use support::*;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// A dnsmasq serving `hosts` (and `conf` lines) on 127.0.0.1:port; killed when dropped.
struct Dnsmasq {
    child: Child,
    port: u16,
    hosts: std::path::PathBuf,
}

impl Dnsmasq {
    /// Starts dnsmasq and waits until it answers. A port that is free for UDP may be taken
    /// for TCP, which dnsmasq binds too ("Address already in use" while other tests or
    /// benchmarks run): then it exits at once, and another port is tried.
    fn start(dir: &TempDir, hosts: &str, conf: &str) -> Dnsmasq {
        let hosts_path = dir.write("hosts", hosts);
        let conf_path = dir.write("dnsmasq.conf", conf);
        // Debian puts it in /usr/sbin, which a non-root PATH may lack.
        let program = match std::path::Path::new("/usr/sbin/dnsmasq").exists() {
            true => "/usr/sbin/dnsmasq",
            false => "dnsmasq",
        };
        for _ in 0..20 {
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new(program)
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--pid-file=",
                    "--log-facility=-",
                    &format!("--port={port}"),
                    &format!("--addn-hosts={}", hosts_path.display()),
                    &format!("--conf-file={}", conf_path.display()),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start dnsmasq ({e}): install the Debian package `dnsmasq-base` (apt-get install dnsmasq-base)")
                });
            let mut dns = Dnsmasq {
                child,
                port,
                hosts: hosts_path.clone(),
            };
            if dns.answers() {
                return dns;
            }
            dns.stop();
        }
        panic!("dnsmasq did not start on any of 20 loopback ports");
    }

    /// Whether it answers a query (any answer) within 5 s; `false` once it has exited.
    fn answers(&mut self) -> bool {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        // A query for `test.` A: id 1, recursion desired.
        let query = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04test\x00\x00\x01\x00\x01";
        for _ in 0..50 {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            socket.send_to(query, ("127.0.0.1", self.port)).unwrap();
            let mut answer = [0u8; 512];
            if socket.recv_from(&mut answer).is_ok() {
                return true;
            }
        }
        false
    }

    /// New records: the hosts file rewritten, then SIGHUP (dnsmasq re-reads it).
    fn set_hosts(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).unwrap();
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Two upstreams on the same port, on 127.0.0.1 ("a") and 127.0.0.2 ("b").
async fn two_hosts() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(b) = TcpListener::bind(("127.0.0.2", port)).await {
            named_upstream("a", a);
            named_upstream("b", b);
            return port;
        }
    }
}

/// Waits until the pool lists `url` as taking connections (`true`) or draining.
async fn listed(gw: &framegate::Running, url: &str, up: bool) {
    within(
        &format!("{url} to be {}", if up { "listed" } else { "draining" }),
        async {
            loop {
                if let Some(state) = gw.pools().get("chat") {
                    let e = state.endpoints().into_iter().find(|e| e.url == url);
                    if e.is_some_and(|e| e.is_draining() != up) {
                        return;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        },
    )
    .await;
}

async fn name_of(addr: SocketAddr) -> (Client, String) {
    let mut ws = connect(addr, "/chat").await;
    let name = next_text(&mut ws).await;
    (ws, name)
}

#[tokio::test]
async fn dns_records_are_followed_and_kept_through_an_outage() {
    let port = two_hosts().await;
    let dir = TempDir::new("pool-dns");
    let mut dns = Dnsmasq::start(&dir, "127.0.0.1 chat.test\n", "");
    let toml = format!(
        "[[upstream]]\nname = \"chat\"\n[upstream.discovery]\ndns = \"chat.test:{port}\"\nrefresh = \"100ms\"\nnameserver = \"127.0.0.1:{}\"\n\
         [[route]]\npath = \"/chat\"\nupstream = \"chat\"\n",
        dns.port
    );
    let gw = gateway(&toml).await;
    let a = format!("ws://127.0.0.1:{port}");
    let b = format!("ws://127.0.0.2:{port}");
    listed(&gw, &a, true).await;
    let (mut held, name) = name_of(gw.local_addr()).await;
    assert_eq!(name, "a");
    let source = gw.pools().get("chat").unwrap().endpoints()[0].source;
    assert_eq!(source.as_str(), "dns");

    // The record moves to 127.0.0.2: a drains (its connection stays), b takes new ones.
    dns.set_hosts("127.0.0.2 chat.test\n");
    listed(&gw, &b, true).await;
    listed(&gw, &a, false).await;
    for _ in 0..3 {
        assert_eq!(name_of(gw.local_addr()).await.1, "b");
    }
    held.send(Message::text("still open")).await.unwrap();
    assert_eq!(next_text(&mut held).await, "still open");

    // The DNS server goes away: lookups fail (counted), the last known endpoints stay.
    let state = gw.pools().get("chat").unwrap();
    let failed_before = state.discovery_failures();
    dns.stop();
    within("two failed lookups", async {
        while state.discovery_failures() < failed_before + 2 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(state
        .endpoints()
        .iter()
        .any(|e| e.url == b && !e.is_draining()));
    for _ in 0..3 {
        assert_eq!(name_of(gw.local_addr()).await.1, "b");
    }
}

#[tokio::test]
async fn srv_records_give_host_port_and_weight() {
    let port = two_hosts().await;
    let dir = TempDir::new("pool-srv");
    let dns = Dnsmasq::start(
        &dir,
        "127.0.0.2 chat-b.test\n",
        &format!("srv-host=_ws._tcp.chat.test,chat-b.test,{port},0,5\n"),
    );
    let toml = format!(
        "[[upstream]]\nname = \"chat\"\n[upstream.discovery]\nsrv = \"_ws._tcp.chat.test\"\nrefresh = \"100ms\"\nnameserver = \"127.0.0.1:{}\"\n\
         [[route]]\npath = \"/chat\"\nupstream = \"chat\"\n",
        dns.port
    );
    let gw = gateway(&toml).await;
    let b = format!("ws://127.0.0.2:{port}");
    listed(&gw, &b, true).await;
    let e = gw.pools().get("chat").unwrap().endpoints()[0].clone();
    assert_eq!((e.source.as_str(), e.weight()), ("srv", 5));
    assert_eq!(name_of(gw.local_addr()).await.1, "b");
}

/// A reload that takes the `dns` source away drains what it had found (open connections stay)
/// and the configured endpoints take the new connections.
#[tokio::test]
async fn a_reload_without_the_dns_source_drains_its_endpoints() {
    let port = two_hosts().await;
    let dir = TempDir::new("pool-dns-reload");
    let dns = Dnsmasq::start(&dir, "127.0.0.1 chat.test\n", "");
    let toml = |discovery: &str| {
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n\
             [[upstream]]\nname = \"chat\"\nendpoints = [\"ws://127.0.0.2:{port}\"]\nbalance = \"least_connections\"\n{discovery}\n\
             [[route]]\npath = \"/chat\"\nupstream = \"chat\"\n"
        )
    };
    let gw = start_from(
        &dir,
        &toml(&format!(
            "[upstream.discovery]\ndns = \"chat.test:{port}\"\nrefresh = \"100ms\"\nnameserver = \"127.0.0.1:{}\"\n",
            dns.port
        )),
    )
    .await;
    let a = format!("ws://127.0.0.1:{port}");
    listed(&gw, &a, true).await;
    // Least connections: one on each, a's held open.
    let (first, one) = name_of(gw.local_addr()).await;
    let (second, two) = name_of(gw.local_addr()).await;
    let mut held = if one == "a" { first } else { second };
    assert_eq!(
        [one.as_str(), two.as_str()]
            .iter()
            .filter(|n| **n == "a")
            .count(),
        1
    );

    dir.write("config.toml", &toml(""));
    gw.reload().await.expect("the reload succeeds");
    listed(&gw, &a, false).await;
    for _ in 0..3 {
        assert_eq!(name_of(gw.local_addr()).await.1, "b");
    }
    held.send(Message::text("still open")).await.unwrap();
    assert_eq!(next_text(&mut held).await, "still open");
}
