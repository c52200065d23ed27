-- bench/peers/luv_echo.lua: an echo server on one luv loop (lua-luv), the
-- single-loop peer in `make bench`.
--   lua5.4 bench/peers/luv_echo.lua [max_seconds]
-- Listens on 127.0.0.1, a free port, printed as "LISTENING <port>"; stops on
-- SIGTERM or SIGINT, or by itself after max_seconds (default 900).
-- Like examples/echo_handler.lua: writes back what it reads, pauses reading
-- while a client does not read its echoes (1 MiB queued), sets TCP_NODELAY.
local uv = require("luv")

local HIGH_WATER, LOW_WATER = 1024 * 1024, 256 * 1024
local max_seconds = tonumber(arg[1]) or 900

local server = uv.new_tcp()
assert(server:bind("127.0.0.1", 0))
assert(server:listen(511, function(err)
  if err then return end
  local client = uv.new_tcp()
  if not server:accept(client) then client:close() return end
  client:nodelay(true)
  local paused, on_read = false, nil
  local function on_drained()
    if paused and not client:is_closing() and client:get_write_queue_size() <= LOW_WATER then
      paused = false
      client:read_start(on_read)
    end
  end
  function on_read(rerr, data)
    if rerr or not data then                -- an error, or the peer's EOF
      if not client:is_closing() then client:close() end
      return
    end
    -- The socket first (as multiloop's conn:write does); queue only the rest.
    local sent = 0
    if client:get_write_queue_size() == 0 then
      local n, _, name = client:try_write(data)
      if n == nil and name ~= "EAGAIN" then client:close() return end
      sent = n or 0
    end
    if sent < #data then
      client:write(sent == 0 and data or data:sub(sent + 1), on_drained)
      if client:get_write_queue_size() > HIGH_WATER then
        paused = true
        client:read_stop()
      end
    end
  end
  client:read_start(on_read)
end))

local port = server:getsockname().port
print(("LISTENING %d"):format(port))
io.stdout:flush()

local function stop()
  uv.walk(function(h) if not h:is_closing() then h:close() end end)
end
local sigterm, sigint = uv.new_signal(), uv.new_signal()
sigterm:start("sigterm", stop)
sigint:start("sigint", stop)
uv.new_timer():start(max_seconds * 1000, 0, stop)
uv.run()
