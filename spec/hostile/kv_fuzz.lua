-- spec/hostile/kv_fuzz.lua [N]: a hostile RESP client against examples/kv.lua
-- (in this process, port 0):
-- random commands with hostile arguments (extreme integers, binary keys,
-- huge counts, wrong types), pipelined 16 deep on one connection; the server
-- must answer every request or close, and stay up. Bounded: N requests.
if not os.getenv("LUA_CPATH") then
  package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
  package.cpath = "./build/?.so;" .. package.cpath
end
package.path = "./?.lua;" .. package.path
local multiloop = require "multiloop"
local socket = require "socket"
local N = tonumber(arg[1]) or 20000
local s = multiloop.server{ host = "127.0.0.1", port = 0, workers = 2, handler = "examples.kv",
  config = { capacity = 64 * 1024 } }
s:start()
local _, port = s:address()
local seed = 12345
local function rnd(m) seed = (seed * 1103515245 + 12345) % 2147483648; return seed % m end
local ints = { "0", "-1", "1", "9223372036854775807", "-9223372036854775808",
  "9223372036854775808", "-9223372036854775809", "1e300", "nan", "inf", "-0", "00", " 1", "1.5", "",
  "99999999999999999999", "-100", "100" }
local cmds = { "SET", "GET", "INCR", "INCRBY", "DECRBY", "LPUSH", "RPUSH", "LPOP", "RPOP", "LLEN",
  "LRANGE", "EXPIRE", "PEXPIRE", "TTL", "PTTL", "DEL", "MSET", "MGET", "APPEND", "STRLEN", "SETNX",
  "GETSET", "KEYS", "TYPE", "SELECT", "INFO", "CONFIG", "EXISTS", "FLUSHALL", "SETEX", "PSETEX",
  "INCRBYFLOAT", "DECR", "PING", "ECHO", "DBSIZE", "LINDEX", "LSET" }
local function arg_()
  local r = rnd(6)
  if r == 0 then return ints[rnd(#ints) + 1]
  elseif r == 1 then return "k" .. rnd(20)
  elseif r == 2 then
    local t = {}
    for i = 1, rnd(30) do t[i] = string.char(rnd(256)) end
    return table.concat(t)
  elseif r == 3 then return ("x"):rep(rnd(3) == 0 and 70000 or rnd(3000))
  elseif r == 4 then
    return ({ "EX", "PX", "NX", "XX", "GET", "KEEPTTL", "*", "?", "[", "\\", "[a-", "GET",
      "maxmemory", "*[[[[[[[[" })[rnd(14) + 1]
  else return "l" .. rnd(5) end
end
local function req()
  local parts = { cmds[rnd(#cmds) + 1] }
  for _ = 1, rnd(6) do parts[#parts + 1] = arg_() end
  local out = { "*" .. #parts .. "\r\n" }
  for _, p in ipairs(parts) do out[#out + 1] = "$" .. #p .. "\r\n" .. p .. "\r\n" end
  return table.concat(out)
end
-- reads one RESP reply; returns false on close/timeout
local function reply(c)
  local line, e = c:receive("*l")
  if not line then return false, e end
  local t = line:sub(1, 1)
  local n = tonumber(line:sub(2))
  if t == "$" and n >= 0 then
    assert(c:receive(n + 2))
  elseif t == "*" then
    for _ = 1, math.max(n, 0) do
      if not reply(c) then return false end
    end
  end
  return true
end
local done, closed = 0, 0
local c
local function conn()
  c = socket.tcp()
  c:settimeout(5)
  assert(c:connect("127.0.0.1", port))
end
conn()
while done < N do
  local batch = {}
  for i = 1, 16 do batch[i] = req() end
  assert(c:send(table.concat(batch)))
  for _ = 1, 16 do
    local ok, e = reply(c)
    if not ok then closed = closed + 1; print("closed:", e); c:close(); conn(); break end
    done = done + 1
  end
end
c:close()
local c2 = socket.tcp()
c2:settimeout(2)
assert(c2:connect("127.0.0.1", port))
c2:send("PING\r\n")
assert(c2:receive("*l") == "+PONG", "the server went down")
c2:close()
assert(s:stop())
print(("kv_fuzz ok: %d requests, %d connections closed"):format(done, closed))
