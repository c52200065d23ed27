/*
 * conn.c: a client connection's Lua object ("multiloop.conn") and its
 * methods, over the stream (stream.c) that does the I/O.
 *
 * Runs only on the worker thread that accepted the connection. The C struct,
 * stream and uv handle included, lives inside a full userdata; its Lua
 * callbacks live in the userdata's user values. While the handle is open a
 * registry ref pins the userdata, so the garbage collector cannot free the
 * memory libuv is using; the stream's `closed` event drops the ref, and the
 * object then lives on in the "closed" state for as long as Lua code holds
 * it.
 *
 * This file implements the stream's events (stream.h) by calling into Lua
 * through multiloop_enter, or, for a connection of a handler with `serve`,
 * by handing them to serve.c (the sequential methods, with the serve block
 * that follows the struct in the same userdata: conn.h). The
 * bytes of a read are copied into a Lua string inside the protected call
 * (a callback connection consumes every byte: the stream keeps none). A
 * queued write pins the Lua string itself (a registry ref) instead of
 * copying it, until the stream hands the request back.
 *
 * Also here: the idle timeout, a deadline (deadline.c) whose expiry callback
 * is conn_idle, touched by reads and writes; the worker's list of open
 * connections (to close them at stop); and the connection's slot
 * (slots.c), given back when the stream is closed.
 *
 * Lifecycle: the connection closes when the peer has ended and our side is
 * shut down, when conn:close() is called (after queued writes flush), on a
 * read or write error (reason: the libuv error name), on a Lua error in a
 * callback (reason "error"), when idle too long without on_timeout (reason
 * "timeout"), or when the worker stops (reason "stopped").
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "conn.h"
#include "proxy.h"
#include "tls.h"

/* An idle connection is the userdata (Lua's header and 5 user values, 120 B)
 * plus this: 472 B, malloc's 480 B class. 8 B more would cost every idle
 * connection 16 B (the worker is the loop's `data`, and the close reason a
 * 16-bit code, to make room for the stream's ext pointer). */
_Static_assert(sizeof(multiloop_conn_t) <= 352, "an idle connection fits malloc's 480 B class");

typedef multiloop_write_req_t write_req;

_Static_assert(N_USER_VALUES < 8, "a callback bit per user value fits in `callbacks`");
#define HAS(c, slot) ((c)->callbacks & (1u << (slot)))
#define CONN(st) ((multiloop_conn_t *)(st))
#define WORKER(c) CONN_WORKER(c)
/* A read or a write restarts the idle timeout, if there is one: the test
 * here saves a call per read and per write when there is none. */
#define TOUCH(w, c) \
  ((c)->idle.list && !(c)->serve ? multiloop_deadline_touch((w), &(c)->idle) : (void)0)

static const char *reason_name(int reason) {
  switch (reason) {
  case 0: return NULL;
  case REASON_ERROR: return "error";
  case REASON_TIMEOUT: return "timeout";
  case REASON_STOPPED: return "stopped";
  case REASON_PROXY: return "proxy";
  case REASON_RELOAD: return "reload";
  case MULTILOOP_REASON_TLS: return "tls";
  case MULTILOOP_REASON_TLS_TIMEOUT: return "timeout";
  default: return uv_err_name(reason);
  }
}

/* --- calling into Lua ------------------------------------------------------ */

typedef struct {
  multiloop_conn_t *c;
  int slot;                            /* a user value, or 0 to call `ref` */
  int ref;
  const char *data;                    /* the argument, NULL for none ... */
  size_t len;
  int nil_arg;                         /* ... or nil when this is set */
} call_ev;

/* Protected: calls the callback in user value `slot` (or the registry `ref`)
 * with its argument (data, a reason, nil) if it has one, then the connection:
 * a handler can then pass the same function to every connection instead of
 * a closure per connection. */
static int call_body(lua_State *L) {
  call_ev *ev = lua_touserdata(L, 1);
  int nargs = 1;
  lua_rawgeti(L, LUA_REGISTRYINDEX, ev->c->ref);      /* 2: the connection */
  if (ev->slot != 0) lua_getiuservalue(L, 2, ev->slot);  /* a function: HAS() said so */
  else if (lua_rawgeti(L, LUA_REGISTRYINDEX, ev->ref) != LUA_TFUNCTION) return 0;
  if (ev->data) {
    lua_pushlstring(L, ev->data, ev->len);
    nargs = 2;
  } else if (ev->nil_arg) {
    lua_pushnil(L);
    nargs = 2;
  }
  lua_pushvalue(L, 2);
  lua_call(L, nargs, 0);
  return 0;
}

static const char *const slot_names[] = { "write callback", "on_close", "on_data", "on_end",
                                          "on_drain", "on_timeout" };

/* Calls the callback in `slot` with `data`, or with no argument (data NULL). */
static int call(multiloop_conn_t *c, int slot, const char *data, size_t len) {
  call_ev ev = { c, slot, LUA_NOREF, data, len, 0 };
  return multiloop_enter(CONN_GEN(c), call_body, &ev, &c->id, slot_names[slot]);
}

