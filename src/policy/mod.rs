//! The hook points the proxy calls for each connection, and the verdicts they return.
//!
//! This module owns the contract between the proxy and whatever decides about traffic (the Lua
//! engine in [`lua`], or nothing). It never touches a socket: the proxy applies verdicts.
//!
//! Phases, in order: upgrade ([`RoutePolicy::on_upgrade`], before the upstream is contacted),
//! each data message in either direction ([`FrameHooks::on_message`], whole and reassembled;
//! control frames never reach a hook; or [`FrameHooks::check`] for a direction that is only
//! checked, whose messages the proxy keeps relaying byte for byte), then close
//! ([`FrameHooks::on_close`]).
//!
//! [`validate`] is a layer of hooks around the Lua ones: `[route.validate]`'s JSON Schemas
//! check each text message before the frame policy sees it.

mod data;
pub mod limit;
pub mod lua;
pub mod shared;
mod summary;
pub mod validate;

use std::net::IpAddr;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::header_fields::HeaderFields;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

pub use data::{is_utf8, Data};
pub use summary::{CloseSummary, ClosedBy, Traffic};

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client, to the upstream.
    ClientToUpstream,
    /// From the upstream, to the client.
    UpstreamToClient,
}

/// What to do with one data message.
#[derive(Debug)]
pub enum Verdict {
    /// Send this message on (the original, or a replacement).
    Forward(Data),
    /// Do not send it; counted as a policy drop.
    Drop,
    /// Close both legs with this frame.
    Close(CloseFrame),
}

/// Messages a hook sends besides its verdict (`conn:reply`, `conn:send_client`, …). They are
/// queued before the verdict's message.
///
/// The rooms bound what a hook may add: a connection holds at most `route.max_queued_bytes`
/// for each leg, and what is already waiting to be written counts. A hook that would go
/// over a room must not push the message (the Lua API answers `nil, "queue full"`).
pub struct Outbound<'a> {
    /// Queue towards the client.
    pub to_client: &'a mut std::collections::VecDeque<Data>,
    /// Queue towards the upstream.
    pub to_upstream: &'a mut std::collections::VecDeque<Data>,
    /// Payload bytes that may still be queued towards the client.
    pub room_to_client: usize,
    /// Payload bytes that may still be queued towards the upstream.
    pub room_to_upstream: usize,
    /// A new close time the hook asks for (`conn:expire_at`); the proxy holds it to the
    /// route's `expire`.
    pub expire_at: &'a mut Option<SystemTime>,
}

/// Per-connection message hooks. Every method has a default that leaves traffic untouched.
pub trait FrameHooks {
    /// Called with each whole data message (text or binary) before it is forwarded.
    /// The default forwards it unchanged.
    fn on_message(&mut self, direction: Direction, message: Data, out: Outbound<'_>) -> Verdict {
        let _ = (direction, out);
        Verdict::Forward(message)
    }

    /// Whether [`FrameHooks::on_message`] looks at messages going `direction`. When it does
    /// not, the proxy relays them straight from its read buffer, without building a
    /// [`Data`], and never calls `on_message` for them. Asked once, when the relay starts.
    /// The default is `true`.
    fn inspects(&self, direction: Direction) -> bool {
        let _ = direction;
        true
    }

    /// Whether messages going `direction` are only checked, never changed or answered
    /// otherwise: the proxy then relays them byte for byte, shows each whole text message to
    /// [`FrameHooks::check`] first, and never calls `on_message` for them. Asked once, when
    /// the relay starts; a connection whose messages are inflated or compressed
    /// (permessage-deflate) gets `on_message` all the same. The default is `false`.
    fn checks_only(&self, direction: Direction) -> bool {
        let _ = direction;
        false
    }

    /// A whole text message going `direction`, where [`FrameHooks::checks_only`] said so:
    /// `None` relays it as it came; `Some(Verdict::Drop)` drops it (replies may be queued
    /// in `out`); `Some(Verdict::Close(_))` closes the connection. A `Some(Verdict::Forward)`
    /// is taken as `None`: a check cannot replace a message.
    fn check(&mut self, direction: Direction, text: &str, out: Outbound<'_>) -> Option<Verdict> {
        let _ = (direction, text, out);
        None
    }

    /// Called once the upstream has accepted, before the relay starts, with the endpoint
    /// connected to (`ws://host:port`, no path, no credentials): frame policies see it as
    /// `ctx.upstream`. The default does nothing.
    fn upstream_chosen(&mut self, endpoint: &str) {
        let _ = endpoint;
    }

    /// Called once when the connection has ended; it cannot send anything. The default does nothing.
    fn on_close(&mut self, summary: &CloseSummary) {
        let _ = summary;
    }

