-- The review's attempts at breaking sequential connections (issue 14):
-- what a hostile client or an unlucky order of events does to serve.c,
-- thread.c's await template and the stream under them. Handlers:
-- spec/fixtures/hostile_serve.lua. Every test stops its server and checks
-- that no light thread is left.
local helper = require("spec.helper")
local multiloop = require("multiloop")
local socket = require("socket")

local d = multiloop.shared("spec.hostile")

describe("serve, hostile", function()
  local server, port
  after_each(function()
    helper.stop_checked(server)
    server = nil
    d:flush()
  end)

  local function start(case, opts)
    local c
    server, port, c = helper.case_server("spec.fixtures.hostile_serve", case, opts)
    return c
  end

  it("a graceful stop ended by a read timeout (the last connection closes in the deadline's callback)", function()
    start("timeout_ends")
    assert(helper.eventually(function() return server:stats().threads == 1 end))
    local t0 = socket.gettime()
    assert(server:stop({ timeout = 3000 }))
    assert.is_true(socket.gettime() - t0 < 2.5)
    assert.are.equal(0, server:stats().threads)
    assert.are.equal("nil timeout ", d:get("timeout_ends"))
    server = nil
  end)

  it("a graceful stop ended by a callback connection's idle timeout", function()
    start(nil, { handler = "spec.fixtures.hostile_idle", idle_timeout = 150 })
    assert(helper.eventually(function() return server:stats().active == 1 end))
    local t0 = socket.gettime()
    assert(server:stop({ timeout = 3000 }))
    assert.is_true(socket.gettime() - t0 < 2.5)
    assert.are.equal(0, server:stats().active)
    server = nil
  end)
  it("a reader's state does not leak into the next: an inclusive reader(size), then another reader", function()
    local c = start("until_state")
    assert(c:send("ab--line\nxyz::"))
    assert.are.equal("ab|-- line xyz", helper.line(c))
  end)

  it("... also when the reader waited for the pattern (its continuation marks the reader)", function()
    local c = start("until_state", { config = { size = 2 } })
    c:setoption("tcp-nodelay", true)
    assert(c:send("ab-"))
    socket.sleep(0.05)
    assert(c:send("-line\nxyz::"))
    assert.are.equal("ab|-- line xyz", helper.line(c))
  end)

  it("a spawned reader killed with part of a line scanned loses none of it", function()
    local c = start("kill_reader")
    assert.are.equal("waiting", helper.line(c))
    assert(c:send("hel"))
    assert.are.equal("true", helper.line(c))
    assert(c:send("lo\n"))
    assert.are.equal("hello", helper.line(c))
  end)

  it("a graceful stop wakes a reader that waits past its timeout with nil, 'stopped'", function()
    local c = start("wait_graceful")
    assert.are.equal("waiting", helper.line(c))
    assert(server:stop({ timeout = 300 }))
    assert.are.equal(0, server:stats().threads)
    assert.are.equal("nil stopped ", d:get("wait_graceful"))
    server = nil
  end)

  for _, grace in ipairs({ 0, 300 }) do
    it("a stop (timeout " .. grace .. ") wakes a writer blocked on a client that never reads", function()
      start("send_stop", { write_high_water = 128 * 1024 })
      assert(helper.eventually(function() return d:get("send_stop sent") ~= nil end))
      socket.sleep(0.2)
      assert(server:stop({ timeout = grace }))
      assert.are.equal(0, server:stats().threads)
      assert.are.equal("stopped", d:get("send_stop"))
      server = nil
    end)
  end

  it("a client that writes while serve waits in send cannot make the server buffer its input", function()
    local c = start("write_while_blocked", { write_high_water = 128 * 1024 })
    c:settimeout(0)
    local piece, pushed = string.rep("i", 65536), 0
    local deadline = socket.gettime() + 1
    while socket.gettime() < deadline do
      local n, _, partial = c:send(piece)
      pushed = pushed + (n or partial or 0)
      if not n then socket.sleep(0.01) end
    end
    local bytes_in = server:stats().bytes_in
    assert.is_true(pushed > bytes_in)
    assert.is_true(bytes_in < 512 * 1024, "the server read " .. bytes_in .. " bytes")
    assert(server:stop({ timeout = 0 }))
    assert.are.equal("stopped", d:get("write_while_blocked"))
    server = nil
  end)

  it("'*a' past receive_limit gives 'too long' with a bounded partial", function()
    local c = start("limits", { receive_limit = 100000 })
    assert(c:send(string.rep("a", 300000)))
    c:shutdown("send")
    local n = helper.line(c):match("^nil too long (%d+) 300000$")
    assert.is_truthy(n)
    assert.is_true(tonumber(n) >= 100000 and tonumber(n) <= 2 * (100000 + 65536), n)
  end)

  it("an until-pattern that never comes gives 'too long' with a bounded partial", function()
    local c = start("until_limit", { receive_limit = 100000 })
    assert(c:send(string.rep("E", 300000)))
    c:shutdown("send")
    local n = helper.line(c):match("^nil too long (%d+) 300000$")
    assert.is_truthy(n)
    assert.is_true(tonumber(n) >= 100000 and tonumber(n) <= 2 * (100000 + 65536), n)
  end)

  it("a thread that reads after serve returned gets 'closed', and so does every method after", function()
    local c = start("orphan_reader")
    assert.are.equal("", helper.all(c))
    assert(helper.eventually(function() return d:get("orphan_reader") ~= nil end))
    assert.are.equal("nil closed ,nil closed ,nil closed ,nil closed ,nil closed,0",
                     d:get("orphan_reader"))
  end)

  it("receiveuntil: a 1-byte pattern, one longer than the buffer, a partial prefix at the end", function()
    local c = start("until_edges")
    c:setoption("tcp-nodelay", true)
    for _, piece in ipairs({ "ab|c|", "rest<<<<bound", "ary>>>>", "xyzaba", "bab" }) do
      assert(c:send(piece))
      socket.sleep(0.05)
    end
    c:shutdown("send")
    assert.are.equal("ab,nil,c,nil,rest,xyz nil nil,nil nil nil,nil closed ab", helper.line(c))
  end)

  it("serve returning with 4 MiB queued and a <close> conn: every byte reaches the client", function()
    local c = start("close_flush")
    assert(c:send("go\n"))
    c:settimeout(10)
    local all = helper.all(c)
    assert.are.equal(4 * 1024 * 1024 + 4, #all)
    assert.are.equal("end\n", all:sub(-4))
  end)
  -- Resident memory of this process (the server runs in it), in KiB.
  local function rss()
    for l in io.lines("/proc/self/status") do
      local kb = l:match("^VmRSS:%s+(%d+)")
      if kb then return tonumber(kb) end
    end
  end

  it("small sends to a client that never reads: memory stays near write_high_water #stress", function()
    collectgarbage()
    local before = rss()
    local c = start("small_flood")                 -- write_high_water: 1 MiB
    local last
    for _ = 1, 100 do                              -- until send has waited 0.2 s
      socket.sleep(0.2)
      local now = d:get("small_flood sent")
      if now and now == last then break end
      last = now
    end
    local grown = rss() - before
    c:close()
    assert(helper.eventually(function() return d:get("small_flood") ~= nil end))
    assert.is_true(grown < 12 * 1024, ("the server grew %d KiB for a 1 MiB queue of 5-byte "
                                       .. "sends"):format(grown))
  end)
  it("a second writer is busy; the blocked one killed, its bytes still go, and send waits again", function()
    local c = start("busy_writing", { write_high_water = 128 * 1024 })
    assert(helper.eventually(function() return d:get("busy_writing") ~= nil end))
    assert.are.equal("nil socket busy writing,true", d:get("busy_writing"))
    socket.sleep(0.1)
    assert.is_nil(d:get("busy_writing end"))        -- waits: the client has not read
    c:settimeout(10)
    local all = helper.all(c)
    assert.are.equal("end\n", all:sub(-4))
    assert.are.equal(0, (#all - 4) % (256 * 1024))
    assert.are.equal("4", d:get("busy_writing end"))
  end)
  it("read timeouts racing the client's pieces and EOF lose and repeat no byte", function()
    local c = start("partials")
    c:setoption("tcp-nodelay", true)
    local sent = {}
    for i = 1, 60 do
      sent[i] = ("<%03d>"):format(i)
      assert(c:send(sent[i]))
      socket.sleep((i * 7 % 30) / 1000)         -- 0 to 29 ms: around the 15 ms timeout
    end
    c:shutdown("send")
    assert.are.equal(table.concat(sent), helper.all(c))
    assert.is_true(tonumber(d:get("partials")) > 0)
  end)
  it("a light thread resumed by hand out of receive, then ended, is not left as the reader", function()
    local c = start("hand_resume")
    assert.are.equal("go", helper.line(c))
    assert(c:send("x\n"))
    assert.are.equal("x", helper.line(c))
  end)

  it("worker.kill refuses a light thread that runs because it was resumed by hand", function()
    local c = start("hand_kill")
    assert.are.equal("true nil running", helper.line(c))
  end)

  it("receive_limit: a part of exactly the limit before a pattern whose end comes in a later read", function()
    local c = start("until_exact", { receive_limit = 16 })
    c:setoption("tcp-nodelay", true)
    assert(c:send("0123456789abcdef--EN"))   -- 16 bytes, then the pattern's start
    socket.sleep(0.1)                        -- read by the server on its own
    assert(c:send("D--"))
    assert.are.equal("0123456789abcdef", helper.line(c))
  end)

  it("bytes held for one connection do not make a send on another wait (nor raise where it cannot)", function()
    local a = start("cross_cork", { write_high_water = 4096 })
    assert(a:send("a\n"))
    assert.are.equal("ready", helper.line(a))
    local b = helper.connect(port)
    helper.defer(function() b:close() end)
    assert(b:send("b\n"))
    assert.are.equal("x" .. string.rep("y", 3999), helper.line(b))
    assert.are.equal("true 200", helper.line(b))
    assert.are.equal(string.rep("h", 199), helper.line(a))
  end)

  it("a burst's held replies to a client that reads nothing for a while: all arrive, once, in order", function()
    local c = start("big_replies", { write_high_water = 65536 })
    local n, lines = 8000, {}
    for i = 1, n do lines[i] = "n" .. i end
    assert(c:send(table.concat(lines, "\n") .. "\n"))
    local reply = 2000 + 2                          -- ":" pad "\n", after the line
    local total = 0
    for i = 1, n do total = total + #lines[i] + reply end
    socket.sleep(0.5)                               -- the server's socket fills meanwhile
    local out = server:stats().bytes_out
    assert.is_true(out < total, "the kernel took every reply: nothing was queued")
    local pad = string.rep("r", 2000)
    for i = 1, n do
      local got = helper.line(c)
      if got ~= lines[i] .. ":" .. pad then
        assert.are.equal(lines[i] .. ":" .. pad:sub(1, 8) .. "...", got and got:sub(1, #lines[i] + 9) .. "...")
      end
    end
    c:settimeout(0.2)
    local more, err = c:receive(1)
    assert.are.same({ nil, "timeout" }, { more, err })       -- nothing more, nothing twice
    assert(helper.eventually(function() return server:stats().bytes_out == total end))
  end)

  it("held replies go before what a thread that slept mid-event sends later", function()
    local c = start("sleep_held")
    assert(c:send("go\n"))
    for i = 1, 5 do assert.are.equal(tostring(i), helper.line(c)) end
    assert(c:send("last\n"))
    assert.are.equal("last", helper.line(c))
  end)

  it("held replies go out before serve's error closes the connection", function()
    local c = start("raise_held")
    assert(c:send("go\n"))
    assert.are.equal("a", helper.line(c))
    assert.are.equal("b", helper.line(c))
    assert.are.equal("", helper.all(c))
  end)

  it("a client that resets the connection while replies are held: nothing leaks, the worker goes on", function()
    for round = 1, 20 do
      local c = start("reset_held")
      local lines = {}
      for i = 1, 2000 do lines[i] = "q" .. i end
      assert(c:send(table.concat(lines, "\n") .. "\n"))
      if round % 2 == 0 then socket.sleep(0.005) end
      assert(c:setoption("linger", { on = true, timeout = 0 }))
      c:close()                                    -- an RST: the replies' writes fail
      assert(helper.eventually(function() return d:get("reset_held") ~= nil end))
      assert(helper.eventually(function() return server:stats().active == 0 end))
      assert(server:stop({ timeout = 2000 }))
      assert.are.equal(0, server:stats().threads)
      server = nil
      d:flush()
    end
  end)

  it("a large send in a read event is not held: the part the socket does not take is not copied", function()
    -- Under a sanitizer RSS measures its own memory: the bound is checked
    -- in plain runs only, and under one the string is smaller (valgrind).
    local plain = not os.getenv("SANITIZER")
    local size = plain and 48 * 1024 * 1024 or 4 * 1024 * 1024
    local c = start("big_held", { write_high_water = 256 * 1024 * 1024, config = { size = size } })
    assert(c:send("go\n"))
    assert(helper.eventually(function() return d:get("big_held") ~= nil end, 30000))
    local grew = d:get("big_held")
    if plain then
      assert.is_true(grew < 16 * 1024, ("the process grew %d KiB while 48 MiB were queued"):format(grew))
    end
    assert.are.equal("x", helper.line(c))
    local got = assert(c:receive(size + 1))
    assert.are.equal(size + 1, #got)
  end)

  it("held replies go out before a <close> conn closes as serve returns", function()
    local c = start("close_held")
    assert(c:send("go\n"))
    assert.are.equal("a\nb\nc\n", helper.all(c))
  end)
end)
