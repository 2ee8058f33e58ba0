-- on_server_frame: hide e-mail addresses and phone numbers in messages to clients.
local hidden = { email = true, phone = true }

return function(msg, ctx, conn)
  local m = msg.json
  if type(m) ~= "table" then
    return nil -- not JSON: forward unchanged
  end
  local changed = false
  for field in pairs(hidden) do
    if m[field] ~= nil then
      m[field] = "[redacted]"
      changed = true
    end
  end
  if changed then
    return m
  end
end
