-- examples/kv.lua: a small Redis-compatible key-value server (RESP2) whose
-- data lives in a shared dictionary, so every worker serves the same keys.
-- Loaded in each worker; examples/kv_server.lua runs it (try
-- `redis-cli -p 6380`; its header gives a redis-benchmark run).
--
-- Commands: PING, ECHO, SET (EX, PX, NX, XX), GET, MSET, MGET, SETNX,
-- GETSET, APPEND, STRLEN, DEL, EXISTS, TYPE, KEYS, INCR, INCRBY, DECR,
-- DECRBY, EXPIRE, TTL, PTTL, LPUSH, RPUSH, LPOP, RPOP (with a count), LLEN,
-- LRANGE, DBSIZE, FLUSHALL (FLUSHDB), SELECT 0, INFO (the "# Server"
-- section), CONFIG GET, COMMAND (empty), QUIT. Replies, errors included,
-- are the bytes Redis 7.0 sends (spec/kv_spec.lua compares them with
-- redis-server's) wherever the model is the same: it differs in having one
-- database, a short INFO and CONFIG values of its own. Any other command (or
-- CONFIG subcommand) gets Redis's answer to one it does not know. Requests
-- are RESP arrays of bulk strings, or inline commands (words separated by
-- spaces, one request a line, as typed into telnet).
--
-- Each connection runs kv.serve in a light thread of its own (the handler
-- has `serve`, not `connect`): read a request with conn:receive("*l") and
-- conn:receive(n), answer it, read the next. Requests split across reads,
-- many in one read (pipelining) and large values all come out whole; the
-- replies to pipelined requests go out together (kv.serve says how). A
-- malformed request gets "-ERR Protocol error: ..." and the connection is
-- closed, as Redis does (though here the "*n" and "$len" lines may end in a
-- bare LF). A line may be as long as the server's receive_limit
-- (kv_server.lua sets Redis's 64 KiB), a bulk string as large as the
-- dictionary's capacity (nothing larger could be stored), not 512 MiB.
--
-- Storage: the shared dictionary named worker.config.name (default "kv"),
-- which the main state can open too; one database (SELECT 0). Values are
-- binary-safe strings or the dictionary's lists; a string that is the
-- canonical text of a 64-bit integer ("42", "-7", not "007" or "+1") is
-- stored as an integer, so that INCR is a single atomic incr on the
-- dictionary. Memory is bounded by the dictionary's capacity
-- (worker.config.capacity, default 64 MiB): when full, its least recently
-- used keys are evicted; a value too large for it gets an OOM error. One key
-- lives in one of the dictionary's 16 stripes, so a value, or a whole list,
-- holds at most a 16th of the capacity (4 MiB: a list of about 90,000 short
-- values; redis-benchmark -n 20000 grows one to 40,000), and a push never
-- evicts another key to make room: it gets the OOM error.
--
-- Atomicity: each dictionary call is atomic, so a command that is one call
-- is (SET, GET, SETNX, DEL of one key, INCR, EXPIRE, a single-value LPUSH,
-- an LPOP without a count, LLEN, LRANGE). The others are several calls, and
-- another worker's command may land in between: MSET, MGET, DEL and EXISTS
-- of many keys act key by key; LPUSH and RPUSH with several values push
-- them one by one (another client's push or pop may come between two of
-- them, and the length replied is the one after the last); LPOP and RPOP
-- with a count pop one by one; GETSET and APPEND read the value and write it
-- back (a write from another worker in between is lost). APPEND copies the
-- whole value each time (the dictionary has no in-place append), so
-- building a large value with many APPENDs costs what its size squared does.
local multiloop = require("multiloop")

local MAX_ARGS = 1024 * 1024
local max_bulk                               -- the dictionary's capacity (init)
local MAX_TTL_MS = 1000000000000             -- the dictionary's limit

local db                                     -- the shared dictionary (init)
local started, pid = os.time(), 0            -- for INFO (init)

-- --- replies ---------------------------------------------------------------

-- "$<len>\r\n" for the lengths seen, up to 4096 of them: string.format's
-- %d cost a GET about 550 user instructions (callgrind), a lookup a few.
local heads = setmetatable({}, { __index = function(t, n)
  local h = "$" .. n .. "\r\n"
  if n <= 4096 then t[n] = h end
  return h
end })
local function bulk(s) return heads[#s] .. s .. "\r\n" end
local function int(n) return (":%d\r\n"):format(n) end
local NIL, NIL_ARRAY, EMPTY = "$-1\r\n", "*-1\r\n", "*0\r\n"
local OK, PONG = "+OK\r\n", "+PONG\r\n"
-- An array of replies already encoded.
local function array(items)
  return ("*%d\r\n"):format(#items) .. table.concat(items)
end
-- An error reply. Its text may quote the client's bytes (an unknown command,
-- a protocol error), and a "\r" or "\n" in it would end the reply early and
-- make the rest read as another reply: as Redis does, they become spaces.
local function err(msg) return "-" .. msg:gsub("[\r\n]", " ") .. "\r\n" end
local function wrong_args(name)
  return err(("ERR wrong number of arguments for '%s' command"):format(name))
end
local NOT_INTEGER = err("ERR value is not an integer or out of range")
local NOT_POSITIVE = err("ERR value is out of range, must be positive")
local SYNTAX = err("ERR syntax error")
local OOM = err("OOM command not allowed when used memory > 'maxmemory'.")
local WRONGTYPE = err("WRONGTYPE Operation against a key holding the wrong kind of value")

-- Redis's wording for a command it does not know: each argument quoted and
-- followed by a space, until 128 bytes of them are shown; a C string in
-- Redis, so each ends at a NUL.
local function cstring(s) return (s:match("^[^\0]*")) end
local function unknown(args)
  local shown = ""
  for i = 2, #args do
    if #shown >= 128 then break end
    shown = shown .. ("'%s' "):format(cstring(args[i]):sub(1, 128 - #shown))
  end
  return err(("ERR unknown command '%s', with args beginning with: %s")
    :format(cstring(args[1]):sub(1, 128), shown))
end

-- And for a subcommand it does not know.
local function unknown_subcommand(args)
  return err(("ERR unknown subcommand '%s'. Try %s HELP.")
    :format(cstring(args[2]):sub(1, 128), args[1]:upper()))
end

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

-- "list", "string" or "none", without copying a string value out: llen
-- refuses a string, and an empty list is no list (the dictionary drops a
-- list with its last value).
local function kind(key)
  local n = db:llen(key)
  if n == nil then return "string" end
  return n > 0 and "list" or "none"
end

-- The reply for a dictionary call that failed with `why`.
local function failure(why)
  if why == "value is a list" or why == "value not a list" then return WRONGTYPE end
  if why == "no memory" then return OOM end
  return err("ERR " .. tostring(why))
end

-- --- glob patterns (KEYS, CONFIG GET) -------------------------------------

-- Redis's stringmatchlen (src/util.c), quirks included: "[" runs to the end
-- of the pattern when no "]" closes it, "\" escapes inside and outside
-- classes, a range's ends may come in either order, and bytes compare as
-- C's signed chars in ranges. Each "*" tries the positions after it in turn,
-- but once the rest of the pattern has failed from every position after
-- one "*", no earlier "*" tries longer matches (skip), so the work is
-- bounded by the pattern's length times the key's, never exponential; and
-- as Redis does, patterns nesting more than 1000 "*"s match nothing rather
-- than recursing further.
local byte = string.byte
local STAR, QUESTION, OPEN, CLOSE, CARET, ESCAPE, DASH = byte("*?[]^\\-", 1, -1)

local function signed(c) return c >= 128 and c - 256 or c end
local function lower(c)
  if c and c >= 65 and c <= 90 then return c + 32 end
  return c
end

local function glob(p, pi, s, si, nocase, state, nesting)
  if nesting > 1000 then return false end
  local plen, slen = #p, #s
  while pi <= plen and si <= slen do
    local c = byte(p, pi)
    if c == STAR then
      while pi < plen and byte(p, pi + 1) == STAR do pi = pi + 1 end
      if pi == plen then return true end
      while si <= slen do
        if glob(p, pi + 1, s, si, nocase, state, nesting + 1) then return true end
        if state.skip then return false end
        si = si + 1
      end
      state.skip = true
      return false
    elseif c == QUESTION then
      si = si + 1
    elseif c == OPEN then
      pi = pi + 1
      local negate = byte(p, pi) == CARET
      if negate then pi = pi + 1 end
      local sc, matched = byte(s, si), false
      while true do
        local pc = byte(p, pi)                 -- nil past the end
        if pc == ESCAPE and pi < plen then
          pi = pi + 1
          if byte(p, pi) == sc then matched = true end
        elseif pc == CLOSE then
          break
        elseif pc == nil then                 -- unclosed: the class ends here
          pi = pi - 1
          break
        elseif pi + 2 <= plen and byte(p, pi + 1) == DASH then
          local from, to, x = signed(pc), signed(byte(p, pi + 2)), signed(sc)
          if from > to then from, to = to, from end
          if nocase then from, to, x = lower(from), lower(to), lower(x) end
          pi = pi + 2
          if x >= from and x <= to then matched = true end
        elseif pc == sc or (nocase and lower(pc) == lower(sc)) then
          matched = true
        end
        pi = pi + 1
      end
      if negate then matched = not matched end
      if not matched then return false end
      si = si + 1
    else
      if c == ESCAPE and pi < plen then
        pi = pi + 1
        c = byte(p, pi)
      end
      local sc = byte(s, si)
      if c ~= sc and not (nocase and lower(c) == lower(sc)) then return false end
      si = si + 1
    end
    pi = pi + 1
    if si > slen then
      while byte(p, pi) == STAR do pi = pi + 1 end
      break
    end
  end
  return pi > plen and si > slen
end

local function matches(pattern, s, nocase)
  return glob(pattern, 1, s, 1, nocase, { skip = false }, 0)
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
      return SYNTAX
    end
  end
  local ok, why = db[mode](db, args[2], stored(args[3]), ttl)
  if ok then return OK end
  if why == "no memory" then return OOM end
  return NIL                                  -- NX on a key that exists, XX on one that does not
end

function commands.get(args)
  if #args ~= 2 then return wrong_args("get") end
  local v, why = db:get(args[2])
  if v == nil then return why and failure(why) or NIL end
  return bulk(as_text(v))
end

-- MSET key value [key value ...]: OK, each key set in turn; out of memory,
-- the keys before it stay set.
function commands.mset(args)
  if #args < 3 or #args % 2 == 0 then return wrong_args("mset") end
  for i = 2, #args, 2 do
    if not db:set(args[i], stored(args[i + 1])) then return OOM end
  end
  return OK
end

-- MGET key [key ...]: nil for a key that is missing or not a string.
function commands.mget(args)
  if #args < 2 then return wrong_args("mget") end
  local out = {}
  for i = 2, #args do
    local v = db:get(args[i])
    out[i - 1] = v == nil and NIL or bulk(as_text(v))
  end
  return array(out)
end

function commands.setnx(args)
  if #args ~= 3 then return wrong_args("setnx") end
  local ok, why = db:add(args[2], stored(args[3]))
  if ok then return int(1) end
  return why == "no memory" and OOM or int(0)
end

function commands.getset(args)
  if #args ~= 3 then return wrong_args("getset") end
  local old, why = db:get(args[2])
  if old == nil and why then return failure(why) end
  if not db:set(args[2], stored(args[3])) then return OOM end
  return old == nil and NIL or bulk(as_text(old))
end

-- APPEND key value: the new length. The entry keeps its time to live.
function commands.append(args)
  if #args ~= 3 then return wrong_args("append") end
  local key, suffix = args[2], args[3]
  local old, why = db:get(key)
  if old == nil and why then return failure(why) end
  if old == nil then
    local ok, fail = db:add(key, stored(suffix))
    if ok then return int(#suffix) end
    if fail == "no memory" then return OOM end
    old, why = db:get(key)                    -- set in between: append to that
    if old == nil and why then return failure(why) end
  end
  local value = as_text(old or "") .. suffix
  local ms = db:ttl(key)
  local ok = db:set(key, stored(value), (ms and ms > 0) and ms or 0)
  if not ok then return OOM end
  return int(#value)
end

function commands.strlen(args)
  if #args ~= 2 then return wrong_args("strlen") end
  local v, why = db:get(args[2])
  if v == nil then return why and failure(why) or int(0) end
  return int(#as_text(v))
end

function commands.del(args)
  if #args < 2 then return wrong_args("del") end
  local n = 0
  for i = 2, #args do
    if db:delete(args[i]) then n = n + 1 end
  end
  return int(n)
end

-- EXISTS key [key ...]: how many of them exist (a key named twice counts
-- twice). ttl finds a key of any kind without copying its value out.
function commands.exists(args)
  if #args < 2 then return wrong_args("exists") end
  local n = 0
  for i = 2, #args do
    if db:ttl(args[i]) ~= nil then n = n + 1 end
  end
  return int(n)
end

function commands.type(args)
  if #args ~= 2 then return wrong_args("type") end
  return "+" .. kind(args[2]) .. "\r\n"
end

-- KEYS pattern: every live key that matches, in no particular order. As in
-- Redis, "*" alone takes every key without matching (so the empty key too).
function commands.keys(args)
  if #args ~= 2 then return wrong_args("keys") end
  local pattern, out = args[2], {}
  for _, key in ipairs(db:keys(0)) do
    if pattern == "*" or matches(pattern, key, false) then out[#out + 1] = bulk(key) end
  end
  return array(out)
end

-- Adds by to the integer at key (0 when missing), atomically. The dictionary
-- wraps around on overflow; Redis refuses, so an overflow is undone.
local function incr(key, by)
  local v, why = db:incr(key, by, 0)
  if v == nil then
    if why == "not a number" then
      return kind(key) == "list" and WRONGTYPE or NOT_INTEGER
    end
    return failure(why)
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
-- it), 0 when it does not. One atomic call, for lists too.
function commands.expire(args)
  if #args ~= 3 then return wrong_args("expire") end
  local s = canonical_integer(args[3])
  if not s then return NOT_INTEGER end
  if s <= 0 then return int(db:delete(args[2]) and 1 or 0) end
  if s > MAX_TTL_MS // 1000 then return err("ERR invalid expire time in 'expire' command") end
  return int(db:expire(args[2], s * 1000) and 1 or 0)
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

-- LPUSH/RPUSH key value [value ...]: the length after the last push (see
-- the header: the values go in one by one).
local function push(args, name)
  if #args < 3 then return wrong_args(name) end
  local key, n = args[2], nil
  for i = 3, #args do
    local why
    n, why = db[name](db, key, args[i])
    if n == nil then return failure(why) end
  end
  return int(n)
end

function commands.lpush(args) return push(args, "lpush") end
function commands.rpush(args) return push(args, "rpush") end

-- LPOP/RPOP key [count]: one value (nil when the key is missing), or with a
-- count an array of at most count values (a nil array when it is missing).
local function pop(args, name)
  if #args < 2 or #args > 3 then return wrong_args(name) end
  local key = args[2]
  if #args == 2 then
    local v, why = db[name](db, key)
    if v == nil then return why and failure(why) or NIL end
    return bulk(as_text(v))
  end
  local count = canonical_integer(args[3])
  if not count or count < 0 then return NOT_POSITIVE end
  local n, why = db:llen(key)
  if n == nil then return failure(why) end
  if n == 0 then return NIL_ARRAY end
  local out = {}
  while #out < count do
    local v = db[name](db, key)
    if v == nil then break end
    out[#out + 1] = bulk(as_text(v))
  end
  return array(out)
end

function commands.lpop(args) return pop(args, "lpop") end
function commands.rpop(args) return pop(args, "rpop") end

function commands.llen(args)
  if #args ~= 2 then return wrong_args("llen") end
  local n, why = db:llen(args[2])
  if n == nil then return failure(why) end
  return int(n)
end

-- LRANGE key start stop, with Redis's index rules (negative from the end,
-- out of range clamped), which the dictionary's lrange follows.
function commands.lrange(args)
  if #args ~= 4 then return wrong_args("lrange") end
  local start, stop = canonical_integer(args[3]), canonical_integer(args[4])
  if not start or not stop then return NOT_INTEGER end
  local values, why = db:lrange(args[2], start, stop)
  if values == nil then return failure(why) end
  for i = 1, #values do values[i] = bulk(as_text(values[i])) end
  return array(values)
end

function commands.dbsize(args)
  if #args ~= 1 then return wrong_args("dbsize") end
  return int(db:count())
end

-- FLUSHALL [ASYNC | SYNC]: either way the flush is done at once.
function commands.flushall(args)
  local mode = args[2] and args[2]:upper()
  if #args > 2 or (mode and mode ~= "ASYNC" and mode ~= "SYNC") then
    return SYNTAX
  end
  db:flush()
  return OK
end
commands.flushdb = commands.flushall

-- SELECT index: there is one database, 0; Redis's range check on the
-- number comes first.
function commands.select(args)
  if #args ~= 2 then return wrong_args("select") end
  local n = canonical_integer(args[2])
  if not n then return NOT_INTEGER end
  if n < -2147483648 or n > 2147483647 then
    return err("ERR value is out of range, value must between -2147483648 and 2147483647")
  end
  if n ~= 0 then return err("ERR DB index is out of range") end
  return OK
end

-- INFO [section ...]: the "# Server" section (for "server", "default",
-- "all" and "everything", or no section), which is what redis-cli and
-- client libraries read (redis_version, redis_mode); any other section is
-- empty, as Redis answers for one it does not know. redis_version is the
-- version whose replies these copy.
function commands.info(args, conn)
  local want = #args == 1
  for i = 2, #args do
    local section = args[i]:lower()
    if section == "server" or section == "default" or section == "all"
        or section == "everything" then
      want = true
    end
  end
  if not want then return bulk("") end
  local _, port = conn:address()
  local up = os.time() - started
  return bulk(table.concat({
    "# Server", "redis_version:7.0.0", "redis_mode:standalone", "os:Linux",
    "arch_bits:" .. (string.packsize("T") * 8), "multiplexing_api:epoll",
    "process_id:" .. pid, "tcp_port:" .. tostring(port or 0),
    "uptime_in_seconds:" .. up, "uptime_in_days:" .. up // 86400, "",
  }, "\r\n"))
end

-- CONFIG GET parameter [parameter ...]: the few parameters there are, by
-- name (case-insensitive, answered with the name as asked) or by glob
-- pattern (answered with their own names), each once. redis-benchmark asks
-- for "save" and "appendonly": nothing is saved. CONFIG HELP lists GET;
-- other subcommands, CONFIG SET included, get Redis's answer to a
-- subcommand it does not know.
local config_names = { "save", "appendonly", "databases", "maxmemory", "maxmemory-policy" }

local CONFIG_HELP = array({
  "+CONFIG <subcommand> [<arg> [value] [opt] ...]. Subcommands are:\r\n",
  "+GET <pattern>\r\n",
  "+    Return parameters matching the glob-like <pattern> and their values.\r\n",
  "+HELP\r\n", "+    Prints this help.\r\n",
})

function commands.config(args)
  if #args < 2 then return wrong_args("config") end
  local sub = args[2]:lower()
  if sub == "help" then return #args == 2 and CONFIG_HELP or wrong_args("config|help") end
  if sub ~= "get" then return unknown_subcommand(args) end
  if #args < 3 then return wrong_args("config|get") end
  local values = {
    save = "", appendonly = "no", databases = "1",
    maxmemory = tostring(db:capacity()), ["maxmemory-policy"] = "allkeys-lru",
  }
  local out, seen = {}, {}
  for i = 3, #args do
    local asked = args[i]
    if not cstring(asked):find("[%[%*%?]") then
      local name = asked:lower()
      if values[name] and not seen[name] then
        seen[name] = true
        out[#out + 1] = bulk(asked)
        out[#out + 1] = bulk(values[name])
      end
    else
      for _, name in ipairs(config_names) do
        if not seen[name] and matches(asked, name, true) then
          seen[name] = true
          out[#out + 1] = bulk(name)
          out[#out + 1] = bulk(values[name])
        end
      end
    end
  end
  return array(out)
end

-- redis-cli asks for command documentation in interactive mode.
function commands.command() return EMPTY end

-- --- requests ----------------------------------------------------------------

local receive                 -- conn.receive, looked up once, not per call
local match, sub = string.match, string.sub   -- (byte: above)

-- The n of a "*n" or "$n" line if it is canonical_integer's (without its
-- costly tostring), up to 18 digits (no count is larger).
local function count(line)
  local digits = match(line, "^.(%-?[1-9]%d*)$")
  if digits then return #digits < 19 and tonumber(digits) or nil end
  if #line == 2 and byte(line, 2) == 48 then return 0 end    -- "0"
  return nil
end

-- The counts of the lines seen ("*3" -> 3, "$5" -> 5), up to 4096: the same
-- few lines come in every request, and a lookup is cheaper than a match.
local COUNTS_KEPT = 4096
local arrays, bulks = {}, {}

-- Reads one request: its arguments (none for an empty one); or nil and the
-- protocol error to answer; or nil alone when the client has gone. RESP is
-- a "*n" line, then n times a "$len" line, len bytes and a CRLF; any other
-- line is an inline command. Up to 64 arguments go into `reuse`, the
-- connection's table (no command keeps its arguments, and a new table per
-- request cost more than the rest of a GET's parsing).
local function read_request(conn, reuse)
  local line, why, partial = receive(conn, "*l")
  if not line then
    if why ~= "too long" then return nil end
    return nil, byte(partial, 1) == 42 and "invalid multibulk length" or "too big inline request"
  end
  local n = arrays[line]
  if not n then
    if byte(line, 1) ~= 42 then                -- not '*': an inline command
      local args = {}
      for word in line:gmatch("%S+") do args[#args + 1] = word end
      return args
    end
    n = count(line)
    if not n or n > MAX_ARGS then return nil, "invalid multibulk length" end
    if n >= 0 and n <= COUNTS_KEPT then arrays[line] = n end
  end
  local args = n <= 64 and reuse or {}
  for i = 1, n do
    line, why = receive(conn, "*l")
    if not line then return nil, why == "too long" and "invalid bulk length" or nil end
    local len = bulks[line]
    if not len then
      if byte(line, 1) ~= 36 then              -- not '$' ("": a line of just CR or LF)
        return nil, ("expected '$', got '%s'"):format(line ~= "" and sub(line, 1, 1) or "\r")
      end
      len = count(line)
      if not len or len < 0 or len > max_bulk then return nil, "invalid bulk length" end
      if len <= COUNTS_KEPT then bulks[line] = len end
    end
    local arg = receive(conn, len)
    local crlf = arg and receive(conn, 2)
    if not crlf then return nil end
    if crlf ~= "\r\n" then return nil, "invalid bulk data: missing CRLF" end
    args[i] = arg
  end
  for i = #args, math.max(n, 0) + 1, -1 do args[i] = nil end
  return args
end

-- --- the handler -------------------------------------------------------------

local kv = {}

function kv.init(worker)
  local config = worker.config or {}
  local capacity = config.capacity or 64 * 1024 * 1024
  db = multiloop.shared(config.name or "kv", { capacity = capacity })
  max_bulk = math.max(capacity, 1024 * 1024)
  local stat = io.open("/proc/self/stat")     -- the process id, for INFO
  if stat then
    pid = stat:read("n") or 0
    stat:close()
  end
end

-- Each connection: read a request, answer it, until the client goes, sends
-- QUIT or breaks the protocol. Each reply is one send: while a read event
-- runs, multiloop holds the sends after its first and writes them together
-- as the event ends (README, "Sequential connections"), so the replies to a
-- pipelined burst cost one write, as in Redis, and a client sending one
-- request at a time still gets each reply at once. A client that does not
-- read its replies makes send wait (write_high_water): what is held for it
-- stays bounded.
function kv.serve(conn)
  receive = conn.receive
  local send = conn.send
  conn:settimeout(0)                          -- as Redis: a client may idle for ever
  local reuse = {}
  while true do
    local args, why = read_request(conn, reuse)
    if not args then
      if why then send(conn, err("ERR Protocol error: " .. why)) end
      return
    end
    if #args > 0 then                         -- an empty request is skipped
      local name = args[1]:lower()
      if name == "quit" then
        send(conn, OK)
        return
      end
      send(conn, (commands[name] or unknown)(args, conn))
    end
  end
end

return kv
