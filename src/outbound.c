/*
 * outbound.c: connections a worker makes: worker.tcp() (the socket object,
 * OpenResty's cosocket: connect, the serve methods, setkeepalive), the
 * callback-style worker.connect(host, port, fn), and the keepalive pools.
 *
 * Runs only on the worker thread. The connection itself is an ordinary
 * connection object (conn.c) with the out block after it (conn.h); it reads
 * and writes with serve.c's methods (the socket style) or conn.c's
 * callbacks (worker.connect). The socket object ("multiloop.tcp") is a
 * small shell in front of it, because a pooled connection outlives the
 * socket that made it and serves the next one that connects to the same
 * pool: OpenResty's model. The shell's stream methods forward to its
 * connection (replacing `self`), or answer nil, "closed" without one.
 *
 * Connecting (multiloop_connect_t, one malloc'd block per connect in
 * flight): the pool first (an idle connection there is taken at once);
 * then, if the pool has a backlog and is full, a wait in its queue; then the
 * addresses: a numeric one at once, a name through resolve.c; then each
 * address in turn, one uv_tcp_connect at a time, all within the connect
 * timeout (a deadline). The connection object is made before any of it, in
 * the Lua call, so nothing asynchronous allocates Lua memory: each attempt
 * re-initialises its handle (after the failed one's close callback). The
 * waiting thread is woken from the loop callback that decides (connect,
 * close, lookup, deadline), or readied for the next turn when the decision
 * is made inside another thread's call (a pool handing over a connection).
 *
 * Pools (multiloop_pool_t): per worker, keyed by "host:port", the Unix
 * socket path, or the `pool` option. `active` counts the pool's connections
 * that are open or being opened; `size` bounds the idle ones (the least
 * recently used closes beyond it) and, with `backlog`, the active ones too
 * (connects beyond it wait, at most `backlog` of them). An idle connection
 * keeps reading: any byte or EOF from the peer drops it (conn.c's events
 * call multiloop_out_drop), and so does its keepalive timeout. A pool with
 * nothing in it is freed.
 *
 * Outbound connections hold no connection slot (max_connections counts
 * accepted ones); they are in the worker's list, so stop closes them with
 * reason "stopped"; idle pooled ones close as the stop begins.
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "conn.h"

#define SOCK_MT "multiloop.tcp"
#define DEFAULT_TIMEOUT 60000
#define MAX_TIMEOUT 0x7fffffff
#define POOL_SIZE_DEFAULT 30                 /* OpenResty's lua_socket_pool_size */
#define POOL_SIZE_MAX 100000
#define BACKLOG_MAX 100000
#define POOL_KEY_MAX 512
#define KEEPALIVE_DEFAULT 60000              /* OpenResty's lua_socket_keepalive_timeout */

typedef struct sock_s sock_t;

struct multiloop_pool_s {
  multiloop_gen_t *g;                  /* its idle connections are objects of g's state */
  multiloop_pool_t *next;              /* the worker's pools */
  int size;                            /* idle connections kept; with a backlog, active too */
  int backlog;                         /* connects that may wait, or -1: no limit on active */
  int active;                          /* open or being opened for this pool */
  int nidle;
  multiloop_conn_t *idle, *idle_tail;  /* most recently used first */
  multiloop_connect_t *wait_head, *wait_tail;
  int nwait;
  size_t keylen;
  char key[];
};

/* The socket object. Lives in Lua (a full userdata); `c` is its connection
 * (pinned by the connection's own ref while open), cleared as that closes or
 * goes to its pool. */
struct sock_s {
  multiloop_worker_t *w;
  multiloop_conn_t *c;
  multiloop_connect_t *op;             /* its connect in flight */
  uint32_t connect_ms, send_ms, read_ms;
};

struct multiloop_connect_s {
  multiloop_connect_t *prev, *next;    /* w->connects */
  multiloop_connect_t *wprev, *wnext;  /* its pool's backlog queue */
  multiloop_worker_t *w;
  multiloop_gen_t *g;                  /* the state it calls back (counted in g->nconnects) */
  sock_t *k;                           /* the socket style: its socket, or NULL */
  multiloop_thread_t *t;               /* ... and its waiting thread */
  int cb_ref;                          /* the callback style: fn(conn, err) */
  multiloop_pool_t *pool;              /* counted in pool->active */
  multiloop_conn_t *c;                 /* the connection being made (its ref pins it) */
  uv_connect_t req;
  multiloop_deadline_t dl;             /* the connect timeout, for all of it */
  multiloop_resolve_t *rq;             /* a lookup in flight */
  unsigned req_busy : 1;               /* req is with libuv */
  unsigned handle_open : 1;            /* c's handle is initialised and not closed */
  unsigned done : 1;                   /* decided: only freeing is left */
  unsigned queued : 1;                 /* in its pool's backlog queue */
  int err;                             /* the last attempt's libuv error */
  int naddr, next_addr;
  struct sockaddr_storage addrs[MULTILOOP_RESOLVE_MAX_ADDRS];
  int is_unix, port;
  char msg[MULTILOOP_MAX_HOST + 64];   /* the error for the waiting thread */
  char name[];                         /* the host, or the Unix socket path */
};

/* --- pools ---------------------------------------------------------------------- */

