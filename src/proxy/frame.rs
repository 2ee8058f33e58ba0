//! RFC 6455 framing on plain byte slices: parse a frame header, mask and unmask payloads,
//! encode frames into a buffer, and read close payloads.
//!
//! Pure functions with no I/O and no allocation of their own: the relay reads into its buffers,
//! and this module tells it where each frame starts and ends. Everything a peer can send is
//! answered with a [`FrameError`], never a panic.

pub(crate) use crate::masking::apply_mask;

/// A frame's opcode (RFC 6455 §5.2); reserved opcodes are refused while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpCode {
    /// A later fragment of a data message.
    Continuation,
    /// The first (or only) frame of a text message.
    Text,
    /// The first (or only) frame of a binary message.
    Binary,
    /// A close frame.
    Close,
    /// A ping, answered on its own leg.
    Ping,
    /// A pong, dropped.
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong.
    pub(crate) fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// Which end of the connection framegate is on this leg: it decides which frames must be
/// masked (RFC 6455 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// framegate accepted this leg (the client leg): frames arrive masked, leave unmasked.
    Server,
    /// framegate opened this leg (the upstream leg): frames arrive unmasked, leave masked.
    Client,
}

/// A frame that breaks RFC 6455, or one over the size limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    /// A frame header or payload the protocol does not allow.
    #[error("{0}")]
    Protocol(&'static str),
    /// A frame (or the message it belongs to) larger than `max_message_size`.
    #[error("message larger than the limit")]
    TooBig,
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// The FIN bit: last frame of its message.
    pub(crate) fin: bool,
    pub(crate) opcode: OpCode,
    /// The masking key, when the frame is masked.
    pub(crate) mask: Option<[u8; 4]>,
    /// Header length in bytes (2 to 14).
    pub(crate) header_len: usize,
    /// Payload length in bytes.
    pub(crate) payload_len: usize,
    /// RSV1: the first frame of a compressed message (permessage-deflate, RFC 7692 §6).
    pub(crate) compressed: bool,
}

/// RSV1, which permessage-deflate sets on the first frame of a compressed message.
pub(crate) const RSV1: u8 = 0x40;

impl Header {
    /// Header plus payload.
    pub(crate) fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }

    /// Whether the length is written in the fewest bytes, as RFC 6455 §5.2 requires of
    /// senders: such a frame can be relayed byte for byte.
    pub(crate) fn is_minimal(&self) -> bool {
        let length_bytes = match self.payload_len {
            n if n < 126 => 0,
            n if n <= usize::from(u16::MAX) => 2,
            _ => 8,
        };
        let mask_bytes = if self.mask.is_some() { 4 } else { 0 };
        self.header_len == 2 + length_bytes + mask_bytes
    }
}

/// Parses the header at the start of `buf`. `Ok(None)` means more bytes are needed.
///
/// `receiver` is this side's role: a server only accepts masked frames, a client only unmasked
/// ones. A payload over `max_payload` is refused as soon as its length is known, before it is
/// read. `deflate`: the leg agreed permessage-deflate, so RSV1 may start a data message.
pub(crate) fn parse_header(
    buf: &[u8],
    receiver: Role,
    max_payload: usize,
    deflate: bool,
) -> Result<Option<Header>, FrameError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::Protocol("unknown opcode"))?;
    let compressed = b0 & 0x70 != 0;
    if compressed {
        if b0 & 0x30 != 0 || !deflate {
            return Err(FrameError::Protocol(
                "reserved bits set without an extension",
            ));
        }
        if !matches!(opcode, OpCode::Text | OpCode::Binary) {
            return Err(FrameError::Protocol(
                "RSV1 on a control or continuation frame",
            ));
        }
    }
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    match (receiver, masked) {
        (Role::Server, false) => return Err(FrameError::Protocol("unmasked frame from client")),
        (Role::Client, true) => return Err(FrameError::Protocol("masked frame from server")),
        _ => {}
    }
    let Some((len, mut at)) = written_length(buf) else {
        return Ok(None);
    };
    if len >> 63 != 0 {
        return Err(FrameError::Protocol("payload length with the top bit set"));
    }
    if opcode.is_control() {
        if !fin {
            return Err(FrameError::Protocol("fragmented control frame"));
        }
        if len > 125 {
            return Err(FrameError::Protocol("control frame longer than 125 bytes"));
        }
    }
    let payload_len = usize::try_from(len).map_err(|_| FrameError::TooBig)?;
    if payload_len > max_payload && !opcode.is_control() {
        return Err(FrameError::TooBig);
    }
    let mask = if masked {
        let Some(key) = masking_key(buf, at) else {
            return Ok(None);
        };
        at += 4;
        Some(key)
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len: at,
        payload_len,
        compressed,
    }))
}

