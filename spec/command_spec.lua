-- The multiloop command (bin/multiloop), run as a child process the way an
-- operator or a supervisor runs it: it serves a handler given as a file or
-- a module, says where it listens, stops gracefully on SIGINT and SIGTERM
-- with exit status 0; --check loads a handler in a worker's state without
-- running anything; --version, --help; every wrong flag and config file
-- fails with status 2 and a message that names the flag; a config file sets
-- any server option and the flags override it. Every run goes through
-- `timeout` (helper.spawn_command for those that serve), so a command that
-- never ends fails the test instead of hanging it.
local helper = require("spec.helper")
local socket = require("socket")

local LUA = os.getenv("CHILD_LUA") or "lua5.4"
local COMMAND = LUA .. " bin/multiloop"

local function write(path, s)
  local f = assert(io.open(path, "w"))
  f:write(s)
  f:close()
end

local function tmpfile(body, suffix)
  local path = os.tmpname() .. (suffix or ".lua")
  write(path, body)
  helper.defer(function() os.remove(path) end)
  return path
end

-- Runs the command to its end (within 20 s): stdout, stderr, exit status.
local function run(args, prefix)
  local errfile = os.tmpname()
  local p = assert(io.popen(("%s timeout 20 %s %s 2>%s"):format(prefix or "", COMMAND, args,
    errfile)))
  local out = p:read("a")
  local _, _, code = p:close()
  local f = assert(io.open(errfile))
  local err = f:read("a")
  f:close()
  os.remove(errfile)
  return out, err, code
end

-- Starts the command serving; returns the child and where it says it
-- listens (the whole line, and the port when it is TCP).
local function serve(args)
  local child = helper.spawn_command(COMMAND .. " " .. args)
  local line = child.line() or ""
  assert(line:match("^multiloop: listening on "), "the command did not start: " .. line
    .. child.stderr())
  assert(child.caught_term(), "the command never caught SIGTERM: " .. child.stderr())
  return child, line, tonumber(line:match(":(%d+) %("))
end

local function stops_on(child, sig)
  child.signal(sig)
  local rest, how, code = child.wait()
  assert.are.same({ "multiloop: stopped on SIG" .. sig .. "\n", "exit", 0 }, { rest, how, code },
    child.stderr())
  assert.are.equal("", child.stderr())
end

