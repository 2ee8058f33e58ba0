//! Signals to the real binary: SIGHUP reloads the configuration (and never ends the process),
//! and SIGTERM ends it within `shutdown_grace` even while a worker is stuck in a
//! policy, or at once on a second SIGTERM.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::SinkExt;
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// The framegate binary, killed by its PID when the test ends however it ends, with its
/// stderr collected line by line.
struct Gateway {
    child: Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    /// Starts the binary with `[server]` keys and routes, and waits until it listens.
    async fn start(name: &str, server: &str, routes: &str) -> Gateway {
        let dir = TempDir::new(name);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config: PathBuf = dir.write(
            "config.toml",
            &format!("[server]\nlisten = [\"{addr}\"]\n{server}\n{routes}"),
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_framegate"))
            .arg("--config")
            .arg(&config)
            .env("FRAMEGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("framegate starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut gateway = Gateway {
            child,
            addr,
            lines,
            _dir: dir,
        };
        gateway.line("listening").await;
        assert!(gateway.child.try_wait().unwrap().is_none());
        gateway
    }

    /// Waits for a log line containing `needle` and returns it.
    async fn line(&self, needle: &str) -> String {
        within(&format!("a log line with {needle:?}"), async {
            loop {
                if let Some(line) = self
                    .lines
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|l| l.contains(needle))
                {
                    return line.clone();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// How many log lines so far contain `needle`.
    fn count(&self, needle: &str) -> usize {
        let lines = self.lines.lock().unwrap();
        lines.iter().filter(|l| l.contains(needle)).count()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits (bounded) for the process to exit.
    async fn exit(&mut self) -> ExitStatus {
        within("framegate to exit", async {
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

async fn echo_once(addr: SocketAddr, text: &str) {
    let mut ws = connect(addr, "/echo").await;
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(next_text(&mut ws).await, text);
}

#[tokio::test]
async fn sighup_reloads_and_a_broken_config_changes_nothing() {
    let up = echo().await;
    let mut gw = Gateway::start("hup", "", &route("/echo", up.addr, "", &[])).await;
    let mut open = connect(gw.addr, "/echo").await;
    let config = gw._dir.0.join("config.toml");
    let head = format!("[server]\nlisten = [\"{}\"]\n", gw.addr);

    // A route added on disk serves after SIGHUP.
    // `workers` changes too: that needs a restart, which the reload says.
    let two = format!(
        "{head}workers = 7\n{}{}",
        route("/echo", up.addr, "", &[]),
        route("/added", up.addr, "", &[])
    );
    std::fs::write(&config, &two).unwrap();
    gw.signal("HUP");
    let line = gw.line("configuration reloaded").await;
    assert!(line.contains("snapshot=2"), "{line}");
    assert!(line.contains("/added"), "{line}");
    let line = gw.line("only take effect after a restart").await;
    assert!(line.contains("server.workers"), "{line}");
    echo_once_at(gw.addr, "/added", "on the added route").await;

    // A broken file: logged once with its position; snapshot 2 keeps serving.
    std::fs::write(
        &config,
        format!("{two}\n[[route]]\npath = \"/x\"\nupstream = 5\n"),
    )
    .unwrap();
    gw.signal("HUP");
    let line = gw.line("reload failed").await;
    assert!(line.contains("config.toml:"), "{line}");
    assert!(line.contains("snapshot=2"), "{line}");
    echo_once_at(gw.addr, "/added", "still served").await;
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "SIGHUP ended the process"
    );
    // The connection opened before both reloads is served as before.
    open.send(Message::text("still open")).await.unwrap();
    assert_eq!(next_text(&mut open).await, "still open");
    assert_eq!(gw.count("reload failed"), 1, "one line per failure");

    gw.signal("TERM");
    assert!(gw.exit().await.success());
}

async fn echo_once_at(addr: SocketAddr, path: &str, text: &str) {
    let mut ws = connect(addr, path).await;
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(next_text(&mut ws).await, text);
}

const SPIN: &str = "return function(msg) while true do end end\n";

/// A gateway whose `/spin` route stalls its worker for 30 s on the first message.
async fn stuck(name: &str, grace: &str) -> (Gateway, support::Client) {
    let up = echo().await;
    let dir = TempDir::new(name);
    let spin = dir.write("spin.lua", SPIN);
    let gw = Gateway::start(
        name,
        &format!("workers = 2\nwatchdog_timeout = \"300ms\"\nshutdown_grace = \"{grace}\"\n"),
        &format!(
            "{}{}",
            route(
                "/spin",
                up.addr,
                "policy_cpu_limit = \"30s\"",
                &[(
                    "on_client_frame",
                    &format!("{:?}", spin.display().to_string())
                )]
            ),
            route("/echo", up.addr, "", &[]),
        ),
    )
    .await;
    let mut spinning = connect(gw.addr, "/spin").await;
    spinning.send(Message::text("spin")).await.unwrap();
    let line = gw.line("worker stalled").await;
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains("worker=") && line.contains("stalled_for_ms="),
        "{line}"
    );
    // Still serving on the other worker.
    echo_once(gw.addr, "while stuck").await;
    drop(dir);
    (gw, spinning)
}

#[tokio::test]
async fn sigterm_ends_the_process_within_its_grace_while_a_worker_is_stuck() {
    let (mut gw, _spinning) = stuck("stuck-term", "500ms").await;
    let signalled = Instant::now();
    gw.signal("TERM");
    let status = gw.exit().await;
    let took = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_millis(1500),
        "exited {took:?} after SIGTERM, with a 500ms grace"
    );
    gw.line("worker still busy at the end of shutdown; abandoned")
        .await;
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once_while_a_worker_is_stuck() {
    let (mut gw, _spinning) = stuck("stuck-term-twice", "30s").await;
    gw.signal("TERM");
    gw.line("shutting down").await;
    let signalled = Instant::now();
    gw.signal("TERM");
    let status = gw.exit().await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(
        took < Duration::from_secs(1),
        "exited {took:?} after the second SIGTERM"
    );
    gw.line("second signal: exiting now").await;
}
