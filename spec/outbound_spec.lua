-- Outbound connections: worker.tcp() sockets (connect, the pool, timeouts,
-- names), worker.connect in the callback style, and conn:pipe. The
-- upstream is a second multiloop server in this process (loopback, port 0:
-- spec/fixtures/upstream.lua, or examples/echo_handler.lua for the bulk
-- transfers); the cases run in spec/fixtures/outbound.lua.
local helper = require("spec.helper")
local multiloop = require("multiloop")
local socket = require("socket")

local d = multiloop.shared("spec.outbound")

describe("outbound", function()
  local upstream, up_port, server, port

  local function start_upstream(handler, opts)
    opts = opts or {}
    opts.workers = 1
    opts.handler = handler or "spec.fixtures.upstream"
    upstream, up_port = helper.server(opts)
    return up_port
  end

  -- The server under test, 1 worker, the case `commands` unless told, and
  -- a client: the client.
  local function start(opts)
    opts = opts or {}
    opts.workers = opts.workers or 1
    opts.handler = opts.handler or "spec.fixtures.outbound"
    opts.config = opts.config or {}
    opts.config.case = opts.config.case or "commands"
    opts.config.up = opts.config.up or up_port
    server, port = helper.server(opts)
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    return c
  end

  local function ask(c, line)
    assert(c:send(line .. "\n"))
    return helper.line(c)
  end

  before_each(function() start_upstream() end)
  after_each(function()
    helper.stop_checked(server)
    helper.stop_checked(upstream)
    server, upstream = nil, nil
    d:flush()
  end)

  describe("connect", function()
    it("returns nil, 'connection refused' when nobody listens, and counts the failure", function()
      local l = assert(socket.bind("127.0.0.1", 0))
      local _, free = l:getsockname()
      l:close()                              -- a port that was just free
      local c = start()
      assert.are.equal("refused nil connection refused", ask(c, "refused " .. free))
      local st = server:stats()
      assert.are.equal(1, st.connect_errors)
      assert.are.equal(0, st.connects)
      assert.are.equal(1, st.workers[1].connect_errors)
    end)

    it("returns nil, 'timeout' within the connect timeout when a listener's backlog is full", function()
      local lport = helper.full_listener()
      local c = start()
      assert.are.equal("timeout nil timeout true", ask(c, "timeout " .. lport))
    end)

    it("returns nil, 'stopped' at once when the server stops during a connect", function()
      local lport = helper.full_listener()
      local before = helper.fd_count()
      local c = start()
      assert.are.equal("connecting", ask(c, "slowconnect " .. lport))
      socket.sleep(0.1)
      local t0 = socket.gettime()
      assert(server:stop())
      assert.is_true(socket.gettime() - t0 < 2, "stop waited for the connect")
      assert.are.equal(0, server:stats().threads)
      assert.are.equal("nil stopped", d:get("slowconnect"))
      server = nil
      c:close()
      assert.is_true(helper.eventually(function() return helper.fd_count() <= before end))
    end)

    it("still connects during a graceful stop's grace period", function()
      local c = start()
      assert.are.equal("waiting", ask(c, "graceconnect"))
      assert(server:stop({ timeout = 3000 }))
      server = nil
      assert.are.equal("graceconnect 1 nil [hello]", helper.line(c))
    end)

    it("resolves localhost off the loop and connects by name", function()
      local c = start()
      assert.matches("^resolve table: ", ask(c, "resolve localhost"))
      assert.are.equal("connect [hello] nil", ask(c, "connect localhost"))
      assert.are.equal(1, server:stats().connects)
    end)

    it("returns the addresses of a name, and a numeric address as it is", function()
      local c = start({ config = { case = "commands" } })
      -- show() prints a table's address only: ask through a tiny case instead
      assert.matches("^resolve table", ask(c, "resolve 127.0.0.1"))
      assert.matches("^resolve table", ask(c, "resolve ::1"))
    end)

    it("connects to a numeric IPv6 address, bare or in brackets", function()
      local u, p6 = helper.server({ host = "::1", workers = 1, handler = "spec.fixtures.upstream" })
      helper.defer(function() u:stop() end)
      local c = start({ config = { up = p6 } })
      assert.are.equal("connect [hello] nil", ask(c, "connect ::1"))
      assert.are.equal("connect [hello] nil", ask(c, "connect [::1]"))
    end)

    it("reports a name that does not resolve, naming it", function()
      local c = start()
      assert.are.equal("resolve nil nope.invalid could not be resolved (unknown node or service)",
                       ask(c, "resolve nope.invalid"))
      assert.are.equal("connect nil nope.invalid could not be resolved (unknown node or service)",
                       ask(c, "connect nope.invalid"))
    end)

    it("connects to a Unix socket with 'unix:/path'", function()
      local path = helper.sock_path()
      local u = helper.server({ path = path, workers = 1, handler = "spec.fixtures.upstream" })
      helper.defer(function() u:stop() end)
      local c = start({ config = { path = path } })
      assert.are.equal("unix [hello] nil 1", ask(c, "unix"))
    end)

    it("raises on bad arguments, naming what is wrong", function()
      local c = start()
      local got = ask(c, "badargs")
      local want = table.concat({
        "the port must be an integer from 1 to 65535 (got 0)",
        "the port must be an integer from 1 to 65535 (got 70000)",
        "the host must be a string (got number)",
        "the host must be 1 to 253 bytes with no NUL (got 0 bytes)",
        "option 'pool_size' must be an integer from 1 to 100000 (got 0)",
        "option 'backlog' needs option 'pool_size'",
        "option 'pool' must be a string (got number)",
        "a Unix socket path must be 1 to 107 bytes with no NUL (got 0 bytes)",
        "options must be a table (got string)",
        "sock:settimeouts: a timeout must be an integer from 0 to 2147483647 ms (got -1)",
        "worker.resolve: the host must be 1 to 253 bytes with no NUL (got 0 bytes)",
        "worker.connect: the last argument must be a function fn(conn, err)",
        "worker.connect: options must be a table (got number)",
        "bad argument #2 to '?' (connection or socket expected, got number)",
        "bad argument #2 to '?' (a connection cannot be piped to itself)",
      }, "|")
      assert.are.equal(want, got)
    end)

    it("answers nil, 'closed' on a socket that is not connected", function()
      local c = start()
      assert.are.equal("notconnected nil closed nil closed nil closed nil closed nil closed",
                       ask(c, "notconnected"))
    end)
  end)

  describe("the resolver options", function()
    it("checks dns_cache_ttl and dns_max_lookups, in Lua and in the core", function()
      for _, case in ipairs {
        { { dns_cache_ttl = -1 }, "option 'dns_cache_ttl' must be an integer from 0 to 2147483647 (got -1)" },
        { { dns_cache_ttl = "1" }, "option 'dns_cache_ttl' must be an integer from 0 to 2147483647 (got '1')" },
        { { dns_max_lookups = 0 }, "option 'dns_max_lookups' must be an integer from 1 to 64 (got 0)" },
        { { dns_max_lookups = 65 }, "option 'dns_max_lookups' must be an integer from 1 to 64 (got 65)" },
      } do
        local o = { port = 0, handler = "spec.fixtures.upstream", workers = 1 }
        for k, v in pairs(case[1]) do o[k] = v end
        local ok, err = pcall(multiloop.server, o)
        assert.is_false(ok)
        assert.are.equal("multiloop.server: " .. case[2], err)
      end
      local core = require("multiloop.core")
      local base = { workers = 1, port = 0, backlog = 16, max_connections = 0,
                     idle_timeout = 0, write_high_water = 1024, write_low_water = 0,
                     keepalive_seconds = 0, handler_kind = "module", host = "127.0.0.1",
                     handler = "spec.fixtures.upstream", package_path = package.path,
                     package_cpath = package.cpath }
      base.dns_max_lookups = 1000
      local ok, err = pcall(core.new, base)
      assert.is_false(ok)
      assert.are.equal("option 'dns_max_lookups' must be an integer from 1 to 64 (got 1000)", err)
    end)

    it("queues lookups beyond dns_max_lookups, and every one is answered", function()
      local c = start({ dns_max_lookups = 1, dns_cache_ttl = 0 })
      assert.are.equal("lookups 40 40", ask(c, "lookups 40"))
    end)
  end)

  describe("the pool", function()
    it("reuses a kept-alive connection, and the socket lets go of it", function()
      local c = start()
      assert.are.equal("pooled 0 [hello] 1 closed closed 1 [hello] 1 closed closed",
                       ask(c, "pooled"))
      local st = server:stats()
      assert.are.equal(1, st.connects)
      assert.are.equal(1, st.reused)
      assert.are.equal(1, st.pooled)
      assert.are.equal(1, upstream:stats().accepted)
    end)

    it("will not keep a connection with unread bytes: 'connection in dubious state'", function()
      local c = start()
      assert.are.equal("dubious nil connection in dubious state 0", ask(c, "dubious"))
      assert.are.equal(0, server:stats().reused)
    end)

    it("will not keep a connection whose peer sent EOF: 'invalid connection'", function()
      local c = start()
      assert.are.equal("eofkeep [close-soon] nil invalid connection", ask(c, "eofkeep"))
      assert.are.equal(0, server:stats().pooled)
    end)

    it("drops an idle connection its peer closes", function()
      local c = start()
      assert.are.equal("peerclose [close-soon] 1 0 [hello]", ask(c, "peerclose"))
      assert.are.equal(0, server:stats().reused)
    end)

    it("closes the least recently used idle connection beyond pool_size", function()
      local c = start()
      assert.are.equal("lru 1 1 0", ask(c, "lru"))
      -- (no round trip was made: the upstream may take them a little later)
      assert.is_true(helper.eventually(function() return upstream:stats().accepted == 4 end))
      socket.sleep(0.05)
      assert.are.equal(4, upstream:stats().accepted)
    end)

    it("queues connects beyond pool_size in the backlog, and refuses beyond the backlog", function()
      local c = start()
      assert.are.equal("backlog 1 nil:[hello]:0 1 nil:[hello]:1 "
                       .. "nil too many waiting connect operations", ask(c, "backlog"))
      assert.are.equal(1, upstream:stats().accepted)
    end)

    it("closes idle pooled connections when the server stops", function()
      local c = start()
      ask(c, "pooled")
      assert.are.equal(1, server:stats().pooled)
      helper.stop_checked(server)
      server = nil
      assert.is_true(helper.eventually(function() return upstream:stats().active == 0 end))
    end)
  end)

  it("holds 200 outbound connections at once in one worker", function()
    local c = start()
    assert.are.equal("many 200", ask(c, "many 200"))
    assert.are.equal(200, server:stats().connects)
    assert.are.equal(0, server:stats().active - 1)   -- outbound ones hold no slot
  end)

  it("closes open outbound connections at stop, leaking no fd", function()
    local before = helper.fd_count()
    local c = start()
    assert.are.equal("holding", ask(c, "hold"))
    assert.is_true(helper.eventually(function() return upstream:stats().active == 1 end))
    assert(server:stop())
    server = nil
    c:close()
    assert.is_true(helper.eventually(function() return upstream:stats().active == 0 end))
    assert.is_true(helper.eventually(function() return helper.fd_count() <= before + 1 end))
  end)

  describe("conn:pipe", function()
    it("moves bytes both ways until both ends are done, and counts them", function()
      local c = start()
      assert.are.equal("piping", ask(c, "pipe"))
      assert.are.equal("[one]", ask(c, "one"))
      assert.are.equal("[two]", ask(c, "two"))
      c:shutdown("send")                     -- upstream's receive sees EOF, returns, closes
      local rest, err, partial = c:receive("*a")   -- nothing more: LuaSocket says "closed"
      assert.are.same({ nil, "closed", "" }, { rest, err, partial })
      assert.is_true(helper.eventually(function() return d:get("pipe") ~= nil end))
      assert.are.equal("8 12 nil", d:get("pipe"))
    end)

    it("ends with nil, 'timeout' when no byte moves either way for its timeout", function()
      local c = start()
      c:send("pipeidle\n")
      assert.are.equal("piping conn:pipe: option 'timeout' must be an integer from 0 to 2147483647 ms (got -1)",
                       helper.line(c))
      assert.is_true(helper.eventually(function() return d:get("pipe") ~= nil end, 3000))
      assert.are.equal("nil timeout 0 0 true", d:get("pipe"))
      local rest, err = c:receive("*l")
      assert.are.same({ nil, "closed" }, { rest, err })
    end)

    it("holds both connections: a socket collected meanwhile cuts nothing (callback form)", function()
      local c = start()
      assert.are.equal("piping", ask(c, "pipegc"))
      assert.are.equal("[one]", ask(c, "one"))
      c:shutdown("send")
      assert.is_true(helper.eventually(function() return d:get("pipe") ~= nil end))
      assert.are.equal("nil closed | 4 6 nil", d:get("pipe"))
    end)

    it("forwards a half-close: the upstream reads to EOF and still answers", function()
      local c = start()
      assert.are.equal("piping", ask(c, "pipe"))
      assert(c:send("all\n" .. string.rep("x", 100000)))
      c:shutdown("send")
      assert.are.equal("got 100000", helper.line(c))
      assert.is_true(helper.eventually(function() return d:get("pipe") ~= nil end))
      assert.are.equal("100004 11 nil", d:get("pipe"))
    end)

    it("moves 64 MiB each way through an echo upstream #stress", function()
      helper.stop_checked(upstream)
      start_upstream("examples.echo_handler")
      local c = start()
      assert.are.equal("piping", ask(c, "pipe"))
      local payload = string.rep("0123456789abcdef", 4 * 1024 * 1024)
      local back = helper.echo_big(c, payload, 60)
      assert.are.equal(#payload, #back)
      assert.is_true(back == payload)
    end)

    it("keeps memory bounded when the client stops reading", function()
      helper.stop_checked(upstream)
      start_upstream("examples.echo_handler")
      local c = start({ write_high_water = 256 * 1024, write_low_water = 64 * 1024 })
      assert.are.equal("piping", ask(c, "pipe"))
      c:settimeout(0)
      local chunk, sent = string.rep("y", 65536), 0
      local deadline = socket.gettime() + 3
      while sent < 64 * 1024 * 1024 and socket.gettime() < deadline do
        local n, err, partial = c:send(chunk)
        sent = sent + (n or partial)
        if not n then
          assert.are.equal("timeout", err)
          socket.select(nil, { c }, 0.05)
        end
      end
      assert.is_true(sent < 64 * 1024 * 1024, "the client's sends never blocked")
      socket.sleep(0.2)
      local st = server:stats()
      -- What the proxy holds: read and not yet written. Its queues are bounded
      -- by write_high_water plus one read each way.
      assert.is_true(st.bytes_in - st.bytes_out < 2 * 1024 * 1024,
                     ("the proxy holds %d bytes"):format(st.bytes_in - st.bytes_out))
      c:settimeout(helper.TIMEOUT)
    end)
  end)

  describe("worker.connect (callback style)", function()
    it("connects and hands the callback a connection with on_data; errors name the reason", function()
      helper.stop_checked(upstream)
      start_upstream("examples.echo_handler")
      local c = start({ handler = "spec.fixtures.outbound_callback" })
      assert.are.equal("up", helper.line(c))
      assert.are.equal("echo:ping", ask(c, "ping"))
      assert.are.equal("refused:nil:connection refused", ask(c, "refused"))
      assert.are.equal("piped", ask(c, "pipe"))
      assert.are.equal("through", ask(c, "through"))
    end)
  end)
end)
