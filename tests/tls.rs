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

/// A TLS echo upstream; returns its port.
async fn tls_echo(pki: &Pki) -> u16 {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![pki.leaf.clone()], pki.leaf_key.clone_key())
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
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
