/*
 * stream.c: a connection's byte stream: its handle, the read, write,
 * shutdown and close state machine, backpressure, the optional input
 * buffer, and the plain transport (TCP or Unix socket over libuv).
 *
 * Runs only on the worker thread whose loop the handle is on. The stream is
 * embedded in its owner (conn.c) and reports to it through the events table
 * (stream.h) held in the handle's `data`; it never calls its owner by name,
 * and knows nothing of Lua, deadlines or connection slots. Its owner frees
 * the memory after the `closed` event; the stream frees only what it
 * malloc'd itself: the `ext` block with its input buffer (in the close
 * callback, before `closed`) and shutdown requests.
 *
 * Reads land in the worker's one read buffer and go to the owner at once;
 * only bytes the owner leaves unconsumed are copied into a per-stream input
 * buffer, and while any are kept the next reads land straight after them, so
 * the owner always sees the unconsumed bytes in one piece. A callback-style
 * owner consumes everything and never has a buffer.
 *
 * A write first tries the socket (the transport's try_write); only what the
 * kernel did not take is queued (write), with bytes the owner keeps alive
 * until `written`. Backpressure: multiloop_stream_below_high_water is false
 * once the queue passes the server's write_high_water, and `drained` follows
 * when it falls to write_low_water.
 *
 * Closing: at once on multiloop_stream_close (queued writes are cancelled),
 * after the writes flush on multiloop_stream_close_flushed, by itself when
 * the peer has ended and our side is shut down, and on a read, write or
 * shutdown error (the reason is then the libuv error).
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "stream.h"

/* Bytes a read may add to a stream that keeps input. */
#define STREAM_READ_CHUNK (16 * 1024)
/* A buffer emptied and bigger than this is freed (a long line once should
 * not cost the connection its size for ever). */
#define STREAM_KEEP_CAP (64 * 1024)

#define EVENTS(s) ((const multiloop_stream_events_t *)(s)->h.handle.data)
/* Another transport than plain, or NULL. A plain stream calls the plain
 * functions directly: an indirect call per read and write is what the
 * callback echo would pay for a TLS transport it does not use. */
static inline const multiloop_transport_t *other_tp(const multiloop_stream_t *s) {
  return s->ext ? s->ext->tp : NULL;
}
/* `tp`: a variable holding other_tp(s). */
#define TP_CALL(tp, fn, ...) ((tp) ? (tp)->fn(__VA_ARGS__) : plain_##fn(__VA_ARGS__))

static int plain_read_start(multiloop_stream_t *s);
static void plain_read_stop(multiloop_stream_t *s);
static int plain_try_write(multiloop_stream_t *s, const uv_buf_t *bufs, unsigned n);
static int plain_write(multiloop_stream_t *s, multiloop_stream_write_t *wr, const char *buf,
                       size_t len);
static int plain_shutdown(multiloop_stream_t *s);
static void plain_close(multiloop_stream_t *s);

static void read_start(multiloop_stream_t *s) {
  const multiloop_transport_t *tp = other_tp(s);
  TP_CALL(tp, read_start, s);
}

static void read_stop(multiloop_stream_t *s) {
  const multiloop_transport_t *tp = other_tp(s);
  TP_CALL(tp, read_stop, s);
}

/* --- closing --------------------------------------------------------------- */

/* The ext block goes before `closed` (which may free s); its tap is handed
 * to the owner there. */
static void close_cb(uv_handle_t *h) {
  multiloop_stream_t *s = (multiloop_stream_t *)h;
  void *tap = NULL;
  if (s->ext) {
    if (s->ext->tp && s->ext->tp->release) s->ext->tp->release(s);
    tap = s->ext->tap;
    free(s->ext->proxy);
    free(s->ext->in.base);
    free(s->ext);
    s->ext = NULL;
  }
  EVENTS(s)->closed(s, s->reason, tap);     /* may free s: touch nothing after */
}

void multiloop_stream_close(multiloop_stream_t *s, int reason) {
  const multiloop_transport_t *tp;
  if (s->closing) return;
  s->closing = 1;
  /* libuv's error codes are well inside 16 bits (UV_EOF, the lowest, is
   * -4095); anything else becomes a plain I/O error. */
  s->reason = reason >= -32768 && reason <= 32767 ? reason : UV_EIO;
  tp = other_tp(s);
  TP_CALL(tp, close, s);
  EVENTS(s)->closing(s);
}

