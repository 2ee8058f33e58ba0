//! Connection lifetimes: at `expire` both legs get close 1001 "connection lifetime expired" and
//! TCP is dropped after a short grace; `idle_timeout` does the same with "idle timeout".

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const EXPIRED: &str = "connection lifetime expired";
const IDLE: &str = "idle timeout";

fn route(path: &str, upstream: std::net::SocketAddr, extra: &str) -> String {
    format!("[[route]]\npath = \"{path}\"\nupstream = \"ws://{upstream}/\"\n{extra}")
}

fn assert_away(
    frame: &tokio_tungstenite::tungstenite::protocol::CloseFrame,
    reason: &str,
    leg: &str,
) {
    assert_eq!(
        frame.code,
        CloseCode::Away,
        "{leg}: close code, frame {frame:?}"
    );
    assert_eq!(frame.reason.as_str(), reason, "{leg}: close reason");
}

/// After the close frame, the stream must end: the gateway drops the TCP connection.
async fn expect_end(ws: &mut Client, leg: &str) {
    loop {
        match within(&format!("{leg} stream to end"), ws.next()).await {
            None | Some(Err(_)) => return,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => panic!("{leg}: expected the end of the stream, got {other:?}"),
        }
    }
}

/// Answers the gateway's close on an upstream leg and then hangs up, as a server does (RFC 6455
/// section 7.1.1: the server closes TCP first, the gateway as client waits for that).
async fn finish_upstream(mut upstream: UpstreamWs) {
    expect_end(&mut upstream, "upstream").await;
    drop(upstream);
}

/// Sends `text` and waits for its echo; a close frame that came instead is the error.
async fn round_trip(ws: &mut Client, text: &str) -> Result<(), Message> {
    ws.send(Message::text(text)).await.expect("send");
    match next_message(ws).await {
        Some(Ok(m)) if m == Message::text(text) => Ok(()),
        Some(Ok(m @ Message::Close(_))) => Err(m),
        other => panic!("expected the echo of {text:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn expire_closes_both_legs_with_1001_and_drops_tcp() {
    let (up, mut accepted) = captured().await;
    let gw = gateway(&route("/cap", up.addr, "expire = \"300ms\"\n")).await;

    let started = Instant::now();
    let mut client = connect(gw.local_addr(), "/cap").await;
    let mut upstream = within("upstream connection", accepted.recv())
        .await
        .expect("upstream accepted");

    let (client_close, upstream_close) = tokio::join!(
        async {
            let f = expect_close(&mut client).await;
            (f, started.elapsed())
        },
        async {
            let f = expect_close(&mut upstream).await;
            (f, started.elapsed())
        },
    );
    assert_away(&client_close.0, EXPIRED, "client");
    assert_away(&upstream_close.0, EXPIRED, "upstream");
    for (leg, elapsed) in [("client", client_close.1), ("upstream", upstream_close.1)] {
        assert!(
            elapsed >= Duration::from_millis(300),
            "{leg} closed early, after {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_secs(5),
            "{leg} closed late, after {elapsed:?}"
        );
    }

    // Reading on answers the close; then the gateway drops both TCP connections.
    tokio::join!(expect_end(&mut client, "client"), finish_upstream(upstream));
}

#[tokio::test]
async fn expire_is_absolute_activity_does_not_extend_it() {
    let up = echo().await;
    let gw = gateway(&route("/echo", up.addr, "expire = \"600ms\"\n")).await;

    let started = Instant::now();
    let mut client = connect(gw.local_addr(), "/echo").await;
    let mut echoes = 0;
    let close = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match round_trip(&mut client, &format!("tick {echoes}")).await {
            Ok(()) => echoes += 1,
            Err(Message::Close(Some(frame))) => break frame,
            Err(other) => panic!("expected a close frame with a code, got {other:?}"),
        }
        assert!(
            echoes < 20,
            "still open after {echoes} round trips ({:?})",
            started.elapsed()
        );
    };
    let elapsed = started.elapsed();
    assert_away(&close, EXPIRED, "client");
    assert!(
        echoes >= 3,
        "only {echoes} round trips before the close: the test saw no activity"
    );
    assert!(
        elapsed >= Duration::from_millis(600),
        "closed early, after {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(1100),
        "activity extended the lifetime: closed after {elapsed:?}"
    );
    expect_end(&mut client, "client").await;
}

#[tokio::test]
async fn idle_timeout_is_postponed_by_activity_then_closes() {
    let up = echo().await;
    let gw = gateway(&route("/echo", up.addr, "idle_timeout = \"300ms\"\n")).await;

    let started = Instant::now();
    let mut client = connect(gw.local_addr(), "/echo").await;
    // A message every 100ms for ~700ms: each one must come back, past the 300ms idle timeout.
    let mut i = 0;
    while started.elapsed() < Duration::from_millis(700) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Err(m) = round_trip(&mut client, &format!("keepalive {i}")).await {
            panic!(
                "closed despite activity after {:?}: {m:?}",
                started.elapsed()
            );
        }
        i += 1;
    }
    let last_echo = Instant::now();
    assert!(started.elapsed() >= Duration::from_millis(700));

    let close = expect_close(&mut client).await;
    let elapsed = started.elapsed();
    assert_away(&close, IDLE, "client");
    assert!(
        elapsed >= Duration::from_millis(1000),
        "closed after {elapsed:?}, before 700ms + 300ms"
    );
    let quiet = last_echo.elapsed();
    assert!(
        quiet < Duration::from_millis(800),
        "idle close came {quiet:?} after the last message"
    );
    expect_end(&mut client, "client").await;
}

