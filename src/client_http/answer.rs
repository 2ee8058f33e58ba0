//! Answers to the client, encoded for one write: a refusal (status, headers, body) or the 101
//! that starts the WebSocket.
//!
//! The gateway writes the framing headers itself: `Content-Length`, `Connection` and `Date`.
//! Any `Content-Length` or `Transfer-Encoding` among an answer's headers (a policy's or a
//! refusing upstream's) is left out, as the body is always sent whole.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;

/// A final answer to a request that is not upgraded.
#[derive(Debug)]
pub(crate) struct Answer {
    /// The status.
    pub(crate) status: StatusCode,
    /// Headers, without the framing ones (see the module doc).
    pub(crate) headers: HeaderMap,
    /// The body, sent whole.
    pub(crate) body: Bytes,
}

impl Answer {
    /// An answer with a `text/plain` body (a newline is added).
    pub(crate) fn text(status: StatusCode, body: String) -> Self {
        let mut headers = HeaderMap::with_capacity(4);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        Answer {
            status,
            headers,
            body: Bytes::from(body + "\n"),
        }
    }

    /// The answer's bytes. `close` says the connection ends after it (`Connection: close`);
    /// `head_only` leaves the body out, as the answer to a `HEAD` request must.
    pub(crate) fn encode(&self, close: bool, head_only: bool) -> Vec<u8> {
        // 204 and 304 have no body, and no length either (RFC 9110 §8.6).
        let bodiless = self.status == StatusCode::NO_CONTENT
            || self.status == StatusCode::NOT_MODIFIED
            || self.status.is_informational();
        let mut out = Vec::with_capacity(256 + self.body.len());
        status_line(&mut out, self.status);
        let mut connection: Vec<&[u8]> = Vec::new();
        for (name, value) in &self.headers {
            if *name == header::CONTENT_LENGTH || *name == header::TRANSFER_ENCODING {
                continue;
            }
            if *name == header::CONNECTION {
                connection.push(value.as_bytes());
                continue;
            }
            header_line(&mut out, name.as_str().as_bytes(), value.as_bytes());
        }
        if close {
            connection.push(b"close");
        }
        if !connection.is_empty() {
            header_line(&mut out, b"connection", &connection.join(&b", "[..]));
        }
        if !self.headers.contains_key(header::DATE) {
            let date = httpdate::fmt_http_date(std::time::SystemTime::now());
            header_line(&mut out, b"date", date.as_bytes());
        }
        if !bodiless {
            header_line(
                &mut out,
                b"content-length",
                self.body.len().to_string().as_bytes(),
            );
        }
        out.extend_from_slice(b"\r\n");
        if !bodiless && !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// The 101 that answers an upgrade: `headers` (the upstream's, as forwarded), then the
/// gateway's own `lines` (`Upgrade`, `Connection`, `Sec-WebSocket-Accept`, …) as name and value.
pub(crate) fn switching_protocols<'a>(
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    lines: &[(&str, &str)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    status_line(&mut out, StatusCode::SWITCHING_PROTOCOLS);
    for (name, value) in headers {
        header_line(&mut out, name, value);
    }
    for (name, value) in lines {
        header_line(&mut out, name.as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends the header line `name: value\r\n`.
pub(crate) fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_refusal_has_its_length_date_and_body() {
        let mut answer = Answer::text(StatusCode::NOT_FOUND, "no route for /x".into());
        answer
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let text = text_of(answer.encode(false, false));
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(
            text.contains("content-type: text/plain; charset=utf-8\r\n"),
            "{text}"
        );
        assert!(text.contains("content-length: 16\r\n"), "{text}");
        assert!(!text.contains("999"), "{text}");
        assert!(text.contains("date: "), "{text}");
        assert!(!text.contains("connection"), "{text}");
        assert!(text.ends_with("\r\n\r\nno route for /x\n"), "{text}");
    }

    #[test]
    fn closing_merges_connection_and_head_leaves_the_body_out() {
        let mut answer = Answer::text(StatusCode::UPGRADE_REQUIRED, "ws only".into());
        answer
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        let text = text_of(answer.encode(true, true));
        assert!(text.contains("connection: Upgrade, close\r\n"), "{text}");
        assert!(text.contains("content-length: 8\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }

    #[test]
    fn no_content_has_no_length_and_no_body() {
        let answer = Answer {
            status: StatusCode::NO_CONTENT,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"ignored"),
        };
        let text = text_of(answer.encode(false, false));
        assert!(!text.contains("content-length"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }

    #[test]
    fn the_101_carries_the_headers_given_then_the_gateways() {
        let headers = [(&b"set-cookie"[..], &b"a=1"[..])];
        let text = text_of(switching_protocols(
            headers.into_iter(),
            &[
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            ],
        ));
        assert_eq!(
            text,
            "HTTP/1.1 101 Switching Protocols\r\nset-cookie: a=1\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
    }
}
