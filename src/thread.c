/*
 * thread.c: light threads: coroutines of a worker's Lua state that the
 * worker resumes from its loop callbacks. worker.spawn, worker.wait,
 * worker.sleep and worker.kill (C functions in the core table), the thread
 * object ("multiloop.thread"), the await template every blocking-style
 * primitive uses (multiloop.h documents it), and timer callbacks run as
 * light threads (multiloop_thread_spare/_run, for timer.c).
 *
 * Runs only on the worker thread that owns the loop and the Lua state. A
 * thread is a full userdata: its first user value is its coroutine (kept once
 * it has ended, holding what it returned or its error, for worker.wait), its
 * second what it pins while suspended (a timer callback's timer). The
 * coroutine's extra space (lua_getextraspace) points at the thread while it
 * is live, so a primitive finds its thread in O(1); the worker's main thread
 * and coroutines made by coroutine.create hold NULL there. While live, a
 * registry ref pins the userdata, and the thread sits in its worker's list
 * (g->th.live), counted in g->th.count (its generation's) (published as w->nthreads for stats).
 *
 * A thread is resumed only from a loop callback (its sleep timer, the ready
 * queue's uv_idle_t, later a read) or, once, by worker.spawn itself, always
 * through multiloop_resume (enter.c). It ends when its function returns, on
 * an error (reported with its traceback as "thread", or "timer" for a timer
 * callback; waiters get false, err), on worker.kill, or when the loop has run
 * dry with it still suspended (multiloop_threads_close: lua_closethread, so
 * its to-be-closed variables run). Lua code can still resume one by hand
 * (coroutine.resume on what coroutine.running gave it): what it awaited is
 * then cancelled by its next primitive (multiloop_thread_settle), kill
 * refuses it while it runs, and a wake-up that finds it dead ends it. Ending drops the ref (after its sleep
 * timer's close callback, if it ever slept); the object lives on for as long
 * as Lua code holds it.
 *
 * Timer callbacks: each runs in the worker's spare thread; one that returns
 * without yielding leaves it for the next (no allocation per fire); one that
 * yields keeps it as a live thread, and the next fire makes a new spare.
 *
 * Stopping: multiloop_threads_stop (as the worker closes: at the end of a
 * graceful stop, or at once) hands every sleeping thread nil, "stopped" on the
 * next turn; from then on sleep returns nil, "stopped" at once. A graceful
 * stop waits for live threads as it waits for connections.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "multiloop.h"

#define THREAD_MT "multiloop.thread"

struct multiloop_thread_s {
  uv_timer_t *timer;                   /* worker.sleep's, malloc'd by the first sleep */
  multiloop_worker_t *w;
  multiloop_gen_t *g;                  /* the generation whose state it is a coroutine of */
  lua_State *co;
  int ref;                             /* pins the userdata while live (and its timer open) */
  multiloop_thread_t *prev, *next;     /* g->th.live */
  multiloop_thread_t *qprev, *qnext;   /* on `queue`: a target's waiters, or g->th.ready */
  multiloop_tqueue_t *queue;
  multiloop_tqueue_t waiters;          /* threads in worker.wait for this one */
  multiloop_thread_t *target;          /* worker.wait: the thread waited for */
  multiloop_await_cancel cancel;       /* set while awaiting something */
  multiloop_push_fn ready_push;        /* on g->th.ready: what it is resumed with */
  void *await_data;                    /* cancel's data while awaiting; ready_push's ev when ready */
  const char *what;                    /* "thread", "timer", "serve": names it in reports */
  const lua_Integer *conn_id;          /* names a serve thread's connection in reports, or NULL */
  multiloop_thread_end_fn on_end;      /* a timer's or a connection's: runs as it ends */
  void *on_end_data;
  unsigned live : 1;                   /* in g->th.live, counted */
  unsigned running : 1;                /* resumed (running, or resuming another) */
  unsigned ended : 1;
  unsigned ok : 1;                     /* ended by returning: co holds its results */
  unsigned timer_open : 1;             /* `timer` initialised, not yet closed */
  unsigned exposed : 1;                /* worker.spawn's: its object is Lua's */
};

