-- Hostile review of issue 17 (PROXY protocol, inherited sockets, logs, the
-- multiloop command, metrics): each test here failed against the code it
-- was written for, or checks an edge that the review tried and found held.
local helper = require("spec.helper")
local socket = require("socket")
local multiloop = require("multiloop")

local function server(opts)
  opts.workers = opts.workers or 1
  opts.handler = opts.handler or "spec.fixtures.proxy_info"
  return helper.served(opts, true)
end

-- Sends each of `parts` as its own write (a pause between, so that each is
-- its own read on the server); the answer line, or the error ("closed").
local function ask(port, parts)
  local c = helper.connect(port)
  c:setoption("tcp-nodelay", true)
  for i, p in ipairs(parts) do
    if i > 1 then socket.sleep(0.005) end
    assert(c:send(p))
  end
  local line, err = c:receive("*l")
  c:close()
  return line or err
end

local v2 = helper.proxy_v2

local V1 = "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
local V2 = v2(1, 0x11, "\10\1\2\3" .. "\10\9\9\9" .. string.pack(">I2I2", 4000, 8443)
  .. "\1\0\2h2" .. "\4\0\3abc")

describe("PROXY protocol, hostile", function()
  it("reads a v1 and a v2 header split at every byte, the first data with the header's end", function()
    for _, handler in ipairs { "spec.fixtures.proxy_info", "spec.fixtures.proxy_info_cb" } do
      local s, port = server{ handler = handler, proxy_protocol = { from = { "127.0.0.1" } } }
      for _, case in ipairs { { V1, "^192%.168%.0%.1 56324 v1 PROXY .* line=hello$" },
                              { V2, "^10%.1%.2%.3 4000 v2 PROXY .*tlvs=1=h2,4=abc .*line=hello$" } } do
        local h = case[1]
        for k = 1, #h - 1 do
          local r = ask(port, { h:sub(1, k), h:sub(k + 1) .. "hello\n" })
          assert.matches(case[2], r, handler .. " split at " .. k)
        end
      end
      assert.are.equal(0, s:stats().proxy_errors)
    end
  end)

  it("refuses a v1 address with a NUL byte and more after it (inet_pton saw only the part before)", function()
    local log = os.tmpname()
    helper.defer(function() os.remove(log) end)
    local s, port = server{ proxy_protocol = { from = { "127.0.0.1" } }, log = log }
    assert.are.equal("closed", ask(port, { "PROXY TCP4 1.2.3.4\0zz 5.6.7.8 1 2\r\nhi\n" }))
    assert.are.equal("closed", ask(port, { "PROXY TCP6 ::1 ::2\0\0 1 2\r\nhi\n" }))
    helper.eventually(function() return s:stats().proxy_errors == 2 end, 2000)
    assert.are.equal(2, s:stats().proxy_errors)
    local text = assert(io.open(log)):read("a")
    local _, n = text:gsub("PROXY protocol: refused: v1 header has a bad address or port\n", "")
    assert.are.equal(2, n)
    assert.matches("^1%.2%.3%.4 1 v1 PROXY ", ask(port, { "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhi\n" }))
  end)

  it("ignores whatever follows v1 UNKNOWN up to the CRLF, as the specification says", function()
    local s, port = server{ proxy_protocol = { from = { "127.0.0.1" } } }
    for _, h in ipairs { "PROXY UNKNOWN\r\n", "PROXY UNKNOWN  x\r\n", "PROXY UNKNOWN a b c d e f g\r\n",
                         "PROXY UNKNOWN ffff::1 ffff::2 1 2 \r\n" } do
      assert.matches("^127%.0%.0%.1 %d+ v1 UNKNOWN via=127%.0%.0%.1:%d+ dst=%- .* line=hi$",
        ask(port, { h .. "hi\n" }), h)
    end
    assert.are.equal(0, s:stats().proxy_errors)
  end)

  it("accepts a v2 LOCAL header whatever its family and block (discarded, as the specification says)", function()
    local s, port = server{ proxy_protocol = { from = { "127.0.0.1" } } }
    for _, h in ipairs {
      v2(0, 0x00, ""),                                   -- what haproxy sends
      v2(0, 0x11, "xxxxx"),                              -- a block shorter than the addresses
      v2(0, 0x00, "\1\0\9x"),                            -- not TLVs: not read
      v2(0, 0x45, "abc"),                                -- an undefined family: ignored
    } do
      assert.matches("^127%.0%.0%.1 %d+ v2 LOCAL via=127%.0%.0%.1:%d+ dst=%- tlvs= .* line=hi$",
        ask(port, { h .. "hi\n" }))
    end
    -- a LOCAL block that does hold the addresses and TLVs: the TLVs are read
    assert.matches("^127%.0%.0%.1 %d+ v2 LOCAL .*tlvs=1=h2 .*line=hi$", ask(port, {
      v2(0, 0x11, ("\0"):rep(12) .. "\1\0\2h2") .. "hi\n" }))
    assert.are.equal(0, s:stats().proxy_errors)
  end)

  it("refuses a v2 PROXY header whose family and protocol byte is not one the specification defines", function()
    local log = os.tmpname()
    helper.defer(function() os.remove(log) end)
    local s, port = server{ proxy_protocol = { from = { "127.0.0.1" } }, log = log }
    local body4 = "\1\2\3\4\5\6\7\8\0\1\0\2"
    for _, fam in ipairs { 0x10, 0x20, 0x01, 0x30 } do
      assert.are.equal("closed", ask(port, { v2(1, fam, body4 .. ("\0"):rep(204)) .. "hi\n" }),
        ("family byte 0x%02x"):format(fam))
    end
    helper.eventually(function() return s:stats().proxy_errors == 4 end, 2000)
    assert.are.equal(4, s:stats().proxy_errors)
    local text = assert(io.open(log)):read("a")
    local _, n = text:gsub("PROXY protocol: refused: v2 header's family or protocol is unknown\n", "")
    assert.are.equal(4, n)
    -- a UNIX_STREAM PROXY header (0x31) is defined: accepted, the real addresses kept
    assert.matches("^127%.0%.0%.1 %d+ v2 PROXY ", ask(port, { v2(1, 0x31, ("\0"):rep(216)) .. "hi\n" }))
  end)

  it("logs a refused Unix peer that from does not trust, as it does a TCP one", function()
    local log = os.tmpname()
    helper.defer(function() os.remove(log) end)
    local path = helper.sock_path()
    local s = multiloop.server{ path = path, workers = 1, handler = "spec.fixtures.proxy_info",
                                proxy_protocol = { from = { "127.0.0.1" } }, log = log }
    s:start()
    helper.defer(function() helper.stop_checked(s) end)
    local c = helper.connect_unix(path)
    c:send("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhi\n")   -- may find it closed already
    local line, err = c:receive("*l")
    c:close()
    assert.is_nil(line)
    assert.are.equal("closed", err)
    helper.eventually(function() return s:stats().proxy_errors == 1 end, 2000)
    assert.are.equal(1, s:stats().proxy_errors)
    local text = assert(io.open(log)):read("a")
    assert.matches("warn worker 1: PROXY protocol: refused a connection on a Unix socket, which "
      .. "proxy_protocol%.from does not trust %(add \"unix\"%)\n", text)
  end)
end)

