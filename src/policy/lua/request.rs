//! The `req` object of `on_upgrade`, and the upgrade phase itself: run the script, collect
//! its changes or its rejection, then freeze the context for the frame phase.

use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use mlua::{AnyUserData, Lua, MetaMethod, Table, UserData, UserDataMethods, Value};

use super::frame::{error_kind, LuaFrameHooks};
use super::headers::{materialise, value_of, HeaderSource};
use super::sandbox::ReadOnlyViews;
use super::{misuse, LuaRoutePolicy};
use crate::header_fields::HeaderFields;
use crate::metrics::Phase;
use crate::policy::{
    FrameHooks, PassThrough, RoutePolicy, UpgradeChanges, UpgradeRequest, UpgradeVerdict,
};

/// Hop-by-hop headers and those the gateway manages per leg; policies may not set them.
const MANAGED: [&str; 15] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
    "transfer-encoding",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-accept",
];

/// `req`'s fields that are tables, made when first read (`headers` is made for each call).
const TABLE_FIELDS: [&str; 4] = ["headers", "query", "params", "subprotocols"];

/// `req`'s field table: the `__index` of `req`'s metatable, so that a field it holds is read
/// without a call into Rust. During a call it holds `headers`, the call's header view; its
/// own `__index` makes every other field (see [`Req::field`]).
struct ReqFields(Table);

/// What `req` reads its fields from: the request, copied out of the HTTP layer.
struct RequestData {
    /// The method: `GET` for an upgrade, any for a plain HTTP request.
    method: String,
    /// `req.upgrade`: false for a plain HTTP request (`route.http = "proxy"`).
    upgrade: bool,
    path: String,
    query: String,
    /// The request's header fields (a clone shares the bytes read, so a call copies none).
    headers: HeaderFields,
    params: Vec<(String, String)>,
    client_ip: std::net::IpAddr,
    scheme: &'static str,
    host: Option<String>,
    /// The verified token's claims (`req.jwt`), with `[route.jwt]`.
    jwt: Option<serde_json::Value>,
}

/// `req`: the request's fields plus the methods. A field's Lua value is made the first time
/// the script reads it (most scripts read one or two), and its tables are read-only views.
/// `req.headers`, which nearly every upgrade script reads, is made before the call, while
/// the call's memory limit is not yet set (so Lua makes it without a protected call), and
/// is read from [`ReqFields`] in Lua.
struct Req {
    /// Whether an `on_upgrade` call is running: one `req` serves every call of its VM and is
    /// refilled for each, so outside a call it refuses to be used.
    open: bool,
    request: RequestData,
    offered: Vec<String>,
    /// The table fields made so far, in the order of [`TABLE_FIELDS`]. The first one is the
    /// call's header view, which reads `request.headers` (see [`super::headers`]).
    made: [Option<Table>; 4],
    /// `pairs(req.headers)`'s table, made on its first call.
    all_headers: Option<Table>,
    /// `req.jwt`'s view, made on its first read in a call.
    jwt_view: Option<Table>,
    /// The table that serves `req`'s fields (see [`ReqFields`]).
    fields: Table,
    /// The Lua string `"headers"`, the key of the call's view in `fields`.
    headers_key: mlua::LuaString,
    /// The call's headers as kept in `ctx.request.headers`, while the context is frozen: a
    /// `req.headers` kept in `ctx` becomes a view of them.
    kept: Option<Rc<HeaderFields>>,
    changes: UpgradeChanges,
    rejection: Option<(StatusCode, Bytes, HeaderMap)>,
}

fn string_arg(lua: &Lua, method: &str, what: &str, value: &Value) -> mlua::Result<String> {
    match value {
        Value::String(s) => Ok(s.to_str()?.to_owned()),
        Value::Integer(_) | Value::Number(_) => Ok(value.to_string()?),
        other => Err(misuse(
            lua,
            format!(
                "req:{method}: {what} must be a string, got {}",
                other.type_name()
            ),
        )),
    }
}

fn seconds_arg(lua: &Lua, method: &str, value: &Value) -> mlua::Result<f64> {
    match value {
        Value::Integer(i) => Ok(*i as f64),
        Value::Number(n) if n.is_finite() => Ok(*n),
        other => Err(misuse(
            lua,
            format!(
                "req:{method} expects a number of seconds, got {}",
                other.type_name()
            ),
        )),
    }
}

