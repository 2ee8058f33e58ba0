//! One HTTP request to an admin listener over a fresh connection, with hyper's client.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use super::within;

/// An answer: its status and body.
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (the test fails if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

/// `method uri` with `Host: admin`, the content type if given, and `body`.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    uri: &str,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "admin");
    if let Some(t) = content_type {
        req = req.header("content-type", t);
    }
    let resp = within(
        "admin response",
        sender.send_request(req.body(Full::new(body.into())).unwrap()),
    )
    .await
    .unwrap();
    let status = resp.status().as_u16();
    let body = within("admin body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    Reply { status, body }
}
