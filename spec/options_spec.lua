-- Bad options raise an error that names the option; start() failures name
-- the worker (or the address) and leave nothing running.
local helper = require("spec.helper")
local multiloop = require("multiloop")

-- The message of the error fn raises (which must raise).
local function error_of(fn)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

local function server_error(opts)
  return error_of(function() return multiloop.server(opts) end)
end

local function opts(extra)
  local o = { port = 0, handler = "examples.echo_handler", workers = 1 }
  for k, v in pairs(extra) do o[k] = v end
  return o
end

describe("multiloop.server options", function()
  it("points the error at the caller's line", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local ok, err = pcall(multiloop.server, { port = 0 })
    assert.is_false(ok)
    -- pcall calls it directly, so there is no Lua caller line: check the
    -- message, then the position through a Lua wrapper.
    assert.are.equal("multiloop.server: option 'handler' is required "
      .. "(a module name, a path to a .lua file, or a function)", err)
    err = error_of(function() multiloop.server({ port = 0 }) end)
    assert.matches("^spec/options_spec%.lua:" .. (line + 6) .. ": multiloop%.server:", err)
  end)

  local cases = {
    { nil, "multiloop.server: expected a table of options (got nil)" },
    { { prot = 80, port = 0, handler = "x" }, "multiloop.server: unknown option 'prot'" },
    { { handler = "x" }, "multiloop.server: option 'port' is required (0 picks a free port)" },
    { opts{ port = 70000 }, "multiloop.server: option 'port' must be an integer from 0 to 65535 (got 70000)" },
    { opts{ port = -1 }, "multiloop.server: option 'port' must be an integer from 0 to 65535 (got -1)" },
    { opts{ port = 1.5 }, "multiloop.server: option 'port' must be an integer from 0 to 65535 (got 1.5)" },
    { opts{ port = "80" }, "multiloop.server: option 'port' must be an integer from 0 to 65535 (got '80')" },
    { opts{ workers = 0 }, "multiloop.server: option 'workers' must be an integer from 1 to 1024 (got 0)" },
    { opts{ workers = "4" }, "multiloop.server: option 'workers' must be an integer from 1 to 1024 (got '4')" },
    { opts{ backlog = 0 }, "multiloop.server: option 'backlog' must be an integer from 1 to 65535 (got 0)" },
    { opts{ host = "256.0.0.1" }, "multiloop.server: option 'host' must be an IP address or a host name such as '127.0.0.1', '::1' or 'localhost' (got '256.0.0.1')" },
    { opts{ host = 127 }, "multiloop.server: option 'host' must be an IP address or a host name such as '127.0.0.1', '::1' or 'localhost' (got 127)" },
    { opts{ host = "" }, "multiloop.server: option 'host' must be an IP address or a host name such as '127.0.0.1', '::1' or 'localhost' (got '')" },
    { opts{ host = "local host" }, "multiloop.server: option 'host' must be an IP address or a host name such as '127.0.0.1', '::1' or 'localhost' (got 'local host')" },
    { opts{ host = ("a"):rep(254) }, "multiloop.server: option 'host' must be an IP address or a host name such as '127.0.0.1', '::1' or 'localhost' (got '" .. ("a"):rep(254) .. "')" },
    { { path = "/tmp/a\0b", handler = "x" }, "multiloop.server: option 'path' must not contain a zero byte (got '/tmp/a\0b')" },
    { { path = ("p"):rep(108), handler = "x" }, "multiloop.server: option 'path' must be a Unix socket path of 1 to 107 bytes (got '" .. ("p"):rep(108) .. "')" },
    { opts{ handler = 42 }, "multiloop.server: option 'handler' must be a module name, a path to a .lua file, or a function (got 42)" },
    { opts{ handler = "" }, "multiloop.server: option 'handler' must not be empty (got '')" },
    { opts{ handler = "not a module!" }, "multiloop.server: option 'handler' must be a module name, a path to a .lua file, or a function (got 'not a module!')" },
    { opts{ handler = "spec/fixtures/missing.lua" }, "multiloop.server: option 'handler' must be a readable file: spec/fixtures/missing.lua: No such file or directory (got 'spec/fixtures/missing.lua')" },
    { opts{ handler = print }, "multiloop.server: option 'handler' must be a Lua function, not a C function (got " .. tostring(print) .. ")" },
    { opts{ config = { f = print } }, "multiloop.server: option 'config': config.f: cannot copy a function" },
    { opts{ config = { list = { 1, { co = coroutine.create(print) } } } }, "multiloop.server: option 'config': config.list[2].co: cannot copy a thread" },
    { opts{ config = { [print] = 1 } }, "multiloop.server: option 'config': config[function]: cannot copy a function used as a table key" },
    { opts{ config = io.stdout }, "multiloop.server: option 'config': config: cannot copy a userdata" },
    { opts{ idle_timeout = -1 }, "multiloop.server: option 'idle_timeout' must be an integer from 0 to 2147483647 (got -1)" },
    { opts{ max_connections = -1 }, "multiloop.server: option 'max_connections' must be an integer from 0 to 2147483647 (got -1)" },
    { opts{ keepalive = true }, "multiloop.server: option 'keepalive' must be an integer from 0 to 2147483647 (got true)" },
    { opts{ nodelay = 1 }, "multiloop.server: option 'nodelay' must be a boolean (got 1)" },
    { opts{ write_high_water = 0 }, "multiloop.server: option 'write_high_water' must be an integer from 1 to 2147483647 (got 0)" },
    { opts{ write_high_water = 1000, write_low_water = 1000 }, "multiloop.server: option 'write_low_water' must be below write_high_water (1000) (got 1000)" },
  }
  for _, case in ipairs(cases) do
    it("rejects: " .. case[2]:gsub("^multiloop%.server: ", ""), function()
      local err = server_error(case[1])
      assert.are.equal(case[2], (err:gsub("^[^:]*:%d+: ", "")))
    end)
  end

  it("rejects a handler function with upvalues, naming the upvalue", function()
    local greeting = "hi"
    local err = server_error(opts{ handler = function(conn) conn:write(greeting) end })
    assert.matches("option 'handler' must be a function with no upvalues, but it captures 'greeting'", err, 1, true)
  end)

  it("rejects a config table that contains itself", function()
    local t = { a = { } }
    t.a.back = t
    local err = server_error(opts{ config = t })
    assert.matches("option 'config': config.a.back: cannot copy a table that contains itself (a cycle)", err, 1, true)
  end)

  it("rejects tables nested too deeply", function()
    local t = {}
    local cur = t
    for _ = 1, 200 do cur.x = {}; cur = cur.x end
    assert.matches("cannot copy: tables nested too deeply", server_error(opts{ config = t }):gsub("config[.x]*: ", "cannot copy: "), 1, true)
  end)

  it("copies config 99 levels below itself, as the README says, and no deeper", function()
    local function nest(levels)             -- config plus `levels` tables inside it
      local t = {}
      local cur = t
      for _ = 1, levels do cur.x = {}; cur = cur.x end
      return t
    end
    assert.is_truthy(multiloop.server(opts{ config = nest(99) }))
    local err = server_error(opts{ config = nest(100) })
    assert.matches("option 'config': config" .. ("%.x"):rep(100) .. ": tables nested too deeply to copy$", err)
  end)

  it("defaults host to 127.0.0.1 and workers to the machine's parallelism", function()
    local s = multiloop.server{ port = 0, handler = "examples.echo_handler" }
    assert.are.equal("127.0.0.1", s.host)
    assert.are.equal(require("multiloop.core").parallelism(), s.workers)
    assert.is_true(s.workers >= 1)
  end)
end)

