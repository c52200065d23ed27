-- Packaging: the license, the rockspec, what the Makefile installs and
-- when, what spec/run.sh prints; `make install` (what `luarocks make` runs,
-- see the rockspec) puts a module that a plain lua5.4 loads from the install
-- tree alone and serves with; and `luarocks make` and `luarocks test`
-- themselves, when luarocks is on the machine. The commands run without the
-- sanitizer runtime the spec process may have preloaded (they are not ours
-- to check), and without the make variables of the `make test` that runs
-- this file.
local function sh(cmd)
  local p = assert(io.popen("env -u LD_PRELOAD -u MAKEFLAGS -u MFLAGS -u MAKELEVEL sh -c '"
    .. cmd .. "' 2>&1"))
  local out = p:read("a")
  local ok, _, code = p:close()
  return ok, out, code
end

local function read(path)
  local f = assert(io.open(path))
  local s = f:read("a")
  f:close()
  return s
end

local function write(path, s)
  local f = assert(io.open(path, "w"))
  f:write(s)
  f:close()
end

local function last_line(s) return s:match("([^\n]*)\n?$") end

local function mktemp()
  local tmp = os.tmpname()
  os.remove(tmp)
  assert(os.execute("mkdir -p " .. tmp))
  return tmp
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
  write(lua_dir .. "/check.lua", script)
  return sh(("LUA_PATH=\"%s/?.lua;%s/?/init.lua;;\" LUA_CPATH=\"%s/?.so;;\" lua5.4 %s/check.lua")
    :format(lua_dir, lua_dir, lib_dir, lua_dir))
end

describe("installing", function()
  local tmp
  before_each(function() tmp = mktemp() end)
  after_each(function() os.execute("rm -rf " .. tmp) end)

  -- The installed command checks a handler file: the module, the Lua files
  -- and a worker's state all come from the tree (env: what sets the paths).
  local function command_checks(command, env)
    write(tmp .. "/handler.lua", "return function(conn) conn:close() end\n")
    return sh(("cd %s && %s %s handler.lua --check"):format(tmp, env, command))
  end

  it("make install puts a module that loads and serves from its tree alone, and the command", function()
    local ok, out = sh(("make -s install CHECK_DEPS=no LIBDIR=%s/lib LUADIR=%s/share BINDIR=%s/bin")
      :format(tmp, tmp, tmp))
    assert(ok, out)
    for _, f in ipairs { "init", "shared", "worker", "ngx", "check" } do      -- every Lua file
      assert.are.equal(read("lua/multiloop/" .. f .. ".lua"), read(tmp .. "/share/multiloop/" .. f .. ".lua"))
    end
    local served, said = serve_from(tmp .. "/share", tmp .. "/lib")
    assert(served, said)
    assert.are.equal("installed\n", said)
    assert.are.equal(read("bin/multiloop"), read(tmp .. "/bin/multiloop"))
    ok, out = command_checks(tmp .. "/bin/multiloop", ("LUA_PATH=\"%s/share/?.lua;%s/share/?/init.lua;;\" "
      .. "LUA_CPATH=\"%s/lib/?.so;;\""):format(tmp, tmp, tmp))
    assert(ok, out)
    assert.are.equal("multiloop: --check: handler.lua loads and the options are good\n", out)
  end)

  it("make install with BINDIR empty installs no command", function()
    local ok, out = sh(("make -s install CHECK_DEPS=no LIBDIR=%s/lib LUADIR=%s/share BINDIR= && ls %s")
      :format(tmp, tmp, tmp))
    assert(ok, out)
    assert.are.equal("lib\nshare\n", out)
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
    local ok, out = sh(("mkdir %s && cp -r Makefile multiloop-scm-1.rockspec src lua bin %s/ && "
      .. "cd %s && luarocks --lua-version=5.4 make --tree %s/tree"):format(src, src, src, tmp))
    assert(ok, out)
    assert.is_truthy(out:find("multiloop scm%-1 is now installed"), out)
    local served, said = serve_from(tmp .. "/tree/share/lua/5.4", tmp .. "/tree/lib/lua/5.4")
    assert(served, said)
    assert.are.equal("installed\n", said)
    -- The command, through luarocks' wrapper, which sets the tree's paths.
    ok, out = command_checks(tmp .. "/tree/bin/multiloop", "env -u LUA_PATH -u LUA_CPATH")
    assert(ok, out)
    assert.are.equal("multiloop: --check: handler.lua loads and the options are good\n", out)
  end)

  it("luarocks test builds and runs the specs as make test does, with no network", function()
    if not sh("command -v luarocks") then
      pending("luarocks is not installed")
      return
    end
    if os.getenv("SANITIZER") then
      pending("builds plainly only (the sanitizer runs check our code, not the build)")
      return
    end
    -- A copy with no build/ and one small spec: it passes only if the
    -- module `luarocks test` built there serves.
    local src = tmp .. "/src"
    local ok, out = sh(("mkdir %s && cp -r Makefile multiloop-scm-1.rockspec .busted src lua %s/ && "
      .. "mkdir %s/spec && cp spec/run.sh %s/spec/"):format(src, src, src, src))
    assert(ok, out)
    write(src .. "/spec/rock_spec.lua", [[
describe("the rock", function()
  it("serves from the module luarocks test built here", function()
    local multiloop = require("multiloop")
    assert.are.equal("./build/multiloop/core.so", package.searchpath("multiloop.core", package.cpath))
    local s = multiloop.server{ port = 0, workers = 1, handler = function(conn)
      conn:on_data(function(d) conn:write(d) end) end }
    s:start()
    finally(function() s:stop() end)
    local c = assert(require("socket").connect("127.0.0.1", select(2, s:address())))
    c:settimeout(5)
    c:send("rock\n")
    assert.are.equal("rock", (c:receive("*l")))
    c:close()
  end)
end)]])
    -- No network where the machine lets us take it away: a network
    -- namespace of our own with only loopback up.
    local cmd = "luarocks --lua-version=5.4 test -- SPECS=spec/rock_spec.lua"
    local offline = sh("unshare -n sh -c \"ip link set lo up\" >/dev/null 2>&1")
    if offline then cmd = "unshare -n sh -c \"ip link set lo up && " .. cmd .. "\"" end
    ok, out = sh(("cd %s && %s"):format(src, cmd))
    assert(ok, out)
    assert.are.equal("1 passed, 0 failed", last_line(out), out)
  end)
end)

