/*
 * conn.c: a client connection inside a worker, and its Lua object.
 *
 * Runs only on the worker thread that accepted the connection. The C struct,
 * uv_tcp_t included, lives inside a full userdata ("multiloop.conn"); its
 * Lua callbacks live in the userdata's user values. While the handle is open
 * a registry ref pins the userdata, so the garbage collector cannot free the
 * memory libuv is using; the close callback drops the ref, and the object
 * then lives on in the "closed" state for as long as Lua code holds it.
 *
 * Reads use the worker's one read buffer; the bytes are copied into a Lua
 * string inside the protected call. A write first tries the socket
 * (uv_try_write); only what the kernel did not take is queued, and a queued
 * write pins the Lua string itself (a registry ref) instead of copying it.
 *
 * Backpressure: write() returns false once the bytes queued in libuv pass the
 * server's write_high_water; on_drain runs when they fall to write_low_water.
 * pause()/resume() stop and restart reading. The idle timeout is a deadline
 * (deadline.c) whose expiry callback, conn_idle, is set here; reads and
 * writes touch it.
 *
 * Lifecycle: the connection closes when the peer has ended and our side is
 * shut down, when conn:close() is called (after queued writes flush), on a
 * read or write error (reason: the libuv error name), on a Lua error in a
 * callback (reason "error"), when idle too long without on_timeout (reason
 * "timeout"), or when the worker stops (reason "stopped"). Every connection
 * the acceptor counted is released to it in the close callback.
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "multiloop.h"

#define CONN_MT "multiloop.conn"

enum { ON_DATA = 1, ON_END, ON_CLOSE, ON_DRAIN, ON_TIMEOUT, N_USER_VALUES = ON_TIMEOUT };

struct multiloop_conn_s {
  union {                              /* first: libuv hands us &h.handle etc. */
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;                    /* a Unix socket connection */
  } h;
  multiloop_worker_t *w;
  multiloop_conn_t *prev, *next;       /* the worker's list of open connections */
  multiloop_deadline_t idle;           /* the idle timeout: expires in conn_idle */
  lua_Integer id;
  int ref;                             /* pins the userdata while the handle is open */
  /* One word of flags after `ref`, so the struct stays at 352 bytes (the
   * next malloc size class up costs an idle connection 16 B more). */
  unsigned callbacks : 8;              /* bit n set: user value n is a function */
  unsigned closing : 1;                /* uv_close called, or never opened */
  unsigned read_ended : 1;             /* the peer sent EOF */
  unsigned shutdown_requested : 1;
  unsigned shut_down : 1;              /* our FIN is out */
  unsigned close_when_flushed : 1;     /* conn:close() with writes queued */
  unsigned paused : 1;                 /* conn:pause() */
  unsigned need_drain : 1;             /* write() returned false: on_drain is due */
  unsigned counted : 1;                /* holds one of the acceptor's slots */
  unsigned is_unix : 1;
  const char *reason;                  /* for on_close: NULL or a static string */
};

typedef struct {
  uv_write_t req;
  int ref;                             /* the Lua string being written */
  int cb_ref;                          /* conn:write's callback, or LUA_NOREF */
  unsigned len;                        /* bytes queued, for the bytes_out counter */
} write_req;

_Static_assert(N_USER_VALUES < 8, "a callback bit per user value fits in `callbacks`");
#define HAS(c, slot) ((c)->callbacks & (1u << (slot)))

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
  if (ev->slot == 0) lua_rawgeti(L, LUA_REGISTRYINDEX, ev->ref);
  else lua_getiuservalue(L, 2, ev->slot);
  if (!lua_isfunction(L, -1)) return 0;
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

static const char *const slot_names[] = { "write callback", "on_data", "on_end",
                                          "on_close", "on_drain", "on_timeout" };

