-- OpenResty compatibility (issue 15): Debian's lua-resty-redis (package
-- lua-nginx-redis, the module nginx.redis) loaded unchanged in a worker
-- over multiloop.ngx, against a real redis-server this file starts on a
-- free loopback port and stops by its pid; and the ngx table itself.
--
-- The handler is spec/fixtures/ngx_redis.lua: a serve handler with a line
-- protocol ("CASE ARG...\n" in, one line of results out), so that every
-- Redis call runs in a worker's light thread over worker.tcp and what it
-- returned comes back over a real socket.
local helper = require("spec.helper")
local socket = require("socket")

local REDIS_LUA = "/usr/share/lua/5.1/nginx/redis.lua"

local installed, start_redis = helper.installed, helper.start_redis

-- One request on c, its one line of reply.
local function ask(c, line)
  assert(c:send(line .. "\n"))
  return helper.line(c)
end

describe("multiloop.ngx", function()
  it("raises outside a worker's state, naming itself", function()
    local ok, err = pcall(require, "multiloop.ngx")
    assert.is_false(ok)
    assert.are.equal("multiloop.ngx: not in a worker's state: require it from a handler "
      .. "(its module, init, serve, a light thread or a timer), not from the main state", err)
    assert.is_nil(package.loaded["multiloop.ngx"])
  end)
end)

