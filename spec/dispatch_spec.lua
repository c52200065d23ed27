-- Balancing policies, stats, Unix sockets, and the dispatch options' errors.
local helper = require("spec.helper")
local multiloop = require("multiloop")
local unix = require("socket.unix")

-- Connects and reads the worker greeting of spec/fixtures/whoami.lua.
local function worker_of(c)
  return tonumber(helper.line(c):match("^worker (%d+)"))
end

describe("balance", function()
  for _, dispatch in ipairs { "ipc", "queue" } do
    -- Worker 1 holds 3 long-lived connections, worker 2 none. Round-robin
    -- keeps alternating; least_connections sends the next three to worker 2.
    local function new_workers(balance)
      local server, port = helper.server{ workers = 2, dispatch = dispatch, balance = balance,
                                          handler = "spec.fixtures.whoami" }
      helper.defer(function() server:stop() end)
      local held, all = {}, {}
      helper.defer(function() for _, c in ipairs(held) do c:close() end end)
      for i = 1, 6 do all[i] = helper.connect(port) end   -- 3 on each worker
      -- Every greeting first, then the closes: a close before the acceptor
      -- has handed off the last clients would steer those by the new counts.
      local on = {}
      for i, c in ipairs(all) do on[i] = worker_of(c) end
      for i, c in ipairs(all) do
        if on[i] == 1 then held[#held + 1] = c else c:close() end
      end
      assert.are.equal(3, #held)
      assert.is_truthy(helper.eventually(function()
        local w = server:stats().workers
        return w[1].active == 3 and w[2].active == 0
      end, 5000))
      local got = {}
      for i = 1, 3 do
        local c = helper.connect(port)
        got[i] = worker_of(c)
        held[#held + 1] = c
      end
      return got
    end

    it(("least_connections steers new clients to the idle worker (%s)"):format(dispatch), function()
      assert.are.same({ 2, 2, 2 }, new_workers("least_connections"))
    end)

    it(("round_robin does not (%s)"):format(dispatch), function()
      assert.are.same({ 1, 2, 1 }, new_workers("round_robin"))
    end)
  end
end)

describe("stats", function()
  for _, dispatch in ipairs { "ipc", "queue", "reuseport" } do
    it(("add up, and count connections and bytes (%s)"):format(dispatch), function()
      local server, port = helper.server{ workers = 2, dispatch = dispatch,
                                          handler = "examples.echo_handler" }
      helper.defer(function() server:stop() end)
      local clients = {}
      helper.defer(function() for _, c in ipairs(clients) do c:close() end end)
      for i = 1, 6 do
        clients[i] = helper.connect(port)
        assert.are.equal("0123456789", helper.echo(clients[i], "0123456789"))
      end
      clients[6]:close()
      table.remove(clients)
      -- A worker adds to bytes_out after its write returns, so a client can
      -- hold its echo a moment before the count does: wait for both.
      local s = helper.eventually(function()
        local s = server:stats()
        return s.active == 5 and s.bytes_out == 60 and s
      end) or server:stats()
      assert.is_table(s)
      assert.are.equal(6, s.accepted)
      assert.are.equal(6, s.handed_off)
      assert.are.equal(0, s.accept_errors)
      assert.are.equal(60, s.bytes_in)
      assert.are.equal(60, s.bytes_out)
      local sum = { accepted = 0, active = 0, bytes_in = 0, bytes_out = 0 }
      for _, w in ipairs(s.workers) do
        for k in pairs(sum) do sum[k] = sum[k] + w[k] end
      end
      for k, v in pairs(sum) do assert.are.equal(s[k], v, k) end
      assert.are.equal(2, #s.workers)
      if dispatch ~= "reuseport" then
        assert.are.equal(3, s.workers[1].accepted)   -- round-robin
      end
    end)
  end

  it("are zero, one row per worker, before the first start", function()
    local server = multiloop.server{ port = 0, workers = 2, handler = "examples.echo_handler" }
    local s = server:stats()
    assert.are.equal(0, s.accepted)
    assert.are.equal(0, s.bytes_in)
    assert.are.equal(0, s.threads)
    local zero = { accepted = 0, active = 0, bytes_in = 0, bytes_out = 0, threads = 0,
                   connects = 0, connect_errors = 0, reused = 0, pooled = 0,
                   tls_handshakes = 0, tls_errors = 0, proxy_errors = 0,
                   generation = 0, old_connections = 0 }
    assert.are.same({ zero, zero }, s.workers)
    assert.are.same({ 0, 0, 0, 0 }, { s.connects, s.connect_errors, s.reused, s.pooled })
  end)

  it("keep the last run's figures after stop, and start from zero on a restart", function()
    local server, port = helper.server{ workers = 2, handler = "examples.echo_handler" }
    helper.defer(function() server:stop() end)
    for _ = 1, 3 do
      local c = helper.connect(port)
      assert.are.equal("abcd", helper.echo(c, "abcd"))
      c:close()
    end
    local held = helper.connect(port)            -- still open when stop runs
    helper.defer(function() held:close() end)
    assert.are.equal("xy", helper.echo(held, "xy"))
    server:stop()
    local s = server:stats()
    assert.are.equal(4, s.accepted)
    assert.are.equal(4, s.handed_off)
    assert.are.equal(0, s.active)
    assert.are.equal(14, s.bytes_in)
    assert.are.equal(14, s.bytes_out)
    assert.are.equal(4, s.workers[1].accepted + s.workers[2].accepted)
    assert.are.same(s, server:stats())           -- frozen
    server:start()
    assert.are.equal(0, server:stats().accepted)
  end)
end)

describe("Unix sockets", function()
  local sock_path, connect = helper.sock_path, helper.connect_unix
  local exists = helper.exists

  for _, dispatch in ipairs { "ipc", "queue" } do
    it(("echo over a Unix socket, removed at stop (%s)"):format(dispatch), function()
      local path = sock_path()
      local server = multiloop.server{ path = path, workers = 2, dispatch = dispatch,
                                       handler = function(conn)
        conn:write(("unix %s %s\n"):format(tostring(conn:address()), tostring((conn:peer()))))
        conn:on_data(function(data) conn:write(data) end)
      end }
      server:start()
      helper.defer(function() server:stop() end)
      assert.are.equal(path, server:address())
      assert.is_true(exists(path))
      for _ = 1, 4 do
        local c = connect(path)
        assert.are.equal(("unix %s "):format(path), helper.line(c))
        assert.are.equal("over unix\n", helper.echo(c, "over unix\n"))
        c:close()
      end
      server:stop()
      assert.is_false(exists(path))
    end)
  end

  it("refuses a stale socket file unless unlink = true", function()
    local path = sock_path()
    local stale = assert(unix.stream())
    assert(stale:bind(path))
    stale:close()                          -- leaves the file behind
    assert.is_true(exists(path))
    local server = multiloop.server{ path = path, workers = 1, handler = "examples.echo_handler" }
    local ok, err = pcall(server.start, server)
    assert.is_false(ok)
    assert.matches("multiloop.server: start: bind " .. path .. ": a stale socket file exists "
      .. "(remove it, or pass unlink = true) (EADDRINUSE)", err, 1, true)
    server = multiloop.server{ path = path, unlink = true, workers = 1, handler = "examples.echo_handler" }
    server:start()
    helper.defer(function() server:stop() end)
    local c = connect(path)
    assert.are.equal("fresh\n", helper.echo(c, "fresh\n"))
    c:close()
  end)

  it("never removes a live server's socket, even with unlink = true", function()
    local path = sock_path()
    local first = multiloop.server{ path = path, workers = 1, handler = "examples.echo_handler" }
    first:start()
    helper.defer(function() first:stop() end)
    local second = multiloop.server{ path = path, unlink = true, workers = 1, handler = "examples.echo_handler" }
    local ok, err = pcall(second.start, second)
    assert.is_false(ok)
    assert.matches("bind " .. path .. ": address already in use by a running server (EADDRINUSE)", err, 1, true)
    local c = connect(path)
    assert.are.equal("still mine\n", helper.echo(c, "still mine\n"))
    c:close()
  end)
end)

describe("dispatch options", function()
  local function error_of(opts)
    local ok, err = pcall(multiloop.server, opts)
    assert.is_false(ok)
    return (tostring(err):gsub("^[^:]*:%d+: ", ""))
  end
  it("name what is wrong", function()
    assert.are.equal("multiloop.server: option 'dispatch' 'reuseport' cannot listen on a Unix socket (path): use 'ipc' or 'queue'",
      error_of{ path = "/tmp/x.sock", dispatch = "reuseport", handler = "examples.echo_handler" })
    assert.are.equal("multiloop.server: option 'dispatch' must be one of 'ipc', 'queue', 'reuseport' (got 'fork')",
      error_of{ port = 0, dispatch = "fork", handler = "examples.echo_handler" })
    assert.are.equal("multiloop.server: option 'balance' must be one of 'round_robin', 'least_connections' (got 'random')",
      error_of{ port = 0, balance = "random", handler = "examples.echo_handler" })
    assert.are.equal("multiloop.server: option 'balance' does not apply to dispatch 'reuseport' (the kernel spreads the connections)",
      error_of{ port = 0, dispatch = "reuseport", balance = "round_robin", handler = "examples.echo_handler" })
    assert.are.equal("multiloop.server: option 'path' (a Unix socket) cannot be combined with 'host' or 'port'",
      error_of{ port = 0, path = "/tmp/x.sock", handler = "examples.echo_handler" })
    assert.are.equal("multiloop.server: option 'path' must be a Unix socket path of 1 to 107 bytes (got '')",
      error_of{ path = "", handler = "examples.echo_handler" })
    assert.are.equal("multiloop.server: option 'unlink' must be a boolean (got 1)",
      error_of{ path = "/tmp/x.sock", unlink = 1, handler = "examples.echo_handler" })
  end)
end)
