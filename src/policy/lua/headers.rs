//! `req.headers` and `ctx.request.headers`: a read-only view that looks each header up in the
//! request's header map when it is read, instead of copying every header into Lua first.
//!
//! Most upgrade policies read one or two headers (a token, an origin), so the view costs a
//! table and a userdata, and each read makes one string. `pairs` makes the whole table once,
//! on its first call. The view holds the header map, so it keeps working wherever a script
//! keeps it (`ctx.headers = req.headers` reads the same headers in the frame phase).

use std::rc::Rc;

use bytes::BytesMut;
use http::{HeaderMap, HeaderValue};
use mlua::{AnyUserData, Function, Lua, Table, UserData, Value};

/// A request's headers, shared by the views of one request.
pub(crate) struct HeaderSource(pub(crate) Rc<HeaderMap>);

impl UserData for HeaderSource {}

/// A copy of `headers` that shares no memory with them, its values in one allocation. A
/// request's values point into the whole buffer its head was read into, which a view kept in
/// `ctx` for the connection's life must not hold.
pub(crate) fn compact(headers: &HeaderMap) -> HeaderMap {
    let mut bytes = BytesMut::with_capacity(headers.iter().map(|(_, v)| v.len()).sum());
    for (_, value) in headers {
        bytes.extend_from_slice(value.as_bytes());
    }
    let mut bytes = bytes.freeze();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let copy = bytes.split_to(value.len());
        let copy = HeaderValue::from_maybe_shared(copy).unwrap_or_else(|_| value.clone());
        out.append(name.clone(), copy);
    }
    out
}

/// `req.headers[name]`: the value of header `name` (any case), or `nil`.
fn lookup(lua: &Lua, (source, name): (AnyUserData, Value)) -> mlua::Result<Value> {
    let Value::String(name) = name else {
        return Ok(Value::Nil);
    };
    let source = source.borrow::<HeaderSource>()?;
    let name = name.as_bytes();
    match std::str::from_utf8(&name) {
        Ok(name) => value_of(lua, &source.0, name),
        Err(_) => Ok(Value::Nil),
    }
}

/// The values of header `name` joined with `", "`, or `nil`. `HeaderMap` finds names in any
/// case, without allocating.
fn value_of(lua: &Lua, headers: &HeaderMap, name: &str) -> mlua::Result<Value> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(Value::Nil);
    };
    match values.next() {
        None => lua.create_string(first.as_bytes()).map(Value::String),
        Some(second) => {
            let mut joined = [first.as_bytes(), b", ", second.as_bytes()].concat();
            for v in values {
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(v.as_bytes());
            }
            lua.create_string(joined).map(Value::String)
        }
    }
}

/// Every header in a plain table (lower-case names), for `pairs`.
fn materialise(lua: &Lua, source: AnyUserData) -> mlua::Result<Table> {
    let source = source.borrow::<HeaderSource>()?;
    let headers = &source.0;
    let table = lua.create_table_with_capacity(0, headers.keys_len())?;
    for name in headers.keys() {
        table.raw_set(name.as_str(), value_of(lua, headers, name.as_str())?)?;
    }
    Ok(table)
}

/// The Rust half of the views: the look-up and `pairs` functions the sandbox's prelude builds
/// its header metatable from.
pub(crate) fn functions(lua: &Lua) -> mlua::Result<(Function, Function)> {
    Ok((
        lua.create_function(lookup)?,
        lua.create_function(materialise)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compact_copy_keeps_every_value_in_order() {
        let mut headers = HeaderMap::new();
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append("host", HeaderValue::from_static("gw"));
        headers.append("x-multi", HeaderValue::from_static("two"));
        headers.append("x-empty", HeaderValue::from_static(""));
        let copy = compact(&headers);
        assert_eq!(copy, headers);
        let values: Vec<_> = copy.get_all("x-multi").iter().collect();
        assert_eq!(values, ["one", "two"]);
    }
}