/* --- queues ------------------------------------------------------------------ */

static void enqueue(multiloop_tqueue_t *q, multiloop_thread_t *t) {
  t->queue = q;
  t->qnext = NULL;
  t->qprev = q->tail;
  if (q->tail) q->tail->qnext = t;
  else q->head = t;
  q->tail = t;
  q->n++;
}

static void unqueue(multiloop_thread_t *t) {
  multiloop_tqueue_t *q = t->queue;
  if (q == NULL) return;
  if (t->qprev) t->qprev->qnext = t->qnext;
  else q->head = t->qnext;
  if (t->qnext) t->qnext->qprev = t->qprev;
  else q->tail = t->qprev;
  q->n--;
  t->queue = NULL;
  t->qprev = t->qnext = NULL;
}

static multiloop_thread_t **self_slot(lua_State *co) {
  return (multiloop_thread_t **)lua_getextraspace(co);
}

static void publish(multiloop_worker_t *w) {
  atomic_store_explicit(&w->nthreads, w->gen[0].th.count + w->gen[1].th.count,
                        memory_order_relaxed);
}

/* --- making and ending ---------------------------------------------------------- */

/* Pushes a new thread object with its coroutine (not yet live, no ref).
 * Raises on memory errors, with nothing to undo. */
static multiloop_thread_t *new_thread(lua_State *L, multiloop_worker_t *w, const char *what) {
  multiloop_thread_t *t = lua_newuserdatauv(L, sizeof *t, 2);
  memset(t, 0, sizeof *t);
  t->ref = LUA_NOREF;
  t->w = w;
  t->g = multiloop_gen_of(L);
  t->what = what;
  luaL_setmetatable(L, THREAD_MT);
  t->co = lua_newthread(L);                        /* ud co */
  lua_setiuservalue(L, -2, 1);                     /* ud */
  *self_slot(t->co) = t;
  return t;
}

static void link_live(multiloop_thread_t *t) {
  multiloop_gen_t *g = t->g;
  t->live = 1;
  t->prev = NULL;
  t->next = g->th.live;
  if (g->th.live) g->th.live->prev = t;
  g->th.live = t;
  g->th.count++;
  publish(t->w);
}

/* Sets user value n of t's object to the value on top of `from` (popped).
 * No allocation: t->ref is valid. */
static void set_uv(lua_State *from, multiloop_thread_t *t, int n) {
  lua_rawgeti(from, LUA_REGISTRYINDEX, t->ref);
  lua_insert(from, -2);
  lua_setiuservalue(from, -2, n);
  lua_pop(from, 1);
}

static void timer_close_cb(uv_handle_t *h) {
  multiloop_thread_t *t = h->data;
  multiloop_gen_t *g = t->g;
  int ref = t->ref;
  free(h);
  t->timer = NULL;
  t->ref = LUA_NOREF;
  luaL_unref(g->L, LUA_REGISTRYINDEX, ref);        /* may free t: touch nothing after */
  g->pending--;
  multiloop_gen_check(g);
}

static void ready_cb(uv_idle_t *h);
static void cancel_queued(multiloop_thread_t *t, void *data) {
  (void)data;
  unqueue(t);
}

/* Queues t (suspended) to be resumed with `push`'s values on the next turn
 * of the loop: with true when push is NULL (nil, "stopped" once closing).
 * Whatever it awaited is forgotten: kill or close now take it off the queue. */
void multiloop_thread_ready(multiloop_thread_t *t, multiloop_push_fn push, void *ev) {
  multiloop_gen_t *g = t->g;
  unqueue(t);
  t->cancel = cancel_queued;
  t->ready_push = push;
  t->await_data = ev;
  enqueue(&g->th.ready, t);
  if (g->th.open) uv_idle_start(&g->th.ready_idle, ready_cb);
}

