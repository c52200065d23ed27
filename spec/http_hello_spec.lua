-- examples/http_hello.lua over real sockets: the keep-alive HTTP/1.1
-- responder that `make bench` measures. Raw sockets (LuaSocket) for the
-- wire details: pipelining, heads split byte by byte, bodies (Content-Length
-- and chunked) skipped, HEAD, keep-alive in HTTP/1.0 and 1.1, the Date
-- header, bare LF, Host, conflicting framing and the refusals (400, 431),
-- each with the bytes it sends. Then real clients: ab (apache2-utils), with
-- and without -k, and curl (HTTP/1.0 and 1.1 keep-alive, a chunked upload).
local helper = require("spec.helper")
local socket = require("socket")

-- Every answer carries a Date of fixed length; the expected answers hold
-- this stand-in of the same length, put in by `undated` once it has checked
-- the real one.
local DATE = "Date: Xxx, 00 Xxx 0000 00:00:00 GMT\r\n"
local BODY = "Hello, world!\n"
local HEAD = "HTTP/1.1 200 OK\r\n" .. DATE .. "Content-Type: text/plain\r\nContent-Length: 14\r\n"
local OK = HEAD .. "\r\n" .. BODY
local OK_KA = HEAD .. "Connection: keep-alive\r\n\r\n" .. BODY
local OK_CLOSE = HEAD .. "Connection: close\r\n\r\n" .. BODY
local OK_HEAD = HEAD .. "\r\n"
local BAD = "HTTP/1.1 400 Bad Request\r\n" .. DATE
  .. "Content-Length: 0\r\nConnection: close\r\n\r\n"
local TOO_LARGE = "HTTP/1.1 431 Request Header Fields Too Large\r\n" .. DATE
  .. "Content-Length: 0\r\nConnection: close\r\n\r\n"
local CONTINUE = "HTTP/1.1 100 Continue\r\n\r\n"
local GET = "GET / HTTP/1.1\r\nHost: x\r\n\r\n"
local GET_CLOSE = "GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

-- Seconds since the epoch, and the weekday (0 is Sunday), of a UTC date
-- (days from the civil calendar, as in H. Hinnant's chrono algorithms).
local function epoch(y, m, d, hh, mm, ss)
  if m <= 2 then y = y - 1 end
  local era = y // 400
  local yoe = y - era * 400
  local doy = (153 * (m > 2 and m - 3 or m + 9) + 2) // 5 + d - 1
  local days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
  return days * 86400 + hh * 3600 + mm * 60 + ss, (days + 4) % 7
end
local WEEKDAYS = { Sun = 0, Mon = 1, Tue = 2, Wed = 3, Thu = 4, Fri = 5, Sat = 6 }
local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6, Jul = 7, Aug = 8,
  Sep = 9, Oct = 10, Nov = 11, Dec = 12 }

