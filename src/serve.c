/*
 * serve.c: the sequential methods of a `serve` connection: receive patterns
 * read from the stream's input buffer, a send that waits while the queue is
 * full, read and send timeouts, and the light thread that runs
 * handler.serve(conn).
 *
 * Runs only on the worker thread. conn.c makes the connection (with the
 * serve block after it: conn.h) and forwards the stream's events here; this
 * file calls the stream (stream.h), the deadlines and the await template
 * (thread.c), never conn.c's internals.
 *
 * Reading. Bytes are scanned where they lie, in C, and one Lua string is made
 * per result, never per fragment (LuaSocket's buffer.c and OpenResty's
 * receive patterns are the models). A method first looks at the input it
 * has: the bytes the stream kept from earlier reads, or, while a read event
 * is handing this connection new bytes, those (the worker's `view`). When
 * the pattern is satisfied it returns at once (the fast path pipelined
 * protocols live on); otherwise it records what it waits for in the serve
 * block, arms its read deadline and awaits. The read event scans the new
 * bytes for the waiting reader and wakes it with its result; the woken
 * thread may go on reading from the same bytes without a copy, and only
 * what is left when the event ends is kept by the stream. A "*l" or an
 * until-pattern remembers how far it has searched, so a long line in small
 * reads costs linear time. Without a reader, reads go on until 64 KiB are
 * kept (then reading pauses until a reader needs more). The peer's EOF
 * wakes the reader with what it finds; a close wakes it on the next turn
 * with nil, "closed" (or "stopped" when the worker stops).
 *
 * Errors follow OpenResty's cosockets: nil, err, partial, where partial is
 * every byte buffered for that read (and consumed): "closed", "timeout",
 * "too long" (a line, an until-pattern or "*a" past receive_limit), and
 * "socket busy reading" / "socket busy writing" for a second reader or writer.
 *
 * Writing: send tries the socket first and queues the rest, pinning the Lua
 * string; it waits only while the queue is over write_high_water, until the
 * stream's `drained` event (or its send timeout). While a read event runs,
 * the sends after its first are held back (the cork: a table of the
 * strings) and go out in one write when the event ends, as Redis writes a
 * read's replies once: answering 16 pipelined requests then costs two
 * writes, not 16. Any other write, shutdown or close on the connection
 * sends them first, so the order never changes.
 *
 * Timeouts are deadline entries (deadline.c): the read timeout is the
 * connection's own `idle` entry (a serve connection has no idle timeout),
 * restarted by each read that waits and touched by each read event that
 * brings bytes; the send timeout is the serve block's, touched by each
 * write that completes. A woken reader's results are pushed by its
 * continuation (read_k) inside its own thread, so no protected call is
 * needed to wake it.
 */
#define _GNU_SOURCE                    /* memmem */
#include <stdlib.h>
#include <string.h>

#include "conn.h"

enum { READ_NONE, READ_LINE, READ_ALL, READ_N, READ_ANY, READ_UNTIL };
/* What a scan of the input found for a reader. */
enum { SCAN_MORE, SCAN_DATA, SCAN_DONE, SCAN_LONG, SCAN_CLOSED };
/* Why a waiting reader was woken (its k, read_k, pushes the results). */
enum { WOKE_NONE, WOKE_FOUND, WOKE_TIMEOUT, WOKE_CLOSED };

/* Bytes kept for no reader before reading pauses. */
#define READ_AHEAD (64 * 1024)
/* settimeout(s): the default (OpenResty's) and the largest (as init.lua's). */
#define DEFAULT_TIMEOUT 60000
#define MAX_TIMEOUT 0x7fffffff
/* What one queued write request costs beyond its bytes: the request (a
 * uv_write_t inside), malloc's header and the registry slot pinning its
 * string. send's bound counts it, or small answers to a client that never
 * reads would hold some 45 times write_high_water in requests. */
#define REQ_COST (sizeof(multiloop_write_req_t) + 2 * sizeof(void *))
/* How deep send's nested tables may go. */
#define SEND_MAX_DEPTH 32
/* Sends held back during one read event: at most this many, of this many
 * bytes in all (then they go out, and the next is held again). */
#define CORK_MAX_N 64
#define CORK_MAX_BYTES (64 * 1024)

static void read_expired(multiloop_deadline_t *d, uint64_t ms);
static void send_expired(multiloop_deadline_t *d, uint64_t ms);

void multiloop_serve_init(multiloop_conn_t *c) {
  multiloop_serve_t *sv = SERVE(c);
  c->serve = 1;
  multiloop_deadline_init(&c->idle, read_expired);
  multiloop_deadline_init(&sv->send_dl, send_expired);
  sv->send_ms = sv->read_ms = DEFAULT_TIMEOUT;
}

/* --- the input --------------------------------------------------------------- */

/* The bytes this connection has for a reader now. */
static const char *input(multiloop_conn_t *c, size_t *len) {
  multiloop_worker_t *w = CONN_WORKER(c);
  if (w->view.conn == c) {
    *len = w->view.len - w->view.used;
    return w->view.p + w->view.used;
  }
  if (c->s.closing) {                      /* its buffer goes with the handle */
    *len = 0;
    return NULL;
  }
  return multiloop_stream_kept(&c->s, len);
}

