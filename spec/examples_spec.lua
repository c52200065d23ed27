-- The examples of life inside a worker, driven over the wire by real clients
-- on 127.0.0.1, each test with a server of its own (2 workers, dispatch
-- "queue", round-robin, so that clients that connect one after another land
-- on alternate workers):
--   examples/chat.lua: a line from a client on any worker reaches every
--     other client on every worker; lines come whole however they were split;
--     clients that leave, cleanly or not, leave the others chatting.
--   examples/lines.lua: a line protocol in serve style: each command's
--     reply, each connection's own variables, lines split or many in one
--     write, its errors in words, a line too long and an idle connection
--     ended, and no light thread left behind.
--   (examples/kv.lua has spec/kv_spec.lua, examples/kv_redis.lua
--   spec/redis_spec.lua, which starts the redis-server it needs.)
--   examples/stats_counter.lua: the workers count connections in a shared
--     dictionary that the main state (this process) reads.
local helper = require("spec.helper")
local multiloop = require("multiloop")

local ex = require("spec.example_server")
local serve, stop_server, client, closed = ex.serve, ex.stop, ex.client, ex.closed
local send_apart, expect_spread = ex.send_apart, ex.expect_spread

-- ---------------------------------------------------------------------------

describe("examples/chat.lua with 2 workers", function()
  after_each(stop_server)

  -- A client that has read its welcome line: the client and its name.
  local function join()
    local c = client()
    local line = helper.line(c)
    local name = line:match("^%* welcome, you are (user%d+)$")
    assert(name, "expected a welcome line, got " .. line)
    return c, name
  end

  -- Reads lines from c until it has had every line of `wants` (in any
  -- order: they may come from both workers); any other line must be one of
  -- `allowed`, each at most once.
  local function expect_set(c, wants, allowed)
    local missing, extra = {}, {}
    for _, w in ipairs(wants) do missing[w] = true end
    for _, a in ipairs(allowed or {}) do extra[a] = true end
    while next(missing) do
      local line = helper.line(c)
      if missing[line] then
        missing[line] = nil
      else
        assert(extra[line], "unexpected line: " .. line)
        extra[line] = nil
      end
    end
  end

  -- n clients, on alternate workers (c[1] on worker 1), each having read
  -- the joins of those after it: from here on, every line a client reads is
  -- news. A client may also hear of those who joined just before it (their
  -- news may reach its worker after it: see examples/chat.lua); a line from
  -- a client on each worker flushes both ways between the workers, so after
  -- it nothing old is in flight.
  local function room(n)
    serve{ handler = "examples.chat" }
    local cs, names = {}, {}
    for i = 1, n do cs[i], names[i] = join() end
    expect_spread(math.ceil(n / 2), n // 2)
    assert(cs[1]:send("sync\n"))
    assert(cs[2]:send("sync\n"))
    for i = 1, n do
      local wants, earlier = {}, {}
      for j = 1, n do
        local joined = ("* %s joined"):format(names[j])
        if j > i then wants[#wants + 1] = joined elseif j < i then earlier[#earlier + 1] = joined end
      end
      for j = 1, 2 do
        if j ~= i then wants[#wants + 1] = names[j] .. ": sync" end
      end
      expect_set(cs[i], wants, earlier)
    end
    return cs, names
  end

  it("delivers a line from one client to every other, on both workers, not to the sender", function()
    local c, name = room(4)                  -- c[1], c[3] on worker 1; c[2], c[4] on 2
    assert(c[1]:send("hello from 1\n"))
    for i = 2, 4 do assert.are.equal(name[1] .. ": hello from 1", helper.line(c[i])) end
    assert(c[4]:send("hi, with CRLF\r\n"))
    -- Each sender's next line is another's: no one gets their own back.
    for i = 1, 3 do assert.are.equal(name[4] .. ": hi, with CRLF", helper.line(c[i])) end
    assert(c[2]:send("two\n"))
    for _, i in ipairs({ 1, 3, 4 }) do assert.are.equal(name[2] .. ": two", helper.line(c[i])) end
    -- Empty lines are not sent to anyone.
    assert(c[3]:send("\n\r\nthree\n"))
    for _, i in ipairs({ 1, 2, 4 }) do assert.are.equal(name[3] .. ": three", helper.line(c[i])) end
  end)

  it("delivers a line split over writes whole, and one sender's lines in order", function()
    local c, name = room(3)
    c[1]:setoption("tcp-nodelay", true)
    send_apart(c[1], "par")
    assert(c[1]:send("tial line\n"))
    for i = 2, 3 do assert.are.equal(name[1] .. ": partial line", helper.line(c[i])) end
    -- Split between "\r" and "\n", and lines with a piece of the next.
    send_apart(c[1], "crlf\r")
    send_apart(c[1], "\none\ntw")
    assert(c[1]:send("o\n"))
    for i = 2, 3 do
      assert.are.equal(name[1] .. ": crlf", helper.line(c[i]))
      assert.are.equal(name[1] .. ": one", helper.line(c[i]))
      assert.are.equal(name[1] .. ": two", helper.line(c[i]))
    end

    local lines = {}
    for i = 1, 200 do lines[i] = ("line %d"):format(i) end
    assert(c[1]:send(table.concat(lines, "\n") .. "\n"))
    for i = 1, 200 do
      assert.are.equal(name[1] .. ": " .. lines[i], helper.line(c[2]))
      assert.are.equal(name[1] .. ": " .. lines[i], helper.line(c[3]))
    end
  end)

  it("announces clients that leave, cleanly or by a reset, and the others go on", function()
    local c, name = room(4)
    c[2]:close()
    for _, i in ipairs({ 1, 3, 4 }) do assert.are.equal(("* %s left"):format(name[2]), helper.line(c[i])) end
    -- A reset (SO_LINGER 0): the server sees an error, not an end.
    c[3]:setoption("linger", { on = true, timeout = 0 })
    c[3]:close()
    for _, i in ipairs({ 1, 4 }) do assert.are.equal(("* %s left"):format(name[3]), helper.line(c[i])) end
    expect_spread(1, 1)

    assert(c[4]:send("still here\n"))
    assert.are.equal(name[4] .. ": still here", helper.line(c[1]))
    local e, ename = join()                  -- a newcomer, on worker 1
    assert.are.equal(("* %s joined"):format(ename), helper.line(c[1]))
    assert.are.equal(("* %s joined"):format(ename), helper.line(c[4]))
    assert(e:send("hello all\n"))
    assert.are.equal(ename .. ": hello all", helper.line(c[1]))
    assert.are.equal(ename .. ": hello all", helper.line(c[4]))
    expect_spread(2, 1)
  end)

  it("ends a connection whose line is over 4 KiB, in pieces or whole, and only that one", function()
    local c, name = room(4)
    -- 4096 bytes and a CRLF are a line.
    local longest = ("y"):rep(4096)
    assert(c[1]:send(longest .. "\r\n"))
    for i = 2, 4 do assert.are.equal(name[1] .. ": " .. longest, helper.line(c[i])) end
    -- 5000 bytes and no end of line yet.
    assert(c[2]:send(("x"):rep(5000)))
    assert.are.equal("* line too long, bye", helper.line(c[2]))
    assert.is_true(closed(c[2]))
    for _, i in ipairs({ 1, 3, 4 }) do assert.are.equal(("* %s left"):format(name[2]), helper.line(c[i])) end
    -- 4097 bytes and a newline, in one write.
    assert(c[3]:send(("z"):rep(4097) .. "\n"))
    assert.are.equal("* line too long, bye", helper.line(c[3]))
    assert.is_true(closed(c[3]))
    for _, i in ipairs({ 1, 4 }) do assert.are.equal(("* %s left"):format(name[3]), helper.line(c[i])) end
    expect_spread(1, 1)
    assert(c[4]:send("after\n"))
    assert.are.equal(name[4] .. ": after", helper.line(c[1]))
  end)
end)

-- ---------------------------------------------------------------------------

describe("examples/lines.lua with 2 workers", function()
  after_each(stop_server)

  local HELLO = "hello: UPPER text, SET name value, GET name, INCR name, COUNT, TIME, QUIT"

  -- A client that has read the greeting.
  local function join()
    local c = client()
    assert.are.equal(HELLO, helper.line(c))
    return c
  end

  -- Sends one command line and returns the reply line.
  local function ask(c, line)
    assert(c:send(line .. "\n"))
    return helper.line(c)
  end

  -- Waits (boundedly) until no light thread is left in any worker.
  local function no_threads()
    assert.is_truthy(helper.eventually(function() return ex.server:stats().threads == 0 end),
      "light threads left: " .. ex.server:stats().threads)
  end

  it("answers each command, and keeps each connection's variables its own", function()
    serve{ handler = "examples.lines" }
    local c, d = join(), join()                 -- one on each worker
    expect_spread(1, 1)
    assert.are.equal("HELLO,  WORLD 1", ask(c, "upper hello,  world 1"))
    assert.are.equal("OK", ask(c, "SET x 41"))
    assert.are.equal("42", ask(c, "Incr x"))
    assert.are.equal("42", ask(c, "get x"))
    assert.are.equal("(nil)", ask(d, "GET x"))  -- the other connection's
    assert.are.equal("1", ask(d, "INCR x"))
    assert.are.equal("OK", ask(c, "set greeting hello there, you"))
    assert.are.equal("hello there, you", ask(c, "get greeting"))
    assert.are.equal("7", ask(c, "COUNT"))
    assert.are.equal("3", ask(d, "count"))
    local now = tonumber(ask(c, "TIME"))
    assert.is_true(math.abs(now - os.time()) <= 2, "TIME " .. tostring(now))
    assert.are.equal("bye", ask(c, "quit"))
    assert.is_true(closed(c))
    assert.are.equal("2", ask(d, "incr x"))     -- the other goes on
  end)

  it("takes lines split across writes, and many in one write, answering in order", function()
    serve{ handler = "examples.lines" }
    local c = join()
    c:setoption("tcp-nodelay", true)
    send_apart(c, "up")
    send_apart(c, "per split\r")
    assert(c:send("\nupper two\r\n\n\r\nupp"))  -- CRLF, and empty lines skipped
    send_apart(c, "er three")
    assert(c:send("\n"))
    assert.are.equal("SPLIT", helper.line(c))
    assert.are.equal("TWO", helper.line(c))
    assert.are.equal("THREE", helper.line(c))
    assert(c:send(("incr n\n"):rep(300)))
    for i = 1, 300 do assert.are.equal(tostring(i), helper.line(c)) end
    assert.are.equal("304", ask(c, "count"))
  end)

  it("answers mistakes with messages, and ends a line too long and an idle connection", function()
    serve{ handler = "examples.lines", receive_limit = 100, config = { idle_ms = 500 } }
    -- 150 bytes and no end of line: past receive_limit.
    local d = join()
    assert(d:send(("x"):rep(150)))
    assert.are.equal("ERR line too long", helper.line(d))
    assert.is_true(closed(d))
    local c = join()
    assert.are.equal("ERR unknown command 'frob'", ask(c, "frob a b"))
    assert.are.equal("ERR usage: SET name value", ask(c, "set x"))
    assert.are.equal("ERR usage: GET name", ask(c, "get"))
    assert.are.equal("ERR usage: INCR name", ask(c, "incr a b"))
    assert.are.equal("OK", ask(c, "set s 1.5"))
    assert.are.equal("ERR '1.5' is not an integer", ask(c, "incr s"))
    assert.are.equal("1.5", ask(c, "get s"))   -- unchanged
    -- Then silent for 500 ms (the read timeout, which each line restarts):
    -- told so, and closed.
    assert.are.equal("bye (idle)", helper.line(c))
    assert.is_true(closed(c))
    -- A client that leaves mid-line: nothing to answer, the thread ends.
    local e = join()
    assert(e:send("upper half a li"))
    e:shutdown("send")
    assert.is_true(closed(e))
    no_threads()
  end)
end)

-- ---------------------------------------------------------------------------

describe("examples/stats_counter.lua", function()
  after_each(stop_server)

  it("counts N connections over 2 workers in a shared dictionary that the main state reads", function()
    local stats_counter = require("examples.stats_counter")
    local stats = multiloop.shared("stats")        -- held here: counts outlive the server
    stats:flush()
    serve{ handler = "examples.stats_counter" }
    local N = 10
    local clients = {}
    for i = 1, N do clients[i] = client() end     -- all open before any is read
    local numbers = {}
    for i, c in ipairs(clients) do
      local line = helper.line(c)
      local n, w = line:match("^you are visitor #(%d+) %(served by worker (%d)%)$")
      assert(n, "unexpected greeting: " .. line)
      numbers[i] = tonumber(n)
      assert.are.equal(i % 2 == 1 and 1 or 2, tonumber(w))     -- round-robin from worker 1
      assert.is_true(closed(c))                               -- and it closes
    end
    table.sort(numbers)                  -- the two workers counted concurrently
    for i = 1, N do assert.are.equal(i, numbers[i]) end
    assert.are.equal(N, stats:get("connections"))
    local total, per = stats_counter.report(2)
    assert.are.equal(N, total)
    assert.are.same({ N // 2, N // 2 }, per)
    stop_server()
    assert.are.equal(N, stats:get("connections"))
  end)
end)
