--- multiloop.check: the handler that `multiloop --check` (bin/multiloop)
-- starts in place of the user's, in one worker of a server that listens on
-- a loopback port 0 only for as long as the check takes.
--
-- At its top level, in that worker's own Lua state (so a handler that
-- requires multiloop.ngx, or reads worker.config, loads as it would when
-- served), it loads the user's handler as src/worker.c's load_handler does,
-- and checks its shape with the same messages; it never runs init. Any
-- error fails the server's start, naming it. worker.config arrives as
-- { kind = "path" | "module" | "bytecode", handler = ..., config = <the
-- user's config> }
-- and is put back to the user's config before the handler loads.
--
-- Runs in a worker's state only.

local worker = require("multiloop.core").worker()
if worker == nil then
  error("multiloop.check: not in a worker's state (bin/multiloop --check starts it)", 0)
end
local what = worker.config
worker.config = what.config

local h
if what.kind == "bytecode" then                -- a function: the handler's connect itself
  h = assert(load(what.handler, "=handler", "b"))
elseif what.kind == "path" then
  local chunk, err = loadfile(what.handler)
  if not chunk then error(err, 0) end
  h = chunk()
else
  local found, got = pcall(require, what.handler)
  if not found then error(got, 0) end      -- without this file's position
  h = got
end

if type(h) == "function" then h = { connect = h } end
if type(h) ~= "table" then
  error(("the handler must be a function or a table with a connect or a serve function "
    .. "(got %s)"):format(type(h)), 0)
end
if h.connect ~= nil and h.serve ~= nil then
  error("the handler has both connect and serve (connect is the callback style, serve the "
    .. "sequential one: give it one of them)", 0)
end
if h.serve ~= nil and type(h.serve) ~= "function" then
  error(("the handler's serve must be a function (got %s)"):format(type(h.serve)), 0)
end
if h.serve == nil and type(h.connect) ~= "function" then
  error(h.connect == nil and "the handler must have a connect or a serve function"
    or ("the handler's connect must be a function (got %s)"):format(type(h.connect)), 0)
end
for _, hook in ipairs { "init", "shutdown", "message" } do
  if h[hook] ~= nil and type(h[hook]) ~= "function" then
    error(("the handler's %s must be a function (got %s)"):format(hook, type(h[hook])), 0)
  end
end

-- Served by nothing: the check stops the server as soon as it has started.
return { connect = function(conn) conn:close() end }
