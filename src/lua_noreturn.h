/*
 * lua_noreturn.h: says what Lua 5.4's headers leave out, that the functions
 * which raise a Lua error never return: they longjmp to the enclosing
 * lua_pcall. Without it, GCC's -fanalyzer (`make lint`) follows a path past
 * `luaL_typeerror(...); return NULL;` into the caller and reports a NULL
 * dereference that cannot happen; the compiler itself also learns that the
 * code after such a call is dead.
 *
 * Redeclaring a function adds the attribute and changes nothing else: these
 * stay Lua's own symbols (multiloop.h includes this before its visibility
 * pragma, so they keep default visibility; `extern` is what LUA_API and
 * LUALIB_API mean on Linux). Only functions that always raise belong here.
 */
#ifndef MULTILOOP_LUA_NORETURN_H
#define MULTILOOP_LUA_NORETURN_H

#include <lauxlib.h>
#include <lua.h>

#if defined(__GNUC__)
__attribute__((noreturn)) extern int lua_error(lua_State *L);
__attribute__((noreturn)) extern int luaL_error(lua_State *L, const char *fmt, ...);
__attribute__((noreturn)) extern int luaL_argerror(lua_State *L, int arg, const char *extramsg);
__attribute__((noreturn)) extern int luaL_typeerror(lua_State *L, int arg, const char *tname);
#endif

#endif
