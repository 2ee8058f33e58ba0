---@meta
-- framegate's Lua policy API, for lua-language-server (LuaLS): completion, hovers and type
-- checks in editors. framegate never loads this file; .luarc.json at the repository root points
-- LuaLS at it. The reference is docs/policies.md.
--
-- Annotate a policy like this:
--
--   ---@param msg FramegateMessage
--   ---@param ctx FramegateContext
--   ---@param conn FramegateConnection
--   ---@return nil|boolean|string|table
--   local function policy(msg, ctx, conn) ... end
--   return policy

-------------------------------------------------------------------------------------------------
-- Script shapes: each script returns one function of one of these types.
-------------------------------------------------------------------------------------------------

---on_upgrade: runs on the HTTP upgrade request, before the upstream is contacted.
---@alias FramegateUpgradePolicy fun(req: FramegateRequest, ctx: FramegateContext)

---on_client_frame / on_server_frame: runs on each whole data message.
---nil or true forwards it, false drops it, a string or a table replaces it.
---@alias FramegateFramePolicy fun(msg: FramegateMessage, ctx: FramegateContext, conn: FramegateConnection): nil|boolean|string|table

---on_close: runs once when the connection has ended; it cannot send anything.
---@alias FramegateClosePolicy fun(ctx: FramegateContext, conn: FramegateConnection, info: FramegateCloseInfo)

-------------------------------------------------------------------------------------------------
-- req (on_upgrade)
-------------------------------------------------------------------------------------------------

---The request's fields, as seen by `req` in on_upgrade and copied into `ctx.request`.
---@class FramegateRequestFields
---@field method string HTTP method: "GET" for an upgrade; a plain HTTP request on a route with http = "proxy" has its own.
---@field upgrade boolean true for a WebSocket upgrade; false for a plain HTTP request (route.http = "proxy"), for which expire_*, tag, select_subprotocol and ctx have no effect.
---@field path string Raw request path without the query string (not percent-decoded).
---@field query table<string, string> Decoded query parameters; a repeated key keeps its first value.
---@field query_string string Raw query string without "?"; "" when there is none.
---@field headers table<string, string> Request headers: lower-case keys, any-case lookup, repeated values joined with ", ".
---@field params table<string, string> The route's path placeholders, raw (`{*rest}` appears as `rest`).
---@field client_ip string IP address of the direct peer (not X-Forwarded-For).
---@field scheme "ws"|"wss" How the client connected: "wss" on a [[server.tls]] listener, "ws" on a plain one.
---@field host? string The Host header as sent, port included; nil when the request has none.
---@field subprotocols string[] Subprotocols the client offered, in order.
---@field jwt? table<string, any> With [route.jwt]: the verified token's claims (read-only); nil on other routes.

---`req`: the client's upgrade request in on_upgrade. Read-only: change the request with its
---methods, which take effect when on_upgrade returns without an error.
---@class FramegateRequest: FramegateRequestFields
local FramegateRequest = {}

---Answers the client with this response; the upstream is never contacted. Applies when the
---script returns (write `return req:reject(...)`); every other change is discarded.
---The response has exactly `headers` (plus content-length and date): no content-type is added.
---@param status integer 200-599.
---@param body? string Response body; empty by default.
---@param headers? table<string, string|number> Response headers.
function FramegateRequest:reject(status, body, headers) end

