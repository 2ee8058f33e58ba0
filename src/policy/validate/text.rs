//! A message's JSON read in place, for the validator: the `jsonschema` crate's representation
//! interface (`jsonschema::json`) over one flat list of the document's values, whose strings
//! and numbers are spans of the message itself. No value is allocated per message: the list
//! is the worker thread's, kept from message to message.
//!
//! One reason to change: how a message is read for checking. Building a `serde_json::Value`
//! of a 1 KiB chat message cost about 4,900 instructions (serde_json scans strings eight bytes
//! a step, then allocates and frees each value); reading it here costs a fraction of that (see
//! docs/performance.md, twelfth session).
//!
//! **serde_json stays the reference.** [`read`] gives up (`None`) on anything it does not take
//! exactly as serde_json would: a document that is not JSON, a string with an escape that does
//! not decode, an object with a repeated name (serde_json keeps the last value), a number out
//! of `f64`'s range, nesting deeper than serde_json's 128. The caller then checks the message
//! through `serde_json::Value` as before. A message this reader takes gets the same verdict as
//! through serde_json: strings are the same text (escaped ones decoded by serde_json), numbers
//! are serde_json's own `Number` of the same digits, objects have the same members. The
//! differential tests below hold the two to that.

use std::borrow::Cow;
use std::cell::Cell;

use jsonschema::json::{Array, Json, Node, NodeIdentity, Object};
use jsonschema::types::JsonType;
use serde_json::{Map, Number, Value};

/// serde_json's nesting limit: deeper documents are left to it (it refuses them).
const MAX_DEPTH: usize = 128;

/// The most values kept in the thread's list between messages (about 1.5 MiB).
const KEEP_VALUES: usize = 64 * 1024;

/// What one value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Null,
    False,
    True,
    /// `text[a..b]`, digits as written.
    Number,
    /// `text[a..b]`, between the quotes, without escapes.
    Str,
    /// `decoded[a]`: a string with escapes, decoded by serde_json.
    Escaped,
    /// `count` elements follow.
    Array,
    /// `count` members follow, each a name (`Str` or `Escaped`) then its value.
    Object,
}

/// One value of the document, in document order; a container's values follow it.
#[derive(Clone, Copy, Debug)]
struct Entry {
    kind: Kind,
    a: u32,
    b: u32,
    /// The index after this value and everything in it.
    next: u32,
    /// Elements or members of a container.
    count: u32,
}

/// One message read in place.
pub struct Document<'t> {
    text: &'t str,
    entries: Vec<Entry>,
    decoded: Vec<String>,
}

thread_local! {
    /// The list the worker thread reads messages into, kept between messages.
    static ENTRIES: Cell<Vec<Entry>> = const { Cell::new(Vec::new()) };
}

/// Reads `text` and hands its root to `f`; `None` when the reader gives up on it (see the
/// module's doc), and serde_json must decide.
pub fn read<R>(text: &str, f: impl FnOnce(TextNode<'_>) -> R) -> Option<R> {
    let mut entries = ENTRIES.take();
    entries.clear();
    let mut doc = Document {
        text,
        entries,
        decoded: Vec::new(),
    };
    let result = parse(&mut doc).map(|()| f(TextNode::In(&doc, 0)));
    let mut entries = doc.entries;
    if entries.capacity() <= KEEP_VALUES {
        entries.clear();
        ENTRIES.set(entries);
    }
    result
}

fn parse(doc: &mut Document<'_>) -> Option<()> {
    let bytes = doc.text.as_bytes();
    if bytes.len() >= u32::MAX as usize {
        return None;
    }
    let mut at = skip_space(bytes, 0);
    at = value(doc, bytes, at, 0)?;
    (skip_space(bytes, at) == bytes.len()).then_some(())
}

fn skip_space(bytes: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = bytes.get(at) {
        at += 1;
    }
    at
}

/// Reads the value at `at` (no space before it) into the list; the index after it.
fn value(doc: &mut Document<'_>, bytes: &[u8], at: usize, depth: usize) -> Option<usize> {
    let leaf = |doc: &mut Document<'_>, kind, a: usize, b: usize| {
        let next = doc.entries.len() as u32 + 1;
        doc.entries.push(Entry {
            kind,
            a: a as u32,
            b: b as u32,
            next,
            count: 0,
        });
    };
    match *bytes.get(at)? {
        b'n' | b't' | b'f' => {
            let (kind, word): (Kind, &[u8]) = match bytes[at] {
                b'n' => (Kind::Null, b"null"),
                b't' => (Kind::True, b"true"),
                _ => (Kind::False, b"false"),
            };
            let end = literal(bytes, at, word)?;
            leaf(doc, kind, at, end);
            Some(end)
        }
        b'"' => string(doc, bytes, at),
        b'-' | b'0'..=b'9' => {
            let end = number(bytes, at)?;
            leaf(doc, Kind::Number, at, end);
            Some(end)
        }
        b'[' | b'{' if depth < MAX_DEPTH => container(doc, bytes, at, depth + 1),
        _ => None,
    }
}

