-- spec/hostile/flood_handler.lua: the handler of spec/hostile/inbox_flood.lua.
-- Messages: { busy = S } spins S seconds; { flood = N } sends N 200-byte
-- strings to worker 1, counting in the dictionary "sent", "refused" and the
-- refusal's word in "why"; anything else counts "got".
local multiloop = require("multiloop")
local socket = require("socket")
return {
  message = function(worker, v)
    local d = multiloop.shared("hostile.flood")
    if type(v) == "table" and v.flood then
      local sent, refused = 0, 0
      for _ = 1, v.flood do
        local ok, why = worker.send(1, ("x"):rep(200))
        if ok then sent = sent + 1 else refused = refused + 1; d:set("why", why) end
      end
      d:incr("sent", sent, 0)
      d:incr("refused", refused, 0)
    elseif type(v) == "table" and v.busy then
      local t = socket.gettime() + v.busy
      repeat until socket.gettime() >= t
    else
      d:incr("got", 1, 0)
    end
  end,
  connect = function(conn) conn:write("hi\n") end,
}
