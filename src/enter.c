/*
 * enter.c: the one door from a libuv callback into a worker's Lua state.
 *
 * Called only on a worker thread, from that worker's loop callbacks, with the
 * generation (worker.c) whose state the event belongs to. Every push
 * and call happens inside `body`, which runs under lua_pcall with a traceback
 * handler, so no Lua error (memory errors included) can longjmp through libuv.
 * A failure is logged (log.c) at level error, naming the worker and the
 * connection; the caller decides what to close. Nothing here allocates outside Lua.
 *
 * multiloop_resume is the same door for a light thread (thread.c): what it
 * pushes is pushed protected on the resuming state, lua_resume itself never
 * raises, and an error in the thread is reported with the thread's own
 * traceback (luaL_traceback over the coroutine, taken before thread.c closes
 * it), protected in turn.
 */
#include <string.h>

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
int multiloop_enter(multiloop_gen_t *g, lua_CFunction body, void *ev,
                    const lua_Integer *conn_id, const char *what) {
  multiloop_worker_t *w = g->w;
  lua_State *L = g->L;
  int base = lua_gettop(L);
  int rc;
  lua_pushcfunction(L, multiloop_traceback);
  lua_pushcfunction(L, body);
  lua_pushlightuserdata(L, ev);
  rc = lua_pcall(L, 1, 0, base + 1);
  if (rc != LUA_OK) {
    const char *msg = lua_tostring(L, -1);
    multiloop_log(w, MULTILOOP_LOG_ERROR, conn_id ? *conn_id : 0, "%s: %s", what,
                  msg ? msg : "(no message)");
  }
  lua_settop(L, base);
  return rc;
}

/* --- light threads ---------------------------------------------------------- */

typedef struct {
  lua_State *co;
  multiloop_push_fn push;
  void *ev;
  int n;                               /* how many push moved onto co */
  const char *text;                    /* report_body: what to print */
} resume_t;

/* Protected, on the resuming state: push's values, moved onto co. */
static int push_body(lua_State *L) {
  resume_t *r = lua_touserdata(L, 1);
  int n = r->push(L, r->ev);
  if (!lua_checkstack(r->co, n)) return luaL_error(L, "not enough memory");
  lua_xmove(L, r->co, n);
  r->n = n;
  return 0;
}

/* Protected, on the resuming state: the message of the error on top of co
 * (as multiloop_traceback makes it) and co's own traceback, for the caller
 * to print. The error object stays on co. */
static int report_body(lua_State *L) {
  resume_t *r = lua_touserdata(L, 1);
  const char *msg;
  if (!lua_checkstack(r->co, 1)) return luaL_error(L, "not enough memory");
  lua_pushvalue(r->co, -1);
  lua_xmove(r->co, L, 1);                          /* ev err */
  msg = lua_tostring(L, 2);
  if (msg == NULL) {
    if (luaL_callmeta(L, 2, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      msg = lua_tostring(L, -1);
    else
      msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 2));
  }
  luaL_traceback(L, r->co, msg, 0);
  r->text = lua_tostring(L, -1);                   /* anchored until the caller's settop */
  return 1;
}

int multiloop_resume(multiloop_worker_t *w, lua_State *from, lua_State *co, int nargs,
                     multiloop_push_fn push, void *ev, int *nres, const lua_Integer *conn_id,
                     const char *what) {
  resume_t r = { co, push, ev, 0, NULL };
  int base = lua_gettop(from);
  int rc = LUA_OK;
  *nres = 0;
  if (push != NULL) {
    lua_pushcfunction(from, multiloop_traceback);
    lua_pushcfunction(from, push_body);
    lua_pushlightuserdata(from, &r);
    rc = lua_pcall(from, 1, 0, base + 1);
    if (rc != LUA_OK) {                            /* co not resumed: the error onto it */
      if (lua_checkstack(co, 1)) lua_xmove(from, co, 1);
      else rc = LUA_ERRMEM;
    }
    lua_settop(from, base);
    nargs += r.n;
  }
  if (rc == LUA_OK) rc = lua_resume(co, from, nargs, nres);
  if (rc != LUA_OK && rc != LUA_YIELD) {
    const char *msg;
    lua_pushcfunction(from, report_body);
    lua_pushlightuserdata(from, &r);
    msg = lua_gettop(co) > 0 && lua_pcall(from, 1, 1, 0) == LUA_OK ? r.text : NULL;
    if (msg == NULL) msg = lua_gettop(co) > 0 && lua_type(co, -1) == LUA_TSTRING
                               ? lua_tostring(co, -1) : "(no message)";
    multiloop_log(w, MULTILOOP_LOG_ERROR, conn_id ? *conn_id : 0, "%s: %s", what, msg);
    lua_settop(from, base);
  }
  return rc;
}
