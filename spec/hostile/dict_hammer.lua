-- spec/hostile/dict_hammer.lua [OPS]: four workers mix every dictionary
-- operation on one small dictionary (eviction, bucket growth and shrink,
-- flush and expiry all at once) while the main state writes to it too, and
-- then all of them make and drop dictionaries of three names as fast as they
-- can (a last release frees one while another state makes it anew). Meant
-- for ASan and TSan builds; checks the accounting once all is quiet.
if not os.getenv("LUA_CPATH") then
  package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
  package.cpath = "./build/?.so;" .. package.cpath
end
local multiloop = require("multiloop")
local core = require("multiloop.core")
local socket = require("socket")
local N = tonumber(arg[1]) or 20000
local d = multiloop.shared("hostile.hammer", { capacity = 8192 })

-- A handler with no upvalues: "mix N" or "churn N", answers "done".
local function handler(conn)
  conn:on_data(function(data)
    local what, n = data:match("^(%a+) (%d+)")
    n = tonumber(n)
    local seed = conn.worker.id * 7919
    local function rnd(m) seed = (seed * 1103515245 + 12345) % 2147483648; return seed % m end
    if what == "churn" then
      local c = require("multiloop.core")
      for i = 1, n do
        local dd = c.shared("hostile.churn" .. (i % 3), 4096 * (1 + i % 2))
        dd:set("k" .. conn.worker.id, i)
        dd:rpush("l", i)
        if dd:llen("l") > 20 then dd:flush() end
        if i % 7 == 0 then collectgarbage() end
      end
    else
      local dd = require("multiloop").shared("hostile.hammer")
      for _ = 1, n do
        local k, op = "k" .. rnd(300), rnd(16)
        if op == 0 then dd:set(k, ("v"):rep(rnd(600)), rnd(3))
        elseif op == 1 then dd:get(k)
        elseif op == 2 then dd:lpush(k, ("x"):rep(rnd(200)))
        elseif op == 3 then dd:rpop(k)
        elseif op == 4 then dd:lrange(k, rnd(10) - 5, rnd(10) - 5)
        elseif op == 5 then dd:incr(k, 1, 0, rnd(3))
        elseif op == 6 then dd:expire(k, rnd(3))
        elseif op == 7 then if rnd(50) == 0 then dd:flush() end
        elseif op == 8 then dd:flush_expired(rnd(4))
        elseif op == 9 then dd:keys(rnd(5))
        elseif op == 10 then dd:count()
        elseif op == 11 then dd:delete(k)
        elseif op == 12 then dd:safe_set(k, rnd(5) == 0 and 1.5 or "s")
        elseif op == 13 then dd:get_stale(k)
        elseif op == 14 then dd:llen(k); dd:ttl(k)
        else dd:safe_add(k, true, rnd(3)); dd:rpush(k, rnd(1000)) end
      end
    end
    conn:write("done\n")
  end)
end

local s = multiloop.server{ host = "127.0.0.1", port = 0, workers = 4, handler = handler }
s:start()
local _, port = s:address()
local function round(request, main)
  local cs = {}
  for i = 1, 4 do
    cs[i] = socket.tcp()
    cs[i]:settimeout(300)
    assert(cs[i]:connect("127.0.0.1", port))
  end
  for _, c in ipairs(cs) do assert(c:send(request)) end
  main()
  for _, c in ipairs(cs) do
    assert(c:receive("*l") == "done")
    c:close()
  end
end
round(("mix %d\n"):format(N), function()
  for i = 1, 2000 do
    d:set("m" .. (i % 50), i)
    d:lpush("m", i)
    if i % 100 == 0 then d:flush() end
  end
end)
round(("churn %d\n"):format(N), function()
  for i = 1, N // 4 do
    core.shared("hostile.churn" .. (i % 3), 4096):get("k1")
    if i % 5 == 0 then collectgarbage() end
  end
end)
assert(s:stop())
d:flush()
assert(d:free_space() == d:capacity())
print("dict_hammer ok")
