-- The three handler forms, init(worker), config copying, the conn object,
-- and callback errors that close only their own connection.
local helper = require("spec.helper")
local dump = require("spec.fixtures.dump")

describe("handler forms", function()
  local server, port
  after_each(function() if server then server:stop() end end)

  it("loads a module name in every worker", function()
    server, port = helper.server{ workers = 2, handler = "spec.fixtures.whoami" }
    for id = 1, 2 do
      local c = helper.connect(port)
      assert.are.equal(("worker %d of 2"):format(id), helper.line(c))
      c:close()
    end
  end)

  it("loads a path to a .lua file", function()
    server, port = helper.server{ workers = 1, handler = "spec/fixtures/whoami.lua" }
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    assert.are.equal("worker 1 of 1", helper.line(c))
    assert.are.equal("x\n", helper.echo(c, "x\n"))
  end)

  it("loads a function with no upvalues (globals are the worker's own)", function()
    server, port = helper.server{ workers = 2, handler = function(conn)
      conn:write(("%s id=%d worker=%d\n"):format(type(string), conn.id, conn.worker.id))
      conn:on_data(function(data) conn:write(data:upper()) end)
    end }
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    local line = helper.line(c)
    assert.matches("^table id=%d+ worker=1$", line)
    assert.are.equal("ABC", helper.echo(c, "abc"))
  end)
end)

describe("config", function()
  local server, port
  after_each(function() if server then server:stop() end end)

  local function received(config, workers)
    server, port = helper.server{ workers = workers or 1, config = config,
                                  handler = "spec.fixtures.config_dump" }
    local c = helper.connect(port)
    local n = tonumber(helper.line(c))
    local text = c:receive(n)
    c:close()
    return text
  end

  it("reaches every worker intact: nesting, binary strings, integers vs floats", function()
    local config = {
      greeting = "hi", n = 3, f = 3.0, big = math.maxinteger, neg = -0.5,
      yes = true, no = false, bin = "a\0b\r\n\255",
      list = { 1, 2, { deep = { deeper = { "x" } } } },
      [10] = "ten", [2.5] = "float key", [true] = "bool key",
    }
    assert.are.equal(dump(config), received(config, 1))
    server:stop()
    assert.are.equal(dump(config), received(config, 2))
  end)

  it("may be a plain value, or absent", function()
    assert.are.equal("\"just a string\"", received("just a string"))
    server:stop()
    assert.are.equal("nil", received(nil))
  end)

  it("copies a table reached twice as two copies (no cycle)", function()
    local shared = { 1 }
    assert.are.equal(dump({ a = { 1 }, b = { 1 } }), received({ a = shared, b = shared }))
  end)
end)