impl Req {
    /// An error unless an `on_upgrade` call is running.
    fn usable(&self, lua: &Lua) -> mlua::Result<()> {
        if self.open {
            Ok(())
        } else {
            Err(misuse(
                lua,
                "req is valid only during its on_upgrade call; keep the fields you need instead",
            ))
        }
    }

    /// An error unless `view` is the running call's `req.headers`.
    fn call_view(&self, lua: &Lua, view: &Value) -> mlua::Result<()> {
        let current = self.made[0].as_ref().map(Table::to_pointer);
        if self.open && current == Some(view.to_pointer()) {
            Ok(())
        } else {
            Err(misuse(
                lua,
                "req.headers is valid only during its on_upgrade call; \
                 keep it in ctx, or keep the values you need",
            ))
        }
    }

    /// The field `key` of `req`, for the `__index` of [`ReqFields`]: every field but the call's
    /// `headers`, which the field table holds during the call.
    fn field(&mut self, lua: &Lua, key: Value) -> mlua::Result<Value> {
        self.usable(lua)?;
        let Value::String(key) = key else {
            return Ok(Value::Nil);
        };
        let key = key.as_bytes();
        let r = &self.request;
        let text = |s: &str| lua.create_string(s).map(Value::String);
        match &key[..] {
            b"method" => text(&r.method),
            b"upgrade" => Ok(Value::Boolean(r.upgrade)),
            b"path" => text(&r.path),
            b"query_string" => text(&r.query),
            b"client_ip" => text(&r.client_ip.to_string()),
            b"scheme" => text(r.scheme),
            b"host" => r.host.as_deref().map_or(Ok(Value::Nil), text),
            b"jwt" => match &r.jwt {
                None => Ok(Value::Nil),
                Some(_) if self.jwt_view.is_some() => {
                    Ok(self.jwt_view.clone().map_or(Value::Nil, Value::Table))
                }
                Some(claims) => {
                    let Value::Table(table) = mlua::LuaSerdeExt::to_value(lua, claims)? else {
                        return Ok(Value::Nil);
                    };
                    let views = lua
                        .app_data_ref::<ReadOnlyViews>()
                        .expect("the sandbox registers its read-only views");
                    let view = views.req_view(lua, table)?;
                    self.jwt_view = Some(view.clone());
                    Ok(Value::Table(view))
                }
            },
            // Made before the call (and found in the field table, not here).
            b"headers" => Ok(self.made[0].clone().map_or(Value::Nil, Value::Table)),
            name => {
                let Some(slot) = TABLE_FIELDS.iter().position(|f| f.as_bytes() == name) else {
                    return Ok(Value::Nil);
                };
                if let Some(made) = &self.made[slot] {
                    return Ok(Value::Table(made.clone()));
                }
                let views = lua
                    .app_data_ref::<ReadOnlyViews>()
                    .expect("the sandbox registers its read-only views");
                let table = field_table(lua, TABLE_FIELDS[slot], r, &self.offered)?;
                let view = views.req_view(lua, table)?;
                self.made[slot] = Some(view.clone());
                Ok(Value::Table(view))
            }
        }
    }

    /// Keeps the earliest requested expiry; a time too far away to represent shortens nothing.
    fn shorten(&mut self, at: Option<SystemTime>) {
        if let Some(at) = at {
            self.changes.expire_at =
                Some(self.changes.expire_at.map_or(at, |current| current.min(at)));
        }
    }
}

