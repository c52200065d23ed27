-- server:metrics() and multiloop.metrics_text: stats() in the Prometheus
-- text exposition format (version 0.0.4). The text is parsed here line by
-- line (every sample's metric has a HELP and a TYPE line before it, its
-- family's samples together, counters named _total, values those of
-- stats()), and once more by the Prometheus project's own Python parser
-- (Debian's python3-prometheus-client), so a mistake shared by the code and
-- this spec's reading of the format is still caught. Then
-- examples/metrics_server.lua, a child process, over real sockets: the
-- figures of the connections a client made reach GET /metrics on the
-- second port.
local helper = require("spec.helper")
local multiloop = require("multiloop")
local socket = require("socket")

local PYTHON = "/usr/bin/python3"         -- Debian's, where the package puts the module

-- The text as { families = { name = { type, help, samples = { {labels, value} } } },
-- order = { names } }; fails the test on any line out of the format.
local function parse(text)
  assert.are.equal("\n", text:sub(-1), "the text must end with a newline")
  local families, order, current = {}, {}, nil
  local function family(name)
    local f = families[name]
    if not f then
      f = { samples = {} }
      families[name] = f
      order[#order + 1] = name
    end
    return f
  end
  for line in text:gmatch("([^\n]*)\n") do
    local kind, name, rest = line:match("^# (%u+) ([%a_:][%w_:]*) (.*)$")
    if kind == "HELP" then
      local f = family(name)
      assert.is_nil(f.help, "two HELP lines for " .. name)
      assert.are.equal(0, #f.samples, "HELP after the samples of " .. name)
      assert.truthy(#rest > 0 and not rest:find("[\\\n]"), line)
      f.help, current = rest, name
    elseif kind == "TYPE" then
      local f = family(name)
      assert.is_nil(f.type, "two TYPE lines for " .. name)
      assert.are.equal(0, #f.samples, "TYPE after the samples of " .. name)
      assert.truthy(rest == "counter" or rest == "gauge", line)
      f.type, current = rest, name
    else
      local sname, labels, value = line:match("^([%a_:][%w_:]*)(%b{}) (%S+)$")
      if not sname then
        sname, value = line:match("^([%a_:][%w_:]*) (%S+)$")
        labels = nil
      end
      assert(sname, "not a sample line: " .. line)
      assert.are.equal(current, sname, "a sample away from its family's HELP and TYPE: " .. line)
      local f = families[sname]
      assert(f.help and f.type, "a sample before its HELP and TYPE lines: " .. line)
      local parsed = {}
      if labels then
        local inner = labels:sub(2, -2)
        for k, v in inner:gmatch('([%a_][%w_]*)="([^"\\]*)",?') do parsed[k] = v end
        assert.are.equal("", (inner:gsub('([%a_][%w_]*)="([^"\\]*)",?', "")),
          "labels out of the format: " .. line)
      end
      local n = math.tointeger(tonumber(value))
      assert(n, "a value that is not an integer: " .. line)
      f.samples[#f.samples + 1] = { labels = parsed, value = n }
    end
  end
  return families, order
end

-- What stats() says each family must hold: name -> { [""] = total, ["1"] = worker 1, ... }.
local function expected_from(stats)
  local want = {}
  local function add(field, key, v, gauge_fields)
    if type(v) ~= "number" then return end
    local name = "multiloop_" .. field .. (gauge_fields[field] and "" or "_total")
    want[name] = want[name] or {}
    want[name][key] = v
  end
  local gauges = { active = true, threads = true, pooled = true, generation = true,
                   old_connections = true }
  for k, v in pairs(stats) do add(k, "", v, gauges) end
  for i, w in ipairs(stats.workers) do
    for k, v in pairs(w) do add(k, tostring(i), v, gauges) end
  end
  return want, gauges
end

local function check_against(text, stats)
  local families = parse(text)
  local want, gauges = expected_from(stats)
  for name, samples in pairs(want) do
    local f = families[name]
    assert(f, "no metric " .. name .. " in:\n" .. text)
    local field = name:match("^multiloop_(.-)_total$") or name:match("^multiloop_(.*)$")
    assert.are.equal(gauges[field] and "gauge" or "counter", f.type, name)
    local got = {}
    for _, s in ipairs(f.samples) do
      local key = s.labels.worker or ""
      assert.is_nil(got[key], "two samples for " .. name .. " " .. key)
      got[key] = s.value
      for k in pairs(s.labels) do assert.are.equal("worker", k, name) end
    end
    assert.are.same(samples, got, name)
  end
  for name in pairs(families) do assert(want[name], "a metric stats() does not have: " .. name) end
end

-- A server that has seen some traffic and is quiet now: every figure holds
-- still, so stats() and metrics() read the same ones.
local function busy_server()
  local s, port = helper.server{ workers = 2, handler = "examples.echo_handler" }
  helper.defer(function() s:stop() end)
  for i = 1, 3 do
    local c = helper.connect(port)
    assert.are.equal("hello " .. i, helper.echo(c, "hello " .. i))
    c:close()
  end
  assert(helper.eventually(function()
    local st = s:stats()
    return st.active == 0 and st.accepted == 3
  end), "the connections did not close")
  return s, port
end

describe("server:metrics()", function()
  it("is stats() as typed families with worker labels and totals", function()
    local s = busy_server()
    local before = s:stats()
    local text = s:metrics()
    assert.are.same(before, s:stats(), "the figures moved: the comparison means nothing")
    check_against(text, before)
    local families = parse(text)
    assert.are.same({ labels = {}, value = 3 }, families.multiloop_accepted_total.samples[1])
    assert.are.equal(3, #families.multiloop_accepted_total.samples)   -- total, worker 1, 2
    assert.are.equal(1, #families.multiloop_handed_off_total.samples) -- the acceptor's: total only
    assert.are.equal("gauge", families.multiloop_active.type)
    assert.are.equal("Connections accepted.", families.multiloop_accepted_total.help)
    assert.truthy(before.bytes_in >= #"hello 1" * 3)
  end)

  it("puts the families in a fixed order, the ones it knows first", function()
    local s = busy_server()
    local _, order = parse(s:metrics())
    local known = { "multiloop_accepted_total", "multiloop_active", "multiloop_handed_off_total",
      "multiloop_accept_errors_total", "multiloop_bytes_in_total", "multiloop_bytes_out_total",
      "multiloop_threads", "multiloop_connects_total", "multiloop_connect_errors_total",
      "multiloop_reused_total", "multiloop_pooled", "multiloop_tls_handshakes_total",
      "multiloop_tls_errors_total", "multiloop_proxy_errors_total", "multiloop_generation",
      "multiloop_old_connections", "multiloop_reloads_total" }
    assert.are.same(known, { table.unpack(order, 1, #known) })
    -- Fields stats() gains later follow, by name.
    local rest = { table.unpack(order, #known + 1) }
    local sorted = { table.unpack(rest) }
    table.sort(sorted)
    assert.are.same(sorted, rest)
  end)

  it("reads the same in the Prometheus client's own parser #child", function()
    assert(os.execute("env -u LD_PRELOAD " .. PYTHON .. " -c 'import prometheus_client.parser' "
      .. "2>/dev/null"), "python3-prometheus-client is not installed (make test installs it)")
    local s = busy_server()
    local stats = s:stats()
    local file = os.tmpname()
    helper.defer(function() os.remove(file) end)
    local f = assert(io.open(file, "w"))
    f:write(s:metrics())
    f:close()
    -- One line per sample: family type sample-name worker value.
    local script = table.concat({
      "import sys",
      "from prometheus_client.parser import text_string_to_metric_families as parse",
      "for fam in parse(open(sys.argv[1]).read()):",
      "    for s in fam.samples:",
      "        print(fam.name, fam.type, s.name, s.labels.get(\"worker\", \"-\"), int(s.value))",
    }, "\n")
    local p = assert(io.popen(("env -u LD_PRELOAD %s -c '%s' %s 2>&1"):format(PYTHON, script, file)))
    local out = p:read("a")
    assert(p:close(), out)
    local want = expected_from(stats)
    local n, total = 0, 0
    for _, samples in pairs(want) do for _ in pairs(samples) do total = total + 1 end end
    for fam, kind, name, worker, value in out:gmatch("(%S+) (%S+) (%S+) (%S+) (%-?%d+)\n") do
      n = n + 1
      -- The client names a counter's family without _total.
      assert.are.equal(name:match("_total$") and fam .. "_total" or fam, name)
      assert.are.equal(name:match("_total$") and "counter" or "gauge", kind, name)
      assert.are.equal(want[name][worker == "-" and "" or worker], tonumber(value), name .. " " .. worker)
    end
    assert.are.equal(total, n, out)
  end)

  it("raises when not called as a method", function()
    local s = busy_server()
    local ok, err = pcall(s.metrics)
    assert.is_false(ok)
    assert.truthy(err:find("multiloop.server: metrics must be called as server:metrics()", 1, true), err)
  end)

  it("is all zero before the first start", function()
    local s = multiloop.server{ port = 0, workers = 2, handler = "examples.echo_handler" }
    local families = parse(s:metrics())
    for name, f in pairs(families) do
      for _, sample in ipairs(f.samples) do assert.are.equal(0, sample.value, name) end
    end
    assert.are.equal(3, #families.multiloop_active.samples)
  end)
end)

describe("multiloop.metrics_text", function()
  it("makes a field it does not know a counter, after the known ones, by name", function()
    local text = multiloop.metrics_text({
      accepted = 2, zeta_errors = 1, alpha_errors = 0, ratio = 0.5, name = "not a number",
      workers = { { accepted = 2, zeta_errors = 1 } },
    })
    local families, order = parse(text:gsub("_ratio_total 0.5", "_ratio_total 0"))
    assert.are.same({ "multiloop_accepted_total", "multiloop_alpha_errors_total",
      "multiloop_ratio_total", "multiloop_zeta_errors_total" }, order)
    assert.are.equal("counter", families.multiloop_zeta_errors_total.type)
    assert.are.equal("server:stats() field zeta_errors.", families.multiloop_zeta_errors_total.help)
    assert.are.same({ { labels = {}, value = 1 }, { labels = { worker = "1" }, value = 1 } },
      families.multiloop_zeta_errors_total.samples)
    assert.truthy(text:find("\nmultiloop_ratio_total 0.5\n", 1, true), text)
    assert.is_falsy(text:find("name", 1, true), text)
  end)

  it("writes floats so they read back, and the infinities and NaN in the format's words", function()
    local text = multiloop.metrics_text({ a = 0.1, b = math.huge, c = -math.huge, d = 0 / 0,
      workers = {} })
    assert.truthy(text:find("\nmultiloop_a_total 0.10000000000000001\n", 1, true), text)
    assert.truthy(text:find("\nmultiloop_b_total +Inf\n", 1, true), text)
    assert.truthy(text:find("\nmultiloop_c_total -Inf\n", 1, true), text)
    assert.truthy(text:find("\nmultiloop_d_total NaN\n", 1, true), text)
  end)

  it("raises on what is not a table", function()
    local ok, err = pcall(multiloop.metrics_text, 42)
    assert.is_false(ok)
    assert.truthy(err:find("multiloop.metrics_text: expected a table shaped as server:stats() "
      .. "returns (got number)", 1, true), err)
  end)
end)

describe("server:run{ ready, every, tick }", function()
  it("runs tick in this state every `every` ms while serving; an error in it stops and raises", function()
    local s = multiloop.server{ host = "127.0.0.1", port = 0, workers = 1,
                                handler = "examples.echo_handler" }
    helper.defer(function() s:stop() end)
    local ticks, seen = 0, {}
    local t0 = socket.gettime()
    local ok, err = pcall(s.run, s, { every = 20, tick = function(server)
      ticks = ticks + 1
      seen[#seen + 1] = server == s and server:address() ~= nil
      if ticks == 3 then error("enough ticks") end
    end })
    local took = socket.gettime() - t0
    assert.is_false(ok)
    assert.truthy(err:find("multiloop.server: run: tick: ", 1, true), err)
    assert.truthy(err:find("enough ticks", 1, true), err)
    assert.are.same({ true, true, true }, seen)            -- running, and given the server
    assert.truthy(took >= 0.055, took)                     -- three waits of 20 ms
    assert.are.same({ nil, "not running" }, { s:address() })
  end)

  it("runs ready once it serves, before any tick; an error in it stops and raises", function()
    local s = multiloop.server{ host = "127.0.0.1", port = 0, workers = 1,
                                handler = "examples.echo_handler" }
    helper.defer(function() s:stop() end)
    local calls = {}
    local ok, err = pcall(s.run, s, {
      ready = function(server)
        calls[#calls + 1] = "ready " .. tostring(select(2, server:address()) > 0)
      end,
      every = 10,
      tick = function()
        calls[#calls + 1] = "tick"
        if #calls == 3 then error("stop here") end
      end,
    })
    assert.is_false(ok)
    assert.truthy(err:find("multiloop.server: run: tick: ", 1, true), err)
    assert.are.same({ "ready true", "tick", "tick" }, calls)
    ok, err = pcall(s.run, s, { ready = function() error("not ready") end })
    assert.is_false(ok)
    assert.truthy(err:find("multiloop.server: run: ready: ", 1, true), err)
    assert.truthy(err:find("not ready", 1, true), err)
    assert.are.same({ nil, "not running" }, { s:address() })
  end)

  it("raises a failed start as start() does, pointing at its caller", function()
    local taken = assert(socket.bind("127.0.0.1", 0))
    helper.defer(function() taken:close() end)
    local _, port = taken:getsockname()
    local s = multiloop.server{ host = "127.0.0.1", port = tonumber(port), workers = 1,
                                dispatch = "queue", handler = "examples.echo_handler" }
    local ok, err = pcall(s.run, s, { ready = function() error("never called") end })
    assert.is_false(ok)
    assert.truthy(err:find(("multiloop.server: start: bind 127.0.0.1 port %d: address already "
      .. "in use (EADDRINUSE)"):format(port), 1, true), err)
    assert.is_falsy(err:find("init.lua", 1, true), err)
  end)

  for _, case in ipairs {
    { { ready = true }, "multiloop.server: run: option 'ready' must be a function (got true)" },
    { { every = 0, tick = print }, "multiloop.server: run: option 'every' must be an integer from 1 to 2147483647 (got 0)" },
    { { every = 10, tick = 1 }, "multiloop.server: run: option 'tick' must be a function (got 1)" },
    { { every = 10 }, "multiloop.server: run: option 'every' and option 'tick' go together" },
    { { tick = print }, "multiloop.server: run: option 'every' and option 'tick' go together" },
    { { each = 10 }, "multiloop.server: run: unknown option 'each'" },
    { 5, "multiloop.server: run: expected nil or a table { timeout = ms, every = ms, tick = fn, "
      .. "ready = fn } (got number)" },
  } do
    it("raises on bad options before it starts: " .. case[2], function()
      local s = multiloop.server{ host = "127.0.0.1", port = 0, workers = 1,
                                  handler = "examples.echo_handler" }
      local ok, err = pcall(s.run, s, case[1])
      assert.is_false(ok)
      assert.truthy(err:find(case[2], 1, true), err)
      assert.are.same({ nil, "not running" }, { s:address() })
    end)
  end
end)

-- --- examples/metrics_server.lua ----------------------------------------------

-- One HTTP request on a fresh connection: status line, headers, body.
local function http(port, request)
  local c = helper.connect(port)
  helper.defer(function() c:close() end)
  assert(c:send(request))
  local all = helper.all(c)
  local head, body = all:match("^(.-)\r\n\r\n(.*)$")
  assert(head, "no end of the head in: " .. all)
  local status = head:match("^HTTP/1%.1 (%d%d%d) ")
  local headers = {}
  for k, v in head:gmatch("\r\n([^:\r\n]+): ([^\r\n]*)") do headers[k:lower()] = v end
  return tonumber(status), headers, body
end

describe("examples/metrics_server.lua #child", function()
  it("serves the main server's metrics on its second port, and stops on SIGTERM", function()
    local child = helper.spawn_command(("%s examples/metrics_server.lua 0 0 100"):format(
      os.getenv("CHILD_LUA") or "lua5.4"))
    local ready = child.line() or ""
    local port, mport = ready:match("on 127%.0%.0%.1:(%d+) with %d+ workers, metrics at "
      .. "http://127%.0%.0%.1:(%d+)/metrics")
    assert(port, "the example did not start: " .. ready .. child.stderr())
    port, mport = tonumber(port), tonumber(mport)
    assert(child.caught_term(), "the example never caught SIGTERM")

    -- Published before it prints: the first scrape finds every family.
    local status, headers, body = http(mport, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.are.equal(200, status)
    assert.are.equal("text/plain; version=0.0.4; charset=utf-8", headers["content-type"])
    assert.are.equal(#body, tonumber(headers["content-length"]))
    assert.are.equal("close", headers.connection)
    local families = parse(body)
    assert.are.equal("counter", families.multiloop_accepted_total.type)

    for i = 1, 4 do
      local c = helper.connect(port)
      assert.are.equal("ping " .. i, helper.echo(c, "ping " .. i))
      c:close()
    end
    -- Refreshed every 100 ms: the four connections show within a few.
    local accepted, seen
    assert(helper.eventually(function()
      local _, _, b = http(mport, "GET /metrics HTTP/1.0\r\n\r\n")
      seen = b
      local f = parse(b)
      accepted = f.multiloop_accepted_total.samples[1].value
      return accepted == 4 and f.multiloop_active.samples[1].value == 0
    end, 5000), "the scrape never showed 4 connections closed:\n" .. tostring(seen))
    local f = parse(seen)
    assert.truthy(f.multiloop_bytes_in_total.samples[1].value >= #"ping 1" * 4)
    local per = 0
    for _, sample in ipairs(f.multiloop_accepted_total.samples) do
      if sample.labels.worker then per = per + sample.value end
    end
    assert.are.equal(4, per)

    -- HEAD, another path, another method, a line that is no request.
    local _
    status, headers, body = http(mport, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.are.equal(200, status)
    assert.are.equal("", body)
    assert.truthy(tonumber(headers["content-length"]) > 0)
    status, _, body = http(mport, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.are.same({ 404, "GET /metrics only\n" }, { status, body })
    status, _, body = http(mport, "POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.are.same({ 405, "GET /metrics only\n" }, { status, body })
    status, _, body = http(mport, "hello\r\n\r\n")
    assert.are.same({ 400, "bad request line\n" }, { status, body })

    child.signal("TERM")
    local rest, how, code = child.wait()
    assert.are.same({ "stopped on SIGTERM\n", "exit", 0 }, { rest, how, code }, child.stderr())
  end)
end)
