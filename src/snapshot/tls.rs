//! The `wss://` listeners' rustls server configurations (`[[server.tls]]`), built from the
//! certificate files with each snapshot: a reload that changes a certificate gives new
//! connections the new one, and a connection keeps the configuration it was accepted with.
//!
//! A listener's certificates: the first pair is the default; the others are chosen by the
//! server name the client asks for (SNI), matched against the DNS names in each certificate's
//! subject alternative names (exact names first, then `*.` wildcards, which stand for one
//! label as in browsers). A client that sends no server name, or one that no certificate names,
//! gets the default. The handshake itself is the listener's (src/listener/tls.rs).

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::{CertificatePair, ConfigError, TlsListener, TlsVersion};

/// Builds the rustls configuration of one TLS listener, reading its certificate and key files.
/// A file that cannot be read or parsed, or a key that does not go with its certificate, is an
/// error at the key naming it in `origin` (the configuration file).
pub(crate) fn server_config(
    listener: &TlsListener,
    origin: &Path,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificates = listener
        .certificates
        .iter()
        .map(|pair| load(pair, origin, &provider))
        .collect::<Result<Vec<_>, _>>()?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = match listener.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let at = listener.certificates[0].cert_at;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| at.error(origin, format!("TLS set-up failed: {e}"), None))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Certificates(certificates)));
    // The WebSocket upgrade is HTTP/1.1 (RFC 6455); a client offering only h2 is refused.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One certificate chain with its key, and the DNS names it serves (lower-case; wildcards as
/// `*.rest`).
#[derive(Debug)]
struct Loaded {
    names: Vec<String>,
    key: Arc<CertifiedKey>,
}

fn load(
    pair: &CertificatePair,
    origin: &Path,
    provider: &CryptoProvider,
) -> Result<Loaded, ConfigError> {
    let cert_path = pair.cert_file.display();
    let key_path = pair.key_file.display();
    let at_cert = |message: String| {
        pair.cert_at.error(
            origin,
            message,
            Some(
                "cert_file is a PEM file: the server's certificate first, then its intermediates"
                    .into(),
            ),
        )
    };
    let at_key = |message: String| {
        pair.key_at.error(
            origin,
            message,
            Some("key_file is the PEM private key (PKCS#8, PKCS#1 or SEC1) of the first certificate in cert_file".into()),
        )
    };
    let pem = std::fs::read(&pair.cert_file)
        .map_err(|e| at_cert(format!("cannot read certificate file {cert_path}: {e}")))?;
    let chain = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<CertificateDer<'static>>, _>>()
        .map_err(|e| at_cert(format!("certificate file {cert_path}: {e}")))?;
    if chain.is_empty() {
        return Err(at_cert(format!(
            "certificate file {cert_path} holds no PEM CERTIFICATE block"
        )));
    }
    let names = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| {
            at_cert(format!(
                "certificate file {cert_path}: the first certificate cannot be parsed: {e}"
            ))
        })?
        .valid_dns_names()
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    let pem = std::fs::read(&pair.key_file)
        .map_err(|e| at_key(format!("cannot read key file {key_path}: {e}")))?;
    let key = match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(key)) => key,
        Ok(None) => {
            return Err(at_key(format!(
                "key file {key_path} holds no PEM private key"
            )))
        }
        Err(e) => return Err(at_key(format!("key file {key_path}: {e}"))),
    };
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => at_key(format!(
            "key file {key_path} is not the key of the certificate in {cert_path}"
        )),
        e => at_key(format!("key file {key_path}: {e}")),
    })?;
    Ok(Loaded {
        names,
        key: Arc::new(key),
    })
}

/// A listener's certificates, the default first.
#[derive(Debug)]
struct Certificates(Vec<Loaded>);

impl Certificates {
    /// The certificate for `server_name`: one that names it exactly, else one with a wildcard
    /// that covers it, else the default.
    fn pick(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let default = &self.0[0].key;
        let Some(name) = server_name.map(|n| n.trim_end_matches('.')) else {
            return default;
        };
        let exact = self
            .0
            .iter()
            .find(|c| c.names.iter().any(|n| n.eq_ignore_ascii_case(name)));
        let covered = || {
            let (first, rest) = name.split_once('.')?;
            if first.is_empty() {
                return None;
            }
            self.0.iter().find(|c| {
                c.names.iter().any(|n| {
                    n.strip_prefix("*.")
                        .is_some_and(|w| w.eq_ignore_ascii_case(rest))
                })
            })
        };
        exact.or_else(covered).map_or(default, |c| &c.key)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(names: &[&str]) -> Loaded {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap()
                .self_signed(&key)
                .unwrap();
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = rustls::crypto::ring::default_provider();
        let key = CertifiedKey::from_der(vec![cert.der().clone()], der, &provider).unwrap();
        Loaded {
            names: names.iter().map(|n| n.to_string()).collect(),
            key: Arc::new(key),
        }
    }

    #[test]
    fn sni_picks_exact_names_then_wildcards_then_the_default() {
        let certs = Certificates(vec![
            loaded(&["default.test"]),
            loaded(&["*.example.com"]),
            loaded(&["api.example.com", "other.test"]),
        ]);
        let which = |name: Option<&str>| {
            let picked = certs.pick(name);
            certs
                .0
                .iter()
                .position(|c| Arc::ptr_eq(&c.key, picked))
                .unwrap()
        };
        assert_eq!(which(None), 0);
        assert_eq!(which(Some("unknown.test")), 0);
        assert_eq!(which(Some("www.example.com")), 1);
        assert_eq!(which(Some("WWW.Example.com.")), 1);
        assert_eq!(which(Some("api.example.com")), 2, "exact beats wildcard");
        assert_eq!(which(Some("a.b.example.com")), 0, "a wildcard is one label");
        assert_eq!(which(Some("example.com")), 0);
        assert_eq!(which(Some("other.test")), 2);
    }
}