impl UserData for Req {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field_with(MetaMethod::Index, |lua| {
            let fields = lua
                .app_data_ref::<ReqFields>()
                .expect("reusable_req registers req's field table before making req");
            Ok(fields.0.clone())
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method_mut(
            "reject",
            |lua, this, (status, body, headers): (Value, Value, Value)| {
                this.usable(lua)?;
                let status = match status {
                    Value::Integer(s) if (200..=599).contains(&s) => {
                        StatusCode::from_u16(s as u16).expect("200..=599 is a valid status")
                    }
                    other => {
                        return Err(misuse(
                            lua,
                            format!(
                                "req:reject: status must be an integer from 200 to 599, got {}",
                                other.to_string().unwrap_or_default()
                            ),
                        ))
                    }
                };
                let body = match body {
                    Value::Nil => Bytes::new(),
                    Value::String(s) => Bytes::copy_from_slice(&s.as_bytes()),
                    other => {
                        return Err(misuse(
                            lua,
                            format!(
                                "req:reject: body must be a string, got {}",
                                other.type_name()
                            ),
                        ))
                    }
                };
                let mut map = HeaderMap::new();
                match headers {
                    Value::Nil => {}
                    Value::Table(t) => {
                        for pair in t.pairs::<Value, Value>() {
                            let (k, v) = pair?;
                            let name = string_arg(lua, "reject", "a header name", &k)?;
                            let value = string_arg(lua, "reject", "a header value", &v)?;
                            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                                misuse(lua, format!("req:reject: invalid header name {name:?}"))
                            })?;
                            let value = HeaderValue::from_str(&value).map_err(|_| {
                                misuse(lua, format!("req:reject: invalid value for header {name}"))
                            })?;
                            map.append(name, value);
                        }
                    }
                    other => {
                        return Err(misuse(
                            lua,
                            format!(
                                "req:reject: headers must be a table, got {}",
                                other.type_name()
                            ),
                        ))
                    }
                }
                this.rejection = Some((status, body, map));
                Ok(())
            },
        );
        methods.add_method_mut("tag", |lua, this, (key, value): (Value, Value)| {
            this.usable(lua)?;
            let key = string_arg(lua, "tag", "the key", &key)?;
            let value = string_arg(lua, "tag", "the value", &value)?;
            this.changes
                .tags
                .insert(&key, &value)
                .map_err(|e| misuse(lua, format!("req:tag: {e}")))
        });
        methods.add_method_mut("set_upstream", |lua, this, url: Value| {
            this.usable(lua)?;
            let url = string_arg(lua, "set_upstream", "the URL", &url)?;
            let valid = url.parse::<http::Uri>().ok().filter(|u| {
                matches!(u.scheme_str(), Some("ws" | "wss"))
                    && u.host().is_some_and(|h| !h.is_empty())
            });
            // Or an [[upstream]] pool's name (checked against the pools when connecting).
            let pool_name = !url.is_empty()
                && url
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if valid.is_none() && !pool_name {
                return Err(misuse(
                    lua,
                    format!(
                        "req:set_upstream: {url:?} is neither a ws:// or wss:// URL nor a pool name"
                    ),
                ));
            }
            this.changes.upstream = Some(url);
            Ok(())
        });
        methods.add_method_mut("set_hash_key", |lua, this, key: Value| {
            this.usable(lua)?;
            let key = string_arg(lua, "set_hash_key", "the key", &key)?;
            this.changes.hash_key = Some(key);
            Ok(())
        });
        methods.add_method_mut("set_header", |lua, this, (name, value): (Value, Value)| {
            this.usable(lua)?;
            let name =
                string_arg(lua, "set_header", "the header name", &name)?.to_ascii_lowercase();
            if MANAGED.contains(&name.as_str()) {
                return Err(misuse(
                    lua,
                    format!("req:set_header: {name} is managed by the gateway"),
                ));
            }
            let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                misuse(lua, format!("req:set_header: invalid header name {name:?}"))
            })?;
            let value = match value {
                Value::Nil => None,
                v => {
                    let text = string_arg(lua, "set_header", "the value", &v)?;
                    Some(HeaderValue::from_str(&text).map_err(|_| {
                        misuse(lua, format!("req:set_header: invalid value for {name}"))
                    })?)
                }
            };
            this.changes.headers.push((header, value));
            Ok(())
        });
        methods.add_method_mut("select_subprotocol", |lua, this, name: Value| {
            this.usable(lua)?;
            let name = string_arg(lua, "select_subprotocol", "the subprotocol", &name)?;
            if !this.offered.contains(&name) {
                return Err(misuse(
                    lua,
                    format!(
                        "req:select_subprotocol: the client did not offer {name:?} (offered: {})",
                        this.offered.join(", ")
                    ),
                ));
            }
            this.changes.subprotocol = Some(name);
            Ok(())
        });
        methods.add_method_mut("expire_in", |lua, this, seconds: Value| {
            this.usable(lua)?;
            let seconds = seconds_arg(lua, "expire_in", &seconds)?;
            if seconds < 0.0 {
                return Err(misuse(lua, "req:expire_in: seconds must not be negative"));
            }
            let delay = Duration::try_from_secs_f64(seconds).ok();
            this.shorten(delay.and_then(|d| SystemTime::now().checked_add(d)));
            Ok(())
        });
        methods.add_method_mut("expire_at", |lua, this, at: Value| {
            this.usable(lua)?;
            let at = seconds_arg(lua, "expire_at", &at)?;
            if at < 0.0 {
                return Err(misuse(
                    lua,
                    "req:expire_at: the time must be a Unix time in seconds",
                ));
            }
            let since_epoch = Duration::try_from_secs_f64(at).ok();
            this.shorten(since_epoch.and_then(|d| UNIX_EPOCH.checked_add(d)));
            Ok(())
        });
        methods.add_method("header_values", |lua, this, name: Value| {
            this.usable(lua)?;
            let name = string_arg(lua, "header_values", "the header name", &name)?;
            let values = this
                .request
                .headers
                .values(name.as_bytes())
                .map(|v| lua.create_string(v))
                .collect::<mlua::Result<Vec<_>>>()?;
            lua.create_sequence_from(values)
        });
        methods.add_meta_method(
            MetaMethod::NewIndex,
            |lua, _, key: Value| -> mlua::Result<()> {
                Err(misuse(
                    lua,
                    format!(
                        "req is read-only (tried to set {}); use its methods",
                        key.to_string().unwrap_or_default()
                    ),
                ))
            },
        );
    }
}

