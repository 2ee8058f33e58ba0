//! The Lua policy engine: one Lua 5.4 VM per worker thread, scripts compiled once per VM, and
//! every call guarded by a CPU deadline and a memory limit.
//!
//! Files: [`sandbox`] builds each script's environment and the read-only views; `request` is
//! the `req` object of `on_upgrade`; `headers` its header views; `frame` holds the `msg` and `conn` objects and the frame
//! hooks; `gw` is the `gw` table; [`codec`] decodes and encodes message bodies per MIME type.
//! docs/policies.md is the user-facing reference.

pub mod codec;
mod frame;
mod gw;
mod headers;
mod pattern;
mod request;
pub mod sandbox;
mod wait;

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Value, VmState};

use super::shared::Backend;
use super::{PolicyError, RoutePolicy};
use crate::config::{Config, OnPolicyError, Route};

pub use frame::test_hooks;

/// The least wall-clock time a script's top level gets when it is loaded, whatever the
/// route's `policy_cpu_limit`.
const LOAD_CPU_FLOOR: Duration = Duration::from_millis(250);

/// Instructions between two checks of the CPU deadline.
const HOOK_EVERY: u32 = 1000;

/// A script that could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct LoadError {
    /// The script's path.
    pub script: PathBuf,
    /// `path:line: what` when Lua knows the line, `path: what` otherwise.
    pub message: String,
}

/// Per-call limits of one route.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) cpu: Duration,
    pub(crate) memory: usize,
    /// `route.policy_state_limit`: what `ctx` plus `conn.state` may hold per connection.
    pub(crate) state: usize,
}

impl Limits {
    /// The error of a connection whose `ctx` (and `conn.state`, if `with_state`) holds more
    /// than [`Limits::state`].
    pub(crate) fn state_exceeded(&self, with_state: bool) -> String {
        let what = if with_state {
            "ctx and conn.state hold"
        } else {
            "ctx holds"
        };
        format!(
            "policy state limit exceeded: {what} more than {} (route.policy_state_limit)",
            bytesize::ByteSize(self.state as u64)
        )
    }
}

/// The text of every policy script of a configuration, read once: every worker compiles the
/// same text, the one that was validated, whatever happens to the files afterwards.
#[derive(Debug, Clone, Default)]
pub struct Sources(HashMap<PathBuf, Arc<[u8]>>);

impl Sources {
    /// Reads every script `config` names.
    pub fn read(config: &Config) -> Result<Sources, LoadError> {
        let mut sources = HashMap::new();
        for path in config.scripts() {
            let text = std::fs::read(path).map_err(|e| LoadError {
                script: path.to_path_buf(),
                message: format!("{}: cannot read: {e}", path.display()),
            })?;
            sources.insert(path.to_path_buf(), Arc::from(text));
        }
        Ok(Sources(sources))
    }

    /// The text of `path`, if it was read.
    pub(crate) fn text(&self, path: &Path) -> Option<&[u8]> {
        self.0.get(path).map(|s| &s[..])
    }

    fn get(&self, path: &Path) -> Result<&[u8], LoadError> {
        self.0.get(path).map(|s| &s[..]).ok_or_else(|| LoadError {
            script: path.to_path_buf(),
            message: format!("{}: not read with the configuration", path.display()),
        })
    }
}

/// One worker's Lua VM and the compiled scripts of every route of one configuration.
pub struct Engine {
    /// Each route's scripts hold the VM, which lives as long as any of them.
    routes: Vec<Option<Rc<LuaRoutePolicy>>>,
}

/// The CPU budget of the running policy call. Its clock starts at the call's first hook
/// (after [`HOOK_EVERY`] instructions, a few microseconds at most), so the many calls that end
/// sooner never read the clock.
#[derive(Debug, Clone, Copy)]
enum Budget {
    /// No call is running.
    Idle,
    /// A call with this limit started and has not reached its first hook.
    Armed(Duration),
    /// The running call must stop at this time.
    Running(Instant),
    /// The running call is past its deadline: the hook now fires at every instruction and
    /// fails each time, so that nothing of the call runs on (see [`cpu_hook`]).
    Over,
}

