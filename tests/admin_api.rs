//! Issue 13 §3 and §4: the admin listener's HTTP layer over real sockets, in front of a real
//! `Registry` and real `Metrics` (the gateway's side of `AdminApi` is a small stand-in here until
//! the lead wires the listener into the gateway).

mod support;

use support::admin_http::{request, Reply};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use framegate::admin::{self, AdminApi, BoxFuture};
use framegate::metrics::{ClosedBy, Direction, Metrics, Phase, ReloadResult};
use framegate::registry::{
    Control, Message, NewConnection, Registered, Registry, Tags, Target, UpgradeRequest,
    CONTROL_CAPACITY,
};
use serde_json::{json, Value};
use support::{promtool_check_metrics, within};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "s3cret-token-0123456789";

struct TestApi {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    ready: AtomicBool,
    reload: Mutex<Result<u64, String>>,
}

impl AdminApi for TestApi {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
    fn metrics(&self) -> String {
        self.metrics.encode()
    }
    fn registry(&self) -> &Registry {
        &self.registry
    }
    fn reload(&self) -> BoxFuture<Result<u64, String>> {
        let result = self.reload.lock().unwrap().clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            match &result {
                Ok(n) => {
                    metrics.config_reload(ReloadResult::Success);
                    metrics.set_snapshot(*n);
                }
                Err(_) => metrics.config_reload(ReloadResult::Failure),
            }
            result
        })
    }
    fn config(&self) -> Value {
        json!({"snapshot": 1, "server": {"listen": ["127.0.0.1:0"]}})
    }
}

struct Admin {
    addr: SocketAddr,
    api: Arc<TestApi>,
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<()>,
}

async fn admin(token: Option<&str>) -> Admin {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api = Arc::new(TestApi {
        registry: Registry::new(),
        metrics: Metrics::new(),
        ready: AtomicBool::new(true),
        reload: Mutex::new(Ok(2)),
    });
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(admin::serve(
        listener,
        shutdown.clone(),
        token.map(str::to_owned),
        api.clone(),
    ));
    Admin {
        addr,
        api,
        shutdown,
        served,
    }
}

impl Admin {
    async fn call(&self, method: &str, uri: &str) -> Reply {
        self.call_with(method, uri, &[], Bytes::new()).await
    }

    async fn call_with(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let bearer = format!("Bearer {TOKEN}");
        let mut all = vec![("authorization", bearer.as_str())];
        all.extend_from_slice(headers);
        request(self.addr, method, uri, &all, body).await
    }

    fn register(&self, id: u64, route: &str, client: &str, tags: &[(&str, &str)]) -> Registered {
        let mut t = Tags::default();
        for (k, v) in tags {
            t.insert(k, v).unwrap();
        }
        self.api
            .registry
            .register(NewConnection {
                id,
                route: route.into(),
                client: client.parse().unwrap(),
                upstream: "ws://10.1.1.1:9001/chat".into(),
                opened_at: SystemTime::now(),
                expires_at: None,
                snapshot: 1,
                tags: t,
                request: UpgradeRequest::new(
                    "GET",
                    "/chat?room=7&access_token=tok-SECRET",
                    [
                        ("Host", &b"gw.example"[..]),
                        ("Authorization", b"Bearer jwt-SECRET"),
                        ("Cookie", b"sid=cookie-SECRET"),
                    ],
                ),
                ctx: json!({"user": "ann", "claims": {"sub": "ann"}}),
                capture_config: Default::default(),
                capture: None,
            })
            .unwrap()
    }
}

fn ids(reply: &Reply) -> Vec<u64> {
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.json()["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn health_and_readiness() {
    let a = admin(Some(TOKEN)).await;
    // Probes carry no token: these two are open by design.
    let r = request(a.addr, "GET", "/healthz", &[], "").await;
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("ok")));
    let r = request(a.addr, "GET", "/readyz", &[], "").await;
    assert_eq!(r.status, 200);
    a.api.ready.store(false, Ordering::Relaxed);
    let r = request(a.addr, "GET", "/readyz", &[], "").await;
    assert_eq!((r.status, r.error()), (503, "shutting down".into()));
}