static void consume(multiloop_conn_t *c, size_t n) {
  multiloop_worker_t *w = CONN_WORKER(c);
  SERVE(c)->scanned = 0;
  if (w->view.conn == c) w->view.used += n;
  else if (!c->s.closing) multiloop_stream_consume(&c->s, n);
}

/* After a "*l" that was too long before its LF arrived, the rest of that
 * line, up to and with its LF, is dropped as it comes, before any read sees
 * it: so what follows a too-long line does not depend on how reads split it
 * (when the LF came with it, scan consumed the whole line at once). */
static void drop_line_tail(multiloop_conn_t *c) {
  size_t len;
  const char *p = input(c, &len), *lf;
  if (len == 0) return;
  lf = memchr(p, '\n', len);
  if (lf != NULL) SERVE(c)->skip_line = 0;
  consume(c, lf != NULL ? (size_t)(lf - p) + 1 : len);
}

/* The longest end of p[0..len) that begins the pattern (shorter than it). */
static size_t pattern_start_at_end(const char *p, size_t len, const char *pat, size_t patlen) {
  size_t k = patlen - 1 < len ? patlen - 1 : len;
  for (; k > 0; k--)
    if (memcmp(p + len - k, pat, k) == 0) return k;
  return 0;
}

static int scan_until(multiloop_serve_t *sv, const char *p, size_t len, size_t limit,
                      size_t *ret, size_t *used) {
  const char *at = NULL;
  if (len >= sv->patlen && len - sv->scanned >= sv->patlen)
    at = memmem(p + sv->scanned, len - sv->scanned, sv->pat, sv->patlen);
  if (at != NULL) {
    size_t i = (size_t)(at - p);
    if (sv->n == 0) {                      /* reader(): all of it up to the pattern */
      *used = i + sv->patlen;
      if (i > limit) {                     /* as if the pattern had come later */
        *ret = i;
        return SCAN_LONG;
      }
      *ret = sv->inclusive ? i + sv->patlen : i;
      return SCAN_DATA;
    }
    if (i > 0) {                           /* reader(size): a chunk before it */
      *ret = *used = i < sv->n ? i : sv->n;
      return SCAN_DATA;
    }
    *used = sv->patlen;                    /* the pattern itself is next */
    if (!sv->inclusive) return SCAN_DONE;
    *ret = sv->patlen;
    sv->until_done = 1;                    /* and the call after returns nil, nil */
    return SCAN_DATA;
  }
  sv->scanned = len >= sv->patlen ? len - sv->patlen + 1 : 0;
  /* reader(size): size bytes once that many cannot be the pattern's start
   * (as OpenResty's, fewer only when the pattern comes sooner). */
  if (sv->n > 0 && len >= sv->n && len - pattern_start_at_end(p, len, sv->pat, sv->patlen) >= sv->n) {
    *ret = *used = sv->n;
    return SCAN_DATA;
  }
  return SCAN_MORE;
}

/* Does the input satisfy the reader's pattern? With `ended` (the peer sent
 * EOF) it always decides. *ret: bytes to return; *used: bytes to consume. */
static int scan(multiloop_conn_t *c, const char *p, size_t len, int ended, size_t *ret,
                size_t *used) {
  multiloop_serve_t *sv = SERVE(c);
  size_t limit = CONN_WORKER(c)->cfg->receive_limit;  /* bytes a line, a part or "*a" may have */
  int found = SCAN_MORE;
  switch (sv->op) {
    case READ_LINE: {
      const char *lf = len > sv->scanned ? memchr(p + sv->scanned, '\n', len - sv->scanned) : NULL;
      if (lf != NULL) {
        size_t i = (size_t)(lf - p);
        *used = i + 1;                     /* the line and its LF, even when too long */
        if (i > limit) {                   /* as if its LF had come in a later read */
          *ret = i;
          return SCAN_LONG;
        }
        *ret = i > 0 && p[i - 1] == '\r' ? i - 1 : i;
        return SCAN_DATA;
      }
      sv->scanned = len;
      break;
    }
    case READ_ALL:
      if (len > limit) break;              /* too long, even with the EOF here */
      if (ended) {
        *ret = *used = len;
        return SCAN_DATA;
      }
      break;
    case READ_N:
      if (len >= sv->n) {
        *ret = *used = sv->n;
        return SCAN_DATA;
      }
      if (!ended) return SCAN_MORE;        /* no limit: the code asked for n */
      break;
    case READ_ANY:
      if (len > 0) {
        *ret = *used = len < sv->n ? len : sv->n;
        return SCAN_DATA;
      }
      break;
    case READ_UNTIL:
      if ((found = scan_until(sv, p, len, limit, ret, used)) != SCAN_MORE) return found;
      break;
  }
  /* Nothing found: bytes past the limit are too long (whatever else the
   * peer does); at EOF what is here is the partial. An until-pattern's
   * first patlen - 1 bytes may be here after a part of exactly the limit:
   * until more than that, or the EOF, it is not too long, as when the
   * pattern comes whole. */
  *ret = *used = len;
  if (sv->op == READ_UNTIL && !ended && len > limit && len - limit < sv->patlen) return SCAN_MORE;
  if (len > limit && sv->op != READ_ANY && sv->op != READ_N) {
    if (sv->op == READ_LINE) sv->skip_line = 1;   /* its LF has not come: drop up to it */
    return SCAN_LONG;
  }
  if (ended) return SCAN_CLOSED;
  return SCAN_MORE;
}

/* Pushes what scan found (it said other than SCAN_MORE), and consumes it.
 * A memory error raises before anything is consumed. */
