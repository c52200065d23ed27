-- Misuse and hostile peers: methods on a closed connection, wrong argument
-- types, a peer reset, TCP options.
local helper = require("spec.helper")

-- Runs `probe` in a worker on a connection and returns the line it writes.
local function probe_line(server_opts, handler)
  server_opts.workers = 1
  server_opts.handler = handler
  local server, port = helper.server(server_opts)
  local c = helper.connect(port)
  local line = helper.line(c)
  c:close()
  server:stop()
  return line
end

describe("a connection", function()
  it("once closed: write returns nil, 'closed'; everything else is a harmless no-op", function()
    -- The server closes the first connection, and reports on the second what
    -- every method does on the closed first one.
    local server, port = helper.server{ workers = 1, handler = function(conn)
      if not _G.VICTIM then
        _G.VICTIM = conn
        conn:close()
        return
      end
      local v, out = _G.VICTIM, {}
      local function add(...)
        local r = table.pack(...)
        for i = 1, r.n do r[i] = tostring(r[i]) end
        out[#out + 1] = r.n == 0 and "-" or table.concat(r, ",")
      end
      add(v:write("x"))
      add(v:pause()); add(v:resume()); add(v:shutdown()); add(v:close())
      add(v:buffered())
      add(v:set_timeout(10))
      add(v:set_nodelay(true))
      add(v:set_keepalive(true, 1000))
      add(v:peer())
      add(v:address())
      add(v:on_data(function() end) == v)
      conn:write(table.concat(out, " ") .. "\n")
    end }
    helper.defer(function() server:stop() end)
    local first = helper.connect(port)
    assert.are.equal("", helper.all(first))
    first:close()
    local second = helper.connect(port)
    helper.defer(function() second:close() end)
    assert.are.equal("nil,closed - - - - 0 - nil,closed nil,closed nil,closed nil,closed true",
      helper.line(second))
  end)

  it("raises naming the argument for wrong types and values", function()
    local line = probe_line({}, function(conn)
      local results = {}
      for _, call in ipairs {
        function() conn:write(nil) end,
        function() conn:write("x", 5) end,
        function() conn:on_drain(1) end,
        function() conn:on_timeout({}) end,
        function() conn:set_timeout(-1) end,
        function() conn:set_timeout("soon") end,
        function() conn:set_timeout(1.5) end,
        function() conn:set_nodelay("yes") end,
        function() conn:set_keepalive(true, -5) end,
        function() conn:set_keepalive(nil) end,
        function() conn.pause({}) end,
      } do
        local ok, err = pcall(call)
        results[#results + 1] = ok and "no error" or err:gsub("^.-:%d+: ", "")
      end
      conn:write(table.concat(results, "|") .. "\n")
      conn:close()
    end)
    assert.are.same({
      "bad argument #1 to 'write' (string expected, got nil)",
      "bad argument #2 to 'write' (function or nil expected, got number)",
      "bad argument #1 to 'on_drain' (function or nil expected, got number)",
      "bad argument #1 to 'on_timeout' (function or nil expected, got table)",
      "bad argument #1 to 'set_timeout' (milliseconds must not be negative)",
      "bad argument #1 to 'set_timeout' (number expected, got string)",
      "bad argument #1 to 'set_timeout' (number has no integer representation)",
      "bad argument #1 to 'set_nodelay' (boolean expected, got string)",
      "bad argument #2 to 'set_keepalive' (milliseconds must not be negative)",
      "bad argument #1 to 'set_keepalive' (boolean expected, got nil)",
      "bad argument #1 to 'pause' (multiloop.conn expected, got table)",
    }, (function()
      local t = {}
      for part in (line .. "|"):gmatch("(.-)|") do t[#t + 1] = part end
      return t
    end)())
  end)

  it("reports a peer reset as on_close('ECONNRESET'), and the worker goes on", function()
    local path = os.tmpname()
    helper.defer(function() os.remove(path) end)
    local server, port = helper.server{ workers = 1, config = { path = path }, handler = function(conn)
      conn:on_data(function(data) conn:write(data) end)
      conn:on_close(function(err)
        local f = io.open(conn.worker.config.path, "a"); f:write(tostring(err), "\n"); f:close()
      end)
    end }
    helper.defer(function() server:stop() end)
    local c = helper.connect(port)
    assert.are.equal("x", helper.echo(c, "x"))
    c:setoption("linger", { on = true, timeout = 0 })
    c:close()
    local text = helper.eventually(function()
      local f = io.open(path); local t = f:read("*a"); f:close()
      return t ~= "" and t
    end)
    assert.are.equal("ECONNRESET\n", text)
    local d = helper.connect(port)
    helper.defer(function() d:close() end)
    assert.are.equal("alive", helper.echo(d, "alive"))
  end)

  it("gets TCP keepalive from the keepalive option, and set_keepalive/set_nodelay work", function()
    local server, port = helper.server{ workers = 1, keepalive = 7000, handler = function(conn)
      conn:on_data(function(data)
        if data == "off\n" then
          conn:write(tostring(conn:set_keepalive(false)) .. " " .. tostring(conn:set_nodelay(false)) .. "\n")
        end
      end)
    end }
    helper.defer(function() server:stop() end)
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    local _, myport = c:getsockname()
    local function server_side_timer()
      local p = io.popen(("env -u LD_PRELOAD ss -tnoH state established '( sport = :%d and dport = :%s )'"):format(port, myport))
      local out = p:read("*a")
      p:close()
      return out
    end
    assert.matches("timer:%(keepalive,%d", helper.eventually(function()
      local out = server_side_timer()
      return out:find("keepalive", 1, true) and out
    end))
    assert(c:send("off\n"))
    assert.are.equal("true true", helper.line(c))
    assert.is_nil(server_side_timer():find("keepalive", 1, true))
  end)
end)