/* The request is malloc'd: a stream shuts down at most once, and idle
 * connections should not carry 80 bytes for it. */
static void shutdown_cb(uv_shutdown_t *req, int status) {
  multiloop_stream_t *s = (multiloop_stream_t *)req->handle;
  free(req);
  if (status == UV_ECANCELED) return;       /* closed meanwhile */
  if (status < 0) {
    multiloop_stream_close(s, status);
    return;
  }
  s->shut_down = 1;
  if (s->close_when_flushed || s->read_ended) multiloop_stream_close(s, 0);
}

/* Half-closes once every queued write has gone out. */
void multiloop_stream_shutdown(multiloop_stream_t *s) {
  const multiloop_transport_t *tp;
  int rc;
  if (s->closing || s->shutdown_requested) return;
  s->shutdown_requested = 1;
  tp = other_tp(s);
  if ((rc = TP_CALL(tp, shutdown, s)) != 0) multiloop_stream_close(s, rc);
}

/* Closes once the queued writes have gone out (at once when none are). */
void multiloop_stream_close_flushed(multiloop_stream_t *s) {
  if (s->closing) return;
  if (multiloop_stream_queue_size(s) == 0) {
    multiloop_stream_close(s, 0);
    return;
  }
  s->close_when_flushed = 1;                 /* flush first: drop no queued data */
  read_stop(s);
  if (!s->shutdown_requested) multiloop_stream_shutdown(s);  /* else shutdown_cb closes */
}

/* --- the input buffer ------------------------------------------------------ */

static multiloop_stream_ext_t *ext_of(multiloop_stream_t *s) {
  if (s->ext == NULL && (s->ext = calloc(1, sizeof *s->ext)) == NULL) return NULL;
  return s->ext;
}

multiloop_stream_ext_t *multiloop_stream_ext(multiloop_stream_t *s) { return ext_of(s); }

int multiloop_stream_set_transport(multiloop_stream_t *s, const multiloop_transport_t *tp,
                                   void *state) {
  multiloop_stream_ext_t *x = ext_of(s);
  if (x == NULL) return UV_ENOMEM;
  x->tp = tp;
  x->tp_state = state;
  return 0;
}

int multiloop_stream_set_tap(multiloop_stream_t *s, void *tap) {
  multiloop_stream_ext_t *x = ext_of(s);
  if (x == NULL) return UV_ENOMEM;
  x->tap = tap;
  return 0;
}

/* gcc 12's -fanalyzer reports the buffer realloc'd here as leaked when it
 * reaches this through a handle pointer cast to the stream (alloc_cb,
 * read_cb): it loses the store to x->in.base. The same function called on a
 * plain struct pointer passes; valgrind and ASan see no leak. */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wanalyzer-malloc-leak"
#endif
/* Room for `more` bytes after the kept ones, which move to the front first.
 * Returns 0 or UV_ENOMEM (the buffer is unchanged then). */
static int input_reserve(multiloop_stream_ext_t *x, size_t more) {
  size_t kept = x->in.end - x->in.start, cap;
  char *p;
  if (x->in.start > 0) {
    memmove(x->in.base, x->in.base + x->in.start, kept);
    x->in.start = 0;
    x->in.end = kept;
  }
  if (x->in.base != NULL && x->in.cap - kept >= more) return 0;
  if (kept > SIZE_MAX / 2 - more) return UV_ENOMEM;
  cap = x->in.cap ? x->in.cap : STREAM_READ_CHUNK;
  while (cap - kept < more) cap *= 2;
  if ((p = realloc(x->in.base, cap)) == NULL) return UV_ENOMEM;
  x->in.base = p;
  x->in.cap = cap;
  return 0;
}
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC diagnostic pop
#endif

/* After a read of the buffer consumed `used` bytes. */
static void input_consume(multiloop_stream_input_t *in, size_t used) {
  in->start += used;
  if (in->start < in->end) return;
  in->start = in->end = 0;
  if (in->cap > STREAM_KEEP_CAP) {
    free(in->base);
    in->base = NULL;
    in->cap = 0;
  }
}

const char *multiloop_stream_kept(const multiloop_stream_t *s, size_t *len) {
  const multiloop_stream_input_t *in;
  if (s->ext == NULL || s->ext->in.end == s->ext->in.start) {
    *len = 0;
    return NULL;
  }
  in = &s->ext->in;
  *len = in->end - in->start;
  return in->base + in->start;
}