/* Calls the callback in `slot`, or the registry `ref` when slot is 0, with
 * `reason` or nil. */
static int call_with_reason(multiloop_conn_t *c, int slot, int ref, const char *reason) {
  call_ev ev = { c, slot, ref, reason, reason ? strlen(reason) : 0, reason == NULL };
  return multiloop_enter(CONN_GEN(c), call_body, &ev, &c->id, slot_names[slot]);
}

/* --- the stream's events --------------------------------------------------- */

/* Rare states first, in one test: a pooled or piped connection's bytes are
 * not the Lua code's. */
#define DIVERTED(c) ((c)->pooled | (c)->piped)

static size_t proxy_read(multiloop_conn_t *c, const char *data, size_t len);
static multiloop_proxy_info_t *proxy_info(multiloop_conn_t *c);
static void replay(multiloop_conn_t *c, multiloop_proxy_info_t *info);

/* A connection refused in the PROXY phase: counted and logged. */
static void proxy_refused(multiloop_conn_t *c, const char *why) {
  multiloop_worker_t *w = WORKER(c);
  atomic_fetch_add_explicit(&w->proxy_errors, 1, memory_order_relaxed);
  multiloop_log(w, MULTILOOP_LOG_WARN, c->id, "PROXY protocol: refused: %s", why);
}

static size_t ev_read(multiloop_stream_t *s, const char *data, size_t len) {
  multiloop_conn_t *c = CONN(s);
  if (c->proxying) return proxy_read(c, data, len);
  if (DIVERTED(c)) {
    if (c->pooled) multiloop_out_drop(c);  /* an idle pooled conn must stay silent */
    else {
      TOUCH(WORKER(c), c);
      multiloop_pipe_read(c, data, len);
    }
    return len;
  }
  if (c->serve) return multiloop_serve_read(c, data, len);
  TOUCH(WORKER(c), c);
  if (HAS(c, ON_DATA) && call(c, ON_DATA, data, len) != LUA_OK)
    multiloop_stream_close(s, REASON_ERROR);
  return len;                               /* a callback connection keeps nothing */
}

/* Without on_end, shut down: the stream closes once our writes flush. */
static void ev_eof(multiloop_stream_t *s) {
  multiloop_conn_t *c = CONN(s);
  multiloop_proxy_info_t *info = proxy_info(c);
  if (!c->proxying && info && info->replay == 2) {
    replay(c, info);                        /* the data the PROXY header's read brought, first */
    if (s->closing) return;
  }
  if (c->proxying) {                        /* half a header; none at all: a health check */
    size_t n;
    int some = multiloop_stream_kept(s, &n) != NULL;
    if (some) proxy_refused(c, "the peer closed the connection inside its header");
    multiloop_stream_close(s, some ? REASON_PROXY : 0);
  } else if (c->pooled) multiloop_out_drop(c);
  else if (c->piped) multiloop_pipe_eof(c);
  else if (c->serve) multiloop_serve_eof(c);      /* the serve code decides */
  else if (!HAS(c, ON_END)) multiloop_stream_shutdown(s);
  else if (call(c, ON_END, NULL, 0) != LUA_OK) multiloop_stream_close(s, REASON_ERROR);
}

static int ev_written(multiloop_stream_t *s, multiloop_stream_write_t *w, int status) {
  multiloop_conn_t *c = CONN(s);
  write_req *wr = (write_req *)w;
  lua_State *L = CONN_GEN(c)->L;
  int cb_ref = wr->cb_ref, rc = LUA_OK;
  if (status == 0) TOUCH(WORKER(c), c);
  luaL_unref(L, LUA_REGISTRYINDEX, wr->ref);
  free(wr);
  if (c->serve) multiloop_serve_written(c, status);   /* may wake the writer */
  if (cb_ref != LUA_NOREF) {
    rc = call_with_reason(c, 0, cb_ref, status < 0 ? uv_err_name(status) : NULL);
    luaL_unref(L, LUA_REGISTRYINDEX, cb_ref);
  }
  return rc == LUA_OK ? 0 : REASON_ERROR;
}

static void ev_drained(multiloop_stream_t *s) {
  multiloop_conn_t *c = CONN(s);
  if (c->piped) multiloop_pipe_drained(c);
  else if (c->serve) multiloop_serve_drained(c);
  else if (HAS(c, ON_DRAIN) && call(c, ON_DRAIN, NULL, 0) != LUA_OK)
    multiloop_stream_close(s, REASON_ERROR);
}

/* Out of the worker's list and the deadlines at once, so that stop sees the
 * connection gone (the handle closes on the next loop turn). */