describe("PROXY protocol from, hostile", function()
  it("matches CIDR blocks at odd prefix lengths, v4, v6 and v4-mapped", function()
    local hdr = { "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhi\n" }
    for _, case in ipairs {
      { "127.0.0.0/1", true }, { "128.0.0.0/1", false }, { "126.0.0.0/7", true },
      { "124.0.0.0/7", false }, { "127.0.0.0/9", true }, { "127.128.0.0/9", false },
      { "127.0.0.1/32", true }, { "127.0.0.0/32", false }, { "0.0.0.0/0", true },
      { "::ffff:127.0.0.1", false },           -- a v4 socket's peer is no v6 address
    } do
      local _, port = server{ proxy_protocol = { from = { case[1] } } }
      local r = ask(port, hdr)
      if case[2] then assert.matches("^1%.2%.3%.4 ", r, case[1]) else assert.are.equal("closed", r, case[1]) end
    end
    for _, case in ipairs {
      { "::1/127", "::1", true }, { "::2/127", "::1", false }, { "::/0", "::1", true },
      { "::ffff:127.0.0.0/104", "127.0.0.1", true }, { "127.0.0.0/8", "127.0.0.1", true },
      { "::ffff:127.128.0.0/105", "127.0.0.1", false }, { "::ffff:127.0.0.0/105", "127.0.0.1", true }, { "::1/128", "127.0.0.1", false },
    } do
      local s = server{ host = "::", proxy_protocol = { from = { case[1] } } }
      local _, p6 = s:address()
      local c = helper.connect(p6, case[2])
      assert(c:send(hdr[1]))
      local line, err = c:receive("*l")
      c:close()
      if case[3] then assert.matches("^1%.2%.3%.4 ", line or err, case[1])
      else assert.are.equal("closed", err, case[1]) end
    end
  end)
end)

