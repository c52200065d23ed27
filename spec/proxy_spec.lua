-- examples/proxy.lua: a TCP proxy on conn:pipe, in front of a real
-- redis-server (started here on a free loopback port, stopped by its pid)
-- driven with redis-cli and redis-benchmark, and in front of multiloop
-- upstreams for the round-robin and next-upstream cases.
local helper = require("spec.helper")

local installed, free_port = helper.installed, helper.free_port

-- Runs a command line without any sanitizer runtime preloaded: output, status.
local function run(cmd)
  local p = assert(io.popen(("env -u LD_PRELOAD %s 2>&1"):format(cmd)))
  local out = p:read("a")
  local _, _, status = p:close()
  return out, status
end

describe("examples/proxy.lua", function()
  local server, port, ups = nil, nil, {}
  after_each(function()
    helper.stop_checked(server)
    server = nil
    for _, u in ipairs(ups) do helper.stop_checked(u) end
    ups = {}
  end)

  local function start(upstreams, workers)
    server, port = helper.server({ workers = workers or 1, handler = "examples.proxy",
                                   config = { upstreams = upstreams, connect_timeout = 500 } })
  end

  -- A multiloop upstream that answers each line with its name.
  local function named_upstream(name)
    local u, p = helper.server({ workers = 1, handler = "spec.fixtures.named_upstream",
                                 config = { name = name } })
    ups[#ups + 1] = u
    return "127.0.0.1:" .. p
  end

  it("takes the upstreams in turn, and skips one that refuses", function()
    local dead = "127.0.0.1:" .. free_port()
    start({ named_upstream("a"), dead, named_upstream("b") })
    local seen = {}
    for i = 1, 4 do
      local c = helper.connect(port)
      assert(c:send("who\n"))
      seen[i] = helper.line(c)
      c:close()
    end
    assert.are.same({ "a", "b", "a", "b" }, seen)
    assert.is_true(server:stats().connect_errors >= 1)
  end)

  it("still reaches the good upstream when many clients connect at once past a dead one", function()
    -- Each client's tries start from one place and go round once, whatever
    -- other clients do to the worker's cursor meanwhile.
    local dead = "127.0.0.1:" .. free_port()
    start({ dead, named_upstream("good") })
    local clients = {}
    for i = 1, 32 do
      clients[i] = helper.connect(port)
      assert(clients[i]:send("who\n"))
    end
    for i = 1, 32 do
      local line, err = clients[i]:receive("*l")
      assert.are.same({ "good", nil }, { line, err }, "client " .. i)
      clients[i]:close()
    end
  end)

  it("closes the client when every upstream refuses", function()
    start({ "127.0.0.1:" .. free_port() })
    local c = helper.connect(port)
    local data, err = c:receive("*l")
    assert.are.same({ nil, "closed" }, { data, err })
    c:close()
  end)

  it("proxies redis-cli and redis-benchmark to a real redis-server #child", function()
    if not installed("redis-server") or not installed("redis-cli") then
      pending("redis-server and redis-cli are needed (Debian: redis-server, redis-tools)")
      return
    end
    local redis = assert(helper.start_redis())
    helper.defer(redis.stop)
    local rport = redis.port
    start({ "127.0.0.1:" .. rport }, 2)
    local function cli(args) return (run(("timeout 10 redis-cli -p %d %s"):format(port, args))) end
    assert.are.equal("PONG\n", cli("PING"))
    assert.are.equal("OK\n", cli("SET through proxy"))
    assert.are.equal("proxy\n", cli("GET through"))
    local value = string.rep("v", 200000)            -- a reply bigger than one read
    local file = os.tmpname()
    helper.defer(function() os.remove(file) end)
    local f = assert(io.open(file, "wb"))
    f:write(value)
    f:close()
    assert.are.equal("OK\n", cli("-x SET big < " .. file))   -- -x: the value from stdin
    local got = cli("GET big")
    assert.is_true(got == value .. "\n", ("GET big: %d bytes back"):format(#got))
    local out, status = run(("timeout 60 redis-benchmark -p %d -q -n 2000 -c 8 -t set,get"):format(port))
    assert.is_true(status == 0, out)
    assert.matches("SET: ", out)
    assert.matches("GET: ", out)
    assert.is_nil(out:find("rror"), out)
  end)
end)