/// One of the request's plain table fields: `query`, `params` or `subprotocols`.
fn field_table(lua: &Lua, name: &str, r: &RequestData, offered: &[String]) -> mlua::Result<Table> {
    match name {
        "query" => {
            let query = lua.create_table()?;
            for (k, v) in form_urlencoded::parse(r.query.as_bytes()) {
                if !query.contains_key(k.as_ref())? {
                    query.raw_set(k.as_ref(), v.as_ref())?;
                }
            }
            Ok(query)
        }
        "params" => {
            let params = lua.create_table_with_capacity(0, r.params.len())?;
            for (k, v) in &r.params {
                params.raw_set(k.as_str(), v.as_str())?;
            }
            Ok(params)
        }
        _ => lua.create_sequence_from(offered.iter().map(String::as_str)),
    }
}

/// Builds the request's whole field table, for `ctx.request`; `headers` is a kept copy of the
/// request's headers.
fn request_table(
    lua: &Lua,
    views: &ReadOnlyViews,
    r: &RequestData,
    headers: &Rc<HeaderFields>,
    offered: &[String],
) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 11)?;
    t.raw_set("method", r.method.as_str())?;
    t.raw_set("upgrade", r.upgrade)?;
    t.raw_set("path", r.path.as_str())?;
    t.raw_set("query_string", r.query.as_str())?;
    t.raw_set("client_ip", r.client_ip.to_string())?;
    t.raw_set("scheme", r.scheme)?;
    t.raw_set("host", r.host.as_deref())?;
    t.raw_set(
        "headers",
        views.header_view(lua, HeaderSource(headers.clone()), "ctx")?,
    )?;
    for name in &TABLE_FIELDS[1..] {
        t.raw_set(*name, field_table(lua, name, r, offered)?)?;
    }
    Ok(t)
}

impl RequestData {
    fn empty() -> Self {
        RequestData {
            method: String::new(),
            upgrade: true,
            path: String::new(),
            query: String::new(),
            headers: HeaderFields::default(),
            params: Vec::new(),
            client_ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
            scheme: "ws",
            host: None,
            jwt: None,
        }
    }

    /// Refills this with `request`, reusing the strings' room from the last call.
    fn fill(&mut self, request: &UpgradeRequest<'_>) {
        refill(&mut self.method, request.method);
        self.upgrade = request.upgrade;
        refill(&mut self.path, request.path);
        refill(&mut self.query, request.query);
        match (&mut self.host, request.host) {
            (Some(kept), Some(host)) => refill(kept, host),
            (kept, host) => *kept = host.map(str::to_owned),
        }
        self.params.truncate(request.params.len());
        for (i, (name, value)) in request.params.iter().enumerate() {
            match self.params.get_mut(i) {
                Some((kept_name, kept_value)) => {
                    refill(kept_name, name);
                    refill(kept_value, value);
                }
                None => self.params.push((name.clone(), value.clone())),
            }
        }
        self.headers = request.headers.clone();
        self.client_ip = request.client_ip;
        self.scheme = request.scheme;
        self.jwt = request.jwt.cloned();
    }
}

