rockspec_format = "3.0"
package = "multiloop"
version = "scm-1"

source = {
   url = "git+https://example.invalid/multiloop.git",
}

description = {
   summary = "A multi-threaded TCP server for Lua 5.4 on libuv: one acceptor thread, N worker threads each with its own loop and Lua state",
   license = "MIT",
}

dependencies = {
   "lua >= 5.4, < 5.5",
}

external_dependencies = {
   LIBUV = {
      header = "uv.h",
      library = "uv",
   },
}

-- The Makefile is the one description of the build: luarocks passes it the
-- paths it found and its install tree. CHECK_DEPS=no: luarocks users manage
-- their own packages (the Makefile would otherwise apt-get what is missing);
-- WERROR empty: a newer compiler's new warning must not fail an install.
build = {
   type = "make",
   build_variables = {
      CFLAGS = "$(CFLAGS)",
      LIBFLAG = "$(LIBFLAG)",
      LUA_INCDIR = "$(LUA_INCDIR)",
      LIBUV_INCDIR = "$(LIBUV_INCDIR)",
      LIBUV_LIBDIR = "$(LIBUV_LIBDIR)",
      CHECK_DEPS = "no",
      WERROR = "",
   },
   install_variables = {
      LIBDIR = "$(LIBDIR)",
      LUADIR = "$(LUADIR)",
      CHECK_DEPS = "no",
   },
}

test_dependencies = {
   "busted",
   "luasocket",
}

test = {
   type = "busted",
}
