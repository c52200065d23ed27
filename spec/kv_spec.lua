-- spec/kv_spec.lua: examples/kv.lua, the Redis protocol (RESP2) server over
-- a shared dictionary, driven over the wire on 127.0.0.1, each test with a
-- server of its own (2 workers, dispatch "queue", round-robin, so that
-- clients that connect one after another land on alternate workers):
--   raw RESP over LuaSocket: every command, its nil, integer, array and
--     error replies in Redis 7.0's bytes (checked against redis-server
--     7.0.15), pipelining, requests split anywhere or in many reads,
--     large values, binary-safe keys and values, inline commands;
--   real clients (#child, they run as child processes): redis-cli (--raw,
--     --no-raw, commands from stdin, --pipe) and redis-benchmark's run of
--     the commands it has; and, where redis-server is installed, the same
--     requests sent to both, every reply compared byte for byte.
local helper = require("spec.helper")
local socket = require("socket")
local multiloop = require("multiloop")

local ex = require("spec.example_server")
local serve, stop_server, client, closed = ex.serve, ex.stop, ex.client, ex.closed
local send_apart, expect_spread = ex.send_apart, ex.expect_spread

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

local WRONGTYPE = "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
local NOT_POSITIVE = "-ERR value is out of range, must be positive\r\n"
local function array(...) return ("*%d\r\n"):format(select("#", ...)) .. table.concat({ ... }) end

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

-- The elements of an array of bulk strings, sorted (KEYS has no order).
local function sorted_elements(reply)
  local n, pos = reply:match("^%*(%d+)\r\n()")
  assert(n, "not an array: " .. reply)
  local out = {}
  for i = 1, tonumber(n) do
    local len, at = reply:match("^%$(%d+)\r\n()", pos)
    out[i] = reply:sub(at, at + tonumber(len) - 1)
    pos = at + tonumber(len) + 2
  end
  table.sort(out)
  return out
end

