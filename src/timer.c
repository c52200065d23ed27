/*
 * timer.c: timers in a worker's Lua state: worker.timer(ms, fn) (once),
 * worker.every(ms, fn) (repeating), worker.now(), and the timer object
 * ("multiloop.timer") with :stop().
 *
 * Runs only on the worker thread that owns the loop and the Lua state. Each
 * timer is a full userdata with the uv_timer_t embedded; its callback lives
 * in the userdata's one user value. While the handle is open a registry ref
 * pins the userdata, so the garbage collector cannot free memory libuv is
 * using, and an open timer sits in its worker's list (w->timers).
 *
 * A timer is open from creation until it is done: a once timer when it has
 * fired, any timer on :stop(), on a Lua error in its callback (reported by
 * multiloop_enter as "timer", naming the worker; only that timer stops), or
 * when the worker closes (multiloop_timers_close, from worker.c's finish and
 * after a failed start). Done means uv_close: the close callback drops the
 * ref and the callback, and the object lives on, stopped, for as long as Lua
 * code holds it. There is no restart: a stopped timer stays stopped, so every
 * uv_timer_t is closed exactly once and the loop can always run dry.
 *
 * Once the worker is closing (its loop is ending), worker.timer and
 * worker.every return nil, "stopped" instead of starting a timer that would
 * keep the loop alive. During a graceful stop's grace period timers run.
 */
#include <string.h>

#include "multiloop.h"

#define TIMER_MT "multiloop.timer"

struct multiloop_timer_s {
  uv_timer_t h;                        /* first: libuv hands us &h */
  multiloop_worker_t *w;
  multiloop_timer_t *prev, *next;      /* the worker's list of open timers */
  uint64_t ms;
  int ref;                             /* pins the userdata while the handle is open */
  unsigned repeat : 1;                 /* every(), not timer() */
  unsigned closing : 1;                /* uv_close called, or never opened */
};

/* --- closing --------------------------------------------------------------- */

static void close_cb(uv_handle_t *h) {
  multiloop_timer_t *t = h->data;
  lua_State *L = t->w->L;
  int ref = t->ref;
  /* Forget the callback too: a stopped timer that Lua still holds should not
   * keep its closure (and whatever that captures) alive. No allocation here. */
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  lua_pushnil(L);
  lua_setiuservalue(L, -2, 1);
  lua_pop(L, 1);
  t->ref = LUA_NOREF;
  luaL_unref(L, LUA_REGISTRYINDEX, ref);      /* may free t: touch nothing after */
}

/* Stops for good. Returns 1 when the timer was still open. */
static int timer_close(multiloop_timer_t *t) {
  multiloop_worker_t *w = t->w;
  if (t->closing) return 0;
  t->closing = 1;
  if (t->prev) t->prev->next = t->next;
  else w->timers = t->next;
  if (t->next) t->next->prev = t->prev;
  t->prev = t->next = NULL;
  uv_close((uv_handle_t *)&t->h, close_cb);
  return 1;
}

/* worker.c: the worker is closing, or never started: close every timer. */
void multiloop_timers_close(multiloop_worker_t *w) {
  while (w->timers) timer_close(w->timers);
}

/* --- firing ---------------------------------------------------------------- */

/* Protected: fn(timer). */
static int fire_body(lua_State *L) {
  multiloop_timer_t *t = lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->ref);   /* timer */
  lua_getiuservalue(L, -1, 1);                 /* timer fn */
  lua_insert(L, -2);                           /* fn timer */
  lua_call(L, 1, 0);
  return 0;
}

static void timer_cb(uv_timer_t *h) {
  multiloop_timer_t *t = h->data;
  /* A once timer is done before its callback runs, so that :stop() inside it
   * returns false. The ref (and so t) lives until close_cb, which runs on a
   * later turn of the loop. */
  if (!t->repeat) timer_close(t);
  if (multiloop_enter(t->w, fire_body, t, NULL, "timer") != LUA_OK) timer_close(t);
}

/* --- the Lua API ----------------------------------------------------------- */

/* What an argument was, for an error message: a number as itself, else its
 * type. */
static const char *shown(lua_State *L, int arg) {
  return lua_type(L, arg) == LUA_TNUMBER ? luaL_tolstring(L, arg, NULL) : luaL_typename(L, arg);
}

/* The delay in ms: an integer (a float with an integral value will do) of at
 * least `min`. Raises "worker.timer: ms must be ..." otherwise. */
