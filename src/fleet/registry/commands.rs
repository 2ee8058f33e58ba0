//! Kicks and broadcasts across the fleet, through Redis pub/sub.
//!
//! - The asking instance subscribes to its reply channel `<prefix>reply:<member>:<random>`,
//!   then publishes a [`Command`] (JSON) on `<prefix>cmd`, acts on its own connections
//!   directly, and collects one [`Reply`] per other member until every member with a live
//!   publication has answered or [`REPLY_WAIT`] has passed; the silent ones are `missing`.
//! - Every instance keeps one subscription to `<prefix>cmd` ([`serve`]): it runs each command
//!   through its registry's own bulk action (the local kick's close code, the local
//!   broadcast's bounded mailboxes) and publishes its count on the command's reply channel.
//!   A lost subscription is made again with backoff ([`MIN_BACKOFF`] doubling to
//!   [`MAX_BACKOFF`]); a ping every third of `shared.lease` finds a connection that died
//!   silently.
//!
//! Bounds: a command is at most [`MAX_COMMAND`] bytes (the admin bounds bodies to 1 MiB; a
//! binary body goes as base64); larger ones, and anything that does not parse, are ignored
//! (logged at debug). At most [`MAX_MEMBERS`] replies are read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{
    unavailable, FleetRegistry, FleetScopeError, COMMAND_TIMEOUT, MAX_MEMBERS, REPLY_WAIT,
};
use crate::registry::{Control, Filter, Message, Outcome, Target};

/// Largest command accepted from `<prefix>cmd`, in bytes.
pub const MAX_COMMAND: usize = 2 << 20;
/// First wait before subscribing again.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait before subscribing again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What travels on `<prefix>cmd`.
#[derive(Debug, Serialize, Deserialize)]
struct Command {
    /// The asking member (which acts on its own connections itself).
    from: String,
    /// Where the answers go.
    reply: String,
    /// Which connections.
    filter: Filter,
    /// What to do with them (`"action": "close" | "text" | "binary"` and its fields, in the
    /// command itself).
    #[serde(flatten)]
    action: Action,
}

/// A [`Control`] on the wire.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase")]
enum Action {
    /// `Control::Close`.
    Close { code: u16, reason: String },
    /// `Control::Send` of a text message.
    Text { to: Target, text: String },
    /// `Control::Send` of a binary message, base64.
    Binary { to: Target, base64: String },
}

impl Action {
    fn from_control(control: &Control) -> Option<Action> {
        Some(match control {
            Control::Close { code, reason } => Action::Close {
                code: *code,
                reason: reason.clone(),
            },
            Control::Send {
                to,
                message: Message::Text(text),
            } => Action::Text {
                to: *to,
                text: text.to_string(),
            },
            Control::Send {
                to,
                message: Message::Binary(bytes),
            } => Action::Binary {
                to: *to,
                base64: base64::engine::general_purpose::STANDARD.encode(bytes),
            },
            Control::Capture(_) => return None,
        })
    }

    fn into_control(self) -> Option<Control> {
        Some(match self {
            Action::Close { code, reason } => {
                crate::registry::check_close(code, &reason).ok()?;
                Control::Close { code, reason }
            }
            Action::Text { to, text } => Control::Send {
                to,
                message: Message::Text(text.into()),
            },
            Action::Binary { to, base64 } => Control::Send {
                to,
                message: Message::Binary(
                    base64::engine::general_purpose::STANDARD
                        .decode(base64)
                        .ok()?
                        .into(),
                ),
            },
        })
    }
}

/// One instance's answer.
#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    member: String,
    instance: String,
    #[serde(flatten)]
    outcome: Outcome,
}

/// The answer of a `scope=fleet` kick or broadcast.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetOutcome {
    /// Each answering instance's bulk action (summed when two members share a name).
    pub instances: BTreeMap<String, Outcome>,
    /// The sum over `instances`.
    pub total: Outcome,
    /// Instances with a live publication that did not answer within the wait.
    pub missing: Vec<String>,
}

impl FleetOutcome {
    fn add(&mut self, instance: &str, o: Outcome) {
        let slot = self.instances.entry(instance.to_owned()).or_default();
        for (sum, n) in [(slot, o), (&mut self.total, o)] {
            sum.matched += n.matched;
            sum.queued += n.queued;
            sum.skipped += n.skipped;
        }
    }
}