/// The header of a frame at the start of `buf` that [`parse_header`] has already read and
/// passed, and that `buf` holds whole: read again without its checks (the console's
/// record of a run relayed byte for byte). `None` at the end of `buf`.
pub(crate) fn reread_header(buf: &[u8]) -> Option<Header> {
    let [b0, b1, ..] = *buf else { return None };
    let (payload_len, mut at) = written_length(buf)?;
    let mask = if b1 & 0x80 != 0 {
        at += 4;
        Some(masking_key(buf, at - 4)?)
    } else {
        None
    };
    Some(Header {
        fin: b0 & 0x80 != 0,
        opcode: OpCode::from_bits(b0 & 0x0F)?,
        mask,
        header_len: at,
        payload_len: usize::try_from(payload_len).ok()?,
        compressed: b0 & RSV1 != 0,
    })
}

/// The payload length the header at the start of `buf` writes (unchecked), and where the
/// length ends; `None` until `buf` holds it.
fn written_length(buf: &[u8]) -> Option<(u64, usize)> {
    Some(match *buf.get(1)? & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes(*buf.get(2..4)?.first_chunk()?)),
            4,
        ),
        127 => (u64::from_be_bytes(*buf.get(2..10)?.first_chunk()?), 10),
        small => (u64::from(small), 2),
    })
}

/// The masking key at `at` in `buf`, once `buf` holds it.
fn masking_key(buf: &[u8], at: usize) -> Option<[u8; 4]> {
    buf.get(at..at + 4)?.first_chunk().copied()
}

/// Appends the header of a final (FIN) frame with a payload of `payload_len` bytes. `mask` is
/// `Some` on a client leg, where every frame must be masked.
pub(crate) fn encode_header(
    out: &mut Vec<u8>,
    opcode: OpCode,
    payload_len: usize,
    mask: Option<[u8; 4]>,
) {
    let mut header = [0u8; 14];
    header[0] = 0x80 | opcode.bits();
    let mut len = match payload_len {
        n if n < 126 => {
            header[1] = n as u8;
            2
        }
        n if n <= usize::from(u16::MAX) => {
            header[1] = 126;
            header[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            4
        }
        n => {
            header[1] = 127;
            header[2..10].copy_from_slice(&(n as u64).to_be_bytes());
            10
        }
    };
    if let Some(key) = mask {
        header[1] |= 0x80;
        header[len..len + 4].copy_from_slice(&key);
        len += 4;
    }
    out.extend_from_slice(&header[..len]);
}

/// Appends one whole frame (FIN set) to `out`, masked when `mask` is `Some`.
pub(crate) fn encode(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) {
    out.reserve(14 + payload.len());
    encode_header(out, opcode, payload.len(), mask);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key);
    }
}

/// Appends a close frame with `code` and `reason` (cut to fit the 125-byte control limit, on a
/// character boundary); `None` sends a close frame without a code.
pub(crate) fn encode_close(
    out: &mut Vec<u8>,
    code_and_reason: Option<(u16, &str)>,
    mask: Option<[u8; 4]>,
) {
    let mut payload = [0u8; 125];
    let len = match code_and_reason {
        None => 0,
        Some((code, reason)) => {
            let mut end = reason.len().min(123);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            payload[..2].copy_from_slice(&code.to_be_bytes());
            payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
            2 + end
        }
    };
    encode(out, OpCode::Close, &payload[..len], mask);
}

/// What a received close frame carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClosePayload<'a> {
    /// No status code (reported as 1005).
    Empty,
    /// A status code a peer may send, and its reason.
    Code(u16, &'a str),
    /// A status code no peer may send (RFC 6455 §7.4): answered with 1002.
    Forbidden(u16),
}

/// Reads an unmasked close payload. A one-byte payload or a reason that is not UTF-8 is an error.
pub(crate) fn parse_close(payload: &[u8]) -> Result<ClosePayload<'_>, CloseError> {
    match payload {
        [] => Ok(ClosePayload::Empty),
        [_] => Err(CloseError::Truncated),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let reason = std::str::from_utf8(reason).map_err(|_| CloseError::BadUtf8)?;
            if close_code_allowed(code) {
                Ok(ClosePayload::Code(code, reason))
            } else {
                Ok(ClosePayload::Forbidden(code))
            }
        }
    }
}

/// Why a close payload could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseError {
    /// One byte: half a status code.
    Truncated,
    /// The reason is not UTF-8.
    BadUtf8,
}