fn refill(kept: &mut String, with: &str) {
    kept.clear();
    kept.push_str(with);
}

/// The one `req` of a VM, refilled for each `on_upgrade` call (as `msg` is for each message):
/// a call makes no userdata and, once the strings have grown, copies the request into room
/// it already has.
pub(crate) fn reusable_req(lua: &Lua) -> mlua::Result<AnyUserData> {
    let fields = lua.create_table()?;
    lua.set_app_data(ReqFields(fields.clone()));
    let req = lua.create_userdata(Req {
        open: false,
        request: RequestData::empty(),
        offered: Vec::new(),
        made: Default::default(),
        all_headers: None,
        jwt_view: None,
        fields: fields.clone(),
        headers_key: lua.create_string("headers")?,
        kept: None,
        changes: UpgradeChanges::default(),
        rejection: None,
    })?;
    let of = req.clone();
    let index = lua.create_function(move |lua, (_, key): (Value, Value)| {
        of.borrow_mut::<Req>()?.field(lua, key)
    })?;
    let meta = lua.create_table()?;
    meta.raw_set("__index", index)?;
    fields.set_metatable(Some(meta))?;
    Ok(req)
}

/// The functions of the call's header views: `__index` and `pairs` read the headers of the
/// call that `req` (the VM's one `req`) holds, and refuse use once that call has ended;
/// `keep` makes the kept view that replaces the call's view where `ctx` holds it.
pub(crate) struct CallHeaderFunctions {
    pub(crate) index: mlua::Function,
    pub(crate) all: mlua::Function,
    pub(crate) keep: mlua::Function,
}

/// Makes the [`CallHeaderFunctions`] of `req`.
pub(crate) fn call_header_functions(
    lua: &Lua,
    req: &AnyUserData,
) -> mlua::Result<CallHeaderFunctions> {
    let of = req.clone();
    let index = lua.create_function(move |lua, (view, name): (Value, Value)| {
        let req = of.borrow::<Req>()?;
        req.call_view(lua, &view)?;
        let Value::String(name) = name else {
            return Ok(Value::Nil);
        };
        value_of(lua, &req.request.headers, &name.as_bytes())
    })?;
    let of = req.clone();
    let all = lua.create_function(move |lua, view: Value| {
        let mut req = of.borrow_mut::<Req>()?;
        req.call_view(lua, &view)?;
        if let Some(all) = &req.all_headers {
            return Ok(all.clone());
        }
        let all = materialise(lua, &req.request.headers)?;
        req.all_headers = Some(all.clone());
        Ok(all)
    })?;
    let of = req.clone();
    let keep = lua.create_function(move |lua, ()| {
        let headers = of.borrow::<Req>()?.kept.clone();
        let headers = headers.ok_or_else(|| misuse(lua, "req.headers kept outside a freeze"))?;
        let views = lua
            .app_data_ref::<ReadOnlyViews>()
            .expect("the sandbox registers its read-only views");
        views.header_view(lua, HeaderSource(headers), "req")
    })?;
    Ok(CallHeaderFunctions { index, all, keep })
}

/// The client's offered subprotocols, in order.
fn offered_subprotocols(headers: &HeaderFields, offered: &mut Vec<String>) {
    offered.clear();
    let names = headers
        .get_all("sec-websocket-protocol")
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty());
    offered.extend(names.map(str::to_owned));
}

/// The state of a waiting `on_upgrade` call, kept aside while other calls use `req` (the
/// fields of [`Req`] that belong to one call).
struct SavedCall {
    open: bool,
    request: RequestData,
    offered: Vec<String>,
    made: [Option<Table>; 4],
    all_headers: Option<Table>,
    jwt_view: Option<Table>,
    changes: UpgradeChanges,
    rejection: Option<(StatusCode, Bytes, HeaderMap)>,
}

impl Default for SavedCall {
    fn default() -> Self {
        SavedCall {
            open: false,
            request: RequestData::empty(),
            offered: Vec::new(),
            made: Default::default(),
            all_headers: None,
            jwt_view: None,
            changes: UpgradeChanges::default(),
            rejection: None,
        }
    }
}

/// What the end of an upgrade needs of the request, once `req` holds its copy.
struct Call {
    id: u64,
    jwt: Option<serde_json::Value>,
    metrics: Option<std::sync::Arc<crate::metrics::RouteMetrics>>,
    needs_frames: bool,
    started: Option<Instant>,
}

