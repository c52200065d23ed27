/*
 * module.c: luaopen_multiloop_core, the module's one exported symbol, and the
 * module-level functions of `multiloop.core`: new (server.c), shared
 * (shared.c), wait_signal and parallelism (here). Loaded into the main state
 * only; worker states get their own functions from worker.c.
 *
 * Threads: the thread of the state that requires the module. wait_signal
 * blocks that thread (the workers keep serving) on a loop of its own, made
 * and closed by each call, so nothing here outlives the call.
 */
#include <signal.h>

#include "multiloop.h"

static void signal_cb(uv_signal_t *h, int signum) {
  *(int *)h->loop->data = signum;
  uv_stop(h->loop);
}

/* core.wait_signal(): blocks this thread until SIGINT or SIGTERM arrives and
 * returns its name. The workers keep serving meanwhile. */
static int core_wait_signal(lua_State *L) {
  uv_loop_t loop;
  uv_signal_t sigint, sigterm;
  int got = 0, rc;
  if ((rc = uv_loop_init(&loop)) != 0)
    return luaL_error(L, "wait_signal: %s", uv_strerror(rc));
  loop.data = &got;
  uv_signal_init(&loop, &sigint);
  uv_signal_init(&loop, &sigterm);
  uv_signal_start(&sigint, signal_cb, SIGINT);
  uv_signal_start(&sigterm, signal_cb, SIGTERM);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_close((uv_handle_t *)&sigint, NULL);
  uv_close((uv_handle_t *)&sigterm, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  lua_pushstring(L, got == SIGINT ? "SIGINT" : "SIGTERM");
  return 1;
}

static int core_parallelism(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_available_parallelism());
  return 1;
}

static const luaL_Reg module_funcs[] = {
  { "new", multiloop_server_new },
  { "wait_signal", core_wait_signal },
  { "parallelism", core_parallelism },
  { "shared", multiloop_shared_open },
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
