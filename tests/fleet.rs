//! A fleet of gateways sharing `gw.shared` and `gw.limit` through a real `redis-server`
//! (`[shared] backend = "redis"`): three in-process gateways (and the binary, where one must
//! die by SIGKILL), real clients, a real echo upstream.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::redis::Redis;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// `on_upgrade`: at most 3 connections per `?user=` across the fleet, with a leased count.
const LIMIT_UPGRADE: &str = r#"
return function(req, ctx)
  local user = req.query.user or "anon"
  local n, err = gw.shared:incr("conns:" .. user, 1, nil, { lease = true })
  if not n then
    if gw.shared.on_unavailable == "deny" then
      return req:reject(503, "fleet store unavailable: " .. err)
    end
    return
  end
  if n > 3 then
    gw.shared:incr("conns:" .. user, -1, nil, { lease = true })
    return req:reject(429, "too many connections for " .. user)
  end
  ctx.user = user
end
"#;

/// `on_close`: gives the connection's count back.
const LIMIT_CLOSE: &str = r#"
return function(ctx, conn, info)
  if ctx.user then gw.shared:incr("conns:" .. ctx.user, -1, nil, { lease = true }) end
end
"#;

fn shared_table(redis: &Redis, instance: &str, extra: &str) -> String {
    format!(
        "[shared]\nbackend = \"redis\"\nurl = \"{}\"\ninstance = \"{instance}\"\n{extra}\n",
        redis.url()
    )
}

fn limited_route(upstream: SocketAddr) -> String {
    route(
        "/chat",
        upstream,
        "",
        &[
            ("on_upgrade", &script("limit-upgrade.lua", LIMIT_UPGRADE)),
            ("on_close", &script("limit-close.lua", LIMIT_CLOSE)),
        ],
    )
}

/// The status of an upgrade attempt: 101, or the refusal's.
async fn attempt(addr: SocketAddr, path: &str) -> (u16, Option<Client>) {
    match connect_with(addr, path, &[]).await {
        Ok((ws, _)) => (101, Some(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            (response.status().as_u16(), None)
        }
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

/// Retries `attempt` until it gets `want` (the fleet's count changes behind a close).
async fn until_status(addr: SocketAddr, path: &str, want: u16) -> Option<Client> {
    within(&format!("an upgrade answered {want}"), async {
        loop {
            let (status, ws) = attempt(addr, path).await;
            if status == want {
                return ws;
            }
            drop(ws);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

async fn echo_once(ws: &mut Client, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(next_text(ws).await, text);
}

#[tokio::test]
async fn a_connection_limit_per_user_holds_across_three_instances() {
    let redis = Redis::start().await;
    let upstream = echo().await;
    let mut gateways = Vec::new();
    for name in ["gw-1", "gw-2", "gw-3"] {
        let toml = format!(
            "{}{}",
            shared_table(&redis, name, ""),
            limited_route(upstream.addr)
        );
        gateways.push(gateway(&toml).await);
    }
    let addrs: Vec<SocketAddr> = gateways.iter().map(|g| g.local_addrs()[0]).collect();
    // One connection of ann on each instance: three in all.
    let mut open = Vec::new();
    for addr in &addrs {
        let (status, ws) = attempt(*addr, "/chat?user=ann").await;
        assert_eq!(status, 101);
        open.push(ws.unwrap());
    }
    // A fourth, on any instance, is refused; another user is not.
    for addr in &addrs {
        assert_eq!(attempt(*addr, "/chat?user=ann").await.0, 429);
    }
    let (status, bob) = attempt(addrs[0], "/chat?user=bob").await;
    assert_eq!(status, 101);
    // The connections relay.
    for ws in &mut open {
        echo_once(ws, "hello").await;
    }
    assert_eq!(
        redis.command(&["HLEN", "fg:s:conns:ann"]).await.as_deref(),
        Some(":3"),
        "one share per instance"
    );
    // Closing one (on gw-2) gives its count back: ann may connect again, on gw-3.
    let mut closed = open.remove(1);
    closed.close(None).await.unwrap();
    while closed.next().await.is_some() {}
    let again = until_status(addrs[2], "/chat?user=ann", 101).await;
    assert!(again.is_some());
    assert_eq!(attempt(addrs[0], "/chat?user=ann").await.0, 429);
    drop((bob, again, open));
    for g in gateways {
        g.shutdown().await;
    }
}