describe("examples/kv.lua with 2 workers", function()
  after_each(stop_server)

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

  it("answers in order when a client alternates single requests and bursts", function()
    -- Replies go out at once or collected (examples/kv.lua's kv.serve): a
    -- client that switches between the two must see every reply in order.
    local c = start()
    local n = 0
    for round = 1, 120 do
      local burst = round % 7 == 0 and 40 or round % 3
      local want = {}
      for _ = 0, burst do                     -- burst + 1 requests in one write
        n = n + 1
        want[#want + 1] = n
      end
      assert(c:send(resp("INCR", "order"):rep(#want)))
      for _, v in ipairs(want) do assert.are.equal(int(v), read_reply(c)) end
    end
    assert.are.equal(bulk(tostring(n)), call(c, "GET", "order"))
  end)

  it("ends a request line longer than receive_limit with a protocol error", function()
    dict_names = dict_names + 1
    dict = ("spec kv %d"):format(dict_names)
    serve{ handler = "examples.kv", receive_limit = 1024, config = { name = dict } }
    local cases = {
      { ("x"):rep(2000), "too big inline request" },
      { "*" .. ("1"):rep(2000), "invalid multibulk length" },
      { "*1\r\n$" .. ("1"):rep(2000), "invalid bulk length" },
    }
    for _, case in ipairs(cases) do
      local c = client()
      assert.are.equal("+PONG\r\n", call(c, "PING"))
      assert(c:send(case[1]))                 -- and no end of line
      assert.are.equal(("-ERR Protocol error: %s\r\n"):format(case[2]), read_reply(c))
      assert.is_true(closed(c))
    end
  end)

  it("stops, at once and gracefully, with clients mid-pipeline that read nothing", function()
    -- Their replies wait in send or in the thread that sends them together;
    -- every light thread must end with the server.
    for _, graceful in ipairs({ false, true }) do
      start()
      local value = ("v"):rep(60000)
      local cs = { client(), client(), client(), client() }
      for _, c in ipairs(cs) do
        assert.are.equal(OK, call(c, "SET", "big", value))
        c:settimeout(0.2)
        c:send(resp("GET", "big"):rep(300))  -- 18 MB of replies: more than the sockets hold
      end
      socket.sleep(0.2)
      local server = ex.server
      ex.server = nil
      assert.is_true(server:stop(graceful and { timeout = 300 } or nil))
      assert.are.equal(0, server:stats().threads)
      assert.are.equal(0, server:stats().active)
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

  it("MSET, MGET, SETNX, GETSET, APPEND and STRLEN, as Redis answers them", function()
    local c = start()
    assert.are.equal(OK, call(c, "MSET", "a", "1", "b", "two", "a", "3"))   -- the last wins
    assert.are.equal(array(bulk("3"), bulk("two"), NIL), call(c, "MGET", "a", "b", "nope"))
    assert.are.equal(int(4), call(c, "INCR", "a"))                          -- stored as an integer
    assert.are.equal(int(0), call(c, "SETNX", "a", "x"))
    assert.are.equal(int(1), call(c, "SETNX", "n", "v"))
    assert.are.equal(bulk("v"), call(c, "GETSET", "n", "w"))
    assert.are.equal(NIL, call(c, "GETSET", "fresh", "1"))
    assert.are.equal(bulk("w"), call(c, "GET", "n"))
    assert.are.equal(int(4), call(c, "APPEND", "n", "\0\r\n"))
    assert.are.equal(bulk("w\0\r\n"), call(c, "GET", "n"))
    assert.are.equal(int(3), call(c, "APPEND", "new", "xyz"))
    -- An integer's text grows, and the result is an integer again.
    assert.are.equal(int(2), call(c, "APPEND", "a", "0"))
    assert.are.equal(int(41), call(c, "INCR", "a"))
    assert.are.equal(int(2), call(c, "STRLEN", "a"))
    assert.are.equal(int(4), call(c, "STRLEN", "n"))
    assert.are.equal(int(0), call(c, "STRLEN", "nope"))
    -- APPEND keeps the time to live.
    assert.are.equal(OK, call(c, "SET", "t", "x", "EX", "100"))
    assert.are.equal(int(2), call(c, "APPEND", "t", "y"))
    assert.is_true(int_of(call(c, "TTL", "t")) >= 99)
    for _, args in ipairs({ { "mset" }, { "mset", "a" }, { "mset", "a", "1", "b" }, { "mget" },
        { "setnx", "a" }, { "getset", "a" }, { "append", "a" }, { "strlen" } }) do
      assert.are.equal(arity(args[1]), call(c, args[1]:upper(), table.unpack(args, 2)))
    end
  end)

  it("LPUSH, RPUSH (variadic), LPOP, RPOP (with a count), LLEN and LRANGE", function()
    local c = start()
    assert.are.equal(int(3), call(c, "LPUSH", "l", "x", "y", "z"))
    assert.are.equal(int(5), call(c, "RPUSH", "l", "a", "b\0\r\n"))
    assert.are.equal(int(5), call(c, "LLEN", "l"))
    assert.are.equal(int(0), call(c, "LLEN", "nope"))
    local all = array(bulk("z"), bulk("y"), bulk("x"), bulk("a"), bulk("b\0\r\n"))
    assert.are.equal(all, call(c, "LRANGE", "l", "0", "-1"))
    assert.are.equal(all, call(c, "LRANGE", "l", "-100", "100"))
    assert.are.equal(all, call(c, "LRANGE", "l", "-9223372036854775808", "9223372036854775807"))
    assert.are.equal(array(bulk("a"), bulk("b\0\r\n")), call(c, "LRANGE", "l", "-2", "-1"))
    assert.are.equal(array(bulk("y"), bulk("x")), call(c, "LRANGE", "l", "1", "2"))
    assert.are.equal("*0\r\n", call(c, "LRANGE", "l", "5", "10"))
    assert.are.equal("*0\r\n", call(c, "LRANGE", "l", "2", "1"))
    assert.are.equal("*0\r\n", call(c, "LRANGE", "l", "9223372036854775807", "-9223372036854775808"))
    assert.are.equal("*0\r\n", call(c, "LRANGE", "nope", "0", "-1"))
    assert.are.equal(NOT_INTEGER, call(c, "LRANGE", "l", "x", "1"))
    assert.are.equal(NOT_INTEGER, call(c, "LRANGE", "l", "0", "9223372036854775808"))
    assert.are.equal(bulk("z"), call(c, "LPOP", "l"))
    assert.are.equal(bulk("b\0\r\n"), call(c, "RPOP", "l"))
    assert.are.equal(array(bulk("y"), bulk("x")), call(c, "LPOP", "l", "2"))
    assert.are.equal("*0\r\n", call(c, "LPOP", "l", "0"))
    for _, bad in ipairs({ "-1", "x", "1.5", "+1", "01", "9223372036854775808" }) do
      assert.are.equal(NOT_POSITIVE, call(c, "LPOP", "l", bad))
    end
    assert.are.equal(array(bulk("a")), call(c, "RPOP", "l", "10"))   -- fewer than asked
    -- The last pop removed the list.
    assert.are.equal(int(0), call(c, "EXISTS", "l"))
    assert.are.equal(NIL, call(c, "LPOP", "l"))
    assert.are.equal("*-1\r\n", call(c, "LPOP", "l", "2"))
    assert.are.equal("*-1\r\n", call(c, "RPOP", "nope", "0"))
    for _, args in ipairs({ { "lpush" }, { "lpush", "l" }, { "rpush", "l" }, { "lpop" },
        { "lpop", "l", "1", "2" }, { "rpop" }, { "llen" }, { "lrange", "l", "0" } }) do
      assert.are.equal(arity(args[1]), call(c, args[1]:upper(), table.unpack(args, 2)))
    end
  end)

  it("keeps strings and lists apart: TYPE, and WRONGTYPE from every command of the other kind", function()
    local c = start()
    assert.are.equal(int(2), call(c, "RPUSH", "list", "1", "2"))
    assert.are.equal(OK, call(c, "SET", "str", "1"))
    assert.are.equal("+list\r\n", call(c, "TYPE", "list"))
    assert.are.equal("+string\r\n", call(c, "TYPE", "str"))
    assert.are.equal("+none\r\n", call(c, "TYPE", "nope"))
    assert.are.equal(arity("type"), call(c, "TYPE"))
    for _, args in ipairs({ { "GET" }, { "GETSET", "v" }, { "APPEND", "v" }, { "STRLEN" },
        { "INCR" }, { "DECR" }, { "INCRBY", "2" }, { "DECRBY", "2" } }) do
      assert.are.equal(WRONGTYPE, call(c, args[1], "list", table.unpack(args, 2)))
    end
    for _, args in ipairs({ { "LPUSH", "v" }, { "RPUSH", "v" }, { "LPOP" }, { "RPOP" },
        { "LPOP", "0" }, { "LLEN" }, { "LRANGE", "0", "1" } }) do
      assert.are.equal(WRONGTYPE, call(c, args[1], "str", table.unpack(args, 2)))
    end
    -- Not errors: MGET gives nil for a list, SETNX 0; EXISTS, EXPIRE, TTL
    -- and DEL take either kind, and SET replaces a list.
    assert.are.equal(array(NIL, bulk("1")), call(c, "MGET", "list", "str"))
    assert.are.equal(int(0), call(c, "SETNX", "list", "v"))
    assert.are.equal(int(2), call(c, "EXISTS", "list", "str"))
    assert.are.equal(int(1), call(c, "EXPIRE", "list", "100"))
    assert.are.equal(int(100), call(c, "TTL", "list"))
    assert.are.equal(array(bulk("1"), bulk("2")), call(c, "LRANGE", "list", "0", "-1"))
    assert.are.equal(OK, call(c, "SET", "list", "now a string"))
    assert.are.equal("+string\r\n", call(c, "TYPE", "list"))
    assert.are.equal(int(-1), call(c, "TTL", "list"))
    assert.are.equal(int(2), call(c, "DEL", "list", "str"))
  end)

  it("KEYS matches Redis's glob patterns: *, ?, classes, ranges and escapes", function()
    local c = start()
    local keys = { "hello", "hallo", "hxllo", "hllo", "heeeello", "h*llo", "h?llo", "h[a]llo",
      "a\\b", "a-b", "", "x\0y", "\200", "]", "^" }
    for _, k in ipairs(keys) do assert.are.equal(OK, call(c, "SET", k, "1")) end
    local cases = {                              -- what redis-server 7.0.15 answers
      ["*"] = keys, ["**"] = { "hello", "hallo", "hxllo", "hllo", "heeeello", "h*llo", "h?llo",
        "h[a]llo", "a\\b", "a-b", "x\0y", "\200", "]", "^" },
      [""] = { "" },
      ["h?llo"] = { "hello", "hallo", "hxllo", "h*llo", "h?llo" },
      ["h*llo"] = { "hello", "hallo", "hxllo", "hllo", "heeeello", "h*llo", "h?llo", "h[a]llo" },
      ["h[ae]llo"] = { "hello", "hallo" },
      ["h[^e]llo"] = { "hallo", "hxllo", "h*llo", "h?llo" },
      ["h[a-b]llo"] = { "hallo" },
      ["h[b-a]llo"] = { "hallo" },                 -- a range's ends in either order
      ["h\\*llo"] = { "h*llo" },
      ["h[\\?]llo"] = { "h?llo" },
      ["h\\[a\\]llo"] = { "h[a]llo" },
      ["a\\\\b"] = { "a\\b" },
      ["a[-]b"] = { "a-b" },
      ["x?y"] = { "x\0y" },
      ["x\0y"] = { "x\0y" },
      ["[\128-\255]"] = { "\200" },                -- bytes compare as C's signed chars:
      ["[\1-\255]"] = {},                          -- -1 to 1
      ["[a-]"] = { "]", "^" },                     -- the range "]" to "a"
      ["[\\]"] = { "]" },
      ["[]"] = {},
      ["[]]"] = {},                                -- "]" closes at once: an empty class
      ["[^]"] = { "\200", "]", "^" },
      ["[^"] = { "\200", "]", "^" },
      ["h[el"] = {},                               -- unclosed: runs to the end
      ["hel[l"] = {},
      ["hell[o"] = { "hello" },
      ["\\"] = {},
      ["^"] = { "^" },
    }
    for pattern, want in pairs(cases) do
      local expected = { table.unpack(want) }
      table.sort(expected)
      assert.are.same(expected, sorted_elements(call(c, "KEYS", pattern)), ("pattern %q"):format(pattern))
    end
    assert.are.equal(arity("keys"), call(c, "KEYS"))
    assert.are.equal(arity("keys"), call(c, "KEYS", "a", "b"))
  end)

  it("KEYS stays fast on patterns built to backtrack, and stops nesting at 1000 stars, as Redis", function()
    local c = start()
    local long = ("a"):rep(5000)
    assert.are.equal(OK, call(c, "SET", long, "1"))
    assert.are.equal(OK, call(c, "SET", ("a"):rep(1200), "1"))
    local t0 = socket.gettime()
    assert.are.equal("*0\r\n", call(c, "KEYS", ("*a"):rep(500) .. "*b"))
    assert.are.equal("*0\r\n", call(c, "KEYS", ("a*"):rep(40) .. "b"))
    assert.are.equal("*0\r\n", call(c, "KEYS", ("?"):rep(4000) .. "*b"))
    -- Naive backtracking takes about 5000^40 steps on the second one.
    assert.is_true(socket.gettime() - t0 < 2, "KEYS took " .. (socket.gettime() - t0) .. " s")
    -- "a*" 1001 times nests 1000 deep and matches; 1002 times is refused.
    assert.are.equal(2, #sorted_elements(call(c, "KEYS", ("a*"):rep(1001))))
    assert.are.equal("*0\r\n", call(c, "KEYS", ("a*"):rep(1002)))
  end)

  it("SELECT 0 and nothing else; INFO's Server section; CONFIG GET and HELP", function()
    local c = start()
    assert.are.equal(OK, call(c, "SELECT", "0"))
    for _, n in ipairs({ "1", "15", "16", "-1", "2147483647" }) do
      assert.are.equal("-ERR DB index is out of range\r\n", call(c, "SELECT", n))
    end
    for _, n in ipairs({ "2147483648", "-2147483649", "9999999999" }) do
      assert.are.equal("-ERR value is out of range, value must between -2147483648 and 2147483647\r\n",
        call(c, "SELECT", n))
    end
    for _, n in ipairs({ "x", "00", "-0", " 1", "1.0" }) do
      assert.are.equal(NOT_INTEGER, call(c, "SELECT", n))
    end
    assert.are.equal(arity("select"), call(c, "SELECT"))
    assert.are.equal(arity("select"), call(c, "SELECT", "0", "1"))

    local info = call(c, "INFO")
    local len, body = info:match("^%$(%d+)\r\n(.*)\r\n$")
    assert.are.equal(#body, tonumber(len))
    assert.are.equal("# Server\r\n", body:sub(1, 10))
    assert.is_truthy(body:find("\r\nredis_version:7%.0%.0\r\n"))
    assert.is_truthy(body:find("\r\nredis_mode:standalone\r\n"))
    assert.is_truthy(body:find("\r\ntcp_port:" .. ex.port .. "\r\n", 1, true))
    assert.is_truthy(body:find("\r\nprocess_id:" .. helper.pid() .. "\r\n", 1, true))
    for line in body:gmatch("(.-)\r\n") do
      assert.is_truthy(line == "# Server" or line:match("^[%w_]+:[^\r\n]*$"), line)
    end
    assert.are.equal(info, call(c, "INFO", "server"))
    assert.are.equal(info, call(c, "info", "SERVER", "nosuch"))
    assert.are.equal("$0\r\n\r\n", call(c, "INFO", "nosuch"))

    local save, appendonly = bulk("save") .. bulk(""), bulk("appendonly") .. bulk("no")
    assert.are.equal("*2\r\n" .. save, call(c, "CONFIG", "GET", "save"))
    assert.are.equal("*2\r\n" .. appendonly, call(c, "config", "get", "appendonly"))
    -- (in the order asked; Redis's is its hash table's, which varies by run)
    assert.are.equal("*4\r\n" .. save .. appendonly, call(c, "CONFIG", "GET", "save", "appendonly"))
    assert.are.equal("*2\r\n" .. save, call(c, "CONFIG", "GET", "save", "save"))
    assert.are.equal("*2\r\n" .. bulk("SAVE") .. bulk(""), call(c, "CONFIG", "GET", "SAVE"))
    assert.are.equal("*2\r\n" .. appendonly, call(c, "CONFIG", "GET", "APPEND*"))
    assert.are.equal("*2\r\n" .. bulk("databases") .. bulk("1"), call(c, "CONFIG", "GET", "databases"))
    assert.are.equal("*2\r\n" .. bulk("maxmemory") .. bulk(tostring(64 * 1024 * 1024)),
      call(c, "CONFIG", "GET", "maxmemory"))
    assert.are.equal("*0\r\n", call(c, "CONFIG", "GET", "nosuch"))
    assert.are.equal(10, #sorted_elements(call(c, "CONFIG", "GET", "*")))
    assert.are.equal(arity("config|get"), call(c, "CONFIG", "GET"))
    assert.are.equal(arity("config"), call(c, "CONFIG"))
    assert.are.equal("-ERR unknown subcommand 'foo'. Try CONFIG HELP.\r\n", call(c, "config", "foo", "x"))
    assert.are.equal("-ERR unknown subcommand 'SET'. Try CONFIG HELP.\r\n",
      call(c, "CONFIG", "SET", "save", ""))
    local help = call(c, "CONFIG", "HELP")
    assert.is_truthy(help:find("^%*5\r\n%+CONFIG <subcommand> "))
    assert.is_truthy(help:find("\r\n+GET <pattern>\r\n", 1, true))
    assert.are.equal(arity("config|help"), call(c, "CONFIG", "HELP", "x"))
  end)
end)

-- ---------------------------------------------------------------------------

-- Whether a program is installed.
local function installed(name)
  local probe = io.popen("command -v " .. name)
  local found = probe:read("a")
  probe:close()
  return found ~= ""
end

-- Runs a shell command line without the sanitizer runtime this process may
-- have preloaded, with stdin from a file holding `stdin`; its output (stdout
-- and stderr) and exit status.
local function run(cmd, stdin)
  local input = os.tmpname()
  helper.defer(function() os.remove(input) end)
  local f = assert(io.open(input, "wb"))
  f:write(stdin or "")
  f:close()
  local p = assert(io.popen(("env -u LD_PRELOAD %s < %s 2>&1"):format(cmd, input)))
  local out = p:read("a")
  local _, _, status = p:close()
  return out, status
end

describe("examples/kv.lua with real clients #child", function()
  after_each(stop_server)

  it("answers redis-cli, formatted (--no-raw) and raw, one command or many from stdin", function()
    if not installed("redis-cli") then
      pending("redis-cli is not installed (Debian: redis-tools)")
      return
    end
    start()
    local function cli(args, stdin)
      return (run(("timeout 10 redis-cli -p %d %s"):format(ex.port, args), stdin))
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
    assert.are.equal("(integer) 3\n", cli("--no-raw RPUSH list a 'b c' ''"))
    assert.are.equal('1) "a"\n2) "b c"\n3) ""\n', cli("--no-raw LRANGE list 0 -1"))
    assert.are.equal("a\nb c\n\n", cli("--raw LRANGE list 0 -1"))
    assert.are.equal("(empty array)\n", cli("--no-raw LRANGE nothing 0 -1"))
    assert.are.equal("(nil)\n", cli("--no-raw LPOP nothing 2"))
    assert.are.equal("list\n", cli("--no-raw TYPE list"))
    assert.are.equal("OK\n", cli("--no-raw MSET k1 v1 k2 v2"))
    assert.are.equal('1) "v1"\n2) (nil)\n3) "v2"\n4) (nil)\n', cli("--no-raw MGET k1 nothing k2 list"))
    assert.are.equal('1) "save"\n2) ""\n', cli("--no-raw CONFIG GET save"))
    assert.are.equal("(error) WRONGTYPE Operation against a key holding the wrong kind of value\n",
      cli("--no-raw GET list"))
    assert.are.equal("(error) ERR DB index is out of range\n", cli("--no-raw SELECT 1"))
    assert.are.equal("PONG\n", cli("-n 0 PING"))            -- redis-cli sends SELECT 0 first
    -- (--raw prints the bulk string as it is, with its CRLFs)
    assert.are.equal("# Server\r\nredis_version:7.0.0\r\n", cli("--raw INFO server"):match("^[^\n]*\n[^\n]*\n"))
    -- (redis-cli --raw prints an error reply, then an empty line)
    assert.are.equal("ERR value is not an integer or out of range\n\n", cli("--raw INCR city"))
    assert.are.equal("(error) ERR unknown command 'NOPE', with args beginning with: 'x' \n",
      cli("--no-raw NOPE x"))
    -- Commands read from stdin, all through one connection.
    assert.are.equal("OK\nOK\nb\n", cli("", "SET a 1\nSET b b\nGET b\n"))
    assert.are.equal('(integer) 3\n(integer) 3\n1) "1"\n2) "2"\n',
      cli("--no-raw", "LPUSH q 1 2 3\nLLEN q\nRPOP q 2\n"))
    -- --pipe: raw requests, pipelined, then an ECHO of its own to know the end.
    local batch = {}
    for i = 1, 100 do batch[i] = resp("INCR", "piped") end
    local out = cli("--pipe", table.concat(batch))
    assert.is_truthy(out:find("errors: 0, replies: 100", 1, true), out)
    assert.are.equal("100\n", cli("GET piped"))
  end)

  it("runs redis-benchmark's tests of the commands it has to the end, without an error", function()
    if not installed("redis-benchmark") then
      pending("redis-benchmark is not installed (Debian: redis-tools)")
      return
    end
    start()
    -- The issue's run is -n 20000; under valgrind the server answers about
    -- 300 LRANGE_100 a second, so there it is 2,000 requests per test.
    local n = os.getenv("SANITIZER") == "valgrind" and 2000 or 20000
    local out, status = run(("timeout 120 redis-benchmark -p %d -q -n %d "
      .. "-t ping,set,get,incr,lpush,rpush,lpop,rpop,lrange_100,mset"):format(ex.port, n))
    -- Without the "\r"-rewritten progress lines, so a failure shows results.
    assert.are.equal(0, status, (out:gsub("[^\r\n]*rps=[^\r\n]*[\r\n]?", "")))
    -- -q prints each test's progress on one line, rewritten after "\r",
    -- and ends it with its result.
    local tests = {}
    for line in out:gmatch("[^\r\n]+") do
      if line:find("%S") and not line:find("rps=", 1, true) then
        local name = line:match("^(.-): [%d.]+ requests per second, p50=[%d.]+ msec%s*$")
        assert.is_truthy(name, "not a test's result: " .. line)
        tests[#tests + 1] = name
      end
    end
    assert.are.same({ "PING_INLINE", "PING_MBULK", "SET", "GET", "INCR", "LPUSH", "RPUSH",
      "LPOP", "RPOP", "LPUSH (needed to benchmark LRANGE)", "LRANGE_100 (first 100 elements)",
      "MSET (10 keys)" }, tests)
  end)

  it("answers as redis-server 7 does, byte for byte, where the two have the same model", function()
    if not installed("redis-server") then
      pending("redis-server is not installed (Debian: redis-server)")
      return
    end
    -- redis-server on a Unix socket of its own (no TCP port: --port 0),
    -- saving nothing, stopped by its pid.
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -m 700 " .. dir))
    local path = dir .. "/redis.sock"
    local p = assert(io.popen(("exec env -u LD_PRELOAD sh -c 'echo $$; exec redis-server --port 0 "
      .. "--unixsocket %s --save \"\" --appendonly no --dir %s --logfile %s/log' ")
      :format(path, dir, dir)))
    local pid = tonumber(p:read("l"))
    helper.defer(function()
      os.execute(("kill %d"):format(pid))
      p:close()
      os.execute("rm -rf " .. dir)
    end)
    local unix, r = require("socket.unix"), nil
    assert(helper.eventually(function()           -- a failed connect closes the socket
      r = assert(unix.stream())
      if r:connect(path) then return true end
      r:close()
    end, 5000), "redis-server did not start")
    helper.defer(function() r:close() end)
    r:settimeout(helper.TIMEOUT)
    local c = start()
    local requests = {
      { "FLUSHALL" }, { "PING" }, { "PING", "hi" }, { "ECHO", "a\0b" },
      { "SET", "k", "v" }, { "SET", "k", "v", "NX" }, { "SET", "k", "w", "XX" }, { "GET", "k" },
      { "SET", "k", "v", "EX", "0" }, { "SET", "k", "v", "PX", "x" }, { "SET", "k", "v", "NX", "XX" },
      { "MSET", "a", "1", "b", "2" }, { "MSET", "a" }, { "MGET", "a", "b", "c" }, { "MGET" },
      { "SETNX", "a", "x" }, { "SETNX", "c", "3" }, { "GETSET", "c", "4" }, { "GETSET", "d", "5" },
      { "APPEND", "c", "0" }, { "APPEND", "e", "xyz" }, { "STRLEN", "e" }, { "STRLEN", "nope" },
      { "INCR", "c" }, { "INCRBY", "c", "-50" }, { "DECR", "e" }, { "DECRBY", "c", "x" },
      { "SET", "max", "9223372036854775807" }, { "INCR", "max" },
      { "EXISTS", "a", "b", "nope", "a" }, { "DEL", "a", "nope" }, { "TYPE", "b" }, { "TYPE", "nope" },
      { "LPUSH", "l", "x", "y", "z" }, { "RPUSH", "l", "a", "b" }, { "LLEN", "l" },
      { "LRANGE", "l", "0", "-1" }, { "LRANGE", "l", "-3", "100" }, { "LRANGE", "l", "3", "1" },
      { "LRANGE", "l", "x", "1" }, { "LPOP", "l" }, { "RPOP", "l" }, { "LPOP", "l", "2" },
      { "RPOP", "l", "0" }, { "LPOP", "l", "-1" }, { "RPOP", "l", "5" }, { "LPOP", "l" },
      { "LPOP", "l", "2" }, { "LLEN", "l" }, { "TYPE", "l" }, { "RPUSH", "l", "1" }, { "TYPE", "l" },
      { "GET", "l" }, { "APPEND", "l", "x" }, { "INCR", "l" }, { "LPUSH", "b", "x" },
      { "LRANGE", "b", "0", "1" }, { "LPOP", "b", "1" }, { "LLEN", "b" }, { "MGET", "l", "b" },
      { "EXPIRE", "l", "100" }, { "TTL", "l" }, { "PTTL", "nope" }, { "EXPIRE", "nope", "5" },
      { "SELECT", "0" }, { "SELECT", "16" }, { "SELECT", "-1" }, { "SELECT", "x" },
      { "SELECT", "2147483648" }, { "SELECT" },
      { "CONFIG", "GET", "save" }, { "CONFIG", "GET", "appendonly" }, { "CONFIG", "GET", "Save" },
      { "CONFIG", "GET", "appendon*" }, { "CONFIG", "GET", "save", "save" },
      { "CONFIG", "GET", "nosuch" }, { "CONFIG", "GET" }, { "CONFIG" }, { "CONFIG", "FOO", "x" },
      { "INFO", "nosuch" },
      { "FOO" }, { "FOO", "a", "b" }, { "NOSUCH", ("v"):rep(100), ("w"):rep(100) }, { "NO\r\nPE", "a\0b" },
      { "GET" }, { "SET", "k" }, { "LPUSH", "k" }, { "KEYS" }, { "TYPE" }, { "DBSIZE", "x" },
      { "FLUSHALL", "LATER" }, { "DBSIZE" }, { "FLUSHALL" }, { "DBSIZE" },
    }
    for _, args in ipairs(requests) do
      local want = call(r, table.unpack(args))
      assert.are.equal(want, call(c, table.unpack(args)), table.concat(args, " "))
    end
    -- KEYS, over random keys and patterns made of glob characters, NULs
    -- and high bytes (sorted: the order of keys differs).
    local alphabet = { "a", "b", "A", "*", "?", "[", "]", "\\", "^", "-", "\0", "\200", "\255", "0" }
    local seed = 13
    local function random(n)                    -- a small LCG: the same run every time
      seed = (seed * 1103515245 + 12345) % 2147483648
      return seed % n + 1
    end
    local function word(max)
      local t = {}
      for i = 1, random(max + 1) - 1 do t[i] = alphabet[random(#alphabet)] end
      return table.concat(t)
    end
    for _ = 1, 300 do
      local key = word(6)
      assert.are.equal(call(r, "SET", key, "1"), call(c, "SET", key, "1"))
    end
    for _ = 1, 1000 do
      local pattern = word(7)
      assert.are.same(sorted_elements(call(r, "KEYS", pattern)), sorted_elements(call(c, "KEYS", pattern)),
        ("pattern %q"):format(pattern))
    end
  end)
end)
