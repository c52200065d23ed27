-- What follows a line past receive_limit does not depend on how the reads
-- split it (found in the review of issue 14): when the too-long line comes
-- whole (its LF in the same read), its end is consumed with it; when the
-- limit is passed before its LF has arrived, the rest of that line is
-- dropped as it comes, up to and with its LF, so in both cases the next
-- receive("*l") returns the next real line (a line protocol that answers
-- "too long" and goes on never runs an overlong line's tail as a request).
local helper = require("spec.helper")
local socket = require("socket")

describe("serve, a too-long line's tail", function()
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

  it("split before its LF: the same lines (the tail is dropped up to its LF)", function()
    local c = start()
    assert(c:send(string.rep("A", 20)))
    socket.sleep(0.1)                      -- the server reads these alone: past the limit
    assert(c:send(string.rep("A", 10) .. "\nPING\nPONG\n"))
    assert.matches("^nil too long A+$", helper.line(c))
    assert.are.equal("PING", helper.line(c))
  end)
end)
