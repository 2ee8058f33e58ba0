//! Why a connection ended, what each leg is told, and the one log line that records it.
//!
//! Every end of a relay is an [`Ending`]; [`Ending::plan`] decides per leg whether to send a close
//! frame (and which), only finish a handshake the peer started, or just drop a dead socket.
//!
//! Blame goes where it belongs: a leg that broke the rules gets its own code (1002, 1007,
//! 1009); the other leg is told its peer failed, with 1011 and a reason naming the upstream
//! towards a client whose upstream misbehaved, and 1001 towards an upstream whose client did.
//! Not 1014 (Bad Gateway): widely used clients (gorilla/websocket, tungstenite 0.26) take a
//! received 1014 for a protocol error of their peer, which is the wrong blame again.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

pub use crate::policy::{CloseSummary, ClosedBy, Traffic};

/// One of the two legs of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's leg (gateway is the server).
    Client,
    /// The upstream's leg (gateway is the client).
    Upstream,
}

impl Side {
    /// The other leg.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

/// Why a relay ended.
#[derive(Debug, Clone)]
pub(crate) enum Ending {
    /// A leg sent a close frame; it is forwarded to the other leg as is.
    Closed(Side, Option<CloseFrame>),
    /// A leg's TCP connection dropped (or reset) without a closing handshake.
    Gone(Side),
    /// A leg sent a message over `max_message_size`.
    TooBig(Side),
    /// A leg sent a text message that is not UTF-8.
    BadUtf8(Side),
    /// A leg sent a close frame whose reason is not UTF-8.
    BadCloseReason(Side),
    /// A leg broke RFC 6455 framing.
    Protocol(Side, String),
    /// A leg sent nothing back within `ping_timeout` of a ping: taken for dead.
    Unresponsive(Side),
    /// The route's `expire` (or a policy's shorter one) passed.
    Expired,
    /// The token's expiry passed (`route.jwt.expire_with_token`): 1008 "token expired".
    TokenExpired,
    /// No data message either way for `idle_timeout`.
    Idle,
    /// The gateway is shutting down.
    Shutdown,
    /// A policy closed the connection with this frame.
    Policy(CloseFrame),
    /// The admin API closed the connection: the client gets this frame, the upstream 1001.
    Admin(CloseFrame),
}

/// What to do with one leg when closing.
#[derive(Debug, Clone)]
pub(crate) enum LegClose {
    /// Deliver what is queued, send this close frame, and wait for the peer's reply.
    Send(Option<CloseFrame>),
    /// The peer sent its close already: deliver what is queued, answer with this frame (its
    /// own, echoed) and finish.
    Finish(Option<CloseFrame>),
    /// The peer broke the protocol: deliver what is queued, send this close frame, then stop
    /// writing and discard what the peer still sends until it hangs up (a lingering close),
    /// so that the close frame is not lost to a reset.
    Fail(Option<CloseFrame>),
    /// The socket is dead: drop it.
    Drop,
}

fn frame(code: CloseCode, reason: &'static str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code,
        reason: reason.into(),
    })
}