#[tokio::test]
async fn token_is_required_everywhere_else() {
    let a = admin(Some(TOKEN)).await;
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/admin/connections"),
        ("GET", "/admin/config"),
        ("POST", "/admin/reload"),
        ("GET", "/no/such/path"),
    ] {
        let none = request(a.addr, method, path, &[], "").await;
        assert_eq!(none.status, 401, "{method} {path} without a token");
        assert_eq!(
            none.headers["www-authenticate"],
            "Bearer realm=\"framegate-admin\""
        );
        let wrong = request(
            a.addr,
            method,
            path,
            &[("authorization", "Bearer s3cret-token-0123456780")],
            "",
        )
        .await;
        assert_eq!(wrong.status, 401, "{method} {path} with a wrong token");
        let basic = request(a.addr, method, path, &[("authorization", TOKEN)], "").await;
        assert_eq!(
            basic.status, 401,
            "{method} {path} without the Bearer scheme"
        );
    }
    assert_eq!(a.call("GET", "/admin/connections").await.status, 200);
    assert_eq!(a.call("GET", "/no/such/path").await.status, 404);
    assert_eq!(a.api.reload.lock().unwrap().clone(), Ok(2), "nothing ran");

    // Without a configured token, nothing is asked.
    let open = admin(None).await;
    let r = request(open.addr, "GET", "/admin/connections", &[], "").await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn listing_filters_and_detail() {
    let a = admin(Some(TOKEN)).await;
    let c1 = a.register(1, "/chat", "10.0.0.1:5000", &[("user", "ann")]);
    let _c2 = a.register(2, "/chat", "10.0.0.2:5000", &[("user", "bob")]);
    let _c3 = a.register(
        3,
        "/feed",
        "10.0.0.1:6000",
        &[("user", "ann"), ("team", "red")],
    );
    c1.stats.message(Direction::ClientToUpstream, 11);
    c1.stats.message(Direction::UpstreamToClient, 5);
    c1.stats.message(Direction::UpstreamToClient, 6);

    assert_eq!(ids(&a.call("GET", "/admin/connections").await), [1, 2, 3]);
    assert_eq!(
        ids(&a.call("GET", "/admin/connections?route=/chat").await),
        [1, 2]
    );
    assert_eq!(
        ids(&a.call("GET", "/admin/connections?client_ip=10.0.0.1").await),
        [1, 3]
    );
    assert_eq!(
        ids(&a.call("GET", "/admin/connections?tag=user:ann").await),
        [1, 3]
    );
    assert_eq!(
        ids(&a
            .call("GET", "/admin/connections?tag=team:red&route=/feed")
            .await),
        [3]
    );
    assert_eq!(
        ids(&a.call("GET", "/admin/connections?snapshot=1&limit=2").await),
        [1, 2]
    );
    assert_eq!(
        ids(&a.call("GET", "/admin/connections?snapshot=9").await),
        Vec::<u64>::new()
    );
    let page = a.call("GET", "/admin/connections?limit=1").await;
    assert_eq!(page.json()["matched"], 3);

    let list = a
        .call("GET", "/admin/connections?route=%2Fchat&limit=1")
        .await
        .json();
    let c = &list["connections"][0];
    assert_eq!(c["client"], "10.0.0.1:5000");
    assert_eq!(c["upstream"], "ws://10.1.1.1:9001/chat");
    assert_eq!(c["snapshot"], 1);
    assert_eq!(c["tags"], json!({"user": "ann"}));
    assert_eq!(
        c["messages"],
        json!({"client_to_upstream": 1, "upstream_to_client": 2})
    );
    assert_eq!(
        c["bytes"],
        json!({"client_to_upstream": 11, "upstream_to_client": 11})
    );
    assert!(c["opened_at"].as_str().unwrap().ends_with('Z'));
    assert!(c["expires_at"].is_null());
    assert!(c.get("request").is_none(), "the listing stays small");

    for bad in [
        "limit=0",
        "limit=x",
        "client_ip=ann",
        "tag=user",
        "snapshot=-1",
        "color=red",
    ] {
        let r = a.call("GET", &format!("/admin/connections?{bad}")).await;
        assert_eq!(r.status, 400, "{bad}");
        assert!(!r.error().is_empty());
    }

    let d = a.call("GET", "/admin/connections/1").await;
    assert_eq!(d.status, 200);
    let text = String::from_utf8_lossy(&d.body).into_owned();
    assert!(!text.contains("SECRET"), "secrets are masked: {text}");
    let d = d.json();
    assert_eq!(d["id"], 1);
    assert_eq!(d["ctx"]["claims"]["sub"], "ann");
    assert_eq!(
        d["request"]["target"],
        "/chat?room=7&access_token=<redacted>"
    );
    assert_eq!(
        d["request"]["headers"][1],
        json!(["Authorization", "<redacted>"])
    );

    assert_eq!(a.call("GET", "/admin/connections/99").await.status, 404);
    let r = a.call("GET", "/admin/connections/abc").await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("not a number"));
    drop(c1);
    assert_eq!(
        a.call("GET", "/admin/connections/1").await.status,
        404,
        "gone with its guard"
    );
}