/// The VM and what every call needs.
pub(crate) struct Vm {
    pub(crate) lua: Lua,
    /// The running call's CPU budget.
    budget: Rc<Cell<Budget>>,
    pub(crate) sandbox: sandbox::Sandbox,
    /// The `req` of every `on_upgrade` call on this VM, refilled for each.
    pub(crate) req: mlua::AnyUserData,
    /// Makes the kept view that replaces `req.headers` where the call stored it in `ctx`.
    pub(crate) keep_call_view: Function,
    /// The operation the running call waits for (see [`wait`]).
    pub(crate) waits: Rc<wait::Waits>,
    /// Whether `gw.shared` is the fleet's store: `on_upgrade` and `on_close` then run in
    /// coroutines that may wait.
    pub(crate) fleet: bool,
}

impl Vm {
    /// Runs `f` under `limits`: the CPU deadline and how much the heap may grow.
    pub(crate) fn guarded<R>(
        &self,
        limits: Limits,
        f: impl FnOnce() -> mlua::Result<R>,
    ) -> mlua::Result<R> {
        self.guarded_growth(limits, f).0
    }

    /// [`Vm::guarded`], also telling how much the call grew the Lua heap (0 if it shrank).
    pub(crate) fn guarded_growth<R>(
        &self,
        limits: Limits,
        f: impl FnOnce() -> mlua::Result<R>,
    ) -> (mlua::Result<R>, usize) {
        self.budget.set(Budget::Armed(limits.cpu));
        let before = self.lua.used_memory();
        let _ = self.lua.set_memory_limit(before + limits.memory);
        let result = f();
        let grown = self.lua.used_memory().saturating_sub(before);
        if matches!(self.budget.get(), Budget::Over) {
            // The hook was tightened to every instruction for the overrun: loosen it again.
            if let Err(e) = set_cpu_hook(&self.lua, &self.budget, HOOK_EVERY) {
                tracing::error!(error = %e, "cannot reset the policy CPU hook");
            }
        }
        self.budget.set(Budget::Idle);
        let _ = self.lua.set_memory_limit(0);
        (result, grown)
    }
}

/// The running call's budget, as the VM's app data, for the gateway's own long functions.
struct CallBudget(Rc<Cell<Budget>>);

/// Whether the running call is past its CPU deadline: long gateway functions (the codecs)
/// look every so often and stop, as the hook stops Lua code.
/// A call that has not met its first hook yet starts its clock here.
pub(crate) fn over_budget(lua: &Lua) -> bool {
    lua.app_data_ref::<CallBudget>().is_some_and(|b| {
        if let Budget::Armed(limit) = b.0.get() {
            b.0.set(Budget::Running(Instant::now() + limit));
        }
        b.0.get().is_over()
    })
}

impl Budget {
    /// Whether the running call is past its deadline.
    fn is_over(self) -> bool {
        match self {
            Budget::Over => true,
            Budget::Running(deadline) => Instant::now() >= deadline,
            Budget::Idle | Budget::Armed(_) => false,
        }
    }
}

/// Installs the CPU-limit hook, firing every `every` instructions, for the thread running
/// (the main thread outside a call). A global hook: coroutines created by policies inherit it.
fn set_cpu_hook(lua: &Lua, budget: &Rc<Cell<Budget>>, every: u32) -> mlua::Result<()> {
    let budget = budget.clone();
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(every),
        move |lua, debug| cpu_hook(lua, debug, &budget),
    )
}

/// The CPU limit. The first hook of a call starts its clock; past the deadline the hook fails.
///
/// Once over, it fires at every instruction of the thread it runs in and fails each time, so
/// that no policy code runs on: not code that catches the error (`pcall`, `coroutine.resume`),
/// and not a loop behind a function that swallows errors.
fn cpu_hook(
    lua: &Lua,
    debug: &mlua::debug::Debug,
    budget: &Rc<Cell<Budget>>,
) -> mlua::Result<VmState> {
    match budget.get() {
        Budget::Armed(limit) => {
            budget.set(Budget::Running(Instant::now() + limit));
            return Ok(VmState::Continue);
        }
        Budget::Running(deadline) if Instant::now() >= deadline => budget.set(Budget::Over),
        // Another thread of the call (a coroutine's caller) meets the overrun: tighten it too.
        Budget::Over => {}
        Budget::Running(_) | Budget::Idle => return Ok(VmState::Continue),
    }
    set_cpu_hook(lua, budget, 1)?;
    let (src, line) = policy_line(lua).unwrap_or_else(|| {
        let src = debug.source().short_src.map(|s| s.into_owned());
        (src.unwrap_or_default(), debug.current_line().unwrap_or(0))
    });
    Err(mlua::Error::runtime(format!(
        "{src}:{line}: CPU limit exceeded"
    )))
}

