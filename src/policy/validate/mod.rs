//! `[route.validate]` as frame hooks: a layer around a connection's hooks (its Lua frame
//! policies, or none) that checks each text message against its direction's JSON Schema
//! before the inner hooks see it, and applies `on_invalid` to a message that fails. The proxy
//! sees the layer as any other [`FrameHooks`], so the relay has no validation code of its own.
//!
//! Order, per message: the legs' limits (size, UTF-8) while reading, then this check, then
//! the frame policy. Binary messages are not checked (the schema is for JSON text); they go
//! to the inner hooks as before. A route without `[route.validate]` gets no layer at all, so
//! its messages cost nothing more (and a direction no one inspects is still relayed straight
//! from the read buffer). A direction with a schema and no frame policy is only checked
//! ([`FrameHooks::checks_only`]): the proxy relays it byte for byte too, and shows each whole
//! text message to [`FrameHooks::check`] on the way. Messages are read in place for the
//! check (`text.rs`); serde_json decides what that reader leaves to it.
//!
//! The schemas are compiled once per snapshot ([`Schemas::compile`], from
//! `Snapshot::build`) and shared by every connection routed with that snapshot, on every
//! worker.

mod locate;
mod schema;
mod text;

pub use schema::{cut, Schema, MAX_DETAIL};

use std::sync::Arc;

use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use super::{CloseSummary, Data, Direction, FrameHooks, Outbound, Verdict};
use crate::config::{ConfigError, OnInvalid, ValidateConfig};
use crate::metrics::RouteMetrics;

/// The longest close reason RFC 6455 allows (a control frame's 125 bytes, less the code).
const MAX_CLOSE_REASON: usize = 123;

/// A route's compiled `[route.validate]`.
#[derive(Debug)]
pub struct Schemas {
    client: Option<Schema>,
    server: Option<Schema>,
    on_invalid: OnInvalid,
}

impl Schemas {
    /// Compiles the route's schemas.
    pub fn compile(config: &ValidateConfig) -> Result<Schemas, ConfigError> {
        Ok(Schemas {
            client: config.client.as_ref().map(Schema::compile).transpose()?,
            server: config.server.as_ref().map(Schema::compile).transpose()?,
            on_invalid: config.on_invalid,
        })
    }

    /// The schema for messages travelling `direction`, if there is one.
    pub fn for_direction(&self, direction: Direction) -> Option<&Schema> {
        match direction {
            Direction::ClientToUpstream => self.client.as_ref(),
            Direction::UpstreamToClient => self.server.as_ref(),
        }
    }

    /// What an invalid message gets.
    pub fn on_invalid(&self) -> OnInvalid {
        self.on_invalid
    }
}

/// `inner` behind the route's schemas, if it has any; without, `inner` itself (nothing is
/// added to its messages' path). `metrics` is the route's set on this worker (`None` in
/// `framegate policy-test`).
pub fn wrap(
    inner: Box<dyn FrameHooks>,
    schemas: Option<&Arc<Schemas>>,
    metrics: Option<Arc<RouteMetrics>>,
) -> Box<dyn FrameHooks> {
    let Some(schemas) = schemas else {
        return inner;
    };
    if let Some(m) = &metrics {
        m.validating_connection();
    }
    Box::new(Validating {
        inner_inspects: [
            inner.inspects(Direction::ClientToUpstream),
            inner.inspects(Direction::UpstreamToClient),
        ],
        inner,
        schemas: schemas.clone(),
        metrics,
        reply_refused: false,
    })
}

/// The reply `on_invalid = "reply"` sends: `{"error":"invalid message","detail":"…"}`.
pub fn reply_for(detail: &str) -> String {
    // Written out, so that the keys keep this order.
    let detail = serde_json::Value::from(detail);
    format!(r#"{{"error":"invalid message","detail":{detail}}}"#)
}

/// The close frame `on_invalid = "close"` sends both legs: 1007, the first error as reason.
pub fn close_for(detail: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::Invalid,
        reason: cut(detail.to_owned(), MAX_CLOSE_REASON).into(),
    }
}

/// The validating layer of one connection.
struct Validating {
    inner: Box<dyn FrameHooks>,
    /// Whether `inner` looks at each direction, asked once (as the relay does).
    inner_inspects: [bool; 2],
    schemas: Arc<Schemas>,
    metrics: Option<Arc<RouteMetrics>>,
    /// A reply that did not fit the sender's queue has been logged (once per connection).
    reply_refused: bool,
}

impl Validating {
    /// Applies `on_invalid` to a message its schema refused with `detail`.
    fn invalid(&mut self, direction: Direction, detail: String, out: Outbound<'_>) -> Verdict {
        if let Some(m) = &self.metrics {
            m.validation_failure(match direction {
                Direction::ClientToUpstream => crate::metrics::Direction::ClientToUpstream,
                Direction::UpstreamToClient => crate::metrics::Direction::UpstreamToClient,
            });
        }
        let from = match direction {
            Direction::ClientToUpstream => "client",
            Direction::UpstreamToClient => "upstream",
        };
        tracing::debug!(from, %detail, on_invalid = self.schemas.on_invalid.as_str(), "message refused by its JSON Schema");
        match self.schemas.on_invalid {
            OnInvalid::Close => Verdict::Close(close_for(&detail)),
            OnInvalid::Drop => Verdict::Drop,
            OnInvalid::Reply => {
                let reply = reply_for(&detail);
                // Back to the sender, within what its queue may still hold.
                let (queue, room) = match direction {
                    Direction::ClientToUpstream => (out.to_client, out.room_to_client),
                    Direction::UpstreamToClient => (out.to_upstream, out.room_to_upstream),
                };
                if reply.len() <= room {
                    queue.push_back(Data::text(reply));
                } else if !self.reply_refused {
                    self.reply_refused = true;
                    tracing::warn!(
                        from,
                        bytes = reply.len(),
                        "[route.validate] reply not sent: queue full (route.max_queued_bytes); the message is dropped; logged once per connection"
                    );
                }
                Verdict::Drop
            }
        }
    }
}