impl RoutePolicy for LuaRoutePolicy {
    fn on_upgrade(&self, request: &UpgradeRequest<'_>) -> UpgradeVerdict {
        // A plain HTTP request (`req.upgrade == false`) has no frames and no close: only
        // `on_upgrade` runs for it.
        let needs_frames = request.upgrade
            && (self.on_client_frame.is_some()
                || self.on_server_frame.is_some()
                || self.on_close.is_some());
        if self.on_upgrade.is_none() && !needs_frames {
            return UpgradeVerdict::Continue {
                changes: UpgradeChanges::default(),
                hooks: Box::new(PassThrough),
            };
        }
        // One clock read each side of the call, only where a script runs (see docs/operations.md).
        let timed = request.metrics.filter(|_| self.on_upgrade.is_some());
        if self.vm.fleet && self.on_upgrade.is_some() {
            return self.upgrade_may_wait(request, needs_frames, timed.is_some());
        }
        let started = timed.map(|_| Instant::now());
        let result = self.run_upgrade(request, needs_frames);
        self.outcome(result, timed, started)
    }
}

impl LuaRoutePolicy {
    /// The verdict of a call that ended with `result`, counted in `metrics`.
    fn outcome(
        &self,
        result: mlua::Result<UpgradeVerdict>,
        metrics: Option<&std::sync::Arc<crate::metrics::RouteMetrics>>,
        started: Option<Instant>,
    ) -> UpgradeVerdict {
        if let (Some(metrics), Some(started)) = (metrics, started) {
            metrics.policy_call(Phase::Upgrade, started.elapsed());
            if let Err(e) = &result {
                metrics.policy_error(Phase::Upgrade, error_kind(e));
            }
        }
        match result {
            Ok(verdict) => verdict,
            Err(error) => {
                let error = match &self.on_upgrade {
                    Some(script) => script.error(&error, self.limits),
                    None => crate::policy::PolicyError {
                        script: "<upgrade>".into(),
                        message: super::describe(&error, self.limits),
                    },
                };
                UpgradeVerdict::Failed(error)
            }
        }
    }

    /// Copies `request` into the VM's `req` and readies it for a call.
    fn prepare(&self, request: &UpgradeRequest<'_>) -> mlua::Result<()> {
        let mut r = self.vm.req.borrow_mut::<Req>()?;
        let r = &mut *r;
        r.request.fill(request);
        offered_subprotocols(request.headers, &mut r.offered);
        r.made = Default::default();
        r.all_headers = None;
        r.jwt_view = None;
        // What a call dropped while it waited (its client went away) may have left.
        r.changes = UpgradeChanges::default();
        r.rejection = None;
        Ok(())
    }

    /// Opens `req` for the call: makes `req.headers`' view, before the call's memory limit
    /// is set (Lua then makes tables without a protected call).
    fn open(&self) -> mlua::Result<()> {
        let view = self.vm.lua.create_table()?;
        view.set_metatable(Some(self.vm.sandbox.views.call_headers_meta.clone()))?;
        let mut r = self.vm.req.borrow_mut::<Req>()?;
        r.fields.raw_set(&r.headers_key, &view)?;
        r.made[0] = Some(view);
        r.open = true;
        Ok(())
    }

    /// Closes `req` again whatever happened, so that a `req` the script kept refuses use,
    /// and returns the call's header view, changes and rejection.
    #[allow(clippy::type_complexity)]
    fn close(
        &self,
    ) -> mlua::Result<(
        Option<Table>,
        UpgradeChanges,
        Option<(StatusCode, Bytes, HeaderMap)>,
    )> {
        let mut r = self.vm.req.borrow_mut::<Req>()?;
        r.open = false;
        // `fields` keeps this call's `req.headers` until the next call replaces it:
        // read from a kept `req`, it is a view that refuses use.
        let call_view = std::mem::take(&mut r.made)[0].take();
        r.all_headers = None;
        Ok((
            call_view,
            std::mem::take(&mut r.changes),
            r.rejection.take(),
        ))
    }

