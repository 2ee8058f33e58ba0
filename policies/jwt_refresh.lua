-- on_client_frame, on a route with [route.jwt] and expire_with_token = true: a client keeps its
-- session past its token's expiry by sending a refreshed token in-band,
--   {"type":"refresh","token":"<new access token>"}
-- which is checked like the upgrade's token, must name the same subject, and moves the close
-- time to the new token's exp (never past the route's expire). Other messages go on unchanged.
return function(msg, ctx, conn)
  local m = msg.json
  if type(m) ~= "table" or m.type ~= "refresh" then
    return nil
  end
  local claims, err = gw.jwt.verify(m.token or "")
  if not claims then
    conn:reply({ type = "refresh", error = err })
    return false
  end
  if claims.sub ~= ctx.jwt.sub then
    conn:close(1008, "token of another subject")
    return false
  end
  conn:expire_at(claims.exp)
  conn:reply({ type = "refresh", exp = claims.exp })
  return false
end