describe("logs, hostile", function()
  it("writes a message's control bytes as \\xHH: a NUL (a line's end for journald) or a CR forges nothing", function()
    local log = os.tmpname()
    helper.defer(function() os.remove(log) end)
    local s = multiloop.server{ port = 0, workers = 1, handler = "spec.fixtures.proxy_info", log = log }
    local forged = "2026-01-01T00:00:00.000Z error main: forged"
    s:log("info", "a\0" .. forged)
    s:log("info", "b\r" .. forged)
    s:log("info", "c\27[2K\127\t" .. ("\0"):rep(5000) .. "end")   -- past the stack buffer
    local text = assert(io.open(log)):read("a")
    assert.is_nil(text:find("[%z\1-\8\11-\31\127]"), "a control byte in the log")
    local lines = {}
    for l in text:gmatch("[^\n]*") do if l ~= "" then lines[#lines + 1] = l end end
    assert.are.equal(3, #lines)
    assert.matches(" info main: a\\x00" .. forged:gsub("%p", "%%%0") .. "$", lines[1])
    assert.matches(" info main: b\\x0d" .. forged:gsub("%p", "%%%0") .. "$", lines[2])
    assert.matches(" info main: c\\x1b%[2K\\x7f\t" .. ("\\x00"):rep(5000) .. "end$", lines[3])
  end)
end)

-- A TLS client (luasec) whose bytes this process carries to the server
-- itself, so that the test chooses how they are cut: the PROXY header and
-- the ClientHello in one write, or the header's end and the ClientHello in
-- one. Every socket is non-blocking; bounded by 5 s.
local function tls_dir()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -m 700 " .. dir))
  helper.defer(function() os.execute("rm -rf " .. dir) end)
  assert(os.execute(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
    .. "-days 1 -subj /CN=localhost -keyout %s/key.pem -out %s/cert.pem 2>/dev/null"):format(dir, dir)))
  return dir
end

local function drain(from)
  local parts = {}
  repeat
    local d, err, partial = from:receive(65536)
    d = d or partial
    if d and #d > 0 then parts[#parts + 1] = d end
  until not d or #d == 0 or err
  return table.concat(parts), select(2, from:receive(0))
end

local function tls_via(port, head, split_at, tail)
  local ssl = require("ssl")
  local l = assert(socket.bind("127.0.0.1", 0))
  local _, lport = l:getsockname()
  local t = helper.connect(lport)
  local a = assert(l:accept())
  l:close()
  local c = assert(ssl.wrap(t, { mode = "client", protocol = "any", verify = "none" }))
  local u = helper.connect(port)
  u:setoption("tcp-nodelay", true)
  helper.defer(function() c:close(); a:close(); u:close() end)
  c:settimeout(0)
  a:settimeout(0)
  local hello = ""
  local deadline = socket.gettime() + 5
  while #hello == 0 and socket.gettime() < deadline do    -- the ClientHello
    assert(not c:dohandshake())
    socket.select({ a }, nil, 0.01)
    hello = hello .. drain(a)
  end
  if split_at == "hello" then              -- the header and the ClientHello's start, then its rest
    assert(u:send(head .. hello:sub(1, 10)))
    socket.sleep(0.01)
    assert(u:send(hello:sub(11)))
  elseif split_at then
    assert(u:send(head:sub(1, split_at)))
    socket.sleep(0.01)
    assert(u:send(head:sub(split_at + 1) .. (tail or hello)))
  else
    assert(u:send(head .. (tail or hello)))
  end
  u:settimeout(0)
  local ended = false                   -- the server closed: what it sent is on its way to c
  local function pump()
    local up = drain(a)
    if #up > 0 and not ended then u:send(up) end
    if ended then return end
    local down, err = drain(u)
    if #down > 0 then assert(a:send(down)) end
    if err == "closed" then
      ended = true
      a:shutdown("send")
    end
  end
  local done, acc = false, ""
  while socket.gettime() < deadline do
    pump()
    if not done then
      local err
      done, err = c:dohandshake()
      if done then assert(c:send("hello\n"))
      elseif err ~= "wantread" and err ~= "wantwrite" then return nil, "closed" end
    else
      local line, err, partial = c:receive("*l")
      if line then return acc .. line end
      acc = acc .. (partial or "")
      if err == "closed" then return nil, "closed" end
    end
    socket.select({ a, u, t }, nil, 0.01)
  end
  return nil, "timeout"
end

describe("PROXY protocol before TLS, hostile", function()
  local function skip()
    if not helper.installed("openssl") then
      pending("openssl is not installed")
      return true
    end
  end

  for _, handler in ipairs { "spec.fixtures.proxy_info", "spec.fixtures.proxy_info_cb" } do
    it("takes the header and the ClientHello in one read, or the header's end with it (" .. handler .. ")", function()
      if skip() then return end
      local dir = tls_dir()
      local s, port = server{ handler = handler, proxy_protocol = { from = { "127.0.0.1" } },
                              tls = { cert = dir .. "/cert.pem", key = dir .. "/key.pem" } }
      for _, h in ipairs { V1, V2 } do
        for _, at in ipairs { false, 1, 12, #h - 1, "hello" } do
          assert.matches("^%S+ %d+ v%d PROXY .* tls=TLSv1%.%d line=hello$", tls_via(port, h, at),
            "split at " .. tostring(at))
        end
      end
      local st = s:stats()
      assert.are.equal(0, st.proxy_errors)
      assert.are.equal(0, st.tls_errors)
      assert.are.equal(10, st.tls_handshakes)
    end)
  end

  it("gives the bytes after the header to the handler in plain text with tls.starttls", function()
    if skip() then return end
    local dir = tls_dir()
    for _, handler in ipairs { "spec.fixtures.proxy_info", "spec.fixtures.proxy_info_cb" } do
      local _, port = server{ handler = handler, proxy_protocol = { from = { "127.0.0.1" } },
                              tls = { cert = dir .. "/cert.pem", key = dir .. "/key.pem", starttls = true } }
      assert.matches("^192%.168%.0%.1 56324 v1 PROXY .* tls=%- line=hello$", ask(port, { V1 .. "hello\n" }),
        handler)
      assert.matches("^192%.168%.0%.1 56324 v1 PROXY .* tls=%- line=hello$",
        ask(port, { V1:sub(1, 9), V1:sub(10) .. "hello\n" }), handler .. ", split")
    end
  end)

  it("closes on garbage after the header instead of a ClientHello, counted as a TLS error", function()
    if skip() then return end
    local dir = tls_dir()
    local s, port = server{ proxy_protocol = { from = { "127.0.0.1" } },
                            tls = { cert = dir .. "/cert.pem", key = dir .. "/key.pem" } }
    for _, at in ipairs { false, 5 } do
      assert.are.same({ nil, "closed" }, { tls_via(port, V1, at, "GET / HTTP/1.0\r\n\r\n") })
    end
    helper.eventually(function() return s:stats().tls_errors == 2 end, 2000)
    assert.are.equal(2, s:stats().tls_errors)
    assert.are.equal(0, s:stats().proxy_errors)
    assert(helper.eventually(function() return s:stats().active == 0 end, 2000))
  end)
end)

describe("logs while the file is rotated, hostile", function()
  it("loses and splits no record while 4 workers log and the file is moved and reopened 30 times", function()
    local dict = "spec.hostile17." .. helper.pid()
    local path = os.tmpname()
    local files = { path }
    helper.defer(function() for _, f in ipairs(files) do os.remove(f) end end)
    local s = helper.server({ workers = 4, handler = "spec.fixtures.logger", log = path,
                              config = { dict = dict } })
    helper.defer(function() s:stop() end)
    local N, SIZE = 3000, 6000
    assert.are.equal(4, s:broadcast({ n = N, size = SIZE }))
    local d = multiloop.shared(dict)
    local deadline = socket.gettime() + 60
    for k = 1, 30 do                       -- logrotate's move, then SIGUSR1's reopen
      local moved = ("%s.%d"):format(path, k)
      table.insert(files, #files, moved)   -- the moved ones in order, then the live one
      assert(os.rename(path, moved))
      assert(s:reopen_log())
      socket.sleep(0.002)
    end
    while (d:get("done") or 0) < 4 and socket.gettime() < deadline do socket.sleep(0.01) end
    assert.are.equal(4, d:get("done"))
    s:stop()
    local next_i, count = { 0, 0, 0, 0 }, 0
    for _, f in ipairs(files) do
      for line in io.lines(f) do
        local who, id, i, bytes = line:match("^%S+Z info (worker %d): burst (%d) (%d+) (%u+)$")
        assert(who, "not a whole record: " .. line:sub(1, 120))
        id, i = tonumber(id), tonumber(i)
        assert.are.equal("worker " .. id, who)
        assert.are.equal(next_i[id] + 1, i)              -- in order, across the files
        assert.are.equal(i % 10 == 0 and SIZE or 40, #bytes)
        next_i[id], count = i, count + 1
      end
    end
    assert.are.equal(4 * N, count)
  end)
end)

describe("PROXY protocol and max_connections, hostile", function()
  it("gives the slot of every refused connection back: untrusted, malformed, late, cut", function()
    local s1, p1 = server{ max_connections = 1, proxy_protocol = { from = { "10.0.0.0/8" } } }
    for _ = 1, 5 do assert.are.equal("closed", ask(p1, { "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhi\n" })) end
    assert(helper.eventually(function() return s1:stats().proxy_errors == 5 end, 2000))
    local s, port = server{ max_connections = 1, proxy_protocol = { from = { "127.0.0.1" }, timeout = 100 } }
    for _ = 1, 5 do assert.are.equal("closed", ask(port, { "GET / HTTP/1.0\r\n\r\n" })) end
    assert.are.equal("closed", ask(port, { "PROXY TCP4 1.2.3.4" }))           -- late
    local c = helper.connect(port)                                           -- cut
    assert(c:send("PROXY TCP4"))
    c:shutdown("send")
    assert.are.equal("closed", select(2, c:receive("*l")))
    c:close()
    assert.matches("^1%.2%.3%.4 1 v1 PROXY ", ask(port, { "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhi\n" }))
    assert(helper.eventually(function() return s:stats().active == 0 end, 2000))
    assert.are.equal(7, s:stats().proxy_errors)
    assert.are.equal(0, s1:stats().active)
  end)

  it("a graceful stop ends a connection still inside its header within the grace period", function()
    local s, port = server{ proxy_protocol = { from = { "127.0.0.1" }, timeout = 60000 } }
    local c = helper.connect(port)
    assert(c:send("PROXY TCP4 1.2.3.4"))
    assert(helper.eventually(function() return s:stats().active == 1 end, 2000))
    local t0 = socket.gettime()
    assert(s:stop({ timeout = 300 }))
    local took = socket.gettime() - t0
    assert.is_true(took >= 0.25 and took < 2, "stopped after " .. took .. " s")
    assert.are.equal("closed", select(2, c:receive("*l")))
    c:close()
  end)
end)

describe("PROXY protocol and a paused callback connection, hostile", function()
  it("keeps the bytes after the header for a handler that paused in connect", function()
    for _, pp in ipairs { false, true } do
      local _, port = server{ handler = "spec.fixtures.hostile17_paused",
                              proxy_protocol = pp and { from = { "127.0.0.1" } } or nil }
      for _, split in ipairs { false, true } do
        local c = helper.connect(port)
        local head = pp and V1 or ""
        if split and pp then
          assert(c:send(head:sub(1, 10)))
          socket.sleep(0.01)
          assert(c:send(head:sub(11) .. "hello\n"))
        else
          assert(c:send(head .. "hello\n"))
        end
        local line, err = c:receive("*l")
        c:close()
        assert.are.equal("hello", line, ("proxy %s, split %s: %s"):format(pp, split, tostring(err)))
      end
      -- the client's end right behind its data: on_data first, then the end
      local c = helper.connect(port)
      assert(c:send((pp and V1 or "") .. "hello\n"))
      c:shutdown("send")
      local all = helper.all(c)
      c:close()
      assert.are.equal("hello\n", all, ("proxy %s, then the end"):format(pp))
    end
  end)

  it("keeps the idle timeout it had once the kept bytes are handed over", function()
    local _, port = server{ handler = "spec.fixtures.hostile17_paused", idle_timeout = 300,
                            proxy_protocol = { from = { "127.0.0.1" } } }
    local c = helper.connect(port)
    assert(c:send(V1 .. "hello\n"))
    assert.are.equal("hello", helper.line(c))
    local t0 = socket.gettime()
    local line, err = c:receive("*l")
    local took = socket.gettime() - t0
    assert.is_nil(line)
    assert.are.equal("closed", err)
    c:close()
    assert.is_true(took > 0.15 and took < 2, "closed after " .. took .. " s")
  end)
end)

describe("the multiloop command, hostile", function()
  local function run(args)
    local errfile = os.tmpname()
    helper.defer(function() os.remove(errfile) end)
    local p = assert(io.popen(("timeout 20 %s bin/multiloop %s 2>%s"):format(
      os.getenv("CHILD_LUA") or "lua5.4", args, errfile)))
    local out = p:read("a")
    local _, _, code = p:close()
    local f = assert(io.open(errfile))
    local err = f:read("a")
    f:close()
    return out, err, code
  end
  local function conf(body)
    local path = os.tmpname() .. ".lua"
    helper.defer(function() os.remove(path) end)
    local f = assert(io.open(path, "w"))
    f:write(body)
    f:close()
    return path
  end

  it("says a flag's value is missing when the next argument is another option", function()
    for _, case in ipairs { { "--port --workers 2", "--port", "--workers" },
                            { "--port 0 --host --check", "--host", "--check" },
                            { "--port 0 --log --log-level=debug", "--log", "--log-level=debug" } } do
      local out, err, code = run("examples/echo_handler.lua " .. case[1])
      assert.are.equal(("multiloop: %s: expected a value, got the option %s (multiloop --help lists "
        .. "the options)\n"):format(case[2], case[3]), err)
      assert.are.equal(2, code)
      assert.are.equal("", out)
    end
  end)

  for _, case in ipairs {
    { 'return { "examples/echo_handler.lua", port = 0 }', "a number key: 1" },
    { 'return { [true] = 1, port = 0 }', "a boolean key: true" },
    { 'return setmetatable({ port = 0 }, { __pairs = function() error("boom") end })', nil },
  } do
    it("names the config file for a table it cannot take as options: " .. case[1], function()
      local path = conf(case[1])
      local out, err, code = run("--check examples/echo_handler.lua --config " .. path)
      if case[2] then
        assert.are.equal(("multiloop: --config: %s must return a table of server options by name "
          .. "(got %s)\n"):format(path, case[2]), err)
        assert.are.equal(2, code)
        assert.are.equal("", out)
      else                                   -- its __pairs is not run: the options are good
        assert.are.equal("", err)
        assert.are.equal(0, code)
      end
    end)
  end
end)