    fn run_upgrade(
        &self,
        request: &UpgradeRequest<'_>,
        needs_frames: bool,
    ) -> mlua::Result<UpgradeVerdict> {
        self.prepare(request)?;
        let lua = &self.vm.lua;
        let req = &self.vm.req;
        let ctx = lua.create_table()?;
        let mut changes = UpgradeChanges::default();
        let mut call_view = None;
        if let Some(script) = &self.on_upgrade {
            self.open()?;
            let result = self
                .vm
                .guarded(self.limits, || script.function.call::<Value>((req, &ctx)));
            let (view, taken, rejection) = self.close()?;
            call_view = view;
            result?;
            if let Some((status, body, headers)) = rejection {
                return Ok(UpgradeVerdict::Reject {
                    status,
                    body,
                    headers,
                });
            }
            changes = taken;
            changes.ctx_json = ctx_json(&ctx);
        }
        self.conclude(
            ctx,
            changes,
            call_view,
            needs_frames,
            request.id,
            request.jwt,
            request.metrics,
        )
    }

    /// The end of an upgrade whose script (if any) succeeded: freezes `ctx` and makes the
    /// connection's frame hooks.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &self,
        ctx: Table,
        changes: UpgradeChanges,
        call_view: Option<Table>,
        needs_frames: bool,
        id: u64,
        jwt: Option<&serde_json::Value>,
        metrics: Option<&std::sync::Arc<crate::metrics::RouteMetrics>>,
    ) -> mlua::Result<UpgradeVerdict> {
        if !needs_frames {
            return Ok(UpgradeVerdict::Continue {
                changes,
                hooks: Box::new(PassThrough),
            });
        }
        let lua = &self.vm.lua;
        let req = &self.vm.req;
        let views = &self.vm.sandbox.views;
        let fields = {
            let mut r = req.borrow_mut::<Req>()?;
            // Only the fields' own bytes: this may live as long as the connection, and the
            // request's buffer also holds what the client sent after its head.
            let headers = Rc::new(r.request.headers.compact());
            let fields = request_table(lua, views, &r.request, &headers, &r.offered)?;
            r.kept = Some(headers);
            fields
        };
        ctx.set("request", fields)?;
        // Set by the gateway after on_upgrade ran: the verified claims, frozen with ctx.
        if let Some(claims) = jwt {
            ctx.set("jwt", mlua::LuaSerdeExt::to_value(lua, claims)?)?;
        }
        // A `req.headers` the script kept in `ctx` becomes a kept view of the same headers,
        // made by `keep` if the freeze meets it.
        let swap = call_view
            .as_ref()
            .map(|view| (view, &self.vm.keep_call_view));
        // The freeze walks ctx anyway: it measures it against the state limit on the way.
        let frozen = views.freeze_within(
            ctx,
            "ctx",
            swap,
            self.limits.state,
            &self.limits.state_exceeded(false),
        );
        req.borrow_mut::<Req>()?.kept = None;
        let (frozen, ctx_size) = frozen?;
        let tags = lua.create_table()?;
        for (k, v) in changes.tags.iter() {
            tags.raw_set(k, v)?;
        }
        let (tags, _) = views.freeze_within(tags, "conn.tags", None, usize::MAX, "")?;
        let hooks: Box<dyn FrameHooks> = Box::new(LuaFrameHooks::new(
            self,
            id,
            frozen,
            ctx_size,
            tags,
            metrics.cloned(),
        )?);
        Ok(UpgradeVerdict::Continue { changes, hooks })
    }

    /// `on_upgrade` on the fleet's store: the script runs in a coroutine that may wait for
    /// `gw.shared` (see [`super::wait`]). `req` is the VM's one: while the call waits, its
    /// state is kept aside ([`SavedCall`]) and other upgrades of the VM use `req`; each
    /// segment of the call puts it back first.
    fn upgrade_may_wait(
        &self,
        request: &UpgradeRequest<'_>,
        needs_frames: bool,
        timed: bool,
    ) -> UpgradeVerdict {
        let call = Call {
            id: request.id,
            jwt: request.jwt.cloned(),
            metrics: request.metrics.cloned(),
            needs_frames,
            started: timed.then(Instant::now),
        };
        let (Some(me), Some(script)) = (self.this.upgrade(), self.on_upgrade.clone()) else {
            return self.outcome(Err(mlua::Error::runtime("policy released")), None, None);
        };
        let lua = &self.vm.lua;
        let begun = (|| {
            self.prepare(request)?;
            let ctx = lua.create_table()?;
            let thread = lua.create_thread(script.function.clone())?;
            self.open()?;
            Ok::<_, mlua::Error>((ctx, thread))
        })();
        let (ctx, thread) = match begun {
            Ok(begun) => begun,
            Err(e) => return self.outcome(Err(e), call.metrics.as_ref(), call.started),
        };
        let mut spent = Duration::ZERO;
        let first = super::wait::segment(
            &self.vm,
            &thread,
            (&self.vm.req, &ctx),
            self.limits,
            &mut spent,
        );
        let op = match first {
            Ok(super::wait::Step::Wait(op)) => op,
            Ok(super::wait::Step::Done(_)) => return self.end_waiting(Ok(()), ctx, &call),
            Err(e) => return self.end_waiting(Err(e), ctx, &call),
        };
        let mut saved = SavedCall::default();
        if let Err(e) = self.swap_call(&mut saved) {
            return self.outcome(Err(e), call.metrics.as_ref(), call.started);
        }
        UpgradeVerdict::Pending(Box::pin(async move {
            let mut around = |step: super::wait::Around| match step {
                // Before each segment the call's state goes back into `req`; after a segment
                // that waits again, it is kept aside again.
                super::wait::Around::Before | super::wait::Around::Waiting => {
                    me.swap_call(&mut saved)
                }
            };
            let result =
                super::wait::drive(&me.vm, &thread, op, me.limits, &mut spent, &mut around).await;
            me.end_waiting(result.map(|_| ()), ctx, &call)
        }))
    }

    /// Swaps the state of the call in `req` with `saved`.
    fn swap_call(&self, saved: &mut SavedCall) -> mlua::Result<()> {
        let mut r = self.vm.req.borrow_mut::<Req>()?;
        let r = &mut *r;
        std::mem::swap(&mut r.open, &mut saved.open);
        std::mem::swap(&mut r.request, &mut saved.request);
        std::mem::swap(&mut r.offered, &mut saved.offered);
        std::mem::swap(&mut r.made, &mut saved.made);
        std::mem::swap(&mut r.all_headers, &mut saved.all_headers);
        std::mem::swap(&mut r.jwt_view, &mut saved.jwt_view);
        std::mem::swap(&mut r.changes, &mut saved.changes);
        std::mem::swap(&mut r.rejection, &mut saved.rejection);
        // `req.headers` is read from the field table: it follows the call in `req`.
        match &r.made[0] {
            Some(view) => r.fields.raw_set(&r.headers_key, view),
            None => r.fields.raw_set(&r.headers_key, Value::Nil),
        }
    }

    /// The end of an upgrade run by [`LuaRoutePolicy::upgrade_may_wait`].
    fn end_waiting(&self, result: mlua::Result<()>, ctx: Table, call: &Call) -> UpgradeVerdict {
        let ended = (|| {
            let (call_view, mut changes, rejection) = self.close()?;
            result?;
            if let Some((status, body, headers)) = rejection {
                return Ok(UpgradeVerdict::Reject {
                    status,
                    body,
                    headers,
                });
            }
            changes.ctx_json = ctx_json(&ctx);
            self.conclude(
                ctx,
                changes,
                call_view,
                call.needs_frames,
                call.id,
                call.jwt.as_ref(),
                call.metrics.as_ref(),
            )
        })();
        self.outcome(ended, call.metrics.as_ref(), call.started)
    }
}

/// The context `on_upgrade` built, as JSON for the registry: `Null` when it is empty or holds
/// what JSON cannot (a function, a cycle), a note when it is over the registry's bound (the
/// encoding stops there, so a large ctx costs no more than that). `ctx.request` is added later
/// and is not in it.
fn ctx_json(ctx: &Table) -> serde_json::Value {
    use crate::registry::MAX_CTX_JSON;
    /// Fails the encoding once it passes the bound.
    struct Bounded(Vec<u8>);
    impl std::io::Write for Bounded {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0.len() + buf.len() > MAX_CTX_JSON {
                return Err(std::io::ErrorKind::FileTooLarge.into());
            }
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    if ctx.is_empty() {
        return serde_json::Value::Null;
    }
    let mut out = Bounded(Vec::new());
    match serde_json::to_writer(&mut out, ctx) {
        Ok(()) => serde_json::from_slice(&out.0).unwrap_or(serde_json::Value::Null),
        Err(e) if e.is_io() => {
            serde_json::Value::String(format!("ctx omitted: over {MAX_CTX_JSON} bytes of JSON"))
        }
        Err(_) => serde_json::Value::Null,
    }
}
