//! permessage-deflate (RFC 7692) over a minimal RFC 6455 framing, for the harness's compressing
//! client (`fg-load --deflate`) and echo (`fg-echo --deflate`). tungstenite negotiates no
//! extension and fails every frame with RSV1 set, so these connections are framed here.
//!
//! What is agreed: no context takeover either way. The client offers
//! `client_no_context_takeover; server_no_context_takeover` (what a browser does at the least:
//! Chromium and Firefox offer `client_max_window_bits` and accept either), and the echo answers
//! both whatever the offer (RFC 7692 §7.1.1 lets a server add them). Each message is then
//! compressed with a fresh window, so a compressor and a decompressor can serve any number of
//! connections one message at a time, and an idle connection holds neither. Once their buffers
//! have grown to the largest message, nothing here allocates per message.
//!
//! Only what the benchmark needs: whole messages go out as one frame; fragmented messages are
//! read; ping is answered by the caller; no TLS.

use std::io;

use bytes::{Buf, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The client's offer.
pub const OFFER: &str =
    "permessage-deflate; client_no_context_takeover; server_no_context_takeover";

/// Opcodes.
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PONG: u8 = 0xA;

/// What a sync flush ends with: removed by the sender, put back by the receiver (§7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The longest HTTP head read in a handshake.
const MAX_HEAD: usize = 16 * 1024;

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// A raw DEFLATE compressor with its output buffer.
pub struct Deflater {
    compress: Compress,
    out: Vec<u8>,
}

impl Deflater {
    /// zlib's default level (6), as browsers use; a window of `window_bits` (9 to 15).
    pub fn new(window_bits: u8) -> Self {
        Self {
            compress: Compress::new_with_window_bits(
                Compression::default(),
                false,
                window_bits.clamp(9, 15),
            ),
            out: Vec::new(),
        }
    }

    /// One message compressed with a fresh window, without the sync tail (§7.2.1).
    pub fn deflate(&mut self, payload: &[u8]) -> &[u8] {
        let out = &mut self.out;
        out.clear();
        out.reserve(payload.len() / 2 + 64);
        let mut at = 0;
        loop {
            let before = self.compress.total_in();
            // Fails only on a misuse of stream end, which a sync flush never makes.
            let _ = self
                .compress
                .compress_vec(&payload[at..], out, FlushCompress::Sync);
            at += (self.compress.total_in() - before) as usize;
            // Done when all input is in and the flush fitted (room was left).
            if at == payload.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(4096));
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        if out.is_empty() {
            out.push(0);
        }
        self.compress.reset();
        out
    }
}

/// A raw DEFLATE decompressor (a 15-bit window reads every smaller one) with its output buffer.
pub struct Inflater {
    decompress: Decompress,
    out: Vec<u8>,
}

impl Default for Inflater {
    fn default() -> Self {
        Self {
            decompress: Decompress::new(false),
            out: Vec::new(),
        }
    }
}

impl Inflater {
    /// One message inflated, at most `limit` bytes. `peer_resets`: the peer starts each
    /// message with a fresh window, so this one is reset after it.
    pub fn inflate(
        &mut self,
        payload: &[u8],
        peer_resets: bool,
        limit: usize,
    ) -> io::Result<&[u8]> {
        let (d, out) = (&mut self.decompress, &mut self.out);
        out.clear();
        'parts: for part in [payload, &TAIL[..]] {
            let mut at = 0;
            loop {
                if out.len() > limit {
                    return Err(invalid("a message inflates past the limit"));
                }
                if out.len() == out.capacity() {
                    out.reserve(out.capacity().max(4096));
                }
                let (before_in, before_out) = (d.total_in(), out.len());
                let status = d
                    .decompress_vec(&part[at..], out, FlushDecompress::Sync)
                    .map_err(|e| invalid(format!("inflate: {e}")))?;
                let consumed = (d.total_in() - before_in) as usize;
                at += consumed;
                if status == Status::StreamEnd {
                    d.reset(false);
                    break 'parts;
                }
                let room = out.len() < out.capacity();
                if at == part.len() && room {
                    break;
                }
                if consumed == 0 && out.len() == before_out && room {
                    return Err(invalid("inflate: data cut short"));
                }
            }
        }
        if peer_resets {
            self.decompress.reset(false);
        }
        if self.out.len() > limit {
            return Err(invalid("a message inflates past the limit"));
        }
        Ok(&self.out)
    }
}