static multiloop_pool_t *pool_get(multiloop_gen_t *g, const char *key, size_t keylen, int size,
                                  int backlog) {
  multiloop_pool_t *p;
  for (p = g->pools; p; p = p->next)
    if (p->keylen == keylen && memcmp(p->key, key, keylen) == 0) return p;
  if ((p = calloc(1, sizeof *p + keylen + 1)) == NULL) return NULL;
  p->size = size > 0 ? size : POOL_SIZE_DEFAULT;
  p->backlog = backlog;
  p->keylen = keylen;
  memcpy(p->key, key, keylen);
  p->g = g;
  p->next = g->pools;
  g->pools = p;
  return p;
}

static void pool_maybe_free(multiloop_worker_t *w, multiloop_pool_t *p) {
  multiloop_pool_t **pp;
  (void)w;
  if (p->active > 0 || p->nidle > 0 || p->nwait > 0) return;
  for (pp = &p->g->pools; *pp && *pp != p; pp = &(*pp)->next) {}
  if (*pp) *pp = p->next;
  free(p);
}

static void idle_unlink(multiloop_pool_t *p, multiloop_conn_t *c) {
  multiloop_out_t *o = OUT(c);
  if (o->pprev) OUT(o->pprev)->pnext = o->pnext;
  else p->idle = o->pnext;
  if (o->pnext) OUT(o->pnext)->pprev = o->pprev;
  else p->idle_tail = o->pprev;
  o->pprev = o->pnext = NULL;
  p->nidle--;
}

/* Takes c out of its pool's idle list: it is in use again, or closing. */
static void unpool(multiloop_conn_t *c) {
  multiloop_out_t *o = OUT(c);
  multiloop_worker_t *w = CONN_WORKER(c);
  if (!c->pooled) return;
  c->pooled = 0;
  idle_unlink(o->pool, c);
  multiloop_deadline_remove(&o->keep_dl);
  atomic_fetch_sub_explicit(&w->pooled, 1, memory_order_relaxed);
}

static void queue_remove(multiloop_pool_t *p, multiloop_connect_t *op) {
  if (!op->queued) return;
  if (op->wprev) op->wprev->wnext = op->wnext;
  else p->wait_head = op->wnext;
  if (op->wnext) op->wnext->wprev = op->wprev;
  else p->wait_tail = op->wprev;
  op->wprev = op->wnext = NULL;
  op->queued = 0;
  p->nwait--;
}

static void attempt(multiloop_connect_t *op);
static int op_start(multiloop_connect_t *op);
static void op_fail(multiloop_connect_t *op, int err, const char *msg, int quiet);
static void op_release(multiloop_connect_t *op);
static void attach(sock_t *k, multiloop_conn_t *c);

static int push_enomem(lua_State *L, void *ev) {
  (void)ev;
  lua_pushnil(L);
  lua_pushliteral(L, "not enough memory");
  return 2;
}

static int push_one(lua_State *L, void *ev) {
  (void)ev;
  lua_pushinteger(L, 1);
  return 1;
}

/* A connection of p closed, or one of its slots freed: the first connect
 * waiting in its backlog may go on (no Lua here: it only starts I/O). */
static void pool_slot_freed(multiloop_pool_t *p) {
  multiloop_connect_t *op = p->wait_head;
  if (op == NULL || p->active >= p->size) return;
  queue_remove(p, op);
  p->active++;
  if (op_start(op) != 0) {                       /* inside someone's call: told next turn */
    multiloop_thread_t *t = op->t;
    op->t = NULL;
    op_fail(op, UV_ENOMEM, NULL, 1);
    atomic_fetch_add_explicit(&op->w->connect_errors, 1, memory_order_relaxed);
    if (t) multiloop_thread_ready(t, push_enomem, NULL);
  }
}

/* The connection closes (conn.c's closing event): out of its pool. */
void multiloop_out_closing(multiloop_conn_t *c) {
  multiloop_out_t *o = OUT(c);
  multiloop_pool_t *p = o->pool;
  multiloop_worker_t *w = CONN_WORKER(c);
  if (o->owner) {
    ((sock_t *)o->owner)->c = NULL;
    o->owner = NULL;
  }
  if (p == NULL) return;
  unpool(c);
  o->pool = NULL;
  p->active--;
  pool_slot_freed(p);
  pool_maybe_free(w, p);
}

/* A pooled connection's peer sent bytes or EOF: it is not fit for reuse. */
void multiloop_out_drop(multiloop_conn_t *c) { multiloop_stream_close(&c->s, 0); }

static void keepalive_expired(multiloop_deadline_t *d, uint64_t ms) {
  multiloop_out_t *o = (multiloop_out_t *)(void *)((char *)d - offsetof(multiloop_out_t, keep_dl));
  (void)ms;
  /* Only sockets pool, and theirs are serve-style connections. */
  multiloop_stream_close(&CONN_OF_OUT(o, 1)->s, 0);
}

/* Each close may free its pool: look again from the start each time. */
void multiloop_pools_close(multiloop_gen_t *g) {
  for (;;) {
    multiloop_pool_t *p;
    for (p = g->pools; p && p->idle == NULL; p = p->next) {}
    if (p == NULL) return;
    multiloop_stream_close(&p->idle->s, REASON_STOPPED);
  }
}

/* --- the socket object ------------------------------------------------------------ */

static sock_t *check_sock(lua_State *L) { return luaL_checkudata(L, 1, SOCK_MT); }

