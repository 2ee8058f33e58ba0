//! A test certificate authority (rcgen) and the leaf certificates it issues, for the tests of
//! TLS listeners.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::CertificateDer;

use super::TempDir;

/// A test CA and the leaf certificates it issues.
pub struct Ca {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
    pub pem: String,
}

/// A leaf certificate: its PEM files' contents and its DER (to compare with what a client saw).
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

#[allow(clippy::new_without_default)]
impl Ca {
    /// A fresh self-signed CA.
    pub fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "framegate test CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pem = issuer.pem();
        Ca { issuer, pem }
    }

    /// A leaf for `names` in its SANs (DNS names, or IP addresses when they parse as one).
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        Leaf {
            cert_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

impl Leaf {
    /// Writes `{name}.pem` and `{name}.key` into `dir`.
    pub fn write(&self, dir: &TempDir, name: &str) {
        dir.write(&format!("{name}.pem"), &self.cert_pem);
        dir.write(&format!("{name}.key"), &self.key_pem);
    }
}
