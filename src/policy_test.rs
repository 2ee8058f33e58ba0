//! `framegate policy-test`: run a frame policy on a message without a gateway or an upstream,
//! and report its decision; or run a spec file of such cases and check each expectation.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use crate::config::Config;
use crate::policy::lua::{test_hooks, Engine};
use crate::policy::shared::SharedDict;
use crate::policy::{Direction, Outbound, Verdict};

/// One message to test.
#[derive(Debug, Clone)]
pub struct Case {
    /// The message body.
    pub message: String,
    /// Send it as a binary message.
    pub binary: bool,
    /// `client` (on_client_frame) or `server` (on_server_frame).
    pub direction: Direction,
    /// The upgrade context, as JSON.
    pub ctx: Option<String>,
}

/// What the policy decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// `forward`, `replace`, `drop` or `close`.
    pub kind: &'static str,
    /// The payload sent on (forward or replace).
    pub payload: Option<String>,
    /// The close code and reason (close).
    pub close: Option<(u16, String)>,
    /// Messages the policy sent to the client.
    pub to_client: Vec<String>,
    /// Messages the policy sent to the server.
    pub to_server: Vec<String>,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "decision: {}", self.kind)?;
        if let Some(p) = &self.payload {
            writeln!(f, "payload: {p}")?;
        }
        if let Some((code, reason)) = &self.close {
            writeln!(f, "close: {code} {reason}")?;
        }
        for m in &self.to_client {
            writeln!(f, "sent to client: {m}")?;
        }
        for m in &self.to_server {
            writeln!(f, "sent to server: {m}")?;
        }
        Ok(())
    }
}

fn shown(m: &Message) -> String {
    match m {
        Message::Text(t) => t.to_string(),
        other => format!(
            "<binary {} bytes: {}>",
            other.len(),
            String::from_utf8_lossy(&other.clone().into_data())
        ),
    }
}

/// A one-route engine with `script` bound to both frame phases.
fn engine_for(script: &Path, mime: &str) -> Result<Engine, String> {
    let toml = format!(
        "[[route]]\npath = \"/policy-test\"\nupstream = \"ws://127.0.0.1:1/\"\nmime_type = {mime:?}\n[route.policies]\non_client_frame = {s:?}\non_server_frame = {s:?}\n",
        s = script.display().to_string()
    );
    let origin = std::env::current_dir()
        .map_err(|e| e.to_string())?
        .join("policy-test");
    let config = Config::from_toml(&toml, &origin).map_err(|e| e.message)?;
    Engine::new(&config, Arc::new(SharedDict::default())).map_err(|e| e.to_string())
}

/// Runs `script` on one message and returns its decision.
pub fn run(script: &Path, mime: &str, case: &Case) -> Result<Decision, String> {
    let engine = engine_for(script, mime)?;
    decide(&engine, case)
}

fn decide(engine: &Engine, case: &Case) -> Result<Decision, String> {
    let mut hooks = test_hooks(engine, 0, case.ctx.as_deref())?;
    let message = if case.binary {
        Message::binary(case.message.clone().into_bytes())
    } else {
        Message::text(case.message.clone())
    };
    let (mut to_client, mut to_upstream) = (VecDeque::new(), VecDeque::new());
    let verdict = hooks.on_message(
        case.direction,
        message.clone(),
        Outbound {
            to_client: &mut to_client,
            to_upstream: &mut to_upstream,
            room_to_client: usize::MAX,
            room_to_upstream: usize::MAX,
            expire_at: &mut None,
        },
    );
    let mut decision = Decision {
        kind: "forward",
        payload: None,
        close: None,
        to_client: to_client.iter().map(shown).collect(),
        to_server: to_upstream.iter().map(shown).collect(),
    };
    match verdict {
        Verdict::Forward(m) if m == message => decision.payload = Some(shown(&m)),
        Verdict::Forward(m) => {
            decision.kind = "replace";
            decision.payload = Some(shown(&m));
        }
        Verdict::Drop => decision.kind = "drop",
        Verdict::Close(frame) => {
            decision.kind = "close";
            decision.close = Some((u16::from(frame.code), frame.reason.to_string()));
        }
    }
    Ok(decision)
}

