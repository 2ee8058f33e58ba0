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
    /// Encodes a value returned by a policy. The text may take at most what the running call
    /// may still allocate ([`room`]), and encoding stops at the call's CPU deadline (see
    /// [`Bounded`]): a table that holds the same table many times (`t = {t, t}`, forty times
    /// over) would otherwise encode to terabytes, outside the Lua heap and its limits.
    fn encode(&self, lua: &Lua, value: &Value) -> Result<Vec<u8>, String>;
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
        // Short bodies, nearly all, are parsed straight from the slice; a long one through a
        // reader that stops at the call's CPU deadline.
        if body.len() <= SLICE_MAX {
            json_decode(lua, serde_json::Deserializer::from_slice(body))
        } else {
            let reader = Deadline { lua, body, read: 0 };
            let reader = std::io::BufReader::with_capacity(CHECK_EVERY, reader);
            json_decode(lua, serde_json::Deserializer::from_reader(reader))
        }
    }

    fn encode(&self, lua: &Lua, value: &Value) -> Result<Vec<u8>, String> {
        let value = value
            .to_serializable()
            .sort_keys(false)
            .encode_empty_tables_as_array(false);
        let mut out = Bounded::new(lua);
        match serde_json::to_writer(&mut out, &value) {
            Ok(()) => Ok(out.bytes),
            Err(e) if e.is_io() => Err(format!("cannot encode as JSON: {e}")),
            Err(e) => Err(format!("cannot encode as JSON: {e}")),
        }
    }

    fn is_text(&self) -> bool {
        true
    }
}

/// How many bytes a codec handles between two looks at the CPU deadline.
const CHECK_EVERY: usize = 4 * 1024;

/// Bodies up to this size are decoded straight from memory, without looking at the deadline
/// (the fastest way, and a bounded time); longer ones through [`Deadline`].
const SLICE_MAX: usize = 16 * 1024;

fn json_decode<'de, R: serde_json::de::Read<'de>>(
    lua: &Lua,
    mut de: serde_json::Deserializer<R>,
) -> Result<Value, String> {
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

/// A body read in pieces of [`CHECK_EVERY`] bytes, failing once the call is past its deadline.
struct Deadline<'a> {
    lua: &'a Lua,
    body: &'a [u8],
    read: usize,
}

impl std::io::Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.read > 0 && super::over_budget(self.lua) {
            return Err(std::io::Error::other("CPU limit exceeded"));
        }
        let rest = &self.body[self.read..];
        let n = rest.len().min(buf.len()).min(CHECK_EVERY);
        buf[..n].copy_from_slice(&rest[..n]);
        self.read += n;
        Ok(n)
    }
}

/// The encoded text: it refuses to grow past what the call may still allocate, and stops at
/// the call's CPU deadline (looked at every [`CHECK_EVERY`] bytes).
struct Bounded<'a> {
    lua: &'a Lua,
    bytes: Vec<u8>,
    max: usize,
    checked: usize,
}

impl<'a> Bounded<'a> {
    fn new(lua: &'a Lua) -> Self {
        Bounded {
            lua,
            bytes: Vec::new(),
            max: room(lua),
            checked: 0,
        }
    }
}

impl std::io::Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.max {
            return Err(std::io::Error::other(format!(
                "the text would exceed {}",
                bytesize::ByteSize(self.max as u64)
            )));
        }
        if self.bytes.len() - self.checked >= CHECK_EVERY {
            self.checked = self.bytes.len();
            if super::over_budget(self.lua) {
                return Err(std::io::Error::other("CPU limit exceeded"));
            }
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How many bytes an encoding may take during the running call: what the call may still
/// allocate in the Lua heap (the encoded text becomes a Lua string or a message of that
/// size). Outside a call, the default memory limit.
pub(crate) fn room(lua: &Lua) -> usize {
    const OUTSIDE_A_CALL: usize = 16 << 20;
    match lua.set_memory_limit(0) {
        Ok(0) | Err(_) => OUTSIDE_A_CALL,
        Ok(limit) => {
            let _ = lua.set_memory_limit(limit);
            limit.saturating_sub(lua.used_memory())
        }
    }
}

/// The codec for a route's `mime_type`, if there is one.
pub fn for_mime(mime: &str) -> Option<&'static dyn Codec> {
    if crate::config::validate::is_json_mime(mime) {
        Some(&JSON)
    } else {
        None
    }
}
