-- bench/redis_pool_handler.lua: the redis-pool scenario of `make bench`:
-- Debian's lua-resty-redis (lua-nginx-redis, the module nginx.redis) over
-- multiloop.ngx, one Redis GET round trip per message the load generator
-- sends, then the message echoed back (so bench/loadgen checks it and counts
-- one operation per GET at 1 in flight).
-- config.redis_port: the bench's redis-server on 127.0.0.1; config.mode:
-- "pool" puts the connection back with set_keepalive after each GET (the
-- next GET reuses it), "connect" closes it (each GET connects anew).
package.path = package.path .. ";/usr/share/lua/5.1/?.lua"
require("multiloop.ngx").install()
local redis = require("nginx.redis")

local config = require("multiloop.core").worker().config or {}
local port = assert(tonumber(config.redis_port), "bench/redis_pool_handler.lua: config.redis_port is not a port")
local pooled = config.mode == "pool"
assert(pooled or config.mode == "connect", "bench/redis_pool_handler.lua: config.mode must be pool or connect")
local KEY = "bench:pool"

local function fail(conn, what, err)
  io.stderr:write("redis-pool: ", what, ": ", tostring(err), "\n")
  conn:close()
end

return {
  serve = function(conn)
    while true do
      local data = conn:receiveany(65536)
      if not data then return end
      local red = redis:new()
      red:set_timeout(5000)
      local ok, err = red:connect("127.0.0.1", port)
      if not ok then return fail(conn, "connect", err) end
      local v
      v, err = red:get(KEY)
      if v ~= "42" then return fail(conn, "GET " .. KEY, err or tostring(v)) end
      if pooled then
        ok, err = red:set_keepalive(60000, 64)
      else
        ok, err = red:close()
      end
      if not ok then return fail(conn, pooled and "set_keepalive" or "close", err) end
      conn:send(data)
    end
  end,
}