fn literal(bytes: &[u8], at: usize, word: &[u8]) -> Option<usize> {
    let end = at + word.len();
    (bytes.get(at..end)? == word).then_some(end)
}

/// An array or an object: its entry first, then its values; the entry's `next` and `count`
/// are written when it ends.
fn container(doc: &mut Document<'_>, bytes: &[u8], at: usize, depth: usize) -> Option<usize> {
    let object = bytes[at] == b'{';
    let me = doc.entries.len();
    doc.entries.push(Entry {
        kind: if object { Kind::Object } else { Kind::Array },
        a: at as u32,
        b: 0,
        next: 0,
        count: 0,
    });
    let close = if object { b'}' } else { b']' };
    let mut at = skip_space(bytes, at + 1);
    let mut count = 0u32;
    if bytes.get(at) == Some(&close) {
        at += 1;
    } else {
        loop {
            if object {
                if bytes.get(at) != Some(&b'"') {
                    return None;
                }
                at = string(doc, bytes, at)?;
                at = skip_space(bytes, at);
                if bytes.get(at) != Some(&b':') {
                    return None;
                }
                at = skip_space(bytes, at + 1);
            }
            at = value(doc, bytes, at, depth)?;
            count += 1;
            at = skip_space(bytes, at);
            match bytes.get(at) {
                Some(b',') => at = skip_space(bytes, at + 1),
                Some(&b) if b == close => {
                    at += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    let next = doc.entries.len() as u32;
    let entry = &mut doc.entries[me];
    entry.b = at as u32;
    entry.next = next;
    entry.count = count;
    if object && has_repeated_name(doc, me) {
        return None;
    }
    Some(at)
}

/// Whether the object at `me` names a member twice (serde_json would keep the last one only).
fn has_repeated_name(doc: &Document<'_>, me: usize) -> bool {
    let object = TextObject { doc, at: me as u32 };
    let count = doc.entries[me].count as usize;
    if count < 2 {
        return false;
    }
    if count <= 16 {
        // Each name against those before it, on the stack.
        let mut names = [""; 16];
        for (i, (name, _)) in object.members().enumerate() {
            if names[..i].contains(&name) {
                return true;
            }
            names[i] = name;
        }
        return false;
    }
    let mut seen = std::collections::HashSet::with_capacity(count);
    object.members().any(|(name, _)| !seen.insert(name))
}

/// The string at `at` (its opening quote) into the list; the index after its closing quote.
fn string(doc: &mut Document<'_>, bytes: &[u8], at: usize) -> Option<usize> {
    let start = at + 1;
    let mut i = start;
    let mut escaped = false;
    let end = loop {
        // The next quote or backslash (memchr: SIMD chosen at run time), then no control
        // character before it (JSON forbids them unescaped; an OR over the span, vectorised).
        let stop = i + memchr::memchr2(b'"', b'\\', &bytes[i..])?;
        if bytes[i..stop]
            .iter()
            .fold(0u8, |c, &b| c | u8::from(b < 0x20))
            != 0
        {
            return None;
        }
        if bytes[stop] == b'"' {
            break stop;
        }
        // A backslash: the escape's first character is skipped (it may be a quote);
        // serde_json checks the escape when the string is decoded below.
        escaped = true;
        i = stop + 2;
        if i > bytes.len() {
            return None;
        }
    };
    let next = doc.entries.len() as u32 + 1;
    let entry = if escaped {
        let text: String = serde_json::from_slice(&bytes[at..=end]).ok()?;
        doc.decoded.push(text);
        Entry {
            kind: Kind::Escaped,
            a: doc.decoded.len() as u32 - 1,
            b: 0,
            next,
            count: 0,
        }
    } else {
        Entry {
            kind: Kind::Str,
            a: start as u32,
            b: end as u32,
            next,
            count: 0,
        }
    };
    doc.entries.push(entry);
    Some(end + 1)
}

/// The number at `at` (JSON's grammar); the index after it. `None` for bad grammar and for a
/// value outside `f64`'s range, which serde_json refuses.
fn number(bytes: &[u8], at: usize) -> Option<usize> {
    let digits = |mut i: usize| {
        let from = i;
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        (i > from).then_some(i)
    };
    let mut i = at;
    if bytes[i] == b'-' {
        i += 1;
    }
    let mut plain = true;
    match bytes.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits(i)?,
        _ => return None,
    }
    if bytes.get(i) == Some(&b'.') {
        plain = false;
        i = digits(i + 1)?;
    }
    if let Some(b'e' | b'E') = bytes.get(i) {
        plain = false;
        i += 1;
        if let Some(b'+' | b'-') = bytes.get(i) {
            i += 1;
        }
        i = digits(i)?;
    }
    if !plain || i - at > 18 {
        // The grammar is checked above, so the text is one std parses.
        let text = std::str::from_utf8(&bytes[at..i]).ok()?;
        if !text.parse::<f64>().ok()?.is_finite() {
            return None;
        }
    }
    Some(i)
}

/// The validator's view of the message: [`Text`]'s nodes.
pub struct Text;

/// A value of a message read in place, or a property name the validator checks on its own
/// (`propertyNames`).
#[derive(Clone, Copy)]
pub enum TextNode<'a> {
    In(&'a Document<'a>, u32),
    Name(&'a str),
}

impl Json for Text {
    type Node<'a> = TextNode<'a>;
    type PreparedKey = Box<str>;
    type StringBuffer = ();

    // Looking a name up scans the members, so a pass over them costs no more than lookups.
    const KEYS_PER_LOOKUP: usize = 8;
    const ACYCLIC: bool = true;

    fn prepare_key(key: &str) -> Box<str> {
        key.into()
    }

    fn with_string_node<T>((): &mut (), string: &str, f: impl FnOnce(TextNode<'_>) -> T) -> T {
        f(TextNode::Name(string))
    }
}

impl<'a> Document<'a> {
    fn entry(&self, at: u32) -> Entry {
        self.entries[at as usize]
    }

    /// The string value at `at`, if it is one.
    fn str_at(&'a self, at: u32) -> Option<&'a str> {
        let e = self.entry(at);
        match e.kind {
            Kind::Str => Some(&self.text[e.a as usize..e.b as usize]),
            Kind::Escaped => Some(&self.decoded[e.a as usize]),
            _ => None,
        }
    }

    /// The value at `at` as serde_json's value: for error reports and the rare keywords that
    /// compare whole containers.
    fn to_value(&'a self, at: u32) -> Value {
        let e = self.entry(at);
        match e.kind {
            Kind::Null => Value::Null,
            Kind::False => Value::Bool(false),
            Kind::True => Value::Bool(true),
            Kind::Number => Value::Number(self.number(at)),
            Kind::Str | Kind::Escaped => Value::String(self.str_at(at).unwrap_or("").to_owned()),
            Kind::Array => Value::Array(
                TextArray { doc: self, at }
                    .elements()
                    .map(|n| n.to_value().into_owned())
                    .collect(),
            ),
            Kind::Object => Value::Object(
                TextObject { doc: self, at }
                    .members()
                    .map(|(name, n)| (name.to_owned(), n.to_value().into_owned()))
                    .collect::<Map<String, Value>>(),
            ),
        }
    }

    /// The number at `at`, as serde_json reads its digits.
    fn number(&self, at: u32) -> Number {
        let e = self.entry(at);
        let text = &self.text[e.a as usize..e.b as usize];
        // Up to 18 digits without sign, fraction or exponent: serde_json's `PosInt`.
        if text.len() <= 18 && text.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(n) = text.parse::<u64>() {
                return Number::from(n);
            }
        }
        // `number` checked it is in range, so serde_json takes it.
        serde_json::from_str(text).unwrap_or_else(|_| Number::from(0))
    }
}

impl<'a> TextNode<'a> {
    fn kind(&self) -> Kind {
        match self {
            TextNode::In(doc, at) => doc.entry(*at).kind,
            TextNode::Name(_) => Kind::Str,
        }
    }

    fn str(&self) -> Option<&'a str> {
        match *self {
            TextNode::In(doc, at) => doc.str_at(at),
            TextNode::Name(name) => Some(name),
        }
    }
}

impl<'a> Node<'a, Text> for TextNode<'a> {
    type Object = TextObject<'a>;
    type Array = TextArray<'a>;
    type Number = Number;

    fn as_object(&self) -> Option<TextObject<'a>> {
        match *self {
            TextNode::In(doc, at) if doc.entry(at).kind == Kind::Object => {
                Some(TextObject { doc, at })
            }
            _ => None,
        }
    }

    fn as_array(&self) -> Option<TextArray<'a>> {
        match *self {
            TextNode::In(doc, at) if doc.entry(at).kind == Kind::Array => {
                Some(TextArray { doc, at })
            }
            _ => None,
        }
    }

    fn as_string(&self) -> Option<Cow<'a, str>> {
        self.str().map(Cow::Borrowed)
    }

    fn as_number(&self) -> Option<Number> {
        match *self {
            TextNode::In(doc, at) if doc.entry(at).kind == Kind::Number => Some(doc.number(at)),
            _ => None,
        }
    }

    fn as_boolean(&self) -> Option<bool> {
        match self.kind() {
            Kind::True => Some(true),
            Kind::False => Some(false),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        self.kind() == Kind::Null
    }

    fn is_number(&self) -> bool {
        self.kind() == Kind::Number
    }

    fn json_type(&self) -> JsonType {
        match self.kind() {
            Kind::Null => JsonType::Null,
            Kind::False | Kind::True => JsonType::Boolean,
            Kind::Number => JsonType::Number,
            Kind::Str | Kind::Escaped => JsonType::String,
            Kind::Array => JsonType::Array,
            Kind::Object => JsonType::Object,
        }
    }

    fn string_length(&self) -> Option<u64> {
        self.str().map(|s| s.chars().count() as u64)
    }

    fn string_length_within(&self, min: u64, max: u64) -> Option<bool> {
        let s = self.str()?;
        // A code point takes one to four bytes: the byte count often decides alone.
        let bytes = s.len() as u64;
        let fewest = bytes.div_ceil(4);
        if bytes < min || fewest > max {
            return Some(false);
        }
        if min <= fewest && bytes <= max {
            return Some(true);
        }
        Some((min..=max).contains(&(s.chars().count() as u64)))
    }

    fn equals_value(&self, expected: &Value) -> bool {
        // `const` and `enum` on strings and literals, without building a value.
        match (self.kind(), expected) {
            (Kind::Str | Kind::Escaped, Value::String(e)) => self.str() == Some(e.as_str()),
            (Kind::Str | Kind::Escaped, _) => false,
            (Kind::Null, e) => e.is_null(),
            (Kind::True, e) => e.as_bool() == Some(true),
            (Kind::False, e) => e.as_bool() == Some(false),
            _ => jsonschema::json::cmp::equal(&self.to_value(), expected),
        }
    }

    fn to_value(&self) -> Cow<'a, Value> {
        Cow::Owned(match *self {
            TextNode::In(doc, at) => doc.to_value(at),
            TextNode::Name(name) => Value::String(name.to_owned()),
        })
    }

    fn identity(&self) -> Option<NodeIdentity> {
        match *self {
            TextNode::In(doc, at) => {
                Some(NodeIdentity::tagged(std::ptr::from_ref(doc) as usize, at))
            }
            TextNode::Name(_) => None,
        }
    }
}

