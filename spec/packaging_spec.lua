-- The rockspec (`luarocks make` builds with its "builtin" type, which lists
-- every file) must name every C source and every Lua module, or an install
-- by luarocks would build a module that fails to load.
local function rockspec()
  local env = {}
  local chunk = assert(loadfile("multiloop-scm-1.rockspec", "t", env))
  chunk()
  return env
end

local function files(pattern_cmd)
  local list = {}
  local p = assert(io.popen(pattern_cmd))
  for line in p:lines() do list[#list + 1] = line end
  p:close()
  table.sort(list)
  return list
end

describe("multiloop-scm-1.rockspec", function()
  local spec = rockspec()

  it("builds multiloop.core from every file in src/*.c", function()
    local sources = {}
    for _, s in ipairs(spec.build.modules["multiloop.core"].sources) do sources[#sources + 1] = s end
    table.sort(sources)
    assert.are.same(files("ls src/*.c"), sources)
  end)

  it("installs every Lua module under lua/", function()
    local listed = {}
    for name, path in pairs(spec.build.modules) do
      if type(path) == "string" then
        listed[#listed + 1] = path
        local expected = "lua/" .. name:gsub("%.", "/")
        assert.is_true(path == expected .. ".lua" or path == expected .. "/init.lua",
          ("module %s is mapped to %s"):format(name, path))
      end
    end
    table.sort(listed)
    assert.are.same(files("find lua -name '*.lua'"), listed)
  end)
end)
