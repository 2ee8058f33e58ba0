//! Issue 2, point 4: the relay is faithful, and every way a leg can misbehave ends cleanly.

mod support;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{Bytes, Message};

async fn pair(extra: &str) -> (framegate::Running, Client, UpstreamWs) {
    let (up, mut conns) = captured().await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/x\"\nupstream = \"ws://{}/\"\n{extra}",
        up.addr
    ))
    .await;
    let client = connect(gw.local_addr(), "/x").await;
    let upstream = within("upstream connection", conns.recv()).await.unwrap();
    (gw, client, upstream)
}

/// The gateway's close frame on an upstream leg; the upstream then answers it (tungstenite
/// sends its reply on the next poll) and the stream ends.
async fn upstream_close(
    upstream: &mut UpstreamWs,
) -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
    let frame = expect_close(upstream).await;
    let _ = within("the upstream's close reply", upstream.next()).await;
    frame
}

fn payloads() -> Vec<Message> {
    let mut out = Vec::new();
    for i in 0..200u32 {
        let len = [0usize, 1, 125, 126, 65535, 65536, 200_000][i as usize % 7];
        if i % 2 == 0 {
            let text: String = (0..len)
                .map(|j| char::from(b'a' + ((i as usize + j) % 26) as u8))
                .collect();
            out.push(Message::text(text + "é"));
        } else {
            out.push(Message::binary(
                (0..len)
                    .map(|j| (i as usize * 31 + j) as u8)
                    .collect::<Vec<_>>(),
            ));
        }
    }
    out
}

#[tokio::test]
async fn text_and_binary_are_byte_exact_and_in_order_both_ways() {
    let (_gw, mut client, mut upstream) = pair("").await;
    let messages = payloads();
    let expected = messages.clone();
    let to_up = messages.clone();
    let sender = tokio::spawn(async move {
        for m in to_up {
            client.send(m).await.unwrap();
        }
        client
    });
    for want in &expected {
        assert_eq!(&next_message(&mut upstream).await.unwrap().unwrap(), want);
    }
    let mut client = within("client sender", sender).await.unwrap();
    let to_client = messages.clone();
    let sender = tokio::spawn(async move {
        for m in to_client {
            upstream.send(m).await.unwrap();
        }
    });
    for want in &expected {
        assert_eq!(&next_message(&mut client).await.unwrap().unwrap(), want);
    }
    within("upstream sender", sender).await.unwrap();
}

#[tokio::test]
async fn fragmented_messages_are_reassembled() {
    let (_gw, mut client, mut upstream) = pair("").await;
    client
        .send(Message::Frame(Frame::message(
            Bytes::from_static(b"hel"),
            OpCode::Data(Data::Text),
            false,
        )))
        .await
        .unwrap();
    client
        .send(Message::Ping(Bytes::from_static(b"between fragments")))
        .await
        .unwrap();
    client
        .send(Message::Frame(Frame::message(
            Bytes::from_static(b"lo "),
            OpCode::Data(Data::Continue),
            false,
        )))
        .await
        .unwrap();
    client
        .send(Message::Frame(Frame::message(
            Bytes::from_static(b"world"),
            OpCode::Data(Data::Continue),
            true,
        )))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("hello world")
    );
}

#[tokio::test]
async fn oversized_message_gets_1009_and_closes_the_other_leg() {
    let (_gw, mut client, mut upstream) = pair("max_message_size = \"1KiB\"\n").await;
    client.send(Message::binary(vec![7u8; 1024])).await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap().len(),
        1024,
        "exactly the limit passes"
    );
    client.send(Message::binary(vec![7u8; 1025])).await.unwrap();
    // Both at once: the client's close follows the upstream's close reply.
    let (to_client, to_upstream) =
        tokio::join!(expect_close(&mut client), upstream_close(&mut upstream));
    assert_eq!(u16::from(to_client.code), 1009);
    assert_eq!(to_client.reason.as_str(), "message too big");
    assert_eq!(u16::from(to_upstream.code), 1001);
}

