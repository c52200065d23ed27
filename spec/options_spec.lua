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
    { opts{ host = "localhost" }, "multiloop.server: option 'host' must be an IPv4 or IPv6 address such as '127.0.0.1' or '::1' (got 'localhost')" },
    { opts{ host = "256.0.0.1" }, "multiloop.server: option 'host' must be an IPv4 or IPv6 address such as '127.0.0.1' or '::1' (got '256.0.0.1')" },
    { opts{ host = 127 }, "multiloop.server: option 'host' must be an IPv4 or IPv6 address such as '127.0.0.1' or '::1' (got 127)" },
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

  it("defaults host to 127.0.0.1 and workers to the machine's parallelism", function()
    local s = multiloop.server{ port = 0, handler = "examples.echo_handler" }
    assert.are.equal("127.0.0.1", s.host)
    assert.are.equal(require("multiloop.core").parallelism(), s.workers)
    assert.is_true(s.workers >= 1)
  end)
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
    assert.matches("worker 1 failed to load the handler: the handler must be a function or a table with a connect function (got number)", err, 1, true)
  end)

  it("rejects a handler table without connect", function()
    local err = start_error(opts{ handler = "spec.fixtures.no_connect" })
    assert.matches("worker 1 failed to load the handler: the handler's connect must be a function (got nil)", err, 1, true)
  end)

  it("reports a port already in use with the system's message", function()
    local first = multiloop.server(opts{})
    first:start()
    helper.defer(function() first:stop() end)
    local _, port = first:address()
    local err = start_error(opts{ port = port })
    assert.matches(("multiloop.server: start: bind 127.0.0.1 port %d: address already in use (EADDRINUSE)"):format(port), err, 1, true)
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
