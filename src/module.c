/*
 * module.c: luaopen_multiloop_core, the module's one exported symbol, and the
 * module-level functions of `multiloop.core`: new and wait_signal
 * (server.c), shared (shared.c), log (log.c), parallelism (here). Loaded into the main
 * state only; worker states get their own functions from worker.c.
 *
 * Threads: the thread of the state that requires the module.
 */
#include "multiloop.h"

static int core_parallelism(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_available_parallelism());
  return 1;
}

/* core.worker(): in a worker's state, its `worker` object (worker.c keeps
 * it in the registry once the handler has loaded); nil elsewhere. How a
 * library loaded by the handler (multiloop.ngx) finds its worker. */
static int core_worker(lua_State *L) {
  lua_getfield(L, LUA_REGISTRYINDEX, MULTILOOP_WORKER_KEY);
  return 1;
}

/* A size hint: any number (LuaJIT's table.new truncates: lua-resty-redis
 * asks for n / 2, a float in Lua 5.4), clamped to [0, 2^20]; NaN is 0. */
static int size_hint(lua_State *L, int arg) {
  lua_Number x;
  if (lua_isnoneornil(L, arg)) return 0;
  x = luaL_checknumber(L, arg);
  if (!(x > 0)) return 0;
  return x >= (lua_Number)(1 << 20) ? 1 << 20 : (int)x;
}

/* core.table_new(narr, nrec): a table with room for narr array items and
 * nrec fields (lua_createtable), as LuaJIT's table.new: libraries written
 * for OpenResty (lua-resty-redis) preallocate with it when they find it.
 * Negative or absurd sizes are clamped (a hint, not a bound). */
static int core_table_new(lua_State *L) {
  int narr = size_hint(L, 1), nrec = size_hint(L, 2);
  lua_createtable(L, narr, nrec);
  return 1;
}

static const luaL_Reg module_funcs[] = {
  { "worker", core_worker },
  { "table_new", core_table_new },
  { "new", multiloop_server_new },
  { "wait_signal", multiloop_wait_signal },
  { "parallelism", core_parallelism },
  { "listen_fds", multiloop_listen_fds },
  { "shared", multiloop_shared_open },
  { "log", multiloop_log_main },           /* multiloop.log (log.c) */
  { NULL, NULL }
};

LUAMOD_API int luaopen_multiloop_core(lua_State *L);

__attribute__((visibility("default"))) int luaopen_multiloop_core(lua_State *L) {
  /* A peer that goes away must be an EPIPE from write, not a dead process
   * (LuaSocket does the same). Leave a handler someone else installed. */
  struct sigaction sa;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
    signal(SIGPIPE, SIG_IGN);

  multiloop_server_register(L);
  luaL_newlib(L, module_funcs);
  lua_pushfstring(L, "libuv %s", uv_version_string());
  lua_setfield(L, -2, "uv_version");
  return 1;
}
