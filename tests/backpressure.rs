//! Issue 2, point 5: a peer that stops reading slows the other side; nothing queues without bound.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

const MESSAGE: usize = 64 * 1024;
const COUNT: usize = 2_000; // 125 MiB in all: far more than any socket buffers hold

/// Waits until `progress` has not moved for `quiet`, or `limit` passes; returns its value.
async fn wait_for_stall(progress: &AtomicUsize, quiet: Duration, limit: Duration) -> usize {
    let started = tokio::time::Instant::now();
    let mut last = progress.load(Ordering::SeqCst);
    let mut last_change = tokio::time::Instant::now();
    while started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let now = progress.load(Ordering::SeqCst);
        if now != last {
            last = now;
            last_change = tokio::time::Instant::now();
        } else if last_change.elapsed() >= quiet {
            break;
        }
    }
    last
}

#[tokio::test]
async fn a_client_that_stops_reading_stalls_a_flooding_upstream_and_loses_nothing() {
    let (up, mut conns) = captured().await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/x\"\nupstream = \"ws://{}/\"\nmax_message_size = \"1MiB\"\n",
        up.addr
    ))
    .await;
    let mut client = connect(gw.local_addr(), "/x").await;
    let mut upstream = within("upstream connection", conns.recv()).await.unwrap();

    let sent = Arc::new(AtomicUsize::new(0));
    let progress = sent.clone();
    let flood = tokio::spawn(async move {
        for i in 0..COUNT {
            let mut payload = vec![0u8; MESSAGE];
            payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
            upstream.send(Message::binary(payload)).await.unwrap();
            progress.fetch_add(1, Ordering::SeqCst);
        }
        upstream
    });

    // The client reads nothing: the upstream must stall well before it has sent everything.
    let stalled_at =
        wait_for_stall(&sent, Duration::from_millis(500), Duration::from_secs(20)).await;
    assert!(
        stalled_at < COUNT,
        "upstream sent all {COUNT} messages to a client that reads nothing"
    );
    let buffered = stalled_at * MESSAGE;
    // Socket buffers on both legs (kernel autotuning on loopback) plus one message and the
    // codec's write buffer: bounded, and far below the flood's size.
    assert!(
        buffered < 48 << 20,
        "{buffered} bytes accepted before the stall"
    );
    eprintln!(
        "stalled after {stalled_at} messages ({} MiB)",
        buffered >> 20
    );

    // Now the client reads: every message arrives, in order.
    for i in 0..COUNT {
        match next_message(&mut client).await {
            Some(Ok(Message::Binary(b))) => {
                assert_eq!(b.len(), MESSAGE);
                assert_eq!(
                    u64::from_be_bytes(b[..8].try_into().unwrap()),
                    i as u64,
                    "message {i} out of order"
                );
            }
            other => panic!("message {i}: expected binary, got {other:?}"),
        }
    }
    within("flood to finish", flood).await.unwrap();
}
