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
    if server then
      assert(server:stop({ timeout = 2000 }))
      assert.are.equal(0, server:stats().threads)
    end
    server = nil
    d:flush()
  end)

  local function start(case, opts)
    opts = opts or {}
    opts.workers = opts.workers or 1
    opts.handler = opts.handler or "spec.fixtures.hostile_serve"
    opts.config = opts.config or {}
    opts.config.case = case
    server, port = helper.server(opts)
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
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
end)
