//! Header fields read in place: each name and value is a span of the head they came in, so
//! reading a head's fields copies no bytes and makes one vector.
//!
//! Both heads of a handshake are read this way: the client's request and the upstream's 101.
//! Names keep the case they were sent in, as NGINX forwards them. Look-ups take a name in
//! lower case and match any case; a head has a dozen fields, so a look-up is a scan, which
//! costs less than hashing every name into a map.

use bytes::Bytes;

/// Where one field's name and value are in its head: `(start, end)` byte offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    name: (u32, u32),
    value: (u32, u32),
}

/// The offsets of `part` within `base`, or `None` if `part` is not a slice of `base`.
fn offsets(base: &[u8], part: &[u8]) -> Option<(u32, u32)> {
    let start = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    if end > base.len() {
        return None;
    }
    Some((u32::try_from(start).ok()?, u32::try_from(end).ok()?))
}

/// Whether `value` can be sent as a header value as it is: visible ASCII, spaces and tabs
/// (the rule of `http::HeaderValue::to_str`).
pub(crate) fn is_text_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// Whether the field name `name` (any case) is `lower`, given in lower case. Cheaper than
/// `eq_ignore_ascii_case`, which folds both sides.
pub(crate) fn is_name(name: &[u8], lower: &str) -> bool {
    name.len() == lower.len()
        && name
            .iter()
            .zip(lower.as_bytes())
            .all(|(a, b)| a.to_ascii_lowercase() == *b)
}