static int push_found(lua_State *L, multiloop_conn_t *c, const char *p, int found, size_t ret,
                      size_t used) {
  switch (found) {
    case SCAN_DATA:
      lua_pushlstring(L, p, ret);
      consume(c, used);
      return 1;
    case SCAN_DONE:
      consume(c, used);
      lua_pushnil(L);
      lua_pushnil(L);
      return 2;
    default:
      lua_pushnil(L);
      lua_pushstring(L, found == SCAN_LONG ? "too long" : "closed");
      lua_pushlstring(L, p, ret);
      consume(c, used);
      return 3;
  }
}

/* --- waking a reader or a writer -------------------------------------------- */

static const char *closed_word(multiloop_conn_t *c) {
  return c->s.closing && c->s.reason == REASON_STOPPED ? "stopped" : "closed";
}

static int push_timeout(lua_State *L, multiloop_conn_t *c) {
  size_t len;
  const char *p = input(c, &len);
  lua_pushnil(L);
  lua_pushliteral(L, "timeout");
  lua_pushlstring(L, p ? p : "", len);
  consume(c, len);
  return 3;
}

static int push_read_closed(lua_State *L, multiloop_conn_t *c) {
  lua_pushnil(L);
  lua_pushstring(L, closed_word(c));
  lua_pushliteral(L, "");
  return 3;
}

static int push_send_closed(lua_State *L, void *ev) {
  lua_pushnil(L);
  lua_pushstring(L, closed_word(ev));
  return 2;
}

static int push_send_timeout(lua_State *L, void *ev) {
  (void)ev;
  lua_pushnil(L);
  lua_pushliteral(L, "timeout");
  return 2;
}

/* Takes the reader off the connection: it is about to be woken. Its read
 * deadline is left running: the next read that waits restarts it in O(1),
 * and one that expires with no reader waiting does nothing. */
static multiloop_thread_t *take_reader(multiloop_conn_t *c) {
  multiloop_serve_t *sv = SERVE(c);
  multiloop_thread_t *t = sv->reader;
  sv->reader = NULL;
  sv->op = READ_NONE;
  return t;
}

static multiloop_thread_t *take_writer(multiloop_serve_t *sv) {
  multiloop_thread_t *t = sv->writer;
  sv->writer = NULL;
  multiloop_deadline_remove(&sv->send_dl);
  return t;
}

/* From a loop callback: wakes the reader with what scan found, which its
 * read_k pushes from the worker's view at once. */
static void wake_reader(multiloop_conn_t *c, int found, size_t ret, size_t used) {
  multiloop_worker_t *w = CONN_WORKER(c);
  multiloop_thread_t *t = take_reader(c);
  w->view.found = found;
  w->view.ret = ret;
  w->view.consume = used;
  SERVE(c)->woke = WOKE_FOUND;
  multiloop_thread_wake(t, 0, NULL, NULL);
}

/* The reader's continuation, in its own thread: its results, by why it was
 * woken (anything else resuming it counts as a close). */
static int read_k(lua_State *L, int status, lua_KContext ctx) {
  multiloop_conn_t *c = (multiloop_conn_t *)ctx;
  multiloop_worker_t *w = CONN_WORKER(c);
  int woke = SERVE(c)->woke;
  size_t len;
  const char *p;
  (void)status;
  SERVE(c)->woke = WOKE_NONE;
  switch (woke) {
    case WOKE_FOUND:
      p = input(c, &len);
      return push_found(L, c, p, w->view.found, w->view.ret, w->view.consume);
    case WOKE_TIMEOUT:
      return push_timeout(L, c);
    default:
      return push_read_closed(L, c);
  }
}

static void cancel_read(multiloop_thread_t *t, void *data) {
  (void)t;
  take_reader(data);
  multiloop_deadline_remove(&((multiloop_conn_t *)data)->idle);
}

static void cancel_send(multiloop_thread_t *t, void *data) {
  (void)t;
  take_writer(SERVE((multiloop_conn_t *)data));
}

static void read_expired(multiloop_deadline_t *d, uint64_t ms) {
  multiloop_conn_t *c = (multiloop_conn_t *)(void *)((char *)d - offsetof(multiloop_conn_t, idle));
  (void)ms;
  if (SERVE(c)->reader) {
    multiloop_thread_t *t = take_reader(c);
    SERVE(c)->woke = WOKE_TIMEOUT;
    multiloop_thread_wake(t, 0, NULL, NULL);
  }
}

static void send_expired(multiloop_deadline_t *d, uint64_t ms) {
  multiloop_serve_t *sv = (multiloop_serve_t *)(void *)((char *)d - offsetof(multiloop_serve_t, send_dl));
  multiloop_conn_t *c = CONN_OF_SERVE(sv);
  (void)ms;
  if (sv->writer) multiloop_thread_wake(take_writer(sv), 0, push_send_timeout, c);
}

/* --- sends held back during a read event -------------------------------------- */

/* gcc 12's -fanalyzer reports the queued write that uncork mallocs as leaked
 * once it is handed to the stream (multiloop_stream_write keeps it in the
 * handle's write queue, and conn.c frees it when written), at the next
 * statements of uncork's callers: the same false positive as stream.c's
 * input buffer. ASan and valgrind see no leak (serve_spec's held-send
 * cases queue such writes). So the check is off from here to the end of
 * serve_send, and only that one. */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wanalyzer-malloc-leak"