#[tokio::test]
async fn idle_timeout_closes_the_upstream_leg_too() {
    let (up, mut accepted) = captured().await;
    let gw = gateway(&route("/cap", up.addr, "idle_timeout = \"300ms\"\n")).await;

    let started = Instant::now();
    let mut client = connect(gw.local_addr(), "/cap").await;
    let mut upstream = within("upstream connection", accepted.recv())
        .await
        .expect("upstream accepted");
    let (client_close, upstream_close) =
        tokio::join!(expect_close(&mut client), expect_close(&mut upstream));
    let elapsed = started.elapsed();
    assert_away(&client_close, IDLE, "client");
    assert_away(&upstream_close, IDLE, "upstream");
    assert!(
        elapsed >= Duration::from_millis(300),
        "closed early, after {elapsed:?}"
    );
    tokio::join!(expect_end(&mut client, "client"), finish_upstream(upstream));
}

#[tokio::test]
async fn zero_expire_means_unlimited() {
    let up = echo().await;
    let gw = gateway(&route("/echo", up.addr, "expire = \"0s\"\n")).await;

    let mut client = connect(gw.local_addr(), "/echo").await;
    round_trip(&mut client, "before")
        .await
        .expect("echo right after connecting");
    // The pause is the subject of the test: nothing may close the connection meanwhile.
    tokio::time::sleep(Duration::from_millis(400)).await;
    round_trip(&mut client, "after a pause")
        .await
        .expect("connection still open after 400ms with expire = \"0s\"");
}

#[tokio::test]
async fn many_connections_each_expire_on_their_own_timer() {
    const CONNECTIONS: usize = 200;
    let up = echo().await;
    let gw = gateway(&route("/echo", up.addr, "expire = \"1s\"\n")).await;
    let addr = gw.local_addr();

    // At most 64 handshakes in flight: a burst of 200 SYNs overflows the listener's accept
    // backlog (128) and the kernel's 1s SYN retransmit would blur the timings under test.
    let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut all = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        let handshakes = handshakes.clone();
        all.spawn(async move {
            let permit = handshakes.acquire_owned().await.expect("semaphore open");
            let before = Instant::now();
            let mut client = connect(addr, "/echo").await;
            let after = Instant::now();
            drop(permit);
            let frame = expect_close(&mut client).await;
            (i, frame, before.elapsed(), after.elapsed())
        });
    }
    let mut closed = 0;
    while let Some(joined) = within("all connections to expire", all.join_next()).await {
        let (i, frame, since_before, since_after) = joined.expect("connection task");
        assert_away(&frame, EXPIRED, &format!("connection {i}"));
        assert!(
            since_before >= Duration::from_secs(1),
            "connection {i} closed early, after {since_before:?}"
        );
        assert!(
            since_before < Duration::from_millis(1900),
            "connection {i} closed late, {since_before:?} after its connect ({since_after:?} after its 101)"
        );
        closed += 1;
    }
    assert_eq!(closed, CONNECTIONS);
}

