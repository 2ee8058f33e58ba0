//! Logging through the real binary: `FRAMEGATE_LOG` that does not parse is an error, and what
//! a client sends and a policy logs cannot forge a log line.

mod support;

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use support::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_line_break_a_client_sent_does_not_start_a_log_line() {
    let up = echo().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = TempDir::new("policy-log");
    let policy = dir.write(
        "log.lua",
        "return function(msg) gw.log.info('client said:', msg.data) print(msg.data) end",
    );
    let config = dir.write(
        "framegate.toml",
        &format!(
            "[server]\nlisten = [\"{addr}\"]\nshutdown_grace = \"1s\"\n\n[[route]]\n\
             path = \"/echo\"\nupstream = \"ws://{}/\"\nmime_type = \"text/plain\"\n\
             [route.policies]\non_client_frame = {:?}\n",
            up.addr,
            policy.display().to_string()
        ),
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
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        assert!(child.try_wait().unwrap().is_none(), "framegate exited");
        assert!(Instant::now() < deadline, "framegate does not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let forged = "hi\r\n2026-01-01T00:00:00.000000Z  WARN framegate::proxy::close: forged\x1b[2J";
    let mut ws = connect(addr, "/echo").await;
    ws.send(Message::text(forged)).await.unwrap();
    assert_eq!(next_text(&mut ws).await, forged);
    ws.close(None).await.unwrap();

    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "framegate did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let logged: Vec<&str> = stderr.lines().filter(|l| l.contains("forged")).collect();
    assert_eq!(logged.len(), 2, "one line per call:\n{stderr}");
    for line in logged {
        assert!(
            line.contains("framegate::policy: "),
            "a forged line: {line}\n{stderr}"
        );
        assert!(
            line.contains(
                r"hi\r\n2026-01-01T00:00:00.000000Z  WARN framegate::proxy::close: forged\u{1b}[2J"
            ),
            "not escaped: {line}"
        );
    }
}

#[test]
fn an_unparsable_framegate_log_stops_the_binary_with_an_error() {
    let dir = TempDir::new("bad-log");
    let config = dir.write(
        "framegate.toml",
        "[[route]]\npath = \"/echo\"\nupstream = \"ws://127.0.0.1:9/\"\n",
    );
    for (value, ok) in [("info,=", false), ("framegate=loud", false), ("warn", true)] {
        let out = Command::new(env!("CARGO_BIN_EXE_framegate"))
            .arg("--config")
            .arg(&config)
            .arg("check")
            .env("FRAMEGATE_LOG", value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), ok, "FRAMEGATE_LOG={value}: {stderr}");
        if !ok {
            assert_eq!(out.status.code(), Some(1), "FRAMEGATE_LOG={value}");
            assert!(
                stderr.starts_with(&format!("error: invalid FRAMEGATE_LOG {value:?}")),
                "{stderr}"
            );
        }
    }
}