/// The spans of the fields httparse found in `base`, in order; `parsed` borrows from `base`.
pub(crate) fn spans(base: &[u8], parsed: &[httparse::Header<'_>]) -> Vec<Span> {
    parsed
        .iter()
        .filter_map(|h| {
            Some(Span {
                name: offsets(base, h.name.as_bytes())?,
                value: offsets(base, h.value)?,
            })
        })
        .collect()
}

/// The header fields of one HTTP head, in the order they came.
///
/// ```
/// use framegate::header_fields::HeaderFields;
///
/// let fields = HeaderFields::from_pairs([("Host", "gw.example"), ("X-Tag", "a"), ("x-tag", "b")]);
/// assert_eq!(fields.get("host"), Some(&b"gw.example"[..]));
/// assert_eq!(fields.get_all("x-tag").collect::<Vec<_>>(), [&b"a"[..], b"b"]);
/// assert_eq!(fields.len(), 3);
/// ```
#[derive(Debug, Clone, Default)]
pub struct HeaderFields {
    /// The bytes the spans point into (the head, and whatever was read with it).
    head: Bytes,
    spans: Vec<Span>,
}

impl HeaderFields {
    /// Fields made of `(name, value)` pairs, in order, as they would be sent. Neither names nor
    /// values are checked: this is for tests, benchmarks and other callers of the policy API.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> HeaderFields {
        Self::of_bytes(pairs.into_iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    /// Fields made of `(name, value)` pairs, each name and value next to each other in one
    /// new buffer.
    fn of_bytes<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> HeaderFields {
        let mut bytes = Vec::new();
        let mut spans = Vec::new();
        let at = |bytes: &Vec<u8>| u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        for (name, value) in pairs {
            let name_start = at(&bytes);
            bytes.extend_from_slice(name);
            let value_start = at(&bytes);
            bytes.extend_from_slice(value);
            spans.push(Span {
                name: (name_start, value_start),
                value: (value_start, at(&bytes)),
            });
        }
        HeaderFields::from_spans(Bytes::from(bytes), spans)
    }

    /// The fields of a header map (hyper's parse of a request head), in the map's order:
    /// names in lower case, the values of a repeated name together. Their bytes are copied
    /// into one buffer of the exact size (so that it becomes `Bytes` without another copy).
    pub(crate) fn of_map(map: &http::HeaderMap) -> HeaderFields {
        let size = map
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        let mut bytes = Vec::with_capacity(size);
        let mut spans = Vec::with_capacity(map.len());
        let at = |bytes: &Vec<u8>| u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        for (name, value) in map {
            let name_start = at(&bytes);
            bytes.extend_from_slice(name.as_str().as_bytes());
            let value_start = at(&bytes);
            bytes.extend_from_slice(value.as_bytes());
            spans.push(Span {
                name: (name_start, value_start),
                value: (value_start, at(&bytes)),
            });
        }
        HeaderFields::from_spans(Bytes::from(bytes), spans)
    }

    /// A copy holding only the fields' own bytes, for keeping them longer than the head they
    /// were read from (which holds the rest of the request, and what came after it).
    pub(crate) fn compact(&self) -> HeaderFields {
        Self::of_bytes(self.iter())
    }

    /// The fields at `spans` in `head` (see [`spans`]). A span that does not fit in `head` is
    /// left out.
    pub(crate) fn from_spans(head: Bytes, mut spans: Vec<Span>) -> HeaderFields {
        let fits = |(start, end): (u32, u32)| start <= end && end as usize <= head.len();
        spans.retain(|s| fits(s.name) && fits(s.value));
        HeaderFields { head, spans }
    }

    /// The bytes the fields point into: for a request head just read, the head and whatever
    /// was read with it.
    pub(crate) fn bytes(&self) -> &Bytes {
        &self.head
    }

    fn part(&self, (start, end): (u32, u32)) -> &[u8] {
        // `from_spans` and `from_pairs` only keep spans that fit.
        self.head
            .get(start as usize..end as usize)
            .unwrap_or_default()
    }

    /// How many fields there are (a repeated name counts each time).
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether there are no fields.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Every `(name, value)`, in order; names as they were sent.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + Clone + '_ {
        self.spans
            .iter()
            .map(|s| (self.part(s.name), self.part(s.value)))
    }

    /// The values of the fields named `name` (given in lower case, matched in any case), in
    /// order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + Clone + 'a {
        self.iter()
            .filter(move |(n, _)| is_name(n, name))
            .map(|(_, v)| v)
    }

    /// The values of the fields named `name`, given in any case, in order.
    pub fn values<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The value of the first field named `name` (any case).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter().find(|(n, _)| is_name(n, name)).map(|(_, v)| v)
    }

    /// The value of the first field named `name` as text, if it is visible ASCII (with spaces
    /// and tabs), the rule of `http::HeaderValue::to_str`.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        let value = self.get(name)?;
        if is_text_value(value) {
            std::str::from_utf8(value).ok()
        } else {
            None
        }
    }

    /// Whether a field is named `name` (any case).
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_parsed_in_place_keep_order_case_and_every_value() {
        let head = Bytes::from_static(
            b"GET / HTTP/1.1\r\nHost: gw\r\nX-Multi: one\r\nx-empty:\r\nX-MULTI: two\r\n\r\nrest",
        );
        let mut slots = [httparse::EMPTY_HEADER; 8];
        let mut request = httparse::Request::new(&mut slots);
        request.parse(&head).expect("a valid head");
        let fields = HeaderFields::from_spans(head.clone(), spans(&head, request.headers));
        let names: Vec<_> = fields.iter().map(|(n, _)| n).collect();
        assert_eq!(names, [&b"Host"[..], b"X-Multi", b"x-empty", b"X-MULTI"]);
        assert_eq!(
            fields.get_all("x-multi").collect::<Vec<_>>(),
            [&b"one"[..], b"two"]
        );
        assert_eq!(fields.get("x-empty"), Some(&b""[..]));
        assert_eq!(fields.get_str("host"), Some("gw"));
        assert!(!fields.contains("missing"));
    }

    #[test]
    fn spans_outside_the_head_are_left_out() {
        let other = b"Name: value".to_vec();
        let head = b"Host: gw".to_vec();
        let parsed = [httparse::Header {
            name: std::str::from_utf8(&other[..4]).unwrap(),
            value: &other[6..],
        }];
        assert!(spans(&head, &parsed).is_empty());
        let bad = Span {
            name: (0, 4),
            value: (6, 99),
        };
        assert!(HeaderFields::from_spans(Bytes::from(head), vec![bad]).is_empty());
    }

    #[test]
    fn a_compact_copy_keeps_every_field_in_order_and_finds_names_in_any_case() {
        let fields = HeaderFields::from_pairs([
            ("X-Multi", "one"),
            ("Host", "gw"),
            ("x-multi", "two"),
            ("x-empty", ""),
        ]);
        let kept = fields.compact();
        assert_eq!(
            kept.values(b"X-MULTI").collect::<Vec<_>>(),
            [&b"one"[..], b"two"]
        );
        assert_eq!(kept.values(b"x-empty").collect::<Vec<_>>(), [&b""[..]]);
        assert_eq!(kept.values(b"missing").count(), 0);
        assert_eq!(kept.iter().count(), 4);
        let names: Vec<_> = kept.iter().map(|(n, _)| n).collect();
        assert_eq!(names, [&b"X-Multi"[..], b"Host", b"x-multi", b"x-empty"]);
        assert_eq!(kept.head.len(), "X-MultioneHostgwx-multitwox-empty".len());
    }

    #[test]
    fn text_values_are_visible_ascii_only() {
        let fields = HeaderFields::from_pairs([("a", "caf\u{e9}"), ("b", "x\ty z")]);
        assert_eq!(fields.get_str("a"), None);
        assert_eq!(fields.get_str("b"), Some("x\ty z"));
    }
}
