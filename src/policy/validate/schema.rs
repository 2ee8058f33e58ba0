//! One compiled JSON Schema, and the check of one text message against it: parse, validate,
//! and say the first error on one line. Compiled when a snapshot is built, never per message.
//!
//! The draft is the schema's `$schema` (2020-12 when it has none; 2019-09, 7, 6 and 4 are
//! known too). References resolve within the file only: the `jsonschema` crate is built
//! without its file and HTTP retrievers, so compiling never reads another file or the network.

use std::path::{Path, PathBuf};

use super::text::{self, Text};
use crate::config::{ConfigError, SchemaFile};

/// The longest first error kept, in bytes: a message's own values appear in it (`"…" is not of
/// type "integer"`), and it goes into a reply and a log line.
pub const MAX_DETAIL: usize = 512;

/// A compiled schema.
pub struct Schema {
    /// The file it was read from, for errors and logs.
    path: PathBuf,
    validator: jsonschema::Validator,
    /// The same schema over messages read in place ([`super::text`]), for the common case.
    in_place: jsonschema::Validator<Text>,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Schema({})", self.path.display())
    }
}

impl Schema {
    /// Compiles `file`. An invalid schema is a configuration error naming the file and, when
    /// the meta-schema refused a part of it, that part's JSON pointer and its `line:column`.
    pub fn compile(file: &SchemaFile) -> Result<Schema, ConfigError> {
        let validator = jsonschema::options()
            .build(&file.json)
            .map_err(|e| invalid(file, e))?;
        let in_place = jsonschema::options_for::<Text>()
            .build(&file.json)
            .map_err(|e| invalid(file, e))?;
        Ok(Schema {
            path: file.path.clone(),
            validator,
            in_place,
        })
    }

    /// The file the schema was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks one text message: `Err` holds its first error, at most [`MAX_DETAIL`] bytes
    /// (`invalid JSON: …` for text that is not JSON; `/path: …` for a value the schema
    /// refuses, the path being where in the message).
    pub fn check(&self, text: &str) -> Result<(), String> {
        // Most messages are JSON this reader takes, and pass: no value is built for them.
        if text::read(text, |root| self.in_place.is_valid(root)) == Some(true) {
            return Ok(());
        }
        // The rest, and the refused ones' first error, through serde_json (the reference).
        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return Err(cut(format!("invalid JSON: {e}"), MAX_DETAIL)),
        };
        // The boolean check stops at the first failure and builds no error: most messages
        // pass, and only a refused one pays for its error text.
        if self.validator.is_valid(&value) {
            return Ok(());
        }
        match self.validator.validate(&value) {
            Ok(()) => Ok(()),
            Err(e) => {
                let at = e.instance_path().as_str();
                let detail = if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{at}: {e}")
                };
                Err(cut(detail, MAX_DETAIL))
            }
        }
    }
}

/// An invalid schema as a configuration error at `file:line:column`.
fn invalid(file: &SchemaFile, e: jsonschema::ValidationError<'_>) -> ConfigError {
    let pointer = e.instance_path().as_str();
    let at = if pointer.is_empty() {
        String::new()
    } else {
        format!(" at {pointer}")
    };
    // The file as read again: the parsed schema no longer knows where its parts were.
    let text = std::fs::read_to_string(&file.path).unwrap_or_default();
    let offset = (!pointer.is_empty())
        .then(|| super::locate::locate(&text, pointer))
        .flatten();
    ConfigError::at(
        &file.path,
        &text,
        offset.map(|o| o..o),
        format!("invalid JSON Schema{at}: {e}"),
        Some(
            "framegate compiles JSON Schema drafts 2020-12 (the default without \"$schema\"), 2019-09, 7, 6 and 4; $ref may point within the file only"
                .into(),
        ),
    )
}

/// `text` cut to at most `max` bytes on a character boundary, ending in `…` when cut.
pub fn cut(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    const MORE: &str = "…";
    let mut end = max.saturating_sub(MORE.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MORE);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn schema(json: serde_json::Value) -> Result<Schema, ConfigError> {
        Schema::compile(&SchemaFile {
            path: PathBuf::from("s.json"),
            json: Arc::new(json),
        })
    }

    #[test]
    fn first_error_says_where_in_the_message() {
        let s = schema(serde_json::json!({
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"type": "string"}, "n": {"type": "integer"}}
        }))
        .unwrap();
        assert_eq!(s.check(r#"{"type":"chat","n":1}"#), Ok(()));
        assert_eq!(
            s.check(r#"{"type":"chat","n":"x"}"#).unwrap_err(),
            r#"/n: "x" is not of type "integer""#
        );
        assert_eq!(
            s.check(r#"{"n":1}"#).unwrap_err(),
            r#""type" is a required property"#
        );
        let e = s.check("not json").unwrap_err();
        assert!(e.starts_with("invalid JSON: expected"), "{e}");
        let long = format!(r#"{{"type":"chat","n":"{}"}}"#, "é".repeat(1000));
        let e = s.check(&long).unwrap_err();
        assert!(e.len() <= MAX_DETAIL && e.ends_with('…'), "{e}");
    }

    #[test]
    fn the_draft_comes_from_dollar_schema() {
        // Draft 7 reads `items` as a list of schemas for the positions; 2020-12 calls that
        // `prefixItems` and refuses a list under `items`.
        let tuple = |draft: Option<&str>| {
            let mut s = serde_json::json!({"items": [{"type": "string"}, {"type": "integer"}]});
            if let Some(d) = draft {
                s["$schema"] = d.into();
            }
            schema(s)
        };
        let seven = tuple(Some("http://json-schema.org/draft-07/schema#")).unwrap();
        assert_eq!(seven.check(r#"["a", 1]"#), Ok(()));
        assert!(seven
            .check(r#"["a", "b"]"#)
            .unwrap_err()
            .starts_with("/1: "));
        // Draft 7 asserts `format`; 2020-12 only annotates.
        let email = |draft: &str| {
            schema(serde_json::json!({"$schema": draft, "format": "idn-email"}))
                .unwrap()
                .check(r#""nope""#)
                .is_ok()
        };
        assert!(!email("http://json-schema.org/draft-07/schema#"));
        assert!(email("https://json-schema.org/draft/2020-12/schema"));
        let e = tuple(None).unwrap_err().to_string();
        assert!(
            e.starts_with("s.json: invalid JSON Schema at /items: "),
            "{e}"
        );
    }

    #[test]
    fn invalid_schemas_name_the_file_and_the_place() {
        let e = schema(serde_json::json!({"properties": {"n": {"minimum": "five"}}}))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("s.json: invalid JSON Schema at /properties/n/minimum: "),
            "{e}"
        );
        let e = schema(serde_json::json!({"$ref": "other.json"}))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("s.json: invalid JSON Schema"), "{e}");
    }

    #[test]
    fn cut_keeps_characters_whole() {
        assert_eq!(cut("abc".into(), 3), "abc");
        assert_eq!(cut("abcdef".into(), 5), "ab…");
        let s = cut("éééé".into(), 6);
        assert_eq!(s, "é…");
    }
}
