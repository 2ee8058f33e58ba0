//! Reading the upstream's answer to the upgrade request straight off the socket: the response
//! head (interim 1xx answers skipped), then either the bytes already read past a 101, or the
//! body of a refusal, decoded per `Content-Length`, `chunked` or the end of the connection and
//! kept up to [`MAX_REFUSAL_BODY`].
//!
//! The decoding is done by plain functions over bytes, so that every way a response can be cut
//! across reads is tested without sockets; [`read`] only feeds them what the socket gives.

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{Refusal, UpstreamError};
use crate::client_http::{has_empty_line, parse_length};
use crate::header_fields::{self, HeaderFields, Span};

/// Bodies of refused handshakes are relayed up to this size.
pub(super) const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// A response head may be this long; a longer one is an error, so an upstream cannot make the
/// gateway buffer without bound.
const MAX_HEAD: usize = 64 * 1024;

/// As many headers as hyper accepts by default.
const MAX_HEADERS: usize = 100;

/// What the socket is asked for at a time: a 101 head is a few hundred bytes, and a longer
/// one grows the buffer. Just under 1 KiB, for the reason given at the client's head buffer
/// (`client_http::READ_SIZE`).
const READ_SIZE: usize = 1000;

/// What is wrong with an upstream's answer to the upgrade request.
#[derive(Debug, thiserror::Error)]
pub enum BadResponse {
    /// The connection ended before the response head did.
    #[error("connection closed after {read} bytes, before the end of the response head")]
    Closed {
        /// Bytes of the unfinished head that had arrived.
        read: usize,
    },
    /// The response head is longer than the gateway will buffer.
    #[error("response head longer than {} KiB", MAX_HEAD / 1024)]
    TooLarge,
    /// The response head is not HTTP/1.x (or has more headers than accepted).
    #[error("malformed response head: {0}")]
    Malformed(httparse::Error),
    /// A refusal's `Content-Length` is not a number, or its values disagree.
    #[error("invalid Content-Length")]
    ContentLength,
}

/// The upstream's final answer to the upgrade request.
#[derive(Debug)]
pub(crate) enum Answer {
    /// 101: its headers, and the bytes read past its head (the start of the first frames).
    Switching { headers: HeaderFields, rest: Bytes },
    /// Any other final status, with its body up to [`MAX_REFUSAL_BODY`].
    Refused(Refusal),
}

/// Reads the answer to the upgrade request from `io`.
pub(crate) async fn read<IO>(io: &mut IO) -> Result<Answer, UpstreamError>
where
    IO: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let (status, headers) = loop {
        let Head { status, spans, len } = read_head(io, &mut buf).await?;
        // An HTTP client ignores interim answers such as 100 Continue; the final one follows.
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(len);
            continue;
        }
        // The head's bytes, which its fields point into; the buffer keeps what came after.
        let head = buf.split_to(len).freeze();
        break (status, HeaderFields::from_spans(head, spans));
    };
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let rest = if buf.is_empty() {
            Bytes::new()
        } else {
            buf.freeze()
        };
        return Ok(Answer::Switching { headers, rest });
    }
    let body = read_body(io, buf, framing(status, &headers)?).await;
    Ok(Answer::Refused(Refusal {
        status,
        headers,
        body,
    }))
}

/// A parsed response head.
#[derive(Debug)]
struct Head {
    status: StatusCode,
    /// Where its fields are at the start of the buffer.
    spans: Vec<Span>,
    /// Bytes the head takes at the start of the buffer.
    len: usize,
}

/// Reads until `buf` starts with a whole response head.
async fn read_head<IO>(io: &mut IO, buf: &mut BytesMut) -> Result<Head, UpstreamError>
where
    IO: AsyncRead + Unpin,
{
    // Parsed on the first bytes (so that garbage fails at once), then only once an empty line
    // has come: parsing again on every read would be quadratic in a head that trickles in.
    let mut checked: usize = 0;
    loop {
        // Empty lines before the status line are ignored (RFC 9112 §2.2; httparse skips them
        // too). They are dropped as they come, so that a flood of them is neither kept nor
        // taken for the head's end and parsed again on every read.
        let lead = buf
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        if lead > 0 {
            buf.advance(lead);
            checked = checked.saturating_sub(lead);
        }
        let fresh = &buf[checked.saturating_sub(2)..];
        if (checked == 0 && !buf.is_empty()) || has_empty_line(fresh) {
            if let Some(head) = parse_head(buf)? {
                return Ok(head);
            }
        }
        if buf.len() > MAX_HEAD {
            return Err(BadResponse::TooLarge.into());
        }
        checked = buf.len();
        if fill(io, buf).await.map_err(UpstreamError::Exchange)? == 0 {
            return Err(BadResponse::Closed { read: buf.len() }.into());
        }
    }
}