#endif

/* Writes what sends held back for c, in one write (writev), and forgets
 * them. Allocates nothing in Lua, so it runs from the read event itself: the
 * strings stay in the cork table until they are sent; what the socket does
 * not take now is copied after the request of one queued write. */
void multiloop_serve_uncork(multiloop_conn_t *c) {
  multiloop_worker_t *w = CONN_WORKER(c);
  multiloop_gen_t *g = CONN_GEN(c);
  lua_State *L = g->L;
  uv_buf_t bufs[CORK_MAX_N];
  size_t total = 0, done, at;
  int i, n = w->view.cork_n;
  if (n == 0 || w->view.cork_conn != c) return;
  w->view.cork_n = 0;
  w->view.cork_bytes = 0;
  w->view.cork_conn = NULL;
  if (!lua_checkstack(L, 2)) {                       /* cannot even look: drop the connection */
    multiloop_stream_close(&c->s, UV_ENOMEM);
    return;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, g->cork_ref);
  for (i = 0; i < n; i++) {
    size_t len;
    lua_rawgeti(L, -1, i + 1);
    bufs[i].base = (char *)(uintptr_t)lua_tolstring(L, -1, &len);  /* strings: no conversion */
    bufs[i].len = len;
    total += len;
    lua_pop(L, 1);                                   /* the table still holds it */
  }
  done = c->s.closing ? total : 0;
  if (!c->s.closing) {
    int sent = multiloop_stream_try_writev(&c->s, bufs, (unsigned)n);
    done = sent < 0 ? total : (size_t)sent;          /* an error closed the stream */
  }
  if (done < total) {                                /* the rest, copied, queued */
    /* One block: the request, then the bytes (freed with it, conn.c). */
    multiloop_write_req_t *wr = malloc(sizeof *wr + (total - done));
    if (wr == NULL) {
      multiloop_stream_close(&c->s, UV_ENOMEM);
    } else {
      char *rest = (char *)(wr + 1);
      size_t off = 0;
      for (i = 0, at = 0; i < n; at += bufs[i].len, i++) {
        size_t from = done > at ? done - at : 0;
        if (from < bufs[i].len) {
          memcpy(rest + off, bufs[i].base + from, bufs[i].len - from);
          off += bufs[i].len - from;
        }
      }
      wr->ref = wr->cb_ref = LUA_NOREF;
      if (multiloop_stream_write(&c->s, &wr->w, rest, off) != 0) free(wr);
      else SERVE(c)->nqueued++;
    }
  }
  for (i = 1; i <= n; i++) {                         /* existing slots: no allocation */
    lua_pushnil(L);
    lua_rawseti(L, -2, i);
  }
  lua_pop(L, 1);
}

/* Holds a send back (the string at `idx` of L) while its connection's read
 * event runs, if there is room: returns 1, or 0 to send it now. */
static int cork(lua_State *L, multiloop_conn_t *c, int idx, size_t len) {
  multiloop_worker_t *w = CONN_WORKER(c);
  if (w->view.conn != c || (w->view.cork_n > 0 && w->view.cork_conn != c)) return 0;
  if (w->view.sends++ == 0) return 0;                /* one answer per event: no holding */
  if (w->view.cork_n == CORK_MAX_N || w->view.cork_bytes + len > CORK_MAX_BYTES) {
    multiloop_serve_uncork(c);                       /* full: these go, this one waits */
    if (c->s.closing || len > CORK_MAX_BYTES) return 0;  /* too big to hold: it goes now */
  }
  multiloop_gen_t *g = CONN_GEN(c);
  if (g->cork_ref == 0) {
    lua_createtable(L, CORK_MAX_N, 0);
    g->cork_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, g->cork_ref);
  lua_pushvalue(L, idx);
  lua_rawseti(L, -2, w->view.cork_n + 1);            /* preallocated: no growth */
  lua_pop(L, 1);
  w->view.cork_n++;
  w->view.cork_bytes += len;
  w->view.cork_conn = c;
  return 1;
}

/* --- the stream's events, from conn.c ------------------------------------------ */

size_t multiloop_serve_read(multiloop_conn_t *c, const char *data, size_t len) {
  multiloop_worker_t *w = CONN_WORKER(c);
  multiloop_serve_t *sv = SERVE(c);
  size_t used = 0, ret = 0;
  w->view.conn = c;
  w->view.p = data;
  w->view.len = len;
  w->view.used = 0;
  w->view.sends = 0;
  if (sv->skip_line) drop_line_tail(c);
  if (sv->reader) {
    size_t n;
    const char *p = input(c, &n);
    int found = scan(c, p, n, 0, &ret, &used);
    if (found != SCAN_MORE) wake_reader(c, found, ret, used);
    else multiloop_deadline_touch(w, &c->idle);   /* the timeout counts from progress */
  }
  if (w->view.cork_n > 0) multiloop_serve_uncork(c);   /* this event's sends, in one write */
  used = w->view.used;
  w->view.conn = NULL;
  if (!c->s.closing && sv->reader == NULL && len - used >= READ_AHEAD)
    multiloop_stream_pause(&c->s);         /* a reader that needs more resumes it */
  return used;
}

/* The peer sent EOF: the reader gets what it finds (its data, or nil,
 * "closed", partial). The connection stays open for writing. */
