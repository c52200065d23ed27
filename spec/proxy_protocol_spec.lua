-- The PROXY protocol (issue 17): v1 and v2 headers from trusted sources,
-- before the handler sees the connection; raw bytes for the edge cases, and
-- Debian's haproxy (send-proxy, send-proxy-v2) started on loopback ports by
-- this file and stopped by its pid.
--
-- The handler (spec/fixtures/proxy_info.lua, proxy_info_cb.lua) answers
-- one line with what the connection knows of its client.
local helper = require("spec.helper")
local socket = require("socket")
local multiloop = require("multiloop")

local V2_SIG = helper.PROXY_V2_SIG

local function server(opts)
  opts.workers = opts.workers or 1
  opts.handler = opts.handler or "spec.fixtures.proxy_info"
  return helper.served(opts, true)
end

-- Sends `bytes` (with `split`: one byte a write up to its last line, which
-- goes whole, as the callback fixture reads it from one on_data); the
-- answer, or "closed" when the server closed without one.
local function ask(port, bytes, split)
  local c = helper.connect(port)
  if split then
    local head, line = bytes:match("^(.*\n)([^\n]*\n)$")
    for i = 1, #head do
      assert(c:send(head:sub(i, i)))
      socket.sleep(0.002)
    end
    socket.sleep(0.02)
    assert(c:send(line))
  else
    assert(c:send(bytes))
  end
  local line, err = c:receive("*l")
  c:close()
  return line or err
end

local v2 = helper.proxy_v2

local function ipv4(a, b, c, d) return string.char(a, b, c, d) end