#[tokio::test]
async fn oversized_fragmented_message_from_upstream_gets_1009() {
    let (_gw, mut client, mut upstream) = pair("max_message_size = \"1KiB\"\n").await;
    for i in 0..3 {
        let op = if i == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        upstream
            .send(Message::Frame(Frame::message(vec![1u8; 500], op, i == 2)))
            .await
            .unwrap();
    }
    assert_eq!(u16::from(expect_close(&mut upstream).await.code), 1009);
    // The upstream's fault, and the client is told so.
    let to_client = expect_close(&mut client).await;
    assert_eq!(
        (u16::from(to_client.code), to_client.reason.as_str()),
        (1011, "upstream sent a message too big")
    );
}

#[tokio::test]
async fn pings_are_answered_on_each_leg_and_not_forwarded() {
    let (_gw, mut client, mut upstream) = pair("").await;
    client
        .send(Message::Ping(Bytes::from_static(b"c")))
        .await
        .unwrap();
    match within("pong", client.next()).await {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"c"),
        other => panic!("expected a pong, got {other:?}"),
    }
    upstream
        .send(Message::Ping(Bytes::from_static(b"u")))
        .await
        .unwrap();
    // Nothing else is in flight, so the upstream's next frame is the gateway's pong.
    match within("upstream pong", upstream.next()).await {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"u"),
        other => panic!("expected a pong, got {other:?}"),
    }
    client.send(Message::text("after ping")).await.unwrap();
    assert_eq!(
        within("data", upstream.next()).await.unwrap().unwrap(),
        Message::text("after ping")
    );
    // The upstream's ping never reached the client: its next frame is the upstream's data.
    upstream.send(Message::text("reply")).await.unwrap();
    assert_eq!(
        within("client data", client.next()).await.unwrap().unwrap(),
        Message::text("reply")
    );
}

#[tokio::test]
async fn client_close_reaches_the_upstream_with_code_and_reason() {
    let (_gw, mut client, mut upstream) = pair("").await;
    client.send(Message::text("last words")).await.unwrap();
    client
        .close(Some(close_frame(4000, "bye now")))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("last words")
    );
    let frame = expect_close(&mut upstream).await;
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (4000, "bye now")
    );
    // The client's own closing handshake completes: its stream ends after the echoed close.
    let echoed = expect_close(&mut client).await;
    assert_eq!(u16::from(echoed.code), 4000);
    assert!(within("client end", client.next()).await.is_none());
}

#[tokio::test]
async fn upstream_close_reaches_the_client_with_code_and_reason() {
    let (_gw, mut client, mut upstream) = pair("").await;
    upstream
        .close(Some(close_frame(4001, "maintenance")))
        .await
        .unwrap();
    let frame = expect_close(&mut client).await;
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (4001, "maintenance")
    );
    assert!(within("client end", client.next()).await.is_none());
    let echoed = expect_close(&mut upstream).await;
    assert_eq!(u16::from(echoed.code), 4001);
}

#[tokio::test]
async fn vanished_upstream_gives_the_client_1011() {
    let (_gw, mut client, upstream) = pair("").await;
    drop(upstream);
    let frame = expect_close(&mut client).await;
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1011, "upstream connection lost")
    );
}

#[tokio::test]
async fn vanished_client_closes_the_upstream_with_1001() {
    let (_gw, client, mut upstream) = pair("").await;
    drop(client);
    let frame = expect_close(&mut upstream).await;
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1001, "client connection lost")
    );
}

#[tokio::test]
async fn invalid_utf8_text_gets_1007() {
    let (_gw, mut client, mut upstream) = pair("").await;
    // Sent together, so that both arrive in one read: the good message still goes through.
    client.feed(Message::text("before")).await.unwrap();
    client
        .feed(Message::Frame(Frame::message(
            Bytes::from_static(&[0xff, 0xfe, 0x41]),
            OpCode::Data(Data::Text),
            true,
        )))
        .await
        .unwrap();
    client.flush().await.unwrap();
    assert_eq!(
        next_message(&mut upstream).await.unwrap().unwrap(),
        Message::text("before")
    );
    // Both at once: the client's close follows the upstream's close reply.
    let (frame, to_upstream) =
        tokio::join!(expect_close(&mut client), upstream_close(&mut upstream));
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1007, "invalid UTF-8 in text message")
    );
    assert_eq!(u16::from(to_upstream.code), 1001);
}