void multiloop_serve_eof(multiloop_conn_t *c) {
  multiloop_serve_t *sv = SERVE(c);
  size_t len, ret = 0, used = 0;
  const char *p;
  int found;
  if (sv->reader == NULL) return;
  if (sv->skip_line) drop_line_tail(c);
  p = input(c, &len);
  found = scan(c, p, len, 1, &ret, &used);
  wake_reader(c, found, ret, used);
}

/* What the queue holds, requests counted: send waits while this is at
 * write_high_water or more, until it falls to write_low_water. */
static size_t send_cost(multiloop_conn_t *c) {
  return multiloop_stream_queued(&c->s) + (size_t)SERVE(c)->nqueued * REQ_COST;
}

/* The waiting writer returns its byte count once the queue is low enough. */
static void wake_writer_if_low(multiloop_conn_t *c) {
  multiloop_serve_t *sv = SERVE(c);
  multiloop_thread_t *t;
  if (sv->writer == NULL || send_cost(c) > CONN_WORKER(c)->cfg->write_low_water) return;
  t = take_writer(sv);
  lua_pushinteger(multiloop_thread_co(t), (lua_Integer)sv->send_len);
  multiloop_thread_wake(t, 1, NULL, NULL);
}

void multiloop_serve_queued(multiloop_conn_t *c) { SERVE(c)->nqueued++; }

/* A queued write is done (its request freed). The stream's `drained`
 * counts bytes only: with many small requests the writer is woken here. */
void multiloop_serve_written(multiloop_conn_t *c, int status) {
  multiloop_serve_t *sv = SERVE(c);
  if (sv->nqueued > 0) sv->nqueued--;
  if (sv->writer == NULL || status != 0) return;
  multiloop_deadline_touch(CONN_WORKER(c), &sv->send_dl);
  wake_writer_if_low(c);
}

void multiloop_serve_drained(multiloop_conn_t *c) { wake_writer_if_low(c); }

/* Whoever closed it may be a method of another thread: the waiting ones
 * are woken on the next turn of the loop, never from here. */
void multiloop_serve_closing(multiloop_conn_t *c) {
  multiloop_serve_t *sv = SERVE(c);
  multiloop_serve_uncork(c);                   /* closing: nothing is written, all is let go */
  if (sv->reader) {
    multiloop_thread_t *t = take_reader(c);
    sv->woke = WOKE_CLOSED;
    multiloop_thread_ready(t, NULL, NULL);
  }
  if (sv->writer) multiloop_thread_ready(take_writer(sv), push_send_closed, c);
}

/* --- the serve thread -------------------------------------------------------- */

/* serve(conn) returned (ok): close once the writes are out; it failed: close
 * at once, as a callback error does. */
static void serve_ended(void *data, int ok) {
  multiloop_conn_t *c = data;
  multiloop_serve_uncork(c);                   /* what it sent last goes before the close */
  if (ok) multiloop_stream_close_flushed(&c->s);
  else multiloop_stream_close(&c->s, REASON_ERROR);
}

void multiloop_serve_start(lua_State *L, multiloop_conn_t *c) {
  multiloop_worker_t *w = CONN_WORKER(c);
  lua_rawgeti(L, LUA_REGISTRYINDEX, CONN_GEN(c)->handler_ref);   /* conn handler */
  lua_getfield(L, -1, "serve");                        /* conn handler serve */
  lua_pushvalue(L, -3);                                /* conn handler serve conn */
  multiloop_thread_start(L, w, "serve", &c->id, serve_ended, c);
  lua_pop(L, 1);
}

/* --- the methods --------------------------------------------------------------- */

/* Also settles the calling thread: one resumed by hand out of a receive
 * is no longer this connection's reader, so it is not "busy" with itself. */
static multiloop_conn_t *check_serve(lua_State *L, const char *who) {
  multiloop_conn_t *c = multiloop_conn_check(L);
  if (!c->serve)
    luaL_error(L, "%s: only on a serve connection (a callback connection's bytes go to its "
                  "on_data; a handler with serve gets connections that read this way)", who);
  multiloop_thread_settle(L);
  return c;
}

static int nil_err(lua_State *L, const char *what) {
  lua_pushnil(L);
  lua_pushstring(L, what);
  return 2;
}

/* The reader's pattern is in the serve block: returns its result now, or
 * awaits it. */
static int do_read(lua_State *L, multiloop_conn_t *c, const char *who, lua_KFunction k) {
  multiloop_serve_t *sv = SERVE(c);
  multiloop_worker_t *w = CONN_WORKER(c);
  size_t len, ret = 0, used = 0;
  const char *p;
  int found, op = sv->op;
  multiloop_thread_t *t;
  sv->scanned = 0;
  if (c->s.closing) {
    sv->op = READ_NONE;
    return push_read_closed(L, c);
  }
  if (sv->skip_line) drop_line_tail(c);
  p = input(c, &len);
  found = scan(c, p, len, c->s.read_ended, &ret, &used);
  if (found != SCAN_MORE) {
    sv->op = READ_NONE;
    return push_found(L, c, p, found, ret, used);
  }
  sv->op = READ_NONE;                      /* in case the next line raises */
  t = multiloop_thread_self(L, who);
  sv->op = op;
  if (multiloop_deadline_restart(w, &c->idle, sv->read_ms) != 0) {
    sv->op = READ_NONE;
    return luaL_error(L, "not enough memory");
  }
  sv->reader = t;
  multiloop_stream_resume(&c->s);          /* if read-ahead had paused it */
  return multiloop_await(L, t, cancel_read, c, k);
}