/* Calls the callback in `slot` with `data`, or with no argument (data NULL). */
static int call(multiloop_conn_t *c, int slot, const char *data, size_t len) {
  call_ev ev = { c, slot, LUA_NOREF, data, len, 0 };
  return multiloop_enter(c->w, call_body, &ev, &c->id, slot_names[slot]);
}

/* Calls the callback in `slot`, or the registry `ref` when slot is 0, with
 * `reason` or nil. */
static int call_with_reason(multiloop_conn_t *c, int slot, int ref, const char *reason) {
  call_ev ev = { c, slot, ref, reason, reason ? strlen(reason) : 0, reason == NULL };
  return multiloop_enter(c->w, call_body, &ev, &c->id, slot_names[slot]);
}

/* --- closing --------------------------------------------------------------- */

static void close_cb(uv_handle_t *h) {
  multiloop_conn_t *c = h->data;
  lua_State *L = c->w->L;
  if (c->counted) {
    atomic_fetch_sub_explicit(&c->w->active, 1, memory_order_relaxed);
    multiloop_acceptor_released(c->w->rt);
  }
  if (HAS(c, ON_CLOSE)) call_with_reason(c, ON_CLOSE, LUA_NOREF, c->reason);
  luaL_unref(L, LUA_REGISTRYINDEX, c->ref);  /* may free c: touch nothing after */
}

/* Closes at once; pending writes are cancelled (their callbacks free them). */
static void conn_close(multiloop_conn_t *c, const char *reason) {
  multiloop_worker_t *w = c->w;
  if (c->closing) return;
  c->closing = 1;
  c->reason = reason;
  if (c->prev) c->prev->next = c->next;
  else if (w->conns == c) w->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = c->next = NULL;
  multiloop_deadline_remove(&c->idle);
  uv_close(&c->h.handle, close_cb);
  if (w->stopping && w->conns == NULL) multiloop_worker_drained(w);
}

void multiloop_conn_close_all(multiloop_worker_t *w, const char *reason) {
  while (w->conns) conn_close(w->conns, reason);
}

/* The request is malloc'd: a connection shuts down at most once, and idle
 * connections should not carry 80 bytes for it. */
static void shutdown_cb(uv_shutdown_t *req, int status) {
  multiloop_conn_t *c = req->handle->data;
  free(req);
  if (status == UV_ECANCELED) return;       /* closed meanwhile */
  if (status < 0) {
    conn_close(c, uv_err_name(status));
    return;
  }
  c->shut_down = 1;
  if (c->close_when_flushed || c->read_ended) conn_close(c, NULL);
}

/* Half-closes once every queued write has gone out. */
static void conn_shutdown(multiloop_conn_t *c) {
  uv_shutdown_t *req;
  int rc;
  if (c->closing || c->shutdown_requested) return;
  c->shutdown_requested = 1;
  if ((req = malloc(sizeof *req)) == NULL) {
    conn_close(c, uv_err_name(UV_ENOMEM));
    return;
  }
  rc = uv_shutdown(req, &c->h.stream, shutdown_cb);
  if (rc != 0) {
    free(req);
    conn_close(c, uv_err_name(rc));
  }
}

/* --- reading --------------------------------------------------------------- */

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  multiloop_conn_t *c = h->data;
  (void)suggested;
  *buf = uv_buf_init(c->w->read_buffer, MULTILOOP_READ_BUFFER_SIZE);
}

static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  multiloop_conn_t *c = s->data;
  if (nread > 0) {
    atomic_fetch_add_explicit(&c->w->bytes_in, (uint64_t)nread, memory_order_relaxed);
    multiloop_deadline_touch(c->w, &c->idle);
    if (HAS(c, ON_DATA) && call(c, ON_DATA, buf->base, (size_t)nread) != LUA_OK)
      conn_close(c, "error");
  } else if (nread == UV_EOF) {
    c->read_ended = 1;
    uv_read_stop(s);
    if (!HAS(c, ON_END)) {
      conn_shutdown(c);                       /* closes once writes flush */
      if (c->shut_down) conn_close(c, NULL);
    } else if (call(c, ON_END, NULL, 0) != LUA_OK) {
      conn_close(c, "error");
    } else if (c->shut_down) {
      conn_close(c, NULL);                    /* both directions are done */
    }
  } else if (nread < 0) {
    conn_close(c, uv_err_name((int)nread));
  }
}

