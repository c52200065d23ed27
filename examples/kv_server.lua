-- examples/kv_server.lua: the Redis-protocol key-value server of
-- examples/kv.lua on 127.0.0.1:6380, one worker per core.
--   lua5.4 examples/kv_server.lua [port] [capacity in bytes]
-- Try it: redis-cli -p 6380 SET greeting hello; redis-cli -p 6380 GET greeting
-- (or redis-benchmark -p 6380 -t set,get,incr -P 16 for a pipelined load).
local multiloop = require("multiloop")

local server = multiloop.server{
  host = "127.0.0.1",
  port = tonumber(arg[1]) or 6380,
  handler = "examples.kv",
  config = { capacity = tonumber(arg[2]) or 16 * 1024 * 1024 },
}
server:start()
local host, port = server:address()
print(("multiloop kv server on %s:%d with %d workers; Ctrl-C stops it")
  :format(host, port, server.workers))
io.stdout:flush()
local signal = server:run()
print(("stopped on %s"):format(signal))
