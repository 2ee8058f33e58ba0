//! The frame phase: the `msg` and `conn` objects, and [`LuaFrameHooks`], which runs
//! `on_client_frame`, `on_server_frame` and `on_close` for one connection.

use std::cell::{OnceCell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use mlua::{AnyUserData, Lua, Table, UserData, UserDataFields, UserDataMethods, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use super::codec::Codec;
use super::{misuse, Engine, Limits, LuaRoutePolicy, Script, Vm};
use crate::config::OnPolicyError;
use crate::metrics::{Phase, PolicyErrorKind, RouteMetrics};
use crate::policy::{CloseSummary, Data, Direction, FrameHooks, Outbound, PolicyError, Verdict};

/// At most this many messages may be sent by one policy call.
const MAX_SENDS_PER_CALL: usize = 64;

/// What the running call may do, shared by the hooks and the `conn` object.
#[derive(Default)]
struct CallState {
    /// `Some` during a frame call: the direction of the message being handled.
    direction: Option<Direction>,
    /// True during `on_close`.
    closing: bool,
    /// Messages sent by the call: (towards the client?, message).
    sends: Vec<(bool, Data)>,
    /// Set by `conn:close`.
    close: Option<CloseFrame>,
    /// Payload bytes the call may still send towards the client, then the upstream (see
    /// [`Outbound`]).
    room: [usize; 2],
    /// Whether a send of this connection has been refused for lack of room: logged once.
    refused: bool,
    /// Set by `conn:expire_at`: the new close time.
    expire_at: Option<std::time::SystemTime>,
}

/// `msg`: one data message. The object is reused for every message of a connection; after the
/// call that received it, it is empty. The hooks refill it through their own handle on its
/// state, without going through Lua's userdata type check.
struct Msg(Rc<RefCell<MsgState>>);

/// What `msg` holds.
struct MsgState {
    payload: Bytes,
    is_text: bool,
    direction: Direction,
    mime: Rc<str>,
    codec: Option<&'static dyn Codec>,
    /// `msg.json` and `msg.json_error`, decoded on first access.
    decoded: OnceCell<(Value, Option<String>)>,
}

impl MsgState {
    fn decoded(&self, lua: &Lua) -> &(Value, Option<String>) {
        self.decoded.get_or_init(|| {
            if !self.is_text {
                return (Value::Nil, Some("binary message".into()));
            }
            match self.codec {
                None => (
                    Value::Nil,
                    Some(format!("mime type {} has no decoder", self.mime)),
                ),
                Some(codec) => match codec.decode(lua, &self.payload) {
                    Ok(v) => (v, None),
                    Err(e) => (Value::Nil, Some(e)),
                },
            }
        })
    }
}

impl UserData for Msg {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("type", |_, m| {
            Ok(if m.0.borrow().is_text {
                "text"
            } else {
                "binary"
            })
        });
        fields.add_field_method_get("data", |lua, m| lua.create_string(&m.0.borrow().payload));
        fields.add_field_method_get("size", |_, m| Ok(m.0.borrow().payload.len()));
        fields.add_field_method_get("direction", |_, m| {
            Ok(match m.0.borrow().direction {
                Direction::ClientToUpstream => "client",
                Direction::UpstreamToClient => "server",
            })
        });
        fields.add_field_method_get("mime", |_, m| Ok(m.0.borrow().mime.to_string()));
        fields.add_field_method_get("json", |lua, m| Ok(m.0.borrow().decoded(lua).0.clone()));
        fields.add_field_method_get("json_error", |lua, m| {
            Ok(m.0.borrow().decoded(lua).1.clone())
        });
        fields.add_field_method_get("text", |lua, m| {
            match simdutf8::basic::from_utf8(&m.0.borrow().payload) {
                Ok(s) => Ok(Value::String(lua.create_string(s)?)),
                Err(_) => Ok(Value::Nil),
            }
        });
    }
}

/// `conn`: the connection, for the whole life of the connection.
struct Conn {
    id: u64,
    state: Table,
    /// `conn.tags`: the tags `on_upgrade` set, read-only.
    tags: Table,
    call: Rc<RefCell<CallState>>,
    codec: Option<&'static dyn Codec>,
}

impl Conn {
    /// Queues `data`: `true`, or `nil, "queue full"` when the leg has no room for it (a
    /// runtime condition the policy may handle, as Kong's PDK reports them).
    fn send(
        &self,
        lua: &Lua,
        method: &str,
        to_client: Option<bool>,
        data: Value,
    ) -> mlua::Result<(bool, Option<&'static str>)> {
        let mut call = self.call.borrow_mut();
        if call.closing {
            return Err(misuse(
                lua,
                format!("conn:{method} cannot be used in on_close: the connection has ended"),
            ));
        }
        let Some(direction) = call.direction else {
            return Err(misuse(
                lua,
                format!("conn:{method} can only be used in on_client_frame or on_server_frame"),
            ));
        };
        if call.sends.len() >= MAX_SENDS_PER_CALL {
            return Err(misuse(
                lua,
                format!("conn:{method}: at most {MAX_SENDS_PER_CALL} messages per call"),
            ));
        }
        // `reply` goes back to whoever sent the message being handled.
        let to_client = to_client.unwrap_or(direction == Direction::ClientToUpstream);
        let message = to_message(lua, &format!("conn:{method}"), data, self.codec)?;
        let room = &mut call.room[usize::from(!to_client)];
        let Some(left) = room.checked_sub(message.len()) else {
            if !call.refused {
                call.refused = true;
                tracing::warn!(
                    conn = self.id,
                    bytes = message.len(),
                    "conn:{method} refused: queue full (route.max_queued_bytes); logged once per connection"
                );
            }
            return Ok((false, Some("queue full")));
        };
        *room = left;
        call.sends.push((to_client, message));
        Ok((true, None))
    }
}

/// A payload given by a policy: a string (text when it is UTF-8, binary otherwise) or a table
/// (encoded per the route's MIME type).
fn to_message(
    lua: &Lua,
    what: &str,
    data: Value,
    codec: Option<&'static dyn Codec>,
) -> mlua::Result<Data> {
    match data {
        Value::String(s) => Ok(Data::text_or_binary(Bytes::copy_from_slice(&s.as_bytes()))),
        Value::Table(_) => {
            let codec = codec.ok_or_else(|| {
                misuse(
                    lua,
                    format!(
                        "{what}: this route's mime_type has no encoder for tables; send a string"
                    ),
                )
            })?;
            let encoded = codec
                .encode(lua, &data)
                .map_err(|e| misuse(lua, format!("{what}: {e}")))?;
            Ok(if codec.is_text() {
                Data::text_or_binary(Bytes::from(encoded))
            } else {
                Data::binary(encoded)
            })
        }
        other => Err(misuse(
            lua,
            format!(
                "{what} expects a string or a table, got {}",
                other.type_name()
            ),
        )),
    }
}

impl UserData for Conn {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("id", |_, c| Ok(c.id));
        fields.add_field_method_get("state", |_, c| Ok(c.state.clone()));
        fields.add_field_method_get("tags", |_, c| Ok(c.tags.clone()));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // `true`, or `nil, "queue full"`.
        let sent = |(ok, err): (bool, Option<&'static str>)| (ok.then_some(true), err);
        methods.add_method("reply", move |lua, c, data: Value| {
            c.send(lua, "reply", None, data).map(sent)
        });
        methods.add_method("send_client", move |lua, c, data: Value| {
            c.send(lua, "send_client", Some(true), data).map(sent)
        });
        methods.add_method("send_server", move |lua, c, data: Value| {
            c.send(lua, "send_server", Some(false), data).map(sent)
        });
        methods.add_method("expire_at", |lua, c, at: Value| {
            let mut call = c.call.borrow_mut();
            if call.direction.is_none() {
                return Err(misuse(
                    lua,
                    "conn:expire_at can only be used in on_client_frame or on_server_frame",
                ));
            }
            let at = match at {
                Value::Integer(i) if i >= 0 => i as f64,
                Value::Number(n) if n.is_finite() && n >= 0.0 => n,
                other => {
                    return Err(misuse(
                        lua,
                        format!(
                            "conn:expire_at expects a Unix time in seconds, got {}",
                            other.to_string().unwrap_or_default()
                        ),
                    ))
                }
            };
            // Too far away to represent: as far as the route's expire allows.
            let far =
                std::time::SystemTime::now() + std::time::Duration::from_secs(86_400 * 365 * 100);
            let at = std::time::Duration::try_from_secs_f64(at)
                .ok()
                .and_then(|d| std::time::UNIX_EPOCH.checked_add(d))
                .unwrap_or(far);
            call.expire_at = Some(at);
            Ok(())
        });
        methods.add_method("close", |lua, c, (code, reason): (Value, Value)| {
            let mut call = c.call.borrow_mut();
            if call.closing {
                return Err(misuse(
                    lua,
                    "conn:close cannot be used in on_close: the connection has ended",
                ));
            }
            let code = match code {
                Value::Nil => 1000,
                Value::Integer(n)
                    if (1000..=4999).contains(&n) && !matches!(n, 1004..=1006 | 1015) =>
                {
                    n as u16
                }
                other => {
                    return Err(misuse(
                        lua,
                        format!(
                            "conn:close: code must be 1000-4999 and not 1004-1006 or 1015, got {}",
                            other.to_string().unwrap_or_default()
                        ),
                    ))
                }
            };
            let reason = match reason {
                Value::Nil => String::new(),
                Value::String(s) if s.as_bytes().len() <= 123 => s.to_str()?.to_owned(),
                Value::String(_) => {
                    return Err(misuse(
                        lua,
                        "conn:close: the reason must be at most 123 bytes",
                    ))
                }
                other => {
                    return Err(misuse(
                        lua,
                        format!(
                            "conn:close: reason must be a string, got {}",
                            other.type_name()
                        ),
                    ))
                }
            };
            call.close = Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            });
            Ok(())
        });
    }
}

