--- multiloop.shared(name [, options]) -> dictionary
--
-- A dictionary shared by every Lua state of the process: the main state and
-- each worker's. The first call with a name makes it; later calls, in any
-- state, find the same one. In a handler: `require("multiloop").shared(name)`.
-- Methods and return conventions are documented in src/shared.c and in the
-- README ("Shared dictionaries").
--
-- A dictionary lives as long as some state holds its object: one that no
-- state references any more is freed, and the next call makes a new, empty
-- one. Keep it in a variable (or a module) for as long as it must live.
--
-- This file checks the options (naming the one that is wrong), fills in the
-- defaults and caches the object per state, so that a handler may call
-- shared(name) on every request without taking the process-wide lock.

local core = require("multiloop.core")

local MIN_CAPACITY = 4096                 -- src/shared.c says the same
-- A ceiling, not a reservation: entries are allocated one at a time, so this
-- only bounds how far a dictionary may grow before it evicts. 1 TiB keeps
-- every size sum far from overflow; a capacity beyond the machine's memory
-- is still the caller's mistake to avoid (the eviction would never come).
local MAX_CAPACITY = 1 << 40              -- and this

local defaults = {
  capacity = 1024 * 1024,
}

local function show(v)
  return type(v) == "string" and ("'" .. v .. "'") or tostring(v)
end

local function fail(name, what, got)
  error(("multiloop.shared: option '%s' %s (got %s)"):format(name, what, show(got)), 0)
end

local checks = {
  capacity = function(v)
    local n = type(v) == "number" and math.tointeger(v)
    if not n or n < MIN_CAPACITY or n > MAX_CAPACITY then
      fail("capacity", ("must be an integer number of bytes from %d to 2^40 (1 TiB)")
        :format(MIN_CAPACITY), v)
    end
    return n
  end,
}

-- name -> dictionary object, per state. Weak values: a cached object does not
-- keep its dictionary alive.
local cache = setmetatable({}, { __mode = "v" })

local function shared(name, opts)
  if type(name) ~= "string" or name == "" then
    error("multiloop.shared: the name must be a non-empty string (got " .. show(name) .. ")", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("multiloop.shared: expected a table of options or nil (got " .. show(opts) .. ")", 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if checks[k] == nil then
      error(("multiloop.shared: unknown option '%s'"):format(tostring(k)), 2)
    end
  end
  local ok, capacity = pcall(checks.capacity, opts.capacity or defaults.capacity)
  if not ok then error(capacity, 2) end

  local d = cache[name]
  if d == nil then
    d = core.shared(name, capacity)
    cache[name] = d
  end
  -- An existing dictionary keeps its capacity; asking for another is a mistake.
  if opts.capacity ~= nil and d:capacity() ~= capacity then
    error(("multiloop.shared: option 'capacity': dictionary '%s' already exists with "
      .. "capacity %d (got %d)"):format(name, d:capacity(), capacity), 2)
  end
  return d
end

return shared
