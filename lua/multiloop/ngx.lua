--- multiloop.ngx: the part of OpenResty's `ngx` table that cosocket
-- libraries use (lua-resty-redis, lua-resty-lock and the like), over the
-- worker of the state that requires it.
--
--   local ngx = require("multiloop.ngx")           -- in a handler, a timer...
--   require("multiloop.ngx").install()             -- also the globals `ngx`
--   local redis = require("nginx.redis")           --   and `unpack`, as a Lua
--                                                  --   5.1 library expects
--
-- What it has: ngx.socket.tcp (worker.tcp itself) and ngx.socket.connect,
-- ngx.null, ngx.sleep, ngx.now, ngx.time, ngx.log with the level
-- constants, ngx.timer.at and ngx.timer.every, ngx.worker.id, count and
-- exiting, ngx.shared.NAME (over multiloop.shared). What it has not (ngx.var, ngx.req, ngx.re, ngx.say,
-- ngx.config, the phases) belongs to nginx and stays absent, so a library
-- that needs it fails on first use ("attempt to index a nil value") rather
-- than half-working.
--
-- Units are OpenResty's: seconds (fractional) wherever OpenResty has
-- seconds, converted to the worker's milliseconds here. The README
-- ("OpenResty's ngx") lists where we differ.
--
-- One table per Lua state: require caches it in package.loaded, so every
-- library the handler loads sees the same ngx, and with it the same worker.
-- It runs on that worker's thread only. Requiring it outside a worker's
-- state (the main state, a plain lua5.4) raises: there is no worker to
-- sleep, time or connect with. This file never touches package.path.

local core = require("multiloop.core")

local worker = core.worker()
if worker == nil then
  error("multiloop.ngx: not in a worker's state: require it from a handler "
    .. "(its module, init, serve, a light thread or a timer), not from the main state", 2)
end

local floor, tointeger, type, select = math.floor, math.tointeger, type, select
local tostring, concat = tostring, table.concat

local ngx = {}

-- Seconds (any non-negative number) as whole milliseconds, rounded to the
-- nearest: 0.29 s is 290 ms although 0.29 * 1000 is 289.99... in doubles.
-- Raises naming `what` for anything else.
local function ms_of(seconds, what, level)
  if type(seconds) ~= "number" or seconds ~= seconds or seconds < 0 or seconds > 1e9 then
    error(("multiloop.ngx: %s must be a number of seconds from 0 to 1e9 (got %s)")
      :format(what, tostring(seconds)), level + 1)
  end
  return tointeger(floor(seconds * 1000 + 0.5))
end