/// Runs `f` with the running call's memory limit lifted, for a value the gateway makes for the
/// script whose size it bounds itself (a header value): mlua then makes it without a protected
/// call, which costs about 700 instructions. Outside a call there is no limit to lift.
pub(crate) fn unlimited<R>(lua: &Lua, f: impl FnOnce() -> mlua::Result<R>) -> mlua::Result<R> {
    let limit = lua.set_memory_limit(0).unwrap_or(0);
    let result = f();
    if limit != 0 {
        let _ = lua.set_memory_limit(limit);
    }
    result
}

/// The compiled scripts of one route, and how to run them.
pub(crate) struct LuaRoutePolicy {
    /// This policy itself, for the futures of calls that wait.
    pub(crate) this: std::rc::Weak<LuaRoutePolicy>,
    pub(crate) vm: Rc<Vm>,
    pub(crate) on_upgrade: Option<Rc<Script>>,
    pub(crate) on_client_frame: Option<Rc<Script>>,
    pub(crate) on_server_frame: Option<Rc<Script>>,
    pub(crate) on_close: Option<Rc<Script>>,
    pub(crate) limits: Limits,
    pub(crate) on_error: OnPolicyError,
    pub(crate) codec: Option<&'static dyn codec::Codec>,
    pub(crate) mime: Rc<str>,
}

/// A compiled script: the function it returned, and its path for messages.
pub(crate) struct Script {
    pub(crate) function: Function,
    pub(crate) path: Rc<str>,
}

impl Script {
    /// Wraps a failure of this script for the log and the proxy.
    pub(crate) fn error(&self, error: &mlua::Error, limits: Limits) -> PolicyError {
        PolicyError {
            script: self.path.to_string(),
            message: full_path(describe(error, limits), &self.path),
        }
    }
}

impl Engine {
    /// Creates a VM and compiles every route's scripts in it, reading them from their files.
    pub fn new(config: &Config, backend: impl Into<Backend>) -> Result<Engine, LoadError> {
        Engine::with_sources(config, &Sources::read(config)?, backend)
    }

    /// Creates a VM and compiles every route's scripts in it from `sources`.
    pub fn with_sources(
        config: &Config,
        sources: &Sources,
        backend: impl Into<Backend>,
    ) -> Result<Engine, LoadError> {
        let vm = Rc::new(new_vm(backend.into()).map_err(|e| LoadError {
            script: PathBuf::from("<engine>"),
            message: format!("cannot set up the Lua VM: {e}"),
        })?);
        let mut routes = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            routes.push(if route.policies.is_empty() {
                None
            } else {
                let mut policy = compile_route(&vm, route, sources)?;
                Some(Rc::new_cyclic(|this| {
                    policy.this = this.clone();
                    policy
                }))
            });
        }
        Ok(Engine { routes })
    }

    /// The policies of `route` in this VM, if it has any scripts. `route` must come from the
    /// configuration the engine was compiled from (the worker keeps one engine per snapshot).
    pub fn route_policy(&self, route: &Route) -> Option<Rc<dyn RoutePolicy>> {
        self.routes
            .get(route.index)
            .and_then(|r| r.clone())
            .map(|r| r as Rc<dyn RoutePolicy>)
    }

    /// The route's compiled policies, for `framegate policy-test`.
    pub(crate) fn lua_route(&self, index: usize) -> Option<Rc<LuaRoutePolicy>> {
        self.routes.get(index).and_then(|r| r.clone())
    }
}

fn new_vm(backend: Backend) -> mlua::Result<Vm> {
    let libs = StdLib::TABLE
        | StdLib::STRING
        | StdLib::MATH
        | StdLib::UTF8
        | StdLib::OS
        | StdLib::COROUTINE;
    let lua = Lua::new_with(libs, LuaOptions::default())?;
    let budget: Rc<Cell<Budget>> = Rc::new(Cell::new(Budget::Idle));
    set_cpu_hook(&lua, &budget, HOOK_EVERY)?;
    lua.set_app_data(CallBudget(budget.clone()));
    let watched = budget.clone();
    pattern::install(&lua, budget.clone())?;
    let over_budget = lua.create_function(move |_, ()| Ok(watched.get().is_over()))?;
    let waits = Rc::new(wait::Waits::new());
    let req = request::reusable_req(&lua)?;
    let call_headers = request::call_header_functions(&lua, &req)?;
    let sandbox = sandbox::Sandbox::new(
        &lua,
        backend.clone(),
        waits.clone(),
        over_budget,
        (&call_headers.index, &call_headers.all),
    )?;
    Ok(Vm {
        lua,
        budget,
        sandbox,
        req,
        keep_call_view: call_headers.keep,
        waits,
        fleet: matches!(backend, Backend::Fleet(_)),
    })
}

