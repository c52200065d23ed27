-- spec/hostile/dict_edges.lua: the shared dictionary's edges in one state:
-- lrange at math.mininteger/maxinteger, incr wrapping and floats, ttl
-- bounds, lists against values, and the byte accounting (after any mix of
-- operations, deleting every key gives back the whole capacity).
if not os.getenv("LUA_CPATH") then
  package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
  package.cpath = "./build/?.so;" .. package.cpath
end
local multiloop = require("multiloop")
local MIN, MAX = math.mininteger, math.maxinteger

local d = multiloop.shared("hostile.edges", { capacity = 4096 })
assert(d:rpush("l", 1) == 1 and d:rpush("l", "x") == 2 and d:lpush("l", 2.5) == 3)
local function range(a, b)
  local t = {}
  for i, v in ipairs(assert(d:lrange("l", a, b))) do t[i] = tostring(v) end
  return table.concat(t, ",")
end
for _, case in ipairs {
  { MIN, MAX, "2.5,1,x" }, { MIN, MIN, "" }, { MAX, MAX, "" }, { -1, -1, "x" }, { -3, -1, "2.5,1,x" },
  { -4, 0, "2.5" }, { 1, MIN, "" }, { 0, -4, "" }, { 2, 1, "" }, { MAX, MIN, "" }, { MIN, 0, "2.5" },
} do
  assert(range(case[1], case[2]) == case[3], ("lrange %d %d"):format(case[1], case[2]))
end
assert(not pcall(d.lrange, d, "l", 1.5, 2))

assert(d:set("n", MAX))
assert(d:incr("n", 1) == MIN, "incr wraps as Lua integers do")
assert(math.type(d:incr("n", 0.5)) == "float")
assert(d:incr("new", 1, 10, 100) == 11 and d:ttl("new") > 0 and d:ttl("new") <= 100)
assert(select(2, d:incr("l", 1)) == "not a number")
assert(select(2, d:get("l")) == "value is a list")
assert(select(2, d:llen("n")) == "value not a list")

assert(d:set("a", 1, 1e12))
assert(not pcall(d.set, d, "a", 1, 1e12 + 1) and not pcall(d.set, d, "a", 1, -1))
assert(not pcall(d.expire, d, "a", MIN) and not pcall(d.incr, d, "a", 1, 0, MAX))
assert(d:ttl("a") > 1000000000000 - 1000 and d:ttl("a") <= 1000000000000)
assert(d:expire("a", 0) and d:ttl("a") == 0)
assert(select(2, d:rpush("big", ("x"):rep(5000))) == "no memory")
d:flush()
assert(d:free_space() == d:capacity())

-- Accounting: any mix of operations, then every key deleted: all free again.
for _, cap in ipairs { 4096, 8192, 100000, 1 << 20 } do
  local dd = multiloop.shared("hostile.acct" .. cap, { capacity = cap })
  local seed = 1
  local function rnd(m) seed = (seed * 1103515245 + 12345) % 2147483648; return seed % m end
  for _ = 1, 100000 do
    local k, op = "k" .. rnd(3000), rnd(10)
    if op == 0 then dd:set(k, ("v"):rep(rnd(600)))
    elseif op == 1 then dd:lpush(k, ("x"):rep(rnd(200)))
    elseif op == 2 then dd:rpop(k)
    elseif op == 3 then dd:incr(k, 1, 0)
    elseif op == 4 then dd:delete(k)
    elseif op == 5 then dd:safe_set(k, 1.5)
    elseif op == 6 then dd:rpush(k, rnd(1000))
    elseif op == 7 then dd:set(k, true)
    elseif op == 8 then dd:replace(k, ("r"):rep(rnd(100)))
    else dd:add(k, "a") end
  end
  for i = 0, 2999 do dd:delete("k" .. i) end
  assert(dd:count() == 0 and dd:free_space() == cap, ("capacity %d: %d free"):format(cap, dd:free_space()))
end
print("dict_edges ok")
