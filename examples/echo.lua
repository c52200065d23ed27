-- examples/echo.lua: an echo server on 127.0.0.1:7000, one worker per core.
--   lua5.4 examples/echo.lua [port]        (or: make run)
-- Try it (bash's /dev/tcp, so nothing to install; Debian ships no nc by default):
--   bash -c 'exec 3<>/dev/tcp/127.0.0.1/7000; echo hello >&3; head -n1 <&3'
local multiloop = require("multiloop")

local server = multiloop.server{
  host = "127.0.0.1",
  port = tonumber(arg[1]) or 7000,
  handler = "examples.echo_handler",
}
server:start()
local host, port = server:address()
print(("multiloop echo server on %s:%d with %d workers; Ctrl-C stops it")
  :format(host, port, server.workers))
local signal = server:run()
print(("stopped on %s"):format(signal))
