-- Graceful stop: stop{timeout} and run()'s first signal stop accepting at
-- once, run the handler's shutdown hook, let connections finish within the
-- timeout and close the rest at it; a second signal stops at once.
local helper = require("spec.helper")
local procsig = require("spec.fixtures.procsig")
local multiloop = require("multiloop")
local socket = require("socket")

local function refused(port)
  local c = socket.tcp()
  c:settimeout(1)
  local ok, err = c:connect("127.0.0.1", port)
  c:close()
  return not ok and err == "connection refused"
end

describe("server:stop{ timeout }", function()
  for _, dispatch in ipairs { "ipc", "queue", "reuseport" } do
    it(("closes a stuck client at the timeout, not before (%s)"):format(dispatch), function()
      local server, port = helper.server{ workers = 2, dispatch = dispatch,
                                          handler = "spec.fixtures.polite" }
      local stuck = helper.connect(port)
      helper.defer(function() stuck:close() end)
      assert.are.equal("hi\n", helper.echo(stuck, "hi\n"))
      local t = socket.gettime()
      server:stop{ timeout = 400 }
      local took = socket.gettime() - t
      assert.is_true(took >= 0.35 and took < 3, ("stop took %.3f s"):format(took))
      assert.matches("^worker %d shutting down$", helper.line(stuck))   -- the shutdown hook
      local data, err = stuck:receive(1)
      assert.is_nil(data)
      assert.are.equal("closed", err)
      assert.is_true(refused(port))
    end)
  end

  it("returns as soon as the last connection is gone", function()
    local server = helper.server{ workers = 2, handler = "examples.echo_handler" }
    local t = socket.gettime()
    server:stop{ timeout = 5000 }
    assert.is_true(socket.gettime() - t < 1)
  end)

  it("rejects a bad timeout, naming it", function()
    local server = multiloop.server{ port = 0, workers = 1, handler = "examples.echo_handler" }
    local ok, err = pcall(server.stop, server, { timeout = -5 })
    assert.is_false(ok)
    assert.matches("multiloop.server: stop: option 'timeout' must be an integer from 0 to 2147483647 (got -5)", err, 1, true)
    ok, err = pcall(server.stop, server, { grace = 5 })
    assert.is_false(ok)
    assert.matches("multiloop.server: stop: unknown option 'grace'", err, 1, true)
  end)
end)

-- A child server prints its port just before it calls run(), and only run()
-- catches the signals: one sent in between (a client answered by a worker
-- says nothing about where the main thread is) killed the child with no
-- output. So the specs wait until the child catches SIGTERM, which run()
-- starts catching right after SIGINT. (SIGINT itself tells nothing: lua.c
-- catches it while the script runs, and interrupts the script with it.)
local function spawn_running(args)
  local child = helper.spawn(args)
  helper.defer(child.kill)
  assert(helper.eventually(function() return procsig.caught(child.pid, "TERM") end, 5000),
         "the child never caught SIGTERM")
  return child
end

describe("server:run() on signals", function()
  it("lets a slow client finish within the grace period, then exits #child", function()
    local child = spawn_running("spec.fixtures.polite workers=2 timeout=3000")
    local slow = helper.connect(child.port)
    assert.are.equal("working\n", helper.echo(slow, "working\n"))
    child.signal("TERM")
    assert.matches("^worker %d shutting down$", helper.line(slow))
    assert.is_true(helper.eventually(function() return refused(child.port) end, 2000))
    -- still served during the grace period
    assert.are.equal("last words\n", helper.echo(slow, "last words\n"))
    local t = socket.gettime()
    slow:close()                           -- finishes by itself: the server exits now
    local out, code = child.wait()
    child.waited = true
    assert.is_true(socket.gettime() - t < 2, "the server waited for its full grace period")
    assert.are.equal("stopped on SIGTERM\n", out)
    assert.are.equal(0, code)
  end)

  it("stops at once on a second signal #child", function()
    local child = spawn_running("spec.fixtures.polite workers=1 timeout=60000")
    local stuck = helper.connect(child.port)
    assert.are.equal("x\n", helper.echo(stuck, "x\n"))
    child.signal("INT")
    assert.matches("shutting down", helper.line(stuck))
    local t = socket.gettime()
    child.signal("INT")
    local out, code = child.wait()
    child.waited = true
    assert.is_true(socket.gettime() - t < 3)
    assert.are.equal("stopped on SIGINT\n", out)
    assert.are.equal(0, code)
    local data, err = stuck:receive(1)
    assert.is_nil(data)
    assert.is_true(err == "closed" or err == "connection reset by peer", err)
    stuck:close()
  end)
end)

-- Connections the acceptor has counted against a worker but that the worker
-- has not taken yet (queued in its inbox, pending on its ipc pipe, or still
-- in the pipe's socket) when the server stops: each must be closed and its
-- count given back. stats() reads the counters of a running server only, so
-- they are read between the end of the workers and stop(): after
-- stop_begin() and wait_stopped(), every thread done but not yet joined.
describe("connections in flight at stop", function()
  local FLOOD = 200
  setup(function()
    -- libuv opens a process-wide signal pipe on first use; not ours to count.
    multiloop.server{ port = 0, handler = "examples.echo_handler", workers = 1 }:start():stop()
  end)

  for _, dispatch in ipairs { "ipc", "queue" } do
    for _, grace in ipairs { 0, 200 } do
      it(("are closed and given back, no fd left open (%s, timeout %d)"):format(dispatch, grace),
         function()
        local name = ("hold-%s-%d"):format(dispatch, grace)
        local flags = multiloop.shared(name)
        collectgarbage()
        local fds = helper.fd_count()
        local server, port = helper.server{ workers = 2, dispatch = dispatch,
                                            handler = "spec.fixtures.hold",
                                            config = { flags = name } }
        helper.defer(function()
          flags:set("go", true)
          server:stop()
        end)
        local clients = {}
        helper.defer(function() for _, c in ipairs(clients) do c:close() end end)
        -- Both workers held inside connect() (round robin: one client each).
        for i = 1, 2 do
          clients[i] = helper.connect(port)
          assert.are.equal("held", helper.line(clients[i]))
        end
        -- A flood the acceptor hands to the held workers.
        for _ = 1, FLOOD do clients[#clients + 1] = helper.connect(port) end
        helper.eventually(function() return server:stats().handed_off >= FLOOD + 2 end, 5000)
        assert.is_true(server:stats().active > 2, "nothing in flight")
        -- The stop reaches each worker before it is let go: everything it
        -- was handed is still waiting when it sees the stop.
        server._core:stop_begin(grace)
        flags:set("go", true)
        server._core:wait_stopped(false)
        local stats = server:stats()
        for i, w in ipairs(stats.workers) do
          assert.are.equal(0, w.active, ("worker %d: active after stop"):format(i))
        end
        assert.are.equal(0, stats.active)
        server:stop()
        -- Every client sees its connection end; none hangs.
        for i, c in ipairs(clients) do
          local _, err = c:receive("*a")
          assert.is_true(err == nil or err == "closed" or err == "connection reset by peer",
                         ("client %d: %s"):format(i, tostring(err)))
        end
        for _, c in ipairs(clients) do c:close() end
        clients = {}
        assert.are.equal(fds, helper.fd_count(), "file descriptors left open")
      end)
    end
  end
end)
