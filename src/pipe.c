/*
 * pipe.c: conn:pipe(other [, opts] [, fn]): the two connections' bytes go to each
 * other in C, both ways, with no Lua call per chunk (HAProxy's TCP mode,
 * Node's a.pipe(b).pipe(a)).
 *
 * Runs only on the worker thread. While piped, conn.c hands each
 * connection's stream events here instead of to its callbacks or its serve
 * reader: a read is written to the other end at once (tried on the socket
 * first; only what the kernel does not take is copied and queued), and
 * reading pauses while the other end's queue is over write_high_water,
 * until its `drained`. An EOF shuts the other end down once its queue has
 * flushed (half-close forwarded); a connection closes by itself once it has
 * both read its EOF and been shut down. When one end closes in any other way
 * (a reset, a timeout, a stop) the other closes after flushing what it has.
 *
 * The pipe ends when both connections are closed (their `closed` events,
 * loop callbacks, so the waiting thread is woken from there, or the
 * callback called): with the bytes each way, and the first reason that was
 * not a plain close. Bytes already buffered when the pipe starts (read
 * ahead by a serve reader, or the rest of the read event the calling
 * thread runs in) go first.
 */
#include <stdlib.h>
#include <string.h>

#include "conn.h"

typedef struct {
  /* self, other; an end is NULL once its `closed` came: its object may be
   * collected from then on, while the other end still has events. */
  multiloop_conn_t *end[2];
  uint64_t bytes[2];                   /* end[i] -> end[1 - i] */
  multiloop_thread_t *t;               /* waiting, or NULL */
  int cb_ref;                          /* fn(sent, received, err), or LUA_NOREF */
  int reason;                          /* the first close reason that was not 0 */
  int nclosed;                         /* ends whose `closed` came */
  int nclosing;                        /* ends whose `closing` came */
  multiloop_worker_t *w;
  multiloop_gen_t *g;                  /* the state both ends (and cb_ref) belong to */
  multiloop_deadline_t idle;           /* { timeout = ms }: no byte either way for that long */
} pipe_t;

static int end_of(const pipe_t *p, const multiloop_conn_t *c) { return p->end[1] == c; }

static pipe_t *pipe_of(multiloop_conn_t *c) { return multiloop_stream_tap(&c->s); }

/* gcc 12's -fanalyzer reports the queued write forward mallocs as leaked
 * once multiloop_stream_write has put it in the handle's write queue (conn.c
 * frees it when written): the false positive serve.c's uncork documents.
 * ASan and valgrind see no leak (outbound_spec's pipe cases queue such
 * writes). Off from here to the end of multiloop_pipe_read only (its callers). */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wanalyzer-malloc-leak"
#endif

/* Writes bytes read from end[i] to the other end. */
static void forward(pipe_t *p, int i, const char *data, size_t len) {
  multiloop_conn_t *from = p->end[i], *to = p->end[1 - i];
  int n;
  if (len == 0 || to == NULL || to->s.closing || to->s.shutdown_requested) return;   /* nowhere to go */
  p->bytes[i] += len;
  if (p->idle.list) multiloop_deadline_touch(p->w, &p->idle);
  n = multiloop_stream_try_write(&to->s, data, len);
  if (n < 0) return;                             /* `to` closed: its closing ends the pipe */
  if ((size_t)n < len) {
    /* One block: the request, then the bytes (freed with it by conn.c). */
    multiloop_write_req_t *wr = malloc(sizeof *wr + (len - (size_t)n));
    if (wr == NULL) {
      multiloop_stream_close(&to->s, UV_ENOMEM);
      return;
    }
    memcpy(wr + 1, data + n, len - (size_t)n);
    wr->ref = wr->cb_ref = LUA_NOREF;
    if (multiloop_stream_write(&to->s, &wr->w, (const char *)(wr + 1), len - (size_t)n) != 0) {
      free(wr);
      return;
    }
  }
  if (!multiloop_stream_below_high_water(&to->s)) multiloop_stream_pause(&from->s);
}

/* What end i already holds, unread: the rest of this read event's bytes,
 * or what the stream kept. Forwarded, and consumed. */
static void forward_buffered(pipe_t *p, int i) {
  multiloop_conn_t *c = p->end[i];
  multiloop_worker_t *w = CONN_WORKER(c);
  size_t len;
  const char *data;
  if (w->view.conn == c) {
    len = w->view.len - w->view.used;
    data = w->view.p + w->view.used;
    w->view.used = w->view.len;
    forward(p, i, data, len);
    return;
  }
  if ((data = multiloop_stream_kept(&c->s, &len)) == NULL) return;
  forward(p, i, data, len);
  multiloop_stream_consume(&c->s, len);
}

