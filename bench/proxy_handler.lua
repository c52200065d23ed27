-- bench/proxy_handler.lua: the TCP proxy `make bench` measures beside
-- HAProxy and nginx stream (the proxy scenario) until examples/proxy.lua
-- exists: each accepted connection gets an outbound connection to the
-- upstream (worker.tcp(), connect) and the C-level pipe moves the bytes both
-- ways until both directions are done; no Lua runs per chunk.
-- The upstream comes from the server's config: { upstream = "HOST:PORT" }
-- (bench/ml_server.lua passes upstream=HOST:PORT into it).
local worker, host, port

return {
  init = function(w)
    worker = w
    local up = w.config and w.config.upstream
    host, port = tostring(up):match("^(.+):(%d+)$")
    assert(host, "bench/proxy_handler.lua: config.upstream must be HOST:PORT, got " .. tostring(up))
    port = tonumber(port)
  end,
  serve = function(conn)
    local upstream = worker.tcp()
    local ok, err = upstream:connect(host, port)
    if not ok then
      io.stderr:write("proxy: connect ", host, ":", port, ": ", tostring(err), "\n")
      conn:close()
      return
    end
    conn:pipe(upstream)
  end,
}
