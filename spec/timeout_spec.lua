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

  -- The deadline lists (src/deadline.c) while their timer walks them: an
  -- expiry callback that closes a connection queued behind it in the same
  -- list, and moves itself to a duration no list has yet (a list made during
  -- the walk); the walk goes on to the next entry, and every list empties.
  it("on_timeout may close a neighbour and move itself to a new duration", function()
    server, port = helper.server{ workers = 1, handler = function(conn)
      _G.CONNS = _G.CONNS or {}
      conn:on_data(function(name)
        _G.CONNS[name] = conn
        conn:set_timeout(150)
        conn:on_close(function(err)
          local a = _G.CONNS.A
          if a and a ~= conn then a:write(("closed %s %s\n"):format(name, tostring(err))) end
        end)
        if name == "A" then
          local n = 0
          conn:on_timeout(function()
            n = n + 1
            conn:write("A" .. n .. "\n")
            if n == 1 then
              _G.CONNS.B:close()
              conn:set_timeout(250)
            else
              conn:set_timeout(0)
            end
          end)
        elseif name == "B" then
          conn:on_timeout(function() conn:write("B timed out\n") end)
        end
        conn:write("ok\n")
      end)
    end }
    local socks = {}
    for _, name in ipairs{ "A", "B", "C" } do      -- in this order in the 150 ms list
      local c = helper.connect(port)
      helper.defer(function() c:close() end)
      assert(c:send(name))
      assert.are.equal("ok", helper.line(c))
      socks[name] = c
    end
    local t0 = socket.gettime()
    assert.are.equal("A1", helper.line(socks.A))
    -- B's close() shuts down first, so C's timeout may close C before B.
    local closed = { helper.line(socks.A), helper.line(socks.A) }
    table.sort(closed)
    assert.are.same({ "closed B nil", "closed C timeout" }, closed)
    assert.are.equal("A2", helper.line(socks.A))
    assert.is_true(socket.gettime() - t0 >= 0.2, "A's second period is 250 ms")
    for _, name in ipairs{ "B", "C" } do
      local data, err = socks[name]:receive(1)
      assert.is_nil(data)
      assert.are.equal("closed", err)
    end
    socks.A:settimeout(0.4)
    local data, err = socks.A:receive("*l")   -- no deadline left: A stays open, silent
    assert.is_nil(data)
    assert.are.equal("timeout", err)
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
