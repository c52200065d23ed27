-- Installing: `make install` (what `luarocks make` runs, see the rockspec)
-- puts a module that a plain lua5.4 loads from the install tree alone and
-- serves with; and `luarocks make` itself, when luarocks is on the machine.
-- The commands run without the sanitizer runtime the spec process may have
-- preloaded (they are not ours to check).
local function sh(cmd)
  local p = assert(io.popen("env -u LD_PRELOAD sh -c '" .. cmd .. "' 2>&1"))
  local out = p:read("a")
  local ok, _, code = p:close()
  return ok, out, code
end

-- A plain lua5.4 that sees only `tree`: starts a server with a function
-- handler, echoes one line through it, stops it; prints what came back.
local function serve_from(lua_dir, lib_dir)
  local script = [[
local multiloop = require("multiloop")
assert(package.searchpath("multiloop.core", package.cpath):find("TREE", 1, true))
local s = multiloop.server{ port = 0, workers = 2, handler = function(conn)
  conn:on_data(function(d) conn:write(d) end) end }
s:start()
local socket = require("socket")
local c = assert(socket.connect("127.0.0.1", select(2, s:address())))
c:settimeout(5)
c:send("installed\n")
print((c:receive("*l")))
c:close()
s:stop()]]
  script = script:gsub("TREE", lib_dir)
  local f = assert(io.open(lua_dir .. "/check.lua", "w"))
  f:write(script)
  f:close()
  return sh(("LUA_PATH=\"%s/?.lua;%s/?/init.lua;;\" LUA_CPATH=\"%s/?.so;;\" lua5.4 %s/check.lua")
    :format(lua_dir, lua_dir, lib_dir, lua_dir))
end

describe("installing", function()
  local tmp
  before_each(function()
    tmp = os.tmpname()
    os.remove(tmp)
    assert(os.execute("mkdir -p " .. tmp))
  end)
  after_each(function() os.execute("rm -rf " .. tmp) end)

  it("make install puts a module that loads and serves from its tree alone", function()
    local ok, out = sh(("make -s install CHECK_DEPS=no LIBDIR=%s/lib LUADIR=%s/share"):format(tmp, tmp))
    assert(ok, out)
    local served, said = serve_from(tmp .. "/share", tmp .. "/lib")
    assert(served, said)
    assert.are.equal("installed\n", said)
  end)

  it("luarocks make builds and installs from the rockspec", function()
    if not sh("command -v luarocks") then
      pending("luarocks is not installed")
      return
    end
    if os.getenv("SANITIZER") then
      pending("builds plainly only (the sanitizer runs check our code, not the build)")
      return
    end
    -- A copy of the checkout, so that the build leaves ours alone.
    local src = tmp .. "/src"
    local ok, out = sh(("mkdir %s && cp -r Makefile multiloop-scm-1.rockspec src lua %s/ && "
      .. "cd %s && luarocks --lua-version=5.4 make --tree %s/tree"):format(src, src, src, tmp))
    assert(ok, out)
    assert.is_truthy(out:find("multiloop scm%-1 is now installed"), out)
    local served, said = serve_from(tmp .. "/tree/share/lua/5.4", tmp .. "/tree/lib/lua/5.4")
    assert(served, said)
    assert.are.equal("installed\n", said)
  end)
end)
