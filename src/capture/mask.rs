//! Masking named JSON fields in captured text: `{"password": "x"}` becomes
//! `{"password": "<redacted>"}`, at any depth, whatever the value's type.
//!
//! A captured payload may be cut at `max_payload`, so it is often not valid JSON: this is a
//! scanner over the text, not a parser. It finds each string followed by `:` (a key), and when
//! the key is one of the names (case-insensitive) it replaces the value that follows, up to
//! its end or to the end of the text, with `"<redacted>"`. Text that is not JSON passes through
//! unchanged unless it contains `"name":`.

/// What a masked value becomes.
pub const REDACTED: &str = "\"<redacted>\"";

/// `text` with the value of every key in `names` replaced by [`REDACTED`]; `None` when no key
/// matched (the caller keeps its bytes). `text` is UTF-8 (a text message, perhaps cut at a
/// character boundary); only ASCII bytes are looked at, so the result is UTF-8 too.
pub fn json_fields(text: &[u8], names: &[String]) -> Option<Vec<u8>> {
    if names.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    // `text[copied..]` is not yet in `out`.
    let mut copied = 0;
    let mut i = 0;
    let mut matched = false;
    while let Some(quote) = memchr::memchr(b'"', &text[i..]) {
        let start = i + quote;
        let Some(end) = string_end(text, start) else {
            break;
        };
        let colon = skip_space(text, end);
        if text.get(colon) == Some(&b':') && is_named(&text[start..end], names) {
            let value = skip_space(text, colon + 1);
            out.extend_from_slice(&text[copied..value]);
            out.extend_from_slice(REDACTED.as_bytes());
            matched = true;
            i = value_end(text, value);
            copied = i;
        } else {
            i = end;
        }
    }
    if !matched {
        return None;
    }
    out.extend_from_slice(&text[copied..]);
    Some(out)
}

/// The index just past the string that starts with the quote at `start`; `None` when the
/// text ends inside it.
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', &bytes[i.min(bytes.len())..])?;
        if bytes[i] == b'"' {
            return Some(i + 1);
        }
        i += 2;
    }
}

fn skip_space(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() && matches!(bytes[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// Whether the quoted key `quoted` (quotes included) is one of `names`, ignoring case.
fn is_named(quoted: &[u8], names: &[String]) -> bool {
    let inner = &quoted[1..quoted.len() - 1];
    // No name is longer than this; a long key is not looked at further.
    if inner.len() > 256 {
        return false;
    }
    let key = if inner.contains(&b'\\') {
        match serde_json::from_slice::<String>(quoted) {
            Ok(k) => std::borrow::Cow::Owned(k.into_bytes()),
            Err(_) => return false,
        }
    } else {
        std::borrow::Cow::Borrowed(inner)
    };
    names
        .iter()
        .any(|n| n.as_bytes().eq_ignore_ascii_case(&key))
}

/// The index just past the JSON value starting at `start` (or the end of the text when it is
/// cut inside the value).
fn value_end(bytes: &[u8], start: usize) -> usize {
    match bytes.get(start) {
        None => start,
        Some(b'"') => string_end(bytes, start).unwrap_or(bytes.len()),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut i = start;
            while i < bytes.len() {
                match bytes[i] {
                    b'"' => {
                        i = match string_end(bytes, i) {
                            Some(end) => end,
                            None => return bytes.len(),
                        };
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return i + 1;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            bytes.len()
        }
        // A number, true, false or null: up to the next delimiter.
        Some(_) => {
            let mut i = start;
            while i < bytes.len()
                && !matches!(bytes[i], b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t')
            {
                i += 1;
            }
            i
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(text: &str) -> String {
        let names = vec!["password".to_owned(), "token".to_owned()];
        json_fields(text.as_bytes(), &names)
            .map_or_else(|| text.to_owned(), |m| String::from_utf8(m).unwrap())
    }

    #[test]
    fn values_of_any_type_at_any_depth() {
        assert_eq!(
            mask(r#"{"user":"ann","password":"hunter2"}"#),
            r#"{"user":"ann","password":"<redacted>"}"#
        );
        assert_eq!(
            mask(r#"{"a":{"Token" : {"x":[1,"}"]}, "b": 2}}"#),
            r#"{"a":{"Token" : "<redacted>", "b": 2}}"#
        );
        assert_eq!(
            mask(r#"[{"password":12},{"password":null}]"#),
            r#"[{"password":"<redacted>"},{"password":"<redacted>"}]"#
        );
    }

    #[test]
    fn values_named_like_keys_and_escapes() {
        // A value that reads "password" is not a key; an escaped key still is one.
        assert_eq!(
            mask(r#"{"x":"password","y":1}"#),
            r#"{"x":"password","y":1}"#
        );
        assert_eq!(
            mask(r#"{"pass\u0077ord":"s","q":"a\"b"}"#),
            r#"{"pass\u0077ord":"<redacted>","q":"a\"b"}"#
        );
    }

    #[test]
    fn cut_text_is_masked_to_its_end() {
        assert_eq!(mask(r#"{"password":"hunt"#), r#"{"password":"<redacted>""#);
        assert_eq!(mask(r#"{"token":{"a":"#), r#"{"token":"<redacted>""#);
        assert_eq!(mask(r#"{"passw"#), r#"{"passw"#);
        assert_eq!(mask(r#"{"password":"#), r#"{"password":"<redacted>""#);
    }

    #[test]
    fn other_text_is_untouched() {
        assert_eq!(json_fields(b"password=hunter2", &["password".into()]), None);
        assert_eq!(json_fields(br#"{"a":1}"#, &["password".into()]), None);
        assert_eq!(json_fields(br#"{"password":1}"#, &[]), None);
        // A backslash at the very end, and text that is not JSON at all.
        assert_eq!(mask(r#"{"password":"a\"#), r#"{"password":"<redacted>""#);
        assert_eq!(mask("é \" ü"), "é \" ü");
    }
}