static int push_wait(lua_State *L, void *ev);
static int push_stopped(lua_State *L, void *ev);

/* t has ended (returned, failed, killed or closed; its coroutine is no
 * longer running): out of the live list, its waiters readied, its ref
 * dropped (after its timer's close, if it has one). */
static void end_thread(multiloop_thread_t *t, lua_State *from) {
  multiloop_worker_t *w = t->w;
  multiloop_gen_t *g = t->g;
  t->ended = 1;
  t->running = 0;
  t->cancel = NULL;
  unqueue(t);
  *self_slot(t->co) = NULL;
  if (t->live) {
    t->live = 0;
    if (t->prev) t->prev->next = t->next;
    else g->th.live = t->next;
    if (t->next) t->next->prev = t->prev;
    t->prev = t->next = NULL;
    g->th.count--;
    publish(w);
  }
  while (t->waiters.head) multiloop_thread_ready(t->waiters.head, push_wait, t->waiters.head);
  if (t->on_end) {                                 /* before the unpin: its data is valid */
    multiloop_thread_end_fn fn = t->on_end;
    t->on_end = NULL;
    fn(t->on_end_data, t->ok);
  }
  lua_pushnil(from);
  set_uv(from, t, 2);                              /* unpin */
  if (!t->exposed) {
    lua_pushnil(from);                             /* no one can wait: drop co */
    set_uv(from, t, 1);
  }
  if (t->timer_open) {
    t->timer_open = 0;
    g->pending++;                                  /* its close callback uses g->L */
    uv_close((uv_handle_t *)t->timer, timer_close_cb);
  } else {
    int ref = t->ref;
    t->ref = LUA_NOREF;
    luaL_unref(from, LUA_REGISTRYINDEX, ref);      /* may free t */
  }
  if (w->stopping && !w->closing && g->th.count == 0) multiloop_worker_drained(w);
  multiloop_gen_check(g);
}

/* Closes t's coroutine (its to-be-closed variables run; an error in one is
 * reported) and leaves it empty. */
static void close_co(multiloop_thread_t *t, lua_State *from) {
  int failed = lua_status(t->co) != LUA_OK && lua_status(t->co) != LUA_YIELD;
  *self_slot(t->co) = NULL;                        /* __close cannot yield to us */
  /* A coroutine that failed gives its (reported) error back: not news. */
  if (multiloop_closethread(t->co, from) != LUA_OK && !failed) {
    const char *msg = lua_type(t->co, -1) == LUA_TSTRING ? lua_tostring(t->co, -1) : NULL;
    multiloop_log(t->w, MULTILOOP_LOG_ERROR, t->conn_id ? *t->conn_id : 0, "%s: closing: %s",
                  t->what, msg ? msg : "(error object is not a string)");
  }
  lua_settop(t->co, 0);
}

/* What a resume came back with. */
static void settled(multiloop_thread_t *t, lua_State *from, int status, int nres) {
  t->running = 0;
  if (status == LUA_YIELD) {
    if (t->cancel == NULL) {                       /* a bare coroutine.yield: sleep(0) */
      lua_pop(t->co, nres);
      multiloop_thread_ready(t, NULL, NULL);
    }
    return;
  }
  if (status == LUA_OK) {
    t->ok = 1;
  } else {                                         /* reported; the error is on top of co */
    lua_State *co = t->co;
    t->ok = 0;
    if (t->exposed) lua_xmove(co, from, 1);        /* kept for waiters */
    close_co(t, from);
    if (t->exposed) lua_xmove(from, co, 1);
  }
  end_thread(t, from);
}