-- Checks that `value` is an RFC 9110 IMF-fixdate ("Sun, 06 Nov 1994
-- 08:49:37 GMT") within 3 s of now, its weekday right.
local function check_date(value)
  local wd, d, mon, y, hh, mm, ss = value:match(
    "^(%a%a%a), (%d%d) (%a%a%a) (%d%d%d%d) (%d%d):(%d%d):(%d%d) GMT$")
  assert(wd and WEEKDAYS[wd] and MONTHS[mon], "not an IMF-fixdate: " .. value)
  local t, weekday = epoch(tonumber(y), MONTHS[mon], tonumber(d), tonumber(hh), tonumber(mm),
    tonumber(ss))
  assert.are.equal(weekday, WEEKDAYS[wd], "wrong weekday in " .. value)
  assert(math.abs(t - os.time()) <= 3, ("Date %s is %d s away from now"):format(value,
    t - os.time()))
end

-- `s` with each Date checked and replaced by the stand-in.
local function undated(s)
  return (s:gsub("\r\nDate: ([^\r\n]*)\r\n", function(value)
    check_date(value)
    return "\r\n" .. DATE
  end))
end

-- A command's output (stdout and stderr), without the sanitizer runtime this
-- process may have preloaded.
local function run(cmd)
  local p = assert(io.popen("env -u LD_PRELOAD " .. cmd .. " 2>&1"))
  local out = p:read("a")
  p:close()
  return out
end

local function have(program)
  return run("command -v " .. program) ~= ""
end

describe("examples/http_hello.lua", function()
  local server, port
  setup(function()
    server, port = helper.server{ workers = 2, handler = "examples.http_hello" }
  end)
  teardown(function() server:stop() end)

  local function client(timeout)
    local c = helper.connect(port)
    if timeout then c:settimeout(timeout) end
    helper.defer(function() c:close() end)
    return c
  end

  -- Exactly n bytes (a Date has a fixed length), dates checked.
  local function read(c, n)
    local s, err = c:receive(n)
    assert(s, err)
    return undated(s)
  end

  -- Everything until the server closes, dates checked.
  local function all(c) return undated(helper.all(c)) end

  -- Sends `request` on a new connection: everything the server sent before
  -- closing it.
  local function exchange(request)
    local c = client(2)
    assert(c:send(request))
    return all(c)
  end

  it("answers keep-alive requests one after another on one connection", function()
    local c = client()
    for _ = 1, 3 do
      assert(c:send(GET))
      assert.are.equal(OK, read(c, #OK))
    end
  end)

  it("puts an IMF-fixdate Date within seconds of now on every answer, the refusals too", function()
    local c = client()
    assert(c:send(GET))
    local answer = assert(c:receive(#OK))
    local value = answer:match("\r\nDate: ([^\r\n]*)\r\n")
    assert(value, "no Date in " .. answer)
    check_date(value)
    assert.are.equal(OK, undated(answer))
    assert.are.equal(BAD, exchange("NOT HTTP\r\n\r\n"))
    assert.are.equal(TOO_LARGE, exchange("GET / HTTP/1.1\r\nX: " .. ("a"):rep(9000) .. "\r\n\r\n"))
  end)

  it("answers 50 pipelined requests in one write, in order, and a close", function()
    local c = client()
    assert(c:send(GET:rep(50) .. GET_CLOSE))
    assert.are.equal(OK:rep(50) .. OK_CLOSE, all(c))
  end)

  it("parses requests split byte by byte across writes, a chunked body too", function()
    local c = client()
    c:setoption("tcp-nodelay", true)
    local request = GET .. "POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
      .. "3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Sum: 1\r\n\r\n" .. GET
    for i = 1, #request do
      assert(c:send(request:sub(i, i)))
      if i % 7 == 0 then socket.sleep(0.001) end
    end
    assert.are.equal(OK:rep(3), read(c, 3 * #OK))
  end)

  it("skips a request body, answers HEAD without one, honours Connection: close", function()
    local c = client()
    assert(c:send("POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello\r\n\r\nxx"
      .. "HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
      .. "GET / HTTP/1.1\r\nHost: x\r\nconnection: Close\r\n\r\n"
      .. "GET /never HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert.are.equal(OK .. OK_HEAD .. OK_CLOSE, all(c))
  end)

  it("answers once a body ends, also when it ends a read and nothing follows", function()
    local c = client(2)
    c:setoption("tcp-nodelay", true)
    assert(c:send("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"))
    socket.sleep(0.05)
    assert(c:send("ab"))
    socket.sleep(0.05)
    assert(c:send("cde"))
    assert.are.equal(OK, read(c, #OK))
    assert(c:send("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n"))
    socket.sleep(0.05)
    assert(c:send("abc"))
    socket.sleep(0.05)
    assert(c:send("\r\n0\r\n\r\n"))
    assert.are.equal(OK, read(c, #OK))
  end)

  it("keeps an HTTP/1.0 connection open only when asked, and says so", function()
    local c = client(2)
    assert(c:send("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"))
    assert.are.equal(OK_KA, read(c, #OK_KA))
    assert(c:send("HEAD / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"))
    assert.are.equal(HEAD .. "Connection: keep-alive\r\n\r\n", read(c, #OK_KA - #BODY))
    assert(c:send("GET / HTTP/1.0\r\n\r\n"))
    assert.are.equal(OK_CLOSE, all(c))
    -- "close" wins, whatever else the header says, in either version.
    assert.are.equal(OK_CLOSE, exchange("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n"))
    assert.are.equal(OK_CLOSE, exchange(
      "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n" .. GET))
  end)

  it("accepts bare LF line endings", function()
    local c = client(2)
    assert(c:send("GET / HTTP/1.1\nHost: x\n\n"))
    assert.are.equal(OK, read(c, #OK))
    assert(c:send("GET / HTTP/1.1\r\nHost: x\n\r\n"))           -- mixed
    assert.are.equal(OK, read(c, #OK))
    assert(c:send("\nPOST / HTTP/1.1\nhost: x\ncontent-length: 2\n\nhi"
      .. "POST / HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n2\nhi\n0\n\n"
      .. "GET / HTTP/1.0\n\n"))
    assert.are.equal(OK .. OK .. OK_CLOSE, all(c))
  end)

  it("answers 400 and closes on HTTP/1.1 without Host, or any request with two", function()
    assert.are.equal(OK .. BAD, exchange(GET .. "GET / HTTP/1.1\r\nX-Host: x\r\n\r\n" .. GET))
    assert.are.equal(BAD, exchange("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n"))
    assert.are.equal(BAD, exchange("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n"))
    assert.are.equal(OK_CLOSE, exchange("GET / HTTP/1.0\r\n\r\n"))   -- 1.0 needs none
    assert.are.equal(OK_CLOSE, exchange("GET / HTTP/1.1\r\nHOST: x\r\nConnection: close\r\n\r\n"))
  end)

  it("answers 400 to Content-Length headers that disagree, takes ones that agree", function()
    assert.are.equal(BAD, exchange("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
      .. "Content-Length: 5\r\n\r\nabcde" .. GET))
    assert.are.equal(BAD, exchange("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 5\r\n\r\nabcde"))
    assert.are.equal(BAD, exchange("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3,x\r\n\r\nabc"))
    assert.are.equal(BAD, exchange("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n"))
    assert.are.equal(BAD, exchange("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: "
      .. ("9"):rep(16) .. "\r\n\r\n"))
    assert.are.equal(OK .. OK_CLOSE, exchange("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
      .. "CONTENT-LENGTH: 003\r\ncontent-length: 3, 3,, 3\r\n\r\nabc" .. GET_CLOSE))
  end)

  it("decodes and drops a chunked body: hex sizes, extensions, trailers", function()
    local big = ("z"):rep(70000)
    local c = client(2)
    assert(c:send("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"
      .. "a\r\n0123456789\r\n1F ; name=value;flag\r\n" .. ("y"):rep(31) .. "\r\n"
      .. ("%x"):format(#big) .. "\r\n" .. big .. "\r\n"
      .. "000\r\nX-Trailer: 1\r\nother-trailer: two\r\n\r\n"
      .. "POST / HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
      .. "HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert.are.equal(OK .. OK .. OK_HEAD, read(c, 2 * #OK + #OK_HEAD))
    -- A body that ends in the next read, and Connection: close after it.
    assert(c:send("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
      .. "Connection: close\r\n\r\n5\r\nab"))
    socket.sleep(0.05)
    assert(c:send("cde\r\n0\r\n\r\n" .. GET))
    assert.are.equal(OK_CLOSE, all(c))
  end)

  it("answers 400 and closes on a malformed chunk", function()
    local post = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    local cases = {
      "x\r\n",                                     -- not hex
      "-1\r\nab\r\n",                              -- a sign
      ("f"):rep(16) .. "\r\n",                     -- over 15 digits
      "3 x\r\nabc\r\n0\r\n\r\n",                   -- junk after the size
      "3\r\nabcd\r\n0\r\n\r\n",                    -- data longer than its size
      "3\r\nabc0\r\n\r\n",                         -- no CRLF after the data
      "0\r\nno colon\r\n\r\n",                     -- a trailer that is no field
      "0\r\nX-T: " .. ("t"):rep(9000) .. "\r\n\r\n", -- trailers over 8 KiB
      "1;" .. ("e"):rep(9000) .. "\r\n",           -- a size line over 8 KiB
    }
    for _, body in ipairs(cases) do
      assert.are.equal(BAD, exchange(post .. body .. GET), body:sub(1, 40))
    end
    assert.are.equal(BAD, exchange(post .. "1;" .. ("e"):rep(9000)))   -- unfinished, too
    -- A good chunked request, then one that goes wrong: the first is answered.
    assert.are.equal(OK .. BAD, exchange(post .. "0\r\n\r\n" .. post .. "2\r\nabc\r\n"))
  end)

  it("answers 400 to Content-Length with chunked, to other codings, to 1.0 chunked", function()
    -- RFC 9112 6.3 lets a server reject Content-Length with Transfer-Encoding:
    -- it does, rather than guess which one the sender meant.
    local te = "Transfer-Encoding: chunked\r\n"
    assert.are.equal(BAD, exchange("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n" .. te
      .. "\r\n0\r\n\r\n" .. GET))
    assert.are.equal(BAD, exchange("POST / HTTP/1.1\r\nHost: x\r\n" .. te .. "content-length: 5\r\n"
      .. "\r\n0\r\n\r\n" .. GET))
    assert.are.equal(BAD, exchange("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"))
    assert.are.equal(BAD, exchange("POST / HTTP/1.1\r\nHost: x\r\n"
      .. "Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"))
    assert.are.equal(BAD, exchange("POST / HTTP/1.1\r\nHost: x\r\n" .. te .. te .. "\r\n0\r\n\r\n"))
    assert.are.equal(BAD, exchange("POST / HTTP/1.0\r\n" .. te .. "\r\n0\r\n\r\n"))
  end)

  it("answers 400 to whitespace before a colon, a folded line, a bare CR", function()
    assert.are.equal(BAD, exchange("GET / HTTP/1.1\r\nHost : x\r\n\r\n"))
    assert.are.equal(BAD, exchange("POST / HTTP/1.1\r\nHost: x\r\nContent-Length : 1\r\n\r\nx"))
    assert.are.equal(BAD, exchange("GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n"))
    assert.are.equal(BAD, exchange("GET / HTTP/1.1\r\nHost: x\r\n\rX: 1\r\n\r\n"))
  end)

  it("sends 100 Continue first to a request that expects it and has a body", function()
    local c = client(2)
    assert(c:send("POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"))
    assert.are.equal(CONTINUE, read(c, #CONTINUE))
    assert(c:send("abc" .. GET))
    assert.are.equal(OK .. OK, read(c, 2 * #OK))
    assert(c:send("GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n"))   -- no body
    assert.are.equal(OK, read(c, #OK))
  end)

  it("answers 400 and closes on a request line that is not HTTP/1.x", function()
    local c = client()
    assert(c:send(GET .. "HELLO THERE\r\n\r\n" .. GET))
    assert.are.equal(OK .. BAD, all(c))
    assert.are.equal(BAD, exchange("GET / HTTP/2.0\r\n\r\n"))
    assert.are.equal(BAD, exchange("GET /HTTP/1.1\r\nHost: x\r\n\r\n"))
  end)

  it("answers 431 and closes on a head over 8 KiB, complete or not, in pieces or whole", function()
    assert.are.equal(TOO_LARGE, exchange("GET / HTTP/1.1\r\nX-Big: " .. ("a"):rep(9000) .. "\r\n\r\n"))
    assert.are.equal(TOO_LARGE, exchange("GET / HTTP/1.1\r\nX-Big: " .. ("a"):rep(9000)))
    local c = client()
    c:setoption("tcp-nodelay", true)
    assert(c:send("GET / HTTP/1.1\r\n"))
    for _ = 1, 82 do                            -- 8,216 bytes, in reads of their own
      assert(c:send("X-Some: " .. ("b"):rep(90) .. "\r\n"))
      socket.sleep(0.001)
    end
    assert.are.equal(TOO_LARGE, all(c))
  end)

  describe("with real clients #child", function()
    it("completes ab -k -n 20000 -c 50: every request kept alive", function()
      if not have("ab") then pending("ab is not installed (Debian: apache2-utils)") return end
      local out = run(("timeout 60 ab -k -s 10 -n 20000 -c 50 http://127.0.0.1:%d/"):format(port))
      assert.are.equal("20000", out:match("Complete requests:%s+(%d+)"), out)
      assert.are.equal("0", out:match("Failed requests:%s+(%d+)"), out)
      assert.are.equal("20000", out:match("Keep%-Alive requests:%s+(%d+)"), out)
      assert.are.equal("14", out:match("Document Length:%s+(%d+) bytes"), out)
      assert.is_nil(out:find("Non-2xx", 1, true), out)
    end)

    it("completes ab without -k: a connection per request", function()
      if not have("ab") then pending("ab is not installed (Debian: apache2-utils)") return end
      local out = run(("timeout 60 ab -s 10 -n 2000 -c 20 http://127.0.0.1:%d/"):format(port))
      assert.are.equal("2000", out:match("Complete requests:%s+(%d+)"), out)
      assert.are.equal("0", out:match("Failed requests:%s+(%d+)"), out)
      assert.is_nil(out:match("Keep%-Alive requests:%s+[1-9]"), out)   -- (ab prints none)
      assert.is_nil(out:find("Non-2xx", 1, true), out)
    end)

    -- curl's own account of each transfer: status, new connections made
    -- for it (0: it reused one) and the Date header.
    local WRITE_OUT = "-w '\\n%{http_code} %{num_connects} %header{date}\\n'"
    local function transfers(out)
      local list = {}
      for code, connects, value in out:gmatch("\n(%d%d%d) (%d+) ([^\n]*)\n") do
        check_date(value)
        list[#list + 1] = code .. " " .. connects
      end
      return list
    end

    it("serves curl, HTTP/1.1 and 1.0, several URLs over one connection", function()
      if not have("curl") then pending("curl is not installed") return end
      local url = ("http://127.0.0.1:%d/"):format(port)
      local out = run(("timeout 20 curl -sS %s %sa %sb %sc"):format(WRITE_OUT, url, url, url))
      assert.are.same({ "200 1", "200 0", "200 0" }, transfers(out), out)
      assert.are.equal(BODY:rep(3), out:gsub("\n%d%d%d [^\n]*\n", ""), out)
      out = run(("timeout 20 curl -sS --http1.0 -H 'Connection: keep-alive' %s %sa %sb")
        :format(WRITE_OUT, url, url))
      assert.are.same({ "200 1", "200 0" }, transfers(out), out)
      out = run(("timeout 20 curl -sS --http1.0 -D - %s %s %sa"):format(WRITE_OUT, url, url))
      assert.are.same({ "200 1", "200 1" }, transfers(out), out)  -- 1.0 without asking: closed
      assert.is_truthy(out:find("\r\nConnection: close\r\n", 1, true), out)
    end)

    it("takes a chunked upload from curl, then reuses the connection", function()
      if not have("curl") then pending("curl is not installed") return end
      local input = os.tmpname()
      helper.defer(function() os.remove(input) end)
      local f = assert(io.open(input, "wb"))
      f:write(("0123456789abcdef"):rep(20000))      -- 320,000 bytes: several chunks
      f:close()
      local url = ("http://127.0.0.1:%d/"):format(port)
      local out = run(("timeout 20 curl -sS -v -H 'Transfer-Encoding: chunked' --data-binary @- "
        .. "%s %sup %s < %s"):format(WRITE_OUT, url, url, input))
      assert.is_truthy(out:find("> Transfer-Encoding: chunked", 1, true), out)
      assert.are.same({ "200 1", "200 0" }, transfers(out), out)
    end)
  end)
end)
