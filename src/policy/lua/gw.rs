//! The `gw` table every script sees: `gw.log`, `gw.json`, `gw.now()`, `gw.shared`, `gw.limit` and
//! `gw.jwt` (whose `verify` uses the route's `[route.jwt]`).
//! Runtime failures return `nil, message`; misuse raises an error at the caller's line.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mlua::{Function, Lua, MultiValue, Table, Value, Variadic};

use super::codec::{self, Codec};
use super::misuse;
use std::rc::Rc;

use super::wait::{Answer, Waits};
use crate::policy::shared::{Backend, SharedValue, Write};

/// Builds the (still writable) `gw` table; the sandbox freezes it.
pub(super) fn build(
    lua: &Lua,
    backend: Backend,
    waits: Rc<Waits>,
    jwt: Option<Arc<crate::jwt::Verifier>>,
) -> mlua::Result<Table> {
    let gw = lua.create_table()?;

    let log = lua.create_table()?;
    log.set("debug", log_function(lua, tracing::Level::DEBUG)?)?;
    log.set("info", log_function(lua, tracing::Level::INFO)?)?;
    log.set("warn", log_function(lua, tracing::Level::WARN)?)?;
    log.set("error", log_function(lua, tracing::Level::ERROR)?)?;
    gw.set("log", log)?;

    let json = lua.create_table()?;
    json.set(
        "decode",
        lua.create_function(|lua, text: Value| {
            let Value::String(text) = text else {
                return Err(misuse(
                    lua,
                    format!("gw.json.decode expects a string, got {}", text.type_name()),
                ));
            };
            Ok(match codec::JSON.decode(lua, &text.as_bytes()) {
                Ok(value) => (value, Value::Nil),
                Err(_) if super::over_budget(lua) => return Err(misuse(lua, "CPU limit exceeded")),
                Err(e) => (Value::Nil, Value::String(lua.create_string(e)?)),
            })
        })?,
    )?;
    json.set(
        "encode",
        lua.create_function(|lua, value: Value| {
            Ok(match codec::JSON.encode(lua, &value) {
                Ok(bytes) => (Value::String(lua.create_string(bytes)?), Value::Nil),
                Err(_) if super::over_budget(lua) => return Err(misuse(lua, "CPU limit exceeded")),
                Err(e) => (Value::Nil, Value::String(lua.create_string(e)?)),
            })
        })?,
    )?;
    json.set("null", mlua::LuaSerdeExt::null(lua))?;
    gw.set("json", json)?;

    gw.set(
        "now",
        lua.create_function(|_, ()| {
            Ok(SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()))
        })?,
    )?;
    gw.set("shared", shared_table(lua, backend.clone(), waits)?)?;
    gw.set("limit", limit_function(lua, backend)?)?;
    gw.set("jwt", jwt_table(lua, jwt)?)?;
    Ok(gw)
}

/// `gw.jwt`: `verify(token)` returns the claims, or `nil, reason`, checked with the route's
/// `[route.jwt]` and the keys the gateway holds now (a policy call never waits for a fetch).
fn jwt_table(lua: &Lua, verifier: Option<Arc<crate::jwt::Verifier>>) -> mlua::Result<Table> {
    let jwt = lua.create_table()?;
    jwt.set(
        "verify",
        lua.create_function(move |lua, token: Value| {
            let Some(verifier) = &verifier else {
                return Err(misuse(lua, "gw.jwt.verify: this route has no [route.jwt]"));
            };
            let Value::String(token) = token else {
                return Err(misuse(
                    lua,
                    format!("gw.jwt.verify expects a string, got {}", token.type_name()),
                ));
            };
            let token = token.to_str()?;
            let token = token.strip_prefix("Bearer ").unwrap_or(&token);
            Ok(match verifier.verify_cached(token) {
                Ok(claims) => (mlua::LuaSerdeExt::to_value(lua, &*claims.json)?, Value::Nil),
                Err(refusal) => (
                    Value::Nil,
                    Value::String(lua.create_string(refusal.to_string())?),
                ),
            })
        })?,
    )?;
    Ok(jwt)
}

/// `print(...)` in policies logs at info, like `gw.log.info`.
pub(super) fn print_function(lua: &Lua) -> mlua::Result<Function> {
    log_function(lua, tracing::Level::INFO)
}

/// The longest message a policy's log line carries; the rest is cut (NGINX cuts its error-log
/// lines at 2 KiB): a policy cannot make the worker write megabytes of log per call.
const MAX_LOG_MESSAGE: usize = 8 * 1024;

