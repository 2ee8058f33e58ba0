//! What a policy script can reach: a fresh environment per script with a whitelist of the
//! standard library (no `io`, `os.execute`/`exit`/`remove`, `load`, `loadfile`, `dofile`,
//! `require`, `debug`, `string.dump`, `collectgarbage` or `rawset`; `pcall` and `xpcall` cannot
//! swallow the CPU limit), and read-only views of shared tables (`ctx`, `gw`, `req`'s fields).
//!
//! A read-only view is an empty proxy whose metatable serves reads from a private copy, so every
//! write, at any depth, reaches `__newindex` and raises "<what> is read-only". `pairs`, `ipairs`,
//! `#` and the `table` functions see through it; `next` and `rawget` see an empty table.
//!
//! It also keeps every policy within reach of the CPU limit (docs/policies.md, Limits): no
//! `__gc` or `__close` metamethods (sealed metatables), an `xpcall` handler that returns at
//! once past the deadline, and `string.rep` and the `table` functions in Lua past
//! 4096 elements. The ctx freeze and `measure` count what `route.policy_state_limit` bounds.

use std::rc::Rc;

use mlua::{Function, Lua, Table};

use super::headers::HeaderSource;
use crate::policy::shared::Backend;

const PRELUDE: &str = r#"
local G_string, G_table, G_math, G_utf8, G_coroutine, G_os = string, table, math, utf8, coroutine, os
local select = select
local next, type, error, setmetatable, getmetatable, pairs, rawget, rawset =
  next, type, error, setmetatable, getmetatable, pairs, rawget, rawset

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

local frozen = setmetatable({}, { __mode = "k" })

-- What a value costs against route.policy_state_limit, about what Lua 5.4 allocates for it on
-- a 64-bit machine: a table 56 bytes, each of its entries 32, a string its length plus 25, a
-- function 40 (what it captures is not seen). Numbers, booleans and the gateway's userdata
-- live in the entries.
local function cost(v)
  local ty = type(v)
  if ty == "string" then return #v + 25 end
  if ty == "function" then return 40 end
  return 0
end

-- `seen.limit`, when set, bounds the cost of what is frozen (`seen.size` so far): past it the
-- freeze fails with `seen.over`.
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
  local limit = seen.limit
  if limit then seen.size = seen.size + 56 end
  for k, v in next, t do
    if limit then
      local size = seen.size + 32 + cost(k) + cost(v)
      if size > limit then error(seen.over, 0) end
      seen.size = size
    end
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

-- The cost of `t` (its keys and values, at any depth; frozen views count nothing, the frozen
-- ctx being counted when it was frozen), or nil as soon as it passes `limit`.
local function measure(t, limit)
  local seen, size = {}, 0
  local function walk(t)
    if seen[t] or frozen[t] then return true end
    seen[t] = true
    size = size + 56
    for k, v in next, t do
      size = size + 32 + cost(k) + cost(v)
      if size > limit then return false end
      if type(k) == "table" and not walk(k) then return false end
      if type(v) == "table" and not walk(v) then return false end
    end
    return true
  end
  if walk(t) then return size end
  return nil
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
  env.unpack = env.table.unpack
  env._G = env
  return env
end

