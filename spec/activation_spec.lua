-- Socket activation and inherited sockets: `listen = "systemd"` under
-- Debian's systemd-socket-activate (which listens, and starts the server on
-- the first connection with LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES set),
-- and `fd = n` for a listening socket the spec makes with LuaSocket.
local helper = require("spec.helper")
local multiloop = require("multiloop")
local socket = require("socket")
local unix = require("socket.unix")
local procsig = require("spec.fixtures.procsig")

local LUA = os.getenv("CHILD_LUA") or "lua5.4"
local HANDLER = "spec.fixtures.activated_handler"

local function read_file(path)
  local f = io.open(path)
  local s = f and f:read("*a") or ""
  if f then f:close() end
  return s
end

local function ask(c, line)
  assert(c:send(line .. "\n"))
  return helper.line(c)
end

-- `sh -c 'echo $$; exec COMMAND 2>ERRFILE'`: { pid, line(), rest(), stderr(),
-- term(), kill() }. The shell's pid is the server's: every step execs.
local function start_child(command)
  local errfile = os.tmpname()
  local p = assert(io.popen(("sh -c 'echo $$; exec %s 2>%s'"):format(command, errfile), "r"))
  local child = { pid = tonumber(p:read("*l")) }
  function child.line() return p:read("*l") end
  function child.rest()       -- the rest of stdout, once it has exited with 0
    local rest = p:read("*a")
    local _, how, code = p:close()
    child.done = true
    assert(how == "exit" and code == 0, ("the server ended with %s %s: %s"):format(
      how, code, child.stderr()))
    return rest
  end
  function child.stderr() return read_file(errfile) end
  function child.term()       -- once run() catches it (before, TERM would kill)
    assert(helper.eventually(function() return procsig.caught(child.pid, "TERM") end, 10000),
           "the server never caught SIGTERM: " .. child.stderr())
    os.execute(("kill -TERM %d"):format(child.pid))
  end
  function child.kill()
    if not child.done then
      os.execute(("kill -KILL %d 2>/dev/null"):format(child.pid))
      pcall(p.close, p)
    end
    os.remove(errfile)
  end
  helper.defer(child.kill)
  return child
end

