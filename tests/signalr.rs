//! SignalR through the gateway (`route.http = "proxy"`): the real `@microsoft/signalr` client
//! (node, tests/js, pinned in tests/js/package-lock.json) with default options (negotiate,
//! then WebSockets), and with `transport: LongPolling` and `ServerSentEvents`.
//!
//! There is no .NET on the test machines, so the hub is not ASP.NET Core: it is a small node
//! server, tests/js/signalr_hub.js, that speaks SignalR's negotiate (v1, with a
//! connectionToken), its three transports and the JSON hub protocol (handshake, record
//! separator 0x1e, invocations and completions) as Microsoft's specifications document them.

mod support;

use support::node::{spawn, NodeProcess};
use support::*;

/// Starts the hub and a gateway with the two routes a SignalR hub needs: `/hub/negotiate`
/// and `/hub` (the transports), both proxying HTTP.
async fn hub_and_gateway() -> (NodeProcess, framegate::Running) {
    let mut hub = spawn("signalr_hub.js", &["0"]);
    let line = hub.line().await.expect("the hub's first line");
    let port: u16 = line
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line from the hub: {line}"));
    let routes = [
        route_to(
            "/hub/negotiate",
            &format!("ws://127.0.0.1:{port}/hub/negotiate"),
            "http = \"proxy\"",
            &[],
        ),
        route_to(
            "/hub",
            &format!("ws://127.0.0.1:{port}/hub"),
            "http = \"proxy\"",
            &[],
        ),
    ];
    (hub, gateway(&routes.concat()).await)
}

/// Runs the client with `mode` and checks each step it reports.
async fn run_client(mode: &str, transport: &str) {
    let (_hub, gw) = hub_and_gateway().await;
    let url = format!("http://{}/hub", gw.local_addr());
    let mut client = spawn("signalr_client.js", &[&url, mode]);
    for want in [
        format!("connected {transport}"),
        "invoke ok".into(),
        "push ok".into(),
        "stopped".into(),
    ] {
        let line = client.line().await.unwrap_or_default();
        assert_eq!(line, want, "the {mode} client");
    }
    let metrics = gw.metrics().encode();
    assert!(
        metrics.contains(r#"framegate_http_requests_total{route="/hub/negotiate",status="200"} 1"#),
        "{metrics}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signalr_with_default_options_negotiates_then_uses_websockets() {
    run_client("default", "WebSocketTransport").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signalr_over_long_polling() {
    run_client("LongPolling", "LongPollingTransport").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signalr_over_server_sent_events() {
    run_client("ServerSentEvents", "ServerSentEventsTransport").await;
}
