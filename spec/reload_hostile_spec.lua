--- A hostile review of server:reload (issue 18): what the old code can do
-- after the switch, and after its drain_timeout, must not keep its state
-- (and so the next reload) alive, nor touch the new one.
local helper = require("spec.helper")
local multiloop = require("multiloop")
local socket = require("socket")

local CONNECT = "spec/fixtures/reload_hostile_connect.lua"

local ndict = 0
local function dict_name()
  ndict = ndict + 1
  return ("spec.reload_hostile.%d.%d"):format(helper.pid(), ndict)
end

local function say(c, data)
  assert(c:send(data))
  local got, err = c:receive(#data + 2)
  assert(got, err)
  return got
end

local client = helper.client

local function server(opts)
  opts.workers = opts.workers or 1
  return helper.served(opts)
end

-- A loopback listener that never accepts: connects to it succeed (the
-- kernel's backlog) and stay open.
local function upstream()
  local l = assert(socket.bind("127.0.0.1", 0))
  helper.defer(function() l:close() end)
  local _, port = l:getsockname()
  return tonumber(port)
end

describe("server:reload, hostile", function()
  it("an old connection's on_close(\"reload\") cannot open a new connection in the closing old state", function()
    local dict = dict_name()
    local d = multiloop.shared(dict)
    local up = upstream()
    local s, port = server{ handler = CONNECT, drain_timeout = 100,
                            config = { version = "A", dict = dict, upstream = up } }
    local old = client(port)
    assert.are.equal("A x", say(old, "x"))
    assert.is_true(s:reload{ config = { version = "B", dict = dict } })
    old:settimeout(3)
    assert.are.same({ nil, "closed", "" }, { old:receive(1) })   -- drain_timeout closed it
    -- The old state is closing: worker.connect there is refused, so that
    -- nothing it opens can hold it (and the next reload) open for ever.
    assert.is_true(helper.eventually(function() return d:get("late A raised") ~= nil end, 2000))
    assert.are.equal("worker.connect: the old code is closing (reload)",
                     (d:get("late A raised"):gsub("^.-:%d+: ", "")))
    assert.are.equal(nil, d:get("late A ok"))
    assert.is_true(helper.eventually(function() return s:stats().old_connections == 0 end, 2000))
    -- The next reload finds the slot free (with the bug it waited for ever).
    assert.is_true(s:reload{ config = { version = "C", dict = dict } })
    assert.are.equal("C y", say(client(port), "y"))
  end)

  it("a timer asked for as the old state closes (a __gc at lua_close) is refused, not left on the loop", function()
    local dict = dict_name()
    local d = multiloop.shared(dict)
    local s, port = server{ handler = CONNECT, drain_timeout = 100,
                            config = { version = "A", dict = dict, ghost = true } }
    assert.are.equal("A x", say(client(port), "x"))
    assert.is_true(s:reload{ config = { version = "B", dict = dict } })
    -- The old state closes once its connection has (it is closed by now or at drain_timeout).
    assert.is_true(helper.eventually(function()
      return d:get("gc A nil stopped") or d:get("gc A userdata nil")
    end, 3000))
    -- With the bug the timer lived in the freed state's memory and fired from there.
    assert.are.same({ true, nil }, { d:get("gc A nil stopped"), d:get("gc A userdata nil") })
    helper.sleep(100)
    assert.are.equal(nil, d:get("ghost fired"))
    assert.are.equal("B y", say(client(port), "y"))
  end)

  it("gives back fds, threads and pooled connections over many reloads with TLS connections and pools open", function()
    local certs = helper.make_certs()
    helper.defer(certs.remove)
    local l = assert(socket.bind("127.0.0.1", 0))
    helper.defer(function() l:close() end)
    l:settimeout(0)
    local _, up = l:getsockname()
    up = tonumber(up)
    local function accept_all()
      while true do
        local c = l:accept()
        if not c then return end
        c:close()
      end
    end
    local s, port = server{ handler = "spec/fixtures/reload_hostile_pool.lua", drain_timeout = 50,
                            tls = { cert = certs.cert, key = certs.key },
                            config = { version = "A", upstream = up } }
    local function tls_say(c, data)
      assert(c:send(data))
      local got, err = c:receive(data == "pool" and #"A pooled" or #data + 2)
      assert(got, err)
      return got
    end
    local base_fds
    for i = 1, 20 do
      local v = i % 2 == 1 and "A" or "B"
      local c = assert(helper.tls_connect(port))
      assert.are.equal(v .. " pooled", tls_say(c, "pool"))
      assert.is_true(s:reload{ config = { version = i % 2 == 1 and "B" or "A", upstream = up } })
      assert.are.equal(v .. " x", tls_say(c, "x"))          -- the old code, over TLS
      if i == 2 then
        assert.is_true(helper.eventually(function() return s:stats().old_connections == 1 end, 2000))
        base_fds = helper.fd_count()
      end
      if i > 2 then c:close() end                           -- (the spec's own fd)
      accept_all()
    end
    -- Old generations close at drain_timeout (the TLS ones too); their pools went at the switch.
    assert.is_true(helper.eventually(function() accept_all(); return s:stats().old_connections == 0 end, 3000))
    assert.is_true(helper.eventually(function() return s:stats().threads == 0 end, 2000))
    assert.are.equal(0, s:stats().pooled or 0)
    assert.is_true(helper.eventually(function() accept_all(); return helper.fd_count() <= base_fds end, 3000))
  end)

  it("a to-be-closed variable run as the old state closes its threads can neither connect nor start a timer", function()
    local dict = dict_name()
    local d = multiloop.shared(dict)
    local up = upstream()
    local s, port = server{ handler = CONNECT, drain_timeout = 100,
                            config = { version = "A", dict = dict, upstream = up } }
    local old = client(port)
    assert.are.equal("A knot", say(old, "knot"))
    helper.sleep(30)                                         -- a waits for b, b for a
    assert.are.equal(2, s:stats().threads)
    assert.is_true(s:reload{ config = { version = "B", dict = dict } })
    assert.is_true(helper.eventually(function() return s:stats().threads == 0 end, 3000))
    assert.is_true(helper.eventually(function() return d:get("tbc A timer: nil stopped") end, 2000))
    assert.is_true(d:get("tbc A connect: worker.connect: the old code is closing (reload)"))
    helper.sleep(100)
    assert.are.same({ nil, nil }, { d:get("tbc connected"), d:get("tbc timer fired") })
    assert.are.equal("B y", say(client(port), "y"))
  end)

  it("worker.exiting() is true in the old code once a reload has switched away from it", function()
    local dict = dict_name()
    local d = multiloop.shared(dict)
    -- The default drain_timeout (30 s): the old state should not need it.
    local s, port = server{ handler = CONNECT, config = { version = "A", dict = dict, background = true } }
    assert.is_true(helper.eventually(function() return s:stats().threads == 1 end, 2000))
    assert.is_true(s:reload{ config = { version = "B", dict = dict, background = true } })
    -- The old loop ends (with the bug it went on until drain_timeout, and
    -- then spun: worker.sleep answers "stopped" at once, exiting() stayed false).
    assert.is_true(helper.eventually(function() return d:get("background A done") == 1 end, 2000))
    assert.are.equal(nil, d:get("background B done"))
    assert.is_true(helper.eventually(function() return s:stats().threads == 1 end, 2000))
    assert.are.equal("B y", say(client(port), "y"))
    s:stop()
    assert.are.equal(1, d:get("background B done"))
  end)
end)