-- Long single C calls. The CPU limit is checked between Lua instructions, so one call into C
-- holds the worker until it returns. Most C functions work in time bounded by the memory they
-- may allocate (and so by the memory limit); these loop over a range that costs no memory
-- (string.rep("", 1e12), table.move over nils, table.insert under a lying __len) or call
-- back into functions the hook cannot reach (a userdata's __index, a C comparator). Above
-- C_RANGE elements they run in Lua, under the hook; below it they stay in C, where each
-- call is then bounded (docs/policies.md, "The bound for a single C call").
local C_RANGE = 4096
local tointeger, maxinteger = G_math.tointeger, G_math.maxinteger

do
  local c_rep = G_string.rep
  -- Doubling: log2(n) concatenations, in time proportional to the bytes made.
  local function rep_lua(s, n)
    local result, piece = "", s
    while true do
      if n % 2 == 1 then result = result .. piece end
      n = n // 2
      if n == 0 then return result end
      piece = piece .. piece
    end
  end
  G_string.rep = function(s, n, sep)
    local k = tointeger(n)
    if k == nil or k <= C_RANGE then return c_rep(s, n, sep) end
    c_rep(s, 0, sep) -- checks s and sep as string.rep does
    s = s .. ""
    if sep == nil or sep == "" then return rep_lua(s, k) end
    return rep_lua(s .. sep, k - 1) .. s
  end
end

do
  local c_insert, c_remove, c_move, c_unpack, c_sort =
    G_table.insert, G_table.remove, G_table.move, G_table.unpack, G_table.sort

  G_table.insert = function(t, ...)
    if select('#', ...) == 2 then
      local pos, v = ...
      local p = tointeger(pos)
      if p and type(t) == "table" then
        local e = #t + 1
        if p >= 1 and p <= e and e - p > C_RANGE then
          for i = e, p + 1, -1 do t[i] = t[i - 1] end
          t[p] = v
          return
        end
      end
    end
    return c_insert(t, ...)
  end

  G_table.remove = function(t, pos)
    local p = tointeger(pos)
    if p and type(t) == "table" then
      local size = #t
      if p >= 1 and size - p > C_RANGE then
        local v = t[p]
        for i = p, size - 1 do t[i] = t[i + 1] end
        t[size] = nil
        return v
      end
    end
    return c_remove(t, pos)
  end

  G_table.move = function(a1, f, e, t, a2)
    local fi, ei, ti = tointeger(f), tointeger(e), tointeger(t)
    if fi and ei and ti and ei >= fi and (fi > 0 or ei < maxinteger + fi) then
      local n = ei - fi + 1
      if n > C_RANGE and ti <= maxinteger - n + 1 then
        if a2 == nil then a2 = a1 end
        if ti > ei or ti <= fi or a1 ~= a2 then
          for i = 0, n - 1 do a2[ti + i] = a1[fi + i] end
        else
          for i = n - 1, 0, -1 do a2[ti + i] = a1[fi + i] end
        end
        return a2
      end
    end
    return c_move(a1, f, e, t, a2)
  end

  -- The values are copied into a plain table in Lua first: unpacking that in C then reads
  -- no metamethods.
  G_table.unpack = function(t, i, j)
    local first = i == nil and 1 or tointeger(i)
    local last = (j == nil and type(t) == "table") and #t or tointeger(j)
    if first and last and last >= first and last - first >= C_RANGE and last - first < 1000000 then
      local plain = {}
      for k = first, last do plain[k - first + 1] = t[k] end
      return c_unpack(plain, 1, last - first + 1)
    end
    return c_unpack(t, i, j)
  end

  -- Heapsort in Lua for long arrays: in place, O(n log n), under the hook.
  local function sort_lua(t, n, lt)
    local function sift(root, last)
      while true do
        local child = 2 * root
        if child > last then return end
        if child < last and lt(t[child], t[child + 1]) then child = child + 1 end
        if lt(t[root], t[child]) then
          t[root], t[child] = t[child], t[root]
          root = child
        else
          return
        end
      end
    end
    for root = n // 2, 1, -1 do sift(root, n) end
    for last = n, 2, -1 do
      t[1], t[last] = t[last], t[1]
      sift(1, last - 1)
    end
  end
  G_table.sort = function(t, comp)
    if type(t) == "table" and (comp == nil or type(comp) == "function") then
      local n = #t
      if n > C_RANGE then
        sort_lua(t, n, comp or function(a, b) return a < b end)
        return
      end
    end
    return c_sort(t, comp)
  end
end

-- The string metatable's __index is the real string library, shared by every script:
-- hide it so that no script can change string methods for the others.
-- string.dump is taken out of the shared library too, or ("").dump would still reach it.
G_string.dump = nil
getmetatable("").__metatable = false

-- `from`, when given, is replaced by what `make()` returns wherever it occurs in `t`
-- (`make` is called once, and only if `from` occurs).
return function(t, what, from, make, limit, over)
    local seen = { size = 0, limit = limit, over = over }
    if from then seen[from] = false seen.make = make end
    return freeze(t, what, seen), seen.size
  end, header_views, environment,
  frozen, views, req_meta, measure
"#;

/// The prelude's chunk name, as Lua shows it in locations.
pub(crate) const PRELUDE_NAME: &str = "framegate prelude";

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
    /// `(table, limit) -> cost or nil` (see `measure` in the prelude).
    measure: Function,
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
    /// `table`; `make` is called once, and only if `from` occurs. Fails with `over` once what it
    /// freezes costs more than `limit` bytes (as `route.policy_state_limit` counts them); returns the view and the cost.
    pub(crate) fn freeze_within(
        &self,
        table: Table,
        what: &str,
        swap: Option<(&Table, &Function)>,
        limit: usize,
        over: &str,
    ) -> mlua::Result<(Table, usize)> {
        let (from, make) = match swap {
            Some((from, make)) => (Some(from), Some(make)),
            None => (None, None),
        };
        self.freeze.call((table, what, from, make, limit, over))
    }

    /// The cost of `table` as `route.policy_state_limit` counts it, or `None` past `limit`.
    pub(crate) fn measure(&self, table: &Table, limit: usize) -> mlua::Result<Option<usize>> {
        self.measure.call((table, limit))
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
    /// For the `gw` of routes with `[route.jwt]`, whose `gw.jwt` holds their verifier.
    backend: Backend,
    waits: Rc<super::wait::Waits>,
}

impl Sandbox {
    /// Sets up the prelude and the `gw` table in `lua`.
    /// `call_index` and `call_all` are the `__index` and `pairs` functions of the call's
    /// header views (see [`super::headers`]); `request` makes them, and is above this module.
    pub(crate) fn new(
        lua: &Lua,
        backend: Backend,
        waits: Rc<super::wait::Waits>,
        over_budget: Function,
        (call_index, call_all): (&Function, &Function),
    ) -> mlua::Result<Sandbox> {
        let (freeze, header_views, environment, frozen, views, req_meta, measure): (
            Function,
            Function,
            Function,
            Table,
            Table,
            Table,
            Function,
        ) = lua
            .load(PRELUDE)
            .set_name(format!("={PRELUDE_NAME}"))
            .eval()?;
        let (lookup, materialise) = super::headers::kept_view_functions(lua)?;
        let (header_view, call_headers_meta): (Function, Table) =
            header_views.call((lookup, materialise, call_index, call_all))?;
        let gw = super::gw::build(lua, backend.clone(), waits.clone(), None)?;
        let gw: Table = freeze.call((gw, "gw"))?;
        let print = super::gw::print_function(lua)?;
        let views = ReadOnlyViews {
            freeze,
            header_view,
            call_headers_meta,
            frozen,
            views,
            req_meta,
            measure,
        };
        lua.set_app_data(views.clone());
        Ok(Sandbox {
            views,
            environment,
            gw,
            print,
            over_budget,
            backend,
            waits,
        })
    }

    /// A fresh global environment for one script; `gw` replaces the VM's own (a route's
    /// with its `gw.jwt`).
    pub(crate) fn environment(&self, _lua: &Lua, gw: Option<&Table>) -> mlua::Result<Table> {
        self.environment
            .call((gw.unwrap_or(&self.gw), &self.print, &self.over_budget))
    }

    /// The frozen `gw` of a route with `[route.jwt]`: the VM's, with the route's `gw.jwt`.
    pub(crate) fn route_gw(
        &self,
        lua: &Lua,
        verifier: std::sync::Arc<crate::jwt::Verifier>,
    ) -> mlua::Result<Table> {
        let gw = super::gw::build(
            lua,
            self.backend.clone(),
            self.waits.clone(),
            Some(verifier),
        )?;
        self.views.freeze.call((gw, "gw"))
    }
}
