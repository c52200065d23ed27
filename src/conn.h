/*
 * conn.h: what conn.c (the connection object and its callback-style
 * methods) and serve.c (the sequential methods of a `serve` connection)
 * share. Private to those two files.
 *
 * A connection is one full userdata: the struct below, and for a `serve`
 * connection the serve block right after it (a callback connection does not
 * pay for it). The stream (stream.h) is embedded first.
 */
#ifndef MULTILOOP_CONN_H
#define MULTILOOP_CONN_H

#include "stream.h"

#define CONN_MT "multiloop.conn"

/* User values: the callbacks of a callback connection; a serve connection
 * has only the first. */
enum { ON_CLOSE = 1, ON_DATA, ON_END, ON_DRAIN, ON_TIMEOUT, N_USER_VALUES = ON_TIMEOUT };

/* Our own close reasons, beside the stream's libuv errors (stream.h). */
enum { REASON_ERROR = 1, REASON_TIMEOUT, REASON_STOPPED, REASON_PROXY, REASON_RELOAD };

struct multiloop_conn_s {
  multiloop_stream_t s;                /* first: the stream's events get &c->s */
  int ref;                             /* pins the userdata while the handle is open */
  unsigned callbacks : 8;              /* bit n set: user value n is a function */
  unsigned counted : 1;                /* holds a connection slot (slots.c) */
  unsigned serve : 1;                  /* a serve connection: the serve block follows */
  unsigned outbound : 1;               /* made by connect: the out block follows (outbound.c) */
  unsigned pooled : 1;                 /* idle in its pool: any byte or EOF drops it */
  unsigned piped : 1;                  /* in a pipe (pipe.c): the stream's ext->tap is it */
  unsigned proxying : 1;               /* reading its PROXY header: the handler has not run */
  unsigned gen : 1;                    /* its state's generation: worker->gen[gen] (worker.c) */
  multiloop_conn_t *prev, *next;       /* the worker's list of open connections */
  multiloop_deadline_t idle;           /* the idle timeout (conn_idle); serve: the read timeout */
  lua_Integer id;
};

/* A serve connection's sequential state (serve.c). One reader and one writer
 * at a time; what the waiting reader asked for is kept here, so the read
 * event can tell when it is satisfied. */
typedef struct {
  multiloop_thread_t *reader, *writer; /* waiting in receive* / send, or NULL */
  multiloop_deadline_t send_dl;        /* the read timeout is the connection's `idle` entry */
  uint32_t send_ms, read_ms;           /* settimeouts; 0: none (connect's is for outbound) */
  unsigned op : 3;                     /* the waiting reader's pattern: READ_* (serve.c) */
  unsigned inclusive : 1;              /* receiveuntil's option */
  unsigned until_done : 1;             /* scan gave an inclusive reader(size) the pattern (its reader keeps that) */
  unsigned woke : 2;                   /* why the reader was woken: WOKE_* (serve.c) */
  unsigned skip_line : 1;              /* a too-long line's rest is dropped up to its LF */
  uint32_t nqueued;                    /* write requests queued: what send's bound counts too */
  size_t n;                            /* receive(n): n; receiveany: max; reader(size): size */
  size_t scanned;                      /* bytes searched without a match, from the front */
  const char *pat;                     /* receiveuntil's pattern (its reader holds it) */
  size_t patlen;
  size_t send_len;                     /* what the waiting send returns */
} multiloop_serve_t;

/* An outbound connection's block (outbound.c), after the serve block (or
 * after the struct for a callback-style one): the pool it counts in, its
 * place in that pool's idle list while pooled, and how often it was reused. */
typedef struct {
  multiloop_pool_t *pool;              /* counted in pool->active while open, or NULL */
  void *owner;                         /* the socket object using it (outbound.c), or NULL */
  multiloop_conn_t *pprev, *pnext;     /* the pool's idle list (most recent first) */
  multiloop_deadline_t keep_dl;        /* setkeepalive's timeout, while pooled */
  uint32_t reused;                     /* getreusedtimes() */
  uint32_t lease;                      /* +1 each time it goes idle: stale readers see "closed" */
} multiloop_out_t;

#define CONN_SIZE ((sizeof(multiloop_conn_t) + 15) & ~(size_t)15)
#define SERVE_SIZE ((sizeof(multiloop_serve_t) + 15) & ~(size_t)15)
#define SERVE(c) ((multiloop_serve_t *)(void *)((char *)(c) + CONN_SIZE))
#define CONN_OF_SERVE(sv) ((multiloop_conn_t *)(void *)((char *)(sv) - CONN_SIZE))
#define OUT(c) ((multiloop_out_t *)(void *)((char *)(c) + CONN_SIZE + ((c)->serve ? SERVE_SIZE : 0)))
#define CONN_OF_OUT(o, serve) \
  ((multiloop_conn_t *)(void *)((char *)(o) - CONN_SIZE - ((serve) ? SERVE_SIZE : 0)))