static int nil_err(lua_State *L, const char *err) {
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

static void apply_timeouts(sock_t *k, multiloop_conn_t *c) {
  multiloop_serve_t *sv = SERVE(c);
  sv->send_ms = k->send_ms;
  sv->read_ms = k->read_ms;
}

static void attach(sock_t *k, multiloop_conn_t *c) {
  k->c = c;
  OUT(c)->owner = k;
  apply_timeouts(k, c);
}

/* The socket lets go of its connection (which the caller closes or pools). */
static multiloop_conn_t *detach(sock_t *k) {
  multiloop_conn_t *c = k->c;
  if (c == NULL) return NULL;
  k->c = NULL;
  OUT(c)->owner = NULL;
  return c;
}

/* worker.tcp() -> sock. */
static int core_tcp(lua_State *L) {
  multiloop_worker_t *w = lua_touserdata(L, lua_upvalueindex(1));
  sock_t *k = lua_newuserdatauv(L, sizeof *k, 0);
  memset(k, 0, sizeof *k);
  k->w = w;
  k->connect_ms = k->send_ms = k->read_ms = DEFAULT_TIMEOUT;
  luaL_setmetatable(L, SOCK_MT);
  return 1;
}

/* sock:settimeout(ms): connect, send and read. */
static int sock_settimeout(lua_State *L) {
  sock_t *k = check_sock(L);
  k->connect_ms = k->send_ms = k->read_ms = multiloop_check_timeout(L, 2, "sock:settimeout");
  if (k->c) apply_timeouts(k, k->c);
  return 0;
}

/* sock:settimeouts(connect, send, read). */
static int sock_settimeouts(lua_State *L) {
  sock_t *k = check_sock(L);
  uint32_t c = multiloop_check_timeout(L, 2, "sock:settimeouts"), s = multiloop_check_timeout(L, 3, "sock:settimeouts");
  k->read_ms = multiloop_check_timeout(L, 4, "sock:settimeouts");
  k->connect_ms = c;
  k->send_ms = s;
  if (k->c) apply_timeouts(k, k->c);
  return 0;
}

/* An integer option in [lo, hi] from the table at idx, or dflt when absent. */
static int int_opt(lua_State *L, int idx, const char *who, const char *name, int lo, int hi,
                   int dflt) {
  int isint = 0, t = lua_getfield(L, idx, name);
  lua_Integer v;
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return dflt;
  }
  v = t == LUA_TNUMBER ? lua_tointegerx(L, -1, &isint) : 0;
  if (!isint || v < lo || v > hi)
    luaL_error(L, "%s: option '%s' must be an integer from %d to %d (got %s)", who, name, lo, hi,
               t == LUA_TNUMBER ? luaL_tolstring(L, -1, NULL) : luaL_typename(L, -1));
  lua_pop(L, 1);
  return (int)v;
}

/* Where to connect: "unix:/path" (then no port), or host and port. */
typedef struct {
  int is_unix, port;
  const char *name;                    /* host or path (in a Lua string on the stack) */
  int opts;                            /* the options' index, or 0 */
} target_t;

static void check_target(lua_State *L, int arg, const char *who, target_t *tg) {
  size_t len;
  const char *s;
  if (lua_type(L, arg) != LUA_TSTRING)
    luaL_error(L, "%s: the host must be a string (got %s)", who, luaL_typename(L, arg));
  s = lua_tolstring(L, arg, &len);
  memset(tg, 0, sizeof *tg);
  if (len >= 5 && memcmp(s, "unix:", 5) == 0) {
    if (len == 5 || len - 5 > MULTILOOP_MAX_PATH || strlen(s) != len)
      luaL_error(L, "%s: a Unix socket path must be 1 to %d bytes with no NUL (got %d bytes)",
                 who, MULTILOOP_MAX_PATH, (int)len - 5);
    tg->is_unix = 1;
    tg->name = s + 5;
    tg->opts = arg + 1;
    return;
  }
  tg->name = multiloop_check_host(L, arg, who);
  {
    int isint = 0;
    lua_Integer port = lua_type(L, arg + 1) == LUA_TNUMBER ? lua_tointegerx(L, arg + 1, &isint) : 0;
    if (!isint || port < 1 || port > 65535)
      luaL_error(L, "%s: the port must be an integer from 1 to 65535 (got %s)", who,
                 lua_type(L, arg + 1) == LUA_TNUMBER ? luaL_tolstring(L, arg + 1, NULL)
                                                    : luaL_typename(L, arg + 1));
    tg->port = (int)port;
  }
  tg->opts = arg + 2;
}

static multiloop_connect_t *op_new(lua_State *L, multiloop_worker_t *w, const target_t *tg) {
  size_t len = strlen(tg->name);
  multiloop_connect_t *op = calloc(1, sizeof *op + len + 1);
  if (op == NULL) return NULL;
  op->w = w;
  op->g = multiloop_gen_of(L);
  op->g->nconnects++;
  op->cb_ref = LUA_NOREF;
  op->is_unix = tg->is_unix;
  op->port = tg->port;
  memcpy(op->name, tg->name, len + 1);
  op->next = w->connects;
  if (w->connects) w->connects->prev = op;
  w->connects = op;
  return op;
}

/* --- connecting -------------------------------------------------------------------- */

static const char *connect_error(int err) {
  switch (err) {
    case UV_ETIMEDOUT: return "timeout";
    case UV_ECANCELED: return "stopped";
    default: return uv_strerror(err);   /* "connection refused", ... */
  }
}

