-- examples/proxy_server.lua: the TCP proxy of examples/proxy.lua on
-- 127.0.0.1:7004, one worker per core, in front of the upstreams given on the
-- command line (default: a redis-server on 127.0.0.1:6379).
--   lua5.4 examples/proxy_server.lua [port] [upstream ...]
-- Try it: redis-server --port 6379 & lua5.4 examples/proxy_server.lua 7004
-- then redis-cli -p 7004 PING (or redis-benchmark -p 7004 -q -t get,set).
local multiloop = require("multiloop")

local upstreams = { table.unpack(arg, 2) }
if #upstreams == 0 then upstreams = { "127.0.0.1:6379" } end

local server = multiloop.server{
  host = "127.0.0.1",
  port = tonumber(arg[1]) or 7004,
  handler = "examples.proxy",
  config = { upstreams = upstreams },
}
server:start()
local host, port = server:address()
print(("multiloop proxy on %s:%d with %d workers, to %s; Ctrl-C stops it")
  :format(host, port, server.workers, table.concat(upstreams, ", ")))
io.stdout:flush()
local signal = server:run()
print(("stopped on %s"):format(signal))
