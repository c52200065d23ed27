--- server:reload() (src/worker.c's generations, src/server.c's handshake):
-- new code in a new Lua state per worker while the old one keeps the
-- connections it has; a version that fails in one worker changes nothing;
-- drain_timeout; a reload during a reload's drain; SIGHUP through run().
local helper = require("spec.helper")
local multiloop = require("multiloop")
local socket = require("socket")

local SERVE = "spec/fixtures/reload_handler.lua"
local CONNECT = "spec/fixtures/reload_connect.lua"

local ndict = 0
local function dict_name()
  ndict = ndict + 1
  return ("spec.reload.%d.%d"):format(helper.pid(), ndict)
end

-- One line to c, its answer back.
local function ask(c, line)
  assert(c:send(line .. "\n"))
  return helper.line(c)
end

-- Callback style (reload_connect.lua): data to c, "<version> <data>" back.
local function say(c, data)
  assert(c:send(data))
  local got, err = c:receive(#data + 2)
  assert(got, err)
  return got
end

local client = helper.client

local function server(opts)
  opts.workers = opts.workers or 2
  return helper.served(opts)
end

local function rss_kb()
  for line in io.lines("/proc/self/status") do
    local kb = line:match("^VmRSS:%s+(%d+)")
    if kb then return tonumber(kb) end
  end
end

describe("server:reload", function()
  it("keeps a connection opened before it on the old code until it closes; new ones get the new code", function()
    local dict = dict_name()
    local d = multiloop.shared(dict)
    local s, port = server{ handler = SERVE, config = { version = "A", dict = dict, every = 5 } }
    local old1, old2 = client(port), client(port)        -- one on each worker
    assert.are.equal("A one", ask(old1, "one"))
    assert.are.equal("A one", ask(old2, "one"))
    assert.is_true(helper.eventually(function() return (d:get("tick A") or 0) >= 4 end, 2000))
    assert.are.same({ 1, 1 }, { s:stats().workers[1].generation, s:stats().workers[2].generation })

    assert.is_true(s:reload{ config = { version = "B", dict = dict, every = 5 } })
    local new1, new2 = client(port), client(port)
    assert.are.equal("B two", ask(new1, "two"))
    assert.are.equal("B two", ask(new2, "two"))
    assert.are.equal("A three", ask(old1, "three"))      -- still the old code
    assert.are.equal("A three", ask(old2, "three"))
    local st = s:stats()
    assert.are.same({ 2, 2 }, { st.workers[1].generation, st.workers[2].generation })
    assert.are.same({ 1, 1 }, { st.workers[1].old_connections, st.workers[2].old_connections })
    assert.are.same({ 2, 1 }, { st.old_connections, st.reloads })
    assert.are.same({ 2, 2, 2 }, { d:get("init A"), d:get("shutdown A"), d:get("init B") })
    -- Messages go to the new code.
    assert.are.equal(2, s:broadcast("hi"))
    assert.is_true(helper.eventually(function() return d:get("message B hi") == 2 end, 2000))
    assert.are.equal(nil, d:get("message A hi"))
    -- The old state's `every` timers stopped at the switch; the new one's run.
    local ticks = d:get("tick A")
    helper.sleep(50)
    assert.are.equal(ticks, d:get("tick A"))
    assert.is_true(helper.eventually(function() return (d:get("tick B") or 0) >= 4 end, 2000))

    old1:close()
    old2:close()
    assert.is_true(helper.eventually(function() return s:stats().old_connections == 0 end, 2000))
    assert.are.equal("B four", ask(new1, "four"))
    assert.are.equal(nil, d:get("shutdown B"))
    s:stop()
    assert.are.equal(2, d:get("shutdown B"))               -- the stop reaches the current code
    st = s:stats()                                         -- the last run's figures
    assert.are.same({ 2, 0, 1 }, { st.workers[1].generation, st.old_connections, st.reloads })
    s:start()                                              -- the new code, counted from zero
    st = s:stats()
    assert.are.same({ 1, 0, 0 }, { st.workers[1].generation, st.old_connections, st.reloads })
    local _, again = s:address()                            -- port 0: a new one
    assert.are.equal("B five", ask(client(again), "five"))
  end)

  it("changes nothing when the new version fails to load in one worker", function()
    local dict = dict_name()
    local d = multiloop.shared(dict)
    local s, port = server{ handler = SERVE, config = { version = "A", dict = dict } }
    local before = client(port)
    assert.are.equal("A one", ask(before, "one"))
    local ok, err = s:reload{ config = { version = "B", dict = dict, fail_worker = 2 } }
    assert.is_nil(ok)
    assert.truthy(err:find("^worker 2: " .. SERVE:gsub("%p", "%%%0")
      .. ":%d+: version B will not load in worker 2$"), err)
    local after1, after2 = client(port), client(port)
    assert.are.equal("A two", ask(after1, "two"))
    assert.are.equal("A two", ask(after2, "two"))
    assert.are.equal("A three", ask(before, "three"))
    local st = s:stats()
    assert.are.same({ 1, 1, 0, 0 }, { st.workers[1].generation, st.workers[2].generation,
                                     st.old_connections, st.reloads })
    assert.are.equal(nil, d:get("shutdown A"))             -- the old code was never told to go
    assert.are.equal(1, d:get("init B"))                   -- worker 1's new state, dropped
    -- A handler that does not load at all fails in worker 1 first.
    ok, err = s:reload{ handler = "spec.fixtures.no_such_module" }
    assert.is_nil(ok)
    assert.truthy(err:find("^worker 1: .*module 'spec.fixtures.no_such_module' not found"), err)
    assert.are.equal("A four", ask(client(port), "four"))
    -- And the server still reloads after that.
    assert.is_true(s:reload{ config = { version = "C", dict = dict } })
    assert.are.equal("C five", ask(client(port), "five"))
  end)

  for _, dispatch in ipairs { "reuseport", "queue", "ipc" } do
  it(("loses no connection under load: 20 reloads alternating two versions (%s) #child"):format(dispatch), function()
    local s, port = server{ handler = SERVE, config = { version = "A" }, dispatch = dispatch }
    local stop = os.tmpname()
    os.remove(stop)
    helper.defer(function() os.remove(stop) end)
    local p = assert(io.popen(("env -u LD_PRELOAD lua5.4 spec/fixtures/reload_client.lua %d %s 60 "
      .. "50000"):format(port, stop), "r"))
    helper.defer(function()
      io.open(stop, "w"):close()
      pcall(p.close, p)
    end)
    assert.are.equal("started", p:read("*l"))
    helper.sleep(100)
    for i = 1, 20 do
      assert.is_true(s:reload{ config = { version = i % 2 == 1 and "B" or "A" } })
      helper.sleep(100)
    end
    io.open(stop, "w"):close()
    local out = p:read("*a")
    local ok, failed = out:match("^ok (%d+) failed (%d+)\n")
    assert(ok, out)
    assert.are.equal(0, tonumber(failed), out)
    assert.is_true(tonumber(ok) >= 100, out)               -- it did run through the reloads
    assert.truthy(out:find("answer A x", 1, true), out)
    assert.truthy(out:find("answer B x", 1, true), out)
    assert.are.equal(20, s:stats().reloads)
    assert.are.equal(21, s:stats().workers[1].generation)
    io.stderr:write(("reload_spec: under load (%s): %s"):format(dispatch, out))
  end)
  end

  it("closes the old code's connections with reason \"reload\" after drain_timeout, its threads too", function()
    local dict = dict_name()
    local d = multiloop.shared(dict)
    local s, port = server{ handler = CONNECT, workers = 1, drain_timeout = 300,
                            config = { version = "A", dict = dict } }
    local old = client(port)
    assert.are.equal("A x", say(old, "x"))
    local threads = s:stats().threads
    assert.is_true(s:reload{ config = { version = "B", dict = dict } })
    local new = client(port)
    assert.are.equal("B y", say(new, "y"))
    assert.are.equal("A z", say(old, "z"))       -- within drain_timeout: still served
    local t0 = socket.gettime()
    old:settimeout(3)
    local got, err = old:receive(1)                        -- the old code closes it
    assert.is_nil(got)
    assert.are.equal("closed", err)
    assert.is_true(socket.gettime() - t0 < 2)
    assert.is_true(helper.eventually(function() return d:get("closed A reload") == 1 end, 2000))
    assert.is_true(helper.eventually(function() return s:stats().old_connections == 0 end, 2000))
    assert.are.equal(threads, s:stats().threads)
    assert.are.equal("B w", say(new, "w"))        -- the new code is not touched
    -- A serve connection and a light thread sleeping forever in the old state end too.
    s:stop()
    s, port = server{ handler = SERVE, workers = 1, drain_timeout = 200, config = { version = "A" } }
    old = client(port)
    assert.are.equal("A spawn", ask(old, "spawn"))
    local before = s:stats().threads                       -- the serve thread and the sleeper
    assert.is_true(before >= 2)
    assert.is_true(s:reload{ config = { version = "B" } })
    old:settimeout(3)
    assert.are.same({ nil, "closed", "" }, { old:receive("*l") })
    assert.is_true(helper.eventually(function() return s:stats().threads == 0 end, 2000))
    assert.are.equal("B again", ask(client(port), "again"))
  end)

  it("closes the oldest code's connections when a reload comes during a reload's drain", function()
    local dict = dict_name()
    local d = multiloop.shared(dict)
    local s, port = server{ handler = CONNECT, workers = 1, config = { version = "A", dict = dict } }
    local a = client(port)
    assert.are.equal("A 1", say(a, "1"))
    assert.is_true(s:reload{ config = { version = "B", dict = dict } })
    local b = client(port)
    assert.are.equal("B 2", say(b, "2"))
    assert.are.equal(1, s:stats().old_connections)
    assert.is_true(s:reload{ config = { version = "C", dict = dict } })   -- A is still draining
    a:settimeout(3)
    assert.are.same({ nil, "closed", "" }, { a:receive(1) })
    assert.is_true(helper.eventually(function() return d:get("closed A reload") == 1 end, 2000))
    local c = client(port)
    assert.are.equal("C 3", say(c, "3"))
    assert.are.equal("B 4", say(b, "4"))          -- B drains now, as A did
    local st = s:stats()
    assert.are.same({ 3, 1, 2 }, { st.workers[1].generation, st.old_connections, st.reloads })
    -- A failed reload during a drain still ends the oldest code (B) first.
    local ok, err = s:reload{ handler = "spec.fixtures.no_such_module" }
    assert.is_nil(ok)
    assert.truthy(err:find("^worker 1: "), err)
    b:settimeout(3)
    assert.are.same({ nil, "closed", "" }, { b:receive(1) })
    assert.are.equal("C 5", say(c, "5"))
    assert.is_true(helper.eventually(function() return s:stats().old_connections == 0 end, 2000))
  end)

  it("gives back fds, threads and memory after the drains, over 50 reloads", function()
    local s, port = server{ handler = SERVE, config = { version = "A" } }
    local function round(i)
      local c = helper.connect(port)
      assert.are.equal("A x", ask(c, "x"):gsub("^%S+", "A"))
      assert.is_true(s:reload{ config = { version = "V" .. i } })
      assert.are.equal("V" .. i .. " y", ask(c, "y"):gsub("^%S+", "V" .. i))
      c:close()
    end
    for i = 1, 5 do round(i) end                           -- warm up: malloc's arenas
    assert.is_true(helper.eventually(function() return s:stats().old_connections == 0 end, 2000))
    collectgarbage()
    local fds, threads, rss = helper.fd_count(), helper.thread_count(), rss_kb()
    for i = 6, 55 do round(i) end
    assert.is_true(helper.eventually(function() return s:stats().old_connections == 0 end, 2000))
    collectgarbage()
    assert.is_true(helper.eventually(function() return helper.fd_count() == fds end, 2000))
    assert.are.equal(threads, helper.thread_count())
    assert.are.equal(0, s:stats().threads)
    -- Under a sanitizer RSS says nothing (ASan holds freed memory in its
    -- quarantine); LeakSanitizer and valgrind check the states are freed.
    local grown = rss_kb() - rss
    io.stderr:write(("reload_spec: RSS grew by %d kB over 50 reloads\n"):format(grown))
    if not os.getenv("SANITIZER") then
      assert.is_true(grown < 8 * 1024, ("RSS grew by %d kB over 50 reloads"):format(grown))
    end
    assert.are.equal(56, s:stats().workers[2].generation)
  end)

  it("gives up on a version whose init does not finish within start_timeout", function()
    local s, port = server{ handler = SERVE, start_timeout = 300, config = { version = "A" } }
    local t0 = socket.gettime()
    local ok, err = s:reload{ handler = "spec.fixtures.init_loops", config = { catch = true } }
    assert.is_nil(ok)
    assert.are.equal("worker 2: the new version did not load within 300 ms (start_timeout)", err)
    assert.is_true(socket.gettime() - t0 < 5)
    assert.are.equal("A still", ask(client(port), "still"))
    assert.are.same({ 1, 0 }, { s:stats().workers[2].generation, s:stats().reloads })
  end)

  it("checks its options", function()
    local s = multiloop.server{ port = 0, host = "127.0.0.1", workers = 1, handler = SERVE,
                                config = { version = "A" } }
    helper.defer(function() s:stop() end)
    assert.are.same({ nil, "not running" }, { s:reload() })
    assert.has_error(function() s:reload{ handlr = "x" } end,
      "multiloop.server: reload: unknown option 'handlr'")
    assert.has_error(function() s:reload(5) end,
      "multiloop.server: reload: expected nil or a table { handler = ..., config = ... } (got number)")
    assert.has_error(function() s:reload{ handler = 5 } end,
      "multiloop.server: reload: option 'handler' must be a module name, a path to a .lua file, "
      .. "or a function (got 5)")
    s:start()
    assert.are.same({ nil, "option 'config': config.f: cannot copy a function" },
                    { s:reload{ config = { f = print } } })
    assert.has_error(function()
      multiloop.server{ port = 0, handler = SERVE, drain_timeout = -1 }
    end, "multiloop.server: option 'drain_timeout' must be an integer from 0 to 2147483647 (got -1)")
  end)

  it("reloads on SIGHUP during run(), logging the outcome, and keeps running #child", function()
    local path = os.tmpname() .. ".lua"
    helper.defer(function() os.remove(path) end)
    local function version(v, body)
      local f = assert(io.open(path, "w"))
      f:write(body or ("local V = %q\nreturn { connect = function(conn) conn:write(V .. '\\n') "
        .. "conn:on_data(function(d) conn:write(V .. ' ' .. d) end) end }\n"):format(v))
      f:close()
    end
    version("v1")
    local child = helper.spawn(path .. " 2")
    helper.defer(child.kill)
    local held = client(child.port)
    assert.are.equal("v1", helper.line(held))
    version("v2")
    child.signal("HUP")
    assert(helper.eventually(function()
      return child.stderr():find("info main: SIGHUP: reloaded (generation 2)", 1, true)
    end, 5000), "no reload logged: " .. child.stderr())
    local c = client(child.port)
    assert.are.equal("v2", helper.line(c))
    assert(held:send("x"))
    assert.are.equal("v1 x", held:receive(4))              -- still the old code
    version(nil, "return {")                              -- does not compile
    child.signal("HUP")
    assert(helper.eventually(function()
      return child.stderr():find("error main: SIGHUP: reload failed, the old code keeps serving: "
        .. "worker 1: ", 1, true)
    end, 5000), "no failed reload logged: " .. child.stderr())
    assert.are.equal("v2", helper.line(client(child.port)))
    held:close()
    c:close()
    local out, code = child.stop()
    assert.are.equal("stopped on SIGTERM\n", out)          -- SIGHUP did not count as a stop
    assert.are.equal(0, code)
  end)
end)