/* Frees op once libuv has nothing of it: no request, no open handle, no
 * lookup. The connection object it made is let go unless it was handed on. */
static void op_release(multiloop_connect_t *op) {
  multiloop_worker_t *w = op->w;
  if (!op->done || op->req_busy || op->handle_open || op->rq) return;
  if (op->prev) op->prev->next = op->next;
  else if (w->connects == op) w->connects = op->next;
  if (op->next) op->next->prev = op->prev;
  if (op->c) multiloop_conn_unpin(op->g, op->c->ref);    /* never opened */
  if (op->cb_ref != LUA_NOREF) luaL_unref(op->g->L, LUA_REGISTRYINDEX, op->cb_ref);
  {
    multiloop_gen_t *g = op->g;
    free(op);
    g->nconnects--;
    multiloop_gen_check(g);
  }
}

/* An attempt's handle points at its connect (not at conn.c's events: the
 * connection is no one's yet) until it connects. */
static void attempt_close_cb(uv_handle_t *h) {
  multiloop_connect_t *op = h->data;
  op->handle_open = 0;
  if (op->done) op_release(op);
  else attempt(op);                              /* the next address */
}

static void close_attempt(multiloop_connect_t *op) {
  if (op->handle_open && !uv_is_closing(&op->c->s.h.handle))
    uv_close(&op->c->s.h.handle, attempt_close_cb);
}

/* The callback style's fn(conn, err), protected. */
typedef struct {
  multiloop_connect_t *op;
  multiloop_conn_t *c;                 /* the connection, or NULL with msg */
  const char *msg;
} callback_ev;

static int callback_body(lua_State *L) {
  callback_ev *ev = lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, ev->op->cb_ref);
  if (ev->c) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, ev->c->ref);
    lua_pushnil(L);
  } else {
    lua_pushnil(L);
    lua_pushstring(L, ev->msg);
  }
  lua_call(L, 2, 0);
  return 0;
}

static int push_op_error(lua_State *L, void *ev) {
  multiloop_connect_t *op = ev;
  lua_pushnil(L);
  lua_pushstring(L, op->msg);
  return 2;
}

static void unlink_sock(multiloop_connect_t *op) {
  if (op->k && op->k->op == op) op->k->op = NULL;
  op->k = NULL;
}

/* Decided, with an error: from a loop callback (the thread is woken now,
 * or the callback called), or `quiet`: nobody is told (a cancel, a stop
 * that readies the thread itself), nothing is counted. */
static void op_fail(multiloop_connect_t *op, int err, const char *msg, int quiet) {
  multiloop_worker_t *w = op->w;
  multiloop_thread_t *t = op->t;
  if (op->done) return;
  op->done = 1;
  op->t = NULL;
  multiloop_deadline_remove(&op->dl);
  if (op->rq) {
    multiloop_resolve_cancel(op->rq);
    op->rq = NULL;
  }
  if (op->pool) {
    /* A connect still in the backlog holds no slot: only its place there. */
    if (op->queued) {
      queue_remove(op->pool, op);
    } else {
      op->pool->active--;
      pool_slot_freed(op->pool);
    }
    pool_maybe_free(w, op->pool);
    op->pool = NULL;
  }
  close_attempt(op);
  unlink_sock(op);
  if (!quiet) atomic_fetch_add_explicit(&w->connect_errors, 1, memory_order_relaxed);
  if (msg == NULL) msg = connect_error(err);
  snprintf(op->msg, sizeof op->msg, "%s", msg);
  if (quiet) {
    /* nobody to tell */
  } else if (t) {
    multiloop_thread_wake(t, 0, push_op_error, op);
  } else if (op->cb_ref != LUA_NOREF) {
    callback_ev ev = { op, NULL, op->msg };
    multiloop_enter(op->g, callback_body, &ev, NULL, "connect callback");
  }
  op_release(op);
}

/* Decided, connected: c is open, the socket's (or the callback's). */
static void op_succeed(multiloop_connect_t *op) {
  multiloop_worker_t *w = op->w;
  multiloop_conn_t *c = op->c;
  multiloop_thread_t *t = op->t;
  op->done = 1;
  op->t = NULL;
  op->c = NULL;                                  /* the connection's now */
  op->handle_open = 0;
  multiloop_deadline_remove(&op->dl);
  OUT(c)->pool = op->pool;                       /* already counted in active */
  op->pool = NULL;
  c->s.h.handle.data = (void *)(uintptr_t)&multiloop_conn_events;   /* a connection now */
  multiloop_stream_connected(&c->s);
  multiloop_conn_opened(c);
  atomic_fetch_add_explicit(&w->connects_ok, 1, memory_order_relaxed);
  if (op->cb_ref == LUA_NOREF) {                 /* the socket style */
    if (op->k == NULL || t == NULL) {            /* nobody wants it any more */
      multiloop_stream_close(&c->s, 0);
      op_release(op);
      return;
    }
    attach(op->k, c);
    unlink_sock(op);
    multiloop_stream_start(&c->s);
    lua_pushinteger(multiloop_thread_co(t), 1);
    multiloop_thread_wake(t, 1, NULL, NULL);
  } else {
    callback_ev ev = { op, c, NULL };
    if (multiloop_enter(op->g, callback_body, &ev, &c->id, "connect callback") != LUA_OK)
      multiloop_stream_close(&c->s, REASON_ERROR);
    else multiloop_stream_start(&c->s);
  }
  op_release(op);
}