#[tokio::test]
async fn a_failing_connection_does_not_disturb_others() {
    let (up, mut conns) = captured().await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/x\"\nupstream = \"ws://{}/\"\nmax_message_size = \"100\"\n",
        up.addr
    ))
    .await;
    let mut good = connect(gw.local_addr(), "/x").await;
    let mut good_up = within("upstream", conns.recv()).await.unwrap();
    let mut bad = connect(gw.local_addr(), "/x").await;
    let mut bad_up = within("upstream", conns.recv()).await.unwrap();
    // The bad connection's upstream answers the gateway's close, as a server does.
    tokio::spawn(async move { while bad_up.next().await.is_some() {} });
    bad.send(Message::binary(vec![0u8; 101])).await.unwrap();
    assert_eq!(u16::from(expect_close(&mut bad).await.code), 1009);
    good.send(Message::text("unaffected")).await.unwrap();
    assert_eq!(
        next_message(&mut good_up).await.unwrap().unwrap(),
        Message::text("unaffected")
    );
}

/// A 101 for `accept`, then the first `sent` payload bytes of a binary frame whose header
/// announces `announced`.
fn answer_with_cut_frame(accept: &str, announced: usize, sent: usize) -> Vec<u8> {
    let mut bytes = switching_head(accept).into_bytes();
    bytes.extend_from_slice(&[0x82, 127]);
    bytes.extend_from_slice(&(announced as u64).to_be_bytes());
    bytes.extend(std::iter::repeat_n(7u8, sent));
    bytes
}

/// An upstream that answers with [`answer_with_cut_frame`] and keeps the connection open.
async fn upstream_cut_mid_frame(announced: usize, sent: usize) -> std::net::SocketAddr {
    raw_upstream(move |accept| answer_with_cut_frame(accept, announced, sent)).await
}

