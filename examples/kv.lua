-- examples/kv.lua: a small Redis-compatible key-value server (RESP2) whose
-- data lives in a shared dictionary, so every worker serves the same keys.
-- Loaded in each worker; examples/kv_server.lua runs it (try redis-cli).
--
-- Commands: PING, ECHO, SET (EX, PX, NX, XX), GET, DEL, EXISTS, INCR, INCRBY,
-- DECR, DECRBY, EXPIRE, TTL, PTTL, DBSIZE, FLUSHALL (FLUSHDB), COMMAND
-- (empty), QUIT. Requests are RESP arrays of bulk strings, or inline
-- commands (words separated by spaces, as typed into telnet).
--
-- The parser is incremental and keeps its place between reads, so requests
-- split across reads (even byte by byte) and many requests in one read
-- (pipelining) both work, and a request in many reads is parsed once; the
-- replies to one read go out in one write. A large value arriving in many
-- reads is collected in a list and joined once, when all of it is in. A
-- malformed request gets "-ERR Protocol error: ..." and the connection is
-- closed, as Redis does. Every byte of a request is held until
-- it is complete, so one bulk string is limited to the dictionary's capacity
-- (nothing larger could be stored), not Redis's 512 MiB.
--
-- Storage: the shared dictionary named worker.config.name (default "kv"),
-- which the main state can open too. Values are binary-safe strings; one
-- that is the canonical text of a 64-bit integer ("42", "-7", not "007" or
-- "+1") is stored as an integer, so that INCR is a single atomic incr on
-- the dictionary. Memory is bounded by the dictionary's capacity
-- (worker.config.capacity, default 16 MiB): when full, its least recently
-- used keys are evicted; a value too large for it gets an OOM error. Each
-- command is atomic except EXPIRE, which reads the value and writes it back
-- with the new time to live (a SET from another worker in between may be
-- undone).
local multiloop = require("multiloop")

local MAX_ARGS = 1024 * 1024
local max_bulk                               -- the dictionary's capacity (init)
local MAX_INLINE = 64 * 1024
local MAX_TTL_MS = 1000000000000             -- the dictionary's limit

local db                                     -- the shared dictionary (init)

-- --- replies ---------------------------------------------------------------

local function bulk(s) return ("$%d\r\n%s\r\n"):format(#s, s) end
local function int(n) return (":%d\r\n"):format(n) end
local NIL, OK, PONG = "$-1\r\n", "+OK\r\n", "+PONG\r\n"
-- An error reply. Its text may quote the client's bytes (an unknown command,
-- a protocol error), and a "\r" or "\n" in it would end the reply early and
-- make the rest read as another reply: as Redis does, they become spaces.
local function err(msg) return "-" .. msg:gsub("[\r\n]", " ") .. "\r\n" end
local function wrong_args(name)
  return err(("ERR wrong number of arguments for '%s' command"):format(name))
end
local NOT_INTEGER = err("ERR value is not an integer or out of range")
local OOM = err("OOM command not allowed when used memory > 'maxmemory'.")

-- --- values ----------------------------------------------------------------

-- The integer that s is the canonical text of, or nil.
local function canonical_integer(s)
  if #s > 20 or not s:match("^%-?%d+$") then return nil end
  local n = math.tointeger(tonumber(s))
  if n and tostring(n) == s then return n end
  return nil
end

local function stored(s) return canonical_integer(s) or s end

-- What GET sends for a stored value: strings as they are, integers (and
-- the floats or booleans another state may have stored) as their text.
local function as_text(v)
  if type(v) == "string" then return v end
  return tostring(v)
end

-- --- commands ----------------------------------------------------------------

local commands = {}

function commands.ping(args)
  if #args == 1 then return PONG end
  if #args == 2 then return bulk(args[2]) end
  return wrong_args("ping")
end

function commands.echo(args)
  if #args ~= 2 then return wrong_args("echo") end
  return bulk(args[2])
end