static void connect_cb(uv_connect_t *req, int status) {
  multiloop_connect_t *op = (multiloop_connect_t *)(void *)((char *)req - offsetof(multiloop_connect_t, req));
  op->req_busy = 0;
  if (op->done) {
    op_release(op);
    return;
  }
  if (status == 0 && op->w->closing) status = UV_ECANCELED;
  if (status == 0) {
    op_succeed(op);
    return;
  }
  op->err = status;
  close_attempt(op);                             /* then the next address, from its close */
}

/* Tries the next address, or fails with the last error. The handle is
 * closed (or was never initialised). */
static void attempt(multiloop_connect_t *op) {
  multiloop_worker_t *w = op->w;
  multiloop_conn_t *c = op->c;
  int rc;
  for (;;) {
    if (op->next_addr >= op->naddr) {
      op_fail(op, op->err ? op->err : UV_EAI_NODATA, NULL, 0);
      return;
    }
    multiloop_stream_init(&c->s, w, op->is_unix, &multiloop_conn_events);
    c->s.h.handle.data = op;                     /* see attempt_close_cb */
    op->handle_open = 1;
    if (op->is_unix) {
      uv_pipe_connect(&op->req, &c->s.h.pipe, op->name, connect_cb);
      rc = 0;
      op->next_addr = op->naddr;
    } else {
      const struct sockaddr *sa = (const struct sockaddr *)&op->addrs[op->next_addr++];
      rc = uv_tcp_connect(&op->req, &c->s.h.tcp, sa, connect_cb);
    }
    if (rc == 0) {
      op->req_busy = 1;
      return;
    }
    op->err = rc;
    close_attempt(op);                           /* its close tries the next */
    return;
  }
}

static void set_port(struct sockaddr_storage *a, int port) {
  if (a->ss_family == AF_INET6) ((struct sockaddr_in6 *)a)->sin6_port = htons((uint16_t)port);
  else ((struct sockaddr_in *)a)->sin_port = htons((uint16_t)port);
}

static void resolved(void *data, int status, const struct sockaddr_storage *addrs, int n) {
  multiloop_connect_t *op = data;
  int i;
  op->rq = NULL;
  if (op->done) {
    op_release(op);
    return;
  }
  if (status != 0) {
    char msg[MULTILOOP_MAX_HOST + 64];
    snprintf(msg, sizeof msg, "%s could not be resolved (%s)", op->name,
             status == UV_ECANCELED || status == UV_EAI_CANCELED ? "stopped" : uv_strerror(status));
    op_fail(op, status, msg, 0);
    return;
  }
  for (i = 0; i < n; i++) {
    op->addrs[i] = addrs[i];
    set_port(&op->addrs[i], op->port);
  }
  op->naddr = n;
  attempt(op);
}

/* Addresses, then attempts. From the Lua call or from a pool's freed slot;
 * decides nothing itself, so it never resumes anyone: returns 0, or
 * UV_ENOMEM when the lookup could not start (op is unchanged then). */
static int op_start(multiloop_connect_t *op) {
  multiloop_worker_t *w = op->w;
  int n;
  if (op->is_unix) {
    op->naddr = 1;
  } else if (multiloop_numeric_addr(op->name, op->port, &op->addrs[0])) {
    op->naddr = 1;
  } else if ((n = multiloop_resolve_cached(w, op->name, op->addrs)) > 0) {
    int i;
    for (i = 0; i < n; i++) set_port(&op->addrs[i], op->port);
    op->naddr = n;
  } else {
    op->rq = multiloop_resolve_start(w, op->name, resolved, op);
    return op->rq == NULL ? UV_ENOMEM : 0;
  }
  attempt(op);
  return 0;
}

static void connect_expired(multiloop_deadline_t *d, uint64_t ms) {
  multiloop_connect_t *op = (multiloop_connect_t *)(void *)((char *)d - offsetof(multiloop_connect_t, dl));
  (void)ms;
  op_fail(op, UV_ETIMEDOUT, "timeout", 0);
}

/* The waiting thread was killed or closed: forget it, end the connect
 * without resuming anyone. */
static void cancel_connect(multiloop_thread_t *t, void *data) {
  multiloop_connect_t *op = data;
  (void)t;
  op->t = NULL;
  unlink_sock(op);
  if (op->done) return;
  op_fail(op, UV_ECANCELED, "stopped", 1);
}

/* The worker is closing (finish: maybe inside some Lua call, and before
 * the deadlines go): every connect in flight ends. A waiting thread is
 * readied with nil, "stopped"; a worker.connect callback is not called (its
 * state is about to close, and no Lua may run from here). Those waiting in
 * a backlog go first: ending one frees no slot. Then the rest: with no
 * waiter left, a freed slot starts nobody, so ending one frees only itself
 * (a waiter started there could fail at once and free the next one). */
void multiloop_outbound_stop(multiloop_worker_t *w, multiloop_gen_t *g) {
  int pass;
  for (pass = 0; pass < 2; pass++) {
    multiloop_connect_t *op, *next;
    for (op = w->connects; op; op = next) {
      multiloop_thread_t *t = op->t;
      next = op->next;                           /* op may be freed below */
      if (op->done || (pass == 0 && !op->queued) || (g != NULL && op->g != g)) continue;
      op->t = NULL;
      op_fail(op, UV_ECANCELED, "stopped", 1);
      if (t) multiloop_thread_ready(t, NULL, NULL);   /* closing: nil, "stopped" */
    }
  }
}

