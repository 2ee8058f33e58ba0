//! Graceful shutdown on SIGINT/SIGTERM: stop accepting, close open connections with 1001
//! "server shutting down", exit within `shutdown_grace`.

mod support;

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use framegate::ShutdownOutcome;
use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const SHUTTING_DOWN: &str = "server shutting down";

fn assert_shutting_down(frame: &tokio_tungstenite::tungstenite::protocol::CloseFrame, leg: &str) {
    assert_eq!(
        frame.code,
        CloseCode::Away,
        "{leg}: close code, frame {frame:?}"
    );
    assert_eq!(frame.reason.as_str(), SHUTTING_DOWN, "{leg}: close reason");
}

/// Reads on after a close frame (which sends the reply) until the stream ends.
async fn read_to_end(ws: &mut Client, leg: &str) {
    loop {
        match within(&format!("{leg} stream to end"), ws.next()).await {
            None | Some(Err(_)) => return,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => panic!("{leg}: expected the end of the stream, got {other:?}"),
        }
    }
}

async fn echo_once(ws: &mut Client, text: &str) {
    within("send", ws.send(Message::text(text)))
        .await
        .expect("send");
    match next_message(ws).await {
        Some(Ok(m)) if m == Message::text(text) => {}
        other => panic!("expected the echo of {text:?}, got {other:?}"),
    }
}

/// After shutdown nothing may be accepted: the connect fails, or an upgrade gets no 101.
async fn assert_not_accepting(addr: SocketAddr) {
    let Ok(mut stream) = within("connect after shutdown", TcpStream::connect(addr)).await else {
        return;
    };
    let _ = stream
        .write_all(upgrade_request("/echo", "").as_bytes())
        .await;
    let mut buf = Vec::new();
    let _ = within("answer after shutdown", stream.read_to_end(&mut buf)).await;
    let answer = String::from_utf8_lossy(&buf);
    assert!(
        !answer.starts_with("HTTP/1.1 101"),
        "upgraded after shutdown: {answer}"
    );
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_1001_and_drains() {
    let echo_up = echo().await;
    let (cap_up, mut accepted) = captured().await;
    let running = gateway_with_server(
        "shutdown_grace = \"5s\"\n",
        &format!(
            "[[route]]\npath = \"/echo\"\nupstream = \"ws://{}/\"\n\
             [[route]]\npath = \"/cap\"\nupstream = \"ws://{}/\"\n",
            echo_up.addr, cap_up.addr
        ),
    )
    .await;
    let addr = running.local_addr();

    let mut clients = Vec::new();
    for i in 0..3 {
        let mut ws = connect(addr, "/echo").await;
        echo_once(&mut ws, &format!("hello {i}")).await;
        clients.push(ws);
    }
    let mut cap_client = connect(addr, "/cap").await;
    let mut cap_upstream = within("upstream connection", accepted.recv())
        .await
        .expect("upstream accepted");

    let started = Instant::now();
    let shutdown = tokio::spawn(running.shutdown());

    for (i, ws) in clients.iter_mut().enumerate() {
        let frame = expect_close(ws).await;
        assert_shutting_down(&frame, &format!("echo client {i}"));
    }
    let frame = expect_close(&mut cap_client).await;
    assert_shutting_down(&frame, "captured client");
    let frame = expect_close(&mut cap_upstream).await;
    assert_shutting_down(&frame, "captured upstream");

    // Answer the closes (a server hangs up once it has replied).
    for (i, ws) in clients.iter_mut().enumerate() {
        read_to_end(ws, &format!("echo client {i}")).await;
    }
    // The gateway drops a connection's two sockets together, so both legs answer at once.
    tokio::join!(
        read_to_end(&mut cap_client, "captured client"),
        async move {
            read_to_end(&mut cap_upstream, "captured upstream").await;
            drop(cap_upstream);
        }
    );

    let outcome = within("shutdown to return", shutdown)
        .await
        .expect("shutdown task");
    assert_eq!(outcome, ShutdownOutcome::Drained);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?}, past its grace"
    );
    assert_not_accepting(addr).await;
}

