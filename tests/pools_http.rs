//! HTTP mode (`route.http = "proxy"`) over an `[[upstream]]` pool: requests are balanced, a
//! `sticky_cookie` keeps a client on one endpoint (what Socket.IO's polling needs; see
//! tests/socketio.rs for the real client), a kept-alive connection stays on its endpoint,
//! connect failures are retried on another endpoint, and a pool that is all down answers 503.
//! Real hyper upstreams that name themselves, a real gateway, raw TCP and hyper clients.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use support::http_client as client;
use support::*;
use tokio::net::TcpListener;

/// A hyper HTTP/1.1 upstream whose every answer is its name, followed by `;` and the
/// `Cookie` header it got and the request target.
struct Named {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Named {
    async fn start(name: &'static str) -> Named {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let cookie = req
                        .headers()
                        .get("cookie")
                        .map(|v| v.to_str().unwrap_or("?").to_owned())
                        .unwrap_or_default();
                    let body = format!("{name};{cookie};{}", req.uri());
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Named { addr, task }
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn config(endpoints: &[SocketAddr], pool_extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|a| format!("\"ws://{a}\"")).collect();
    format!(
        "[[upstream]]\nname = \"web\"\nendpoints = [{}]\n{pool_extra}\n\n\
         [[route]]\npath = \"/app/{{rest}}\"\nupstream = \"web\"\nupstream_path = \"/v1/{{rest}}\"\nhttp = \"proxy\"\n",
        list.join(", ")
    )
}

/// One GET on a new connection; returns the upstream's name, what it saw, and the
/// `Set-Cookie` of the answer.
async fn get_once(gw: SocketAddr, target: &str, cookie: Option<&str>) -> (String, Option<String>) {
    let cookie = cookie.map_or_else(String::new, |c| format!("Cookie: {c}\r\n"));
    let (status, head, body) = raw_http(
        gw,
        &format!("GET {target} HTTP/1.1\r\nHost: gw.test\r\n{cookie}Connection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{head}{body}");
    let set = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("set-cookie")
            .then(|| v.trim().to_owned())
    });
    (body, set)
}

fn name(body: &str) -> &str {
    body.split(';').next().unwrap()
}

#[tokio::test]
async fn requests_are_balanced_and_the_sticky_cookie_keeps_a_client_on_its_endpoint() {
    let (a, b) = (Named::start("a").await, Named::start("b").await);
    let gw = gateway(&config(&[a.addr, b.addr], "sticky_cookie = \"fg_web\"")).await;
    let addr = gw.local_addr();

    // Without the cookie: round robin, each answer naming its endpoint in a cookie.
    let mut cookies = std::collections::HashMap::new();
    let mut names = Vec::new();
    for _ in 0..4 {
        let (body, set) = get_once(addr, "/app/x?q=1", None).await;
        let set = set.expect("a sticky cookie on an answer without one");
        assert!(
            set.starts_with("fg_web=") && set.contains("HttpOnly"),
            "{set}"
        );
        assert!(
            !set.contains("127.0.0.1"),
            "the cookie must not carry the address: {set}"
        );
        // The path on the endpoint is upstream_path's, with the client's query.
        assert!(body.ends_with(";/v1/x?q=1"), "{body}");
        let value = set.split(';').next().unwrap().to_owned();
        let n = name(&body).to_owned();
        if let Some(before) = cookies.insert(n.clone(), value.clone()) {
            assert_eq!(before, value, "one endpoint, one cookie value");
        }
        names.push(n);
    }
    assert_eq!(names, ["a", "b", "a", "b"]);

    // With a cookie: always that endpoint, on new connections, and no new cookie.
    for (endpoint, cookie) in &cookies {
        for _ in 0..3 {
            let (body, set) = get_once(addr, "/app/y", Some(cookie)).await;
            assert_eq!(name(&body), endpoint);
            assert_eq!(set, None, "the cookie already names the endpoint");
            // The client's own cookie goes upstream as sent.
            assert!(body.contains(cookie.as_str()), "{body}");
        }
    }

    // An endpoint that goes away: its cookie's clients move, and get a new cookie.
    drop(a);
    let (body, set) = get_once(addr, "/app/z", Some(&cookies["a"])).await;
    assert_eq!(
        name(&body),
        "b",
        "the retry goes to the endpoint that is up"
    );
    assert_eq!(
        set.as_deref().map(|s| s.split(';').next().unwrap()),
        Some(cookies["b"].as_str())
    );
    gw.shutdown().await;
}

async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<BoxBody<Bytes, Infallible>>,
    path: &str,
) -> String {
    let request = Request::get(path)
        .header("host", "gw.test")
        .body(Full::new(Bytes::new()).boxed())
        .unwrap();
    let response = within("a response", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let bytes = within("a body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn a_kept_alive_connection_stays_on_its_endpoint_while_it_is_up() {
    let (a, b) = (Named::start("a").await, Named::start("b").await);
    let gw = gateway(&config(&[a.addr, b.addr], "")).await;
    let mut first = client(gw.local_addr()).await;
    let mut second = client(gw.local_addr()).await;
    let one = name(&get_on(&mut first, "/app/1").await).to_owned();
    let two = name(&get_on(&mut second, "/app/1").await).to_owned();
    assert_ne!(
        one, two,
        "two client connections, two endpoints (round robin)"
    );
    for _ in 0..3 {
        assert_eq!(name(&get_on(&mut first, "/app/2").await), one);
        assert_eq!(name(&get_on(&mut second, "/app/2").await), two);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn connect_failures_are_retried_and_a_pool_all_down_answers_503() {
    let dead = closed_port().await;
    let b = Named::start("b").await;
    let gw = gateway(&config(&[dead, b.addr], "retries = 1")).await;
    // Round robin sends every other request to the dead endpoint first (until its third
    // failure marks it down): each is retried on the other.
    for _ in 0..4 {
        let (body, _) = get_once(gw.local_addr(), "/app/r", None).await;
        assert_eq!(
            name(&body),
            "b",
            "a refused connect is retried on the other endpoint"
        );
    }
    drop(b);
    // Each failed request counts against both endpoints; once both are down (`fails`, 3 by
    // default), the pool answers 503 at once, with Retry-After.
    let request = "GET /app/r HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n";
    let mut last = (0, String::new());
    for _ in 0..10 {
        let (status, head, _) = raw_http(gw.local_addr(), request).await;
        assert!(status == 502 || status == 503, "{head}");
        last = (status, head);
        if status == 503 {
            break;
        }
    }
    assert_eq!(last.0, 503, "{}", last.1);
    assert!(
        last.1.to_ascii_lowercase().contains("retry-after:"),
        "{}",
        last.1
    );
    gw.shutdown().await;
}

/// `[route.jwt] strip` on a pool route: the token in the query string reaches neither the
/// endpoint's WebSocket handshake nor an HTTP request (the pool's path is built from the
/// query as it goes upstream, not as the client sent it).
#[tokio::test]
async fn a_stripped_token_never_reaches_a_pool_endpoint() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let dir = TempDir::new("pool-jwt");
    let secret = "a-shared-secret-of-at-least-thirty-two-bytes";
    let secret_file = dir.write("hs.secret", secret);
    let mut ws_up = echo().await;
    let http_up = Named::start("h").await;
    let jwt = format!(
        "[route.jwt]\nsecret_file = {:?}\nfrom = [\"query:access_token\"]\nstrip = true\n",
        secret_file.display().to_string()
    );
    let gw = gateway(&format!(
        "[[upstream]]\nname = \"ws\"\nendpoints = [\"ws://{}\"]\n\
         [[upstream]]\nname = \"web\"\nendpoints = [\"ws://{}\"]\n\n\
         [[route]]\npath = \"/live\"\nupstream = \"ws\"\n{jwt}\n\
         [[route]]\npath = \"/page\"\nupstream = \"web\"\nhttp = \"proxy\"\n{jwt}",
        ws_up.addr, http_up.addr
    ))
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let token = encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({ "sub": "ann", "exp": exp }),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let _ws = connect(gw.local_addr(), &format!("/live?x=1&access_token={token}")).await;
    let seen = within("the handshake upstream", ws_up.requests.recv())
        .await
        .unwrap();
    assert_eq!(seen.uri, "/live?x=1", "the token reached the endpoint");
    let (body, _) = get_once(
        gw.local_addr(),
        &format!("/page?access_token={token}&y=2"),
        None,
    )
    .await;
    assert_eq!(body, "h;;/page?y=2", "the token reached the endpoint");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_hash_key_picks_the_endpoint_of_each_request_on_a_kept_alive_connection() {
    let (a, b) = (Named::start("a").await, Named::start("b").await);
    let gw = gateway(&config(
        &[a.addr, b.addr],
        "balance = \"hash\"\nhash_key = \"query:k\"",
    ))
    .await;
    // Where each key lands, each on a new connection.
    let mut home = std::collections::HashMap::new();
    for k in 0..20 {
        let (body, _) = get_once(gw.local_addr(), &format!("/app/x?k={k}"), None).await;
        home.insert(k, name(&body).to_owned());
    }
    let names: std::collections::HashSet<_> = home.values().collect();
    assert_eq!(names.len(), 2, "20 keys over two endpoints: {home:?}");
    // One kept-alive connection, keys in turn: each request goes to its key's endpoint.
    let mut conn = client(gw.local_addr()).await;
    for k in (0..20).chain(0..20) {
        let body = get_on(&mut conn, &format!("/app/x?k={k}")).await;
        assert_eq!(name(&body), home[&k], "key {k}");
    }
    gw.shutdown().await;
}
