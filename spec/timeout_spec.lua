-- Idle timeouts: the server option, conn:set_timeout, on_timeout, and a
-- dribbling client that does not slow anyone else down.
local helper = require("spec.helper")
local socket = require("socket")

describe("idle timeouts", function()
  local server, port
  after_each(function() if server then server:stop() end end)

  it("close a silent client with reason 'timeout' and spare an active one", function()
    local path = os.tmpname()
    helper.defer(function() os.remove(path) end)
    server, port = helper.server{ workers = 1, idle_timeout = 300, config = { path = path },
                                  handler = function(conn)
      conn:on_data(function(data) conn:write(data) end)
      conn:on_close(function(err)
        local f = io.open(conn.worker.config.path, "a"); f:write(tostring(err), "\n"); f:close()
      end)
    end }
    local silent = helper.connect(port)
    helper.defer(function() silent:close() end)
    local active = helper.connect(port)
    helper.defer(function() active:close() end)
    local t0 = socket.gettime()
    -- keep `active` busy for 900 ms: three timeouts' worth
    while socket.gettime() - t0 < 0.9 do
      assert.are.equal("tick\n", helper.echo(active, "tick\n"))
      helper.sleep(100)
    end
    local data, err = silent:receive(1)
    assert.is_nil(data)
    assert.are.equal("closed", err)
    assert.are.equal("still\n", helper.echo(active, "still\n"))
    local f = io.open(path); local text = f:read("*a"); f:close()
    assert.are.equal("timeout\n", text)
  end)

  it("run on_timeout instead of closing when it is set, once per idle period", function()
    server, port = helper.server{ workers = 1, handler = function(conn)
      local n = 0
      conn:set_timeout(100)
      conn:on_timeout(function()
        n = n + 1
        conn:write("idle " .. n .. "\n")
        if n == 3 then conn:set_timeout(0); conn:write("no more\n") end
      end)
    end }
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    assert.are.equal("idle 1", helper.line(c))
    assert.are.equal("idle 2", helper.line(c))
    assert.are.equal("idle 3", helper.line(c))
    assert.are.equal("no more", helper.line(c))
    c:settimeout(0.5)
    local data, err = c:receive("*l")
    assert.is_nil(data)
    assert.are.equal("timeout", err)        -- the connection is still open
  end)

  it("set_timeout overrides the server's idle_timeout per connection", function()
    server, port = helper.server{ workers = 1, idle_timeout = 100, handler = function(conn)
      conn:on_data(function(data)
        local ms = tonumber(data)
        conn:set_timeout(ms)
        conn:write("timeout " .. ms .. "\n")
      end)
    end }
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    assert(c:send("0"))
    assert.are.equal("timeout 0", helper.line(c))
    helper.sleep(300)                        -- past the server's 100 ms
    assert(c:send("2000"))
    assert.are.equal("timeout 2000", helper.line(c))
  end)

  it("a client dribbling a byte every 200 ms does not slow other clients down", function()
    server, port = helper.server{ workers = 1, handler = "examples.echo_handler" }
    local dribbler = helper.connect(port)
    helper.defer(function() dribbler:close() end)
    local other = helper.connect(port)
    helper.defer(function() other:close() end)
    local times = {}
    for _ = 1, 5 do
      assert(dribbler:send("d"))
      for _ = 1, 20 do
        local t = socket.gettime()
        assert.are.equal("ping\n", helper.echo(other, "ping\n"))
        times[#times + 1] = socket.gettime() - t
      end
      assert.are.equal("d", dribbler:receive(1))
      helper.sleep(200)
    end
    -- Waiting for the dribbler would cost up to 200 ms a round trip; the
    -- median (robust to a noisy machine) shows nobody waits for it.
    table.sort(times)
    local median = times[#times // 2]
    assert.is_true(median < 0.05, ("median round trip %.3f s"):format(median))
  end)
end)