/// Close reasons sent by the gateway; docs/configuration.md lists them.
pub(crate) mod reasons {
    /// Sent on both legs when `expire` passes.
    pub const EXPIRED: &str = "connection lifetime expired";
    /// Sent on both legs when the token's expiry passes (`route.jwt.expire_with_token`).
    pub const TOKEN_EXPIRED: &str = "token expired";
    /// Sent on both legs after `idle_timeout`.
    pub const IDLE: &str = "idle timeout";
    /// Sent on both legs during graceful shutdown.
    pub const SHUTDOWN: &str = "server shutting down";
    /// Sent to a client whose upstream vanished.
    pub const UPSTREAM_LOST: &str = "upstream connection lost";
    /// Sent to an upstream whose client vanished.
    pub const CLIENT_LOST: &str = "client connection lost";
    /// Sent to the sender of an oversized message.
    pub const TOO_BIG: &str = "message too big";
    /// Sent to the sender of a text message that is not UTF-8.
    pub const BAD_UTF8: &str = "invalid UTF-8 in text message";
    /// Sent to the sender of a close frame whose reason is not UTF-8.
    pub const BAD_CLOSE_REASON: &str = "invalid UTF-8 in close reason";
    /// Sent to a peer that broke the framing rules.
    pub const PROTOCOL: &str = "protocol error";
    /// Sent to an upstream whose client failed (1001).
    pub const PEER_FAILED: &str = "peer connection failed";
    /// Sent (1011) to a client whose upstream sent a message over `max_message_size`.
    pub const UPSTREAM_TOO_BIG: &str = "upstream sent a message too big";
    /// Sent (1011) to a client whose upstream sent text that is not UTF-8.
    pub const UPSTREAM_BAD_UTF8: &str = "upstream sent invalid UTF-8";
    /// Sent (1011) to a client whose upstream broke the framing rules.
    pub const UPSTREAM_PROTOCOL: &str = "upstream protocol error";
    /// Sent to the upstream when the client did not answer a ping in time.
    pub const CLIENT_UNRESPONSIVE: &str = "client not responding";
    /// Sent to the client when the upstream did not answer a ping in time.
    pub const UPSTREAM_UNRESPONSIVE: &str = "upstream not responding";
    /// Sent (1001) to the upstream when the admin API closed the connection.
    pub const ADMIN_CLOSED: &str = "closed by the gateway admin";
}

impl Ending {
    /// The close frame framegate itself originates for this ending, if any.
    fn gateway_frame(&self) -> Option<CloseFrame> {
        match self {
            Ending::TooBig(_) => frame(CloseCode::Size, reasons::TOO_BIG),
            Ending::BadUtf8(_) => frame(CloseCode::Invalid, reasons::BAD_UTF8),
            Ending::BadCloseReason(_) => frame(CloseCode::Invalid, reasons::BAD_CLOSE_REASON),
            Ending::Protocol(..) => frame(CloseCode::Protocol, reasons::PROTOCOL),
            Ending::Expired => frame(CloseCode::Away, reasons::EXPIRED),
            Ending::TokenExpired => frame(CloseCode::Policy, reasons::TOKEN_EXPIRED),
            Ending::Idle => frame(CloseCode::Away, reasons::IDLE),
            Ending::Shutdown => frame(CloseCode::Away, reasons::SHUTDOWN),
            Ending::Policy(f) | Ending::Admin(f) => Some(f.clone()),
            Ending::Closed(..) | Ending::Gone(_) | Ending::Unresponsive(_) => None,
        }
    }

    /// What a client is told when its upstream broke the rules (see the module doc for why
    /// 1011 and not 1014).
    fn upstream_fault(&self) -> Option<CloseFrame> {
        let reason = match self {
            Ending::TooBig(_) => reasons::UPSTREAM_TOO_BIG,
            Ending::BadUtf8(_) => reasons::UPSTREAM_BAD_UTF8,
            _ => reasons::UPSTREAM_PROTOCOL,
        };
        frame(CloseCode::Error, reason)
    }

