-- bench/report.lua: turns the measurements of bench/run.sh into the table
-- bench/results/latest.txt, the plot bench/results/ops_per_cpu.png and
-- BENCHMARKS.md. Re-runnable on its own (make bench-report) from
-- bench/results/raw.tsv and bench/results/meta.txt; bench/notes.md, when
-- present, is copied in as the "Observations" section.
--   lua5.4 bench/report.lua [results dir]
local dir = arg[1] or "bench/results"

local SERVERS = { "multiloop", "ml-serve", "ref-c", "luv", "node", "nginx-lua" }
local PEERS = { "ref-c", "luv", "node", "nginx-lua" }
local SERVER_TITLE = {
  multiloop = "multiloop", ["ml-serve"] = "multiloop serve-style", ["ref-c"] = "raw C (ref_server)",
  luv = "luv (1 loop)", node = "Node.js cluster", ["nginx-lua"] = "nginx + Lua",
  redis = "redis-server", haproxy = "HAProxy (nbthread 1)", ["nginx-stream"] = "nginx stream (1 worker)",
  ["ml-proxy"] = "multiloop's proxy",
}
-- Reported in sections of their own (not in SCENARIOS): callgrind's
-- instructions per echoed message, and examples/kv.lua against redis-server.
local IR_SCENARIOS = { { id = "echo-ir-p1", depth = 1 }, { id = "echo-ir-p16", depth = 16 } }
local KV_SCENARIOS = {
  { id = "kv-set-p16", test = "SET", p = 16, goal = 0.5 }, { id = "kv-get-p16", test = "GET", p = 16, goal = 0.5 },
  { id = "kv-set-p1", test = "SET", p = 1, goal = 0.9 }, { id = "kv-get-p1", test = "GET", p = 1, goal = 0.9 },
}
-- The proxy scenarios (issue 15): multiloop's proxy against HAProxy and nginx
-- stream in front of the raw-C echo, per proxy CPU-second and under callgrind.
local PROXY_SCENARIOS = { { id = "proxy-p1", depth = 1 }, { id = "proxy-p16", depth = 16 } }
local PROXY_IR_SCENARIOS = { { id = "proxy-ir-p1", depth = 1 }, { id = "proxy-ir-p16", depth = 16 } }
local PROXY_SERVERS = { "multiloop", "haproxy", "nginx-stream" }
-- lua-resty-redis GETs through multiloop.ngx, pooled and not (servers
-- "pool" and "connect" of the scenario "redis-pool").
local SCENARIOS = {
  { id = "echo-p1", title = "echo, 64 conns x 64 B, 1 in flight", unit = "msg" },
  { id = "echo-p16", title = "echo, 64 conns x 64 B, 16 in flight", unit = "msg" },
  { id = "connrate", title = "connect/send 64 B/read/close, 32 loops", unit = "conn" },
  { id = "http", title = "HTTP hello, wrk 64 conns keep-alive", unit = "req" },
  { id = "connrate-ipc", title = "connrate, dispatch ipc", unit = "conn" },
  { id = "connrate-queue", title = "connrate, dispatch queue", unit = "conn" },
  { id = "connrate-reuseport", title = "connrate, dispatch reuseport", unit = "conn" },
  { id = "idle-mem", title = "memory per idle connection", unit = "bytes" },
}

-- --- reading -----------------------------------------------------------------

local function read_meta()
  local meta = {}
  local f = io.open(dir .. "/meta.txt")
  if f then
    for line in f:lines() do
      local k, v = line:match("^([%w_]+)=(.*)$")
      if k then meta[k] = v end
    end
    f:close()
  end
  return meta
end