-- ---------------------------------------------------------------------------
-- ngx.null: one value distinct from nil, false and every string, which
-- lua-resty-redis returns for Redis's null bulk and multi-bulk replies and
-- compares with `==`. A light userdata would do in OpenResty; Lua has none
-- to make from Lua, so a frozen table that prints as "null" (as OpenResty's,
-- cjson's) stands in. The same value in every library of this state.
ngx.null = setmetatable({}, {
  __tostring = function() return "null" end,
  __newindex = function() error("multiloop.ngx: ngx.null is read-only", 2) end,
  __metatable = "ngx.null",
})

-- ---------------------------------------------------------------------------
-- Sockets. worker.tcp is the C function itself (a plain function: a library
-- calls tcp() without a self). A build without outbound connections has no
-- worker.tcp: say so on first use instead of a nil call.
ngx.socket = {
  tcp = worker.tcp or function()
    error("multiloop.ngx: ngx.socket.tcp: this multiloop has no worker.tcp "
      .. "(outbound connections)", 2)
  end,
}

-- ngx.socket.connect(host, port [, opts]) or (path [, opts]): OpenResty's
-- shortcut, a socket and its connect in one call -> sock, or nil, err.
local tcp = ngx.socket.tcp
function ngx.socket.connect(...)
  local sock, err = tcp()
  if not sock then return nil, err end
  local ok
  ok, err = sock:connect(...)
  if not ok then return nil, err end
  return sock
end

-- ---------------------------------------------------------------------------
-- Time.
local wnow, wsleep = worker.now, worker.sleep

-- Whether this worker is stopping, as far as this module has seen: a
-- sleep or a timer here answered "stopped" (ngx.worker.exiting below).
local exiting = false

-- ngx.sleep(seconds): worker.sleep over whole milliseconds (0 yields once
-- round the loop, as in OpenResty). Returns worker.sleep's results: true,
-- or nil, "stopped" once the worker is stopping.
function ngx.sleep(seconds)
  local ok, err = wsleep(ms_of(seconds, "ngx.sleep's argument", 2))
  if ok == nil and err == "stopped" then exiting = true end
  return ok, err
end

-- worker.now() is the loop's cached time, libuv's uv_now: milliseconds
-- from an arbitrary start, steady, updated once per turn of the loop.
-- OpenResty's ngx.now() is the epoch time, cached the same way. The offset
-- between the two is taken once, here, from worker.time() (the wall clock,
-- uv_gettimeofday): so ngx.now() is the epoch time to the millisecond as
-- the module loads, never goes back (not even when the system clock is set
-- back), and ngx.time() is floor of it, the two agreeing as they do in
-- OpenResty; elapsed times (ngx.now() - t0) are exact to the ms.
local epoch_ms = math.floor(worker.time() * 1000) - wnow()

function ngx.now()
  return (wnow() + epoch_ms) / 1000
end

function ngx.time()
  return (wnow() + epoch_ms) // 1000
end

-- OpenResty's ngx.update_time() refreshes nginx's cached time; the loop
-- refreshes ours each turn, and Lua cannot, so it does nothing.
function ngx.update_time() end

-- ---------------------------------------------------------------------------
-- Logging: nginx's levels, with nginx's numbers (ngx_log.h).
local levels = {
  [0] = "stderr", "emerg", "alert", "crit", "error", "warn", "notice", "info", "debug",
}
ngx.STDERR, ngx.EMERG, ngx.ALERT, ngx.CRIT = 0, 1, 2, 3
ngx.ERR, ngx.WARN, ngx.NOTICE, ngx.INFO, ngx.DEBUG = 4, 5, 6, 7, 8

-- Messages above this level are dropped. nginx's error_log defaults to
-- "error"; a test or a development run wants more: set_log_level(ngx.DEBUG).
local log_level = ngx.ERR
-- nginx's levels as the worker log's (src/log.c): stderr to crit are errors,
-- notice is info. The nginx name stays in the message: "[crit] ...".
local ours = {
  [0] = "error", "error", "error", "error", "error", "warn", "info", "info", "debug",
}
local log = worker.log

local function check_level(level, what)
  if type(level) ~= "number" or tointeger(level) == nil or level < 0 or level > 8 then
    error(("multiloop.ngx: %s: the level must be one of ngx.STDERR (0) .. ngx.DEBUG (8) (got %s)")
      :format(what, tostring(level)), 3)
  end
  return tointeger(level)
end

-- ngx.log(level, ...): one line in the worker's log (worker.log, so the
-- server's log and log_level apply too), "[error] a message", the
-- arguments joined as OpenResty joins them (tostring of each, no separator:
-- nil, booleans, numbers, strings, tables with __tostring).
function ngx.log(level, ...)
  level = check_level(level, "ngx.log")
  if level > log_level then return end
  local n = select("#", ...)
  local parts = { "[", levels[level], "] " }
  for i = 1, n do parts[i + 3] = tostring((select(i, ...))) end
  log(ours[level], concat(parts))
end

-- A multiloop extension (OpenResty sets this in nginx.conf's error_log):
-- log messages up to `level`, one of the constants. Returns the old level.
function ngx.set_log_level(level)
  local old = log_level
  log_level = check_level(level, "ngx.set_log_level")
  return old
end

-- ---------------------------------------------------------------------------
-- Timers. fn(premature, ...) in a light thread of its own (worker.timer
-- runs callbacks as light threads), so it may sleep and use sockets, as in
-- OpenResty. premature is false when the timer fires; timers still pending
-- when the worker stops are cancelled by multiloop, not run with premature
-- true (OpenResty runs them early at worker exit): code that must run at
-- stop belongs in the handler's shutdown hook. Once the worker is closing,
-- ngx.timer.at returns nil, "process exiting", OpenResty's words.
local wtimer, wevery = worker.timer, worker.every

local function check_timer(delay, fn, what)
  local ms = ms_of(delay, what .. "'s delay", 3)
  if type(fn) ~= "function" then
    error(("multiloop.ngx: %s's callback must be a function (got %s)")
      :format(what, type(fn)), 3)
  end
  return ms
end

local function started(t, err)
  if t then return true end
  if err == "stopped" then
    exiting = true
    return nil, "process exiting"
  end
  return nil, err
end

ngx.timer = {}

function ngx.timer.at(delay, fn, ...)
  local ms = check_timer(delay, fn, "ngx.timer.at")
  local n, args = select("#", ...), { ... }
  return started(wtimer(ms, function() fn(false, table.unpack(args, 1, n)) end))
end

-- fn(premature, ...) every `delay` seconds (at least 1 ms) until the worker
-- stops; as OpenResty's, a run that takes longer than the period does not
-- delay the next one (runs may overlap).
function ngx.timer.every(delay, fn, ...)
  local ms = check_timer(delay, fn, "ngx.timer.every")
  if ms < 1 then
    error(("multiloop.ngx: ngx.timer.every's delay must be at least 0.001 s (got %s)")
      :format(tostring(delay)), 2)
  end
  local n, args = select("#", ...), { ... }
  return started(wevery(ms, function() fn(false, table.unpack(args, 1, n)) end))
end

-- ---------------------------------------------------------------------------
-- The worker. OpenResty counts workers from 0, multiloop from 1.
local wid, wcount = worker.id - 1, worker.count
ngx.worker = {
  id = function() return wid end,
  count = function() return wcount end,
}

-- ngx.worker.exiting(): true from the moment the worker begins to stop
-- (worker.exiting(), a graceful stop's grace period included), as in
-- OpenResty, or once an ngx.sleep or ngx.timer call has answered "stopped".
-- So the loop of a background timer,
--   while not ngx.worker.exiting() do ... ngx.sleep(1) end
-- ends at stop, as it does in OpenResty.
local wexiting = worker.exiting
function ngx.worker.exiting() return exiting or wexiting() end

-- ---------------------------------------------------------------------------
-- ngx.shared.NAME: multiloop.shared(NAME) seen through OpenResty's methods
-- and units: exptime and init_ttl in seconds (fractional) where multiloop
-- has milliseconds, ttl() in seconds, get_keys and flush_all for keys and
-- flush, and the `flags` argument of set/add/replace accepted but not kept
-- (get returns no flags). OpenResty declares dictionaries in nginx.conf;
-- here the first use of a name makes it with multiloop.shared's default
-- capacity (open it with multiloop.shared(name, { capacity = … }) in init
-- to choose). Each wrapper is kept in ngx.shared, so the dictionary lives
-- as long as this worker's state, as OpenResty's do for the server's life.
local shared = require("multiloop.shared")

local function exptime_ms(exptime, what)
  if exptime == nil then return 0 end
  local ms = ms_of(exptime, what, 3)
  -- A positive exptime below half a millisecond still expires, at once.
  if ms == 0 and exptime > 0 then ms = 1 end
  return ms
end

local dict_methods = {}
local dict_mt = { __index = dict_methods }

function dict_mt.__tostring(self)
  return ("ngx.shared.%s (multiloop.shared '%s')"):format(self.name, self.name)
end

-- Methods whose arguments are multiloop's as they are.
for _, m in ipairs { "get", "delete", "lpush", "rpush", "lpop", "rpop", "llen",
                     "capacity", "free_space" } do
  dict_methods[m] = function(self, ...) return self.dict[m](self.dict, ...) end
end

function dict_methods.get_stale(self, key)
  return self.dict:get_stale(key)          -- value, nil (no flags), stale
end

for _, m in ipairs { "set", "add", "replace", "safe_set", "safe_add" } do
  dict_methods[m] = function(self, key, value, exptime)      -- flags: not kept
    return self.dict[m](self.dict, key, value, exptime_ms(exptime, "ngx.shared.DICT:" .. m .. "'s exptime"))
  end
end

function dict_methods.incr(self, key, value, init, init_ttl)
  if init_ttl ~= nil then
    return self.dict:incr(key, value, init, exptime_ms(init_ttl, "ngx.shared.DICT:incr's init_ttl"))
  end
  return self.dict:incr(key, value, init)
end

-- ttl(key) -> seconds left (0: never expires), or nil, "not found".
function dict_methods.ttl(self, key)
  local ms, err = self.dict:ttl(key)
  if ms == nil then return nil, err end
  return ms == 0 and 0 or ms / 1000
end

function dict_methods.expire(self, key, exptime)
  return self.dict:expire(key, exptime_ms(exptime, "ngx.shared.DICT:expire's exptime"))
end

function dict_methods.flush_all(self) self.dict:flush() end

function dict_methods.flush_expired(self, max)
  return self.dict:flush_expired(max or 0)
end

-- get_keys([max]): at most max keys, 1024 by default, 0 for all.
function dict_methods.get_keys(self, max)
  return self.dict:keys(max or 1024)
end

ngx.shared = setmetatable({}, {
  __index = function(t, name)
    if type(name) ~= "string" or name == "" then return nil end
    local w = setmetatable({ name = name, dict = shared(name) }, dict_mt)
    rawset(t, name, w)
    return w
  end,
})

-- install(): the globals a Lua 5.1 library expects, in this state only:
-- `ngx` (this table) and `unpack` (table.unpack); and LuaJIT's `table.new`
-- as a module (require "table.new" gives lua_createtable), which
-- OpenResty libraries look for to preallocate (lua-resty-redis does, for
-- every request and reply). Returns the table.
local table_new = core.table_new
function ngx.install()
  rawset(_G, "ngx", ngx)
  if rawget(_G, "unpack") == nil then rawset(_G, "unpack", table.unpack) end
  if package.loaded["table.new"] == nil and package.preload["table.new"] == nil then
    package.preload["table.new"] = function() return table_new end
  end
  return ngx
end

return ngx
