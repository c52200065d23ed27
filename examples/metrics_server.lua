-- examples/metrics_server.lua: an echo server on 127.0.0.1:7006 whose
-- server:metrics() a Prometheus scraper reads from a second port,
-- 127.0.0.1:9106, at GET /metrics.
--   lua5.4 examples/metrics_server.lua [port [metrics_port [refresh_ms]]]
-- Try it: bash -c 'exec 3<>/dev/tcp/127.0.0.1/7006; echo hi >&3; head -n1 <&3'
--         then curl -s http://127.0.0.1:9106/metrics
--
-- Two multiloop servers in one process: the main one (examples/echo_handler,
-- a worker per core) and the metrics endpoint (examples/metrics_http, one
-- worker). Only the main state can read the main server's figures, and
-- workers cannot call into it; so the main state publishes them: every
-- refresh_ms (default 1000) server:run's tick stores server:metrics() in the
-- shared dictionary "metrics", and the endpoint's worker answers with the
-- latest copy. A scrape is at most refresh_ms old, which is well inside any
-- scrape interval; its figures are always one consistent stats() reading.
local multiloop = require("multiloop")

local port = tonumber(arg[1]) or 7006
local metrics_port = tonumber(arg[2]) or 9106
local refresh = math.tointeger(tonumber(arg[3])) or 1000

-- Held here for as long as the program runs. A ceiling, not a reservation:
-- 1024 workers' figures take under 1 MiB of text.
local published = multiloop.shared("metrics", { capacity = 4 * 1024 * 1024 })

local server = multiloop.server{
  host = "127.0.0.1",
  port = port,
  handler = "examples.echo_handler",
}
local endpoint = multiloop.server{
  host = "127.0.0.1",
  port = metrics_port,
  workers = 1,
  dispatch = "queue",
  receive_limit = 8192,                        -- an HTTP request line or header
  handler = "examples.metrics_http",
}

local function publish() assert(published:set("text", server:metrics())) end

server:start()
publish()                                      -- so the first scrape finds figures
endpoint:start()
local host, bound = server:address()
local _, mport = endpoint:address()
print(("multiloop echo server on %s:%d with %d workers, metrics at http://%s:%d/metrics; "
  .. "Ctrl-C stops it"):format(host, bound, server.workers, host, mport))
io.stdout:flush()
local signal = server:run{ every = refresh, tick = publish }
endpoint:stop({ timeout = 1000 })
print(("stopped on %s"):format(signal))
