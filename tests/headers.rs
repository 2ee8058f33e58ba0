//! Issue 2, points 2 and 3: what crosses the gateway in the handshake, each way.

mod support;

use support::*;

#[tokio::test]
async fn request_headers_go_upstream_without_hop_by_hop_ones() {
    let mut up = echo().await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/r/{{id}}\"\nupstream = \"ws://{}/in/{{id}}\"\n",
        up.addr
    ))
    .await;
    let (_ws, _) = connect_with(
        gw.local_addr(),
        "/r/42?token=abc&x=1",
        &[
            ("authorization", "Bearer t0k"),
            ("x-custom", "one"),
            ("x-custom", "two"),
            ("x-forwarded-for", "203.0.113.7"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-extensions", "permessage-deflate"),
        ],
    )
    .await
    .unwrap();
    let seen = within("upstream request", up.requests.recv())
        .await
        .unwrap();
    assert_eq!(
        seen.uri, "/in/42?token=abc&x=1",
        "path substituted, query preserved"
    );
    let h = &seen.headers;
    assert_eq!(h["authorization"], "Bearer t0k");
    let custom: Vec<_> = h
        .get_all("x-custom")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(custom, ["one", "two"]);
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], gw.local_addr().to_string().as_str());
    assert_eq!(
        h["host"],
        up.addr.to_string().as_str(),
        "Host names the upstream"
    );
    assert!(h.get("keep-alive").is_none());
    // The client's offer is not passed on: the gateway negotiates permessage-deflate with
    // the upstream on its own (compression is on by default).
    assert_eq!(
        h.get_all("sec-websocket-extensions")
            .iter()
            .collect::<Vec<_>>(),
        ["permessage-deflate; server_no_context_takeover; client_no_context_takeover"],
        "the gateway's own offer, not the client's"
    );
    assert!(h.get("sec-websocket-key").is_some());
}

/// The client's `Sec-WebSocket-Key` goes upstream as it is (as NGINX and HAProxy pass it), so
/// the upstream's accept value is the one the client checks.
#[tokio::test]
async fn the_clients_key_serves_both_legs() {
    let mut up = echo().await;
    let gw = gateway(&route("/k", up.addr, "", &[])).await;
    let (status, head, _) = raw_http(gw.local_addr(), &upgrade_request("/k", "")).await;
    assert_eq!(status, 101);
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let seen = within("upstream request", up.requests.recv())
        .await
        .unwrap();
    assert_eq!(
        seen.headers["sec-websocket-key"],
        "dGhlIHNhbXBsZSBub25jZQ=="
    );
}

#[tokio::test]
async fn upstream_101_headers_reach_the_client() {
    let answer = Answer {
        headers: vec![
            ("set-cookie", "session=s1; HttpOnly"),
            ("x-upstream", "yes"),
        ],
        protocol: None,
    };
    let up = upstream(answer, |_ws, _| async {}).await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/x\"\nupstream = \"ws://{}/\"\n",
        up.addr
    ))
    .await;
    let (_ws, response) = connect_with(gw.local_addr(), "/x", &[]).await.unwrap();
    assert_eq!(response.headers()["set-cookie"], "session=s1; HttpOnly");
    assert_eq!(response.headers()["x-upstream"], "yes");
    assert!(response.headers().get("sec-websocket-extensions").is_none());
}

#[tokio::test]
async fn subprotocol_offer_goes_upstream_and_its_choice_comes_back() {
    let answer = Answer {
        headers: vec![],
        protocol: Some("v2.chat"),
    };
    let mut up = upstream(answer, |_ws, _| async {}).await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/x\"\nupstream = \"ws://{}/\"\n",
        up.addr
    ))
    .await;
    let (_ws, response) = connect_with(
        gw.local_addr(),
        "/x",
        &[("sec-websocket-protocol", "v1.chat, v2.chat")],
    )
    .await
    .unwrap();
    let seen = within("upstream request", up.requests.recv())
        .await
        .unwrap();
    assert_eq!(seen.headers["sec-websocket-protocol"], "v1.chat, v2.chat");
    assert_eq!(response.headers()["sec-websocket-protocol"], "v2.chat");
}

#[tokio::test]
async fn upstream_choosing_an_unoffered_subprotocol_is_a_502() {
    let answer = Answer {
        headers: vec![],
        protocol: Some("evil"),
    };
    let up = upstream(answer, |_ws, _| async {}).await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/x\"\nupstream = \"ws://{}/\"\n",
        up.addr
    ))
    .await;
    let (status, _, _) = raw_http(
        gw.local_addr(),
        &upgrade_request("/x", "Sec-WebSocket-Protocol: good\r\n"),
    )
    .await;
    assert_eq!(status, 502);
}

#[tokio::test]
async fn host_routing_picks_the_host_specific_route() {
    let mut a = echo().await;
    let mut b = echo().await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/ws\"\nupstream = \"ws://{}/any\"\n[[route]]\npath = \"/ws\"\nhost = \"chat.example.com\"\nupstream = \"ws://{}/chat\"\n",
        a.addr, b.addr
    ))
    .await;
    let (status, _, _) = raw_http(
        gw.local_addr(),
        &upgrade_request("/ws", "").replace("Host: gateway.test", "Host: chat.example.com:8080"),
    )
    .await;
    assert_eq!(status, 101);
    assert_eq!(
        within("chat upstream", b.requests.recv())
            .await
            .unwrap()
            .uri,
        "/chat"
    );
    let (status, _, _) = raw_http(gw.local_addr(), &upgrade_request("/ws", "")).await;
    assert_eq!(status, 101);
    assert_eq!(
        within("any upstream", a.requests.recv()).await.unwrap().uri,
        "/any"
    );
}
