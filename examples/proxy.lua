-- examples/proxy.lua: a TCP proxy. Each client is joined to one upstream,
-- and conn:pipe moves the bytes both ways in C until both sides are done
-- (no Lua runs per chunk; reading pauses while the other side cannot keep
-- up; a half-close is passed on). Upstreams are tried round-robin from
-- worker.config.upstreams ("host:port", "[v6]:port" or "unix:/path"), and a
-- connect that fails moves on to the next one; when every one fails the
-- client is closed.
--
-- worker.config (examples/proxy_server.lua sets it):
--   upstreams        { "127.0.0.1:6379", ... } (required)
--   connect_timeout  ms per upstream tried (default 1000)
--   idle_timeout     ms with no byte either way before both sides close
--                    (default 0: none), HAProxy's timeout client/server
local proxy = {}

local worker, upstreams, connect_timeout, pipe_opts
local turn = 0                               -- this worker's round-robin cursor

-- "host:port" -> host, port; "unix:/path" -> the string itself.
local function parse(u)
  if u:sub(1, 5) == "unix:" then return u end
  local host, port = u:match("^%[(.+)%]:(%d+)$")
  if not host then host, port = u:match("^([^:]+):(%d+)$") end
  assert(host, "examples/proxy.lua: an upstream must be host:port, [v6]:port or unix:/path (got "
    .. tostring(u) .. ")")
  return host, math.tointeger(tonumber(port))
end

-- config[name] (or dflt), checked here: a bad one would raise in every
-- client's serve instead, after its upstream connected.
local function ms_option(config, name, dflt)
  local v = config[name]
  if v == nil then return dflt end
  local ms = math.tointeger(v)
  if type(v) ~= "number" or ms == nil or ms < 0 or ms > 0x7fffffff then
    error(("examples/proxy.lua: config.%s must be an integer number of ms from 0 to 2147483647 (got %s)")
      :format(name, tostring(v)), 3)
  end
  return ms
end

function proxy.init(w)
  worker = w
  connect_timeout = ms_option(w.config, "connect_timeout", 1000)
  pipe_opts = { timeout = ms_option(w.config, "idle_timeout", 0) }
  upstreams = {}
  for i, u in ipairs(w.config.upstreams or {}) do upstreams[i] = { parse(u) } end
  assert(#upstreams > 0, "examples/proxy.lua: config.upstreams must list at least one upstream")
  turn = w.id - 1                            -- workers start on different upstreams
end

function proxy.serve(conn)
  -- This client's first upstream: the next in turn. Its retries go round
  -- from there (not from the shared cursor, which other clients move while
  -- this one waits in connect).
  local n = #upstreams
  turn = turn % n + 1
  local first = turn
  for k = 0, n - 1 do
    local i = (first - 1 + k) % n + 1
    local u = upstreams[i]
    local up = worker.tcp()
    up:settimeouts(connect_timeout, 0, 0)    -- the pipe itself has no timeout
    if up:connect(u[1], u[2]) then
      if turn == first then turn = i end     -- skipped a dead one: the next client goes on from here
      conn:pipe(up, pipe_opts)               -- both directions, until both are done
      -- A pipe that ran has closed both (the socket let go of its
      -- connection: this close says "closed"); one refused because the
      -- client had already gone leaves the upstream open until collected.
      up:close()
      return
    end
    up:close()
  end
end                                          -- every upstream failed: the client closes

return proxy