/// A connection busy with traffic when shutdown starts is closed with 1001 too: the relay
/// notices shutdown on a wake-up that also moved data.
#[tokio::test]
async fn shutdown_closes_a_connection_in_the_middle_of_traffic() {
    let (cap_up, mut accepted) = captured().await;
    let running = gateway_with_server(
        "shutdown_grace = \"5s\"\n",
        &format!(
            "[[route]]\npath = \"/cap\"\nupstream = \"ws://{}/\"\n",
            cap_up.addr
        ),
    )
    .await;
    let addr = running.local_addr();
    let client = connect(addr, "/cap").await;
    let mut upstream = within("upstream connection", accepted.recv())
        .await
        .expect("upstream accepted");
    let (mut sink, mut stream) = client.split();
    // The client sends without pause, so the gateway is moving data when the token fires.
    let sender = tokio::spawn(async move {
        for i in 0..1_000_000u32 {
            if sink.send(Message::text(format!("m{i}"))).await.is_err() {
                return;
            }
        }
    });
    let first = next_message(&mut upstream).await.unwrap().unwrap();
    assert!(first.to_text().unwrap().starts_with('m'));
    let shutdown = tokio::spawn(running.shutdown());
    let frame = within("the client's close frame", async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await;
    assert_shutting_down(&frame, "busy client");
    sender.abort();
    let frame = expect_close(&mut upstream).await;
    assert_shutting_down(&frame, "busy upstream");
    drop(upstream);
    drop(stream);
    let outcome = within("shutdown to return", shutdown)
        .await
        .expect("shutdown task");
    assert_eq!(outcome, ShutdownOutcome::Drained);
}

#[tokio::test]
async fn shutdown_gives_up_after_the_grace_period() {
    let up = echo().await;
    let running = gateway_with_server(
        "shutdown_grace = \"300ms\"\nclose_timeout = \"10s\"\n",
        &format!(
            "[[route]]\npath = \"/echo\"\nupstream = \"ws://{}/\"\n",
            up.addr
        ),
    )
    .await;
    let addr = running.local_addr();
    // This client never reads, so it never answers the gateway's close frame, and the closing
    // handshake would wait for close_timeout (10s).
    let mut silent = connect(addr, "/echo").await;

    let started = Instant::now();
    let outcome = within("shutdown to return", running.shutdown()).await;
    let took = started.elapsed();
    assert_eq!(outcome, ShutdownOutcome::GraceExpired);
    assert!(
        took >= Duration::from_millis(300),
        "gave up after {took:?}, before the grace"
    );
    assert!(
        took < Duration::from_millis(1500),
        "shutdown took {took:?} with a 300ms grace"
    );

    // The gateway did try to close it.
    let frame = expect_close(&mut silent).await;
    assert_shutting_down(&frame, "silent client");
    assert_not_accepting(addr).await;
}

/// A request head that stops halfway does not hold shutdown up for `header_read_timeout`:
/// pending connections are cut at once.
#[tokio::test]
async fn shutdown_cuts_a_half_sent_request_head() {
    let up = echo().await;
    let running = gateway_with_server(
        "shutdown_grace = \"5s\"\nheader_read_timeout = \"10s\"\n",
        &route("/echo", up.addr, "", &[]),
    )
    .await;
    let mut half = TcpStream::connect(running.local_addr()).await.unwrap();
    half.write_all(b"GET /echo HTTP/1.1\r\nHost: gateway.test\r\nUpgr")
        .await
        .unwrap();
    within("the head to be pending", async {
        while running.pending_connections() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let started = Instant::now();
    let outcome = within("shutdown to return", running.shutdown()).await;
    let took = started.elapsed();
    assert_eq!(outcome, ShutdownOutcome::Drained);
    assert!(took < Duration::from_secs(1), "shutdown took {took:?}");
    let mut rest = Vec::new();
    let _ = within(
        "the half head's connection to close",
        half.read_to_end(&mut rest),
    )
    .await;
    assert!(
        !String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 101"),
        "{rest:?}"
    );
}

/// An upgrade waiting for an upstream that never answers is answered 503 at shutdown,
/// instead of holding it up for `handshake_timeout`.
#[tokio::test]
async fn shutdown_answers_503_to_an_upgrade_waiting_for_its_upstream() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = silent.accept().await {
            // Held open, never answered.
            let _ = accepted_tx.send(stream);
        }
    });
    let running = gateway_with_server(
        "shutdown_grace = \"5s\"\n",
        &route("/slow", silent_addr, "handshake_timeout = \"10s\"", &[]),
    )
    .await;
    let mut client = TcpStream::connect(running.local_addr()).await.unwrap();
    client
        .write_all(upgrade_request("/slow", "").as_bytes())
        .await
        .unwrap();
    let _upstream = within("the gateway to connect upstream", accepted.recv())
        .await
        .unwrap();
    let started = Instant::now();
    let shutdown = tokio::spawn(running.shutdown());
    let (status, head, body) = read_response(&mut client).await;
    assert_eq!(status, 503, "{head}{body}");
    assert_eq!(body, "server shutting down\n");
    assert!(head.contains("connection: close\r\n"), "{head}");
    let outcome = within("shutdown to return", shutdown).await.unwrap();
    let took = started.elapsed();
    assert_eq!(outcome, ShutdownOutcome::Drained);
    assert!(took < Duration::from_secs(1), "shutdown took {took:?}");
}