static void ev_closing(multiloop_stream_t *s) {
  multiloop_conn_t *c = CONN(s);
  multiloop_worker_t *w = WORKER(c);
  if (c->prev) c->prev->next = c->next;
  else if (w->conns == c) w->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = c->next = NULL;
  multiloop_deadline_remove(&c->idle);
  if (c->piped) multiloop_pipe_closing(c);
  if (c->outbound) multiloop_out_closing(c); /* its pool's count */
  if (c->serve) multiloop_serve_closing(c);  /* its waiting threads: "closed" */
  if (w->stopping && w->conns == NULL) multiloop_worker_drained(w);
}

static void ev_closed(multiloop_stream_t *s, int reason, void *tap) {
  multiloop_conn_t *c = CONN(s);
  multiloop_worker_t *w = WORKER(c);
  if (c->counted) multiloop_slot_give(w->rt, w);
  if (c->piped) multiloop_pipe_closed(c, tap);   /* the last end's close ends the pipe */
  if (HAS(c, ON_CLOSE)) call_with_reason(c, ON_CLOSE, LUA_NOREF, reason_name(reason));
  multiloop_conn_unpin(CONN_GEN(c), c->ref);    /* may free c: touch nothing after */
}

/* Drops a connection object's pin (its ref in g's registry); g counts the
 * objects it pins, and a retired generation closes once none is left. */
void multiloop_conn_unpin(multiloop_gen_t *g, int ref) {
  luaL_unref(g->L, LUA_REGISTRYINDEX, ref);
  g->nconns--;
  if (g != &g->w->gen[g->w->cur])
    atomic_store_explicit(&g->w->old_conns, g->nconns, memory_order_relaxed);
  multiloop_gen_check(g);
}

const multiloop_stream_events_t multiloop_conn_events = {
  ev_read, ev_eof, ev_written, ev_drained, ev_closing, ev_closed
};

void multiloop_conn_close_all(multiloop_worker_t *w) {
  while (w->conns) multiloop_stream_close(&w->conns->s, REASON_STOPPED);
}

/* Reload: g drained past drain_timeout (or was dropped): its connections
 * close, reason "reload". Each close takes it out of the list at once (and
 * may take another: a pipe's other end; the walk then starts again). */
void multiloop_conn_close_gen(multiloop_gen_t *g) {
  multiloop_worker_t *w = g->w;
  unsigned idx = (unsigned)(g - w->gen);
  multiloop_conn_t *c = w->conns, *next;
  for (; c; c = next) {
    next = c->next;
    if (c->gen != idx || c->s.closing) continue;
    multiloop_stream_close(&c->s, REASON_RELOAD);
    if (next && next->prev == NULL && w->conns != next) next = w->conns;   /* next left too */
  }
}

/* The connection's PROXY header, if it had one. */
static multiloop_proxy_info_t *proxy_info(multiloop_conn_t *c) {
  return c->s.ext ? c->s.ext->proxy : NULL;
}

/* The bytes a paused handler left after the PROXY header (proxy_read), to
 * on_data now that it reads again. */
static void replay(multiloop_conn_t *c, multiloop_proxy_info_t *info) {
  const char *p;
  size_t n;
  info->replay = 0;
  if (multiloop_deadline_set(WORKER(c), &c->idle, info->idle_ms) != 0) {   /* as it was */
    multiloop_stream_close(&c->s, UV_ENOMEM);
    return;
  }
  if ((p = multiloop_stream_kept(&c->s, &n)) != NULL) multiloop_stream_consume(&c->s, ev_read(&c->s, p, n));
}

/* The idle deadline expired, `ms` after the last read or write: on_timeout
 * if set (the timeout starts again: it fires once per idle period),
 * otherwise close with reason "timeout". */
static void conn_idle(multiloop_deadline_t *d, uint64_t ms) {
  multiloop_conn_t *c = (multiloop_conn_t *)((char *)d - offsetof(multiloop_conn_t, idle));
  if (c->s.closing) return;
  if (c->proxying) {                        /* no whole PROXY header in time */
    proxy_refused(c, "no whole header within proxy_protocol.timeout");
    multiloop_stream_close(&c->s, REASON_TIMEOUT);
    return;
  }
  if (proxy_info(c) && proxy_info(c)->replay == 2) {   /* resumed: the bytes after the header */
    multiloop_proxy_info_t *info = proxy_info(c);
    if (!c->s.paused) {
      replay(c, info);
    } else if (multiloop_deadline_set(WORKER(c), &c->idle, info->idle_ms) != 0) {
      multiloop_stream_close(&c->s, UV_ENOMEM);
    } else {
      info->replay = 1;                    /* paused again: at the next resume */
    }
    return;
  }
  if (!HAS(c, ON_TIMEOUT)) {
    multiloop_stream_close(&c->s, REASON_TIMEOUT);
    return;
  }
  multiloop_deadline_set(WORKER(c), &c->idle, ms);
  if (call(c, ON_TIMEOUT, NULL, 0) != LUA_OK) multiloop_stream_close(&c->s, REASON_ERROR);
}

/* --- accepting ------------------------------------------------------------- */