describe("the conn object", function()
  local server, port
  after_each(function() if server then server:stop() end end)

  it("has a server-wide unique id, its worker, peer() and address()", function()
    server, port = helper.server{ workers = 2, handler = function(conn)
      local pip, pport = conn:peer()
      local lip, lport = conn:address()
      conn:write(("%d %d %s %d %s %d %s\n"):format(conn.id, conn.worker.id, pip, pport,
                                                   lip, lport, tostring(conn)))
      conn:close()
    end }
    local ids = {}
    for i = 1, 4 do
      local c = helper.connect(port)
      local _, myport = c:getsockname()
      local id, wid, pip, pport, lip, lport, str =
        helper.line(c):match("^(%d+) (%d+) (%S+) (%d+) (%S+) (%d+) (.*)$")
      c:close()
      assert.are.equal(tostring((i - 1) % 2 + 1), wid)
      assert.are.equal("127.0.0.1", pip)
      assert.are.equal(tonumber(myport), tonumber(pport))
      assert.are.equal("127.0.0.1", lip)
      assert.are.equal(port, tonumber(lport))
      assert.are.equal(("multiloop.conn %s (worker %s)"):format(id, wid), str)
      assert.is_nil(ids[id])
      ids[id] = true
    end
  end)

  it("passes itself to every callback, last, so one function can serve every connection", function()
    server, port = helper.server{ workers = 1, write_high_water = 16384,
                                  handler = "spec.fixtures.shared_callbacks" }
    local log = require("multiloop").shared("spec.callbacks")
    log:flush()
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    assert(c:send("write\n"))
    assert.are.equal("written", helper.line(c))
    assert.are.equal("flushed", helper.line(c))
    assert(c:send("timeout\n"))
    assert.are.equal("timed out", helper.line(c))
    assert(c:send("big\n"))
    local line = helper.line(c)
    assert.is_true(#line > 0 and #line % (1024 * 1024) == 0, "whole MiB pieces")
    assert.are.equal(("x"):rep(#line), line)
    assert.is_true(log:get("big queued"))
    assert.are.equal("drained", helper.line(c))
    assert(c:shutdown("send"))
    assert.are.equal("", helper.all(c))
    assert.is_truthy(helper.eventually(function() return log:get("on_close") end))
    assert.are.same({
      ["on_data"] = "2 conn",                -- (data, conn)
      ["write callback"] = "2 conn",         -- (err, conn)
      ["on_timeout"] = "1 conn",             -- (conn)
      ["on_drain"] = "1 conn",
      ["on_end"] = "1 conn",
      ["on_close"] = "2 conn",               -- (err, conn)
    }, {
      ["on_data"] = log:get("on_data"), ["write callback"] = log:get("write callback"),
      ["on_timeout"] = log:get("on_timeout"), ["on_drain"] = log:get("on_drain"),
      ["on_end"] = log:get("on_end"), ["on_close"] = log:get("on_close"),
    })
  end)

  it("with on_end, stays half-open: the handler answers after the peer's EOF", function()
    server, port = helper.server{ workers = 1, handler = function(conn)
      local got = {}
      conn:on_data(function(data) got[#got + 1] = data end)
      conn:on_end(function()
        conn:write("you sent " .. #table.concat(got) .. " bytes\n")
        conn:shutdown()
      end)
    end }
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    assert(c:send(string.rep("z", 100000)))
    assert(c:shutdown("send"))
    assert.are.equal("you sent 100000 bytes\n", helper.all(c))
  end)

  it("close() after a large write still delivers every byte, then closes", function()
    server, port = helper.server{ workers = 1, handler = function(conn)
      conn:write(string.rep("0123456789", 2 * 1024 * 1024))    -- 20 MB, mostly queued
      conn:close()
    end }
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    local all = helper.all(c)
    assert.are.equal(20 * 1024 * 1024, #all)
    assert.are.equal(string.rep("0123456789", 2 * 1024 * 1024), all)
  end)

  it("on a closed connection: write returns nil, 'closed'; close and shutdown are no-ops", function()
    server, port = helper.server{ workers = 1, handler = function(conn)
      conn:on_close(function(err)
        local w1, e1 = conn:write("late")
        conn:close(); conn:shutdown()
        local ip, e2 = conn:peer()
        _G.REPORT = ("%s %s %s %s %s %s"):format(tostring(err), tostring(w1), e1,
                                                  tostring(ip), e2, tostring(conn))
      end)
      conn:on_data(function(data)
        if data == "report\n" then conn:write(tostring(_G.REPORT) .. "\n") end
      end)
    end }
    local c1 = helper.connect(port)
    c1:close()
    local c2 = helper.connect(port)
    helper.defer(function() c2:close() end)
    local line = helper.eventually(function()
      assert(c2:send("report\n"))
      local l = helper.line(c2)
      return l ~= "nil" and l
    end)
    assert.matches("^nil nil closed nil closed multiloop%.conn %d+ %(worker 1, closed%)$", line)
  end)

  it("raises naming the argument when a method gets the wrong type", function()
    server, port = helper.server{ workers = 1, handler = function(conn)
      local results = {}
      for _, call in ipairs {
        function() conn:write({}) end,
        function() conn:on_data(42) end,
        function() conn.write(nil, "x") end,
      } do
        local ok, err = pcall(call)
        results[#results + 1] = ok and "no error" or err:gsub("^.-:%d+: ", "")
      end
      conn:write(table.concat(results, "|") .. "\n")
      conn:close()
    end }
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    assert.are.equal(
      "bad argument #1 to 'write' (string expected, got table)"
      .. "|bad argument #1 to 'on_data' (function or nil expected, got number)"
      .. "|bad argument #1 to 'write' (multiloop.conn expected, got nil)",
      helper.line(c))
  end)
end)

describe("a Lua error in a callback", function()
  local server, port
  after_each(function() if server then server:stop() end end)

  it("closes only its connection; the worker serves the next client", function()
    server, port = helper.server{ workers = 1, handler = "spec.fixtures.faulty" }
    local good = helper.connect(port)
    helper.defer(function() good:close() end)
    assert.are.equal("before\n", helper.echo(good, "before\n"))
    local bad = helper.connect(port)
    assert(bad:send("boom\n"))
    assert.are.equal("", helper.all(bad))   -- closed without an answer
    bad:close()
    assert.are.equal("after\n", helper.echo(good, "after\n"))
    local next = helper.connect(port)
    helper.defer(function() next:close() end)
    assert.are.equal("next\n", helper.echo(next, "next\n"))
  end)

  it("in connect closes that connection at once, and on_close sees 'error'", function()
    server, port = helper.server{ workers = 1, handler = function(conn)
      if conn.id % 2 == 1 then
        conn:on_close(function(err) _G.LAST_REASON = err end)
        error("connect refuses odd connections")
      end
      conn:write(("last reason %s\n"):format(tostring(_G.LAST_REASON)))
    end }
    local odd = helper.connect(port)
    assert.are.equal("", helper.all(odd))
    odd:close()
    local even = helper.connect(port)
    helper.defer(function() even:close() end)
    assert.are.equal("last reason error", helper.line(even))
  end)

  it("is logged on stderr with the worker, the connection and a traceback #child", function()
    local child = helper.spawn("spec.fixtures.faulty 1")
    helper.defer(child.kill)
    local c = helper.connect(child.port)
    assert(c:send("boom\n"))
    helper.all(c)
    c:close()
    local log = helper.eventually(function()
      local s = child.stderr()
      return s:find("stack traceback", 1, true) and s
    end)
    assert.matches("\n?[%d%-]+T%d%d:%d%d:%d%d%.%d%d%dZ error worker 1 conn 1: on_data: [^\n]*faulty%.lua:%d+: boom from the handler\n", log)
    assert.matches("\n\tstack traceback:\n", log)
    local out, code = child.stop()
    assert.are.equal("stopped on SIGTERM\n", out)
    assert.are.equal(0, code)
  end)
end)

describe("the worker object", function()
  local server
  after_each(function() if server then server:stop() end server = nil end)

  it("is built by lua/multiloop/worker.lua; timer, every, now, send, broadcast and the light thread functions stay C functions", function()
    local port
    server, port = helper.server{ workers = 1, config = {}, handler = "spec.fixtures.worker_object" }
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    assert.are.equal("broadcast config connect count every exiting id kill log now resolve send sleep spawn tcp time timer wait",
                     helper.line(c))
    assert.are.equal("now=C send=C broadcast=C timer=C every=C spawn=C wait=C sleep=C kill=C",
                     helper.line(c))
    assert.are.equal("true", helper.line(c))
  end)

  it("start fails naming multiloop.worker when the worker's package.path lacks it", function()
    local multiloop = require("multiloop")
    local threads = helper.thread_count()
    local saved = package.path
    package.path = "/nonexistent/?.lua"              -- copied into the workers here
    local made, s = pcall(multiloop.server, { host = "127.0.0.1", port = 0, workers = 1,
                                              handler = function(conn) conn:close() end })
    package.path = saved
    assert(made, s)
    local ok, err = pcall(s.start, s)
    assert.is_false(ok)
    assert.are.equal("multiloop.server: start: worker 1 failed to load the handler: cannot find "
      .. "multiloop.worker (lua/multiloop/worker.lua, installed with the module) in the worker's "
      .. "package.path:\n\tno file '/nonexistent/multiloop/worker.lua'", err)
    assert.are.equal(threads, helper.thread_count())
  end)
end)
