-- Shared dictionaries: every method and its errors, ttl expiry, LRU eviction
-- under a small capacity, lifetime, and one dictionary seen from the main
-- state and from four worker states at once.
local helper = require("spec.helper")
local shared = require("multiloop.shared")

-- The message of the error fn raises (which must raise), without the
-- "file:line: " that Lua puts in front.
local function error_of(fn)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected an error")
  return (tostring(err):gsub("^[^:]*:%d+: ", ""))
end

-- Every result of a call, n included, so that trailing nils count.
local function all(...) return { n = select("#", ...), ... } end

describe("multiloop.shared", function()
  it("returns the same object for a name in one state, another for another name", function()
    local a = shared("spec.same")
    assert.are.equal(a, shared("spec.same"))
    assert.are_not.equal(a, shared("spec.other"))
    assert.are.equal("multiloop.shared 'spec.same' (capacity 1048576)", tostring(a))
    assert.are.equal(1024 * 1024, a:capacity())
  end)

  it("is exported by init.lua as multiloop.shared", function()
    local multiloop = require("multiloop")
    if multiloop.shared == nil then
      pending("add M.shared = require(\"multiloop.shared\") to lua/multiloop/init.lua")
      return
    end
    assert.are.equal(shared, multiloop.shared)
  end)

  it("checks its name and options, naming the option", function()
    local CAPACITY = "multiloop.shared: option 'capacity' must be an integer number of bytes "
      .. "from 4096 to 2^40 (1 TiB) "
    local cases = {
      { function() shared() end, "multiloop.shared: the name must be a non-empty string (got nil)" },
      { function() shared("") end, "multiloop.shared: the name must be a non-empty string (got '')" },
      { function() shared(42) end, "multiloop.shared: the name must be a non-empty string (got 42)" },
      { function() shared("x", 5) end, "multiloop.shared: expected a table of options or nil (got 5)" },
      { function() shared("x", { capcity = 1 }) end, "multiloop.shared: unknown option 'capcity'" },
      { function() shared("x", { capacity = 100 }) end,
        CAPACITY .. "(got 100)" },
      { function() shared("x", { capacity = 8192.5 }) end,
        CAPACITY .. "(got 8192.5)" },
      { function() shared("x", { capacity = "8192" }) end,
        CAPACITY .. "(got '8192')" },
    }
    for _, case in ipairs(cases) do
      assert.are.equal(case[2], error_of(case[1]))
    end
    -- The core checks what C must not get wrong, even when called directly.
    assert.are.equal("bad argument #2 to 'shared' (capacity must be at least 4096 bytes)",
      error_of(function() require("multiloop.core").shared("x", 10) end))
  end)

  it("bounds the capacity at 2^40 bytes, in Lua and in C", function()
    for _, big in ipairs({ math.maxinteger, (1 << 40) + 1, 2.0 ^ 62 }) do
      assert.are.equal(("multiloop.shared: option 'capacity' must be an integer number of bytes "
        .. "from 4096 to 2^40 (1 TiB) (got %s)"):format(tostring(big)),
        error_of(function() shared("spec.huge", { capacity = big }) end))
      assert.are.equal("bad argument #2 to 'shared' (capacity must be at most 2^40 bytes (1 TiB))",
        error_of(function() require("multiloop.core").shared("spec.huge", big) end))
    end
    -- The ceiling itself is fine: nothing is allocated up front.
    local d = shared("spec.huge", { capacity = 1 << 40 })
    assert.are.equal(1 << 40, d:capacity())
    assert.are.equal(1 << 40, d:free_space())
    assert.is_true(d:set("k", string.rep("v", 1024 * 1024)))
  end)

  it("keeps the capacity it was made with; asking for another raises", function()
    local d = shared("spec.capacity", { capacity = 8192.0 })
    assert.are.equal(8192, d:capacity())
    assert.are.equal(math.type(d:capacity()), "integer")
    assert.are.equal(d, shared("spec.capacity"))
    assert.are.equal(d, shared("spec.capacity", { capacity = 8192 }))
    assert.are.equal("multiloop.shared: option 'capacity': dictionary 'spec.capacity' already "
      .. "exists with capacity 8192 (got 16384)",
      error_of(function() shared("spec.capacity", { capacity = 16384 }) end))
  end)

  it("is gone once no state references it: the next call makes a new, empty one", function()
    local d = shared("spec.gone")
    d:set("k", "v")
    assert.are.equal("v", shared("spec.gone"):get("k"))
    d = nil                                                 -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    assert.is_nil(shared("spec.gone"):get("k"))
  end)
end)

