-- on_close: give back the slot limit_connections.lua took, and write an audit line.
return function(ctx, conn, info)
  if ctx.counted then
    gw.shared:incr(ctx.counted, -1)
  end
  gw.log.info("connection", conn.id, "from", ctx.request.client_ip, "ended by", info.by,
    "after", string.format("%.1fs", info.duration), "with", info.code)
end