/// Appends one frame holding a whole message (`mask`: the client's masking key).
pub fn put_frame(out: &mut Vec<u8>, opcode: u8, rsv1: bool, payload: &[u8], mask: Option<[u8; 4]>) {
    out.push(0x80 | if rsv1 { 0x40 } else { 0 } | opcode);
    let masked = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(masked | n as u8),
        n if n <= 0xffff => {
            out.push(masked | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(masked | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let start = out.len();
    if let Some(key) = mask {
        out.extend_from_slice(&key);
        out.extend_from_slice(payload);
        apply_mask(&mut out[start + 4..], key);
    } else {
        out.extend_from_slice(payload);
    }
}

/// XORs `buf` with the masking key, eight bytes at a time.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so at key byte 0.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// What [`Reader::drain`] found.
pub enum Event<'a> {
    Message {
        opcode: u8,
        compressed: bool,
        payload: &'a [u8],
    },
    Ping(&'a [u8]),
    Close(&'a [u8]),
}

/// Frames as they arrive: `buf` is filled by the caller's reads.
pub struct Reader {
    pub buf: BytesMut,
    /// A fragmented message so far, and its opcode and RSV1 (from its first frame).
    fragments: Vec<u8>,
    started: Option<(u8, bool)>,
    max: usize,
}

impl Reader {
    pub fn new(capacity: usize, max_message: usize) -> Self {
        Self {
            buf: BytesMut::with_capacity(capacity),
            fragments: Vec::new(),
            started: None,
            max: max_message,
        }
    }

    /// Calls `on_event` for each whole frame in `buf` (unmasking a client's), then drops
    /// those frames from `buf`.
    pub fn drain(
        &mut self,
        mut on_event: impl FnMut(Event<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut at = 0;
        loop {
            let b = &self.buf[at..];
            if b.len() < 2 {
                break;
            }
            if b[0] & 0x30 != 0 {
                return Err(invalid("RSV2 or RSV3 set"));
            }
            let (fin, rsv1, opcode) = (b[0] & 0x80 != 0, b[0] & 0x40 != 0, b[0] & 0x0f);
            let (len, mut head) = match b[1] & 0x7f {
                126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
                127 if b.len() >= 10 => (
                    u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")),
                    10,
                ),
                126 | 127 => break,
                n => (u64::from(n), 2),
            };
            let masked = b[1] & 0x80 != 0;
            if masked {
                head += 4;
            }
            if len > self.max as u64 {
                return Err(invalid(format!("a frame of {len} bytes")));
            }
            let len = len as usize;
            if b.len() < head + len {
                break;
            }
            let (start, end) = (at + head, at + head + len);
            if masked {
                let key: [u8; 4] = self.buf[start - 4..start].try_into().expect("4 bytes");
                apply_mask(&mut self.buf[start..end], key);
            }
            let payload = &self.buf[start..end];
            match opcode {
                TEXT | BINARY if fin => on_event(Event::Message {
                    opcode,
                    compressed: rsv1,
                    payload,
                })?,
                TEXT | BINARY => {
                    self.fragments.clear();
                    self.fragments.extend_from_slice(payload);
                    self.started = Some((opcode, rsv1));
                }
                0x0 => {
                    let Some((opcode, compressed)) = self.started else {
                        return Err(invalid("a continuation frame without a message"));
                    };
                    if self.fragments.len() + payload.len() > self.max {
                        return Err(invalid("a message too long"));
                    }
                    self.fragments.extend_from_slice(payload);
                    if fin {
                        self.started = None;
                        on_event(Event::Message {
                            opcode,
                            compressed,
                            payload: &self.fragments,
                        })?;
                    }
                }
                CLOSE => on_event(Event::Close(payload))?,
                0x9 => on_event(Event::Ping(payload))?,
                PONG => {}
                other => return Err(invalid(format!("opcode {other}"))),
            }
            at = end;
        }
        self.buf.advance(at);
        Ok(())
    }
}

/// Reads an HTTP head into `buf`; returns it and drops it from `buf`, leaving what came after.
async fn read_head(stream: &mut TcpStream, buf: &mut BytesMut) -> io::Result<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.advance(end + 4);
            return Ok(head);
        }
        if buf.len() > MAX_HEAD {
            return Err(invalid("an HTTP head too long"));
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Every value of header `name` (lower case) in `head`, in order.
fn header_values<'a>(head: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    head.lines().skip(1).filter_map(move |line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The parameters of one extension element, lower-cased, or `None` if it is not
/// permessage-deflate.
fn deflate_params(element: &str) -> Option<Vec<(String, Option<String>)>> {
    let mut parts = element.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    Some(
        parts
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((n, v)) => (
                    n.trim().to_ascii_lowercase(),
                    Some(v.trim().trim_matches('"').to_owned()),
                ),
                None => (p.to_ascii_lowercase(), None),
            })
            .collect(),
    )
}

/// What the client's handshake agreed.
#[derive(Clone, Copy, Debug)]
pub struct Agreed {
    /// The server accepted permessage-deflate.
    pub compressed: bool,
    /// It starts each message with a fresh window (`server_no_context_takeover`).
    pub peer_resets: bool,
}

/// The client's opening handshake on `stream` for `host` and `path` (with `headers`, each
/// "name: value"), offering [`OFFER`] when `offer`. What arrived after the 101 stays in `buf`.
pub async fn connect(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    host: &str,
    path: &str,
    headers: &[String],
    offer: bool,
) -> io::Result<Agreed> {
    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if offer {
        request.push_str(&format!("Sec-WebSocket-Extensions: {OFFER}\r\n"));
    }
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let head = read_head(stream, buf).await?;
    let status = head.lines().next().unwrap_or("");
    if status.split(' ').nth(1) != Some("101") {
        return Err(invalid(format!("the handshake was answered `{status}`")));
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    if !header_values(&head, "sec-websocket-accept").any(|v| v == accept) {
        return Err(invalid("a wrong Sec-WebSocket-Accept"));
    }
    let answer = header_values(&head, "sec-websocket-extensions")
        .collect::<Vec<_>>()
        .join(", ");
    if answer.is_empty() {
        return Ok(Agreed {
            compressed: false,
            peer_resets: false,
        });
    }
    let params = match deflate_params(&answer) {
        Some(params) if offer && !answer.contains(',') => params,
        _ => return Err(invalid(format!("an extension not offered: {answer}"))),
    };
    for (name, _) in &params {
        if !matches!(
            name.as_str(),
            "server_no_context_takeover" | "client_no_context_takeover" | "server_max_window_bits"
        ) {
            return Err(invalid(format!("a parameter not offered: {name}")));
        }
    }
    Ok(Agreed {
        compressed: true,
        peer_resets: params
            .iter()
            .any(|(n, _)| n == "server_no_context_takeover"),
    })
}

/// The server's opening handshake: reads the request from `stream` (what came after it stays
/// in `buf`) and answers 101. With `deflate`, the first permessage-deflate offer it can honour
/// is accepted, with no context takeover either way; returns the window the server may
/// compress with (the offer's `server_max_window_bits`, else 15), or `None` when no offer was
/// accepted.
pub async fn accept(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    deflate: bool,
) -> io::Result<Option<u8>> {
    let head = read_head(stream, buf).await?;
    let key = header_values(&head, "sec-websocket-key")
        .next()
        .ok_or_else(|| invalid("no Sec-WebSocket-Key"))?;
    let offers = header_values(&head, "sec-websocket-extensions")
        .collect::<Vec<_>>()
        .join(", ");
    let window = if deflate {
        offers.split(',').find_map(|element| {
            let mut window = None;
            for (name, value) in deflate_params(element)? {
                match (name.as_str(), value) {
                    ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
                    ("client_max_window_bits", _) => {}
                    // zlib cannot compress raw DEFLATE with an 8-bit window.
                    ("server_max_window_bits", Some(v)) => match v.parse::<u8>() {
                        Ok(bits @ 9..=15) => window = Some(bits),
                        _ => return None,
                    },
                    _ => return None,
                }
            }
            Some(window)
        })
    } else {
        None
    };
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes())
    );
    if let Some(window) = window {
        response.push_str("Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover");
        if let Some(bits) = window {
            response.push_str(&format!("; server_max_window_bits={bits}"));
        }
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    stream.write_all(response.as_bytes()).await?;
    Ok(window.map(|w| w.unwrap_or(15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let (mut d, mut i) = (Deflater::new(15), Inflater::default());
        let big: Vec<u8> = (0..200_000u32).map(|n| (n % 251) as u8).collect();
        for m in [&b"hello"[..], b"", &big, b"hello hello hello"] {
            let wire = d.deflate(m).to_vec();
            assert_eq!(i.inflate(&wire, true, 1 << 20).unwrap(), m);
        }
        // RFC 7692 §7.2.3.1: "Hello".
        assert_eq!(
            d.deflate(b"Hello"),
            [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]
        );
        assert!(i.inflate(d.deflate(&big), true, 1000).is_err());
    }

    #[test]
    fn frames_round_trip_masked_and_fragmented() {
        let mut out = Vec::new();
        let long = vec![7u8; 70_000];
        put_frame(&mut out, TEXT, true, b"abcdefghijk", Some([1, 2, 3, 4]));
        put_frame(&mut out, BINARY, false, &long, None);
        // A message in two fragments.
        out.extend_from_slice(&[0x01, 0x82, 0, 0, 0, 0, b'a', b'b', 0x80, 0x01, b'c']);
        let mut r = Reader::new(16, 1 << 20);
        r.buf.extend_from_slice(&out);
        let mut seen = Vec::new();
        r.drain(|e| {
            if let Event::Message {
                opcode,
                compressed,
                payload,
            } = e
            {
                seen.push((opcode, compressed, payload.to_vec()));
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                (TEXT, true, b"abcdefghijk".to_vec()),
                (BINARY, false, long),
                (TEXT, false, b"abc".to_vec())
            ]
        );
        assert!(r.buf.is_empty());
    }

    #[test]
    fn offers_are_read() {
        let p = deflate_params(
            "permessage-deflate; Server_Max_Window_Bits=\"10\"; client_max_window_bits",
        )
        .unwrap();
        assert_eq!(p[0], ("server_max_window_bits".into(), Some("10".into())));
        assert!(deflate_params("x-webkit-deflate-frame").is_none());
    }
}