/// The frame hooks of one connection on a route with Lua policies.
pub(crate) struct LuaFrameHooks {
    vm: Rc<Vm>,
    on_client_frame: Option<Rc<Script>>,
    on_server_frame: Option<Rc<Script>>,
    on_close: Option<Rc<Script>>,
    limits: Limits,
    on_error: OnPolicyError,
    codec: Option<&'static dyn Codec>,
    id: u64,
    /// The frozen context, built once per connection.
    ctx: Table,
    /// What `ctx` costs against the state limit (measured when it was frozen).
    ctx_size: usize,
    /// `conn.state`, measured against what the state limit leaves after `ctx`.
    state: Table,
    /// How much the Lua heap grew in this connection's calls since `conn.state` was last
    /// measured (see [`LuaFrameHooks::check_state`]).
    grown: usize,
    conn: AnyUserData,
    /// The `msg` object, reused for every message of this connection, and its state.
    msg: AnyUserData,
    msg_state: Rc<RefCell<MsgState>>,
    call: Rc<RefCell<CallState>>,
    /// The route's counters on this worker: call durations and failures by phase.
    metrics: Option<Arc<RouteMetrics>>,
    /// What is left of an `on_close` that waits for the fleet's store.
    close_wait: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>>,
}

/// How a policy call failed, for `framegate_policy_errors_total`. The CPU limit and the state
/// limit are told by their messages (raised by the gateway; a script raising the same text is
/// counted the same way), the memory limit by mlua's own error.
pub(super) fn error_kind(error: &mlua::Error) -> PolicyErrorKind {
    use mlua::Error as E;
    match error {
        E::CallbackError { cause, .. }
        | E::WithContext { cause, .. }
        | E::BadArgument { cause, .. } => error_kind(cause),
        E::MemoryError(_) => PolicyErrorKind::MemoryLimit,
        E::RuntimeError(m) if m.contains("CPU limit exceeded") => PolicyErrorKind::CpuLimit,
        E::RuntimeError(m) if m.contains("policy state limit exceeded") => {
            PolicyErrorKind::MemoryLimit
        }
        _ => PolicyErrorKind::Error,
    }
}