void multiloop_pipe_read(multiloop_conn_t *c, const char *data, size_t len) {
  pipe_t *p = pipe_of(c);
  if (p != NULL) forward(p, end_of(p, c), data, len);   /* (piped: it is there) */
}
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC diagnostic pop
#endif

void multiloop_pipe_eof(multiloop_conn_t *c) {
  pipe_t *p = pipe_of(c);
  multiloop_conn_t *other = p->end[1 - end_of(p, c)];
  if (other) multiloop_stream_shutdown(&other->s);   /* after its queue */
}

/* c's queue fell to write_low_water: the end that writes to it reads again. */
void multiloop_pipe_drained(multiloop_conn_t *c) {
  pipe_t *p = pipe_of(c);
  multiloop_conn_t *other = p->end[1 - end_of(p, c)];
  if (other) multiloop_stream_resume(&other->s);
}

/* The other end closes too, after flushing, unless it is on its way out by
 * itself (its EOF came and its shutdown is asked for: it closes when that
 * is done). */
void multiloop_pipe_closing(multiloop_conn_t *c) {
  pipe_t *p = pipe_of(c);
  multiloop_conn_t *other;
  if (p == NULL) return;
  other = p->end[1 - end_of(p, c)];
  if (p->reason == 0 && c->s.reason != 0) p->reason = c->s.reason;
  if (++p->nclosing == 2) multiloop_deadline_remove(&p->idle);
  if (other != NULL && !other->s.closing && !(other->s.read_ended && other->s.shutdown_requested))
    multiloop_stream_close_flushed(&other->s);
}

static const char *reason_word(int reason) {
  switch (reason) {
    case REASON_ERROR: return "error";
    case REASON_TIMEOUT: return "timeout";
    case REASON_STOPPED: return "stopped";
    default: return uv_err_name(reason);
  }
}

/* Pushes the pipe's results for the end that asked (end 0): sent, received,
 * or nil, err, sent, received. */
static int push_result(lua_State *L, void *ev) {
  pipe_t *p = ev;
  int n = 0;
  if (p->reason != 0) {
    lua_pushnil(L);
    lua_pushstring(L, reason_word(p->reason));
    n = 2;
  }
  lua_pushinteger(L, (lua_Integer)p->bytes[0]);
  lua_pushinteger(L, (lua_Integer)p->bytes[1]);
  return n + 2;
}

static int callback_body(lua_State *L) {
  pipe_t *p = lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, p->cb_ref);
  lua_pushinteger(L, (lua_Integer)p->bytes[0]);
  lua_pushinteger(L, (lua_Integer)p->bytes[1]);
  if (p->reason != 0) lua_pushstring(L, reason_word(p->reason));
  else lua_pushnil(L);
  lua_call(L, 3, 0);
  return 0;
}

/* From conn.c's closed event (a loop callback): the second one ends it. */
void multiloop_pipe_closed(multiloop_conn_t *c, void *pipe) {
  pipe_t *p = pipe;
  if (p == NULL) return;
  p->end[end_of(p, c)] = NULL;                   /* c may be collected after this */
  if (++p->nclosed < 2) return;
  if (p->t) {
    multiloop_thread_t *t = p->t;
    p->t = NULL;
    multiloop_thread_wake(t, 0, push_result, p);
  } else if (p->cb_ref != LUA_NOREF) {
    multiloop_enter(p->g, callback_body, p, NULL, "pipe callback");
  }
  if (p->cb_ref != LUA_NOREF) luaL_unref(p->g->L, LUA_REGISTRYINDEX, p->cb_ref);
  free(p);
}

/* No byte either way for the pipe's timeout: both ends close, "timeout". */
static void pipe_idle(multiloop_deadline_t *d, uint64_t ms) {
  pipe_t *p = (pipe_t *)(void *)((char *)d - offsetof(pipe_t, idle));
  int i;
  (void)ms;
  for (i = 0; i < 2; i++)
    if (p->end[i]) multiloop_stream_close(&p->end[i]->s, REASON_TIMEOUT);
}

/* The waiting thread was killed or closed: the pipe ends now. */
static void cancel_pipe(multiloop_thread_t *t, void *data) {
  pipe_t *p = data;
  int i;
  (void)t;
  p->t = NULL;
  for (i = 0; i < 2; i++)
    if (p->end[i]) multiloop_stream_close(&p->end[i]->s, REASON_ERROR);
}

