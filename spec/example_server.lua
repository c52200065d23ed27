-- spec/example_server.lua: the server of the running test for the specs
-- that drive the examples over the wire (examples_spec, kv_spec): 2 workers,
-- dispatch "queue", round-robin, so that clients that connect one after
-- another land on alternate workers. `M.server` and `M.port` are the running
-- test's; `after_each(M.stop)` stops it.
local helper = require("spec.helper")
local assert = require("luassert")

local M = {}

function M.serve(opts)
  opts.workers, opts.dispatch, opts.balance = 2, "queue", "round_robin"
  M.server, M.port = helper.server(opts)
  return M.server, M.port
end

function M.stop()
  if not M.server then return end
  local s = M.server
  M.server = nil
  assert.is_true(s:stop())
  assert.are.equal(0, s:stats().active)
end

-- A connected client, closed when the test ends whatever its outcome.
function M.client()
  local c = helper.connect(M.port)
  helper.defer(function() c:close() end)
  return c
end

-- Whether the server has closed c, having sent nothing more.
function M.closed(c)
  local line, err, partial = c:receive("*l")
  return line == nil and err == "closed" and partial == ""
end

-- Sends data, then waits until the server has read all of it, so that
-- whatever is sent next arrives in a read of its own. Only c may be sending.
function M.send_apart(c, data)
  local before = M.server:stats().bytes_in
  assert(c:send(data))
  assert(helper.eventually(function()
    return M.server:stats().bytes_in >= before + #data
  end), ("the server never read %q"):format(data))
end

-- Waits (boundedly) until worker 1 has `one` open connections and worker 2
-- has `two`: a worker counts a connection once it has taken it, and uncounts
-- it once it has closed it, both a little after what a client sees.
function M.expect_spread(one, two)
  local function spread()
    local w = M.server:stats().workers
    return { w[1].active, w[2].active }
  end
  helper.eventually(function()
    local now = spread()
    return now[1] == one and now[2] == two
  end)
  assert.are.same({ one, two }, spread())
end

return M
