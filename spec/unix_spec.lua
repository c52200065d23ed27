-- Unix sockets: stop removes only the socket file this server made, and the
-- `mode` option sets the file's permissions before anyone can connect.
local helper = require("spec.helper")
local multiloop = require("multiloop")
local unix = require("socket.unix")

local sock_path, connect = helper.sock_path, helper.connect_unix

local function server(path, extra)
  local o = { path = path, workers = 1, handler = "examples.echo_handler" }
  for k, v in pairs(extra or {}) do o[k] = v end
  local s = multiloop.server(o)
  s:start()
  helper.defer(function() s:stop() end)
  return s
end

-- The permission bits of path as `stat -c %a` prints them ("660"). Through
-- LuaFileSystem (busted needs it, through penlight) rather than a shell,
-- which does not run under TSan.
local function mode_of(path)
  local perms = assert(require("lfs").attributes(path, "permissions"))   -- "rw-rw----"
  local m = 0
  for i = 1, 9 do m = m * 2 + (perms:sub(i, i) == "-" and 0 or 1) end
  return ("%o"):format(m)
end

local function read_file(path)
  local f = assert(io.open(path))
  local s = f:read("*a")
  f:close()
  return s
end

describe("stop() and the socket file", function()
  it("leaves a regular file that replaced the socket", function()
    local path = sock_path()
    local a = server(path)
    assert(os.remove(path))
    local f = assert(io.open(path, "w"))
    f:write("not yours\n")
    f:close()
    a:stop()
    assert.is_true(helper.exists(path))
    assert.are.equal("not yours\n", read_file(path))
  end)

  it("leaves another server's socket bound at the same path", function()
    local path = sock_path()
    local a = server(path)
    assert(os.remove(path))
    local b = server(path)
    a:stop()
    assert.is_true(helper.exists(path))
    local c = connect(path)
    assert.are.equal("still b\n", helper.echo(c, "still b\n"))
    c:close()
    b:stop()
    assert.is_false(helper.exists(path))     -- b's own file: b removes it
  end)

  it("still removes its own socket file, and again after a restart", function()
    local path = sock_path()
    local a = server(path)
    a:stop()
    assert.is_false(helper.exists(path))
    a:start()
    assert.is_true(helper.exists(path))
    a:stop()
    assert.is_false(helper.exists(path))
  end)

  it("reports the whole path, up to 107 bytes", function()
    local path = "/tmp/multiloop-unix-spec-" .. helper.pid() .. "-"
    path = path .. ("s"):rep(107 - #path)
    assert.are.equal(107, #path)
    os.remove(path)
    helper.defer(function() os.remove(path) end)
    local a = server(path)
    assert.are.equal(path, a:address())
    local c = connect(path)
    assert.are.equal("long\n", helper.echo(c, "long\n"))
    c:close()
    a:stop()
    assert.is_false(helper.exists(path))
  end)
end)

describe("the mode option", function()
  for _, case in ipairs { { "0660", "660" }, { "600", "600" }, { "0777", "777" }, { "0000", "0" } } do
    it(("sets mode %s on the socket file"):format(case[1]), function()
      local path = sock_path()
      local s = server(path, { mode = case[1] })
      assert.are.equal(case[2], mode_of(path))
      if case[1] ~= "0000" then
        local c = connect(path)
        assert.are.equal("m\n", helper.echo(c, "m\n"))
        c:close()
      end
      s:stop()
    end)
  end

  it("applies to the socket made after a stale file is removed (unlink = true)", function()
    local path = sock_path()
    local stale = assert(unix.stream())
    assert(stale:bind(path))
    stale:close()
    server(path, { mode = "0640", unlink = true })
    assert.are.equal("640", mode_of(path))
  end)

  local function error_of(o)
    local ok, err = pcall(multiloop.server, o)
    assert.is_false(ok)
    return (tostring(err):gsub("^[^:]*:%d+: ", ""))
  end
  local bad = {
    { "0668", "'0668'" }, { "1777", "'1777'" }, { "66", "'66'" }, { "", "''" },
    { "0o660", "'0o660'" }, { 432, "432" }, { true, "true" },
  }
  for _, case in ipairs(bad) do
    it("rejects mode " .. case[2], function()
      assert.are.equal("multiloop.server: option 'mode' must be a string of 3 or 4 octal "
        .. "digits from '000' to '0777', such as '0660' (got " .. case[2] .. ")",
        error_of{ path = "/tmp/x.sock", mode = case[1], handler = "examples.echo_handler" })
    end)
  end

  it("applies only to a Unix socket", function()
    assert.are.equal("multiloop.server: option 'mode' applies only to a Unix socket (path)",
      error_of{ port = 0, mode = "0660", handler = "examples.echo_handler" })
  end)
end)