fn log_function(lua: &Lua, level: tracing::Level) -> mlua::Result<Function> {
    lua.create_function(move |lua, args: Variadic<Value>| {
        let mut message = String::new();
        for (i, arg) in args.iter().enumerate() {
            if message.len() > MAX_LOG_MESSAGE {
                break;
            }
            if i > 0 {
                message.push(' ');
            }
            let text = match arg {
                Value::String(s) => {
                    let bytes = s.as_bytes();
                    let room = (MAX_LOG_MESSAGE + 1 - message.len()).min(bytes.len());
                    String::from_utf8_lossy(&bytes[..room]).into_owned()
                }
                // `tostring`'s text, through `__tostring`: its errors (the CPU limit's among
                // them) end the call rather than being swallowed here.
                other => other.to_string()?,
            };
            // A policy often logs what a client sent: a line break or a terminal escape in it
            // must not start a forged log line or rewrite the operator's terminal.
            for c in text.chars() {
                if message.len() > MAX_LOG_MESSAGE {
                    break;
                }
                if c.is_control() {
                    message.extend(c.escape_default());
                } else {
                    message.push(c);
                }
            }
        }
        if message.len() > MAX_LOG_MESSAGE {
            let mut cut = MAX_LOG_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("… (cut)");
        }
        let at = lua
            .inspect_stack(1, |d| {
                format!(
                    "{}:{}",
                    d.source()
                        .short_src
                        .map(|s| s.into_owned())
                        .unwrap_or_default(),
                    d.current_line().unwrap_or(0)
                )
            })
            .unwrap_or_default();
        match level {
            tracing::Level::DEBUG => tracing::debug!(target: "framegate::policy", at, "{message}"),
            tracing::Level::INFO => tracing::info!(target: "framegate::policy", at, "{message}"),
            tracing::Level::WARN => tracing::warn!(target: "framegate::policy", at, "{message}"),
            _ => tracing::error!(target: "framegate::policy", at, "{message}"),
        }
        Ok(())
    })
}

/// The longest TTL kept as given: a century.
const MAX_TTL_SECS: u64 = 100 * 365 * 24 * 3600;

fn key_arg(lua: &Lua, method: &str, key: &Value) -> mlua::Result<String> {
    match key {
        Value::String(s) => Ok(s.to_str()?.to_owned()),
        other => Err(misuse(
            lua,
            format!(
                "gw.shared:{method} expects a string key, got {}",
                other.type_name()
            ),
        )),
    }
}

fn ttl_arg(lua: &Lua, method: &str, ttl: &Value) -> mlua::Result<Option<Duration>> {
    match ttl {
        Value::Nil => Ok(None),
        // Anything beyond a century is as good as forever.
        Value::Integer(n) if *n >= 0 => {
            Ok(Some(Duration::from_secs((*n as u64).min(MAX_TTL_SECS))))
        }
        Value::Number(n) if n.is_finite() && *n >= 0.0 => {
            Ok(Some(Duration::from_secs_f64(n.min(MAX_TTL_SECS as f64))))
        }
        other => Err(misuse(
            lua,
            format!(
                "gw.shared:{method}: ttl must be a number of seconds >= 0, got {}",
                other.to_string().unwrap_or_default()
            ),
        )),
    }
}

fn to_shared(lua: &Lua, method: &str, value: &Value) -> mlua::Result<Option<SharedValue>> {
    Ok(Some(match value {
        Value::Nil => return Ok(None),
        Value::String(s) => SharedValue::Str(bytes::Bytes::copy_from_slice(&s.as_bytes())),
        Value::Integer(i) => SharedValue::Int(*i),
        Value::Number(n) => SharedValue::Float(*n),
        Value::Boolean(b) => SharedValue::Bool(*b),
        other => {
            return Err(misuse(
                lua,
                format!(
                    "gw.shared:{method}: values are strings, numbers or booleans, not {}",
                    other.type_name()
                ),
            ))
        }
    }))
}

pub(super) fn from_shared(lua: &Lua, value: SharedValue) -> mlua::Result<Value> {
    Ok(match value {
        SharedValue::Str(s) => Value::String(lua.create_string(&s)?),
        SharedValue::Int(i) => Value::Integer(i),
        SharedValue::Float(f) => Value::Number(f),
        SharedValue::Bool(b) => Value::Boolean(b),
    })
}

