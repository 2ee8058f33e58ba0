//! The hook points the proxy calls for each connection, and the verdicts they return.
//!
//! This module owns the contract between the relay and whatever decides about messages (the Lua
//! engine, or nothing). It never touches a socket: the proxy applies verdicts.
//!
//! Phases, in order: upgrade (before the upstream is contacted), each data message in either
//! direction (whole, reassembled; control frames never reach a hook), then close.

use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

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
    Forward(Message),
    /// Do not send it; counted as a policy drop.
    Drop,
    /// Close both legs with this frame.
    Close(CloseFrame),
}

/// Per-connection message hooks. Every method has a default that leaves traffic untouched.
pub trait FrameHooks: Send {
    /// Called with each whole data message (text or binary) before it is forwarded.
    /// The default forwards it unchanged.
    fn on_message(&mut self, direction: Direction, message: Message) -> Verdict {
        let _ = direction;
        Verdict::Forward(message)
    }

    /// Called once when the connection has ended; it cannot send anything. The default does nothing.
    fn on_close(&mut self, summary: &crate::proxy::CloseSummary) {
        let _ = summary;
    }
}

/// Hooks that forward everything unchanged: a route with no policies.
#[derive(Debug, Default)]
pub struct PassThrough;

impl FrameHooks for PassThrough {}