fn phase(direction: Direction) -> Phase {
    match direction {
        Direction::ClientToUpstream => Phase::ClientFrame,
        Direction::UpstreamToClient => Phase::ServerFrame,
    }
}

impl LuaFrameHooks {
    pub(crate) fn new(
        policy: &LuaRoutePolicy,
        id: u64,
        ctx: Table,
        ctx_size: usize,
        tags: Table,
        metrics: Option<Arc<RouteMetrics>>,
    ) -> mlua::Result<Self> {
        let call = Rc::new(RefCell::new(CallState::default()));
        let state = policy.vm.lua.create_table()?;
        let conn = policy.vm.lua.create_userdata(Conn {
            id,
            state: state.clone(),
            tags,
            call: call.clone(),
            codec: policy.codec,
        })?;
        let msg_state = Rc::new(RefCell::new(MsgState {
            payload: Bytes::new(),
            is_text: true,
            direction: Direction::ClientToUpstream,
            mime: policy.mime.clone(),
            codec: policy.codec,
            decoded: OnceCell::new(),
        }));
        let msg = policy.vm.lua.create_userdata(Msg(msg_state.clone()))?;
        Ok(LuaFrameHooks {
            msg,
            msg_state,
            vm: policy.vm.clone(),
            on_client_frame: policy.on_client_frame.clone(),
            on_server_frame: policy.on_server_frame.clone(),
            on_close: policy.on_close.clone(),
            limits: policy.limits,
            on_error: policy.on_error,
            codec: policy.codec,
            id,
            ctx,
            ctx_size,
            state,
            grown: 0,
            conn,
            call,
            metrics,
            close_wait: None,
        })
    }

