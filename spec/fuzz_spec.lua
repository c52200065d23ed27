-- API fuzzing: every public function and method called with every kind of
-- wrong value (and on closed objects) either works or raises a Lua error
-- with a message. A crash would end this process; a hang, the timeouts.
local helper = require("spec.helper")
local multiloop = require("multiloop")
local values = require("spec.fixtures.fuzz_values")

-- Calls fn(v) for every fuzz value; returns how many calls raised. Fails the
-- test at the first error that is not a non-empty string.
local function fuzz(name, fn)
  local raised = 0
  for _, pair in ipairs(values) do
    local ok, err = pcall(fn, pair[2])
    if not ok then
      raised = raised + 1
      assert(type(err) == "string" and #err > 0,
        ("%s(%s) raised a non-message: %s"):format(name, pair[1], tostring(err)))
    end
  end
  return raised
end

describe("API fuzzing", function()
  it("multiloop.server: every option, every value", function()
    local keys = { "handler", "port", "host", "path", "unlink", "workers", "dispatch",
                   "balance", "config", "backlog", "max_connections", "idle_timeout",
                   "write_high_water", "write_low_water", "nodelay", "keepalive", "bogus" }
    for _, key in ipairs(keys) do
      fuzz("multiloop.server{" .. key .. "}", function(v)
        local opts = { port = 0, workers = 1, handler = "examples.echo_handler" }
        if key == "path" then opts.port = nil end
        opts[key] = v
        local s = multiloop.server(opts)
        s:stop()                           -- created, never started: stop is a no-op
      end)
    end
    assert.is_true(fuzz("multiloop.server", function(v) multiloop.server(v) end) > 0)
  end)

  it("server methods, stopped and running, with every argument", function()
    local s = multiloop.server{ port = 0, workers = 1, handler = "examples.echo_handler" }
    for _, running in ipairs { false, true } do
      if running then s:start() end
      for _, m in ipairs { "address", "stats", "stop" } do
        fuzz("server:" .. m, function(v)
          s[m](s, v)
          if running and not s._core:running() then s:start() end
        end)
        fuzz("server." .. m, function(v) s[m](v) end)   -- called with a dot
      end
      fuzz("server:start (running=" .. tostring(running) .. ")", function(v) s.start(v) end)
    end
    s:stop()
    fuzz("tostring", function() return tostring(s) end)
  end)

  it("multiloop.shared and its methods", function()
    local d = multiloop.shared("fuzz", { capacity = 64 * 1024 })
    fuzz("multiloop.shared(name)", function(v) multiloop.shared(v) end)
    fuzz("multiloop.shared(opts)", function(v) multiloop.shared("fuzz-opts", v) end)
    for _, m in ipairs { "get", "delete", "ttl", "keys" } do
      fuzz("dict:" .. m, function(v) d[m](d, v) end)
      fuzz("dict." .. m, function(v) d[m](v) end)
    end
    for _, m in ipairs { "set", "add", "replace", "incr" } do
      fuzz("dict:" .. m .. "(key)", function(v) d[m](d, v, 1) end)
      fuzz("dict:" .. m .. "(value)", function(v) d[m](d, "k", v) end)
      fuzz("dict:" .. m .. "(ttl/init)", function(v) d[m](d, "k", 1, v) end)
    end
    for _, m in ipairs { "count", "flush", "capacity", "free_space" } do
      fuzz("dict." .. m, function(v) d[m](v) end)
    end
  end)

  it("every conn method, open and closed, with every argument", function()
    local server, port = helper.server{ workers = 1, handler = function(conn)
      local values = require("spec.fixtures.fuzz_values")
      local calls, raised, bad = 0, 0, nil
      local function fuzz(name, fn)
        for _, pair in ipairs(values) do
          calls = calls + 1
          local ok, err = pcall(fn, pair[2])
          if not ok then
            raised = raised + 1
            if type(err) ~= "string" or err == "" then bad = bad or (name .. "(" .. pair[1] .. ")") end
          end
        end
      end
      local methods = { "write", "on_data", "on_end", "on_close", "on_drain", "on_timeout",
                        "pause", "resume", "buffered", "set_timeout", "set_nodelay",
                        "set_keepalive", "peer", "address" }
      local function all_methods(state)
        for _, m in ipairs(methods) do
          fuzz(state .. " conn:" .. m, function(v) return conn[m](conn, v) end)
          fuzz(state .. " conn." .. m, function(v) return conn[m](v) end)
          fuzz(state .. " conn:" .. m .. "(x, v)", function(v) return conn[m](conn, "x", v) end)
        end
        fuzz(state .. " conn[key]", function(v) return conn[v] end)
        conn:on_data(nil); conn:on_end(nil); conn:on_close(nil)
        conn:on_drain(nil); conn:on_timeout(nil); conn:set_timeout(0)
      end
      all_methods("open")
      -- the previous connection's closed-object phase ran after its report
      local report = ("closed before: %s; %d calls, %d raised, bad: %s\n"):format(
        tostring(_G.CLOSED_BAD), calls, raised, tostring(bad))
      conn:write(report)
      conn:shutdown()
      conn:close()
      all_methods("closed")                -- every one a no-op, nil, "closed", or an error
      fuzz("closed conn:close", function(v) return conn:close(v) end)
      _G.CLOSED_BAD = bad or "none"
    end }
    helper.defer(function() server:stop() end)
    local c = helper.connect(port)
    local all = helper.all(c)                -- fuzzed writes first, then the report
    c:close()
    local calls, raised, bad = all:match("(%d+) calls, (%d+) raised, bad: ([^\n]*)\n$")
    local line = tostring(calls) .. " calls, " .. tostring(raised) .. " raised"
    assert.are.equal("nil", bad)
    assert.is_true(tonumber(calls) > 900 and tonumber(raised) > 100, line)
    -- the worker survived all of it, and no closed-object call misbehaved
    c = helper.connect(port)
    all = helper.all(c)
    c:close()
    assert.are.equal("none", all:match("closed before: ([^;]*);"))
  end)
end)