typedef struct {
  multiloop_worker_t *w;
  uv_os_sock_t fd;                     /* an fd to open, or -1: accept from the pipe */
  multiloop_conn_t *c;
  lua_Integer id;
  int taken;                           /* the fd is no longer the caller's */
} accept_ev;

multiloop_conn_t *multiloop_conn_new(lua_State *L, multiloop_worker_t *w, int is_unix, int serve,
                                     int outbound) {
  size_t size = serve ? CONN_SIZE + SERVE_SIZE : CONN_SIZE;
  multiloop_conn_t *c;
  if (outbound) size += sizeof(multiloop_out_t);
  else if (!serve) size = sizeof(multiloop_conn_t);   /* the idle callback conn: 352 B */
  c = lua_newuserdatauv(L, size, serve ? 1 : N_USER_VALUES);
  memset(c, 0, size);
  c->s.closing = 1;                        /* no handle yet: nothing to close */
  c->ref = LUA_NOREF;
  multiloop_deadline_init(&c->idle, conn_idle);
  if (serve) multiloop_serve_init(c);
  c->outbound = outbound != 0;
  luaL_setmetatable(L, CONN_MT);
  lua_pushvalue(L, -1);
  c->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  {
    multiloop_gen_t *g = multiloop_gen_of(L);       /* it pins in g's registry */
    c->gen = (unsigned)(g - w->gen) & 1u;
    g->nconns++;
  }
  /* An outbound one's handle is made by each connect attempt (outbound.c). */
  if (!outbound) multiloop_stream_init(&c->s, w, is_unix, &multiloop_conn_events);
  return c;
}

void multiloop_conn_opened(multiloop_conn_t *c) {
  multiloop_worker_t *w = WORKER(c);
  c->id = (lua_Integer)atomic_fetch_add(&w->rt->next_conn_id, 1) + 1;
  c->next = w->conns;
  if (w->conns) w->conns->prev = c;
  w->conns = c;
  if (!multiloop_stream_is_unix(&c->s)) {
    if (w->cfg->nodelay) uv_tcp_nodelay(&c->s.h.tcp, 1);
    if (w->cfg->keepalive) uv_tcp_keepalive(&c->s.h.tcp, 1, w->cfg->keepalive);
  }
}

/* The handler takes the connection: serve(conn) in its own light thread,
 * or connect(conn). In a protected call (L: the state of the connection's generation). */
static void start_handler(lua_State *L, multiloop_conn_t *c) {
  multiloop_worker_t *w = WORKER(c);
  if (!c->serve && multiloop_deadline_set(w, &c->idle, w->cfg->idle_timeout) != 0)
    luaL_error(L, "not enough memory");
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->ref);
  if (c->serve) {
    multiloop_serve_start(L, c);
    lua_pop(L, 1);
    return;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, CONN_GEN(c)->handler_ref);
  lua_getfield(L, -1, "connect");
  lua_pushvalue(L, -3);
  lua_call(L, 1, 0);
  lua_pop(L, 2);
}

/* --- the PROXY protocol phase (proxy.c parses) ----------------------------- */

static int proxy_trusted(multiloop_conn_t *c) {
  struct sockaddr_storage ss;
  int len = sizeof ss;
  if (multiloop_stream_is_unix(&c->s)) {
    ss.ss_family = AF_UNIX;
    if (multiloop_proxy_trusted(WORKER(c)->cfg, (struct sockaddr *)&ss)) return 1;
    multiloop_log(WORKER(c), MULTILOOP_LOG_WARN, 0, "PROXY protocol: refused a connection on "
                  "a Unix socket, which proxy_protocol.from does not trust (add \"unix\")");
    return 0;
  }
  if (uv_tcp_getpeername(&c->s.h.tcp, (struct sockaddr *)&ss, &len) != 0) return 0;
  if (multiloop_proxy_trusted(WORKER(c)->cfg, (struct sockaddr *)&ss)) return 1;
  {
    char ip[INET6_ADDRSTRLEN];
    uv_ip_name((struct sockaddr *)&ss, ip, sizeof ip);
    multiloop_log(WORKER(c), MULTILOOP_LOG_WARN, 0, "PROXY protocol: refused a connection from "
                  "%s, which is not in proxy_protocol.from", ip);
  }
  return 0;
}

static int handler_body(lua_State *L) {
  start_handler(L, lua_touserdata(L, 1));
  return 0;
}

/* The header's bytes (kept by the stream until it is whole). Once it is:
 * TLS starts with the bytes after it, or the handler gets them as its
 * first read. `data` is either the read's own buffer or (a header split
 * across reads) the stream's kept bytes: then the header is consumed from
 * them before the handler runs, so that a serve handler's first receive,
 * which reads what is kept, starts after it. */