/* The idle deadline expired, `ms` after the last read or write: on_timeout
 * if set (the timeout starts again: it fires once per idle period),
 * otherwise close with reason "timeout". */
static void conn_idle(multiloop_deadline_t *d, uint64_t ms) {
  multiloop_conn_t *c = (multiloop_conn_t *)((char *)d - offsetof(multiloop_conn_t, idle));
  if (c->closing) return;
  if (!HAS(c, ON_TIMEOUT)) {
    conn_close(c, "timeout");
    return;
  }
  multiloop_deadline_set(c->w, &c->idle, ms);
  if (call(c, ON_TIMEOUT, NULL, 0) != LUA_OK) conn_close(c, "error");
}

static void start_reading(multiloop_conn_t *c) {
  if (!c->closing && !c->paused && !c->read_ended && !c->close_when_flushed)
    uv_read_start(&c->h.stream, alloc_cb, read_cb);
}

/* --- accepting ------------------------------------------------------------- */

typedef struct {
  multiloop_worker_t *w;
  uv_os_sock_t fd;                     /* an fd to open, or -1: accept from the pipe */
  multiloop_conn_t *c;
  lua_Integer id;
  int taken;                           /* the fd is no longer the caller's */
} accept_ev;

/* Protected: makes the object, takes the connection's fd into it (from the
 * hand-off pipe, or an fd the inbox or our own listener gave us), calls
 * connect. The object is pinned before libuv sees its handle. */
static int accept_body(lua_State *L) {
  accept_ev *ev = lua_touserdata(L, 1);
  multiloop_worker_t *w = ev->w;
  multiloop_conn_t *c = lua_newuserdatauv(L, sizeof *c, N_USER_VALUES);
  int rc;
  memset(c, 0, sizeof *c);
  c->closing = 1;                          /* closed until the fd is ours */
  c->ref = LUA_NOREF;
  c->w = w;
  multiloop_deadline_init(&c->idle, conn_idle);
  luaL_setmetatable(L, CONN_MT);
  lua_pushvalue(L, -1);
  c->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  c->is_unix = w->cfg->path != NULL;
  if (c->is_unix) uv_pipe_init(&w->loop, &c->h.pipe, 0);
  else uv_tcp_init(&w->loop, &c->h.tcp);
  c->h.handle.data = c;
  c->counted = 1;                          /* the listener counted this fd */
  ev->taken = 1;
  if (ev->fd < 0) rc = uv_accept((uv_stream_t *)&w->pipe, &c->h.stream);
  else if (c->is_unix) rc = uv_pipe_open(&c->h.pipe, ev->fd);
  else rc = uv_tcp_open(&c->h.tcp, ev->fd);
  if (rc != 0 && ev->fd >= 0) close(ev->fd);
  c->closing = 0;
  if (w->cfg->dispatch == MULTILOOP_DISPATCH_REUSEPORT)   /* else the acceptor counted it */
    atomic_fetch_add_explicit(&w->active, 1, memory_order_relaxed);
  if (rc != 0) {
    conn_close(c, uv_err_name(rc));
    return 0;
  }
  atomic_fetch_add_explicit(&w->accepted, 1, memory_order_relaxed);
  c->id = ev->id = (lua_Integer)atomic_fetch_add(&w->rt->next_conn_id, 1) + 1;
  c->next = w->conns;
  if (w->conns) w->conns->prev = c;
  w->conns = c;
  ev->c = c;
  if (!c->is_unix) {
    if (w->cfg->nodelay) uv_tcp_nodelay(&c->h.tcp, 1);
    if (w->cfg->keepalive) uv_tcp_keepalive(&c->h.tcp, 1, w->cfg->keepalive);
  }
  if (multiloop_deadline_set(w, &c->idle, w->cfg->idle_timeout) != 0)
    return luaL_error(L, "not enough memory");

  lua_rawgeti(L, LUA_REGISTRYINDEX, w->handler_ref);
  lua_getfield(L, -1, "connect");
  lua_pushvalue(L, -3);
  lua_call(L, 1, 0);
  return 0;
}