    /// What each leg is told: `(client, upstream)`.
    pub(crate) fn plan(&self) -> (LegClose, LegClose) {
        use LegClose::{Drop, Fail, Finish, Send};
        let on = |side: Side, this: LegClose, other: LegClose| match side {
            Side::Client => (this, other),
            Side::Upstream => (other, this),
        };
        match self {
            Ending::Closed(side, f) => on(*side, Finish(f.clone()), Send(f.clone())),
            Ending::Gone(Side::Client) => {
                (Drop, Send(frame(CloseCode::Away, reasons::CLIENT_LOST)))
            }
            Ending::Gone(Side::Upstream) => {
                (Send(frame(CloseCode::Error, reasons::UPSTREAM_LOST)), Drop)
            }
            Ending::TooBig(Side::Client)
            | Ending::BadUtf8(Side::Client)
            | Ending::BadCloseReason(Side::Client)
            | Ending::Protocol(Side::Client, _) => (
                Fail(self.gateway_frame()),
                Send(frame(CloseCode::Away, reasons::PEER_FAILED)),
            ),
            Ending::TooBig(Side::Upstream)
            | Ending::BadUtf8(Side::Upstream)
            | Ending::BadCloseReason(Side::Upstream)
            | Ending::Protocol(Side::Upstream, _) => {
                (Send(self.upstream_fault()), Fail(self.gateway_frame()))
            }
            Ending::Unresponsive(Side::Client) => (
                Drop,
                Send(frame(CloseCode::Away, reasons::CLIENT_UNRESPONSIVE)),
            ),
            Ending::Unresponsive(Side::Upstream) => (
                Send(frame(CloseCode::Away, reasons::UPSTREAM_UNRESPONSIVE)),
                Drop,
            ),
            Ending::Expired
            | Ending::TokenExpired
            | Ending::Idle
            | Ending::Shutdown
            | Ending::Policy(_) => (Send(self.gateway_frame()), Send(self.gateway_frame())),
            Ending::Admin(_) => (
                Send(self.gateway_frame()),
                Send(frame(CloseCode::Away, reasons::ADMIN_CLOSED)),
            ),
        }
    }

    /// Who ended the connection.
    pub(crate) fn closed_by(&self) -> ClosedBy {
        match self.side() {
            Some(Side::Client) => ClosedBy::Client,
            Some(Side::Upstream) => ClosedBy::Upstream,
            None => ClosedBy::Gateway,
        }
    }

    /// The close code and reason that describe the end, for the log line and `on_close`.
    /// 1005 means a close frame without a code; 1006 means no close frame at all.
    pub(crate) fn code_and_reason(&self) -> (u16, String) {
        let described = match self {
            Ending::Closed(_, f) => f.clone(),
            Ending::Gone(side) => {
                let reason = match side {
                    Side::Client => "client connection dropped",
                    Side::Upstream => "upstream connection dropped",
                };
                return (1006, reason.to_owned());
            }
            Ending::Unresponsive(side) => {
                let reason = match side {
                    Side::Client => "client did not answer a ping within ping_timeout",
                    Side::Upstream => "upstream did not answer a ping within ping_timeout",
                };
                return (1006, reason.to_owned());
            }
            Ending::Protocol(_, detail) => return (1002, detail.clone()),
            _ => self.gateway_frame(),
        };
        described.map_or((1005, String::new()), |f| {
            (u16::from(f.code), f.reason.to_string())
        })
    }

    /// The leg whose behaviour ended the connection; `None` when framegate decided.
    fn side(&self) -> Option<Side> {
        match self {
            Ending::Closed(s, _)
            | Ending::Gone(s)
            | Ending::TooBig(s)
            | Ending::BadUtf8(s)
            | Ending::BadCloseReason(s)
            | Ending::Unresponsive(s)
            | Ending::Protocol(s, _) => Some(*s),
            Ending::Expired
            | Ending::TokenExpired
            | Ending::Idle
            | Ending::Shutdown
            | Ending::Policy(_)
            | Ending::Admin(_) => None,
        }
    }
}

impl CloseSummary {
    /// A summary of a connection that has not carried anything yet: code 1006, closed by the
    /// client, zero counters.
    pub fn new(id: u64, route: String, client: SocketAddr, upstream: String) -> Self {
        CloseSummary {
            id,
            route,
            client,
            upstream,
            duration: Duration::ZERO,
            client_to_upstream: Traffic::default(),
            upstream_to_client: Traffic::default(),
            code: 1006,
            reason: String::new(),
            closed_by: ClosedBy::Client,
        }
    }

