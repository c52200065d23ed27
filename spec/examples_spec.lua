-- The examples of life inside a worker, driven over the wire by real clients
-- on 127.0.0.1, each test with a server of its own (2 workers, dispatch
-- "queue", round-robin, so that clients that connect one after another land
-- on alternate workers):
--   examples/chat.lua: a line from a client on any worker reaches every
--     other client on every worker; lines come whole however they were split;
--     clients that leave, cleanly or not, leave the others chatting.
--   examples/kv.lua: every command of the Redis protocol (RESP2) server, its
--     nil, integer and error replies in Redis's words, pipelining, requests
--     split anywhere, binary-safe values, inline commands, and redis-cli
--     against it when that is installed.
--   examples/stats_counter.lua: the workers count connections in a shared
--     dictionary that the main state (this process) reads.
local helper = require("spec.helper")
local socket = require("socket")
local multiloop = require("multiloop")

-- The server of the running test; after_each stops it.
local server, port

local function serve(opts)
  opts.workers, opts.dispatch, opts.balance = 2, "queue", "round_robin"
  server, port = helper.server(opts)
  return server, port
end

local function stop_server()
  if not server then return end
  local s = server
  server = nil
  assert.is_true(s:stop())
  assert.are.equal(0, s:stats().active)
end

-- A connected client, closed when the test ends whatever its outcome.
local function client()
  local c = helper.connect(port)
  helper.defer(function() c:close() end)
  return c
end

-- Whether the server has closed c, having sent nothing more.
local function closed(c)
  local line, err, partial = c:receive("*l")
  return line == nil and err == "closed" and partial == ""
end

-- Sends data, then waits until the server has read all of it, so that
-- whatever is sent next arrives in a read of its own. Only c may be sending.
local function send_apart(c, data)
  local before = server:stats().bytes_in
  assert(c:send(data))
  assert(helper.eventually(function()
    return server:stats().bytes_in >= before + #data
  end), ("the server never read %q"):format(data))
end

-- Waits (boundedly) until worker 1 has `one` open connections and worker 2
-- has `two`: a worker counts a connection once it has taken it, and uncounts
-- it once it has closed it, both a little after what a client sees.
local function expect_spread(one, two)
  local function spread()
    local w = server:stats().workers
    return { w[1].active, w[2].active }
  end
  helper.eventually(function()
    local now = spread()
    return now[1] == one and now[2] == two
  end)
  assert.are.same({ one, two }, spread())
end

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