void multiloop_stream_consume(multiloop_stream_t *s, size_t n) {
  if (s->ext != NULL && n > 0) input_consume(&s->ext->in, n);
}

/* --- reading --------------------------------------------------------------- */

/* Bytes are kept: room after them. A buffer that cannot grow gives libuv
 * no room, and the read fails ENOBUFS. (The analyzer's false leak above is
 * reported here too since transports reach it through read_room.) */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wanalyzer-malloc-leak"
#endif
static uv_buf_t alloc_kept(multiloop_stream_ext_t *x) {
  if (input_reserve(x, STREAM_READ_CHUNK) != 0) return uv_buf_init(NULL, 0);
  return uv_buf_init(x->in.base + x->in.end, (unsigned)(x->in.cap - x->in.end));
}
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC diagnostic pop
#endif

static inline int keeps_input(const multiloop_stream_t *s) {
  return s->ext != NULL && s->ext->in.end != s->ext->in.start;
}

uv_buf_t multiloop_stream_read_room(multiloop_stream_t *s, char *scratch, size_t len) {
  if (keeps_input(s)) return alloc_kept(s->ext);
  return uv_buf_init(scratch, (unsigned)len);
}

/* Into the worker's read buffer, unless bytes are kept: then after them. */
static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  multiloop_stream_t *s = (multiloop_stream_t *)h;
  (void)suggested;
  *buf = multiloop_stream_read_room(s, multiloop_stream_worker(s)->read_buffer,
                                    MULTILOOP_READ_BUFFER_SIZE);
}

static void read_eof(multiloop_stream_t *s) {
  s->read_ended = 1;
  read_stop(s);
  EVENTS(s)->eof(s);
  if (!s->closing && s->shut_down) multiloop_stream_close(s, 0);  /* both directions are done */
}

void multiloop_stream_ended(multiloop_stream_t *s) { read_eof(s); }

/* n bytes landed in `room` (multiloop_stream_read_room's): to the owner,
 * with the kept bytes before them; what it leaves is kept. */
void multiloop_stream_received(multiloop_stream_t *s, const uv_buf_t *room, size_t n) {
  size_t used;
  if (!keeps_input(s)) {                      /* in the scratch buffer */
    used = EVENTS(s)->read(s, room->base, n);
    if (used < n && !s->closing) {
      multiloop_stream_ext_t *x = ext_of(s);
      if (x == NULL || input_reserve(x, n - used) != 0) {
        multiloop_stream_close(s, UV_ENOMEM);
        return;
      }
      memcpy(x->in.base, room->base + used, n - used);
      x->in.end = n - used;
    }
  } else {                                    /* landed after the kept bytes */
    multiloop_stream_input_t *in = &s->ext->in;
    in->end += n;
    used = EVENTS(s)->read(s, in->base + in->start, in->end - in->start);
    input_consume(in, used);    /* a close meanwhile leaves ext to close_cb */
  }
}

static void read_cb(uv_stream_t *h, ssize_t nread, const uv_buf_t *buf) {
  multiloop_stream_t *s = (multiloop_stream_t *)h;
  if (nread > 0) {
    atomic_fetch_add_explicit(&multiloop_stream_worker(s)->bytes_in, (uint64_t)nread,
                              memory_order_relaxed);
    multiloop_stream_received(s, buf, (size_t)nread);
  } else if (nread == UV_EOF) {
    read_eof(s);
  } else if (nread < 0) {
    multiloop_stream_close(s, (int)nread);
  }
}

void multiloop_stream_start(multiloop_stream_t *s) {
  if (!s->closing && !s->paused && !s->read_ended && !s->close_when_flushed)
    read_start(s);
}

void multiloop_stream_pause(multiloop_stream_t *s) {
  if (!s->closing && !s->paused) {
    s->paused = 1;
    read_stop(s);
  }
}

void multiloop_stream_resume(multiloop_stream_t *s) {
  if (s->paused) {
    s->paused = 0;
    multiloop_stream_start(s);
  }
}

/* --- writing --------------------------------------------------------------- */

void multiloop_stream_write_done(multiloop_stream_t *s, multiloop_stream_write_t *wr, int status) {
  int rc = 0;
  if (wr != NULL) {
    if (status == 0)
      atomic_fetch_add_explicit(&multiloop_stream_worker(s)->bytes_out, wr->len,
                                memory_order_relaxed);
    rc = EVENTS(s)->written(s, wr, status);   /* wr is the owner's again */
  }
  if (status < 0 && status != UV_ECANCELED) {
    multiloop_stream_close(s, status);
  } else if (rc != 0) {
    multiloop_stream_close(s, rc);
  } else if (s->need_drain && !s->closing &&
             multiloop_stream_queue_size(s) <= multiloop_stream_worker(s)->cfg->write_low_water) {
    s->need_drain = 0;
    EVENTS(s)->drained(s);
  }
}