    /// Keeps `ctx` plus `conn.state` within `route.policy_state_limit`, after a call that
    /// grew the Lua heap by `grown` bytes.
    ///
    /// Walking `conn.state` after every call would cost every message; so it is walked only
    /// once the calls of this connection have grown the heap, all together, by a quarter of
    /// the limit since the last walk. Only a call that allocates can grow `conn.state`, so
    /// `conn.state` passes the limit by at most that quarter before it is caught, and the
    /// walks cost at most about one byte looked at per byte allocated. Past the limit the
    /// call fails (like the memory limit) and `conn.state` is emptied, so the connection
    /// holds no more than the limit.
    fn check_state(&mut self, grown: usize) -> mlua::Result<()> {
        self.grown += grown;
        if self.grown < self.limits.state / 4 {
            return Ok(());
        }
        self.grown = 0;
        let room = self.limits.state.saturating_sub(self.ctx_size);
        // A table nested beyond Lua's stack fails the walk: that is past any limit too.
        let size = self
            .vm
            .sandbox
            .views
            .measure(&self.state, room)
            .unwrap_or(None);
        if size.is_some() {
            return Ok(());
        }
        let lua = &self.vm.lua;
        self.state = lua.create_table()?;
        self.conn.borrow_mut::<Conn>()?.state = self.state.clone();
        Err(mlua::Error::runtime(self.limits.state_exceeded(true)))
    }

    fn failed(
        &self,
        direction: Direction,
        kind: PolicyErrorKind,
        error: PolicyError,
        message: Data,
    ) -> Verdict {
        if let Some(metrics) = &self.metrics {
            metrics.policy_error(phase(direction), kind);
        }
        tracing::warn!(conn = self.id, script = %error.script, error = %error.message, on_error = ?self.on_error, "policy error");
        match self.on_error {
            OnPolicyError::Close => Verdict::Close(CloseFrame {
                code: CloseCode::Error,
                reason: "policy error".into(),
            }),
            OnPolicyError::Pass => Verdict::Forward(message),
            OnPolicyError::Drop => Verdict::Drop,
        }
    }

    /// Turns a frame policy's return value into a verdict.
    fn verdict(
        &self,
        direction: Direction,
        script: &Script,
        returned: Value,
        message: Data,
    ) -> Verdict {
        let failed =
            |error, message| self.failed(direction, PolicyErrorKind::Error, error, message);
        let lua = &self.vm.lua;
        match returned {
            Value::Nil | Value::Boolean(true) => Verdict::Forward(message),
            Value::Boolean(false) => Verdict::Drop,
            Value::String(s) => {
                let bytes = Bytes::copy_from_slice(&s.as_bytes());
                if message.is_text() {
                    match Data::checked_text(bytes) {
                        Some(text) => Verdict::Forward(text),
                        None => failed(
                            script.plain_error(
                                "returned a string that is not UTF-8 for a text message",
                            ),
                            message,
                        ),
                    }
                } else {
                    Verdict::Forward(Data::binary(bytes))
                }
            }
            table @ Value::Table(_) => {
                match to_message(lua, "the returned table", table, self.codec) {
                    Ok(replacement) => Verdict::Forward(replacement),
                    Err(e) => failed(script.error(&e, self.limits), message),
                }
            }
            other => {
                let what = format!(
                    "must return nil, false, a string or a table, not {}",
                    other.type_name()
                );
                failed(script.plain_error(&what), message)
            }
        }
    }
}