/// An object of the message.
#[derive(Clone, Copy)]
pub struct TextObject<'a> {
    doc: &'a Document<'a>,
    at: u32,
}

/// Its members in document order: a name and its value.
pub struct Members<'a> {
    doc: &'a Document<'a>,
    at: u32,
    left: u32,
}

impl<'a> Iterator for Members<'a> {
    type Item = (&'a str, TextNode<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let name = self.doc.str_at(self.at).unwrap_or("");
        let value = self.at + 1;
        self.at = self.doc.entry(value).next;
        Some((name, TextNode::In(self.doc, value)))
    }
}

impl<'a> Object<'a, Text> for TextObject<'a> {
    type Node = TextNode<'a>;
    type MemberName = &'a str;
    type MembersIter = Members<'a>;

    fn len(&self) -> usize {
        self.doc.entry(self.at).count as usize
    }

    fn get(&self, key: &Box<str>) -> Option<TextNode<'a>> {
        self.members()
            .find(|(name, _)| *name == &**key)
            .map(|(_, value)| value)
    }

    fn members(&self) -> Members<'a> {
        Members {
            doc: self.doc,
            at: self.at + 1,
            left: self.doc.entry(self.at).count,
        }
    }
}

/// An array of the message.
#[derive(Clone, Copy)]
pub struct TextArray<'a> {
    doc: &'a Document<'a>,
    at: u32,
}

