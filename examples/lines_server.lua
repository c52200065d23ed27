-- examples/lines_server.lua: the line protocol of examples/lines.lua on
-- 127.0.0.1:7003, one worker per core.
--   lua5.4 examples/lines_server.lua [port]
-- Try it (bash's /dev/tcp: Debian ships no nc by default; type commands,
-- Ctrl-C leaves):
--   bash -c 'exec 3<>/dev/tcp/127.0.0.1/7003; cat <&3 & cat >&3'
-- then, say, "upper hello", "set x 41", "incr x", "count", "quit".
local multiloop = require("multiloop")

local server = multiloop.server{
  host = "127.0.0.1",
  port = tonumber(arg[1]) or 7003,
  handler = "examples.lines",
  receive_limit = 4096,               -- the longest line: past it, "ERR line too long"
  config = { idle_ms = 5 * 60 * 1000 },
}
server:start()
local host, port = server:address()
print(("multiloop lines server on %s:%d with %d workers; Ctrl-C stops it")
  :format(host, port, server.workers))
io.stdout:flush()
local signal = server:run()
print(("stopped on %s"):format(signal))