local function read_rows()
  local f = assert(io.open(dir .. "/raw.tsv"), "no " .. dir .. "/raw.tsv: run make bench first")
  local header, rows = nil, {}
  for line in f:lines() do
    local fields = {}
    for v in (line .. "\t"):gmatch("([^\t]*)\t") do fields[#fields + 1] = v end
    if not header then
      header = fields
    else
      local row = {}
      for i, name in ipairs(header) do row[name] = tonumber(fields[i]) or fields[i] end
      rows[#rows + 1] = row
    end
  end
  f:close()
  return rows
end

-- --- statistics --------------------------------------------------------------

local function median(list)
  if #list == 0 then return nil end
  local s = {}
  for i, v in ipairs(list) do s[i] = v end
  table.sort(s)
  local m = (#s + 1) // 2
  if #s % 2 == 1 then return s[m] end
  return (s[m] + s[m + 1]) / 2
end

local function range(list)
  local lo, hi = math.huge, -math.huge
  for _, v in ipairs(list) do lo, hi = math.min(lo, v), math.max(hi, v) end
  return lo, hi
end

local function si(v)
  if v == nil then return "-" end
  if v >= 1e6 then return ("%.2fM"):format(v / 1e6) end
  if v >= 1e4 then return ("%.1fk"):format(v / 1e3) end
  if v >= 1e3 then return ("%.2fk"):format(v / 1e3) end
  return ("%.0f"):format(v)
end

-- 2498 -> "2,498"
local function int(v)
  local t = ("%.0f"):format(v)
  local sign, digits = t:match("^(-?)(%d+)$")
  return sign .. digits:reverse():gsub("(%d%d%d)", "%1,"):reverse():gsub("^,", "")
end

local function us(v)
  if type(v) ~= "number" then return "-" end
  if v >= 10000 then return ("%.1f ms"):format(v / 1000) end
  if v >= 1000 then return ("%.2f ms"):format(v / 1000) end
  return ("%.0f us"):format(v)
end

-- groups[workers][scenario][server] = { rows }
local function group(rows)
  local g = {}
  for _, r in ipairs(rows) do
    local w = g[r.workers] or {}
    g[r.workers] = w
    local s = w[r.scenario] or {}
    w[r.scenario] = s
    local list = s[r.server] or {}
    s[r.server] = list
    list[#list + 1] = r
  end
  return g
end

local function column(list, name)
  local out = {}
  for _, r in ipairs(list or {}) do
    if type(r[name]) == "number" then out[#out + 1] = r[name] end
  end
  return out
end

-- Per-repeat ratios a/b of one column, paired by repeat.
local function ratios(a, b, name)
  local by, out = {}, {}
  for _, r in ipairs(b or {}) do by[r["repeat"]] = r[name] end
  for _, r in ipairs(a or {}) do
    local d = by[r["repeat"]]
    if type(r[name]) == "number" and type(d) == "number" and d > 0 then
      out[#out + 1] = r[name] / d
    end
  end
  return out
end

local function ratio_text(list)
  if #list == 0 then return "-" end
  local lo, hi = range(list)
  if #list == 1 then return ("%.2fx"):format(list[1]) end
  return ("%.2fx (%.2f-%.2f)"):format(median(list), lo, hi)
end

local function spread_text(list, fmt)
  fmt = fmt or si
  if #list == 0 then return "-" end
  local m = median(list)
  if #list == 1 then return fmt(m) end
  local lo, hi = range(list)
  return ("%s (%s-%s)"):format(fmt(m), fmt(lo), fmt(hi))
end

-- --- output ------------------------------------------------------------------

local meta = read_meta()
local rows = read_rows()
local g = group(rows)
local workers_list = {}
for w in pairs(g) do workers_list[#workers_list + 1] = w end
table.sort(workers_list)

-- The table: one line per workers x scenario x server.
local lines = {}
local function add(s) lines[#lines + 1] = s end
local md_rows = {}
for _, w in ipairs(workers_list) do
  for _, sc in ipairs(SCENARIOS) do
    local by_server = g[w][sc.id]
    if by_server then
      for _, server in ipairs(SERVERS) do
        local list = by_server[server]
        if list then
          local entry = { w = w, sc = sc, server = server }
          if sc.id == "idle-mem" then
            entry.value = spread_text(column(list, "bytes_per_conn"))
            entry.vs_ref = server == "ref-c" and "1.00x" or
              ratio_text(ratios(list, by_server["ref-c"], "bytes_per_conn"))
          else
            entry.rate = si(median(column(list, "ops_per_s")))
            entry.value = spread_text(column(list, "ops_per_cpu"))
            local m = median(column(list, "ops_per_cpu"))
            entry.cpu_op = m and m > 0 and ("%.2f us"):format(1e6 / m) or "-"
            entry.vs_ref = server == "ref-c" and "1.00x" or
              ratio_text(ratios(list, by_server["ref-c"], "ops_per_cpu"))
            entry.util = ("%.0f%%"):format(100 * (median(column(list, "cpu_s")) or 0)
              / tonumber(meta.seconds or 5))
            entry.p50 = us(median(column(list, "p50_us")))
            entry.p99 = us(median(column(list, "p99_us")))
            entry.p999 = us(median(column(list, "p999_us")))
          end
          local errs = 0
          for _, e in ipairs(column(list, "errors")) do errs = errs + e end
          entry.errors = errs
          md_rows[#md_rows + 1] = entry
        end
      end
    end
  end
end

add(("multiloop benchmarks, %s (%s repeat(s) of %s s; %s)"):format(meta.date or "?",
  meta.repeats or "?", meta.seconds or "?", meta.quick == "1" and "BENCH_QUICK smoke run" or "full run"))
add(("machine: %s CPUs, %s, %s"):format(meta.nproc or "?", meta.cpu or "?", meta.kernel or "?"))
add(("dispatch: %s for multiloop and ref-c unless the scenario names another"):format(meta.dispatch or "?"))
add("")
add(("%-18s %2s  %-10s %10s  %-26s %-20s %5s %9s %9s %9s %6s"):format("scenario", "w", "server",
  "ops/s", "ops per server CPU-s", "vs ref-c", "cpu", "p50", "p99", "p99.9", "errors"))
for _, e in ipairs(md_rows) do
  if e.sc.id == "idle-mem" then
    add(("%-18s %2d  %-10s %10s  %-26s %-20s %5s %9s %9s %9s %6d"):format(e.sc.id, e.w, e.server,
      "-", e.value .. " B/conn", e.vs_ref, "-", "-", "-", "-", e.errors))
  else
    add(("%-18s %2d  %-10s %10s  %-26s %-20s %5s %9s %9s %9s %6d"):format(e.sc.id, e.w, e.server,
      e.rate, e.value, e.vs_ref, e.util, e.p50, e.p99, e.p999, e.errors))
  end
end
add("")
add("ops per server CPU-s: median (min-max) over repeats; vs ref-c: median (min-max) of the")
add("per-repeat ratios; cpu: server CPU time / wall time (100% = one core busy).")
-- Callgrind: Ir per op for each server measured, with its ratio to the raw-C
-- reference and to the callback echo, per repeat.
local g1 = g[1] or {}
local ir_servers = {}
do
  local seen = {}
  for _, sc in ipairs(IR_SCENARIOS) do
    for server in pairs(g1[sc.id] or {}) do seen[server] = true end
  end
  for _, s in ipairs({ "multiloop", "ml-serve", "ref-c" }) do
    if seen[s] then ir_servers[#ir_servers + 1] = s; seen[s] = nil end
  end
  local rest = {}
  for s in pairs(seen) do rest[#rest + 1] = s end
  table.sort(rest)
  for _, s in ipairs(rest) do ir_servers[#ir_servers + 1] = s end
end
local ir_lines = {}          -- { depth, server, Ir/op text, vs ref-c, vs callback }
for _, sc in ipairs(IR_SCENARIOS) do
  local by_server = g1[sc.id]
  for _, server in ipairs(by_server and ir_servers or {}) do
    local list = by_server[server]
    if list then
      ir_lines[#ir_lines + 1] = {
        depth = sc.depth, server = server, ir = spread_text(column(list, "ir_per_op"), int),
        vs_ref = server == "ref-c" and "1.00x" or ratio_text(ratios(list, by_server["ref-c"], "ir_per_op")),
        vs_cb = server == "multiloop" and "1.00x" or
          ratio_text(ratios(list, by_server.multiloop, "ir_per_op")),
        rate = si(median(column(list, "ops_per_s"))),
      }
    end
  end
end
if #ir_lines > 0 then
  add("")
  add("echo-ir: user-space instructions (callgrind Ir) per echoed message, 1 worker under")
  add(("valgrind, 16 conns x 64 B for %s s; median (min-max) over repeats"):format(meta.ir_seconds or "?"))
  add(("%-11s %-10s %-22s %-20s %-20s %s"):format("in flight", "server", "Ir per op", "vs ref-c",
    "vs callback echo", "ops/s under callgrind"))
  for _, l in ipairs(ir_lines) do
    add(("%-11d %-10s %-22s %-20s %-20s %s"):format(l.depth, l.server, l.ir, l.vs_ref, l.vs_cb, l.rate))
  end
end

-- examples/kv.lua (server "multiloop") against redis-server: requests per
-- server CPU-second, and their ratio per repeat.
local kv_lines = {}
for _, sc in ipairs(KV_SCENARIOS) do
  local by_server = g1[sc.id]
  if by_server and (by_server.multiloop or by_server.redis) then
    kv_lines[#kv_lines + 1] = {
      sc = sc, kv = spread_text(column(by_server.multiloop, "ops_per_cpu")),
      redis = spread_text(column(by_server.redis, "ops_per_cpu")),
      ratio = ratios(by_server.multiloop, by_server.redis, "ops_per_cpu"),
      kv_rate = si(median(column(by_server.multiloop, "ops_per_s"))),
      redis_rate = si(median(column(by_server.redis, "ops_per_s"))),
    }
  end
end
if #kv_lines > 0 then
  add("")
  add(("kv: %s (1 worker) against redis-server %s, both pinned to CPU 0; redis-benchmark -c 50")
    :format(meta.kv_handler or "examples.kv", meta.redis or "?"))
  add("on CPU 1; requests per server CPU-second, median (min-max); kv/redis per repeat")
  add(("%-6s %-4s %-26s %-26s %-20s %s"):format("test", "-P", "kv req per CPU-s", "redis req per CPU-s",
    "kv / redis", "target"))
  for _, l in ipairs(kv_lines) do
    add(("%-6s %-4d %-26s %-26s %-20s >= %.1fx"):format(l.sc.test, l.sc.p, l.kv, l.redis,
      ratio_text(l.ratio), l.sc.goal))
  end
end

-- The proxy: proxied echoes per proxy CPU-second, and multiloop's over each
-- peer's per repeat; then callgrind's Ir per proxied echo.
local proxy_lines = {}
for _, sc in ipairs(PROXY_SCENARIOS) do
  local by_server = g1[sc.id]
  if by_server then
    local l = { sc = sc, cells = {}, rates = {}, p99 = {}, errors = {} }
    for i, server in ipairs(PROXY_SERVERS) do
      local list = by_server[server]
      l.cells[i] = list and spread_text(column(list, "ops_per_cpu")) or "-"
      l.rates[i] = list and si(median(column(list, "ops_per_s"))) or "-"
      l.p99[i] = list and us(median(column(list, "p99_us"))) or "-"
      local errs = 0
      for _, e in ipairs(column(list, "errors")) do errs = errs + e end
      l.errors[i] = list and errs or "-"
    end
    l.vs_haproxy = ratios(by_server.multiloop, by_server.haproxy, "ops_per_cpu")
    l.vs_nginx = ratios(by_server.multiloop, by_server["nginx-stream"], "ops_per_cpu")
    proxy_lines[#proxy_lines + 1] = l
  end
end
if #proxy_lines > 0 then
  add("")
  add(("proxy: 64 conns x 64 B through a 1-worker proxy (%s; CPU 0) to the raw-C echo (CPU 1,")
    :format(meta.proxy_handler or "?"))
  add("with the load generator); proxied echoes per proxy CPU-second, median (min-max);")
  add("multiloop / peer per repeat")
  add(("%-10s %-22s %-22s %-22s %-20s %s"):format("in flight", "multiloop", "haproxy", "nginx-stream",
    "ml / haproxy", "ml / nginx-stream"))
  for _, l in ipairs(proxy_lines) do
    add(("%-10d %-22s %-22s %-22s %-20s %s"):format(l.sc.depth, l.cells[1], l.cells[2], l.cells[3],
      ratio_text(l.vs_haproxy), ratio_text(l.vs_nginx)))
  end
end
local proxy_ir_lines = {}
for _, sc in ipairs(PROXY_IR_SCENARIOS) do
  local by_server = g1[sc.id]
  for _, server in ipairs(by_server and PROXY_SERVERS or {}) do
    local list = by_server[server]
    if list then
      proxy_ir_lines[#proxy_ir_lines + 1] = {
        depth = sc.depth, server = server, ir = spread_text(column(list, "ir_per_op"), int),
        vs_ml = server == "multiloop" and "1.00x" or ratio_text(ratios(by_server.multiloop, list, "ir_per_op")),
        rate = si(median(column(list, "ops_per_s"))),
      }
    end
  end
end
if #proxy_ir_lines > 0 then
  add("")
  add("proxy-ir: user-space instructions (callgrind Ir) per proxied echo, the proxy under")
  add(("valgrind in front of the raw-C echo, 16 conns x 64 B for %s s; median (min-max)")
    :format(meta.ir_seconds or "?"))
  add(("%-11s %-14s %-22s %-20s %s"):format("in flight", "proxy", "Ir per op", "multiloop / this",
    "ops/s under callgrind"))
  for _, l in ipairs(proxy_ir_lines) do
    add(("%-11d %-14s %-22s %-20s %s"):format(l.depth, l.server, l.ir, l.vs_ml, l.rate))
  end
end
local pool_line
do
  local by_server = g1["redis-pool"]
  if by_server then
    pool_line = {
      pool = spread_text(column(by_server.pool, "ops_per_cpu")),
      connect = spread_text(column(by_server.connect, "ops_per_cpu")),
      ratio = ratios(by_server.pool, by_server.connect, "ops_per_cpu"),
      pool_rate = si(median(column(by_server.pool, "ops_per_s"))),
      connect_rate = si(median(column(by_server.connect, "ops_per_s"))),
    }
    add("")
    add("redis-pool: lua-resty-redis GET round trips per worker CPU-second (1 worker, CPU 0;")
    add(("redis-server %s on CPU 1), one GET per message, 64 conns x 64 B, 1 in flight"):format(meta.redis or "?"))
    add(("%-26s %-26s %s"):format("set_keepalive (pooled)", "new connection each GET", "pooled / new"))
    add(("%-26s %-26s %s"):format(pool_line.pool, pool_line.connect, ratio_text(pool_line.ratio)))
  end
end

-- TLS (issue 16): multiloop against nginx with `listen ssl`, per server
-- CPU-second (idle: bytes per connection; tls-ir: Ir per operation). Each
-- line: scenario, workers, multiloop's figure, the peer's, and
-- multiloop / peer per repeat.
local TLS_SCENARIOS = {
  { id = "tls-hello", title = "HTTP hello over TLS, wrk 64 conns keep-alive", unit = "req",
    field = "ops_per_cpu", peer = "nginx-lua", goal = 1.0, better = "higher" },
  { id = "tls-handshake", title = "full handshake + 1 GET + close, 32 loops", unit = "handshake",
    field = "ops_per_cpu", peer = "nginx-lua", goal = 1.0, better = "higher" },
  { id = "tls-idle", title = "memory per idle TLS connection", unit = "bytes",
    field = "bytes_per_conn", peer = "nginx-lua", better = "lower" },
  { id = "tls-bulk", title = "64 MiB echoes through TLS, 1 conn", unit = "MiB",
    field = "ops_per_cpu", peer = "nginx-stream", goal = 0.9, better = "higher",
    servers = { "multiloop", "ml-proxy" } },
  { id = "tls-ir-hello", title = "callgrind Ir per keep-alive TLS request", unit = "Ir",
    field = "ir_per_op", peer = "nginx-lua", better = "lower" },
  { id = "tls-ir-handshake", title = "callgrind Ir per full handshake (+ 1 GET)", unit = "Ir",
    field = "ir_per_op", peer = "nginx-lua", better = "lower" },
}
local tls_lines = {}
for _, w in ipairs(workers_list) do
  for _, sc in ipairs(TLS_SCENARIOS) do
    local by_server = g[w][sc.id]
    if by_server then
      local fmt = sc.field == "ir_per_op" and int or si
      for _, server in ipairs(sc.servers or { "multiloop" }) do
        if by_server[server] or by_server[sc.peer] then
          local errs = 0
          for _, name in ipairs({ server, sc.peer }) do
            for _, e in ipairs(column(by_server[name], "errors")) do errs = errs + e end
          end
          tls_lines[#tls_lines + 1] = {
            sc = sc, w = w, server = server,
            ml = spread_text(column(by_server[server], sc.field), fmt),
            peer = spread_text(column(by_server[sc.peer], sc.field), fmt),
            ratio = ratios(by_server[server], by_server[sc.peer], sc.field),
            ml_rate = si(median(column(by_server[server], "ops_per_s"))),
            peer_rate = si(median(column(by_server[sc.peer], "ops_per_s"))),
            errors = errs,
          }
        end
      end
    end
  end
end
if #tls_lines > 0 then
  add("")
  add(("tls: OpenSSL %s, TLS 1.3 %s, %s, %s certificate, %s, no resumption on")
    :format(meta.openssl or "?", meta.tls_suite or "?", meta.tls_group or "?", meta.tls_key or "?",
      meta.tls_tickets == "1" and "2 session tickets per connection" or "no session tickets"))
  add("either side; per server CPU-second (tls-idle: bytes per connection; tls-ir: Ir per op),")
  add("median (min-max); multiloop / peer per repeat")
  add(("%-17s %2s %-10s %-24s %-14s %-24s %s"):format("scenario", "w", "server", "multiloop", "peer",
    "peer's", "multiloop / peer"))
  for _, l in ipairs(tls_lines) do
    add(("%-17s %2d %-10s %-24s %-14s %-24s %s"):format(l.sc.id, l.w, l.server, l.ml, l.sc.peer, l.peer,
      ratio_text(l.ratio)))
  end
end
add("")
local txt = table.concat(lines, "\n") .. "\n"
local f = assert(io.open(dir .. "/latest.txt", "w"))
f:write(txt)
f:close()
io.write(txt)

-- The headline ratios: multiloop against each other server, per scenario.
local headline = {}
for _, w in ipairs(workers_list) do
  for _, sc in ipairs(SCENARIOS) do
    local by_server = g[w][sc.id]
    if by_server and by_server.multiloop then
      local cells = {}
      for _, peer in ipairs(PEERS) do
        local field = sc.id == "idle-mem" and "bytes_per_conn" or "ops_per_cpu"
        cells[#cells + 1] = by_server[peer] and ratio_text(ratios(by_server.multiloop,
          by_server[peer], field)) or "-"
      end
      headline[#headline + 1] = { w = w, sc = sc, cells = cells }
    end
  end
end

-- Dispatch: connections per server CPU-second of each mode against ipc, per
-- repeat, for multiloop and the reference (the default mode runs as
-- "connrate", the others as "connrate-<mode>").
local function connrate_rows(w, mode, server)
  if not g[w] then return nil end
  local id = mode == meta.dispatch and "connrate" or "connrate-" .. mode
  return g[w][id] and g[w][id][server]
end

local dispatch_lines = {}
for _, w in ipairs(workers_list) do
  for _, server in ipairs({ "multiloop", "ref-c" }) do
    local ipc = connrate_rows(w, "ipc", server)
    if ipc then
      local cells = {}
      for _, mode in ipairs({ "ipc", "queue", "reuseport" }) do
        local list = connrate_rows(w, mode, server)
        cells[#cells + 1] = not list and "-" or mode == "ipc" and si(median(column(list, "ops_per_cpu")))
          or ("%s, %s"):format(si(median(column(list, "ops_per_cpu"))),
            ratio_text(ratios(list, ipc, "ops_per_cpu")))
      end
      dispatch_lines[#dispatch_lines + 1] = ("| %d | %s | %s |"):format(w,
        SERVER_TITLE[server], table.concat(cells, " | "))
    end
  end
end

-- Targets (issues 6 and 14): each as measured in this run, met or not.
local target_lines = {}
local function target(what, w, list, goal, better)
  if #list == 0 then return end
  local m = median(list)
  local met = (better == "higher" and m >= goal) or (better == "lower" and m < goal)
  target_lines[#target_lines + 1] = ("| %s | %d | %s | %s |"):format(what, w,
    ratio_text(list), met and "met" or "**missed**")
end
for _, w in ipairs(workers_list) do
  local gw = g[w]
  local function rs(id, a, b, field)
    return gw[id] and ratios(gw[id][a], gw[id][b], field or "ops_per_cpu") or {}
  end
  target("echo-p1 vs raw C, >= 0.85x", w, rs("echo-p1", "multiloop", "ref-c"), 0.85, "higher")
  target("echo-p16 vs raw C, >= 0.90x", w, rs("echo-p16", "multiloop", "ref-c"), 0.90, "higher")
  target("http vs nginx + Lua, >= 1.0x", w, rs("http", "multiloop", "nginx-lua"), 1.0, "higher")
  target("echo-p1 serve-style vs callback echo, >= 0.9x (issue 14)", w,
    rs("echo-p1", "ml-serve", "multiloop"), 0.9, "higher")
  target("echo-p16 serve-style vs callback echo, >= 0.9x (issue 14)", w,
    rs("echo-p16", "ml-serve", "multiloop"), 0.9, "higher")
  local ipc = connrate_rows(w, "ipc", "multiloop")
  if ipc then
    local best, best_mode = nil, nil
    for _, mode in ipairs({ "queue", "reuseport" }) do
      local list = ratios(connrate_rows(w, mode, "multiloop"), ipc, "ops_per_cpu")
      if #list > 0 and (best == nil or median(list) > median(best)) then best, best_mode = list, mode end
    end
    if best then
      target(("connrate fastest mode (%s) vs ipc, >= 1.5x"):format(best_mode), w, best, 1.5, "higher")
    end
  end
  local mem = gw["idle-mem"] and column(gw["idle-mem"].multiloop, "bytes_per_conn") or {}
  if #mem > 0 then
    local m = median(mem)
    target_lines[#target_lines + 1] = ("| idle-mem bytes per connection, < 1024 (aim 640) | %d | %s | %s |")
      :format(w, spread_text(mem), m < 1024 and (m <= 640 and "met" or "met (< 1 KiB; aim 640 missed)")
        or "**missed**")
  end
end
do                                         -- issue 14, with 1 worker only
  local ir = g1["echo-ir-p1"] and column(g1["echo-ir-p1"].multiloop, "ir_per_op") or {}
  if #ir > 0 then
    target_lines[#target_lines + 1] = ("| echo-ir-p1 callback echo, <= 2,000 Ir per op (issue 14) | 1 | %s | %s |")
      :format(spread_text(ir, int), median(ir) <= 2000 and "met" or "**missed**")
  end
  local function mem_target(what, server, limit)
    local mem = g1["idle-mem"] and column(g1["idle-mem"][server], "bytes_per_conn") or {}
    if #mem > 0 then
      target_lines[#target_lines + 1] = ("| %s | 1 | %s B | %s |"):format(what, spread_text(mem, int),
        median(mem) <= limit and "met" or "**missed**")
    end
  end
  mem_target("idle-mem callback connection, < 560 B (issue 14)", "multiloop", 559)
  mem_target("idle-mem serve-style connection blocked in receive, <= 1.75 KiB (issue 14)", "ml-serve", 1792)
  for _, l in ipairs(proxy_lines) do
    target(("proxy-p%d multiloop vs HAProxy, >= 1.0x (issue 15)"):format(l.sc.depth), 1, l.vs_haproxy,
      1.0, "higher")
  end
  for _, l in ipairs(kv_lines) do
    target(("%s kv vs redis-server at -P %d, >= %.1fx (issue 14)"):format(l.sc.test, l.sc.p, l.sc.goal), 1,
      l.ratio, l.sc.goal, "higher")
  end
end
for _, l in ipairs(tls_lines) do                -- issue 16
  local sc = l.sc
  if sc.goal then
    target(("%s %s vs %s, >= %.1fx (issue 16)"):format(sc.id, SERVER_TITLE[l.server] or l.server,
      SERVER_TITLE[sc.peer], sc.goal), l.w, l.ratio, sc.goal, "higher")
  elseif sc.id == "tls-idle" and l.server == "multiloop" then
    local mem = column(g[l.w]["tls-idle"].multiloop, "bytes_per_conn")
    if #mem > 0 then
      target_lines[#target_lines + 1] =
        ("| tls-idle bytes per idle TLS connection, <= 20 KiB (issue 16) | %d | %s B | %s |")
          :format(l.w, spread_text(mem, int), median(mem) <= 20480 and "met" or "**missed**")
    end
  end
end

-- The plot: ops per CPU-second, one cluster per scenario x workers.
local plot_ok = false
do
  local plotted = {}                      -- the servers with a figure to plot
  for _, s in ipairs(SERVERS) do
    local any = false
    for _, w in ipairs(workers_list) do
      for _, sc in ipairs(SCENARIOS) do
        if sc.id ~= "idle-mem" and g[w][sc.id] and g[w][sc.id][s] then any = true end
      end
    end
    if any then plotted[#plotted + 1] = s end
  end
  local dat = assert(io.open(dir .. "/ops_per_cpu.dat", "w"))
  dat:write("scenario")
  for _, s in ipairs(plotted) do dat:write("\t", s) end
  dat:write("\n")
  for _, w in ipairs(workers_list) do
    for _, sc in ipairs(SCENARIOS) do
      if sc.id ~= "idle-mem" and g[w][sc.id] then
        dat:write(('"%s\\n%d worker%s"'):format(sc.id, w, w == 1 and "" or "s"))
        for _, s in ipairs(plotted) do
          local m = median(column(g[w][sc.id][s], "ops_per_cpu"))
          dat:write("\t", m and ("%.0f"):format(m) or "-")
        end
        dat:write("\n")
      end
    end
  end
  dat:close()
  local gp = assert(io.open(dir .. "/ops_per_cpu.gp", "w"))
  gp:write(([[
set terminal pngcairo size 1400,640 font "sans,10"
set output "%s/ops_per_cpu.png"
set title "Operations per second of server CPU (median of %s repeat(s); higher is better)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set datafile missing "-"
set datafile separator "\t"
set logscale y
set format y "%%.0s%%c"
set ylabel "ops per server CPU-second (log scale)"
set grid ytics
set key top right
set xtics font "sans,8"
set yrange [1000:*]
plot for [i=2:%d] "%s/ops_per_cpu.dat" using i:xtic(1) title columnheader(i)
]]):format(dir, meta.repeats or "?", #plotted + 1, dir))
  gp:close()
  if #plotted > 0 and os.execute("command -v gnuplot > /dev/null") then
    plot_ok = os.execute(("gnuplot %s/ops_per_cpu.gp"):format(dir)) and true or false
  end
  if not plot_ok then io.stderr:write("report: gnuplot failed or is missing: no plot\n") end
end

-- BENCHMARKS.md
local md = {}
local function w_(s) md[#md + 1] = s end
w_("# Benchmarks")
w_("")
w_("Generated by `make bench` (`bench/run.sh`, then `bench/report.lua`; re-run the")
w_("report alone with `make bench-report`). Do not edit by hand: edit")
w_("`bench/report.lua` or `bench/notes.md`.")
w_("")
w_(("Run: %s, %s repeat(s) of %s s per measurement%s, %s s in all."):format(meta.date or "?",
  meta.repeats or "?", meta.seconds or "?",
  meta.quick == "1" and " (`BENCH_QUICK=1`: a smoke run, not for quoting)" or "",
  meta.elapsed_s or "?"))
w_("")
w_("## The machine")
w_("")
w_(("- %s CPUs: %s; kernel %s"):format(meta.nproc or "?", meta.cpu or "?", meta.kernel or "?"))
w_(("- libuv %s, Lua %s; peers: lua-luv %s, Node.js %s, nginx %s with lua-nginx-module %s, wrk %s")
  :format(meta.libuv or "?", meta.lua or "?", meta.luv or "?", meta.node or "?", meta.nginx or "?",
    meta.nginx_lua or "?", meta.wrk or "?"))
if #tls_lines > 0 then
  w_(("- TLS: OpenSSL %s (the `openssl` CLI; Debian's libssl3 %s, which multiloop links as %s;")
    :format(meta.openssl or "?", meta.libssl or "?", meta.libssl_ml ~= "" and meta.libssl_ml or "?"))
  w_(("  nginx: built with %s), TLS 1.3 only, cipher suite %s,"):format(meta.openssl_nginx or "?",
    meta.tls_suite or "?"))
  w_(("  key exchange %s, a throwaway %s certificate for localhost; negotiated, as the client saw it:")
    :format(meta.tls_group or "?", meta.tls_key or "?"))
  for _, s in ipairs({ "multiloop", "ml-proxy", "nginx-lua", "nginx-stream" }) do
    local seen = meta["tls_seen_" .. s:gsub("-", "_")]
    if seen then w_(("  %s: %s;"):format(SERVER_TITLE[s] or s, seen)) end
  end
end
if #proxy_lines > 0 or #proxy_ir_lines > 0 then
  w_(("- proxy peers: HAProxy %s, nginx stream (libnginx-mod-stream) %s"):format(meta.haproxy or "?",
    meta.nginx_stream or "?"))
end
w_(("- load average before / after the run: %s / %s (anything else running on these two cores")
  :format(meta.loadavg_before or "?", meta.loadavg_after or "?"))
w_("  shows up here: absolute rates are not comparable between runs, only the ratios")
w_("  measured side by side in one run)")
w_("")
w_("## Method")
w_("")
w_("Every server listens on 127.0.0.1 and is started fresh for each server x workers")
w_("combination in each repeat; the order of the servers rotates between repeats.")
w_("")
w_("- **The figure of merit is operations per second of server CPU**: operations")
w_("  completed by the client, divided by the CPU time (utime + stime from")
w_("  `/proc/PID/stat`, summed over the server's whole process tree) that the server")
w_("  used while the client ran. On two cores the client competes with the server, so")
w_("  the wall-clock rate mostly measures the client; CPU per operation is what")
w_("  separates the servers. Loopback caveat: part of the kernel's TCP work for the")
w_("  server's socket runs in the sender's context (softirq) and is billed to whichever")
w_("  process is running, so the figures include some of the client's kernel work and")
w_("  vice versa, equally for every server.")
w_("- **With 1 worker** the server is pinned to CPU 0 and the load generator (or wrk)")
w_("  to CPU 1 with `taskset`; with 2 workers both float over both CPUs.")
w_("- **The reference** is `bench/ref_server.c`: multiloop's server with no Lua, raw C")
w_("  on libuv, with the same threads and hand-offs (`--dispatch ipc|queue|reuseport`:")
w_("  an acceptor thread with `uv_write2` over a socketpair per worker, an acceptor")
w_("  with a mutex list rung by `uv_async_send`, or one `SO_REUSEPORT` socket per")
w_("  worker), the same accept path (a `uv_poll_t` and `accept4` in batches of 64), the")
w_("  same per-worker 64 KiB read buffer, TCP_NODELAY, and writes that try the socket")
w_("  before queueing. \"vs ref-c\" is the ratio of the two measured in the same repeat;")
w_("  its median and range over the repeats are shown.")
w_(("- **Dispatch**: multiloop and the reference both use `%s` (multiloop's default)")
  :format(meta.dispatch or "?"))
w_("  except in the `connrate-<mode>` rows. The Node.js cluster's primary accepts and")
w_("  hands connections to its workers round-robin over IPC (like `ipc`); nginx's")
w_("  workers accept from one shared socket; luv is a single loop (1 worker only).")
w_("- **Scenarios**, by `bench/loadgen.c` (epoll, one thread, every echoed byte")
w_("  checked against what was sent; latency per message, or per connect-to-close loop):")
w_("  - `echo-p1`: 64 connections x 64-byte messages, 1 in flight per connection;")
w_("  - `echo-p16`: the same with 16 in flight (pipelined);")
w_("  - `connrate`: 32 concurrent loops of connect, send 64 B, read them back, close;")
w_("  - `http`: `wrk -t1 -c64` keep-alive GET against `examples/http_hello.lua` (multiloop),")
w_("    the same responder in C (`ref_server --mode http`), nginx + `content_by_lua_block`")
w_("    (config generated by `bench/peers/nginx_lua.sh`; nginx also sends `Server`, `Date`")
w_("    and `Connection` headers, about 80 bytes more per answer), and Node's `http`")
w_("    module (which adds `Date` and `Connection`). Each HTTP server first passes")
w_("    `bench/check_http.lua` (pipelined requests in one write, a split head, a body,")
w_("    HEAD, Connection: close);")
w_(("  - `idle-mem`: %s connections opened, one 1-byte echo each (so the server has")
  :format(meta.idle_conns or "?"))
w_("    served every one), then held idle; the server's RSS growth (VmRSS of its")
w_("    process tree) divided by the connections; measured first, on a fresh server.")
w_("  The echo servers are `examples/echo_handler.lua` (multiloop), `bench/peers/luv_echo.lua`")
w_("  and `bench/peers/node_echo.js`, all pausing a client that does not read its echoes;"
  .. " luv tries the socket before queueing, as multiloop does.")
local has_serve = false
for _, w in ipairs(workers_list) do
  for _, by_server in pairs(g[w]) do if by_server["ml-serve"] then has_serve = true end end
end
if has_serve then
  w_("  `ml-serve` (\"multiloop serve-style\") is multiloop running `bench/serve_echo_handler.lua`,")
  w_("  a serve-style echo (a coroutine per connection), beside the callback one.")
end
if #ir_lines > 0 then
  w_(("  - `echo-ir` (1 worker only): each server of `BENCH_IR_HANDLERS` (%s)")
    :format(meta.ir_handlers and ("`" .. meta.ir_handlers .. "`") or "?"))
  w_("    and the reference run under `valgrind --tool=callgrind`, pinned to CPU 0; once it")
  w_("    listens, for 1 then 16 in flight: `callgrind_control -z PID` (counters zeroed, so")
  w_(("    start-up is left out), `loadgen --mode echo --conns 16 --size 64 --duration %s`")
    :format(meta.ir_seconds or "?"))
  w_("    on CPU 1, `callgrind_control -d PID`; the dump's Ir total over the operations")
  w_("    the load generator completed. Valgrind runs the server's threads one at a")
  w_("    time and far slower, so each wake-up finds more waiting than it would natively;")
  w_("    the count is for comparing servers and versions, not a native profile;")
end
if #kv_lines > 0 then
  w_(("  - `kv` (1 worker only): `lua5.4 bench/ml_server.lua %s 1` (`BENCH_KV_HANDLER`)")
    :format(meta.kv_handler or "examples.kv"))
  w_("    and `redis-server --port PORT --bind 127.0.0.1 --save '' --appendonly no`, each first")
  w_("    checked with `redis-cli SET`/`GET`, then `redis-benchmark -h 127.0.0.1 -p PORT -c 50")
  w_("    -n N -P 16|1 -t set|get --csv` (one key, redis-benchmark's default; `BENCH_KV_N16`,")
  w_("    `BENCH_KV_N1`: N is fixed so both servers do the same requests, and redis-server")
  w_("    finishes sooner); requests over the server's CPU time in that run.")
end
if #proxy_lines > 0 or #proxy_ir_lines > 0 then
  w_("  - `proxy` (1 worker only): `build/bench/ref_server --workers 1` as the upstream on CPU 1")
  w_("    (beside the load generator), and in front of it, one at a time, each pinned to CPU 0:")
  w_(("    multiloop's proxy (`lua5.4 bench/ml_server.lua %s 1 DISPATCH 'upstreams[]=127.0.0.1:UPORT'`:")
    :format(meta.proxy_handler or "?"))
  w_("    a serve handler that connects with `worker.tcp()` and calls `conn:pipe(upstream)`),")
  w_("    HAProxy (`bench/peers/haproxy_tcp.sh`: `nbthread 1`, `mode tcp`, one server, no logs)")
  w_("    and nginx stream `proxy_pass` (`bench/peers/nginx_stream.sh`: 1 worker,")
  w_("    `load_module ngx_stream_module.so`); each first passes a short checked echo through")
  w_("    it, then `loadgen --mode echo --conns 64 --size 64 --depth 1|16`; proxied echoes")
  w_("    over the proxy's CPU time (its process tree: nginx's master and worker);")
  w_("  - `proxy-ir` (1 worker only): each of those proxies under `valgrind --tool=callgrind`")
  w_("    (nginx with `master_process off`) in front of the same upstream, counted as `echo-ir`:")
  w_("    Ir per proxied echo, 16 connections x 64 B at 1 and 16 in flight;")
end
if #tls_lines > 0 then
  w_("  - the TLS scenarios (issue 16; settings under \"The machine\" and \"TLS\"): multiloop with")
  w_("    the server option `tls = { cert, key, min_version = \"TLSv1.3\", ciphersuites, session_tickets")
  w_("    = false }` (`bench/ml_server.lua ... tls.cert=PATH ...`), nginx with `listen ssl`")
  w_("    (`TLS_CERT=... TLS_KEY=... sh bench/peers/nginx_lua.sh` or `nginx_stream.sh`, the TLS")
  w_("    settings in `bench/peers/nginx_tls.sh`):")
  w_("    `tls-hello`: `wrk -t1 -c64 https://...` keep-alive against `examples/http_hello.lua` and")
  w_("    nginx + Lua, each first passing a checked exchange (`tls_loadgen --mode http`);")
  w_("    `tls-handshake`: `build/bench/tls_loadgen --mode handshake --conns 32` (connect, full")
  w_("    handshake, one GET with `Connection: close`, the answer checked, close_notify, close)")
  w_("    against the same two servers, on `BENCH_DISPATCH` for multiloop;")
  w_(("    `tls-idle`: %s TLS connections, one GET answered on each, then held; RSS growth")
    :format(meta.tls_idle_conns or "?"))
  w_("    over the connections, on a fresh server, as `idle-mem`;")
  w_(("    `tls-bulk` (1 worker on CPU 0): `tls_loadgen --mode bulk --conns 1 --bytes %s`, one")
    :format(meta.tls_bulk_bytes or "?"))
  w_("    connection after another, each echoing that many bytes (written in 16 KiB records, at")
  w_("    most 256 KiB ahead of the echo, every byte checked), through multiloop's TLS echo")
  w_("    (`examples/echo_handler.lua`), multiloop's proxy terminating TLS in front of the raw-C")
  w_("    echo (`ml-proxy`) and nginx stream `listen ssl` + `proxy_pass` in front of the same")
  w_("    (the raw-C echo on CPU 1 with the client); MiB echoed per server CPU-second.")
  w_("    nginx has no stream echo, so the like-for-like pair is `ml-proxy` against nginx")
  w_("    stream (both decrypt, forward over plain TCP, read back, encrypt); the TLS echo does")
  w_("    less (no upstream socket), so its ratio flatters multiloop;")
  w_("    `tls-ir` (1 worker): each server under callgrind (nginx `master_process off`), Ir per")
  w_(("    keep-alive request (16 connections) and per handshake loop (8), %s s each, as `echo-ir`;")
    :format(meta.ir_seconds or "?"))
end
w_("- **Commands** (PORT: the server's; S: `BENCH_SECONDS`):")
w_("  `build/bench/loadgen --port PORT --duration S --mode echo --conns 64 --size 64 --depth 1` (or `--depth 16`),")
w_("  `... --mode connrate --conns 32 --size 64`, `... --mode idle --conns N --duration 120`")
w_("  (stopped once measured), and `wrk -t1 -c64 -dSs --latency http://127.0.0.1:PORT/`;")
w_("  servers: `lua5.4 bench/ml_server.lua examples.echo_handler|examples.http_hello W DISPATCH`,")
w_("  `build/bench/ref_server --workers W --dispatch DISPATCH [--mode http]`,")
w_("  `lua5.4 bench/peers/luv_echo.lua`, `node bench/peers/node_echo.js --workers W [--mode http]`,")
w_("  `sh bench/peers/nginx_lua.sh DIR PORT W`.")
w_("- Medians over the repeats, with the range (min-max) in brackets; `server CPU")
w_("  per op` is the inverse of the median (microseconds of server CPU per")
w_("  operation), `server CPU` the server's CPU time over the wall time (100% = one")
w_("  core busy).")
w_("")
w_("## multiloop against the others")
w_("")
w_("Ratio of multiloop's operations per server CPU-second to the other server's, in")
w_("the same repeat (above 1: multiloop does more work per CPU-second). For")
w_("`idle-mem` the ratio is of bytes per connection (above 1: multiloop uses more).")
w_("")
w_("| scenario | workers | vs raw C | vs luv | vs Node.js | vs nginx + Lua |")
w_("|---|---|---|---|---|---|")
for _, h in ipairs(headline) do
  w_(("| %s | %d | %s |"):format(h.sc.id, h.w, table.concat(h.cells, " | ")))
end
w_("")
if #ir_lines > 0 then
  w_("## Instructions per operation (callgrind)")
  w_("")
  w_("`echo-ir`: user-space instructions (callgrind's Ir, every thread of the server")
  w_("process, kernel work not included) per echoed message, 1 worker under valgrind,")
  w_(("16 connections x 64 B for %s s at 1 and 16 in flight; median (min-max) over the")
    :format(meta.ir_seconds or "?"))
  w_("repeats, and the ratio to the raw-C reference and to the callback echo in the same")
  w_("repeat (below 1: fewer instructions). Wall-clock rates under valgrind mean nothing")
  w_("beyond showing the load ran.")
  w_("")
  w_("| in flight | server | Ir per op | vs raw C | vs callback echo | ops/s under callgrind |")
  w_("|---|---|---|---|---|---|")
  for _, l in ipairs(ir_lines) do
    w_(("| %d | %s | %s | %s | %s | %s |"):format(l.depth, SERVER_TITLE[l.server] or l.server, l.ir,
      l.vs_ref, l.vs_cb, l.rate))
  end
  w_("")
end
if #kv_lines > 0 then
  w_("## examples/kv.lua against redis-server")
  w_("")
  w_(("`kv`: `%s` (1 worker) and redis-server %s (`--save '' --appendonly no`), each")
    :format(meta.kv_handler or "examples.kv", meta.redis or "?"))
  w_("pinned to CPU 0, driven by `redis-benchmark -c 50 -t set|get -P 16|1` on CPU 1, SET and")
  w_(("GET in separate runs of %s (-P 16) and %s (-P 1) requests; requests per server")
    :format(meta.kv_n16 and int(tonumber(meta.kv_n16)) or "?", meta.kv_n1 and int(tonumber(meta.kv_n1)) or "?"))
  w_("CPU-second, median (min-max), and kv / redis-server in the same repeat.")
  w_("")
  w_("| test | pipeline | kv req per server CPU-s | redis-server req per server CPU-s | kv / redis-server"
    .. " | target | kv req/s (wall) | redis-server req/s (wall) |")
  w_("|---|---|---|---|---|---|---|---|")
  for _, l in ipairs(kv_lines) do
    local m = median(l.ratio)
    w_(("| %s | -P %d | %s | %s | %s | >= %.1fx%s | %s | %s |"):format(l.sc.test, l.sc.p, l.kv, l.redis,
      ratio_text(l.ratio), l.sc.goal, m and (m >= l.sc.goal and " met" or " **missed**") or "",
      l.kv_rate, l.redis_rate))
  end
  w_("")
end
if #proxy_lines > 0 then
  w_("## A TCP proxy in front of the raw-C echo")
  w_("")
  w_("`proxy`: proxied echoes per second of the proxy's CPU (1 worker or thread, pinned to")
  w_("CPU 0; the upstream and the load generator on CPU 1), median (min-max), and")
  w_("multiloop's figure over HAProxy's and nginx stream's in the same repeat (above 1:")
  w_("multiloop proxies more per CPU-second).")
  w_("")
  w_("| in flight | multiloop | HAProxy | nginx stream | multiloop / HAProxy | multiloop / nginx stream"
    .. " | p99 (ml, HAProxy, nginx) | errors (ml, HAProxy, nginx) |")
  w_("|---|---|---|---|---|---|---|---|")
  for _, l in ipairs(proxy_lines) do
    w_(("| %d | %s | %s | %s | %s | %s | %s | %s |"):format(l.sc.depth, l.cells[1], l.cells[2], l.cells[3],
      ratio_text(l.vs_haproxy), ratio_text(l.vs_nginx), table.concat(l.p99, ", "),
      table.concat(l.errors, ", ")))
  end
  w_("")
end
if #proxy_ir_lines > 0 then
  w_("`proxy-ir`: user-space instructions (callgrind Ir) per proxied echo, each proxy")
  w_(("under valgrind, 16 connections x 64 B for %s s; median (min-max), and multiloop's")
    :format(meta.ir_seconds or "?"))
  w_("count over the other's in the same repeat (below 1: multiloop runs fewer).")
  w_("The kernel's work, most of a proxy's CPU, is not in it.")
  w_("")
  w_("| in flight | proxy | Ir per op | multiloop / this | ops/s under callgrind |")
  w_("|---|---|---|---|---|")
  for _, l in ipairs(proxy_ir_lines) do
    w_(("| %d | %s | %s | %s | %s |"):format(l.depth, SERVER_TITLE[l.server] or l.server, l.ir, l.vs_ml, l.rate))
  end
  w_("")
end
if pool_line then
  w_("## lua-resty-redis with and without the connection pool")
  w_("")
  w_("`redis-pool`: Debian's lua-resty-redis (`nginx.redis`, unchanged, over `multiloop.ngx`) in")
  w_("a 1-worker multiloop pinned to CPU 0 (`bench/redis_pool_handler.lua`), against")
  w_(("redis-server %s on CPU 1: for each 64-byte message of `loadgen --mode echo --conns 64")
    :format(meta.redis or "?"))
  w_("--depth 1` one `redis:new()`, `connect`, `GET`, then `set_keepalive(60000, 64)` (pooled)")
  w_("or `close()` (a new connection each time), and the message echoed back. GET round trips")
  w_("per second of the worker's CPU, median (min-max), and pooled over new in the same repeat.")
  w_("")
  w_("| pooled (set_keepalive) | new connection each GET | pooled / new | pooled GETs/s (wall) | new GETs/s (wall) |")
  w_("|---|---|---|---|---|")
  w_(("| %s | %s | %s | %s | %s |"):format(pool_line.pool, pool_line.connect, ratio_text(pool_line.ratio),
    pool_line.pool_rate, pool_line.connect_rate))
  w_("")
end
if #tls_lines > 0 then
  w_("## TLS")
  w_("")
  w_(("TLS 1.3 with %s and %s on both sides, the same %s certificate,")
    :format(meta.tls_suite or "?", meta.tls_group or "?", meta.tls_key or "?"))
  if meta.tls_tickets == "1" then
    w_("two stateless session tickets sent per connection and never used (`BENCH_TLS_TICKETS=1`:")
    w_("multiloop `session_tickets = true`; nginx `ssl_session_tickets on`, `ssl_session_cache off`),")
  else
    w_("no session tickets and no session cache (multiloop `session_tickets = false`; nginx")
    w_("`ssl_session_tickets off`, `ssl_session_cache off`, `ssl_conf_command NumTickets 0`),")
  end
  w_("and a client that never offers a session (`bench/tls_loadgen.c`; wrk for `tls-hello`), so")
  w_("every handshake is a full one; the tickets each server sent are under \"The machine\".")
  w_("Per second of server CPU, median (min-max) over the repeats, and multiloop's")
  w_("figure over the peer's in the same repeat (for `tls-idle` and `tls-ir`: bytes per")
  w_("connection and instructions per operation, where lower is better).")
  w_("")
  w_("| scenario | workers | multiloop | figure | peer | peer's figure | multiloop / peer"
    .. " | ops/s (wall: multiloop, peer) | errors |")
  w_("|---|---|---|---|---|---|---|---|---|")
  for _, l in ipairs(tls_lines) do
    local unit = l.sc.field == "ir_per_op" and " Ir/" .. (l.sc.id == "tls-ir-hello" and "req" or "handshake")
      or l.sc.id == "tls-idle" and " B/conn" or (" %s/CPU-s"):format(l.sc.unit)
    local rates = l.sc.id == "tls-idle" and "-" or (l.ml_rate .. ", " .. l.peer_rate)
    w_(("| %s | %d | %s | %s%s | %s | %s%s | %s | %s | %d |"):format(l.sc.id, l.w,
      SERVER_TITLE[l.server] or l.server, l.ml, unit, SERVER_TITLE[l.sc.peer] or l.sc.peer, l.peer, unit,
      ratio_text(l.ratio), rates, l.errors))
  end
  w_("")
end
if #dispatch_lines > 0 then
  w_("## Dispatch modes")
  w_("")
  w_("`connrate` in each dispatch mode: connections per server CPU-second (median),")
  w_("then the ratio to `ipc` in the same repeat, median (min-max).")
  w_("")
  w_("| workers | server | ipc | queue | reuseport |")
  w_("|---|---|---|---|---|")
  for _, l in ipairs(dispatch_lines) do w_(l) end
  w_("")
end
if #target_lines > 0 then
  w_("## Targets")
  w_("")
  w_("The project's targets (per server CPU-second, multiloop's figure over the other's")
  w_("in the same repeat; for Ir per op and idle memory, multiloop's own figure), as")
  w_("measured in this run: median (min-max) over the repeats.")
  w_("")
  w_("| target | workers | measured | |")
  w_("|---|---|---|---|")
  for _, l in ipairs(target_lines) do w_(l) end
  w_("")
end
w_("## All figures")
w_("")
w_("| scenario | workers | server | ops/s (wall) | ops per server CPU-s | server CPU per op"
  .. " | vs raw C | server CPU | p50 | p99 | p99.9 | errors |")
w_("|---|---|---|---|---|---|---|---|---|---|---|---|")
for _, e in ipairs(md_rows) do
  if e.sc.id == "idle-mem" then
    w_(("| %s | %d | %s | - | %s bytes/conn | - | %s | - | - | - | - | %d |"):format(e.sc.id, e.w,
      SERVER_TITLE[e.server] or e.server, e.value, e.vs_ref, e.errors))
  else
    w_(("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %d |"):format(e.sc.id, e.w,
      SERVER_TITLE[e.server] or e.server, e.rate, e.value, e.cpu_op, e.vs_ref, e.util, e.p50, e.p99,
      e.p999, e.errors))
  end
end
w_("")
w_("Latencies are the load generator's (wrk's for `http`, which gives no p99.9), taken")
w_("with the client on a loaded 2-core machine: compare them between servers only.")
w_("`errors` sums the load generator's failed connects, resets, early closes and")
w_("mismatched bytes over the repeats (for `idle-mem`: connections that were not served).")
w_("")
if plot_ok then
  w_("![operations per server CPU-second by scenario](bench/results/ops_per_cpu.png)")
  w_("")
end
local notes = io.open("bench/notes.md")
if notes then
  w_("## Observations")
  w_("")
  w_(notes:read("a"))
  notes:close()
end
w_("## Re-running")
w_("")
w_("```")
w_("make bench                       # the full run: 3 repeats of 5 s, about 24 minutes")
w_("BENCH_QUICK=1 make bench         # 1 repeat of 2 s, 2,000 idle connections: a smoke run")
w_("BENCH_SECONDS=10 BENCH_REPEATS=5 BENCH_WORKERS=2 make bench")
w_("BENCH_DISPATCH=ipc make bench    # multiloop and the reference both on ipc")
w_("BENCH_ONLY='echo-ir kv' make bench  # groups: echo http dispatch echo-ir kv proxy proxy-ir redis-pool")
w_("BENCH_ONLY='tls-hello tls-handshake tls-idle tls-bulk tls-ir' make bench  # the TLS scenarios")
w_("BENCH_IR_HANDLERS='multiloop=examples.echo_handler mine=bench.my_echo' BENCH_ONLY=echo-ir make bench")
w_("make bench-report                # BENCHMARKS.md again from bench/results/raw.tsv")
w_("```")
w_("")
w_("`make bench` names the peers that are missing and skips them; `make deps BENCH=yes`")
w_("installs them (lua-luv, wrk, nginx, libnginx-mod-http-lua, libnginx-mod-stream, haproxy,")
w_("gnuplot-nox, openssl; valgrind,")
w_("redis-server, redis-tools and lua-nginx-redis come with `make deps`). `make test` never runs any of it.")
f = assert(io.open("BENCHMARKS.md", "w"))
f:write(table.concat(md, "\n"), "\n")
f:close()
print("report: wrote " .. dir .. "/latest.txt, BENCHMARKS.md"
  .. (plot_ok and (", " .. dir .. "/ops_per_cpu.png") or ""))