-- multiloop.core.new called directly, past init.lua's checks: C checks every
-- bound that protects memory again, naming the option.
describe("multiloop.core.new", function()
  local core = require("multiloop.core")
  local function good(extra)
    local o = {
      workers = 1, port = 0, host = "127.0.0.1", backlog = 16, max_connections = 0,
      idle_timeout = 0, write_high_water = 1024, write_low_water = 256, keepalive_seconds = 0,
      nodelay = true, dispatch = "queue", balance = "round_robin", handler_kind = "module",
      handler = "examples.echo_handler", package_path = package.path,
      package_cpath = package.cpath,
    }
    for k, v in pairs(extra) do o[k] = v end
    return o
  end
  local function new_error(o)
    local ok, err = pcall(core.new, o)
    assert.is_false(ok, "expected an error")
    return err
  end

  it("starts a server from a valid table", function()
    local s = core.new(good{})
    assert.is_true(s:start())
    local host, port = s:address()
    assert.are.equal("127.0.0.1", host)
    local c = helper.connect(port)
    assert.are.equal("direct", helper.echo(c, "direct"))
    c:close()
    assert.is_true(s:stop())
  end)

  local long = ("p"):rep(305)
  local cases = {
    { { path = "/tmp/" .. long, host = "" }, "option 'path' must be a string of 1 to 107 bytes (got a string of 310 bytes)" },
    { { path = "/tmp/" .. ("p"):rep(103), host = "" }, "option 'path' must be a string of 1 to 107 bytes (got a string of 108 bytes)" },
    { { path = "", host = "" }, "option 'path' must be a string of 1 to 107 bytes (got '')" },
    { { path = "/tmp/a\0b", host = "" }, "option 'path' must not contain a zero byte (got a string of 8 bytes)" },
    { { path = 42 }, "option 'path' must be a string (got 42)" },
    { { path = "/tmp/x.sock", host = "", dispatch = "reuseport" }, "option 'dispatch' 'reuseport' cannot listen on a Unix socket (path)" },
    { { mode = 432 }, "option 'mode' applies only to a Unix socket (path)" },
    { { path = "/tmp/x.sock", host = "", mode = 512 }, "option 'mode' must be an integer from 0 to 511 (got 512)" },
    { { path = "/tmp/x.sock", host = "", mode = -1 }, "option 'mode' must be an integer from 0 to 511 (got -1)" },
    { { workers = 0 }, "option 'workers' must be an integer from 1 to 1024 (got 0)" },
    { { workers = 1025 }, "option 'workers' must be an integer from 1 to 1024 (got 1025)" },
    { { workers = 2 ^ 32 + 1 }, "option 'workers' must be an integer from 1 to 1024 (got 4294967297.0)" },
    { { workers = math.maxinteger }, "option 'workers' must be an integer from 1 to 1024 (got " .. math.maxinteger .. ")" },
    { { workers = "2" }, "option 'workers' must be an integer from 1 to 1024 (got '2')" },
    { { workers = false }, "option 'workers' must be an integer from 1 to 1024 (got false)" },
    { { port = 65536 }, "option 'port' must be an integer from 0 to 65535 (got 65536)" },
    { { port = -1 }, "option 'port' must be an integer from 0 to 65535 (got -1)" },
    { { backlog = 0 }, "option 'backlog' must be an integer from 1 to 65535 (got 0)" },
    { { backlog = 1 << 32 }, "option 'backlog' must be an integer from 1 to 65535 (got 4294967296)" },
    { { max_connections = -1 }, "option 'max_connections' must be an integer from 0 to 2147483647 (got -1)" },
    { { idle_timeout = -1 }, "option 'idle_timeout' must be an integer from 0 to 2147483647 (got -1)" },
    { { idle_timeout = 1 << 40 }, "option 'idle_timeout' must be an integer from 0 to 2147483647 (got 1099511627776)" },
    { { write_high_water = 0 }, "option 'write_high_water' must be an integer from 1 to 2147483647 (got 0)" },
    { { write_high_water = -1 }, "option 'write_high_water' must be an integer from 1 to 2147483647 (got -1)" },
    { { write_low_water = -1 }, "option 'write_low_water' must be an integer from 0 to 2147483647 (got -1)" },
    { { write_low_water = 1024 }, "option 'write_low_water' must be below write_high_water (1024) (got 1024)" },
    { { write_low_water = 4096.0 }, "option 'write_low_water' must be below write_high_water (1024) (got 4096.0)" },
    { { keepalive_seconds = -1 }, "option 'keepalive_seconds' must be an integer from 0 to 2147484 (got -1)" },
    { { keepalive_seconds = 1 << 33 }, "option 'keepalive_seconds' must be an integer from 0 to 2147484 (got 8589934592)" },
    { { host = ("h"):rep(254) }, "option 'host' must be a string of 1 to 253 bytes (got a string of 254 bytes)" },
    { { host = "" }, "option 'host' must be a string of 1 to 253 bytes (got '')" },
    { { host = "127.0.0.1\0evil" }, "option 'host' must not contain a zero byte (got a string of 14 bytes)" },
    { { host = false }, "option 'host' must be a string (got false)" },
    { { dispatch = "fork" }, "option 'dispatch' is not one of the choices (got 'fork')" },
    { { balance = 3 }, "option 'balance' is not one of the choices (got 3)" },
    { { handler_kind = "closure" }, "option 'handler_kind' is not one of the choices (got 'closure')" },
    { { handler_kind = false }, "option 'handler_kind' is not one of the choices (got false)" },
    { { handler = "" }, "option 'handler' must be a string of 1 to 2147483647 bytes (got '')" },
    { { handler = print }, "option 'handler' must be a string (got " .. tostring(print) .. ")" },
    { { handler = "examples.echo\0handler" }, "option 'handler' must not contain a zero byte (got a string of 21 bytes)" },
    { { package_path = false }, "option 'package_path' must be a string (got false)" },
    { { package_cpath = 1 }, "option 'package_cpath' must be a string (got 1)" },
    { { config = { f = print } }, "option 'config': config.f: cannot copy a function" },
  }
  for _, case in ipairs(cases) do
    it("rejects: " .. case[2], function()
      assert.are.equal(case[2], new_error(good(case[1])))
    end)
  end

  it("rejects a table missing an option, naming it", function()
    local o = good{}
    o.workers = nil
    assert.are.equal("option 'workers' must be an integer from 1 to 1024 (got nil)", new_error(o))
    o = good{}
    o.host = nil
    assert.are.equal("option 'host' must be a string (got nil)", new_error(o))
  end)

  it("takes bytecode with zero bytes in it", function()
    local s = core.new(good{ handler_kind = "bytecode",
      handler = string.dump(function(conn) conn:on_data(function(d) conn:write(d) end) end) })
    assert.is_true(s:start())
    local c = helper.connect(select(2, s:address()))
    assert.are.equal("bc", helper.echo(c, "bc"))
    c:close()
    s:stop()
  end)
end)

