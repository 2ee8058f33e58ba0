//! framegate: a policy-scripted WebSocket gateway.
//!
//! Map of the crate:
//! - [`config`]: `config.toml` as validated types, with `file:line:column` errors.
//! - [`route`]: path resolvers, `(host, path) -> route`.
//! - [`policy`]: the hook trait the proxy calls at each phase, and its verdicts; no sockets.
//! - [`proxy`]: the upgrade (both handshakes), the relay loop, lifetimes and closing.
//! - [`upstream`]: connecting to upstreams over TCP or TLS.
//! - [`listener`]: the accept loop, the connection cap and graceful shutdown.
//! - [`samples`]: built-in sample upstreams (echo, broadcast chat) for demos and tests.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod gateway;
mod listener;
pub mod policy;
pub mod proxy;
pub mod route;
pub mod samples;
pub mod upstream;

pub use config::Config;
pub use gateway::{Gateway, Running, ShutdownOutcome, StartError};