fn compile_route(
    vm: &Rc<Vm>,
    route: &Route,
    sources: &Sources,
) -> Result<LuaRoutePolicy, LoadError> {
    let limits = Limits {
        cpu: route.policy_cpu_limit,
        memory: route.policy_memory_limit,
        state: route.policy_state_limit,
    };
    // A route with [route.jwt] gets its own `gw`, whose `gw.jwt.verify` uses its settings.
    let gw = match &route.jwt {
        None => None,
        Some(jwt) => {
            let fail = |message: String| LoadError {
                script: PathBuf::from("<route.jwt>"),
                message: format!("route {}: {message}", route.name()),
            };
            let verifier = crate::jwt::Verifier::new(jwt.clone()).map_err(fail)?;
            let gw = vm.sandbox.route_gw(&vm.lua, Arc::new(verifier));
            Some(gw.map_err(|e| fail(e.to_string()))?)
        }
    };
    let load = |path: &Option<PathBuf>| {
        path.as_deref()
            .map(|p| compile(vm, p, sources.get(p)?, limits, gw.as_ref()).map(Rc::new))
            .transpose()
    };
    Ok(LuaRoutePolicy {
        this: std::rc::Weak::new(),
        vm: vm.clone(),
        on_upgrade: load(&route.policies.on_upgrade)?,
        on_client_frame: load(&route.policies.on_client_frame)?,
        on_server_frame: load(&route.policies.on_server_frame)?,
        on_close: load(&route.policies.on_close)?,
        limits,
        on_error: route.on_policy_error,
        codec: codec::for_mime(&route.mime_type),
        mime: Rc::from(route.mime_type.as_str()),
    })
}

/// Loads the script at `path` (its text: `source`) in its own sandboxed environment; it must
/// return a function.
pub(crate) fn compile(
    vm: &Vm,
    path: &Path,
    source: &[u8],
    limits: Limits,
    gw: Option<&mlua::Table>,
) -> Result<Script, LoadError> {
    let shown = path.display().to_string();
    let fail = |message: String| LoadError {
        script: path.to_path_buf(),
        message,
    };
    let env = vm
        .sandbox
        .environment(&vm.lua, gw)
        .map_err(|e| fail(format!("{shown}: {e}")))?;
    let chunk = vm
        .lua
        .load(source)
        .set_name(format!("@{shown}"))
        .set_environment(env);
    let function = chunk
        .into_function()
        .map_err(|e| fail(full_path(describe(&e, limits), &shown)))?;
    // The top level runs once, at load: a floor under its wall-clock limit keeps a busy
    // machine (a worker descheduled for a few milliseconds) from failing a start or reload.
    let top = Limits {
        cpu: limits.cpu.max(LOAD_CPU_FLOOR),
        ..limits
    };
    let returned = vm
        .guarded(top, || function.call::<Value>(()))
        .map_err(|e| fail(prefix(&shown, full_path(describe(&e, limits), &shown))))?;
    match returned {
        Value::Function(function) => Ok(Script {
            function,
            path: Rc::from(shown.as_str()),
        }),
        other => Err(fail(format!(
            "{shown}: the script must return a function (it returned {})",
            other.type_name()
        ))),
    }
}

/// The innermost line of a policy on the stack: the sandbox's own Lua functions (the prelude)
/// and C functions are skipped, so that an error names the policy's line that led there.
fn policy_line(lua: &Lua) -> Option<(String, usize)> {
    (0..64).find_map(|level| {
        lua.inspect_stack(level, |d| {
            let src = d.source().short_src?.into_owned();
            let line = d.current_line()?;
            (src != sandbox::PRELUDE_NAME).then_some((src, line))
        })?
    })
}

/// Lua shortens chunk names to 60 bytes ("...tail.lua:3: msg"); put the whole path back.
pub(crate) fn full_path(message: String, path: &str) -> String {
    if let Some(rest) = message.strip_prefix("...") {
        if let Some(colon) = rest.find(':') {
            if path.ends_with(&rest[..colon]) {
                return format!("{path}{}", &rest[colon..]);
            }
        }
    }
    message
}