static void resume_thread(multiloop_thread_t *t, lua_State *from, int nargs,
                          multiloop_push_fn push, void *ev) {
  int nres = 0, status;
  t->running = 1;
  status = multiloop_resume(t->w, from, t->co, nargs, push, ev, &nres, t->conn_id, t->what);
  settled(t, from, status, nres);
}

/* --- the await template ----------------------------------------------------- */

/* A light thread that runs while still awaiting something was resumed by
 * hand (coroutine.resume) out of that wait: the loop clears `cancel` before
 * it resumes one. The wait is over, so it is cancelled here, before the
 * thread makes a new one: otherwise its event would wake the thread again,
 * in the middle of another wait, or after it has ended and been freed. */
void multiloop_thread_settle(lua_State *L) {
  multiloop_thread_t *t = *self_slot(L);
  if (t != NULL && t->cancel != NULL) {
    multiloop_await_cancel cancel = t->cancel;
    t->cancel = NULL;
    cancel(t, t->await_data);
  }
}

multiloop_thread_t *multiloop_thread_self(lua_State *L, const char *who) {
  multiloop_thread_t *t = *self_slot(L);
  if (t == NULL)
    luaL_error(L, "%s: cannot yield here (not in a light thread: use worker.spawn)", who);
  if (!lua_isyieldable(L))
    luaL_error(L, "%s: cannot yield here (across a C-call boundary: use worker.spawn)", who);
  multiloop_thread_settle(L);
  return t;
}

int multiloop_await(lua_State *L, multiloop_thread_t *t, multiloop_await_cancel cancel,
                    void *data, lua_KFunction k) {
  t->cancel = cancel;
  t->await_data = data;
  return lua_yieldk(L, 0, (lua_KContext)data, k);
}

/* Resumes a suspended thread from a loop callback. One that Lua code has
 * resumed by hand (coroutine.resume: running now) is left alone; one it has
 * closed or run to its end by hand (coroutine.close) has ended. */
static void wake_thread(multiloop_thread_t *t, int nargs, multiloop_push_fn push, void *ev) {
  t->cancel = NULL;
  if (t->running || lua_status(t->co) != LUA_YIELD) {
    lua_pop(t->co, nargs);
    if (!t->running) {
      t->ok = 0;
      end_thread(t, t->g->L);
    }
    return;
  }
  resume_thread(t, t->g->L, nargs, push, ev);
}

void multiloop_thread_wake(multiloop_thread_t *t, int nargs, multiloop_push_fn push, void *ev) {
  wake_thread(t, nargs, push, ev);
}

lua_State *multiloop_thread_co(multiloop_thread_t *t) { return t->co; }

int multiloop_threads_closing(lua_State *L) { return multiloop_gen_of(L)->th.closing; }

/* The ready queue: each thread queued before this turn, resumed once. */
static void ready_cb(uv_idle_t *h) {
  multiloop_gen_t *g = h->data;
  int n = g->th.ready.n;
  while (n-- > 0 && g->th.ready.head) {
    multiloop_thread_t *t = g->th.ready.head;
    multiloop_push_fn push = t->ready_push;
    unqueue(t);
    if (push == NULL && g->th.closing) push = push_stopped;
    if (push) {
      wake_thread(t, 0, push, t->await_data);
    } else {                                       /* sleep(0): true, or "stopped" */
      lua_pushboolean(t->co, 1);
      wake_thread(t, 1, NULL, NULL);
    }
  }
  if (g->th.ready.head == NULL) uv_idle_stop(h);
}

/* --- the Lua API ------------------------------------------------------------ */

static multiloop_thread_t *check_thread(lua_State *L, int arg, const char *who) {
  multiloop_thread_t *t = luaL_testudata(L, arg, THREAD_MT);
  if (t == NULL)
    luaL_error(L, "%s: thread must be a " THREAD_MT " (got %s)", who, luaL_typename(L, arg));
  return t;
}

