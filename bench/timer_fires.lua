-- bench/timer_fires.lua: CPU time per timer fire (a callback that does not
-- yield), one worker. `lua5.4 bench/timer_fires.lua [N]` prints the worker
-- process's CPU time for N fires minus an idle run of the same length, per
-- fire. The timers are 100 batches of N/100 worker.timer(0, fn) each, so the
-- loop's own turns are a small part of it.
local multiloop = require("multiloop")
local N = tonumber(arg[1]) or 100000

local function cpu()
  local f = assert(io.open("/proc/self/stat"))
  local s = f:read("*a")
  f:close()
  local fields = {}
  for x in s:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = x end
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100
end

local HANDLER = os.tmpname()
do
  local f = assert(io.open(HANDLER, "w"))
  f:write([[
return {
        connect = function() end,
        init = function(worker)
          local d = require("multiloop").shared("bench.timers")
          local n, batch, left = worker.config.n, worker.config.n // 100, 100
          local fired = 0
          local function fn() fired = fired + 1 end
          local function next_batch()
            if left == 0 then d:set("done", fired) return end
            left = left - 1
            for _ = 1, batch do worker.timer(0, fn) end
            worker.timer(1, next_batch)
          end
          if n > 0 then next_batch() else worker.timer(0, function()
            local k = 0
            local function idle() k = k + 1 if k == 100 then d:set("done", 0) else worker.timer(1, idle) end end
            idle()
          end) end
        end,
      }
]])
  f:close()
end

local function run(n)
  local s = multiloop.server{ host = "127.0.0.1", port = 0, workers = 1, config = { n = n },
    handler = HANDLER }
  local d = multiloop.shared("bench.timers")
  d:delete("done")
  local t0 = cpu()
  s:start()
  while not d:get("done") do require("socket").sleep(0.005) end
  local t = cpu() - t0
  s:stop()
  return t
end

local idle = math.huge
local busy = math.huge
for _ = 1, 5 do
  idle = math.min(idle, run(0))
  busy = math.min(busy, run(N))
end
print(("%d fires: %.0f ns CPU per fire (best of 5; %.3f s, idle run %.3f s)"):format(
  N, (busy - idle) / N * 1e9, busy, idle))
os.remove(HANDLER)