/* conn:receive([pattern]): "*l" (the default), "*a", or a byte count. */
static int serve_receive(lua_State *L) {
  multiloop_conn_t *c = check_serve(L, "conn:receive");
  multiloop_serve_t *sv = SERVE(c);
  int op = -1, type = lua_type(L, 2);
  lua_Integer n = 0;
  if (type == LUA_TNUMBER) {                 /* the common cases first: n, then "*l" */
    int isint;
    n = lua_tointegerx(L, 2, &isint);
    if (!isint || n < 0)
      return luaL_error(L, "conn:receive: a byte count must be a non-negative integer (got %s)",
                        luaL_tolstring(L, 2, NULL));
    op = READ_N;
  } else if (type == LUA_TSTRING) {
    size_t len;
    const char *pat = lua_tolstring(L, 2, &len);
    const char *p = len == 2 && pat[0] == '*' ? pat + 1 : len == 1 ? pat : "";
    if (*p == 'l') op = READ_LINE;
    else if (*p == 'a') op = READ_ALL;
  } else if (type == LUA_TNONE || type == LUA_TNIL) {
    op = READ_LINE;
  }
  if (op < 0)
    return luaL_error(L, "conn:receive: the pattern must be \"*l\", \"*a\" or a byte count "
                         "(got %s)", type == LUA_TSTRING ? lua_pushfstring(L, "'%s'", lua_tostring(L, 2))
                                                         : luaL_typename(L, 2));
  if (sv->reader) return nil_err(L, "socket busy reading");
  if (op == READ_N && n == 0) {
    lua_pushliteral(L, "");
    return 1;
  }
  sv->op = (unsigned)op;
  sv->n = (size_t)n;
  return do_read(L, c, "conn:receive", read_k);
}

/* conn:receiveany(max): at least one byte, at most max. */
static int serve_receiveany(lua_State *L) {
  multiloop_conn_t *c = check_serve(L, "conn:receiveany");
  multiloop_serve_t *sv = SERVE(c);
  int isint = 0;
  lua_Integer max = lua_type(L, 2) == LUA_TNUMBER ? lua_tointegerx(L, 2, &isint) : 0;
  if (!isint || max < 1)
    return luaL_error(L, "conn:receiveany: max must be a positive integer (got %s)",
                      lua_type(L, 2) == LUA_TNUMBER ? luaL_tolstring(L, 2, NULL)
                                                    : luaL_typename(L, 2));
  if (sv->reader) return nil_err(L, "socket busy reading");
  sv->op = READ_ANY;
  sv->n = (size_t)max;
  return do_read(L, c, "conn:receiveany", read_k);
}

/* The function receiveuntil returns: upvalues conn, pattern, flags. The
 * flags are the reader's own: a connection may have several readers, and
 * "the pattern was returned, the next call gives nil, nil" belongs to the
 * reader that returned it. */
enum { UNTIL_INCLUSIVE = 1, UNTIL_DONE = 2 };

/* A reader's call has its result (the top n values): an inclusive
 * reader(size) that returned the pattern marks its closure, whose next call
 * returns nil, nil. Runs in until_reader or its continuation, where the
 * upvalues are the reader's. No allocation. */
static int until_result(lua_State *L, multiloop_serve_t *sv, int n) {
  if (sv->until_done) {
    sv->until_done = 0;
    lua_pushinteger(L, lua_tointeger(L, lua_upvalueindex(3)) | UNTIL_DONE);
    lua_replace(L, lua_upvalueindex(3));
  }
  return n;
}

static int until_k(lua_State *L, int status, lua_KContext ctx) {
  return until_result(L, SERVE((multiloop_conn_t *)ctx), read_k(L, status, ctx));
}

static int until_reader(lua_State *L) {
  multiloop_conn_t *c = lua_touserdata(L, lua_upvalueindex(1));
  multiloop_serve_t *sv = SERVE(c);
  lua_Integer size = 0, flags;
  /* An outbound connection that went to its pool since (and may serve
   * another socket now) is not this reader's any more. */
  if (c->outbound && (uint32_t)lua_tointeger(L, lua_upvalueindex(4)) != OUT(c)->lease)
    return nil_err(L, "closed");
  if (!lua_isnoneornil(L, 1)) {
    int isint = 0;
    size = lua_type(L, 1) == LUA_TNUMBER ? lua_tointegerx(L, 1, &isint) : 0;
    if (!isint || size < 1)
      return luaL_error(L, "receiveuntil's reader: size must be a positive integer (got %s)",
                        lua_type(L, 1) == LUA_TNUMBER ? luaL_tolstring(L, 1, NULL)
                                                      : luaL_typename(L, 1));
  }
  multiloop_thread_settle(L);
  if (sv->reader) return nil_err(L, "socket busy reading");
  flags = lua_tointeger(L, lua_upvalueindex(3));
  if (flags & UNTIL_DONE) {                /* this reader(size) returned the pattern */
    lua_pushinteger(L, flags & ~UNTIL_DONE);
    lua_replace(L, lua_upvalueindex(3));
    lua_pushnil(L);
    lua_pushnil(L);
    return 2;
  }
  sv->op = READ_UNTIL;
  sv->n = (size_t)size;
  sv->pat = lua_tolstring(L, lua_upvalueindex(2), &sv->patlen);  /* held by this closure */
  sv->inclusive = (unsigned)(flags & UNTIL_INCLUSIVE);
  sv->until_done = 0;                      /* a thread that died before taking it left one */
  return until_result(L, sv, do_read(L, c, "receiveuntil's reader", until_k));
}