/* What an ended thread gives its waiters: true, results... or false, err. */
static int push_results(lua_State *L, multiloop_thread_t *t) {
  int i, n;
  n = lua_gettop(t->co);
  luaL_checkstack(L, n + 1, "worker.wait: too many results");
  if (!lua_checkstack(t->co, 1)) luaL_error(L, "not enough memory");
  lua_pushboolean(L, t->ok);
  for (i = 1; i <= n; i++) {
    lua_pushvalue(t->co, i);
    lua_xmove(t->co, L, 1);
  }
  return n + 1;
}

/* ready_push for a waiter whose target has ended (ev: the waiter). */
static int push_wait(lua_State *L, void *ev) {
  multiloop_thread_t *t = ev;
  multiloop_thread_t *target = t->target;
  t->target = NULL;
  return push_results(L, target);
}

static int push_stopped(lua_State *L, void *ev) {
  (void)ev;
  lua_pushnil(L);
  lua_pushliteral(L, "stopped");
  return 2;
}

/* core.spawn(fn, ...) -> thread: runs fn(...) in a new light thread at once,
 * until it first yields or ends. */
static int core_spawn(lua_State *L) {
  multiloop_worker_t *w = lua_touserdata(L, lua_upvalueindex(1));
  int n = lua_gettop(L);
  multiloop_thread_t *t;
  if (!lua_isfunction(L, 1))
    return luaL_error(L, "worker.spawn: fn must be a function (got %s)", luaL_typename(L, 1));
  t = new_thread(L, w, "thread");                  /* fn args ud */
  t->exposed = 1;
  if (!lua_checkstack(t->co, n)) return luaL_error(L, "worker.spawn: too many arguments");
  lua_pushvalue(L, -1);
  t->ref = luaL_ref(L, LUA_REGISTRYINDEX);         /* may raise: nothing started yet */
  lua_insert(L, 1);                                /* ud fn args */
  lua_xmove(L, t->co, n);                          /* ud */
  link_live(t);
  resume_thread(t, L, n - 1, NULL, NULL);
  return 1;
}

/* Runs fn(arg), the two values on top of L (popped), in a new light thread at
 * once, until it first yields or ends; on_end(data, ok) runs as it ends, and
 * the thread pins `arg` until then, so that `data` (arg's memory, a
 * connection) stays valid. Protected: raises (with nothing started) only on
 * a memory error. */
void multiloop_thread_start(lua_State *L, multiloop_worker_t *w, const char *what,
                            const lua_Integer *conn_id, multiloop_thread_end_fn on_end,
                            void *data) {
  multiloop_thread_t *t = new_thread(L, w, what);  /* fn arg ud */
  lua_pushvalue(L, -1);
  t->ref = luaL_ref(L, LUA_REGISTRYINDEX);         /* may raise: nothing started yet */
  lua_pushvalue(L, -2);
  lua_setiuservalue(L, -2, 2);                     /* pins arg */
  lua_pop(L, 1);                                   /* fn arg (the ref holds ud) */
  lua_xmove(L, t->co, 2);                          /* a new coroutine has room for 2 */
  t->conn_id = conn_id;
  t->on_end = on_end;
  t->on_end_data = data;
  link_live(t);
  resume_thread(t, L, 1, NULL, NULL);
}

static void cancel_sleep(multiloop_thread_t *t, void *data) {
  (void)data;
  uv_timer_stop(t->timer);
}

static void sleep_cb(uv_timer_t *h) {
  multiloop_thread_t *t = h->data;
  lua_pushboolean(t->co, 1);                       /* sleep returns true */
  multiloop_thread_wake(t, 1, NULL, NULL);
}

