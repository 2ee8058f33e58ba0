//! Issue 2, point 1: the upgrade, and every way it can be refused.

mod support;

use std::time::Duration;

use support::*;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite;

#[tokio::test]
async fn upgrade_reaches_the_upstream_and_messages_flow() {
    let up = echo().await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/echo\"\nupstream = \"ws://{}/\"\n",
        up.addr
    ))
    .await;
    let mut ws = connect(gw.local_addr(), "/echo").await;
    use futures_util::SinkExt;
    ws.send(tungstenite::Message::text("ping?")).await.unwrap();
    assert_eq!(
        next_message(&mut ws).await.unwrap().unwrap(),
        tungstenite::Message::text("ping?")
    );
}

#[tokio::test]
async fn client_gets_101_only_after_the_upstream_accepted() {
    // The upstream holds the handshake until the test releases it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (got_request_tx, mut got_request) = tokio::sync::mpsc::unbounded_channel();
    let (release_tx, release) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        // Read the request head, report it, then wait for the release before answering.
        let mut buf = vec![0u8; 4096];
        let mut seen = 0;
        loop {
            use tokio::io::AsyncReadExt;
            let n = stream.read(&mut buf[seen..]).await.unwrap();
            seen += n;
            if buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        got_request_tx.send(()).unwrap();
        release.await.unwrap();
        let head = String::from_utf8_lossy(&buf[..seen]).to_string();
        let key = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("sec-websocket-key: ")
                    .or_else(|| l.strip_prefix("Sec-WebSocket-Key: "))
            })
            .unwrap()
            .trim()
            .to_owned();
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        use tokio::io::AsyncWriteExt;
        stream
            .write_all(switching_head(&accept).as_bytes())
            .await
            .unwrap();
        // Keep the connection open while the client looks at it.
        let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
    });
    let gw = gateway(&format!(
        "[[route]]\npath = \"/slow\"\nupstream = \"ws://{addr}/\"\n"
    ))
    .await;
    let gw_addr = gw.local_addr();
    let client = tokio::spawn(async move { connect_with(gw_addr, "/slow", &[]).await.map(|_| ()) });
    within("upstream to see the request", got_request.recv())
        .await
        .unwrap();
    // The upstream has not answered, so the client must still be waiting for its 101.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !client.is_finished(),
        "client was answered before the upstream accepted"
    );
    release_tx.send(()).unwrap();
    within("client 101", client)
        .await
        .unwrap()
        .expect("upgrade completes after the upstream accepted");
}

#[tokio::test]
async fn plain_http_on_a_route_gets_426() {
    let up = echo().await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/echo\"\nupstream = \"ws://{}/\"\n",
        up.addr
    ))
    .await;
    let (status, head, body) =
        raw_http(gw.local_addr(), "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 426);
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    assert_eq!(body.trim(), "this path accepts WebSocket connections only");
}

#[tokio::test]
async fn no_matching_route_gets_404() {
    let up = echo().await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/echo\"\nupstream = \"ws://{}/\"\n",
        up.addr
    ))
    .await;
    let (status, _, body) = raw_http(gw.local_addr(), &upgrade_request("/nowhere", "")).await;
    assert_eq!(status, 404);
    assert_eq!(body.trim(), "no route for /nowhere");
}

#[tokio::test]
async fn refused_tcp_connection_gets_502() {
    let port = closed_port().await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/x\"\nupstream = \"ws://{port}/\"\n"
    ))
    .await;
    let (status, _, _) = raw_http(gw.local_addr(), &upgrade_request("/x", "")).await;
    assert_eq!(status, 502);
}

