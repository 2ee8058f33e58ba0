//! The `[route.validate]` table: the JSON Schema files that check a route's messages, one per
//! direction, and what an invalid message gets. Each file is read and parsed here, so that
//! `framegate check` reports an unreadable file at its key's `file:line:column` and bad JSON at
//! the schema file's own `file:line:column`. Compiling the schemas is the snapshot's (see
//! `src/policy/validate/`); this module holds no validator.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;

/// serde mirror of `[route.validate]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawValidate {
    client: Option<Spanned<String>>,
    server: Option<Spanned<String>>,
    on_invalid: Option<Spanned<String>>,
}

/// A validated `[route.validate]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidateConfig {
    /// The schema for messages from the client.
    pub client: Option<SchemaFile>,
    /// The schema for messages from the upstream.
    pub server: Option<SchemaFile>,
    /// What an invalid message gets.
    pub on_invalid: OnInvalid,
}

/// One schema file as read: its path and its JSON. A reload reads it again, so a changed file
/// makes the route a changed one (`SchemaFile` compares by content).
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaFile {
    /// The file, resolved against the configuration file's folder.
    pub path: PathBuf,
    /// Its content, parsed.
    pub json: Arc<serde_json::Value>,
}

/// `route.validate.on_invalid`: what happens to a message its schema refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnInvalid {
    /// Close both legs with 1007 and the first error as the reason (the default).
    #[default]
    Close,
    /// Drop the message (counted as a drop).
    Drop,
    /// Drop the message and send its sender `{"error":"invalid message","detail":"…"}`.
    Reply,
}

impl OnInvalid {
    /// The configuration's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            OnInvalid::Close => "close",
            OnInvalid::Drop => "drop",
            OnInvalid::Reply => "reply",
        }
    }

    /// Parses the configuration's word.
    pub fn parse(word: &str) -> Option<OnInvalid> {
        [OnInvalid::Close, OnInvalid::Drop, OnInvalid::Reply]
            .into_iter()
            .find(|o| o.as_str() == word)
    }
}

/// Whether a `mime_type` is JSON: `application/json` or any `+json` type (parameters aside).
/// Validation needs it; the Lua engine decodes `msg.json` for the same types.
pub fn is_json_mime(mime: &str) -> bool {
    let essence = mime.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
}

/// Checks `[route.validate]` on a route whose `mime_type` is `mime`, reporting errors at the
/// offending value (`at`); reads and parses each schema file (`base` anchors relative paths).
pub(super) fn check(
    raw: Spanned<RawValidate>,
    mime: &str,
    at: &dyn Fn(std::ops::Range<usize>, String, &str) -> ConfigError,
    base: &Path,
) -> Result<ValidateConfig, ConfigError> {
    let table = raw.span();
    let raw = raw.into_inner();
    if !is_json_mime(mime) {
        // Not silently ignored: a schema the gateway never applies would look like protection.
        return Err(at(
            table,
            format!("[route.validate] needs a JSON mime_type; this route's is {mime:?}"),
            "validation checks JSON text messages: set mime_type = \"application/json\" (or a +json type), or remove [route.validate]",
        ));
    }
    if raw.client.is_none() && raw.server.is_none() {
        return Err(at(
            table,
            "[route.validate] names no schema".into(),
            "set client = \"schemas/in.json\", server = \"schemas/out.json\", or both",
        ));
    }
    let on_invalid = match &raw.on_invalid {
        None => OnInvalid::default(),
        Some(v) => OnInvalid::parse(v.get_ref()).ok_or_else(|| {
            at(
                v.span(),
                format!(
                    "route.validate.on_invalid {:?} is not one of close, drop, reply",
                    v.get_ref()
                ),
                "close (the default) ends the connection with 1007; drop drops the message; reply drops it and tells the sender why",
            )
        })?,
    };
    let file =
        |v: &Option<Spanned<String>>, key: &str| -> Result<Option<SchemaFile>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            let path = base.join(v.get_ref());
            let text = std::fs::read_to_string(&path).map_err(|e| {
                at(
                    v.span(),
                    format!(
                        "route.validate.{key} {:?}: cannot read {}: {e}",
                        v.get_ref(),
                        path.display()
                    ),
                    "paths are relative to the folder of the configuration file",
                )
            })?;
            let json = serde_json::from_str(&text).map_err(|e| ConfigError {
                origin: path.clone(),
                line: e.line(),
                // serde_json counts from 1, with 0 for an error at the start of a line (the end
                // of the file): shown as column 1.
                column: e.column().max(1),
                message: format!("not JSON: {}", without_position(&e)),
                hint: Some(format!(
                    "the JSON Schema named by route.validate.{key} ({:?})",
                    v.get_ref()
                )),
            })?;
            Ok(Some(SchemaFile {
                path,
                json: Arc::new(json),
            }))
        };
    Ok(ValidateConfig {
        client: file(&raw.client, "client")?,
        server: file(&raw.server, "server")?,
        on_invalid,
    })
}

/// serde_json's message without its " at line L column C" suffix (the error's location says it).
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_mime_types() {
        for m in [
            "application/json",
            "application/json; charset=utf-8",
            "application/vnd.api+json",
            "Application/JSON",
        ] {
            assert!(is_json_mime(m), "{m}");
        }
        for m in [
            "text/plain",
            "application/jsonx",
            "application/octet-stream",
        ] {
            assert!(!is_json_mime(m), "{m}");
        }
    }

    #[test]
    fn on_invalid_words() {
        for o in [OnInvalid::Close, OnInvalid::Drop, OnInvalid::Reply] {
            assert_eq!(OnInvalid::parse(o.as_str()), Some(o));
        }
        assert_eq!(OnInvalid::parse("ignore"), None);
    }
}
