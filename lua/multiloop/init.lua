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

local MAX_WORKERS = 1024
local MAX_MS = 0x7fffffff                  -- about 24.8 days
local MAX_BYTES = 0x7fffffff
local MAX_PATH = 107                       -- sun_path holds 108 bytes with the NUL (Linux)
local MAX_HOST = 253                       -- the longest DNS name

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
  tls_ca = function(v)
    if type(v) ~= "string" then fail("tls_ca", "must be a path to a PEM file of CA certificates", v) end
    return v
  end,
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
  receive_limit = 1024 * 1024,             -- src/multiloop.h says the same
  dns_cache_ttl = 30000,                   -- so does it for these two
  dns_max_lookups = 4,
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
    if opts.path ~= nil then
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
      if v == nil and not (opts.path and (k == "host" or k == "port")) then v = defaults[k] end
      if v ~= nil then o[k] = check(v) end
    end
    o.workers = o.workers or core.parallelism()
    o.dispatch = o.dispatch or ((o.path or o.balance) and "queue" or "reuseport")
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

--- Starts (unless running) and serves until SIGINT or SIGTERM. The first
-- signal stops gracefully, giving connections opts.timeout ms (default
-- 5000) to finish; a second one stops at once. Returns the first signal's
-- name and how many signals arrived during run().
function Server:run(opts)
  check_server(self, "run")
  local timeout = opts and opts.timeout or 5000
  local ok, err = pcall(integer_in, "timeout", timeout, 0, MAX_MS)
  if not ok then error(err:gsub("multiloop.server: option", "multiloop.server: run: option"), 2) end
  -- One watcher from here to the end: SIGINT and SIGTERM stay caught for the
  -- whole of run(), and one that arrives while nothing waits (during start,
  -- between the two waits, during the final stop) is kept, not lost.
  local signals <close> = self._core:signals()
  if not self._core:running() then self:start() end
  local sig = signals:wait(false)
  if timeout > 0 then
    self._core:stop_begin(timeout)
    signals:wait(true)                         -- a second signal ends the wait
  end
  self._core:stop()
  return sig, signals:count()
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

function Server:__close()
  self:stop()
end

function Server:__tostring()
  local where
  if self.path then
    where = "path=" .. self.path
  else
    local host, port = self._core:address()
    if not host then host, port = self.host, self.port end
    where = ("host=%s, port=%d"):format(host, port)
  end
  return ("multiloop.server{%s, workers=%d, handler=%s, %s}"):format(
    where, self.workers, self.handler, self._core:running() and "running" or "stopped")
end

return M
