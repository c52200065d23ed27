-- luacheck configuration for `make lint` (Debian package lua-check):
-- `luacheck lua spec examples bench` is clean.
std = "lua54"
max_line_length = 120

-- Specs: busted's globals. Their expected error messages read best on one
-- line, however long, and a test's local may reuse an outer name.
files["spec"] = {
  std = "+busted",
  max_line_length = false,
  ignore = { "431" },             -- shadowing an upvalue
}
-- Fixtures are handlers and scripts that run in a worker or a child lua5.4,
-- where busted's globals do not exist.
files["spec/fixtures"] = { std = "lua54" }
-- Deliberately broken: the specs check how a handler with a syntax error fails.
exclude_files = { "spec/fixtures/syntax_error.lua" }

-- Examples document the callbacks' signatures, used or not.
files["examples"] = { unused_args = false }