/// Adds `path: ` unless the message already starts with it.
fn prefix(path: &str, message: String) -> String {
    if message.starts_with(path) {
        message
    } else {
        format!("{path}: {message}")
    }
}

/// One line describing a Lua failure: the innermost cause, without tracebacks.
pub(crate) fn describe(error: &mlua::Error, limits: Limits) -> String {
    use mlua::Error as E;
    match error {
        E::CallbackError { cause, .. } => describe(cause, limits),
        E::WithContext { cause, .. } => describe(cause, limits),
        E::MemoryError(_) => format!(
            "memory limit exceeded ({} per call)",
            bytesize::ByteSize(limits.memory as u64)
        ),
        E::SyntaxError { message, .. } => first_line(message),
        E::RuntimeError(message) => located(message),
        E::BadArgument {
            to,
            pos,
            name,
            cause,
        } => {
            let what = name
                .as_deref()
                .map_or(format!("#{pos}"), |n| format!("#{pos} ({n})"));
            format!(
                "bad argument {what} to {}: {}",
                to.as_deref().unwrap_or("?"),
                describe(cause, limits)
            )
        }
        other => first_line(&other.to_string()),
    }
}

/// The first line of a Lua error, with the policy's `file:line` in front when the message has
/// none (an error raised by `error()` in a helper, such as mlua's "attempt to get an unknown
/// field"): taken from the traceback that comes with it, at the first frame of a script.
fn located(message: &str) -> String {
    let first = first_line(message);
    let Some((_, trace)) = message.split_once("stack traceback:") else {
        return first;
    };
    let at = trace.lines().map(str::trim).find_map(|frame| {
        let (at, _) = frame.split_once(": in ")?;
        let (src, line) = at.rsplit_once(':')?;
        line.parse::<u32>().ok()?;
        let ours =
            src.starts_with('[') || src.starts_with("__mlua") || src == sandbox::PRELUDE_NAME;
        (!ours).then_some((at, src))
    });
    match at {
        Some((at, src)) if !first.starts_with(src) => format!("{at}: {first}"),
        _ => first,
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").trim().to_owned()
}

/// A misuse error located at the policy line that called into the API.
/// The prelude's wrappers (`gw.shared`'s) are skipped: the line is the policy's.
pub(crate) fn misuse(lua: &Lua, message: impl std::fmt::Display) -> mlua::Error {
    let location = (1..4)
        .find_map(|level| {
            lua.inspect_stack(level, |d| {
                let src = d
                    .source()
                    .short_src
                    .map(|s| s.into_owned())
                    .unwrap_or_default();
                if src == sandbox::PRELUDE_NAME {
                    return None;
                }
                Some(match d.current_line() {
                    Some(line) => format!("{src}:{line}: "),
                    None => String::new(),
                })
            })?
        })
        .unwrap_or_default();
    mlua::Error::runtime(format!("{location}{message}"))
}

#[cfg(test)]
mod tests {
    use super::{full_path, located};

    #[test]
    fn an_error_without_a_location_gets_the_policys_line_from_its_traceback() {
        let raised = "attempt to get an unknown field '1'\nstack traceback:\n\t[C]: in ?\n\t\
                      [C]: in upvalue 'error'\n\t__mlua_index:33: in metamethod 'index'\n\t\
                      framegate prelude:12: in function <framegate prelude:10>\n\t\
                      /p/uf.lua:3: in function </p/uf.lua:1>";
        assert_eq!(
            located(raised),
            "/p/uf.lua:3: attempt to get an unknown field '1'"
        );
        let already = "/p/uf.lua:7: boom\nstack traceback:\n\t/p/uf.lua:7: in function <x>";
        assert_eq!(located(already), "/p/uf.lua:7: boom");
        assert_eq!(located("no traceback"), "no traceback");
    }

    #[test]
    fn truncated_chunk_names_get_their_whole_path_back() {
        let path = "/srv/policies/a-very-long-directory-name/and-a-long-file-name.lua";
        let short = format!("...{}:3: unexpected symbol", &path[path.len() - 40..]);
        assert_eq!(
            full_path(short, path),
            format!("{path}:3: unexpected symbol")
        );
        assert_eq!(full_path("x.lua:1: boom".into(), path), "x.lua:1: boom");
    }
}
