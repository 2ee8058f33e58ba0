//! `framegate policy-test`: run a frame policy on a message without a gateway or an upstream,
//! and report its decision; or run a spec file of such cases and check each expectation.
//! With a JSON Schema (`--schema`), the message is validated first, as a route's
//! `[route.validate]` does, through the same layer of hooks.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::config::{Config, OnInvalid};
use crate::policy::lua::{test_hooks, Engine};
use crate::policy::shared::SharedDict;
use crate::policy::validate::Schemas;
use crate::policy::{Data, Direction, FrameHooks, Outbound, PassThrough, Verdict};

/// `--schema`: the JSON Schema a message is validated against before the policy, for both
/// directions, and what an invalid message gets.
#[derive(Debug, Clone)]
pub struct SchemaTest {
    /// The schema file.
    pub path: PathBuf,
    /// `--on-invalid`.
    pub on_invalid: OnInvalid,
}

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
    /// With `--schema`: `valid`, `invalid: <first error>`, or `not checked (binary message)`.
    pub schema: Option<String>,
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
        if let Some(s) = &self.schema {
            writeln!(f, "schema: {s}")?;
        }
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

fn shown(m: &Data) -> String {
    match m.as_text() {
        Some(text) => text.to_owned(),
        None => format!(
            "<binary {} bytes: {}>",
            m.len(),
            String::from_utf8_lossy(m.payload())
        ),
    }
}

/// What a case runs through: the policy's engine (`None`: no script, messages pass) and the
/// compiled schemas (`None`: no `--schema`).
struct Tested {
    engine: Option<Engine>,
    schemas: Option<Arc<Schemas>>,
}

/// A one-route configuration with `script` bound to both frame phases and `schema` as both
/// directions' `[route.validate]` schema, compiled.
fn tested(
    script: Option<&Path>,
    mime: &str,
    schema: Option<&SchemaTest>,
) -> Result<Tested, String> {
    if schema.is_some() && !crate::config::validate::is_json_mime(mime) {
        return Err(format!(
            "--schema checks JSON messages: --mime must be application/json or a +json type, not {mime:?}"
        ));
    }
    let mut toml = format!(
        "[[route]]\npath = \"/policy-test\"\nupstream = \"ws://127.0.0.1:1/\"\nmime_type = {mime:?}\n"
    );
    if let Some(s) = script {
        toml += &format!(
            "[route.policies]\non_client_frame = {s:?}\non_server_frame = {s:?}\n",
            s = s.display().to_string()
        );
    }
    if let Some(v) = schema {
        toml += &format!(
            "[route.validate]\nclient = {s:?}\nserver = {s:?}\non_invalid = {o:?}\n",
            s = v.path.display().to_string(),
            o = v.on_invalid.as_str()
        );
    }
    let origin = std::env::current_dir()
        .map_err(|e| e.to_string())?
        .join("policy-test");
    // An error in the generated text is said without its place in it; one in a schema file
    // keeps the file's own `file:line:column`.
    let config = Config::from_toml(&toml, &origin).map_err(|e| {
        if e.origin == origin {
            e.message
        } else {
            // Its hint names the configuration key, which `--schema` stands for here.
            crate::config::ConfigError { hint: None, ..e }.to_string()
        }
    })?;
    let engine = match script {
        Some(_) => {
            Some(Engine::new(&config, Arc::new(SharedDict::default())).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let schemas = match config.routes[0].validate.as_deref() {
        Some(v) => Some(Arc::new(Schemas::compile(v).map_err(|e| e.to_string())?)),
        None => None,
    };
    Ok(Tested { engine, schemas })
}

/// Runs `script` (or, with `schema`, no script at all) on one message, after validating it
/// against `schema`, and returns the decision.
pub fn run(
    script: Option<&Path>,
    mime: &str,
    case: &Case,
    schema: Option<&SchemaTest>,
) -> Result<Decision, String> {
    decide(&tested(script, mime, schema)?, case)
}

fn decide(tested: &Tested, case: &Case) -> Result<Decision, String> {
    let inner: Box<dyn FrameHooks> = match &tested.engine {
        Some(engine) => test_hooks(engine, 0, case.ctx.as_deref())?,
        None => Box::new(PassThrough),
    };
    let mut hooks = crate::policy::validate::wrap(inner, tested.schemas.as_ref(), None);
    let schema = tested
        .schemas
        .as_ref()
        .map(|s| match s.for_direction(case.direction) {
            Some(_) if case.binary => "not checked (binary message)".to_owned(),
            Some(schema) => match schema.check(&case.message) {
                Ok(()) => "valid".to_owned(),
                Err(detail) => format!("invalid: {detail}"),
            },
            None => "not checked".to_owned(),
        });
    let message = if case.binary {
        Data::binary(case.message.clone().into_bytes())
    } else {
        Data::text(case.message.clone())
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
        schema,
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
    script: Option<String>,
    /// A JSON Schema each case is validated against first, as `--schema` does.
    schema: Option<String>,
    /// What an invalid case gets (`close`, `drop`, `reply`), as `--on-invalid` says.
    on_invalid: Option<String>,
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
    let folder = path.parent().unwrap_or(Path::new(""));
    if spec.script.is_none() && spec.schema.is_none() {
        return Err(format!(
            "{}: a spec needs a script, a schema, or both",
            path.display()
        ));
    }
    if spec.on_invalid.is_some() && spec.schema.is_none() {
        return Err(format!("{}: on_invalid needs a schema", path.display()));
    }
    let script = spec.script.as_ref().map(|s| folder.join(s));
    let schema = match &spec.schema {
        None => None,
        Some(s) => Some(SchemaTest {
            path: folder.join(s),
            on_invalid: match &spec.on_invalid {
                None => OnInvalid::default(),
                Some(word) => OnInvalid::parse(word).ok_or_else(|| {
                    format!(
                        "{}: on_invalid must be close, drop or reply, not {word:?}",
                        path.display()
                    )
                })?,
            },
        }),
    };
    let tested = tested(script.as_deref(), &spec.mime_type, schema.as_ref())?;
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
        let outcome = decide(&tested, &case).and_then(|d| check(c, &d).map(|()| d));
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
