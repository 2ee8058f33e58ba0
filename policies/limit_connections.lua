-- on_upgrade: at most 10 open connections per client IP, across all workers, counted in
-- gw.shared. release_connection.lua (on_close) gives the slot back.
local MAX = 10

return function(req, ctx)
  local key = "conns:" .. req.client_ip
  local open = gw.shared:incr(key, 1)
  ctx.counted = key
  if open > MAX then
    gw.shared:incr(key, -1)
    return req:reject(429, "too many connections from " .. req.client_ip)
  end
end
