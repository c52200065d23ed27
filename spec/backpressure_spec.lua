-- Backpressure both ways: write() turns false over the high-water mark and
-- on_drain follows; pause()/resume(); write callbacks; a client that sends
-- and never reads cannot make the echo server buffer without bound.
local helper = require("spec.helper")
local socket = require("socket")

local function rss_kib()
  for line in io.lines("/proc/self/status") do
    local kib = line:match("^VmRSS:%s+(%d+)")
    if kib then return tonumber(kib) end
  end
end

describe("backpressure", function()
  local server, port
  after_each(function() if server then server:stop() end end)

  it("write() returns false over write_high_water, then on_drain runs", function()
    server, port = helper.server{ workers = 1, write_high_water = 64 * 1024,
                                  write_low_water = 1024, handler = function(conn)
      local chunk = string.rep("x", 16 * 1024)
      local writes, buffered = 0
      repeat
        writes = writes + 1
        local ok = conn:write(chunk)
        buffered = conn:buffered()
      until not ok or writes > 10000
      conn:on_drain(function()
        conn:write(("\ndrained: false after %d writes, %d buffered then, %d now\n")
          :format(writes, buffered, conn:buffered()))
        conn:close()
      end)
    end }
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    helper.sleep(200)                      -- let the server's queue fill up
    local all = helper.all(c)
    local writes, buffered, now = all:match("drained: false after (%d+) writes, (%d+) buffered then, (%d+) now\n$")
    assert.is_not_nil(writes, all:sub(-200))
    assert.is_true(tonumber(buffered) >= 64 * 1024)
    assert.is_true(tonumber(now) <= 1024)
    assert.are.equal(tonumber(writes) * 16 * 1024, #all - #all:match("\ndrained.*$"))
  end)

  it("pause() stops reading and resume() restarts it", function()
    -- Connection A pauses after its first data; connection B asks how many
    -- bytes A has seen, then resumes it. Both on one worker.
    server, port = helper.server{ workers = 1, handler = function(conn)
      _G.CONNS = _G.CONNS or {}
      conn:on_data(function(data)
        if data:sub(1, 1) == "A" then
          _G.A, _G.SEEN = conn, (_G.SEEN or 0) + #data
          conn:pause()
          conn:pause()                     -- twice is harmless
        elseif data == "count\n" then
          conn:write(_G.SEEN .. "\n")
        elseif data == "resume\n" then
          _G.A:resume()
          _G.A:resume()
          conn:write("resumed\n")
        end
      end)
    end }
    local a = helper.connect(port)
    helper.defer(function() a:close() end)
    assert(a:send("A first\n"))
    local b = helper.connect(port)
    helper.defer(function() b:close() end)
    assert.are.equal("8", helper.eventually(function()
      assert(b:send("count\n"))
      local n = helper.line(b)
      return n ~= "nil" and n
    end))
    assert(a:send("AAAA\n"))
    helper.sleep(100)
    assert(b:send("count\n"))
    assert.are.equal("8", helper.line(b))           -- paused: not read
    assert(b:send("resume\n"))
    assert.are.equal("resumed", helper.line(b))
    assert.are.equal("13", helper.eventually(function()
      assert(b:send("count\n"))
      local n = helper.line(b)
      return n == "13" and n
    end))
  end)

  it("runs a write's callback once it is flushed, in order, after write() returns", function()
    server, port = helper.server{ workers = 1, handler = function(conn)
      local log = {}
      conn:write("one\n", function(err) log[#log + 1] = "1:" .. tostring(err) end)
      log[#log + 1] = "returned"
      conn:write(string.rep("b", 1000000) .. "\n", function(err)
        log[#log + 1] = "2:" .. tostring(err)
        conn:write(table.concat(log, " ") .. "\n")
        conn:close()
      end)
    end }
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    assert.are.equal("one", helper.line(c))
    assert.are.equal(1000000, #helper.line(c))
    assert.are.equal("returned 1:nil 2:nil", helper.line(c))
  end)

  it("a write callback sees the error when the peer resets", function()
    local path = os.tmpname()
    helper.defer(function() os.remove(path) end)
    server, port = helper.server{ workers = 1, config = { path = path }, handler = function(conn)
      local function log(s)
        local f = io.open(conn.worker.config.path, "a"); f:write(s, "\n"); f:close()
      end
      conn:write(string.rep("x", 16 * 1024 * 1024), function(err) log("write " .. tostring(err)) end)
      conn:on_close(function(err) log("close " .. tostring(err)) end)
    end }
    local c = helper.connect(port)
    assert(c:receive(1000))                -- the server is writing
    c:setoption("linger", { on = true, timeout = 0 })
    c:close()                              -- RST with megabytes still queued
    local text = helper.eventually(function()
      local f = io.open(path); local t = f:read("*a"); f:close()
      return t:find("close") and t
    end, 10000)                            -- valgrind is slow
    assert.matches("^write (E%u+)\nclose (E%u+)\n$", text)
    local werr, cerr = text:match("^write (E%u+)\nclose (E%u+)")
    assert.is_true(cerr == "ECONNRESET" or cerr == "EPIPE", cerr)
    assert.is_true(werr == "ECANCELED" or werr == cerr, werr)
  end)

  it("keeps the echo server's memory bounded against clients that never read", function()
    server, port = helper.server{ workers = 2, handler = "examples.echo_handler" }
    local payload = string.rep("0123456789abcdef", 4 * 1024 * 1024)   -- 64 MiB, made before measuring
    collectgarbage()
    local before = rss_kib()
    local hogs, sent = {}, {}
    helper.defer(function() for _, c in ipairs(hogs) do c:close() end end)
    for i = 1, 20 do
      hogs[i] = helper.connect(port)
      hogs[i]:settimeout(0)
      sent[i] = 0
    end
    -- Each hog sends as much of its 64 MiB as the server will take, for up to
    -- 3 s, and never reads.
    local deadline = socket.gettime() + 3
    repeat
      local progress = false
      for i, c in ipairs(hogs) do
        if sent[i] < #payload then
          local n, _, partial = c:send(payload, sent[i] + 1, math.min(sent[i] + 1048576, #payload))
          local now = n or partial
          if now > sent[i] then progress = true; sent[i] = now end
        end
      end
      if not progress then socket.sleep(0.05) end
    until socket.gettime() > deadline
    local grown_mib = (rss_kib() - before) / 1024
    -- Under a sanitizer RSS measures its quarantine and shadow memory, not
    -- ours: the bound is checked in plain runs only.
    if not os.getenv("SANITIZER") then
      assert.is_true(grown_mib < 64, ("RSS grew by %.1f MiB"):format(grown_mib))
    end
    -- and another client is still served
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    assert.are.equal("still here\n", helper.echo(c, "still here\n"))
  end)
end)
