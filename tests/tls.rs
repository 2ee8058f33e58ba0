//! `wss://` upstreams: TLS to the upstream with a private CA, a wrong CA, and the testing switch.

mod support;

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::*;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

struct Pki {
    ca_pem: String,
    leaf: CertificateDer<'static>,
    leaf_key: PrivateKeyDer<'static>,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "framegate test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        leaf: leaf.der().clone(),
        leaf_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    }
}

/// The server side of TLS with `pki`'s leaf certificate.
fn acceptor(pki: &Pki) -> tokio_rustls::TlsAcceptor {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![pki.leaf.clone()], pki.leaf_key.clone_key())
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A TLS echo upstream; returns its port.
async fn tls_echo(pki: &Pki) -> u16 {
    let acceptor = acceptor(pki);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

fn write_temp(name: &str, contents: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("framegate-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    path
}

#[tokio::test]
async fn wss_upstream_with_a_private_ca() {
    let pki = pki();
    let port = tls_echo(&pki).await;
    let ca = write_temp("ca.pem", &pki.ca_pem);
    let gw = gateway(&format!(
        "[[route]]\npath = \"/secure\"\nupstream = \"wss://localhost:{port}/\"\n[route.upstream_tls]\nca_file = {:?}\n",
        ca.display().to_string()
    ))
    .await;
    let mut ws = connect(gw.local_addr(), "/secure").await;
    ws.send(Message::text("over tls")).await.unwrap();
    assert_eq!(
        next_message(&mut ws).await.unwrap().unwrap(),
        Message::text("over tls")
    );
}

#[tokio::test]
async fn untrusted_upstream_certificate_gets_502() {
    let pki = pki();
    let port = tls_echo(&pki).await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/secure\"\nupstream = \"wss://localhost:{port}/\"\n"
    ))
    .await;
    let (status, _, _) = raw_http(gw.local_addr(), &upgrade_request("/secure", "")).await;
    assert_eq!(status, 502);
}

#[tokio::test]
async fn insecure_skip_verify_accepts_any_certificate() {
    let pki = pki();
    let port = tls_echo(&pki).await;
    let gw = gateway(&format!(
        "[[route]]\npath = \"/secure\"\nupstream = \"wss://localhost:{port}/\"\n[route.upstream_tls]\ninsecure_skip_verify = true\n"
    ))
    .await;
    let mut ws = connect(gw.local_addr(), "/secure").await;
    ws.send(Message::text("trusting")).await.unwrap();
    assert_eq!(
        next_message(&mut ws).await.unwrap().unwrap(),
        Message::text("trusting")
    );
}

/// `http = "proxy"` on a `wss://` route: plain HTTP requests go over `https://`, with the
/// route's CA.
#[tokio::test]
async fn http_requests_on_a_wss_route_go_over_https_with_its_ca() {
    let pki = pki();
    let acceptor = acceptor(&pki);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let body = format!("https {} {}", req.method(), req.uri());
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let ca = write_temp("https-ca.pem", &pki.ca_pem);
    let gw = gateway(&format!(
        "[[route]]\npath = \"/h\"\nupstream = \"wss://localhost:{port}/h\"\nhttp = \"proxy\"\n\
         [route.upstream_tls]\nca_file = {:?}\n",
        ca.display().to_string()
    ))
    .await;
    let (status, _, body) = raw_http(
        gw.local_addr(),
        "GET /h?q=1 HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "https GET /h?q=1"));
    gw.shutdown().await;
}
