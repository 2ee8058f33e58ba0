//! One HTTP request to an admin listener over a fresh connection, with hyper's client.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use super::within;

/// An answer: its status, headers and body.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (the test fails if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }

    /// The `error` field of a JSON error answer.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .expect("an error field")
            .to_owned()
    }
}

/// `method uri` with `headers` (and `Host: admin` unless they name a host) and `body`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder().method(method).uri(uri);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", "admin");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = within(
        "admin response",
        sender.send_request(req.body(Full::new(body.into())).unwrap()),
    )
    .await
    .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = within("admin body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// [`request`] with a content type, if given.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    uri: &str,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> Reply {
    let headers: Vec<(&str, &str)> = content_type
        .map(|t| ("content-type", t))
        .into_iter()
        .collect();
    request(addr, method, uri, &headers, body).await
}