/* Takes one connection: `fd`, or (fd < 0) the next one pending on the
 * worker's hand-off pipe. Returns 0 when it could not even take the fd (out
 * of memory): the fd is still the caller's then. */
int multiloop_conn_open(multiloop_worker_t *w, uv_os_sock_t fd) {
  accept_ev ev = { w, fd, NULL, 0, 0 };
  int rc = multiloop_enter(w, accept_body, &ev, &ev.id, "connect");
  multiloop_conn_t *c = ev.c;
  if (c == NULL) return ev.taken;
  if (rc != LUA_OK) conn_close(c, "error");
  else start_reading(c);
  return 1;
}

/* --- writing --------------------------------------------------------------- */

static void write_cb(uv_write_t *req, int status) {
  write_req *wr = (write_req *)req;
  multiloop_conn_t *c = req->handle->data;
  lua_State *L = c->w->L;
  int cb_ref = wr->cb_ref, rc = LUA_OK;
  if (status == 0) {
    atomic_fetch_add_explicit(&c->w->bytes_out, wr->len, memory_order_relaxed);
    multiloop_deadline_touch(c->w, &c->idle);
  }
  luaL_unref(L, LUA_REGISTRYINDEX, wr->ref);
  free(wr);
  if (cb_ref != LUA_NOREF) {
    rc = call_with_reason(c, 0, cb_ref, status < 0 ? uv_err_name(status) : NULL);
    luaL_unref(L, LUA_REGISTRYINDEX, cb_ref);
  }
  if (status < 0 && status != UV_ECANCELED) {
    conn_close(c, uv_err_name(status));
  } else if (rc != LUA_OK) {
    conn_close(c, "error");
  } else if (c->need_drain && !c->closing &&
             c->h.stream.write_queue_size <= c->w->cfg->write_low_water) {
    c->need_drain = 0;
    if (HAS(c, ON_DRAIN) && call(c, ON_DRAIN, NULL, 0) != LUA_OK) conn_close(c, "error");
  }
}

static int fail(lua_State *L, const char *op, int err) {
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s", op, uv_strerror(err));
  lua_pushstring(L, uv_err_name(err));
  return 3;
}

/* luaL_checkudata without its lookup of the metatable by name: every C
 * function that takes a connection has the metatable as its upvalue 1
 * (multiloop_conn_register), and this runs on every method call. */
static multiloop_conn_t *check_conn(lua_State *L) {
  void *p = lua_touserdata(L, 1);
  if (p != NULL && lua_getmetatable(L, 1)) {
    int ours = lua_rawequal(L, -1, lua_upvalueindex(1));
    lua_pop(L, 1);
    if (ours) return p;
  }
  luaL_typeerror(L, 1, CONN_MT);
  return NULL;
}

static int closed(lua_State *L) {
  lua_pushnil(L);
  lua_pushliteral(L, "closed");
  return 2;
}

/* true while the queue is under the high-water mark; false (and on_drain
 * later) once over it. */
static int push_write_result(lua_State *L, multiloop_conn_t *c) {
  int under = c->h.stream.write_queue_size < c->w->cfg->write_high_water;
  if (!under) c->need_drain = 1;
  lua_pushboolean(L, under);
  return 1;
}

/* conn:write(data [, fn(err)]). Without a callback the socket is tried first
 * and only the rest is queued. With one, the write is always queued (uv_write
 * still writes at once when it can), so the callback never runs before
 * write() returns. */
