-- A hostile review of the TLS transport (src/tls.c): STARTTLS with bytes
-- already received, held writes, pause/resume, pipes between TLS and plain
-- connections, and clients that misbehave. Real sockets on 127.0.0.1; the
-- clients are LuaSec over LuaSocket, or the openssl CLI / python3 as a
-- child (#child). The handlers are in spec/fixtures/tls_hostile.lua.
local helper = require("spec.helper")
local socket = require("socket")
local ssl = require("ssl")
local multiloop = require("multiloop")

local d = multiloop.shared("spec.tls_hostile")

-- Throwaway certificates: a self-signed one for localhost / 127.0.0.1 in
-- a fresh directory (removed at the end of the file): its paths.
local function make_certs()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -m 700 " .. dir))
  assert(os.execute(("env -u LD_PRELOAD openssl req -x509 -newkey ec -pkeyopt "
    .. "ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost "
    .. "-addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout %s/key.pem -out %s/cert.pem "
    .. ">/dev/null 2>&1"):format(dir, dir)))
  return { dir = dir, cert = dir .. "/cert.pem", key = dir .. "/key.pem" }
end

local certs = make_certs()
teardown(function() os.execute("rm -rf " .. certs.dir) end)

local function tls_opts(extra)
  local t = { cert = certs.cert, key = certs.key }
  for k, v in pairs(extra or {}) do t[k] = v end
  return t
end

-- LuaSec on a connected LuaSocket client: the TLS client, handshaken.
local function wrap(c, params)
  local p = { mode = "client", protocol = "any", verify = "none", options = "all" }
  for k, v in pairs(params or {}) do p[k] = v end
  local s = assert(ssl.wrap(c, p))
  s:settimeout(helper.TIMEOUT)
  assert(s:dohandshake())
  return s
end

local function tls_connect(port, params)
  local c = helper.connect(port)
  local s = wrap(c, params)
  helper.defer(function() s:close() end)
  return s
end

describe("tls (hostile)", function()
  local server

  after_each(function()
    helper.stop_checked(server)
    server = nil
    d:flush()
  end)

  local function start(case, opts)
    opts = opts or {}
    opts.workers = opts.workers or 1
    opts.handler = opts.handler or "spec.fixtures.tls_hostile"
    opts.config = opts.config or {}
    opts.config.case = case
    local port
    server, port = helper.server(opts)
    return port
  end

  describe("STARTTLS", function()
    it("a line sent in the clear behind STARTTLS is not read as if it came over TLS", function()
      local port = start("starttls", { tls = tls_opts({ starttls = true }) })
      local c = helper.connect(port)
      helper.defer(function() c:close() end)
      -- One segment: the command and a line an attacker slipped in behind it.
      assert(c:send("STARTTLS\r\nINJECTED\r\n"))
      assert.are.equal("220 go", helper.line(c))
      local s, err = ssl.wrap(c, { mode = "client", protocol = "any", verify = "none" })
      assert(s, err)
      s:settimeout(2)
      local ok = s:dohandshake()
      if ok then
        s:send("REAL\n")
        local line = s:receive("*l")
        assert.are_not.equal("got INJECTED", line)
      end
      local res = helper.eventually(function() return d:get("starttls") end)
      assert.are.equal("false conn:sslhandshake: 10 bytes were received and not read before it nil",
                       (res:gsub("^false [^:]*:%d+: ", "false ")))
    end)
  end)
end)
