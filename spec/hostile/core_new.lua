-- spec/hostile/core_new.lua: multiloop.core.new called directly with hostile
-- options (past init.lua's checks), and host names at start(). Each bad
-- option must raise naming it; each start must work or fail with a message,
-- leaving no socket file behind.
if not os.getenv("LUA_CPATH") then
  package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
  package.cpath = "./build/?.so;" .. package.cpath
end
local multiloop = require("multiloop")
local core = require("multiloop.core")
local socket = require("socket")

local base = { workers = 1, port = 0, backlog = 16, max_connections = 0, idle_timeout = 0,
  write_high_water = 1024, write_low_water = 0, keepalive_seconds = 0, nodelay = true,
  unlink = false, host = "127.0.0.1", handler_kind = "module", handler = "examples.echo_handler",
  package_path = package.path, package_cpath = package.cpath }
local dir = os.tmpname()
os.remove(dir)
assert(os.execute("mkdir " .. dir))

local raises = {
  path = { ("a"):rep(305), "/tmp/" .. ("a"):rep(103), "/tmp/a\0b", 5, "" },
  host = { ("a"):rep(254), "127.0.0.1\0x", "", false },
  workers = { 0, math.maxinteger, 1.5, "2" },
  port = { -1, 65536 },
  inbox_limit = { 0, 1 << 40, "5" },
  write_low_water = { 1024, 4096.0, -1 },
  handler_kind = { "zzz", false },
  dispatch = { 5 },
  backlog = { 0 },
  keepalive_seconds = { 1 << 40 },
  idle_timeout = { -5 },
  max_connections = { 0 / 0 },
}
for key, values in pairs(raises) do
  for _, v in ipairs(values) do
    local o = {}
    for k, x in pairs(base) do o[k] = x end
    o[key] = v
    if key == "path" then o.host = "" end
    local ok, err = pcall(core.new, o)
    assert(not ok and tostring(err):find("option '" .. key .. "'", 1, true),
      ("%s = %s: %s"):format(key, tostring(v), tostring(err)))
  end
end

-- Starts that may work or fail, but never crash or leave a file.
local function start(o)
  local s = core.new(o)
  local ok, err = s:start()
  if ok then assert(s:stop()) end
  return ok, err
end
local long = dir .. "/" .. ("s"):rep(106 - #dir)
for _, extra in ipairs {
  { path = long, host = "" }, { path = dir .. "/m", host = "", mode = 0 },
  { path = dir .. "/m2", host = "", mode = 511 }, { host = "::zz" }, { host = "no-such-host.invalid" },
} do
  local o = {}
  for k, x in pairs(base) do o[k] = x end
  for k, x in pairs(extra) do o[k] = x end
  local ok, err = start(o)
  assert(ok or type(err) == "string")
end
local p = io.popen("ls -A " .. dir)
local left = p:read("*a")
p:close()
assert(left == "", "left behind: " .. left)
os.execute("rmdir " .. dir)

-- Names resolve at start; server:address() says what was bound.
for _, h in ipairs { "localhost", "::1", "127.0.0.1", "0x7f.1", "a..b", "nosuch.invalid" } do
  for _, dispatch in ipairs { "reuseport", "queue" } do
    local s = multiloop.server{ host = h, port = 0, workers = 2, dispatch = dispatch,
      handler = "examples.echo_handler" }
    local ok, err = pcall(s.start, s)
    if ok then
      local host, port = s:address()
      local c = socket.tcp()
      c:settimeout(2)
      assert(c:connect(host, port))
      c:close()
      s:stop()
    else
      assert(tostring(err):find("resolve '" .. h .. "'", 1, true), err)
    end
  end
end
print("core_new ok")
