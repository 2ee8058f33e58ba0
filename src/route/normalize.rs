//! Request-path normalisation before matching, and the check of what a placeholder may carry
//! into an upstream URL.
//!
//! A path is matched in its normal form (RFC 3986 §6.2.2): percent-encodings of unreserved
//! characters are decoded, the rest get upper-case hex digits, `//` is merged into `/` (as
//! NGINX's `merge_slashes`), and `.` and `..` segments are removed (§5.2.4). A path whose `..`
//! would climb above the root is refused, as NGINX refuses it. `%2F` and `%5C` stay encoded: they
//! are data, not separators, so they never take part in matching; they are refused in a
//! placeholder instead ([`check_param`]), because many upstreams decode them and then resolve the
//! dot segments the gateway has not seen.
//!
//! Most paths need none of this: [`normalize`] scans the bytes once and returns the path as it
//! is unless it holds a `%`, a `//` or a dot segment.

use std::borrow::Cow;

/// Why a request path, or a placeholder captured from it, is refused (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A `%` not followed by two hex digits (`%zz`, a truncated `%2`).
    #[error("malformed percent-encoding in the request path")]
    BadPercent,
    /// `%00`: C-based upstreams end the path there.
    #[error("encoded NUL (%00) in the request path")]
    Nul,
    /// `..` segments that climb above `/` (`/../x`).
    #[error("the request path climbs above the root with '..'")]
    AboveRoot,
    /// A placeholder value holds a `.` or `..` segment between encoded slashes or backslashes
    /// (`..%2F..%2Fadmin`), or one with parameters (`..;x`, which Tomcat reads as `..`).
    #[error("the value of {{{0}}} holds a dot segment")]
    DotSegment(String),
    /// A placeholder value holds `%2F`, `%5C` or `\`, and the route does not set
    /// `allow_encoded_slash`.
    #[error("the value of {{{0}}} holds an encoded slash or a backslash")]
    EncodedSlash(String),
}

/// The normal form of `path` (which starts with `/`, without query), borrowed when it is
/// already normal.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !needs_work(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let (normal, above_root) = remove_dot_segments(&decoded, true);
    if above_root {
        return Err(PathError::AboveRoot);
    }
    Ok(Cow::Owned(normal))
}

/// Whether `path` holds a `%`, a `//`, or a `.` or `..` segment: one pass, no allocation.
fn needs_work(path: &[u8]) -> bool {
    let mut i = 0;
    while i < path.len() {
        match path[i] {
            b'%' => return true,
            b'/' => match path.get(i + 1) {
                Some(b'/') => return true,
                Some(b'.') => {
                    let end = |at: usize| matches!(path.get(at), None | Some(b'/'));
                    if end(i + 2) || (path.get(i + 2) == Some(&b'.') && end(i + 3)) {
                        return true;
                    }
                }
                _ => {}
            },
            _ => {}
        }
        i += 1;
    }
    false
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes percent-encoded unreserved characters and upper-cases the hex digits of the others
/// (RFC 3986 §6.2.2.1 and §6.2.2.2). Decoding never makes a `/`, so segments stay as they are.
pub(crate) fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadPercent);
        };
        let value = hi << 4 | lo;
        if value == 0 {
            return Err(PathError::Nul);
        }
        if is_unreserved(value) {
            out.push(value);
        } else {
            out.push(b'%');
            out.push(bytes[i + 1].to_ascii_uppercase());
            out.push(bytes[i + 2].to_ascii_uppercase());
        }
        i += 3;
    }
    // Only ASCII bytes were replaced, by ASCII bytes: the text is still UTF-8.
    String::from_utf8(out).map_err(|_| PathError::BadPercent)
}