/* core.sleep(ms) -> true, or nil, "stopped" once the worker is closing. */
static int core_sleep(lua_State *L) {
  multiloop_worker_t *w = lua_touserdata(L, lua_upvalueindex(1));
  int ok = 0;
  lua_Integer ms = lua_type(L, 1) == LUA_TNUMBER ? lua_tointegerx(L, 1, &ok) : 0;
  multiloop_thread_t *t;
  if (!ok || ms < 0)
    return luaL_error(L, "worker.sleep: ms must be a non-negative integer (got %s)",
                      lua_type(L, 1) == LUA_TNUMBER ? luaL_tolstring(L, 1, NULL)
                                                    : luaL_typename(L, 1));
  t = multiloop_thread_self(L, "worker.sleep");
  if (t->g->th.closing) return push_stopped(L, NULL);
  if (ms == 0) {                                   /* once round the loop */
    multiloop_thread_ready(t, NULL, NULL);
    return multiloop_await(L, t, cancel_queued, NULL, NULL);
  }
  if (!t->timer_open) {                            /* most threads never sleep */
    uv_timer_t *timer = malloc(sizeof *timer);
    if (timer == NULL) return luaL_error(L, "worker.sleep: not enough memory");
    uv_timer_init(&w->loop, timer);                /* cannot fail on Unix */
    timer->data = t;
    t->timer = timer;                              /* freed by timer_close_cb */
    t->timer_open = 1;
  }
  uv_timer_start(t->timer, sleep_cb, (uint64_t)ms, 0);
  return multiloop_await(L, t, cancel_sleep, NULL, NULL);
}

/* core.wait(thread) -> true, results... | false, err. */
static int core_wait(lua_State *L) {
  multiloop_thread_t *target = check_thread(L, 1, "worker.wait");
  multiloop_thread_t *t;
  if (target->ended) return push_results(L, target);
  t = multiloop_thread_self(L, "worker.wait");
  if (t == target) return luaL_error(L, "worker.wait: a thread cannot wait for itself");
  lua_settop(L, 1);                                /* the target stays pinned here */
  t->target = target;
  enqueue(&target->waiters, t);
  return multiloop_await(L, t, cancel_queued, NULL, NULL);
}

/* Running: resumed by the loop, or by hand (coroutine.resume): the one
 * calling, or one with frames that is not suspended ("normal": it resumed
 * the caller). */
static int is_running(multiloop_thread_t *t, lua_State *L) {
  lua_Debug ar;
  return t->running || t->co == L || (lua_status(t->co) == LUA_OK && lua_getstack(t->co, 0, &ar));
}

/* core.kill(thread) -> true | nil, "dead" | nil, "running". */
static int core_kill(lua_State *L) {
  multiloop_thread_t *t = check_thread(L, 1, "worker.kill");
  if (t->ended || is_running(t, L)) {
    lua_pushnil(L);
    lua_pushstring(L, t->ended ? "dead" : "running");
    return 2;
  }
  lua_pushliteral(L, "killed");                    /* before anything changes */
  if (t->cancel) t->cancel(t, t->await_data);
  t->cancel = NULL;
  close_co(t, L);
  lua_xmove(L, t->co, 1);                          /* waiters get false, "killed" */
  t->ok = 0;
  end_thread(t, L);
  lua_pushboolean(L, 1);
  return 1;
}

static int thread_tostring(lua_State *L) {
  multiloop_thread_t *t = luaL_checkudata(L, 1, THREAD_MT);
  lua_pushfstring(L, THREAD_MT " (worker %d, %s)", t->w->id,
                  t->ended ? "dead" : t->running ? "running" : "suspended");
  return 1;
}

const luaL_Reg multiloop_thread_funcs[] = {
  { "spawn", core_spawn },
  { "wait", core_wait },
  { "sleep", core_sleep },
  { "kill", core_kill },
  { NULL, NULL }
};

