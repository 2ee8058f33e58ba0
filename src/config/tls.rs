//! `[[server.tls]]`: the `wss://` listeners. The configuration keeps the paths of the
//! certificate and key files and where they are written in the file; the files themselves are
//! read when a snapshot is built (at start-up, by `framegate check`, and on every reload), so
//! that a problem with one is reported as `file:line:column` at its key (see [`Place`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{raw, ConfigError, Spanned, Validator};

/// One `[[server.tls]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    /// The address to accept `wss://` connections on.
    pub listen: SocketAddr,
    /// `cert_file`/`key_file` first (the default certificate), then each `sni` entry.
    pub certificates: Vec<CertificatePair>,
    /// The lowest TLS version offered.
    pub min_version: TlsVersion,
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificatePair {
    /// The chain: the server's certificate first, then its intermediates.
    pub cert_file: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// Where `cert_file` is written in the configuration file.
    pub cert_at: Place,
    /// Where `key_file` is written.
    pub key_at: Place,
}

/// The lowest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (the default).
    #[default]
    V1_2,
    /// TLS 1.3 only.
    V1_3,
}

impl TlsVersion {
    /// As written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        }
    }
}

/// A position in the configuration file, for errors found after validation (a certificate
/// that does not load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl Place {
    /// An error at this place of `origin`.
    pub fn error(self, origin: &Path, message: String, hint: Option<String>) -> ConfigError {
        ConfigError {
            origin: origin.to_path_buf(),
            line: self.line,
            column: self.column,
            message,
            hint,
        }
    }
}

impl Validator<'_> {
    fn place<T>(&self, at: &Spanned<T>) -> Place {
        let e = ConfigError::at(self.origin, self.source, Some(at.span()), "", None);
        Place {
            line: e.line,
            column: e.column,
        }
    }

    fn pair(
        &self,
        cert: &Spanned<String>,
        key: &Spanned<String>,
    ) -> Result<CertificatePair, ConfigError> {
        let cert_file = self.existing_file(&Some(cert.clone()), "certificate file")?;
        let key_file = self.existing_file(&Some(key.clone()), "key file")?;
        Ok(CertificatePair {
            cert_file: cert_file.unwrap_or_default(),
            key_file: key_file.unwrap_or_default(),
            cert_at: self.place(cert),
            key_at: self.place(key),
        })
    }

    /// The `[[server.tls]]` tables; `plain` are the `server.listen` addresses, which a TLS
    /// listener may not repeat.
    pub(super) fn tls_listeners(
        &self,
        tables: Vec<raw::TlsListener>,
        plain: &[SocketAddr],
    ) -> Result<Vec<TlsListener>, ConfigError> {
        let mut listeners: Vec<TlsListener> = Vec::with_capacity(tables.len());
        for t in tables {
            let listen = t.listen.get_ref().parse::<SocketAddr>().map_err(|_| {
                self.err(
                    &t.listen,
                    format!(
                        "server.tls.listen: {:?} is not an IP address and port",
                        t.listen.get_ref()
                    ),
                    "write it like \"0.0.0.0:8443\" or \"[::1]:8443\"",
                )
            })?;
            // Port 0 picks a free port for each listener: only a TLS one is looked up by it.
            let plain_too = listen.port() != 0 && plain.contains(&listen);
            if plain_too || listeners.iter().any(|l| l.listen == listen) {
                return Err(self.err(
                    &t.listen,
                    format!("server.tls.listen: {listen} is already a listen address"),
                    "each address is either a plain listener (server.listen) or one TLS listener",
                ));
            }
            let mut certificates = vec![self.pair(&t.cert_file, &t.key_file)?];
            for more in &t.sni {
                certificates.push(self.pair(&more.cert_file, &more.key_file)?);
            }
            let min_version = match &t.min_version {
                None => TlsVersion::default(),
                Some(v) => match v.get_ref().as_str() {
                    "1.2" => TlsVersion::V1_2,
                    "1.3" => TlsVersion::V1_3,
                    other => {
                        return Err(self.err(
                            v,
                            format!("server.tls.min_version {other:?} is not \"1.2\" or \"1.3\""),
                            "TLS 1.0 and 1.1 are not offered; leave it out for \"1.2\"",
                        ))
                    }
                },
            };
            listeners.push(TlsListener {
                listen,
                certificates,
                min_version,
            });
        }
        Ok(listeners)
    }
}