/// A spec file: cases with expectations.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    script: String,
    #[serde(default = "default_mime")]
    mime_type: String,
    #[serde(rename = "case", default)]
    cases: Vec<SpecCase>,
}

fn default_mime() -> String {
    crate::config::defaults::MIME_TYPE.to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecCase {
    name: String,
    message: String,
    #[serde(default)]
    binary: bool,
    #[serde(default)]
    direction: Option<String>,
    #[serde(default)]
    ctx: Option<toml::Value>,
    expect: String,
    payload: Option<String>,
    close_code: Option<u16>,
    #[serde(default)]
    sent_to_client: Option<Vec<String>>,
    #[serde(default)]
    sent_to_server: Option<Vec<String>>,
}

/// The outcome of a spec file.
#[derive(Debug, Default)]
pub struct SpecReport {
    /// One line per case: `ok - name` or `FAILED - name: why`.
    pub lines: Vec<String>,
    /// Cases that met their expectations.
    pub passed: usize,
    /// Cases that did not.
    pub failed: usize,
}

/// Runs every case of the spec file at `path`. Script paths are relative to the spec's folder.
pub fn run_spec(path: &Path) -> Result<SpecReport, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let spec: Spec =
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    let script = path.parent().unwrap_or(Path::new("")).join(&spec.script);
    let engine = engine_for(&script, &spec.mime_type)?;
    let mut report = SpecReport::default();
    for c in &spec.cases {
        let direction = match c.direction.as_deref() {
            None | Some("client") => Direction::ClientToUpstream,
            Some("server") => Direction::UpstreamToClient,
            Some(other) => {
                return Err(format!(
                    "case {:?}: direction must be client or server, not {other:?}",
                    c.name
                ))
            }
        };
        let ctx = c
            .ctx
            .as_ref()
            .map(|v| serde_json::to_string(v).map_err(|e| e.to_string()))
            .transpose()?;
        let case = Case {
            message: c.message.clone(),
            binary: c.binary,
            direction,
            ctx,
        };
        let outcome = decide(&engine, &case).and_then(|d| check(c, &d).map(|()| d));
        match outcome {
            Ok(_) => {
                report.passed += 1;
                report.lines.push(format!("ok - {}", c.name));
            }
            Err(why) => {
                report.failed += 1;
                report.lines.push(format!("FAILED - {}: {why}", c.name));
            }
        }
    }
    Ok(report)
}

/// Payloads match when equal as text, or as JSON values when both are JSON (a re-encoded table
/// does not keep its key order).
fn same_payload(want: &str, got: &str) -> bool {
    want == got
        || matches!(
            (serde_json::from_str::<serde_json::Value>(want), serde_json::from_str::<serde_json::Value>(got)),
            (Ok(a), Ok(b)) if a == b
        )
}

fn check(c: &SpecCase, d: &Decision) -> Result<(), String> {
    if d.kind != c.expect {
        return Err(format!("expected {}, got {}", c.expect, d.kind));
    }
    if let Some(want) = &c.payload {
        if !d
            .payload
            .as_ref()
            .is_some_and(|got| same_payload(want, got))
        {
            return Err(format!("expected payload {want:?}, got {:?}", d.payload));
        }
    }
    if let Some(code) = c.close_code {
        if d.close.as_ref().map(|(c, _)| *c) != Some(code) {
            return Err(format!("expected close code {code}, got {:?}", d.close));
        }
    }
    if let Some(want) = &c.sent_to_client {
        if want.len() != d.to_client.len()
            || !want
                .iter()
                .zip(&d.to_client)
                .all(|(w, g)| same_payload(w, g))
        {
            return Err(format!(
                "expected {want:?} sent to the client, got {:?}",
                d.to_client
            ));
        }
    }
    if let Some(want) = &c.sent_to_server {
        if want.len() != d.to_server.len()
            || !want
                .iter()
                .zip(&d.to_server)
                .all(|(w, g)| same_payload(w, g))
        {
            return Err(format!(
                "expected {want:?} sent to the server, got {:?}",
                d.to_server
            ));
        }
    }
    Ok(())
}
