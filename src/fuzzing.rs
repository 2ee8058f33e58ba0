//! Entry points for the fuzz harness (`tests/fuzz.rs`): thin wrappers that reach the
//! crate-internal parsers from a test binary. Not an API: hidden from the docs, and free to
//! change with the parsers.
//!
//! Each wrapper runs the parser the way the gateway does and then touches what the gateway
//! reads of the result, so that a panic anywhere on that path shows up in the harness.

use bytes::BytesMut;
use tokio::io::AsyncRead;

use crate::proxy::frame::{self, ClosePayload, OpCode, Role};

/// Reads one request head from `io` as the listener does (same loop, limits and checks), with
/// a 10 s header timeout, and returns a one-line description of the outcome.
pub async fn read_request<IO: AsyncRead + Unpin>(io: &mut IO) -> String {
    let mut buf = BytesMut::new();
    let timeout = std::time::Duration::from_secs(10);
    let read =
        crate::client_http::read_request(io, &mut buf, None, timeout, std::future::pending::<()>());
    match read.await {
        Ok(Some((head, rest))) => format!(
            "{} {:?} path={:?} query={:?} host={:?} keep_alive={} body={} fields={} rest={}",
            head.method,
            head.version,
            head.path(),
            head.query(),
            head.host(),
            head.keep_alive(),
            head.has_body,
            head.headers.iter().count(),
            rest.len(),
        ),
        Ok(None) => "closed".to_owned(),
        Err(e) => format!("error: {e}"),
    }
}

/// Reads an upstream's answer to the upgrade request from `io` as the upstream leg does, and
/// returns a one-line description of the outcome.
pub async fn read_upstream_response<IO: AsyncRead + Unpin>(io: &mut IO) -> String {
    match crate::upstream::response::read(io).await {
        Ok(answer) => format!("{answer:?}"),
        Err(e) => format!("error: {e}"),
    }
}

/// Parses `bytes` as a run of frames arriving at a server (`server = true`: the client leg)
/// or at a client (the upstream leg), with payloads up to `max_payload`: every header, every
/// unmasked payload, every close payload. Each frame that parses is encoded again and must
/// parse back to the same header and payload. Returns how many frames parsed, or the error
/// that ended the run (`Ok` also when the bytes end inside a frame).
pub fn parse_frames(bytes: &[u8], server: bool, max_payload: usize) -> Result<usize, String> {
    let role = if server { Role::Server } else { Role::Client };
    let mut rest = bytes;
    let mut frames = 0;
    while let Some(header) =
        frame::parse_header(rest, role, max_payload, false).map_err(|e| e.to_string())?
    {
        if header.payload_len > max_payload && !header.opcode.is_control() {
            return Err(format!("accepted {} > {max_payload}", header.payload_len));
        }
        let Some(whole) = rest.get(..header.frame_len()) else {
            return Ok(frames);
        };
        let mut payload = whole[header.header_len..].to_vec();
        if let Some(key) = header.mask {
            frame::apply_mask(&mut payload, key);
        }
        if header.opcode == OpCode::Close {
            match frame::parse_close(&payload) {
                Ok(ClosePayload::Code(code, reason)) => {
                    let _ = (code, reason.len());
                }
                Ok(ClosePayload::Empty | ClosePayload::Forbidden(_)) | Err(_) => {}
            }
        }
        let _ = header.is_minimal();
        if header.fin {
            // The encoder writes what the gateway sends: it must parse back as it was.
            let mask = header.mask;
            let mut out = Vec::new();
            frame::encode(&mut out, header.opcode, &payload, mask);
            let back = frame::parse_header(&out, role, usize::MAX, false)
                .map_err(|e| format!("re-encoded frame does not parse: {e}"))?
                .ok_or("re-encoded frame is incomplete")?;
            let mut again = out[back.header_len..].to_vec();
            if let Some(key) = back.mask {
                frame::apply_mask(&mut again, key);
            }
            if back.opcode != header.opcode || again != payload || !back.is_minimal() {
                return Err(format!("re-encoded frame differs: {header:?} vs {back:?}"));
            }
        }
        frames += 1;
        rest = &rest[header.frame_len()..];
    }
    Ok(frames)
}
