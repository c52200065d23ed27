-- The log (src/log.c): worker.log, conn:log, multiloop.log and server:log;
-- options log and log_level; one record per message, "<time> <level> <who>[
-- conn <id>]: <message>", a tab after every newline inside it; the file that
-- SIGUSR1 reopens during run(); internal messages (a traceback) through it;
-- records from workers logging at once never mixed.
local helper = require("spec.helper")
local multiloop = require("multiloop")

local TIME = "%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ"

-- The records of a log's text: { time, level, who, conn (or false), msg }
-- each, the message's continuation lines joined back with "\n" (their tab
-- removed). Fails on a line that is neither a record nor a continuation.
local function records(text)
  local out = {}
  for line in text:gmatch("([^\n]*)\n") do
    if line:sub(1, 1) == "\t" then
      assert(#out > 0, "a continuation line before any record: " .. line)
      out[#out].msg = out[#out].msg .. "\n" .. line:sub(2)
    else
      local t, level, who, msg = line:match("^(" .. TIME .. ") (%l+) (.-): (.*)$")
      assert(t, "not a record: " .. line:sub(1, 200))
      local w, conn = who:match("^(worker %d+) conn (%d+)$")
      out[#out + 1] = { time = t, level = level, who = w or who,
                        conn = conn and tonumber(conn) or false, msg = msg }
    end
  end
  assert(text == "" or text:sub(-1) == "\n", "the log does not end with a newline")
  return out
end

local function read(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end

local function tmpfile()
  local path = os.tmpname()
  helper.defer(function() os.remove(path) end)
  return path
end

-- A server of the logger fixture logging to a fresh file, and a client.
local function start(opts)
  opts = opts or {}
  opts.log = opts.log or tmpfile()
  opts.workers = opts.workers or 1
  opts.handler = "spec.fixtures.logger"
  local s, port = helper.server(opts)
  helper.defer(function() s:stop() end)
  local c = helper.connect(port)
  helper.defer(function() c:close() end)
  return s, c, opts.log
end

local function ask(c, line)
  assert(c:send(line .. "\n"))
  return helper.line(c)
end

describe("the log", function()
  it("writes one record per call: UTC time with ms, level, worker, message joined by spaces", function()
    local before = os.time()
    local _, c, path = start()
    assert.are.equal("ok", ask(c, "log info hello world"))
    assert.are.equal("ok", ask(c, "values"))
    local got = records(read(path))
    assert.are.equal(2, #got, read(path))
    assert.are.same({ "info", "worker 1", false, "hello world" },
                    { got[1].level, got[1].who, got[1].conn, got[1].msg })
    assert.are.equal("v 42 nil true 1.5 T", got[2].msg)
    -- the time is UTC, now (to the second, give or take the test's length)
    local y, mo, d, h, mi, sec = got[1].time:match("^(%d+)%-(%d+)%-(%d+)T(%d+):(%d+):(%d+)")
    local t = os.time({ year = y, month = mo, day = d, hour = h, min = mi, sec = sec, isdst = false })
    local utc_offset = os.time() - os.time(os.date("!*t"))    -- os.time reads the table as local time
    t = t + utc_offset
    assert.is_true(t >= before - 1 and t <= os.time() + 1, got[1].time)
  end)

  it("filters by log_level: info (the default) drops debug; warn drops info", function()
    local s, c, path = start()
    for _, level in ipairs { "error", "warn", "info", "debug" } do
      assert.are.equal("ok", ask(c, "log " .. level .. " at " .. level))
    end
    local levels = {}
    for _, r in ipairs(records(read(path))) do levels[#levels + 1] = r.level .. ":" .. r.msg end
    assert.are.same({ "error:at error", "warn:at warn", "info:at info" }, levels)
    s:stop()
    c:close()

    s, c, path = start({ log_level = "warn" })
    for _, level in ipairs { "error", "warn", "info", "debug" } do
      assert.are.equal("ok", ask(c, "log " .. level .. " at " .. level))
    end
    levels = {}
    for _, r in ipairs(records(read(path))) do levels[#levels + 1] = r.level end
    assert.are.same({ "error", "warn" }, levels)
    s:stop()
    c:close()

    s, c, path = start({ log_level = "debug" })
    assert.are.equal("ok", ask(c, "log debug shown"))
    assert.are.same({ "debug" }, { records(read(path))[1].level })
    s:stop()
  end)

  it("names the connection for conn:log", function()
    local _, c, path = start({ workers = 2, dispatch = "queue" })
    local id = tonumber(ask(c, "clog warn from the connection"):match("^ok (%d+)$"))
    local c2 = helper.connect(select(2, _:address()))
    helper.defer(function() c2:close() end)
    local id2 = tonumber(ask(c2, "clog info second"):match("^ok (%d+)$"))
    assert.are_not.equal(id, id2)
    local got = records(read(path))
    assert.are.equal(2, #got)
    assert.are.same({ "warn", "worker 1", id, "from the connection" },
                    { got[1].level, got[1].who, got[1].conn, got[1].msg })
    assert.are.same({ "info", "worker 2", id2, "second" },      -- queue: round-robin
                    { got[2].level, got[2].who, got[2].conn, got[2].msg })
  end)

  it("puts a tab after every newline in a message, so a message cannot forge a record", function()
    local _, c, path = start()
    assert.are.equal("ok", ask(c, "multi"))
    local text = read(path)
    local got = records(text)
    assert.are.equal(1, #got, text)
    assert.are.equal("one\ntwo\n2026-01-01T00:00:00.000Z error main: forged", got[1].msg)
    assert.matches(": one\n\ttwo\n\t2026%-01%-01T", text)
  end)

  it("logs a Lua error in a handler with its connection and traceback", function()
    local _, c, path = start()
    assert.are.equal("ok", ask(c, "log info before"))
    assert(c:send("boom\n"))
    assert.are.equal("", helper.all(c))                   -- the connection is closed
    local got = helper.eventually(function()
      local r = records(read(path))
      return #r == 2 and r
    end)
    assert.are.same({ "error", "worker 1", 1 }, { got[2].level, got[2].who, got[2].conn })
    assert.matches("^serve: [^\n]*logger%.lua:%d+: boom from the log spec\nstack traceback:\n\t", got[2].msg)
  end)

  it("multiloop.log and server:log write as main to the server's log", function()
    local s, _, path = start({ log_level = "debug" })
    multiloop.log("debug", "from", "main", 1)
    s:log("error", "through", "the server")
    local got = records(read(path))
    assert.are.equal(2, #got)
    assert.are.same({ "debug", "main", false, "from main 1" },
                    { got[1].level, got[1].who, got[1].conn, got[1].msg })
    assert.are.same({ "error", "main", "through the server" }, { got[2].level, got[2].who, got[2].msg })
  end)

  it("keeps records from 4 workers logging at once whole, in a file", function()
    local dict = "spec.log." .. helper.pid()
    local path = tmpfile()
    local s = helper.server({ workers = 4, handler = "spec.fixtures.logger", log = path,
                              config = { dict = dict } })
    helper.defer(function() s:stop() end)
    local N, SIZE = 400, 10000                            -- a tenth of them past PIPE_BUF
    assert.are.equal(4, s:broadcast({ n = N, size = SIZE }))
    local d = multiloop.shared(dict)
    assert(helper.eventually(function() return d:get("done") == 4 end, 30000), "the workers did not finish")
    s:stop()
    local next_i = { 0, 0, 0, 0 }
    local got = records(read(path))
    assert.are.equal(4 * N, #got)
    for _, r in ipairs(got) do
      local id, i, bytes = r.msg:match("^burst (%d) (%d+) (%u+)$")
      id, i = tonumber(id), tonumber(i)
      assert(id and r.who == "worker " .. id, r.msg:sub(1, 100))
      assert.are.equal(next_i[id] + 1, i)                 -- each worker's in its order
      next_i[id] = i
      assert.are.equal(i % 10 == 0 and SIZE or 40, #bytes)
      assert.are.equal(string.char(64 + id):rep(#bytes), bytes)
    end
  end)

  it("keeps records from 4 workers logging at once whole, on a pipe #child", function()
    local N, SIZE = 300, 10000
    local p = assert(io.popen(("%s spec/fixtures/log_burst.lua %d %d 2>&1 >/dev/null"):format(
      os.getenv("CHILD_LUA") or "lua5.4", N, SIZE)))
    local text = p:read("a")
    assert(p:close(), text:sub(-2000))
    local counts, n = { 0, 0, 0, 0 }, 0
    for _, r in ipairs(records(text)) do
      local id, i, bytes = r.msg:match("^burst (%d) (%d+) (%u+)$")
      if id then                                          -- a sanitizer's lines are not ours
        id = tonumber(id)
        n = n + 1
        counts[id] = counts[id] + 1
        assert.are.equal(tonumber(i) % 10 == 0 and SIZE or 40, #bytes)
        assert.are.equal(string.char(64 + id):rep(#bytes), bytes)
      end
    end
    assert.are.same({ N, N, N, N }, counts)
    assert.are.equal(4 * N, n)
  end)

  it("reopens the file on SIGUSR1 during run(), so logrotate can move it #child", function()
    local path = tmpfile()
    local rotated = path .. ".1"
    helper.defer(function() os.remove(rotated) end)
    local child = helper.spawn("spec.fixtures.logger 1 log=" .. path .. " dispatch=queue")
    helper.defer(child.kill)
    local c = helper.connect(child.port)
    helper.defer(function() c:close() end)
    assert.are.equal("ok", ask(c, "log info before the rotation"))
    assert(os.rename(path, rotated))
    assert.are.equal("ok", ask(c, "log info still the old file"))
    child.signal("USR1")                                  -- caught: run() catches TERM after it
    local new = helper.eventually(function()
      local r = records(read(path))
      return #r >= 1 and r
    end, 5000)
    assert(new, "no new file after SIGUSR1: " .. child.stderr())
    assert.are.same({ "info", "main", "SIGUSR1: log reopened" }, { new[1].level, new[1].who, new[1].msg })
    assert.are.equal("ok", ask(c, "log info after the rotation"))
    local old = records(read(rotated))
    assert.are.same({ "before the rotation", "still the old file" }, { old[1].msg, old[2].msg })
    assert.are.equal(2, #old)
    new = records(read(path))
    assert.are.equal("after the rotation", new[2].msg)
    c:close()
    local out, code = child.stop()
    assert.are.equal("stopped on SIGTERM\n", out)         -- USR1 did not count as a stop
    assert.are.equal(0, code)
    assert.are.equal("", child.stderr())
  end)

  it("says so on SIGUSR1 when the log is stderr, and goes on #child", function()
    local child = helper.spawn("spec.fixtures.logger 1")
    helper.defer(child.kill)
    child.signal("USR1")
    local got = helper.eventually(function()
      local r = records(child.stderr())
      return #r >= 1 and r
    end, 5000)
    assert(got, "nothing on stderr after SIGUSR1")
    assert.are.same({ "info", "main", "SIGUSR1: nothing to reopen (the log is stderr)" },
                    { got[1].level, got[1].who, got[1].msg })
    local c = helper.connect(child.port)
    helper.defer(function() c:close() end)
    assert.are.equal("ok", ask(c, "log warn still serving"))
    c:close()
    local out, code = child.stop()
    assert.are.equal("stopped on SIGTERM\n", out)
    assert.are.equal(0, code)
    assert.are.equal("still serving", records(child.stderr())[2].msg)
  end)

  it("reopen_log reopens the file on demand and says why it cannot", function()
    -- a path that can no longer be opened: the old file stays in use (the
    -- directory made with lfs, not a shell: dash crashes under TSan)
    local lfs = require("lfs")
    local dir = os.tmpname()
    os.remove(dir)
    assert(lfs.mkdir(dir))
    helper.defer(function() os.remove(dir .. "/x.log"); lfs.rmdir(dir) end)
    local s2 = multiloop.server({ port = 0, handler = "spec.fixtures.logger", log = dir .. "/x.log" })
    assert(os.remove(dir .. "/x.log"))
    assert(lfs.rmdir(dir))
    local ok, err, name = s2:reopen_log()
    assert.is_nil(ok)
    assert.are.equal("reopen_log: " .. dir .. "/x.log: no such file or directory (ENOENT)", err)
    assert.are.equal("ENOENT", name)
    s2:log("warn", "still written")                       -- to the unlinked file: no error
    -- stderr: nothing to reopen
    local s3 = multiloop.server({ port = 0, handler = "spec.fixtures.logger" })
    assert.is_true(s3:reopen_log())

    local s, c, path = start()
    local rotated = path .. ".1"
    helper.defer(function() os.remove(rotated) end)
    assert(os.rename(path, rotated))
    assert.is_true(s:reopen_log())
    assert.are.equal("ok", ask(c, "log info in the new file"))
    assert.are.equal("in the new file", records(read(path))[1].msg)
    assert.are.equal("", read(rotated))
  end)

  it("raises on a bad level, naming the function and what it got", function()
    local s, c = start()
    local function answer(case)                           -- without the caller's position
      return (ask(c, "bad " .. case):gsub("^false [^ ]*logger%.lua:%d+: ", "false "))
    end
    assert.are.equal("false worker.log: the level must be 'error', 'warn', 'info' or 'debug' (got 'fatal')",
                     answer("worker"))
    assert.are.equal("false worker.log: the level must be 'error', 'warn', 'info' or 'debug' (got no value)",
                     answer("nolevel"))
    assert.are.equal("false worker.log: the level must be 'error', 'warn', 'info' or 'debug' (got number)",
                     answer("number"))
    assert.are.equal("false conn:log: the level must be 'error', 'warn', 'info' or 'debug' (got 'loud')",
                     answer("conn"))
    assert.are.equal("false '__tostring' must return a string", answer("tostring"))
    local ok, err = pcall(multiloop.log, "trace", "x")
    assert.is_false(ok)
    assert.are.equal("multiloop.log: the level must be 'error', 'warn', 'info' or 'debug' (got 'trace')", err)
    ok, err = pcall(s.log, s, nil, "x")
    assert.is_false(ok)
    assert.are.equal("server:log: the level must be 'error', 'warn', 'info' or 'debug' (got nil)", err)
    ok, err = pcall(s.log, {}, "info")
    assert.is_false(ok)
    assert.are.equal("multiloop.server: log must be called as server:log()", err)
    assert.are.equal("ok", ask(c, "log info still fine"))   -- a raise loses nothing
  end)

  it("checks the options log and log_level, naming them", function()
    local function bad(opts)
      opts.port, opts.handler = 0, "spec.fixtures.logger"
      local ok, err = pcall(multiloop.server, opts)
      assert.is_false(ok)
      return err
    end
    assert.are.equal("multiloop.server: option 'log_level' must be one of 'error', 'warn', 'info', "
                     .. "'debug' (got 'verbose')", bad({ log_level = "verbose" }))
    assert.are.equal("multiloop.server: option 'log' must be a file path of 1 to 4095 bytes (got 5)",
                     bad({ log = 5 }))
    assert.are.equal("multiloop.server: option 'log' must be a file path of 1 to 4095 bytes (got '')",
                     bad({ log = "" }))
    assert.are.equal("multiloop.server: option 'log' must not contain a zero byte (got 'a\0b')",
                     bad({ log = "a\0b" }))
    collectgarbage()
    collectgarbage()
    local fds = helper.fd_count()
    assert.are.equal("multiloop.server: option 'log' must be a file that can be opened for "
                     .. "appending: /nonexistent/x.log: no such file or directory (ENOENT)",
                     bad({ log = "/nonexistent/x.log" }))
    assert.are.equal("multiloop.server: option 'log' must be a file that can be opened for "
                     .. "appending: /tmp: illegal operation on a directory (EISDIR)",
                     bad({ log = "/tmp" }))
    collectgarbage()
    collectgarbage()
    assert.are.equal(fds, helper.fd_count())
  end)

  it("closes the file when the server is collected", function()
    collectgarbage()
    collectgarbage()
    local fds = helper.fd_count()
    do
      local s = multiloop.server({ port = 0, handler = "spec.fixtures.logger", log = tmpfile() })
      assert(s)
      assert.are.equal(fds + 1, helper.fd_count())
    end
    collectgarbage()
    collectgarbage()
    assert.are.equal(fds, helper.fd_count())
  end)
end)