/* The connection at idx: a connection object, or a socket's (outbound.c). */
static multiloop_conn_t *conn_arg(lua_State *L, int idx) {
  multiloop_conn_t *c = lua_touserdata(L, idx);
  if (c != NULL && lua_rawlen(L, idx) >= sizeof *c && c->s.h.handle.data == &multiloop_conn_events)
    return c;
  if ((c = multiloop_sock_conn(L, idx)) != NULL) return c;
  if (luaL_testudata(L, idx, "multiloop.tcp")) return NULL;   /* a socket with no connection */
  luaL_typeerror(L, idx, "connection or socket");
  return NULL;
}

static const char *busy(multiloop_conn_t *c) {
  if (c->piped) return "socket busy piping";
  if (c->serve && SERVE(c)->reader) return "socket busy reading";
  if (c->serve && SERVE(c)->writer) return "socket busy writing";
  return NULL;
}


/* conn:pipe(other [, { timeout = ms }] [, fn(sent, received, err)]). */
int multiloop_conn_pipe(lua_State *L) {
  multiloop_conn_t *c = multiloop_conn_check(L), *o;
  multiloop_thread_t *t = NULL;
  multiloop_worker_t *w = CONN_WORKER(c);
  const char *why;
  pipe_t *p;
  /* (other, opts, fn), (other, nil, fn), (other, fn), (other, opts), (other) */
  int fn = lua_istable(L, 3) || (lua_isnil(L, 3) && !lua_isnone(L, 4)) ? 4 : 3;
  int has_fn = !lua_isnoneornil(L, fn), i, cb_ref = LUA_NOREF;
  lua_Integer timeout = 0;
  o = conn_arg(L, 2);
  if (fn == 4 && lua_istable(L, 3)) {           /* { timeout = ms } */
    int isint = 0, ty = lua_getfield(L, 3, "timeout");
    if (ty != LUA_TNIL) {
      timeout = ty == LUA_TNUMBER ? lua_tointegerx(L, -1, &isint) : 0;
      if (!isint || timeout < 0 || timeout > 0x7fffffff)
        return luaL_error(L, "conn:pipe: option 'timeout' must be an integer from 0 to "
                             "2147483647 ms (got %s)",
                          ty == LUA_TNUMBER ? luaL_tolstring(L, -1, NULL) : luaL_typename(L, -1));
    }
    lua_pop(L, 1);
  }
  luaL_argexpected(L, !has_fn || lua_isfunction(L, fn), fn, "function or nil");
  if (o == c) return luaL_argerror(L, 2, "a connection cannot be piped to itself");
  if (!has_fn) t = multiloop_thread_self(L, "conn:pipe");
  if (o == NULL || c->s.closing || o->s.closing || c->pooled || o->pooled) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  if ((why = busy(c)) != NULL || (why = busy(o)) != NULL) {
    lua_pushnil(L);
    lua_pushstring(L, why);
    return 2;
  }
  if (has_fn) {                                  /* first: a raise here loses nothing */
    lua_pushvalue(L, fn);
    cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  if ((p = calloc(1, sizeof *p)) == NULL) {
    luaL_unref(L, LUA_REGISTRYINDEX, cb_ref);
    return luaL_error(L, "not enough memory");
  }
  p->end[0] = c;
  p->end[1] = o;
  p->w = w;
  p->g = multiloop_gen_of(L);                     /* both ends are objects of its state */
  p->cb_ref = cb_ref;
  multiloop_deadline_init(&p->idle, pipe_idle);
  /* The last step that can fail: nothing is armed for a pipe that never starts. */
  if (multiloop_stream_set_tap(&c->s, p) != 0 || multiloop_stream_set_tap(&o->s, p) != 0 ||
      multiloop_deadline_set(w, &p->idle, (uint64_t)timeout) != 0) {
    if (c->s.ext) c->s.ext->tap = NULL;
    if (o->s.ext) o->s.ext->tap = NULL;
    multiloop_deadline_remove(&p->idle);
    luaL_unref(L, LUA_REGISTRYINDEX, cb_ref);
    free(p);
    return luaL_error(L, "not enough memory");
  }
  if (c->serve) multiloop_serve_uncork(c);
  if (o->serve) multiloop_serve_uncork(o);
  c->piped = o->piped = 1;
  if (c->outbound) multiloop_out_disown(c);      /* the pipe holds both now */
  if (o->outbound) multiloop_out_disown(o);
  for (i = 0; i < 2; i++) forward_buffered(p, i);
  for (i = 0; i < 2; i++) {
    multiloop_conn_t *e = p->end[i];
    if (e->s.closing) continue;
    if (e->s.read_ended) multiloop_stream_shutdown(&p->end[1 - i]->s);
    multiloop_stream_resume(&e->s);
    multiloop_stream_start(&e->s);
  }
  if (has_fn) {
    lua_pushboolean(L, 1);
    return 1;
  }
  p->t = t;
  return multiloop_await(L, t, cancel_pipe, p, NULL);
}
