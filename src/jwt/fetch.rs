//! One HTTPS GET for the IdP's documents (discovery, JWKS): hyper's HTTP/1.1 client over
//! tokio-rustls, one connection per request, the body bounded. Nothing else of HTTP is needed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

/// The largest document accepted (discovery or JWKS).
pub(crate) const MAX_DOCUMENT: usize = 1 << 20;

/// A fetched document and its `Cache-Control: max-age`, if it has one.
pub(crate) struct Document {
    pub(crate) body: Bytes,
    pub(crate) max_age: Option<Duration>,
}

/// GETs `url` (https only) with `tls`; any status but 200 is an error.
pub(crate) async fn get(url: &str, tls: &Arc<rustls::ClientConfig>) -> Result<Document, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url}: only https:// is fetched"));
    }
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let name = ServerName::try_from(bare.to_owned()).map_err(|e| format!("{url}: {e}"))?;
    let tcp = tokio::net::TcpStream::connect((bare, port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    // The connection ends with the request: the sender is dropped when this function returns.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "framegate")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("{url}: HTTP {}", response.status()));
    }
    let max_age = response
        .headers()
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|d| {
            let (k, v) = d.trim().split_once('=')?;
            k.eq_ignore_ascii_case("max-age")
                .then(|| v.trim().parse::<u64>().ok())
                .flatten()
        })
        .map(Duration::from_secs);
    let body = Limited::new(response.into_body(), MAX_DOCUMENT)
        .collect()
        .await
        .map_err(|e| format!("{url}: {e} (at most {MAX_DOCUMENT} bytes)"))?
        .to_bytes();
    Ok(Document { body, max_age })
}
