-- examples/metrics_http.lua: answers `GET /metrics` with the text the main
-- state last published in the shared dictionary "metrics" (key "text"):
-- server:metrics() of the server being watched, in Prometheus's text
-- format. Loaded in each worker of the metrics server that
-- examples/metrics_server.lua starts; in the `serve` style.
--
-- A minimal HTTP/1.0 and 1.1 responder: one request per connection, then
-- Connection: close (Prometheus scrapes once every few seconds, so keep-alive
-- buys nothing here). The request line and up to 100 header lines are read
-- and the headers ignored; a line longer than the server's receive_limit,
-- or nothing for 10 s, closes the connection. `GET /metrics` (or HEAD) gets
-- 200, another path 404, another method 405, anything unreadable 400.
local multiloop = require("multiloop")

local MAX_HEADERS = 100
local TYPE = "text/plain; version=0.0.4; charset=utf-8"   -- the format's own

local function respond(conn, status, body, head_only)
  conn:send({
    "HTTP/1.1 ", status, "\r\n",
    "Content-Type: ", status == "200 OK" and TYPE or "text/plain; charset=utf-8", "\r\n",
    "Content-Length: ", tostring(#body), "\r\n",
    "Connection: close\r\n\r\n",
    head_only and "" or body,
  })
end

local handler = {}

function handler.serve(conn)
  conn:settimeouts(0, 10000, 10000)            -- connect (unused), send, read
  local line = conn:receive("*l")
  if not line then return end                  -- closed, timeout or too long
  local method, target = line:match("^(%u+) (%S+) HTTP/1%.[01]\r?$")
  for _ = 1, MAX_HEADERS + 1 do
    local header = conn:receive("*l")
    if not header then return end
    if header == "" or header == "\r" then break end
    if _ == MAX_HEADERS + 1 then return respond(conn, "400 Bad Request", "too many headers\n") end
  end
  if not method then
    return respond(conn, "400 Bad Request", "bad request line\n")
  elseif method ~= "GET" and method ~= "HEAD" then
    return respond(conn, "405 Method Not Allowed", "GET /metrics only\n")
  elseif target ~= "/metrics" then
    return respond(conn, "404 Not Found", "GET /metrics only\n")
  end
  respond(conn, "200 OK", multiloop.shared("metrics"):get("text") or "", method == "HEAD")
end

return handler