describe("multiloop.ngx in a worker", function()
  local server, c, _

  before_each(function()
    if not helper.exists(REDIS_LUA) then return end
    server, _, c = helper.serve_client("spec.fixtures.ngx_redis", { workers = 1 })
  end)
  after_each(function()
    helper.stop_checked(server)
    server = nil
  end)

  local function skip_without_library()
    if not helper.exists(REDIS_LUA) then
      pending("lua-nginx-redis is not installed (" .. REDIS_LUA .. ")")
      return true
    end
  end

  it("ngx.now() is the epoch time in seconds, ms resolution; ngx.time() its floor; ngx.sleep in seconds", function()
    if skip_without_library() then return end
    local before = socket.gettime()
    local reply = ask(c, "now")
    local words = {}
    for w in reply:gmatch("%S+") do words[#words + 1] = w end
    assert.are.same({ "integer", "true", "true", "true", "true" }, { table.unpack(words, 1, 5) })
    local t0 = tonumber(words[6])
    assert.is_true(math.abs(t0 - before) < 1.5, reply)
  end)

  it("install() sets unpack and ngx, and gives require 'table.new' (lua_createtable)", function()
    local reply = ask(c, "install")
    assert.are.equal("true true function table nil false ", reply:sub(1, 35))
    assert.matches("bad argument #2 .*number expected, got string", reply)
  end)

  it("ngx.null is one read-only value, not nil or false, that prints as null", function()
    if skip_without_library() then return end
    local reply = ask(c, "null")
    assert.are.equal("true true true true null false ", reply:sub(1, 31))
    assert.is_truthy(reply:find("multiloop.ngx: ngx.null is read-only", 1, true), reply)
  end)

  it("ngx.timer.at(s, fn, ...) calls fn(false, ...) in a light thread; ngx.timer.every repeats", function()
    if skip_without_library() then return end
    assert.are.equal("true nil false a nil 3 true", ask(c, "timer"))
    assert.are.equal("true true false", ask(c, "every"))
  end)

  it("ngx.worker.exiting() ends a background timer's loop when the server stops", function()
    if skip_without_library() then return end
    local d = require("multiloop").shared("spec_ngx")
    assert.are.equal("true false", ask(c, "background"))
    assert(helper.eventually(function() return d:get("rounds") >= 3 end))
    local s = server
    server = nil
    local t0 = socket.gettime()
    assert(s:stop())                         -- at once: the sleep answers "stopped"
    assert.is_true(socket.gettime() - t0 < 1)
    assert.are.equal(0, s:stats().threads)
    assert.are.equal("true nil process exiting", d:get("ended"))
  end)

  it("ngx.worker.exiting() is true as soon as a graceful stop begins", function()
    if skip_without_library() then return end
    local d = require("multiloop").shared("spec_ngx")
    assert.are.equal("true false", ask(c, "background"))
    assert(helper.eventually(function() return d:get("rounds") >= 3 end))
    local s = server
    server = nil
    c:close()                                -- so only the background thread is left
    local t0 = socket.gettime()
    assert(s:stop({ timeout = 5000 }))       -- the loop sees exiting() and ends itself
    assert.is_true(socket.gettime() - t0 < 1, "the stop waited for its timeout")
    assert.are.equal(0, s:stats().threads)
    assert.matches("^true ", d:get("ended"))
  end)

  it("misuse raises, naming the function and the argument", function()
    if skip_without_library() then return end
    local want = {
      at_delay = "multiloop.ngx: ngx.timer.at's delay must be a number of seconds from 0 to 1e9 (got -1)",
      at_fn = "multiloop.ngx: ngx.timer.at's callback must be a function (got string)",
      every_zero = "multiloop.ngx: ngx.timer.every's delay must be at least 0.001 s (got 0)",
      sleep = "multiloop.ngx: ngx.sleep's argument must be a number of seconds from 0 to 1e9 (got x)",
      log = "multiloop.ngx: ngx.log: the level must be one of ngx.STDERR (0) .. ngx.DEBUG (8) (got 9)",
      log_nil = "multiloop.ngx: ngx.log: the level must be one of ngx.STDERR (0) .. ngx.DEBUG (8) (got nil)",
      exptime = "multiloop.ngx: ngx.shared.DICT:set's exptime must be a number of seconds from 0 to 1e9 (got -1)",
    }
    for what, msg in pairs(want) do
      local reply = ask(c, "misuse " .. what)
      -- The position is the caller's, in the fixture.
      local where, rest = reply:match("^false %S*(spec/fixtures/ngx_redis%.lua):%d+: (.*)$")
      assert.are.equal("spec/fixtures/ngx_redis.lua", where, what .. ": " .. reply)
      assert.are.equal(msg, rest, what)
    end
  end)

  it("ngx.shared.NAME is multiloop.shared(NAME) with OpenResty's seconds and method names", function()
    if skip_without_library() then return end
    assert.are.equal("true true nil false true v 15 true false exists false k,n nil 0 "
      .. "ngx.shared.spec_ngx (multiloop.shared 'spec_ngx')", ask(c, "shared"))
    -- The same dictionary, seen from the main state.
    local d = require("multiloop").shared("spec_ngx")
    assert.are.equal(15, d:get("n"))
    assert.are.equal(1, d:get("forever"))
  end)
end)

describe("multiloop.ngx with 2 workers", function()
  it("ngx.worker.id() counts from 0, ngx.worker.count() is the number of workers", function()
    if not helper.exists(REDIS_LUA) then
      pending("lua-nginx-redis is not installed (" .. REDIS_LUA .. ")")
      return
    end
    local server = helper.server({ workers = 2, handler = "spec.fixtures.ngx_redis", balance = "round_robin" })
    finally(function() helper.stop_checked(server) end)
    local _, port = server:address()
    local seen = {}
    for _ = 1, 2 do
      local c = helper.connect(port)
      seen[#seen + 1] = ask(c, "worker")
      c:close()
    end
    table.sort(seen)
    assert.are.same({ "0 2 1", "1 2 2" }, seen)
  end)
end)

describe("ngx.log #child", function()
  it("writes one line to the worker log naming the level and the worker; drops levels above the filter", function()
    if not helper.exists(REDIS_LUA) then
      pending("lua-nginx-redis is not installed (" .. REDIS_LUA .. ")")
      return
    end
    local child = helper.spawn("spec.fixtures.ngx_redis 1")
    helper.defer(child.kill)
    local c = helper.connect(child.port)
    finally(function() c:close() end)
    assert.are.equal("true", ask(c, "log ERR - hello 42"))
    assert.are.equal("true", ask(c, "log WARN - dropped"))          -- the default filter: ERR
    assert.are.equal("true", ask(c, "log WARN INFO shown"))
    assert.are.equal("true", ask(c, "log DEBUG - dropped"))
    assert.are.equal("true", ask(c, "log STDERR - always"))
    c:close()
    local _, code = child.stop()
    assert.are.equal(0, code)
    local lines = {}
    for line in child.stderr():gmatch("[^\n]+") do    -- the worker log's lines, without the time
      lines[#lines + 1] = line:match("^[%d%-]+T[%d:]+%.%d%d%dZ (.*)$") or line
    end
    assert.are.same({
      "error worker 1: [error] hello 42niltrue1.5",
      "warn worker 1: [warn] shownniltrue1.5",
      "error worker 1: [stderr] alwaysniltrue1.5",
    }, lines)
  end)
end)

describe("lua-resty-redis over multiloop.ngx against redis-server", function()
  local redis, server, c, _

  setup(function()
    if installed("redis-server") and helper.exists(REDIS_LUA) then redis = assert(start_redis()) end
  end)
  teardown(function()
    if redis then redis.stop() end
  end)

  before_each(function()
    if not redis then return end
    server, _, c = helper.serve_client("spec.fixtures.ngx_redis",
      { workers = 1, config = { redis_port = redis.port } })
  end)
  after_each(function()
    helper.stop_checked(server)
    server = nil
  end)

  local function skip()
    if not redis then
      pending("needs redis-server and lua-nginx-redis (Debian: redis-server, lua-nginx-redis)")
      return true
    end
  end

  it("set, get, incr, and an error reply as false, err", function()
    if skip() then return end
    assert.are.equal("OK hello 1 2 false ERR value is not an integer or out of range",
      ask(c, "basic spec:basic hello"))
  end)

  it("hmset from a table and from pairs, hgetall, array_to_hash", function()
    if skip() then return end
    assert.are.equal("OK OK 6 1 two 3", ask(c, "hash spec:hash"))
  end)

  it("pipelines: init_pipeline, commands, commit_pipeline returns each reply in order", function()
    if skip() then return end
    assert.are.equal("6 OK v 0 1 false ERR value is not an integer or out of range true",
      ask(c, "pipeline spec:pipe"))
  end)

  it("reuses a pooled connection: get_reused_times() > 0 on the second request, set_keepalive 1", function()
    if skip() then return end
    assert.are.equal("0 PONG 1 nil", ask(c, "pooled"))
    assert.are.equal("1 PONG 1 nil", ask(c, "pooled"))
    assert.are.equal("2 PONG 1 nil", ask(c, "pooled"))
    -- server:stats() counts them: one connect, two reuses, one idle now.
    local st = server:stats()
    assert.are.same({ 1, 0, 2, 1 }, { st.connects, st.connect_errors, st.reused, st.pooled })
    assert.are.same({ 1, 0, 2, 1 }, { st.workers[1].connects, st.workers[1].connect_errors,
      st.workers[1].reused, st.workers[1].pooled })
    -- Redis sees one client from us: the pooled one (and none other left open).
    -- (Clients of earlier tests may take Redis a moment to see closed.)
    local r = helper.connect(redis.port)
    finally(function() r:close() end)
    local function clients()
      assert(r:send("CLIENT LIST\r\n"))
      local len = tonumber(helper.line(r):match("^%$(%d+)$"))
      local list = assert(r:receive(len + 2))
      return select(2, list:gsub("cmd=", "")), list
    end
    helper.eventually(function() return clients() == 2 end)
    local n, list = clients()
    assert.are.equal(2, n, list)             -- this client and the pooled one
  end)

  it("returns ngx.null for a missing key", function()
    if skip() then return end
    assert.are.equal("true true null nil table", ask(c, "missing spec:missing"))
  end)

  it("redis down: connect returns nil, \"connection refused\"", function()
    if skip() then return end
    -- A port bound and not listening: nothing can take it meanwhile.
    local s = assert(socket.tcp())
    finally(function() s:close() end)
    assert(s:bind("127.0.0.1", 0))
    local _, port = s:getsockname()
    assert.are.equal("nil connection refused", ask(c, "down " .. port))
    local st = server:stats()
    assert.are.same({ 0, 1 }, { st.connects, st.connect_errors })
  end)

  it("ngx.socket.connect: a connected socket, or nil, err", function()
    if skip() then return end
    local s = assert(socket.tcp())
    finally(function() s:close() end)
    assert(s:bind("127.0.0.1", 0))
    local _, port = s:getsockname()
    assert.are.equal("+PONG nil connection refused", ask(c, "shortcut " .. port))
  end)

  it("a read timeout: BLPOP on an empty list with a 100 ms timeout returns nil, \"timeout\"", function()
    if skip() then return end
    -- lua-resty-redis closes the socket on a timeout, so the next command
    -- gets "closed".
    assert.are.equal("nil timeout true nil closed", ask(c, "timeout spec:empty"))
  end)

  it("a connection Redis closed: QUIT, then a command returns nil, \"closed\"", function()
    if skip() then return end
    assert.are.equal("OK nil closed nil 0 PONG", ask(c, "quit spec:k"))
  end)

  it("a connection another client killed (CLIENT KILL ID): the next command returns nil, \"closed\"", function()
    if skip() then return end
    assert.are.equal("number 1 nil closed", ask(c, "killed spec:k"))
  end)

  it("drops a pooled connection that Redis closes while it is idle", function()
    if skip() then return end
    assert.are.equal("1 1 0 PONG", ask(c, "idle_killed"))
  end)

  it("200 light threads at once, each on a connection of its own, back into a pool of 4", function()
    if skip() then return end
    assert.are.equal("200 0 true", ask(c, "concurrent spec:conc 200"))
    -- The pool keeps 4 idle connections: Redis sees those and this client.
    local r = helper.connect(redis.port)
    finally(function() r:close() end)
    local function clients()
      assert(r:send("CLIENT LIST\r\n"))
      local len = tonumber(helper.line(r):match("^%$(%d+)$"))
      return select(2, assert(r:receive(len + 2)):gsub("cmd=", ""))
    end
    helper.eventually(function() return clients() == 5 end)
    assert.are.equal(5, clients())
  end)

  it("sets and gets a 4 MiB value with every byte value in it", function()
    if skip() then return end
    assert.are.equal("OK true 4194304 4194304", ask(c, "big spec:big 4194304"))
  end)

  it("connects by name (localhost) and over Redis's Unix socket", function()
    if skip() then return end
    assert.are.equal("1 PONG", ask(c, "byname localhost"))
    assert.are.equal("1 PONG", ask(c, "byname unix:" .. redis.path))
    assert.are.equal("nil no such file or directory", ask(c, "byname unix:" .. redis.path .. ".nope"))
  end)

  it("stop() ends a command waiting on Redis: \"stopped\", the connection closed, nothing left", function()
    if skip() then return end
    local d = require("multiloop").shared("spec_ngx")
    d:delete("blpop")
    assert(c:send("blpop_long spec:never\n"))
    assert(helper.eventually(function() return d:get("blpop") == "waiting" end))
    local t0 = socket.gettime()
    local s = server
    server = nil
    assert(s:stop())
    assert.is_true(socket.gettime() - t0 < 2)
    assert.are.equal(0, s:stats().threads)
    assert.are.equal("nil stopped", d:get("blpop"))
    -- Redis sees that connection go.
    local r = helper.connect(redis.port)
    finally(function() r:close() end)
    local function clients()
      assert(r:send("CLIENT LIST\r\n"))
      local len = tonumber(helper.line(r):match("^%$(%d+)$"))
      return select(2, assert(r:receive(len + 2)):gsub("cmd=", ""))
    end
    helper.eventually(function() return clients() == 1 end)
    assert.are.equal(1, clients())
  end)
end)

describe("examples/kv_redis.lua: two instances sharing one redis-server", function()
  local redis, servers, n = nil, {}, 0

  setup(function()
    if installed("redis-server") and helper.exists(REDIS_LUA) then redis = assert(start_redis()) end
  end)
  teardown(function()
    if redis then redis.stop() end
  end)
  after_each(function()
    for i = #servers, 1, -1 do helper.stop_checked(servers[i]) end
    servers = {}
  end)

  -- An instance of the example with `workers`, on this test's key prefix
  -- (so tests share no keys), Redis at `redis_port`: its port.
  local function instance(workers, redis_port, extra)
    local config = { redis_port = redis_port or redis.port, prefix = "spec" .. n .. ":" }
    for k, v in pairs(extra or {}) do config[k] = v end
    local s, port = helper.server({ workers = workers, handler = "examples.kv_redis",
      balance = "round_robin", config = config })
    servers[#servers + 1] = s
    return port
  end

  local client = helper.client

  -- Whether to run: the packages. Each test gets a key prefix of its own.
  local function skip()
    if not redis then
      pending("needs redis-server and lua-nginx-redis (Debian: redis-server, lua-nginx-redis)")
      return true
    end
    n = n + 1
  end

  it("a key set through one instance reads back through the other", function()
    if skip() then return end
    local a, b = client(instance(2)), client(instance(1))
    assert.are.equal("OK", ask(a, "SET greeting hello there"))
    assert.are.equal("hello there", ask(b, "get greeting"))
    assert.are.equal("(nil)", ask(b, "GET nope"))
    assert.are.equal("1", ask(a, "INCR n"))
    assert.are.equal("2", ask(b, "INCR n"))
    assert.are.equal("ERR value is not an integer or out of range", ask(b, "INCR greeting"))
    assert.are.equal("1", ask(b, "DEL greeting"))
    assert.are.equal("0", ask(a, "DEL greeting"))
    assert.are.equal("ERR usage: SET key value", ask(a, "SET alone"))
    assert.are.equal("ERR unknown command 'flushall'", ask(a, "FLUSHALL"))
    assert.are.equal("bye", ask(a, "QUIT"))
    local line, err = a:receive("*l")
    assert.are.same({ nil, "closed" }, { line, err })
  end)

  it("counts visitors across every worker of both instances, one INCR each", function()
    if skip() then return end
    local pa, pb = instance(2), instance(1)
    local seen = {}
    for i, port in ipairs { pa, pa, pb, pa } do
      local c = client(port)
      local line = ask(c, "VISIT")
      local nth, w = line:match("^you are visitor #(%d+) %(served by worker (%d)%)$")
      assert.are.equal(i, tonumber(nth), line)
      seen[#seen + 1] = w
    end
    assert.are.same({ "1", "2", "1", "1" }, seen)      -- round-robin in instance a
  end)

  it("a session made on one instance is known to the other until it expires", function()
    if skip() then return end
    local a = client(instance(1, nil, { session_ttl = 1 }))
    local b = client(instance(1, nil, { session_ttl = 1 }))
    local token = ask(a, "LOGIN ann")
    assert.is_truthy(token:match("^%x+$"), token)
    assert.are.equal("ann", ask(b, "WHOAMI " .. token))
    assert.are.equal("(expired)", ask(b, "WHOAMI 0123abcd"))
    assert(helper.eventually(function() return ask(b, "WHOAMI " .. token) == "(expired)" end, 3000))
  end)

  it("keeps one pooled connection to Redis per worker, however many commands", function()
    if skip() then return end
    local c = client(instance(1))
    for i = 1, 50 do assert.are.equal("OK", ask(c, "SET k" .. i .. " v")) end
    local r = helper.connect(redis.port)
    finally(function() r:close() end)
    local function clients()
      assert(r:send("CLIENT LIST\r\n"))
      local len = tonumber(helper.line(r):match("^%$(%d+)$"))
      return select(2, assert(r:receive(len + 2)):gsub("cmd=", ""))
    end
    helper.eventually(function() return clients() == 2 end)
    assert.are.equal(2, clients())             -- r, and the worker's pooled one
  end)

  it("answers ERR redis: connection refused while Redis is down, and goes on", function()
    if skip() then return end
    local s = assert(socket.tcp())
    finally(function() s:close() end)
    assert(s:bind("127.0.0.1", 0))
    local _, down = s:getsockname()
    local c = client(instance(1, tonumber(down)))
    assert.are.equal("ERR redis: connection refused", ask(c, "GET k"))
    assert.are.equal("ERR redis: connection refused", ask(c, "VISIT"))
    assert.are.equal("ERR unknown command 'nope'", ask(c, "nope"))
  end)
end)