-- A RESP request: an array of bulk strings.
local function resp(...)
  local out = { ("*%d\r\n"):format(select("#", ...)) }
  for i = 1, select("#", ...) do
    local arg = tostring((select(i, ...)))
    out[#out + 1] = ("$%d\r\n%s\r\n"):format(#arg, arg)
  end
  return table.concat(out)
end

-- One reply, as the raw bytes the server sent (arrays whole).
local function read_reply(c)
  local line = helper.line(c)
  local kind = line:sub(1, 1)
  if kind == "$" then
    local n = tonumber(line:sub(2))
    if n < 0 then return line .. "\r\n" end
    local data, err = c:receive(n + 2)
    assert(data, err)
    return line .. "\r\n" .. data
  elseif kind == "*" then
    local parts = { line .. "\r\n" }
    for _ = 1, tonumber(line:sub(2)) do parts[#parts + 1] = read_reply(c) end
    return table.concat(parts)
  end
  return line .. "\r\n"
end

local function bulk(s) return ("$%d\r\n%s\r\n"):format(#s, s) end
local function int(n) return (":%d\r\n"):format(n) end
local function int_of(reply) return math.tointeger(tonumber(reply:match("^:(%-?%d+)\r\n$"))) end
local OK, NIL = "+OK\r\n", "$-1\r\n"
local NOT_INTEGER = "-ERR value is not an integer or out of range\r\n"
local SYNTAX = "-ERR syntax error\r\n"
local function arity(name) return ("-ERR wrong number of arguments for '%s' command\r\n"):format(name) end

describe("examples/kv.lua with 2 workers", function()
  after_each(stop_server)

  -- Each test has its own dictionary, so nothing one stores reaches another.
  local dict_names = 0
  local dict

  -- Starts the server (64 MiB: 16 stripes of 4 MiB) and returns a client.
  local function start()
    dict_names = dict_names + 1
    dict = ("spec kv %d"):format(dict_names)
    serve{ handler = "examples.kv", config = { name = dict, capacity = 64 * 1024 * 1024 } }
    return client()
  end

  local function call(conn, ...)
    assert(conn:send(resp(...)))
    return read_reply(conn)
  end

  it("PING and ECHO, binary-safe", function()
    local c = start()
    assert.are.equal("+PONG\r\n", call(c, "PING"))
    assert.are.equal(bulk("hi"), call(c, "PING", "hi"))
    local bytes = "a\0b\r\nc\255"
    assert.are.equal(bulk(bytes), call(c, "ECHO", bytes))
    assert.are.equal(bulk(""), call(c, "ECHO", ""))
  end)

  it("SET, GET, DEL and EXISTS, with NUL and CRLF inside keys and values", function()
    local c = start()
    local key, value = "k\0\r\n", "v\0\r\n\0$3\r\n"
    assert.are.equal(OK, call(c, "SET", key, value))
    assert.are.equal(bulk(value), call(c, "GET", key))
    assert.are.equal(NIL, call(c, "GET", "missing"))
    assert.are.equal(OK, call(c, "set", "other", "42"))          -- any case
    assert.are.equal(bulk("42"), call(c, "GET", "other"))
    assert.are.equal(OK, call(c, "SET", "empty", ""))
    assert.are.equal(bulk(""), call(c, "GET", "empty"))
    assert.are.equal(int(3), call(c, "EXISTS", key, "missing", "other", key))
    assert.are.equal(int(2), call(c, "DEL", key, "missing", "other", key))
    assert.are.equal(NIL, call(c, "GET", key))
    assert.are.equal(int(0), call(c, "EXISTS", key))
    assert.are.equal(int(0), call(c, "DEL", key))
  end)

  it("SET NX and XX", function()
    local c = start()
    assert.are.equal(OK, call(c, "SET", "k", "first", "NX"))
    assert.are.equal(NIL, call(c, "SET", "k", "second", "nx"))
    assert.are.equal(bulk("first"), call(c, "GET", "k"))
    assert.are.equal(OK, call(c, "SET", "k", "third", "XX"))
    assert.are.equal(bulk("third"), call(c, "GET", "k"))
    assert.are.equal(NIL, call(c, "SET", "absent", "v", "XX"))
    assert.are.equal(NIL, call(c, "GET", "absent"))
  end)

  it("SET EX and PX, TTL, PTTL and EXPIRE, and keys that expire", function()
    local c = start()
    assert.are.equal(OK, call(c, "SET", "ex", "v", "EX", "100"))
    -- TTL rounds to the nearest second: 100 unless half a second went by.
    local ttl = int_of(call(c, "TTL", "ex"))
    assert.is_true(ttl == 100 or ttl == 99, "TTL " .. tostring(ttl))
    assert.are.equal(OK, call(c, "SET", "long", "v", "PX", "20000", "NX"))
    local left = int_of(call(c, "PTTL", "long"))
    assert.is_true(left > 10000 and left <= 20000, "PTTL " .. tostring(left))
    assert.are.equal(NIL, call(c, "SET", "long", "again", "NX", "PX", "50"))  -- still there
    assert.are.equal(bulk("v"), call(c, "GET", "long"))
    -- 50 ms, and a bounded wait for it to go.
    assert.are.equal(OK, call(c, "SET", "px", "v", "PX", "50", "NX"))
    assert.is_truthy(helper.eventually(function() return call(c, "GET", "px") == NIL end, 2000))
    assert.are.equal(int(-2), call(c, "TTL", "px"))
    assert.are.equal(int(-2), call(c, "PTTL", "px"))
    assert.are.equal(int(0), call(c, "EXISTS", "px"))
    assert.are.equal(OK, call(c, "SET", "px", "again", "NX", "PX", "50"))    -- gone: NX stores

    assert.are.equal(OK, call(c, "SET", "plain", "v"))
    assert.are.equal(int(-1), call(c, "TTL", "plain"))
    assert.are.equal(int(-1), call(c, "PTTL", "plain"))
    assert.are.equal(int(1), call(c, "EXPIRE", "plain", "10"))
    ttl = int_of(call(c, "TTL", "plain"))
    assert.is_true(ttl == 10 or ttl == 9, "TTL " .. tostring(ttl))
    assert.are.equal(int(0), call(c, "EXPIRE", "missing", "10"))
    assert.are.equal(int(1), call(c, "EXPIRE", "plain", "0"))     -- 0 deletes
    assert.are.equal(NIL, call(c, "GET", "plain"))
    -- A SET without EX or PX clears the time to live.
    assert.are.equal(OK, call(c, "SET", "ex", "w"))
    assert.are.equal(int(-1), call(c, "TTL", "ex"))
    -- INCR keeps it.
    assert.are.equal(OK, call(c, "SET", "n", "1", "EX", "100"))
    assert.are.equal(int(2), call(c, "INCR", "n"))
    assert.is_true(int_of(call(c, "TTL", "n")) >= 99)
  end)

  it("refuses bad SET options and times with Redis's messages", function()
    local c = start()
    assert.are.equal("-ERR invalid expire time in 'set' command\r\n",
      call(c, "SET", "k", "v", "EX", "0"))
    assert.are.equal("-ERR invalid expire time in 'set' command\r\n",
      call(c, "SET", "k", "v", "PX", "-5"))
    assert.are.equal(NOT_INTEGER, call(c, "SET", "k", "v", "EX", "soon"))
    assert.are.equal(NOT_INTEGER, call(c, "SET", "k", "v", "PX", "1.5"))
    assert.are.equal(SYNTAX, call(c, "SET", "k", "v", "FOREVER"))
    assert.are.equal(SYNTAX, call(c, "SET", "k", "v", "EX"))
    assert.are.equal(SYNTAX, call(c, "SET", "k", "v", "EX", "1", "PX", "1"))
    assert.are.equal(SYNTAX, call(c, "SET", "k", "v", "NX", "XX"))
    assert.are.equal(NOT_INTEGER, call(c, "EXPIRE", "k", "later"))
    assert.are.equal(NIL, call(c, "GET", "k"))                   -- none of them stored
  end)

  it("INCR, INCRBY, DECR and DECRBY, atomic across workers, with their errors", function()
    local c = start()
    assert.are.equal(int(1), call(c, "INCR", "n"))
    assert.are.equal(int(42), call(c, "INCRBY", "n", "41"))
    assert.are.equal(int(40), call(c, "INCRBY", "n", "-2"))
    assert.are.equal(int(39), call(c, "DECR", "n"))
    assert.are.equal(int(29), call(c, "DECRBY", "n", "10"))
    assert.are.equal(bulk("29"), call(c, "GET", "n"))
    assert.are.equal(int(-5), call(c, "DECRBY", "fresh", "5"))
    assert.are.equal(OK, call(c, "SET", "s", "abc"))
    assert.are.equal(NOT_INTEGER, call(c, "INCR", "s"))
    assert.are.equal(bulk("abc"), call(c, "GET", "s"))           -- unchanged
    assert.are.equal(OK, call(c, "SET", "f", "1.5"))
    assert.are.equal(NOT_INTEGER, call(c, "INCR", "f"))
    assert.are.equal(OK, call(c, "SET", "z", "007"))             -- not an integer's text
    assert.are.equal(NOT_INTEGER, call(c, "INCRBY", "z", "1"))
    assert.are.equal(NOT_INTEGER, call(c, "INCRBY", "n", "1.5"))
    assert.are.equal(NOT_INTEGER, call(c, "INCRBY", "n", "99999999999999999999"))
    assert.are.equal(OK, call(c, "SET", "max", "9223372036854775807"))
    assert.are.equal("-ERR increment or decrement would overflow\r\n", call(c, "INCR", "max"))
    assert.are.equal(bulk("9223372036854775807"), call(c, "GET", "max"))

    -- Two clients on the two workers, 200 pipelined INCRs each.
    local d = client()
    local burst = resp("INCR", "shared"):rep(200)
    assert(c:send(burst))
    assert(d:send(burst))
    local seen = {}
    for _ = 1, 200 do
      seen[#seen + 1] = int_of(read_reply(c))
      seen[#seen + 1] = int_of(read_reply(d))
    end
    table.sort(seen)
    for i = 1, 400 do assert.are.equal(i, seen[i]) end        -- each value once
    assert.are.equal(bulk("400"), call(c, "GET", "shared"))
  end)

  it("DBSIZE and FLUSHALL", function()
    local c = start()
    assert.are.equal(int(0), call(c, "DBSIZE"))
    for i = 1, 5 do assert.are.equal(OK, call(c, "SET", "key" .. i, i)) end
    assert.are.equal(int(5), call(c, "DBSIZE"))
    assert.are.equal(SYNTAX, call(c, "FLUSHALL", "LATER"))
    assert.are.equal(int(5), call(c, "DBSIZE"))                  -- a refused FLUSHALL kept them
    assert.are.equal(OK, call(c, "FLUSHALL"))
    assert.are.equal(int(0), call(c, "DBSIZE"))
    assert.are.equal(NIL, call(c, "GET", "key1"))
    assert.are.equal(OK, call(c, "SET", "again", "1"))
    assert.are.equal(OK, call(c, "flushall", "async"))
    assert.are.equal(int(0), call(c, "DBSIZE"))
  end)

  it("answers unknown commands and wrong arities in Redis's words, and goes on", function()
    local c = start()
    assert.are.equal("-ERR unknown command 'NOPE', with args beginning with: 'a' 'b' \r\n",
      call(c, "NOPE", "a", "b"))
    assert.are.equal("-ERR unknown command 'foo', with args beginning with: \r\n", call(c, "foo"))
    -- Long arguments are cut after 128 bytes, as Redis does.
    local long = ("x"):rep(100)
    assert.are.equal(("-ERR unknown command 'NOPE', with args beginning with: '%s' '%s' \r\n")
      :format(long, ("x"):rep(128 - 103)), call(c, "NOPE", long, long, long))
    local wrong = {
      { "ping", "a", "b" }, { "echo" }, { "set", "k" }, { "get" }, { "get", "a", "b" },
      { "del" }, { "exists" }, { "incr" }, { "incrby", "k" }, { "decr" }, { "decrby", "k" },
      { "expire", "k" }, { "ttl" }, { "pttl", "a", "b" }, { "dbsize", "x" },
    }
    for _, args in ipairs(wrong) do
      assert.are.equal(arity(args[1]), call(c, args[1]:upper(), table.unpack(args, 2)))
    end
    assert.are.equal(SYNTAX, call(c, "FLUSHALL", "ASYNC", "SYNC"))
    assert.are.equal("+PONG\r\n", call(c, "PING"))
  end)

  it("keeps error replies one line when a command quotes CR or LF back", function()
    local c = start()
    -- Without care the "\r\n" would end the error and "+OK" read as a reply.
    assert.are.equal("-ERR unknown command 'NO PE', with args beginning with: 'a  +OK' \r\n",
      call(c, "NO\nPE", "a\r\n+OK"))
    assert.are.equal("-ERR unknown command 'cut', with args beginning with: 'a' \r\n",
      call(c, "cut\0hidden", "a\0b"))                         -- C strings in Redis
    assert.are.equal("+PONG\r\n", call(c, "PING"))
  end)

  it("closes the connection after a protocol error, with its message", function()
    local c = start()
    assert(c:send(resp("PING") .. "*1\r\n:5\r\n" .. resp("PING")))
    assert.are.equal("+PONG\r\n", read_reply(c))
    assert.are.equal("-ERR Protocol error: expected '$', got ':'\r\n", read_reply(c))
    assert.is_true(closed(c))
    local d = client()
    assert(d:send("*x\r\n"))
    assert.are.equal("-ERR Protocol error: invalid multibulk length\r\n", read_reply(d))
    assert.is_true(closed(d))
    local e = client()
    assert(e:send("*1\r\n$-3\r\n"))
    assert.are.equal("-ERR Protocol error: invalid bulk length\r\n", read_reply(e))
    assert.is_true(closed(e))
    local f = client()
    assert(f:send("*1\r\n\r\n"))                               -- the byte quoted is "\r"
    assert.are.equal("-ERR Protocol error: expected '$', got ' '\r\n", read_reply(f))
    assert.is_true(closed(f))
  end)

  it("answers several commands pipelined in one write, in order, errors included", function()
    local c = start()
    local requests = table.concat({
      resp("SET", "a", "1"), resp("GET", "nothing"), resp("INCR", "a"), resp("NOPE"),
      resp("GET"), resp("ECHO", "x\r\ny"), resp("SET", "a", "b", "NX"), resp("DEL", "a"),
      resp("EXISTS", "a"), resp("INCR", "a"), resp("PING"), "PING\r\n",
    })
    assert(c:send(requests))
    local expected = {
      OK, NIL, int(2), "-ERR unknown command 'NOPE', with args beginning with: \r\n",
      arity("get"), bulk("x\r\ny"), NIL, int(1), int(0), int(1), "+PONG\r\n", "+PONG\r\n",
    }
    for i = 1, #expected do assert.are.equal(expected[i], read_reply(c)) end

    local many = {}
    for i = 1, 500 do
      many[i] = i % 2 == 1 and resp("SET", "p" .. i, "v" .. i) or resp("GET", "p" .. (i - 1))
    end
    assert(c:send(table.concat(many)))
    for i = 1, 500 do
      assert.are.equal(i % 2 == 1 and OK or bulk("v" .. (i - 1)), read_reply(c))
    end
  end)

  it("parses a request split across reads, even mid-bulk-string", function()
    local c = start()
    c:setoption("tcp-nodelay", true)
    local value = "ab\r\n\0cd"
    local request = resp("SET", "split", value)       -- *3 $3 SET $5 split $8 ab\r\n\0cd
    -- Cut inside "*3\r\n", inside "$5", inside the value right in its CRLF,
    -- and between the value and its own CRLF.
    local at = {
      2, request:find("$5", 1, true), request:find("ab\r", 1, true) + 2,
      request:find("cd\r\n", 1, true) + 1,
    }
    local from = 1
    for _, cut in ipairs(at) do
      send_apart(c, request:sub(from, cut))
      from = cut + 1
    end
    assert(c:send(request:sub(from) .. resp("GET", "split"):sub(1, 9)))
    assert.are.equal(OK, read_reply(c))
    assert(c:send(resp("GET", "split"):sub(10)))
    assert.are.equal(bulk(value), read_reply(c))

    -- Byte by byte, two requests.
    request = resp("SET", "bytes", "a value\r\nwith CRLF") .. resp("GET", "bytes")
    for i = 1, #request do
      assert(c:send(request:sub(i, i)))
      if i % 8 == 0 then socket.sleep(0.001) end
    end
    assert.are.equal(OK, read_reply(c))
    assert.are.equal(bulk("a value\r\nwith CRLF"), read_reply(c))
  end)

  it("parses a request of 20,000 arguments arriving in many reads", function()
    local c = start()
    c:setoption("tcp-nodelay", true)
    for i = 1, 3 do assert.are.equal(OK, call(c, "SET", "many" .. i, "v")) end
    local parts = { "*20001\r\n$3\r\nDEL\r\n" }
    for i = 1, 20000 do
      local key = "many" .. i
      parts[#parts + 1] = ("$%d\r\n%s\r\n"):format(#key, key)
    end
    local request = table.concat(parts)
    for i = 1, #request, 1000 do
      assert(c:send(request, i, math.min(i + 999, #request)))
      if i % 16000 == 1 then socket.sleep(0.001) end       -- let reads end mid-request
    end
    assert.are.equal(":3\r\n", read_reply(c))
    assert.are.equal(":0\r\n", call(c, "EXISTS", "many1", "many2", "many3"))
  end)

  it("takes a 2 MiB value in 64 KiB writes, and refuses one too big to store", function()
    local c = start()
    local value = ("0123456789abcdef"):rep(128 * 1024)                -- 2 MiB
    local request = resp("SET", "big", value) .. resp("PING")
    for i = 1, #request, 65536 do assert(c:send(request, i, math.min(i + 65535, #request))) end
    assert.are.equal(OK, read_reply(c))
    assert.are.equal("+PONG\r\n", read_reply(c))
    assert(c:send(resp("GET", "big")))
    assert.are.equal(bulk(value), read_reply(c))
    -- 64 MiB over 16 stripes: nothing over 4 MiB fits.
    assert.are.equal("-OOM command not allowed when used memory > 'maxmemory'.\r\n",
      call(c, "SET", "huge", value:rep(3)))
    assert.are.equal(NIL, call(c, "GET", "huge"))
  end)

  it("shares the keys between workers and with the main state", function()
    local c = start()
    local d = client()                                 -- the other worker
    expect_spread(1, 1)
    assert.are.equal(OK, call(c, "SET", "greeting", "hello"))
    assert.are.equal(bulk("hello"), call(d, "GET", "greeting"))
    local db = multiloop.shared(dict)
    assert.are.equal("hello", db:get("greeting"))
    db:set("from main", 7)
    db:set("a float", 1.5)
    assert.are.equal(bulk("7"), call(d, "GET", "from main"))
    assert.are.equal(bulk("1.5"), call(d, "GET", "a float"))
    assert.are.equal(int(8), call(c, "INCR", "from main"))
    assert.are.equal(8, db:get("from main"))
  end)

  it("understands inline commands, as typed into telnet", function()
    local c = start()
    assert(c:send("PING\r\nSET inline  value\r\n\r\nGET inline\nEXISTS inline nothing\r\n"))
    assert.are.equal("+PONG\r\n", read_reply(c))
    assert.are.equal(OK, read_reply(c))
    assert.are.equal(bulk("value"), read_reply(c))
    assert.are.equal(int(1), read_reply(c))
    assert(c:send("GET\r\n"))
    assert.are.equal(arity("get"), read_reply(c))
  end)

  it("closes the connection after QUIT, having answered what came before", function()
    local c = start()
    assert(c:send(resp("SET", "q", "1") .. resp("QUIT") .. resp("GET", "q")))
    assert.are.equal(OK, read_reply(c))
    assert.are.equal(OK, read_reply(c))
    assert.is_true(closed(c))
  end)

  it("works with redis-cli #child", function()
    local probe = io.popen("command -v redis-cli")
    local found = probe:read("a")
    probe:close()
    if found == "" then
      pending("redis-cli is not installed (Debian: redis-tools)")
      return
    end
    start()
    -- Without the sanitizer runtime this process may have preloaded.
    local function cli(args, stdin)
      local input = os.tmpname()
      helper.defer(function() os.remove(input) end)
      local f = assert(io.open(input, "wb"))
      f:write(stdin or "")
      f:close()
      local p = assert(io.popen(("env -u LD_PRELOAD timeout 10 redis-cli -p %d %s < %s 2>&1")
        :format(port, args, input)))
      local out = p:read("a")
      p:close()
      return out
    end
    assert.are.equal("PONG\n", cli("PING"))
    assert.are.equal("OK\n", cli("SET city Lisbon EX 60"))
    assert.are.equal("Lisbon\n", cli("GET city"))
    local ttl = tonumber(cli("TTL city"):match("^(%d+)\n$"))
    assert.is_true(ttl == 60 or ttl == 59, "TTL " .. tostring(ttl))
    assert.are.equal("5\n", cli("INCRBY visits 5"))
    assert.are.equal("2\n", cli("DBSIZE"))
    assert.are.equal("(nil)\n", cli("--no-raw GET nothing"))
    assert.are.equal("(integer) 0\n", cli("--no-raw EXISTS nothing"))
    -- (redis-cli prints an error reply, then an empty line)
    assert.are.equal("ERR value is not an integer or out of range", cli("INCR city"):match("^[^\n]*"))
    assert.are.equal("ERR unknown command 'NOPE', with args beginning with: 'x' ",
      cli("NOPE x"):match("^[^\n]*"))
    -- Commands read from stdin, all through one connection.
    assert.are.equal("OK\nOK\nb\n", cli("", "SET a 1\nSET b b\nGET b\n"))
    -- --pipe: raw requests, pipelined, then an ECHO of its own to know the end.
    local batch = {}
    for i = 1, 100 do batch[i] = resp("INCR", "piped") end
    local out = cli("--pipe", table.concat(batch))
    assert.is_truthy(out:find("errors: 0, replies: 100", 1, true), out)
    assert.are.equal("100\n", cli("GET piped"))
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
