//! The proxy: the upgrade (both handshakes), the relay loop, lifetimes, and closing.
//!
//! `proxy` sees policies only through [`crate::policy::FrameHooks`]. See docs/lifecycle.md for
//! the life of one connection.

mod buffers;
mod close;
mod deflate;
mod extensions;
mod forward;
pub(crate) mod frame;
mod headers;
pub(crate) mod http;
mod leg;
mod lifetime;
mod meter;
mod pool_key;
mod pooled;
mod relay;
mod upgrade;

pub use close::{CloseSummary, ClosedBy, Side, Traffic};

pub(crate) use upgrade::{handle, Abandoned, Accepted, Handled, Rejection};

pub(crate) use crate::state::Shared;