/* conn:receiveuntil(pattern [, { inclusive = bool }]) -> reader([size]). */
static int serve_receiveuntil(lua_State *L) {
  size_t len;
  int inclusive = 0;
  multiloop_conn_t *c = check_serve(L, "conn:receiveuntil");
  if (lua_type(L, 2) != LUA_TSTRING || (lua_tolstring(L, 2, &len), len == 0))
    return luaL_error(L, "conn:receiveuntil: the pattern must be a non-empty string (got %s)",
                      lua_type(L, 2) == LUA_TSTRING ? "an empty string" : luaL_typename(L, 2));
  if (!lua_isnoneornil(L, 3)) {
    if (!lua_istable(L, 3))
      return luaL_error(L, "conn:receiveuntil: options must be a table (got %s)",
                        luaL_typename(L, 3));
    lua_getfield(L, 3, "inclusive");
    if (!lua_isnil(L, -1) && !lua_isboolean(L, -1))
      return luaL_error(L, "conn:receiveuntil: option 'inclusive' must be a boolean (got %s)",
                        luaL_typename(L, -1));
    inclusive = lua_toboolean(L, -1);
  }
  lua_settop(L, 2);
  lua_pushinteger(L, inclusive ? UNTIL_INCLUSIVE : 0);
  lua_pushinteger(L, c->outbound ? (lua_Integer)OUT(c)->lease : 0);
  lua_pushcclosure(L, until_reader, 4);
  return 1;
}

static void changed(lua_State *L) {
  luaL_error(L, "conn:send: the table changed while it was being sent");
}

/* An integer's decimal digits into buf (at least 21 bytes), as Lua's
 * tostring writes them: their count. Without a Lua string or snprintf: a
 * request table of lua-resty-redis has a length per argument, and measuring
 * and copying each through lua_tolstring cost about 4,200 instructions per
 * GET (callgrind). */
static size_t int_digits(lua_Integer v, char *buf) {
  char tmp[24];
  size_t n = 0, i;
  lua_Unsigned u = v < 0 ? 0u - (lua_Unsigned)v : (lua_Unsigned)v;
  do {
    tmp[n++] = (char)('0' + (int)(u % 10));
    u /= 10;
  } while (u > 0);
  if (v < 0) tmp[n++] = '-';
  for (i = 0; i < n; i++) buf[i] = tmp[n - 1 - i];
  return n;
}

/* send's argument at idx: a string, a number, or an array of them (nested).
 * With out == NULL, returns its length, raising naming what it cannot send;
 * then again with room for that length, copies it to out, at most `room`
 * bytes. The two walks can differ: a float's conversion allocates, and the
 * collector may run a finalizer (Lua code) that changes the tables in
 * between; the copy then raises rather than write past what was measured. */
static size_t add_piece(lua_State *L, int idx, char *out, size_t room, int depth) {
  switch (lua_type(L, idx)) {
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) {
        char digits[24];
        size_t n = int_digits(lua_tointeger(L, idx), digits);
        if (out && n > room) changed(L);
        if (out) memcpy(out, digits, n);
        return n;
      }
      /* a float as tostring writes it */
      /* fall through */
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, idx, &len);   /* a number's copy on the stack */
      if (out && len > room) changed(L);
      if (out) memcpy(out, s, len);
      return len;
    }
    case LUA_TTABLE: {
      lua_Integer i, n = (lua_Integer)lua_rawlen(L, idx);
      size_t total = 0;
      if (depth >= SEND_MAX_DEPTH)
        luaL_error(L, "conn:send: tables nested more than %d deep", SEND_MAX_DEPTH);
      luaL_checkstack(L, 2, "conn:send: tables nested too deep");
      for (i = 1; i <= n; i++) {
        size_t len;
        lua_rawgeti(L, idx, i);
        len = add_piece(L, lua_gettop(L), out ? out + total : NULL, out ? room - total : 0,
                        depth + 1);
        lua_pop(L, 1);
        if (len > SIZE_MAX / 2 - total) luaL_error(L, "conn:send: data too long");
        total += len;
      }
      return total;
    }
    default:
      return (size_t)luaL_error(L, "conn:send: data must be a string, a number or an array "
                                   "of them (found %s)", luaL_typename(L, idx));
  }
}

