//! Issue 14: a pool's `wss://` endpoint that requires a client certificate (mTLS): framegate's
//! (`[upstream.tls] cert_file`/`key_file`) is accepted, a connection without it is refused;
//! `server_name` sets the name checked when it differs from the endpoint's host.

mod support;

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use support::*;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

struct Pki {
    ca_pem: String,
    ca: CertificateDer<'static>,
    server: CertificateDer<'static>,
    server_key: PrivateKeyDer<'static>,
    client_pem: String,
    client_key_pem: String,
}

/// A CA, a server certificate for `chat.internal` (not the endpoint's 127.0.0.1), and a
/// client certificate for the gateway.
fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "framegate pool test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["chat.internal".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["gateway.internal".to_owned()]).unwrap();
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        ca: ca.der().clone(),
        server: server.der().clone(),
        server_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        client_pem: client.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

/// A `wss://` upstream that requires a client certificate signed by the CA; it names itself
/// in its first message. Returns its port and a channel of refused TLS handshakes.
async fn mtls_upstream(pki: &Pki) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![pki.server.clone()], pki.server_key.clone_key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (refused_tx, refused) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let refused_tx = refused_tx.clone();
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        let _ = refused_tx.send(e.to_string());
                        return;
                    }
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                let _ = ws.send(Message::text("mtls")).await;
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, refused)
}

fn config(port: u16, tls: &str) -> String {
    format!(
        "[[upstream]]\nname = \"secure\"\nendpoints = [\"wss://127.0.0.1:{port}\"]\nretries = 0\n\
         [upstream.tls]\n{tls}\n\
         [[route]]\npath = \"/s\"\nupstream = \"secure\"\n"
    )
}

/// The pool's `[upstream.tls]` keys, with the CA (and, with `client`, the gateway's client
/// certificate and key) written to `dir`.
fn upstream_tls(dir: &TempDir, pki: &Pki, client: bool, server_name: Option<&str>) -> String {
    let ca = dir.write("ca.pem", &pki.ca_pem);
    let mut keys = format!("ca_file = {:?}\n", ca.display().to_string());
    if client {
        let cert = dir.write("gateway.pem", &pki.client_pem);
        let key = dir.write("gateway.key", &pki.client_key_pem);
        keys += &format!(
            "cert_file = {:?}\nkey_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        );
    }
    if let Some(name) = server_name {
        keys += &format!("server_name = {name:?}\n");
    }
    keys
}

#[tokio::test]
async fn a_client_certificate_is_presented_and_accepted() {
    let pki = pki();
    let dir = TempDir::new("pool-mtls");
    let (port, _refused) = mtls_upstream(&pki).await;
    let tls = upstream_tls(&dir, &pki, true, Some("chat.internal"));
    let gw = gateway(&config(port, &tls)).await;
    let mut ws = connect(gw.local_addr(), "/s").await;
    assert_eq!(next_text(&mut ws).await, "mtls");
    ws.send(Message::text("over mTLS")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "over mTLS");
}

#[tokio::test]
async fn without_the_client_certificate_the_upstream_refuses() {
    let pki = pki();
    let dir = TempDir::new("pool-mtls-none");
    let (port, mut refused) = mtls_upstream(&pki).await;
    let tls = upstream_tls(&dir, &pki, false, Some("chat.internal"));
    let gw = gateway(&config(port, &tls)).await;
    let (status, _, _) = raw_http(gw.local_addr(), &upgrade_request("/s", "")).await;
    assert_eq!(status, 502);
    let why = within("the upstream's refusal", refused.recv())
        .await
        .unwrap();
    assert!(why.to_lowercase().contains("certificate"), "{why}");
}

#[tokio::test]
async fn the_certificate_is_checked_for_server_name_not_the_address() {
    let pki = pki();
    let dir = TempDir::new("pool-mtls-name");
    let (port, _refused) = mtls_upstream(&pki).await;
    // Without server_name the name checked is 127.0.0.1, which the certificate lacks.
    let tls = upstream_tls(&dir, &pki, true, None);
    let gw = gateway(&config(port, &tls)).await;
    let (status, _, _) = raw_http(gw.local_addr(), &upgrade_request("/s", "")).await;
    assert_eq!(status, 502);
}
