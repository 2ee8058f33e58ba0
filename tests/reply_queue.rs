//! Issue 12, section 2: what a policy can make a connection queue is bounded by
//! `route.max_queued_bytes` per leg. `conn:reply` and the `send_*` calls past the bound get
//! `nil, "queue full"`, and a policy that inflates every message it forwards only slows its
//! connection down: the gateway's memory stays bounded, and nothing is lost.
//!
//! The gateway runs in this process, so its memory is this process's resident set. The tests
//! take turns, so that one's allocations do not show in the other's measurement.

mod support;

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: u64 = 1 << 20;

/// This process's resident set, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// A masked client text frame (payload under 126 bytes).
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let key = [9, 8, 7, 6];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

/// A raw client that upgrades on `path` and then never reads.
async fn deaf_client(gw: SocketAddr, path: &str) -> TcpStream {
    let mut raw = TcpStream::connect(gw).await.unwrap();
    raw.write_all(upgrade_request(path, "").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    within("the 101", async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(
                raw.read(&mut byte).await.unwrap(),
                1,
                "closed before the 101"
            );
            head.push(byte[0]);
        }
    })
    .await;
    raw
}

/// How much the resident set has grown over `before` once it stops growing (no change of a
/// MiB or more for half a second), or as soon as it has grown past 64 MiB.
async fn settled_growth(before: u64) -> u64 {
    let mut last = rss();
    let mut still = 0;
    within("the resident set to settle", async {
        while still < 5 && last.saturating_sub(before) < 64 * MIB {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let now = rss();
            still = if now.abs_diff(last) < MIB {
                still + 1
            } else {
                0
            };
            last = now;
        }
    })
    .await;
    last.saturating_sub(before)
}

const CONNECTIONS: usize = 4;

/// The amplification from the issue: each message makes the policy reply 64 times 4 MiB to a
/// client that reads nothing. Only what fits in `max_queued_bytes` (4 MiB by default) is
/// queued; the other 63 calls answer `nil, "queue full"`, which the policy reports upstream.
#[tokio::test]
async fn replies_past_the_queue_bound_get_queue_full_and_memory_stays_bounded() {
    let _turn = SERIAL.lock().await;
    let policy = script(
        "amplify.lua",
        r#"
local big = string.rep("x", 4 * 1024 * 1024)
return function(msg, ctx, conn)
  local full = 0
  for i = 1, 64 do
    local ok, err = conn:reply(big)
    if ok == nil and err == "queue full" then
      full = full + 1
    elseif ok ~= true then
      error("unexpected answer " .. tostring(ok) .. ", " .. tostring(err))
    end
  end
  assert(conn:send_server("queue full: " .. full))
  return false
end
"#,
    );
    let (up, mut conns) = captured().await;
    let gw = gateway(&route(
        "/x",
        up.addr,
        "policy_memory_limit = \"32MiB\"\n",
        &[("on_client_frame", &policy)],
    ))
    .await;
    let before = rss();
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut client = deaf_client(gw.local_addr(), "/x").await;
        let mut upstream = within("upstream connection", conns.recv()).await.unwrap();
        client.write_all(&masked_text(b"go")).await.unwrap();
        let report = next_message(&mut upstream).await.unwrap().unwrap();
        assert_eq!(report, Message::text("queue full: 63"));
        clients.push((client, upstream));
    }
    let grown = rss().saturating_sub(before);
    eprintln!("resident set grew by {} MiB", grown / MIB);
    // Each connection holds one 4 MiB reply (the issue measured 256 MiB each).
    assert!(
        grown < 64 * MIB,
        "{CONNECTIONS} connections grew the gateway by {} MiB",
        grown / MIB
    );
}

/// A policy that forwards a 1 MiB replacement for every small message, to an upstream that is
/// not reading: one read of the client's brings in 200 such messages, but the relay stops
/// after the one that fills the upstream's queue, and goes on when the upstream reads. All 200
/// arrive, in order.
#[tokio::test]
async fn a_policy_that_inflates_messages_is_held_to_the_bound_and_loses_nothing() {
    let _turn = SERIAL.lock().await;
    let policy = script(
        "inflate.lua",
        r#"
return function(msg, ctx, conn)
  return msg.data .. string.rep("y", 1024 * 1024)
end
"#,
    );
    let (up, mut conns) = captured().await;
    let gw = gateway(&route(
        "/x",
        up.addr,
        "max_message_size = \"2MiB\"\n",
        &[("on_client_frame", &policy)],
    ))
    .await;
    let mut client = connect(gw.local_addr(), "/x").await;
    let mut upstream = within("upstream connection", conns.recv()).await.unwrap();
    let before = rss();
    const COUNT: usize = 200;
    for i in 0..COUNT {
        client.feed(Message::text(format!("{i:03}"))).await.unwrap();
    }
    client.flush().await.unwrap();
    // The upstream does not read for a while: the gateway must not take in all 200 MiB.
    let grown = settled_growth(before).await;
    eprintln!("resident set grew by {} MiB", grown / MIB);
    assert!(
        grown < 64 * MIB,
        "the gateway took in {} MiB for an upstream that reads nothing",
        grown / MIB
    );
    for i in 0..COUNT {
        match within("a message", upstream.next()).await {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(&t.as_str()[..3], format!("{i:03}"), "message {i}");
                assert_eq!(t.len(), 3 + (1 << 20));
            }
            other => panic!("message {i}: {other:?}"),
        }
    }
}
