-- bench/ml_server.lua: the multiloop server that `make bench` measures.
--   lua5.4 bench/ml_server.lua HANDLER WORKERS [DISPATCH [KEY=VALUE | KEY[]=VALUE | tls.KEY=VALUE ...]]
-- HANDLER is a module (examples.echo_handler, examples.http_hello). Each
-- KEY=VALUE goes into the server's config (worker.config.KEY = "VALUE"), and
-- each KEY[]=VALUE is appended to the array worker.config.KEY, as the
-- proxy's upstreams[]=HOST:PORT; each tls.KEY=VALUE goes into the server's
-- tls option (tls.cert=PATH, tls.key=PATH, tls.session_tickets=false: "true",
-- "false" and numbers become booleans and numbers there); an empty DISPATCH
-- is multiloop's default. Listens
-- on 127.0.0.1, a free port, printed as "LISTENING <port>" once every worker
-- has loaded the handler; SIGTERM or SIGINT stops it at once (no grace
-- period: the load generator has finished by then).
local multiloop = require("multiloop")

local handler, workers, dispatch = arg[1], tonumber(arg[2]), arg[3]
assert(handler and workers,
  "usage: lua5.4 bench/ml_server.lua HANDLER WORKERS [DISPATCH [KEY=VALUE | KEY[]=VALUE | tls.KEY=VALUE ...]]")
if dispatch == "" then dispatch = nil end
local config, tls
for i = 4, #arg do
  local tk, tv = arg[i]:match("^tls%.([%w_]+)=(.*)$")
  if tk then
    tls = tls or {}
    if tv == "true" or tv == "false" then tls[tk] = tv == "true"
    else tls[tk] = math.tointeger(tonumber(tv)) or tv end
    goto next
  end
  local k, list, v = arg[i]:match("^([%w_]+)(%[?%]?)=(.*)$")
  assert(k and (list == "" or list == "[]"), "bench/ml_server.lua: not KEY=VALUE or KEY[]=VALUE: " .. arg[i])
  config = config or {}
  if list == "[]" then
    config[k] = config[k] or {}
    table.insert(config[k], v)
  else
    config[k] = v
  end
  ::next::
end

local server = multiloop.server{
  host = "127.0.0.1",
  port = 0,
  workers = workers,
  dispatch = dispatch,
  handler = handler,
  config = config,
  tls = tls,
}
server:start()
local _, port = server:address()
print(("LISTENING %d"):format(port))
io.stdout:flush()
server:run{ timeout = 0 }
