-- Stress #stress: many clients at once, resets mid-write, connect storms and
-- one huge payload; afterwards the server still serves and every fd is back.
-- Bounded in count and time; loopback only. Runs on its own with
--   busted --tags=stress spec/stress_spec.lua
local helper = require("spec.helper")
local socket = require("socket")

describe("stress #stress", function()
  local server, port, fds

  setup(function()
    -- libuv opens a process-wide signal pipe on first use: not ours to count.
    require("multiloop").server{ port = 0, workers = 1, handler = "examples.echo_handler" }:start():stop()
    collectgarbage()
    fds = helper.fd_count()
    server, port = helper.server{ workers = 2, backlog = 4096, handler = "examples.echo_handler" }
  end)

  teardown(function()
    -- the server still serves a fresh client ...
    local c = helper.connect(port)
    assert.are.equal("after the storm\n", helper.echo(c, "after the storm\n"))
    c:close()
    assert.are.equal(0, helper.eventually(function()
      return server:stats().active == 0 and 0
    end, 5000) or server:stats().active)
    server:stop()
    collectgarbage()
    -- ... and every fd is back where it started.
    assert.are.equal(fds, helper.fd_count())
  end)

  it("echoes random messages for 2,000 concurrent clients", function()
    local clients, sent = {}, {}
    helper.defer(function() for _, c in ipairs(clients) do c:close() end end)
    math.randomseed(42)
    for i = 1, 2000 do clients[i] = helper.connect(port) end
    for i, c in ipairs(clients) do
      local bytes = {}
      for j = 1, math.random(1, 512) do bytes[j] = string.char(math.random(0, 255)) end
      sent[i] = table.concat(bytes)
      assert(c:send(sent[i]))
    end
    for i, c in ipairs(clients) do
      assert.are.equal(sent[i], c:receive(#sent[i]))
    end
  end)

  it("survives 500 clients that reset while the server is writing to them", function()
    local payload = string.rep("r", 256 * 1024)
    for _ = 1, 500 do
      local c = helper.connect(port)
      c:settimeout(0)
      c:send(payload)                    -- as much as the kernel takes at once
      c:setoption("linger", { on = true, timeout = 0 })
      c:close()                          -- RST while the echo is in flight
    end
    local c = helper.connect(port)
    assert.are.equal("still up\n", helper.echo(c, "still up\n"))
    c:close()
  end)

  it("takes 20,000 connect-and-close in bursts of 1,000", function()
    for _ = 1, 20 do
      local burst = {}
      for i = 1, 1000 do
        local c = socket.tcp()
        c:settimeout(helper.TIMEOUT)
        assert(c:connect("127.0.0.1", port))
        burst[i] = c
      end
      for _, c in ipairs(burst) do c:close() end
    end
    assert.is_truthy(helper.eventually(function()
      return server:stats().accepted >= 20000
    end, 10000))
  end)

  it("echoes one 64 MiB payload byte for byte", function()
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    local payload = string.rep("multiloop\0", 64 * 1024 * 1024 // 10) .. "tail"
    local echoed = helper.echo_big(c, payload, 120)
    assert.are.equal(#payload, #echoed)
    assert.is_true(echoed == payload, "the echoed bytes differ")
  end)
end)
