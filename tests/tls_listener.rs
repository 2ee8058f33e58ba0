//! Issue 15 §1: `wss://` listeners (`[[server.tls]]`) over real sockets: echo through TLS, SNI
//! and the default certificate, `min_version`, ALPN, what policies and upstreams are told,
//! certificates reloaded (and a broken one refused), slow TLS clients bounded by
//! `header_read_timeout` and counted as pending, `framegate check`, and a plain listener
//! beside a TLS one.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use framegate::Running;
use futures_util::{SinkExt, StreamExt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use support::certs::Ca;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A client TLS configuration trusting `ca`, for `versions`, offering `alpn`.
fn trusting(
    ca: &Ca,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&str],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.issuer.der().clone()).unwrap();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// A client TLS configuration that takes any certificate (to see which one a server picks).
fn any_certificate() -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate))
            .with_no_client_auth(),
    )
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug)]
struct AnyCertificate;

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Opens TLS to `addr` asking for `name` (a DNS name is sent as SNI; an IP address sends none).
async fn tls(
    addr: SocketAddr,
    name: &str,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    within(
        "TLS handshake",
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
}

/// The certificate the server presented on `stream`.
fn peer_cert(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// A `wss://` WebSocket through the gateway, and the certificate it was served.
async fn wss(
    addr: SocketAddr,
    name: &str,
    config: Arc<ClientConfig>,
    path: &str,
) -> (Wss, CertificateDer<'static>) {
    let stream = tls(addr, name, config).await.expect("TLS handshake");
    let cert = peer_cert(&stream);
    let url = format!("wss://{name}:{}{path}", addr.port());
    let (ws, _) = within(
        "WebSocket handshake",
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .expect("upgrade succeeds");
    (ws, cert)
}

/// The next data or close message.
async fn next(ws: &mut Wss) -> Message {
    loop {
        match within("next message", ws.next()).await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => return m,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

async fn roundtrip(ws: &mut Wss, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    match next(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// `[server]` with a plain listener (and `extra` keys), `[admin]`, and one `[[server.tls]]`
/// with `gateway.pem`/`gateway.key` and the `tls_extra` keys.
fn config(extra: &str, tls_extra: &str, routes: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n{extra}\n\
         [[server.tls]]\nlisten = \"127.0.0.1:0\"\ncert_file = \"gateway.pem\"\nkey_file = \"gateway.key\"\n{tls_extra}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n{routes}"
    )
}

/// `POST /admin/reload`: status and body.
async fn admin_reload(gw: &Running) -> (u16, String) {
    let request = "POST /admin/reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let (status, _, body) = raw_http(gw.admin_addr().unwrap(), request).await;
    (status, body)
}

/// `line:column` (1-based) of the first occurrence of `needle` in `source`.
fn position(source: &str, needle: &str) -> String {
    let offset = source.find(needle).unwrap();
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("{line}:{column}")
}

#[tokio::test]
async fn wss_echo_carries_text_binary_and_the_close_code() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-echo");
    ca.leaf(&["localhost"]).write(&dir, "gateway");
    let up = echo().await;
    let gw = start_from(&dir, &config("", "", &route("/echo", up.addr, "", &[]))).await;
    let addr = gw.tls_addrs()[0];
    let client = trusting(&ca, rustls::DEFAULT_VERSIONS, &["http/1.1"]);
    let (mut ws, _) = wss(addr, "localhost", client, "/echo").await;
    assert_eq!(roundtrip(&mut ws, "over wss").await, "over wss");
    let big = vec![7u8; 100_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(big));
    ws.send(Message::Close(Some(close_frame(4001, "done"))))
        .await
        .unwrap();
    match next(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::from(4001)),
        other => panic!("expected the close, got {other:?}"),
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_plain_listener_beside_a_tls_one_still_works() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-beside");
    ca.leaf(&["localhost"]).write(&dir, "gateway");
    let up = echo().await;
    let gw = start_from(&dir, &config("", "", &route("/echo", up.addr, "", &[]))).await;
    let all = gw.local_addrs();
    let tls_addr = gw.tls_addrs()[0];
    assert_eq!(all.len(), 2);
    assert_eq!(all[1], tls_addr, "plain first, then TLS");
    let mut plain = connect(all[0], "/echo").await;
    plain.send(Message::text("plain")).await.unwrap();
    assert_eq!(next_text(&mut plain).await, "plain");
    // TLS on the plain port fails; plain HTTP on the TLS port gets no HTTP answer.
    let client = trusting(&ca, rustls::DEFAULT_VERSIONS, &[]);
    assert!(tls(all[0], "localhost", client.clone()).await.is_err());
    let mut raw = TcpStream::connect(tls_addr).await.unwrap();
    raw.write_all(upgrade_request("/echo", "").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = within("the TLS port to hang up", raw.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    let (mut secure, _) = wss(tls_addr, "localhost", client, "/echo").await;
    assert_eq!(roundtrip(&mut secure, "secure").await, "secure");
    plain.send(Message::text("still")).await.unwrap();
    assert_eq!(next_text(&mut plain).await, "still");
}

#[tokio::test]
async fn sni_picks_the_certificate_and_the_first_pair_is_the_default() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-sni");
    let default = ca.leaf(&["default.test"]);
    let api = ca.leaf(&["api.test", "API2.test"]);
    let wild = ca.leaf(&["*.wild.test"]);
    default.write(&dir, "gateway");
    api.write(&dir, "api");
    wild.write(&dir, "wild");
    let up = echo().await;
    let sni = "sni = [{ cert_file = \"api.pem\", key_file = \"api.key\" }, \
               { cert_file = \"wild.pem\", key_file = \"wild.key\" }]";
    let gw = start_from(&dir, &config("", sni, &route("/echo", up.addr, "", &[]))).await;
    let addr = gw.tls_addrs()[0];
    let served = |name: &'static str| async move {
        let stream = tls(addr, name, any_certificate()).await.unwrap();
        peer_cert(&stream)
    };
    assert_eq!(served("api.test").await, api.der);
    assert_eq!(
        served("api2.test").await,
        api.der,
        "SAN names match in any case"
    );
    assert_eq!(served("a.wild.test").await, wild.der);
    assert_eq!(served("default.test").await, default.der);
    assert_eq!(served("unknown.test").await, default.der);
    assert_eq!(
        served("a.b.wild.test").await,
        default.der,
        "a wildcard is one label"
    );
    // An IP address sends no SNI at all.
    assert_eq!(served("127.0.0.1").await, default.der);
    // A verifying client gets through on a name of an SNI certificate.
    let (mut ws, cert) = wss(
        addr,
        "api.test",
        trusting(&ca, rustls::DEFAULT_VERSIONS, &[]),
        "/echo",
    )
    .await;
    assert_eq!(cert, api.der);
    assert_eq!(roundtrip(&mut ws, "sni").await, "sni");
}

#[tokio::test]
async fn min_version_1_3_refuses_a_tls_1_2_client_and_1_2_is_the_default() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-versions");
    ca.leaf(&["localhost"]).write(&dir, "gateway");
    let up = echo().await;
    let routes = route("/echo", up.addr, "", &[]);
    // Two TLS listeners: the second only TLS 1.3.
    let toml = format!(
        "{}[[server.tls]]\nlisten = \"127.0.0.2:0\"\ncert_file = \"gateway.pem\"\nkey_file = \"gateway.key\"\nmin_version = \"1.3\"\n",
        config("", "", &routes)
    );
    let gw = start_from(&dir, &toml).await;
    let [default, strict] = gw.tls_addrs()[..] else {
        panic!("two TLS listeners")
    };
    let tls12 = trusting(&ca, &[&rustls::version::TLS12], &[]);
    let tls13 = trusting(&ca, &[&rustls::version::TLS13], &[]);
    let refused = tls(strict, "localhost", tls12.clone()).await;
    assert!(refused.is_err(), "a TLS 1.2 client got in");
    let stream = tls(strict, "localhost", tls13).await.unwrap();
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let (mut ws, _) = wss(default, "localhost", tls12, "/echo").await;
    assert_eq!(roundtrip(&mut ws, "1.2").await, "1.2");
}

#[tokio::test]
async fn alpn_negotiates_http_1_1_and_refuses_h2_only() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-alpn");
    ca.leaf(&["localhost"]).write(&dir, "gateway");
    let up = echo().await;
    let gw = start_from(&dir, &config("", "", &route("/echo", up.addr, "", &[]))).await;
    let addr = gw.tls_addrs()[0];
    let both = trusting(&ca, rustls::DEFAULT_VERSIONS, &["h2", "http/1.1"]);
    let stream = tls(addr, "localhost", both).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let h2 = trusting(&ca, rustls::DEFAULT_VERSIONS, &["h2"]);
    assert!(tls(addr, "localhost", h2).await.is_err());
    // No ALPN at all is fine.
    let none = trusting(&ca, rustls::DEFAULT_VERSIONS, &[]);
    let stream = tls(addr, "localhost", none).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
}

#[tokio::test]
async fn policies_see_wss_and_the_upstream_gets_https() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-scheme");
    ca.leaf(&["localhost"]).write(&dir, "gateway");
    let mut up = echo().await;
    let policy = script(
        "scheme.lua",
        "return function(req) req:set_header(\"x-scheme\", req.scheme) end\n",
    );
    let routes = route("/echo", up.addr, "", &[("on_upgrade", &policy)]);
    let gw = start_from(&dir, &config("", "", &routes)).await;
    let client = trusting(&ca, rustls::DEFAULT_VERSIONS, &[]);
    let (mut secure, _) = wss(gw.tls_addrs()[0], "localhost", client, "/echo").await;
    assert_eq!(roundtrip(&mut secure, "s").await, "s");
    let seen = within("upstream request", up.requests.recv())
        .await
        .unwrap();
    assert_eq!(seen.headers["x-scheme"], "wss");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    let mut plain = connect(gw.local_addrs()[0], "/echo").await;
    plain.send(Message::text("p")).await.unwrap();
    assert_eq!(next_text(&mut plain).await, "p");
    let seen = within("upstream request", up.requests.recv())
        .await
        .unwrap();
    assert_eq!(seen.headers["x-scheme"], "ws");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
}

#[tokio::test]
async fn a_reload_serves_a_new_certificate_and_keeps_open_connections() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-reload");
    let first = ca.leaf(&["localhost"]);
    first.write(&dir, "gateway");
    let up = echo().await;
    let toml = config("", "", &route("/echo", up.addr, "", &[]));
    let gw = start_from(&dir, &toml).await;
    let addr = gw.tls_addrs()[0];
    let client = trusting(&ca, rustls::DEFAULT_VERSIONS, &[]);
    let (mut old, cert) = wss(addr, "localhost", client.clone(), "/echo").await;
    assert_eq!(cert, first.der);

    let second = ca.leaf(&["localhost"]);
    second.write(&dir, "gateway");
    let (status, body) = admin_reload(&gw).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(roundtrip(&mut old, "still here").await, "still here");
    let (mut new, cert) = wss(addr, "localhost", client.clone(), "/echo").await;
    assert_eq!(cert, second.der);
    assert_eq!(roundtrip(&mut new, "new").await, "new");
    assert_eq!(gw.tls_addrs(), [addr], "the listener keeps its socket");

    // A broken certificate: 400 at cert_file, the second certificate still served.
    dir.write("gateway.pem", "not a certificate\n");
    let (status, body) = admin_reload(&gw).await;
    assert_eq!(status, 400, "{body}");
    let at = position(&toml, "\"gateway.pem\"");
    assert!(
        body.contains(&format!("config.toml:{at}: certificate file"))
            && body.contains("holds no PEM CERTIFICATE block"),
        "{body}"
    );
    let (_, cert) = wss(addr, "localhost", client.clone(), "/echo").await;
    assert_eq!(cert, second.der);

    // A key that is not the certificate's: 400 at key_file.
    let third = ca.leaf(&["localhost"]);
    dir.write("gateway.pem", &third.cert_pem);
    dir.write("gateway.key", &first.key_pem);
    let (status, body) = admin_reload(&gw).await;
    assert_eq!(status, 400, "{body}");
    let at = position(&toml, "\"gateway.key\"");
    assert!(
        body.contains(&format!("config.toml:{at}: key file"))
            && body.contains("is not the key of the certificate"),
        "{body}"
    );
    // An unreadable one (gone): 400 as well.
    std::fs::remove_file(dir.0.join("gateway.key")).unwrap();
    let (status, body) = admin_reload(&gw).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("key file"), "{body}");
    let (mut still, cert) = wss(addr, "localhost", client, "/echo").await;
    assert_eq!(cert, second.der);
    assert_eq!(roundtrip(&mut still, "ok").await, "ok");
    assert_eq!(roundtrip(&mut old, "old").await, "old");
    assert_eq!(gw.snapshot_number(), 2);
}