#[tokio::test]
async fn kick_one_and_by_tag() {
    let a = admin(Some(TOKEN)).await;
    let mut c1 = a.register(1, "/chat", "10.0.0.1:5000", &[("user", "ann")]);
    let mut c2 = a.register(2, "/chat", "10.0.0.2:5000", &[("user", "bob")]);
    let mut c3 = a.register(3, "/feed", "10.0.0.3:5000", &[("user", "ann")]);

    let r = a
        .call("DELETE", "/admin/connections/2?code=4000&reason=kicked")
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json(), json!({"id": 2, "code": 4000, "reason": "kicked"}));
    let got = within("the close", c2.control.recv()).await.unwrap();
    assert_eq!(
        got,
        Control::Close {
            code: 4000,
            reason: "kicked".into()
        }
    );

    let r = a.call("DELETE", "/admin/connections/2").await;
    assert_eq!(r.json()["code"], 1008, "default code");
    assert_eq!(
        c2.control.try_recv().unwrap(),
        Control::Close {
            code: 1008,
            reason: "closed by admin".into()
        }
    );

    for bad in [
        "code=1006",
        "code=1005",
        "code=5000",
        "code=abc",
        "code=4000&x=1",
    ] {
        let r = a
            .call("DELETE", &format!("/admin/connections/2?{bad}"))
            .await;
        assert_eq!(r.status, 400, "{bad}: {:?}", r.body);
    }
    let long = "r".repeat(124);
    let r = a
        .call("DELETE", &format!("/admin/connections/2?reason={long}"))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("123"), "{}", r.error());
    assert!(
        c2.control.try_recv().is_none(),
        "nothing queued by refused requests"
    );
    assert_eq!(a.call("DELETE", "/admin/connections/42").await.status, 404);
    assert_eq!(a.call("DELETE", "/admin/connections/x1").await.status, 400);

    let r = a
        .call(
            "DELETE",
            "/admin/connections?tag=user:ann&code=4001&reason=bye",
        )
        .await;
    assert_eq!(r.json(), json!({"matched": 2, "queued": 2, "skipped": 0}));
    let bye = Control::Close {
        code: 4001,
        reason: "bye".into(),
    };
    assert_eq!(c1.control.try_recv().unwrap(), bye);
    assert_eq!(c3.control.try_recv().unwrap(), bye);
    assert!(c2.control.try_recv().is_none(), "bob is not tagged ann");

    let r = a.call("DELETE", "/admin/connections").await;
    assert_eq!(r.status, 400, "closing everything needs an explicit filter");
    assert!(r.error().contains("filter"));
}