static int conn_write(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  int has_cb = !lua_isnoneornil(L, 3);
  uv_buf_t buf = uv_buf_init((char *)(uintptr_t)data, (unsigned)len);  /* libuv only reads it */
  write_req *wr;
  int ref, cb_ref = LUA_NOREF, rc;

  luaL_argcheck(L, len <= INT_MAX, 2, "string too long for one write (2 GiB at most)");
  luaL_argexpected(L, !has_cb || lua_isfunction(L, 3), 3, "function or nil");
  if (c->closing || c->shutdown_requested) return closed(L);
  if (!has_cb) {
    if (len == 0) return push_write_result(L, c);
    if (c->h.stream.write_queue_size == 0) {      /* the cheap way first */
      int n = uv_try_write(&c->h.stream, &buf, 1);
      if (n < 0 && n != UV_EAGAIN) {
        conn_close(c, uv_err_name(n));
        return fail(L, "write", n);
      }
      if (n > 0) {
        atomic_fetch_add_explicit(&c->w->bytes_out, (uint64_t)n, memory_order_relaxed);
        multiloop_deadline_touch(c->w, &c->idle);
      }
      if (n == (int)len) return push_write_result(L, c);
      if (n > 0) {
        buf.base += n;
        buf.len -= (unsigned)n;
      }
    }
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
  wr->len = buf.len;
  rc = uv_write(&wr->req, &c->h.stream, &buf, 1, write_cb);
  if (rc != 0) {
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
    luaL_unref(L, LUA_REGISTRYINDEX, cb_ref);
    free(wr);
    conn_close(c, uv_err_name(rc));
    return fail(L, "write", rc);
  }
  return push_write_result(L, c);
}

/* --- the other methods ----------------------------------------------------- */

static int set_callback(lua_State *L, int slot) {
  multiloop_conn_t *c = check_conn(L);
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
  if (!c->closing && !c->paused) {
    c->paused = 1;
    uv_read_stop(&c->h.stream);
  }
  return 0;
}

static int conn_resume(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  if (c->paused) {
    c->paused = 0;
    start_reading(c);
  }
  return 0;
}

static int conn_buffered(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  lua_pushinteger(L, c->closing ? 0 : (lua_Integer)c->h.stream.write_queue_size);
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
  if (c->closing) return 0;
  if (multiloop_deadline_set(c->w, &c->idle, (uint64_t)ms) != 0)
    return luaL_error(L, "not enough memory");
  return 0;
}

static int conn_set_nodelay(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  int rc;
  luaL_checktype(L, 2, LUA_TBOOLEAN);
  if (c->closing) return closed(L);
  if (c->is_unix) return fail(L, "set_nodelay", UV_ENOTSUP);
  if ((rc = uv_tcp_nodelay(&c->h.tcp, lua_toboolean(L, 2))) != 0)
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
  if (c->closing) return closed(L);
  if (c->is_unix) return fail(L, "set_keepalive", UV_ENOTSUP);
  rc = uv_tcp_keepalive(&c->h.tcp, on, on ? (unsigned)((ms + 999) / 1000 > 0 ? (ms + 999) / 1000 : 1) : 0);
  if (rc != 0) return fail(L, "set_keepalive", rc);
  lua_pushboolean(L, 1);
  return 1;
}

static int conn_shutdown_method(lua_State *L) {
  conn_shutdown(check_conn(L));
  return 0;
}

static int conn_close_method(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  if (c->closing) return 0;
  if (c->h.stream.write_queue_size > 0) {        /* flush first: drop no queued data */
    c->close_when_flushed = 1;
    uv_read_stop(&c->h.stream);
    if (c->shutdown_requested) return 0;   /* shutdown_cb will close */
    conn_shutdown(c);
  } else {
    conn_close(c, NULL);
  }
  return 0;
}

/* ip, port of either end; for a Unix socket the path (the peer's is usually
 * empty: clients rarely bind) and no port. */
static int push_address(lua_State *L, multiloop_conn_t *c, int peer) {
  struct sockaddr_storage ss;
  int len = sizeof ss, rc;
  char ip[INET6_ADDRSTRLEN];
  if (c->closing) return closed(L);
  if (c->is_unix) {
    /* Asked of the kernel directly: libuv 1.44's uv_pipe_getpeername reads
     * past what getpeername filled in for an unnamed peer (valgrind). */
    struct sockaddr_un sun;
    socklen_t sunlen = sizeof sun;
    uv_os_fd_t fd;
    memset(&sun, 0, sizeof sun);
    if ((rc = uv_fileno(&c->h.handle, &fd)) != 0) return fail(L, peer ? "peer" : "address", rc);
    if ((peer ? getpeername(fd, (struct sockaddr *)&sun, &sunlen)
              : getsockname(fd, (struct sockaddr *)&sun, &sunlen)) != 0)
      return fail(L, peer ? "peer" : "address", uv_translate_sys_error(errno));
    lua_pushstring(L, sun.sun_path);       /* zeroed: "" for an unnamed peer */
    return 1;
  }
  rc = peer ? uv_tcp_getpeername(&c->h.tcp, (struct sockaddr *)&ss, &len)
            : uv_tcp_getsockname(&c->h.tcp, (struct sockaddr *)&ss, &len);
  if (rc != 0) return fail(L, peer ? "peer" : "address", rc);
  uv_ip_name((struct sockaddr *)&ss, ip, sizeof ip);
  lua_pushstring(L, ip);
  lua_pushinteger(L, ss.ss_family == AF_INET6
                         ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                         : ntohs(((struct sockaddr_in *)&ss)->sin_port));
  return 2;
}

static int conn_peer(lua_State *L) { return push_address(L, check_conn(L), 1); }
static int conn_address(lua_State *L) { return push_address(L, check_conn(L), 0); }

/* Methods first, straight from the methods table (upvalue 2): every
 * conn:method() call comes through here, and needs no check (the method
 * checks its `self`). Only the fields read the connection, so only they
 * check it. */
static int conn_index(lua_State *L) {
  const char *key;
  lua_pushvalue(L, 2);
  if (lua_rawget(L, lua_upvalueindex(2)) != LUA_TNIL) return 1;  /* a method */
  key = lua_tostring(L, 2);
  if (key == NULL) return 1;
  if (strcmp(key, "id") == 0) lua_pushinteger(L, check_conn(L)->id);
  else if (strcmp(key, "worker") == 0)
    lua_rawgeti(L, LUA_REGISTRYINDEX, check_conn(L)->w->worker_ref);
  else lua_pushnil(L);
  return 1;
}

static int conn_tostring(lua_State *L) {
  multiloop_conn_t *c = check_conn(L);
  lua_pushfstring(L, "multiloop.conn %I (worker %d%s)", c->id, c->w->id,
                  c->closing ? ", closed" : "");
  return 1;
}

static const luaL_Reg conn_methods[] = {
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
  { NULL, NULL }
};

/* Creates the connection metatable in a worker's state. Every function here
 * gets the metatable as upvalue 1, for check_conn. */
void multiloop_conn_register(lua_State *L) {
  luaL_newmetatable(L, CONN_MT);                   /* mt */
  luaL_newlibtable(L, conn_methods);               /* mt methods */
  lua_pushvalue(L, -2);
  luaL_setfuncs(L, conn_methods, 1);
  lua_pushvalue(L, -2);                            /* mt methods mt */
  lua_insert(L, -2);                               /* mt mt methods */
  lua_pushcclosure(L, conn_index, 2);              /* upvalues: mt, methods */
  lua_setfield(L, -2, "__index");
  lua_pushvalue(L, -1);
  lua_pushcclosure(L, conn_tostring, 1);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
}