static size_t proxy_read(multiloop_conn_t *c, const char *data, size_t len) {
  multiloop_worker_t *w = WORKER(c);
  multiloop_stream_t *s = &c->s;
  multiloop_proxy_info_t *info = NULL;
  multiloop_stream_ext_t *x;
  char err[96];
  size_t hlen = 0, klen, n;
  const char *p;
  int r = multiloop_proxy_parse(data, len, &info, &hlen, err, sizeof err), kept;
  if (r == 0) return 0;                    /* not whole yet */
  if (r < 0 || (x = multiloop_stream_ext(s)) == NULL) {
    free(info);
    proxy_refused(c, r < 0 ? err : "out of memory");
    multiloop_stream_close(s, REASON_PROXY);
    return len;
  }
  x->proxy = info;
  c->proxying = 0;
  multiloop_deadline_remove(&c->idle);
  if (c->serve) multiloop_serve_init(c);   /* its read timeout's entry again */
  kept = multiloop_stream_kept(s, &klen) == data;
  if (multiloop_tls_at_accept(w->cfg)) {   /* the rest is the ClientHello (starttls: plain text) */
    int rc = multiloop_tls_accept(s, data + hlen, len - hlen);   /* copies what it keeps */
    if (rc != 0) multiloop_stream_close(s, rc);
    /* Ciphertext: none of it stays in the plain input, where a serve
     * handler's first receive would take it for the client's data. */
    if (kept) multiloop_stream_consume(s, len);
    if (!s->closing && multiloop_enter(CONN_GEN(c), handler_body, c, &c->id, "connect") != LUA_OK)
      multiloop_stream_close(s, REASON_ERROR);
    return kept ? 0 : len;
  }
  if (kept) multiloop_stream_consume(s, hlen);
  if (multiloop_enter(CONN_GEN(c), handler_body, c, &c->id, "connect") != LUA_OK) {
    multiloop_stream_close(s, REASON_ERROR);
    return len;
  }
  if (s->closing) return len;
  if (kept) {
    p = multiloop_stream_kept(s, &n);      /* what the handler left of the rest */
  } else {
    p = data + hlen;
    n = len - hlen;
  }
  if (n > 0 && !c->serve && !DIVERTED(c) && s->paused) {
    info->replay = 1;                      /* kept until conn:resume() (conn_resume) */
    return kept ? 0 : hlen;
  }
  if (!kept) return n == 0 ? len : hlen + ev_read(s, p, n);
  return n > 0 ? ev_read(s, p, n) : 0;
}


/* Protected: makes the object, takes the connection's fd into it (from the
 * hand-off pipe, or an fd the inbox or our own listener gave us), calls
 * connect. The object is pinned before libuv sees its handle. */
static int accept_body(lua_State *L) {
  accept_ev *ev = lua_touserdata(L, 1);
  multiloop_worker_t *w = ev->w;
  multiloop_conn_t *c = multiloop_conn_new(L, w, multiloop_conn_is_unix(w->rt, &w->pipe, ev->fd),
                                            w->gen[w->cur].serve, 0);
  int rc;
  c->counted = 1;                          /* the fd holds a slot (slots.c) */
  ev->taken = 1;
  rc = multiloop_stream_open(&c->s, ev->fd, (uv_stream_t *)&w->pipe);
  if (rc == 0 && w->cfg->proxy && !proxy_trusted(c)) {
    atomic_fetch_add_explicit(&w->proxy_errors, 1, memory_order_relaxed);
    rc = REASON_PROXY;                     /* not from a trusted proxy: never read */
  }
  if (rc == 0 && w->cfg->tls && !w->cfg->proxy) rc = multiloop_tls_accept(&c->s, NULL, 0);
  if (rc != 0) {
    multiloop_stream_close(&c->s, rc);
    return 0;
  }
  atomic_fetch_add_explicit(&w->accepted, 1, memory_order_relaxed);
  multiloop_conn_opened(c);
  ev->id = c->id;
  ev->c = c;
  if (w->cfg->proxy) {                     /* the header first (proxy_read), then the handler */
    c->proxying = 1;
    multiloop_deadline_init(&c->idle, conn_idle);   /* a serve conn's is its read timeout's */
    if (multiloop_deadline_set(w, &c->idle, multiloop_proxy_timeout(w->cfg)) != 0)
      return luaL_error(L, "not enough memory");
    return 0;
  }
  start_handler(L, c);
  return 0;
}

/* Takes one connection: `fd`, or (fd < 0) the next one pending on the
 * worker's hand-off pipe. Returns 0 when it could not even take the fd (out
 * of memory): the fd is still the caller's then. */
int multiloop_conn_open(multiloop_worker_t *w, uv_os_sock_t fd) {
  accept_ev ev = { w, fd, NULL, 0, 0 };
  int rc = multiloop_enter(&w->gen[w->cur], accept_body, &ev, &ev.id, "connect");
  multiloop_conn_t *c = ev.c;
  if (c == NULL) return ev.taken;
  if (rc != LUA_OK) multiloop_stream_close(&c->s, REASON_ERROR);
  else multiloop_stream_start(&c->s);
  return 1;
}

/* --- the methods ----------------------------------------------------------- */

