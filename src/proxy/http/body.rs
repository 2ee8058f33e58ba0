//! Response bodies as the client side's hyper server sends them: the upstream's body streamed
//! frame by frame as hyper asks for it (so the upstream is read only as fast as the client
//! takes it, and server-sent events go out as they come), or an answer of the gateway's own.

use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::Activity;

/// Any error a body may end with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the client gets in HTTP mode.
pub(crate) type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// A whole body of the gateway's own (an answer, a refusal).
pub(crate) fn full(bytes: Bytes) -> ResponseBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The upstream's body, still counted as in flight (by `guard`, taken when the request came)
/// until it ends or is dropped: the keep-alive timeout does not run while a response (a long
/// poll, an event stream) is still going.
pub(crate) fn upstream(body: Incoming, guard: InFlightGuard) -> ResponseBody {
    InFlight {
        body,
        _guard: guard,
    }
    .map_err(BoxError::from)
    .boxed_unsync()
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
        let activity = &self.0;
        activity.in_flight.fetch_sub(1, Relaxed);
        activity.touch();
    }
}

struct InFlight {
    body: Incoming,
    _guard: InFlightGuard,
}

impl Body for InFlight {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
