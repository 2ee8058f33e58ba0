//! A stuck worker does not take the gateway down: the other workers keep accepting and
//! serving, the watchdog reports the stall and its end, and shutdown still ends within its
//! grace. The stall is real: a frame policy that spins under a large `policy_cpu_limit`.

mod support;

use std::time::Duration;

use framegate::{Running, ShutdownOutcome};
use futures_util::SinkExt;
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const SPIN: &str = r#"
return function(msg, ctx, conn)
  if msg.data == "spin" then
    while true do end
  end
end
"#;

/// A two-worker gateway with `/spin` (a policy that stalls its worker for `cpu_limit`) and
/// `/echo`, and a watchdog that reports a worker after 300 ms.
async fn stalling_gateway(cpu_limit: &str, grace: &str) -> Running {
    let up = echo().await;
    let spin = script("spin.lua", SPIN);
    gateway_with_server(
        &format!("workers = 2\nwatchdog_timeout = \"300ms\"\nshutdown_grace = \"{grace}\"\n"),
        &format!(
            "{}{}",
            route(
                "/spin",
                up.addr,
                &format!("policy_cpu_limit = \"{cpu_limit}\""),
                &[("on_client_frame", &spin)]
            ),
            route("/echo", up.addr, "", &[]),
        ),
    )
    .await
}

/// Stalls one worker and waits until the watchdog reports it.
async fn stall(gw: &Running) -> support::Client {
    let mut spinning = connect(gw.local_addr(), "/spin").await;
    spinning.send(Message::text("spin")).await.unwrap();
    let stalled = within("the watchdog to report the stall", async {
        loop {
            let stalled = gw.stalled_workers();
            if !stalled.is_empty() {
                return stalled;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(stalled.len(), 1, "one worker spins: {stalled:?}");
    spinning
}

#[tokio::test]
async fn a_stuck_worker_is_reported_and_the_others_keep_upgrading_and_relaying() {
    let gw = stalling_gateway("2s", "5s").await;
    let addr = gw.local_addr();
    // One connection that stays open through the stall, on whichever worker.
    let mut before = connect(addr, "/echo").await;
    let _spinning = stall(&gw).await;

    // New clients land on the healthy worker, every one of them: a balancer that still sent
    // half of them to the stuck worker would leave those without an answer.
    let mut open = Vec::new();
    for i in 0..12 {
        let started = Instant::now();
        let mut ws = tokio::time::timeout(Duration::from_secs(1), async {
            let mut ws = connect(addr, "/echo").await;
            ws.send(Message::text(format!("hello {i}"))).await.unwrap();
            assert_eq!(next_text(&mut ws).await, format!("hello {i}"));
            ws
        })
        .await
        .unwrap_or_else(|_| {
            panic!("client {i} got no upgrade and echo within 1 s while a worker was stuck")
        });
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "client {i} took {took:?}"
        );
        // Some of them stay open, so that the counts differ between workers.
        if i % 3 == 0 {
            ws.close(None).await.unwrap();
        } else {
            open.push(ws);
        }
    }
    assert_eq!(gw.stalled_workers().len(), 1, "still stuck");

    // The policy reaches its CPU limit: the worker is back, and in the balancer again.
    within("the worker to recover", async {
        while !gw.stalled_workers().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // The connection opened before is served again, whatever its worker.
    before.send(Message::text("after")).await.unwrap();
    assert_eq!(next_text(&mut before).await, "after");
}

#[tokio::test]
async fn shutdown_ends_within_its_grace_while_a_worker_is_stuck() {
    let gw = stalling_gateway("10s", "500ms").await;
    let _spinning = stall(&gw).await;
    let started = Instant::now();
    let outcome = within("shutdown to return", gw.shutdown()).await;
    let took = started.elapsed();
    assert_eq!(outcome, ShutdownOutcome::GraceExpired);
    // The grace, then at most framegate::gateway::WORKER_EXIT for the workers to leave.
    assert!(
        took < Duration::from_millis(500)
            + framegate::gateway::WORKER_EXIT
            + Duration::from_millis(300),
        "shutdown took {took:?} with a 500ms grace"
    );
}

#[test]
fn check_warns_when_a_cpu_limit_is_near_the_watchdog_timeout() {
    let dir = TempDir::new("watchdog-check");
    let spin = dir.write("spin.lua", SPIN);
    let config = dir.write(
        "config.toml",
        &format!(
            "[server]\nwatchdog_timeout = \"300ms\"\n\n{}{}",
            route_to(
                "/spin",
                "ws://127.0.0.1:9001/",
                "policy_cpu_limit = \"5s\"",
                &[(
                    "on_client_frame",
                    &format!("{:?}", spin.display().to_string())
                )]
            ),
            route_to("/fine", "ws://127.0.0.1:9001/", "", &[]),
        ),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_framegate"))
        .arg("check")
        .arg("--config")
        .arg(&config)
        .env("FRAMEGATE_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<_> = stderr
        .lines()
        .filter(|l| l.contains("policy_cpu_limit is at least half of server.watchdog_timeout"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("route=/spin"), "{stderr}");
}