static int fail(lua_State *L, const char *op, int err) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s", op, uv_strerror(err));
  lua_pushstring(L, uv_err_name(err));
  return 3;
}

#define check_conn multiloop_conn_check

static int closed(lua_State *L) {
  lua_pushnil(L);
  lua_pushliteral(L, "closed");
  return 2;
}

/* true while the queue is under the high-water mark; false (and on_drain
 * later) once over it. */
static int push_write_result(lua_State *L, multiloop_conn_t *c) {
  lua_pushboolean(L, multiloop_stream_below_high_water(&c->s));
  return 1;
}

/* conn:write(data [, fn(err)]). Without a callback the socket is tried first
 * and only the rest is queued. With one, the write is always queued (uv_write
 * still writes at once when it can), so the callback never runs before
 * write() returns. */
static int conn_write(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  size_t len, off = 0;
  const char *data = luaL_checklstring(L, 2, &len);
  int has_cb = !lua_isnoneornil(L, 3);
  write_req *wr;
  int ref, cb_ref = LUA_NOREF, rc;

  luaL_argcheck(L, len <= INT_MAX, 2, "string too long for one write (2 GiB at most)");
  luaL_argexpected(L, !has_cb || lua_isfunction(L, 3), 3, "function or nil");
  if (c->s.closing || c->s.shutdown_requested) return closed(L);
  if (c->serve) multiloop_serve_uncork(c);   /* after what serve's sends held back */
  if (!has_cb) {
    int n;
    if (len == 0) return push_write_result(L, c);
    n = multiloop_stream_try_write(&c->s, data, len);  /* the cheap way first */
    if (n < 0) return fail(L, "write", n);             /* the stream closed */
    if (n > 0) TOUCH(WORKER(c), c);
    if (n == (int)len) return push_write_result(L, c);
    off = (size_t)n;
  }
  lua_pushvalue(L, 2);
  ref = luaL_ref(L, LUA_REGISTRYINDEX);      /* may raise: nothing to undo yet */
  if (has_cb) {
    lua_pushvalue(L, 3);
    cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  wr = malloc(sizeof *wr);
  if (wr == NULL) {
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
    luaL_unref(L, LUA_REGISTRYINDEX, cb_ref);
    return fail(L, "write", UV_ENOMEM);
  }
  wr->ref = ref;
  wr->cb_ref = cb_ref;
  rc = multiloop_stream_write(&c->s, &wr->w, data + off, len - off);
  if (rc != 0) {                              /* the stream closed */
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
    luaL_unref(L, LUA_REGISTRYINDEX, cb_ref);
    free(wr);
    return fail(L, "write", rc);
  }
  if (c->serve) multiloop_serve_queued(c);
  return push_write_result(L, c);
}

/* A serve connection reads with receive and writes with send: the callbacks
 * that would compete with them, and pause/resume (its reads are paced by its
 * reader), raise. */
static void not_on_serve(lua_State *L, multiloop_conn_t *c, const char *method) {
  if (c->serve)
    luaL_error(L, "conn:%s: not on a serve connection (it reads with conn:receive*, "
                  "and a serve handler's connection has no callbacks but on_close)", method);
}

static int set_callback(lua_State *L, int slot) {
  multiloop_conn_t *c = check_conn(L);
  if (slot != ON_CLOSE) not_on_serve(L, c, slot_names[slot]);
  luaL_argexpected(L, lua_isnoneornil(L, 2) || lua_isfunction(L, 2), 2,
                   "function or nil");
  if (lua_isnoneornil(L, 2)) c->callbacks &= ~(1u << slot);
  else c->callbacks |= 1u << slot;
  lua_settop(L, 2);
  lua_setiuservalue(L, 1, slot);
  return 1;                                 /* the conn, for chaining */
}

static int conn_on_data(lua_State *L) { return set_callback(L, ON_DATA); }
static int conn_on_end(lua_State *L) { return set_callback(L, ON_END); }
static int conn_on_close(lua_State *L) { return set_callback(L, ON_CLOSE); }
static int conn_on_drain(lua_State *L) { return set_callback(L, ON_DRAIN); }
static int conn_on_timeout(lua_State *L) { return set_callback(L, ON_TIMEOUT); }

static int conn_pause(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  not_on_serve(L, c, "pause");
  multiloop_stream_pause(&c->s);
  return 0;
}

static int conn_resume(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  multiloop_proxy_info_t *info = proxy_info(c);
  not_on_serve(L, c, "resume");
  multiloop_stream_resume(&c->s);
  if (info && info->replay == 1 && !c->s.closing) {
    /* Not from here: this may be a light thread, and on_data runs from the
     * loop. The idle deadline, 1 ms from now, hands the bytes over. */
    info->idle_ms = multiloop_deadline_ms(&c->idle);
    if (multiloop_deadline_set(WORKER(c), &c->idle, 1) != 0) return luaL_error(L, "not enough memory");
    info->replay = 2;
  }
  return 0;
}

static int conn_buffered(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  lua_pushinteger(L, (lua_Integer)multiloop_stream_queued(&c->s));
  return 1;
}

static lua_Integer check_ms(lua_State *L, int arg) {
  lua_Integer ms = luaL_checkinteger(L, arg);
  luaL_argcheck(L, ms >= 0, arg, "milliseconds must not be negative");
  return ms;
}

/* conn:set_timeout(ms): idle timeout for this connection, 0 for none. */
static int conn_set_timeout(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  lua_Integer ms = check_ms(L, 2);
  multiloop_proxy_info_t *info = proxy_info(c);
  not_on_serve(L, c, "set_timeout");
  if (c->s.closing) return 0;
  if (info && info->replay == 2) {          /* after the bytes the header left (conn_resume) */
    info->idle_ms = (uint64_t)ms;
    return 0;
  }
  if (multiloop_deadline_set(WORKER(c), &c->idle, (uint64_t)ms) != 0)
    return luaL_error(L, "not enough memory");
  return 0;
}

static int conn_set_nodelay(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  int rc;
  luaL_checktype(L, 2, LUA_TBOOLEAN);
  if (c->s.closing) return closed(L);
  if (multiloop_stream_is_unix(&c->s)) return fail(L, "set_nodelay", UV_ENOTSUP);
  if ((rc = uv_tcp_nodelay(&c->s.h.tcp, lua_toboolean(L, 2))) != 0)
    return fail(L, "set_nodelay", rc);
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:set_keepalive(on [, ms]): TCP keepalive probes after ms idle (the
 * kernel counts whole seconds: rounded up, at least 1). */
static int conn_set_keepalive(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  lua_Integer ms;
  int on, rc;
  luaL_checktype(L, 2, LUA_TBOOLEAN);
  on = lua_toboolean(L, 2);
  ms = lua_isnoneornil(L, 3) ? 60000 : check_ms(L, 3);
  luaL_argcheck(L, ms <= (lua_Integer)INT_MAX * 1000, 3, "keepalive delay too large");
  if (c->s.closing) return closed(L);
  if (multiloop_stream_is_unix(&c->s)) return fail(L, "set_keepalive", UV_ENOTSUP);
  rc = uv_tcp_keepalive(&c->s.h.tcp, on, on ? (unsigned)((ms + 999) / 1000 > 0 ? (ms + 999) / 1000 : 1) : 0);
  if (rc != 0) return fail(L, "set_keepalive", rc);
  lua_pushboolean(L, 1);
  return 1;
}

/* A serve connection's held-back sends go first (serve.c). */
#define UNCORK(c) ((c)->serve ? multiloop_serve_uncork(c) : (void)0)

static int conn_shutdown_method(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  UNCORK(c);
  multiloop_stream_shutdown(&c->s);
  return 0;
}

static int conn_close_method(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  UNCORK(c);
  multiloop_stream_close_flushed(&c->s);   /* drops no queued data */
  return 0;
}

/* ip, port of either end; for a Unix socket the path (the peer's is usually
 * empty: clients rarely bind) and no port. */
static int push_address(lua_State *L, multiloop_conn_t *c, int peer) {
  struct sockaddr_storage ss;
  int len = sizeof ss, rc;
  char ip[INET6_ADDRSTRLEN];
  if (c->s.closing) return closed(L);
  if (peer && c->s.ext && c->s.ext->proxy && !((multiloop_proxy_info_t *)c->s.ext->proxy)->local)
    return multiloop_proxy_push_peer(L, c->s.ext->proxy);   /* as the proxy reported it */
  if (multiloop_stream_is_unix(&c->s)) {
    /* Asked of the kernel directly: libuv 1.44's uv_pipe_getpeername reads
     * past what getpeername filled in for an unnamed peer (valgrind). */
    struct sockaddr_un sun;
    socklen_t sunlen = sizeof sun;
    uv_os_fd_t fd;
    memset(&sun, 0, sizeof sun);
    if ((rc = uv_fileno(&c->s.h.handle, &fd)) != 0) return fail(L, peer ? "peer" : "address", rc);
    if ((peer ? getpeername(fd, (struct sockaddr *)&sun, &sunlen)
              : getsockname(fd, (struct sockaddr *)&sun, &sunlen)) != 0)
      return fail(L, peer ? "peer" : "address", uv_translate_sys_error(errno));
    lua_pushstring(L, sun.sun_path);       /* zeroed: "" for an unnamed peer */
    return 1;
  }
  rc = peer ? uv_tcp_getpeername(&c->s.h.tcp, (struct sockaddr *)&ss, &len)
            : uv_tcp_getsockname(&c->s.h.tcp, (struct sockaddr *)&ss, &len);
  if (rc != 0) return fail(L, peer ? "peer" : "address", rc);
  uv_ip_name((struct sockaddr *)&ss, ip, sizeof ip);
  lua_pushstring(L, ip);
  lua_pushinteger(L, ss.ss_family == AF_INET6
                         ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                         : ntohs(((struct sockaddr_in *)&ss)->sin_port));
  return 2;
}

static int conn_peer(lua_State *L) { return push_address(L, check_conn(L), 1); }

/* conn:proxy(): what the PROXY header said (nil without one); `via` is the
 * proxy itself (the socket's peer). */
static int conn_proxy(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  multiloop_proxy_info_t *info = c->s.ext ? c->s.ext->proxy : NULL;
  struct sockaddr_storage ss;
  int len = sizeof ss, via;
  if (c->s.closing || info == NULL) {
    lua_pushnil(L);
    return 1;
  }
  if (multiloop_stream_is_unix(&c->s) ||
      uv_tcp_getpeername(&c->s.h.tcp, (struct sockaddr *)&ss, &len) != 0) {
    lua_pushnil(L);                         /* a Unix socket's proxy has no address */
  } else {
    multiloop_proxy_push_ipport(L, &ss);
  }
  via = lua_gettop(L);
  multiloop_proxy_push_info(L, info, via);
  return 1;
}
static int conn_address(lua_State *L) { return push_address(L, check_conn(L), 0); }

/* The fields, marked in the methods table by their number. */
enum { FIELD_ID = 1, FIELD_WORKER };

/* Methods first, straight from the methods table (upvalue 2): every
 * conn:method() call comes through here, and needs no check (the method
 * checks its `self`). Only the fields read the connection, so only they
 * check it. */
static int conn_index(lua_State *L) {
  /* The key is the top (Lua calls __index with two arguments); rawget
   * replaces it with its entry, saving a copy on every method call. */
  switch (lua_rawget(L, lua_upvalueindex(2))) {
  case LUA_TFUNCTION: return 1;             /* a method */
  case LUA_TNUMBER:                         /* a field: FIELD_* */
    if (lua_tointeger(L, -1) == FIELD_ID) lua_pushinteger(L, check_conn(L)->id);
    else lua_rawgeti(L, LUA_REGISTRYINDEX, multiloop_gen_of(L)->worker_ref);
    return 1;
  default: return 1;                        /* nil */
  }
}

static int conn_tostring(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  lua_pushfstring(L, "multiloop.conn %I (worker %d%s)", c->id, WORKER(c)->id,
                  c->s.closing ? ", closed" : "");
  return 1;
}

/* conn:log(level, ...): worker.log with the connection's id (log.c); a
 * closed connection keeps its id. */
static int conn_log(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  char who[32];
  snprintf(who, sizeof who, "worker %d", WORKER(c)->id);
  return multiloop_log_lua(L, WORKER(c)->cfg->logger, 2, who, c->id, "conn:log");
}

static const luaL_Reg conn_methods[] = {
  { "log", conn_log },
  { "on_data", conn_on_data },
  { "on_end", conn_on_end },
  { "on_close", conn_on_close },
  { "on_drain", conn_on_drain },
  { "on_timeout", conn_on_timeout },
  { "pause", conn_pause },
  { "resume", conn_resume },
  { "buffered", conn_buffered },
  { "set_timeout", conn_set_timeout },
  { "set_nodelay", conn_set_nodelay },
  { "set_keepalive", conn_set_keepalive },
  { "write", conn_write },
  { "shutdown", conn_shutdown_method },
  { "close", conn_close_method },
  { "peer", conn_peer },
  { "address", conn_address },
  { "pipe", multiloop_conn_pipe },
  { "tls", multiloop_tls_info },
  { "proxy", conn_proxy },
  { "sslhandshake", multiloop_tls_sslhandshake },
  { NULL, NULL }
};

/* Creates the connection metatable in a worker's state. Every function here
 * gets the metatable as upvalue 1, for check_conn. */
void multiloop_conn_register(lua_State *L) {
  luaL_newmetatable(L, CONN_MT);                   /* mt */
  luaL_newlibtable(L, conn_methods);               /* mt methods */
  lua_pushvalue(L, -2);
  luaL_setfuncs(L, conn_methods, 1);
  lua_pushvalue(L, -2);
  luaL_setfuncs(L, multiloop_serve_methods, 1);
  lua_pushinteger(L, FIELD_ID);
  lua_setfield(L, -2, "id");
  lua_pushinteger(L, FIELD_WORKER);
  lua_setfield(L, -2, "worker");
  lua_pushvalue(L, -2);                            /* mt methods mt */
  lua_insert(L, -2);                               /* mt mt methods */
  lua_pushcclosure(L, conn_index, 2);              /* upvalues: mt, methods */
  lua_setfield(L, -2, "__index");
  lua_pushvalue(L, -1);
  lua_pushcclosure(L, conn_tostring, 1);
  lua_setfield(L, -2, "__tostring");
  lua_pushvalue(L, -1);                            /* local c <close> = ...: conn:close() */
  lua_pushcclosure(L, conn_close_method, 1);
  lua_setfield(L, -2, "__close");
  lua_pop(L, 1);
}
