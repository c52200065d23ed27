-- examples/echo_handler.lua: sends every byte back. Loaded in each worker.
--
-- A handler is a module that returns connect(conn), or a table with
-- connect and an optional init(worker) that runs once per worker.
local handler = {}

function handler.init(worker)
  -- worker.id (1..worker.count) and worker.config are available here.
end

function handler.connect(conn)
  conn:on_data(function(data)
    -- write() returns false once this connection has write_high_water bytes
    -- queued: a client that sends and never reads. Stop reading from it until
    -- the queue drains, so it cannot make the server buffer without bound.
    if not conn:write(data) then conn:pause() end
  end)
  conn:on_drain(function() conn:resume() end)
  -- No on_end: when the client half-closes, the connection closes as soon
  -- as everything written to it has been sent.
end

return handler
