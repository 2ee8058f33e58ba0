-- on_client_frame: accept only JSON objects with a string "type"; tell the sender what is
-- wrong instead of forwarding; stamp valid messages with the authenticated user.
return function(msg, ctx, conn)
  local m = msg.json
  if m == nil then
    conn:reply({ error = "invalid message", detail = msg.json_error })
    return false
  end
  if type(m) ~= "table" or type(m.type) ~= "string" then
    conn:reply({ error = "invalid message", detail = "a JSON object with a string \"type\" is required" })
    return false
  end
  if m.type == "kick" then
    conn:close(1008, "not allowed")
    return false
  end
  m.from = ctx.user
  return m
end