/// RFC 3986 §5.2.4 on an absolute path (starting with `/`), segment by segment; with
/// `merge_slashes`, empty segments are dropped first (a trailing `/` is kept). Returns the path
/// and whether a `..` climbed above the root (the RFC then stays at the root).
pub(crate) fn remove_dot_segments(path: &str, merge_slashes: bool) -> (String, bool) {
    let body = path.strip_prefix('/').unwrap_or(path);
    let mut kept: Vec<&str> = Vec::new();
    let mut above_root = false;
    let mut trailing_slash = false;
    let mut segments = body.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        trailing_slash = false;
        match segment {
            "." => trailing_slash = last,
            ".." => {
                above_root |= kept.pop().is_none();
                trailing_slash = last;
            }
            "" if merge_slashes || last => trailing_slash = last,
            _ => kept.push(segment),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    (out, above_root)
}

/// Checks one placeholder value of a matched (normalised) path before it may reach an upstream
/// URL or a policy: no dot segment between any of `/`, `\`, `%2F`, `%5C`, and, unless
/// `allow_encoded_slash`, none of `%2F`, `%5C` or `\` at all.
pub fn check_param(name: &str, value: &str, allow_encoded_slash: bool) -> Result<(), PathError> {
    let bytes = value.as_bytes();
    // Most values have none of these bytes: nothing to split.
    if !bytes.iter().any(|b| matches!(b, b'%' | b'\\' | b'.')) {
        return Ok(());
    }
    let mut start = 0;
    let mut i = 0;
    let mut slash = false;
    while i <= bytes.len() {
        let separator = match bytes.get(i) {
            None => Some(0),
            Some(b'/') => Some(1),
            Some(b'\\') => {
                slash = true;
                Some(1)
            }
            Some(b'%') if is_encoded_slash(&bytes[i..]) => {
                slash = true;
                Some(3)
            }
            _ => None,
        };
        let Some(width) = separator else {
            i += 1;
            continue;
        };
        if is_dot_segment(&bytes[start..i]) {
            return Err(PathError::DotSegment(name.to_owned()));
        }
        i += width.max(1);
        start = i;
    }
    if slash && !allow_encoded_slash {
        return Err(PathError::EncodedSlash(name.to_owned()));
    }
    Ok(())
}

/// `%2F`, `%2f`, `%5C` or `%5c` at the start of `bytes`.
fn is_encoded_slash(bytes: &[u8]) -> bool {
    matches!(
        bytes.get(..3),
        Some([b'%', b'2', b'f' | b'F']) | Some([b'%', b'5', b'c' | b'C'])
    )
}

/// `.` or `..`, alone or with path parameters (`..;jsessionid=x`): Tomcat and Jetty drop the
/// parameters and then resolve the dots.
fn is_dot_segment(segment: &[u8]) -> bool {
    let bare = match memchr::memchr(b';', segment) {
        Some(at) => &segment[..at],
        None => segment,
    };
    matches!(bare, b"." | b"..")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3986 §5.4: each reference against the base `http://a/b/c/d;p?q`, path part only
    /// (merged with the base's path as §5.2.3 does, then §5.2.4). (Network-path, query-only
    /// and fragment-only references do not reach path resolution.)
    #[test]
    fn rfc_3986_examples() {
        let cases = [
            // §5.4.1 normal examples
            ("g", "/b/c/g"),
            ("./g", "/b/c/g"),
            ("g/", "/b/c/g/"),
            ("/g", "/g"),
            (";x", "/b/c/;x"),
            ("g;x", "/b/c/g;x"),
            (".", "/b/c/"),
            ("./", "/b/c/"),
            ("..", "/b/"),
            ("../", "/b/"),
            ("../g", "/b/g"),
            ("../..", "/"),
            ("../../", "/"),
            ("../../g", "/g"),
            // §5.4.2 abnormal examples
            ("../../../g", "/g"),
            ("../../../../g", "/g"),
            ("/./g", "/g"),
            ("/../g", "/g"),
            ("g.", "/b/c/g."),
            (".g", "/b/c/.g"),
            ("g..", "/b/c/g.."),
            ("..g", "/b/c/..g"),
            ("./../g", "/b/g"),
            ("./g/.", "/b/c/g/"),
            ("g/./h", "/b/c/g/h"),
            ("g/../h", "/b/c/h"),
            ("g;x=1/./y", "/b/c/g;x=1/y"),
            ("g;x=1/../y", "/b/c/y"),
        ];
        for (reference, want) in cases {
            let merged = if reference.starts_with('/') {
                reference.to_owned()
            } else {
                format!("/b/c/{reference}")
            };
            let (got, above) = remove_dot_segments(&merged, false);
            assert_eq!(got, want, "{reference}");
            // Only these climb above the root; the RFC keeps them there, the gateway refuses.
            let climbs = ["../../../g", "../../../../g", "/../g"].contains(&reference);
            assert_eq!(above, climbs, "{reference}");
        }
        // §5.2.4's own walk-throughs.
        assert_eq!(remove_dot_segments("/a/b/c/./../../g", false).0, "/a/g");
        assert_eq!(
            remove_dot_segments("/mid/content=5/../6", false).0,
            "/mid/6"
        );
    }

    #[test]
    fn paths_are_normalised_for_matching() {
        let ok = |p: &str| normalize(p).unwrap().into_owned();
        for (path, want) in [
            ("/", "/"),
            ("/chat/lobby", "/chat/lobby"),
            ("/a/.hidden/..x/x..", "/a/.hidden/..x/x.."),
            ("/api/x/../y", "/api/y"),
            ("/api/./x/.", "/api/x/"),
            ("/api/x/..", "/api/"),
            ("//api///x//", "/api/x/"),
            ("/room/%2e%2e", "/"),
            ("/room/%2E", "/room/"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/.%2e/admin", "/admin"),
            ("/%7Euser/%41b%2dc", "/~user/Ab-c"),
            ("/a%2fb/%5c/%c3%a9", "/a%2Fb/%5C/%C3%A9"),
            ("/api/..%2F..%2Fadmin", "/api/..%2F..%2Fadmin"),
            ("/api/..;/admin", "/api/..;/admin"),
            ("/a%20b", "/a%20b"),
        ] {
            assert_eq!(ok(path), want, "{path}");
        }
        assert!(matches!(normalize("/chat/lobby"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize("/a/.b/c."), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn bad_paths_are_refused() {
        for (path, want) in [
            ("/a%zz", PathError::BadPercent),
            ("/a%2", PathError::BadPercent),
            ("/a%", PathError::BadPercent),
            ("/a%g0", PathError::BadPercent),
            ("/a%00b", PathError::Nul),
            ("/..", PathError::AboveRoot),
            ("/../x", PathError::AboveRoot),
            ("/api/x/../../../admin", PathError::AboveRoot),
            ("/%2e%2e/etc", PathError::AboveRoot),
            ("/a/../../b", PathError::AboveRoot),
        ] {
            assert_eq!(normalize(path), Err(want), "{path}");
        }
    }

    #[test]
    fn placeholders_carry_no_escape() {
        let check = |v: &str, allow: bool| check_param("p", v, allow);
        for fine in [
            "lobby", "a/b/c", ".hidden", "..x", "x..", "a.b", "a%20b", "", "a/",
        ] {
            assert_eq!(check(fine, false), Ok(()), "{fine}");
        }
        for slash in ["a%2Fb", "a%2fb", "a%5Cb", "a%5cb", "a\\b", "%2F"] {
            assert_eq!(
                check(slash, false),
                Err(PathError::EncodedSlash("p".into())),
                "{slash}"
            );
            assert_eq!(check(slash, true), Ok(()), "{slash}");
        }
        for dots in [
            "..%2F..%2Fadmin",
            "..%2f..%2fadmin",
            "x%2F..%2Fadmin",
            "x%5C..",
            "..\\admin",
            "a%2F.%2Fb",
            "..;/admin",
            "a/..;x/b",
            "..",
            ".",
            "a/../b",
        ] {
            for allow in [false, true] {
                assert_eq!(
                    check(dots, allow),
                    Err(PathError::DotSegment("p".into())),
                    "{dots} (allow_encoded_slash = {allow})"
                );
            }
        }
    }
}
