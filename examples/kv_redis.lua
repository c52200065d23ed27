-- examples/kv_redis.lua: a small line protocol whose state lives in Redis,
-- through OpenResty's Redis client (lua-resty-redis, Debian's
-- lua-nginx-redis) loaded unchanged over multiloop.ngx. Loaded in each
-- worker; examples/kv_redis_server.lua runs it.
--
-- The shared-dictionary versions of the same ideas are examples/kv.lua (a
-- key-value store) and examples/stats_counter.lua (a visitor counter): a
-- dictionary is shared by the workers of one process; Redis is shared by
-- every process that talks to it, so several instances of this server,
-- on one machine or many behind a load balancer, serve the same keys,
-- counters and sessions (README: "Several instances behind a load
-- balancer").
--
-- The protocol: one command a line (LF or CRLF), the name in any case, one
-- reply line each:
--   SET key value    OK (value: the rest of the line)
--   GET key          the value, or (nil)
--   INCR key         the new value; an error if the value is no integer
--   DEL key          1 if there was such a key, else 0
--   VISIT            you are visitor #N (served by worker W)
--   LOGIN name       a session token, valid for worker.config.session_ttl
--                    seconds (default 3600)
--   WHOAMI token     the session's name, or (expired)
--   QUIT             bye, then the server closes the connection
-- Anything else gets "ERR unknown command '...'"; Redis being down or slow
-- gets "ERR redis: <why>" ("connection refused", "timeout") and the
-- connection goes on.
--
-- Redis: 127.0.0.1:worker.config.redis_port (default 6379); every key is
-- under worker.config.prefix (default "kv_redis:"). Each command takes a
-- connection from the worker's pool (connect finds an idle one: no new TCP
-- connection, get_reused_times() counts) and puts it back with
-- set_keepalive, the OpenResty idiom, so a worker holds at most
-- POOL_SIZE idle connections to Redis however many clients it serves.

-- lua-resty-redis is a Lua 5.1 library in Lua 5.1's directory; it reads the
-- globals `ngx` and `unpack` when it loads: install() sets them.
package.path = package.path .. ";/usr/share/lua/5.1/?.lua"
local ngx = require("multiloop.ngx").install()
local redis = require("nginx.redis")

local POOL_SIZE = 16
local TIMEOUT_MS = 1000

local worker = require("multiloop.core").worker()
local config = worker.config or {}
local port = config.redis_port or 6379
local prefix = config.prefix or "kv_redis:"
local session_ttl = config.session_ttl or 3600

-- A reply with a string's RESP shape: nil for Redis's null (ngx.null).
local function value(v)
  if v == ngx.null then return "(nil)" end
  return tostring(v)
end

-- Runs fn(red) on a pooled connection to Redis and puts it back. fn
-- returns what lua-resty-redis does: the reply; false, err for Redis's
-- error reply ("ERR ..." back to the client: the connection is fine); or
-- nil, err when the connection failed ("ERR redis: <why>": it is closed,
-- not pooled). So is a connect that fails.
local function with_redis(fn)
  local red = redis:new()
  red:set_timeout(TIMEOUT_MS)
  local ok, err = red:connect("127.0.0.1", port, { pool_size = POOL_SIZE })
  if not ok then return "ERR redis: " .. err end
  local reply, rerr = fn(red)
  if reply == nil then
    red:close()
    return "ERR redis: " .. tostring(rerr)
  end
  red:set_keepalive(60000, POOL_SIZE)
  if reply == false then return rerr end         -- Redis's own words: "ERR ..."
  return reply
end

-- Each command takes the rest of its line and returns its reply.
local commands = {}

function commands.set(rest)
  local key, v = rest:match("^(%S+)%s+(.*)$")
  if not key then return "ERR usage: SET key value" end
  return with_redis(function(red) return red:set(prefix .. key, v) end)
end

function commands.get(rest)
  local key = rest:match("^%S+$")
  if not key then return "ERR usage: GET key" end
  return with_redis(function(red)
    local v, err = red:get(prefix .. key)
    if v == nil then return nil, err end
    return value(v)
  end)
end

function commands.incr(rest)
  local key = rest:match("^%S+$")
  if not key then return "ERR usage: INCR key" end
  return with_redis(function(red) return red:incr(prefix .. key) end)
end

function commands.del(rest)
  local key = rest:match("^%S+$")
  if not key then return "ERR usage: DEL key" end
  return with_redis(function(red) return red:del(prefix .. key) end)
end

-- examples/stats_counter.lua's counter, in Redis: one INCR, atomic across
-- every worker of every instance.
function commands.visit()
  return with_redis(function(red)
    local n, err = red:incr(prefix .. "visitors")
    if not n then return nil, err end
    return ("you are visitor #%d (served by worker %d)"):format(n, worker.id)
  end)
end

-- A session: a random token (not a secret: math.random is no CSPRNG) whose
-- key expires after session_ttl seconds; SET with EX in one command.
function commands.login(rest)
  local name = rest:match("^%S+$")
  if not name then return "ERR usage: LOGIN name" end
  local token = ("%08x%08x"):format(math.random(0, 0xffffffff), math.random(0, 0xffffffff))
  return with_redis(function(red)
    local ok, err = red:set(prefix .. "session:" .. token, name, "EX", session_ttl)
    if not ok then return nil, err end
    return token
  end)
end

function commands.whoami(rest)
  local token = rest:match("^%x+$")
  if not token then return "ERR usage: WHOAMI token" end
  return with_redis(function(red)
    local name, err = red:get(prefix .. "session:" .. token)
    if name == nil then return nil, err end
    return name == ngx.null and "(expired)" or name
  end)
end

return {
  serve = function(conn)
    while true do
      local line = conn:receive("*l")
      if not line then return end                      -- "closed", "timeout", ...
      local name, rest = line:match("^%s*(%S+)%s*(.-)%s*$")
      if name then
        name = name:lower()
        if name == "quit" then
          conn:send("bye\n")
          return
        end
        local command = commands[name]
        local reply = command and command(rest) or ("ERR unknown command '" .. name .. "'")
        conn:send({ reply, "\n" })
      end
    end
  end,
}