#[tokio::test]
async fn a_reload_adds_and_removes_tls_listeners() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-listen");
    ca.leaf(&["localhost"]).write(&dir, "gateway");
    let up = echo().await;
    let routes = route("/echo", up.addr, "", &[]);
    let plain_only = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{routes}"
    );
    let gw = start_from(&dir, &plain_only).await;
    assert!(gw.tls_addrs().is_empty());
    dir.write("config.toml", &config("", "", &routes));
    let (status, body) = admin_reload(&gw).await;
    assert_eq!(status, 200, "{body}");
    let [addr] = gw.tls_addrs()[..] else {
        panic!("one TLS listener")
    };
    let client = trusting(&ca, rustls::DEFAULT_VERSIONS, &[]);
    let (mut ws, _) = wss(addr, "localhost", client.clone(), "/echo").await;
    assert_eq!(roundtrip(&mut ws, "added").await, "added");
    dir.write("config.toml", &plain_only);
    let (status, body) = admin_reload(&gw).await;
    assert_eq!(status, 200, "{body}");
    assert!(gw.tls_addrs().is_empty());
    // The connection stays; the address takes no new ones.
    assert_eq!(roundtrip(&mut ws, "kept").await, "kept");
    let refused = within("connect to a removed listener", async {
        loop {
            match TcpStream::connect(addr).await {
                Err(_) => return,
                // Accepted by the backlog while the loops stop: try again.
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    refused.await;
}

#[tokio::test]
async fn a_fixed_address_switches_between_plain_and_tls_on_reload() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-switch");
    ca.leaf(&["localhost"]).write(&dir, "gateway");
    let up = echo().await;
    let routes = route("/echo", up.addr, "", &[]);
    // A free port, fixed in the configuration.
    let port = closed_port().await.port();
    let plain = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{routes}"
    );
    let secure = format!(
        "[server]\nlisten = []\n[[server.tls]]\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"gateway.pem\"\nkey_file = \"gateway.key\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n{routes}"
    );
    let gw = start_from(&dir, &plain).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut ws = connect(addr, "/echo").await;
    dir.write("config.toml", &secure);
    let (status, body) = admin_reload(&gw).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.tls_addrs(), [addr]);
    let client = trusting(&ca, rustls::DEFAULT_VERSIONS, &[]);
    let (mut wss_ws, _) = wss(addr, "localhost", client, "/echo").await;
    assert_eq!(roundtrip(&mut wss_ws, "now tls").await, "now tls");
    ws.send(Message::text("plain kept")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "plain kept");
}