/// Its elements in order.
pub struct Elements<'a> {
    doc: &'a Document<'a>,
    at: u32,
    left: u32,
}

impl<'a> Iterator for Elements<'a> {
    type Item = TextNode<'a>;

    fn next(&mut self) -> Option<TextNode<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = self.at;
        self.at = self.doc.entry(at).next;
        Some(TextNode::In(self.doc, at))
    }
}

impl<'a> Array<'a, Text> for TextArray<'a> {
    type Node = TextNode<'a>;
    type ElementsIter = Elements<'a>;

    fn len(&self) -> usize {
        self.doc.entry(self.at).count as usize
    }

    fn elements(&self) -> Elements<'a> {
        Elements {
            doc: self.doc,
            at: self.at + 1,
            left: self.doc.entry(self.at).count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value this reader sees, when it takes the text.
    fn seen(text: &str) -> Option<Value> {
        read(text, |root| root.to_value().into_owned())
    }

    #[test]
    fn reads_what_serde_json_reads() {
        for text in [
            r#"{"type":"chat","text":"hello"}"#,
            r#" { "a" : [ 1 , -2 , 3.5 , 1e3 , -0 , 0.0 , true , false , null ] , "b" : { } , "c" : [ ] } "#,
            r#""\u00e9\n\"q\"\\ \ud83e\udd80""#,
            r#"{"\u0074ype":"x"}"#,
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "123456789012345678901234567890",
            "1e-400",
            "0",
            "[[[[[]]]]]",
            &format!(r#"{{"long":"{}"}}"#, "ab\\\"c".repeat(100)),
            &format!(r#"["{}","{}é"]"#, "x".repeat(95), "y".repeat(64)),
        ] {
            let reference: Value = serde_json::from_str(text).unwrap();
            assert_eq!(seen(text), Some(reference), "{text}");
        }
    }

    #[test]
    fn gives_up_where_serde_json_refuses_or_differs() {
        for text in [
            "",
            " ",
            "{",
            "[1,]",
            "{\"a\":1,}",
            "01",
            "1.",
            ".5",
            "-",
            "1e",
            "+1",
            "1e400",
            "\"tab\there\"",
            "\"\\x\"",
            "\"\\ud800\"",
            "\"open",
            "nul",
            "truex",
            "{} {}",
            "{\"a\":1,\"a\":2}",
            "{\"a\":1,\"\\u0061\":2}",
            "'a'",
        ] {
            assert_eq!(seen(text), None, "{text:?}");
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(serde_json::from_str::<Value>(&deep).is_err());
        assert_eq!(seen(&deep), None);
        let ok = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(seen(&ok), serde_json::from_str(&ok).ok());
    }

    #[test]
    fn meets_the_validators_contract() {
        let text = serde_json::to_string(&jsonschema::json::conformance::document()).unwrap();
        read(&text, |root| {
            jsonschema::json::conformance::assert_conformance::<Text>(&root)
        })
        .expect("read");
    }

    /// Every document a schema is tried on gets the same verdict in place as through
    /// serde_json. (Only the verdict: a refused message's error is serde_json's, as errors
    /// naming several members list them in serde_json's order.)
    #[test]
    fn same_verdicts_as_serde_json() {
        let schemas = [
            serde_json::json!({"type":"object","required":["type","text"],"properties":{"type":{"const":"chat"},"text":{"type":"string","minLength":1,"maxLength":5}},"additionalProperties":false}),
            serde_json::json!({"type":"array","items":{"type":"integer","minimum":0,"maximum":10},"uniqueItems":true,"maxItems":3}),
            serde_json::json!({"enum":[1,"a",null,{"k":[1.0]}]}),
            serde_json::json!({"type":"object","propertyNames":{"pattern":"^[a-z]+$"},"minProperties":1,"additionalProperties":{"type":["number","boolean"],"multipleOf":0.5}}),
            serde_json::json!({"oneOf":[{"type":"string","pattern":"^é"},{"type":"number","exclusiveMaximum":2}],"not":{"const":1.5}}),
            serde_json::json!({"$defs":{"n":{"type":"object","properties":{"c":{"$ref":"#/$defs/n"}}}},"$ref":"#/$defs/n"}),
        ];
        let docs = [
            r#"{"type":"chat","text":"hi"}"#,
            r#"{"type":"chat","text":""}"#,
            r#"{"type":"chat","text":"héllo"}"#,
            r#"{"type":"chat","text":"héllo!"}"#,
            r#"{"type":"chat","text":"\u00e9"}"#,
            r#"{"type":"cha\u0074","text":"x"}"#,
            r#"{"type":"chat"}"#,
            r#"{"type":"chat","text":"x","more":1}"#,
            "[1,2,3]",
            "[1,1]",
            "[1,2.0,2]",
            "[1,2,3,4]",
            "[-1]",
            "[1.5]",
            "[10, 10.0]",
            "1",
            "1.0",
            "1.5",
            "\"a\"",
            "null",
            r#"{"k":[1]}"#,
            r#"{"k":[1.0]}"#,
            r#"{"ab":0.5,"c":true}"#,
            r#"{"aB":0.5}"#,
            r#"{"a":0.25}"#,
            r#"{}"#,
            r#""éa""#,
            r#""ae""#,
            "1.99",
            "2",
            r#"{"c":{"c":{"c":{}}}}"#,
            r#"{"c":{"c":5}}"#,
            "[]",
            "true",
        ];
        for schema in &schemas {
            let reference = jsonschema::options().build(schema).unwrap();
            let in_place = jsonschema::options_for::<Text>().build(schema).unwrap();
            for doc in docs {
                let value: Value = serde_json::from_str(doc).unwrap();
                let expected = reference.is_valid(&value);
                let got = read(doc, |root| in_place.is_valid(root)).unwrap();
                assert_eq!(got, expected, "{schema} on {doc}");
            }
        }
    }

    /// Mutated documents: whatever this reader takes, serde_json takes as the same value.
    #[test]
    fn never_takes_what_serde_json_reads_otherwise() {
        const PIECES: [&str; 24] = [
            "{", "}", "[", "]", ",", ":", "\"", "\\", "\\u00e9", "\\ud83e", "\\n", " ", "\t",
            "\u{1}", "-", "0", "7", ".", "e", "+", "true", "null", "é", "\"a\"",
        ];
        let seeds = [
            r#"{"type":"chat","text":"hello","n":[1,2.5,-3e2,{"k":null}]}"#,
            r#"[{"a":"\u00e9\n"},true,false,0,-0.0,"x"]"#,
        ];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut taken, mut tried) = (0, 0);
        for round in 0..20_000 {
            let mut text = seeds[round % seeds.len()].to_owned();
            for _ in 0..(next() % 3 + 1) {
                let mut at = (next() as usize) % (text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                if next() % 2 == 0 {
                    text.insert_str(at, PIECES[(next() as usize) % PIECES.len()]);
                } else {
                    let mut end = (at + 1 + (next() as usize) % 3).min(text.len());
                    while !text.is_char_boundary(end) {
                        end += 1;
                    }
                    text.replace_range(at..end, "");
                }
            }
            tried += 1;
            if let Some(value) = seen(&text) {
                taken += 1;
                assert_eq!(
                    serde_json::from_str::<Value>(&text).ok(),
                    Some(value),
                    "{text}"
                );
            }
        }
        // The mutations leave a fair share of valid documents, so both sides are exercised.
        assert!(taken > tried / 20 && taken < tried, "{taken} of {tried}");
    }
}
