--- multiloop: a TCP server for Lua that uses every core.
--
-- This file is the friendly face of the C module `multiloop.core`: it checks
-- every option up front (naming the option that is wrong), fills in defaults,
-- turns the handler into something a worker can load on its own (a module
-- name, a file path, or the bytecode of a function with no upvalues), and
-- wraps the core server in an object with start/stop/run/address.
--
-- Nothing here runs in the workers: each worker has its own Lua state, in
-- which the handler is loaded from scratch.

local core = require("multiloop.core")

local M = {
  _VERSION = "multiloop 0.1.0",
  _UV_VERSION = core.uv_version,
}

--- multiloop.shared(name [, { capacity = bytes }]): a dictionary shared by
-- the main state and every worker (lua/multiloop/shared.lua).
M.shared = require("multiloop.shared")

--- multiloop.log(level, ...): one line in the log of the most recently made
-- server (its level, its file), or on stderr at level info when there is
-- none; "main" in the line's worker place (src/log.c).
M.log = core.log

local MAX_WORKERS = 1024
local MAX_MS = 0x7fffffff                  -- about 24.8 days
local MAX_BYTES = 0x7fffffff
local MAX_PATH = 107                       -- sun_path holds 108 bytes with the NUL (Linux)
local MAX_HOST = 253                       -- the longest DNS name
local MAX_LOG_PATH = 4095                  -- src/multiloop.h: MULTILOOP_LOG_MAX_PATH

-- Option checkers: each returns the value to use, or raises with a message
-- that names the option. Ordered: required, important, alphabetical.
local function fail(name, what, got)
  error(("multiloop.server: option '%s' %s (got %s)"):format(
    name, what, type(got) == "string" and ("'" .. got .. "'") or tostring(got)), 0)
end

local function integer_in(name, v, lo, hi)
  if math.type(v) ~= "integer" and not (type(v) == "number" and v == math.floor(v)) then
    fail(name, ("must be an integer from %d to %d"):format(lo, hi), v)
  end
  v = math.tointeger(v)
  if v == nil or v < lo or v > hi then
    fail(name, ("must be an integer from %d to %d"):format(lo, hi), v)
  end
  return v
end

local function one_of(name, v, choices)
  for _, c in ipairs(choices) do
    if v == c then return v end
  end
  fail(name, "must be one of '" .. table.concat(choices, "', '") .. "'", v)
end

local function is_ipv4(s)
  local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return false end
  for _, part in ipairs { a, b, c, d } do
    if #part > 3 or tonumber(part) > 255 then return false end
  end
  return true
end

local function is_ipv6(s)
  return s:find(":", 1, true) ~= nil and s:match("^[%x:%.]+$") ~= nil
end

-- An IPv4 or IPv6 literal, or a name that getaddrinfo resolves at start().
-- Dotted digits are always meant as IPv4, so "256.0.0.1" is an error here
-- rather than a name looked up in DNS.
local function is_host(s)
  if #s > MAX_HOST then return false end
  if s:find(":", 1, true) then return is_ipv6(s) end
  if s:match("^[%d%.]+$") then return is_ipv4(s) end
  return s:match("^[%w_][%w_%-%.]*$") ~= nil
end

-- How a worker will load the handler: kind and payload.
local function check_handler(h)
  if type(h) == "string" then
    if h == "" then fail("handler", "must not be empty", h) end
    if h:find("/", 1, true) or h:match("%.lua$") then
      local f, err = io.open(h, "r")
      if not f then fail("handler", "must be a readable file: " .. err, h) end
      f:close()
      return "path", h
    end
    if not h:match("^[%w_][%w_%.%-]*$") then
      fail("handler", "must be a module name, a path to a .lua file, or a function", h)
    end
    return "module", h
  elseif type(h) == "function" then
    if debug.getinfo(h, "S").what == "C" then
      fail("handler", "must be a Lua function, not a C function", h)
    end
    -- Only _ENV may be captured: each worker binds it to its own globals.
    for i = 1, math.huge do
      local name = debug.getupvalue(h, i)
      if name == nil then break end
      if name ~= "_ENV" then
        fail("handler", ("must be a function with no upvalues, but it captures '%s' "
          .. "(pass data through config, or use a module)"):format(name), h)
      end
    end
    return "bytecode", string.dump(h)
  end
  fail("handler", "must be a module name, a path to a .lua file, or a function", h)