---Connects to `url` (ws:// or wss://) instead of the route's upstream. The URL is used exactly
---as given: no placeholders are substituted and the client's query string is not appended.
---@param url string
function FramegateRequest:set_upstream(url) end

---Sets a header on the upstream request (replacing the client's values), or removes it when
---`value` is nil. Refused for connection, upgrade, host, content-length, transfer-encoding and
---sec-websocket-key/-version/-extensions/-accept.
---@param name string Case-insensitive.
---@param value string|number|nil
function FramegateRequest:set_header(name, value) end

---Chooses one of the subprotocols the client offered: only it is offered upstream, and the
---client's 101 carries it.
---@param name string Must be in `req.subprotocols` (case-sensitive).
function FramegateRequest:select_subprotocol(name) end

---Closes the connection this many seconds from now (1001 "connection lifetime expired").
---Only shortens: the earliest of every expire_* call and the route's `expire` wins.
---@param seconds number >= 0.
function FramegateRequest:expire_in(seconds) end

---Closes the connection at this wall-clock time (1001 "connection lifetime expired").
---Only shortens: the earliest of every expire_* call and the route's `expire` wins.
---@param unix_seconds number Unix time in seconds, e.g. `gw.now() + 600`.
function FramegateRequest:expire_at(unix_seconds) end

---Labels the connection for the admin API (`GET /admin/connections?tag=key:value`, kicks and
---broadcasts by tag) and for `conn.tags` in the frame policies and on_close. At most 16 tags;
---setting a key again replaces its value.
---@param key string 1 to 64 characters of A-Z a-z 0-9 _ . - (no ':').
---@param value string|number At most 256 bytes, no control characters.
function FramegateRequest:tag(key, value) end

---Every value of one header, in order, not split on commas; empty when the header is absent.
---@param name string Case-insensitive.
---@return string[]
function FramegateRequest:header_values(name) end

-------------------------------------------------------------------------------------------------
-- ctx
-------------------------------------------------------------------------------------------------

---`ctx`: the connection's context. A plain table in on_upgrade; frozen when on_upgrade returns,
---after which every write raises "ctx is read-only". `pairs`, `ipairs`, `#` and the table
---functions read it; `next` and `rawget` see an empty table; JSON encoding gives `{}`.
---@class FramegateContext
---@field request FramegateRequestFields Added by framegate when on_upgrade returns.
---@field jwt? table<string, any> With [route.jwt]: the upgrade token's claims, added when on_upgrade returns.
---@field [string] any Whatever on_upgrade stored.

-------------------------------------------------------------------------------------------------
-- msg (on_client_frame, on_server_frame)
-------------------------------------------------------------------------------------------------

---`msg`: one whole data message. Read-only, and valid only during the call that received it.
---@class FramegateMessage
---@field type "text"|"binary"
---@field data string The payload; each read makes a new copy, so read it once into a local.
---@field size integer Payload length in bytes.
---@field direction "client"|"server" "client" in on_client_frame, "server" in on_server_frame.
---@field mime string The route's mime_type, lower case.
---@field json any Payload decoded by the route's codec (decoded on first access, cached for the call); nil when it cannot be decoded.
---@field json_error? string Why `json` is nil: "binary message", "mime type … has no decoder" or "invalid JSON: …".
---@field text? string The payload when it is valid UTF-8; nil otherwise.

-------------------------------------------------------------------------------------------------
-- conn (on_client_frame, on_server_frame, on_close)
-------------------------------------------------------------------------------------------------

---`conn`: the connection, the same object for its whole life.
---@class FramegateConnection
---@field id integer The connection id, as in the `conn=` field of log lines.
---@field state table<any, any> Per-connection table for the frame policies and on_close; its contents are writable.
---@field tags table<string, string> The tags on_upgrade set with `req:tag`; read-only.
local FramegateConnection = {}

---Sends `data` back to the sender of the message being handled (the client in
---on_client_frame, the upstream in on_server_frame). A string is sent as text when it is
---UTF-8, else as binary; a table is encoded per the route's mime_type. Queued before the
---forwarded message; at most 64 sends per call; not allowed in on_close. Returns true, or
---nil and "queue full" when the leg's queue has no room for it (route.max_queued_bytes).
---@param data string|table
---@return true|nil ok
---@return string|nil err
function FramegateConnection:reply(data) end

---Sends `data` to the client. Same rules as `reply`.
---@param data string|table
---@return true|nil ok
---@return string|nil err
function FramegateConnection:send_client(data) end

---Sends `data` to the upstream. Same rules as `reply`.
---@param data string|table
---@return true|nil ok
---@return string|nil err
function FramegateConnection:send_server(data) end

---Closes both legs with this close frame once the call returns; the message being handled is
---not forwarded. Not allowed in on_close.
---@param code? integer 1000-4999, not 1004-1006 or 1015; default 1000.
---@param reason? string At most 123 bytes; default "".
function FramegateConnection:close(code, reason) end

---Moves the connection's deadline to this Unix time once the call returns, never past the
---route's `expire`. With jwt.expire_with_token, a time before the route's `expire` closes with
---1008 "token expired". Only in on_client_frame and on_server_frame.
---@param unix_seconds number e.g. `claims.exp` from `gw.jwt.verify`.
function FramegateConnection:expire_at(unix_seconds) end

-------------------------------------------------------------------------------------------------
-- info (on_close)
-------------------------------------------------------------------------------------------------

---`info`: how the connection ended.
---@class FramegateCloseInfo
---@field code integer Close code describing the end (1005: close frame without a code; 1006: no close frame).
---@field reason string The matching reason.
---@field by "client"|"upstream"|"gateway" Who ended it ("gateway": a timer, shutdown, a policy or a failed upstream).
---@field duration number Seconds from the upgrade to the end.
---@field messages_in integer Client messages forwarded to the upstream.
---@field bytes_in integer Their payload bytes.
---@field messages_out integer Upstream messages forwarded to the client.
---@field bytes_out integer Their payload bytes.
---@field dropped_in integer Client messages a policy dropped.
---@field dropped_out integer Upstream messages a policy dropped.
---@field undelivered integer Messages, either way, queued for a leg and never fully written because the connection closed.

-------------------------------------------------------------------------------------------------
-- gw
-------------------------------------------------------------------------------------------------

---`gw.log`: log lines under the target framegate::policy, with the caller's file:line in `at`.
---Arguments are joined with spaces; non-strings are converted as by tostring.
---@class FramegateLog
local FramegateLog = {}

---@param ... any
function FramegateLog.debug(...) end

---@param ... any
function FramegateLog.info(...) end

---@param ... any
function FramegateLog.warn(...) end

---@param ... any
function FramegateLog.error(...) end

---`gw.json`: JSON, whatever the route's mime_type.
---@class FramegateJson
---@field null lightuserdata Stands for JSON null: decoding gives it, encoding turns it into null. Not nil.
local FramegateJson = {}

---Decodes JSON text. Objects and arrays become tables, null becomes `gw.json.null`, integers
---stay integers.
---@param text string
---@return any value The decoded value, or nil on failure.
---@return string? err "invalid JSON: …" on failure.
function FramegateJson.decode(text) end

---Encodes a value as JSON. Tables with a length > 0 become arrays; key order is not preserved.
---@param value any
---@return string? json The JSON text, or nil on failure.
---@return string? err "cannot encode as JSON: …" on failure.
function FramegateJson.encode(value) end

---`gw.shared`: a dictionary shared by every connection on every worker (with
---[shared] backend = "redis", by every gateway of the fleet). Call with a colon.
---Values are strings, numbers and booleans; TTLs are in seconds. On a fleet, a call in
---on_upgrade or on_close waits for Redis (at most shared.timeout) and returns nil,
---"shared backend unavailable" when it does not answer; in frame policies nothing waits.
---@class FramegateShared
---@field on_unavailable "allow"|"deny"|nil shared.on_unavailable on a fleet; nil on the local backend.
local FramegateShared = {}

---@param key string
---@return string|number|boolean|nil value nil when missing or expired.
function FramegateShared:get(key) end

---Stores `value` (nil deletes the key), expiring after `ttl` seconds if given.
---@param key string
---@param value string|number|boolean|nil
---@param ttl? number Seconds, >= 0.
---@return true? ok nil when gw.shared is full ([shared] max_entries, max_bytes).
---@return string? err "gw.shared is full".
function FramegateShared:set(key, value, ttl) end

---Adds `by` (default 1) atomically and returns the new value. A missing or expired key starts
---from 0 and gets `ttl`; an existing key keeps its expiry.
---@param key string
---@param by? number
---@param ttl? number Seconds, >= 0.
---@param options? {lease?: boolean} lease = true: on a fleet, the increment belongs to this gateway and goes when it stops renewing its lease.
---@return number? value The new value, or nil when the stored value is not a number or a new key finds gw.shared full.
---@return string? err Why it failed.
function FramegateShared:incr(key, by, ttl, options) end

---@param key string
---@return true? ok
---@return string? err On a fleet: "shared backend unavailable", or in a frame policy "shared backend queue full".
function FramegateShared:delete(key) end

---The gateway's API, the same read-only table in every script.
---@class FramegateGw
---@field log FramegateLog
---@field json FramegateJson
---@field shared FramegateShared
---@field jwt FramegateJwt
gw = {}

---Whether one more event fits the token bucket `key`: `rate` tokens a second, at most `burst`
---(default: rate). Shared by the fleet with [shared] backend = "redis"; never waits.
---@param key string
---@param rate number Tokens a second, > 0.
---@param burst? number At most this many tokens, > 0 (default: rate).
---@return boolean admitted
function gw.limit(key, rate, burst) end

---@class FramegateJwt
local FramegateJwt = {}

---Checks `token` with the route's [route.jwt] settings and the keys held now (never waits).
---Raises an error on a route without [route.jwt].
---@param token string A "Bearer " prefix is ignored.
---@return table<string, any>|nil claims
---@return string|nil err "token expired", "wrong audience", "unknown key id", ...
function FramegateJwt.verify(token) end

---The current wall-clock time in Unix seconds, with a fraction.
---@return number
function gw.now() end