describe("PROXY protocol", function()
  it("v1: peer() is the header's source, proxy() has both ends and the proxy itself", function()
    local _, port = server{ proxy_protocol = { from = { "127.0.0.1" } } }
    local r = ask(port, "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nhello\n")
    assert.matches("^192%.168%.0%.1 56324 v1 PROXY via=127%.0%.0%.1:%d+ dst=192%.168%.0%.11:443 "
      .. "tlvs= tls=%- line=hello$", r)
    r = ask(port, "PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\nhello\n")
    assert.matches("^2001:db8::1 1 v1 PROXY via=127%.0%.0%.1:%d+ dst=2001:db8::2:65535 ", r)
  end)

  it("v1 UNKNOWN and v2 LOCAL (health checks) keep the real addresses", function()
    local _, port = server{ proxy_protocol = { from = { "127.0.0.1" } } }
    assert.matches("^127%.0%.0%.1 %d+ v1 UNKNOWN via=127%.0%.0%.1:%d+ dst=%- ",
      ask(port, "PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nhello\n"))
    assert.matches("^127%.0%.0%.1 %d+ v2 LOCAL via=127%.0%.0%.1:%d+ dst=%- tlvs= ",
      ask(port, v2(0, 0x00, "") .. "hello\n"))
  end)

  it("v2: IPv4 and IPv6 addresses, TLVs by type, the bytes after the header are the first data", function()
    local _, port = server{ proxy_protocol = { from = { "127.0.0.1" } } }
    local body = ipv4(10, 1, 2, 3) .. ipv4(10, 9, 9, 9) .. string.pack(">I2I2", 4000, 8443)
      .. "\1\0\2h2" .. "\4\0\3abc"
    assert.matches("^10%.1%.2%.3 4000 v2 PROXY via=127%.0%.0%.1:%d+ dst=10%.9%.9%.9:8443 "
      .. "tlvs=1=h2,4=abc tls=%- line=hello$", ask(port, v2(1, 0x11, body) .. "hello\n"))
    local a6 = ("\32\1\13\184" .. ("\0"):rep(11) .. "\1")
    local b6 = ("\32\1\13\184" .. ("\0"):rep(11) .. "\2")
    assert.matches("^2001:db8::1 1 v2 PROXY via=127%.0%.0%.1:%d+ dst=2001:db8::2:2 ",
      ask(port, v2(1, 0x21, a6 .. b6 .. string.pack(">I2I2", 1, 2)) .. "hello\n"))
  end)

  it("headers split into one-byte writes are read whole, in both styles", function()
    for _, handler in ipairs { "spec.fixtures.proxy_info", "spec.fixtures.proxy_info_cb" } do
      local _, port = server{ handler = handler, proxy_protocol = { from = { "127.0.0.1" } } }
      assert.matches("^192%.168%.0%.1 56324 v1 PROXY .* line=hello$",
        ask(port, "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nhello\n", true))
      local body = ipv4(10, 1, 2, 3) .. ipv4(10, 9, 9, 9) .. string.pack(">I2I2", 4000, 8443)
      assert.matches("^10%.1%.2%.3 4000 v2 PROXY .* line=hello$",
        ask(port, v2(1, 0x11, body) .. "hello\n", true))
    end
  end)

  it("the callback style gets the header's first data in its first on_data", function()
    local _, port = server{ handler = "spec.fixtures.proxy_info_cb",
                            proxy_protocol = { from = { "127.0.0.1" } } }
    assert.matches("^192%.168%.0%.1 56324 v1 PROXY .* line=hello$",
      ask(port, "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nhello\n"))
  end)

  it("refuses a malformed, oversized or missing header: closed before the handler, counted, logged", function()
    local log = os.tmpname()
    helper.defer(function() os.remove(log) end)
    local s, port = server{ proxy_protocol = { from = { "127.0.0.1" } }, log = log }
    local body4 = ipv4(10, 1, 2, 3) .. ipv4(10, 9, 9, 9) .. string.pack(">I2I2", 1, 2)
    local bad = {   -- the bytes, and the reason the log gives
      { "GET / HTTP/1.0\r\n\r\n", "no PROXY protocol header" },           -- never guessed
      { "PROXY " .. ("1"):rep(110) .. "\r\nhello\n", "v1 header longer than 107 bytes" },
      { "PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\nhello\n", "v1 header has a bad address or port" },
      { "PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\nhello\n", "v1 header has a bad address or port" },
      { "PROXY TCP4 1.2.3 5.6.7.8 1 2\r\nhello\n", "v1 header has a bad address or port" },
      { "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\nhello\n", "v1 header does not end in CRLF" },
      { "PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\nhello\n", "v1 header has an empty field" },
      { "PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\nhello\n", "v1 header's protocol is not TCP4, TCP6 or UNKNOWN" },
      { V2_SIG .. "\49\17\0\12" .. body4 .. "hello\n", "v2 header's version is not 2" },
      { V2_SIG .. "\34\17\0\12" .. body4 .. "hello\n", "v2 header's command is not LOCAL or PROXY" },
      { V2_SIG .. "\33\65\0\12" .. body4 .. "hello\n", "v2 header's family or protocol is unknown" },
      { V2_SIG .. "\33\18\0\12" .. body4 .. "hello\n", "v2 header is for a datagram connection" },
      { V2_SIG .. "\33\17\0\8" .. body4:sub(1, 8) .. "hello\n", "v2 header's addresses are cut short" },
      { V2_SIG .. "\33\17\0\16" .. body4 .. "\4\0\9x" .. "hello\n", "v2 header has a TLV longer than the header" },
      { V2_SIG .. "\33\17\16\1" .. body4 .. ("x"):rep(4085), "v2 header longer than 4096 bytes" },
      { "\r\n\r\n\0\r\nQUIX\n" .. "\33\17\0\12" .. body4, "no PROXY protocol header" },
    }
    for i, case in ipairs(bad) do
      assert.are.equal("closed", ask(port, case[1]), "case " .. i)
    end
    helper.eventually(function() return s:stats().proxy_errors == #bad end, 2000)
    local lines = {}
    for l in io.lines(log) do
      local why = l:match(" warn worker 1 conn %d+: PROXY protocol: refused: (.*)$")
      if why then lines[#lines + 1] = why end
    end
    local want = {}
    for i, case in ipairs(bad) do want[i] = case[2] end
    assert.are.same(want, lines)
    local st = s:stats()
    assert.are.equal(#bad, st.proxy_errors)
    assert.are.equal(#bad, st.workers[1].proxy_errors)
    -- and the worker still serves
    assert.matches("^192%.168%.0%.1 56324 v1 ",
      ask(port, "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nhello\n"))
  end)

  it("closes a connection whose header is not whole within the timeout, and one that ends inside it", function()
    local log = os.tmpname()
    helper.defer(function() os.remove(log) end)
    local s, port = server{ proxy_protocol = { from = { "127.0.0.1" }, timeout = 200 }, log = log }
    local c = helper.connect(port)
    assert(c:send("PROXY TCP4 1.2.3.4"))
    local t0 = socket.gettime()
    local line, err = c:receive("*l")
    local took = socket.gettime() - t0
    c:close()
    assert.is_nil(line)
    assert.are.equal("closed", err)
    assert.is_true(took >= 0.15 and took < 2, "closed after " .. took .. " s")
    c = helper.connect(port)
    assert(c:send(V2_SIG .. "\33"))
    c:shutdown("send")
    assert.are.same({ nil, "closed", "" }, { c:receive("*l") })
    c:close()
    helper.eventually(function() return s:stats().proxy_errors == 2 end, 2000)
    assert.are.equal(2, s:stats().proxy_errors)
    local text = assert(io.open(log)):read("a")
    assert.matches("PROXY protocol: refused: no whole header within proxy_protocol%.timeout\n", text)
    assert.matches("PROXY protocol: refused: the peer closed the connection inside its header\n", text)
  end)

  it("a trusted connection that closes before its first byte (a TCP health check) is no error", function()
    local s, port = server{ proxy_protocol = { from = { "127.0.0.1" } } }
    for _ = 1, 3 do helper.connect(port):close() end
    assert.is_true(helper.eventually(function()
      local st = s:stats()
      return st.accepted == 3 and st.active == 0
    end, 2000))
    assert.are.equal(0, s:stats().proxy_errors)
  end)

  it("never reads a header from a source not in from: closed, counted, logged, the handler never runs", function()
    local log = os.tmpname()
    helper.defer(function() os.remove(log) end)
    local s, port = server{ proxy_protocol = { from = { "10.0.0.0/8", "::1" } }, log = log }
    assert.are.equal("closed", ask(port, "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhello\n"))
    helper.eventually(function() return s:stats().proxy_errors == 1 end, 2000)
    local st = s:stats()
    assert.are.equal(1, st.proxy_errors)
    assert.are.equal(0, st.threads)
    local text = assert(io.open(log)):read("a")
    assert.matches("warn worker 1: PROXY protocol: refused a connection from 127%.0%.0%.1, which is "
      .. "not in proxy_protocol%.from\n", text)
  end)

  it("matches CIDR blocks bit by bit, and a v4 client of an IPv6 socket against v4 blocks", function()
    local _, port = server{ proxy_protocol = { from = { "127.0.0.0/31" } } }
    assert.matches("^1%.2%.3%.4 ", ask(port, "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhi\n"))
    _, port = server{ proxy_protocol = { from = { "127.0.0.2/31" } } }
    assert.are.equal("closed", ask(port, "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhi\n"))
    local s6 = server{ host = "::", proxy_protocol = { from = { "127.0.0.1" } } }
    local _, p6 = s6:address()
    assert.matches("^1%.2%.3%.4 ", ask(p6, "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhi\n"))
  end)

  it("a Unix socket server trusts its peers with from = { 'unix' }", function()
    local path = helper.sock_path()
    local s = multiloop.server{ path = path, workers = 1, handler = "spec.fixtures.proxy_info",
                                proxy_protocol = { from = { "unix" } } }
    s:start()
    helper.defer(function() helper.stop_checked(s) end)
    local c = helper.connect_unix(path)
    assert(c:send("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhi\n"))
    local line = c:receive("*l")
    c:close()
    assert.matches("^1%.2%.3%.4 1 v1 PROXY via=nil", line)
  end)

  it("rejects bad options, naming them", function()
    local function err(pp)
      local ok, e = pcall(multiloop.server, { port = 0, handler = "spec.fixtures.proxy_info",
                                              proxy_protocol = pp })
      assert.is_false(ok)
      return e
    end
    assert.matches("option 'proxy_protocol' must be a table", err("yes"))
    assert.matches("option 'proxy_protocol.from' is required: a list of trusted", err({}))
    assert.matches("option 'proxy_protocol.from' is required", err({ from = {} }))
    assert.matches("option 'proxy_protocol.from%[1%]' must be a string", err({ from = { 1 } }))
    assert.matches("option 'proxy_protocol.from' item 2 is not an address, a CIDR block or \"unix\" "
      .. "%(got 10.0.0.0/33%)", err({ from = { "::1", "10.0.0.0/33" } }))
    assert.matches("item 1 is not an address.*got example.com", err({ from = { "example.com" } }))
    assert.matches("option 'proxy_protocol.timeout' must be an integer from 1 to",
      err({ from = { "::1" }, timeout = 0 }))
    assert.matches("option 'proxy_protocol' has an unknown field 'form'", err({ form = { "::1" } }))
  end)
end)

-- HAProxy in TCP mode in front of the server: the client's own address and
-- port arrive in the header.
local function start_haproxy(dir, backend_port, send)
  local port = helper.free_port()
  local cfg = ("%s/haproxy.cfg"):format(dir)
  local f = assert(io.open(cfg, "w"))
  f:write(([[
global
  maxconn 100
defaults
  mode tcp
  timeout connect 2s
  timeout client 10s
  timeout server 10s
frontend fe
  bind 127.0.0.1:%d
  default_backend be
backend be
  server s1 127.0.0.1:%d %s
]]):format(port, backend_port, send))
  f:close()
  local p = assert(io.popen(("exec env -u LD_PRELOAD sh -c 'echo $$; exec haproxy -db -f %s' 2>&1")
    :format(cfg)))
  local pid = tonumber(p:read("l"))
  -- Up once the port listens (read from /proc: a probe connection would
  -- reach the backend as a connection of its own).
  local want = (":%04X "):format(port)
  local up = helper.eventually(function()
    for l in io.lines("/proc/net/tcp") do
      local addr, st = l:match("^%s*%d+: (%x+:%x+) %x+:%x+ (%x%x)")
      if addr and (addr .. " "):sub(-6) == want and st == "0A" then return true end
    end
  end, 5000)
  assert(up, "haproxy did not start")
  helper.defer(function()
    os.execute(("kill %d"):format(pid))
    p:close()
  end)
  return port
end

describe("PROXY protocol behind haproxy #child", function()
  local dir
  before_each(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -m 700 " .. dir))
    local d = dir
    helper.defer(function() os.execute("rm -rf " .. d) end)   -- the first made: the last run
  end)

  local function skip()
    if not helper.installed("haproxy") then
      pending("haproxy is not installed (make deps installs it)")
      return true
    end
  end

  for _, send in ipairs { "send-proxy", "send-proxy-v2" } do
    for _, handler in ipairs { "spec.fixtures.proxy_info", "spec.fixtures.proxy_info_cb" } do
      it(send .. ": the server sees the client's own address and port (" .. handler .. ")", function()
        if skip() then return end
        local _, port = server{ handler = handler, proxy_protocol = { from = { "127.0.0.1" } } }
        local hport = start_haproxy(dir, port, send)
        for _ = 1, 3 do
          local c = helper.connect(hport)
          local _, cport = c:getsockname()
          assert(c:send("hello\n"))
          local line = c:receive("*l")
          c:close()
          assert.are.equal(("127.0.0.1 %d v%d PROXY via=127.0.0.1:"):format(cport,
            send == "send-proxy" and 1 or 2), line:match("^(.-via=127%.0%.0%.1:)"))
          assert.matches(" dst=127%.0%.0%.1:" .. hport .. " .* line=hello$", line)
        end
      end)
    end
  end

  it("send-proxy-v2 before TLS: the header, then the handshake; peer() is the client", function()
    if skip() or not helper.installed("openssl") then return end
    local ssl = require("ssl")
    assert(os.execute(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
      .. "-days 1 -subj /CN=localhost -keyout %s/key.pem -out %s/cert.pem 2>/dev/null"):format(dir, dir)))
    local s, port = server{ proxy_protocol = { from = { "127.0.0.1" } },
                            tls = { cert = dir .. "/cert.pem", key = dir .. "/key.pem" } }
    local hport = start_haproxy(dir, port, "send-proxy-v2")
    local t = helper.connect(hport)
    local _, cport = t:getsockname()
    local c = assert(ssl.wrap(t, { mode = "client", protocol = "any", verify = "none" }))
    c:settimeout(5)
    assert(c:dohandshake())
    assert(c:send("hello\n"))
    local line = c:receive("*l")
    c:close()
    assert.matches(("^127%%.0%%.0%%.1 %d v2 PROXY .* tls=TLSv1%%.3 line=hello$"):format(cport), line)
    assert.are.equal(0, s:stats().tls_errors)
    assert.are.equal(0, s:stats().proxy_errors)
  end)
end)
