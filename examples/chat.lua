-- examples/chat.lua: a line-based chat room spread over every worker.
-- Loaded in each worker; examples/chat_server.lua runs it.
--
-- A worker knows only its own connections. A line from a client is written
-- at once to the other clients of the same worker, and broadcast to the
-- other workers, whose message hook writes it to theirs. So every line
-- reaches every client on every worker, in the order its sender sent it.
--
-- The sender does not get its own line back (its terminal already shows
-- it). Joins and departures are announced ("* user7 joined"); news from
-- another worker takes a moment, so a client that has just joined may still
-- hear of one who joined just before it. A client that stops reading
-- misses lines once 64 KiB wait for it, instead of making the server buffer
-- without bound; a line over 4 KiB (not counting its "\n" or "\r\n") ends
-- the connection.
local find, sub, byte = string.find, string.sub, string.byte

local MAX_LINE = 4096
local MAX_QUEUED = 64 * 1024

local clients = {}             -- this worker's connections -> true

-- Writes text to this worker's clients, except one (the sender).
local function deliver(text, except)
  for conn in pairs(clients) do
    if conn ~= except and conn:buffered() < MAX_QUEUED then conn:write(text) end
  end
end

-- Everyone else, on every worker, gets text.
local function announce(worker, text, except)
  deliver(text, except)
  worker.broadcast(text)
end

local chat = {}

-- A line from a client of another worker.
function chat.message(_, text)
  deliver(text)
end

function chat.connect(conn)
  local worker = conn.worker
  local name = "user" .. conn.id
  clients[conn] = true
  -- The news goes out before the welcome, so it is already on its way to
  -- the other workers when the client learns it is in.
  announce(worker, ("* %s joined\n"):format(name), conn)
  conn:write(("* welcome, you are %s\n"):format(name))

  local function too_long()
    conn:write("* line too long, bye\n")
    conn:close()               -- reading stops: no on_data after this
  end

  local pending = ""            -- the start of a line still coming
  conn:on_data(function(data)
    local buf, pos = pending .. data, 1
    while true do              -- plain finds: linear in what arrived
      local nl = find(buf, "\n", pos, true)
      if not nl then break end
      local last = byte(buf, nl - 1) == 13 and nl - 2 or nl - 1     -- drop a "\r"
      -- The limit holds however the line came: in pieces (checked on
      -- `pending` below) or whole in one read, as here.
      if last - pos + 1 > MAX_LINE then return too_long() end
      if last >= pos then
        announce(worker, ("%s: %s\n"):format(name, sub(buf, pos, last)), conn)
      end
      pos = nl + 1
    end
    pending = sub(buf, pos)
    -- (+ 1: a line of MAX_LINE bytes may wait here with its "\r")
    if #pending > MAX_LINE + 1 then too_long() end
  end)
  conn:on_close(function()
    clients[conn] = nil
    announce(worker, ("* %s left\n"):format(name))
  end)
end

return chat
