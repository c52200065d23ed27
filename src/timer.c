/*
 * timer.c: timers in a worker's Lua state: the primitives under
 * worker.timer(ms, fn) (once), worker.every(ms, fn) (repeating) and
 * worker.now(), which worker.c puts in the worker's core table and
 * lua/multiloop/worker.lua builds the `worker` object from, and the timer
 * object ("multiloop.timer") with :stop(). A timer's callback runs as a
 * light thread (thread.c), with no Lua in between, so it may sleep.
 *
 * Runs only on the worker thread that owns the loop and the Lua state. Each
 * timer is a full userdata with the uv_timer_t embedded; its callback lives
 * in the userdata's one user value. While the handle is open a registry ref
 * pins the userdata, so the garbage collector cannot free memory libuv is
 * using, and an open timer sits in its generation's list (g->timers).
 *
 * A timer is open from creation until it is done: a once timer when it has
 * fired, any timer on :stop(), on a Lua error in its callback (reported by
 * multiloop_resume as "timer", naming the worker; only that timer stops,
 * also when the error comes after the callback yielded), or
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
  multiloop_gen_t *g;                  /* its state's generation (worker.c) */
  multiloop_timer_t *prev, *next;      /* the generation's list of open timers */
  uint64_t ms;
  int ref;                             /* pins the userdata while the handle is open */
  unsigned repeat : 1;                 /* every(), not timer() */
  unsigned closing : 1;                /* uv_close called, or never opened */
};

/* --- closing --------------------------------------------------------------- */

static void close_cb(uv_handle_t *h) {
  multiloop_timer_t *t = h->data;
  multiloop_gen_t *g = t->g;
  lua_State *L = g->L;
  int ref = t->ref;
  /* Forget the callback too: a stopped timer that Lua still holds should not
   * keep its closure (and whatever that captures) alive. No allocation here. */
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  lua_pushnil(L);
  lua_setiuservalue(L, -2, 1);
  lua_pop(L, 1);
  t->ref = LUA_NOREF;
  luaL_unref(L, LUA_REGISTRYINDEX, ref);      /* may free t: touch nothing after */
  g->pending--;
  multiloop_gen_check(g);
}

/* Stops for good. Returns 1 when the timer was still open. */
static int timer_close(multiloop_timer_t *t) {
  multiloop_gen_t *g = t->g;
  if (t->closing) return 0;
  t->closing = 1;
  if (t->prev) t->prev->next = t->next;
  else g->timers = t->next;
  if (t->next) t->next->prev = t->prev;
  t->prev = t->next = NULL;
  g->pending++;                                /* close_cb uses g->L */
  uv_close((uv_handle_t *)&t->h, close_cb);
  return 1;
}

/* worker.c: the worker (or a generation) is closing, or never started:
 * close every timer of g. */
void multiloop_timers_close(multiloop_gen_t *g) {
  while (g->timers) timer_close(g->timers);
}

/* worker.c: a reload switched away from g: its `every` timers stop (its
 * once timers still fire while it drains). */
void multiloop_timers_stop_every(multiloop_gen_t *g) {
  multiloop_timer_t *t = g->timers, *next;
  for (; t; t = next) {
    next = t->next;
    if (t->repeat) timer_close(t);
  }
}

/* --- firing ---------------------------------------------------------------- */

/* thread.c: a callback that yielded has ended (the thread pins the timer's
 * userdata meanwhile), or one raised: that stops its timer. */
static void fire_ended(void *data, int ok) {
  if (!ok) timer_close(data);
}

/* fn(timer), as a light thread (thread.c): in the worker's spare coroutine,
 * pushed without allocating, so a callback that does not yield costs no
 * more than a protected call. */
static void timer_cb(uv_timer_t *h) {
  multiloop_timer_t *t = h->data;
  lua_State *co;
  /* A once timer is done before its callback runs, so that :stop() inside it
   * returns false. The ref (and so t) lives until close_cb, which runs on a
   * later turn of the loop. */
  if (!t->repeat) timer_close(t);
  if ((co = multiloop_thread_spare(t->g)) == NULL) {   /* no memory: reported */
    timer_close(t);
    return;
  }
  lua_rawgeti(co, LUA_REGISTRYINDEX, t->ref);  /* timer */
  lua_getiuservalue(co, -1, 1);                /* timer fn */
  lua_insert(co, -2);                          /* fn timer */
  multiloop_thread_run(t->g, 1, "timer", fire_ended, t, t->ref);
}

/* --- the Lua API ----------------------------------------------------------- */

/* core.timer(ms, fn) and core.every(ms, fn): lua/multiloop/worker.lua
 * hands them to handlers as worker.timer and worker.every themselves (a Lua
 * wrapper that checked the arguments cost about 110 ns, +20%, per timer
 * made), so the checks and their messages are here: ms an integer (a float
 * with an integral value will do) of at least 0, at least 1 for every
 * (every(0) would run again in the same pass of libuv 1.44's timer loop,
 * starving everything else), and fn a function. Upvalue 1 is the worker
 * (light userdata). */
static const char *shown(lua_State *L, int arg) {
  return lua_type(L, arg) == LUA_TNUMBER ? luaL_tolstring(L, arg, NULL) : luaL_typename(L, arg);
}

static int start_timer(lua_State *L, int repeat) {
  multiloop_worker_t *w = lua_touserdata(L, lua_upvalueindex(1));
  multiloop_gen_t *g = multiloop_gen_of(L);
  const char *who = repeat ? "worker.every" : "worker.timer";
  int ok = 0;
  lua_Integer ms = lua_type(L, 1) == LUA_TNUMBER ? lua_tointegerx(L, 1, &ok) : 0;
  multiloop_timer_t *t;
  if (!ok || ms < (repeat ? 1 : 0))
    return luaL_error(L, "%s: ms must be a %s integer (got %s)", who,
                      repeat ? "positive" : "non-negative", shown(L, 1));
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
  t->g = g;
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
  t->next = g->timers;
  if (g->timers) g->timers->prev = t;
  g->timers = t;
  uv_timer_start(&t->h, timer_cb, (uint64_t)ms, repeat ? (uint64_t)ms : 0);
  return 1;
}

/* core.timer(ms, fn): fn(timer) once, after ms. */
static int core_timer(lua_State *L) { return start_timer(L, 0); }

/* core.every(ms, fn): fn(timer) every ms (at least 1) until stopped. */
static int core_every(lua_State *L) { return start_timer(L, 1); }

/* core.now(), which worker.lua hands out as worker.now itself: the loop's
 * cached time in ms (uv_now), updated once per turn of the loop. */
static int core_now(lua_State *L) {
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

/* For worker.c's core table: each function closes over the worker (one
 * light userdata upvalue). */
const luaL_Reg multiloop_timer_funcs[] = {
  { "timer", core_timer },
  { "every", core_every },
  { "now", core_now },
  { NULL, NULL }
};

/* Makes the timer metatable in a worker's state, before its core table.
 * Runs while the worker loads its handler (protected). */
void multiloop_timer_register(lua_State *L) {
  if (luaL_newmetatable(L, TIMER_MT)) {
    luaL_newlib(L, timer_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, timer_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
}