end

local checks = {
  handler = function(v) return v end,      -- checked by check_handler
  port = function(v) return integer_in("port", v, 0, 65535) end,
  host = function(v)
    if type(v) ~= "string" or not is_host(v) then
      fail("host", "must be an IP address or a host name such as '127.0.0.1', '::1' or "
        .. "'localhost'", v)
    end
    return v
  end,
  workers = function(v) return integer_in("workers", v, 1, MAX_WORKERS) end,
  start_timeout = function(v) return integer_in("start_timeout", v, 1, MAX_MS) end,
  drain_timeout = function(v) return integer_in("drain_timeout", v, 0, MAX_MS) end,
  backlog = function(v) return integer_in("backlog", v, 1, 65535) end,
  config = function(v) return v end,       -- copied (and checked) by the core
  idle_timeout = function(v) return integer_in("idle_timeout", v, 0, MAX_MS) end,
  keepalive = function(v)
    if v == false then return 0 end
    return integer_in("keepalive", v, 0, MAX_MS)
  end,
  max_connections = function(v) return integer_in("max_connections", v, 0, 0x7fffffff) end,
  nodelay = function(v)
    if type(v) ~= "boolean" then fail("nodelay", "must be a boolean", v) end
    return v
  end,
  write_high_water = function(v) return integer_in("write_high_water", v, 1, MAX_BYTES) end,
  write_low_water = function(v) return integer_in("write_low_water", v, 0, MAX_BYTES) end,
  dispatch = function(v) return one_of("dispatch", v, { "ipc", "queue", "reuseport" }) end,
  balance = function(v) return one_of("balance", v, { "round_robin", "least_connections" }) end,
  path = function(v)
    if type(v) ~= "string" or v == "" or #v > MAX_PATH then
      fail("path", ("must be a Unix socket path of 1 to %d bytes"):format(MAX_PATH), v)
    end
    if v:find("\0", 1, true) then fail("path", "must not contain a zero byte", v) end
    return v
  end,
  -- Lua has no octal literals, and an integer 600 meant as chmod's 600 would
  -- be octal 1130: so only the string form chmod takes.
  mode = function(v)
    if type(v) ~= "string" or not v:match("^0?[0-7][0-7][0-7]$") then
      fail("mode", "must be a string of 3 or 4 octal digits from '000' to '0777', "
        .. "such as '0660'", v)
    end
    return math.tointeger(tonumber(v, 8))
  end,
  unlink = function(v)
    if type(v) ~= "boolean" then fail("unlink", "must be a boolean", v) end
    return v
  end,
  inbox_limit = function(v) return integer_in("inbox_limit", v, 1, MAX_BYTES) end,
  receive_limit = function(v) return integer_in("receive_limit", v, 1, MAX_BYTES) end,
  dns_cache_ttl = function(v) return integer_in("dns_cache_ttl", v, 0, MAX_MS) end,
  dns_max_lookups = function(v) return integer_in("dns_max_lookups", v, 1, 64) end,
  -- TLS: the shape here; the files, versions and ciphers by the core (OpenSSL).
  tls = function(v)
    if type(v) ~= "table" then fail("tls", "must be a table { cert = ..., key = ... }", v) end
    for _, k in ipairs { "cert", "key" } do
      if type(v[k]) ~= "string" then
        fail("tls." .. k, "is required (a path to a PEM " ..
          (k == "cert" and "certificate" or "private key") .. " file)", v[k])
      end
    end
    return v
  end,
  -- PROXY protocol (src/proxy.c): the addresses are parsed by the core.
  proxy_protocol = function(v)
    if type(v) ~= "table" then
      fail("proxy_protocol", "must be a table { from = { trusted addresses }, timeout = ms }", v)
    end
    for k in pairs(v) do
      if k ~= "from" and k ~= "timeout" then
        fail("proxy_protocol", "has an unknown field '" .. tostring(k) .. "'", v)
      end
    end
    if type(v.from) ~= "table" or #v.from == 0 then
      fail("proxy_protocol.from", "is required: a list of trusted addresses or CIDR blocks "
        .. "(a receiver must never guess whether a header is there)", v.from)
    end
    for i, a in ipairs(v.from) do
      if type(a) ~= "string" then fail(("proxy_protocol.from[%d]"):format(i), "must be a string", a) end
    end
    if v.timeout ~= nil then integer_in("proxy_protocol.timeout", v.timeout, 1, MAX_MS) end
    return v
  end,
  tls_ca = function(v)
    if type(v) ~= "string" then fail("tls_ca", "must be a path to a PEM file of CA certificates", v) end
    return v
  end,
  -- Socket activation and inherited sockets (src/activation.c): which socket
  -- and whether it is one we can serve are checked by the core.
  listen = function(v)
    if type(v) ~= "string" or not (v == "systemd" or v:match("^systemd:[^%z]+$")) or #v > 263 then
      fail("listen", "must be 'systemd' or 'systemd:NAME' (NAME: one of LISTEN_FDNAMES, "
        .. "1 to 255 bytes)", v)
    end
    return v
  end,
  fd = function(v) return integer_in("fd", v, 0, 0x7fffffff) end,
  -- Logs (src/log.c): the file is opened by core.new, which names the option
  -- when it cannot be.
  log = function(v)
    if type(v) ~= "string" or v == "" or #v > MAX_LOG_PATH then
      fail("log", ("must be a file path of 1 to %d bytes"):format(MAX_LOG_PATH), v)
    end
    if v:find("\0", 1, true) then fail("log", "must not contain a zero byte", v) end
    return v
  end,
  log_level = function(v) return one_of("log_level", v, { "error", "warn", "info", "debug" }) end,
}