impl Script {
    fn plain_error(&self, message: &str) -> PolicyError {
        PolicyError {
            script: self.path.to_string(),
            message: format!("{}: {message}", self.path),
        }
    }
}

impl FrameHooks for LuaFrameHooks {
    fn upstream_chosen(&mut self, endpoint: &str) {
        // The frozen ctx reads through its view table; the gateway adds the field there, so
        // scripts still cannot write it.
        let view = self
            .ctx
            .metatable()
            .and_then(|meta| meta.raw_get::<Table>("__index").ok());
        if let Some(view) = view {
            let _ = view.raw_set("upstream", endpoint);
        }
    }

    fn inspects(&self, direction: Direction) -> bool {
        match direction {
            Direction::ClientToUpstream => self.on_client_frame.is_some(),
            Direction::UpstreamToClient => self.on_server_frame.is_some(),
        }
    }

    fn on_message(&mut self, direction: Direction, message: Data, out: Outbound<'_>) -> Verdict {
        let script = match direction {
            Direction::ClientToUpstream => &self.on_client_frame,
            Direction::UpstreamToClient => &self.on_server_frame,
        };
        let Some(script) = script.clone() else {
            return Verdict::Forward(message);
        };
        let (payload, is_text) = (message.payload().clone(), message.is_text());
        // One `msg` object per connection, refilled for each message: no allocation per call.
        {
            let mut msg = self.msg_state.borrow_mut();
            msg.payload = payload;
            msg.is_text = is_text;
            msg.direction = direction;
            msg.decoded = OnceCell::new();
        }
        {
            let mut call = self.call.borrow_mut();
            call.direction = Some(direction);
            call.room = [out.room_to_client, out.room_to_upstream];
        }
        // Two clock reads cost a tenth of a short call: one call in POLICY_SAMPLE is timed.
        let phase = phase(direction);
        let started = match &self.metrics {
            Some(metrics) if metrics.policy_call_timed(phase) => Some(Instant::now()),
            _ => None,
        };
        let (result, grown) = self.vm.guarded_growth(self.limits, || {
            script
                .function
                .call::<Value>((&self.msg, &self.ctx, &self.conn))
        });
        if let (Some(metrics), Some(started)) = (&self.metrics, started) {
            metrics.policy_call_sampled(phase, started.elapsed());
        }
        let result = match self.check_state(grown) {
            Ok(()) => result,
            Err(e) => Err(e),
        };
        // Release the payload (and anything decoded from it) now, not when Lua collects.
        {
            let mut msg = self.msg_state.borrow_mut();
            msg.payload = Bytes::new();
            msg.decoded = OnceCell::new();
        }
        let close = {
            let mut call = self.call.borrow_mut();
            call.direction = None;
            if result.is_ok() && !call.sends.is_empty() {
                // Drained in place: the vector keeps its capacity for the next call.
                for (to_client, sent) in call.sends.drain(..) {
                    if to_client {
                        out.to_client.push_back(sent);
                    } else {
                        out.to_upstream.push_back(sent);
                    }
                }
            } else {
                // A failed call sends nothing.
                call.sends.clear();
            }
            match call.expire_at.take() {
                Some(at) if result.is_ok() => *out.expire_at = Some(at),
                _ => {}
            }
            call.close.take()
        };
        let returned = match result {
            Ok(returned) => returned,
            Err(e) => {
                let kind = error_kind(&e);
                return self.failed(direction, kind, script.error(&e, self.limits), message);
            }
        };
        if let Some(frame) = close {
            return Verdict::Close(frame);
        }
        self.verdict(direction, &script, returned, message)
    }