impl FrameHooks for Validating {
    fn on_message(&mut self, direction: Direction, message: Data, out: Outbound<'_>) -> Verdict {
        if let (Some(schema), Some(text)) =
            (self.schemas.for_direction(direction), message.as_text())
        {
            if let Err(detail) = schema.check(text) {
                return self.invalid(direction, detail, out);
            }
        }
        if self.inner_inspects[direction as usize] {
            self.inner.on_message(direction, message, out)
        } else {
            Verdict::Forward(message)
        }
    }

    fn inspects(&self, direction: Direction) -> bool {
        self.schemas.for_direction(direction).is_some() || self.inner_inspects[direction as usize]
    }

    /// A direction with a schema and no inner hook is only checked: the proxy relays its
    /// messages byte for byte after [`FrameHooks::check`].
    fn checks_only(&self, direction: Direction) -> bool {
        self.schemas.for_direction(direction).is_some() && !self.inner_inspects[direction as usize]
    }

    fn check(&mut self, direction: Direction, text: &str, out: Outbound<'_>) -> Option<Verdict> {
        let schema = self.schemas.for_direction(direction)?;
        let detail = schema.check(text).err()?;
        Some(self.invalid(direction, detail, out))
    }

    fn upstream_chosen(&mut self, endpoint: &str) {
        self.inner.upstream_chosen(endpoint);
    }

    fn close_pending(
        &mut self,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>> {
        self.inner.close_pending()
    }

    fn on_close(&mut self, summary: &CloseSummary) {
        self.inner.on_close(summary);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SchemaFile;
    use std::collections::VecDeque;

    fn schemas(on_invalid: OnInvalid) -> Arc<Schemas> {
        let file = SchemaFile {
            path: "in.json".into(),
            json: Arc::new(serde_json::json!({"type": "object", "required": ["type"]})),
        };
        Arc::new(
            Schemas::compile(&ValidateConfig {
                client: Some(file),
                server: None,
                on_invalid,
            })
            .unwrap(),
        )
    }

    /// Runs one client message through the layer around no hooks: the verdict and what was
    /// queued for the client.
    fn run(on_invalid: OnInvalid, text: &str, room: usize) -> (Verdict, VecDeque<Data>) {
        let mut hooks = wrap(
            Box::new(super::super::PassThrough),
            Some(&schemas(on_invalid)),
            None,
        );
        assert!(hooks.inspects(Direction::ClientToUpstream));
        assert!(!hooks.inspects(Direction::UpstreamToClient));
        let (mut to_client, mut to_upstream) = (VecDeque::new(), VecDeque::new());
        let verdict = hooks.on_message(
            Direction::ClientToUpstream,
            Data::text(text),
            Outbound {
                to_client: &mut to_client,
                to_upstream: &mut to_upstream,
                room_to_client: room,
                room_to_upstream: room,
                expire_at: &mut None,
            },
        );
        assert!(to_upstream.is_empty());
        (verdict, to_client)
    }

    #[test]
    fn each_on_invalid() {
        let (v, q) = run(OnInvalid::Close, r#"{"type":"a"}"#, 1 << 20);
        assert!(matches!(v, Verdict::Forward(m) if m == Data::text(r#"{"type":"a"}"#)));
        assert!(q.is_empty());
        let (v, _) = run(OnInvalid::Close, "{}", 1 << 20);
        let Verdict::Close(frame) = v else {
            panic!("{v:?}")
        };
        assert_eq!(u16::from(frame.code), 1007);
        assert_eq!(frame.reason.as_str(), r#""type" is a required property"#);
        let (v, q) = run(OnInvalid::Drop, "{}", 1 << 20);
        assert!(matches!(v, Verdict::Drop) && q.is_empty());
        let (v, q) = run(OnInvalid::Reply, "{}", 1 << 20);
        assert!(matches!(v, Verdict::Drop));
        assert_eq!(
            q.front().unwrap().as_text().unwrap(),
            r#"{"error":"invalid message","detail":"\"type\" is a required property"}"#
        );
        // No room for the reply: the message is dropped all the same, without it.
        let (v, q) = run(OnInvalid::Reply, "{}", 10);
        assert!(matches!(v, Verdict::Drop) && q.is_empty());
    }

    #[test]
    fn a_route_without_schemas_keeps_its_hooks() {
        let hooks = wrap(Box::new(super::super::PassThrough), None, None);
        assert!(!hooks.inspects(Direction::ClientToUpstream));
        assert!(!hooks.inspects(Direction::UpstreamToClient));
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let frame = close_for(&"é".repeat(200));
        assert!(frame.reason.len() <= MAX_CLOSE_REASON);
        assert!(frame.reason.as_str().ends_with('…'));
    }
}
