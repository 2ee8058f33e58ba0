//! Where a JSON pointer (`/properties/n/minimum`) points in a JSON text: the byte offset of
//! that value, so that an invalid schema is reported at its `file:line:column`. A scan of the
//! text, not a parse into values (which forget their places); used only on the error path.

/// The byte offset in `text` (a valid JSON document) of the value at `pointer` (RFC 6901);
/// `None` when the text does not hold it.
pub(super) fn locate(text: &str, pointer: &str) -> Option<usize> {
    let b = text.as_bytes();
    let mut at = skip_ws(b, 0);
    if pointer.is_empty() {
        return Some(at);
    }
    for token in pointer.strip_prefix('/')?.split('/') {
        let token = token.replace("~1", "/").replace("~0", "~");
        at = match b.get(at)? {
            b'{' => member(text, at, &token)?,
            b'[' => item(b, at, token.parse().ok()?)?,
            _ => return None,
        };
    }
    Some(at)
}

fn skip_ws(b: &[u8], mut at: usize) -> usize {
    while b.get(at).is_some_and(|c| c.is_ascii_whitespace()) {
        at += 1;
    }
    at
}

/// The offset just past the string that starts at `at` (its opening quote).
fn skip_string(b: &[u8], mut at: usize) -> Option<usize> {
    at += 1;
    loop {
        match b.get(at)? {
            b'"' => return Some(at + 1),
            b'\\' => at += 2,
            _ => at += 1,
        }
    }
}

/// The offset just past the value that starts at `at`.
fn skip_value(b: &[u8], at: usize) -> Option<usize> {
    match b.get(at)? {
        b'"' => skip_string(b, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            loop {
                match b.get(i)? {
                    b'"' => {
                        i = skip_string(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let mut i = at;
            while b
                .get(i)
                .is_some_and(|c| !matches!(c, b',' | b']' | b'}') && !c.is_ascii_whitespace())
            {
                i += 1;
            }
            Some(i)
        }
    }
}

/// The offset of member `key`'s value in the object that starts at `at`.
fn member(text: &str, at: usize, key: &str) -> Option<usize> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, at + 1);
    while *b.get(i)? == b'"' {
        let end = skip_string(b, i)?;
        let name: String = serde_json::from_str(&text[i..end]).ok()?;
        i = skip_ws(b, end);
        if *b.get(i)? != b':' {
            return None;
        }
        i = skip_ws(b, i + 1);
        if name == key {
            return Some(i);
        }
        i = skip_ws(b, skip_value(b, i)?);
        if *b.get(i)? == b',' {
            i = skip_ws(b, i + 1);
        }
    }
    None
}

/// The offset of item `n` in the array that starts at `at`.
fn item(b: &[u8], at: usize, n: usize) -> Option<usize> {
    let mut i = skip_ws(b, at + 1);
    for _ in 0..n {
        if *b.get(i)? == b']' {
            return None;
        }
        i = skip_ws(b, skip_value(b, i)?);
        if *b.get(i)? != b',' {
            return None;
        }
        i = skip_ws(b, i + 1);
    }
    (*b.get(i)? != b']').then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_find_their_values() {
        let text = r#"{
  "a": {"x": [1, {"y": "}]\"", "z": true}], "b/c": 2, "t~": null},
  "n": -1.5e3
}"#;
        let at = |p: &str| locate(text, p).map(|i| &text[i..i + 4]);
        assert_eq!(at(""), Some("{\n  "));
        assert_eq!(at("/n"), Some("-1.5"));
        assert_eq!(at("/a/x/0"), Some("1, {"));
        assert_eq!(at("/a/x/1/z"), Some("true"));
        assert_eq!(at("/a/b~1c"), Some("2, \""));
        assert_eq!(at("/a/t~0"), Some("null"));
        assert_eq!(at("/a/x/2"), None);
        assert_eq!(at("/a/missing"), None);
        assert_eq!(at("/n/0"), None);
    }
}
