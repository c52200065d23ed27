-- bench/check_http.lua: checks an HTTP hello server on the wire before
-- `make bench` measures it (and by hand: lua5.4 bench/check_http.lua PORT).
-- Loopback only; every call has a timeout. Exits non-zero on the first
-- failure, printing what was expected and what came back.
local socket = require("socket")

local port = assert(tonumber(arg[1]), "usage: lua5.4 bench/check_http.lua PORT")
local BODY = "Hello, world!\n"

local function connect()
  local c = assert(socket.tcp())
  c:settimeout(3)
  assert(c:connect("127.0.0.1", port))
  return c
end

-- Reads until the server closes; returns everything it sent.
local function read_all(c)
  local chunks = {}
  while true do
    local data, err, partial = c:receive(4096)
    data = data or partial
    if data and #data > 0 then chunks[#chunks + 1] = data end
    if err == "closed" then break end
    assert(not err, "receive: " .. tostring(err))
  end
  c:close()
  return table.concat(chunks)
end

-- Splits a byte stream into responses (Content-Length framed).
local function responses(stream, head_only)
  local list, pos = {}, 1
  while pos <= #stream do
    local e = assert(stream:find("\r\n\r\n", pos, true), "unterminated head")
    local head = stream:sub(pos, e + 3)
    local len = tonumber(head:match("\r\n[Cc]ontent%-[Ll]ength:%s*(%d+)")) or 0
    if head_only and head_only[#list + 1] then len = 0 end
    list[#list + 1] = { head = head, body = stream:sub(e + 4, e + 3 + len),
                        status = tonumber(head:match("^HTTP/1%.%d (%d+)")) }
    pos = e + 4 + len
  end
  return list
end

local function check(name, cond, detail)
  if not cond then
    io.stderr:write(("check_http: %s: FAILED %s\n"):format(name, detail or ""))
    os.exit(1)
  end
  print(("check_http: %s: ok"):format(name))
end

-- 1. Two pipelined requests in one write; the second asks to close.
local c = connect()
assert(c:send("GET / HTTP/1.1\r\nHost: x\r\n\r\n"
  .. "GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
local r = responses(read_all(c))
check("two pipelined requests in one write", #r == 2 and r[1].status == 200
  and r[1].body == BODY and r[2].status == 200 and r[2].body == BODY,
  ("got %d responses"):format(#r))
check("Connection: close is honoured (server closed after the 2nd answer)",
  r[2].head:lower():find("connection: close", 1, true) ~= nil)

-- 2. A head split over three writes, then keep-alive: a second request on
-- the same connection, which then closes by HTTP/1.0.
c = connect()
for _, piece in ipairs { "GET / HT", "TP/1.1\r\nHost: x\r", "\n\r\n" } do
  assert(c:send(piece))
  socket.sleep(0.05)
end
local line = assert(c:receive("*l"))
check("a head split over three writes", line == "HTTP/1.1 200 OK", line)
repeat line = assert(c:receive("*l")) until line == ""
check("its body", assert(c:receive(#BODY)) == BODY)
assert(c:send("GET / HTTP/1.0\r\n\r\n"))
r = responses(read_all(c))
check("keep-alive, then HTTP/1.0 closes", #r == 1 and r[1].body == BODY)

-- 3. Three pipelined with a body and a HEAD in the middle, then close.
c = connect()
assert(c:send("POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
  .. "HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
  .. "GET / HTTP/1.1\r\nHost: x\r\nconnection: Close\r\n\r\n"))
r = responses(read_all(c), { [2] = true })
check("body, HEAD and close, pipelined", #r == 3 and r[1].body == BODY and r[2].body == ""
  and r[3].body == BODY and r[1].status == 200 and r[2].status == 200 and r[3].status == 200,
  ("got %d responses"):format(#r))
