-- The examples of life inside a worker, driven over the wire:
-- examples/chat.lua (a line from any worker reaches every client on every
-- worker), examples/kv.lua (the Redis protocol over a shared dictionary, and
-- redis-cli against it when that is installed) and examples/stats_counter.lua
-- (the workers count in a shared dictionary, the main state reads it).
local helper = require("spec.helper")
local socket = require("socket")
local multiloop = require("multiloop")

local function client(port)
  local c = helper.connect(port)
  helper.defer(function() c:close() end)
  return c
end

-- Reads lines until every one of `wants` has come, in any order (lines
-- from other workers may overtake local ones); a timeout fails, naming what
-- came instead.
local function expect_lines(c, wants)
  local missing, seen = {}, {}
  for _, w in ipairs(wants) do missing[w] = true end
  while next(missing) do
    local line, err = c:receive("*l")
    if not line then
      local left = {}
      for w in pairs(missing) do left[#left + 1] = w end
      error(("waiting for %s: %s (got: %s)"):format(table.concat(left, ", "), tostring(err),
        table.concat(seen, " | ")), 2)
    end
    if missing[line] then missing[line] = nil else seen[#seen + 1] = line end
  end
end

local function expect_line(c, want) expect_lines(c, { want }) end

-- Whether the server has closed c, having sent nothing more.
local function closed(c)
  local line, err, partial = c:receive("*l")
  return line == nil and err == "closed" and partial == ""
end

-- ---------------------------------------------------------------------------

describe("examples/chat.lua with 2 workers", function()
  local server, port
  setup(function()
    -- queue + round-robin: clients that connect one after another land on
    -- alternate workers.
    server, port = helper.server{ workers = 2, dispatch = "queue", handler = "examples.chat" }
  end)
  teardown(function() server:stop() end)

  -- A client that has read its welcome line: the client and its name.
  local function join()
    local c = client(port)
    local line = helper.line(c)
    local name = line:match("^%* welcome, you are (user%d+)$")
    assert(name, "expected a welcome line, got " .. line)
    return c, name
  end

  -- The next line that is not an announcement ("* ... joined/left").
  local function next_chat_line(c)
    while true do
      local line = helper.line(c)
      if line:sub(1, 2) ~= "* " then return line end
    end
  end

  it("delivers a line from one client to every other client, on both workers", function()
    local before = server:stats().workers
    local a, an = join()
    local b, bn = join()
    local c, cn = join()
    local after = server:stats().workers
    assert.is_true(after[1].accepted > before[1].accepted, "no client on worker 1")
    assert.is_true(after[2].accepted > before[2].accepted, "no client on worker 2")
    expect_lines(a, { ("* %s joined"):format(bn), ("* %s joined"):format(cn) })
    expect_line(b, ("* %s joined"):format(cn))

    assert(a:send("hello from a\n"))
    assert.are.equal(an .. ": hello from a", next_chat_line(b))
    assert.are.equal(an .. ": hello from a", next_chat_line(c))
    -- a does not get its own line back: the next chat line it reads is b's.
    assert(b:send("hi a\r\n"))
    assert.are.equal(bn .. ": hi a", next_chat_line(a))
    assert.are.equal(bn .. ": hi a", next_chat_line(c))
  end)

  it("joins a line split over writes and keeps one sender's lines in order", function()
    local a, an = join()
    local b = join()                                   -- on the other worker
    assert(a:send("par"))
    socket.sleep(0.05)
    assert(a:send("tial line\n"))
    assert.are.equal(an .. ": partial line", next_chat_line(b))

    local lines = {}
    for i = 1, 200 do lines[i] = ("line %d"):format(i) end
    assert(a:send(table.concat(lines, "\n") .. "\n"))
    for i = 1, 200 do assert.are.equal(an .. ": " .. lines[i], next_chat_line(b)) end
  end)

  it("announces a client that leaves, and the others go on", function()
    local a = join()
    local b, bn = join()
    local c, cn = join()
    expect_line(a, ("* %s joined"):format(cn))
    b:close()
    expect_line(a, ("* %s left"):format(bn))
    expect_line(c, ("* %s left"):format(bn))
    assert(c:send("still here\n"))
    assert.are.equal(cn .. ": still here", next_chat_line(a))
  end)

  it("ends a connection whose line grows over 4 KiB, and only that one", function()
    local a = join()
    local b, bn = join()
    assert(b:send(("x"):rep(5000)))
    expect_line(b, "* line too long, bye")
    assert.is_true(closed(b))
    expect_line(a, ("* %s left"):format(bn))
    local c, cn = join()
    assert(c:send("after\n"))
    assert.are.equal(cn .. ": after", next_chat_line(a))
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
local OK, NIL = "+OK\r\n", "$-1\r\n"
local NOT_INTEGER = "-ERR value is not an integer or out of range\r\n"

describe("examples/kv.lua with 2 workers", function()
  local server, port, c
  setup(function()
    server, port = helper.server{ workers = 2, dispatch = "queue", handler = "examples.kv",
                                  config = { capacity = 64 * 1024 * 1024 } }
  end)
  teardown(function() server:stop() end)

  local function call(conn, ...)
    assert(conn:send(resp(...)))
    return read_reply(conn)
  end

  before_each(function()
    c = client(port)
    assert.are.equal(OK, call(c, "FLUSHALL"))
  end)

  it("PING and ECHO, binary-safe", function()
    assert.are.equal("+PONG\r\n", call(c, "PING"))
    assert.are.equal(bulk("hi"), call(c, "PING", "hi"))
    local bytes = "a\0b\r\nc\255"
    assert.are.equal(bulk(bytes), call(c, "ECHO", bytes))
    assert.are.equal(bulk(""), call(c, "ECHO", ""))
  end)

  it("SET, GET, DEL and EXISTS, with binary keys and values", function()
    local key, value = "k\0\r\n", "v\0\r\n\0"
    assert.are.equal(OK, call(c, "SET", key, value))
    assert.are.equal(bulk(value), call(c, "GET", key))
    assert.are.equal(NIL, call(c, "GET", "missing"))
    assert.are.equal(OK, call(c, "set", "other", "42"))          -- any case
    assert.are.equal(bulk("42"), call(c, "GET", "other"))
    assert.are.equal(int(3), call(c, "EXISTS", key, "missing", "other", key))
    assert.are.equal(int(2), call(c, "DEL", key, "missing", "other"))
    assert.are.equal(NIL, call(c, "GET", key))
    assert.are.equal(int(0), call(c, "EXISTS", key))
  end)

  it("SET NX and XX", function()
    assert.are.equal(OK, call(c, "SET", "k", "first", "NX"))
    assert.are.equal(NIL, call(c, "SET", "k", "second", "nx"))
    assert.are.equal(bulk("first"), call(c, "GET", "k"))
    assert.are.equal(OK, call(c, "SET", "k", "third", "XX"))
    assert.are.equal(bulk("third"), call(c, "GET", "k"))
    assert.are.equal(NIL, call(c, "SET", "absent", "v", "XX"))
    assert.are.equal(NIL, call(c, "GET", "absent"))
  end)

  it("SET EX and PX, TTL, PTTL and EXPIRE, and keys that expire", function()
    assert.are.equal(OK, call(c, "SET", "ex", "v", "EX", "100"))
    assert.are.equal(int(100), call(c, "TTL", "ex"))
    assert.are.equal(OK, call(c, "SET", "px", "v", "PX", "80", "NX"))
    local left = tonumber(call(c, "PTTL", "px"):match("^:(%d+)"))
    assert.is_true(left > 0 and left <= 80, "PTTL " .. tostring(left))
    assert.is_truthy(helper.eventually(function() return call(c, "GET", "px") == NIL end))
    assert.are.equal(int(-2), call(c, "TTL", "px"))

    assert.are.equal(OK, call(c, "SET", "plain", "v"))
    assert.are.equal(int(-1), call(c, "TTL", "plain"))
    assert.are.equal(int(1), call(c, "EXPIRE", "plain", "10"))
    assert.are.equal(int(10), call(c, "TTL", "plain"))
    assert.are.equal(int(0), call(c, "EXPIRE", "missing", "10"))
    assert.are.equal(int(1), call(c, "EXPIRE", "plain", "0"))     -- 0 deletes
    assert.are.equal(NIL, call(c, "GET", "plain"))
    -- A SET without EX clears the time to live.
    assert.are.equal(OK, call(c, "SET", "ex", "w"))
    assert.are.equal(int(-1), call(c, "TTL", "ex"))
  end)

  it("refuses bad SET options and times with Redis's messages", function()
    assert.are.equal("-ERR invalid expire time in 'set' command\r\n",
      call(c, "SET", "k", "v", "EX", "0"))
    assert.are.equal("-ERR invalid expire time in 'set' command\r\n",
      call(c, "SET", "k", "v", "PX", "-5"))
    assert.are.equal(NOT_INTEGER, call(c, "SET", "k", "v", "EX", "soon"))
    assert.are.equal("-ERR syntax error\r\n", call(c, "SET", "k", "v", "FOREVER"))
    assert.are.equal("-ERR syntax error\r\n", call(c, "SET", "k", "v", "EX", "1", "PX", "1"))
    assert.are.equal("-ERR syntax error\r\n", call(c, "SET", "k", "v", "NX", "XX"))
    assert.are.equal(NOT_INTEGER, call(c, "EXPIRE", "k", "later"))
    assert.are.equal(NIL, call(c, "GET", "k"))                   -- none of them stored
  end)

  it("INCR and INCRBY, atomic across workers, with their errors", function()
    assert.are.equal(int(1), call(c, "INCR", "n"))
    assert.are.equal(int(42), call(c, "INCRBY", "n", "41"))
    assert.are.equal(int(40), call(c, "INCRBY", "n", "-2"))
    assert.are.equal(bulk("40"), call(c, "GET", "n"))
    assert.are.equal(OK, call(c, "SET", "s", "abc"))
    assert.are.equal(NOT_INTEGER, call(c, "INCR", "s"))
    assert.are.equal(OK, call(c, "SET", "f", "1.5"))
    assert.are.equal(NOT_INTEGER, call(c, "INCR", "f"))
    assert.are.equal(NOT_INTEGER, call(c, "INCRBY", "n", "1.5"))
    assert.are.equal(OK, call(c, "SET", "max", "9223372036854775807"))
    assert.are.equal("-ERR increment or decrement would overflow\r\n", call(c, "INCR", "max"))
    assert.are.equal(bulk("9223372036854775807"), call(c, "GET", "max"))

    -- Two clients on the two workers, 200 pipelined INCRs each.
    local d = client(port)
    local burst = resp("INCR", "shared"):rep(200)
    assert(c:send(burst))
    assert(d:send(burst))
    for _ = 1, 200 do read_reply(c); read_reply(d) end
    assert.are.equal(bulk("400"), call(c, "GET", "shared"))
  end)

  it("DBSIZE and FLUSHALL", function()
    for i = 1, 5 do assert.are.equal(OK, call(c, "SET", "key" .. i, i)) end
    assert.are.equal(int(5), call(c, "DBSIZE"))
    assert.are.equal(OK, call(c, "FLUSHALL"))
    assert.are.equal(int(0), call(c, "DBSIZE"))
    assert.are.equal(NIL, call(c, "GET", "key1"))
  end)

  it("answers unknown commands and wrong arities, and the connection goes on", function()
    assert.are.equal("-ERR unknown command 'NOPE', with args beginning with: 'a' 'b'\r\n",
      call(c, "NOPE", "a", "b"))
    assert.are.equal("-ERR wrong number of arguments for 'get' command\r\n", call(c, "GET"))
    assert.are.equal("-ERR wrong number of arguments for 'set' command\r\n", call(c, "SET", "k"))
    assert.are.equal("-ERR wrong number of arguments for 'incr' command\r\n", call(c, "INCR"))
    assert.are.equal("-ERR wrong number of arguments for 'dbsize' command\r\n",
      call(c, "DBSIZE", "x"))
    assert.are.equal("+PONG\r\n", call(c, "PING"))
  end)

  it("closes the connection after a protocol error, with its message", function()
    assert(c:send(resp("PING") .. "*1\r\n:5\r\n" .. resp("PING")))
    assert.are.equal("+PONG\r\n", read_reply(c))
    assert.are.equal("-ERR Protocol error: expected '$', got ':'\r\n", read_reply(c))
    assert.is_true(closed(c))
    local d = client(port)
    assert(d:send("*x\r\n"))
    assert.are.equal("-ERR Protocol error: invalid multibulk length\r\n", read_reply(d))
  end)

  it("answers 500 pipelined requests in one write, in order", function()
    local requests, expected = {}, {}
    for i = 1, 500 do
      if i % 2 == 1 then
        requests[i], expected[i] = resp("SET", "p" .. i, "v" .. i), OK
      else
        requests[i], expected[i] = resp("GET", "p" .. (i - 1)), bulk("v" .. (i - 1))
      end
    end
    assert(c:send(table.concat(requests)))
    for i = 1, 500 do assert.are.equal(expected[i], read_reply(c)) end
  end)

  it("parses requests split anywhere, byte by byte", function()
    c:setoption("tcp-nodelay", true)
    local request = resp("SET", "split", "a value\r\nwith CRLF") .. resp("GET", "split")
    for i = 1, #request do
      assert(c:send(request:sub(i, i)))
      if i % 5 == 0 then socket.sleep(0.001) end
    end
    assert.are.equal(OK, read_reply(c))
    assert.are.equal(bulk("a value\r\nwith CRLF"), read_reply(c))
  end)

  it("takes a 2 MiB value in 64 KiB writes, and refuses one too big to store", function()
    local value = ("0123456789abcdef"):rep(128 * 1024)                -- 2 MiB
    local request = resp("SET", "big", value)
    for i = 1, #request, 65536 do assert(c:send(request, i, math.min(i + 65535, #request))) end
    assert.are.equal(OK, read_reply(c))
    assert(c:send(resp("GET", "big")))
    assert.are.equal(bulk(value), read_reply(c))
    -- 64 MiB over 16 stripes: nothing over 4 MiB fits.
    assert.are.equal("-OOM command not allowed when used memory > 'maxmemory'.\r\n",
      call(c, "SET", "huge", value:rep(3)))
    assert.are.equal(NIL, call(c, "GET", "huge"))
  end)

  it("shares the keys between workers and with the main state", function()
    local d = client(port)                             -- the other worker
    assert.are.equal(OK, call(c, "SET", "greeting", "hello"))
    assert.are.equal(bulk("hello"), call(d, "GET", "greeting"))
    local db = multiloop.shared("kv")
    assert.are.equal("hello", db:get("greeting"))
    db:set("from main", 7)
    assert.are.equal(bulk("7"), call(d, "GET", "from main"))
  end)

  it("understands inline commands, as typed into telnet", function()
    assert(c:send("PING\r\nSET inline  value\r\nGET inline\n"))
    assert.are.equal("+PONG\r\n", read_reply(c))
    assert.are.equal(OK, read_reply(c))
    assert.are.equal(bulk("value"), read_reply(c))
  end)

  it("works with redis-cli #child", function()
    local probe = io.popen("command -v redis-cli")
    local found = probe:read("a")
    probe:close()
    if found == "" then
      pending("redis-cli is not installed (Debian: redis-tools)")
      return
    end
    -- Without the sanitizer runtime this process may have preloaded.
    local function cli(args, stdin)
      local input = os.tmpname()
      helper.defer(function() os.remove(input) end)
      local f = assert(io.open(input, "w"))
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
    assert.are.equal("60\n", cli("TTL city"))
    assert.are.equal("5\n", cli("INCRBY visits 5"))
    assert.are.equal("2\n", cli("DBSIZE"))
    assert.are.equal("(nil)\n", cli("--no-raw GET nothing"))
    -- (redis-cli prints an error reply, then an empty line)
    assert.are.equal("ERR value is not an integer or out of range", cli("INCR city"):match("^[^\n]*"))
    -- Commands read from stdin, all through one connection.
    assert.are.equal("OK\nOK\nb\n", cli("", "SET a 1\nSET b b\nGET b\n"))
  end)
end)

-- ---------------------------------------------------------------------------

describe("examples/stats_counter.lua", function()
  it("counts every connection in a shared dictionary that the main state reads", function()
    local stats_counter = require("examples.stats_counter")
    local stats = multiloop.shared("stats")        -- held here: counts survive the server
    stats:flush()
    local server, port = helper.server{ workers = 2, dispatch = "queue",
                                        handler = "examples.stats_counter" }
    helper.defer(function() server:stop() end)
    for i = 1, 10 do
      local c = client(port)
      local n, w = helper.line(c):match("^you are visitor #(%d+) %(served by worker (%d)%)$")
      assert.are.equal(i, tonumber(n))
      assert.are.equal(i % 2 == 1 and 1 or 2, tonumber(w))     -- round-robin from worker 1
      assert.is_true(closed(c))                               -- and it closes
      c:close()
    end
    local total, per = stats_counter.report(2)
    assert.are.equal(10, total)
    assert.are.same({ 5, 5 }, per)
    server:stop()
    assert.are.equal(10, stats:get("connections"))
  end)
end)