#define CONN_WORKER(c) multiloop_stream_worker(&(c)->s)
#define CONN_GEN(c) (&CONN_WORKER(c)->gen[(c)->gen])

/* One queued write: the stream hands `w` back in `written`. */
typedef struct {
  multiloop_stream_write_t w;          /* first */
  int ref;                             /* the Lua string being written, or LUA_NOREF: */
  int cb_ref;                          /* conn:write's callback, or LUA_NOREF */
} multiloop_write_req_t;               /* (the bytes follow it in its block: serve.c) */

/* conn.c's stream events: every connection's handle points at them. */
extern const multiloop_stream_events_t multiloop_conn_events;

/* The connection at argument 1, or a type error. Not luaL_checkudata (a
 * registry lookup by name), nor even a metatable comparison (a push and a
 * compare through the API: about 190 user instructions, measured with
 * callgrind, on every method call): a full userdata at least as large as a
 * connection whose handle's `data` is conn.c's events table is one. Only C
 * code can fill a userdata's bytes, so Lua code cannot forge that; light
 * userdata have no size and fail. */
static inline multiloop_conn_t *multiloop_conn_check(lua_State *L) {
  multiloop_conn_t *c = lua_touserdata(L, 1);
  if (c != NULL && lua_rawlen(L, 1) >= sizeof *c && c->s.h.handle.data == &multiloop_conn_events)
    return c;
  luaL_typeerror(L, 1, CONN_MT);
  return NULL;
}

/* conn.c: a new connection object on top of L, pinned, its stream made (a
 * Unix socket one with is_unix; an outbound one's later, by its connect) but
 * not open: a serve-style one (the serve
 * block) with `serve`, an outbound one (the out block) with `outbound`. Not
 * in the worker's list and with no id until multiloop_conn_opened. Raises
 * only for memory, before anything needs undoing. */
multiloop_conn_t *multiloop_conn_new(lua_State *L, multiloop_worker_t *w, int is_unix, int serve,
                                     int outbound);
/* The stream is open: the connection gets its id and joins the worker's
 * list (stop closes it), with the server's nodelay and keepalive. */
void multiloop_conn_opened(multiloop_conn_t *c);
/* Drops a connection object's ref (made by multiloop_conn_new) in g's
 * registry, counted in g->nconns. */
void multiloop_conn_unpin(multiloop_gen_t *g, int ref);

/* outbound.c, called by conn.c's events for an outbound connection. */
void multiloop_out_closing(multiloop_conn_t *c);
/* A pooled connection's bytes or EOF: it is dropped (closed). */
void multiloop_out_drop(multiloop_conn_t *c);
/* A pipe takes the connection: its socket lets go of it. */
void multiloop_out_disown(multiloop_conn_t *c);
/* The connection of the socket object ("multiloop.tcp") at idx, or NULL. */
multiloop_conn_t *multiloop_sock_conn(lua_State *L, int idx);

/* pipe.c, called by conn.c's events for a piped connection. */
void multiloop_pipe_read(multiloop_conn_t *c, const char *data, size_t len);
void multiloop_pipe_eof(multiloop_conn_t *c);
void multiloop_pipe_drained(multiloop_conn_t *c);
void multiloop_pipe_closing(multiloop_conn_t *c);
void multiloop_pipe_closed(multiloop_conn_t *c, void *pipe);
int multiloop_conn_pipe(lua_State *L);    /* conn:pipe(other [, fn]) */

/* serve.c, called by conn.c's stream events for a serve connection. */
void multiloop_serve_init(multiloop_conn_t *c);
size_t multiloop_serve_read(multiloop_conn_t *c, const char *data, size_t len);
void multiloop_serve_eof(multiloop_conn_t *c);
void multiloop_serve_queued(multiloop_conn_t *c);    /* a write request was queued */
void multiloop_serve_written(multiloop_conn_t *c, int status);
void multiloop_serve_drained(multiloop_conn_t *c);
void multiloop_serve_closing(multiloop_conn_t *c);
/* Sends what serve's sends held back during this read event (serve.c): any
 * write, shutdown or close on a serve connection calls it first. */
void multiloop_serve_uncork(multiloop_conn_t *c);
/* Protected: starts handler.serve(conn), the conn on top of L. */
void multiloop_serve_start(lua_State *L, multiloop_conn_t *c);
/* A timeout argument: an integer from 0 to 2^31-1 ms, or an error naming
 * `who` (serve.c; the sockets' settimeout(s) use it too). */
uint32_t multiloop_check_timeout(lua_State *L, int arg, const char *who);
/* The methods (each with the metatable as upvalue 1). */
extern const luaL_Reg multiloop_serve_methods[];

#endif