#[tokio::test]
async fn slow_tls_clients_are_cut_at_header_read_timeout_while_others_upgrade() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-slow");
    ca.leaf(&["localhost"]).write(&dir, "gateway");
    let up = echo().await;
    let toml = config(
        "workers = 1\nheader_read_timeout = \"2s\"",
        "",
        &route("/echo", up.addr, "", &[]),
    );
    let gw = start_from(&dir, &toml).await;
    let addr = gw.tls_addrs()[0];
    let started = Instant::now();
    // One client sends nothing; another half a ClientHello (a record header announcing 200
    // bytes, then a few of them).
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03\x00\x01\x02")
        .await
        .unwrap();
    // A third, prompt one upgrades at once on the same (single) worker.
    let client = trusting(&ca, rustls::DEFAULT_VERSIONS, &[]);
    let (mut ws, _) = wss(addr, "localhost", client, "/echo").await;
    assert_eq!(roundtrip(&mut ws, "prompt").await, "prompt");
    let prompt = started.elapsed();
    assert!(prompt < Duration::from_millis(1500), "took {prompt:?}");
    assert_eq!(gw.pending_connections(), 2);
    for (which, stream) in [("silent", &mut silent), ("half", &mut half)] {
        let mut buf = [0u8; 64];
        let read = within("the slow client to be cut", stream.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "{which}: expected the connection closed, got {read:?}"
        );
        let after = started.elapsed();
        assert!(
            after >= Duration::from_millis(1900),
            "{which} cut after {after:?}"
        );
    }
    within("the pending set to empty", async {
        while gw.pending_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // The upgraded connection is not touched.
    assert_eq!(roundtrip(&mut ws, "still").await, "still");
}

#[tokio::test]
async fn a_tls_handshake_counts_as_pending_and_is_shed_for_a_newer_one() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-shed");
    ca.leaf(&["localhost"]).write(&dir, "gateway");
    let up = echo().await;
    let toml = config(
        "max_pending_handshakes = 1\nheader_read_timeout = \"30s\"",
        "",
        &route("/echo", up.addr, "", &[]),
    );
    let gw = start_from(&dir, &toml).await;
    let addr = gw.tls_addrs()[0];
    let mut silent = TcpStream::connect(addr).await.unwrap();
    within("the handshake to be pending", async {
        while gw.pending_connections() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // A newer client sheds the silent one long before its 30 s are up.
    let client = trusting(&ca, rustls::DEFAULT_VERSIONS, &[]);
    let (mut ws, _) = wss(addr, "localhost", client, "/echo").await;
    let mut buf = [0u8; 16];
    let read = within("the silent client to be shed", silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(roundtrip(&mut ws, "in").await, "in");
}

/// `framegate check --config path`: (success, stderr).
fn check(path: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_framegate"))
        .args(["check", "--config"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("framegate runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_locates_missing_files_bad_certificates_and_a_bad_min_version() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-check");
    let leaf = ca.leaf(&["localhost"]);
    leaf.write(&dir, "gateway");
    let routes = "[[route]]\npath = \"/e\"\nupstream = \"ws://127.0.0.1:9/\"\n";
    let good = config("", "", routes);
    let path = dir.write("config.toml", &good);
    let (ok, stderr) = check(&path);
    assert!(ok, "{stderr}");

    let cases: [(String, &str, &str); 5] = [
        (
            good.replace("\"gateway.key\"", "\"missing.key\""),
            "\"missing.key\"",
            "key file \"missing.key\" not found",
        ),
        (
            good.replace("\"gateway.pem\"", "\"missing.pem\""),
            "\"missing.pem\"",
            "certificate file \"missing.pem\" not found",
        ),
        (
            config("", "min_version = \"1.1\"", routes),
            "\"1.1\"",
            "server.tls.min_version \"1.1\" is not \"1.2\" or \"1.3\"",
        ),
        (
            good.replace("\"gateway.pem\"", "\"config.toml\""),
            "\"config.toml\"",
            "holds no PEM CERTIFICATE block",
        ),
        (
            good.replace("\"gateway.key\"", "\"other.key\""),
            "\"other.key\"",
            "is not the key of the certificate",
        ),
    ];
    dir.write("other.key", &ca.leaf(&["localhost"]).key_pem);
    for (toml, at, message) in cases {
        let path = dir.write("config.toml", &toml);
        let (ok, stderr) = check(&path);
        assert!(!ok, "check accepted:\n{toml}");
        let want = format!("config.toml:{}: ", position(&toml, at));
        assert!(
            stderr.contains(&want) && stderr.contains(message),
            "want {want}… {message}, got:\n{stderr}"
        );
    }
}

#[tokio::test]
async fn a_tls_only_gateway_has_no_plain_listener() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-only");
    ca.leaf(&["localhost"]).write(&dir, "gateway");
    let up = echo().await;
    let toml = format!(
        "[[server.tls]]\nlisten = \"127.0.0.1:0\"\ncert_file = \"gateway.pem\"\nkey_file = \"gateway.key\"\n\n{}",
        route("/echo", up.addr, "", &[])
    );
    let gw = start_from(&dir, &toml).await;
    assert_eq!(gw.local_addrs(), gw.tls_addrs());
    let client = trusting(&ca, rustls::DEFAULT_VERSIONS, &[]);
    let (mut ws, _) = wss(gw.local_addr(), "localhost", client, "/echo").await;
    assert_eq!(roundtrip(&mut ws, "only").await, "only");
}

#[tokio::test]
async fn server_watch_reloads_when_a_certificate_changes() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-watch");
    let first = ca.leaf(&["localhost"]);
    first.write(&dir, "gateway");
    let up = echo().await;
    let gw = start_from(
        &dir,
        &config("watch = true", "", &route("/echo", up.addr, "", &[])),
    )
    .await;
    let addr = gw.tls_addrs()[0];
    let client = trusting(&ca, rustls::DEFAULT_VERSIONS, &[]);
    let second = ca.leaf(&["localhost"]);
    // The key first, then the certificate: the debounce makes one reload of both.
    dir.write("gateway.key", &second.key_pem);
    dir.write("gateway.pem", &second.cert_pem);
    within("the watcher to reload the certificate", async {
        loop {
            if gw.snapshot_number() > 1 {
                let (_, cert) = wss(addr, "localhost", client.clone(), "/echo").await;
                if cert == second.der {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// HTTP mode on a TLS listener: policies see `wss` on plain HTTP requests too.
#[tokio::test]
async fn http_requests_on_a_tls_listener_see_wss() {
    let ca = Ca::new();
    let dir = TempDir::new("tls-http");
    ca.leaf(&["localhost"]).write(&dir, "gateway");
    let up = echo().await;
    let policy = script(
        "scheme_http.lua",
        "return function(req) if not req.upgrade then return req:reject(418, req.scheme) end end\n",
    );
    let routes = route(
        "/api",
        up.addr,
        "http = \"proxy\"",
        &[("on_upgrade", &policy)],
    );
    let gw = start_from(&dir, &config("", "", &routes)).await;
    let client = trusting(&ca, rustls::DEFAULT_VERSIONS, &[]);
    let mut stream = tls(gw.tls_addrs()[0], "localhost", client)
        .await
        .expect("TLS handshake");
    stream
        .write_all(b"GET /api HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    within("the answer", stream.read_to_end(&mut answer))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 418"), "{answer}");
    assert!(answer.ends_with("wss"), "{answer}");
}
