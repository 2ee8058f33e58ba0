//! rustls client configurations for `wss://` upstreams, built once per route at start-up.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::UpstreamTls;

/// Builds the client TLS configuration for one route: the built-in web roots plus `ca_file`,
/// or no verification at all when `insecure_skip_verify` is set.
pub fn client_config(settings: &UpstreamTls) -> Result<Arc<ClientConfig>, String> {
    build(settings, None)
}

/// A client certificate chain and its key.
type ClientCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Reads `cert_file` and `key_file` (both PEM).
fn client_cert(cert_file: &Path, key_file: &Path) -> Result<ClientCert, String> {
    let pem = std::fs::read(cert_file)
        .map_err(|e| format!("cannot read certificate file {}: {e}", cert_file.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate file {}: {e}", cert_file.display()))?;
    let pem = std::fs::read(key_file)
        .map_err(|e| format!("cannot read key file {}: {e}", key_file.display()))?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("key file {}: {e}", key_file.display()))?
        .ok_or_else(|| format!("key file {} holds no private key", key_file.display()))?;
    Ok((certs, key))
}

fn build(settings: &UpstreamTls, client: Option<ClientCert>) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?;
    let wants_client = if settings.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
    } else {
        builder.with_root_certificates(roots(settings)?)
    };
    let mut config = match client {
        Some((certs, key)) => wants_client
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("client certificate: {e}"))?,
        None => wants_client.with_no_client_auth(),
    };
    // The WebSocket upgrade is HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The built-in web roots plus `ca_file`.
fn roots(settings: &UpstreamTls) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &settings.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
        let mut found = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            found += 1;
        }
        if found == 0 {
            return Err(format!(
                "CA file {} holds no PEM certificate",
                path.display()
            ));
        }
    }
    Ok(roots)
}

/// The client TLS configuration of a pool's `[upstream.tls]`: its roots as for a route, and
/// its client certificate when it has one (mTLS).
pub fn pool_client_config(
    settings: &crate::config::pool::PoolTls,
) -> Result<Arc<ClientConfig>, String> {
    let client = match (&settings.cert_file, &settings.key_file) {
        (Some(cert), Some(key)) => Some(client_cert(cert, key)?),
        _ => None,
    };
    build(
        &UpstreamTls {
            ca_file: settings.ca_file.clone(),
            insecure_skip_verify: settings.insecure_skip_verify,
        },
        client,
    )
}

/// `insecure_skip_verify`: checks signatures but trusts any certificate chain and name.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