/// Kills the child process (by its PID) and removes the temp file when the test ends, however
/// it ends.
struct Spawned {
    child: Child,
    config: PathBuf,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn temp_config(contents: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let path = std::env::temp_dir().join(format!(
        "framegate-shutdown-{}-{nanos}.toml",
        std::process::id()
    ));
    std::fs::write(&path, contents).unwrap();
    path
}

#[tokio::test]
async fn sigterm_closes_connections_and_the_binary_exits_cleanly() {
    let up = echo().await;
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = temp_config(&format!(
        "[server]\nlisten = [\"{addr}\"]\nshutdown_grace = \"3s\"\n\n\
         [[route]]\npath = \"/echo\"\nupstream = \"ws://{}/\"\n",
        up.addr
    ));
    let child = Command::new(env!("CARGO_BIN_EXE_framegate"))
        .arg("--config")
        .arg(&config)
        .args(["--log-format", "json"])
        .env("FRAMEGATE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("framegate starts");
    let mut spawned = Spawned { child, config };
    let pid = spawned.child.id();

    // Wait for the process to listen.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            break;
        }
        if let Some(status) = spawned.child.try_wait().unwrap() {
            panic!("framegate exited before listening: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "framegate did not listen on {addr} within 10s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut ws = connect(addr, "/echo").await;
    echo_once(&mut ws, "hello").await;

    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM {pid} failed");
    let signalled = Instant::now();

    let frame = expect_close(&mut ws).await;
    assert_shutting_down(&frame, "client");
    read_to_end(&mut ws, "client").await;

    let exit = loop {
        if let Some(status) = spawned.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(3),
            "framegate still running {:?} after SIGTERM (shutdown_grace is 3s)",
            signalled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "framegate exited with {exit}");

    let mut stderr = String::new();
    spawned
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let line = |message: &str| {
        stderr
            .lines()
            .find(|l| l.contains(&format!("\"message\":\"{message}\"")))
            .unwrap_or_else(|| panic!("no {message:?} log line in:\n{stderr}"))
            .to_owned()
    };
    let opened = line("connection opened");
    assert!(
        opened.starts_with('{') && opened.ends_with('}'),
        "not a JSON line: {opened}"
    );
    assert!(opened.contains("\"route\":\"/echo\""), "{opened}");
    let closed = line("connection closed");
    assert!(
        closed.starts_with('{') && closed.ends_with('}'),
        "not a JSON line: {closed}"
    );
    for field in [
        "\"route\":\"/echo\"".to_owned(),
        "\"client\":\"127.0.0.1:".to_owned(),
        format!("\"upstream\":\"ws://{}/\"", up.addr),
        "\"duration_ms\":".to_owned(),
        "\"msgs_in\":1,".to_owned(),
        "\"bytes_in\":5,".to_owned(),
        "\"msgs_out\":1,".to_owned(),
        "\"bytes_out\":5,".to_owned(),
        "\"code\":1001,".to_owned(),
        format!("\"reason\":\"{SHUTTING_DOWN}\""),
        "\"closed_by\":\"gateway\"".to_owned(),
    ] {
        assert!(closed.contains(&field), "{field} missing from {closed}");
    }
}
