-- Messages between states: worker.send/broadcast and server:send/broadcast,
-- delivered to the handler's message(worker, value, from) hook. Values are
-- deep copies (integers and floats kept apart, binary strings, nested
-- tables); order holds per sender-receiver pair; what cannot be copied, a
-- bad id and a stopped server raise at the sender, naming what is wrong.
-- The fixture (spec/fixtures/messenger.lua) writes every message it gets to
-- its worker's clients, and answers commands, so everything is seen on the
-- wire.
local helper = require("spec.helper")
local multiloop = require("multiloop")
local dump = require("spec.fixtures.dump")

local function one_line(v)
  return (dump(v):gsub("\\\n", "\\n"))
end

-- The message of the error fn raises, without the "file:line: " prefix.
local function error_of(fn)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected an error")
  return (tostring(err):gsub("^[^:]*:%d+: ", ""))
end

describe("messages", function()
  local server, port
  after_each(function()
    if server then server:stop() end
    server = nil
  end)

  -- A server of `n` workers and one client on each: clients[id].
  local function start(n, handler)
    server, port = helper.server{ workers = n, handler = handler or "spec.fixtures.messenger" }
    local clients = {}
    for _ = 1, n do
      local c = helper.connect(port)
      helper.defer(function() c:close() end)
      local id = tonumber(helper.line(c):match("^worker (%d+)$"))
      clients[id] = c
    end
    for id = 1, n do assert(clients[id], "no client reached worker " .. id) end
    return clients
  end

  local function ask(c, command)
    assert(c:send(command .. "\n"))
    return helper.line(c)
  end

  it("worker.send reaches another worker's message hook, with the sender's id", function()
    local c = start(2)
    assert.are.equal("ok true nil", ask(c[1], "send 2 { x = 1 }"))
    assert.are.equal("from 1: " .. one_line({ x = 1 }), helper.line(c[2]))
    assert.are.equal("ok true nil", ask(c[2], "send 1 'back'"))
    assert.are.equal('from 2: "back"', helper.line(c[1]))
  end)

  it("a worker may send to itself", function()
    local c = start(1)
    assert.are.equal("ok true nil", ask(c[1], "send 1 42"))
    assert.are.equal("from 1: i42", helper.line(c[1]))
  end)

  it("worker.broadcast reaches every other worker, not the sender", function()
    local c = start(3)
    assert.are.equal("ok 2 nil", ask(c[2], "broadcast 'to all'"))
    assert.are.equal('from 2: "to all"', helper.line(c[1]))
    assert.are.equal('from 2: "to all"', helper.line(c[3]))
    -- the sender got nothing: the next line it sees is this marker
    assert.are.equal("ok true nil", ask(c[2], "send 2 'marker'"))
    assert.are.equal('from 2: "marker"', helper.line(c[2]))
  end)

  it("server:send and server:broadcast come from 0, the main state", function()
    local c = start(2)
    assert.are.equal(true, server:send(2, "to two"))
    assert.are.equal('from 0: "to two"', helper.line(c[2]))
    assert.are.equal(2, server:broadcast({ "all" }))
    assert.are.equal("from 0: " .. one_line({ "all" }), helper.line(c[1]))
    assert.are.equal("from 0: " .. one_line({ "all" }), helper.line(c[2]))
  end)

  it("copies values exactly: integers vs floats, binary strings, nested tables", function()
    local c = start(2)
    local bytes = {}
    for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
    local values = {
      3, 3.0, -0.5, math.maxinteger, math.mininteger, 1 / 0, true, false, "",
      table.concat(bytes), "a\0b\r\n\255",
      {}, { 1, 2.0, "three", { deep = { deeper = { deepest = { "x\0y" } } } } },
      { [1] = "one", [1.5] = "float key", [true] = "bool key", [""] = 0, nested = { {}, { {} } } },
    }
    for _, v in ipairs(values) do
      assert.are.equal(true, server:send(1, v))
      assert.are.equal("from 0: " .. one_line(v), helper.line(c[1]))
    end
    assert.are.equal(true, server:send(1, nil))
    assert.are.equal("from 0: nil", helper.line(c[1]))
    assert.are.equal(true, server:send(1))                  -- a missing value is nil
    assert.are.equal("from 0: nil", helper.line(c[1]))
    -- and from one worker to another
    assert.are.equal("ok true nil",
      ask(c[1], [[send 2 { 3, 3.0, "a\0b\255", { deep = { deeper = { true } } } }]]))
    assert.are.equal("from 1: " .. one_line({ 3, 3.0, "a\0b\255", { deep = { deeper = { true } } } }),
                     helper.line(c[2]))
  end)

  it("keeps the order per sender-receiver pair (1000 messages from each of two senders)", function()
    local c = start(2)
    assert.are.equal("sent 1000", ask(c[1], "burst 2 1000"))
    for i = 1, 1000 do assert(server:send(2, i)) end
    local next_of = { ["1"] = 1, ["0"] = 1 }
    for _ = 1, 2000 do
      local from, i = helper.line(c[2]):match("^from (%d): i(%d+)$")
      assert.are.equal(next_of[from], tonumber(i))
      next_of[from] = next_of[from] + 1
    end
    assert.are.same({ ["1"] = 1001, ["0"] = 1001 }, next_of)
  end)

  it("raises at a worker sender, naming what cannot be copied", function()
    local c = start(2)
    local cases = {
      { "send 2 { cb = print }", "err worker.send: value.cb: cannot copy a function" },
      { "send 2 io.stdout", "err worker.send: value: cannot copy a userdata" },
      { "send 2 { list = { 1, coroutine.create(print) } }",
        "err worker.send: value.list[2]: cannot copy a thread" },
      { "send 2 (function() local t = { a = {} } t.a.back = t return t end)()",
        "err worker.send: value.a.back: cannot copy a table that contains itself (a cycle)" },
      { "send 2 { [print] = 1 }", "err worker.send: value[function]: cannot copy a function used as a table key" },
      { "broadcast { ['odd key'] = { f = print } }",
        "err worker.broadcast: value[\"odd key\"].f: cannot copy a function" },
    }
    for _, case in ipairs(cases) do
      assert.are.equal(case[2], ask(c[1], case[1]))
    end
    -- nothing was sent: the next message worker 2 sees is this one
    assert.are.equal("ok true nil", ask(c[1], "send 2 'after'"))
    assert.are.equal('from 1: "after"', helper.line(c[2]))
  end)

  it("raises at the main state, naming what cannot be copied", function()
    start(2)
    local t = { a = {} }
    t.a.back = t
    assert.are.equal("multiloop.server: send: value.cb: cannot copy a function",
                     error_of(function() server:send(1, { cb = print }) end))
    assert.are.equal("multiloop.server: send: value: cannot copy a userdata",
                     error_of(function() server:send(1, io.stdout) end))
    assert.are.equal("multiloop.server: send: value[1]: cannot copy a thread",
                     error_of(function() server:send(2, { coroutine.create(print) }) end))
    assert.are.equal("multiloop.server: send: value.a.back: cannot copy a table that contains itself (a cycle)",
                     error_of(function() server:send(1, t) end))
    assert.are.equal("multiloop.server: broadcast: value.f: cannot copy a function",
                     error_of(function() server:broadcast({ f = print }) end))
    -- the error points at the caller's line
    local ok, err = pcall(function() local r = server:send(1, print); return r end)
    assert.is_false(ok)
    assert.matches("message_spec%.lua:%d+: multiloop%.server: send: value: cannot copy a function", err)
  end)

  it("raises on an id out of range, naming it", function()
    local c = start(2)
    for _, case in ipairs {
      { "send 3 1", "err worker.send: id must be a worker id from 1 to 2 (got 3)" },
      { "send 0 1", "err worker.send: id must be a worker id from 1 to 2 (got 0)" },
      { "send 1.5 1", "err worker.send: id must be a worker id from 1 to 2 (got 1.5)" },
      { "send 'x' 1", "err worker.send: id must be a worker id from 1 to 2 (got x)" },
      { "send nil 1", "err worker.send: id must be a worker id from 1 to 2 (got nil)" },
    } do
      assert.are.equal(case[2], ask(c[1], case[1]))
    end
    assert.are.equal("multiloop.server: send: id must be a worker id from 1 to 2 (got 3)",
                     error_of(function() server:send(3, 1) end))
    assert.are.equal("multiloop.server: send: id must be a worker id from 1 to 2 (got 0)",
                     error_of(function() server:send(0, 1) end))
    assert.are.equal("multiloop.server: send: id must be a worker id from 1 to 2 (got 1)",
                     error_of(function() server:send("1", 1) end))
    assert.are.equal(true, server:send(2.0, "a float id with an integral value will do"))
  end)

  it("raises 'not running' when the server is not running", function()
    local s = multiloop.server{ port = 0, workers = 1, handler = "spec.fixtures.messenger" }
    assert.are.equal("multiloop.server: send: not running", error_of(function() s:send(1, 1) end))
    assert.are.equal("multiloop.server: broadcast: not running",
                     error_of(function() s:broadcast(1) end))
    s:start()
    assert.are.equal(true, s:send(1, 1))
    s:stop()
    assert.are.equal("multiloop.server: send: not running", error_of(function() s:send(1, 1) end))
    assert.are.equal("multiloop.server: send must be called as server:send()",
                     error_of(function() s.send(1, 1) end))
  end)

  it("returns false, 'stopped' when the receiver has stopped", function()
    local record = multiloop.shared("spec.messages")        -- kept alive by this state
    record:flush()
    server, port = helper.server{ workers = 2, handler = "spec.fixtures.messenger" }
    local c = helper.connect(port)                          -- round robin: worker 1
    helper.defer(function() c:close() end)
    assert.are.equal("worker 1", helper.line(c))
    -- Worker 2 has no client: it stops at once. Worker 1 waits 100 ms, then
    -- sends to worker 2 and records what send returned.
    server:stop{ timeout = 3000 }
    server = nil
    assert.are.equal("false stopped", record:get("late 1"))
    assert.is_nil(record:get("late 2"))
    assert.are.equal("", helper.all(c))
  end)

  it("returns false, 'not started' for a send from init(), before the worker's inbox is up", function()
    local c = start(1)
    assert.are.equal("early false not started", ask(c[1], "early"))
  end)

  it("a raising message hook is reported and the worker goes on", function()
    local c = start(1)
    assert(server:send(1, "raise"))
    assert(server:send(1, "after"))
    assert.are.equal('from 0: "after"', helper.line(c[1]))
  end)

  it("a handler without a message hook drops messages and goes on", function()
    server, port = helper.server{ workers = 1, handler = "spec.fixtures.whoami" }
    assert.are.equal(true, server:send(1, { 1, 2, 3 }))
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    assert.are.equal("worker 1 of 1", helper.line(c))
    assert.are.equal("x\n", helper.echo(c, "x\n"))
  end)

  describe("inbox_limit", function()
    local inbox = require("spec.fixtures.inbox")
    local sequenced = inbox.sequenced
    local LIMIT = 64 * 1024
    local d = multiloop.shared("spec.inbox")               -- kept alive by this state

    local function start_inbox(n, limit, opts)
      d:flush()
      opts = opts or {}
      opts.workers, opts.handler = n, "spec.fixtures.inbox"
      opts.inbox_limit, opts.config = limit or LIMIT, { dict = "spec.inbox" }
      server, port = helper.server(opts)
    end

    -- Keeps worker `id` inside its message hook until release(id).
    local function hold(id, ms)
      d:set("hold " .. id, true)
      helper.defer(function() d:delete("hold " .. id) end)
      assert.are.equal(true, server:send(id, { hold = true, ms = ms }))
      assert(helper.eventually(function() return d:get("held " .. id) end),
             "worker " .. id .. " never started holding")
    end

    local function release(id)
      d:delete("hold " .. id)
      assert(helper.eventually(function() return not d:get("held " .. id) end),
             "worker " .. id .. " never stopped holding")
    end

    -- Sends sequenced 1 KB strings first, first + 1, ... from the main state
    -- to worker `id` until one is refused; returns how many were taken and
    -- what the refused send returned. Bounded: never more than twice the limit.
    local function fill(id, first)
      for i = first, first + 2 * LIMIT // 1024 do
        local r = table.pack(server:send(id, sequenced(i)))
        if r[1] ~= true then return i - first, r end
      end
      error("worker " .. id .. " took " .. 2 * LIMIT // 1024 .. " KB over a limit of "
            .. LIMIT // 1024 .. " KB: the inbox is not bounded")
    end

    -- About limit / message size: at most what the bytes alone allow, at
    -- least what they allow with a generous 160-byte header each (minus the
    -- hold message, which also counts).
    local function about_limit(n)
      assert(n <= LIMIT // 1024 and n >= LIMIT // (1024 + 160) - 1,
             ("%d messages of 1 KB were taken under a limit of %d bytes"):format(n, LIMIT))
    end

    local function delivered(key, n)
      assert(helper.eventually(function() return d:get(key) == n end, 5000),
             ("%s: %s of %d messages delivered"):format(key, tostring(d:get(key)), n))
      assert.is_nil(d:get("bad"))
    end

    it("server:send returns false, 'full' past the limit, then delivers each message once", function()
      start_inbox(1)
      hold(1)
      local n, refused = fill(1, 1)
      assert.are.same({ n = 2, false, "full" }, refused)
      about_limit(n)
      -- still full while the worker is busy; nothing was taken
      assert.are.same({ n = 2, false, "full" }, table.pack(server:send(1, sequenced(n + 1))))
      release(1)
      delivered("got 1 0", n)
      assert.are.equal(true, server:send(1, sequenced(n + 1)))   -- sends succeed again
      delivered("got 1 0", n + 1)
    end)

    it("worker.send returns false, 'full' past the limit, then delivers each message once", function()
      start_inbox(2)
      hold(1)
      assert(server:send(2, { flood = 1, first = 1, max = 2 * LIMIT // 1024, tag = "a" }))
      assert(helper.eventually(function() return d:get("a r") end, 5000), "worker 2 never finished")
      assert.are.equal("false full 2", d:get("a r"))
      local n = d:get("a n")
      about_limit(n)
      release(1)
      delivered("got 1 2", n)
      assert(server:send(2, { flood = 1, first = n + 1, max = 10, tag = "b" }))
      assert(helper.eventually(function() return d:get("b r") end, 5000), "worker 2 never finished")
      assert.are.equal("none", d:get("b r"))
      assert.are.equal(10, d:get("b n"))
      delivered("got 1 2", n + 10)
    end)

    it("broadcast counts only the workers that took it", function()
      start_inbox(3)
      hold(1)
      local n = fill(1, 1)
      local big = { count = "b", pad = ("x"):rep(2048) }       -- more than the room left
      assert.are.equal(2, server:broadcast(big))
      -- from worker 2 to workers 1 (full) and 3
      assert(server:send(2, { broadcast = { count = "w", pad = big.pad }, tag = "wb" }))
      assert(helper.eventually(function() return d:get("wb") end), "worker 2 never broadcast")
      assert.are.equal(1, d:get("wb"))
      release(1)
      delivered("got 1 0", n)
      delivered("b 2", 1)
      delivered("b 3", 1)
      delivered("w 3", 1)
      assert.is_nil(d:get("b 1"))
      assert.is_nil(d:get("w 1"))
      assert.are.equal(3, server:broadcast(big))                -- room again everywhere
      delivered("b 1", 1)
    end)

    it("refuses a message larger than the whole limit, and takes smaller ones", function()
      start_inbox(1, 4096)
      assert.are.same({ n = 2, false, "full" }, table.pack(server:send(1, ("x"):rep(4096))))
      assert.are.equal(true, server:send(1, { count = "small" }))
      delivered("small 1", 1)
    end)

    it("never refuses a connection handed off through a full inbox (dispatch queue)", function()
      start_inbox(1, 4096, { dispatch = "queue" })
      hold(1)
      fill(1, 1)
      local clients = {}
      for i = 1, 20 do
        clients[i] = helper.connect(port)
        helper.defer(function() clients[i]:close() end)
      end
      assert(helper.eventually(function() return server:stats().handed_off == 20 end),
             "the acceptor did not hand off 20 connections")
      release(1)
      for i = 1, 20 do
        assert.are.equal("worker 1", helper.line(clients[i]))
        assert.are.equal("ping\n", helper.echo(clients[i], "ping\n"))
      end
    end)

    it("a stop reaches a worker whose inbox is full, at once or gracefully", function()
      for _, graceful in ipairs { false, true } do
        start_inbox(2)
        hold(1, 1000)               -- the spec cannot release it while stop() waits
        hold(2, 1000)
        fill(1, 1)
        fill(2, 1)
        if graceful then server:stop{ timeout = 2000 } else server:stop() end
        server = nil
        assert.is_nil(d:get("bad"))
      end
    end)

    it("raises on a bad inbox_limit, naming the option", function()
      for _, case in ipairs { { 0, "0" }, { -1, "-1" }, { 1.5, "1.5" }, { 2 ^ 31, "2147483648" },
                              { math.maxinteger, tostring(math.maxinteger) }, { "64", "'64'" },
                              { true, "true" } } do
        local v, shown = case[1], case[2]
        assert.are.equal(("multiloop.server: option 'inbox_limit' must be an integer from 1 "
                           .. "to 2147483647 (got %s)"):format(shown),
                         error_of(function()
                           multiloop.server{ port = 0, handler = "spec.fixtures.inbox",
                                             inbox_limit = v }
                         end))
      end
      -- the core checks the bound too
      local core = require("multiloop.core")
      local opts = { workers = 1, port = 0, backlog = 16, max_connections = 0,
                     idle_timeout = 0, write_high_water = 1024, write_low_water = 0,
                     keepalive_seconds = 0, handler_kind = "module", host = "127.0.0.1",
                     handler = "spec.fixtures.inbox", package_path = package.path,
                     package_cpath = package.cpath }
      for _, v in ipairs { 0, 2 ^ 31, math.maxinteger } do
        opts.inbox_limit = math.tointeger(v)
        assert.are.equal(("option 'inbox_limit' must be an integer from 1 to 2147483647 (got %d)")
                           :format(opts.inbox_limit), error_of(function() core.new(opts) end))
      end
    end)
  end)

  it("frees messages still queued at stop", function()
    server, port = helper.server{ workers = 2, handler = "spec.fixtures.messenger" }
    for i = 1, 5000 do server:send(i % 2 + 1, { i, "some bytes to free" }) end
    server:stop()                   -- make asan: no leak
    server = nil
  end)
end)
