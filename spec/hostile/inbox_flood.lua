-- spec/hostile/inbox_flood.lua: a 64 KiB inbox_limit; worker 1 busy while
-- workers 2-4 and the main state flood it; clients connect through queue
-- dispatch meanwhile (never refused); then stop() in the middle of a flood.
-- Checks: refusals say "full", every accepted message arrives once, and the
-- limit is whole again once the inbox drained. About 2 s.
if not os.getenv("LUA_CPATH") then
  package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
  package.cpath = "./build/?.so;" .. package.cpath
end
local multiloop = require("multiloop")
local socket = require("socket")
local d = multiloop.shared("hostile.flood")
d:flush()
local s = multiloop.server{ host = "127.0.0.1", port = 0, workers = 4, dispatch = "queue",
  inbox_limit = 64 * 1024, handler = "spec.hostile.flood_handler" }
s:start()
local _, port = s:address()
assert(s:send(1, { busy = 0.5 }))
for w = 2, 4 do assert(s:send(w, { flood = 2000 })) end
local mine = 0
for _ = 1, 2000 do
  local ok, why = s:send(1, ("y"):rep(300))
  if ok then mine = mine + 1 else assert(why == "full", why) end
end
local conns = {}
for i = 1, 40 do
  conns[i] = socket.tcp()
  conns[i]:settimeout(5)
  assert(conns[i]:connect("127.0.0.1", port))
end
for _, c in ipairs(conns) do assert(c:receive("*l") == "hi") end
for _, c in ipairs(conns) do c:close() end
local function all_in() return (d:get("got") or 0) == (d:get("sent") or 0) + mine end
local deadline = socket.gettime() + 10
while socket.gettime() < deadline and not (d:get("refused") and all_in()) do socket.sleep(0.01) end
assert(all_in(), "lost or duplicated messages")
assert(d:get("refused") == 0 or d:get("why") == "full")
assert(s:send(1, { busy = 0.3 }))
local fit = 0
while s:send(1, ("z"):rep(1000)) do fit = fit + 1 end
assert(fit >= 60 and fit <= 64, "the limit is not whole again: " .. fit)
for w = 2, 4 do s:send(w, { flood = 5000 }) end
assert(s:stop())
print("inbox_flood ok")