    /// Writes the one log line for this connection's end.
    pub fn log(&self) {
        tracing::info!(
            conn = self.id,
            route = %self.route,
            client = %self.client,
            upstream = %self.upstream,
            duration_ms = self.duration.as_millis() as u64,
            msgs_in = self.client_to_upstream.messages,
            bytes_in = self.client_to_upstream.bytes,
            msgs_out = self.upstream_to_client.messages,
            bytes_out = self.upstream_to_client.bytes,
            dropped_in = self.client_to_upstream.dropped_by_policy,
            dropped_out = self.upstream_to_client.dropped_by_policy,
            undelivered = self.client_to_upstream.undelivered + self.upstream_to_client.undelivered,
            code = self.code,
            reason = %self.reason,
            closed_by = self.closed_by.as_str(),
            "connection closed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(l: &LegClose) -> Option<u16> {
        match l {
            LegClose::Send(Some(f)) => Some(u16::from(f.code)),
            _ => None,
        }
    }

    #[test]
    fn oversized_message_closes_sender_with_1009() {
        let (c, u) = Ending::TooBig(Side::Client).plan();
        assert!(matches!(&c, LegClose::Fail(Some(f)) if u16::from(f.code) == 1009));
        assert_eq!(sent(&u), Some(1001));
        assert_eq!(Ending::TooBig(Side::Client).code_and_reason().0, 1009);
    }

    #[test]
    fn vanished_upstream_gives_client_1011() {
        let (c, u) = Ending::Gone(Side::Upstream).plan();
        assert_eq!(sent(&c), Some(1011));
        assert!(matches!(u, LegClose::Drop));
        assert_eq!(Ending::Gone(Side::Upstream).closed_by(), ClosedBy::Upstream);
    }

    #[test]
    fn upstream_faults_give_the_client_1011_and_the_upstream_its_own_code() {
        for (ending, own) in [
            (Ending::TooBig(Side::Upstream), 1009),
            (Ending::BadUtf8(Side::Upstream), 1007),
            (Ending::BadCloseReason(Side::Upstream), 1007),
            (
                Ending::Protocol(Side::Upstream, "masked frame".into()),
                1002,
            ),
        ] {
            let (c, u) = ending.plan();
            assert_eq!(sent(&c), Some(1011), "{ending:?}");
            assert!(
                matches!(&u, LegClose::Fail(Some(f)) if u16::from(f.code) == own),
                "{ending:?}: {u:?}"
            );
            assert_eq!(ending.closed_by(), ClosedBy::Upstream);
        }
    }

    #[test]
    fn a_client_fault_lingers_on_the_client_and_gives_the_upstream_1001() {
        let (c, u) = Ending::Protocol(Side::Client, "x".into()).plan();
        assert!(matches!(&c, LegClose::Fail(Some(f)) if u16::from(f.code) == 1002));
        assert_eq!(sent(&u), Some(1001));
        let (c, _) = Ending::BadCloseReason(Side::Client).plan();
        assert!(
            matches!(&c, LegClose::Fail(Some(f)) if f.reason.as_str() == reasons::BAD_CLOSE_REASON)
        );
    }

    #[test]
    fn an_unresponsive_leg_is_dropped_and_the_other_told_1001() {
        let (c, u) = Ending::Unresponsive(Side::Client).plan();
        assert!(matches!(c, LegClose::Drop));
        assert_eq!(sent(&u), Some(1001));
        assert_eq!(Ending::Unresponsive(Side::Client).code_and_reason().0, 1006);
        let (c, u) = Ending::Unresponsive(Side::Upstream).plan();
        assert_eq!(sent(&c), Some(1001));
        assert!(matches!(u, LegClose::Drop));
    }

    #[test]
    fn lifetime_closes_both_with_1001() {
        let (c, u) = Ending::Expired.plan();
        assert_eq!((sent(&c), sent(&u)), (Some(1001), Some(1001)));
        assert_eq!(
            Ending::Expired.code_and_reason(),
            (1001, reasons::EXPIRED.to_owned())
        );
    }
}