#[tokio::test]
async fn upstream_handshake_timeout_gets_504() {
    // Accepts TCP but never answers the handshake.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let gw = gateway(&format!(
        "[[route]]\npath = \"/x\"\nupstream = \"ws://{addr}/\"\nhandshake_timeout = \"300ms\"\n"
    ))
    .await;
    let started = std::time::Instant::now();
    let (status, _, _) = raw_http(gw.local_addr(), &upgrade_request("/x", "")).await;
    assert_eq!(status, 504);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn upstream_refusal_status_headers_and_body_are_relayed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let body = "tenant suspended";
            let _ = s
                .write_all(format!("HTTP/1.1 403 Forbidden\r\nX-Reason: suspended\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
                .await;
        }
    });
    let gw = gateway(&format!(
        "[[route]]\npath = \"/x\"\nupstream = \"ws://{addr}/\"\n"
    ))
    .await;
    let (status, head, body) = raw_http(gw.local_addr(), &upgrade_request("/x", "")).await;
    assert_eq!(status, 403);
    assert!(
        head.to_ascii_lowercase().contains("x-reason: suspended"),
        "{head}"
    );
    assert_eq!(body, "tenant suspended");

    // The same through a real WebSocket client.
    match connect_with(gw.local_addr(), "/x", &[]).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("expected an HTTP refusal, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn malformed_upgrades_get_precise_statuses() {
    let up = echo().await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/x\"\nupstream = \"ws://{}/\"\n",
        up.addr
    ))
    .await;
    let addr = gw.local_addr();

    let (status, head, _) = raw_http(
        addr,
        &upgrade_request("/x", "").replace("Version: 13", "Version: 8"),
    )
    .await;
    assert_eq!(status, 426);
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{head}"
    );

    let (status, _, body) = raw_http(
        addr,
        &upgrade_request("/x", "").replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("missing Sec-WebSocket-Key"), "{body}");

    let (status, _, _) = raw_http(
        addr,
        &upgrade_request("/x", "").replace("dGhlIHNhbXBsZSBub25jZQ==", "short"),
    )
    .await;
    assert_eq!(status, 400);

    let (status, _, _) = raw_http(
        addr,
        &upgrade_request("/x", "").replace("Connection: Upgrade", "Connection: keep-alive"),
    )
    .await;
    assert_eq!(status, 400);

    let (status, head, _) = raw_http(addr, &upgrade_request("/x", "").replace("GET", "POST")).await;
    assert_eq!(status, 405);
    assert!(head.to_ascii_lowercase().contains("allow: get"), "{head}");

    // Garbage is answered (or the connection dropped) without disturbing anyone else.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"\x16\x03\x01\x00\xff garbage \r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = within("garbage answer", s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 400"),
            "{text}"
        );
    }
    let mut ws = connect(addr, "/x").await;
    use futures_util::SinkExt;
    ws.send(tungstenite::Message::text("still fine"))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut ws).await.unwrap().unwrap(),
        tungstenite::Message::text("still fine")
    );
}

#[tokio::test]
async fn a_long_refusal_body_is_truncated_to_64_kib() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let body = "x".repeat(70_000);
            let _ = s
                .write_all(
                    format!(
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        }
    });
    let gw = gateway(&format!(
        "[[route]]\npath = \"/x\"\nupstream = \"ws://{addr}/\"\n"
    ))
    .await;
    let (status, _, body) = raw_http(gw.local_addr(), &upgrade_request("/x", "")).await;
    assert_eq!(status, 503);
    assert_eq!(body.len(), 64 * 1024);
}

#[tokio::test]
async fn a_chunked_refusal_body_is_relayed_de_chunked() {
    let addr = raw_upstream(|_| {
        b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\nX-Reason: slow down\r\n\r\n\
          6\r\nslow d\r\n5;ext=1\r\nown, \r\nb\r\nplease wait\r\n0\r\n\r\n"
            .to_vec()
    })
    .await;
    let gw = gateway(&route("/x", addr, "", &[])).await;
    // The upstream keeps its connection open: the last chunk, not the end of the connection,
    // ends the body.
    let (status, head, body) = raw_http(gw.local_addr(), &upgrade_request("/x", "")).await;
    assert_eq!(status, 429);
    let head = head.to_ascii_lowercase();
    assert!(head.contains("x-reason: slow down"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert_eq!(body, "slow down, please wait");
}

#[tokio::test]
async fn a_frame_sent_with_the_101_reaches_the_client() {
    let addr = raw_upstream(|accept| {
        let mut answer = switching_head(accept).into_bytes();
        // An unmasked text frame "first", in the same write as the head.
        answer.extend_from_slice(b"\x81\x05first");
        answer
    })
    .await;
    let gw = gateway(&route("/x", addr, "", &[])).await;
    let mut ws = connect(gw.local_addr(), "/x").await;
    assert_eq!(next_text(&mut ws).await, "first");
}

#[tokio::test]
async fn interim_answers_before_the_101_are_skipped() {
    let addr = raw_upstream(|accept| {
        let mut answer =
            format!("HTTP/1.1 100 Continue\r\n\r\n{}", switching_head(accept)).into_bytes();
        answer.extend_from_slice(b"\x81\x02ok");
        answer
    })
    .await;
    let gw = gateway(&route("/x", addr, "", &[])).await;
    let mut ws = connect(gw.local_addr(), "/x").await;
    assert_eq!(next_text(&mut ws).await, "ok");
}

#[tokio::test]
async fn a_garbage_response_head_gets_502() {
    // Not HTTP at all, and the connection stays open: only parsing can end the wait in time.
    let addr = raw_upstream(|_| b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec()).await;
    let gw = gateway(&route("/x", addr, "", &[])).await;
    let (status, _, body) = raw_http(gw.local_addr(), &upgrade_request("/x", "")).await;
    assert_eq!(status, 502);
    assert_eq!(body.trim(), "bad gateway: upstream unavailable");
}

#[tokio::test]
async fn a_response_head_cut_short_gets_502() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgr")
                .await;
            // Dropped here: the head never ends.
        }
    });
    let gw = gateway(&route("/x", addr, "", &[])).await;
    let (status, _, _) = raw_http(gw.local_addr(), &upgrade_request("/x", "")).await;
    assert_eq!(status, 502);
}
