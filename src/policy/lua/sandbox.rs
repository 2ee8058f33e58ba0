//! What a policy script can reach: a fresh environment per script with a whitelist of the
//! standard library (no `io`, `os.execute`/`exit`/`remove`, `load`, `loadfile`, `dofile`,
//! `require`, `debug`, `string.dump`, `collectgarbage` or `rawset`; `pcall` and `xpcall` cannot
//! swallow the CPU limit), and read-only views of shared tables (`ctx`, `gw`, `req`'s fields).
//!
//! A read-only view is an empty proxy whose metatable serves reads from a private copy, so every
//! write, at any depth, reaches `__newindex` and raises "<what> is read-only". `pairs`, `ipairs`,
//! `#` and the `table` functions see through it; `next` and `rawget` see an empty table.

use std::sync::Arc;

use mlua::{Function, Lua, Table};

use super::headers::HeaderSource;
use super::request::CallHeaderFunctions;
use crate::policy::shared::SharedDict;

const PRELUDE: &str = r#"
local G_string, G_table, G_math, G_utf8, G_coroutine, G_os = string, table, math, utf8, coroutine, os
local next, type, error, setmetatable, getmetatable, pairs, rawget, rawset =
  next, type, error, setmetatable, getmetatable, pairs, rawget, rawset

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

local frozen = setmetatable({}, { __mode = "k" })

local function freeze(t, what, seen)
  local done = seen[t]
  if done then return done end
  if done == false then
    -- The table to swap: its replacement is made now that it is met.
    done = seen.make()
    seen[t] = done
    return done
  end
  if frozen[t] then return t end
  local view, proxy = {}, {}
  seen[t] = proxy
  for k, v in next, t do
    if type(v) == "table" then v = freeze(v, what, seen) end
    view[k] = v
  end
  local function readonly() error(what .. " is read-only", 2) end
  frozen[proxy] = true
  return setmetatable(proxy, {
    __index = view,
    __newindex = readonly,
    __len = function() return #view end,
    __pairs = function() return next, view, nil end,
    __metatable = what,
  })
end

-- Read-only views of req's table fields, made from Rust when a field is first read: one
-- shared metatable, so a view costs a table and two weak entries.
local views = setmetatable({}, { __mode = "k" })
local req_meta = {
  __index = function(p, k) return views[p][k] end,
  __newindex = function() error("req is read-only", 2) end,
  __len = function(p) return #views[p] end,
  __pairs = function(p) return next, views[p], nil end,
  __metatable = "req",
}

-- Header views (src/policy/lua/headers.rs). A kept view is an empty proxy whose reads are
-- looked up by `lookup` in the source that header_src maps it to; `pairs` makes the whole
-- table once. The call's view (req.headers) holds nothing: its metatable's functions read
-- the running call's headers from Rust.
local header_src = setmetatable({}, { __mode = "k" })
local header_all = setmetatable({}, { __mode = "k" })
local function header_views(lookup, materialise, call_index, call_all)
  local metas = {}
  local function meta(what)
    local m = metas[what]
    if m then return m end
    m = {
      __index = function(p, k) return lookup(header_src[p], k) end,
      __newindex = function() error(what .. " is read-only", 2) end,
      __len = function() return 0 end,
      __pairs = function(p)
        local all = header_all[p]
        if not all then
          all = materialise(header_src[p])
          header_all[p] = all
        end
        return next, all, nil
      end,
      __metatable = what,
    }
    metas[what] = m
    return m
  end
  local call_meta = {
    __index = call_index,
    __newindex = function() error("req is read-only", 2) end,
    __len = function() return 0 end,
    __pairs = function(p) return next, call_all(p), nil end,
    __metatable = "req",
  }
  return function(source, what)
    local p = setmetatable({}, meta(what))
    header_src[p] = source
    frozen[p] = true
    return p
  end, call_meta
end

-- No policy code may outlive the CPU limit (docs/policies.md, Limits). Lua runs some code with
-- its hooks off, where the CPU limit cannot stop it: the error handler called for an error the
-- hook raised (xpcall's), finalizers (__gc), and __close handlers (mlua raises the hook's error
-- by resetting the stack inside the hook, which closes the running function's to-be-closed
-- variables there). The functions below keep policies out of those places.

