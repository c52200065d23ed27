-- TODO (found in the review of issue 14, not fixed): a line past
-- receive_limit is "too long" however the reads split it, but what the next
-- receive("*l") returns depends on the split. When the too-long line comes
-- whole (its LF in the same read), its end is consumed with it and the next
-- line is the next real line; when the limit is passed before its LF has
-- arrived, only the bytes buffered are consumed, and the rest of the long
-- line comes back as a line of its own. A line protocol that answers
-- "too long" and goes on would then run the tail of an overlong line as a
-- request. The fix needs the serve block to remember "drop up to the next
-- LF" across reads (bounded: the dropped bytes are consumed as they come).
-- Run: make test SPECS=spec/hostile/serve_line_tail_todo.lua
local helper = require("spec.helper")
local socket = require("socket")

describe("serve, a too-long line's tail (todo)", function()
  local server, port
  after_each(function()
    if server then assert(server:stop({ timeout = 2000 })) end
    server = nil
  end)

  local function start()
    server, port = helper.server({ workers = 1, handler = "spec.fixtures.hostile_serve",
                                   receive_limit = 16, config = { case = "line_tail" } })
    local c = helper.connect(port)
    helper.defer(function() c:close() end)
    c:setoption("tcp-nodelay", true)
    return c
  end

  it("whole: the too-long line, then the next line", function()
    local c = start()
    assert(c:send(string.rep("A", 30) .. "\nPING\nPONG\n"))
    assert.are.equal("nil too long " .. string.rep("A", 30), helper.line(c))
    assert.are.equal("PING", helper.line(c))
  end)

  it("split before its LF: the same lines (fails: the tail comes back as a line)", function()
    local c = start()
    assert(c:send(string.rep("A", 20)))
    socket.sleep(0.1)                      -- the server reads these alone: past the limit
    assert(c:send(string.rep("A", 10) .. "\nPING\nPONG\n"))
    assert.matches("^nil too long A+$", helper.line(c))
    assert.are.equal("PING", helper.line(c))
  end)
end)
