-- examples/chat_server.lua: a chat room on 127.0.0.1:7001, one worker per core.
--   lua5.4 examples/chat_server.lua [port]
-- Try it from two or more terminals (bash's /dev/tcp: Debian ships no nc by
-- default; type lines, Ctrl-C leaves):
--   bash -c 'exec 3<>/dev/tcp/127.0.0.1/7001; cat <&3 & cat >&3'
-- Every line typed in one reaches all the others, whichever worker serves
-- them (examples/chat.lua: broadcast between workers, message hook).
local multiloop = require("multiloop")

local server = multiloop.server{
  host = "127.0.0.1",
  port = tonumber(arg[1]) or 7001,
  handler = "examples.chat",
}
server:start()
local host, port = server:address()
print(("multiloop chat server on %s:%d with %d workers; Ctrl-C stops it")
  :format(host, port, server.workers))
io.stdout:flush()
local signal = server:run()
print(("stopped on %s"):format(signal))