-- pcall and xpcall cannot swallow the CPU limit: an error caught after the call's deadline
-- is raised again, so the policy call ends. xpcall's handler returns at once past the
-- deadline: it may then be running inside the hook, where nothing would stop a loop.
local function guarded_pcall(over_budget)
  local function check(ok, ...)
    if not ok and over_budget() then error((...), 0) end
    return ok, ...
  end
  local function safe_xpcall(f, handler, ...)
    if type(handler) ~= "function" then return check(xpcall(f, handler, ...)) end
    return check(xpcall(f, function(e)
      if over_budget() then return e end
      return handler(e)
    end, ...))
  end
  return function(f, ...) return check(pcall(f, ...)) end, safe_xpcall
end

-- No table a policy can reach has a __gc or a __close metamethod. Lua marks a table for
-- finalization only if its metatable has __gc when setmetatable is called, and a value is
-- closable only if its metatable has __close when the variable is declared; so setmetatable
-- refuses both, and seals the metatable against getting them later: a guard metatable on it
-- refuses the two keys (there is no rawset in the sandbox). A sealed table cannot take another
-- metatable, and a table that has one (not a seal) cannot become a metatable: the guard must be
-- the metatable's own. Tables the gateway makes carry protected metatables of their own.
local sealed = setmetatable({}, { __mode = "k" })
local function unfinalizable(what, key)
  return what .. ": " .. key .. " metamethods are not allowed in policies (they would run outside the CPU limit)"
end
local seal = {
  __newindex = function(m, k, v)
    if k == "__gc" or k == "__close" then error(unfinalizable("a metatable", k), 2) end
    rawset(m, k, v)
  end,
  __metatable = false,
}

local function safe_setmetatable(t, mt)
  if sealed[t] then
    error("setmetatable: this table is a metatable; in policies a metatable cannot have a metatable of its own", 2)
  end
  if type(mt) == "table" and not sealed[mt] and not frozen[mt] then
    if rawget(mt, "__gc") ~= nil then error(unfinalizable("setmetatable", "__gc"), 2) end
    if rawget(mt, "__close") ~= nil then error(unfinalizable("setmetatable", "__close"), 2) end
    if getmetatable(mt) ~= nil then
      error("setmetatable: in policies a metatable cannot have a metatable of its own", 2)
    end
    setmetatable(mt, seal)
    sealed[mt] = true
  end
  return setmetatable(t, mt)
end

-- What the gateway's own metatables are is none of a policy's business: only sealed ones are
-- shown (the others are protected by a __metatable field and show that).
local function safe_getmetatable(v)
  local mt = getmetatable(v)
  if type(mt) == "table" and not sealed[mt] then return nil end
  return mt
end

local function environment(gw, print, over_budget)
  local safe_pcall, safe_xpcall = guarded_pcall(over_budget)
  local env = {
        assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs, pcall = safe_pcall,
    select = select, tonumber = tonumber, tostring = tostring, type = type, xpcall = safe_xpcall,
    rawequal = rawequal, rawget = rawget, rawlen = rawlen, setmetatable = safe_setmetatable,
    getmetatable = safe_getmetatable, _VERSION = _VERSION,
    string = copy(G_string), table = copy(G_table), math = copy(G_math), utf8 = copy(G_utf8),
    coroutine = copy(G_coroutine),
    os = { time = G_os.time, clock = G_os.clock, date = G_os.date, difftime = G_os.difftime },
    gw = gw, print = print,
  }
  env.string.dump = nil
  env.unpack = G_table.unpack
  env._G = env
  return env
end

-- The string metatable's __index is the real string library, shared by every script:
-- hide it so that no script can change string methods for the others.
-- string.dump is taken out of the shared library too, or ("").dump would still reach it.
G_string.dump = nil
getmetatable("").__metatable = false

-- `from`, when given, is replaced by what `make()` returns wherever it occurs in `t`
-- (`make` is called once, and only if `from` occurs).
return function(t, what, from, make)
    local seen = {}
    if from then seen[from] = false seen.make = make end
    return freeze(t, what, seen)
  end, header_views, environment,
  frozen, views, req_meta
