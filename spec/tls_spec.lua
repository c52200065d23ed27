-- TLS servers (issue 16): the `tls` option, over real loopback sockets.
-- Throwaway certificates come from helper.make_certs (the openssl CLI), made
-- once for this file. The clients: LuaSec (Debian lua-sec) in this process,
-- for echo in both handler styles, conn:tls(), SNI, ALPN, client
-- certificates and close_notify; raw LuaSocket for the peers that break
-- the protocol (plaintext, garbage, half a ClientHello, a reset mid-record),
-- each of which must close its one connection, count in stats().tls_errors
-- and leave the worker serving; and, as child processes (#child, which
-- `make tsan` leaves out: no shell runs under TSan), `openssl s_client` for
-- ALPN, SNI and resumption on another worker, and curl against
-- examples/http_hello.lua over TLS.
local helper = require("spec.helper")
local multiloop = require("multiloop")
local socket = require("socket")

local d = multiloop.shared("spec.tls")

-- A command's stdout and stderr (a child process: not under the sanitizer
-- that may be preloaded into this one), and whether it exited 0.
local function run(cmd)
  local p = assert(io.popen("env -u LD_PRELOAD " .. cmd .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  return out, ok
end

-- A copy of t with the fields of u over it.
local function with(t, u)
  local r = {}
  for k, v in pairs(t) do r[k] = v end
  for k, v in pairs(u or {}) do r[k] = v end
  return r
end

-- The fields of an info line (spec/fixtures/tls.lua).
local function fields(line)
  local t = {}
  for k, v in line:gmatch("(%w+)=(%S+)") do t[k] = v end
  return t
end

-- Bytes a client reads until the server closes, and how it ended: "closed",
-- or the error ("timeout": the server never closed).
local function until_closed(c)
  local data, err, partial = c:receive("*a")
  if data then return data, "closed" end
  return partial, err
end

-- The handshake_timeout of the timeout cases, which also bounds the
-- handshake of the good clients they make: under valgrind one handshake
-- took over 200 ms.
local HS_TIMEOUT = os.getenv("SANITIZER") == "valgrind" and 3000 or 400

-- Seconds a stop without grace may take: it does not wait for the
-- handshakes (20 s read timeouts, 10 s handshake_timeout); valgrind is slow
-- to join the workers.
local STOP_BOUND = os.getenv("SANITIZER") == "valgrind" and 15 or 3

describe("tls", function()
  local certs, server, port

  setup(function() certs = helper.make_certs() end)
  teardown(function() certs.remove() end)

  after_each(function()
    helper.stop_checked(server)
    server = nil
    d:flush()
  end)

  local function tls(extra)
    return with({ cert = certs.cert, key = certs.key }, extra)
  end

  -- The cases of spec/fixtures/tls_callback.lua; the others are
  -- spec/fixtures/tls.lua's (serve style).
  local CALLBACK = { callback = true, greet_close = true, greet_big = true }

  -- A TLS server running `case`; 1 worker unless opts say otherwise.
  local function start(case, tls_opts, opts)
    opts = opts or {}
    opts.workers = opts.workers or 1
    opts.handler = CALLBACK[case] and "spec.fixtures.tls_callback" or "spec.fixtures.tls"
    opts.config = { case = case }
    opts.tls = tls_opts or tls()
    server, port = helper.server(opts)
    return port
  end

  -- A verifying LuaSec client of the server just started.
  local function client(params)
    return assert(helper.tls_connect(port, with({ cafile = certs.ca, sni = "localhost" }, params)))
  end

  local function tls_errors(worker)
    local st = server:stats()
    return worker and st.workers[worker].tls_errors or st.tls_errors
  end

  local function line(s) return helper.line(s) end

  for _, style in ipairs({ "serve", "callback" }) do
    local case = style == "serve" and "echo" or "callback"

    describe("echo in the " .. style .. " style", function()
      it("returns what a LuaSec client sends, verified against the CA", function()
        start(case)
        local s = client()
        assert.are.equal("hello\n", helper.echo(s, "hello\n"))
        assert.are.equal("TLSv1.3", s:info().protocol)
        assert.are.equal("localhost", s:getpeercertificate():subject()[1].value)
        local verified = s:getpeerverification()
        assert.is_true(verified)
        assert.are.equal(0, tls_errors())
      end)

      it("echoes a 16 MiB payload each way #stress", function()
        start(case)
        local s = client()
        local chunk = {}
        for i = 0, 255 do chunk[#chunk + 1] = string.char(i) end
        local payload = string.rep(table.concat(chunk), 16 * 1024 * 1024 // 256)
        local got = helper.echo_big(s, payload, 120)
        assert.are.equal(#payload, #got)
        assert.is_true(got == payload, "the echo differs from what was sent")
        assert.are.equal(0, tls_errors())
      end)

      it("serves 20 clients at once over 2 workers", function()
        start(case, nil, { workers = 2 })
        local clients = {}
        for i = 1, 20 do clients[i] = client() end
        for i = 1, 20 do
          local msg = ("client %d\n"):format(i)
          assert.are.equal(msg, helper.echo(clients[i], msg))
        end
        local st = server:stats()
        assert.are.equal(20, st.accepted)
        assert.is_true(st.workers[1].accepted > 0 and st.workers[2].accepted > 0)
        assert.are.equal(20, st.tls_handshakes)
        assert.are.equal(20, st.workers[1].tls_handshakes + st.workers[2].tls_handshakes)
        assert.are.equal(0, st.tls_errors)
      end)
    end)
  end

  describe("conn:tls()", function()
    it("gives version, cipher, sni and resumed = false for a TLS 1.3 client (serve)", function()
      start("commands")
      local s = client()
      assert(s:send("info\n"))
      local t = fields(line(s))
      assert.are.same({ version = "TLSv1.3", cipher = s:info().cipher, alpn = "nil",
                        sni = "localhost", resumed = "false", worker = "1" }, t)
    end)

    it("gives the same in the callback style", function()
      start("callback")
      local s = client()
      assert(s:send("info\n"))
      assert.are.same({ version = "TLSv1.3", cipher = s:info().cipher, alpn = "nil",
                        sni = "localhost", resumed = "false", worker = "1" }, fields(line(s)))
    end)

    it("gives TLSv1.2 and its cipher for a TLS 1.2 client, and no sni when none was sent", function()
      start("commands")
      local s = client({ protocol = "tlsv1_2", sni = false })
      assert(s:send("info\n"))
      local t = fields(line(s))
      assert.are.equal("TLSv1.2", t.version)
      assert.are.equal(s:info().cipher, t.cipher)
      assert.are.equal("nil", t.sni)
    end)

    it("gives the ALPN protocol picked in the server's order of preference", function()
      start("commands", tls({ alpn = { "h2", "http/1.1" } }))
      local s = client({ alpn = { "http/1.1", "h2" } })
      assert.are.equal("h2", s:getalpn())
      assert(s:send("info\n"))
      assert.are.equal("h2", fields(line(s)).alpn)
      local s2 = client({ alpn = { "http/1.1" } })
      assert.are.equal("http/1.1", s2:getalpn())
      assert(s2:send("info\n"))
      assert.are.equal("http/1.1", fields(line(s2)).alpn)
    end)

    it("picks no ALPN protocol when none is in common, and the handshake goes on", function()
      start("commands", tls({ alpn = { "h2" } }))
      local s = client({ alpn = { "spdy/1" } })
      assert.is_nil(s:getalpn())
      assert(s:send("info\n"))
      assert.are.equal("nil", fields(line(s)).alpn)
    end)

    it("says established = false as serve starts, then the client certificate", function()
      start("early", tls({ ca = certs.ca, verify_client = true }))
      local s = client({ certificate = certs.client_cert, key = certs.client_key })
      assert(s:send("x\n"))
      assert.are.equal("early false nil then true /CN=multiloop spec client true", line(s))
    end)

    it("with verify_client 'optional', takes a client without a certificate", function()
      start("early", tls({ ca = certs.ca, verify_client = "optional" }))
      local s = client()
      assert(s:send("x\n"))
      assert.are.equal("early false nil then true nil nil", line(s))
      local s2 = client({ certificate = certs.client_cert, key = certs.client_key })
      assert(s2:send("x\n"))
      assert.are.equal("early false nil then true /CN=multiloop spec client true", line(s2))
      assert.are.equal(0, tls_errors())
    end)

    it("is nil on a plain connection", function()
      server, port = helper.server({ workers = 1, handler = "spec.fixtures.tls",
                                     config = { case = "commands" } })
      local c = helper.connect(port)
      helper.defer(function() c:close() end)
      assert(c:send("info\n"))
      assert.are.equal("plain worker=1", helper.line(c))
    end)
  end)

  describe("certificates", function()
    -- The CN of the certificate the server shows for `name` (nil: no SNI).
    local function subject(name)
      local s = client({ sni = name or false })
      local cn = s:getpeercertificate():subject()[1].value
      s:close()
      return cn
    end

    it("picks the certificate by SNI, the default one for other names or none", function()
      start("commands", tls({ sni = { ["a.example"] = { cert = certs.sni_cert, key = certs.sni_key },
                                      ["b.example"] = { cert = certs.sni_cert, key = certs.sni_key } } }))
      assert.are.equal("a.example", subject("a.example"))
      assert.are.equal("a.example", subject("b.example"))
      assert.are.equal("localhost", subject("localhost"))
      assert.are.equal("localhost", subject("c.example"))
      assert.are.equal("localhost", subject(nil))
      assert.are.equal("a.example", subject("A.Example"))   -- names are case-insensitive
      local s = client({ sni = "b.example" })
      assert(s:send("info\n"))
      assert.are.equal("b.example", fields(line(s)).sni)
      assert.are.equal(0, tls_errors())
    end)

    it("negotiates ALPN for a name with its own certificate too", function()
      start("commands", tls({ alpn = { "h2", "http/1.1" },
                              sni = { ["a.example"] = { cert = certs.sni_cert, key = certs.sni_key } } }))
      local s = client({ sni = "a.example", alpn = { "http/1.1", "h2" } })
      assert.are.equal("a.example", s:getpeercertificate():subject()[1].value)
      assert.are.equal("h2", s:getalpn())
      assert(s:send("info\n"))
      local t = fields(line(s))
      assert.are.equal("h2", t.alpn)
      assert.are.equal("a.example", t.sni)
    end)

    it("with verify_client, verifies a client that asks for a name with its own certificate", function()
      start("early", tls({ ca = certs.ca, verify_client = true,
                           sni = { ["a.example"] = { cert = certs.sni_cert, key = certs.sni_key } } }))
      local s = client({ sni = "a.example", certificate = certs.client_cert, key = certs.client_key })
      assert(s:send("x\n"))
      assert.are.equal("early false nil then true /CN=multiloop spec client true", line(s))
      local s2, err = helper.tls_connect(port, { cafile = certs.ca, sni = "a.example" })
      local got
      if s2 then
        s2:send("x\n")
        got, err = s2:receive("*l")
      end
      assert.is_nil(got, "served a client without a certificate")
      assert.is_truthy(err)
    end)

    it("with verify_client, takes a client certificate from the CA and refuses none", function()
      start("commands", tls({ ca = certs.ca, verify_client = true }))
      local s = client({ certificate = certs.client_cert, key = certs.client_key })
      assert.are.equal("hi!", (function() assert(s:send("hi\n")) return line(s) end)())
      -- Without a certificate: in TLS 1.3 the client's handshake may finish
      -- before the server's verdict, which then comes as an alert on the
      -- first read; either way nothing is served.
      local s2, err = helper.tls_connect(port, { cafile = certs.ca, sni = "localhost" })
      local got
      if s2 then
        s2:send("hi\n")
        got, err = s2:receive("*l")
      end
      assert.is_nil(got)
      assert.is_truthy(err)
      assert.is_true(helper.eventually(function() return tls_errors() == 1 end))
      -- A self-signed client certificate is refused too.
      local s3, err3 = helper.tls_connect(port, { cafile = certs.ca, sni = "localhost",
                                                 certificate = certs.self_cert, key = certs.self_key })
      local got3
      if s3 then
        s3:send("hi\n")
        got3, err3 = s3:receive("*l")
      end
      assert.is_nil(got3)
      assert.is_truthy(err3)
      assert.is_true(helper.eventually(function() return tls_errors() == 2 end))
      assert(s:send("still\n"))
      assert.are.equal("still!", line(s))
    end)

    it("with min_version TLSv1.3, refuses a TLS 1.2 client and takes a 1.3 one", function()
      start("commands", tls({ min_version = "TLSv1.3" }))
      local s, err = helper.tls_connect(port, { cafile = certs.ca, protocol = "tlsv1_2" })
      assert.is_nil(s)
      assert.is_truthy(err:find("protocol version", 1, true), err)
      assert.is_true(helper.eventually(function() return tls_errors() == 1 end))
      local ok = client()
      assert(ok:send("info\n"))
      assert.are.equal("TLSv1.3", fields(line(ok)).version)
    end)
  end)

  -- A real ClientHello (LuaSec's, for "localhost"), caught by a plain
  -- listener in this process: the bytes of its first record.
  local function client_hello()
    local ssl = require("ssl")
    local l = assert(socket.bind("127.0.0.1", 0))
    local _, lport = l:getsockname()
    local c = helper.connect(lport)
    local s = assert(ssl.wrap(c, { mode = "client", protocol = "any", verify = "none" }))
    s:sni("localhost")
    s:settimeout(0)
    s:dohandshake()                      -- sends the ClientHello, then "wantread"
    l:settimeout(helper.TIMEOUT)
    local a = assert(l:accept())
    a:settimeout(helper.TIMEOUT)
    local head = assert(a:receive(5))
    local body = assert(a:receive(head:byte(4) * 256 + head:byte(5)))
    s:close()
    a:close()
    l:close()
    assert(head:byte(1) == 22, "not a handshake record")
    return head .. body
  end

  for _, style in ipairs({ "serve", "callback" }) do
    local case = style == "serve" and "commands" or "callback"

    -- Each failure: one worker with an established TLS client (`keep`); the
    -- bad peer's connection closes within `bound` s, is counted once in
    -- tls_errors (the total and the worker's), `keep` still works and so
    -- does a new client. In the callback style, on_close's reason is the
    -- one expected (nil: any).
    describe("failures, " .. style .. " style", function()
      local function check(bad, opts)
        opts = opts or {}
        start(case, tls(opts.tls))
        local keep = client()
        assert(keep:send("ping\n"))
        assert.are.equal(style == "serve" and "ping!" or "ping", line(keep))
        local c = helper.connect(port)
        helper.defer(function() c:close() end)
        local t0 = socket.gettime()
        local got, how = bad(c)
        local took = socket.gettime() - t0
        assert.are.equal("closed", how, "the server did not close the bad connection")
        assert.is_true(took < (opts.bound or 3), ("closed after %.2f s"):format(took))
        assert.is_true(helper.eventually(function() return tls_errors() == 1 end),
                       ("tls_errors is %s"):format(tostring(tls_errors())))
        assert.are.equal(1, tls_errors(1))
        assert(keep:send("pong\n"))
        assert.are.equal(style == "serve" and "pong!" or "pong", line(keep))
        local fresh = client()
        assert(fresh:send("new\n"))
        assert.are.equal(style == "serve" and "new!" or "new", line(fresh))
        assert.are.equal(1, tls_errors())
        if style == "callback" and opts.reason then
          assert.is_true(helper.eventually(function()
            return d:get("close " .. opts.reason) == 1
          end), "on_close was not told " .. opts.reason)
        end
        return got, took
      end

      it("closes a plaintext client", function()
        local got = check(function(c)
          assert(c:send("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"))
          return until_closed(c)
        end, { reason = "tls" })
        assert.is_nil(got:find("HTTP", 1, true), got)
      end)

      it("closes a client that sends garbage instead of a ClientHello", function()
        check(function(c)
          local junk = {}
          for i = 1, 512 do junk[i] = string.char((i * 37 + 11) % 256) end
          assert(c:send(table.concat(junk)))
          return until_closed(c)
        end, { reason = "tls" })
      end)

      it("closes a client that sends a handshake record header with a bad length", function()
        check(function(c)
          assert(c:send("\22\3\1\255\255" .. string.rep("\0", 64)))
          return until_closed(c)
        end, { reason = "tls", bound = 3 })
      end)

      it("closes a client that sends its ClientHello and then its EOF", function()
        local hello = client_hello()
        check(function(c)
          assert(c:send(hello))
          c:shutdown("send")
          local data, how = until_closed(c)
          return data, how
        end, { reason = "tls" })
      end)

      it("closes a client that resets after the ServerHello", function()
        local hello = client_hello()
        check(function(c)
          assert(c:send(hello))
          assert(c:receive(5))             -- the ServerHello: the server is in the handshake
          assert(c:setoption("linger", { on = true, timeout = 0 }))
          c:close()
          return "", "closed"
        end, { reason = "ECONNRESET" })          -- the socket's error, as on plain TCP
      end)

      it("closes a client that sends half a ClientHello and stalls past handshake_timeout", function()
        local hello = client_hello()
        local _, took = check(function(c)
          assert(c:send(hello:sub(1, #hello // 2)))
          return until_closed(c)
        end, { tls = { handshake_timeout = HS_TIMEOUT }, reason = "timeout",
               bound = HS_TIMEOUT / 1000 + 3 })
        assert.is_true(took >= HS_TIMEOUT / 1000 * 0.9,
                       ("closed after %.3f s, before handshake_timeout"):format(took))
      end)

      it("closes a client that connects and sends nothing, past handshake_timeout", function()
        local _, took = check(function(c)
          return until_closed(c)
        end, { tls = { handshake_timeout = HS_TIMEOUT }, reason = "timeout",
               bound = HS_TIMEOUT / 1000 + 3 })
        assert.is_true(took >= HS_TIMEOUT / 1000 * 0.9,
                       ("closed after %.3f s, before handshake_timeout"):format(took))
      end)

      it("takes a whole ClientHello sent a byte at a time within handshake_timeout", function()
        start(case, tls({ handshake_timeout = HS_TIMEOUT * 10 }))
        local hello = client_hello()
        local c = helper.connect(port)
        helper.defer(function() c:close() end)
        c:setoption("tcp-nodelay", true)
        for i = 1, #hello do
          assert(c:send(hello:sub(i, i)))
          if i % 16 == 0 then socket.sleep(0.001) end
        end
        -- The ServerHello comes back: a handshake record.
        local head = assert(c:receive(5))
        assert.are.equal(22, head:byte(1))
        assert.are.equal(0, tls_errors())
      end)

      it("closes a peer that resets mid-record after the handshake", function()
        start(case)
        local keep = client()
        local s, raw = client()
        assert(s:send("ping\n"))
        assert.are.equal(style == "serve" and "ping!" or "ping", line(s))
        -- The raw socket under LuaSec: an application-data record header
        -- that promises 16000 bytes, 100 of them, then a reset (LuaSec's
        -- close adds its close_notify inside the promised record, then
        -- closes with SO_LINGER 0).
        raw:setfd(s:getfd())
        assert(raw:setoption("linger", { on = true, timeout = 0 }))
        assert(raw:send("\23\3\3\62\128" .. string.rep("x", 100)))
        socket.sleep(0.05)
        raw:setfd(socket._SOCKETINVALID)
        s:close()
        assert.is_true(helper.eventually(function() return tls_errors() == 1 end),
                       ("tls_errors is %s"):format(tostring(tls_errors())))
        assert(keep:send("pong\n"))
        assert.are.equal(style == "serve" and "pong!" or "pong", line(keep))
        assert.is_true(helper.eventually(function() return server:stats().active == 1 end))
        if style == "callback" then      -- the reset, or the record cut short (seen both)
          assert.is_true(helper.eventually(function()
            return d:get("close ECONNRESET") == 1 or d:get("close tls") == 1
          end), "on_close: " .. table.concat(d:keys(0), ","))
        end
      end)
    end)
  end

  describe("tls.starttls and conn:sslhandshake() on an accepted connection", function()
    it("upgrades a connection after a plaintext STARTTLS", function()
      start("starttls", tls({ starttls = true }))
      local c = helper.connect(port)
      helper.defer(function() c:close() end)
      assert(c:send("STARTTLS\n"))
      assert.are.equal("OK nil", helper.line(c))
      local ssl = require("ssl")
      local s = assert(ssl.wrap(c, { mode = "client", protocol = "any", verify = "peer",
                                     cafile = certs.ca, options = "all" }))
      helper.defer(function() s:close() end)
      s:settimeout(helper.TIMEOUT)
      s:sni("localhost")
      assert(s:dohandshake())
      assert(s:send("info\n"))
      local t = fields(line(s))
      assert.are.equal("TLSv1.3", t.version)
      assert.are.equal("localhost", t.sni)
      assert.are.equal("true nil", d:get("starttls"))
      assert(s:send("hi\n"))
      assert.are.equal("hi!", line(s))
    end)

    it("leaves a connection that does not ask for it in plaintext", function()
      start("starttls", tls({ starttls = true }))
      local c = helper.connect(port)
      helper.defer(function() c:close() end)
      assert(c:send("hello\n"))
      assert.are.equal("plain hello", helper.line(c))
      assert.are.equal(0, tls_errors())
    end)

    it("fails a client that answers the upgrade with garbage, counted", function()
      start("starttls", tls({ starttls = true }))
      local c = helper.connect(port)
      helper.defer(function() c:close() end)
      assert(c:send("STARTTLS\n"))
      assert.are.equal("OK nil", helper.line(c))
      assert(c:send(string.rep("\1\2\3 not tls ", 20)))
      local _, how = until_closed(c)
      assert.are.equal("closed", how)
      assert.is_true(helper.eventually(function() return d:get("starttls") ~= nil end))
      assert.is_truthy(d:get("starttls"):find("^nil "), d:get("starttls"))
      assert.is_true(helper.eventually(function() return tls_errors() == 1 end))
    end)
  end)

  it("terminates TLS in front of a plain upstream with examples/proxy.lua", function()
    local up, up_port = helper.server({ workers = 1, handler = "examples.echo_handler" })
    helper.defer(function() helper.stop_checked(up) end)
    server, port = helper.server({ workers = 2, handler = "examples.proxy", tls = tls(),
                                   config = { upstreams = { "127.0.0.1:" .. up_port } } })
    local s = client()
    local payload = string.rep("0123456789abcdef", 4 * 1024 * 1024 // 16)
    assert.is_true(helper.echo_big(s, payload, 60) == payload, "the echo differs")
    assert.are.equal("tail\n", helper.echo(s, "tail\n"))
    assert.are.equal(0, server:stats().tls_errors)
  end)

  -- Through spec/fixtures/tls_dribble.lua: the server reads every record
  -- of the client's, its ClientHello included, 7 bytes at a time.
  for _, case in ipairs({ "echo", "callback" }) do
    it("takes records that arrive 7 bytes at a time (" .. case .. ")", function()
      start(case)
      local relay, relay_port = helper.server({ workers = 1, handler = "spec.fixtures.tls_dribble",
                                                config = { up = port } })
      helper.defer(function() helper.stop_checked(relay) end)
      local s = assert(helper.tls_connect(relay_port, { cafile = certs.ca, sni = "localhost" }))
      s:settimeout(30)
      assert.are.equal("hello\n", helper.echo(s, "hello\n"))
      local payload = string.rep("0123456789", 6554)
      assert.is_true(helper.echo(s, payload) == payload, "the echo differs")
      assert.are.equal(0, tls_errors())
      assert.are.equal(1, server:stats().tls_handshakes)
    end)
  end

  describe("writes before the handshake ends", function()
    it("are held and sent after it: 3 MiB from serve", function()
      start("greet")
      local s = client()
      s:settimeout(30)
      assert.are.equal(3 * 1024 * 1024, #line(s))
      assert(s:send("hi\n"))
      assert.are.equal("hi!", line(s))
    end)

    it("are held and sent after it: 3 MiB from connect (callback)", function()
      start("greet_big")
      local s = client()
      s:settimeout(30)
      assert.are.equal(3 * 1024 * 1024, #line(s))
      assert.are.equal("x", helper.echo(s, "x"))
    end)

    it("and a close: the client gets the bytes, then close_notify", function()
      start("greet_close")
      local s = client()
      assert.are.same({ "bye\n", "closed" }, { until_closed(s) })
      assert.is_true(helper.eventually(function() return d:get("close nil") == 1 end),
                     "on_close: " .. table.concat(d:keys(0), ","))
      assert.are.equal(0, tls_errors())
    end)
  end)

  it("counts no TLS error for a client that connects and closes at once (a health check)", function()
    start("callback")
    for _ = 1, 5 do
      local c = helper.connect(port)
      c:close()
    end
    assert.is_true(helper.eventually(function() return server:stats().active == 0 end))
    assert.are.equal(0, tls_errors())
    assert.are.equal("x", helper.echo(client(), "x"))
  end)

  describe("with other server options", function()
    for _, dispatch in ipairs({ "reuseport", "queue", "ipc" }) do
      it("echoes with dispatch " .. dispatch .. " on 2 workers", function()
        start("echo", nil, { workers = 2, dispatch = dispatch })
        for i = 1, 6 do
          assert.are.equal("m" .. i, helper.echo(client(), "m" .. i))
        end
        assert.are.equal(6, server:stats().tls_handshakes)
      end)
    end

    it("serves TLS again after a stop and a new start, and resumes across the restart", function()
      start("commands", nil, { workers = 2 })
      assert.are.equal("a!", (function() local s = client() assert(s:send("a\n")) return line(s) end)())
      assert(server:stop())
      server:start()
      local _, p = server:address()
      port = p
      local s = client()
      assert(s:send("info\n"))
      assert.are.equal("TLSv1.3", fields(line(s)).version)
      assert.are.equal(1, server:stats().tls_handshakes)   -- a restart counts from zero
    end)

    it("counts the queued ciphertext for write_high_water: write returns false, then on_drain", function()
      start("callback")
      local s = client()
      assert(s:send("flood\n"))
      socket.sleep(0.3)                    -- not reading: the queue fills
      s:settimeout(30)
      local n = 0
      local last
      repeat
        last = line(s)
        if last == string.rep("f", 65535) then n = n + 1 end
      until last:sub(1, 5) == "flood"
      local writes, buffered = last:match("^flood (%d+) (%d+)$")
      writes, buffered = tonumber(writes), tonumber(buffered)
      assert.is_true(writes < 2000, "write never returned false")
      assert.are.equal(writes, n)
      assert.is_true(buffered >= 1024 * 1024, "buffered " .. buffered .. " under write_high_water")
      assert.is_true(buffered < 1024 * 1024 + 2 * 65536 + 4096, "buffered " .. buffered)
      assert.are.equal("drained", line(s))
    end)

    it("keeps what arrives while serve is not reading (4 MiB), every byte once", function()
      start("slowread")
      local s = client()
      local payload = {}
      for i = 1, 4 * 1024 * 1024 // 4096 do payload[i] = string.rep(string.char(i % 256), 4096) end
      payload = table.concat(payload)
      local sum = 0
      for i = 1, #payload, 4096 do
        local chunk = { payload:byte(i, math.min(i + 4095, #payload)) }
        for j = 1, #chunk do sum = (sum + chunk[j] * ((i + j) % 251 + 1)) % 0x7fffffff end
      end
      s:settimeout(30)
      assert(s:send(#payload .. "\n"))
      assert(s:send(payload))
      assert.are.equal(("slow %d %d"):format(#payload, sum), line(s))
      assert(s:send("after\n"))
      assert.are.equal("after!", line(s))
    end)

    it("matches SNI names given in any case in the option", function()
      start("commands", tls({ sni = { ["A.Example"] = { cert = certs.sni_cert, key = certs.sni_key } } }))
      local s = client({ sni = "a.example" })
      assert.are.equal("a.example", s:getpeercertificate():subject()[1].value)
    end)

    it("serves TLS on a Unix socket", function()
      local path = helper.sock_path()
      server = helper.server({ workers = 1, path = path, handler = "spec.fixtures.tls",
                               config = { case = "commands" }, tls = tls() })
      local ssl = require("ssl")
      local c = helper.connect_unix(path)
      local s = assert(ssl.wrap(c, { mode = "client", protocol = "any", verify = "peer",
                                     cafile = certs.ca, options = "all" }))
      helper.defer(function() s:close() end)
      s:settimeout(helper.TIMEOUT)
      assert(s:dohandshake())
      assert(s:send("info\n"))
      assert.are.equal("TLSv1.3", fields(line(s)).version)
    end)

    it("closes an idle TLS connection at idle_timeout, with close_notify", function()
      start("callback", nil, { idle_timeout = 300 })
      local s = client()
      assert.are.equal("x", helper.echo(s, "x"))
      local t0 = socket.gettime()
      assert.are.same({ "", "closed" }, { until_closed(s) })
      assert.is_true(socket.gettime() - t0 >= 0.25)
      assert.is_true(helper.eventually(function() return d:get("close timeout") == 1 end))
      assert.are.equal(0, tls_errors())
    end)

    it("stops at once with connections in the handshake and established", function()
      start("commands", nil, { workers = 2 })
      local est = client()
      local hello = client_hello()
      local half = {}
      for i = 1, 4 do
        half[i] = helper.connect(port)
        helper.defer(function() half[i]:close() end)
        assert(half[i]:send(hello:sub(1, 40)))
      end
      assert.is_true(helper.eventually(function() return server:stats().active == 5 end),
                     "active: " .. server:stats().active)
      local t0 = socket.gettime()
      assert(server:stop())                -- no grace: everything closes now
      assert.is_true(socket.gettime() - t0 < STOP_BOUND, "stop took too long")
      assert.are.equal(0, server:stats().threads)
      server = nil
      assert.are.equal("closed", select(2, until_closed(half[1])))
      local _, err = est:receive("*l")
      assert.is_truthy(err)
    end)

    it("handshakes 40 clients at once over 2 workers", function()
      start("commands", nil, { workers = 2 })
      local ssl = require("ssl")
      local pending, all = {}, {}
      for i = 1, 40 do
        local c = helper.connect(port)
        local s = assert(ssl.wrap(c, { mode = "client", protocol = "any", verify = "peer",
                                       cafile = certs.ca, options = "all" }))
        helper.defer(function() s:close() end)
        s:sni("localhost")
        s:settimeout(0)
        pending[s], all[i] = true, s
      end
      local deadline = socket.gettime() + 30
      while next(pending) do
        assert(socket.gettime() < deadline, "the handshakes did not finish")
        local rd, wr = {}, {}
        for s in pairs(pending) do
          local ok, err = s:dohandshake()
          if ok then
            pending[s] = nil
          elseif err == "wantread" then
            rd[#rd + 1] = s
          elseif err == "wantwrite" then
            wr[#wr + 1] = s
          else
            error("handshake: " .. tostring(err))
          end
        end
        if next(pending) then socket.select(rd, wr, 0.1) end
      end
      for i, s in ipairs(all) do
        s:settimeout(helper.TIMEOUT)
        assert(s:send(i .. "\n"))
      end
      for i, s in ipairs(all) do assert.are.equal(i .. "!", line(s)) end
      local st = server:stats()
      assert.are.equal(40, st.tls_handshakes)
      assert.is_true(st.workers[1].tls_handshakes > 0 and st.workers[2].tls_handshakes > 0)
      assert.are.equal(0, st.tls_errors)
    end)
  end)

  describe("close_notify", function()
    it("is sent when serve returns: LuaSec reads a clean close", function()
      start("commands")
      local s = client()
      assert(s:send("hi\nbye\n"))
      local data, err = s:receive("*a")
      assert.are.equal("hi!\n", data, err)
    end)

    it("is sent by conn:close() in the callback style", function()
      start("callback")
      local s = client()
      assert(s:send("abc"))
      assert.are.equal("abc", s:receive(3))
      assert(s:send("close\n"))
      -- LuaSocket's "*a" says "closed" when it read nothing; without a
      -- close_notify, LuaSec says "unexpected eof while reading".
      assert.are.same({ "", "closed" }, { until_closed(s) })
    end)

    it("is sent by conn:shutdown() in the callback style", function()
      start("callback")
      local s = client()
      assert(s:send("shutdown\n"))
      assert.are.same({ "", "closed" }, { until_closed(s) })
    end)

    -- 20 clients, as the answer to the client's close_notify races the
    -- client's own close (a reset) on loopback: one was enough to see an
    -- on_close("ENOTCONN") about one run in fifteen.
    it("from the client is a clean close: on_close gets no error, no tls_errors", function()
      start("callback")
      for i = 1, 20 do
        local s = client()
        assert.are.equal("x", helper.echo(s, "x"))
        s:close()                          -- LuaSec sends close_notify, then closes
        assert.is_true(helper.eventually(function()
          local n = 0
          for _, k in ipairs(d:keys(0)) do n = n + d:get(k) end
          return n == i
        end))
      end
      local reasons = {}
      for _, k in ipairs(d:keys(0)) do reasons[#reasons + 1] = k .. " x" .. d:get(k) end
      table.sort(reasons)
      assert.are.same({ "close nil x20" }, reasons)
      assert.are.equal(0, tls_errors())
    end)
  end)

  -- A TLS 1.3 client that never reads leaves the server's session tickets
  -- unread, so its close after close_notify is a reset: the reset races our
  -- answering close_notify (whose failure, "EPIPE", is no error: the TLS
  -- close was clean), and may come before the close_notify is read at all
  -- (Linux then drops it: "ECONNRESET" is what the server saw).
  it("a client's close_notify then a reset (tickets unread) closes with no error of ours", function()
    start("callback")
    for i = 1, 10 do
      local s = client()
      s:close()
      assert.is_true(helper.eventually(function()
        local n = 0
        for _, k in ipairs(d:keys(0)) do n = n + d:get(k) end
        return n == i
      end))
    end
    for _, k in ipairs(d:keys(0)) do
      assert.is_truthy(k == "close nil" or k == "close ECONNRESET", k)
    end
    assert.are.equal(0, tls_errors())
  end)

  describe("bad options raise when the server is created, naming the option", function()
    local function fails(tls_opts)
      local before = helper.fd_count()
      local ok, err = pcall(multiloop.server, { port = 0, workers = 1,
                                                handler = "spec.fixtures.tls", tls = tls_opts })
      assert.is_false(ok)
      assert.are.equal(before, helper.fd_count())
      return tostring(err)
    end

    it("tls.cert: a missing file", function()
      local err = fails(tls({ cert = certs.missing }))
      assert.is_truthy(err:find("tls.cert", 1, true), err)
      assert.is_truthy(err:find(certs.missing, 1, true), err)
      assert.is_truthy(err:find("No such file", 1, true), err)
    end)

    it("tls.cert: a file that is not a certificate", function()
      local err = fails(tls({ cert = certs.garbage }))
      assert.is_truthy(err:find("tls.cert", 1, true), err)
      assert.is_truthy(err:find(certs.garbage, 1, true), err)
    end)

    it("tls.key: a missing file", function()
      local err = fails(tls({ key = certs.missing }))
      assert.is_truthy(err:find("tls.key", 1, true), err)
      assert.is_truthy(err:find(certs.missing, 1, true), err)
    end)

    it("tls.key: a key that does not match the certificate", function()
      local err = fails(tls({ key = certs.other_key }))
      assert.is_truthy(err:find("tls.key", 1, true), err)
      assert.is_truthy(err:find("does not match", 1, true), err)
    end)

    it("tls.cert and tls.key: required", function()
      local err = fails({ key = certs.key })
      assert.is_truthy(err:find("tls.cert", 1, true), err)
      err = fails({ cert = certs.cert })
      assert.is_truthy(err:find("tls.key", 1, true), err)
    end)

    it("tls.min_version: an unknown version", function()
      local err = fails(tls({ min_version = "SSLv3" }))
      assert.is_truthy(err:find("tls.min_version", 1, true), err)
      assert.is_truthy(err:find("SSLv3", 1, true), err)
    end)

    it("tls.alpn: not a list of strings", function()
      local err = fails(tls({ alpn = "h2" }))
      assert.is_truthy(err:find("tls.alpn", 1, true), err)
      err = fails(tls({ alpn = { "h2", 2 } }))
      assert.is_truthy(err:find("tls.alpn", 1, true), err)
    end)

    it("tls.sni: an entry whose key does not match its certificate", function()
      local err = fails(tls({ sni = { ["a.example"] = { cert = certs.sni_cert, key = certs.key } } }))
      assert.is_truthy(err:find("tls.sni", 1, true), err)
      assert.is_truthy(err:find("a.example", 1, true), err)
    end)

    it("tls.ca: a missing file", function()
      local err = fails(tls({ ca = certs.missing, verify_client = true }))
      assert.is_truthy(err:find("tls.ca", 1, true), err)
      assert.is_truthy(err:find(certs.missing, 1, true), err)
    end)

    -- Each of these raises after the certificate's context may already be
    -- made: `make asan` checks nothing leaks on the way out.
    local more = {
      { "an unknown field", { certificate = "x.pem" }, "tls", "certificate" },
      { "tls.ciphers: not a cipher list", { ciphers = "NO-SUCH-CIPHER" }, "tls.ciphers",
        "NO-SUCH-CIPHER" },
      { "tls.ciphersuites: not a suite", { ciphersuites = "TLS_NO_SUCH" }, "tls.ciphersuites",
        "TLS_NO_SUCH" },
      { "tls.handshake_timeout: negative", { handshake_timeout = -1 }, "tls.handshake_timeout",
        "-1" },
      { "tls.handshake_timeout: not an integer", { handshake_timeout = 1.5 },
        "tls.handshake_timeout", "1.5" },
      -- A string of digits was taken (lua_tointegerx converts it), where
      -- every other ms option refuses one.
      { "tls.handshake_timeout: a string", { handshake_timeout = "200" }, "tls.handshake_timeout",
        "integer" },
      { "tls.session_tickets: not a boolean", { session_tickets = "yes" }, "tls.session_tickets",
        "boolean" },
      { "tls.starttls: not a boolean", { starttls = 1 }, "tls.starttls", "boolean" },
      { "tls.verify_client: without tls.ca", { verify_client = true }, "tls.verify_client",
        "tls.ca" },
      { "tls.verify_client: a bad value", { verify_client = "sometimes" }, "tls.verify_client",
        "optional" },
      { "tls.alpn: empty", { alpn = {} }, "tls.alpn", "non-empty" },
      { "tls.alpn: a name of 256 bytes", { alpn = { string.rep("p", 256) } }, "tls.alpn", "255" },
      { "tls.sni: an entry that is not a table", { sni = { ["a.example"] = "x.pem" } },
        "tls.sni", "a.example" },
      { "tls.sni: an entry without its key",
        function() return { sni = { ["a.example"] = { cert = certs.sni_cert } } } end,
        "tls.sni['a.example'].key", "required" },
    }
    for _, m in ipairs(more) do
      it(m[1], function()
        local err = fails(tls(type(m[2]) == "function" and m[2]() or m[2]))
        assert.is_truthy(err:find(m[3], 1, true), err)
        assert.is_truthy(err:find(m[4], 1, true), err)
      end)
    end

    it("tls: not a table", function()
      local err = fails("yes")
      assert.is_truthy(err:find("tls", 1, true), err)
    end)
  end)

  describe("with openssl s_client #child", function()
    -- s_client's output for one connection that sends `input` and waits
    -- for the server to close (-ign_eof); `args` are s_client's own.
    local function s_client(args, input)
      local inp = os.tmpname()
      local f = assert(io.open(inp, "w"))
      f:write(input or "info\nbye\n")
      f:close()
      local out = run(("timeout 10 openssl s_client -connect 127.0.0.1:%d -CAfile %s -ign_eof %s < %s")
        :format(port, certs.ca, args, inp))
      os.remove(inp)
      return out
    end

    it("negotiates ALPN in the server's order", function()
      start("commands", tls({ alpn = { "h2", "http/1.1" } }))
      local out = s_client("-alpn http/1.1,h2")
      assert.is_truthy(out:find("ALPN protocol: h2", 1, true), out)
      assert.are.equal("h2", fields(out:match("(version=[^\n]*)")).alpn)
      out = s_client("-alpn http/1.1")
      assert.is_truthy(out:find("ALPN protocol: http/1.1", 1, true), out)
      out = s_client("")
      assert.is_truthy(out:find("No ALPN negotiated", 1, true), out)
    end)

    it("shows the certificate SNI picks", function()
      start("commands", tls({ sni = { ["a.example"] = { cert = certs.sni_cert, key = certs.sni_key } } }))
      local out = s_client("-servername a.example")
      assert.is_truthy(out:find("subject=CN = a.example", 1, true), out)
      assert.is_truthy(out:find("Verify return code: 0 (ok)", 1, true), out)
      assert.are.equal("a.example", fields(out:match("(version=[^\n]*)")).sni)
      out = s_client("-servername localhost")
      assert.is_truthy(out:find("subject=CN = localhost", 1, true), out)
      out = s_client("-noservername")
      assert.is_truthy(out:find("subject=CN = localhost", 1, true), out)
    end)

    it("refuses a TLS 1.2 renegotiation, and the worker keeps serving", function()
      start("commands")
      -- Without -ign_eof, s_client takes a line "R" as: renegotiate.
      local inp = os.tmpname()
      helper.defer(function() os.remove(inp) end)
      local f = assert(io.open(inp, "w"))
      f:write("R\n")
      f:close()
      local out = run(("sh -c '(cat %s; sleep 1; echo info; sleep 1) | timeout 10 openssl s_client "
        .. "-connect 127.0.0.1:%d -CAfile %s -tls1_2'"):format(inp, port, certs.ca))
      assert.is_truthy(out:find("RENEGOTIATING", 1, true), out)
      assert.is_truthy(out:find("no renegotiation", 1, true), out)   -- the server's alert
      local s = client()
      assert.are.equal("hi!", (function() assert(s:send("hi\n")) return line(s) end)())
    end)

    it("resumes a session of a client with a certificate (verify_client) and of an SNI name", function()
      start("commands", tls({ ca = certs.ca, verify_client = true,
                              sni = { ["a.example"] = { cert = certs.sni_cert, key = certs.sni_key } } }),
            { workers = 2 })
      for _, name in ipairs({ "localhost", "a.example" }) do
        for _, version in ipairs({ "1_3", "1_2" }) do
          local sess = os.tmpname()
          helper.defer(function() os.remove(sess) end)
          local args = ("-tls%s -servername %s -cert %s -key %s"):format(version, name,
            certs.client_cert, certs.client_key)
          local out = s_client(args .. " -sess_out " .. sess)
          assert.are.equal("false", fields(assert(out:match("(version=[^\n]*)"), out)).resumed)
          out = s_client(args .. " -sess_in " .. sess)
          assert.is_truthy(out:find("\nReused, TLSv1", 1, true), name .. " " .. version .. ": " .. out)
          assert.are.equal("true", fields(assert(out:match("(version=[^\n]*)"), out)).resumed)
        end
      end
      assert.are.equal(0, tls_errors())
    end)

    -- Tickets off: none is sent (TLS 1.3 then has nothing to resume with;
    -- TLS 1.2 may still resume by session ID, from OpenSSL's cache).
    it("sends no session ticket with session_tickets = false, TLS 1.3 and 1.2", function()
      start("commands", tls({ session_tickets = false }), { workers = 2 })
      local out = s_client("-tls1_3")
      assert.is_truthy(out:find("version=TLSv1.3", 1, true), out)
      assert.is_nil(out:find("New Session Ticket", 1, true), out)
      out = s_client("-tls1_2")
      assert.is_truthy(out:find("version=TLSv1.2", 1, true), out)
      assert.is_nil(out:find("TLS session ticket", 1, true), out)
      assert.are.equal(0, tls_errors())
    end)

    for _, version in ipairs({ "1_3", "1_2" }) do
      it("resumes a TLS " .. version:gsub("_", ".") .. " session on another worker", function()
        start("commands", nil, { workers = 2 })
        local sess = os.tmpname()
        helper.defer(function() os.remove(sess) end)
        local out = s_client(("-tls%s -sess_out %s"):format(version, sess))
        assert.is_truthy(out:find("\nNew, TLSv1", 1, true), out)
        assert.is_truthy(out:find(version == "1_3" and "New Session Ticket" or "TLS session ticket",
                                  1, true), out)
        local first = fields(assert(out:match("(version=[^\n]*)"), out))
        assert.are.equal("false", first.resumed)
        out = s_client(("-tls%s -sess_in %s"):format(version, sess))
        assert.is_truthy(out:find("\nReused, TLSv1", 1, true), out)
        local second = fields(assert(out:match("(version=[^\n]*)"), out))
        assert.are.equal("true", second.resumed)
        assert.are_not.equal(first.worker, second.worker)
        assert.are.equal(0, tls_errors())
      end)
    end
  end)

  describe("curl against examples/http_hello.lua over TLS #child", function()
    before_each(function()
      server, port = helper.server({ workers = 2, handler = "examples.http_hello",
                                     tls = tls({ alpn = { "http/1.1" } }) })
    end)

    it("gets Hello, world! with --cacert, by IP and by name, keeping the connection", function()
      local url = ("https://127.0.0.1:%d/"):format(port)
      local out, ok = run(("timeout 20 curl -sS --cacert %s -w '\\n%%{http_code} %%{num_connects}"
        .. " %%{http_version}\\n' %s %sagain"):format(certs.ca, url, url))
      assert.is_true(ok, out)
      assert.are.equal("Hello, world!\n\n200 1 1.1\nHello, world!\n\n200 0 1.1\n", out)
      out, ok = run(("timeout 20 curl -sS --cacert %s --resolve localhost:%d:127.0.0.1 "
        .. "https://localhost:%d/"):format(certs.ca, port, port))
      assert.is_true(ok, out)
      assert.are.equal("Hello, world!\n", out)
      assert.are.equal(0, server:stats().tls_errors)
    end)

    it("is refused by curl without the CA, counted as a TLS error", function()
      local out, ok = run(("timeout 20 curl -sS https://127.0.0.1:%d/"):format(port))
      assert.is_falsy(ok)
      assert.is_truthy(out:find("certificate", 1, true), out)
      assert.is_true(helper.eventually(function() return server:stats().tls_errors == 1 end))
    end)
  end)

  -- sock:sslhandshake on worker.tcp() sockets (spec/fixtures/tls_outbound.lua),
  -- against a TLS server of this file (the "commands" case).
  describe("outbound sslhandshake", function()
    local outbound, out_c

    after_each(function()
      helper.stop_checked(outbound)
      outbound = nil
    end)

    -- The server whose worker makes the outbound connections, and a
    -- plaintext client of it that gives the commands.
    local function start_outbound(opts)
      local out_port
      outbound, out_port = helper.server(with({ workers = 1, handler = "spec.fixtures.tls_outbound" },
                                              opts))
      out_c = helper.connect(out_port)
      helper.defer(function() out_c:close() end)
    end

    local function ask(cmd)
      assert(out_c:send(cmd .. "\n"))
      return helper.line(out_c)
    end

    local function hs(name, verify, reuse)
      return ask(("hs %d %s %s %s"):format(port, name, verify, reuse))
    end

    it("verifies the server against tls_ca and sends the name as SNI", function()
      start("commands", tls({ sni = { ["a.example"] = { cert = certs.sni_cert, key = certs.sni_key } } }))
      start_outbound({ tls_ca = certs.ca })
      local got = hs("localhost", "true", "none")
      assert.is_truthy(got:find("^ok userdata version=TLSv1%.3 "), got)
      assert.are.equal("localhost", fields(got).sni)
      -- sock:tls() on the client side: the server's certificate, verified.
      local f = fields(got)
      assert.are.same({ "TLSv1.3", "/CN=localhost", "true", "localhost" },
                      { f.cversion, f.cpeer, f.cverified, f.csni })
      got = hs("a.example", "true", "none")
      assert.is_truthy(got:find("^ok userdata "), got)
      assert.are.equal("a.example", fields(got).sni)
      assert.are.equal(0, tls_errors())
      local st = outbound:stats()
      assert.are.equal(2, st.connects)
      assert.are.same({ 2, 0 }, { st.tls_handshakes, st.tls_errors })
    end)

    it("fails a name the certificate does not have: certificate verify failed, and closes", function()
      start("commands")
      start_outbound({ tls_ca = certs.ca })
      local got = hs("a.example", "true", "none")
      assert.is_truthy(got:find("^fail .*certificate verify failed.* nil closed$"), got)
      local st = outbound:stats()              -- counted on the client's side too
      assert.are.same({ 1, 0, 1 }, { st.tls_errors, st.tls_handshakes, st.workers[1].tls_errors })
    end)

    it("fails a self-signed server: certificate verify failed, and closes", function()
      start("commands", tls({ cert = certs.self_cert, key = certs.self_key }))
      start_outbound({ tls_ca = certs.ca })
      local got = hs("localhost", "true", "none")
      assert.is_truthy(got:find("^fail .*certificate verify failed.* nil closed$"), got)
    end)

    it("fails a server whose CA is not in the system store when there is no tls_ca", function()
      start("commands")
      start_outbound()
      local got = hs("localhost", "true", "none")
      assert.is_truthy(got:find("^fail .*certificate verify failed.* nil closed$"), got)
    end)

    it("does not verify with ssl_verify false, nor by default (nil), as OpenResty", function()
      start("commands", tls({ cert = certs.self_cert, key = certs.self_key }))
      start_outbound({ tls_ca = certs.ca })
      local got = hs("localhost", "false", "none")
      assert.is_truthy(got:find("^ok userdata version=TLSv1%.3 "), got)
      assert.are.equal("false", fields(got).cverified)   -- a self-signed certificate, unchecked
      got = hs("a.example", "-", "none")
      assert.is_truthy(got:find("^ok userdata "), got)
      got = hs("-", "false", "none")
      assert.is_truthy(got:find("^ok userdata "), got)
      assert.are.equal("nil", fields(got).sni)
    end)

    it("verifies an IP address given as server_name against the certificate's IP SAN", function()
      start("commands")
      start_outbound({ tls_ca = certs.ca })
      local got = hs("127.0.0.1", "true", "none")
      assert.is_truthy(got:find("^ok userdata "), got)
      assert.are.equal("nil", fields(got).sni)     -- no SNI for an address
      got = hs("127.0.0.2", "true", "none")          -- not in the certificate
      assert.is_truthy(got:find("^fail .*certificate verify failed.* nil closed$"), got)
    end)

    it("fails a handshake the server never answers within the read timeout", function()
      local l = assert(socket.bind("127.0.0.1", 0))   -- in the backlog, never accepted
      helper.defer(function() l:close() end)
      local _, lport = l:getsockname()
      start_outbound()
      local got = ask("stall " .. lport)
      local took = tonumber(got:match("^stall nil timeout (%d+) nil closed$"))
      assert.is_truthy(took, got)
      assert.is_true(took >= 250 and took < STOP_BOUND * 1000, got)
    end)

    it("keeps a TLS connection in the pool: from there, sslhandshake returns at once", function()
      start("commands")
      start_outbound({ tls_ca = certs.ca })
      assert.are.equal("pool 0 userdata resumed=false worker=1 1 1 userdata resumed=false worker=1 1",
                       ask("pool " .. port))
      assert.are.equal(1, server:stats().accepted)
      assert.are.equal(1, server:stats().tls_handshakes)
    end)

    it("pipes a plain connection into a TLS one both ways, 2 MiB, then a half-close", function()
      start("echo")
      start_outbound({ tls_ca = certs.ca })
      assert.are.equal("piping", ask("pipe " .. port))
      local payload = string.rep("p", 2 * 1024 * 1024)
      assert.is_true(helper.echo_big(out_c, payload, 60) == payload, "the echo differs")
      out_c:shutdown("send")
      assert.are.equal("", helper.all(out_c))
      assert.is_true(helper.eventually(function() return d:get("pipe") ~= nil end))
      assert.are.equal(("%d %d"):format(#payload, #payload), d:get("pipe"))
      assert.are.equal(0, tls_errors())
    end)

    it("ends a handshake in flight at stop: nil, 'closed', nothing left", function()
      local l = assert(socket.bind("127.0.0.1", 0))
      helper.defer(function() l:close() end)
      local _, lport = l:getsockname()
      start_outbound()
      assert.are.equal("handshaking", ask("stallstop " .. lport))
      local t0 = socket.gettime()
      assert(outbound:stop())
      assert.is_true(socket.gettime() - t0 < STOP_BOUND, "stop took too long")
      assert.are.equal(0, outbound:stats().threads)
      outbound = nil
      local got = tostring(d:get("stallstop"))       -- the stop closed the socket
      assert.is_truthy(got == "nil closed" or got == "nil stopped", got)
    end)

    it("reads 3 MiB answers over outbound TLS with receive(n), '*l', receiveuntil and '*a'", function()
      start("commands")
      start_outbound()
      local n = 3 * 1024 * 1024
      out_c:settimeout(60)                 -- valgrind took over 5 s
      assert.are.equal(("bigread %d  %d %d  nil"):format(n, math.ceil(n / 1000), n),
                       ask(("bigread %d %d"):format(port, n)))
    end)

    -- The client context is made on first use, by whichever worker comes
    -- first: here both at once (make tsan watches).
    it("handshakes from 2 workers at once, each its first", function()
      start("commands", nil, { workers = 2 })
      start_outbound({ tls_ca = certs.ca, workers = 2 })
      local _, out_port = outbound:address()
      local second = helper.connect(out_port)
      helper.defer(function() second:close() end)
      local cmd = ("hs %d localhost true none\n"):format(port)
      assert(out_c:send(cmd))
      assert(second:send(cmd))
      local a, b = helper.line(out_c), helper.line(second)
      assert.is_truthy(a:find("^ok userdata "), a)
      assert.is_truthy(b:find("^ok userdata "), b)
      local st = outbound:stats()
      assert.are.same({ 1, 1 }, { st.workers[1].tls_handshakes, st.workers[2].tls_handshakes })
    end)

    it("returns true instead of a session when reused_session is false", function()
      start("commands")
      start_outbound({ tls_ca = certs.ca })
      assert.is_truthy(hs("localhost", "true", "false"):find("^ok boolean version="))
    end)

    it("resumes the session it returned, on the server's other worker", function()
      start("commands", nil, { workers = 2 })
      start_outbound({ tls_ca = certs.ca })
      local first = hs("localhost", "true", "keep")
      assert.is_truthy(first:find("^ok userdata "), first)
      assert.are.equal("false", fields(first).resumed)
      local second = hs("localhost", "true", "saved")
      assert.is_truthy(second:find("^ok userdata "), second)
      assert.are.equal("true", fields(second).resumed, second)
      assert.are_not.equal(fields(first).worker, fields(second).worker)
    end)

    it("fails against a server that does not speak TLS, and closes", function()
      server, port = helper.server({ workers = 1, handler = "spec.fixtures.tls",
                                     config = { case = "commands" } })
      start_outbound()
      local got = ask("plain " .. port)
      assert.is_truthy(got:find("^plain nil .+ nil closed$"), got)
    end)

    it("fails on a socket that is not connected", function()
      start_outbound()
      local got = ask("unconnected")
      assert.is_truthy(got:find("^unconnected nil "), got)
    end)

    it("raises at creation for a tls_ca file that is missing, naming it", function()
      local ok, err = pcall(multiloop.server, { port = 0, workers = 1,
                                                handler = "spec.fixtures.tls_outbound",
                                                tls_ca = certs.missing })
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find("tls_ca", 1, true), err)
      assert.is_truthy(tostring(err):find(certs.missing, 1, true), err)
    end)
  end)
end)