void multiloop_thread_register(lua_State *L) {
  if (luaL_newmetatable(L, THREAD_MT)) {
    lua_pushcfunction(L, thread_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
}

/* --- timer callbacks ---------------------------------------------------------- */

/* Protected: a new spare thread. */
static int spare_body(lua_State *L) {
  multiloop_gen_t *g = lua_touserdata(L, 1);
  multiloop_thread_t *t = new_thread(L, g->w, "timer");
  t->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  g->th.spare = t;
  return 0;
}

lua_State *multiloop_thread_spare(multiloop_gen_t *g) {
  if (g->th.spare == NULL && multiloop_enter(g, spare_body, g, NULL, "timer") != LUA_OK)
    return NULL;
  return g->th.spare->co;
}

void multiloop_thread_run(multiloop_gen_t *g, int nargs, const char *what,
                          multiloop_thread_end_fn on_end, void *data, int pin_ref) {
  multiloop_worker_t *w = g->w;
  multiloop_thread_t *t = g->th.spare;
  int nres = 0, status;
  t->what = what;
  t->on_end = on_end;
  t->on_end_data = data;
  t->running = 1;
  status = multiloop_resume(w, g->L, t->co, nargs, NULL, NULL, &nres, NULL, what);
  if (status == LUA_OK) {                          /* the fast path: kept for the next */
    t->running = 0;
    t->on_end = NULL;
    lua_settop(t->co, 0);
    return;
  }
  g->th.spare = NULL;
  if (status == LUA_YIELD) {
    link_live(t);
    lua_rawgeti(g->L, LUA_REGISTRYINDEX, pin_ref);   /* nil for LUA_NOREF */
    set_uv(g->L, t, 2);
  }
  settled(t, g->L, status, nres);
}

/* --- the worker's start and end ----------------------------------------------- */

void multiloop_threads_init(multiloop_gen_t *g) {
  memset(&g->th, 0, sizeof g->th);
  uv_idle_init(&g->w->loop, &g->th.ready_idle);    /* cannot fail */
  g->th.ready_idle.data = g;
  g->th.open = 1;
  publish(g->w);
}

/* The worker (or a generation that drains past drain_timeout) is closing:
 * each sleeping thread is resumed with nil, "stopped" on the next turn of
 * the loop, and sleep returns that at once from now on. Threads waiting for
 * another stay (it ends, or is closed). */
void multiloop_threads_stop(multiloop_gen_t *g) {
  multiloop_thread_t *t;
  if (g->th.closing || !g->th.open) return;
  g->th.closing = 1;
  for (t = g->th.live; t; t = t->next) {
    if (t->cancel == cancel_sleep) {
      uv_timer_stop(t->timer);
      multiloop_thread_ready(t, push_stopped, NULL);
    } else if (t->queue == &g->th.ready && t->ready_push == NULL) {
      t->ready_push = push_stopped;                /* sleep(0) */
    }
  }
}

static void idle_close_cb(uv_handle_t *h) {
  multiloop_gen_t *g = h->data;
  g->pending--;
  multiloop_gen_check(g);
}

/* After the loop has run dry (or as a drained generation closes): every
 * thread still suspended (waiting for a thread that never ends, say) is
 * closed, its to-be-closed variables run; then the idle handle, the spare
 * and any sleep timer are closed. Their close callbacks run later (counted
 * in g->pending). */
void multiloop_threads_close(multiloop_gen_t *g) {
  lua_State *L = g->L;
  if (!g->th.open) return;
  g->th.closing = 1;
  while (L && g->th.live) {
    multiloop_thread_t *t = g->th.live;
    if (t->cancel) t->cancel(t, t->await_data);
    t->cancel = NULL;
    close_co(t, L);                                /* leaves it empty: wait gets false */
    t->ok = 0;
    end_thread(t, L);
  }
  while (g->th.ready.head) unqueue(g->th.ready.head);
  if (L && g->th.spare) {
    multiloop_thread_t *t = g->th.spare;
    g->th.spare = NULL;
    end_thread(t, L);
  }
  g->pending++;
  uv_close((uv_handle_t *)&g->th.ready_idle, idle_close_cb);
  g->th.open = 0;
}
