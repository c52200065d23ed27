-- Graceful stop: stop{timeout} and run()'s first signal stop accepting at
-- once, run the handler's shutdown hook, let connections finish within the
-- timeout and close the rest at it; a second signal stops at once.
local helper = require("spec.helper")
local multiloop = require("multiloop")
local socket = require("socket")

local function refused(port)
  local c = socket.tcp()
  c:settimeout(1)
  local ok, err = c:connect("127.0.0.1", port)
  c:close()
  return not ok and err == "connection refused"
end

describe("server:stop{ timeout }", function()
  for _, dispatch in ipairs { "ipc", "queue", "reuseport" } do
    it(("closes a stuck client at the timeout, not before (%s)"):format(dispatch), function()
      local server, port = helper.server{ workers = 2, dispatch = dispatch,
                                          handler = "spec.fixtures.polite" }
      local stuck = helper.connect(port)
      helper.defer(function() stuck:close() end)
      assert.are.equal("hi\n", helper.echo(stuck, "hi\n"))
      local t = socket.gettime()
      server:stop{ timeout = 400 }
      local took = socket.gettime() - t
      assert.is_true(took >= 0.35 and took < 3, ("stop took %.3f s"):format(took))
      assert.matches("^worker %d shutting down$", helper.line(stuck))   -- the shutdown hook
      local data, err = stuck:receive(1)
      assert.is_nil(data)
      assert.are.equal("closed", err)
      assert.is_true(refused(port))
    end)
  end

  it("returns as soon as the last connection is gone", function()
    local server = helper.server{ workers = 2, handler = "examples.echo_handler" }
    local t = socket.gettime()
    server:stop{ timeout = 5000 }
    assert.is_true(socket.gettime() - t < 1)
  end)

  it("rejects a bad timeout, naming it", function()
    local server = multiloop.server{ port = 0, workers = 1, handler = "examples.echo_handler" }
    local ok, err = pcall(server.stop, server, { timeout = -5 })
    assert.is_false(ok)
    assert.matches("multiloop.server: stop: option 'timeout' must be an integer from 0 to 2147483647 (got -5)", err, 1, true)
    ok, err = pcall(server.stop, server, { grace = 5 })
    assert.is_false(ok)
    assert.matches("multiloop.server: stop: unknown option 'grace'", err, 1, true)
  end)
end)

describe("server:run() on signals", function()
  it("lets a slow client finish within the grace period, then exits #child", function()
    local child = helper.spawn("spec.fixtures.polite workers=2 timeout=3000")
    helper.defer(child.kill)
    local slow = helper.connect(child.port)
    assert.are.equal("working\n", helper.echo(slow, "working\n"))
    child.signal("TERM")
    assert.matches("^worker %d shutting down$", helper.line(slow))
    assert.is_true(helper.eventually(function() return refused(child.port) end, 2000))
    -- still served during the grace period
    assert.are.equal("last words\n", helper.echo(slow, "last words\n"))
    local t = socket.gettime()
    slow:close()                           -- finishes by itself: the server exits now
    local out, code = child.wait()
    child.waited = true
    assert.is_true(socket.gettime() - t < 2, "the server waited for its full grace period")
    assert.are.equal("stopped on SIGTERM\n", out)
    assert.are.equal(0, code)
  end)

  it("stops at once on a second signal #child", function()
    local child = helper.spawn("spec.fixtures.polite workers=1 timeout=60000")
    helper.defer(child.kill)
    local stuck = helper.connect(child.port)
    assert.are.equal("x\n", helper.echo(stuck, "x\n"))
    child.signal("INT")
    assert.matches("shutting down", helper.line(stuck))
    local t = socket.gettime()
    child.signal("INT")
    local out, code = child.wait()
    child.waited = true
    assert.is_true(socket.gettime() - t < 3)
    assert.are.equal("stopped on SIGINT\n", out)
    assert.are.equal(0, code)
    local data, err = stuck:receive(1)
    assert.is_nil(data)
    assert.is_true(err == "closed" or err == "connection reset by peer", err)
    stuck:close()
  end)
end)
