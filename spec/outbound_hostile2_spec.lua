-- A second hostile review, of what changed after the first
-- (spec/outbound_hostile_spec.lua): conn:pipe's timeout, connects during a
-- graceful stop, send's number formatting, examples/proxy.lua. The cases
-- run in spec/fixtures/outbound_hostile2*.lua.
local helper = require("spec.helper")
local socket = require("socket")
local d = require("multiloop").shared("spec.outbound_hostile2")

describe("outbound (hostile, second review)", function()
  local server, port

  after_each(function()
    helper.stop_checked(server)
    server = nil
  end)

  local function start(opts)
    opts = opts or {}
    opts.workers = 1
    opts.handler = opts.handler or "spec.fixtures.outbound_hostile2"
    server, port = helper.server(opts)
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    return c
  end

  describe("connects during a graceful stop", function()
    local upstream, up_port
    before_each(function()
      upstream, up_port = helper.server({ workers = 1, handler = "spec.fixtures.upstream" })
    end)
    after_each(function()
      helper.stop_checked(upstream)
      upstream = nil
      d:flush()
    end)

    local function grace_server(mode)
      server, port = helper.server({ workers = 1, handler = "spec.fixtures.outbound_hostile2_grace",
                                     config = { up = up_port, mode = mode } })
    end

    it("a backlog waiter started by a keepalive during the grace period gets its own connection", function()
      grace_server()
      local c = helper.connect(port)
      helper.defer(function() c:close() end)
      assert(c:send("backlog\n"))
      assert.are.equal("waiting", helper.line(c))
      assert(server:stop({ timeout = 3000 }))
      assert.are.equal("1 nil [hello] 1 | 1 nil [hello] 1", helper.line(c))
      assert.are.equal(0, server:stats().pooled)
      server = nil
      assert.is_true(helper.eventually(function() return upstream:stats().active == 0 end))
      assert.are.equal(2, upstream:stats().accepted)
    end)

    it("a callback pipe's timeout during the grace period ends the stop, its callback told", function()
      grace_server("hookpipe")
      local t0 = socket.gettime()
      assert(server:stop({ timeout = 5000 }))
      local took = socket.gettime() - t0
      assert.is_true(took > 0.25 and took < 2, ("the stop took %.2f s"):format(took))
      assert.are.equal("0 0 timeout", d:get("hookpipe"))
      server = nil
      assert.is_true(helper.eventually(function() return upstream:stats().active == 0 end))
      assert.are.equal(2, upstream:stats().accepted)
    end)

    it("a light thread the shutdown hook starts connects, and its keepalive closes", function()
      grace_server("hookthread")
      assert(server:stop({ timeout = 3000 }))
      assert.are.equal("1 nil [hello] 1", d:get("hookthread"))
      server = nil
      assert.is_true(helper.eventually(function() return upstream:stats().active == 0 end))
    end)

    it("a worker.connect from the shutdown hook leaves nothing when nothing else holds the stop", function()
      -- One connection first: the upstream's loop keeps libuv's reserve fd
      -- (/dev/null, for EMFILE) from its first accepted connection on.
      local warm = helper.connect(up_port)
      assert(warm:send("x\n"))
      assert.are.equal("[x]", helper.line(warm))
      warm:close()
      assert.is_true(helper.eventually(function() return upstream:stats().active == 0 end))
      local before = helper.fd_count()
      grace_server("hookconnect")
      assert(server:stop({ timeout = 3000 }))
      server = nil
      -- The worker closed at once: the connect ended without its callback.
      assert.is_nil(d:get("hookconnect"))
      assert.is_true(helper.eventually(function() return upstream:stats().active == 0 end))
      assert.is_true(helper.eventually(function() return helper.fd_count() <= before end),
                     ("%d fds open, %d before"):format(helper.fd_count(), before))
    end)
  end)

  describe("multiloop.ngx's table.new", function()
    it("takes any number as a size hint, as LuaJIT's does", function()
      local c = start()
      assert(c:send("tablenew\n"))
      assert.are.equal("table | table | table | table | 1 nil", helper.line(c))
    end)
  end)

  describe("conn:send of a table", function()
    it("copies no more than it measured when a finalizer changes the table in between", function()
      local c = start()
      assert(c:send("gcsend\n"))
      local data = helper.line(c)
      local result = helper.line(c)
      local parts = { "a" }
      for i = 2, 40001 do parts[i] = tostring(i + 0.5) end
      if data == "" then
        assert.are.equal("raised conn:send: the table changed while it was being sent true", result)
      else
        -- The finalizer came after the copy of t[1]: what was measured went out.
        local expected = table.concat(parts)
        assert.is_true(data == expected, ("%d bytes, not the %d measured"):format(#data, #expected))
        assert.are.equal(("sent %d true"):format(#expected), result)
      end
    end)
  end)

  describe("examples/proxy.lua", function()
    local upstream
    after_each(function()
      helper.stop_checked(upstream)
      upstream = nil
    end)

    it("refuses a config.idle_timeout or connect_timeout that is not a whole number of ms, at start", function()
      local multiloop = require("multiloop")
      for _, bad in ipairs { { idle_timeout = "1000" }, { connect_timeout = -1 } } do
        bad.upstreams = { "127.0.0.1:1" }
        local s = multiloop.server({ host = "127.0.0.1", port = 0, workers = 1,
                                     handler = "examples.proxy", config = bad })
        local ok, err = pcall(s.start, s)
        s:stop()
        local name = bad.idle_timeout and "idle_timeout" or "connect_timeout"
        assert.is_false(ok)
        assert.are.equal("multiloop.server: start: worker 1 failed to load the handler: examples/proxy.lua: config."
                         .. name .. " must be an integer number of ms from 0 to 2147483647 (got "
                         .. tostring(bad[name]) .. ")", err)
      end
    end)

    it("closes its upstream connection when the client is gone before the pipe starts", function()
      local up_port
      upstream, up_port = helper.server({ workers = 1, handler = "spec.fixtures.upstream" })
      server, port = helper.server({ workers = 1, handler = "examples.proxy",
                                     config = { upstreams = { "localhost:" .. up_port } } })
      -- Each client resets at once: its reset is read while the upstream's
      -- name is looked up, so conn:pipe finds the client closed.
      for _ = 1, 20 do
        local c = helper.connect(port)
        assert(c:setoption("linger", { on = true, timeout = 0 }))
        c:close()
      end
      assert.is_true(helper.eventually(function() return upstream:stats().accepted == 20 end))
      assert.is_true(helper.eventually(function() return upstream:stats().active == 0 end, 2000),
                     ("%d upstream connections still open"):format(upstream:stats().active))
    end)
  end)
end)