"#;

/// Makes read-only views of tables, and header views with any-case look-ups. Registered as
/// the VM's app data, so that `req` can make its fields' views when they are first read.
#[derive(Clone)]
pub(crate) struct ReadOnlyViews {
    freeze: Function,
    /// `(source, what) -> view`: a kept header view over a [`HeaderSource`] userdata.
    header_view: Function,
    /// The metatable of the call's header views (`req.headers`).
    pub(crate) call_headers_meta: Table,
    /// Views already frozen (weak keys): `freeze` keeps them as they are.
    frozen: Table,
    /// View -> its table, for `req_meta` (weak keys).
    views: Table,
    req_meta: Table,
}

impl ReadOnlyViews {
    /// A read-only view of a flat table of `req` (writes raise "req is read-only"), made
    /// without copying it.
    pub(crate) fn req_view(&self, lua: &Lua, table: Table) -> mlua::Result<Table> {
        let view = lua.create_table()?;
        view.set_metatable(Some(self.req_meta.clone()))?;
        self.views.raw_set(&view, table)?;
        self.frozen.raw_set(&view, true)?;
        Ok(view)
    }

    /// The read-only view of `table`; writes raise "`what` is read-only". Where `swap` is
    /// `(from, make)`, what `make()` returns stands for `from` wherever `from` occurs in
    /// `table`; `make` is called once, and only if `from` occurs.
    pub(crate) fn freeze(
        &self,
        table: Table,
        what: &str,
        swap: Option<(&Table, &Function)>,
    ) -> mlua::Result<Table> {
        match swap {
            Some((from, make)) => self.freeze.call((table, what, from, make)),
            None => self.freeze.call((table, what)),
        }
    }

    /// A kept read-only view of `source`'s headers (see [`super::headers`]); writes raise
    /// "`what` is read-only".
    pub(crate) fn header_view(
        &self,
        lua: &Lua,
        source: HeaderSource,
        what: &str,
    ) -> mlua::Result<Table> {
        self.header_view.call((lua.create_userdata(source)?, what))
    }
}

/// The sandbox of one VM.
pub struct Sandbox {
    pub(crate) views: ReadOnlyViews,
    environment: Function,
    gw: Table,
    print: Function,
    over_budget: Function,
}

impl Sandbox {
    /// Sets up the prelude and the `gw` table in `lua`.
    /// `call_headers` are the `__index` and `pairs` functions of the call's header views
    /// (see [`super::headers`]).
    pub(crate) fn new(
        lua: &Lua,
        dict: Arc<SharedDict>,
        over_budget: Function,
        call_headers: &CallHeaderFunctions,
    ) -> mlua::Result<Sandbox> {
        let (freeze, header_views, environment, frozen, views, req_meta): (
            Function,
            Function,
            Function,
            Table,
            Table,
            Table,
        ) = lua.load(PRELUDE).set_name("=framegate prelude").eval()?;
        let (lookup, materialise) = super::headers::kept_view_functions(lua)?;
        let (header_view, call_headers_meta): (Function, Table) =
            header_views.call((lookup, materialise, &call_headers.index, &call_headers.all))?;
        let gw = super::gw::build(lua, dict)?;
        let gw: Table = freeze.call((gw, "gw"))?;
        let print = super::gw::print_function(lua)?;
        let views = ReadOnlyViews {
            freeze,
            header_view,
            call_headers_meta,
            frozen,
            views,
            req_meta,
        };
        lua.set_app_data(views.clone());
        Ok(Sandbox {
            views,
            environment,
            gw,
            print,
            over_budget,
        })
    }

    /// A fresh global environment for one script.
    pub(crate) fn environment(&self, _lua: &Lua) -> mlua::Result<Table> {
        self.environment
            .call((&self.gw, &self.print, &self.over_budget))
    }

    /// The read-only view of `table`; writes raise "`what` is read-only".
    pub(crate) fn freeze(&self, table: Table, what: &str) -> mlua::Result<Table> {
        self.views.freeze(table, what, None)
    }
}