describe("a shared dictionary", function()
  local d
  before_each(function()
    d = shared("spec.dict")
    d:flush()
  end)

  it("stores strings, integers, floats and booleans, keeping integer and float apart", function()
    local values = {
      s = "hello", empty = "", bin = "a\0b\255", i = 3, f = 3.0, neg = -0.5,
      max = math.maxinteger, min = math.mininteger, huge = math.huge,
      yes = true, no = false,
    }
    for k, v in pairs(values) do assert.are.same(all(true, nil, false), all(d:set(k, v))) end
    for k, v in pairs(values) do
      assert.are.equal(v, d:get(k), k)
      assert.are.equal(math.type(v), math.type(d:get(k)), k)
    end
    assert.is_false(d:get("no"))
    assert.are.equal("integer", math.type(d:get("i")))
    assert.are.equal("float", math.type(d:get("f")))
    -- An empty string first thing on a fresh object (no scratch buffer yet).
    local fresh = shared("spec.fresh")
    fresh:set("e", "")
    assert.are.equal("", fresh:get("e"))
    d:set("nan", 0 / 0)
    assert.are_not.equal(d:get("nan"), d:get("nan"))
    assert.is_nil(d:get("missing"))
    -- Overwriting changes the type, whatever the sizes.
    d:set("s", 7)
    assert.are.equal(7, d:get("s"))
    d:set("i", string.rep("x", 1000))
    assert.are.equal(string.rep("x", 1000), d:get("i"))
    d:set("i", "short")
    assert.are.equal("short", d:get("i"))
  end)

  it("add stores only what is absent: false, 'exists' otherwise", function()
    assert.are.same(all(true, nil, false), all(d:add("k", 1)))
    assert.are.same(all(false, "exists", false), all(d:add("k", 2)))
    assert.are.equal(1, d:get("k"))
  end)

  it("replace stores only what is present: false, 'not found' otherwise", function()
    assert.are.same(all(false, "not found", false), all(d:replace("k", 1)))
    assert.is_nil(d:get("k"))
    d:set("k", 1)
    assert.are.same(all(true, nil, false), all(d:replace("k", "two")))
    assert.are.equal("two", d:get("k"))
  end)

  it("incr adds integers as integers and floats as floats", function()
    d:set("n", 10)
    assert.are.same(all(15, nil, false), all(d:incr("n", 5)))
    assert.are.equal("integer", math.type(d:get("n")))
    assert.are.equal(14, d:incr("n", -1))
    assert.are.equal(14.5, d:incr("n", 0.5))
    assert.are.equal("float", math.type(d:get("n")))
    d:set("w", math.maxinteger)
    assert.are.equal(math.mininteger, d:incr("w", 1))         -- wraps, as in Lua
    d:set("f", 1.0)
    assert.are.equal("float", math.type(d:incr("f", 1)))
  end)

  it("incr on a missing key: nil, 'not found', or init + n when init is given", function()
    assert.are.same(all(nil, "not found", false), all(d:incr("k", 1)))
    assert.is_nil(d:get("k"))
    assert.are.same(all(11, nil, false), all(d:incr("k", 1, 10)))
    assert.are.equal(12, d:incr("k", 1, 10))                    -- init only when missing
    assert.are.equal(2.5, d:incr("g", 2, 0.5))
    assert.are.equal("float", math.type(d:get("g")))
  end)

  it("incr on a value that is not a number: nil, 'not a number'", function()
    d:set("s", "5")
    d:set("b", true)
    assert.are.same(all(nil, "not a number", false), all(d:incr("s", 1)))
    assert.are.same(all(nil, "not a number", false), all(d:incr("b", 1, 0)))
    assert.are.equal("5", d:get("s"))
  end)

  it("delete removes: true, then false when absent", function()
    d:set("k", 1)
    assert.is_true(d:delete("k"))
    assert.is_nil(d:get("k"))
    assert.is_false(d:delete("k"))
  end)

  it("keys returns 1024 keys by default, max of them, or all with 0; count counts", function()
    for i = 1, 1100 do d:set("k" .. i, i) end
    assert.are.equal(1100, d:count())
    assert.are.equal(1024, #d:keys())
    assert.are.equal(5, #d:keys(5))
    local seen = {}
    for _, k in ipairs(d:keys(0)) do
      assert.is_nil(seen[k])
      seen[k] = true
    end
    for i = 1, 1100 do assert.is_true(seen["k" .. i]) end
    assert.are.same({}, shared("spec.empty"):keys())
  end)

  it("reads large values and many keys, then small ones, alike (the scratch buffer)", function()
    local big_d = shared("spec.scratch", { capacity = 64 * 1024 * 1024 })
    big_d:flush()
    local big = ("0123456789abcdef"):rep(64 * 1024)          -- 1 MiB: over what is kept
    assert.is_true(big_d:set("big", big))
    for i = 1, 5000 do big_d:set(("key %05d"):format(i), "v") end
    for _ = 1, 3 do
      assert.are.equal(big, big_d:get("big"))
      assert.are.equal("v", big_d:get("key 00001"))
      assert.are.equal(5001, #big_d:keys(0))
      assert.are.equal("v", big_d:get("key 05000"))
    end
  end)

  it("flush empties it and gives back the space", function()
    local free = d:free_space()
    for i = 1, 100 do d:set("k" .. i, string.rep("v", 100)) end
    assert.is_true(d:free_space() < free - 100 * 100)
    d:flush()
    assert.are.equal(0, d:count())
    assert.is_nil(d:get("k1"))
    assert.are.equal(0, #d:keys(0))
    assert.is_true(d:free_space() >= free)
    assert.is_true(d:free_space() <= d:capacity())
  end)

  it("raises naming the argument when a method gets a wrong one", function()
    local cases = {
      { function() d:get(1) end, "bad argument #1 to 'get' (string expected, got number)" },
      { function() d:get() end, "bad argument #1 to 'get' (string expected, got no value)" },
      { function() d:set({}, 1) end, "bad argument #1 to 'set' (string expected, got table)" },
      { function() d:set("k") end,
        "bad argument #2 to 'set' (string, number or boolean expected, got no value)" },
      { function() d:set("k", nil) end,
        "bad argument #2 to 'set' (string, number or boolean expected, got nil)" },
      { function() d:add("k", {}) end,
        "bad argument #2 to 'add' (string, number or boolean expected, got table)" },
      { function() d:replace("k", print) end,
        "bad argument #2 to 'replace' (string, number or boolean expected, got function)" },
      { function() d:set("k", 1, -1) end,
        "bad argument #3 to 'set' (ttl_ms must be from 0 to 1e12; 0 means no expiry)" },
      { function() d:set("k", 1, 1e13) end,
        "bad argument #3 to 'set' (ttl_ms must be from 0 to 1e12; 0 means no expiry)" },
      { function() d:set("k", 1, 1.5) end,
        "bad argument #3 to 'set' (number has no integer representation)" },
      { function() d:incr("k", "1") end, "bad argument #2 to 'incr' (number expected, got string)" },
      { function() d:incr("k") end, "bad argument #2 to 'incr' (number expected, got no value)" },
      { function() d:incr("k", 1, "0") end, "bad argument #3 to 'incr' (number expected, got string)" },
      { function() d:delete(true) end, "bad argument #1 to 'delete' (string expected, got boolean)" },
      { function() d:ttl(nil) end, "bad argument #1 to 'ttl' (string expected, got nil)" },
      { function() d:keys(-1) end,
        "bad argument #1 to 'keys' (max must not be negative; 0 means all keys)" },
      { function() d:keys("all") end, "bad argument #1 to 'keys' (number expected, got string)" },
      { function() d.get(nil, "k") end, "bad argument #1 to 'get' (multiloop.shared expected, got nil)" },
      { function() d.count({}) end,
        "bad argument #1 to 'count' (multiloop.shared expected, got table)" },
    }
    for _, case in ipairs(cases) do
      assert.are.equal(case[2], error_of(case[1]))
    end
  end)
end)

describe("ttl", function()
  local d
  before_each(function()
    d = shared("spec.ttl")
    d:flush()
  end)

  it("expires entries: they read as absent, and add may take the key again", function()
    assert.are.same(all(true, nil, false), all(d:set("t", "v", 30)))
    d:set("keep", "v")
    local ttl = d:ttl("t")
    assert.is_true(ttl >= 1 and ttl <= 30, tostring(ttl))
    assert.are.equal("v", d:get("t"))
    assert.is_true(helper.eventually(function() return d:get("t") == nil end, 1000))
    assert.are.same(all(nil, "not found"), all(d:ttl("t")))
    assert.are.same(all(false, "not found", false), all(d:replace("t", 1)))
    assert.are.same(all(nil, "not found", false), all(d:incr("t", 1)))
    assert.is_false(d:delete("t"))
    assert.are.same(all(true, nil, false), all(d:add("t", "again")))
    assert.are.equal("again", d:get("t"))
  end)

  it("reads 0 for an entry without ttl; set replaces the ttl, incr keeps it", function()
    d:set("k", 1)
    assert.are.equal(0, d:ttl("k"))
    d:set("k", 1, 60000)
    assert.is_true(d:ttl("k") > 59000)
    d:incr("k", 1)
    assert.is_true(d:ttl("k") > 59000)
    d:set("k", 2)
    assert.are.equal(0, d:ttl("k"))
    d:set("k", 3, 0)
    assert.are.equal(0, d:ttl("k"))
  end)

  it("leaves expired entries out of count and keys", function()
    d:set("a", 1, 200)                                       -- room for a loaded machine
    d:set("b", 2, 200)
    d:set("c", 3)
    assert.are.equal(3, d:count())
    helper.sleep(250)
    assert.are.equal(1, d:count())
    assert.are.same({ "c" }, d:keys())
  end)
end)

describe("a full dictionary", function()
  it("evicts the least recently used entries and says so (forcible)", function()
    local d = shared("spec.lru", { capacity = 4096 })        -- one stripe: exact LRU
    d:flush()
    local value = string.rep("v", 200)
    for i = 1, 10 do assert.are.same(all(true, nil, false), all(d:set("k" .. i, value))) end
    assert.are.equal(value, d:get("k1"))                        -- k1 is now the most recent
    local forced
    for i = 11, 20 do
      local ok, err, forcible = d:set("k" .. i, value)
      assert.is_true(ok)
      assert.is_nil(err)
      if forcible then forced = forced or i end
    end
    assert.is_not_nil(forced, "some set had to evict")
    assert.is_true(forced > 10)
    assert.are.equal(value, d:get("k1"))
    assert.is_nil(d:get("k2"))
    -- What is gone is the least recently used: k2, k3, ... up to some kj.
    local j = 2
    while d:get("k" .. (j + 1)) == nil do j = j + 1 end
    for i = j + 1, 20 do assert.are.equal(value, d:get("k" .. i), "k" .. i) end
    assert.are.equal(20 - (j - 1), d:count())
    assert.is_true(d:free_space() >= 0 and d:free_space() < 4096)
  end)

  it("evicts expired entries without calling it forcible", function()
    local d = shared("spec.lru.expired", { capacity = 4096 })
    d:flush()
    local value = string.rep("v", 200)
    for i = 1, 12 do d:set("old" .. i, value, 10) end
    helper.sleep(30)
    for i = 1, 12 do
      assert.are.same(all(true, nil, false), all(d:set("new" .. i, value)), "new" .. i)
    end
    assert.are.equal(12, d:count())
  end)

  it("refuses an entry larger than a stripe: false, 'no memory', and changes nothing", function()
    local d = shared("spec.small", { capacity = 4096 })
    d:flush()
    d:set("k", "small")
    assert.are.same(all(false, "no memory", false), all(d:set("k", string.rep("x", 5000))))
    assert.are.same(all(false, "no memory", false), all(d:add("big", string.rep("x", 5000))))
    assert.are.same(all(nil, "no memory", false), all(d:incr(string.rep("k", 5000), 1, 0)))
    assert.are.equal("small", d:get("k"))
    assert.are.equal(1, d:count())
    -- The default 1 MiB has 16 stripes of 64 KiB; a larger capacity takes larger entries.
    local big = string.rep("x", 100 * 1024)
    assert.are.same(all(false, "no memory", false), all(shared("spec.1m"):set("big", big)))
    local large = shared("spec.8m", { capacity = 8 * 1024 * 1024 })
    assert.are.same(all(true, nil, false), all(large:set("big", big)))
    assert.are.equal(big, large:get("big"))
  end)
end)

describe("one dictionary in every worker state", function()
  local server, port
  after_each(function() if server then server:stop() end end)

  -- Each worker, asked "KEY\n", runs 10,000 incr on KEY ("own": a key of its
  -- own) and answers "done <worker id>".
  local function incr_handler(conn)
    conn:on_data(function(data)
      local d = require("multiloop.shared")("spec.workers")
      local key = data:match("^(%S+)")
      if key == "own" then key = "worker" .. conn.worker.id end
      for _ = 1, 10000 do assert(d:incr(key, 1, 0)) end
      conn:write("done " .. conn.worker.id .. "\n")
    end)
  end

  -- Connects once to each of the 4 workers (connections go round-robin),
  -- sends to all, then reads all, so the workers run at the same time.
  local function ask_all(request)
    local clients = {}
    for i = 1, 4 do clients[i] = helper.connect(port) end
    helper.defer(function() for _, c in ipairs(clients) do c:close() end end)
    for _, c in ipairs(clients) do assert(c:send(request)) end
    for i, c in ipairs(clients) do assert.are.equal("done " .. i, helper.line(c)) end
  end

  it("adds up exactly when four workers incr one key 10,000 times each", function()
    local d = shared("spec.workers")
    d:flush()
    server, port = helper.server{ workers = 4, handler = incr_handler }
    ask_all("one\n")
    assert.are.equal(40000, d:get("one"))
    assert.are.equal("integer", math.type(d:get("one")))
  end)

  it("adds up exactly when four workers incr a key each", function()
    local d = shared("spec.workers")
    d:flush()
    server, port = helper.server{ workers = 4, handler = incr_handler }
    ask_all("own\n")
    for i = 1, 4 do assert.are.equal(10000, d:get("worker" .. i)) end
    assert.are.equal(4, d:count())
  end)

  it("shows workers what the main state set, through require('multiloop')", function()
    local multiloop = require("multiloop")
    if multiloop.shared == nil then
      pending("add M.shared = require(\"multiloop.shared\") to lua/multiloop/init.lua")
      return
    end
    local d = shared("spec.greeting")
    d:set("greeting", "hello from main")
    server, port = helper.server{ workers = 2, handler = function(conn)
      local g = require("multiloop").shared("spec.greeting")
      g:set("seen" .. conn.worker.id, true)
      conn:write(g:get("greeting") .. "\n")
    end }
    for i = 1, 2 do
      local c = helper.connect(port)
      assert.are.equal("hello from main", helper.line(c))
      c:close()
      assert.is_true(helper.eventually(function() return d:get("seen" .. i) end))
    end
  end)
end)

describe("lists", function()
  local d
  before_each(function()
    d = shared("spec.lists")
    d:flush()
  end)

  it("lpush and rpush return the new length; lpop and rpop take from each end", function()
    assert.are.same(all(1), all(d:rpush("l", "b")))
    assert.are.same(all(2), all(d:lpush("l", "a")))
    assert.are.same(all(3), all(d:rpush("l", 3)))
    assert.are.same(all(4), all(d:rpush("l", 4.0)))
    assert.are.same(all(4), all(d:llen("l")))
    assert.are.same(all("a"), all(d:lpop("l")))
    assert.are.same(all(4.0), all(d:rpop("l")))
    assert.are.equal(3, d:rpop("l"))
    assert.are.equal("b", d:lpop("l"))
    assert.are.same(all(nil), all(d:lpop("l")))             -- empty: removed
    assert.are.same(all(nil), all(d:rpop("missing")))
  end)

  it("keeps integers, floats and binary strings apart, as values are", function()
    for _, v in ipairs({ 3, 3.0, -0.5, math.maxinteger, math.mininteger, "", "a\0b\255" }) do
      d:rpush("l", v)
    end
    local got = d:lrange("l", 0, -1)
    assert.are.same({ 3, 3.0, -0.5, math.maxinteger, math.mininteger, "", "a\0b\255" }, got)
    assert.are.equal("integer", math.type(got[1]))
    assert.are.equal("float", math.type(got[2]))
    assert.are.equal("integer", math.type(d:lpop("l")))
    assert.are.equal("float", math.type(d:lpop("l")))
    assert.are.equal("a\0b\255", d:rpop("l"))
    assert.are.equal("", d:rpop("l"))
  end)

  it("removes a list once it is empty: count, keys and add see it gone", function()
    d:rpush("l", 1)
    assert.are.equal(1, d:count())
    assert.are.same({ "l" }, d:keys())
    assert.are.equal(1, d:lpop("l"))
    assert.are.equal(0, d:count())
    assert.are.same(all(0), all(d:llen("l")))
    assert.are.same(all(true, nil, false), all(d:add("l", "now a string")))
  end)

  it("answers 'value not a list' on another value, and get 'value is a list'", function()
    d:set("s", "str")
    assert.are.same(all(nil, "value not a list"), all(d:lpush("s", 1)))
    assert.are.same(all(nil, "value not a list"), all(d:rpush("s", 1)))
    assert.are.same(all(nil, "value not a list"), all(d:lpop("s")))
    assert.are.same(all(nil, "value not a list"), all(d:rpop("s")))
    assert.are.same(all(nil, "value not a list"), all(d:llen("s")))
    assert.are.same(all(nil, "value not a list"), all(d:lrange("s", 0, -1)))
    assert.are.equal("str", d:get("s"))
    d:rpush("l", 1)
    assert.are.same(all(nil, "value is a list"), all(d:get("l")))
    assert.are.same(all(nil, "value is a list"), all(d:get_stale("l")))
    assert.are.same(all(nil, "not a number", false), all(d:incr("l", 1)))
    assert.are.same(all(false, "exists", false), all(d:add("l", 1)))
    assert.are.equal(1, d:llen("l"))
  end)

  it("set and replace on a list key replace the list; delete removes it", function()
    d:rpush("l", "x")
    d:rpush("l", "y")
    assert.are.same(all(true, nil, false), all(d:set("l", "plain")))
    assert.are.equal("plain", d:get("l"))
    assert.are.same(all(nil, "value not a list"), all(d:llen("l")))
    d:delete("l")
    d:rpush("l", "x")
    assert.are.same(all(true, nil, false), all(d:replace("l", 7)))
    assert.are.equal(7, d:get("l"))
    d:delete("l")
    d:rpush("l", "x")
    assert.is_true(d:delete("l"))
    assert.are.same(all(0), all(d:llen("l")))
  end)

  it("lrange follows Redis's index rules", function()
    for i = 1, 10 do d:rpush("l", i) end
    local cases = {
      { 0, -1, { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 } },
      { 0, 2, { 1, 2, 3 } }, { -3, -1, { 8, 9, 10 } }, { 5, 100, { 6, 7, 8, 9, 10 } },
      { -100, 1, { 1, 2 } }, { 3, 2, {} }, { 20, 30, {} }, { -1, -2, {} }, { 8, -1, { 9, 10 } },
      { 9, 9, { 10 } }, { 0, 0, { 1 } }, { -100, -50, {} }, { 2, -8, { 3 } },
      { math.mininteger, math.maxinteger, { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 } },
    }
    for _, c in ipairs(cases) do
      assert.are.same(c[3], d:lrange("l", c[1], c[2]), c[1] .. ".." .. c[2])
    end
    assert.are.same({}, d:lrange("missing", 0, -1))
    assert.are.equal(10, d:llen("l"))                       -- lrange takes nothing
  end)

  it("keeps ttl on a list: ttl and expire work, and an expired list is gone", function()
    d:rpush("l", 1)
    assert.are.equal(0, d:ttl("l"))
    assert.is_true(d:expire("l", 200))                      -- room for a loaded machine
    assert.is_true(d:ttl("l") >= 1)
    assert.are.equal(2, d:rpush("l", 2))                     -- a push keeps the ttl
    assert.is_true(d:ttl("l") <= 200)
    helper.sleep(250)
    assert.are.same(all(0), all(d:llen("l")))
    assert.are.same(all(nil), all(d:lpop("l")))
    assert.are.same(all(1), all(d:rpush("l", "again")))      -- a new list, no ttl
    assert.are.equal(0, d:ttl("l"))
  end)

  it("counts against the capacity: a push that does not fit is 'no memory', evicting nothing", function()
    local small = shared("spec.lists.small", { capacity = 4096 })
    small:flush()
    small:set("other", "v")
    local value, n = string.rep("x", 100), 0
    while true do
      local len, err = small:rpush("l", value)
      if not len then
        assert.are.equal("no memory", err)
        break
      end
      n = len
      assert.is_true(n < 100, "the capacity must stop the list")
    end
    assert.is_true(n > 10)
    assert.are.equal("v", small:get("other"))                -- a push never evicts
    assert.are.equal(n, small:llen("l"))
    assert.are.same(all(nil, "no memory"), all(small:lpush("new", value)))
    assert.are.equal(0, small:llen("new"))
    -- Popping gives the space back, and a set may evict the list as any entry.
    local free = small:free_space()
    small:lpop("l")
    assert.are.equal(free + 100 + 40, small:free_space())
    local ok, err, forcible = small:set("big", string.rep("y", 3000))
    assert.are.same({ true, nil, true }, { ok, err, forcible })
    assert.are.same(all(0), all(small:llen("l")))
    small:flush()
    assert.are.equal(small:capacity(), small:free_space())
  end)

  it("is one list for four workers pushing at once", function()
    local lists = shared("spec.lists.workers", { capacity = 16 * 1024 * 1024 })
    lists:flush()
    local server, port = helper.server{ workers = 4, handler = function(conn)
      conn:on_data(function()
        local l = require("multiloop.shared")("spec.lists.workers")
        for i = 1, 2000 do assert(l:rpush("q", conn.worker.id * 10000 + i)) end
        conn:write("done\n")
      end)
    end }
    finally(function() server:stop() end)
    local clients = {}
    for i = 1, 4 do clients[i] = helper.connect(port) end
    finally(function() for _, c in ipairs(clients) do c:close() end end)
    for _, c in ipairs(clients) do assert(c:send("go\n")) end
    for _, c in ipairs(clients) do assert.are.equal("done", helper.line(c)) end
    assert.are.equal(8000, lists:llen("q"))
    local last = {}
    for _, v in ipairs(lists:lrange("q", 0, -1)) do        -- each worker's in its order
      local w, i = v // 10000, v % 10000
      assert.are.equal((last[w] or 0) + 1, i)
      last[w] = i
    end
    for w = 1, 4 do assert.are.equal(2000, last[w]) end
  end)

  it("raises naming the argument when a list method gets a wrong one", function()
    local cases = {
      { function() d:lpush(1, "v") end, "bad argument #1 to 'lpush' (string expected, got number)" },
      { function() d:rpush("k") end,
        "bad argument #2 to 'rpush' (string or number expected, got no value)" },
      { function() d:rpush("k", true) end,
        "bad argument #2 to 'rpush' (string or number expected, got boolean)" },
      { function() d:lpush("k", {}) end,
        "bad argument #2 to 'lpush' (string or number expected, got table)" },
      { function() d:lpop() end, "bad argument #1 to 'lpop' (string expected, got no value)" },
      { function() d:rpop(false) end, "bad argument #1 to 'rpop' (string expected, got boolean)" },
      { function() d:llen({}) end, "bad argument #1 to 'llen' (string expected, got table)" },
      { function() d:lrange("k") end, "bad argument #2 to 'lrange' (number expected, got no value)" },
      { function() d:lrange("k", 0) end, "bad argument #3 to 'lrange' (number expected, got no value)" },
      { function() d:lrange("k", 0, 1.5) end,
        "bad argument #3 to 'lrange' (number has no integer representation)" },
      { function() d:lrange(nil, 0, 1) end, "bad argument #1 to 'lrange' (string expected, got nil)" },
      { function() d.lpush(nil, "k", 1) end,
        "bad argument #1 to 'lpush' (multiloop.shared expected, got nil)" },
    }
    for _, case in ipairs(cases) do
      assert.are.equal(case[2], error_of(case[1]))
    end
  end)
end)

describe("the space of a dictionary", function()
  -- The largest string value that "probe" takes, by bisection (nothing else
  -- is stored meanwhile, so set never has to evict).
  local function largest(d)
    local lo, hi = 0, d:capacity()
    while lo < hi do
      local mid = (lo + hi + 1) // 2
      if d:set("probe", string.rep("x", mid)) then
        lo = mid
        assert.is_true(d:delete("probe"))
      else
        hi = mid - 1
      end
    end
    return lo
  end

  it("is all usable again after many small sets and a flush (the buckets shrink)", function()
    local fresh = largest(shared("spec.space.fresh"))
    local d = shared("spec.space")
    for i = 1, 20000 do assert(d:set("k" .. i, i)) end    -- evicts: 1 MiB holds ~12,000
    assert.is_true(d:count() > 10000)
    d:flush()
    assert.are.equal(fresh, largest(d))                     -- was 57,267 after 65,395
    assert.are.equal(d:capacity(), d:free_space())          -- was 917,504
    -- A stripe's share, less one entry's header and key: no bucket counts yet.
    assert.are.equal(1024 * 1024 / 16 - 72 - #"probe", fresh)
  end)

  it("is all usable again once the entries are deleted, or expire", function()
    local d = shared("spec.space.delete")
    local fresh = largest(d)
    for i = 1, 8000 do assert(d:set("k" .. i, i)) end
    assert.are.equal(8000, d:count())
    for i = 1, 8000 do assert.is_true(d:delete("k" .. i)) end
    assert.are.equal(fresh, largest(d))                     -- was 61,363 after 65,395
    assert.are.equal(d:capacity(), d:free_space())
    for i = 1, 8000 do assert(d:set("k" .. i, i, 10)) end
    helper.sleep(30)
    assert.are.equal(8000, d:flush_expired())
    assert.are.equal(d:capacity(), d:free_space())
    assert.are.equal(fresh, largest(d))
  end)

  it("adds the stripes' shares up to the capacity, whatever it is", function()
    for _, cap in ipairs({ 4096, 4097, 200001, 1000003, 16 * 1024 * 1024 + 15 }) do
      local d = shared("spec.space.odd" .. cap, { capacity = cap })
      assert.are.equal(cap, d:free_space())
    end
  end)
end)

describe("OpenResty's other methods", function()
  local d
  before_each(function()
    d = shared("spec.parity")
    d:flush()
  end)

  it("incr with init_ttl: the ttl applies only to an entry made from init", function()
    assert.are.same(all(1, nil, false), all(d:incr("c", 1, 0, 300)))
    local ttl = d:ttl("c")
    assert.is_true(ttl >= 1 and ttl <= 300, tostring(ttl))
    assert.are.equal(2, d:incr("c", 1, 0, 60000))            -- exists: the ttl stays
    assert.is_true(d:ttl("c") <= 300)
    assert.is_true(helper.eventually(function() return d:get("c") == nil end, 1000))
    assert.are.equal(1, d:incr("c", 1, 0, 60000))            -- made again, with the new ttl
    assert.is_true(d:ttl("c") > 59000)
    assert.are.equal(5, d:incr("z", 5, 0, 0))                -- 0: no expiry
    assert.are.equal(0, d:ttl("z"))
    assert.are.equal(2.5, d:incr("f", 2, 0.5, 60000))
    assert.are.equal("float", math.type(d:get("f")))
    assert.is_true(d:ttl("f") > 59000)
  end)

  it("expire sets or removes the ttl of a live key: true, or nil, 'not found'", function()
    assert.are.same(all(nil, "not found"), all(d:expire("k", 100)))
    d:set("k", "v")
    assert.are.same(all(true), all(d:expire("k", 60000)))
    assert.is_true(d:ttl("k") > 59000)
    assert.are.same(all(true), all(d:expire("k", 0)))
    assert.are.equal(0, d:ttl("k"))
    assert.is_true(d:expire("k", 300))
    assert.are.equal("v", d:get("k"))
    assert.is_true(helper.eventually(function() return d:get("k") == nil end, 1000))
    assert.are.same(all(nil, "not found"), all(d:expire("k", 0)))   -- an expired key stays gone
    assert.is_nil(d:get("k"))
  end)

  it("get_stale reads an expired entry not yet freed: value, nil, stale", function()
    assert.are.same(all(nil), all(d:get_stale("missing")))
    d:set("live", 42)
    assert.are.same(all(42, nil, false), all(d:get_stale("live")))
    d:set("old", "bytes\0", 10)
    d:set("oldnum", 1.5, 10)
    helper.sleep(30)
    -- Nothing has looked at them since they expired, so they are still there.
    assert.are.same(all("bytes\0", nil, true), all(d:get_stale("old")))
    assert.are.same(all(1.5, nil, true), all(d:get_stale("oldnum")))
    assert.are.same(all("bytes\0", nil, true), all(d:get_stale("old")))   -- and stay
    assert.is_nil(d:get("old"))                                 -- get frees it
    assert.are.same(all(nil), all(d:get_stale("old")))
    assert.are.equal(1, d:flush_expired())
    assert.are.same(all(nil), all(d:get_stale("oldnum")))
  end)

  it("safe_set and safe_add never evict a live entry: false, 'no memory'", function()
    local small = shared("spec.parity.small", { capacity = 4096 })
    small:flush()
    local value = string.rep("v", 200)
    local n = 0
    while true do
      local got = all(small:safe_set("k" .. n + 1, value))
      if not got[1] then
        assert.are.same(all(false, "no memory", false), got)
        break
      end
      assert.are.same(all(true, nil, false), got)
      n = n + 1
      assert.is_true(n < 30)
    end
    assert.are.same(all(false, "no memory", false), all(small:safe_add("new", value)))
    assert.are.same(all(false, "exists", false), all(small:safe_add("k1", value)))
    assert.are.equal(n, small:count())
    for i = 1, n do assert.are.equal(value, small:get("k" .. i)) end
    -- Replacing a key counts its old bytes as free; a larger value still needs room.
    assert.are.same(all(true, nil, false), all(small:safe_set("k1", string.rep("w", 200))))
    assert.are.same(all(false, "no memory", false), all(small:safe_set("k1", string.rep("w", 1000))))
    assert.are.equal(string.rep("w", 200), small:get("k1"))
    -- Expired entries at the LRU end are freed to make room; set still evicts.
    small:flush()
    for i = 1, n do small:set("e" .. i, value, 10) end
    helper.sleep(30)
    for i = 1, n do
      assert.are.same(all(true, nil, false), all(small:safe_set("s" .. i, value)), "s" .. i)
    end
    assert.are.same(all(true, nil, true), all(small:set("forced", value)))
  end)

  it("flush_expired frees the expired entries, max of them, and says how many", function()
    for i = 1, 5 do d:set("t" .. i, i, 200) end
    d:rpush("tl", 1)
    d:expire("tl", 200)
    for i = 1, 3 do d:set("k" .. i, i) end
    assert.are.same(all(0), all(d:flush_expired()))
    helper.sleep(250)
    assert.are.same(all(2), all(d:flush_expired(2)))
    assert.are.same(all(4), all(d:flush_expired(0)))
    assert.are.same(all(0), all(d:flush_expired()))
    assert.are.equal(3, d:count())
  end)

  it("raises naming the argument when one of them gets a wrong one", function()
    local cases = {
      { function() d:incr("k", 1, nil, 100) end, "bad argument #4 to 'incr' (init_ttl_ms needs init)" },
      { function() d:incr("k", 1, 0, -1) end,
        "bad argument #4 to 'incr' (init_ttl_ms must be from 0 to 1e12; 0 means no expiry)" },
      { function() d:incr("k", 1, 0, "5") end,
        "bad argument #4 to 'incr' (number expected, got string)" },
      { function() d:incr("k", 1, 0, 0.5) end,
        "bad argument #4 to 'incr' (number has no integer representation)" },
      { function() d:expire("k") end, "bad argument #2 to 'expire' (number expected, got no value)" },
      { function() d:expire("k", -5) end,
        "bad argument #2 to 'expire' (ttl_ms must be from 0 to 1e12; 0 means no expiry)" },
      { function() d:expire("k", 2e12) end,
        "bad argument #2 to 'expire' (ttl_ms must be from 0 to 1e12; 0 means no expiry)" },
      { function() d:expire(5, 1) end, "bad argument #1 to 'expire' (string expected, got number)" },
      { function() d:get_stale({}) end, "bad argument #1 to 'get_stale' (string expected, got table)" },
      { function() d:safe_set("k") end,
        "bad argument #2 to 'safe_set' (string, number or boolean expected, got no value)" },
      { function() d:safe_add(1, 1) end, "bad argument #1 to 'safe_add' (string expected, got number)" },
      { function() d:safe_set("k", 1, -1) end,
        "bad argument #3 to 'safe_set' (ttl_ms must be from 0 to 1e12; 0 means no expiry)" },
      { function() d:set("k", 1, "10") end, "bad argument #3 to 'set' (number expected, got string)" },
      { function() d:flush_expired(-1) end,
        "bad argument #1 to 'flush_expired' (max must not be negative; 0 means all)" },
      { function() d:flush_expired("all") end,
        "bad argument #1 to 'flush_expired' (number expected, got string)" },
    }
    for _, case in ipairs(cases) do
      assert.are.equal(case[2], error_of(case[1]))
    end
  end)
end)
