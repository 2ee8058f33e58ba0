//! What the proxy tells the hooks about a connection that has ended: [`CloseSummary`], the
//! input of [`FrameHooks::on_close`](super::FrameHooks::on_close) and of the final log line,
//! with its per-direction [`Traffic`] and who closed ([`ClosedBy`]). Part of the hook
//! contract, so that the policy side needs nothing from the proxy; the proxy fills it in
//! (src/proxy/close.rs).

use std::net::SocketAddr;
use std::time::Duration;

/// Who ended the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    /// The client sent a close frame, dropped its connection, or broke the protocol.
    Client,
    /// The upstream did.
    Upstream,
    /// framegate did (lifetime, idle timeout, shutdown, a policy).
    Gateway,
}

impl ClosedBy {
    /// `client`, `upstream` or `gateway`, as logged.
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Client => "client",
            ClosedBy::Upstream => "upstream",
            ClosedBy::Gateway => "gateway",
        }
    }
}

/// Counters for one direction of a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Data messages forwarded.
    pub messages: u64,
    /// Payload bytes forwarded.
    pub bytes: u64,
    /// Data messages a policy dropped.
    pub dropped_by_policy: u64,
    /// Data messages that were queued when the connection closed and could not be delivered.
    pub undelivered: u64,
}

/// Everything known about a connection when it ends: the final log line and `on_close` input.
#[derive(Debug, Clone)]
pub struct CloseSummary {
    /// Connection id, unique within the process.
    pub id: u64,
    /// The route's name (host and path template).
    pub route: String,
    /// The client's address.
    pub client: SocketAddr,
    /// The upstream URL after substitution.
    pub upstream: String,
    /// Time from the 101 to the end.
    pub duration: Duration,
    /// Client-to-upstream traffic.
    pub client_to_upstream: Traffic,
    /// Upstream-to-client traffic.
    pub upstream_to_client: Traffic,
    /// Close code describing the end (1005: no code given, 1006: no close frame).
    pub code: u16,
    /// Close reason describing the end.
    pub reason: String,
    /// Who ended it.
    pub closed_by: ClosedBy,
}
