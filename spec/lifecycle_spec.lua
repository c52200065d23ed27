-- start/stop leave nothing behind; <close>, garbage collection and run()
-- under SIGINT/SIGTERM stop the server.
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

describe("lifecycle", function()
  local threads, fds
  setup(function()
    -- libuv opens a process-wide signal pipe on first use; not ours to count.
    multiloop.server{ port = 0, handler = "examples.echo_handler", workers = 1 }:start():stop()
  end)
  before_each(function()
    collectgarbage()
    threads, fds = helper.thread_count(), helper.fd_count()
  end)
  after_each(function()
    collectgarbage()
    assert.are.equal(threads, helper.thread_count(), "threads left running")
    assert.are.equal(fds, helper.fd_count(), "file descriptors left open")
  end)

  it("starts and stops 50 times, serving each time, leaving no fd or thread", function()
    for i = 1, 50 do
      local s, port = helper.server{ workers = 2, handler = "examples.echo_handler" }
      assert.are.equal(threads + 3, helper.thread_count())   -- acceptor + 2 workers
      local c = helper.connect(port)
      assert.are.equal("round " .. i, helper.echo(c, "round " .. i))
      c:close()
      s:stop()
    end
  end)

  it("stop() is idempotent and a stopped server can start again", function()
    local s = helper.server{ workers = 1, handler = "examples.echo_handler" }
    assert.is_true(s:stop())
    assert.is_true(s:stop())
    local host, err = s:address()
    assert.is_nil(host)
    assert.are.equal("not running", err)
    s:start()
    local _, port = s:address()
    local c = helper.connect(port)
    assert.are.equal("again", helper.echo(c, "again"))
    c:close()
    s:stop()
  end)

  it("stop() closes live connections: clients see the close", function()
    local s, port = helper.server{ workers = 2, handler = "examples.echo_handler" }
    local clients = {}
    for i = 1, 10 do
      clients[i] = helper.connect(port)
      assert.are.equal("hi", helper.echo(clients[i], "hi"))
    end
    s:stop()
    for _, c in ipairs(clients) do
      local data, err = c:receive(1)
      assert.is_nil(data)
      assert.is_true(err == "closed" or err == "connection reset by peer", err)
      c:close()
    end
    assert.is_true(refused(port))
  end)

  it("on_close sees 'stopped' when the server stops", function()
    -- The handler reports over a second connection made before the stop,
    -- which the stop closes too: so the report goes to a file instead.
    local path = os.tmpname()
    helper.defer(function() os.remove(path) end)
    local s, port = helper.server{ workers = 1, config = { path = path }, handler = function(conn)
      conn:on_close(function(err)
        local f = io.open(conn.worker.config.path, "a")
        f:write(tostring(err), "\n")
        f:close()
      end)
    end }
    local c = helper.connect(port)
    helper.sleep(50)
    s:stop()
    c:close()
    local f = assert(io.open(path))
    assert.are.equal("stopped\n", f:read("*a"))
    f:close()
  end)

  it("a server in a <close> variable stops at the end of its scope", function()
    local port
    do
      local s <close> = multiloop.server{ port = 0, workers = 2, handler = "examples.echo_handler" }
      s:start()
      port = select(2, s:address())
      assert.are.equal(threads + 2, helper.thread_count())   -- reuseport: no acceptor
    end
    assert.is_true(refused(port))
  end)

  it("a server garbage collected without stop() is stopped, not leaked", function()
    local port
    do
      local s = multiloop.server{ port = 0, workers = 2, handler = "examples.echo_handler" }
      s:start()
      port = select(2, s:address())
    end
    collectgarbage()
    collectgarbage()
    assert.are.equal(threads, helper.thread_count())
    assert.is_true(refused(port))
  end)

  it("a failed start leaves nothing running", function()
    for _ = 1, 5 do
      local s = multiloop.server{ port = 0, workers = 3, handler = "spec.fixtures.init_fails" }
      assert.has_error(function() s:start() end)
    end
  end)

  -- A port that was free a moment ago: the spec must know it to bind it
  -- again after a start that failed.
  local function free_port()
    local probe = assert(socket.bind("127.0.0.1", 0))
    local _, port = probe:getsockname()
    probe:close()
    return tonumber(port)
  end

  -- The workers that do not loop must load within the limit: under valgrind
  -- (threads take turns, one at a time) loading took more than 300 ms on a
  -- loaded machine, and giving up on the looping ones took up to 7.5 s.
  local limit_ms = ({ valgrind = 5000, asan = 1000 })[os.getenv("SANITIZER") or ""] or 300
  local bound = os.getenv("SANITIZER") == "valgrind" and 60 or 5
  for _, case in ipairs {
    { handler = "spec.fixtures.init_loops", what = "worker 2: init did not finish" },
    { handler = "spec.fixtures.init_loops", config = { catch = true },
      what = "worker 2: init did not finish" },
    { handler = "spec.fixtures.load_loops", what = "worker 1: the handler did not load" },
  } do for _, dispatch in ipairs { "reuseport", "queue" } do
    it(("start() gives up on a worker stuck in Lua at start_timeout (%s%s, %s)"):format(
         case.handler, case.config and ", catching errors" or "", dispatch), function()
      local port = free_port()
      local s = multiloop.server{ port = port, workers = 3, dispatch = dispatch,
                                  handler = case.handler, config = case.config,
                                  start_timeout = limit_ms }
      local t = socket.gettime()
      local ok, err = pcall(s.start, s)
      local took = socket.gettime() - t
      assert.is_false(ok)
      assert.are.equal(("multiloop.server: start: %s within %d ms"):format(case.what, limit_ms),
                       err)
      assert.is_true(took >= limit_ms / 1000 - 0.01 and took < bound,
                     ("start took %.3f s"):format(took))
      assert.is_false(s._core:running())
      -- Nothing holds the port: a plain bind (no SO_REUSEPORT) takes it.
      local again = assert(socket.bind("127.0.0.1", port))
      again:close()
      -- The threads and fds are checked by after_each.
    end)
  end end

  it("rejects a bad start_timeout, naming it", function()
    for _, bad in ipairs { 0, -1, 1.5, "10", 0x80000000 } do
      local ok, err = pcall(multiloop.server, { port = 0, handler = "examples.echo_handler",
                                                start_timeout = bad })
      assert.is_false(ok)
      assert.matches("multiloop.server: option 'start_timeout' must be an integer from 1 to "
                     .. "2147483647 (got ", err, 1, true)
    end
    -- The core checks it too.
    local ok, err = pcall(package.loaded["multiloop.core"].new, {
      port = 0, host = "127.0.0.1", workers = 1, backlog = 1, max_connections = 0,
      idle_timeout = 0, write_high_water = 2, write_low_water = 1, keepalive_seconds = 0,
      handler_kind = "module", handler = "examples.echo_handler", package_path = "",
      package_cpath = "", start_timeout = 0 })
    assert.is_false(ok)
    assert.matches("option 'start_timeout' must be an integer from 1 to 2147483647 (got 0)", err, 1, true)
  end)

  it("require returns the same module every time", function()
    assert.are.equal(multiloop, require("multiloop"))
    assert.are.equal(package.loaded["multiloop.core"], require("multiloop.core"))
  end)
end)

