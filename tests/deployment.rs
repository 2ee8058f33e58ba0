//! The fleet example of docs/deployment.md, run from its own files: deploy/gw-1.toml and
//! deploy/gw-2.toml as two framegate binaries, deploy/haproxy.cfg as a real HAProxy in TCP mode
//! in front of them, the fixed example ports replaced with free ones. Clients spread over both
//! instances; a SIGTERM to one drains it: its clients get 1001, HAProxy's health check on
//! `/readyz` marks it down, and new clients all reach the other. The Kubernetes example
//! (deploy/kubernetes.yaml) cannot run here, but its ConfigMap's configuration is checked.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::SinkExt;
use support::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A process this test started, with its stdout and stderr collected line by line; killed by
/// its PID when the test ends, however it ends.
struct Proc {
    name: &'static str,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(name: &'static str, mut command: Command) -> Proc {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound if name == "haproxy" => {
                    panic!("missing: haproxy (apt-get install haproxy)")
                }
                _ => panic!("{name} does not start: {e}"),
            });
        let lines = Arc::new(Mutex::new(Vec::new()));
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for pipe in pipes {
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        Proc { name, child, lines }
    }

    /// Fails the test, with the process's output, if it has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited ({status}):\n{}", self.name, self.log());
        }
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {} failed", self.name);
    }

    async fn exit(&mut self) -> ExitStatus {
        within(&format!("{} to exit", self.name), async {
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `deploy/<name>` with each `from` replaced by its `to`; each `from` must occur, so that the
/// example's files cannot drift from what this test rewrites.
fn rewritten(name: &str, replacements: &[(&str, String)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(name);
    let mut text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for (from, to) in replacements {
        assert!(
            text.contains(from),
            "deploy/{name} no longer holds {from:?}"
        );
        text = text.replace(from, to);
    }
    text
}

/// One GET: the status and the body, or `None` while nothing listens at `addr`.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .ok()?;
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::new())
        .unwrap();
    within(&format!("GET {path}"), async {
        let response = sender.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
}

/// An instance's open connections, from its admin API.
async fn open_connections(admin: SocketAddr) -> u64 {
    let (status, body) = get(admin, "/admin/connections")
        .await
        .expect("the admin API answers");
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["matched"].as_u64().unwrap()
}

/// HAProxy's view of the backend's servers, from its stats page: name -> (status, last check).
async fn haproxy_servers(stats: SocketAddr) -> HashMap<String, (String, String)> {
    let Some((200, csv)) = get(stats, "/stats;csv").await else {
        return HashMap::new();
    };
    let mut lines = csv.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (pxname, svname) = (column("pxname"), column("svname"));
    let (status, check) = (column("status"), column("check_status"));
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > check && f[pxname] == "framegate" && f[svname].starts_with("gw-"))
        .map(|f| {
            (
                f[svname].to_owned(),
                (f[status].to_owned(), f[check].to_owned()),
            )
        })
        .collect()
}

/// Waits until HAProxy reports `server` in a state `wanted` by its status and last check;
/// returns them.
async fn await_server(
    haproxy: &mut Proc,
    stats: SocketAddr,
    server: &str,
    what: &str,
    wanted: impl Fn(&str, &str) -> bool,
) -> (String, String) {
    within(&format!("HAProxy to see {server} {what}"), async {
        loop {
            haproxy.assert_running();
            if let Some((status, check)) = haproxy_servers(stats).await.remove(server) {
                if wanted(&status, &check) {
                    return (status, check);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A framegate instance of the example: the binary on its rewritten configuration, awaited
/// until its admin API says it is ready.
async fn instance(name: &'static str, dir: &TempDir, toml: &str, admin: SocketAddr) -> Proc {
    let config = dir.write(&format!("{name}.toml"), toml);
    let mut command = Command::new(env!("CARGO_BIN_EXE_framegate"));
    command
        .arg("--config")
        .arg(&config)
        .env("FRAMEGATE_LOG", "info");
    let mut gw = Proc::spawn(name, command);
    within(&format!("{name}'s /readyz"), async {
        loop {
            gw.assert_running();
            if let Some((200, _)) = get(admin, "/readyz").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    gw
}

async fn echoes(ws: &mut Client, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(next_text(ws).await, text);
}

#[tokio::test]
async fn two_instances_behind_haproxy_spread_drain_and_fail_over() {
    let echo = framegate::samples::spawn_echo("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let front = loopback(free_port());
    let stats = loopback(free_port());
    let listen = [loopback(free_port()), loopback(free_port())];
    let admin = [loopback(free_port()), loopback(free_port())];
    let dir = TempDir::new("deployment");

    let mut gws = Vec::new();
    for (i, (fixed_listen, fixed_admin)) in
        [("8081", "9911"), ("8082", "9912")].into_iter().enumerate()
    {
        let name = ["gw-1", "gw-2"][i];
        let toml = rewritten(
            &format!("{name}.toml"),
            &[
                (&format!("127.0.0.1:{fixed_listen}"), listen[i].to_string()),
                (&format!("127.0.0.1:{fixed_admin}"), admin[i].to_string()),
                ("127.0.0.1:9001", echo.to_string()),
            ],
        );
        gws.push(instance(name, &dir, &toml, admin[i]).await);
    }

    let cfg = rewritten(
        "haproxy.cfg",
        &[
            ("127.0.0.1:8080", front.to_string()),
            ("127.0.0.1:8404", stats.to_string()),
            ("127.0.0.1:8081", listen[0].to_string()),
            ("127.0.0.1:8082", listen[1].to_string()),
            ("port 9911", format!("port {}", admin[0].port())),
            ("port 9912", format!("port {}", admin[1].port())),
        ],
    );
    let cfg = dir.write("haproxy.cfg", &cfg);
    // Debian puts it in /usr/sbin, which a non-root PATH may lack.
    let program = match Path::new("/usr/sbin/haproxy").exists() {
        true => "/usr/sbin/haproxy",
        false => "haproxy",
    };
    let mut command = Command::new(program);
    command.arg("-db").arg("-f").arg(&cfg);
    let mut haproxy = Proc::spawn("haproxy", command);
    for server in ["gw-1", "gw-2"] {
        await_server(
            &mut haproxy,
            stats,
            server,
            "up, /readyz checked",
            |status, check| status.starts_with("UP") && check.contains("L7OK"),
        )
        .await;
    }

    // Clients one at a time, so that each one's instance is the one whose count rose.
    let mut clients: [Vec<Client>; 2] = [Vec::new(), Vec::new()];
    let mut counts = [0, 0];
    for n in 0..6 {
        let mut ws = connect(front, "/echo").await;
        echoes(&mut ws, &format!("hello {n}")).await;
        let rose = within("the new connection in an admin API", async {
            loop {
                for (i, admin) in admin.iter().enumerate() {
                    let now = open_connections(*admin).await;
                    if now > counts[i] {
                        assert_eq!(now, counts[i] + 1, "one connection at a time");
                        counts[i] = now;
                        return i;
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        clients[rose].push(ws);
    }
    assert!(
        clients.iter().all(|c| !c.is_empty()),
        "leastconn spread 6 clients as {counts:?}: both instances should have some"
    );

    // Drain gw-2: its clients are closed with 1001, gw-1's are untouched. These clients read
    // nothing after the close frame, so they never answer it and gw-2 holds them for
    // close_timeout (2 s), answering /readyz with 503 meanwhile: HAProxy's last check is then
    // L7STS, or L4CON if gw-2 has already gone. Either marks it down.
    gws[1].terminate();
    for ws in &mut clients[1] {
        let frame = expect_close(ws).await;
        assert_eq!(u16::from(frame.code), 1001, "{frame:?}");
        assert_eq!(frame.reason, "server shutting down");
    }
    let (_, check) = await_server(&mut haproxy, stats, "gw-2", "down", |status, _| {
        status.starts_with("DOWN")
    })
    .await;
    eprintln!("6 clients spread as {counts:?}; gw-2 marked down, its last check {check}");
    for (n, ws) in clients[0].iter_mut().enumerate() {
        echoes(ws, &format!("still here {n}")).await;
    }
    assert!(gws[1].exit().await.success(), "{}", gws[1].log());

    // Every new client reaches gw-1.
    let before = open_connections(admin[0]).await;
    let mut fresh = Vec::new();
    for n in 0..6 {
        let mut ws = connect(front, "/echo").await;
        echoes(&mut ws, &format!("after the drain {n}")).await;
        fresh.push(ws);
    }
    within("gw-1 to hold every new connection", async {
        while open_connections(admin[0]).await != before + 6 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    gws[0].assert_running();
    haproxy.assert_running();
    let log = haproxy.log();
    assert!(
        log.contains("gw-2 is DOWN"),
        "HAProxy's log (gw-2 DOWN, last check {check}):\n{log}"
    );
}

/// The files of the ConfigMap in deploy/kubernetes.yaml: each `  name: |` block scalar of its
/// `data`, its lines' 4-space indentation removed (enough YAML for this one file).
fn configmap_files() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    let configmap = yaml
        .split("\n---\n")
        .find(|doc| doc.contains("\nkind: ConfigMap\n"))
        .expect("deploy/kubernetes.yaml has a ConfigMap");
    let data = configmap
        .split_once("\ndata:\n")
        .expect("the ConfigMap has data")
        .1;
    let mut files: Vec<(String, String)> = Vec::new();
    for line in data.lines() {
        if let Some(name) = line
            .strip_prefix("  ")
            .and_then(|l| l.strip_suffix(": |"))
            .filter(|n| !n.starts_with(' '))
        {
            files.push((name.to_owned(), String::new()));
        } else if line.is_empty() || line.starts_with("    ") {
            let (_, text) = files.last_mut().expect("a block scalar under data");
            text.push_str(line.get(4..).unwrap_or(""));
            text.push('\n');
        } else {
            break;
        }
    }
    files
}

/// The Kubernetes example is on paper (no cluster here), but its configuration is not: the
/// ConfigMap's config.toml and policy pass `framegate check`, with the Secrets' files (the TLS
/// certificate and the admin token) made up in their place.
#[test]
fn the_kubernetes_configmap_passes_check() {
    let dir = TempDir::new("kubernetes");
    let files = configmap_files();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["config.toml", "ratelimit.lua"]);
    let ca = support::certs::Ca::new();
    ca.leaf(&["framegate.example.com"]).write(&dir, "tls");
    dir.write("admin.token", &"a".repeat(32));
    for (name, text) in &files {
        let text = text
            .replace("/etc/framegate-tls/tls.crt", "tls.pem")
            .replace("/etc/framegate-tls/tls.key", "tls.key")
            .replace("/etc/framegate-admin/admin.token", "admin.token");
        dir.write(name, &text);
    }
    let out = support::cli::framegate(&["--config", "config.toml", "check"], &dir.0);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stdout.trim(), "config.toml: OK", "{}", out.stderr);
}
