//! The `[route.capture]` table: whether the traffic console records a route's messages, how
//! much of each, how many, and what it masks. Recording itself is `src/capture/`; this module
//! only validates the table.
//!
//! ```toml
//! [route.capture]
//! mode = "payload"                 # off (default) | metadata | payload
//! max_payload = "4KiB"             # longer payloads are cut and marked
//! keep = 200                       # messages per connection, in a ring
//! mask = ["password", "token"]     # JSON fields and headers shown as <redacted>
//! ```

use serde::Deserialize;
use toml::Spanned;

use super::{units, ConfigError};

/// Default `max_payload`, in bytes.
pub const DEFAULT_MAX_PAYLOAD: usize = 4 * 1024;
/// Largest `max_payload`, in bytes: a capture holds at most `keep` of them per connection.
pub const MAX_MAX_PAYLOAD: usize = 64 * 1024;
/// Default `keep`.
pub const DEFAULT_KEEP: usize = 200;
/// Largest `keep`.
pub const MAX_KEEP: usize = 10_000;
/// Most names `mask` may list.
pub const MAX_MASKED: usize = 64;

/// The fields masked when `mask` is not set: the usual names of secrets.
pub const DEFAULT_MASK: [&str; 2] = ["password", "token"];

/// serde mirror of `[route.capture]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCapture {
    mode: Option<Spanned<String>>,
    max_payload: Option<Spanned<String>>,
    keep: Option<Spanned<i64>>,
    mask: Option<Spanned<Vec<Spanned<String>>>>,
}

/// What a capture records of each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaptureMode {
    /// Nothing (the default; the console can still turn it on for one connection).
    #[default]
    Off,
    /// Time, direction, type, size, frames, masking key, decision; no payload.
    Metadata,
    /// The metadata and the payload, up to `max_payload` bytes.
    Payload,
}

impl CaptureMode {
    /// The configuration's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureMode::Off => "off",
            CaptureMode::Metadata => "metadata",
            CaptureMode::Payload => "payload",
        }
    }

    /// Parses the configuration's word.
    pub fn parse(word: &str) -> Option<CaptureMode> {
        [
            CaptureMode::Off,
            CaptureMode::Metadata,
            CaptureMode::Payload,
        ]
        .into_iter()
        .find(|m| m.as_str() == word)
    }
}

/// A validated `[route.capture]` (its defaults when the table is absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// What new connections of the route record.
    pub mode: CaptureMode,
    /// Payload bytes kept per message; longer ones are cut and marked `truncated`.
    pub max_payload: usize,
    /// Entries kept per connection; older ones make room (the console is told how many).
    pub keep: usize,
    /// JSON field names and header names (both compared case-insensitively) whose values are
    /// shown as `<redacted>`.
    pub mask: Vec<String>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            mode: CaptureMode::Off,
            max_payload: DEFAULT_MAX_PAYLOAD,
            keep: DEFAULT_KEEP,
            mask: DEFAULT_MASK.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

/// Checks `[route.capture]`, reporting errors at the offending value.
pub(super) fn check(
    raw: RawCapture,
    at: &dyn Fn(std::ops::Range<usize>, String, &str) -> ConfigError,
) -> Result<CaptureConfig, ConfigError> {
    let mut c = CaptureConfig::default();
    if let Some(v) = &raw.mode {
        c.mode = CaptureMode::parse(v.get_ref()).ok_or_else(|| {
            at(
                v.span(),
                format!(
                    "route.capture.mode {:?} is not one of off, metadata, payload",
                    v.get_ref()
                ),
                "off (the default) records nothing; metadata records each message without its payload; payload records the payload too",
            )
        })?;
    }
    if let Some(v) = &raw.max_payload {
        let n = units::parse_size(v.get_ref())
            .map_err(|e| at(v.span(), format!("route.capture.max_payload: {e}"), ""))?;
        if n == 0 || n > MAX_MAX_PAYLOAD as u64 {
            return Err(at(
                v.span(),
                format!(
                    "route.capture.max_payload must be 1B to {}KiB",
                    MAX_MAX_PAYLOAD >> 10
                ),
                "a capture keeps `keep` payloads per connection: keep them small, e.g. \"4KiB\"",
            ));
        }
        c.max_payload = n as usize;
    }
    if let Some(v) = &raw.keep {
        let n = *v.get_ref();
        if n < 1 || n > MAX_KEEP as i64 {
            return Err(at(
                v.span(),
                format!("route.capture.keep must be 1 to {MAX_KEEP}"),
                "",
            ));
        }
        c.keep = n as usize;
    }
    if let Some(list) = raw.mask {
        if list.get_ref().len() > MAX_MASKED {
            return Err(at(
                list.span(),
                format!("route.capture.mask lists more than {MAX_MASKED} names"),
                "",
            ));
        }
        c.mask = Vec::new();
        for name in list.into_inner() {
            if name.get_ref().is_empty() {
                return Err(at(
                    name.span(),
                    "route.capture.mask has an empty name".into(),
                    "list JSON field or header names, e.g. [\"password\", \"token\"]",
                ));
            }
            c.mask.push(name.into_inner());
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use crate::Config;

    fn route(table: &str) -> Result<crate::config::Route, crate::config::ConfigError> {
        let source = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[[route]]\npath = \"/a\"\nupstream = \"ws://127.0.0.1:1/\"\n{table}"
        );
        Config::from_toml(&source, std::path::Path::new("t.toml")).map(|c| (*c.routes[0]).clone())
    }

    #[test]
    fn absent_is_off_with_defaults() {
        let r = route("").unwrap();
        assert_eq!(r.capture.mode, super::CaptureMode::Off);
        assert_eq!(r.capture.keep, 200);
        assert_eq!(r.capture.max_payload, 4096);
        assert_eq!(r.capture.mask, ["password", "token"]);
    }

    #[test]
    fn values_are_read() {
        let r = route(
            "[route.capture]\nmode = \"payload\"\nmax_payload = \"1KiB\"\nkeep = 5\nmask = [\"secret\"]\n",
        )
        .unwrap();
        assert_eq!(r.capture.mode, super::CaptureMode::Payload);
        assert_eq!((r.capture.max_payload, r.capture.keep), (1024, 5));
        assert_eq!(r.capture.mask, ["secret"]);
    }

    #[test]
    fn bad_values_are_located() {
        for (table, line, text) in [
            ("mode = \"all\"", 7, "is not one of off, metadata, payload"),
            ("max_payload = \"1GiB\"", 7, "max_payload must be"),
            ("keep = 0", 7, "keep must be 1 to"),
            ("mask = [\"\"]", 7, "empty name"),
            ("frames = 1", 7, "unknown field"),
        ] {
            let e = route(&format!("[route.capture]\n{table}\n")).unwrap_err();
            assert_eq!(e.line, line, "{table}: {e}");
            assert!(e.to_string().contains(text), "{table}: {e}");
        }
    }
}
