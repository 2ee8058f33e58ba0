//! The traffic console on the admin listener (issue 16 §1): the page itself (HTML, CSS and JS
//! compiled into the binary: no CDN, nothing fetched from elsewhere) and the server-sent-event
//! stream of one connection's capture.
//!
//! The stream reads the capture's ring at most every [`POLL`]: the relay never waits for it and
//! never wakes it (nothing is added to the per-message path). A console that reads slowly only
//! falls behind the ring, and is told how many entries it lost (`event: lost`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio_util::sync::CancellationToken;

use super::{Answer, Body};
use crate::capture::Capture;

/// How often a stream looks for new entries.
pub const POLL: Duration = Duration::from_millis(150);
/// A comment line goes out after this long without events, so that proxies keep the stream.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Most entries one read of the ring takes.
const BATCH: usize = 256;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// Everything the page may load or connect to is the admin listener itself; it cannot be
/// framed (its buttons close connections) and runs no inline script.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /console`, `/console/console.js`, `/console/console.css`: the page's files.
pub(super) fn asset(path: &str) -> Option<Answer> {
    let (body, content_type) = match path {
        "/console" | "/console/" | "/console/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/console/console.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/console/console.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Some(r)
}

/// A whole body.
pub(super) fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|e: Infallible| match e {}).boxed()
}

/// `GET /admin/connections/{id}/capture/stream?after=N`: the entries after sequence number `N`
/// as they come, then the connection's end; ends early when the admin listener shuts down.
pub(super) fn stream(capture: Arc<Capture>, after: u64, shutdown: CancellationToken) -> Answer {
    struct State {
        capture: Arc<Capture>,
        after: u64,
        shutdown: CancellationToken,
        done: bool,
    }
    let state = State {
        capture,
        after,
        shutdown,
        done: false,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let mut quiet = Duration::ZERO;
        loop {
            let batch = s.capture.read(s.after, BATCH);
            let mut text = String::new();
            if batch.lost > 0 {
                event(
                    &mut text,
                    "lost",
                    None,
                    &serde_json::json!({ "lost": batch.lost }),
                );
            }
            for entry in &batch.entries {
                event(
                    &mut text,
                    "entry",
                    Some(entry.seq()),
                    &s.capture.show(entry),
                );
                s.after = entry.seq();
            }
            if let Some(closed) = &batch.closed {
                event(&mut text, "closed", None, &closed.to_json());
                s.done = true;
            }
            if !text.is_empty() {
                return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(text))), s));
            }
            if quiet >= KEEPALIVE {
                return Some((Ok(Frame::data(Bytes::from_static(b": keepalive\n\n"))), s));
            }
            tokio::select! {
                _ = s.shutdown.cancelled() => return None,
                _ = tokio::time::sleep(POLL) => quiet += POLL,
            }
        }
    });
    let mut r = Response::new(StreamBody::new(events).boxed());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Appends one server-sent event; an entry's `id` is its sequence number, which a browser's
/// `EventSource` sends back as `Last-Event-ID` when it reconnects.
fn event(out: &mut String, name: &str, id: Option<u64>, data: &serde_json::Value) {
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(&id.to_string());
        out.push('\n');
    }
    out.push_str("event: ");
    out.push_str(name);
    out.push_str("\ndata: ");
    // Compact JSON holds no line break, so one data line carries it.
    out.push_str(&data.to_string());
    out.push_str("\n\n");
}