static lua_Integer check_delay(lua_State *L, const char *who, lua_Integer min) {
  int ok = 0;
  lua_Integer ms = lua_type(L, 1) == LUA_TNUMBER ? lua_tointegerx(L, 1, &ok) : 0;
  if (!ok || ms < min)
    luaL_error(L, "%s: ms must be a %s integer (got %s)", who,
               min > 0 ? "positive" : "non-negative", shown(L, 1));
  return ms;
}

/* Makes a timer firing after `ms`, then every `ms` when `repeat`. Upvalue 1
 * is the worker (light userdata). */
static int start_timer(lua_State *L, int repeat) {
  multiloop_worker_t *w = lua_touserdata(L, lua_upvalueindex(1));
  /* every(0) would run again in the same pass of libuv 1.44's timer loop,
   * starving everything else: a repeating timer needs at least 1 ms. */
  const char *who = repeat ? "worker.every" : "worker.timer";
  lua_Integer ms = check_delay(L, who, repeat ? 1 : 0);
  multiloop_timer_t *t;
  if (!lua_isfunction(L, 2))
    return luaL_error(L, "%s: fn must be a function (got %s)", who, luaL_typename(L, 2));
  if (w->closing) {
    lua_pushnil(L);
    lua_pushliteral(L, "stopped");
    return 2;
  }
  t = lua_newuserdatauv(L, sizeof *t, 1);
  memset(t, 0, sizeof *t);
  t->closing = 1;                              /* closed until libuv has it */
  t->ref = LUA_NOREF;
  t->w = w;
  luaL_setmetatable(L, TIMER_MT);
  lua_pushvalue(L, 2);
  lua_setiuservalue(L, -2, 1);
  lua_pushvalue(L, -1);
  t->ref = luaL_ref(L, LUA_REGISTRYINDEX);     /* may raise: libuv has nothing yet */
  /* Nothing below raises, so the handle cannot be left behind half made. */
  uv_timer_init(&w->loop, &t->h);              /* cannot fail on Unix */
  t->h.data = t;
  t->ms = (uint64_t)ms;
  t->repeat = repeat;
  t->closing = 0;
  t->next = w->timers;
  if (w->timers) w->timers->prev = t;
  w->timers = t;
  uv_timer_start(&t->h, timer_cb, (uint64_t)ms, repeat ? (uint64_t)ms : 0);
  return 1;
}

/* worker.timer(ms, fn): fn(timer) once, after ms. */
static int worker_timer(lua_State *L) { return start_timer(L, 0); }

/* worker.every(ms, fn): fn(timer) every ms (at least 1) until stopped. */
static int worker_every(lua_State *L) { return start_timer(L, 1); }

/* worker.now(): the loop's cached time in ms (uv_now), updated once per turn
 * of the loop. */
static int worker_now(lua_State *L) {
  multiloop_worker_t *w = lua_touserdata(L, lua_upvalueindex(1));
  lua_pushinteger(L, (lua_Integer)uv_now(&w->loop));
  return 1;
}

/* timer:stop() -> true when this call stopped it, false when it had already
 * fired (once), been stopped, or failed. */
static int timer_stop(lua_State *L) {
  multiloop_timer_t *t = luaL_checkudata(L, 1, TIMER_MT);
  lua_pushboolean(L, timer_close(t));
  return 1;
}

static int timer_tostring(lua_State *L) {
  multiloop_timer_t *t = luaL_checkudata(L, 1, TIMER_MT);
  lua_pushfstring(L, TIMER_MT " (%s %I ms, worker %d%s)", t->repeat ? "every" : "once",
                  (lua_Integer)t->ms, t->w->id, t->closing ? ", stopped" : "");
  return 1;
}

static const luaL_Reg timer_methods[] = {
  { "stop", timer_stop },
  { NULL, NULL }
};

static const luaL_Reg worker_funcs[] = {
  { "timer", worker_timer },
  { "every", worker_every },
  { "now", worker_now },
  { NULL, NULL }
};

/* Makes the timer metatable and adds timer/every/now to the `worker` table at
 * `idx`. Runs while the worker loads its handler (protected). */
void multiloop_timer_api(lua_State *L, multiloop_worker_t *w, int idx) {
  idx = lua_absindex(L, idx);
  if (luaL_newmetatable(L, TIMER_MT)) {
    luaL_newlib(L, timer_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, timer_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  lua_pushvalue(L, idx);
  lua_pushlightuserdata(L, w);
  luaL_setfuncs(L, worker_funcs, 1);           /* each closes over the worker */
  lua_pop(L, 1);
}