/// Reads what the socket has into `buf`, growing it when it is full.
async fn fill<IO>(io: &mut IO, buf: &mut BytesMut) -> std::io::Result<usize>
where
    IO: AsyncRead + Unpin,
{
    if buf.capacity() == buf.len() {
        buf.reserve(READ_SIZE);
    }
    io.read_buf(buf).await
}

/// Parses the head at the start of `buf`; `None` while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, BadResponse> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
        Ok(_) => return Err(BadResponse::TooLarge),
        Err(e) => return Err(BadResponse::Malformed(e)),
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(BadResponse::Malformed(httparse::Error::Status))?;
    Ok(Some(Head {
        status,
        spans: header_fields::spans(buf, response.headers),
        len,
    }))
}

/// How a refusal's body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked(Chunked),
    /// When the upstream closes the connection.
    UntilEof,
}

fn framing(status: StatusCode, headers: &HeaderFields) -> Result<Framing, BadResponse> {
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Length(0));
    }
    let mut codings = headers
        .get_all("transfer-encoding")
        .flat_map(|v| v.split(|b| *b == b','))
        .peekable();
    if codings.peek().is_some() {
        // Only a final `chunked` delimits the body; any other coding runs to the end.
        let last = codings.last().unwrap_or_default().trim_ascii();
        return Ok(if last.eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked(Chunked::new())
        } else {
            Framing::UntilEof
        });
    }
    let mut length = None;
    for value in headers.get_all("content-length") {
        for part in value.split(|b| *b == b',') {
            let n = parse_length(part.trim_ascii()).ok_or(BadResponse::ContentLength)?;
            if length.replace(n).is_some_and(|prior| prior != n) {
                return Err(BadResponse::ContentLength);
            }
        }
    }
    Ok(length.map_or(Framing::UntilEof, Framing::Length))
}

/// Reads a refusal's body, starting with the bytes already in `buf`. An upstream that hangs up
/// early or breaks the chunked coding gets its body relayed as far as it went: the refusal is
/// what matters.
async fn read_body<IO>(io: &mut IO, mut buf: BytesMut, framing: Framing) -> Bytes
where
    IO: AsyncRead + Unpin,
{
    let mut body = Body::new(framing);
    let mut done = body.feed(&buf);
    while !done {
        buf.clear();
        match fill(io, &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => done = body.feed(&buf),
        }
    }
    body.data.freeze()
}

/// A refusal's body as it arrives.
struct Body {
    framing: Framing,
    data: BytesMut,
}

impl Body {
    fn new(framing: Framing) -> Self {
        Body {
            framing,
            data: BytesMut::new(),
        }
    }

    /// Takes the next bytes off the socket; true once the body has ended or filled the cap.
    fn feed(&mut self, input: &[u8]) -> bool {
        let ended = match &mut self.framing {
            Framing::Length(left) => {
                let n = input
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                keep(&mut self.data, &input[..n]);
                *left -= n as u64;
                *left == 0
            }
            Framing::Chunked(chunked) => {
                chunked.feed(input, &mut self.data).is_err() || chunked.is_done()
            }
            Framing::UntilEof => {
                keep(&mut self.data, input);
                false
            }
        };
        ended || self.data.len() >= MAX_REFUSAL_BODY
    }
}

/// Appends as much of `bytes` as fits under [`MAX_REFUSAL_BODY`].
fn keep(data: &mut BytesMut, bytes: &[u8]) {
    let room = MAX_REFUSAL_BODY.saturating_sub(data.len());
    data.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

/// The chunked transfer coding (RFC 9112 §7.1), decoded a byte range at a time so that any
/// split across reads is fine. Extensions and trailers are skipped: nothing relays them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// In a chunk's hex size, `digits` of them so far.
    Size { size: u64, digits: u8 },
    /// After the size: an extension or the CR, up to the LF.
    SizeLine { size: u64 },
    /// In a chunk's data.
    Data { left: u64 },
    /// The CRLF after a chunk's data; `cr` once its CR has come.
    DataEnd { cr: bool },
    /// The last chunk has come (the trailers are not read).
    Done,
}

/// The chunked coding is broken.
#[derive(Debug, PartialEq, Eq)]
struct BadChunk;

impl Chunked {
    fn new() -> Self {
        Chunked::Size { size: 0, digits: 0 }
    }

    fn is_done(&self) -> bool {
        *self == Chunked::Done
    }

    /// Decodes `input`, appending chunk data to `out` (up to the cap).
    fn feed(&mut self, mut input: &[u8], out: &mut BytesMut) -> Result<(), BadChunk> {
        while let Some(&byte) = input.first() {
            if let Chunked::Data { left } = self {
                let n = input
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                keep(out, &input[..n]);
                input = &input[n..];
                *left -= n as u64;
                if *left == 0 {
                    *self = Chunked::DataEnd { cr: false };
                }
                continue;
            }
            *self = self.step(byte)?;
            input = &input[1..];
            if self.is_done() {
                break;
            }
        }
        Ok(())
    }

