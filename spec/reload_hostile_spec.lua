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

local function client(port)
  local c = helper.connect(port)
  helper.defer(function() c:close() end)
  return c
end

local function server(opts)
  opts.workers = opts.workers or 1
  local s, port = helper.server(opts)
  helper.defer(function() s:stop() end)
  return s, port
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
end)
