-- examples/kv_redis_server.lua: the line protocol of examples/kv_redis.lua
-- on 127.0.0.1:7005, one worker per core, its state in the redis-server on
-- 127.0.0.1:6379 (Debian: redis-server; lua-resty-redis: lua-nginx-redis).
--   lua5.4 examples/kv_redis_server.lua [port] [redis port]
-- Try it (bash's /dev/tcp: Debian ships no nc by default; Ctrl-C leaves):
--   bash -c 'exec 3<>/dev/tcp/127.0.0.1/7005; cat <&3 & cat >&3'
-- then "set greeting hello", "get greeting", "visit", "login ann",
-- "whoami <the token>", "quit". Start a second one on another port
-- (lua5.4 examples/kv_redis_server.lua 7006): it sees the same keys, the
-- same visitor count, the same sessions; redis-cli KEYS 'kv_redis:*' too.
local multiloop = require("multiloop")

local server = multiloop.server{
  host = "127.0.0.1",
  port = tonumber(arg[1]) or 7005,
  handler = "examples.kv_redis",
  receive_limit = 64 * 1024,          -- the longest line
  config = { redis_port = tonumber(arg[2]) or 6379 },
}
server:start()
local host, port = server:address()
print(("multiloop kv_redis server on %s:%d with %d workers, Redis on 127.0.0.1:%d; Ctrl-C stops it")
  :format(host, port, server.workers, tonumber(arg[2]) or 6379))
io.stdout:flush()
local signal = server:run()
print(("stopped on %s"):format(signal))