describe("server:run()", function()
  for _, sig in ipairs { "TERM", "INT" } do
    it("serves until SIG" .. sig .. ", then stops and returns #child", function()
      local child = helper.spawn("examples.echo_handler 2")
      helper.defer(child.kill)
      -- The child prints its port before run() catches the signals: wait
      -- for SIGTERM, which run() catches right after SIGINT (lua.c catches
      -- SIGINT while the script runs, so that bit says nothing).
      assert(helper.eventually(function() return procsig.caught(child.pid, "TERM") end, 5000))
      local c = helper.connect(child.port)
      assert.are.equal("alive", helper.echo(c, "alive"))
      child.signal(sig)
      local out, code = child.wait()
      child.waited = true
      assert.are.equal("stopped on SIG" .. sig .. "\n", out)
      assert.are.equal(0, code)
      assert.are.equal("", child.stderr())
      local data, err = c:receive(1)
      assert.is_nil(data)
      assert.is_true(err == "closed" or err == "connection reset by peer", err)
      c:close()
      assert.is_true(refused(child.port))
    end)
  end

  it("prints a useful tostring", function()
    local s = multiloop.server{ port = 0, workers = 1, handler = "examples.echo_handler" }
    assert.are.equal("multiloop.server{host=127.0.0.1, port=0, workers=1, handler=examples.echo_handler, stopped}", tostring(s))
    s:start()
    local _, port = s:address()
    assert.are.equal(("multiloop.server{host=127.0.0.1, port=%d, workers=1, handler=examples.echo_handler, running}"):format(port), tostring(s))
    s:stop()
  end)
end)