/// Issue 12: a peer that vanished without a FIN is found by `ping_interval` and
/// `ping_timeout`. The silent client gets no close frame (it is dropped, as dead), and the
/// upstream is told with 1001.
#[tokio::test]
async fn a_client_that_never_answers_pings_is_dropped_and_the_upstream_told() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, mut accepted) = captured().await;
    let gw = gateway(&route(
        "/cap",
        up.addr,
        "ping_interval = \"200ms\"\nping_timeout = \"300ms\"\n",
    ))
    .await;
    // A raw client: it upgrades, then neither reads nor writes (a vanished host).
    let mut raw = tokio::net::TcpStream::connect(gw.local_addr())
        .await
        .unwrap();
    raw.write_all(upgrade_request("/cap", "").as_bytes())
        .await
        .unwrap();
    let started = Instant::now();
    let mut upstream = within("upstream connection", accepted.recv())
        .await
        .expect("upstream accepted");
    // The upstream reads, so it answers the gateway's pings and stays alive.
    let close = expect_close(&mut upstream).await;
    let elapsed = started.elapsed();
    assert_away(&close, "client not responding", "upstream");
    assert!(
        elapsed >= Duration::from_millis(500),
        "closed after {elapsed:?}, before ping_interval + ping_timeout"
    );
    // What the client was sent: the 101, a ping, and no close frame.
    let mut seen = Vec::new();
    within("the client leg to end", async {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = raw.read(&mut chunk).await {
            seen.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let end = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(
        &seen[end..],
        &[0x89, 0x00],
        "one empty ping, no close frame"
    );
    finish_upstream(upstream).await;
}

#[tokio::test]
async fn an_upstream_that_never_answers_pings_is_dropped_and_the_client_told() {
    // It answers the 101 and then reads without ever answering.
    let up = raw_upstream(|accept| switching_head(accept).into_bytes()).await;
    let gw = gateway(&route(
        "/dead",
        up,
        "ping_interval = \"200ms\"\nping_timeout = \"200ms\"\n",
    ))
    .await;
    let mut client = connect(gw.local_addr(), "/dead").await;
    let close = expect_close(&mut client).await;
    assert_away(&close, "upstream not responding", "client");
    expect_end(&mut client, "client").await;
}

/// Peers that answer pings stay connected through many intervals; the pings and pongs are
/// no activity for `idle_timeout`, which still closes the connection on time.
#[tokio::test]
async fn peers_that_answer_pings_stay_and_pings_do_not_count_as_activity() {
    let up = echo().await;
    let gw = gateway(&route(
        "/echo",
        up.addr,
        "ping_interval = \"100ms\"\nping_timeout = \"100ms\"\nidle_timeout = \"1s\"\n",
    ))
    .await;
    let mut client = connect(gw.local_addr(), "/echo").await;
    // Timed from before the send: the gateway's idle timer starts when it relays the echo,
    // a moment before this client reads it, so a later start could see the close early.
    let last_message = Instant::now();
    round_trip(&mut client, "hello").await.expect("echo");
    let mut pings = 0;
    let close = within("the idle close", async {
        loop {
            match client.next().await {
                Some(Ok(Message::Ping(_))) => pings += 1,
                Some(Ok(Message::Close(Some(frame)))) => return frame,
                other => panic!("expected pings, then the idle close: {other:?}"),
            }
        }
    })
    .await;
    let quiet = last_message.elapsed();
    assert_away(&close, IDLE, "client");
    assert!(
        quiet >= Duration::from_millis(1000),
        "closed after {quiet:?}"
    );
    assert!(pings >= 4, "{pings} pings in {quiet:?}");
}
