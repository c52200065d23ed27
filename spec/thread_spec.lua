-- Light threads: worker.spawn, worker.wait, worker.sleep, worker.kill; the
-- "cannot yield here" errors; errors in a thread; stop with sleeping threads;
-- server:stats().threads back to 0 (no coroutine leaked). Handlers run in the
-- workers, so each result travels back over the connection or through the
-- shared dictionary "spec.threads".
local helper = require("spec.helper")
local multiloop = require("multiloop")
local socket = require("socket")

local d = multiloop.shared("spec.threads")

describe("light threads", function()
  local server, port
  after_each(function()
    if server then
      assert(server:stop())
      assert.are.equal(0, server:stats().threads)
    end
    server = nil
  end)

  local function serve(handler, opts)
    local c
    server, port, c = helper.serve_client(handler, opts)
    return c
  end

  it("spawn runs fn at once until it first yields, and wait returns true and its results", function()
    local c = serve(function(conn)
      local w, order = conn.worker, {}
      local t = w.spawn(function(a, b)
        order[#order + 1] = "ran " .. a .. b
        w.sleep(10)
        order[#order + 1] = "woke"
        return a + b, "x", nil
      end, 1, 2)
      order[#order + 1] = "spawned " .. tostring(t)
      w.spawn(function()
        local r = table.pack(w.wait(t))
        order[#order + 1] = ("wait %d %s %s %s %s"):format(r.n, tostring(r[1]), tostring(r[2]),
                                                         tostring(r[3]), tostring(r[4]))
        order[#order + 1] = tostring(t)
        conn:write(table.concat(order, "\n") .. "\n")
      end)
    end)
    assert.are.equal("ran 12", helper.line(c))
    assert.are.equal("spawned multiloop.thread (worker 1, suspended)", helper.line(c))
    assert.are.equal("woke", helper.line(c))
    assert.are.equal("wait 4 true 3 x nil", helper.line(c))
    assert.are.equal("multiloop.thread (worker 1, dead)", helper.line(c))
  end)

  it("wait on a thread that already ended returns at once, every time, even outside a thread", function()
    local c = serve(function(conn)
      local w = conn.worker
      local t = w.spawn(function() return "done" end)
      local e = w.spawn(function() error({ code = 7 }) end)
      local ok1, v1 = w.wait(t)
      local ok2, v2 = w.wait(t)
      local ok3, err = w.wait(e)
      conn:write(("%s %s %s %s %s %s\n"):format(tostring(ok1), v1, tostring(ok2), v2,
                                                tostring(ok3), tostring(err.code)))
    end)
    assert.are.equal("true done true done false 7", helper.line(c))
  end)

  it("a thread that raises gives its waiters false, err; the worker goes on", function()
    local c = serve("spec.fixtures.threads")
    assert(c:send("fail\n"))
    assert.matches("^wait false [^\n]*threads%.lua:%d+: thread failure$", helper.line(c))
    local c2 = helper.connect(port)
    helper.defer(function() c2:close() end)
    assert(c2:send("fail\n"))
    assert.matches("^wait false .*thread failure$", helper.line(c2))
  end)

  it("sleep(ms) wakes threads in order of their deadlines and returns true; sleep(0) yields once", function()
    local c = serve(function(conn)
      local w, order, t0 = conn.worker, {}, conn.worker.now()
      local done = 0
      for _, ms in ipairs { 60, 20, 40 } do
        w.spawn(function()
          local r = w.sleep(ms)
          order[#order + 1] = ("%d:%s:%s"):format(ms, tostring(r), tostring(w.now() - t0 >= ms))
          done = done + 1
          if done == 3 then conn:write(table.concat(order, " ") .. "\n") end
        end)
      end
      local seq = {}
      w.spawn(function() seq[#seq + 1] = "a1"; w.sleep(0); seq[#seq + 1] = "a2" end)
      w.spawn(function()
        seq[#seq + 1] = "b1"; w.sleep(0); seq[#seq + 1] = "b2"; w.sleep(0)
        conn:write(table.concat(seq, " ") .. "\n")
      end)
      seq[#seq + 1] = "main"
    end)
    assert.are.equal("a1 b1 main a2 b2", helper.line(c))
    assert.are.equal("20:true:true 40:true:true 60:true:true", helper.line(c))
  end)

  it("kill ends a suspended thread (its to-be-closed variables run); waiters get false, 'killed'", function()
    local c = serve(function(conn)
      local w, out = conn.worker, {}
      local t = w.spawn(function()
        local _ <close> = setmetatable({}, { __close = function() out[#out + 1] = "closed" end })
        w.sleep(10000)
        out[#out + 1] = "never"
      end)
      w.spawn(function()
        local ok, err = w.wait(t)
        out[#out + 1] = ("wait %s %s"):format(tostring(ok), tostring(err))
        local me = w.spawn(function() end)
        out[#out + 1] = ("dead %s %s"):format(tostring(select(1, w.kill(me))), select(2, w.kill(me)))
        conn:write(table.concat(out, " ") .. "\n")
      end)
      w.spawn(function()
        local killed = w.kill(t)                     -- runs t's __close first
        out[#out + 1] = "kill " .. tostring(killed)
      end)
    end)
    assert.are.equal("closed kill true wait false killed dead nil dead", helper.line(c))
  end)

  it("a light thread closed by hand with coroutine.close ends, and is no longer counted", function()
    local c = serve(function(conn)
      local w, holder = conn.worker, {}
      local t = w.spawn(function()
        holder.co = coroutine.running()
        w.sleep(30)
      end)
      local closed = coroutine.close(holder.co)
      w.spawn(function()
        local ok = w.wait(t)
        conn:write(("%s %s %s\n"):format(tostring(closed), tostring(ok), tostring(t)))
      end)
    end)
    assert.are.equal("true false multiloop.thread (worker 1, dead)", helper.line(c))
    assert(helper.eventually(function() return server:stats().threads == 0 end))
  end)

  it("a timer callback runs as a light thread, so it may sleep", function()
    local c = serve(function(conn)
      local w = conn.worker
      w.timer(5, function(t)
        local t0 = w.now()
        local r = w.sleep(20)
        conn:write(("%s %s %s\n"):format(tostring(r), tostring(w.now() - t0 >= 20), tostring(t)))
      end)
    end)
    assert.are.equal("true true multiloop.timer (once 5 ms, worker 1, stopped)", helper.line(c))
  end)

  it("sleep and wait raise 'cannot yield here' where no light thread can yield", function()
    local c = serve(function(conn)
      local w = conn.worker
      local _, main = pcall(w.sleep, 1)              -- connect: the worker's main thread
      local _, mainwait = pcall(w.wait, w.spawn(function() w.sleep(1) end))
      conn:on_data(function()
        local _, ondata = pcall(w.sleep, 1)
        local t = w.spawn(function()
          local _, sorted = pcall(table.sort, { 3, 1, 2 }, function(a, b) w.sleep(1) return a < b end)
          local _, inner = coroutine.resume(coroutine.create(function() return select(2, pcall(w.sleep, 1)) end))
          conn:write(table.concat({ main, mainwait, ondata, sorted, inner }, "\n") .. "\n")
        end)
        assert(t)
      end)
    end)
    assert(c:send("go\n"))
    local nolight = "cannot yield here (not in a light thread: use worker.spawn)"
    assert.are.equal("worker.sleep: " .. nolight, helper.line(c):match("worker%.sleep: .*"))
    assert.are.equal("worker.wait: " .. nolight, helper.line(c):match("worker%.wait: .*"))
    assert.are.equal("worker.sleep: " .. nolight, helper.line(c):match("worker%.sleep: .*"))
    assert.are.equal("worker.sleep: cannot yield here (across a C-call boundary: use worker.spawn)",
                     helper.line(c):match("worker%.sleep: .*"))
    assert.are.equal("worker.sleep: " .. nolight, helper.line(c):match("worker%.sleep: .*"))
  end)

  it("raises 'cannot yield here' in init; a thread spawned in init outlives it", function()
    d:delete("init")
    d:delete("init thread")
    serve("spec.fixtures.threads")
    assert.matches("^false [^\n]*worker%.sleep: cannot yield here %(not in a light thread: use worker%.spawn%)$",
                   d:get("init"))
    assert.are.equal("ran", helper.eventually(function() return d:get("init thread") end))
  end)

  it("a failing init() does not wait for the threads it spawned: they get nil, 'stopped'", function()
    d:delete("failed init's thread")
    local s = multiloop.server{ host = "127.0.0.1", port = 0, workers = 1, config = { fail = true },
                                handler = "spec.fixtures.threads" }
    local t0 = socket.gettime()
    local ok, err = pcall(s.start, s)
    assert.is_false(ok)
    assert.matches("worker 1 failed to load the handler: [^\n]*init fails with a thread asleep", err)
    assert.is_true(socket.gettime() - t0 < 5)
    assert.are.equal("nil stopped", d:get("failed init's thread"))
    assert.are.equal(0, s:stats().threads)
  end)

  it("checks its arguments, naming them", function()
    local c = serve(function(conn)
      local w, out = conn.worker, {}
      for _, f in ipairs {
        function() w.spawn(42) end,
        function() w.wait("x") end,
        function() w.kill({}) end,
        function() w.sleep(-1) end,                    -- checked before where it runs
        function() w.sleep(1.5) end,
        function() w.sleep("soon") end,
      } do
        local _, err = pcall(f)
        out[#out + 1] = tostring(err):match("worker%..*") or tostring(err)
      end
      local t
      t = w.spawn(function() w.sleep(0); out[#out + 1] = select(2, pcall(w.wait, t)):match("worker%..*") end)
      w.spawn(function() w.sleep(0); w.sleep(0); conn:write(table.concat(out, "\n") .. "\n") end)
    end)
    assert.are.equal("worker.spawn: fn must be a function (got number)", helper.line(c))
    assert.are.equal("worker.wait: thread must be a multiloop.thread (got string)", helper.line(c))
    assert.are.equal("worker.kill: thread must be a multiloop.thread (got table)", helper.line(c))
    assert.are.equal("worker.sleep: ms must be a non-negative integer (got -1)", helper.line(c))
    assert.are.equal("worker.sleep: ms must be a non-negative integer (got 1.5)", helper.line(c))
    assert.are.equal("worker.sleep: ms must be a non-negative integer (got string)", helper.line(c))
    assert.are.equal("worker.wait: a thread cannot wait for itself", helper.line(c))
  end)

  it("runs 2,000 concurrent sleeping threads, counted in stats().threads, back to 0", function()
    local c = serve(function(conn)
      local w, done = conn.worker, 0
      for i = 1, 2000 do
        w.spawn(function()
          w.sleep(300 + i % 7)
          done = done + 1
          if done == 2000 then conn:write("all 2000\n") end
        end)
      end
    end, { workers = 2 })
    assert(helper.eventually(function()
      local s = server:stats()
      return s.threads == 2000 and (s.workers[1].threads + s.workers[2].threads) == 2000
    end))
    assert.are.equal("all 2000", helper.line(c))
    assert(helper.eventually(function() return server:stats().threads == 0 end))
  end)

  for _, timeout in ipairs { 0, 150 } do
    it(("stop (timeout %d) hands a long sleep nil, 'stopped' once, then at once"):format(timeout), function()
      d:delete("sleep 1")
      d:delete("sleep 2")
      local c = serve("spec.fixtures.threads")
      assert(c:send("sleep 60000\n"))
      assert.are.equal("sleeping", helper.line(c))
      assert(helper.eventually(function() return server:stats().threads == 1 end))  -- init's has ended
      assert(server:stop{ timeout = timeout })
      assert.are.equal(0, server:stats().threads)
      assert.are.equal("nil stopped", d:get("sleep 1"))
      assert.are.equal("nil stopped", d:get("sleep 2"))
      server = nil
    end)
  end

  it("a graceful stop lets a short sleep finish within its timeout", function()
    d:delete("sleep 1")
    d:delete("sleep 2")
    local c = serve("spec.fixtures.threads")
    assert(c:send("sleep 30\n"))
    assert.are.equal("sleeping", helper.line(c))
    local t0 = socket.gettime()
    assert(server:stop{ timeout = 5000 })
    assert.is_true(socket.gettime() - t0 < 4, "the stop waited for its whole timeout")
    assert.are.equal(0, server:stats().threads)
    assert.are.equal("true", d:get("sleep 1"))
    assert.are.equal("true", d:get("sleep 2"))
    server = nil
  end)

  it("closes threads still suspended when the loop ends; their to-be-closed variables run", function()
    d:delete("closed a")
    d:delete("closed b")
    local c = serve("spec.fixtures.threads")
    assert(c:send("deadlock\n"))
    assert.are.equal("deadlocked", helper.line(c))
    assert(helper.eventually(function() return server:stats().threads == 2 end))
    assert(server:stop())
    assert.are.equal(0, server:stats().threads)
    assert.are.equal("yes", d:get("closed a"))
    assert.are.equal("yes", d:get("closed b"))
    server = nil
  end)

  it("reports an error in a thread on stderr, naming the worker and 'thread' #child", function()
    local child = helper.spawn("spec.fixtures.threads 1")
    helper.defer(child.kill)
    local c = helper.connect(child.port)
    helper.defer(function() c:close() end)
    assert(c:send("fail\n"))
    assert.matches("^wait false", helper.line(c))
    local log = helper.eventually(function()
      local s = child.stderr()
      return s:find("stack traceback", 1, true) and s
    end)
    assert.matches("%d%d:%d%d:%d%d%.%d%d%dZ error worker 1: thread: [^\n]*threads%.lua:%d+: thread failure\n\tstack traceback:\n", log)
    assert.matches("threads%.lua:%d+: in function <[^\n]*threads%.lua:%d+>", log)
    c:close()
    local out, code = child.stop()
    assert.are.equal("stopped on SIGTERM\n", out)
    assert.are.equal(0, code)
  end)
end)
