-- examples/kv_server.lua: the Redis-protocol key-value server of
-- examples/kv.lua on 127.0.0.1:6380, one worker per core.
--   lua5.4 examples/kv_server.lua [port] [capacity in bytes, default 64 MiB]
-- Try it: redis-cli -p 6380 SET greeting hello; redis-cli -p 6380 GET greeting
-- (redis-cli -p 6380 alone is interactive), and load it with
--   redis-benchmark -p 6380 -q -n 20000 -t ping,set,get,incr,lpush,rpush,lpop,rpop,lrange_100,mset
-- (add -P 16 to pipeline). redis-benchmark's other default tests (SADD,
-- HSET, ZADD, ...) use types this server does not have: it stops at their
-- "unknown command" error.
local multiloop = require("multiloop")

local server = multiloop.server{
  host = "127.0.0.1",
  port = tonumber(arg[1]) or 6380,
  handler = "examples.kv",
  receive_limit = 64 * 1024,          -- a request's lines: Redis's inline limit
  config = { capacity = tonumber(arg[2]) or 64 * 1024 * 1024 },
}
server:start()
local host, port = server:address()
print(("multiloop kv server on %s:%d with %d workers; Ctrl-C stops it")
  :format(host, port, server.workers))
io.stdout:flush()
local signal = server:run()
print(("stopped on %s"):format(signal))