static void write_cb(uv_write_t *req, int status) {
  multiloop_stream_write_done((multiloop_stream_t *)req->handle, (multiloop_stream_write_t *)req,
                              status);
}

/* Sends what the socket takes now, if nothing is queued (else 0): the bytes
 * taken, or a libuv error (the stream is closed then). */
int multiloop_stream_try_writev(multiloop_stream_t *s, const uv_buf_t *bufs, unsigned nbufs) {
  const multiloop_transport_t *tp;
  int n;
  if (s->closing || multiloop_stream_queue_size(s) != 0) return 0;
  tp = other_tp(s);
  n = TP_CALL(tp, try_write, s, bufs, nbufs);
  if (n < 0) {
    multiloop_stream_close(s, n);
    return n;
  }
  if (n > 0)
    atomic_fetch_add_explicit(&multiloop_stream_worker(s)->bytes_out, (uint64_t)n,
                              memory_order_relaxed);
  return n;
}


/* Queues `len` bytes (at most UINT_MAX) that stay the owner's until
 * `written` hands wr back. Returns 0, or a libuv error: the stream is closed
 * then and wr is still the caller's. */
int multiloop_stream_write(multiloop_stream_t *s, multiloop_stream_write_t *wr, const char *buf,
                           size_t len) {
  const multiloop_transport_t *tp;
  int rc;
  if (s->closing) return UV_EPIPE;
  wr->len = len;
  tp = other_tp(s);
  if ((rc = TP_CALL(tp, write, s, wr, buf, len)) != 0) multiloop_stream_close(s, rc);
  return rc;
}

/* --- opening --------------------------------------------------------------- */

void multiloop_stream_init(multiloop_stream_t *s, multiloop_worker_t *w, int is_unix,
                           const multiloop_stream_events_t *ev) {
  memset(s, 0, sizeof *s);
  if (is_unix) uv_pipe_init(&w->loop, &s->h.pipe, 0);
  else uv_tcp_init(&w->loop, &s->h.tcp);
  s->h.handle.data = (void *)(uintptr_t)ev;   /* only ever read back as const */
  s->closing = 1;                             /* closed until the fd is ours */
}

int multiloop_stream_open(multiloop_stream_t *s, uv_os_sock_t fd, uv_stream_t *server) {
  int rc;
  if (fd < 0) rc = uv_accept(server, &s->h.stream);
  else if (multiloop_stream_is_unix(s)) rc = uv_pipe_open(&s->h.pipe, fd);
  else rc = uv_tcp_open(&s->h.tcp, fd);
  if (rc != 0 && fd >= 0) close(fd);
  s->closing = 0;
  return rc;
}

/* --- the plain transport --------------------------------------------------- */

static int plain_read_start(multiloop_stream_t *s) {
  return uv_read_start(&s->h.stream, alloc_cb, read_cb);
}

static void plain_read_stop(multiloop_stream_t *s) { uv_read_stop(&s->h.stream); }

static int plain_try_write(multiloop_stream_t *s, const uv_buf_t *bufs, unsigned nbufs) {
  int n = uv_try_write(&s->h.stream, bufs, nbufs);
  return n == UV_EAGAIN ? 0 : n;
}

static int plain_write(multiloop_stream_t *s, multiloop_stream_write_t *wr, const char *buf,
                       size_t len) {
  uv_buf_t b = uv_buf_init((char *)(uintptr_t)buf, (unsigned)len);
  return uv_write(&wr->req, &s->h.stream, &b, 1, write_cb);
}

static int plain_shutdown(multiloop_stream_t *s) {
  uv_shutdown_t *req = malloc(sizeof *req);
  int rc;
  if (req == NULL) return UV_ENOMEM;
  if ((rc = uv_shutdown(req, &s->h.stream, shutdown_cb)) != 0) free(req);
  return rc;
}

static void plain_close(multiloop_stream_t *s) { uv_close(&s->h.handle, close_cb); }

const multiloop_transport_t multiloop_transport_plain = {
  "plain", plain_read_start, plain_read_stop, plain_try_write,
  plain_write, plain_shutdown, plain_close, NULL
};