/* A connect's first step, in the Lua call: the pool, then the backlog, then
 * the addresses. op owns `c` (made here). Returns what the call returns:
 * results now, or the await. */
static int sock_connect(lua_State *L) {
  sock_t *k = check_sock(L);
  multiloop_worker_t *w = k->w;
  target_t tg;
  char keybuf[MULTILOOP_MAX_HOST + 16];
  const char *key;
  size_t keylen;
  int size = 0, backlog = -1;
  multiloop_pool_t *p;
  multiloop_connect_t *op;
  multiloop_thread_t *t;
  int has_pool = 0;
  multiloop_conn_t *c;
  check_target(L, 2, "sock:connect", &tg);
  if (!lua_isnoneornil(L, tg.opts)) {
    if (!lua_istable(L, tg.opts))
      return luaL_error(L, "sock:connect: options must be a table (got %s)",
                        luaL_typename(L, tg.opts));
    size = int_opt(L, tg.opts, "sock:connect", "pool_size", 1, POOL_SIZE_MAX, 0);
    backlog = int_opt(L, tg.opts, "sock:connect", "backlog", 0, BACKLOG_MAX, -1);
    if (backlog >= 0 && size == 0)
      return luaL_error(L, "sock:connect: option 'backlog' needs option 'pool_size'");
    switch (lua_getfield(L, tg.opts, "pool")) {
      case LUA_TNIL: break;
      case LUA_TSTRING:
        if (lua_rawlen(L, -1) == 0 || lua_rawlen(L, -1) > POOL_KEY_MAX)
          return luaL_error(L, "sock:connect: option 'pool' must be 1 to %d bytes (got %d)",
                            POOL_KEY_MAX, (int)lua_rawlen(L, -1));
        has_pool = 1;
        break;
      default:
        return luaL_error(L, "sock:connect: option 'pool' must be a string (got %s)",
                          luaL_typename(L, -1));
    }
  }
  if (has_pool) {
    key = lua_tolstring(L, -1, &keylen);         /* stays on the stack */
  } else if (tg.is_unix) {
    key = tg.name - 5;                           /* "unix:/path" */
    keylen = strlen(key);
  } else {
    keylen = (size_t)snprintf(keybuf, sizeof keybuf, "%s:%d", tg.name, tg.port);
    key = keybuf;
  }
  t = multiloop_thread_self(L, "sock:connect");   /* raises before anything changes */
  if (k->op) return nil_err(L, "socket busy connecting");
  if (k->c) {                                    /* OpenResty: connect closes what it had */
    c = detach(k);
    multiloop_serve_uncork(c);
    multiloop_stream_close_flushed(&c->s);
  }
  /* A graceful stop's grace period still connects (the requests it lets
   * finish may need their upstreams); only the closing worker refuses. */
  if (multiloop_threads_closing(L) || w->closing) return nil_err(L, "stopped");
  if ((p = pool_get(multiloop_gen_of(L), key, keylen, size, backlog)) == NULL) return luaL_error(L, "not enough memory");
  if (p->idle) {                                 /* reuse, at once */
    c = p->idle;
    unpool(c);
    OUT(c)->reused++;
    atomic_fetch_add_explicit(&w->reused, 1, memory_order_relaxed);
    attach(k, c);
    lua_pushinteger(L, 1);
    return 1;
  }
  if (p->backlog >= 0 && p->active >= p->size && p->nwait >= p->backlog) {
    pool_maybe_free(w, p);
    return nil_err(L, "too many waiting connect operations");
  }
  /* The objects, before anything is counted: a raise here leaves nothing
   * behind but a pool that frees itself on its next use... The allocation
   * may run finalizers: a dropped socket's __gc closes its connection, which
   * may free p (its last one): so p is looked up again after it. */
  c = multiloop_conn_new(L, w, tg.is_unix, 1, 1);
  if ((p = pool_get(multiloop_gen_of(L), key, keylen, size, backlog)) == NULL) {
    multiloop_conn_unpin(multiloop_gen_of(L), c->ref);
    return luaL_error(L, "not enough memory");
  }
  if ((op = op_new(L, w, &tg)) == NULL) {
    multiloop_conn_unpin(multiloop_gen_of(L), c->ref);
    pool_maybe_free(w, p);
    return luaL_error(L, "not enough memory");
  }
  multiloop_deadline_init(&op->dl, connect_expired);
  multiloop_deadline_init(&OUT(c)->keep_dl, keepalive_expired);
  op->c = c;
  op->k = k;
  op->t = t;
  if (k->connect_ms > 0 && multiloop_deadline_set(w, &op->dl, k->connect_ms) != 0) {
    op->done = 1;
    unlink_sock(op);
    op_release(op);
    pool_maybe_free(w, p);
    return luaL_error(L, "not enough memory");
  }
  k->op = op;
  op->pool = p;
  if (p->backlog >= 0 && p->active >= p->size) {   /* wait for a slot */
    op->queued = 1;
    op->wprev = p->wait_tail;
    if (p->wait_tail) p->wait_tail->wnext = op;
    else p->wait_head = op;
    p->wait_tail = op;
    p->nwait++;
  } else {
    p->active++;
    if (op_start(op) != 0) {
      op->t = NULL;
      op_fail(op, UV_ENOMEM, NULL, 1);
      return luaL_error(L, "not enough memory");
    }
  }
  return multiloop_await(L, t, cancel_connect, op, NULL);
}