    fn on_close(&mut self, summary: &CloseSummary) {
        let Some(script) = self.on_close.clone() else {
            return;
        };
        let lua = &self.vm.lua;
        let info = (|| {
            let t = lua.create_table()?;
            t.set("code", summary.code)?;
            t.set("reason", summary.reason.as_str())?;
            t.set("by", summary.closed_by.as_str())?;
            t.set("duration", summary.duration.as_secs_f64())?;
            t.set("messages_in", summary.client_to_upstream.messages)?;
            t.set("bytes_in", summary.client_to_upstream.bytes)?;
            t.set("messages_out", summary.upstream_to_client.messages)?;
            t.set("bytes_out", summary.upstream_to_client.bytes)?;
            t.set("dropped_in", summary.client_to_upstream.dropped_by_policy)?;
            t.set("dropped_out", summary.upstream_to_client.dropped_by_policy)?;
            t.set(
                "undelivered",
                summary.client_to_upstream.undelivered + summary.upstream_to_client.undelivered,
            )?;
            Ok::<_, mlua::Error>(t)
        })();
        self.call.borrow_mut().closing = true;
        let started = self.metrics.is_some().then(Instant::now);
        let info = match info {
            Ok(info) => info,
            Err(e) => return self.closed(&script, Err(e), started),
        };
        if !self.vm.fleet {
            let result = self.vm.guarded(self.limits, || {
                script.function.call::<()>((&self.ctx, &self.conn, info))
            });
            return self.closed(&script, result, started);
        }
        // On the fleet's store, the script runs in a coroutine that may wait for gw.shared.
        let thread = match self.vm.lua.create_thread(script.function.clone()) {
            Ok(thread) => thread,
            Err(e) => return self.closed(&script, Err(e), started),
        };
        let mut spent = std::time::Duration::ZERO;
        let args = (&self.ctx, &self.conn, info);
        match super::wait::segment(&self.vm, &thread, args, self.limits, &mut spent) {
            Ok(super::wait::Step::Done(_)) => self.closed(&script, Ok(()), started),
            Err(e) => self.closed(&script, Err(e), started),
            Ok(super::wait::Step::Wait(op)) => {
                let (vm, limits, id, metrics) =
                    (self.vm.clone(), self.limits, self.id, self.metrics.clone());
                self.close_wait = Some(Box::pin(async move {
                    let result =
                        super::wait::drive(&vm, &thread, op, limits, &mut spent, &mut |_| Ok(()))
                            .await;
                    closed(
                        &script,
                        result.map(|_| ()),
                        started,
                        limits,
                        id,
                        metrics.as_ref(),
                    );
                }));
            }
        }
    }

    fn close_pending(
        &mut self,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>> {
        self.close_wait.take()
    }
}

impl LuaFrameHooks {
    /// Counts and logs the end of an `on_close` call.
    fn closed(&self, script: &Script, result: mlua::Result<()>, started: Option<Instant>) {
        closed(
            script,
            result,
            started,
            self.limits,
            self.id,
            self.metrics.as_ref(),
        );
    }
}

/// Counts and logs the end of an `on_close` call of connection `id`.
fn closed(
    script: &Script,
    result: mlua::Result<()>,
    started: Option<Instant>,
    limits: Limits,
    id: u64,
    metrics: Option<&Arc<RouteMetrics>>,
) {
    if let (Some(metrics), Some(started)) = (metrics, started) {
        metrics.policy_call(Phase::Close, started.elapsed());
        if let Err(e) = &result {
            metrics.policy_error(Phase::Close, error_kind(e));
        }
    }
    if let Err(e) = result {
        let error = script.error(&e, limits);
        tracing::warn!(conn = id, script = %error.script, error = %error.message, "policy error in on_close");
    }
}

/// Frame hooks for route `index` of `engine` with `ctx` as the context, for
/// `framegate policy-test` (no upgrade phase, no sockets).
pub fn test_hooks(
    engine: &Engine,
    index: usize,
    ctx_json: Option<&str>,
) -> Result<Box<dyn FrameHooks>, String> {
    let policy = engine.lua_route(index).ok_or("the route has no policies")?;
    let lua = &policy.vm.lua;
    let ctx = match ctx_json {
        Some(json) => super::codec::JSON
            .decode(lua, json.as_bytes())
            .map_err(|e| format!("--ctx: {e}"))?,
        None => Value::Nil,
    };
    let build = || -> mlua::Result<LuaFrameHooks> {
        let table = match ctx {
            Value::Table(t) => t,
            _ => lua.create_table()?,
        };
        if !table.contains_key("request")? {
            table.set("request", lua.create_table()?)?;
        }
        let (frozen, size) = policy.vm.sandbox.views.freeze_within(
            table,
            "ctx",
            None,
            policy.limits.state,
            &policy.limits.state_exceeded(false),
        )?;
        let tags = lua.create_table()?;
        let (tags, _) =
            policy
                .vm
                .sandbox
                .views
                .freeze_within(tags, "conn.tags", None, usize::MAX, "")?;
        LuaFrameHooks::new(&policy, 0, frozen, size, tags, None)
    };
    Ok(Box::new(build().map_err(|e| e.to_string())?))
}
