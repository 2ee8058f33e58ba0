//! [`Data`]: one whole data message as the hooks see it and send it, text or binary.
//!
//! It owns one invariant: the payload of a text message is UTF-8. Every way to make one checks
//! it (with simdutf8, several times faster than std's check on the relayed sizes) or starts
//! from a `str`, so the proxy can write a text message out without checking it again, and a
//! message read from a socket is checked once, where it is read. Nothing here touches a socket.

use bytes::Bytes;

/// One whole data message: text (UTF-8) or binary, its payload shared, never copied here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    text: bool,
    payload: Bytes,
}

impl Data {
    /// A text message, if `payload` is UTF-8.
    pub fn checked_text(payload: Bytes) -> Option<Data> {
        is_utf8(&payload).then_some(Data {
            text: true,
            payload,
        })
    }

    /// A text message.
    pub fn text(text: impl Into<String>) -> Data {
        Data {
            text: true,
            payload: Bytes::from(text.into()),
        }
    }

    /// A binary message.
    pub fn binary(payload: impl Into<Bytes>) -> Data {
        Data {
            text: false,
            payload: payload.into(),
        }
    }

    /// Text when `payload` is UTF-8, binary otherwise: how a policy's string is sent.
    pub fn text_or_binary(payload: Bytes) -> Data {
        Data {
            text: is_utf8(&payload),
            payload,
        }
    }

    /// Whether it is a text message.
    pub fn is_text(&self) -> bool {
        self.text
    }

    /// The payload: UTF-8 for a text message.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        self.payload.len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }

    /// A text message's text; `None` for a binary message.
    pub fn as_text(&self) -> Option<&str> {
        if !self.text {
            return None;
        }
        // Checked when it was made; checked again here because only `unsafe` code could skip
        // it, and the crate has none.
        simdutf8::basic::from_utf8(&self.payload).ok()
    }
}

/// Whether `bytes` are UTF-8: simdutf8's check, with SIMD chosen at run time (several times
/// faster than std's on the relayed sizes). The proxy checks the text it relays byte for byte
/// with it too.
pub fn is_utf8(bytes: &[u8]) -> bool {
    simdutf8::basic::from_utf8(bytes).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_utf8_or_not_made() {
        assert!(Data::checked_text(Bytes::from_static(b"caf\xc3\xa9")).is_some());
        assert_eq!(Data::checked_text(Bytes::from_static(b"caf\xc3")), None);
        assert_eq!(Data::text("hi").as_text(), Some("hi"));
        assert_eq!(Data::binary(Bytes::from_static(b"hi")).as_text(), None);
        assert!(Data::text_or_binary(Bytes::from_static(b"hi")).is_text());
        assert!(!Data::text_or_binary(Bytes::from_static(b"\xff")).is_text());
    }
}
