-- examples/http_hello.lua: a minimal HTTP/1.1 keep-alive responder that
-- answers every request with 200 and "Hello, world!\n". Loaded in each
-- worker; examples/http_hello_server.lua runs it (and `make bench` loads it).
--
-- What it follows of RFC 9112 (HTTP/1.1) and RFC 9110:
-- - Keep-alive: HTTP/1.1 keeps the connection open unless the request says
--   "Connection: close"; HTTP/1.0 only when it says "Connection: keep-alive",
--   and then the answer says "Connection: keep-alive" too (ab -k waits for
--   it). A close is sticky: "close" anywhere wins over "keep-alive".
-- - Every answer carries a Date (IMF-fixdate), made at most once a second
--   per worker: a timer (init) rebuilds the answers when os.time() moves on.
-- - Lines may end in CRLF or a bare LF; empty lines before a request line
--   are ignored; header names are case-insensitive.
-- - 400 and close: a request line that is not "METHOD TARGET HTTP/1.0|1.1";
--   HTTP/1.1 without Host, or any request with two; a Content-Length that is
--   not a number, or several that differ ("5, 5" and two "5" are one); a
--   Transfer-Encoding whose last coding is not chunked, in HTTP/1.0, or with
--   a Content-Length as well (RFC 9112 6.3 lets a server reject that, which
--   is safer than picking one: no framing is guessed); a folded header line,
--   a bare CR, whitespace before the colon of a header it reads (below); a
--   malformed chunk.
-- - Bodies are read and dropped: Content-Length bytes, or chunked (sizes in
--   hex up to 15 digits, extensions, trailers). The answer goes out once the
--   body is in, so a bad chunk gets 400 instead of 200; "Expect:
--   100-continue" with a body gets "100 Continue" first. HEAD gets the head.
-- - Bounds: a head (or a chunk-size line, or a trailer section) over 8 KiB
--   is refused (431 for a head, 400 for the others) and the connection closed.
-- Pipelined requests are answered in order, those of one read in one write.
--
-- Written for speed. Each head is read line by line with plain finds of
-- "\n" over the one buffer (no slicing per request); only lines that start
-- with C, E, H or T in either case (Connection, Content-Length, Expect,
-- Host, Transfer-Encoding) are looked at, and "Host:" as most clients spell
-- it is known by its bytes alone. A request with no other such line (wrk's,
-- a browser's GET) skips the framing checks. The answers to n identical
-- requests are one string.rep. A head or chunk line split across reads is kept in pieces, and
-- each new read is searched only for what would end it, so a head arriving
-- byte by byte costs linear time, not quadratic; it is parsed once, whole.
local find, byte, sub, rep, lower, match, gmatch, format = string.find, string.byte,
  string.sub, string.rep, string.lower, string.match, string.gmatch, string.format
local concat, time, date = table.concat, os.time, os.date

local BODY = "Hello, world!\n"
local MAX_HEAD = 8192                  -- a head, a chunk-size line, a trailer section
local CONTINUE = "HTTP/1.1 100 Continue\r\n\r\n"

-- The answers of the current second (see refresh): a 200 for a keep-alive
-- HTTP/1.1 request, one that says keep-alive (HTTP/1.0), one that closes,
-- the same three for HEAD, and the two refusals.
local OK, OK_KA, OK_CLOSE, HEAD_OK, HEAD_KA, HEAD_CLOSE, BAD, TOO_LARGE
local ANSWER = {}                      -- the six 200s by kind: 1 keep-alive (1.1),
                                       -- 2 saying keep-alive, 3 closing; 4-6 for HEAD
local date_now                         -- the second they were made for

-- Day and month names in English whatever the C locale (os.date's %a and %b
-- follow it).
local DAYS = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" }
local MONTHS = { "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
  "Nov", "Dec" }

local function refresh(now)
  local d = date("!*t", now)
  local stamp = format("Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n", DAYS[d.wday], d.day,
    MONTHS[d.month], d.year, d.hour, d.min, d.sec)
  local head = "HTTP/1.1 200 OK\r\n" .. stamp .. "Content-Type: text/plain\r\nContent-Length: "
    .. #BODY .. "\r\n"
  HEAD_OK, HEAD_KA = head .. "\r\n", head .. "Connection: keep-alive\r\n\r\n"
  HEAD_CLOSE = head .. "Connection: close\r\n\r\n"
  OK, OK_KA, OK_CLOSE = HEAD_OK .. BODY, HEAD_KA .. BODY, HEAD_CLOSE .. BODY
  ANSWER[1], ANSWER[2], ANSWER[3] = OK, OK_KA, OK_CLOSE
  ANSWER[4], ANSWER[5], ANSWER[6] = HEAD_OK, HEAD_KA, HEAD_CLOSE
  BAD = "HTTP/1.1 400 Bad Request\r\n" .. stamp
    .. "Content-Length: 0\r\nConnection: close\r\n\r\n"
  TOO_LARGE = "HTTP/1.1 431 Request Header Fields Too Large\r\n" .. stamp
    .. "Content-Length: 0\r\nConnection: close\r\n\r\n"
  date_now = now
end
refresh(time())

-- What the first byte of a header line means: 1, a header this parser reads
-- may start so; 2, the line is malformed (a folded line, a bare CR, no name).
local FIRST = { [67] = 1, [99] = 1, [69] = 1, [101] = 1, [72] = 1, [104] = 1, [84] = 1,
  [116] = 1, [32] = 2, [9] = 2, [13] = 2, [58] = 2 }

-- Where the connection is between requests (nil: at a request line).
local BODY_BYTES, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER = 1, 2, 3, 4, 5

-- The number in a Content-Length value (from `at` to the line's end, OWS
-- around it), also when it is a list of one number repeated; nil when it is
-- not one number or has over 15 digits.
-- Appends `n` copies of the answer `run` to the reply list (made when first
-- needed) and returns the list: consecutive equal answers are one rep.
local function flush(list, run, n)
  if n > 0 then
    list = list or {}
    list[#list + 1] = n == 1 and run or rep(run, n)
  end
  return list
end

local function content_length(buf, at)
  local v = match(buf, "^[ \t]*0*(%d+)[ \t]*\r?\n", at)
  if v then return #v <= 15 and tonumber(v) or nil end
  local n
  for item in gmatch(match(buf, "^[^\r\n]*", at), "[^,]*") do
    if find(item, "[^ \t]") then       -- empty items are allowed, and ignored
      v = match(item, "^[ \t]*0*(%d+)[ \t]*$")
      if not v or #v > 15 or (n and n ~= tonumber(v)) then return nil end
      n = tonumber(v)
    end
  end
  return n
end

local http_hello = {}

-- The Date changes once a second: a timer looks ten times a second, so the
-- answers are never more than about 0.1 s behind and no request pays for it.
function http_hello.init(worker)
  worker.every(100, function()
    local now = time()
    if now ~= date_now then refresh(now) end
  end)
end

function http_hello.connect(conn)
  local state                          -- nil, or where in a body (above)
  local skip = 0                       -- body or chunk bytes still to drop
  local owed                           -- the answer's kind (1-6) once the body is in
  local trailer = 0                    -- trailer bytes so far
  local pieces, held, tail             -- an unfinished head or line: its reads, their
                                       -- length and last two bytes

  -- Sends `out` (may be nil), then closes when `close`.
  local function send(out, close)
    if out and not conn:write(out) then conn:pause() end
    if close then conn:close() end     -- after the answers are flushed
  end

  conn:on_data(function(data)
    local buf = data
    if pieces then                     -- only what would end it is searched for
      local ends
      if state == nil then
        ends = find(data, "\n\r\n", 1, true) or find(data, "\n\n", 1, true)
          or find(tail .. sub(data, 1, 2), "\n\r?\n")
      else
        ends = find(data, "\n", 1, true)
      end
      pieces[#pieces + 1] = data
      held = held + #data
      if not ends then
        if held > MAX_HEAD then
          pieces = nil
          return send(state == nil and TOO_LARGE or BAD, true)
        end
        tail = #data >= 2 and sub(data, -2) or sub(tail .. data, -2)
        return
      end
      buf, pieces = concat(pieces), nil
    end
    local pos, len = 1, #buf
    -- The answers owed so far: n times `run`, after those in `list`.
    local run, n, list = nil, 0, nil
    local a, close                     -- this round's answer, and whether it closes
    while pos <= len do
      if state == nil then
        local b, b2 = byte(buf, pos, pos + 1)
        if b == 10 then                -- an empty line before a request: ignored
          pos = pos + 1
        elseif b == 13 and b2 == 10 then
          pos = pos + 2
        else
          -- The request line must end in " HTTP/1.0" or " HTTP/1.1" (and CR).
          local le = find(buf, "\n", pos, true)
          if not le then break end
          local sp, h, t1, t2, p, slash, one, dot, minor, cr = byte(buf, le - 10, le - 1)
          if cr ~= 13 then             -- a bare LF
            sp, h, t1, t2, p, slash, one, dot, minor = h, t1, t2, p, slash, one, dot, minor, cr
          end
          if le - pos < 12 or sp ~= 32 or h ~= 72 or t1 ~= 84 or t2 ~= 84 or p ~= 80
            or slash ~= 47 or one ~= 49 or dot ~= 46 or (minor ~= 48 and minor ~= 49) then
            a, close = BAD, true
            break
          end
          -- The header lines, up to the empty one.
          -- `odd`: a line was looked at (other than "Host:"), so the general
          -- checks below are needed.
          local hosts, odd, shut, ka, cl, te, chunked, expect = 0
          local ls, body = le + 1, nil
          while true do
            local c, c2, c3, c4, c5 = byte(buf, ls, ls + 4)
            if c == 10 then body = ls + 1 break end
            if c == 13 and c2 == 10 then body = ls + 2 break end
            le = find(buf, "\n", ls, true)
            if not le then break end
            if c == 72 and c2 == 111 and c3 == 115 and c4 == 116 and c5 == 58 then  -- "Host:"
              hosts = hosts + 1
            else
              local kind = FIRST[c]
              if kind then
                odd = true
                local colon = find(buf, ":", ls, true)
                if kind == 2 or not colon or colon > le then a = BAD break end
                local name = lower(sub(buf, ls, colon - 1))
                if name == "host" then
                  hosts = hosts + 1
                elseif name == "connection" then
                  local v = lower(match(buf, "^[^\r\n]*", colon + 1))
                  if find(v, "close", 1, true) then shut = true end
                  if find(v, "keep-alive", 1, true) then ka = true end
                elseif name == "content-length" then
                  local v = content_length(buf, colon + 1)
                  if not v or (cl and cl ~= v) then a = BAD break end
                  cl = v
                elseif name == "transfer-encoding" then
                  for coding in gmatch(lower(match(buf, "^[^\r\n]*", colon + 1)), "[^,]+") do
                    coding = match(coding, "^[ \t]*(.-)[ \t]*$")
                    if coding == "chunked" then chunked = (chunked or 0) + 1 end
                    te = coding
                  end
                  te = te or ""
                elseif name == "expect" then
                  expect = lower(match(buf, "^[ \t]*([^\r\n]-)[ \t]*\r?\n", colon + 1) or "")
                    == "100-continue"
                else
                  local last = byte(buf, colon - 1)
                  if last == 32 or last == 9 then a = BAD break end   -- "Host :" is refused
                end
              end
            end
            ls = le + 1
          end
          if a then close = true break end
          if not body then break end     -- unfinished (bounded below)
          if body - pos > MAX_HEAD then a, close = TOO_LARGE, true break end
          if not odd and hosts == 1 and minor == 49 then   -- most requests
            a, close = b == 72 and sub(buf, pos, pos + 4) == "HEAD " and HEAD_OK or OK, false
            pos = body
          else
            if hosts > 1 or (hosts == 0 and minor == 49)
              or (te and (te ~= "chunked" or chunked ~= 1 or cl or minor == 48)) then
              a, close = BAD, true
              break
            end
            if minor == 48 and not ka then shut = true end
            local kind = shut and 3 or minor == 48 and 2 or 1
            if b == 72 and sub(buf, pos, pos + 4) == "HEAD " then kind = kind + 3 end
            pos = body
            if te then
              state, owed = CHUNK_SIZE, kind
              if expect and minor == 49 then a, close = CONTINUE, false end
            elseif cl and cl > 0 then
              state, owed, skip = BODY_BYTES, kind, cl
              if expect and minor == 49 then a, close = CONTINUE, false end
            else
              a, close = ANSWER[kind], shut or false
            end
          end
        end
      elseif state == BODY_BYTES or state == CHUNK_DATA then
        if len - pos + 1 < skip then   -- all of this read is body, and more to come
          skip = skip - (len - pos + 1)
          pos = len + 1
          break
        end
        pos, skip = pos + skip, 0
        if state == BODY_BYTES then
          state, a, close = nil, ANSWER[owed], owed % 3 == 0
        else
          state = CHUNK_END
        end
      elseif state == CHUNK_END then   -- the CRLF after a chunk's data
        local b = byte(buf, pos)
        if b == 10 then
          pos, state = pos + 1, CHUNK_SIZE
        elseif b == 13 and byte(buf, pos + 1) == 10 then
          pos, state = pos + 2, CHUNK_SIZE
        elseif b == 13 and pos == len then
          break
        else
          a, close = BAD, true
          break
        end
      elseif state == CHUNK_SIZE then  -- hex digits, maybe ";extensions", CRLF
        local le = find(buf, "\n", pos, true)
        if not le then break end
        if le - pos > MAX_HEAD then a, close = BAD, true break end
        local hex, ext = match(buf, "^0*(%x+)[ \t]*([^\r\n]*)\r?\n", pos)
        if not hex or #hex > 15 or (ext ~= "" and byte(ext) ~= 59) then
          a, close = BAD, true
          break
        end
        pos, skip = le + 1, tonumber(hex, 16)
        if skip > 0 then state = CHUNK_DATA else state, trailer = TRAILER, 0 end
      else                             -- TRAILER: field lines, up to an empty one
        local b = byte(buf, pos)
        if b == 10 or (b == 13 and byte(buf, pos + 1) == 10) then
          pos = pos + (b == 10 and 1 or 2)
          state, a, close = nil, ANSWER[owed], owed % 3 == 0
        else
          local le = find(buf, "\n", pos, true)
          if not le then break end
          trailer = trailer + le - pos + 1
          if trailer > MAX_HEAD or not match(buf, "^[%w!#$%%&'*+%-.^_`|~]+:[^\r\n]*\r?\n", pos)
          then
            a, close = BAD, true
            break
          end
          pos = le + 1
        end
      end
      if a then                        -- owe it, after the others
        if a == run then
          n = n + 1
        else
          list, run, n = flush(list, run, n), a, 1
        end
        a = nil
        if close then break end
      end
    end
    if a then                          -- a refusal: the last thing sent
      list, run, n = flush(list, run, n), a, 1
    end
    local out = run and (n == 1 and run or rep(run, n))
    if list and out then
      list[#list + 1] = out
      out = concat(list)
    end
    if close then return send(out, true) end
    if pos <= len then                 -- an unfinished head or line: keep it
      if len - pos >= MAX_HEAD then
        return send((out or "") .. (state == nil and TOO_LARGE or BAD), true)
      end
      local rest = sub(buf, pos)
      pieces, held, tail = { rest }, #rest, sub(rest, -2)
    end
    send(out, false)
  end)
  conn:on_drain(function() conn:resume() end)
end

return http_hello
