-- Timers in worker states: worker.timer (once), worker.every (repeating),
-- timer:stop(), worker.now(); a timer callback that raises stops only that
-- timer; timers still pending when the server stops are cancelled and freed
-- (make asan checks the freeing). Handlers run in the workers, so each
-- result travels back over the connection.
local helper = require("spec.helper")
local multiloop = require("multiloop")
local socket = require("socket")

describe("worker timers", function()
  local server, port
  after_each(function()
    if server then server:stop() end
    server = nil
  end)

  local function serve(handler, opts)
    local c
    server, port, c = helper.serve_client(handler, opts)
    return c
  end

  it("timer(ms, fn) fires once, after ms, with the timer object", function()
    local c = serve(function(conn)
      local w = conn.worker
      local t0, calls, t = w.now(), 0, nil
      t = w.timer(40, function(arg)
        calls = calls + 1
        conn:write(("%s %s %d %s\n"):format(tostring(arg == t), tostring(arg:stop()),
                                            w.now() - t0, tostring(arg)))
        w.timer(60, function() conn:write(("calls %d\n"):format(calls)) end)
      end)
      conn:write(tostring(t) .. "\n")
    end)
    assert.are.equal("multiloop.timer (once 40 ms, worker 1)", helper.line(c))
    local same, stopped, elapsed, str = helper.line(c):match("^(%S+) (%S+) (%d+) (.*)$")
    assert.are.equal("true", same)              -- fn gets the timer object
    assert.are.equal("false", stopped)          -- a fired once timer is already done
    assert.is_true(tonumber(elapsed) >= 40 and tonumber(elapsed) < 2000, elapsed)
    assert.are.equal("multiloop.timer (once 40 ms, worker 1, stopped)", str)
    assert.are.equal("calls 1", helper.line(c))
  end)

  it("timer(0, fn) runs on a later turn of the loop, never inside timer()", function()
    local c = serve(function(conn)
      local order = {}
      conn.worker.timer(0, function()
        order[#order + 1] = "fired"
        conn:write(table.concat(order, " ") .. "\n")
      end)
      order[#order + 1] = "returned"
    end)
    assert.are.equal("returned fired", helper.line(c))
  end)

  it("every(ms, fn) repeats until stopped; stop() is idempotent", function()
    local c = serve(function(conn)
      local w = conn.worker
      local n, last = 0, w.now()
      local gaps = {}
      w.every(10, function(t)
        n = n + 1
        gaps[#gaps + 1] = w.now() - last
        last = w.now()
        if n == 5 then
          conn:write(("stop %s %s\n"):format(tostring(t:stop()), tostring(t:stop())))
          w.timer(100, function()
            table.sort(gaps)
            conn:write(("ticks %d, shortest gap %d, %s\n"):format(n, gaps[1], tostring(t)))
          end)
        end
      end)
      -- stopped from outside its callback, before it ever fires
      local never = w.every(10, function() conn:write("never\n") end)
      conn:write(("stopped early %s\n"):format(tostring(never:stop())))
    end)
    assert.are.equal("stopped early true", helper.line(c))
    assert.are.equal("stop true false", helper.line(c))
    local ticks, gap, str = helper.line(c):match("^ticks (%d+), shortest gap (%d+), (.*)$")
    assert.are.equal("5", ticks)                 -- no tick after stop()
    assert.is_true(tonumber(gap) >= 10, gap)
    assert.are.equal("multiloop.timer (every 10 ms, worker 1, stopped)", str)
  end)

  it("now() is the loop's time in integer ms, and advances", function()
    local c = serve(function(conn)
      local w = conn.worker
      local t0 = w.now()
      conn:write(("%s\n"):format(math.type(t0)))
      conn:on_data(function()
        conn:write(("%d\n"):format(w.now() - t0))
      end)
    end)
    assert.are.equal("integer", helper.line(c))
    helper.sleep(150)
    assert(c:send("x"))
    local waited = tonumber(helper.line(c))
    assert.is_true(waited >= 140 and waited < 3000, tostring(waited))
  end)

  it("checks its arguments, naming them", function()
    local c = serve(function(conn)
      local w = conn.worker
      local function err(f, ...)
        local ok, e = pcall(f, ...)
        return ok and "no error" or e
      end
      local f = function() end
      for _, line in ipairs {
        err(w.timer, -1, f), err(w.timer, 1.5, f), err(w.timer, "10", f), err(w.timer, nil, f),
        err(w.timer, 10), err(w.timer, 10, "f"), err(w.every, 0, f), err(w.every, -3, f),
        err(w.every, 5, {}),
      } do
        conn:write(line .. "\n")
      end
      local t = w.timer(10.0, f)        -- a float with an integral value will do
      conn:write(tostring(t:stop()) .. "\n")
      conn:write(err(t.stop, "not a timer") .. "\n")
    end)
    for _, want in ipairs {
      "worker.timer: ms must be a non-negative integer (got -1)",
      "worker.timer: ms must be a non-negative integer (got 1.5)",
      "worker.timer: ms must be a non-negative integer (got string)",
      "worker.timer: ms must be a non-negative integer (got nil)",
      "worker.timer: fn must be a function (got no value)",
      "worker.timer: fn must be a function (got string)",
      "worker.every: ms must be a positive integer (got 0)",
      "worker.every: ms must be a positive integer (got -3)",
      "worker.every: fn must be a function (got table)",
      "true",
    } do
      assert.are.equal(want, helper.line(c))
    end
    assert.matches("bad argument #1 to '?' (multiloop.timer expected, got string)",
                   helper.line(c), 1, true)
  end)

  it("an error in a timer callback stops only that timer; the worker goes on", function()
    local c = serve("spec.fixtures.timers")
    assert.are.equal("bad 3 good 10", helper.line(c))      -- the other timer kept ticking
    local c2 = helper.connect(port)                         -- and the worker still serves
    helper.defer(function() c2:close() end)
    assert.are.equal("bad 3 good 10", helper.line(c2))
  end)

  it("a timer callback runs as a light thread: it may sleep, and an error after its sleep stops only that timer", function()
    local c = serve(function(conn)
      local w = conn.worker
      local n, slept = 0, nil
      local every = w.every(5, function()
        n = n + 1
        if n == 2 then
          local t0 = w.now()
          slept = ("%s %s"):format(tostring(w.sleep(15)), tostring(w.now() - t0 >= 15))
          error("late failure")
        end
      end)
      w.timer(200, function()
        local seen = n
        w.sleep(50)
        conn:write(("%s %s %s %s\n"):format(slept, tostring(n == seen), tostring(n >= 3),
                                            tostring(every:stop())))
      end)
    end)
    -- slept, the every timer stopped (n no longer grows), it ran while one
    -- callback slept, and stop() finds it already stopped.
    assert.are.equal("true true true true false", helper.line(c))
  end)

  it("runs timers during a graceful stop; stop frees the ones still pending", function()
    local c = serve("spec.fixtures.timers")
    assert.are.equal("bad 3 good 10", helper.line(c))
    local t = socket.gettime()
    server:stop{ timeout = 3000 }    -- init's timers (60 s, 1 h) are still pending
    assert.is_true(socket.gettime() - t < 2, "stop waited for its timeout")
    assert.are.equal("timer in grace", helper.line(c))      -- the shutdown hook's timer
    assert.are.equal("", helper.all(c))
  end)

  it("stop() cancels pending timers at once, and none can start after", function()
    local record = multiloop.shared("spec.timers")           -- kept alive by this state
    record:flush()
    local c = serve("spec.fixtures.timers", { workers = 2, config = { record = true } })
    assert.are.equal("bad 3 good 10", helper.line(c))
    local t = socket.gettime()
    server:stop()
    assert.is_true(socket.gettime() - t < 1, "stop waited for pending timers")
    server = nil
    -- on_close ran while the worker was closing: worker.timer refused
    assert.are.equal("nil stopped", record:get("after close"))
  end)

  it("a timer started by a failing init() does not keep the worker alive", function()
    local s = multiloop.server{ port = 0, workers = 2, handler = "spec.fixtures.timers",
                                config = { fail = true } }
    local t = socket.gettime()
    local ok, err = pcall(s.start, s)
    assert.is_false(ok)
    assert.matches("failed to load the handler: .*init fails after starting a timer", err)
    assert.is_false(s._core:running())
    assert.is_true(socket.gettime() - t < 2)
  end)

  it("reports an error in a timer on stderr, naming the worker and 'timer' #child", function()
    local child = helper.spawn("spec.fixtures.timers 1")
    helper.defer(child.kill)
    local c = helper.connect(child.port)
    helper.defer(function() c:close() end)
    assert.are.equal("bad 3 good 10", helper.line(c))
    local log = helper.eventually(function()
      local s = child.stderr()
      return s:find("stack traceback", 1, true) and s
    end)
    assert.matches("%d%d:%d%d:%d%d%.%d%d%dZ error worker 1: timer: [^\n]*timers%.lua:%d+: timer failure 3", log)
    c:close()
    local out, code = child.stop()
    assert.are.equal("stopped on SIGTERM\n", out)
    assert.are.equal(0, code)
  end)
end)
