//! Response bodies as the client side's hyper server sends them: the upstream's body streamed
//! frame by frame as hyper asks for it (so the upstream is read only as fast as the client
//! takes it, and server-sent events go out as they come), or an answer of the gateway's own.

use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::Activity;

/// The body of every response the client gets in HTTP mode. An enum rather than a boxed
/// body: one allocation and one indirect call less per response.
pub(crate) enum ResponseBody {
    /// A whole body of the gateway's own.
    Full(Full<Bytes>),
    /// The upstream's, with the mark that keeps its response in flight.
    Upstream {
        body: Incoming,
        _guard: InFlightGuard,
    },
}

/// A whole body of the gateway's own (an answer, a refusal).
pub(crate) fn full(bytes: Bytes) -> ResponseBody {
    ResponseBody::Full(Full::new(bytes))
}

/// The upstream's body, still counted as in flight (by `guard`, taken when the request came)
/// until it ends or is dropped: the keep-alive timeout does not run while a response (a long
/// poll, an event stream) is still going.
pub(crate) fn upstream(body: Incoming, guard: InFlightGuard) -> ResponseBody {
    ResponseBody::Upstream {
        body,
        _guard: guard,
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            ResponseBody::Upstream { body, .. } => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(full) => full.is_end_stream(),
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(full) => full.size_hint(),
            ResponseBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}

/// Marks one response in flight while it lives.
pub(crate) struct InFlightGuard(Arc<Activity>);

impl InFlightGuard {
    pub(crate) fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Relaxed);
        InFlightGuard(activity.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.response_ended();
    }
}