/* sock:setkeepalive([timeout [, size]]) -> 1 | nil, err. */
static int sock_setkeepalive(lua_State *L) {
  sock_t *k = check_sock(L);
  multiloop_worker_t *w = k->w;
  lua_Integer timeout = KEEPALIVE_DEFAULT, size = 0;
  multiloop_conn_t *c;
  multiloop_serve_t *sv;
  multiloop_pool_t *p;
  size_t kept = 0;
  if (!lua_isnoneornil(L, 2)) timeout = multiloop_check_timeout(L, 2, "sock:setkeepalive");
  if (!lua_isnoneornil(L, 3)) {
    int isint = 0;
    size = lua_type(L, 3) == LUA_TNUMBER ? lua_tointegerx(L, 3, &isint) : 0;
    if (!isint || size < 1 || size > POOL_SIZE_MAX)
      return luaL_error(L, "sock:setkeepalive: the pool size must be an integer from 1 to %d "
                           "(got %s)", POOL_SIZE_MAX,
                        lua_type(L, 3) == LUA_TNUMBER ? luaL_tolstring(L, 3, NULL)
                                                      : luaL_typename(L, 3));
  }
  if ((c = k->c) == NULL) return nil_err(L, "closed");
  sv = SERVE(c);
  if (c->piped) return nil_err(L, "socket busy piping");
  if (sv->reader) return nil_err(L, "socket busy reading");
  if (sv->writer) return nil_err(L, "socket busy writing");
  multiloop_serve_uncork(c);
  p = OUT(c)->pool;
  if (w->view.conn == c) kept = w->view.len - w->view.used;   /* unread, in this read event */
  else multiloop_stream_kept(&c->s, &kept);
  detach(k);
  if (c->s.closing || p == NULL) return nil_err(L, "closed");
  if (c->s.read_ended || c->s.shutdown_requested) {     /* the peer's EOF came, or ours went */
    multiloop_stream_close(&c->s, 0);
    return nil_err(L, "invalid connection");            /* OpenResty's word */
  }
  if (kept > 0 || multiloop_stream_queued(&c->s) > 0 || sv->skip_line) {
    multiloop_stream_close(&c->s, 0);
    return nil_err(L, "connection in dubious state");
  }
  if (w->stopping || multiloop_threads_closing(L) || multiloop_gen_of(L)->retired) {
    multiloop_stream_close(&c->s, 0);
    lua_pushinteger(L, 1);
    return 1;
  }
  OUT(c)->lease++;                               /* its readers from before are stale now */
  if (p->wait_head) {                            /* a connect waits for this pool: hand it over */
    multiloop_connect_t *op = p->wait_head;
    multiloop_thread_t *t = op->t;
    sock_t *ok = op->k;
    queue_remove(p, op);
    OUT(c)->reused++;
    atomic_fetch_add_explicit(&w->reused, 1, memory_order_relaxed);
    op->t = NULL;
    op->done = 1;
    multiloop_deadline_remove(&op->dl);
    op->pool = NULL;                             /* queued, it held no slot: c keeps its own */
    unlink_sock(op);
    op_release(op);
    if (ok) attach(ok, c);
    if (t) multiloop_thread_ready(t, push_one, NULL);   /* not from inside this call */
    lua_pushinteger(L, 1);
    return 1;
  }
  if (size > 0 && p->size == POOL_SIZE_DEFAULT) p->size = (int)size;
  c->pooled = 1;
  {
    multiloop_out_t *o = OUT(c);
    o->pprev = NULL;
    o->pnext = p->idle;
    if (p->idle) OUT(p->idle)->pprev = c;
    else p->idle_tail = c;
    p->idle = c;
    p->nidle++;
    atomic_fetch_add_explicit(&w->pooled, 1, memory_order_relaxed);
    if (timeout > 0 && multiloop_deadline_set(w, &o->keep_dl, (uint64_t)timeout) != 0) {
      multiloop_stream_close(&c->s, UV_ENOMEM);
      return luaL_error(L, "not enough memory");
    }
  }
  sv->op = 0;
  multiloop_stream_resume(&c->s);                /* a peer's byte or EOF must be seen */
  if (p->nidle > p->size) multiloop_stream_close(&p->idle_tail->s, 0);   /* the least recent */
  lua_pushinteger(L, 1);
  return 1;
}

static int sock_getreusedtimes(lua_State *L) {
  sock_t *k = check_sock(L);
  if (k->c == NULL) return nil_err(L, "closed");
  lua_pushinteger(L, OUT(k->c)->reused);
  return 1;
}

/* sock:close() -> 1 | nil, "closed". Queued writes go out first. */
static int sock_close(lua_State *L) {
  sock_t *k = check_sock(L);
  multiloop_conn_t *c = detach(k);
  if (c == NULL) return nil_err(L, "closed");
  multiloop_serve_uncork(c);
  multiloop_stream_close_flushed(&c->s);
  lua_pushinteger(L, 1);
  return 1;
}

/* Collected (or <close>): its connection closes, unless pooled meanwhile. */
static int sock_gc(lua_State *L) {
  sock_t *k = check_sock(L);
  multiloop_conn_t *c = detach(k);
  if (k->op) {
    k->op->k = NULL;
    k->op = NULL;
  }
  if (c) {
    multiloop_serve_uncork(c);
    multiloop_stream_close_flushed(&c->s);
  }
  return 0;
}