/// Wraps a `gw.shared` function so that a call that may wait yields the sentinel the
/// function returned (see [`super::wait`]); named as the prelude, so that locations skip it.
/// On the local backend nothing waits: the function stays as it is (and a misuse error names
/// the policy's line even when the policy tail-calls it).
fn waiting(lua: &Lua, f: Function, yield_: Option<&Function>) -> mlua::Result<Function> {
    let Some(yield_) = yield_ else {
        return Ok(f);
    };
    lua.load(
        "local f, P, yield = ... \
         return function(...) local a, b = f(...) if a == P then return yield(P) end return a, b end",
    )
    .set_name(format!("={}", super::sandbox::PRELUDE_NAME))
    .call((f, super::wait::sentinel(), yield_))
}

/// `incr`'s fourth argument: `{lease = true}`.
fn lease_arg(lua: &Lua, options: &Value) -> mlua::Result<bool> {
    match options {
        Value::Nil => Ok(false),
        Value::Table(t) => {
            for pair in t.clone().pairs::<Value, Value>() {
                let (k, _) = pair?;
                if k.as_string()
                    .is_none_or(|k| k.as_bytes() != b"lease".as_slice())
                {
                    return Err(misuse(
                        lua,
                        format!(
                            "gw.shared:incr: unknown option {}; the options are {{lease = true}}",
                            k.to_string().unwrap_or_default()
                        ),
                    ));
                }
            }
            match t.raw_get::<Value>("lease")? {
                Value::Nil => Ok(false),
                Value::Boolean(b) => Ok(b),
                other => Err(misuse(
                    lua,
                    format!(
                        "gw.shared:incr: lease must be a boolean, not {}",
                        other.type_name()
                    ),
                )),
            }
        }
        other => Err(misuse(
            lua,
            format!(
                "gw.shared:incr: the options must be a table, not {}",
                other.type_name()
            ),
        )),
    }
}

/// The results of an operation that failed: `nil, message`.
fn failed(lua: &Lua, e: impl std::fmt::Display) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![
        Value::Nil,
        Value::String(lua.create_string(e.to_string())?),
    ]))
}

fn one(value: Value) -> MultiValue {
    MultiValue::from_vec(vec![value])
}

