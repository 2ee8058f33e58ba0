//! Issue 12, section 4: close frames that arrive. A client that broke the rules gets its close
//! frame even when it sent more than the gateway read (lingering close), and then the end of
//! the TCP connection at once; an upstream that broke them is blamed on the client's leg as
//! the upstream's fault (1011 with a reason naming it), never as the client's.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the gateway may take to end a connection after its close frame, in the tests
/// whose `close_timeout` is far longer: it must not wait for it.
const PROMPT: Duration = Duration::from_secs(2);

/// A masked client frame with any payload length: `first` is the first header byte.
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x5a, 0x13, 0xc7, 0x81];
    let mut frame = vec![first];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

/// A raw TCP client upgraded through the gateway at `gw` on `path`, and the bytes that came
/// after the 101 head.
async fn raw_client(gw: SocketAddr, path: &str) -> (TcpStream, Vec<u8>) {
    let mut raw = TcpStream::connect(gw).await.unwrap();
    raw.write_all(upgrade_request(path, "").as_bytes())
        .await
        .unwrap();
    let mut seen = Vec::new();
    let end = within("the 101", async {
        loop {
            if let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                return i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = raw.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the gateway closed before its 101");
            seen.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(seen.starts_with(b"HTTP/1.1 101"), "{seen:?}");
    (raw, seen.split_off(end))
}

/// What a raw client read from the gateway after the 101.
#[derive(Debug, PartialEq)]
enum Read {
    /// A close frame: code and reason. Data frames before it are skipped.
    Close(u16, String),
    /// The connection ended (`Err` with the error) before a close frame came.
    Ended(Result<(), String>),
}

/// Reads unmasked server frames from `raw` (after the bytes already in `buf`) until a close
/// frame, skipping data frames; data messages' payloads are collected in `data`.
async fn read_close(
    raw: &mut (impl AsyncReadExt + Unpin),
    buf: &mut Vec<u8>,
    data: &mut Vec<Vec<u8>>,
) -> Read {
    loop {
        if buf.len() >= 2 {
            let len7 = usize::from(buf[1] & 0x7f);
            let (header, len) = match len7 {
                126 if buf.len() >= 4 => (4, usize::from(u16::from_be_bytes([buf[2], buf[3]]))),
                127 if buf.len() >= 10 => (
                    10,
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                ),
                126 | 127 => (usize::MAX, 0),
                n => (2, n),
            };
            assert_eq!(buf[1] & 0x80, 0, "a server frame is never masked");
            if header != usize::MAX && buf.len() >= header + len {
                let opcode = buf[0] & 0x0f;
                let payload = buf[header..header + len].to_vec();
                buf.drain(..header + len);
                match opcode {
                    0x8 => {
                        assert!(payload.len() >= 2, "a close frame with a code");
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        let reason = String::from_utf8(payload[2..].to_vec()).unwrap();
                        return Read::Close(code, reason);
                    }
                    0x1 | 0x2 => data.push(payload),
                    _ => {}
                }
                continue;
            }
        }
        let mut chunk = vec![0u8; 64 * 1024];
        match raw.read(&mut chunk).await {
            Ok(0) => return Read::Ended(Ok(())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Read::Ended(Err(e.to_string())),
        }
    }
}

/// Reads until the gateway ends the connection, within `limit`; what came is returned.
async fn read_to_end_within(raw: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> Vec<u8> {
    let mut rest = Vec::new();
    tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = raw.read(&mut chunk).await {
            rest.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the gateway did not end the connection within {limit:?}"));
    rest
}

fn gw_route(upstream: SocketAddr, extra: &str) -> String {
    format!("[[route]]\npath = \"/x\"\nupstream = \"ws://{upstream}/\"\n{extra}")
}

#[tokio::test]
async fn an_oversized_frame_sent_in_one_write_still_gets_its_1009() {
    let up = echo().await;
    let gw = gateway(&gw_route(up.addr, "")).await;
    // 1 MiB + 1 (one over the default limit), then more than the sockets' buffers hold.
    let mut bytes = masked(0x82, &vec![7u8; (1 << 20) + 1]);
    bytes.extend(masked(0x82, &vec![8u8; 8 << 20]));
    for attempt in 0..5 {
        write_then_expect_1009(gw.local_addr(), &bytes, attempt).await;
    }
}

/// Writes `bytes` in one write, and only then reads: the input the gateway leaves unread
/// must not reset the connection under its 1009.
async fn write_then_expect_1009(gw: SocketAddr, bytes: &[u8], attempt: usize) {
    let (mut raw, mut buf) = raw_client(gw, "/x").await;
    // A client library whose write fails reports the reset, never the close frame.
    within("the client's write", raw.write_all(bytes))
        .await
        .unwrap_or_else(|e| panic!("attempt {attempt}: the write failed: {e}"));
    let read = within(
        "the close frame",
        read_close(&mut raw, &mut buf, &mut Vec::new()),
    )
    .await;
    assert_eq!(
        read,
        Read::Close(1009, "message too big".into()),
        "attempt {attempt}"
    );
    // The gateway read (and dropped) the rest, and then ended the connection.
    read_to_end_within(&mut raw, PROMPT).await;
}

#[tokio::test]
async fn endless_continuations_still_get_their_1009() {
    let up = echo().await;
    let gw = gateway(&gw_route(up.addr, "max_message_size = \"64KiB\"\n")).await;
    let mut bytes = masked(0x02, &[1u8; 1000]);
    for _ in 0..8000 {
        bytes.extend(masked(0x00, &[2u8; 1000]));
    }
    for attempt in 0..5 {
        write_then_expect_1009(gw.local_addr(), &bytes, attempt).await;
    }
}

/// Autobahn 7.3.2: a close frame with a one-byte payload gets 1002, and the gateway ends the
/// TCP connection right after, without waiting for `close_timeout`.
#[tokio::test]
async fn a_close_frame_with_one_byte_gets_1002_and_the_connection_ends_at_once() {
    let up = echo().await;
    let gw = gateway_with_server("close_timeout = \"30s\"", &gw_route(up.addr, "")).await;
    let (mut raw, mut buf) = raw_client(gw.local_addr(), "/x").await;
    raw.write_all(&masked(0x88, &[0x03])).await.unwrap();
    let read = within(
        "the close frame",
        read_close(&mut raw, &mut buf, &mut Vec::new()),
    )
    .await;
    assert_eq!(read, Read::Close(1002, "protocol error".into()));
    read_to_end_within(&mut raw, PROMPT).await;
}

/// Autobahn 7.5.1: a close reason that is not UTF-8 gets 1007 with a reason that says so,
/// and the connection ends at once.
#[tokio::test]
async fn a_close_reason_that_is_not_utf8_gets_1007_and_the_connection_ends_at_once() {
    let up = echo().await;
    let gw = gateway_with_server("close_timeout = \"30s\"", &gw_route(up.addr, "")).await;
    let (mut raw, mut buf) = raw_client(gw.local_addr(), "/x").await;
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&[
        0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80, 0x65,
        0x64, 0x69, 0x74, 0x65, 0x64,
    ]);
    raw.write_all(&masked(0x88, &payload)).await.unwrap();
    let read = within(
        "the close frame",
        read_close(&mut raw, &mut buf, &mut Vec::new()),
    )
    .await;
    assert_eq!(
        read,
        Read::Close(1007, "invalid UTF-8 in close reason".into())
    );
    read_to_end_within(&mut raw, PROMPT).await;
}

/// Autobahn 6.4.1: bad UTF-8 in the middle fragment of a text message fails at once, not
/// when (if ever) the last fragment comes.
#[tokio::test]
async fn bad_utf8_in_a_fragment_fails_before_the_message_ends() {
    let up = echo().await;
    let gw = gateway(&gw_route(up.addr, "")).await;
    let (mut raw, mut buf) = raw_client(gw.local_addr(), "/x").await;
    raw.write_all(&masked(0x01, "κόσμε".as_bytes()))
        .await
        .unwrap();
    raw.write_all(&masked(0x00, &[0xce, 0xba, 0xed, 0xa0, 0x80]))
        .await
        .unwrap();
    let read = within(
        "the close frame",
        read_close(&mut raw, &mut buf, &mut Vec::new()),
    )
    .await;
    assert_eq!(
        read,
        Read::Close(1007, "invalid UTF-8 in text message".into())
    );
}

/// Autobahn 3.2: a client that sends a good message and then a bad frame gets the upstream's
/// answer to the good one before its 1002, as it would from the upstream itself.
#[tokio::test]
async fn answers_to_a_failing_clients_earlier_messages_reach_it_before_its_close() {
    let up = echo().await;
    let gw = gateway(&gw_route(up.addr, "")).await;
    for _ in 0..5 {
        let (mut raw, mut buf) = raw_client(gw.local_addr(), "/x").await;
        let mut bytes = masked(0x81, b"Hello, world!");
        bytes.extend(masked(0x81 | 0x20, b"Hello, world!"));
        raw.write_all(&bytes).await.unwrap();
        let mut data = Vec::new();
        let read = within("the close frame", read_close(&mut raw, &mut buf, &mut data)).await;
        assert_eq!(read, Read::Close(1002, "protocol error".into()));
        assert_eq!(data, vec![b"Hello, world!".to_vec()], "the echo came first");
    }
}

/// An upstream that answers the 101 and then sends `after` (unmasked server bytes).
async fn misbehaving_upstream(after: &'static [u8]) -> SocketAddr {
    raw_upstream(move |accept| {
        let mut bytes = switching_head(accept).into_bytes();
        bytes.extend_from_slice(after);
        bytes
    })
    .await
}

/// Each way an upstream can break the protocol after its 101 is blamed on it: the client
/// gets 1011 with a reason naming the upstream (before: `1001 peer connection failed`, or
/// for a forbidden close code a `1002` the client never committed).
#[tokio::test]
async fn upstream_faults_are_reported_to_the_client_as_the_upstreams() {
    let cases: [(&str, &'static [u8], &str); 5] = [
        (
            "reserved bits",
            &[0xC1, 0x02, b'h', b'i'],
            "upstream protocol error",
        ),
        ("unknown opcode", &[0x83, 0x00], "upstream protocol error"),
        (
            "a masked frame",
            &[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2],
            "upstream protocol error",
        ),
        (
            "a frame over max_message_size",
            &[0x82, 126, 0x10, 0x00],
            "upstream sent a message too big",
        ),
        (
            "close code 1005",
            &[0x88, 0x02, 0x03, 0xED],
            "upstream protocol error",
        ),
    ];
    for (what, bytes, reason) in cases {
        let up = misbehaving_upstream(bytes).await;
        let gw = gateway(&gw_route(up, "max_message_size = \"1KiB\"\n")).await;
        let mut client = connect(gw.local_addr(), "/x").await;
        let frame = expect_close(&mut client).await;
        assert_eq!(
            (u16::from(frame.code), frame.reason.as_str()),
            (1011, reason),
            "{what}"
        );
    }
}

/// The same, with text that is not UTF-8.
#[tokio::test]
async fn invalid_utf8_from_the_upstream_is_the_upstreams_fault() {
    let up = misbehaving_upstream(&[0x81, 0x02, 0xff, 0xfe]).await;
    let gw = gateway(&gw_route(up, "")).await;
    let mut client = connect(gw.local_addr(), "/x").await;
    let frame = expect_close(&mut client).await;
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1011, "upstream sent invalid UTF-8")
    );
}

/// A client's forbidden close code is its own fault: it gets 1002, and the upstream is told
/// its peer failed, not handed a 1002 it did not commit.
#[tokio::test]
async fn a_clients_forbidden_close_code_is_not_passed_on() {
    let (up, mut conns) = captured().await;
    let gw = gateway(&gw_route(up.addr, "")).await;
    let (mut raw, mut buf) = raw_client(gw.local_addr(), "/x").await;
    let mut upstream = within("upstream connection", conns.recv()).await.unwrap();
    raw.write_all(&masked(0x88, &1005u16.to_be_bytes()))
        .await
        .unwrap();
    // The upstream answers the gateway's close (tungstenite sends its reply on the next
    // poll); the client's close follows that reply.
    let upstream_side = async {
        let frame = expect_close(&mut upstream).await;
        let _ = within("the upstream's close reply", upstream.next()).await;
        frame
    };
    let mut data = Vec::new();
    let (read, frame) = tokio::join!(
        within("the close frame", read_close(&mut raw, &mut buf, &mut data)),
        upstream_side
    );
    assert_eq!(read, Read::Close(1002, "protocol error".into()));
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1001, "peer connection failed")
    );
    read_to_end_within(&mut raw, PROMPT).await;
}
