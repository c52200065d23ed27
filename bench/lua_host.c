/*
 * bench/lua_host.c: a minimal `lua5.4 SCRIPT ARGS...` linked with Debian's
 * static liblua5.4.a, which keeps its symbols: profiles (callgrind, perf)
 * then name the Lua VM's functions (luaV_execute, luaD_precall, luaC_step)
 * instead of the stripped /usr/bin/lua5.4's bare addresses. Exported
 * (-rdynamic) so that multiloop's core.so binds to this Lua. Not for serving:
 * no REPL, no -e, no LUA_INIT. `make bench-build` makes build/bench/lua_host;
 * bench/notes.md says how it is used.
 */
#include <stdio.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  int i, rc;
  if (L == NULL || argc < 2) {
    fprintf(stderr, "usage: lua_host SCRIPT [ARGS...]\n");
    return 2;
  }
  luaL_openlibs(L);
  lua_createtable(L, argc, 0);               /* arg, as lua.c makes it */
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - 1);
  }
  lua_setglobal(L, "arg");
  rc = luaL_loadfile(L, argv[1]) != LUA_OK || lua_pcall(L, 0, 0, 0) != LUA_OK;
  if (rc) fprintf(stderr, "lua_host: %s\n", lua_tostring(L, -1));
  lua_close(L);
  return rc;
}