    /// The state after one byte outside chunk data.
    fn step(self, byte: u8) -> Result<Chunked, BadChunk> {
        Ok(match self {
            Chunked::Size { size, digits } => match (byte as char).to_digit(16) {
                // 16 hex digits fill a u64, so one more would overflow.
                Some(_) if digits == 16 => return Err(BadChunk),
                Some(d) => Chunked::Size {
                    size: size << 4 | u64::from(d),
                    digits: digits + 1,
                },
                None if digits == 0 => return Err(BadChunk),
                None if byte == b'\n' => Chunked::after_size(size),
                None if matches!(byte, b'\r' | b';' | b' ' | b'\t') => Chunked::SizeLine { size },
                None => return Err(BadChunk),
            },
            Chunked::SizeLine { size } if byte == b'\n' => Chunked::after_size(size),
            Chunked::SizeLine { size } => Chunked::SizeLine { size },
            Chunked::DataEnd { cr: false } if byte == b'\r' => Chunked::DataEnd { cr: true },
            Chunked::DataEnd { .. } if byte == b'\n' => Chunked::new(),
            Chunked::DataEnd { .. } => return Err(BadChunk),
            Chunked::Data { .. } | Chunked::Done => self,
        })
    }

    fn after_size(size: u64) -> Chunked {
        if size == 0 {
            Chunked::Done
        } else {
            Chunked::Data { left: size }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A socket that hands out the given reads one by one, then the end of the stream.
    struct Reads(VecDeque<Vec<u8>>);

    impl Reads {
        fn new(reads: &[&[u8]]) -> Self {
            Reads(reads.iter().map(|r| r.to_vec()).collect())
        }

        /// `bytes` one byte per read: every possible split.
        fn bytewise(bytes: &[u8]) -> Self {
            Reads(bytes.iter().map(|b| vec![*b]).collect())
        }
    }

    impl AsyncRead for Reads {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some(mut read) = self.0.pop_front() {
                let n = read.len().min(buf.remaining());
                buf.put_slice(&read[..n]);
                if n < read.len() {
                    self.0.push_front(read.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    async fn answer(mut reads: Reads) -> Result<Answer, UpstreamError> {
        read(&mut reads).await
    }

    async fn refusal(reads: Reads) -> Refusal {
        match answer(reads).await {
            Ok(Answer::Refused(refusal)) => refusal,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    async fn bad(reads: Reads) -> BadResponse {
        match answer(reads).await {
            Err(UpstreamError::BadResponse(bad)) => bad,
            other => panic!("expected a bad response, got {other:?}"),
        }
    }

    const SWITCHING: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

    /// Empty lines before the status line are skipped, and a flood of them, a byte per read,
    /// is dropped as it comes (it was kept and parsed again on every read: quadratic, found by
    /// the fuzzer's time bound).
    #[tokio::test]
    async fn empty_lines_before_the_status_line_are_dropped_as_they_come() {
        let mut bytes = b"\r\n\n".to_vec();
        bytes.extend_from_slice(SWITCHING);
        assert!(matches!(
            answer(Reads::bytewise(&bytes)).await,
            Ok(Answer::Switching { .. })
        ));
        let flood = vec![b'\n'; 160 * 1024];
        // Nothing is kept of them: the end of the stream finds an empty buffer.
        let outcome = answer(Reads::bytewise(&flood)).await;
        assert!(
            matches!(
                outcome,
                Err(UpstreamError::BadResponse(BadResponse::Closed { read: 0 }))
            ),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn a_head_split_at_every_byte_is_parsed() {
        let mut bytes = SWITCHING.to_vec();
        bytes.extend_from_slice(b"\x81\x02hi");
        match answer(Reads::bytewise(&bytes)).await {
            Ok(Answer::Switching { headers, rest }) => {
                assert_eq!(
                    headers.get_str("sec-websocket-accept"),
                    Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                );
                // One byte per read: the head ends the read, the frame is still on the socket.
                assert!(rest.is_empty());
            }
            other => panic!("expected 101, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn bytes_after_a_101_are_handed_back() {
        let mut bytes = SWITCHING.to_vec();
        bytes.extend_from_slice(b"\x81\x02hi");
        match answer(Reads::new(&[&bytes])).await {
            Ok(Answer::Switching { rest, .. }) => assert_eq!(&rest[..], b"\x81\x02hi"),
            other => panic!("expected 101, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn interim_answers_are_skipped() {
        let reads = Reads::new(&[
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
            SWITCHING,
        ]);
        match answer(reads).await {
            Ok(Answer::Switching { headers, .. }) => assert!(headers.get("link").is_none()),
            other => panic!("expected 101, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_content_length_body_is_read_to_its_length() {
        let r = refusal(Reads::new(&[
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 11\r\nX-Reason: no\r\n\r\nhello",
            b" world and more",
        ]))
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(r.headers.get_str("x-reason"), Some("no"));
        assert_eq!(&r.body[..], b"hello world");
    }

    #[tokio::test]
    async fn a_chunked_body_split_anywhere_is_decoded() {
        let bytes = b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;note=x\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: t\r\n\r\nnext";
        let r = refusal(Reads::bytewise(bytes)).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(&r.body[..], b"hello world");
        let r = refusal(Reads::new(&[&bytes[..70], &bytes[70..76], &bytes[76..]])).await;
        assert_eq!(&r.body[..], b"hello world");
    }

    #[tokio::test]
    async fn a_broken_chunked_body_is_relayed_as_far_as_it_went() {
        let r = refusal(Reads::new(&[
            b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX6\r\n world\r\n",
        ]))
        .await;
        assert_eq!(&r.body[..], b"hello");
    }

    #[tokio::test]
    async fn a_body_longer_than_the_cap_is_truncated() {
        let long = vec![b'x'; MAX_REFUSAL_BODY + 5000];
        let by_length = format!(
            "HTTP/1.1 503 Busy\r\nContent-Length: {}\r\n\r\n",
            long.len()
        );
        let chunked = format!(
            "HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            long.len()
        );
        let to_eof = "HTTP/1.1 503 Busy\r\n\r\n";
        for head in [&by_length, &chunked, to_eof] {
            let r = refusal(Reads::new(&[head.as_bytes(), &long, &long])).await;
            assert_eq!(r.body.len(), MAX_REFUSAL_BODY, "{head}");
        }
    }

    #[tokio::test]
    async fn without_a_length_the_body_runs_to_the_end_of_the_connection() {
        let r = refusal(Reads::new(&[
            b"HTTP/1.0 404 Not Found\r\n\r\nno",
            b" such",
            b" thing",
        ]))
        .await;
        assert_eq!(&r.body[..], b"no such thing");
        let r = refusal(Reads::new(&[
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello",
        ]))
        .await;
        assert_eq!(&r.body[..], b"5\r\nhello");
    }

    #[tokio::test]
    async fn a_body_cut_short_is_relayed_as_far_as_it_went() {
        let r = refusal(Reads::new(&[
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\nhel",
        ]))
        .await;
        assert_eq!(&r.body[..], b"hel");
    }

    #[tokio::test]
    async fn no_content_has_no_body() {
        let r = refusal(Reads::new(&[
            b"HTTP/1.1 204 No Content\r\n\r\ntrailing junk",
        ]))
        .await;
        assert!(r.body.is_empty());
    }

    #[tokio::test]
    async fn a_malformed_status_line_is_an_error() {
        for garbage in [
            &b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..],
            b"HTTP/1.1 abc Bad\r\n\r\n",
            b"HTTP/2 200\r\n\r\n",
        ] {
            assert!(
                matches!(bad(Reads::new(&[garbage])).await, BadResponse::Malformed(_)),
                "{}",
                String::from_utf8_lossy(garbage)
            );
        }
    }

    #[tokio::test]
    async fn a_bad_content_length_is_an_error() {
        for length in ["abc", "-1", "5, 6", ""] {
            let head = format!("HTTP/1.1 403 Forbidden\r\nContent-Length: {length}\r\n\r\n");
            assert!(
                matches!(
                    bad(Reads::new(&[head.as_bytes()])).await,
                    BadResponse::ContentLength
                ),
                "{length:?}"
            );
        }
        let r = refusal(Reads::new(&[
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2, 2\r\n\r\nok",
        ]))
        .await;
        assert_eq!(&r.body[..], b"ok");
    }

    #[tokio::test]
    async fn a_head_cut_short_is_an_error() {
        assert!(matches!(
            bad(Reads::new(&[])).await,
            BadResponse::Closed { read: 0 }
        ));
        assert!(matches!(
            bad(Reads::new(&[b"HTTP/1.1 101 Switching"])).await,
            BadResponse::Closed { read: 22 }
        ));
    }

    #[tokio::test]
    async fn a_head_over_the_limit_is_an_error() {
        let filler = format!("X-Filler: {}\r\n", "f".repeat(1000));
        let mut head = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
        while head.len() <= MAX_HEAD {
            head.extend_from_slice(filler.as_bytes());
        }
        assert!(matches!(
            bad(Reads::new(&[&head])).await,
            BadResponse::TooLarge
        ));
    }

    #[test]
    fn chunk_sizes_that_overflow_are_refused() {
        let mut chunked = Chunked::new();
        assert_eq!(
            chunked.feed(b"10000000000000000\r\n", &mut BytesMut::new()),
            Err(BadChunk)
        );
    }
}
