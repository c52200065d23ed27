-- Sequential connections: a handler with serve(conn), run in a light thread
-- per connection, reading with receive / receiveany / receiveuntil and
-- writing with send (spec/fixtures/sequential.lua holds the handlers, one
-- per case). Every test stops its server and checks that no light thread is
-- left (stats().threads).
local helper = require("spec.helper")
local multiloop = require("multiloop")
local socket = require("socket")

local d = multiloop.shared("spec.serve")

describe("serve", function()
  local server, port
  after_each(function()
    helper.stop_checked(server)
    server = nil
    d:flush()
  end)

  local function start(case, opts)
    local c
    server, port, c = helper.case_server("spec.fixtures.sequential", case, opts)
    return c
  end

  -- Sends s one byte at a time, each in its own segment.
  local function dribble(c, s)
    c:setoption("tcp-nodelay", true)
    for i = 1, #s do
      assert(c:send(s:sub(i, i)))
      socket.sleep(0.002)
    end
  end

  describe("receive('*l')", function()
    it("takes many lines from one read, LF or CRLF, removing a trailing CR only", function()
      local c = start("lines")
      assert(c:send("one\ntwo\r\n\r\nthree\rx\n" .. string.rep("l\n", 200)))
      assert.are.equal("[one]", helper.line(c))
      assert.are.equal("[two]", helper.line(c))
      assert.are.equal("[]", helper.line(c))
      assert.are.equal("[three\rx]\n", c:receive(10))   -- LuaSocket's "*l" drops every CR
      for _ = 1, 200 do assert.are.equal("[l]", helper.line(c)) end
    end)

    it("assembles a line sent a byte at a time", function()
      local c = start("lines")
      dribble(c, "split\r\nup\n")
      assert.are.equal("[split]", helper.line(c))
      assert.are.equal("[up]", helper.line(c))
    end)

    it("gives nil, 'closed' and the partial line at the peer's EOF, and can still send", function()
      local c = start("lines")
      assert(c:send("whole\npart"))
      c:shutdown("send")
      assert.are.equal("[whole]", helper.line(c))
      assert.are.equal("end closed [part]", helper.line(c))
      assert.are.equal("", helper.all(c))
    end)

    it("gives nil, 'too long' and what it had past receive_limit", function()
      local c = start("lines", { receive_limit = 100 })
      assert(c:send("short\n" .. string.rep("x", 150)))
      assert.are.equal("[short]", helper.line(c))
      assert.are.equal("end too long [" .. string.rep("x", 150) .. "]", helper.line(c))
    end)

    -- Fails today (a serve.c bug, left to the lead): a line longer than
    -- receive_limit that arrives whole in one read, its LF included, is
    -- returned, where the same bytes in two reads give "too long".
    it("gives 'too long' for a line past receive_limit however the reads split it", function()
      local c = start("lines", { receive_limit = 100 })
      assert(c:send(string.rep("y", 150) .. "\n" .. "short\n"))
      local line = helper.line(c)          -- (the partial may hold the rest too)
      assert.is_truthy(line:find("^end too long %[" .. string.rep("y", 150)), line)
    end)

    -- Fails today, the other side of the same check: receive_limit bytes
    -- buffered without an LF already count as too long (multiloop.h: "bytes
    -- a line ... may buffer"), so a line of exactly receive_limit bytes is
    -- refused when its LF comes in a later read, and taken when whole.
    it("takes a line of exactly receive_limit bytes, its LF in a later read", function()
      local c = start("lines", { receive_limit = 100 })
      c:setoption("tcp-nodelay", true)
      assert(c:send(string.rep("z", 100)))
      socket.sleep(0.1)
      assert(c:send("\n"))
      assert.are.equal("[" .. string.rep("z", 100) .. "]", helper.line(c))
    end)

    it("finds a 200 KiB line sent in small pieces", function()
      local c = start("lines")
      local line = string.rep("abcdefgh", 25600)
      for i = 1, #line, 1000 do assert(c:send(line:sub(i, i + 999))) end
      assert(c:send("\n"))
      assert.are.equal("[" .. line .. "]", helper.line(c))
    end)
  end)

  describe("receive(n)", function()
    it("returns exactly n bytes, from pieces or from one read holding several", function()
      local c = start("count")
      assert(c:send("3\nabc5\nxy"))
      assert.are.equal("got 3 a c", helper.line(c))
      socket.sleep(0.02)
      assert(c:send("zvw"))
      assert.are.equal("got 5 x w", helper.line(c))
      assert(c:send("0\n"))
      assert.are.equal("got 0  ", helper.line(c))
    end)

    it("reads 8 MiB", function()
      local c = start("count")
      local payload = "<" .. string.rep("m", 8 * 1024 * 1024 - 2) .. ">"
      assert(c:send(#payload .. "\n"))
      c:settimeout(30)
      assert(c:send(payload))
      assert.are.equal("got 8388608 < >", helper.line(c))
    end)

    it("gives nil, 'closed' with the partial count at EOF", function()
      local c = start("count")
      assert(c:send("10\n1234"))
      c:shutdown("send")
      assert.are.equal("error closed 4", helper.line(c))
    end)
  end)

  it("receive('*a') reads until EOF; after it '*a' gives '' and '*l' nil, 'closed'", function()
    local c = start("all")
    assert(c:send("abc" .. string.rep("q", 100000)))
    c:shutdown("send")
    assert.are.equal("100003 nil abc  nil nil nil closed ", helper.line(c))
  end)

  it("receiveany(max) returns what is there, at most max bytes", function()
    local c = start("any")
    assert(c:send("abcdefghij12"))
    local got = ""
    while #got < #"<abcde><fghij><12>" do
      got = got .. assert(c:receive(1))
    end
    assert.are.equal("<abcde><fghij><12>", got)
    c:shutdown("send")
    assert.are.equal("end closed", helper.line(c))
  end)

  describe("receiveuntil", function()
    -- Fails today, as the line above: the pattern found past receive_limit
    -- in one read is returned.
    it("gives 'too long' for a part past receive_limit however the reads split it", function()
      local c = start("until", { receive_limit = 100 })
      assert(c:send(string.rep("y", 150) .. "--XY--tail"))
      local line = helper.line(c)
      assert.is_truthy(line:find("^end too long %[" .. string.rep("y", 150)), line)
    end)

    it("reads up to the pattern, also when the pattern straddles reads", function()
      local c = start("until")
      assert(c:send("first--XY--"))
      assert.are.equal("(first)", helper.line(c))
      dribble(c, "sec-ond--X-Y---XY--")
      assert.are.equal("(sec-ond--X-Y-)", helper.line(c))
      assert(c:send("--XY--tail"))
      assert.are.equal("()", helper.line(c))
      c:shutdown("send")
      assert.are.equal("end closed [tail]", helper.line(c))
    end)

    it("includes the pattern with inclusive = true", function()
      local c = start("until_inclusive")
      assert(c:send("a--XY--b--X"))
      socket.sleep(0.02)
      assert(c:send("Y--rest\n"))
      assert.are.equal("(a--XY--)", helper.line(c))
      assert.are.equal("(b--XY--)", helper.line(c))
      assert.are.equal("rest rest", helper.line(c))
    end)

    it("reader(size) returns chunks of at most size, then nil, nil at the pattern", function()
      local c = start("until_size")
      dribble(c, "abcdefg--X")
      assert(c:send("Y--hi--XY--"))
      assert.are.equal("abc|def|g", helper.line(c))
      assert.are.equal("hi", helper.line(c))
    end)

    it("reader(size) with inclusive returns the pattern as the last chunk", function()
      local c = start("until_size", { config = { inclusive = true } })
      assert(c:send("abcd--XY----XY--"))
      assert.are.equal("abc|d|--XY--", helper.line(c))
      assert.are.equal("--XY--", helper.line(c))
    end)
  end)

  it("a read timeout gives nil, 'timeout', partial and leaves the connection usable", function()
    local c = start("timeout")
    assert(c:send("par"))
    assert.are.equal("first nil timeout par", helper.line(c))
    assert(c:send("tial\n"))
    assert.are.equal("second tial nil nil", helper.line(c))
  end)

  it("send takes nested arrays of strings and numbers, and names what it cannot send", function()
    local c = start("nested")
    assert.are.equal("ab12.5c", helper.line(c))
    assert.are.equal("8 0 false conn:send: data must be a string, a number or an array of "
                     .. "them (found boolean)", helper.line(c))
    -- numbers as tostring writes them (integers are formatted in C)
    assert.are.equal(table.concat({ -7, 0, math.mininteger, math.maxinteger, 10, 1e15, -0.0, 2^53, 0.1 },
                                  " "), helper.line(c))
  end)

  it("send waits while the client does not read: the queue stays bounded", function()
    local c = start("flood", { write_high_water = 256 * 1024 })
    assert(helper.eventually(function() return d:get("flood sent") ~= nil end))
    socket.sleep(0.3)
    local before = d:get("flood sent")
    socket.sleep(0.3)
    assert.are.equal(before, d:get("flood sent"))        -- it waits, it does not queue more
    c:close()
    assert(helper.eventually(function() return d:get("flood") ~= nil end))
    local err, _, most = d:get("flood"):match("^(%S+) (%d+) (%d+)$")
    assert.are.equal("closed", err)
    assert.is_true(tonumber(most) < 256 * 1024 + 65536, d:get("flood"))
  end)

  it("a send timeout gives nil, 'timeout'", function()
    start("send_timeout", { write_high_water = 64 * 1024 })
    assert(helper.eventually(function() return d:get("send_timeout") ~= nil end, 5000))
    assert.are.equal("timeout", d:get("send_timeout"))
  end)

  it("dirty() says whether received bytes wait unread, so replies to a burst go out together", function()
    local c = start("batch")
    assert(c:send("a\nb\nc\n"))
    assert.are.equal("a more", helper.line(c))
    assert.are.equal("b more", helper.line(c))
    assert.are.equal("c last", helper.line(c))
    assert.are.equal("sends 1", helper.line(c))
    assert(c:send("d\n"))
    assert.are.equal("d last", helper.line(c))
    assert.are.equal("sends 2", helper.line(c))
  end)

  describe("the replies to a burst, held back and sent together", function()
    it("arrive whole and in order, past the 64 held at a time", function()
      local c = start("cork")
      local lines, want = {}, {}
      for i = 1, 300 do
        lines[i] = "n" .. i
        want[i] = "n" .. i .. "!"
      end
      assert(c:send(table.concat(lines, "\n") .. "\n"))
      for i = 1, 300 do assert.are.equal(want[i], helper.line(c)) end
    end)

    it("go before a write on the same connection", function()
      local c = start("cork")
      assert(c:send("one\nmix\n"))
      assert.are.equal("one!", helper.line(c))
      assert.are.equal("abcd", helper.line(c))
    end)

    it("go before a close, and before the connection closes when serve returns", function()
      local c = start("cork")
      assert(c:send("one\nclose\n"))
      assert.are.equal("one!", helper.line(c))
      assert.are.equal("xy", helper.line(c))
      assert.are.equal("", helper.all(c))
      local d = helper.connect(port)
      helper.defer(function() d:close() end)
      assert(d:send("two\nend\n"))
      assert.are.equal("two!", helper.line(d))
      assert.are.equal("ef", helper.line(d))
      assert.are.equal("", helper.all(d))
    end)
  end)

  it("a second reader gets nil, 'socket busy reading' (OpenResty's words)", function()
    local c = start("busy")
    assert.are.equal("nil socket busy reading nil socket busy reading", helper.line(c))
    assert(c:send("for the first\n"))
    assert.are.equal("true for the first", helper.line(c))
  end)

  it("an error in serve is reported with the connection and closes only that one #child", function()
    local child = helper.spawn("spec.fixtures.sequential 1 case=error")
    helper.defer(function() child.kill() end)
    local c = helper.connect(child.port)
    assert(c:send("boom\n"))
    assert.are.equal("", helper.all(c))
    c:close()
    c = helper.connect(child.port)
    assert(c:send("calm\n"))
    assert.are.equal("fine", helper.line(c))
    c:close()
    local _, code = child.stop()
    assert.are.equal(0, code)
    local stderr = child.stderr()
    assert.matches("%d%d:%d%d:%d%d%.%d%d%dZ error worker 1 conn 1: serve: [^\n]*sequential.lua:%d+: "
                   .. "serve failed on purpose\n\tstack traceback:", stderr)
  end)

  it("stop wakes a serve thread waiting in receive with nil, 'stopped'", function()
    local c = start("hold")
    assert(c:send("a\n"))
    assert.are.equal("holding", helper.line(c))
    assert(server:stop({ timeout = 0 }))
    assert.are.equal(0, server:stats().threads)
    assert.are.equal("nil stopped ", d:get("hold a"))
    server = nil
  end)

  it("a graceful stop lets a serve thread finish what it was doing", function()
    local c = start("linger")
    assert(c:send("b\n"))
    assert.are.equal("holding", helper.line(c))
    assert(c:send("done\n"))
    assert(server:stop({ timeout = 3000 }))
    assert.are.equal(0, server:stats().threads)
    assert.are.equal("done", d:get("linger b"))
    assert.are.equal("closed", helper.line(c))
    server = nil
  end)

  it("the callback methods raise on a serve connection, and bad arguments are named", function()
    local c = start("methods")
    local want = {
      "on_data false conn:on_data: not on a serve connection",
      "on_end false conn:on_end: not on a serve connection",
      "on_drain false conn:on_drain: not on a serve connection",
      "on_timeout false conn:on_timeout: not on a serve connection",
      "pause false conn:pause: not on a serve connection",
      "resume false conn:resume: not on a serve connection",
      "on_close true",
      "receive false conn:receive: the pattern must be \"*l\", \"*a\" or a byte count (got '*x')",
      "receiveany false conn:receiveany: max must be a positive integer (got 0)",
      "settimeout false conn:settimeout: a timeout must be an integer from 0 to 2147483647 ms (got -1)",
      "receiveuntil false conn:receiveuntil: the pattern must be a non-empty string (got an empty string)",
    }
    for _, w in ipairs(want) do
      assert.are.equal(w, helper.line(c):sub(1, #w))
    end
    local sort = helper.line(c)
    assert.matches("^sort false .*conn:receive: cannot yield here %(across a C%-call boundary: "
                   .. "use worker%.spawn%)$", sort)
  end)

  for _, dispatch in ipairs({ "reuseport", "queue", "ipc" }) do
    it("serves lines with dispatch " .. dispatch, function()
      local c = start("lines", { dispatch = dispatch, workers = 2 })
      assert(c:send("over " .. dispatch .. "\n"))
      assert.are.equal("[over " .. dispatch .. "]", helper.line(c))
    end)
  end

  it("serves lines over a Unix socket", function()
    local path = helper.sock_path()
    server = helper.server({ path = path, workers = 1, handler = "spec.fixtures.sequential",
                             config = { case = "lines" } })
    local c = helper.connect_unix(path)
    helper.defer(function() c:close() end)
    assert(c:send("unix\n"))
    assert.are.equal("[unix]", helper.line(c))
  end)

  it("2,000 connections wait in receive at once, and all are served #stress", function()
    server, port = helper.server({ workers = 2, handler = "spec.fixtures.sequential",
                                   config = { case = "many" } })
    local clients = {}
    for i = 1, 2000 do
      clients[i] = helper.connect(port)
    end
    helper.defer(function() for _, c in ipairs(clients) do c:close() end end)
    assert(helper.eventually(function() return server:stats().threads == 2000 end, 10000))
    for i, c in ipairs(clients) do assert(c:send("c" .. i .. "\n")) end
    local seen = {}
    for i, c in ipairs(clients) do
      local n, id = helper.line(c):match("^c(%d+) (%d)$")
      assert.are.equal(i, tonumber(n))
      seen[id] = true
    end
    assert.is_true(seen["1"] and seen["2"])
    for _, c in ipairs(clients) do c:close() end
    assert(helper.eventually(function() return server:stats().threads == 0 end, 10000))
  end)
end)

describe("a serve handler", function()
  it("cannot have connect too", function()
    local s = multiloop.server{ host = "127.0.0.1", port = 0, workers = 1,
                                handler = "spec.fixtures.serve_and_connect" }
    local ok, err = pcall(s.start, s)
    assert.is_false(ok)
    assert.matches("multiloop.server: start: worker 1 failed to load the handler: the handler "
                   .. "has both connect and serve (connect is the callback style, serve the "
                   .. "sequential one: give it one of them)", err, 1, true)
  end)
end)
