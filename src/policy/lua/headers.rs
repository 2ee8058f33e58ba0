//! `req.headers` and `ctx.request.headers`: read-only views that look each header up when it
//! is read, instead of copying every header into Lua first.
//!
//! Most upgrade policies read one or two headers (a token, an origin), so a read costs one
//! string and `pairs` makes the whole table once, on its first call. There are two kinds:
//!
//! - **the call's view**, `req.headers`: an empty table made when the script first reads the
//!   field, whose look-ups read the headers that the VM's one `req` holds for the running call
//!   ([`HeaderList`], refilled per call without allocating). It has no state of its own, so it
//!   costs one table. Once the call has ended it refuses use.
//! - **kept views**, `ctx.request.headers`, and `req.headers` when the script stored it in
//!   `ctx` (the freeze swaps it for a kept view): each holds its own copy of the headers.

use std::rc::Rc;

use mlua::{AnyUserData, Function, Lua, Table, UserData, Value};

use super::unlimited;
use crate::header_fields::HeaderFields;

/// A request's headers, names (lower case) and values in one buffer. Refilled for each
/// call, it keeps its room. Headers are in the order they came, so the values of a repeated
/// name need not be next to each other.
#[derive(Debug, Clone, Default)]
pub(crate) struct HeaderList {
    bytes: Vec<u8>,
    /// For each header, where its name ends and where its value ends in `bytes`; it starts
    /// where the previous one's value ends.
    spans: Vec<(u32, u32)>,
}

impl HeaderList {
    /// Replaces the content with `headers`, reusing the room of the last fill.
    pub(crate) fn fill(&mut self, headers: &HeaderFields) {
        self.bytes.clear();
        self.spans.clear();
        for (name, value) in headers.iter() {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(name);
            self.bytes[start..].make_ascii_lowercase();
            let name_end = self.bytes.len() as u32;
            self.bytes.extend_from_slice(value);
            self.spans.push((name_end, self.bytes.len() as u32));
        }
    }

    /// Every `(name, value)`, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut start = 0usize;
        self.spans.iter().map(move |&(name_end, value_end)| {
            let (name_end, value_end) = (name_end as usize, value_end as usize);
            let pair = (
                &self.bytes[start..name_end],
                &self.bytes[name_end..value_end],
            );
            start = value_end;
            pair
        })
    }

    /// The values of header `name`, given in any case, in order.
    pub(crate) fn values<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

/// The state of a kept view: its own copy of the headers.
pub(crate) struct HeaderSource(pub(crate) Rc<HeaderList>);

impl UserData for HeaderSource {}

/// The values of header `name` (any case) joined with `", "`, or `nil`.
pub(crate) fn value_of(lua: &Lua, headers: &HeaderList, name: &[u8]) -> mlua::Result<Value> {
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
pub(crate) fn materialise(lua: &Lua, headers: &HeaderList) -> mlua::Result<Table> {
    unlimited(lua, || all_in_table(lua, headers))
}

fn all_in_table(lua: &Lua, headers: &HeaderList) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(0, headers.spans.len())?;
    for (i, (name, _)) in headers.iter().enumerate() {
        // The first field of a name joins all its values.
        if headers.iter().take(i).any(|(earlier, _)| earlier == name) {
            continue;
        }
        table.raw_set(lua.create_string(name)?, value_of(lua, headers, name)?)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_keeps_every_value_in_order_and_finds_names_in_any_case() {
        let headers = HeaderFields::from_pairs([
            ("X-Multi", "one"),
            ("Host", "gw"),
            ("x-multi", "two"),
            ("x-empty", ""),
        ]);
        let mut list = HeaderList::default();
        list.fill(&HeaderFields::default());
        list.fill(&headers);
        let values: Vec<_> = list.values(b"X-Multi").collect();
        assert_eq!(values, [&b"one"[..], b"two"]);
        assert_eq!(list.values(b"x-empty").collect::<Vec<_>>(), [&b""[..]]);
        assert_eq!(list.values(b"missing").count(), 0);
        let kept = list.clone();
        assert_eq!(kept.iter().count(), 4);
        let names: Vec<_> = kept.iter().map(|(n, _)| n).collect();
        assert_eq!(names, [&b"x-multi"[..], b"host", b"x-multi", b"x-empty"]);
    }
}