describe("the multiloop command #child", function()
  describe("serving", function()
    for _, sig in ipairs { "TERM", "INT" } do
      it(("serves a handler file, says where, and stops gracefully on SIG%s"):format(sig), function()
        local child, line, port = serve("examples/echo_handler.lua --port 0 --workers 2")
        assert.are.equal(("multiloop: listening on 127.0.0.1:%d (2 workers, dispatch reuseport, "
          .. "handler examples/echo_handler.lua)"):format(port), line)
        local c = helper.connect(port)
        helper.defer(function() c:close() end)
        assert.are.equal("ping\n", helper.echo(c, "ping\n"))
        c:close()
        stops_on(child, sig)
      end)
    end

    it("lets an open connection finish after SIGTERM, then exits 0", function()
      local child, _, port = serve("examples.echo_handler --port 0 --workers 1 --dispatch queue")
      local c = helper.connect(port)
      helper.defer(function() c:close() end)
      assert.are.equal("before\n", helper.echo(c, "before\n"))
      child.signal("TERM")
      -- The grace period (5 s): new connections are refused as soon as the
      -- stop has begun, and the open one still echoes.
      assert(helper.eventually(function()
        local late = socket.tcp()
        late:settimeout(1)
        local connected = late:connect("127.0.0.1", port)
        late:close()
        return not connected
      end, 5000), "still accepting after SIGTERM")
      assert.are.equal("during\n", helper.echo(c, "during\n"))
      local t0 = socket.gettime()
      c:close()
      local rest, how, code = child.wait()
      assert.are.same({ "multiloop: stopped on SIGTERM\n", "exit", 0 }, { rest, how, code },
        child.stderr())
      assert.truthy(socket.gettime() - t0 < 3, "it waited past the last connection")
    end)

    it("takes a module name, host and dispatch", function()
      local child, line, port = serve("examples.echo_handler --host=127.0.0.1 --port=0 "
        .. "--workers=3 --dispatch=ipc")
      assert.are.equal(("multiloop: listening on 127.0.0.1:%d (3 workers, dispatch ipc, "
        .. "handler examples.echo_handler)"):format(port), line)
      assert.are.equal("x", helper.echo(helper.connect(port), "x"))
      stops_on(child, "TERM")
    end)

    it("listens on a Unix socket with --path, and removes it at the end", function()
      local path = helper.sock_path()
      local child, line = serve("spec/fixtures/greeter.lua --path " .. path .. " --workers 1")
      assert.are.equal(("multiloop: listening on %s (1 worker, dispatch queue, handler "
        .. "spec/fixtures/greeter.lua)"):format(path), line)
      local c = helper.connect_unix(path)
      assert.are.equal("hello from worker 1 of 1", helper.line(c))
      c:close()
      stops_on(child, "TERM")
      assert.is_false(helper.exists(path))
    end)

    -- It prints from run()'s ready hook, with the signals already caught.
    -- (When it printed before run(), a signal in between met the default
    -- action; that window was too short for this test to hit, so it guards
    -- the order rather than proving the old one wrong.)
    it("stops gracefully on a SIGTERM sent the moment it says it listens", function()
      for _ = 1, 3 do
        local path = helper.sock_path()
        local child = helper.spawn_command(COMMAND .. " examples/echo_handler.lua --workers 1 --path "
          .. path)
        local line = child.line() or ""
        assert(line:match("^multiloop: listening on "), line .. child.stderr())
        os.execute(("kill -TERM %d"):format(child.pid))     -- no waiting for the handlers
        local rest, how, code = child.wait()
        assert.are.same({ "multiloop: stopped on SIGTERM\n", "exit", 0 }, { rest, how, code },
          child.stderr())
        assert.is_false(helper.exists(path))
      end
    end)

    it("fails with status 1 when the server cannot start, saying why", function()
      local l = assert(socket.bind("127.0.0.1", 0))
      helper.defer(function() l:close() end)
      local _, port = l:getsockname()
      local out, err, code = run("examples/echo_handler.lua --dispatch queue --port " .. port)
      assert.are.equal("", out)
      assert.are.equal(1, code)
      assert.are.equal(("multiloop: start: bind 127.0.0.1 port %d: address already in use "
        .. "(EADDRINUSE)\n"):format(port), err)
      out, err, code = run("spec/fixtures/syntax_error.lua --port 0 --workers 1")
      assert.are.same({ "", 1 }, { out, code })
      assert.truthy(err:find("^multiloop: start: worker 1 failed to load the handler: "
        .. "spec/fixtures/syntax_error.lua:3: "), err)
    end)
  end)

  describe("under a supervisor", function()
    it("serves the socket socket activation passed (--listen systemd), logs to --log, "
      .. "reopens it on SIGUSR1", function()
      if not helper.installed("systemd-socket-activate") then
        pending("systemd-socket-activate is not installed (Debian: systemd)")
        return
      end
      local port = helper.free_port()
      local log = os.tmpname()
      helper.defer(function() os.remove(log) os.remove(log .. ".1") end)
      -- It passes on only the environment -E names (the module's paths; under
      -- `make asan` the sanitizer's runtime and options).
      local env = ""
      for _, v in ipairs { "LUA_PATH", "LUA_CPATH", "LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS" } do
        if os.getenv(v) then env = env .. " -E " .. v end
      end
      local child = helper.spawn_command(("systemd-socket-activate%s -l 127.0.0.1:%d %s "
        .. "examples/echo_handler.lua --listen systemd --workers 1 --log %s"):format(env, port,
        COMMAND, log))
      assert(helper.eventually(function() return child.stderr():find("Listening on") end, 5000),
        child.stderr())
      local c = helper.connect(port)       -- the first connection starts the command
      helper.defer(function() c:close() end)
      assert.are.equal("ping\n", helper.echo(c, "ping\n"))
      assert.matches("^multiloop: listening on 127%.0%.0%.1:" .. port .. " %(1 worker, dispatch queue",
        child.line())
      assert(os.rename(log, log .. ".1"))  -- logrotate's move, then its postrotate signal
      child.signal("USR1")
      assert(helper.eventually(function()
        local f = io.open(log)
        local text = f and f:read("a")
        if f then f:close() end
        return text and text:find(" info main: SIGUSR1: log reopened\n", 1, true)
      end, 5000), "no record in the reopened log")
      c:close()
      child.signal("TERM")
      local rest, how, code = child.wait()
      assert.are.same({ "multiloop: stopped on SIGTERM\n", "exit", 0 }, { rest, how, code })
    end)
  end)

  describe("a config file", function()
    it("sets any server option, handler and worker.config included", function()
      local conf = tmpfile([[
return {
  handler = "spec/fixtures/greeter.lua",
  host = "127.0.0.1", port = 0, workers = 2, dispatch = "queue",
  backlog = 64, idle_timeout = 30000,
  config = { greeting = "hi" },
}]])
      local child, line, port = serve("--config " .. conf)
      assert.are.equal(("multiloop: listening on 127.0.0.1:%d (2 workers, dispatch queue, "
        .. "handler spec/fixtures/greeter.lua)"):format(port), line)
      local c = helper.connect(port)
      assert.are.equal("hi from worker 1 of 2", helper.line(c))
      c:close()
      stops_on(child, "TERM")
    end)

    it("is overridden by the flags: HANDLER, --workers, --port over its path", function()
      local conf = tmpfile(([[
return {
  handler = "examples/nosuch.lua",
  path = %q, mode = "0600",
  workers = 3, dispatch = "ipc",
  config = { greeting = "hey" },
}]]):format(helper.sock_path()))
      local child, line, port = serve("spec/fixtures/greeter.lua --config=" .. conf
        .. " --workers 1 --port 0")
      assert.are.equal(("multiloop: listening on 127.0.0.1:%d (1 worker, dispatch ipc, "
        .. "handler spec/fixtures/greeter.lua)"):format(port), line)
      local c = helper.connect(port)
      assert.are.equal("hey from worker 1 of 1", helper.line(c))
      c:close()
      stops_on(child, "TERM")
    end)

    for _, case in ipairs {
      { "return 42", "--config: %s must return a table of server options (got number)" },
      { "return {", "--config: %s:1: unexpected symbol near <eof>" },
      { "error('no')", "--config: %s: %s:1: no" },
      { "return { port = 0, backlog = 0 }",
        "--config %s: option 'backlog' must be an integer from 1 to 65535 (got 0)" },
      { "return { port = 0, bogus = 1 }", "--config %s: unknown option 'bogus'" },
    } do
      it("that is wrong fails with status 2, naming it: " .. case[1], function()
        local conf = tmpfile(case[1])
        local out, err, code = run("examples/echo_handler.lua --config " .. conf)
        assert.are.equal("", out)
        assert.are.equal(2, code)
        assert.are.equal("multiloop: " .. case[2]:format(conf, conf) .. "\n", err)
      end)
    end

    it("that is missing fails with status 2, naming it", function()
      local _, err, code = run("examples/echo_handler.lua --config /nonexistent/conf.lua")
      assert.are.equal(2, code)
      assert.are.equal("multiloop: --config: cannot open /nonexistent/conf.lua: No such file or "
        .. "directory\n", err)
    end)
  end)

  describe("--check", function()
    it("loads a good handler without serving or running init: status 0", function()
      for _, h in ipairs { "examples/echo_handler.lua", "examples.echo_handler",
                           "spec/fixtures/init_fails.lua" } do
        local out, err, code = run(h .. " --check")
        assert.are.same({ ("multiloop: --check: %s loads and the options are good\n"):format(h),
          "", 0 }, { out, err, code })
      end
    end)

    it("loads the handler in a worker's state (multiloop.ngx loads there only)", function()
      local out, err, code = run("examples.kv_redis --check")
      assert.are.same({ "multiloop: --check: examples.kv_redis loads and the options are good\n",
        "", 0 }, { out, err, code })
    end)

    it("reads a file in the current directory with no .lua as a file", function()
      local dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir " .. dir))
      helper.defer(function() os.execute("rm -rf " .. dir) end)
      write(dir .. "/handler", "return function(conn) conn:close() end\n")
      local cwd = io.popen("pwd"):read("l")
      local env = ("cd %s && LUA_PATH='%s/lua/?.lua;%s/lua/?/init.lua;;' LUA_CPATH='%s/build/?.so;;' ")
        :format(dir, cwd, cwd, cwd)
      if os.getenv("SPEC_CPATH") then
        env = env:gsub("LUA_CPATH='[^']*'", ("LUA_CPATH='%s/%s;;'"):format(cwd,
          os.getenv("SPEC_CPATH"):gsub("^%./", "")))
      end
      local p = assert(io.popen(env .. ("timeout 20 %s %s/bin/multiloop handler --check 2>&1")
        :format(LUA, cwd)))
      local out = p:read("a")
      local _, _, code = p:close()
      assert.are.same({ "multiloop: --check: ./handler loads and the options are good\n", 0 },
        { out, code })
    end)

    for _, case in ipairs {
      { "spec/fixtures/syntax_error.lua",
        "multiloop: --check: spec/fixtures/syntax_error.lua: spec/fixtures/syntax_error.lua:3: "
        .. "')' expected (to close '(' at line 2) near 'end'\n" },
      { "spec/fixtures/returns_number.lua",
        "multiloop: --check: spec/fixtures/returns_number.lua: the handler must be a function or "
        .. "a table with a connect or a serve function (got number)\n" },
      { "spec/fixtures/nosuch.lua",
        "multiloop: HANDLER: option 'handler' must be a readable file: spec/fixtures/nosuch.lua: "
        .. "No such file or directory (got 'spec/fixtures/nosuch.lua')\n", 2 },
    } do
      it("fails on a broken handler, with the error: " .. case[1], function()
        local out, err, code = run(case[1] .. " --check")
        assert.are.same({ "", case[2], case[3] or 1 }, { out, err, code })
      end)
    end

    it("fails on a module that is not there, naming it", function()
      local out, err, code = run("spec.fixtures.nosuch --check")
      assert.are.same({ "", 1 }, { out, code })
      assert.truthy(err:find("^multiloop: %-%-check: spec%.fixtures%.nosuch: module "
        .. "'spec%.fixtures%.nosuch' not found:\n"), err)
    end)

    it("checks a function handler from a config file", function()
      local conf = tmpfile("return { handler = function(conn) conn:close() end }")
      local out, err, code = run("--check --config " .. conf)
      assert.are.same({ "multiloop: --check: function loads and the options are good\n", "", 0 },
        { out, err, code })
      conf = tmpfile("local n = 1\nreturn { handler = function(conn) conn:write(n) end }")
      out, err, code = run("--check --config " .. conf)
      assert.are.same({ "", 2 }, { out, code })
      assert.truthy(err:find("^multiloop: %-%-config [^:]+: option 'handler' must be a function "
        .. "with no upvalues, but it captures 'n'"), err)
    end)

    it("checks the options too", function()
      local out, err, code = run("examples/echo_handler.lua --check --workers 0")
      assert.are.same({ "", "multiloop: --workers: option 'workers' must be an integer from 1 "
        .. "to 1024 (got 0)\n", 2 }, { out, err, code })
    end)
  end)

  describe("--version and --help", function()
    it("--version prints the versions", function()
      local out, err, code = run("--version")
      assert.are.same({ "", 0 }, { err, code })
      assert.truthy(out:match("^multiloop %d+%.%d+%.%d+ %(libuv %d+%.%d+%.%d+, Lua 5%.4%)\n$"), out)
    end)

    it("--help prints the usage, every flag in it", function()
      local out, err, code = run("--help")
      assert.are.same({ "", 0 }, { err, code })
      assert.truthy(out:find("^Usage: multiloop HANDLER %[options%]\n"), out)
      for _, flag in ipairs { "--host", "--port", "--path", "--workers", "--dispatch", "--config",
                              "--tls-cert", "--tls-key", "--proxy-protocol", "--log-level",
                              "--check", "--version", "--help" } do
        assert.truthy(out:find("\n  " .. flag .. " ", 1, true) or out:find("\n  " .. flag .. "\n", 1, true),
          flag)
      end
      local also = run("examples/echo_handler.lua --port 0 --help")    -- wins over serving
      assert.are.equal(out, also)
    end)
  end)

  describe("a wrong command line", function()
    local HELP = " (multiloop --help lists the options)"
    for _, case in ipairs {
      { "examples/echo_handler.lua --port 0 --workers x",
        "--workers: option 'workers' must be an integer from 1 to 1024 (got 'x')" },
      { "examples/echo_handler.lua --port 0 --workers 0",
        "--workers: option 'workers' must be an integer from 1 to 1024 (got 0)" },
      { "examples/echo_handler.lua --port 70000",
        "--port: option 'port' must be an integer from 0 to 65535 (got 70000)" },
      { "examples/echo_handler.lua --port 1.5",
        "--port: option 'port' must be an integer from 0 to 65535 (got '1.5')" },
      { "examples/echo_handler.lua --port 0 --dispatch fast",
        "--dispatch: option 'dispatch' must be one of 'ipc', 'queue', 'reuseport' (got 'fast')" },
      { "examples/echo_handler.lua --port 0 --host 256.0.0.1",
        "--host: option 'host' must be an IP address or a host name such as '127.0.0.1', '::1' "
        .. "or 'localhost' (got '256.0.0.1')" },
      { "examples/echo_handler.lua --port", "--port: expected a value" .. HELP },
      { "examples/echo_handler.lua --port=", "--port: expected a value, got an empty string" .. HELP },
      { "examples/echo_handler.lua --port 0 --bogus", "unknown option '--bogus'" .. HELP },
      { "examples/echo_handler.lua --port 0 --check=yes", "--check: takes no value" .. HELP },
      { "a.lua b.lua --port 0", "expected one HANDLER, got 2 arguments: 'a.lua' 'b.lua'" .. HELP },
      { "--port 0", "expected a HANDLER (a Lua file or a module name)" .. HELP },
      { "examples/echo_handler.lua", "expected --port (0 picks a free port), --path, --listen or --fd" .. HELP },
      { "examples/echo_handler.lua --listen systemd --port 0",
        "--listen (inherited sockets) cannot be combined with --host, --port or --path" .. HELP },
      { "examples/echo_handler.lua --fd 3 --path /tmp/x.sock",
        "--fd (inherited sockets) cannot be combined with --host, --port or --path" .. HELP },
      { "examples/echo_handler.lua --port 0 --log-level loud",
        "--log-level: option 'log_level' must be one of 'error', 'warn', 'info', 'debug' (got 'loud')" },
      { "examples/echo_handler.lua --path /tmp/x.sock --port 0",
        "--path (a Unix socket) cannot be combined with --host or --port" .. HELP },
      { "examples/echo_handler.lua --port 0 --tls-cert c.pem",
        "--tls-cert and --tls-key go together (got only --tls-cert)" .. HELP },
      { "examples/echo_handler.lua --port 0 --tls-key k.pem",
        "--tls-cert and --tls-key go together (got only --tls-key)" .. HELP },
    } do
      it("fails with status 2, naming the flag: " .. case[1], function()
        local out, err, code = run(case[1])
        assert.are.same({ "", "multiloop: " .. case[2] .. "\n", 2 }, { out, err, code })
      end)
    end

    -- These pass their option through to the server, which decides: while
    -- it lacks the feature it rejects the option, and a bad value later;
    -- either way the message names the flag first.
    for _, case in ipairs {
      { "--tls-cert /nonexistent/c.pem --tls-key /nonexistent/k.pem", "--tls-cert/--tls-key", "tls" },
      { "--proxy-protocol not-an-address", "--proxy-protocol", "proxy_protocol" },
      { "--log-level loud", "--log-level", "log_level" },
    } do
      it("passes " .. case[2] .. " to the server, and names the flag when it refuses", function()
        local out, err, code = run("examples/echo_handler.lua --port 0 --check " .. case[1])
        assert.are.same({ "", 2 }, { out, code })
        assert.truthy(err:find("multiloop: " .. case[2] .. ": ", 1, true) == 1, err)
        assert.truthy(err:find("'" .. case[3], 1, true), err)
      end)
    end
  end)
end)
