--- The `worker` object a handler sees (init(worker), conn.worker, the
-- message and shutdown hooks), built once in each worker's own Lua state.
--
-- src/worker.c finds this file through the worker's package.path (copied
-- from the state that made the server), loads it before the handler and calls
-- what it returns with the worker's core table: its `id`, `count` and copied
-- `config`, and the C primitives of src/timer.c (`timer`, `every`, `now`) and
-- src/message.c (`send`, `broadcast`), each closing over its worker. The table
-- returned here is the `worker` object itself (documented in the README, "The
-- handler"); the core table stays private to this file.
--
-- Hot paths stay in C: `now`, `send` and `broadcast` are the C functions
-- themselves, and a timer's callback and a message's delivery are called from
-- C with no Lua in between. What is here runs when a timer is made, not when
-- it fires. Argument errors name the worker function and read byte for byte
-- as the C checks they replaced (level 0: no position, as a C function
-- raising has none); the C side checks the bounds libuv relies on again.
--
-- Runs on the worker's thread only; nothing here is shared with another
-- state.

local type, tointeger, tostring, select, error = type, math.tointeger, tostring, select, error

-- What argument i of n was, for an error message: a number as itself, else
-- its type ("no value" past the last one, as luaL_typename says).
local function shown(n, i, v)
  if i > n then return "no value" end
  return type(v) == "number" and tostring(v) or type(v)
end

local function typename(n, i, v)
  if i > n then return "no value" end
  return type(v)
end

-- A timer maker over a core primitive: checks ms (an integer, a float with
-- an integral value will do, of at least `min`) and fn, then hands both on.
local function timer_maker(make, who, min)
  local what = min > 0 and "positive" or "non-negative"
  return function(...)
    local ms, fn = ...
    local n = type(ms) == "number" and tointeger(ms)
    if not n or n < min then
      error(("%s: ms must be a %s integer (got %s)"):format(who, what, shown(select("#", ...), 1, ms)), 0)
    end
    if type(fn) ~= "function" then
      error(("%s: fn must be a function (got %s)"):format(who, typename(select("#", ...), 2, fn)), 0)
    end
    return make(n, fn)
  end
end

return function(core)
  return {
    id = core.id,
    count = core.count,
    config = core.config,
    timer = timer_maker(core.timer, "worker.timer", 0),    -- fn(t) once, after ms
    -- every(0) would run again in the same pass of libuv's timer loop,
    -- starving everything else: a repeating timer needs at least 1 ms.
    every = timer_maker(core.every, "worker.every", 1),
    now = core.now,
    send = core.send,
    broadcast = core.broadcast,
  }
end
