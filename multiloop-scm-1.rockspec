rockspec_format = "3.0"
package = "multiloop"
version = "scm-1"

source = {
   url = "git+https://example.invalid/multiloop.git",
}

-- No homepage: the project has no public address yet (see source.url).
description = {
   summary = "A multi-threaded TCP server for Lua 5.4 on libuv: N worker threads, each with its own loop and Lua state",
   detailed = [[
multiloop is a TCP (and Unix socket) server for Lua 5.4 that uses every
core: N worker threads each run their own libuv loop and their own Lua
state, and the handler you write runs in every one of them. Connections
reach the workers through SO_REUSEPORT sockets, or from one acceptor
thread through an in-process queue or over socketpairs. Workers share
nothing Lua-shaped; they talk through inboxes (send, broadcast) and
shared dictionaries in the style of OpenResty's ngx.shared.DICT. Written
in C on libuv and loaded with require("multiloop") from a plain lua5.4.
]],
   license = "MIT",
}

-- Linux only: SO_REUSEPORT spreading, the Makefile's Debian package checks.
supported_platforms = { "linux" }

dependencies = {
   "lua >= 5.4, < 5.5",
}

external_dependencies = {
   LIBUV = {
      header = "uv.h",
      library = "uv",
   },
   OPENSSL = {
      header = "openssl/ssl.h",
      library = "ssl",
   },
}

-- The Makefile is the one description of the build: luarocks passes it the
-- paths it found and its install tree. What is missing is named before the
-- build starts, by luarocks itself: the Lua headers, and uv.h and libuv from
-- external_dependencies ("Could not find header file for LIBUV"). So
-- CHECK_DEPS=no: the Makefile's check of Debian packages is skipped, since
-- luarocks may have found them elsewhere (LIBUV_DIR=/usr/local). WERROR
-- empty: a newer compiler's new warning must not fail an install.
build = {
   type = "make",
   build_variables = {
      CFLAGS = "$(CFLAGS)",
      LIBFLAG = "$(LIBFLAG)",
      LUA_INCDIR = "$(LUA_INCDIR)",
      LIBUV_INCDIR = "$(LIBUV_INCDIR)",
      LIBUV_LIBDIR = "$(LIBUV_LIBDIR)",
      OPENSSL_INCDIR = "$(OPENSSL_INCDIR)",
      OPENSSL_LIBDIR = "$(OPENSSL_LIBDIR)",
      CHECK_DEPS = "no",
      WERROR = "",
   },
   install_variables = {
      LIBDIR = "$(LIBDIR)",
      LUADIR = "$(LUADIR)",
      BINDIR = "",
      CHECK_DEPS = "no",
   },
   -- The command: luarocks copies it and puts a wrapper in its tree's bin/
   -- that sets the tree's package paths (so BINDIR above is empty: make
   -- install leaves the command to luarocks).
   install = {
      bin = { multiloop = "bin/multiloop" },
   },
}

-- `luarocks test` runs the specs as `make test` does (arguments after `--`
-- go to make: `luarocks test -- SPECS=spec/echo_spec.lua`). No
-- test_dependencies: busted and LuaSocket come from Debian (lua-busted,
-- lua-socket), which luarocks cannot see, so listing them would send it to a
-- rocks server; `make test` installs what is missing with apt-get, as it
-- does without luarocks. The test builds the module itself (luarocks test
-- does not build).
test = {
   type = "command",
   command = "make test",
}