describe("host names", function()
  for _, dispatch in ipairs { "reuseport", "queue" } do
    it("resolve 'localhost' at start and report the address bound (" .. dispatch .. ")", function()
      local s = multiloop.server(opts{ host = "localhost", workers = 2, dispatch = dispatch })
      assert.are.equal("localhost", s.host)
      s:start()
      helper.defer(function() s:stop() end)
      local host, port = s:address()
      assert.is_true(host == "127.0.0.1" or host == "::1", host)
      for _ = 1, 4 do
        local c = helper.connect(port, host)
        assert.are.equal("by name", helper.echo(c, "by name"))
        c:close()
      end
      assert.matches("^multiloop%.server{host=" .. host:gsub("%p", "%%%0") .. ", port=" .. port, tostring(s))
    end)
  end
end)

describe("start() failures", function()
  local threads, fds
  setup(function()
    -- libuv opens its process-wide signal pipe once, on first use; let that
    -- happen before counting.
    multiloop.server(opts{}):start():stop()
  end)
  before_each(function()
    threads, fds = helper.thread_count(), helper.fd_count()
  end)
  after_each(function()
    collectgarbage()
    assert.are.equal(threads, helper.thread_count())
    assert.are.equal(fds, helper.fd_count())
  end)

  local function start_error(o)
    local s = multiloop.server(o)
    local err = error_of(function() s:start() end)
    assert.is_nil(s:address())      -- nothing is running
    return err
  end

  it("names the worker when a module cannot be found", function()
    local err = start_error(opts{ workers = 2, handler = "spec.fixtures.nope" })
    assert.matches("multiloop.server: start: worker 1 failed to load the handler: module 'spec.fixtures.nope' not found:", err, 1, true)
  end)

  it("names the worker whose init raised, with the Lua error", function()
    local err = start_error(opts{ workers = 3, handler = "spec.fixtures.init_fails" })
    assert.matches("multiloop.server: start: worker 3 failed to load the handler: "
      .. "./spec/fixtures/init_fails.lua:3: init refused in the last worker", err, 1, true)
  end)

  it("carries a syntax error in a handler file", function()
    local err = start_error(opts{ handler = "spec/fixtures/syntax_error.lua" })
    assert.matches("worker 1 failed to load the handler: spec/fixtures/syntax_error.lua:3: ')' expected", err, 1, true)
  end)

  it("rejects a handler that returns neither a function nor a table", function()
    local err = start_error(opts{ handler = "spec.fixtures.returns_number" })
    assert.matches("worker 1 failed to load the handler: the handler must be a function or a table with a connect or a serve function (got number)", err, 1, true)
  end)

  it("rejects a handler table without connect or serve", function()
    local err = start_error(opts{ handler = "spec.fixtures.no_connect" })
    assert.matches("worker 1 failed to load the handler: the handler must have a connect or a serve function", err, 1, true)
  end)

  it("reports a port already in use with the system's message", function()
    local first = multiloop.server(opts{})
    first:start()
    helper.defer(function() first:stop() end)
    local _, port = first:address()
    local err = start_error(opts{ port = port })
    assert.matches(("multiloop.server: start: bind 127.0.0.1 port %d: address already in use (EADDRINUSE)"):format(port), err, 1, true)
  end)

  it("names a host that does not resolve, with getaddrinfo's reason", function()
    local err = start_error(opts{ host = "nosuch.invalid" })
    assert.matches("multiloop.server: start: resolve 'nosuch.invalid': unknown node or service (EAI_NONAME)", err, 1, true)
  end)

  it("reports a port in use by name and address", function()
    local first = multiloop.server(opts{ host = "localhost" })
    first:start()
    helper.defer(function() first:stop() end)
    local ip, port = first:address()
    local err = start_error(opts{ host = "localhost", port = port })
    assert.matches(("multiloop.server: start: bind localhost (%s) port %d: address already in use (EADDRINUSE)"):format(ip, port), err, 1, true)
  end)

  it("refuses to start a running server", function()
    local s = multiloop.server(opts{})
    s:start()
    helper.defer(function() s:stop() end)
    assert.matches("multiloop.server: start: the server is already running", error_of(function() s:start() end), 1, true)
  end)

  it("raises when a method is called with a dot", function()
    local s = multiloop.server(opts{})
    assert.matches("multiloop.server: start must be called as server:start()", error_of(function() s.start() end), 1, true)
  end)
end)