-- systemd-socket-activate listening on `addrs` (each "127.0.0.1:PORT" or a
-- path), with `extra` flags, starting spec/fixtures/activated.lua ARGS on
-- the first connection; returned once it listens on all of them (it says
-- so on stderr), before anything has connected.
local function activate(addrs, extra, args)
  -- `make test` installs it (Debian's systemd); `luarocks test` elsewhere may not have it.
  if not helper.installed("systemd-socket-activate") then
    pending("systemd-socket-activate is not installed (Debian: systemd)")
    return nil
  end
  local listen = {}
  for i, a in ipairs(addrs) do listen[i] = "-l " .. a end
  -- It passes on only the environment -E names: the module's paths (a fresh
  -- clone under `make asan` has no ./build for the fixture's fallback) and,
  -- under a sanitizer, its runtime and options.
  for _, v in ipairs { "LUA_PATH", "LUA_CPATH", "LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS" } do
    if os.getenv(v) then listen[#listen + 1] = "-E " .. v end
  end
  local child = start_child(("systemd-socket-activate %s %s %s spec/fixtures/activated.lua %s")
    :format(table.concat(listen, " "), extra or "", LUA, args))
  local up = helper.eventually(function()
    local _, n = child.stderr():gsub("Listening on ", "")
    return n == #addrs
  end, 5000)
  assert(up, "systemd-socket-activate did not listen: " .. child.stderr())
  return child
end

-- n loopback ports nothing listens on now.
local function ports(n)
  local socks, out = {}, {}
  for i = 1, n do
    socks[i] = assert(socket.tcp())
    assert(socks[i]:bind("127.0.0.1", 0))
    local _, port = socks[i]:getsockname()
    out[i] = tonumber(port)
  end
  for _, s in ipairs(socks) do s:close() end
  return out
end

describe("listen = 'systemd' under systemd-socket-activate #child", function()
  for _, dispatch in ipairs { "queue", "ipc", "reuseport" } do
    it("serves the connection that started it, and the ones after (" .. dispatch .. ")",
      function()
        local port = ports(1)[1]
        local child = activate({ "127.0.0.1:" .. port }, "", "systemd " .. dispatch)
        if not child then return end
        local first = helper.connect(port)          -- this one starts the server
        assert.are.equal("[hello]", ask(first, "hello"))
        assert.are.equal("listening systemd 127.0.0.1:" .. port, child.line())
        -- The variables are gone (a child of the handler's would not take the
        -- sockets for its own), and the socket is close-on-exec.
        assert.are.equal("env unset unset unset", ask(first, "env"))
        assert.are.equal("cloexec yes", ask(first, "cloexec 3"))
        for i = 1, 2 do
          local c = helper.connect(port)
          assert.are.equal("[again " .. i .. "]", ask(c, "again " .. i))
          c:close()
        end
        first:close()
        child.term()
        assert.are.equal("accepted systemd 3\n", child.rest())
      end)
  end

  for _, dispatch in ipairs { "queue", "ipc" } do
    it("serves every socket passed, TCP and Unix, through one server (" .. dispatch .. ")",
      function()
        local port, path = ports(1)[1], helper.sock_path()
        -- ipc: the Unix socket first (address() reports the first's path).
        local addrs = dispatch == "ipc" and { path, "127.0.0.1:" .. port }
          or { "127.0.0.1:" .. port, path }
        local child = activate(addrs, "--fdname=web:local", "systemd " .. dispatch)
        if not child then return end
        local tcp = helper.connect(port)
        assert.are.equal("[tcp]", ask(tcp, "tcp"))
        assert.are.equal("listening systemd " .. (dispatch == "ipc" and path
          or "127.0.0.1:" .. port), child.line())
        local seen = {}
        for i = 1, 4 do                  -- round-robin: both workers serve each kind
          local u = helper.connect_unix(path)
          assert.are.equal("[unix " .. i .. "]", ask(u, "unix " .. i))
          seen[ask(u, "who")] = true
          u:close()
          local t = helper.connect(port)
          assert.are.equal("[tcp " .. i .. "]", ask(t, "tcp " .. i))
          seen[ask(t, "who")] = true
          t:close()
        end
        assert.are.same({ ["who 1 systemd"] = true, ["who 2 systemd"] = true }, seen)
        tcp:close()
        child.term()
        assert.are.equal("accepted systemd 9\n", child.rest())
      end)
  end

  it("holds back every socket at max_connections, and resumes each when a slot frees", function()
    local p = ports(2)
    local child = activate({ "127.0.0.1:" .. p[1], "127.0.0.1:" .. p[2] }, "", "systemd - 1 1")
    if not child then return end
    local function waits(c, line)       -- sent, and no answer for 300 ms
      assert(c:send(line .. "\n"))
      c:settimeout(0.3)
      local got, err = c:receive("*l")
      c:settimeout(helper.TIMEOUT)
      assert.are.same({ nil, "timeout" }, { got, err })
    end
    local a = helper.connect(p[1])
    assert.are.equal("[a]", ask(a, "a"))
    assert.are.equal("listening systemd 127.0.0.1:" .. p[1], child.line())
    local b = helper.connect(p[2])      -- the second socket's listener is held back
    waits(b, "b")
    a:close()
    assert.are.equal("[b]", helper.line(b))
    local c = helper.connect(p[1])      -- and the first's, while b holds the slot
    waits(c, "c")
    b:close()
    assert.are.equal("[c]", helper.line(c))
    c:close()
    child.term()
    assert.are.equal("accepted systemd 3\n", child.rest())
  end)

  it("refuses reuseport with several sockets, naming both options", function()
    local p = ports(2)
    local child = activate({ "127.0.0.1:" .. p[1], "127.0.0.1:" .. p[2] }, "--fdname=web:admin",
      "systemd reuseport")
    if not child then return end
    local c = helper.connect(p[1])
    assert.are.equal("error multiloop.server: option 'dispatch' 'reuseport' serves one inherited "
      .. "socket, and option 'listen' 'systemd' names 2: use 'queue' or 'ipc'", child.line())
    assert.are.equal("env unset unset unset", child.line())   -- read, so removed
    c:close()
    child.rest()
  end)

  it("gives each server of the process the sockets it names ('systemd:NAME')", function()
    local p = ports(3)
    local child = activate({ "127.0.0.1:" .. p[1], "127.0.0.1:" .. p[2], "127.0.0.1:" .. p[3] },
      "--fdname=web:admin:web", "each queue 1")
    if not child then return end
    local web = helper.connect(p[1])
    assert.are.equal("who 1 web", ask(web, "who"))
    assert.are.equal("listening web 127.0.0.1:" .. p[1], child.line())
    assert.are.equal("listening admin 127.0.0.1:" .. p[2], child.line())
    local admin = helper.connect(p[2])
    assert.are.equal("who 1 admin", ask(admin, "who"))
    local web2 = helper.connect(p[3])
    assert.are.equal("who 1 web", ask(web2, "who"))
    web:close()
    admin:close()
    web2:close()
    child.term()
    assert.are.equal("accepted web 2\naccepted admin 1\n", child.rest())
  end)

  it("says which name it did not find", function()
    local p = ports(2)
    local child = activate({ "127.0.0.1:" .. p[1], "127.0.0.1:" .. p[2] }, "--fdname=web:admin",
      "systemd:api")
    if not child then return end
    local c = helper.connect(p[1])
    assert.are.equal("error multiloop.server: option 'listen' 'systemd:api': no socket is named "
      .. "'api' (passed: fd 3 'web', fd 4 'admin')", child.line())
    c:close()
    child.rest()
  end)

  it("serves a Unix socket, calls an unnamed one 'unknown', and never unlinks it", function()
    local path = helper.sock_path()
    local child = activate({ path }, "", "each ipc")
    if not child then return end
    local c = helper.connect_unix(path)
    assert.are.equal("[over unix]", ask(c, "over unix"))
    assert.are.equal("listening unknown " .. path, child.line())
    c:close()
    child.term()
    assert.are.equal("accepted unknown 1\n", child.rest())
    assert.is_true(helper.exists(path))          -- systemd's file, not ours
  end)
end)

describe("the LISTEN_* variables #child", function()
  -- The fixture run with the environment `env` (sh syntax; $$ is its pid).
  local function run_with(env, listen, redirect)
    local child = start_child(("env %s %s spec/fixtures/activated.lua %s %s"):format(
      env, LUA, listen or "systemd", redirect or ""))
    return child, child.rest()
  end

  it("leaves sockets passed to another process alone (LISTEN_PID)", function()
    local child, out = run_with("LISTEN_PID=1 LISTEN_FDS=1 LISTEN_FDNAMES=web")
    assert.are.equal(("error multiloop.server: option 'listen' 'systemd': LISTEN_PID is 1, not "
      .. "this process (%d): the sockets were passed to another process\nenv 1 1 web\n")
      :format(child.pid), out)
  end)

  it("says when the process was not activated at all", function()
    local _, out = run_with("-u LISTEN_PID -u LISTEN_FDS")
    assert.are.equal("error multiloop.server: option 'listen' 'systemd': LISTEN_PID and "
      .. "LISTEN_FDS are not set: the process was not started by socket activation (systemd, "
      .. "systemd-socket-activate)\nenv unset unset unset\n", out)
  end)

  it("refuses a LISTEN_FDS that is not a count", function()
    local _, out = run_with("LISTEN_PID=$$ LISTEN_FDS=two")
    assert.matches("^error multiloop.server: option 'listen' 'systemd': LISTEN_FDS is 'two', "
      .. "not a number of sockets from 1 to 1024\nenv %d+ two unset\n$", out)
  end)

  it("refuses LISTEN_FDNAMES naming more sockets than LISTEN_FDS passes", function()
    local _, out = run_with("LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=a:b")
    assert.matches("^error multiloop.server: option 'listen' 'systemd': LISTEN_FDNAMES names 2 "
      .. "sockets, LISTEN_FDS passes 1\nenv %d+ 1 a:b\n$", out)
  end)

  it("checks what fd 3 is (a regular file here)", function()
    local _, out = run_with("LISTEN_PID=$$ LISTEN_FDS=1", "systemd", "3</etc/passwd")
    assert.are.equal("error multiloop.server: option 'listen' 'systemd' (fd 3): not a socket "
      .. "(a regular file) (ENOTSOCK)\nenv unset unset unset\n", out)
  end)
end)

-- --- fd = n, in this process --------------------------------------------------

local function tcp_listener(host)
  local l = assert(host == "::1" and socket.tcp6() or socket.tcp())
  assert(l:bind(host or "127.0.0.1", 0))
  assert(l:listen(32))
  local _, port = l:getsockname()
  helper.defer(function() l:close() end)
  return l, tonumber(port)
end

local function server(opts)
  opts.handler = opts.handler or HANDLER
  opts.workers = opts.workers or 2
  local s = multiloop.server(opts)
  helper.defer(function() s:stop() end)
  return s
end

local function server_error(opts)
  opts.handler = opts.handler or HANDLER
  local ok, err = pcall(multiloop.server, opts)
  assert.is_false(ok, "expected an error")
  return err
end

describe("fd = n", function()
  for _, dispatch in ipairs { "queue", "ipc", "reuseport" } do
    it("serves an inherited TCP socket, and leaves it open across a restart (" .. dispatch
      .. ")", function()
      local l, port = tcp_listener()
      local s = server { fd = l:getfd(), dispatch = dispatch }
      s:start()
      assert.are.same({ "127.0.0.1", port }, { s:address() })
      for i = 1, 3 do
        local c = helper.connect(port)
        assert.are.equal("[" .. i .. "]", ask(c, tostring(i)))
        c:close()
      end
      s:stop()
      assert.are.equal(3, s:stats().accepted)
      -- (counted after a first run: libuv makes its signal pipe once per
      -- process; and after a collection, which closes any socket a test
      -- before this one left to the collector when it failed)
      collectgarbage()
      local fds = helper.fd_count()
      -- Stopped: the socket still listens (it is not ours to close), so a
      -- client waits in its backlog and the next start serves it.
      local waiting = helper.connect(port)
      assert(waiting:send("waited\n"))
      s:start()
      assert.are.equal("[waited]", helper.line(waiting))
      waiting:close()
      s:stop()
      collectgarbage()
      assert.are.equal(fds, helper.fd_count())       -- every dup closed
    end)
  end

  it("serves an IPv6 socket", function()
    local l, port = tcp_listener("::1")
    local s = server { fd = l:getfd() }
    s:start()
    assert.are.same({ "::1", port }, { s:address() })
    local c = helper.connect(port, "::1")
    assert.are.equal("[six]", ask(c, "six"))
    c:close()
  end)

  for _, dispatch in ipairs { "queue", "ipc", "reuseport" } do
    it("serves an inherited Unix socket and never unlinks it (" .. dispatch .. ")", function()
      local path = helper.sock_path()
      local l = assert(unix.stream())
      assert(l:bind(path))
      assert(l:listen(8))
      helper.defer(function() l:close() end)
      local s = server { fd = l:getfd(), dispatch = dispatch }
      s:start()
      assert.are.equal(path, s:address())
      assert.matches("^multiloop.server{fd=%d+, path=" .. path:gsub("%p", "%%%0"), tostring(s))
      local c = helper.connect_unix(path)
      assert.are.equal("[unix]", ask(c, "unix"))
      c:close()
      s:stop()
      assert.is_true(helper.exists(path))
    end)
  end

  describe("refuses, naming the option and the reason,", function()
    it("a closed fd", function()
      local t = assert(socket.tcp())
      assert(t:bind("127.0.0.1", 0))
      local fd = math.tointeger(t:getfd())
      t:close()
      assert.is_nil(io.open("/proc/self/fd/" .. fd))
      assert.are.equal(("multiloop.server: option 'fd' %d: not an open file descriptor (EBADF)")
        :format(fd), server_error { fd = fd })
    end)

    it("a socket that is not listening", function()
      local t = assert(socket.tcp())
      helper.defer(function() t:close() end)
      assert(t:bind("127.0.0.1", 0))
      assert.are.equal(("multiloop.server: option 'fd' %d: the socket is not listening (bind "
        .. "and listen it first) (EINVAL)"):format(t:getfd()), server_error { fd = t:getfd() })
    end)

    it("a UDP socket", function()
      local u = assert(socket.udp())
      helper.defer(function() u:close() end)
      assert(u:setsockname("127.0.0.1", 0))
      assert.are.equal(("multiloop.server: option 'fd' %d: a UDP (datagram) socket, not a "
        .. "stream socket (TCP or Unix stream) (ESOCKTNOSUPPORT)"):format(u:getfd()),
        server_error { fd = u:getfd() })
    end)

    it("a Unix datagram socket", function()
      local u = assert(unix.dgram())
      helper.defer(function() u:close() end)
      assert.are.equal(("multiloop.server: option 'fd' %d: a Unix datagram socket, not a "
        .. "stream socket (TCP or Unix stream) (ESOCKTNOSUPPORT)"):format(u:getfd()),
        server_error { fd = u:getfd() })
    end)

    it("a regular file", function()
      local path = os.tmpname()
      helper.defer(function() os.remove(path) end)
      local f = assert(io.open(path, "w"))
      helper.defer(function() f:close() end)
      local lfs, fd = require("lfs"), nil
      for n = 0, 1023 do                     -- which fd the file is
        if lfs.symlinkattributes("/proc/self/fd/" .. n, "target") == path then fd = n end
      end
      assert(fd, "the file's fd was not found")
      assert.are.equal(("multiloop.server: option 'fd' %d: not a socket (a regular file) "
        .. "(ENOTSOCK)"):format(fd), server_error { fd = fd })
    end)

    it("a socket closed between the server's making and its start", function()
      local l = tcp_listener()
      local fd = math.tointeger(l:getfd())
      local s = server { fd = fd }
      l:close()
      local ok, err = pcall(s.start, s)
      assert.is_false(ok)
      assert.are.equal(("multiloop.server: start: option 'fd' %d: not an open file descriptor "
        .. "(EBADF)"):format(fd), err)
      assert.is_false(s._core:running())
    end)

    it("bad values and combinations", function()
      local l = tcp_listener()
      local fd = math.tointeger(l:getfd())
      assert.are.equal("multiloop.server: option 'fd' must be an integer from 0 to 2147483647 "
        .. "(got -1)", server_error { fd = -1 })
      assert.are.equal("multiloop.server: option 'fd' must be an integer from 0 to 2147483647 "
        .. "(got '3')", server_error { fd = "3" })
      assert.are.equal("multiloop.server: option 'fd' must be an integer from 0 to 2147483647 "
        .. "(got 3.5)", server_error { fd = 3.5 })
      assert.are.equal("multiloop.server: option 'listen' must be 'systemd' or 'systemd:NAME' "
        .. "(NAME: one of LISTEN_FDNAMES, 1 to 255 bytes) (got 'inetd')",
        server_error { listen = "inetd" })
      assert.are.equal("multiloop.server: option 'listen' must be 'systemd' or 'systemd:NAME' "
        .. "(NAME: one of LISTEN_FDNAMES, 1 to 255 bytes) (got 'systemd:')",
        server_error { listen = "systemd:" })
      assert.are.equal("multiloop.server: option 'listen' cannot be combined with 'fd'",
        server_error { listen = "systemd", fd = fd })
      for _, k in ipairs { "host", "port", "path", "backlog", "mode", "unlink" } do
        local o = { fd = fd }
        o[k] = ({ host = "127.0.0.1", port = 0, path = "/tmp/x", backlog = 8, mode = "0600",
                  unlink = true })[k]
        assert.are.equal(("multiloop.server: option 'fd' (an inherited socket) cannot be "
          .. "combined with '%s'"):format(k), server_error(o))
      end
      assert.are.equal("multiloop.server: option 'listen' (an inherited socket) cannot be "
        .. "combined with 'port'", server_error { listen = "systemd", port = 0 })
    end)
  end)

  it("defaults to dispatch 'queue' (the one socket has one accept queue)", function()
    local l = tcp_listener()
    assert.are.equal("queue", server({ fd = l:getfd() }).dispatch)
  end)
end)

describe("listen = 'systemd' in a process that was not activated", function()
  it("raises naming the option, and listen_fds() says why", function()
    local why = "LISTEN_PID and LISTEN_FDS are not set: the process was not started by socket "
      .. "activation (systemd, systemd-socket-activate)"
    assert.are.equal("multiloop.server: option 'listen' 'systemd': " .. why,
      server_error { listen = "systemd" })
    assert.are.same({ nil, why }, { multiloop.listen_fds() })
  end)
end)

describe("multiloop.core.new with fd or listen, past init.lua's checks", function()
  local core = require("multiloop.core")
  local function new_error(extra)
    local o = {
      workers = 1, port = 0, host = "", backlog = 16, max_connections = 0,
      idle_timeout = 0, write_high_water = 1024, write_low_water = 256, keepalive_seconds = 0,
      nodelay = true, dispatch = "queue", balance = "round_robin", handler_kind = "module",
      handler = HANDLER, package_path = package.path, package_cpath = package.cpath,
    }
    for k, v in pairs(extra) do o[k] = v end
    local ok, err = pcall(core.new, o)
    assert.is_false(ok, "expected an error")
    return err
  end

  it("checks them again", function()
    assert.are.equal("option 'fd' must be an integer from 0 to 2147483647 (got x)",
      new_error { fd = "x" })
    assert.are.equal("option 'listen' must be a string", new_error { listen = 3 })
    assert.are.equal("option 'listen' must be 'systemd' or 'systemd:NAME' (got 'inetd')",
      new_error { listen = "inetd" })
    assert.are.equal("option 'listen' cannot be combined with 'fd'",
      new_error { listen = "systemd", fd = 3 })
    assert.are.equal("option 'fd' cannot be combined with 'path'",
      new_error { fd = 3, path = "/tmp/x" })
  end)
end)
