//! `req.headers` and `ctx.request.headers`: read-only views that look each header up when it
//! is read, instead of copying every header into Lua first.
//!
//! Most upgrade policies read one or two headers (a token, an origin), so a read costs one
//! string and `pairs` makes the whole table once, on its first call. There are two kinds:
//!
//! - **the call's view**, `req.headers`: an empty table made before the call, whose look-ups
//!   read the request's [`HeaderFields`] that the VM's one `req` holds for the running call.
//!   It has no state of its own, so it costs one table. Once the call has ended it refuses
//!   use.
//! - **kept views**, `ctx.request.headers`, and `req.headers` when the script stored it in
//!   `ctx` (the freeze swaps it for a kept view): each holds its own compact copy of the
//!   headers.

use std::rc::Rc;

use mlua::{AnyUserData, Function, Lua, Table, UserData, Value};

use super::unlimited;
use crate::header_fields::HeaderFields;

/// The state of a kept view: its own copy of the headers.
pub(crate) struct HeaderSource(pub(crate) Rc<HeaderFields>);

impl UserData for HeaderSource {}

/// The values of header `name` (any case) joined with `", "`, or `nil`.
pub(crate) fn value_of(lua: &Lua, headers: &HeaderFields, name: &[u8]) -> mlua::Result<Value> {
    let mut values = headers.values(name);
    let Some(first) = values.next() else {
        return Ok(Value::Nil);
    };
    // A value is at most a request head long (64 KiB), so it is made outside the call's
    // memory limit, where mlua makes strings without a protected call.
    match values.next() {
        None => unlimited(lua, || lua.create_string(first)).map(Value::String),
        Some(second) => {
            let mut joined = [first, b", ", second].concat();
            for v in values {
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(v);
            }
            unlimited(lua, || lua.create_string(joined)).map(Value::String)
        }
    }
}

/// Every header in a plain table (lower-case names, repeated ones joined), for `pairs`. Like
/// a value, it is bounded by the head's size and made outside the call's memory limit.
pub(crate) fn materialise(lua: &Lua, headers: &HeaderFields) -> mlua::Result<Table> {
    unlimited(lua, || all_in_table(lua, headers))
}

fn all_in_table(lua: &Lua, headers: &HeaderFields) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(0, headers.len())?;
    let mut key = Vec::new();
    for (i, (name, _)) in headers.iter().enumerate() {
        // The first field of a name joins all its values.
        let mut earlier = headers.iter().take(i);
        if earlier.any(|(earlier, _)| earlier.eq_ignore_ascii_case(name)) {
            continue;
        }
        key.clear();
        key.extend(name.iter().map(u8::to_ascii_lowercase));
        table.raw_set(lua.create_string(&key)?, value_of(lua, headers, name)?)?;
    }
    Ok(table)
}

/// The Rust half of kept views: the look-up and `pairs` functions the sandbox's prelude
/// builds their metatable from.
pub(crate) fn kept_view_functions(lua: &Lua) -> mlua::Result<(Function, Function)> {
    Ok((
        lua.create_function(|lua, (source, name): (AnyUserData, Value)| {
            let Value::String(name) = name else {
                return Ok(Value::Nil);
            };
            value_of(lua, &source.borrow::<HeaderSource>()?.0, &name.as_bytes())
        })?,
        lua.create_function(|lua, source: AnyUserData| {
            materialise(lua, &source.borrow::<HeaderSource>()?.0)
        })?,
    ))
}
