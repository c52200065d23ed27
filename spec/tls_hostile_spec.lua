-- A hostile review of the TLS transport (src/tls.c): STARTTLS with bytes
-- already received, held writes, pause/resume, pipes between TLS and plain
-- connections, and clients that misbehave. Real sockets on 127.0.0.1; the
-- clients are LuaSec over LuaSocket, or the openssl CLI / python3 as a
-- child (#child). The handlers are in spec/fixtures/tls_hostile.lua.
local helper = require("spec.helper")
local socket = require("socket")
local ssl = require("ssl")
local multiloop = require("multiloop")

local d = multiloop.shared("spec.tls_hostile")

-- Throwaway certificates: a self-signed one for localhost / 127.0.0.1 in
-- a fresh directory (removed at the end of the file): its paths.
local function make_certs()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -m 700 " .. dir))
  assert(os.execute(("env -u LD_PRELOAD openssl req -x509 -newkey ec -pkeyopt "
    .. "ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost "
    .. "-addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout %s/key.pem -out %s/cert.pem "
    .. ">/dev/null 2>&1"):format(dir, dir)))
  return { dir = dir, cert = dir .. "/cert.pem", key = dir .. "/key.pem" }
end

local certs

local function tls_opts(extra)
  local t = { cert = certs.cert, key = certs.key }
  for k, v in pairs(extra or {}) do t[k] = v end
  return t
end

-- LuaSec on a connected LuaSocket client: the TLS client, handshaken.
local function wrap(c, params)
  local p = { mode = "client", protocol = "any", verify = "none", options = "all" }
  for k, v in pairs(params or {}) do p[k] = v end
  local s = assert(ssl.wrap(c, p))
  s:settimeout(helper.TIMEOUT)
  assert(s:dohandshake())
  return s
end

local function tls_connect(port, params)
  local c = helper.connect(port)
  local s = wrap(c, params)
  helper.defer(function() s:close() end)
  return s
end

-- #child for all of it: every test needs the certificates, which the
-- openssl CLI makes, and a shell cannot start under TSan's preload.
describe("tls (hostile) #child", function()
  local server

  lazy_setup(function() certs = make_certs() end)
  lazy_teardown(function() if certs then os.execute("rm -rf " .. certs.dir) end end)

  after_each(function()
    helper.stop_checked(server)
    server = nil
    d:flush()
  end)

  local function start(case, opts)
    opts = opts or {}
    opts.workers = opts.workers or 1
    opts.handler = opts.handler or "spec.fixtures.tls_hostile"
    opts.config = opts.config or {}
    opts.config.case = case
    local port
    server, port = helper.server(opts)
    return port
  end

  describe("STARTTLS", function()
    it("a line sent in the clear behind STARTTLS is not read as if it came over TLS", function()
      local port = start("starttls", { tls = tls_opts({ starttls = true }) })
      local c = helper.connect(port)
      helper.defer(function() c:close() end)
      -- One segment: the command and a line an attacker slipped in behind it.
      assert(c:send("STARTTLS\r\nINJECTED\r\n"))
      assert.are.equal("220 go", helper.line(c))
      local s, err = ssl.wrap(c, { mode = "client", protocol = "any", verify = "none" })
      assert(s, err)
      s:settimeout(2)
      local ok = s:dohandshake()
      if ok then
        s:send("REAL\n")
        local line = s:receive("*l")
        assert.are_not.equal("got INJECTED", line)
      end
      local res = helper.eventually(function() return d:get("starttls") end)
      assert.are.equal("false conn:sslhandshake: 10 bytes were received and not read before it nil",
                       (res:gsub("^false [^:]*:%d+: ", "false ")))
    end)
  end)
  -- python3 spec/fixtures/tls_client.py PORT MODE [ARG]: its one line.
  local function py(port, mode, arg)
    local p = assert(io.popen(("env -u LD_PRELOAD python3 spec/fixtures/tls_client.py %d %s %s 2>&1")
      :format(port, mode, arg or "")))
    local out = p:read("*a")
    p:close()
    return (out:gsub("%s+$", ""))
  end

  describe("STARTTLS replies", function()
    it("a reply sent in two sends before the handshake goes out in the clear, before it", function()
      local port = start("starttls_two", { tls = tls_opts({ starttls = true }) })
      local c = helper.connect(port)
      helper.defer(function() c:close() end)
      c:settimeout(2)
      assert(c:send("STARTTLS\r\n"))
      assert.are.same({ "220-ready", "220 go" }, { c:receive("*l"), c:receive("*l") })
      local s = wrap(c)
      assert(s:send("REAL\n"))
      assert.are.equal("got REAL", helper.line(s))
      assert.are.equal("true true nil", d:get("starttls_two"))
    end)
  end)

  describe("held writes", function()
    it("a close after writes made before the handshake ended sends them all first", function()
      local port = start("held_close", { handler = "spec.fixtures.tls_hostile_cb", tls = tls_opts() })
      local s = tls_connect(port)
      assert.are.equal("hello", helper.line(s))
      local rest = helper.all(s)
      assert.are.equal(1024 * 1024, #rest)
    end)
  end)

  describe("large sends", function()
    it("a 32 MiB send is encrypted as the socket takes it, not copied whole as ciphertext", function()
      local size = 32 * 1024 * 1024
      local port = start("big_send", { config = { size = size }, tls = tls_opts() })
      assert.are.equal(size .. " True", py(port, "read", size))
      assert.are.equal(tostring(size), helper.eventually(function() return d:get("big_send") end))
      -- RSS says nothing under a sanitizer: ASan's quarantine keeps freed
      -- blocks from reuse, valgrind has its own allocator.
      if not os.getenv("SANITIZER") then
        local kb = d:get("send_growth")
        assert.is_true(kb < 8 * 1024, ("the process grew by %d KiB during the send"):format(kb))
      end
    end)

    it("a 16 MiB send to a client that never reads holds its plaintext, not a ciphertext copy", function()
      local size = 16 * 1024 * 1024
      local port = start("big_send", { config = { size = size, send_timeout = 500 }, tls = tls_opts() })
      assert.are.equal("slept", py(port, "noread", 1.5))
      assert.are.equal("nil timeout", helper.eventually(function() return d:get("big_send") end))
      if not os.getenv("SANITIZER") then   -- (as above)
        local kb = d:get("send_growth")
        assert.is_true(kb < 8 * 1024, ("the process grew by %d KiB during the send"):format(kb))
      end
    end)
  end)

  describe("connections sharing a worker's output buffer", function()
    it("#stress 20 clients echo 2 MiB each at once through one worker, each getting its own bytes", function()
      local port = start("echo", { handler = "spec.fixtures.tls_hostile_cb", tls = tls_opts() })
      assert.are.equal("20 of 20", py(port, "many", 20))
    end)
  end)

  describe("pause and resume", function()
    it("data, close_notify and FIN at once reach a paused owner in order, then its end", function()
      local port = start("echo_pause", { handler = "spec.fixtures.tls_hostile_cb", tls = tls_opts() })
      assert.are.equal("200004 True True", py(port, "eof_paused", 200000))
    end)
  end)

  describe("a slow serve reader", function()
    it("gets every byte sent before close_notify and FIN, then the end", function()
      local port = start("slow_count", { tls = tls_opts() })
      assert.are.equal("got 1000000 closed", py(port, "count", 1000000))
    end)
  end)

  describe("hostile clients", function()
    it("a ClientHello in 1-byte segments", function()
      local port = start("echo", { tls = tls_opts() })
      assert.are.equal("ping", py(port, "split_hello"))
    end)
    it("#stress a KeyUpdate storm from a client that never reads queues a bounded answer", function()
      local port = start("watch_queue", { handler = "spec.fixtures.tls_hostile_cb", tls = tls_opts() })
      local done = os.tmpname()
      os.remove(done)
      helper.defer(function() os.remove(done) end)
      -- 20,000 requests (540 KB) ask for as many answers (440 KB), all
      -- queued: the handler's 8 MiB have filled the kernel's buffers.
      local p = assert(io.popen(("env -u LD_PRELOAD python3 spec/fixtures/tls_client.py %d keyupdate "
        .. "20000 %s 2>&1"):format(port, done)))
      helper.defer(function()
        io.open(done, "w"):close()
        p:close()
      end)
      -- Until the server has read it all, or stopped reading (bytes_in
      -- holds still for 2 s: OpenSSL takes some 30 us a KeyUpdate), or its
      -- queue has grown past the bound.
      local last, still = -1, socket.gettime()
      local deadline = socket.gettime() + 60
      while socket.gettime() < deadline and (d:get("growth") or 0) <= 256 * 1024 do
        local now = server:stats().bytes_in
        if now >= 20000 * 27 then break end
        if now ~= last then last, still = now, socket.gettime() end
        if socket.gettime() - still > 2 then break end
        socket.sleep(0.05)
      end
      assert.are.equal(1, server:stats().active)   -- a slow client, not an error: its idle timeout ends it
      io.open(done, "w"):close()
      local out = p:read("*a")
      assert.is_truthy(out:match("^sent %d+"), out)
      local growth = d:get("growth") or 0
      assert.is_true(growth <= 256 * 1024, ("the queue grew by %d bytes"):format(growth))
    end)
    it("1-byte records, TLS 1.3 and 1.2", function()
      local port = start("echo", { handler = "spec.fixtures.tls_hostile_cb", tls = tls_opts() })
      assert.are.equal("TLSv1.3 20000 True", py(port, "tiny", 20000))
      assert.are.equal("TLSv1.2 20000 True", py(port, "tls12_tiny", 20000))
    end)
  end)
  describe("outbound sslhandshake", function()
    local upstream, silent_l, c

    before_each(function()
      local up_port
      upstream, up_port = helper.server({ workers = 1, handler = "spec.fixtures.tls_hostile",
                                         config = { case = "echo" }, tls = tls_opts() })
      silent_l = assert(socket.bind("127.0.0.1", 0))
      local _, sport = silent_l:getsockname()
      start(nil, { handler = "spec.fixtures.tls_hostile_out",
                   config = { up = up_port, silent = tonumber(sport) } })
      c = helper.connect(select(2, server:address()))
      c:settimeout(60)                       -- a command may make 3 handshakes (3 s each under valgrind)
    end)
    after_each(function()
      c:close()
      silent_l:close()
      helper.stop_checked(upstream)
      upstream = nil
    end)

    local function ask(line)
      assert(c:send(line .. "\n"))
      return helper.line(c)
    end

    it("a thread killed while it waits in the handshake", function()
      assert.are.equal("kill true", ask("kill_wait"))
      assert.are.equal("twice true | nil socket busy: a handshake is running | true | hi", ask("twice"))
    end)
    it("the socket closed by another thread while one waits in the handshake", function()
      assert.are.equal("close 1 true nil closed", ask("close_wait"))
    end)
    it("a second sslhandshake while one runs is refused; one after it returns at once", function()
      assert.are.equal("twice true | nil socket busy: a handshake is running | true | hi", ask("twice"))
    end)
    it("a pooled TLS connection is reused without a new handshake", function()
      assert.are.equal("pool userdata a 1 userdata b true", ask("pool"))
      assert.are.equal(1, upstream:stats().tls_handshakes)
    end)
    it("a session object collected before its tickets came; a kept one resumes", function()
      assert.are.equal("sessions hi userdata true hi", ask("sessions"))
    end)
    it("a handshake the server never answers times out with the read timeout", function()
      assert.are.equal("timeout nil timeout", ask("timeout"))
    end)
    it("a plain receive waiting when the handshake starts gets the first line over TLS", function()
      assert.are.equal("recv true x", ask("recv_concurrent"))
    end)
  end)
  describe("pipes between TLS and plain connections", function()
    local upstream
    after_each(function()
      helper.stop_checked(upstream)
      upstream = nil
    end)

    it("plain client -> TLS upstream: 1 MiB each way, and the half-close both ways", function()
      local up_port
      upstream, up_port = helper.server({ workers = 1, handler = "spec.fixtures.tls_hostile_cb",
                                         config = { case = "echo" }, tls = tls_opts() })
      local port = start("pipe_to", { config = { up = up_port, up_tls = true } })
      local c = helper.connect(port)
      helper.defer(function() c:close() end)
      local payload = string.rep("0123456789abcdef", 65536)
      local got = helper.echo_big(c, payload, 20)
      assert.are.equal(#payload, #got)
      assert.is_true(got == payload)
      c:shutdown("send")
      assert.are.equal("", helper.all(c))
      assert.are.equal(("%d %d"):format(#payload, #payload),
                       helper.eventually(function() return d:get("pipe_to") end))
    end)

    it("TLS client -> plain upstream: 1 MiB each way, close_notify passes as the half-close", function()
      local up_port
      upstream, up_port = helper.server({ workers = 1, handler = "spec.fixtures.tls_hostile_cb",
                                         config = { case = "echo" } })
      local port = start("pipe_to", { config = { up = up_port }, tls = tls_opts() })
      assert.are.equal("1048576 True", py(port, "halfclose", 1048576))
      assert.are.equal("1048576 1048576",
                       helper.eventually(function() return d:get("pipe_to") end))
    end)
  end)
  describe("failures and stops", function()
    it("a reset in the middle of the ClientHello closes that connection, counted", function()
      local port = start("echo", { tls = tls_opts() })
      assert.are.equal("reset", py(port, "reset_in_handshake"))
      assert.is_true(helper.eventually(function()
        local st = server:stats()
        return st.active == 0 and st.tls_errors == 1
      end))
      local s = tls_connect(port)
      assert.are.equal("still\n", helper.echo(s, "still\n"))
    end)

    it("a TLS 1.2 renegotiation is refused, and the server goes on", function()
      if not helper.installed("openssl") then return pending("no openssl CLI") end
      local port = start("echo", { tls = tls_opts() })
      local p = assert(io.popen(("(printf 'one\\n'; sleep 0.3; printf 'R\\n'; sleep 0.5; printf 'two\\n'; "
        .. "sleep 0.3) | env -u LD_PRELOAD timeout 10 openssl s_client -tls1_2 -quiet -no_ign_eof "
        .. "-connect 127.0.0.1:%d 2>&1"):format(port)))
      local out = p:read("*a")
      p:close()
      assert.is_truthy(out:find("one", 1, true), out)
      assert.is_truthy(out:find("no renegotiation", 1, true), out)
      assert.is_falsy(out:find("two", 1, true), out)
      assert.are.equal(1, server:stats().tls_handshakes)
      local s = tls_connect(port)
      assert.are.equal("still\n", helper.echo(s, "still\n"))
    end)

    it("a graceful stop with one connection in its handshake and one handshaken", function()
      local port = start("echo", { tls = tls_opts() })
      local raw = helper.connect(port)            -- never says hello
      helper.defer(function() raw:close() end)
      local s = tls_connect(port)
      assert.are.equal("hi\n", helper.echo(s, "hi\n"))
      local t0 = socket.gettime()
      assert(server:stop({ timeout = 300 }))
      assert.is_true(socket.gettime() - t0 < 2)
      assert.are.equal(0, server:stats().threads)
      assert.are.equal(0, server:stats().active)
      server = nil
    end)
  end)
end)