-- dispatch: the fastest mode on connection rate, measured with `make bench`
-- (README): reuseport; with a Unix path or a balancing policy, which
-- reuseport cannot do, queue. Filled in by M.server.
local defaults = {
  host = "127.0.0.1",
  backlog = 511,
  idle_timeout = 0,
  keepalive = 0,
  max_connections = 0,
  nodelay = true,
  write_high_water = 1024 * 1024,
  inbox_limit = 64 * 1024 * 1024,          -- src/multiloop.h says the same
  start_timeout = 30000,
  drain_timeout = 30000,                   -- so does src/server.c
  receive_limit = 1024 * 1024,             -- src/multiloop.h says the same
  dns_cache_ttl = 30000,                   -- so does it for these two
  dns_max_lookups = 4,
  log_level = "info",                      -- so does src/log.c
}

local Server = {}
Server.__index = Server
Server.__name = "multiloop.server"

local function check_server(self, method)
  if getmetatable(self) ~= Server then
    error(("multiloop.server: %s must be called as server:%s()"):format(method, method), 3)
  end
  return self
end

--- The sockets socket activation passed to this process: { { fd = 3, name =
-- "web" }, ... } (a socket without a name in LISTEN_FDNAMES is "unknown"),
-- or nil, why. Read from LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES on the
-- first call (or the first server with `listen`), which then removes them
-- and marks the sockets close-on-exec (src/activation.c).
function M.listen_fds()
  return core.listen_fds()
end

