-- on_client_frame: at most 5 messages per second per connection, kept in conn.state.
-- Messages over the limit are dropped (and counted), and the sender is told once per second.
local LIMIT = 5

return function(msg, ctx, conn)
  local s = conn.state
  local second = math.floor(gw.now())
  if s.second ~= second then
    s.second, s.count, s.warned = second, 0, false
  end
  s.count = s.count + 1
  if s.count > LIMIT then
    if not s.warned then
      s.warned = true
      conn:reply('{"error":"rate limit: at most 5 messages per second"}')
    end
    return false
  end
end
