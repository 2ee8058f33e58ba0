//! The `[admin]` table of `config.toml`: its serde mirror ([`RawAdmin`]) and its validation into
//! an [`AdminConfig`], with `file:line:column` errors. Standalone so that the config loader can
//! take it as one field (`admin: Option<RawAdmin>` in `raw::File`) and call [`RawAdmin::check`].
//!
//! ```toml
//! [admin]
//! listen = "127.0.0.1:9901"      # absent table: no admin listener
//! token_file = "admin.token"     # required unless listen is a loopback address
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;

/// Longest token accepted from `token_file`, in bytes.
pub const MAX_TOKEN: usize = 4096;
/// Shortest token accepted, in bytes: shorter ones are guessable.
pub const MIN_TOKEN: usize = 16;

/// serde mirror of `[admin]`; every value keeps its span so that errors point at it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `listen`: the admin listener's address.
    pub listen: Spanned<String>,
    /// `token_file`: a file holding the bearer token, relative to the config file's folder.
    pub token_file: Option<Spanned<String>>,
}

/// The validated `[admin]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where the admin API listens.
    pub listen: SocketAddr,
    /// The token file, resolved against the config file's folder.
    pub token_file: Option<PathBuf>,
    /// The token read from `token_file` (surrounding whitespace trimmed). Never log it.
    pub token: Option<String>,
}

/// `[admin]` problems found after parsing, before they are located in the source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminConfigError {
    /// `listen` is not `ip:port`.
    #[error("admin.listen: {0:?} is not an address like \"127.0.0.1:9901\"")]
    Listen(String),
    /// A non-loopback address without a token.
    #[error("admin.listen {0} is reachable from other hosts, so admin.token_file is required")]
    NoToken(SocketAddr),
    /// The token file cannot be read or holds no usable token.
    #[error("admin.token_file {0}: {1}")]
    Token(PathBuf, String),
}

impl RawAdmin {
    /// Validates the table. `origin` and `source` locate errors; `base` (the config file's
    /// folder) anchors a relative `token_file`. Reads the token, so `framegate check` fails
    /// on a missing or empty token file rather than at start.
    pub fn check(
        &self,
        origin: &Path,
        source: &str,
        base: &Path,
    ) -> Result<AdminConfig, ConfigError> {
        let at = |span: std::ops::Range<usize>, e: AdminConfigError, hint: &str| {
            ConfigError::at(origin, source, Some(span), e.to_string(), Some(hint.into()))
        };
        let listen: SocketAddr = self.listen.get_ref().trim().parse().map_err(|_| {
            at(
                self.listen.span(),
                AdminConfigError::Listen(self.listen.get_ref().clone()),
                "write an IP address and a port; use 127.0.0.1 to keep the admin API local",
            )
        })?;
        let Some(file) = &self.token_file else {
            if listen.ip().is_loopback() {
                return Ok(AdminConfig {
                    listen,
                    token_file: None,
                    token: None,
                });
            }
            return Err(at(
                self.listen.span(),
                AdminConfigError::NoToken(listen),
                "set admin.token_file, or listen on 127.0.0.1",
            ));
        };
        let path = base.join(file.get_ref());
        let token = read_token(&path).map_err(|e| {
            at(
                file.span(),
                e,
                "put one random token of 16 or more characters in the file",
            )
        })?;
        Ok(AdminConfig {
            listen,
            token_file: Some(path),
            token: Some(token),
        })
    }
}

/// Reads a token file: surrounding whitespace trimmed, [`MIN_TOKEN`] to [`MAX_TOKEN`] bytes of
/// visible ASCII (it travels in an HTTP header).
pub fn read_token(path: &Path) -> Result<String, AdminConfigError> {
    let err = |m: String| AdminConfigError::Token(path.to_path_buf(), m);
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    if meta.len() > MAX_TOKEN as u64 + 2 {
        return Err(err(format!("it is over {MAX_TOKEN} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let token = text.trim();
    if token.len() < MIN_TOKEN || token.len() > MAX_TOKEN {
        return Err(err(format!(
            "the token must be {MIN_TOKEN} to {MAX_TOKEN} characters (found {})",
            token.len()
        )));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err("the token must be visible ASCII without spaces".into()));
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct File {
        admin: RawAdmin,
    }

    fn check(source: &str, base: &Path) -> Result<AdminConfig, ConfigError> {
        let file: File = toml::from_str(source).map_err(|e| {
            ConfigError::at(Path::new("t.toml"), source, e.span(), e.message(), None)
        })?;
        file.admin.check(Path::new("t.toml"), source, base)
    }

    #[test]
    fn loopback_needs_no_token() {
        let c = check("[admin]\nlisten = \"127.0.0.1:9901\"\n", Path::new(".")).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.token, None);
        check("[admin]\nlisten = \"[::1]:9901\"\n", Path::new(".")).unwrap();
    }

    #[test]
    fn public_listen_without_token_is_refused_at_its_line() {
        let e = check("[admin]\nlisten = \"0.0.0.0:9901\"\n", Path::new(".")).unwrap_err();
        assert_eq!((e.line, e.column), (2, 10), "{e}");
        assert!(e.message.contains("admin.token_file is required"), "{e}");
    }

    #[test]
    fn bad_values_are_located() {
        let e = check("[admin]\nlisten = \"localhost\"\n", Path::new(".")).unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let e = check(
            "[admin]\nlisten = \"127.0.0.1:1\"\nport = 3\n",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.message.contains("unknown field"), "{e}");
        let e = check(
            "[admin]\nlisten = \"0.0.0.0:1\"\ntoken_file = \"missing.token\"\n",
            Path::new("/nonexistent"),
        )
        .unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("cannot read it"), "{e}");
    }

    #[test]
    fn token_is_read_trimmed_and_checked() {
        let dir = std::env::temp_dir().join(format!("framegate-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("good.token"), "0123456789abcdefXYZ\n").unwrap();
        std::fs::write(dir.join("short.token"), "abc\n").unwrap();
        std::fs::write(dir.join("spaces.token"), "0123456789 abcdefXYZ\n").unwrap();
        let src = |f: &str| format!("[admin]\nlisten = \"0.0.0.0:9901\"\ntoken_file = \"{f}\"\n");
        let c = check(&src("good.token"), &dir).unwrap();
        assert_eq!(c.token.as_deref(), Some("0123456789abcdefXYZ"));
        assert_eq!(c.token_file, Some(dir.join("good.token")));
        assert!(check(&src("short.token"), &dir)
            .unwrap_err()
            .message
            .contains("16 to"));
        assert!(check(&src("spaces.token"), &dir)
            .unwrap_err()
            .message
            .contains("visible"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
