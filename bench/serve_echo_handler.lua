-- bench/serve_echo_handler.lua: the echo of examples/echo_handler.lua in the
-- sequential style, measured beside it by `make bench`: each connection's
-- serve runs in its own light thread, takes whatever has arrived
-- (receiveany) and sends it back (send waits while the client does not
-- read, which is the backpressure the callback echo does by hand).
return {
  serve = function(conn)
    while true do
      local data = conn:receiveany(65536)
      if not data then return end          -- "closed": the client is done
      conn:send(data)
    end
  end,
}
