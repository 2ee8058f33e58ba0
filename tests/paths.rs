//! Issue 12, point 3: upstream paths and hosts. Every request here goes over a raw socket with
//! its exact request line; the upstream records the request target it got.

mod support;

use std::net::SocketAddr;

use support::*;
use tokio::sync::mpsc::error::TryRecvError;

/// `/api/{*rest}` to `/v2/{rest}` and `/room/{id}` to `/rooms/{id}`, on one recording upstream.
async fn prefixed_routes(up: SocketAddr, extra: &str) -> framegate::Running {
    gateway(&format!(
        "{}{}",
        route_to(
            "/api/{*rest}",
            &format!("ws://{up}/v2/{{rest}}"),
            extra,
            &[]
        ),
        route_to("/room/{id}", &format!("ws://{up}/rooms/{{id}}"), extra, &[]),
    ))
    .await
}

/// Sends an upgrade request for `target` (the exact request-target) and returns status and body.
async fn ask(gw: SocketAddr, target: &str) -> (u16, String) {
    let (status, _, body) = raw_http(gw, &upgrade_request(target, "")).await;
    (status, body.trim().to_owned())
}

fn assert_upstream_untouched(up: &mut Upstream, why: &str) {
    match up.requests.try_recv() {
        Err(TryRecvError::Empty) => {}
        Ok(seen) => panic!("{why}: the upstream got {}", seen.uri),
        Err(e) => panic!("{why}: upstream channel: {e}"),
    }
}

/// The attacks of the issue, and their near relatives: none reaches the upstream outside the
/// route's prefix. On main each of the first three reached it as sent.
#[tokio::test]
async fn placeholders_cannot_climb_out_of_the_upstream_prefix() {
    let mut up = echo().await;
    let gw = prefixed_routes(up.addr, "").await;
    let addr = gw.local_addr();
    for (target, status, body) in [
        (
            "/api/..%2F..%2Fadmin",
            400,
            "bad request path: the value of {rest} holds a dot segment",
        ),
        (
            "/api/x/../../../admin",
            400,
            "bad request path: the request path climbs above the root with '..'",
        ),
        // Decoded and resolved before matching: the path is `/`, which no route serves.
        ("/room/%2e%2e", 404, "no route for /"),
        ("/room/%2E%2e/admin", 404, "no route for /admin"),
        (
            "/api/..%5c..%5cadmin",
            400,
            "bad request path: the value of {rest} holds a dot segment",
        ),
        (
            "/api/a%2fb",
            400,
            "bad request path: the value of {rest} holds an encoded slash or a backslash",
        ),
        (
            "/room/a%5Cb",
            400,
            "bad request path: the value of {id} holds an encoded slash or a backslash",
        ),
        (
            "/api/..\\..\\admin",
            400,
            "bad request path: the value of {rest} holds a dot segment",
        ),
        // Tomcat and Jetty read `..;` as `..`.
        (
            "/api/..;/admin",
            400,
            "bad request path: the value of {rest} holds a dot segment",
        ),
        (
            "/api/%zz",
            400,
            "bad request path: malformed percent-encoding in the request path",
        ),
        (
            "/api/x%2",
            400,
            "bad request path: malformed percent-encoding in the request path",
        ),
        (
            "/api/x%00.json",
            400,
            "bad request path: encoded NUL (%00) in the request path",
        ),
        (
            "/../api/x",
            400,
            "bad request path: the request path climbs above the root with '..'",
        ),
    ] {
        assert_eq!(
            ask(addr, target).await,
            (status, body.to_owned()),
            "{target}"
        );
        assert_upstream_untouched(&mut up, target);
    }
}

/// What does reach the upstream is the normalised path, still under the prefix.
#[tokio::test]
async fn the_upstream_gets_the_normalised_path() {
    let mut up = echo().await;
    let gw = prefixed_routes(up.addr, "").await;
    let addr = gw.local_addr();
    for (target, upstream_path) in [
        ("/api/x/../y?q=1", "/v2/y?q=1"),
        ("/api/./a//b/%7Euser/", "/v2/a/b/~user/"),
        ("//api///x", "/v2/x"),
        ("/room/caf%c3%a9", "/rooms/caf%C3%A9"),
        ("/room/a%20b", "/rooms/a%20b"),
        ("/room/.hidden", "/rooms/.hidden"),
    ] {
        let (status, body) = ask(addr, target).await;
        assert_eq!(status, 101, "{target}: {body}");
        let seen = within("upstream request", up.requests.recv())
            .await
            .unwrap();
        assert_eq!(seen.uri, upstream_path, "{target}");
    }
    // Resolved to `/room/`, where `{id}` has nothing to take: no route, and no upstream.
    for target in ["/room/x/..", "/api/%2e%2e/room/%2E"] {
        assert_eq!(
            ask(addr, target).await,
            (404, "no route for /room/".to_owned())
        );
        assert_upstream_untouched(&mut up, target);
    }
}

#[tokio::test]
async fn allow_encoded_slash_lets_encoded_slashes_through_but_never_dot_segments() {
    let mut up = echo().await;
    let gw = prefixed_routes(up.addr, "allow_encoded_slash = true").await;
    let addr = gw.local_addr();
    assert_eq!(ask(addr, "/api/a%2fb%5Cc").await.0, 101);
    let seen = within("upstream request", up.requests.recv())
        .await
        .unwrap();
    assert_eq!(seen.uri, "/v2/a%2Fb%5Cc");
    for target in [
        "/api/..%2F..%2Fadmin",
        "/api/x%2F..%2F..%2Fadmin",
        "/room/..%5Cx",
    ] {
        let (status, body) = ask(addr, target).await;
        assert_eq!(status, 400, "{target}");
        assert!(body.ends_with("holds a dot segment"), "{target}: {body}");
        assert_upstream_untouched(&mut up, target);
    }
}

