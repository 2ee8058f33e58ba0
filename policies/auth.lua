-- on_upgrade: token authentication with dynamic routing.
-- The token comes from "Authorization: Bearer <token>" or the access_token query parameter.
-- Demo tokens are listed below; a real deployment would verify a JWT or ask an auth service.
local users = {
  ["ann-token"] = { user = "ann", tenant = "acme", admin = true },
  ["bob-token"] = { user = "bob", tenant = "acme", admin = false },
}

return function(req, ctx)
  local auth = req.headers["authorization"]
  local token = (auth and auth:match("^Bearer%s+(.+)$")) or req.query.access_token
  if not token then
    return req:reject(401, "missing token", { ["www-authenticate"] = "Bearer" })
  end
  local who = users[token]
  if not who then
    return req:reject(403, "unknown token")
  end
  if req.params.room == "admin" and not who.admin then
    return req:reject(403, "the admin room is for admins")
  end
  ctx.user = who.user
  ctx.tenant = who.tenant
  -- Each tenant's rooms live under its own prefix on the chat service.
  req:set_upstream("ws://127.0.0.1:9002/" .. who.tenant .. "/rooms/" .. req.params.room)
  req:set_header("x-user", who.user)
  -- Non-admins get at most ten minutes per connection (the route allows an hour).
  if not who.admin then
    req:expire_in(600)
  end
end