--- Creates a server; nothing runs until start() or run().
function M.server(opts)
  if type(opts) ~= "table" then
    error("multiloop.server: expected a table of options (got " .. type(opts) .. ")", 2)
  end
  for k in pairs(opts) do
    if checks[k] == nil then
      error(("multiloop.server: unknown option '%s'"):format(tostring(k)), 2)
    end
  end
  local ok, err = pcall(function()
    if opts.handler == nil then
      error("multiloop.server: option 'handler' is required "
        .. "(a module name, a path to a .lua file, or a function)", 0)
    end
    local inherited = opts.listen ~= nil and "listen" or opts.fd ~= nil and "fd" or nil
    if inherited then
      -- The socket exists already: where it listens, and how, are its owner's.
      if opts.listen ~= nil and opts.fd ~= nil then
        error("multiloop.server: option 'listen' cannot be combined with 'fd'", 0)
      end
      for _, k in ipairs { "host", "port", "path", "backlog", "mode", "unlink" } do
        if opts[k] ~= nil then
          error(("multiloop.server: option '%s' (an inherited socket) cannot be combined with "
            .. "'%s'"):format(inherited, k), 0)
        end
      end
    elseif opts.path ~= nil then
      if opts.port ~= nil or opts.host ~= nil then
        error("multiloop.server: option 'path' (a Unix socket) cannot be combined with "
          .. "'host' or 'port'", 0)
      end
      if opts.dispatch == "reuseport" then
        error("multiloop.server: option 'dispatch' 'reuseport' cannot listen on a Unix "
          .. "socket (path): use 'ipc' or 'queue'", 0)
      end
    elseif opts.port == nil then
      error("multiloop.server: option 'port' is required (0 picks a free port)", 0)
    end
    if opts.mode ~= nil and opts.path == nil then
      error("multiloop.server: option 'mode' applies only to a Unix socket (path)", 0)
    end
    if opts.dispatch == "reuseport" and opts.balance ~= nil then
      error("multiloop.server: option 'balance' does not apply to dispatch 'reuseport' "
        .. "(the kernel spreads the connections)", 0)
    end
  end)
  if not ok then error(err, 2) end

  local o = {}
  ok, err = pcall(function()
    for k, check in pairs(checks) do
      local v = opts[k]
      local elsewhere = opts.path or opts.listen or opts.fd      -- no host, no port
      if v == nil and not (elsewhere and (k == "host" or k == "port")) then v = defaults[k] end
      if v ~= nil then o[k] = check(v) end
    end
    o.workers = o.workers or core.parallelism()
    -- An inherited socket has one accept queue whatever the dispatch, so
    -- reuseport has nothing to spread: queue (README, "Inherited sockets").
    o.dispatch = o.dispatch or ((o.path or o.balance or o.listen or o.fd) and "queue"
      or "reuseport")
    if o.dispatch ~= "reuseport" then o.balance = o.balance or "round_robin" end
    o.write_low_water = o.write_low_water or o.write_high_water // 4
    if o.write_low_water >= o.write_high_water then
      fail("write_low_water", ("must be below write_high_water (%d)"):format(o.write_high_water),
        o.write_low_water)
    end
    -- The kernel counts keepalive in whole seconds.
    o.keepalive_seconds = o.keepalive > 0 and math.max(1, (o.keepalive + 999) // 1000) or 0
    o.handler_kind, o.handler = check_handler(opts.handler)
  end)
  if not ok then error(err, 2) end
  o.package_path, o.package_cpath = package.path, package.cpath
  o.host, o.port = o.host or "", o.port or 0        -- unused with a path

  -- core.new checks the bounds again; what it raises names the option
  -- ("option 'config': config.f: cannot copy a function").
  local made, c = pcall(core.new, o)
  if not made then
    error("multiloop.server: " .. tostring(c), 2)
  end
  return setmetatable({
    _core = c,
    host = o.host,
    port = o.port,
    path = o.path,
    listen = o.listen,
    fd = o.fd,
    dispatch = o.dispatch,
    workers = o.workers,
    handler = type(opts.handler) == "string" and opts.handler or "function",
  }, Server)
end

--- Starts the acceptor and the workers. Returns the server once the socket
-- listens and every worker has loaded the handler; raises otherwise, with
-- nothing left running.
function Server:start()
  check_server(self, "start")
  if self._core:running() then
    error("multiloop.server: start: the server is already running", 2)
  end
  local ok, err = self._core:start()
  if not ok then error("multiloop.server: start: " .. err, 2) end
  return self
end

--- Stops: no new connections at once; every worker runs the handler's
-- optional shutdown(worker) hook. With opts.timeout (ms), connections that
-- close by themselves within it close normally and the rest are closed at
-- its end; without it they are closed now. Then every thread is joined.
-- Idempotent.
function Server:stop(opts)
  check_server(self, "stop")
  if opts ~= nil then
    if type(opts) ~= "table" then
      error("multiloop.server: stop: expected nil or a table { timeout = ms } (got "
        .. type(opts) .. ")", 2)
    end
    for k in pairs(opts) do
      if k ~= "timeout" then error(("multiloop.server: stop: unknown option '%s'"):format(tostring(k)), 2) end
    end
    local ok, err = pcall(integer_in, "timeout", opts.timeout or 0, 0, MAX_MS)
    if not ok then error(err:gsub("multiloop.server: option", "multiloop.server: stop: option"), 2) end
    if opts.timeout and opts.timeout > 0 and self._core:running() then
      self._core:stop_begin(opts.timeout)
      self._core:wait_stopped(false)
    end
  end
  return self._core:stop()
end

--- The address the server listens on: ip, port (TCP) or the path (Unix);
-- nil, "not running" when stopped.
function Server:address()
  check_server(self, "address")
  return self._core:address()
end

--- Counters, readable at any time: accepted, active, handed_off,
-- accept_errors, bytes_in, bytes_out, and workers[i] = { accepted, active,
-- bytes_in, bytes_out }. The totals are the sums over the workers. After
-- stop, the figures the last run ended with; a restart counts from zero.
function Server:stats()
  check_server(self, "stats")
  return self._core:stats()
end

-- server:metrics(): each stats() field, in this order, as a Prometheus
-- metric multiloop_<field> (counters end in _total). A numeric field not
-- listed here (added to stats() later) comes out as a counter, after these,
-- by name: every field is a count since start unless it is listed as a
-- gauge, so a new gauge needs its line here and a new counter only its help.
local METRICS = {
  { "accepted", "counter", "Connections accepted." },
  { "active", "gauge", "Connections open now." },
  { "handed_off", "counter", "Connections the acceptor handed to a worker (dispatch ipc and queue)." },
  { "accept_errors", "counter", "Accepts that failed." },
  { "bytes_in", "counter", "Bytes read, inbound and outbound connections." },
  { "bytes_out", "counter", "Bytes written, inbound and outbound connections." },
  { "threads", "gauge", "Light threads alive now." },
  { "connects", "counter", "Outbound connections made." },
  { "connect_errors", "counter", "Outbound connections that failed." },
  { "reused", "counter", "Outbound connects served from a keepalive pool." },
  { "pooled", "gauge", "Idle outbound connections in the keepalive pools now." },
  { "tls_handshakes", "counter", "TLS handshakes completed, server and client side." },
  { "tls_errors", "counter", "TLS handshakes that failed or timed out, bad records, fatal alerts." },
  { "proxy_errors", "counter", "Connections refused in the PROXY protocol phase." },
  { "generation", "gauge", "The handler code's generation: 1 at start, one more at each reload." },
  { "old_connections", "gauge", "Connections still served by the code before the last reload." },
  { "reloads", "counter", "Reloads that switched every worker to new code." },
}
local METRIC = {}
for _, m in ipairs(METRICS) do METRIC[m[1]] = m end

-- A sample's value: integers exactly, floats round-trip, and the format's
-- words for the infinities and NaN.
local function sample_value(v)
  if math.type(v) == "integer" then return ("%d"):format(v) end
  if v ~= v then return "NaN" end
  if v == math.huge then return "+Inf" end
  if v == -math.huge then return "-Inf" end
  return ("%.17g"):format(v)
end

--- multiloop.metrics_text(stats): a table shaped as stats() returns (its
-- numeric fields, and workers[i]'s) in the Prometheus text exposition format
-- (version 0.0.4): per metric a # HELP and a # TYPE line, the total without
-- labels, then each worker's figure labelled worker="N" where stats() has
-- one per worker. server:metrics() is this over server:stats().
function M.metrics_text(stats)
  if type(stats) ~= "table" then
    error("multiloop.metrics_text: expected a table shaped as server:stats() returns (got "
      .. type(stats) .. ")", 2)
  end
  local workers = type(stats.workers) == "table" and stats.workers or {}
  local names, seen = {}, {}
  for _, m in ipairs(METRICS) do
    names[#names + 1], seen[m[1]] = m[1], true
  end
  local extra = {}
  for _, t in ipairs { stats, type(workers[1]) == "table" and workers[1] or {} } do
    for k, v in pairs(t) do
      if type(k) == "string" and type(v) == "number" and not seen[k] and k:match("^[%a_][%w_]*$") then
        extra[#extra + 1], seen[k] = k, true
      end
    end
  end
  table.sort(extra)
  table.move(extra, 1, #extra, #names + 1, names)
  local out = {}
  for _, name in ipairs(names) do
    local m = METRIC[name] or { name, "counter", ("server:stats() field %s."):format(name) }
    local metric = "multiloop_" .. name .. (m[2] == "counter" and "_total" or "")
    local lines = {}
    if type(stats[name]) == "number" then
      lines[#lines + 1] = metric .. " " .. sample_value(stats[name])
    end
    for i, w in ipairs(workers) do
      if type(w) == "table" and type(w[name]) == "number" then
        lines[#lines + 1] = ('%s{worker="%d"} %s'):format(metric, i, sample_value(w[name]))
      end
    end
    if #lines > 0 then
      out[#out + 1] = ("# HELP %s %s"):format(metric, m[3])
      out[#out + 1] = ("# TYPE %s %s"):format(metric, m[2])
      table.move(lines, 1, #lines, #out + 1, out)
    end
  end
  return table.concat(out, "\n") .. "\n"
end

--- stats() in the Prometheus text exposition format (multiloop.metrics_text).
function Server:metrics()
  check_server(self, "metrics")
  return M.metrics_text(self._core:stats())
end

--- Starts (unless running) and serves until SIGINT or SIGTERM. The first
-- signal stops gracefully, giving connections opts.timeout ms (default
-- 5000) to finish; a second one stops at once. opts.ready(server) runs once
-- it serves, with the signals already caught (where to say that it
-- listens); with opts.tick (a function) and opts.every (ms), tick(server)
-- runs in this state every `every` ms while it serves. An error in either
-- stops the server at once and is raised. Returns the first signal's name
-- and how many signals arrived during run(). SIGUSR1 reopens the log file
-- (option log) and SIGHUP reloads the handler (server:reload(), its outcome
-- logged); neither is counted.
local run_options = { timeout = true, every = true, tick = true, ready = true }
function Server:run(opts)
  check_server(self, "run")
  if opts ~= nil and type(opts) ~= "table" then
    error("multiloop.server: run: expected nil or a table { timeout = ms, every = ms, "
      .. "tick = fn, ready = fn } (got " .. type(opts) .. ")", 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if not run_options[k] then
      error(("multiloop.server: run: unknown option '%s'"):format(tostring(k)), 2)
    end
  end
  local timeout, every, tick = opts.timeout or 5000, opts.every, opts.tick
  local ok, err = pcall(function()
    integer_in("timeout", timeout, 0, MAX_MS)
    if every ~= nil then integer_in("every", every, 1, MAX_MS) end
    if tick ~= nil and type(tick) ~= "function" then fail("tick", "must be a function", tick) end
    if opts.ready ~= nil and type(opts.ready) ~= "function" then
      fail("ready", "must be a function", opts.ready)
    end
    if (every == nil) ~= (tick == nil) then
      error("multiloop.server: option 'every' and option 'tick' go together", 0)
    end
  end)
  if not ok then error(err:gsub("multiloop.server: option", "multiloop.server: run: option"), 2) end
  -- One watcher from here to the end: SIGINT and SIGTERM stay caught for the
  -- whole of run(), and one that arrives while nothing waits (during start,
  -- between the two waits, during the final stop) is kept, not lost.
  local signals <close> = self._core:signals()
  if not self._core:running() then
    local started, why = self._core:start()  -- raised from here, as start() does
    if not started then error("multiloop.server: start: " .. why, 2) end
  end
  local function call(name, fn)
    local done, why = pcall(fn, self)
    if not done then
      self._core:stop()
      error(("multiloop.server: run: %s: %s"):format(name, tostring(why)), 3)
    end
  end
  if opts.ready then call("ready", opts.ready) end
  local sig
  repeat
    sig = signals:wait(false, every)         -- nil, "timeout" once `every` ms pass
    if sig == nil then
      call("tick", tick)
    elseif sig == "SIGHUP" then              -- reload; the outcome is logged ("main")
      self._core:reload(nil, nil, false, nil, "SIGHUP")
      sig = nil
    end
  until sig
  if timeout > 0 then
    self._core:stop_begin(timeout)
    signals:wait(true)                         -- a second signal ends the wait
  end
  self._core:stop()
  return sig, signals:count()
end

--- Reloads the handler code without closing a connection or a listening
-- socket: every worker loads the handler (opts.handler, or the server's own
-- again: a module is require()d afresh, a file read again) into a new Lua
-- state with opts.config (or the server's), and runs its init there, while
-- the old code keeps serving. If any worker fails, every new state is
-- dropped and nothing changes: nil, "worker N: <error>". Otherwise every
-- worker switches (new connections, timers and messages go to the new
-- code) and true is returned; the old state runs its shutdown(worker)
-- hook and keeps the connections it has until they close, or drain_timeout
-- closes them with reason "reload". The server keeps the new handler and
-- config for a restart and the next reload.
local reload_options = { handler = true, config = true }
function Server:reload(opts)
  check_server(self, "reload")
  if opts ~= nil and type(opts) ~= "table" then
    error("multiloop.server: reload: expected nil or a table { handler = ..., config = ... } "
      .. "(got " .. type(opts) .. ")", 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if not reload_options[k] then
      error(("multiloop.server: reload: unknown option '%s'"):format(tostring(k)), 2)
    end
  end
  local kind, payload
  if opts.handler ~= nil then
    local ok, k, p = pcall(check_handler, opts.handler)
    if not ok then error((k:gsub("multiloop.server: option", "multiloop.server: reload: option")), 2) end
    kind, payload = k, p
  end
  local ok, err = self._core:reload(kind, payload, opts.config ~= nil, opts.config)
  if ok and opts.handler ~= nil then
    self.handler = type(opts.handler) == "string" and opts.handler or "function"
  end
  return ok, err
end

--- Sends a copy of value (nil, booleans, integers and floats kept apart,
-- strings, nested tables of them) to worker id's handler hook
-- message(worker, value, from), with from = 0. Returns true, or false,
-- "stopped" when that worker is stopping. Raises when the server is not
-- running, id is not a worker id, or value cannot be copied (naming where:
-- "value.cb: cannot copy a function").
function Server:send(id, value)
  check_server(self, "send")
  local ok, sent, why = pcall(self._core.send, self._core, id, value)
  if not ok then error(sent, 2) end
  return sent, why
end

--- Sends a copy of value to every worker (as send); returns how many took
-- it (fewer than the workers while stopping).
function Server:broadcast(value)
  check_server(self, "broadcast")
  local ok, n = pcall(self._core.broadcast, self._core, value)
  if not ok then error(n, 2) end
  return n
end

--- server:log(level, ...): one line in this server's log, as "main"
-- (multiloop.log writes to the most recently made server's).
function Server:log(level, ...)
  check_server(self, "log")
  local ok, err = pcall(self._core.log, self._core, level, ...)
  if not ok then error(err, 2) end
end

--- Reopens the log file (option log) at its path, as SIGUSR1 does during
-- run(): true, or nil, message, error name (the old file stays in use).
-- True at once when the log is stderr.
function Server:reopen_log()
  check_server(self, "reopen_log")
  return self._core:reopen_log()
end

function Server:__close()
  self:stop()
end

function Server:__tostring()
  local where
  if self.path then
    where = "path=" .. self.path
  elseif self.listen or self.fd then
    where = self.listen and ("listen=" .. self.listen) or ("fd=" .. self.fd)
    local a, port = self._core:address()
    if port then where = where .. (", host=%s, port=%d"):format(a, port)
    elseif a then where = where .. ", path=" .. a end
  else
    local host, port = self._core:address()
    if not host then host, port = self.host, self.port end
    where = ("host=%s, port=%d"):format(host, port)
  end
  return ("multiloop.server{%s, workers=%d, handler=%s, %s}"):format(
    where, self.workers, self.handler, self._core:running() and "running" or "stopped")
end

return M