/// `gw.shared`: a table of functions over the process-wide dictionary, or the fleet's store.
/// They work called with a colon (`gw.shared:get(k)`, like OpenResty's
/// `ngx.shared.DICT:get`) or with a dot. On the fleet's store, a call that may wait (see
/// [`super::wait`]) parks the operation; any other gets the non-waiting behaviour.
fn shared_table(lua: &Lua, backend: Backend, waits: Rc<Waits>) -> mlua::Result<Table> {
    /// Drops the table itself when the function was called with a colon.
    fn args(mut values: MultiValue) -> Vec<Value> {
        if matches!(values.front(), Some(Value::Table(_))) {
            values.pop_front();
        }
        values.into_iter().collect()
    }
    fn arg(values: &[Value], i: usize) -> Value {
        values.get(i).cloned().unwrap_or(Value::Nil)
    }
    let yield_: Option<Function> = match backend {
        Backend::Local(..) => None,
        Backend::Fleet(_) => Some(lua.globals().get::<Table>("coroutine")?.get("yield")?),
    };
    let yield_ = yield_.as_ref();
    let shared = lua.create_table()?;
    let (b, w) = (backend.clone(), waits.clone());
    let get = lua.create_function(move |lua, values: MultiValue| {
        let v = args(values);
        let key = key_arg(lua, "get", &arg(&v, 0))?;
        let value = match &b {
            Backend::Local(d, _) => d.get(&key),
            Backend::Fleet(f) if w.can_wait(lua) => {
                let op = f.get(&key);
                return Ok(one(
                    w.park(Box::pin(async move { op.await.map(Answer::Value) }))
                ));
            }
            Backend::Fleet(f) => f.cached(&key),
        };
        Ok(one(
            value.map_or(Ok(Value::Nil), |value| from_shared(lua, value))?
        ))
    })?;
    shared.set("get", waiting(lua, get, yield_)?)?;
    let (b, w) = (backend.clone(), waits.clone());
    let set = lua.create_function(move |lua, values: MultiValue| {
        let v = args(values);
        let key = key_arg(lua, "set", &arg(&v, 0))?;
        let ttl = ttl_arg(lua, "set", &arg(&v, 2))?;
        let value = to_shared(lua, "set", &arg(&v, 1))?;
        let stored = match &b {
            Backend::Local(d, _) => match value {
                Some(value) => d.set(&key, value, ttl).map_err(|e| e.to_string()),
                None => {
                    d.delete(&key);
                    Ok(())
                }
            },
            Backend::Fleet(f) if w.can_wait(lua) => {
                let op = f.set(&key, value, ttl);
                return Ok(one(
                    w.park(Box::pin(async move { op.await.map(|()| Answer::Done) }))
                ));
            }
            Backend::Fleet(f) => f
                .behind(Write::Set(key, value, ttl))
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        match stored {
            Ok(()) => Ok(one(Value::Boolean(true))),
            Err(e) => failed(lua, e),
        }
    })?;
    shared.set("set", waiting(lua, set, yield_)?)?;
    let (b, w) = (backend.clone(), waits.clone());
    let incr = lua.create_function(move |lua, values: MultiValue| {
        let v = args(values);
        let key = key_arg(lua, "incr", &arg(&v, 0))?;
        let ttl = ttl_arg(lua, "incr", &arg(&v, 2))?;
        let by = match arg(&v, 1) {
            Value::Nil => SharedValue::Int(1),
            Value::Integer(i) => SharedValue::Int(i),
            Value::Number(n) => SharedValue::Float(n),
            other => {
                return Err(misuse(
                    lua,
                    format!(
                        "gw.shared:incr: the increment must be a number, not {}",
                        other.type_name()
                    ),
                ))
            }
        };
        let lease = lease_arg(lua, &arg(&v, 3))?;
        let sum = match &b {
            Backend::Local(d, _) => d.incr(&key, by, ttl).map_err(|e| e.to_string()),
            Backend::Fleet(f) if w.can_wait(lua) => {
                let op = f.incr(&key, by, ttl, lease);
                return Ok(one(w.park(Box::pin(async move {
                    op.await.map(|v| Answer::Value(Some(v)))
                }))));
            }
            Backend::Fleet(f) => f
                .behind(Write::Incr(key, by.clone(), ttl, lease))
                .map(|v| v.unwrap_or(by))
                .map_err(|e| e.to_string()),
        };
        match sum {
            Ok(value) => Ok(one(from_shared(lua, value)?)),
            Err(e) => failed(lua, e),
        }
    })?;
    shared.set("incr", waiting(lua, incr, yield_)?)?;
    let (b, w) = (backend.clone(), waits.clone());
    let delete = lua.create_function(move |lua, values: MultiValue| {
        let v = args(values);
        let key = key_arg(lua, "delete", &arg(&v, 0))?;
        match &b {
            Backend::Local(d, _) => d.delete(&key),
            Backend::Fleet(f) if w.can_wait(lua) => {
                let op = f.set(&key, None, None);
                return Ok(one(
                    w.park(Box::pin(async move { op.await.map(|()| Answer::Done) }))
                ));
            }
            Backend::Fleet(f) => {
                if let Err(e) = f.behind(Write::Set(key, None, None)) {
                    return failed(lua, e);
                }
            }
        }
        Ok(one(Value::Boolean(true)))
    })?;
    shared.set("delete", waiting(lua, delete, yield_)?)?;
    let on_unavailable = match &backend {
        Backend::Local(..) => None,
        Backend::Fleet(f) => Some(f.on_unavailable().as_str()),
    };
    shared.set("on_unavailable", on_unavailable)?;
    Ok(shared)
}

/// `gw.limit(key, rate, burst)`: whether one more message (or anything the policy counts)
/// fits the token bucket `key`: `rate` tokens a second, `burst` at most (default: `rate`).
/// Never waits: on the fleet's store it takes tokens this instance leased beforehand.
fn limit_function(lua: &Lua, backend: Backend) -> mlua::Result<Function> {
    lua.create_function(move |lua, (key, rate, burst): (Value, Value, Value)| {
        let Value::String(key) = key else {
            return Err(misuse(
                lua,
                format!("gw.limit expects a string key, got {}", key.type_name()),
            ));
        };
        let number = |v: &Value, what: &str| -> mlua::Result<Option<f64>> {
            let n = match v {
                Value::Nil => return Ok(None),
                Value::Integer(i) => *i as f64,
                Value::Number(n) => *n,
                _ => f64::NAN,
            };
            if n.is_finite() && n > 0.0 {
                Ok(Some(n))
            } else {
                Err(misuse(
                    lua,
                    format!(
                        "gw.limit: {what} must be a number above 0, got {}",
                        v.to_string().unwrap_or_default()
                    ),
                ))
            }
        };
        let rate =
            number(&rate, "rate")?.ok_or_else(|| misuse(lua, "gw.limit: rate is missing"))?;
        let burst = number(&burst, "burst")?.unwrap_or(rate).max(1.0);
        let key = key.to_str()?;
        Ok(match &backend {
            Backend::Local(_, limits) => limits.take(&key, rate, burst),
            Backend::Fleet(f) => f.limit(&key, rate, burst),
        })
    })
}
