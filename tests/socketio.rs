//! Socket.IO through the gateway (`route.http = "proxy"`): the real `socket.io-client` with its
//! default transports against a real `socket.io` server (node, tests/js), both pinned in
//! tests/js/package-lock.json. The client connects by HTTP long-polling, upgrades to
//! WebSocket, echoes text and binary, gets an acknowledgement, and reconnects after the server
//! is killed and started again on the same port.

mod support;

use support::node::{spawn, NodeProcess};
use support::*;

/// Starts the Socket.IO server on `port` (0: any) and returns it with the port it took.
async fn server(port: u16) -> (NodeProcess, u16) {
    let mut server = spawn("socketio_server.js", &[&port.to_string()]);
    let line = server.line().await.expect("the server's first line");
    let port = line
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line from the server: {line}"));
    (server, port)
}

/// The client's next line, which must be `want` (or start with it, when it ends in a space).
async fn expect_line(client: &mut NodeProcess, want: &str) -> String {
    let line = client.line().await.unwrap_or_default();
    let ok = match want.strip_suffix(' ') {
        Some(prefix) => line.starts_with(prefix),
        None => line == want,
    };
    assert!(ok, "the client said {line:?}, expected {want:?}");
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_io_polls_upgrades_echoes_acks_and_reconnects_after_a_server_restart() {
    let (first, port) = server(0).await;
    let gw = gateway(&route_to(
        "/socket.io/",
        &format!("ws://127.0.0.1:{port}/socket.io/"),
        "http = \"proxy\"",
        &[],
    ))
    .await;
    let url = format!("http://{}", gw.local_addr());
    let mut client = spawn("socketio_client.js", &[&url]);
    // Polling first: Socket.IO's first requests are plain HTTP.
    expect_line(&mut client, "connected polling").await;
    expect_line(&mut client, "upgraded websocket").await;
    expect_line(&mut client, "echo ok").await;
    expect_line(&mut client, "ack ok").await;
    expect_line(&mut client, "binary ok").await;
    expect_line(&mut client, "wait restart").await;

    drop(first);
    expect_line(&mut client, "disconnected").await;
    let (_second, again) = server(port).await;
    assert_eq!(again, port);
    expect_line(&mut client, "reconnected ").await;
    expect_line(&mut client, "echo ok").await;
    expect_line(&mut client, "done").await;

    let metrics = gw.metrics().encode();
    assert!(
        metrics.contains(r#"framegate_http_requests_total{route="/socket.io/",status="200"}"#),
        "{metrics}"
    );
    gw.shutdown().await;
}

/// Issue 15's sticky part: Socket.IO needs a client's polls and its upgrade on one server.
/// Two real servers behind one route on a pool with `sticky_cookie`; four real clients with
/// default transports (and a cookie jar, as browsers have) each poll, get acks, upgrade to
/// WebSocket and echo on one server, and the round robin spreads them over both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_pool_keeps_each_client_s_polls_and_upgrade_on_one_of_two_servers() {
    let (_one, a) = server(0).await;
    let (_two, b) = server(0).await;
    let gw = gateway(&format!(
        "[[upstream]]\nname = \"sio\"\nendpoints = [\"ws://127.0.0.1:{a}\", \"ws://127.0.0.1:{b}\"]\n\
         sticky_cookie = \"fg_sio\"\n\n\
         [[route]]\npath = \"/socket.io/\"\nupstream = \"sio\"\nhttp = \"proxy\"\n"
    ))
    .await;
    let url = format!("http://{}", gw.local_addr());
    let mut client = spawn("socketio_sticky.js", &[&url, "4"]);
    let mut ports = Vec::new();
    for i in 0..4 {
        let line = expect_line(&mut client, &format!("client {i} websocket ")).await;
        ports.push(line.rsplit(' ').next().unwrap().parse::<u16>().unwrap());
    }
    expect_line(&mut client, "done").await;
    let on = |p: u16| ports.iter().filter(|&&q| q == p).count();
    assert_eq!((on(a), on(b)), (2, 2), "{ports:?}");
    gw.shutdown().await;
}