/* conn:send(data) -> bytes | nil, err. */
static int serve_send(lua_State *L) {
  multiloop_conn_t *c = check_serve(L, "conn:send");
  multiloop_serve_t *sv = SERVE(c);
  multiloop_worker_t *w = CONN_WORKER(c);
  multiloop_write_req_t *wr;
  multiloop_thread_t *t = NULL;
  const char *data;
  size_t len, off = 0;
  int n, rc;
  if (lua_type(L, 2) == LUA_TTABLE) {        /* one string: measured, then copied */
    luaL_Buffer b;
    size_t total = add_piece(L, 2, NULL, 0, 0);
    char *out = luaL_buffinitsize(L, &b, total);
    /* no buffer call between: out stays put; fewer bytes than measured
     * would send what the buffer held before */
    if (add_piece(L, 2, out, total, 0) != total) changed(L);
    luaL_pushresultsize(&b, total);
    lua_replace(L, 2);
  } else if (lua_type(L, 2) != LUA_TSTRING && lua_type(L, 2) != LUA_TNUMBER) {
    return luaL_error(L, "conn:send: data must be a string, a number or an array of them "
                         "(got %s)", luaL_typename(L, 2));
  }
  data = lua_tolstring(L, 2, &len);
  lua_settop(L, 2);
  if (sv->writer) return nil_err(L, "socket busy writing");
  if (c->s.closing || c->s.shutdown_requested) {
    lua_pushnil(L);
    lua_pushstring(L, closed_word(c));
    return 2;
  }
  if (len > UINT32_MAX) return luaL_error(L, "conn:send: data too long for one send (4 GiB at most)");
  if (len == 0) {
    lua_pushinteger(L, 0);
    return 1;
  }
  /* Would this have to wait? Then it must be able to, before anything is
   * queued: a send that raises has sent nothing. */
  if (send_cost(c) + (w->view.cork_conn == c ? w->view.cork_bytes : 0) + len >=
      w->cfg->write_high_water)
    t = multiloop_thread_self(L, "conn:send");
  else if (w->view.conn == c && cork(L, c, 2, len)) {  /* goes out as the read event ends */
    lua_pushinteger(L, (lua_Integer)len);
    return 1;
  }
  if (w->view.cork_n > 0) {                            /* what was held goes first */
    multiloop_serve_uncork(c);
    if (c->s.closing) return nil_err(L, closed_word(c));
  }
  n = multiloop_stream_try_write(&c->s, data, len);    /* the cheap way first */
  if (n < 0) return nil_err(L, closed_word(c));           /* the stream closed */
  off = (size_t)n;
  if (off < len) {
    int ref;
    lua_pushvalue(L, 2);
    ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if ((wr = malloc(sizeof *wr)) == NULL) {
      luaL_unref(L, LUA_REGISTRYINDEX, ref);
      return luaL_error(L, "not enough memory");
    }
    wr->ref = ref;
    wr->cb_ref = LUA_NOREF;
    if ((rc = multiloop_stream_write(&c->s, &wr->w, data + off, len - off)) != 0) {
      luaL_unref(L, LUA_REGISTRYINDEX, ref);
      free(wr);
      return nil_err(L, closed_word(c));
    }
    sv->nqueued++;
  }
  /* below_high_water first: over it, the stream's `drained` will follow. */
  if (t == NULL || (multiloop_stream_below_high_water(&c->s) &&
                    send_cost(c) < w->cfg->write_high_water)) {
    lua_pushinteger(L, (lua_Integer)len);
    return 1;
  }
  if (sv->send_ms > 0 && multiloop_deadline_set(w, &sv->send_dl, sv->send_ms) != 0)
    return luaL_error(L, "not enough memory");
  sv->writer = t;
  sv->send_len = len;
  return multiloop_await(L, t, cancel_send, c, NULL);
}
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC diagnostic pop
#endif

/* conn:dirty(): true while received bytes wait unread (LuaSocket's name):
 * a server answering pipelined requests can hold its replies back while
 * more requests are already here, and send them together. */
static int serve_dirty(lua_State *L) {
  multiloop_conn_t *c = check_serve(L, "conn:dirty");
  size_t len;
  if (SERVE(c)->skip_line) drop_line_tail(c);
  input(c, &len);
  lua_pushboolean(L, len > 0);
  return 1;
}

uint32_t multiloop_check_timeout(lua_State *L, int arg, const char *who) {
  int isint = 0;
  lua_Integer ms = lua_type(L, arg) == LUA_TNUMBER ? lua_tointegerx(L, arg, &isint) : 0;
  if (!isint || ms < 0 || ms > MAX_TIMEOUT)
    luaL_error(L, "%s: a timeout must be an integer from 0 to %d ms (got %s)", who, MAX_TIMEOUT,
               lua_type(L, arg) == LUA_TNUMBER ? luaL_tolstring(L, arg, NULL)
                                               : luaL_typename(L, arg));
  return (uint32_t)ms;
}

/* conn:settimeout(ms): connect, send and read; 0: none. */
static int serve_settimeout(lua_State *L) {
  multiloop_conn_t *c = check_serve(L, "conn:settimeout");
  multiloop_serve_t *sv = SERVE(c);
  sv->send_ms = sv->read_ms = multiloop_check_timeout(L, 2, "conn:settimeout");
  return 0;
}

/* conn:settimeouts(connect, send, read). */
static int serve_settimeouts(lua_State *L) {
  multiloop_conn_t *c = check_serve(L, "conn:settimeouts");
  multiloop_serve_t *sv = SERVE(c);
  uint32_t sms;
  multiloop_check_timeout(L, 2, "conn:settimeouts");   /* connect's: for outbound connections */
  sms = multiloop_check_timeout(L, 3, "conn:settimeouts");
  sv->read_ms = multiloop_check_timeout(L, 4, "conn:settimeouts");
  sv->send_ms = sms;
  return 0;
}

const luaL_Reg multiloop_serve_methods[] = {
  { "receive", serve_receive },
  { "receiveany", serve_receiveany },
  { "receiveuntil", serve_receiveuntil },
  { "send", serve_send },
  { "dirty", serve_dirty },
  { "settimeout", serve_settimeout },
  { "settimeouts", serve_settimeouts },
  { NULL, NULL }
};