#[tokio::test]
async fn the_policy_sees_the_normalised_path_and_params() {
    let up = echo().await;
    let policy = script(
        "path.lua",
        "return function(req) return req:reject(403, req.path .. ' ' .. req.params.rest) end\n",
    );
    let gw = gateway(&route_to(
        "/api/{*rest}",
        &format!("ws://{}/v2/{{rest}}", up.addr),
        "",
        &[("on_upgrade", &policy)],
    ))
    .await;
    assert_eq!(
        ask(gw.local_addr(), "/api/./a//%7Eb/x/../c%2a?q=1").await,
        (403, "/api/a/~b/c%2A a/~b/c%2A".to_owned())
    );
}

/// A value in the upstream's query stays one parameter value: on main `/c/a&tenant=b` gave
/// the upstream a second `tenant`, ahead of the route's own.
#[tokio::test]
async fn a_placeholder_in_the_query_cannot_add_parameters() {
    let mut up = echo().await;
    let gw = gateway(&route_to(
        "/c/{room}",
        &format!("ws://{}/chat?room={{room}}&tenant=a", up.addr),
        "",
        &[],
    ))
    .await;
    assert_eq!(ask(gw.local_addr(), "/c/x&tenant=b?user=ann").await.0, 101);
    let seen = within("upstream request", up.requests.recv())
        .await
        .unwrap();
    assert_eq!(seen.uri, "/chat?room=x%26tenant%3Db&tenant=a&user=ann");
    // A fragment is no part of a request target: 400, not a cut-short upstream URL.
    let (status, body) = ask(gw.local_addr(), "/c/x#frag").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.starts_with("bad request target"), "{body}");
    assert_upstream_untouched(&mut up, "fragment");
}

/// Routes for `/ws`: any host to `/any`, `admin.example.com` to `/admin`, and a route whose
/// configured host is written with its trailing dot to `/dotted`.
async fn host_routes(up: SocketAddr) -> framegate::Running {
    gateway(&format!(
        "{}{}{}",
        route_to("/ws", &format!("ws://{up}/any"), "", &[]),
        route_to(
            "/ws",
            &format!("ws://{up}/admin"),
            "host = \"admin.example.com\"",
            &[]
        ),
        route_to(
            "/ws",
            &format!("ws://{up}/dotted"),
            "host = \"Dotted.Example.com.\"",
            &[]
        ),
    ))
    .await
}

async fn routed_to(up: &mut Upstream, gw: SocketAddr, request: &str) -> support::SeenRequest {
    let (status, _, body) = raw_http(gw, request).await;
    assert_eq!(status, 101, "{request:?}: {body}");
    within("upstream request", up.requests.recv())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_trailing_dot_in_the_host_names_the_same_host() {
    let mut up = echo().await;
    let gw = host_routes(up.addr).await;
    let addr = gw.local_addr();
    let with_host = |host: &str| {
        upgrade_request("/ws", "").replace("Host: gateway.test", &format!("Host: {host}"))
    };
    for (host, want) in [
        ("admin.example.com.", "/admin"),
        ("Admin.Example.COM.:8080", "/admin"),
        ("admin.example.com", "/admin"),
        ("dotted.example.com", "/dotted"),
        ("dotted.example.com.", "/dotted"),
        ("other.example.com.", "/any"),
    ] {
        let seen = routed_to(&mut up, addr, &with_host(host)).await;
        assert_eq!(seen.uri, want, "Host: {host}");
        // The upstream is told the host as the client sent it.
        assert_eq!(seen.headers["x-forwarded-host"], host, "Host: {host}");
    }
}

/// RFC 9112 §3.2.2: an absolute-form target's authority is the request's host, whatever `Host`
/// says; the upstream's `X-Forwarded-Host` is that authority. On main `Host` chose the route.
#[tokio::test]
async fn an_absolute_form_authority_wins_over_host() {
    let mut up = echo().await;
    let gw = host_routes(up.addr).await;
    let addr = gw.local_addr();
    let request = upgrade_request("http://admin.example.com/ws", "")
        .replace("Host: gateway.test", "Host: other.example");
    let seen = routed_to(&mut up, addr, &request).await;
    assert_eq!(seen.uri, "/admin");
    assert_eq!(seen.headers["x-forwarded-host"], "admin.example.com");

    // And the other way round: an unknown authority does not get the Host's route.
    let request = upgrade_request("ws://other.example:8080/ws", "")
        .replace("Host: gateway.test", "Host: admin.example.com");
    let seen = routed_to(&mut up, addr, &request).await;
    assert_eq!(seen.uri, "/any");
    assert_eq!(seen.headers["x-forwarded-host"], "other.example:8080");

    // Userinfo in the target is refused (RFC 9110 §4.2.4).
    let request = upgrade_request("http://admin.example.com@evil.example/ws", "");
    let (status, _, body) = raw_http(addr, &request).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.starts_with("bad request target"), "{body}");
    assert_upstream_untouched(&mut up, "userinfo");
}