#[tokio::test]
async fn send_to_one_connection() {
    let a = admin(Some(TOKEN)).await;
    let mut c = a.register(5, "/chat", "10.0.0.1:5000", &[]);

    let r = a
        .call_with("POST", "/admin/connections/5/send?to=client", &[], "hello")
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        within("the send", c.control.recv()).await.unwrap(),
        Control::Send {
            to: Target::Client,
            message: Message::Text("hello".into())
        }
    );
    let bin = [("content-type", "application/octet-stream")];
    let r = a
        .call_with(
            "POST",
            "/admin/connections/5/send?to=upstream",
            &bin,
            vec![0u8, 159, 255],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        c.control.try_recv().unwrap(),
        Control::Send {
            to: Target::Upstream,
            message: Message::Binary(Bytes::from_static(&[0, 159, 255]))
        }
    );

    let r = a
        .call_with(
            "POST",
            "/admin/connections/5/send?to=client",
            &[],
            vec![0xffu8, 0xfe],
        )
        .await;
    assert_eq!(r.status, 400, "text must be UTF-8");
    assert_eq!(
        a.call("POST", "/admin/connections/5/send?to=both")
            .await
            .status,
        400
    );
    assert_eq!(
        a.call("POST", "/admin/connections/5/send").await.status,
        400
    );
    assert_eq!(
        a.call("POST", "/admin/connections/6/send?to=client")
            .await
            .status,
        404
    );
    assert_eq!(
        a.call("POST", "/admin/connections/z/send?to=client")
            .await
            .status,
        400
    );

    let big = vec![b'a'; admin::MAX_BODY + 1];
    let r = a
        .call_with("POST", "/admin/connections/5/send?to=client", &[], big)
        .await;
    assert_eq!(r.status, 413);
    assert!(
        c.control.try_recv().is_none(),
        "refused bodies queue nothing"
    );

    // A full queue answers 503 and the queued messages stay intact.
    for i in 0..CONTROL_CAPACITY {
        let r = a
            .call_with(
                "POST",
                "/admin/connections/5/send?to=client",
                &[],
                format!("m{i}"),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let r = a
        .call_with(
            "POST",
            "/admin/connections/5/send?to=client",
            &[],
            "one more",
        )
        .await;
    assert_eq!(r.status, 503);
    assert!(r.error().contains("queued"), "{}", r.error());
    for i in 0..CONTROL_CAPACITY {
        let Control::Send {
            message: Message::Text(t),
            ..
        } = c.control.try_recv().unwrap()
        else {
            panic!("a text send");
        };
        assert_eq!(&*t, format!("m{i}"));
    }
}

/// A body without Content-Length that runs past the limit is cut off with 413, not buffered.
#[tokio::test]
async fn chunked_body_over_the_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = admin(None).await;
    let _c = a.register(5, "/chat", "10.0.0.1:5000", &[]);
    let mut s = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    s.write_all(b"POST /admin/connections/5/send?to=client HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = vec![b'a'; 64 << 10];
    let mut answer = Vec::new();
    // Keep sending until the server answers; it must answer before 2 MiB.
    for _ in 0..32 {
        let head = format!("{:x}\r\n", chunk.len());
        if s.write_all(head.as_bytes()).await.is_err()
            || s.write_all(&chunk).await.is_err()
            || s.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let _ = within("the 413", s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

#[tokio::test]
async fn broadcast_to_matching_clients() {
    let a = admin(Some(TOKEN)).await;
    let mut c1 = a.register(1, "/chat", "10.0.0.1:5000", &[("room", "7")]);
    let mut c2 = a.register(2, "/chat", "10.0.0.2:5000", &[("room", "8")]);
    let mut c3 = a.register(3, "/feed", "10.0.0.3:5000", &[("room", "7")]);

    let r = a
        .call_with(
            "POST",
            "/admin/broadcast?route=/chat&tag=room:7",
            &[],
            "news",
        )
        .await;
    assert_eq!(r.json(), json!({"matched": 1, "queued": 1, "skipped": 0}));
    let news = Control::Send {
        to: Target::Client,
        message: Message::Text("news".into()),
    };
    assert_eq!(c1.control.try_recv().unwrap(), news);
    assert!(c2.control.try_recv().is_none() && c3.control.try_recv().is_none());

    let r = a.call_with("POST", "/admin/broadcast", &[], "all").await;
    assert_eq!(r.json()["queued"], 3);
    for c in [&mut c1, &mut c2, &mut c3] {
        assert!(matches!(
            c.control.try_recv(),
            Some(Control::Send {
                to: Target::Client,
                ..
            })
        ));
    }
    assert_eq!(
        a.call_with("POST", "/admin/broadcast?tag=room", &[], "x")
            .await
            .status,
        400
    );
}

#[tokio::test]
async fn reload_config_and_wrong_methods() {
    let a = admin(Some(TOKEN)).await;
    let r = a.call("POST", "/admin/reload").await;
    assert_eq!((r.status, r.json()), (200, json!({"snapshot": 2})));
    *a.api.reload.lock().unwrap() =
        Err("config.toml:7:12: route.expire: invalid duration \"soon\"".into());
    let r = a.call("POST", "/admin/reload").await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.error(),
        "config.toml:7:12: route.expire: invalid duration \"soon\""
    );

    let r = a.call("GET", "/admin/config").await;
    assert_eq!((r.status, r.json()["snapshot"].clone()), (200, json!(1)));
    assert_eq!(r.headers["content-type"], "application/json");

    let r = a.call("GET", "/admin/reload").await;
    assert_eq!(
        (r.status, &r.headers["allow"]),
        (405, &"POST".parse::<http::HeaderValue>().unwrap())
    );
    assert_eq!(a.call("PUT", "/admin/connections").await.status, 405);
    assert_eq!(a.call("POST", "/metrics").await.status, 405);
    assert_eq!(a.call("GET", "/admin/connections/1/send").await.status, 405);
    assert_eq!(a.call("GET", "/admin").await.status, 404);
}

/// `promtool check metrics` on a real scrape over HTTP, after events on two workers.
#[tokio::test]
async fn metrics_scrape_passes_promtool() {
    let a = admin(Some(TOKEN)).await;
    let m = &a.api.metrics;
    let (w0, w1) = (m.worker(0), m.worker(1));
    for (w, n) in [(&w0, 2), (&w1, 3)] {
        let chat = w.route("/chat");
        for i in 0..n {
            chat.handshake(101);
            chat.connection_opened();
            chat.message(Direction::ClientToUpstream, true, 100 * i);
            chat.message(Direction::UpstreamToClient, false, 1 << 20);
            chat.policy_call(Phase::ClientFrame, std::time::Duration::from_micros(30));
        }
        chat.connection_closed(4000, ClosedBy::Gateway);
        w.route("example.com/rooms/{room}").handshake(403);
    }
    a.call("POST", "/admin/reload").await;

    let r = a.call("GET", "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(
        text.contains("framegate_connections_total{route=\"/chat\"} 5\n"),
        "{text}"
    );
    assert!(
        text.contains("framegate_connections_open{route=\"/chat\"} 3\n"),
        "{text}"
    );
    assert!(text.contains("framegate_config_snapshot 2\n"), "{text}");
    assert!(
        text.contains(
            "framegate_handshakes_total{route=\"example.com/rooms/{room}\",status=\"403\"} 2\n"
        ),
        "{text}"
    );
    promtool_check(&text);
}

fn promtool_check(text: &str) {
    let out = promtool_check_metrics(text);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn shutdown_stops_the_listener() {
    let a = admin(None).await;
    assert_eq!(
        request(a.addr, "GET", "/healthz", &[], "").await.status,
        200
    );
    a.shutdown.cancel();
    within("serve to return", a.served).await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(a.addr).await.is_err(),
        "listener closed"
    );
}

/// The Grafana dashboard in docs/ uses only names the gateway exports, in PromQL that parses.
#[test]
fn grafana_dashboard_matches_the_metrics() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() > 20, "{exprs:?}");

    // Every family the gateway exports, as `# TYPE` names it.
    let metrics = Metrics::new();
    let set = metrics.worker(0).route("/x");
    set.connection_opened();
    set.policy_call(Phase::Upgrade, std::time::Duration::ZERO);
    // And the pools' families, which a gateway with pools adds at scrape time.
    let text = metrics.encode_with(vec![framegate::metrics::UpstreamSample {
        pool: "chat".into(),
        retries: 1,
        discovery_failures: 1,
        endpoints: vec![framegate::metrics::EndpointSample {
            endpoint: "ws://10.0.0.1:9000".into(),
            up: true,
            open: 2,
            failures: vec![("connect", 1)],
        }],
    }]);
    let families: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    assert_eq!(families.len(), 21, "{families:?}");
    for expr in &exprs {
        for name in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !name.starts_with("framegate_") {
                continue;
            }
            let known = families.iter().any(|(family, kind)| {
                name == *family
                    || (*kind == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name.strip_suffix(s) == Some(family)))
            });
            assert!(known, "{name} in the dashboard is not exported: {expr}");
        }
    }

    // PromQL syntax, through promtool's rule checker (Grafana variables substituted).
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$route", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:expr{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let file = std::env::temp_dir().join(format!("framegate-dashboard-{}.yml", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is needed for this test and could not be run ({e}): \
                 install the Debian package `prometheus` (apt-get install -y prometheus)"
            )
        });
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// A client that opens a connection and sends nothing, or half a head, is cut off after the
/// header timeout; one that drips its body gets 408 after the body timeout. Paused time: the
/// runtime jumps over the waits.
#[tokio::test(start_paused = true)]
async fn slow_clients_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = admin(None).await;
    let _c = a.register(5, "/chat", "10.0.0.1:5000", &[]);

    let started = tokio::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    for s in [&mut silent, &mut half] {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(admin::HEADER_READ_TIMEOUT * 3, s.read_to_end(&mut buf));
        read.await.expect("cut off after the head timeout").ok();
        let text = String::from_utf8_lossy(&buf);
        assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= admin::HEADER_READ_TIMEOUT && waited < admin::HEADER_READ_TIMEOUT * 2,
        "{waited:?}"
    );

    let started = tokio::time::Instant::now();
    let mut drip = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    drip.write_all(
        b"POST /admin/connections/5/send?to=client HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nab",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(admin::BODY_READ_TIMEOUT * 2, drip.read_to_end(&mut buf));
    read.await.expect("cut off after the body timeout").ok();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() >= admin::BODY_READ_TIMEOUT);
    assert_eq!(
        request(a.addr, "GET", "/healthz", &[], "").await.status,
        200,
        "still serving"
    );
}