/// Asks every instance to apply `control` to the connections matching `f`.
pub(super) async fn ask(
    me: &FleetRegistry,
    f: &Filter,
    control: &Control,
) -> Result<FleetOutcome, FleetScopeError> {
    let mut conn = me.connection()?;
    let Some(action) = Action::from_control(control) else {
        return Err(FleetScopeError::Unavailable(
            "this action is not sent to the fleet".into(),
        ));
    };
    let mut expected = me.members(&mut conn).await?;
    let reply = format!(
        "{}reply:{}:{:016x}",
        me.fleet.key_prefix(),
        me.fleet.member(),
        rand::random::<u64>()
    );
    let command = serde_json::to_vec(&Command {
        from: me.fleet.member().to_owned(),
        reply: reply.clone(),
        filter: f.clone(),
        action,
    })
    .map_err(|e| FleetScopeError::Unavailable(e.to_string()))?;
    // Subscribed before the command goes out, so that no answer can come before we listen.
    let mut sub = bounded(me.client()?.get_async_pubsub()).await?;
    bounded(sub.subscribe(&reply)).await?;
    let (_sink, mut replies) = sub.split();
    let channel = format!("{}cmd", me.fleet.key_prefix());
    let _: i64 = bounded(
        redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(command)
            .query_async(&mut conn),
    )
    .await?;
    let mut outcome = FleetOutcome::default();
    outcome.add(me.instance(), me.local(f, control));
    let deadline = tokio::time::Instant::now() + REPLY_WAIT;
    let mut read = 0;
    while !expected.is_empty() && read < MAX_MEMBERS {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline, replies.next()).await else {
            break;
        };
        read += 1;
        let Ok(r) = serde_json::from_slice::<Reply>(msg.get_payload_bytes()) else {
            continue;
        };
        expected.remove(&r.member);
        outcome.add(&r.instance, r.outcome);
    }
    let mut missing: Vec<String> = expected.into_values().collect();
    missing.sort();
    missing.dedup();
    outcome.missing = missing;
    Ok(outcome)
}

/// `op` within [`COMMAND_TIMEOUT`], its failure as unavailability.
async fn bounded<T>(
    op: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, FleetScopeError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, op).await {
        Ok(result) => result.map_err(unavailable),
        Err(_) => Err(FleetScopeError::Unavailable(format!(
            "no answer within {COMMAND_TIMEOUT:?}"
        ))),
    }
}

/// Keeps a subscription to `<prefix>cmd` and serves its commands, for ever.
pub(super) async fn serve(me: &Arc<FleetRegistry>) {
    let mut backoff = MIN_BACKOFF;
    let mut logged_down = false;
    loop {
        match subscribe(me).await {
            Err(e) => {
                me.fleet.registry_failed();
                if !logged_down {
                    logged_down = true;
                    tracing::warn!(error = %e, "fleet registry: cannot subscribe to the fleet's commands; retrying with backoff");
                }
            }
            Ok(sub) => {
                if logged_down {
                    logged_down = false;
                    tracing::info!("fleet registry: subscribed to the fleet's commands again");
                }
                backoff = MIN_BACKOFF;
                // Stores a permit: the first one lets the publisher start.
                me.listening.notify_one();
                listen(me, sub).await;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn subscribe(me: &FleetRegistry) -> Result<redis::aio::PubSub, FleetScopeError> {
    let mut sub = bounded(me.client()?.get_async_pubsub()).await?;
    bounded(sub.subscribe(format!("{}cmd", me.fleet.key_prefix()))).await?;
    Ok(sub)
}

/// Serves commands until the subscription's connection ends or stops answering pings.
async fn listen(me: &FleetRegistry, sub: redis::aio::PubSub) {
    let (mut sink, mut stream) = sub.split();
    let mut ping = tokio::time::interval(me.fleet.lease() / 3);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                None => return,
                Some(msg) => handle(me, msg.get_payload_bytes()).await,
            },
            _ = ping.tick() => {
                if bounded(sink.ping::<redis::Value>()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Runs one command from `<prefix>cmd` and answers it.
async fn handle(me: &FleetRegistry, payload: &[u8]) {
    if payload.len() > MAX_COMMAND {
        tracing::debug!(
            bytes = payload.len(),
            "fleet command over {MAX_COMMAND} bytes ignored"
        );
        return;
    }
    let command: Command = match serde_json::from_slice(payload) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "fleet command that does not parse ignored");
            return;
        }
    };
    // The asker acts on its own connections itself; replies go to reply channels only.
    let replies = format!("{}reply:", me.fleet.key_prefix());
    if command.from == me.fleet.member() || !command.reply.starts_with(&replies) {
        return;
    }
    let Some(control) = command.action.into_control() else {
        tracing::debug!("fleet command with an invalid action ignored");
        return;
    };
    // The admin's rule, held here too: no close of every connection at once.
    if matches!(control, Control::Close { .. }) && command.filter.is_everything() {
        tracing::debug!("fleet close without a filter ignored");
        return;
    }
    let outcome = me.local(&command.filter, &control);
    let Ok(answer) = serde_json::to_vec(&Reply {
        member: me.fleet.member().to_owned(),
        instance: me.instance().to_owned(),
        outcome,
    }) else {
        return;
    };
    let Some(mut conn) = me.current() else {
        return;
    };
    let sent = bounded(
        redis::cmd("PUBLISH")
            .arg(&command.reply)
            .arg(answer)
            .query_async::<i64>(&mut conn),
    )
    .await;
    if let Err(e) = sent {
        tracing::debug!(error = %e, "fleet registry: could not answer a command");
    }
}