-- Out of fds, a thread's uv_loop_init fails: start() raises naming the
-- worker or the acceptor, and loses nothing (libuv 1.44 leaked the epoll fd
-- of a failed uv_loop_init: see multiloop_loop_init). Before, the loop was
-- used uninitialized and the process died on an assertion. In a child
-- process under prlimit, so the fd limit is its own.
describe("start() out of file descriptors", function()
  for _, dispatch in ipairs { "reuseport", "queue", "ipc" } do
    it("fails cleanly whichever thread runs out (" .. dispatch .. ") #child", function()
      local frees = {}
      for i = 0, 14 do frees[#frees + 1] = i end
      local cmd = ("timeout 120 prlimit --nofile=64 %s spec/fixtures/fd_starved.lua %s %s 2>&1"):format(
        os.getenv("CHILD_LUA") or "lua5.4", dispatch, table.concat(frees, " "))
      local p = assert(io.popen(cmd))
      local out = p:read("*a")
      local _, _, code = p:close()
      assert.are.equal(0, code, out)
      local seen, started = {}, false
      for line in out:gmatch("[^\n]+") do
        local free, what, fds = line:match("^(%d+)\t(.-)\t(.*)$")
        if free then
          assert.are.equal("fds ok", fds, line)
          if what == "started" then
            started = true
          else
            assert.is_false(started, "failed again with more fds free: " .. line)
            local who = what:match("^multiloop%.server: start: (.-): cannot make its loop: "
              .. "too many open files %(EMFILE%)$")
            if who then seen[who] = true
            else assert.matches("too many open files", what, 1, true) end   -- socket, socketpair
          end
        end
      end
      assert.is_true(started, out)
      assert.is_true(seen["worker 1 failed to load the handler"], out)
      if dispatch ~= "reuseport" then assert.is_true(seen["acceptor"], out) end
      assert.matches("again ok\n$", out)
    end)
  end
end)

-- A uv_loop_init that fails before it made its epoll fd (out of memory)
-- leaves backend_fd 0, from the memset it starts with: multiloop_loop_init
-- closed that, the process's fd 0, which may be anyone's by then. Made to
-- happen by an LD_PRELOAD shim (the only way to fail that allocation on
-- demand), in a child process.
describe("start() when a worker's uv_loop_init fails before its epoll fd", function()
  it("fails naming the worker, and closes no fd it does not own #child", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir " .. dir))
    finally(function() os.execute("rm -rf " .. dir) end)
    local so = dir .. "/mutex_init_fails.so"
    assert(os.execute(("env -u LD_PRELOAD cc -shared -fPIC -o %s spec/fixtures/mutex_init_fails.c -ldl")
      :format(so)))
    -- Under ASan its runtime must stay first; any other preload (valgrind's
    -- own, under make valgrind) is not for a child that runs natively.
    local preload = so
    if os.getenv("SANITIZER") == "asan" then preload = os.getenv("LD_PRELOAD") .. " " .. so end
    local cmd = ("env LD_PRELOAD='%s' %s spec/fixtures/loop_init_fails.lua "
      .. "< spec/fixtures/loop_init_fails.lua 2>&1"):format(preload, os.getenv("CHILD_LUA") or "lua5.4")
    local p = assert(io.popen(cmd))
    local out = p:read("*a")
    local _, _, code = p:close()
    assert.are.equal(0, code, out)
    assert.are.equal("multiloop.server: start: worker 1 failed to load the handler: cannot make "
      .. "its loop: not enough memory (ENOMEM)\nstdin ok\n", out)
  end)
end)