-- SET key value [EX seconds | PX milliseconds] [NX | XX]
function commands.set(args)
  if #args < 3 then return wrong_args("set") end
  local ttl, mode = 0, "set"
  local i = 4
  while i <= #args do
    local opt = args[i]:upper()
    if (opt == "EX" or opt == "PX") and ttl == 0 and args[i + 1] then
      local n = canonical_integer(args[i + 1])
      if not n then return NOT_INTEGER end
      if n <= 0 then return err("ERR invalid expire time in 'set' command") end
      ttl = opt == "EX" and n * 1000 or n
      if ttl > MAX_TTL_MS or (opt == "EX" and n > MAX_TTL_MS // 1000) then
        return err("ERR invalid expire time in 'set' command")
      end
      i = i + 2
    elseif (opt == "NX" or opt == "XX") and mode == "set" then
      mode = opt == "NX" and "add" or "replace"
      i = i + 1
    else
      return err("ERR syntax error")
    end
  end
  local ok, why = db[mode](db, args[2], stored(args[3]), ttl)
  if ok then return OK end
  if why == "no memory" then return OOM end
  return NIL                                  -- NX on a key that exists, XX on one that does not
end

function commands.get(args)
  if #args ~= 2 then return wrong_args("get") end
  local v = db:get(args[2])
  if v == nil then return NIL end
  return bulk(as_text(v))
end

function commands.del(args)
  if #args < 2 then return wrong_args("del") end
  local n = 0
  for i = 2, #args do
    if db:delete(args[i]) then n = n + 1 end
  end
  return int(n)
end

function commands.exists(args)
  if #args < 2 then return wrong_args("exists") end
  local n = 0
  for i = 2, #args do
    if db:get(args[i]) ~= nil then n = n + 1 end
  end
  return int(n)
end

-- Adds by to the integer at key (0 when missing), atomically. The dictionary
-- wraps around on overflow; Redis refuses, so an overflow is undone.
local function incr(key, by)
  local v, why = db:incr(key, by, 0)
  if v == nil then
    if why == "not a number" then return NOT_INTEGER end
    return why == "no memory" and OOM or err("ERR " .. tostring(why))
  end
  if math.type(v) ~= "integer" then return NOT_INTEGER end
  local old = v - by
  if (by > 0 and v < old) or (by < 0 and v > old) then
    db:incr(key, -by)
    return err("ERR increment or decrement would overflow")
  end
  return int(v)
end

function commands.incr(args)
  if #args ~= 2 then return wrong_args("incr") end
  return incr(args[2], 1)
end

function commands.decr(args)
  if #args ~= 2 then return wrong_args("decr") end
  return incr(args[2], -1)
end

function commands.incrby(args)
  if #args ~= 3 then return wrong_args("incrby") end
  local by = canonical_integer(args[3])
  if not by then return NOT_INTEGER end
  return incr(args[2], by)
end

function commands.decrby(args)
  if #args ~= 3 then return wrong_args("decrby") end
  local by = canonical_integer(args[3])
  if not by or by == math.mininteger then return NOT_INTEGER end
  return incr(args[2], -by)
end

-- EXPIRE key seconds: 1 when the key exists (a time of 0 or less deletes
-- it), 0 when it does not.
function commands.expire(args)
  if #args ~= 3 then return wrong_args("expire") end
  local s = canonical_integer(args[3])
  if not s then return NOT_INTEGER end
  if s <= 0 then return int(db:delete(args[2]) and 1 or 0) end
  if s > MAX_TTL_MS // 1000 then return err("ERR invalid expire time in 'expire' command") end
  local v = db:get(args[2])
  if v == nil then return int(0) end
  local ok, why = db:replace(args[2], v, s * 1000)
  if ok then return int(1) end
  return why == "no memory" and OOM or int(0)
end

-- TTL/PTTL key: -2 when missing, -1 without expiry, else the time left,
-- rounded to the nearest second for TTL, as Redis does.
local function ttl(args, name, unit)
  if #args ~= 2 then return wrong_args(name) end
  local ms = db:ttl(args[2])
  if ms == nil then return int(-2) end
  if ms == 0 then return int(-1) end
  return int(unit == 1 and ms or (ms + 500) // 1000)
end

function commands.ttl(args) return ttl(args, "ttl", 1000) end
function commands.pttl(args) return ttl(args, "pttl", 1) end

function commands.dbsize(args)
  if #args ~= 1 then return wrong_args("dbsize") end
  return int(db:count())
end

-- FLUSHALL [ASYNC | SYNC]: either way the flush is done at once.
function commands.flushall(args)
  local mode = args[2] and args[2]:upper()
  if #args > 2 or (mode and mode ~= "ASYNC" and mode ~= "SYNC") then
    return err("ERR syntax error")
  end
  db:flush()
  return OK
end
commands.flushdb = commands.flushall

-- redis-cli asks for command documentation in interactive mode.
function commands.command() return "*0\r\n" end

-- Redis's wording: each argument quoted and followed by a space, until
-- 128 bytes of them are shown; a C string in Redis, so each ends at a NUL.
local function unknown(args)
  local function text(s) return (s:match("^[^\0]*")) end
  local shown = ""
  for i = 2, #args do
    if #shown >= 128 then break end
    shown = shown .. ("'%s' "):format(text(args[i]):sub(1, 128 - #shown))
  end
  return err(("ERR unknown command '%s', with args beginning with: %s")
    :format(text(args[1]):sub(1, 128), shown))
end

-- --- the parser ------------------------------------------------------------

-- A connection's parser keeps its place between reads: `buf` holds the bytes
-- not yet consumed (from `pos` on) and `args` the arguments of a request
-- read so far, so a request arriving in many reads is parsed once, never
-- from its start again. A bulk string larger than COLLECT_ABOVE that is not
-- all in yet is collected in `chunks` and joined once it is complete
-- (appending each read to buf would copy it over and over).
local COLLECT_ABOVE = 16 * 1024

local function new_parser()
  return { buf = "", pos = 1, args = nil, n = 0, chunks = nil, have = 0, need = 0 }
end

-- Adds the bytes of one read. False while a large bulk is still being
-- collected (nothing to parse yet).
local function feed(st, data)
  if st.chunks then
    local chunks = st.chunks
    chunks[#chunks + 1] = data
    st.have = st.have + #data
    if st.have < st.need then return false end
    st.buf, st.chunks = table.concat(chunks), nil
  elseif st.pos > #st.buf then
    st.buf = data
  else
    st.buf = st.buf:sub(st.pos) .. data
  end
  st.pos = 1
  return true
end

-- The next whole request's arguments; nil when it is not all in yet; or
-- false and a protocol error.
local function next_request(st)
  local buf, pos = st.buf, st.pos
  if not st.args then
    if pos > #buf then return nil end
    if buf:byte(pos) ~= 42 then              -- not '*': an inline command
      local eol = buf:find("\n", pos, true)
      if not eol then
        if #buf - pos > MAX_INLINE then return false, "too big inline request" end
        return nil
      end
      local args = {}
      for word in buf:sub(pos, eol - 1):gmatch("[^%s]+") do args[#args + 1] = word end
      st.pos = eol + 1
      return args
    end
    local eol = buf:find("\r\n", pos, true)
    if not eol then
      if #buf - pos > 32 then return false, "invalid multibulk length" end
      return nil
    end
    local n = canonical_integer(buf:sub(pos + 1, eol - 1))
    if not n or n > MAX_ARGS then return false, "invalid multibulk length" end
    st.args, st.n, st.pos = {}, n, eol + 2
    pos = eol + 2
  end
  local args = st.args
  for i = #args + 1, st.n do
    if pos > #buf then return nil end
    if buf:byte(pos) ~= 36 then              -- '$'
      return false, ("expected '$', got '%s'"):format(buf:sub(pos, pos))
    end
    local eol = buf:find("\r\n", pos, true)
    if not eol then
      if #buf - pos > 32 then return false, "invalid bulk length" end
      return nil
    end
    local len = canonical_integer(buf:sub(pos + 1, eol - 1))
    if not len or len < 0 or len > max_bulk then return false, "invalid bulk length" end
    local after = eol + 4 + len               -- the position after its CRLF
    if #buf < after - 1 then
      if len > COLLECT_ABOVE then             -- collect the rest from pos on
        st.chunks = { buf:sub(pos) }
        st.have, st.need = #buf - pos + 1, after - pos
        st.buf, st.pos = "", 1
      end
      return nil
    end
    if buf:sub(after - 2, after - 1) ~= "\r\n" then
      return false, "invalid bulk data: missing CRLF"
    end
    args[i] = buf:sub(eol + 2, eol + 1 + len)
    pos = after
    st.pos = pos
  end
  st.args = nil
  return args
end

-- --- the handler -------------------------------------------------------------

local kv = {}

function kv.init(worker)
  local config = worker.config or {}
  local capacity = config.capacity or 16 * 1024 * 1024
  db = multiloop.shared(config.name or "kv", { capacity = capacity })
  max_bulk = math.max(capacity, 1024 * 1024)
end

function kv.connect(conn)
  local st = new_parser()
  conn:on_data(function(data)
    if not feed(st, data) then return end
    local replies = {}
    while true do
      local args, why = next_request(st)
      if args == nil then break end
      if args == false then
        replies[#replies + 1] = err("ERR Protocol error: " .. why)
        conn:write(table.concat(replies))
        conn:close()
        return
      end
      if #args > 0 then                       -- an empty request is skipped
        local name = args[1]:lower()
        if name == "quit" then
          replies[#replies + 1] = OK
          conn:write(table.concat(replies))
          conn:close()
          return
        end
        local command = commands[name] or unknown
        replies[#replies + 1] = command(args)
      end
    end
    if #replies > 0 and not conn:write(table.concat(replies)) then
      conn:pause()                           -- the client is not reading: wait
    end
  end)
  conn:on_drain(function() conn:resume() end)
end

return kv
