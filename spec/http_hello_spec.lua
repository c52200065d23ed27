-- examples/http_hello.lua over real sockets: the keep-alive HTTP/1.1
-- responder that `make bench` measures. Pipelined requests answered in order,
-- heads split across writes, bodies skipped, HEAD, Connection: close and
-- HTTP/1.0, and the two refusals (400 and 431), each with the bytes it sends.
local helper = require("spec.helper")
local socket = require("socket")

local BODY = "Hello, world!\n"
local OK = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n\r\n" .. BODY
local OK_CLOSE = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n"
  .. "Connection: close\r\n\r\n" .. BODY
local OK_HEAD = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n\r\n"
local BAD = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
local TOO_LARGE = "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
  .. "Connection: close\r\n\r\n"
local GET = "GET / HTTP/1.1\r\nHost: x\r\n\r\n"

describe("examples/http_hello.lua", function()
  local server, port
  setup(function()
    server, port = helper.server{ workers = 2, handler = "examples.http_hello" }
  end)
  teardown(function() server:stop() end)

  local function client()
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    return c
  end

  local function read(c, n)
    local s, err = c:receive(n)
    assert(s, err)
    return s
  end

  it("answers keep-alive requests one after another on one connection", function()
    local c = client()
    for _ = 1, 3 do
      assert(c:send(GET))
      assert.are.equal(OK, read(c, #OK))
    end
  end)

  it("answers 50 pipelined requests in one write, in order, and a close", function()
    local c = client()
    assert(c:send(GET:rep(50) .. "GET /last HTTP/1.1\r\nConnection: close\r\n\r\n"))
    assert.are.equal(OK:rep(50) .. OK_CLOSE, helper.all(c))
  end)

  it("parses a head split byte by byte across writes", function()
    local c = client()
    c:setoption("tcp-nodelay", true)
    for i = 1, #GET do
      assert(c:send(GET:sub(i, i)))
      if i % 7 == 0 then socket.sleep(0.002) end
    end
    assert.are.equal(OK, read(c, #OK))
  end)

  it("skips a request body, answers HEAD without one, honours Connection: close", function()
    local c = client()
    assert(c:send("POST /p HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello\r\n\r\nxx"
      .. "HEAD / HTTP/1.1\r\n\r\n"
      .. "GET / HTTP/1.1\r\nconnection: Close\r\n\r\n"
      .. "GET /never HTTP/1.1\r\n\r\n"))
    assert.are.equal(OK .. OK_HEAD .. OK_CLOSE, helper.all(c))
  end)

  it("closes after an HTTP/1.0 request, unless it asks for keep-alive", function()
    local c = client()
    assert(c:send("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"))
    assert.are.equal(OK, read(c, #OK))
    assert(c:send("GET / HTTP/1.0\r\n\r\n"))
    assert.are.equal(OK_CLOSE, helper.all(c))
  end)

  it("answers 400 and closes on a request line that is not HTTP/1.x", function()
    local c = client()
    assert(c:send(GET .. "HELLO THERE\r\n\r\n" .. GET))
    assert.are.equal(OK .. BAD, helper.all(c))
  end)

  it("answers 400 and closes on a Content-Length that is not a number", function()
    local c = client()
    assert(c:send("POST / HTTP/1.1\r\nContent-Length: ten\r\n\r\n"))
    assert.are.equal(BAD, helper.all(c))
  end)

  it("answers 431 and closes on a head over 8 KiB, complete or not", function()
    local c = client()
    assert(c:send("GET / HTTP/1.1\r\nX-Big: " .. ("a"):rep(9000) .. "\r\n\r\n"))
    assert.are.equal(TOO_LARGE, helper.all(c))
    local d = client()
    assert(d:send("GET / HTTP/1.1\r\nX-Big: " .. ("a"):rep(9000)))
    assert.are.equal(TOO_LARGE, helper.all(d))
  end)
end)
