-- examples/stats_counter.lua: one counter shared by every worker and the
-- main state, through a shared dictionary.
--   lua5.4 examples/stats_counter.lua [port]
-- Try it: bash -c 'cat < /dev/tcp/127.0.0.1/7002'   (a few times; then Ctrl-C
-- the server; bash's /dev/tcp, as Debian ships no nc by default)
--
-- Each worker counts every connection it serves with an atomic incr on the
-- dictionary "stats" (the total, and its own key) and tells the client its
-- number. The main state reads the same dictionary: here when the server
-- stops, or at any time through stats_counter.report().
--
-- This file is both the handler module (each worker require()s it and uses
-- its connect) and, run as a script, the program that starts the server.
local multiloop = require("multiloop")

local M = {}

-- In each worker: count this connection, answer, close.
function M.connect(conn)
  local stats = multiloop.shared("stats")
  local n = stats:incr("connections", 1, 0)
  stats:incr("worker " .. conn.worker.id, 1, 0)
  conn:write(("you are visitor #%d (served by worker %d)\n"):format(n, conn.worker.id))
  conn:close()
end

-- In the main state: the total, and the count of each of `workers` workers.
function M.report(workers)
  local stats = multiloop.shared("stats")
  local per = {}
  for id = 1, workers do per[id] = stats:get("worker " .. id) or 0 end
  return stats:get("connections") or 0, per
end

if ... == "examples.stats_counter" then return M end    -- require()d: a worker, or a spec

-- Run as a script. Holding the dictionary here keeps it (and its counts)
-- alive for as long as this program runs, whatever the workers do.
local stats = multiloop.shared("stats")
local server = multiloop.server{
  host = "127.0.0.1",
  port = tonumber(arg[1]) or 7002,
  handler = "examples.stats_counter",
}
server:start()
local host, port = server:address()
print(("multiloop stats counter on %s:%d with %d workers; Ctrl-C stops it")
  :format(host, port, server.workers))
io.stdout:flush()
local signal = server:run()
local _, per = M.report(server.workers)
print(("stopped on %s after %d connections (per worker: %s)")
  :format(signal, stats:get("connections") or 0, table.concat(per, ", ")))
