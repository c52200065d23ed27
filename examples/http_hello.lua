-- examples/http_hello.lua: a minimal HTTP/1.1 keep-alive responder that
-- answers every request with 200 and "Hello, world!\n". Loaded in each
-- worker; examples/http_hello_server.lua runs it (and `make bench` loads it).
--
-- Request heads are parsed incrementally: bytes are kept until "\r\n\r\n",
-- so a head split across reads works, and several pipelined requests in one
-- read are all answered, in order, with one write. "Connection: close" (or
-- HTTP/1.0 without "Connection: keep-alive") closes the connection once its
-- answer is sent. A Content-Length body is read and ignored; HEAD gets the
-- head alone. Not supported: chunked request bodies (the chunks then fail as
-- the next request: 400 and close), a head over 8 KiB (431 and close).
--
-- Written for speed: string.find with an init offset over the one buffer (no
-- slicing per request), at most one concatenation per read (and only when a
-- head was split), and the answers to n identical requests are one
-- string.rep. The only search over the header lines looks for a line that
-- starts with "C" or "c" (Connection, Content-Length): two plain finds, a
-- few times faster than one case-insensitive pattern, done once per read
-- when, as with most clients, no request carries such a header.
local find, byte, sub, rep, lower, match = string.find, string.byte, string.sub,
  string.rep, string.lower, string.match
local concat, huge, min = table.concat, math.huge, math.min

local BODY = "Hello, world!\n"
local HEAD = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: " .. #BODY
local OK = HEAD .. "\r\n\r\n" .. BODY
local OK_CLOSE = HEAD .. "\r\nConnection: close\r\n\r\n" .. BODY
local OK_HEAD_ONLY = HEAD .. "\r\n\r\n"
local OK_HEAD_ONLY_CLOSE = HEAD .. "\r\nConnection: close\r\n\r\n"
local BAD = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
local TOO_LARGE = "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
  .. "Connection: close\r\n\r\n"

local MAX_HEAD = 8192

-- The position of the next header line starting with "C" or "c" at or after
-- `from` (its "\n"), or huge.
local function next_c(buf, from)
  return min(find(buf, "\nC", from, true) or huge, find(buf, "\nc", from, true) or huge)
end

local http_hello = {}

function http_hello.connect(conn)
  local pending                        -- the start of an unfinished head, or nil
  local skip = 0                       -- body bytes still to be ignored

  -- Sends what the requests so far are owed; `last` (may be nil) goes after
  -- `n` plain OKs, or `list` holds them all in order when some differed.
  local function send(n, list, last)
    local out
    if list then
      if last then list[#list + 1] = last end
      out = concat(list)
    elseif n == 0 then
      out = last
    else
      out = n == 1 and OK or rep(OK, n)
      if last then out = out .. last end
    end
    if out and not conn:write(out) then conn:pause() end
  end

  conn:on_data(function(data)
    local buf, pos = data, 1
    if pending then
      buf, pending = pending .. data, nil
    end
    local len = #buf
    local n, list = 0, nil             -- answers owed: n plain OKs, or a list
    local con = -1                     -- next "\nC"/"\nc" at or after pos (huge: none)
    while true do
      if skip > 0 then                 -- a request body: skip it
        if len - pos + 1 <= skip then
          skip = skip - (len - pos + 1)
          pos = len + 1
          break
        end
        pos, skip = pos + skip, 0
      end
      while byte(buf, pos) == 13 and byte(buf, pos + 1) == 10 do pos = pos + 2 end
      local e = find(buf, "\r\n\r\n", pos, true)
      if not e then break end
      if e - pos > MAX_HEAD then
        send(n, list, TOO_LARGE)
        conn:close()
        return
      end
      -- The request line must end in "HTTP/1.x".
      local le = find(buf, "\r\n", pos, true)
      local h, t1, t2, p, slash, one, dot, minor = byte(buf, le - 8, le - 1)
      if le - pos < 14 or h ~= 72 or t1 ~= 84 or t2 ~= 84 or p ~= 80 or slash ~= 47 or one ~= 49
        or dot ~= 46 or (minor ~= 48 and minor ~= 49) then
        send(n, list, BAD)
        conn:close()
        return
      end
      local close = minor == 48        -- HTTP/1.0 closes unless asked not to
      if con < pos then con = next_c(buf, pos) end
      while con < e do                 -- a header starting with "C"
        local colon = find(buf, ":", con + 1, true)
        if colon and colon < e then
          local name = lower(sub(buf, con + 1, colon - 1))
          if name == "connection" then
            local value = lower(match(buf, "^[ \t]*([^\r]*)", colon + 1))
            if find(value, "close", 1, true) then close = true
            elseif find(value, "keep-alive", 1, true) then close = false end
          elseif name == "content-length" then
            local value = match(buf, "^[ \t]*(%d+)[ \t]*\r", colon + 1)
            if not value then
              send(n, list, BAD)
              conn:close()
              return
            end
            skip = tonumber(value)
          end
        end
        con = next_c(buf, con + 1)
      end
      local head_only = byte(buf, pos) == 72 and sub(buf, pos, pos + 4) == "HEAD "
      pos = e + 4
      if close then
        send(n, list, head_only and OK_HEAD_ONLY_CLOSE or OK_CLOSE)
        conn:close()                   -- after the answer is flushed
        return
      end
      if head_only then                -- this answer differs: keep a list
        list = list or (n > 0 and { rep(OK, n) } or {})
        list[#list + 1] = OK_HEAD_ONLY
      elseif list then
        list[#list + 1] = OK
      else
        n = n + 1
      end
    end
    if pos <= len then
      if len - pos >= MAX_HEAD then
        send(n, list, TOO_LARGE)
        conn:close()
        return
      end
      pending = sub(buf, pos)
    end
    send(n, list, nil)
  end)
  conn:on_drain(function() conn:resume() end)
end

return http_hello