/// Codes a peer may put in a close frame: the defined ones except 1004-1006 and 1015, and the
/// ranges for libraries (3000-3999) and applications (4000-4999).
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(buf: &[u8], role: Role) -> Result<Option<Header>, FrameError> {
        parse_header(buf, role, 1 << 20, false)
    }

    #[test]
    fn encoded_frames_parse_back_at_every_length_class() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut out = Vec::new();
                encode(&mut out, OpCode::Binary, &payload, mask);
                let role = if mask.is_some() {
                    Role::Server
                } else {
                    Role::Client
                };
                let h = parse(&out, role).unwrap().unwrap();
                assert_eq!(
                    (h.fin, h.opcode, h.mask, h.payload_len),
                    (true, OpCode::Binary, mask, len)
                );
                assert_eq!(h.frame_len(), out.len());
                let mut body = out[h.header_len..].to_vec();
                if let Some(key) = h.mask {
                    apply_mask(&mut body, key);
                }
                assert_eq!(body, payload);
                // Read again without the checks, it is the same header.
                assert_eq!(reread_header(&out), Some(h));
                // Every strict prefix of the header asks for more bytes.
                for cut in 0..h.header_len {
                    assert_eq!(parse(&out[..cut], role), Ok(None));
                    assert_eq!(reread_header(&out[..cut]), None);
                }
            }
        }
    }

    #[test]
    fn masking_matches_the_rfc_example() {
        // RFC 6455 §5.7: a masked "Hello".
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let h = parse(&frame, Role::Server).unwrap().unwrap();
        let mut body = frame[h.header_len..].to_vec();
        apply_mask(&mut body, h.mask.unwrap());
        assert_eq!(body, b"Hello");
    }

    #[test]
    fn protocol_violations_are_refused() {
        let refused = |buf: &[u8], role| parse(buf, role).unwrap_err();
        assert!(matches!(
            refused(&[0xC1, 0x80, 0, 0, 0, 0], Role::Server),
            FrameError::Protocol(_)
        ));
        assert!(matches!(
            refused(&[0x83, 0x80, 0, 0, 0, 0], Role::Server),
            FrameError::Protocol(_)
        ));
        assert!(matches!(
            refused(&[0x81, 0x00], Role::Server),
            FrameError::Protocol(_)
        ));
        assert!(matches!(
            refused(&[0x81, 0x80, 0, 0, 0, 0], Role::Client),
            FrameError::Protocol(_)
        ));
        assert!(matches!(
            refused(&[0x09, 0x80, 0, 0, 0, 0], Role::Server),
            FrameError::Protocol(_)
        ));
        assert!(matches!(
            refused(&[0x89, 0xFE, 0, 126], Role::Server),
            FrameError::Protocol(_)
        ));
        let mut huge = vec![0x82, 0x7F];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            refused(&huge, Role::Client),
            FrameError::Protocol(_)
        ));
    }

    #[test]
    fn oversized_payloads_are_refused_from_the_header() {
        assert_eq!(
            parse_header(&[0x82, 0x7E, 0x04, 0x01], Role::Client, 1024, false),
            Err(FrameError::TooBig)
        );
        assert!(
            parse_header(&[0x82, 0x7E, 0x04, 0x00], Role::Client, 1024, false)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn rsv1_only_where_deflate_was_agreed() {
        let header = |buf: &[u8], deflate| parse_header(buf, Role::Client, 1024, deflate);
        assert!(header(&[0xC1, 0x00], false).is_err());
        assert!(header(&[0xC1, 0x00], true).unwrap().unwrap().compressed);
        assert!(!header(&[0x81, 0x00], true).unwrap().unwrap().compressed);
        // RSV1 on a continuation or control frame, RSV2 and RSV3: never.
        for bad in [[0x40, 0x00], [0xC9, 0x00], [0xA1, 0x00], [0x91, 0x00]] {
            assert!(matches!(header(&bad, true), Err(FrameError::Protocol(_))));
        }
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close(b""), Ok(ClosePayload::Empty));
        assert_eq!(parse_close(b"\x03"), Err(CloseError::Truncated));
        assert_eq!(
            parse_close(b"\x03\xe8bye"),
            Ok(ClosePayload::Code(1000, "bye"))
        );
        assert_eq!(parse_close(b"\x03\xed"), Ok(ClosePayload::Forbidden(1005)));
        assert_eq!(parse_close(b"\x0f\xa0\xff"), Err(CloseError::BadUtf8));
        let mut out = Vec::new();
        let long = "é".repeat(100);
        encode_close(&mut out, Some((4000, &long)), None);
        let h = parse(&out, Role::Client).unwrap().unwrap();
        assert!(h.payload_len <= 125);
        assert!(matches!(
            parse_close(&out[h.header_len..]),
            Ok(ClosePayload::Code(4000, _))
        ));
    }
}
