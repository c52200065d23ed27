/*
 * enter.c: the one door from a libuv callback into a worker's Lua state.
 *
 * Called only on a worker thread, from that worker's loop callbacks. Every push
 * and call happens inside `body`, which runs under lua_pcall with a traceback
 * handler, so no Lua error (memory errors included) can longjmp through libuv.
 * A failure is reported on stderr, naming the worker and the connection; the
 * caller decides what to close. Nothing here allocates outside Lua.
 */
#include <stdio.h>

#include "multiloop.h"

/* Message handler: the error as text, followed by a traceback. */
int multiloop_traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) { /* an error object that is not a string */
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      msg = lua_tostring(L, -1);
    else
      msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* Never raises. Runs `body` protected, with `ev` as its only argument (light
 * userdata). Returns the lua_pcall status; the stack is left as it was.
 * `conn_id` (may be NULL) is read only when reporting, so a body that creates
 * the connection can fill it in. */
int multiloop_enter(multiloop_worker_t *w, lua_CFunction body, void *ev,
                    const lua_Integer *conn_id, const char *what) {
  lua_State *L = w->L;
  int base = lua_gettop(L);
  int rc;
  lua_pushcfunction(L, multiloop_traceback);
  lua_pushcfunction(L, body);
  lua_pushlightuserdata(L, ev);
  rc = lua_pcall(L, 1, 0, base + 1);
  if (rc != LUA_OK) {
    const char *msg = lua_tostring(L, -1);
    /* One fprintf per report, so reports from two workers do not interleave. */
    if (conn_id != NULL && *conn_id > 0)
      fprintf(stderr, "multiloop: worker %d: connection %lld: %s: %s\n", w->id,
              (long long)*conn_id, what, msg ? msg : "(no message)");
    else
      fprintf(stderr, "multiloop: worker %d: %s: %s\n", w->id, what,
              msg ? msg : "(no message)");
    fflush(stderr);
  }
  lua_settop(L, base);
  return rc;
}
