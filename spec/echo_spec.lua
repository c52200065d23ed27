-- Echo over real sockets, once per dispatch mode: worker counts, spreading,
-- concurrency, big payloads, half-close, IPv6. The server runs in this
-- process; clients are LuaSocket.
local helper = require("spec.helper")

for _, dispatch in ipairs { "ipc", "queue", "reuseport" } do
for _, workers in ipairs { 1, 2, 4 } do
  describe(("echo (%s) with %d worker(s)"):format(dispatch, workers), function()
    local server, port
    before_each(function()
      server, port = helper.server{ workers = workers, dispatch = dispatch,
                                    handler = "examples.echo_handler" }
    end)
    after_each(function() server:stop() end)

    it("returns what a client sends", function()
      local c = helper.connect(port)
      helper.defer(function() c:close() end)
      assert.are.equal("ping\n", helper.echo(c, "ping\n"))
      assert.are.equal("pong\n", helper.echo(c, "pong\n"))
    end)

    it("is binary-safe (NUL bytes, every byte value)", function()
      local c = helper.connect(port)
      helper.defer(function() c:close() end)
      local bytes = {}
      for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
      local msg = table.concat(bytes) .. "\0\0tail\0"
      assert.are.equal(msg, helper.echo(c, msg))
    end)

    it("serves 200 concurrent clients", function()
      local clients = {}
      helper.defer(function() for _, c in ipairs(clients) do c:close() end end)
      for i = 1, 200 do clients[i] = helper.connect(port) end
      for i, c in ipairs(clients) do assert(c:send(("client %d\n"):format(i))) end
      for i, c in ipairs(clients) do
        assert.are.equal(("client %d"):format(i), helper.line(c))
      end
    end)
  end)
end

describe(("echo (%s)"):format(dispatch), function()
  local server, port
  after_each(function() if server then server:stop() end end)

  if dispatch == "reuseport" then
    it("lets the kernel spread connections over every worker", function()
      server, port = helper.server{ workers = 2, dispatch = dispatch, handler = "spec.fixtures.whoami" }
      local seen = {}
      for _ = 1, 64 do                      -- all 64 on one worker: odds of 2^-63
        local c = helper.connect(port)
        seen[helper.line(c)] = true
        c:close()
      end
      assert.is_true(seen["worker 1 of 2"] and seen["worker 2 of 2"])
    end)
  else
  it("spreads connections round-robin over every worker", function()
    server, port = helper.server{ workers = 4, dispatch = dispatch, handler = "spec.fixtures.whoami" }
    local seen = {}
    for i = 1, 8 do
      local c = helper.connect(port)
      seen[i] = helper.line(c)
      c:close()
    end
    assert.are.same({
      "worker 1 of 4", "worker 2 of 4", "worker 3 of 4", "worker 4 of 4",
      "worker 1 of 4", "worker 2 of 4", "worker 3 of 4", "worker 4 of 4",
    }, seen)
  end)
  end

  it("echoes an 8 MiB payload byte for byte", function()
    server, port = helper.server{ workers = 2, dispatch = dispatch, handler = "examples.echo_handler" }
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    local chunk = {}
    for i = 0, 1023 do chunk[#chunk + 1] = string.char(i % 256, (i * 7) % 256) end
    local payload = string.rep(table.concat(chunk), 4096)        -- 8 MiB
    assert.are.equal(8 * 1024 * 1024, #payload)
    local echoed = helper.echo_big(c, payload)
    assert.are.equal(#payload, #echoed)
    assert.is_true(echoed == payload, "the echoed bytes differ")
  end)

  it("handles a half-close: the client still gets everything, then EOF", function()
    server, port = helper.server{ workers = 2, dispatch = dispatch, handler = "examples.echo_handler" }
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    local msg = string.rep("half-close ", 10000)
    assert(c:send(msg))
    assert(c:shutdown("send"))
    assert.are.equal(msg, helper.all(c))
    -- and the server has closed its side: the next read is EOF at once
    local data, err = c:receive(1)
    assert.is_nil(data)
    assert.are.equal("closed", err)
  end)

  it("listens on IPv6 loopback and reports the peer's address", function()
    server, port = helper.server{ host = "::1", workers = 2, dispatch = dispatch, handler = function(conn)
      local ip, p = conn:peer()
      conn:write(("%s %d\n"):format(ip, p))
      conn:close()
    end }
    local host = server:address()
    assert.are.equal("::1", host)
    local c = helper.connect(port, "::1")
    helper.defer(function() c:close() end)
    local _, myport = c:getsockname()
    assert.are.equal(("::1 %d"):format(myport), helper.line(c))
  end)
end)
end
