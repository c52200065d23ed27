-- spec/helper.lua: clients and process probes shared by the specs.
-- Every client call has a timeout, so a server that never answers fails a
-- test instead of hanging it.
local socket = require("socket")
local procsig = require("spec.fixtures.procsig")

local M = { TIMEOUT = 5 }

-- busted's finally() keeps only the last function it was given, so a test
-- that needs several clean-ups (a client, a child process) would leak all
-- but one when it fails. defer(fn) stacks them; they run, last first, when
-- the test ends, whatever its outcome.
local deferred = {}
function M.defer(fn) deferred[#deferred + 1] = fn end
require("busted").subscribe({ "test", "end" }, function()
  local fns = deferred
  deferred = {}
  for i = #fns, 1, -1 do pcall(fns[i]) end
  return nil, true
end)

-- SPEC_TLS=1 (a probe, not part of any run): every helper.server gets a
-- `tls` option with throwaway certificates and every helper.connect and
-- connect_unix client is a LuaSec client of it, so a spec written for
-- plain TCP runs over TLS. The client object forwards LuaSocket's methods:
-- the TLS ones to LuaSec, the socket ones (shutdown, setoption, names) to
-- the socket under it.
local TLS_MODE = os.getenv("SPEC_TLS") == "1"
local tls_certs
local tls_client_mt = {}
tls_client_mt.__index = tls_client_mt
local function raw_call(self, name, ...)
  if self.closed then return nil, "closed" end
  self.raw:setfd(self.s:getfd())
  local r = table.pack(self.raw[name](self.raw, ...))
  self.raw:setfd(socket._SOCKETINVALID)
  return table.unpack(r, 1, r.n)
end
for _, name in ipairs({ "settimeout", "dirty", "getfd", "getstats" }) do
  tls_client_mt[name] = function(self, ...) return self.s[name](self.s, ...) end
end
-- LuaSec says "wantread" or "wantwrite" where LuaSocket says "timeout".
for _, name in ipairs({ "send", "receive" }) do
  tls_client_mt[name] = function(self, ...)
    local a, err, c = self.s[name](self.s, ...)
    if err == "wantread" or err == "wantwrite" then err = "timeout" end
    return a, err, c
  end
end
for _, name in ipairs({ "shutdown", "setoption", "getoption", "getsockname", "getpeername" }) do
  tls_client_mt[name] = function(self, ...) return raw_call(self, name, ...) end
end
function tls_client_mt.close(self)
  self.closed = true
  return self.s:close()
end
local function tls_wrap(c)
  local ssl = require("ssl")
  local s = assert(ssl.wrap(c, { mode = "client", protocol = "any", verify = "none",
                                 options = "all" }))
  s:settimeout(M.TIMEOUT)
  s:sni("localhost")
  assert(s:dohandshake())
  return setmetatable({ s = s, raw = c }, tls_client_mt)
end

function M.connect(port, host)
  local c = assert(socket.tcp())
  if host and host:find(":", 1, true) then c = assert(socket.tcp6()) end
  c:settimeout(M.TIMEOUT)
  assert(c:connect(host or "127.0.0.1", port))
  if TLS_MODE then return tls_wrap(c) end
  return c
end

-- One line from c, or a test failure naming why ("timeout": no answer).
function M.line(c)
  local s, err = c:receive("*l")
  assert(s, err)
  return s
end

-- Everything until the server closes.
function M.all(c)
  local s, err, partial = c:receive("*a")
  if s then return s end
  assert(err == "closed", err)
  return partial
end

-- Sends msg and reads back exactly #msg bytes.
function M.echo(c, msg)
  assert(c:send(msg))
  local got, err = c:receive(#msg)
  assert(got, err)
  return got
end

-- What a non-blocking call answers when it would block: LuaSocket says
-- "timeout", a LuaSec connection "wantread" or "wantwrite".
local WOULD_BLOCK = { timeout = true, wantread = true, wantwrite = true }

-- Sends `payload` and reads the echo at the same time, as a real client
-- would (so neither side's socket buffers fill and stall the other); returns
-- what came back. Bounded by `seconds`. `c` is a LuaSocket or LuaSec client.
function M.echo_big(c, payload, seconds)
  c:settimeout(0)
  local sent, got, parts = 0, 0, {}
  local deadline = socket.gettime() + (seconds or 30)
  while got < #payload do
    assert(socket.gettime() < deadline, ("timed out echoing %d bytes"):format(#payload))
    if sent < #payload then
      local n, err, partial = c:send(payload, sent + 1, math.min(sent + 65536, #payload))
      sent = n or (partial > 0 and partial or sent)
      assert(n or WOULD_BLOCK[err], err)
    end
    local data, err, partial = c:receive(65536)
    data = data or partial
    if #data > 0 then parts[#parts + 1] = data; got = got + #data end
    assert(data ~= "" or WOULD_BLOCK[err], err)
    if data == "" and sent >= #payload then socket.select({ c }, nil, 0.1) end
  end
  c:settimeout(M.TIMEOUT)
  return table.concat(parts)
end

-- Throwaway certificates for the TLS specs, made by the openssl CLI
-- (spec/fixtures/make_certs.sh: EC P-256, a fraction of a second) in `dir`,
-- or in a new private temporary directory when dir is nil. Returns the
-- paths (see the script for what each certificate is) and remove(), which
-- deletes the directory if this call made it. Under `make tsan`, where no
-- shell can run, the Makefile makes them first and names the directory in
-- SPEC_CERTS, which is then used as it is (and never removed here).
function M.make_certs(dir)
  local given = os.getenv("SPEC_CERTS")
  local made = false
  if given and given ~= "" then
    dir = given
  else
    if not dir then
      dir = os.tmpname()               -- a fresh name; the file it made goes
      os.remove(dir)
      made = true
    end
    assert(os.execute(("mkdir -p -m 700 '%s'"):format(dir)))
    local ok = os.execute(("env -u LD_PRELOAD sh spec/fixtures/make_certs.sh '%s'"):format(dir))
    if not ok then
      if made then os.execute(("rm -rf '%s'"):format(dir)) end
      error("spec/fixtures/make_certs.sh " .. dir .. " failed (is openssl installed?)")
    end
  end
  local function f(name) return dir .. "/" .. name end
  return {
    dir = dir,
    ca = f("ca.pem"), ca_key = f("ca.key"),
    cert = f("server.pem"), key = f("server.key"),
    sni_cert = f("sni.pem"), sni_key = f("sni.key"),
    client_cert = f("client.pem"), client_key = f("client.key"),
    self_cert = f("self.pem"), self_key = f("self.key"),
    other_key = f("other.key"),
    garbage = f("garbage.pem"),
    missing = f("missing.pem"),        -- never made
    remove = function()
      if made then os.execute(("rm -rf '%s'"):format(dir)) end
    end,
  }
end

-- A LuaSec (lua-sec) TLS client of port, handshaken, with helper's timeout
-- on every call, closed when the test ends: the LuaSec connection and the
-- LuaSocket object it wraps (whose fd LuaSec took: -1 now; a spec that
-- needs the raw bytes can setfd it back). params: cafile (verify the server
-- against it), sni (the name sent), alpn (a string or a list), protocol
-- (LuaSec's: "any" by default, "tlsv1_2" for at most TLS 1.2), certificate
-- and key (a client certificate). A failed handshake: nil, LuaSec's error.
function M.tls_connect(port, params)
  local ssl = require("ssl")
  params = params or {}
  local c = M.connect(port)
  local s, err = ssl.wrap(c, {
    mode = "client",
    protocol = params.protocol or "any",
    verify = params.cafile and "peer" or "none",
    cafile = params.cafile,
    certificate = params.certificate,
    key = params.key,
    alpn = params.alpn,
    options = "all",
  })
  if not s then
    c:close()
    return nil, err
  end
  M.defer(function() s:close() end)
  s:settimeout(M.TIMEOUT)
  if params.sni then s:sni(params.sni) end
  local ok, herr = s:dohandshake()
  if not ok then
    s:close()
    return nil, herr
  end
  return s, c
end

-- A server for the specs: loopback, port 0, started. Specs that count on
-- which worker gets a connection need round-robin placement, so unless they
-- say otherwise they get dispatch "queue"; the default (reuseport) is covered
-- by echo_spec (every mode) and lifecycle_spec.
function M.server(opts)
  local multiloop = require("multiloop")
  opts.host = opts.host or (opts.path == nil and "127.0.0.1" or nil)
  opts.port = opts.port or (opts.path == nil and 0 or nil)
  if opts.dispatch == nil and opts.balance == nil then opts.dispatch = "queue" end
  if TLS_MODE and opts.tls == nil then
    tls_certs = tls_certs or M.make_certs()
    opts.tls = { cert = tls_certs.cert, key = tls_certs.key }
  end
  local s = multiloop.server(opts)
  s:start()
  local _, port = s:address()
  return s, port
end

-- A started server (helper.server) stopped when the test ends (with
-- `checked`: by stop_checked, which also finds light threads left behind);
-- server, port.
function M.served(opts, checked)
  local s, port = M.server(opts)
  M.defer(function()
    if checked then M.stop_checked(s) else s:stop() end
  end)
  return s, port
end

-- A client connected to port, closed when the test ends.
function M.client(port, host)
  local c = M.connect(port, host)
  M.defer(function() c:close() end)
  return c
end

-- A PROXY protocol v2 header (HAProxy's doc/proxy-protocol.txt): command
-- (0 LOCAL, 1 PROXY), the family/protocol byte, and the body after the
-- length (addresses, TLVs) as raw bytes.
M.PROXY_V2_SIG = "\r\n\r\n\0\r\nQUIT\n"
function M.proxy_v2(cmd, fam, body)
  return M.PROXY_V2_SIG .. string.char(0x20 | cmd, fam) .. string.pack(">I2", #body) .. body
end

-- A fresh Unix socket path for this process (removed now and when the test
-- ends), and a client connected to one.
local nsock = 0
function M.sock_path()
  nsock = nsock + 1
  local path = ("/tmp/multiloop-spec-%d-%d.sock"):format(M.pid(), nsock)
  os.remove(path)
  M.defer(function() os.remove(path) end)
  return path
end

function M.connect_unix(path)
  local c = assert(require("socket.unix").stream())
  c:settimeout(M.TIMEOUT)
  assert(c:connect(path))
  if TLS_MODE then return tls_wrap(c) end
  return c
end

-- A server with `handler` (1 worker unless opts say otherwise) and a client
-- connected to it, closed when the test ends: server, port, client.
function M.serve_client(handler, opts)
  opts = opts or {}
  opts.workers = opts.workers or 1
  opts.handler = handler
  local s, port = M.server(opts)
  local c = M.connect(port)
  M.defer(function() c:close() end)
  return s, port, c
end

-- A server whose handler runs the case config.case names (the case tables
-- of spec/fixtures/sequential.lua and hostile_serve.lua), 1 worker unless
-- opts say otherwise, and a client closed when the test ends: server, port,
-- client.
function M.case_server(handler, case, opts)
  opts = opts or {}
  opts.workers = opts.workers or 1
  opts.handler = opts.handler or handler
  opts.config = opts.config or {}
  opts.config.case = case
  local s, port = M.server(opts)
  local c = M.connect(port)
  M.defer(function() c:close() end)
  return s, port, c
end

-- Stops a test's server (nil: none) within 2 s, and checks that no light
-- thread was left behind.
function M.stop_checked(s)
  if not s then return end
  assert(s:stop({ timeout = 2000 }))
  require("luassert").are.equal(0, s:stats().threads)
end

-- The calling process: its pid, how many fds it has open and its threads.
function M.pid()
  local f = assert(io.open("/proc/self/stat"))
  local pid = f:read("*n")
  f:close()
  return pid
end

-- Counts /proc/self/fd without a shell (a shell may not run under a
-- sanitizer): an fd exists unless opening its /proc entry says ENOENT.
-- Scans until 256 numbers in a row are free.
function M.fd_count()
  local n, misses, fd = 0, 0, 0
  while misses < 256 do
    local f, err = io.open("/proc/self/fd/" .. fd)
    if f then f:close() end
    if f or not err:find("No such file", 1, true) then
      n, misses = n + 1, 0
    else
      misses = misses + 1
    end
    fd = fd + 1
  end
  return n
end

-- Whether a path exists, whatever its type (io.open cannot open a socket).
function M.exists(path)
  return os.rename(path, path) == true
end

local function threads_now()
  for line in io.lines("/proc/self/status") do
    local n = line:match("^Threads:%s+(%d+)")
    if n then return tonumber(n) end
  end
end

-- The process's thread count, once it holds still. pthread_join returns when
-- the thread's stack is free, which is a moment before the kernel stops
-- listing the thread; a count taken in that moment (seen in CI: a baseline
-- one too high) must not count it. Two readings 2 ms apart must agree.
function M.thread_count()
  local n = threads_now()
  for _ = 1, 50 do
    socket.sleep(0.002)
    local again = threads_now()
    if again == n then return n end
    n = again
  end
  return n
end

-- Sleeps for ms without busy-waiting.
function M.sleep(ms) socket.sleep(ms / 1000) end

-- Polls fn() until it returns true or ms pass; returns its last result.
function M.eventually(fn, ms)
  local deadline = socket.gettime() + (ms or 2000) / 1000
  repeat
    local v = fn()
    if v then return v end
    socket.sleep(0.01)
  until socket.gettime() > deadline
  return fn()
end

-- Starts `[PREFIX] lua5.4 spec/fixtures/serve.lua ARGS` as a child process
-- whose stderr goes to a file; PREFIX must exec in place (prlimit does).
-- Returns an object with pid, port, signal(), wait(), stderr(), cpu_seconds().
function M.spawn(args, prefix)
  local errfile = os.tmpname()
  local cmd = ("sh -c 'echo $$; exec %s %s spec/fixtures/serve.lua %s 2>%s'"):format(
    prefix or "", os.getenv("CHILD_LUA") or "lua5.4", args, errfile)
  local p = assert(io.popen(cmd, "r"))
  local child = { errfile = errfile, pipe = p }
  child.pid = tonumber(p:read("*l"))
  local ready = p:read("*l") or ""
  child.port = tonumber(ready:match("port (%d+)"))
  -- serve.lua prints its port before it calls run(), which installs the
  -- SIGINT/SIGTERM handlers (both at once): an INT or TERM sent before then
  -- meets the default action. So wait until the child catches TERM first.
  function child.signal(sig)
    if sig == "TERM" or sig == "INT" then
      assert(M.eventually(function() return procsig.caught(child.pid, "TERM") end, 10000),
             "the child never caught SIGTERM")
    end
    os.execute(("kill -%s %d"):format(sig, child.pid))
  end
  function child.wait()             -- the rest of stdout, exit status
    local rest = p:read("*a")
    local _, _, code = p:close()
    return rest, code
  end
  function child.stop()             -- SIGTERM, then the rest of stdout and the status
    child.signal("TERM")
    local rest, code = child.wait()
    child.waited = true
    return rest, code
  end
  function child.stderr()
    local f = io.open(errfile)
    local s = f and f:read("*a") or ""
    if f then f:close() end
    return s
  end
  function child.cpu_seconds()      -- user + system time so far
    local f = assert(io.open("/proc/" .. child.pid .. "/stat"))
    local stat = f:read("*a")
    f:close()
    local fields = {}
    for field in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = field end
    return (tonumber(fields[12]) + tonumber(fields[13])) / 100   -- utime, stime (USER_HZ)
  end
  function child.kill()             -- clean-up for a test that failed midway
    if not child.waited then
      child.signal("KILL")
      pcall(p.close, p)
    end
    os.remove(errfile)
  end
  assert(child.port, "the child server did not start: " .. ready .. child.stderr())
  -- Ready once run() has begun (its signal watcher is in): a spec that
  -- floods the child with connections before then can use up the fds run()
  -- needs for its watcher's loop (limits_spec, 3 runs in 10).
  assert(M.eventually(function() return procsig.caught(child.pid, "TERM") end, 10000),
         "the child never caught SIGTERM: " .. child.stderr())
  return child
end

-- Whether a command is on PATH.
function M.installed(cmd)
  return os.execute("command -v " .. cmd .. " >/dev/null 2>&1") == true
end

-- A port nothing listens on now (the kernel's pick for a socket bound to
-- port 0, then closed); another process may take it before we do, which
-- M.start_redis notices (redis-server exits) and tries again.
function M.free_port()
  local s = assert(socket.tcp())
  assert(s:bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

-- redis-server on 127.0.0.1 in a directory of its own, saving nothing:
-- { pid, port, stop() }, once it answers PING; nil, why otherwise.
function M.start_redis()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -m 700 " .. dir))
  for _ = 1, 3 do
    local port = M.free_port()
    -- env -u LD_PRELOAD: under `make asan` the sanitizer runtime is
    -- preloaded into lua5.4, and redis-server is not ours to check.
    local p = assert(io.popen(("exec env -u LD_PRELOAD sh -c 'echo $$; exec redis-server --port %d "
      .. "--bind 127.0.0.1 --unixsocket %s/redis.sock --save \"\" --appendonly no --dir %s "
      .. "--logfile %s/log' "):format(port, dir, dir, dir)))
    local pid = tonumber(p:read("l"))
    local function alive() return os.execute(("kill -0 %d 2>/dev/null"):format(pid)) == true end
    local up = M.eventually(function()
      if not alive() then return "dead" end
      local c = socket.tcp()
      c:settimeout(1)
      local ok = c:connect("127.0.0.1", port) and c:send("PING\r\n") and c:receive("*l") == "+PONG"
      c:close()
      return ok and "up"
    end, 5000)
    if up == "up" then
      return {
        pid = pid, port = port, path = dir .. "/redis.sock",
        stop = function()
          os.execute(("kill %d"):format(pid))
          p:close()                      -- waits for sh's exec, redis-server itself
          os.execute("rm -rf " .. dir)
        end,
      }
    end
    if alive() then os.execute(("kill %d"):format(pid)) end
    p:close()
  end
  os.execute("rm -rf " .. dir)
  return nil, "redis-server did not start on a free port in 3 tries"
end

-- A loopback listener whose backlog is full: a connect to it stays in
-- SYN_SENT until its timeout (or a stop). Its port; closed when the test ends.
function M.full_listener()
  local l = assert(socket.tcp())
  assert(l:bind("127.0.0.1", 0))
  assert(l:listen(0))
  local _, lport = l:getsockname()
  local fillers = {}
  for i = 1, 4 do                      -- backlog 0 queues one: the rest of the SYNs drop
    fillers[i] = assert(socket.tcp())
    fillers[i]:settimeout(0)
    fillers[i]:connect("127.0.0.1", lport)
  end
  M.defer(function()
    for _, f in ipairs(fillers) do f:close() end
    l:close()
  end)
  return tonumber(lport)
end

-- Starts the shell command line `cmd` (no single quotes in it) as a child
-- process under `timeout -s KILL` (`seconds`, default 60: a child that never
-- ends cannot hang the run): stdout is read here (line() reads the next
-- line, nil at the end), stderr goes to a file (stderr()). pid is the
-- command's own (timeout's child, from /proc), so signal(sig) reaches it
-- directly (INT and TERM once it catches them: see spawn). wait() returns
-- the rest of stdout, how it ended ("exit" or "signal") and the code.
-- Killed when the test ends unless waited.
function M.spawn_command(cmd, seconds)
  local errfile = os.tmpname()
  local p = assert(io.popen(("sh -c 'echo $$; exec timeout -s KILL %d %s 2>%s'"):format(
    seconds or 60, cmd, errfile), "r"))
  local child = { pipe = p, errfile = errfile }
  child.timeout_pid = tonumber(p:read("*l"))
  child.pid = M.eventually(function()
    local f = io.open(("/proc/%d/task/%d/children"):format(child.timeout_pid, child.timeout_pid))
    local pid = f and tonumber(f:read("*a"):match("%d+"))
    if f then f:close() end
    return pid
  end, 5000)
  function child.line() return p:read("*l") end
  function child.caught_term()
    return M.eventually(function() return procsig.caught(child.pid, "TERM") end, 10000)
  end
  function child.signal(sig)
    if sig == "TERM" or sig == "INT" then
      assert(child.caught_term(), "the child never caught SIGTERM: " .. child.stderr())
    end
    os.execute(("kill -%s %d"):format(sig, child.pid))
  end
  function child.wait()
    local rest = p:read("*a")
    local _, how, code = p:close()
    child.waited = true
    return rest, how, code
  end
  function child.stderr()
    local f = io.open(errfile)
    local s = f and f:read("*a") or ""
    if f then f:close() end
    return s
  end
  M.defer(function()
    if not child.waited then
      os.execute(("kill -KILL %d 2>/dev/null"):format(child.timeout_pid))
      if child.pid then os.execute(("kill -KILL %d 2>/dev/null"):format(child.pid)) end
      pcall(p.close, p)
    end
    os.remove(errfile)
  end)
  assert(child.pid, "the child did not start: " .. child.stderr())
  return child
end

return M
