//! Message bodies by MIME type: what `msg.json` decodes and how a table returned by a frame
//! policy is encoded. To add a format (say msgpack), implement [`Codec`] and list it in
//! [`for_mime`]; nothing else changes.

use mlua::{Lua, LuaSerdeExt, Value};

/// Decodes message bodies into Lua values and encodes Lua values back.
pub trait Codec: Sync {
    /// A short name for error messages.
    fn name(&self) -> &'static str;
    /// Decodes a body; the error says why it is not valid.
    fn decode(&self, lua: &Lua, body: &[u8]) -> Result<Value, String>;
    /// Encodes a value returned by a policy.
    fn encode(&self, value: &Value) -> Result<Vec<u8>, String>;
    /// Whether encoded bodies are sent as text messages (else binary).
    fn is_text(&self) -> bool;
}

/// JSON (`application/json` and any `+json` type).
pub struct Json;

/// The JSON codec.
pub static JSON: Json = Json;

impl Codec for Json {
    fn name(&self) -> &'static str {
        "JSON"
    }

    fn decode(&self, lua: &Lua, body: &[u8]) -> Result<Value, String> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let options = mlua::serde::SerializeOptions::new()
            .serialize_none_to_null(true)
            .serialize_unit_to_null(true)
            .set_array_metatable(true);
        // One pass from JSON text to Lua values, no intermediate tree.
        let value = lua
            .to_value_with(&serde_transcode::Transcoder::new(&mut de), options)
            .map_err(|e| match e {
                // mlua wraps the parser's message; show the parser's own words.
                mlua::Error::SerializeError(message) => format!("invalid JSON: {message}"),
                other => format!("invalid JSON: {}", super::first_line(&other.to_string())),
            })?;
        de.end().map_err(|e| format!("invalid JSON: {e}"))?;
        Ok(value)
    }

    fn encode(&self, value: &Value) -> Result<Vec<u8>, String> {
        let value = value
            .to_serializable()
            .sort_keys(false)
            .encode_empty_tables_as_array(false);
        serde_json::to_vec(&value).map_err(|e| format!("cannot encode as JSON: {e}"))
    }

    fn is_text(&self) -> bool {
        true
    }
}

/// The codec for a route's `mime_type`, if there is one.
pub fn for_mime(mime: &str) -> Option<&'static dyn Codec> {
    let essence = mime.split(';').next().unwrap_or("").trim();
    if essence == "application/json" || essence.ends_with("+json") {
        Some(&JSON)
    } else {
        None
    }
}
