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

  it("frees messages still queued at stop", function()
    server, port = helper.server{ workers = 2, handler = "spec.fixtures.messenger" }
    for i = 1, 5000 do server:send(i % 2 + 1, { i, "some bytes to free" }) end
    server:stop()                   -- make asan: no leak
    server = nil
  end)
end)