describe("the license and the rockspec", function()
  local function rockspec()
    local env = {}
    assert(loadfile("multiloop-scm-1.rockspec", "t", env))()
    return env
  end

  it("LICENSE is the MIT license the rockspec names", function()
    local text = read("LICENSE")
    assert.truthy(text:find("^MIT License\n"), text)
    assert.truthy(text:find("Copyright (c) 2026 the multiloop authors", 1, true), text)
    assert.truthy(text:find("Permission is hereby granted, free of charge", 1, true), text)
    assert.are.equal("MIT", rockspec().description.license)
  end)

  it("says what it is, where it runs, and tests offline with make test", function()
    local r = rockspec()
    assert.are.equal("string", type(r.description.detailed))
    assert.truthy(#r.description.detailed > 200, r.description.detailed)
    assert.are.same({ "linux" }, r.supported_platforms)
    assert.are.same({ type = "command", command = "make test" }, r.test)
    -- busted and LuaSocket come from Debian, where luarocks cannot see
    -- them: listing them would send `luarocks test` to a rocks server.
    assert.is_nil(r.test_dependencies)
  end)
end)

describe("the Makefile's Debian packages", function()
  local tmp
  before_each(function() tmp = mktemp() end)
  after_each(function() os.execute("rm -rf " .. tmp) end)

  -- Runs make with two packages that do not exist, one for the build and
  -- one for the tests, and an "installer" that only prints what it would
  -- run. LUA=false and an unusable BENCH_BUILD stop a goal at once should
  -- the check ever let it through (no server, no benchmark).
  local function make(goal)
    return sh(("make %s BUILD=%s/b BUILD_PACKAGES=\"gcc multiloop-missing-build\" "
      .. "TEST_PACKAGES=multiloop-missing-test LINT_PACKAGES=multiloop-missing-test "
      .. "SUDO=echo LUA=false BENCH_BUILD=/dev/null/bench"):format(goal, tmp))
  end

  for _, case in ipairs {
    { "", "multiloop-missing-build" },
    { "build", "multiloop-missing-build" },
    { "lint", "multiloop-missing-build multiloop-missing-test" },
    { "asan", "multiloop-missing-build multiloop-missing-test" },
    { "tsan", "multiloop-missing-build multiloop-missing-test" },
    { "valgrind", "multiloop-missing-build multiloop-missing-test" },
    { "bench", "multiloop-missing-build" },
  } do
    local goal, names = case[1], case[2]
    it(("`make%s` installs nothing: it stops at once, naming what is missing")
        :format(goal ~= "" and " " .. goal or ""), function()
      local ok, out = make(goal)
      assert.is_falsy(ok, out)
      assert.truthy(out:find(("multiloop: missing Debian packages: %s; run 'make deps'\n"):format(names),
        1, true), out)
      assert.is_falsy(out:find("apt-get", 1, true), out)
      assert.is_falsy(out:find("-fPIC", 1, true), out)             -- nothing was compiled
    end)
  end

  for _, case in ipairs {
    { "test", "multiloop-missing-build multiloop-missing-test" },
    { "run", "multiloop-missing-build" },
  } do
    local goal, names = case[1], case[2]
    it(("`make %s` installs what is missing, then checks again"):format(goal), function()
      local ok, out = make(goal)
      assert.is_falsy(ok, out)                       -- "installed" by echo only
      assert.truthy(out:find(("multiloop: installing missing Debian packages: %s\n"):format(names),
        1, true), out)
      assert.truthy(out:find("apt-get install -y -q --no-install-recommends " .. names .. "\n", 1, true), out)
      assert.truthy(out:find(("multiloop: missing Debian packages: %s; run 'make deps'\n"):format(names),
        1, true), out)
      assert.is_falsy(out:find("-fPIC", 1, true), out)
    end)
  end

  it("`make deps` installs whatever is missing, and does nothing when nothing is", function()
    local ok, out = make("deps")
    assert.is_falsy(ok, out)
    assert.truthy(out:find("apt-get install -y -q --no-install-recommends "
      .. "multiloop-missing-build multiloop-missing-test\n", 1, true), out)
    ok, out = sh("make deps SUDO=echo BUILD_PACKAGES=gcc TEST_PACKAGES=lua5.4")
    assert(ok, out)
    assert.is_falsy(out:find("apt-get", 1, true), out)
  end)
end)

describe("spec/run.sh", function()
  local tmp
  before_each(function() tmp = mktemp() end)
  after_each(function() os.execute("rm -rf " .. tmp) end)

  -- Runs spec/run.sh on spec files made from `bodies` (name -> source),
  -- keeping their stderr in tmp/logs.
  local function run(bodies, lua)
    local files = {}
    for name, body in pairs(bodies) do
      write(tmp .. "/" .. name, body)
      files[#files + 1] = tmp .. "/" .. name
    end
    table.sort(files)
    return sh(("LUA=\"%s\" SPEC_LOGS=%s/logs sh spec/run.sh %s")
      :format(lua or "lua5.4", tmp, table.concat(files, " ")))
  end

  local noisy = [[
describe("noisy", function()
  it("writes an expected traceback to stderr", function()
    io.stderr:write("multiloop: worker 1: expected traceback for the log\n")
  end)
end)]]

  it("keeps each file's stderr in a log, out of the output", function()
    local ok, out = run { ["noisy_spec.lua"] = noisy }
    assert(ok, out)
    assert.is_falsy(out:find("expected traceback for the log", 1, true), out)
    assert.truthy(out:find("# stderr of each spec file: " .. tmp .. "/logs/\n", 1, true), out)
    assert.truthy(out:find("\nok 1 - noisy writes an expected traceback to stderr\n", 1, true), out)
    assert.are.equal("1 passed, 0 failed", last_line(out))
    assert.truthy(read(tmp .. "/logs/noisy_spec.stderr"):find("expected traceback for the log", 1, true))
  end)

  it("prints the tail of a failing file's stderr", function()
    local ok, out = run {
      ["noisy_spec.lua"] = noisy,
      ["zfails_spec.lua"] = [[
describe("fails", function()
  it("after saying why on stderr", function()
    io.stderr:write("the reason it failed\n")
    assert.are.equal(1, 2)
  end)
end)]],
    }
    assert.is_falsy(ok, out)
    assert.is_falsy(out:find("expected traceback for the log", 1, true), out)
    assert.truthy(out:find("# last 60 lines of " .. tmp .. "/logs/zfails_spec.stderr:\n#   the reason it failed\n",
      1, true), out)
    assert.are.equal("1 passed, 1 failed", last_line(out))
  end)

  it("fails a file whose tests pass when the process then reports an error (sanitizers)", function()
    -- A stand-in for a sanitizer's exit-time report: the tests pass, then
    -- the process says why on stderr and exits with ASan's exitcode.
    write(tmp .. "/lua.sh", "lua5.4 \"$@\"; echo \"ERROR: LeakSanitizer: detected memory leaks\" >&2; exit 86\n")
    local ok, out = run({ ["noisy_spec.lua"] = noisy }, "sh " .. tmp .. "/lua.sh")
    assert.is_falsy(ok, out)
    assert.truthy(out:find("busted exited with status 86 and reported no failure: counted as one", 1, true), out)
    assert.truthy(out:find("#   ERROR: LeakSanitizer: detected memory leaks\n", 1, true), out)
    assert.are.equal("1 passed, 1 failed", last_line(out))
  end)
end)