static int sock_tostring(lua_State *L) {
  sock_t *k = check_sock(L);
  if (k->c) lua_pushfstring(L, "multiloop.tcp (conn %I, worker %d)", k->c->id, k->w->id);
  else lua_pushfstring(L, "multiloop.tcp (not connected, worker %d)", k->w->id);
  return 1;
}

/* A pipe takes c over: its socket (if any) lets go of it, so that neither
 * the socket's close nor its collection can cut the pipe. */
void multiloop_out_disown(multiloop_conn_t *c) {
  multiloop_out_t *o = OUT(c);
  if (o->owner) detach(o->owner);
}

/* The connection of the socket at idx, or NULL (not a socket, or none). */
multiloop_conn_t *multiloop_sock_conn(lua_State *L, int idx) {
  sock_t *k = luaL_testudata(L, idx, SOCK_MT);
  return k ? k->c : NULL;
}

/* The stream methods: the socket's connection stands in for `self`. */
static int sock_forward(lua_State *L) {
  sock_t *k = check_sock(L);
  lua_CFunction f = lua_tocfunction(L, lua_upvalueindex(1));
  if (k->c == NULL) {
    if (lua_toboolean(L, lua_upvalueindex(2))) return 0;   /* settimeout-like: nothing to do */
    return nil_err(L, "closed");
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, k->c->ref);
  lua_replace(L, 1);
  return f(L);
}

static const luaL_Reg sock_methods[] = {
  { "connect", sock_connect },
  { "settimeout", sock_settimeout },
  { "settimeouts", sock_settimeouts },
  { "setkeepalive", sock_setkeepalive },
  { "getreusedtimes", sock_getreusedtimes },
  { "close", sock_close },
  { NULL, NULL }
};

/* Forwarded to the connection's own methods, by name. */
static const char *const forwarded[] = {
  "receive", "receiveany", "receiveuntil", "send", "dirty", "peer", "address",
  "pipe", "shutdown", "set_nodelay", "set_keepalive", "buffered", "tls", "sslhandshake", NULL
};

void multiloop_outbound_register(lua_State *L) {
  int i;
  luaL_newmetatable(L, SOCK_MT);                 /* mt */
  luaL_newlib(L, sock_methods);                  /* mt methods */
  luaL_getmetatable(L, CONN_MT);                 /* mt methods connmt */
  lua_getfield(L, -1, "__index");
  lua_getupvalue(L, -1, 2);                      /* mt methods connmt index connmethods */
  for (i = 0; forwarded[i]; i++) {
    lua_getfield(L, -1, forwarded[i]);
    if (!lua_iscfunction(L, -1)) luaL_error(L, "multiloop: no conn method %s", forwarded[i]);
    lua_pushcfunction(L, lua_tocfunction(L, -1));
    lua_replace(L, -2);
    lua_pushboolean(L, 0);
    lua_pushcclosure(L, sock_forward, 2);
    lua_setfield(L, -5, forwarded[i]);
  }
  lua_pop(L, 3);                                 /* mt methods */
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, sock_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, sock_gc);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, sock_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
}

/* --- worker.connect(host, port [, opts], fn(conn, err)) ------------------------------ */

static int core_connect(lua_State *L) {
  multiloop_worker_t *w = lua_touserdata(L, lua_upvalueindex(1));
  target_t tg;
  multiloop_connect_t *op;
  multiloop_conn_t *c;
  int fn, cb_ref, timeout = DEFAULT_TIMEOUT;
  check_target(L, 1, "worker.connect", &tg);
  fn = lua_gettop(L);
  if (fn < tg.opts || !lua_isfunction(L, fn))
    return luaL_error(L, "worker.connect: the last argument must be a function fn(conn, err)");
  if (fn > tg.opts) {
    if (!lua_istable(L, tg.opts))
      return luaL_error(L, "worker.connect: options must be a table (got %s)",
                        luaL_typename(L, tg.opts));
    timeout = int_opt(L, tg.opts, "worker.connect", "timeout", 0, MAX_TIMEOUT, DEFAULT_TIMEOUT);
  }
  if (w->closing) return luaL_error(L, "worker.connect: the worker is closing");
  lua_pushvalue(L, fn);
  cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  c = multiloop_conn_new(L, w, tg.is_unix, 0, 1);   /* (a raise here would keep cb_ref) */
  if ((op = op_new(L, w, &tg)) == NULL) {
    multiloop_conn_unpin(multiloop_gen_of(L), c->ref);
    luaL_unref(L, LUA_REGISTRYINDEX, cb_ref);
    return luaL_error(L, "not enough memory");
  }
  multiloop_deadline_init(&op->dl, connect_expired);
  op->c = c;
  op->cb_ref = cb_ref;
  if ((timeout > 0 && multiloop_deadline_set(w, &op->dl, (uint64_t)timeout) != 0) ||
      op_start(op) != 0) {
    op->done = 1;
    multiloop_deadline_remove(&op->dl);
    op_release(op);
    return luaL_error(L, "not enough memory");
  }
  return 0;
}

const luaL_Reg multiloop_outbound_funcs[] = {
  { "tcp", core_tcp },
  { "connect", core_connect },
  { NULL, NULL }
};