/// A raw TCP client that has sent `upgrade_request("/x")` to the gateway at `gw`, and the bytes
/// that followed the 101 head, read until at least `body_len` of them came.
async fn raw_upgrade(
    gw: std::net::SocketAddr,
    body_len: usize,
    what: &str,
) -> (tokio::net::TcpStream, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(gw).await.unwrap();
    raw.write_all(upgrade_request("/x", "").as_bytes())
        .await
        .unwrap();
    let mut seen = Vec::new();
    within(what, async {
        let mut chunk = vec![0u8; 65536];
        while seen
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .is_none_or(|end| seen.len() < end + 4 + body_len)
        {
            let n = raw.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the gateway closed early");
            seen.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let end = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    (raw, seen.split_off(end))
}

#[tokio::test]
async fn a_large_frame_is_relayed_before_its_last_byte_arrives() {
    // The upstream sends 20,000 of 100,000 payload bytes with its 101 and then waits: the client gets
    // the frame's start, because large binary frames are relayed as they arrive (even from the
    // bytes that came in with the handshake).
    let up = upstream_cut_mid_frame(100_000, 20_000).await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/x\"\nupstream = \"ws://{up}/\"\n"
    ))
    .await;
    let (_raw, body) = raw_upgrade(
        gw.local_addr(),
        10 + 20_000,
        "the frame's first 20,000 bytes",
    )
    .await;
    assert_eq!(&body[..2], &[0x82, 127], "an unmasked, final binary frame");
    assert_eq!(u64::from_be_bytes(body[2..10].try_into().unwrap()), 100_000);
    assert!(body[10..].iter().all(|b| *b == 7));
}

#[tokio::test]
async fn a_frame_cut_short_drops_the_receiver_and_counts_as_undelivered() {
    let up = raw_upstream_then_hang_up(100_000, 40_000).await;
    let record = script(
        "record_cut.lua",
        "return function(ctx, conn, info) gw.shared:set('cut', gw.json.encode(info)) end\n",
    );
    let reader = script(
        "read_cut.lua",
        "return function(msg, ctx, conn) conn:reply(tostring(gw.shared:get('cut'))) return false end\n",
    );
    let echo = echo().await;
    let gw = gateway(&format!(
        "{}{}",
        route("/x", up, "", &[("on_close", &record)]),
        route("/read", echo.addr, "", &[("on_client_frame", &reader)])
    ))
    .await;
    let mut client = connect(gw.local_addr(), "/x").await;
    // The client never gets a close frame: one cannot follow half a frame.
    let end = within("the client leg to end", async {
        loop {
            match client.next().await {
                Some(Ok(Message::Close(frame))) => return Err(frame),
                Some(Ok(_)) => continue,
                _ => return Ok(()),
            }
        }
    })
    .await;
    assert!(end.is_ok(), "a close frame followed a cut frame: {end:?}");
    let mut reader = connect(gw.local_addr(), "/read").await;
    let info = within("on_close to record", async {
        loop {
            reader.send(Message::text("?")).await.unwrap();
            let seen = next_text(&mut reader).await;
            if seen != "nil" {
                return seen;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["undelivered"], 1, "{info}");
    assert_eq!(info["messages_out"], 0, "{info}");
    assert_eq!(info["by"], "upstream", "{info}");
    assert_eq!(info["code"], 1006, "{info}");
}

/// Like [`upstream_cut_mid_frame`], but the upstream hangs up right after its bytes.
async fn raw_upstream_then_hang_up(announced: usize, sent: usize) -> std::net::SocketAddr {
    raw_upstream_hanging_up(move |accept| answer_with_cut_frame(accept, announced, sent)).await
}

/// Data frames in a direction without hooks cross byte for byte: a client's frame keeps the
/// client's masking key on its way upstream (as through HAProxy or NGINX), whole or relayed as
/// it arrives, an upstream's frame reaches the client unchanged, and a frame whose length was
/// not written in the fewest bytes is encoded again, minimally, with a key of the gateway's own.
#[tokio::test]
async fn whole_frames_cross_byte_for_byte_with_the_clients_masking_key() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let from_upstream: &[u8] = &[0x81, 5, b'w', b'o', b'r', b'l', b'd'];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the gateway closed before its request head ended");
            head.extend_from_slice(&chunk[..n]);
        }
        // The gateway passes the client's key upstream (see upgrade.rs).
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
            b"dGhlIHNhbXBsZSBub25jZQ==",
        );
        let mut answer = switching_head(&accept).into_bytes();
        answer.extend_from_slice(from_upstream);
        stream.write_all(&answer).await.unwrap();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = stream.read(&mut chunk).await {
            let _ = seen_tx.send(chunk[..n].to_vec());
        }
    });
    let gw = gateway(&format!(
        "[[route]]\npath = \"/x\"\nupstream = \"ws://{up}/\"\n"
    ))
    .await;
    let (mut client, body) = raw_upgrade(
        gw.local_addr(),
        from_upstream.len(),
        "the 101 and the upstream's frame",
    )
    .await;
    assert_eq!(&body[..], from_upstream, "the upstream's frame, unchanged");

    let text = masked_frame(0x81, [1, 2, 3, 4], b"hello", false);
    let binary = masked_frame(0x82, [5, 6, 7, 8], &[9, 8, 7], false);
    let long = masked_frame(0x82, [0xAA, 0xBB, 0xCC, 0xDD], &[1, 2, 3, 4, 5], true);
    // Large enough to be relayed as it arrives (cut-through): it keeps its key too.
    let streamed_payload: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let streamed = masked_frame(0x82, [0x11, 0x22, 0x33, 0x44], &streamed_payload, false);
    let sent = [text.clone(), binary.clone(), long, streamed.clone()].concat();
    client.write_all(&sent).await.unwrap();
    let expected = text.len() + binary.len() + 2 + 4 + 5 + streamed.len();
    let mut seen = Vec::new();
    within("the client's frames upstream", async {
        while seen.len() < expected {
            seen.extend(seen_rx.recv().await.expect("the upstream is reading"));
        }
    })
    .await;
    assert_eq!(
        &seen[..text.len()],
        &text[..],
        "text, with the client's key"
    );
    let rest = &seen[text.len()..];
    assert_eq!(
        &rest[..binary.len()],
        &binary[..],
        "binary, with the client's key"
    );
    let again = &rest[binary.len()..];
    assert_eq!(
        &again[..2],
        &[0x82, 0x80 | 5],
        "encoded again with a 7-bit length"
    );
    let key = &again[2..6];
    let payload: Vec<u8> = again[6..11]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ key[i % 4])
        .collect();
    assert_eq!(payload, [1, 2, 3, 4, 5]);
    assert!(
        again[11..] == streamed[..],
        "the streamed frame, with the client's key"
    );
}
