-- examples/lines.lua: a small line protocol in the `serve` style, the way a
-- newcomer would write one. Loaded in each worker; examples/lines_server.lua
-- runs it.
--
-- The style: a handler with `serve` (instead of `connect`) runs serve(conn)
-- for each connection in a light thread (a coroutine) of its own, so the
-- code reads top to bottom: read a line, answer it, read the next. While
-- conn:receive("*l") waits for a line the worker serves other connections;
-- the line comes whole however the client's writes split it, and many lines
-- in one read come one by one (the worker scans its buffer in C and makes
-- one Lua string per line). A connection's state is just local variables.
-- receive returns nil and a word when it cannot give a line: "closed" (the
-- client went), "timeout" (nothing came for the read timeout) or "too long"
-- (no end of line within the server's receive_limit). Returning from serve closes the connection once what was
-- sent has gone out. (examples/chat.lua is the callback style: on_data gets
-- whatever each read brought, and the handler splits it into lines itself.)
--
-- The protocol: one command a line (LF or CRLF), the command's name in any
-- case, one reply line each:
--   UPPER text       the text in upper case
--   SET name value   OK: a variable of this connection (value: the rest of the line)
--   GET name         its value, or (nil)
--   INCR name        the variable plus 1 (from 0), stored; an error if it is no integer
--   COUNT            how many commands this connection has sent, this one included
--   TIME             the server's clock, in seconds since 1970
--   QUIT             bye, then the server closes the connection
-- Empty lines are skipped; anything else gets "ERR unknown command '...'"
-- and a command without its arguments "ERR usage: ...". A line longer than
-- receive_limit gets "ERR line too long" and the connection is closed, as is
-- one silent for worker.config.idle_ms (default 60000) after "bye (idle)".
local lines = {}

local HELLO = "hello: UPPER text, SET name value, GET name, INCR name, COUNT, TIME, QUIT\n"

-- Each command takes the connection's variables and the rest of its line,
-- and returns its reply (without the newline).
local commands = {}

function commands.upper(_, rest) return rest:upper() end

function commands.set(vars, rest)
  local name, value = rest:match("^(%S+)%s+(.*)$")
  if not name then return "ERR usage: SET name value" end
  vars[name] = value
  return "OK"
end

function commands.get(vars, rest)
  local name = rest:match("^%S+$")
  if not name then return "ERR usage: GET name" end
  return vars[name] or "(nil)"
end

function commands.incr(vars, rest)
  local name = rest:match("^%S+$")
  if not name then return "ERR usage: INCR name" end
  local n = math.tointeger(tonumber(vars[name] or "0"))
  if not n then return ("ERR '%s' is not an integer"):format(vars[name]) end
  vars[name] = tostring(n + 1)
  return vars[name]
end

function commands.time() return tostring(os.time()) end

function lines.serve(conn)
  local idle = conn.worker.config and conn.worker.config.idle_ms or 60000
  conn:settimeouts(0, idle, idle)              -- connect (unused), send, read: ms
  conn:send(HELLO)
  local vars, count = {}, 0
  while true do
    local line, err = conn:receive("*l")
    if not line then
      if err == "timeout" then conn:send("bye (idle)\n") end
      if err == "too long" then conn:send("ERR line too long\n") end
      return                                   -- "closed": the client has gone
    end
    local word, rest = line:match("^%s*(%S+)%s?(.*)$")
    if word then                               -- not an empty line
      local name = word:lower()
      count = count + 1
      if name == "quit" then
        conn:send("bye\n")
        return
      end
      local reply
      if name == "count" then
        reply = tostring(count)
      elseif commands[name] then
        reply = commands[name](vars, rest)
      else
        reply = ("ERR unknown command '%s'"):format(word)
      end
      conn:send({ reply, "\n" })
    end
  end
end

return lines
