-- examples/echo_handler.lua: sends every byte back. Loaded in each worker.
--
-- A handler is a module that returns connect(conn), or a table with
-- connect and an optional init(worker) that runs once per worker.
--
-- Every callback gets the connection as its last argument, so these two
-- functions serve every connection: no closure is made per connection,
-- which keeps an idle connection about 140 bytes smaller than
-- `conn:on_data(function(data) ... conn ... end)` would (see README,
-- Figures). Closures work just as well when that does not matter.
local handler = {}

function handler.init(worker)
  -- worker.id (1..worker.count) and worker.config are available here.
end

local function on_data(data, conn)
  -- write() returns false once this connection has write_high_water bytes
  -- queued: a client that sends and never reads. Stop reading from it until
  -- the queue drains, so it cannot make the server buffer without bound.
  if not conn:write(data) then conn:pause() end
end

local function on_drain(conn)
  conn:resume()
end

function handler.connect(conn)
  conn:on_data(on_data)
  conn:on_drain(on_drain)
  -- No on_end: when the client half-closes, the connection closes as soon
  -- as everything written to it has been sent.
end

return handler