    /// After [`FrameHooks::on_close`]: what is left of it when it waits for the fleet's
    /// store (`gw.shared` with `[shared] backend = "redis"`); the proxy awaits it. Each wait
    /// is bounded by `shared.timeout`. The default: nothing.
    fn close_pending(
        &mut self,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>> {
        None
    }
}

/// Hooks that forward everything unchanged: a route with no frame policies.
#[derive(Debug, Default)]
pub struct PassThrough;

impl FrameHooks for PassThrough {
    fn inspects(&self, _direction: Direction) -> bool {
        false
    }
}

/// What the upgrade phase may read of the client's request.
#[derive(Debug)]
pub struct UpgradeRequest<'a> {
    /// Connection id (the same as in the log lines).
    pub id: u64,
    /// HTTP method (always GET for a valid upgrade).
    pub method: &'a str,
    /// Whether this is a WebSocket upgrade (`false`: a plain HTTP request on a route with
    /// `http = "proxy"`; its frame hooks and `on_close` never run).
    pub upgrade: bool,
    /// Request path, without the query string.
    pub path: &'a str,
    /// Raw query string, without '?'; empty when there is none.
    pub query: &'a str,
    /// All request headers, names as the client sent them.
    pub headers: &'a HeaderFields,
    /// The route's path placeholders.
    pub params: &'a [(String, String)],
    /// The client's IP address.
    pub client_ip: IpAddr,
    /// `ws` or `wss`, as the client connected.
    pub scheme: &'static str,
    /// The Host header.
    pub host: Option<&'a str>,
    /// The route's counters on this worker: the policy records its calls' durations and
    /// failures there (`None`: not recorded, as in `framegate policy-test`).
    pub metrics: Option<&'a std::sync::Arc<crate::metrics::RouteMetrics>>,
    /// The claims of the token `[route.jwt]` verified (`req.jwt`, then `ctx.jwt`).
    pub jwt: Option<&'a serde_json::Value>,
}

/// Changes an upgrade policy asked for.
#[derive(Debug, Default)]
pub struct UpgradeChanges {
    /// Connect here instead of the route's upstream.
    pub upstream: Option<String>,
    /// Headers to set (`Some`) or remove (`None`) on the upstream request, in call order.
    pub headers: Vec<(HeaderName, Option<HeaderValue>)>,
    /// The subprotocol to answer the client with (one it offered); only it is offered upstream.
    pub subprotocol: Option<String>,
    /// Close the connection at this time, if earlier than the route's `expire`.
    pub expire_at: Option<SystemTime>,
    /// Tags set by `req:tag`, for the connection registry.
    pub tags: crate::registry::Tags,
    /// `req:set_hash_key`: the key a `hash` pool uses instead of its `hash_key`.
    pub hash_key: Option<String>,
    /// The context `on_upgrade` built, as JSON for the registry (without `ctx.request`, which
    /// the registry keeps masked); `Null` when there is none.
    pub ctx_json: serde_json::Value,
}

/// The outcome of the upgrade phase.
pub enum UpgradeVerdict {
    /// Go on with these changes; the hooks carry the frozen context to the frame phase.
    Continue {
        /// What to change before connecting upstream.
        changes: UpgradeChanges,
        /// The connection's frame hooks.
        hooks: Box<dyn FrameHooks>,
    },
    /// Answer the client with this response; the upstream is never contacted.
    Reject {
        /// Status code.
        status: StatusCode,
        /// Response body.
        body: Bytes,
        /// Extra response headers.
        headers: HeaderMap,
    },
    /// The policy failed (error, budget exceeded): the client gets 500.
    Failed(PolicyError),
    /// The policy waits for the fleet's store (`gw.shared` with `[shared] backend = "redis"`):
    /// await this for the verdict. Each wait is bounded by `shared.timeout`.
    Pending(std::pin::Pin<Box<dyn std::future::Future<Output = UpgradeVerdict>>>),
}

impl UpgradeVerdict {
    /// The verdict, once a policy that waits has finished.
    pub async fn settled(mut self) -> UpgradeVerdict {
        loop {
            match self {
                UpgradeVerdict::Pending(pending) => self = pending.await,
                verdict => return verdict,
            }
        }
    }
}

/// A route's policies as seen by the proxy, one instance per worker thread.
pub trait RoutePolicy {
    /// Runs the upgrade phase for one request.
    fn on_upgrade(&self, request: &UpgradeRequest<'_>) -> UpgradeVerdict;
}

/// A policy failure: which script, where, and the Lua message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{script}: {message}")]
pub struct PolicyError {
    /// The script's path as configured.
    pub script: String,
    /// The Lua error, with `line:` prefix when Lua knows it.
    pub message: String,
}
