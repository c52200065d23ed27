-- examples/http_hello_server.lua: the HTTP responder of examples/http_hello.lua
-- on 127.0.0.1:8080, one worker per core (or as many as the second argument).
--   lua5.4 examples/http_hello_server.lua [port] [workers]
-- Try it: curl -v http://127.0.0.1:8080/ http://127.0.0.1:8080/again   (one
-- connection), or load it: ab -k -n 20000 -c 50 http://127.0.0.1:8080/
-- (apache2-utils) or wrk -c 64 -d 5s http://127.0.0.1:8080/
local multiloop = require("multiloop")

local server = multiloop.server{
  host = "127.0.0.1",
  port = tonumber(arg[1]) or 8080,
  workers = tonumber(arg[2]),
  handler = "examples.http_hello",
}
server:start()
local host, port = server:address()
print(("multiloop http hello on http://%s:%d/ with %d workers; Ctrl-C stops it")
  :format(host, port, server.workers))
io.stdout:flush()
local signal = server:run()
print(("stopped on %s"):format(signal))
