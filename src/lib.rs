//! framegate: a policy-scripted WebSocket gateway.
//!
//! Map of the crate:
//! - [`config`]: `config.toml` as validated types, with `file:line:column` errors.
//! - [`route`]: path resolvers, `(host, path) -> route`, over any [`route::Routable`];
//!   [`route::origin`] a route's `Origin` allow-list ([`config::Route::allows_origin`]).
//! - [`snapshot`] (`src/snapshot.rs`): everything derived from one configuration (routes,
//!   router, TLS settings, script text), immutable and numbered; connections keep theirs;
//!   `snapshot/tls.rs` the `wss://` listeners' certificates (SNI). `state`: what every
//!   connection of the running gateway shares (the current snapshot, shutdown, registry,
//!   metrics, pools), held by the workers, the proxy, the reloader and the admin API.
//! - [`reload`] (`src/reload.rs`; `reload/watch.rs` for `server.watch`, `reload/drain.rs` for
//!   `server.drain_old`): validate, compile on every worker, swap the snapshot.
//! - [`policy`]: the hook traits the proxy calls at each phase, what they take and give
//!   (`policy/data.rs` a data message, `policy/summary.rs` a connection's end) and their
//!   verdicts; no sockets, and nothing from the proxy.
//!   The Lua engine is `src/policy/lua/mod.rs` (one VM per worker and snapshot);
//!   `src/policy/validate/` the `[route.validate]` JSON Schema layer around a route's hooks.
//! - [`proxy`]: the upgrade (`proxy/upgrade.rs`, both handshakes), the relay loop
//!   (`proxy/relay.rs`), each leg's reading, writing and closing (`proxy/leg/`), the lifetime
//!   timers (`proxy/lifetime.rs`), what is counted per message (`proxy/meter.rs`), closing
//!   (`proxy/close.rs`), and HTTP mode for routes with `http = "proxy"` (`proxy/http/`: hyper
//!   on both sides, streamed bodies, CORS); permessage-deflate: its negotiation per leg
//!   (`proxy/extensions.rs`) and its codec (`proxy/deflate.rs`).
//! - [`metrics`] (`src/metrics/`): per-worker counters, summed and encoded for Prometheus on
//!   each scrape.
//! - [`registry`] (`src/registry.rs`): the open connections, their tags, live counts and
//!   bounded control channels, for the admin API; [`request_record`] the upgrade request as
//!   the registry and the captures keep it, secrets masked.
//! - [`jwt`] (`src/jwt/`): `[route.jwt]`: finding, verifying and stripping tokens; the
//!   process-wide JWKS cache and its HTTPS fetches.
//! - [`upstream`]: connecting to upstreams over TCP or TLS; [`upstream::pool`] the `[[upstream]]`
//!   pools' live state (gateway-wide, kept across reloads), balancing (`pool/balance.rs`),
//!   active health checks (`pool/health.rs`), DNS discovery (`pool/discovery.rs`) and etcd
//!   discovery (`pool/etcd.rs`);
//!   `proxy/pooled.rs` the attempts and retries before the 101; [`config::pool`] their tables.
//! - `client_http`: the client's HTTP/1.1 side: request heads under a timeout, answers, the 101.
//! - `listener`: the connection cap, serving one client connection (in its tracing span);
//!   `listener/tls.rs` the `[[server.tls]]` listeners' TLS handshake.
//! - `worker`: worker threads, each a current-thread runtime with its compiled policies per
//!   live snapshot; `worker/accept.rs` the accept loops, `worker/admission.rs` the pending set.
//! - [`capture`]: the traffic console's per-connection captures (a bounded ring of what each
//!   message looked like and what became of it), written by the relay, read by the admin.
//! - [`fleet`]: `[shared] backend = "redis"`: `gw.shared` and `gw.limit` in Redis for a fleet of
//!   gateways (the policy engine's `FleetStore`), leases, the frame cache and writer, Sentinel;
//!   `fleet/registry` the fleet-wide connection registry (`scope=fleet`).
//! - [`admin`]: the admin HTTP listener; `admin/gateway_api.rs` is the gateway's side of it.
//! - [`gateway`]: build, start, reload and shut down a gateway.
//! - [`policy_test`]: `framegate policy-test`, running a policy on a message without sockets.
//! - [`samples`]: built-in sample upstreams (echo, broadcast chat) for demos and tests.
//!
//! Running a gateway in-process, as the integration tests do:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = framegate::Config::from_toml(
//!     r#"
//!     [server]
//!     listen = ["127.0.0.1:0"]
//!     [[route]]
//!     path = "/echo"
//!     upstream = "ws://127.0.0.1:9001/"
//!     "#,
//!     std::path::Path::new("inline.toml"),
//! )?;
//! let running = framegate::Gateway::new(config)?.start().await?;
//! println!("listening on {}", running.local_addr());
//! running.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod capture;
mod client_http;
pub mod config;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod header_fields;
pub mod jwt;
mod listener;
mod masking;
pub mod metrics;
pub mod policy;
pub mod policy_test;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod request_record;
pub mod route;
pub mod samples;
pub mod snapshot;
mod state;
pub mod upstream;
mod worker;

pub use config::Config;
pub use gateway::{Gateway, Running, ShutdownOutcome, StartError};
