/*
 * stream.h: a connection's byte stream (stream.c) and the transport under it.
 *
 * Arrows run one way: its owner (conn.c) -> stream -> transport. A stream
 * reports what happens through the events table its owner gives it, never by
 * calling its owner by name; a transport is a table of functions the stream
 * calls. Plain TCP or Unix socket over libuv is the one transport today
 * (stream.c); a TLS transport and a PROXY-header phase hang off the stream's
 * `ext` block when they land, so a plain stream pays one NULL pointer for them.
 * Worker thread only, like everything that holds a uv handle.
 */
#ifndef MULTILOOP_STREAM_H
#define MULTILOOP_STREAM_H

#include "multiloop.h"

typedef struct multiloop_stream_s multiloop_stream_t;
typedef struct multiloop_stream_ext_s multiloop_stream_ext_t;

/* One queued write. The owner allocates it, usually as the first member of a
 * larger struct holding what keeps the bytes alive (a Lua string's registry
 * ref, or a buffer the owner frees), and gets it back in `written` once the
 * transport is done with the bytes; only then may it free them. */
typedef struct {
  uv_write_t req;                      /* the plain transport's */
  size_t len;                          /* bytes queued, for bytes_out */
} multiloop_stream_write_t;

/* What a stream tells its owner. Every one runs on the worker thread from a
 * libuv callback (or, for `closing`, from whatever closed the stream), and
 * may call any multiloop_stream_* function on the stream, closing included. */
typedef struct {
  /* Bytes arrived: `data` is every unconsumed byte (only the new ones unless
   * the owner kept some before). Returns how many it consumed; the stream
   * keeps the rest in its input buffer (allocated then) and hands them back,
   * with what follows, on the next read. Returning `len` keeps nothing. */
  size_t (*read)(multiloop_stream_t *s, const char *data, size_t len);
  /* The peer sent EOF (reading has stopped). If the owner neither shuts down
   * nor closes, the stream stays half open; once our side is shut down too
   * it closes with reason 0. */
  void (*eof)(multiloop_stream_t *s);
  /* A queued write is done: status 0, a libuv error, or UV_ECANCELED when the
   * stream closed first. Returns 0, or a reason (> 0) to close the stream with
   * (its callback failed); a write error closes the stream anyway. */
  int (*written)(multiloop_stream_t *s, multiloop_stream_write_t *wr, int status);
  /* The queue fell to write_low_water after a write found it over
   * write_high_water (multiloop_stream_below_high_water returned 0). */
  void (*drained)(multiloop_stream_t *s);
  /* The stream began to close (synchronously, whoever closed it): from here
   * on every call on it is a no-op or fails "closed". */
  void (*closing)(multiloop_stream_t *s);
  /* The handle is closed and its memory is the owner's again. `reason`: 0
   * (an ordinary close), a libuv error (< 0: a read, write or shutdown
   * failed) or the owner's own code (> 0) it passed to multiloop_stream_close.
   * `tap`: what the owner kept in the ext block (multiloop_stream_set_tap),
   * which is gone by now. */
  void (*closed)(multiloop_stream_t *s, int reason, void *tap);
} multiloop_stream_events_t;

/* A transport moves bytes between the stream and the socket. Each function
 * gets the stream; the handle is s->h. Incoming bytes go through the
 * stream's read path (stream.c: alloc_cb/read_cb for the plain transport; a
 * TLS transport would decrypt in its own read callback and hand the
 * plaintext on the same way). Queued bytes are counted by the handle's
 * write_queue_size, since every transport ends in uv_write. */
typedef struct {
  const char *name;                    /* "plain" */
  int (*read_start)(multiloop_stream_t *s);
  void (*read_stop)(multiloop_stream_t *s);
  /* Sends what it can of `n` buffers now without queueing: the bytes taken
   * (0 when the socket would block), or a libuv error. Only with nothing
   * queued. */
  int (*try_write)(multiloop_stream_t *s, const uv_buf_t *bufs, unsigned n);
  /* Queues `len` bytes behind what is queued; they must stay valid until
   * `written`. Returns 0 or a libuv error (then wr is the caller's again). */
  int (*write)(multiloop_stream_t *s, multiloop_stream_write_t *wr, const char *buf, size_t len);
  /* Half-closes after the queued writes; returns 0 or a libuv error. */
  int (*shutdown)(multiloop_stream_t *s);
  void (*close)(multiloop_stream_t *s);  /* uv_close, ending in `closed` */
  /* From the close callback, before `closed`: the transport hands back what
   * it still holds (`written` with UV_ECANCELED) and frees its state. NULL:
   * nothing to do (plain). */
  void (*release)(multiloop_stream_t *s);
} multiloop_transport_t;

extern const multiloop_transport_t multiloop_transport_plain;

/* Unconsumed input, kept only once an owner's read left bytes unconsumed:
 * base[start..end) is the data, `cap` the allocation. */
typedef struct {
  char *base;
  size_t start, end, cap;
} multiloop_stream_input_t;

/* What only some streams need, malloc'd the first time one does and freed in
 * the close callback: a transport other than plain (with its state), and the
 * input buffer. A PROXY-header phase (a function that eats the first bytes
 * before `read` sees any) belongs here too. */
struct multiloop_stream_ext_s {
  const multiloop_transport_t *tp;     /* NULL: plain */
  void *tp_state;                      /* the transport's, freed by its release */
  void *tap;                           /* the owner's: the pipe it is in (pipe.c), or NULL */
  size_t held;                         /* bytes the transport holds outside the handle's
                                          queue (TLS: writes before the handshake ends) */
  void *proxy;                         /* the owner's PROXY header (proxy.h), freed with ext */
  multiloop_stream_input_t in;
};

/* Embedded first in its owner (so the owner is found from the stream by a
 * cast or offsetof), and the handle first in the stream (so the stream is
 * found from the handle). The handle's `data` holds the events table. The
 * flags and the close reason share one word: an idle connection costs the
 * same 352 bytes as before the split (conn.c). */
struct multiloop_stream_s {
  union {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;                    /* a Unix socket connection */
  } h;
  multiloop_stream_ext_t *ext;         /* NULL for a plain stream with no input kept */
  signed int reason : 16;              /* for `closed`: see the events table */
  unsigned closing : 1;                /* closed, closing, or not opened yet */
  unsigned read_ended : 1;             /* the peer sent EOF */
  unsigned shutdown_requested : 1;
  unsigned shut_down : 1;              /* our FIN is out */
  unsigned close_when_flushed : 1;     /* multiloop_stream_close_flushed with writes queued */
  unsigned paused : 1;                 /* multiloop_stream_pause */
  unsigned need_drain : 1;             /* a write found the queue over high water */
};

/* The worker whose loop the stream is on (worker.c sets loop.data). */
static inline multiloop_worker_t *multiloop_stream_worker(const multiloop_stream_t *s) {
  return (multiloop_worker_t *)s->h.handle.loop->data;
}

static inline int multiloop_stream_is_unix(const multiloop_stream_t *s) {
  return s->h.handle.type == UV_NAMED_PIPE;
}

/* Bytes written and not yet taken by the kernel: the handle's queue (for TLS,
 * ciphertext) and what the transport holds back. */
static inline size_t multiloop_stream_queue_size(const multiloop_stream_t *s) {
  return s->h.stream.write_queue_size + (s->ext ? s->ext->held : 0);
}
static inline size_t multiloop_stream_queued(const multiloop_stream_t *s) {
  return s->closing ? 0 : multiloop_stream_queue_size(s);
}

/* True while the queue is under the server's write_high_water; false (and
 * `drained` later) once over it. Inline: every write asks. */
static inline int multiloop_stream_below_high_water(multiloop_stream_t *s) {
  int under = multiloop_stream_queue_size(s) < multiloop_stream_worker(s)->cfg->write_high_water;
  if (!under) s->need_drain = 1;
  return under;
}

/* The owner's pointer kept in the ext block (made for it: 0 or UV_ENOMEM);
 * handed back by the `closed` event. */
int multiloop_stream_set_tap(multiloop_stream_t *s, void *tap);
static inline void *multiloop_stream_tap(const multiloop_stream_t *s) {
  return s->ext ? s->ext->tap : NULL;
}

/* Makes the handle (a Unix socket one with `is_unix`) on w's loop, closed
 * until opened; `ev` is how the stream reports to its owner. */
void multiloop_stream_init(multiloop_stream_t *s, multiloop_worker_t *w, int is_unix,
                           const multiloop_stream_events_t *ev);
/* Takes `fd` (closed here on failure), or with fd < 0 the next connection
 * pending on the IPC pipe `server`. Returns 0 or a libuv error; either way
 * the stream is then open, and must be closed. */
int multiloop_stream_open(multiloop_stream_t *s, uv_os_sock_t fd, uv_stream_t *server);
/* The handle connected (an outbound connection: outbound.c ran
 * uv_tcp_connect on it): the stream is open, and must be closed. */
static inline void multiloop_stream_connected(multiloop_stream_t *s) { s->closing = 0; }
void multiloop_stream_start(multiloop_stream_t *s);   /* start reading */
void multiloop_stream_pause(multiloop_stream_t *s);
void multiloop_stream_resume(multiloop_stream_t *s);
/* Sends what the socket takes now, if nothing is queued (else 0): the bytes
 * taken, or a libuv error (the stream is closed then). */
int multiloop_stream_try_writev(multiloop_stream_t *s, const uv_buf_t *bufs, unsigned n);
static inline int multiloop_stream_try_write(multiloop_stream_t *s, const char *buf, size_t len) {
  uv_buf_t b = uv_buf_init((char *)(uintptr_t)buf, (unsigned)len);  /* libuv only reads it */
  return multiloop_stream_try_writev(s, &b, 1);
}
int multiloop_stream_write(multiloop_stream_t *s, multiloop_stream_write_t *wr, const char *buf,
                           size_t len);
/* The bytes kept (every read's unconsumed rest), outside a `read` event:
 * NULL with *len 0 when none are. multiloop_stream_consume takes n of them
 * (n <= *len) off the front. */
const char *multiloop_stream_kept(const multiloop_stream_t *s, size_t *len);
void multiloop_stream_consume(multiloop_stream_t *s, size_t n);
void multiloop_stream_shutdown(multiloop_stream_t *s);
void multiloop_stream_close_flushed(multiloop_stream_t *s);
void multiloop_stream_close(multiloop_stream_t *s, int reason);

/* --- for transports (tls.c) ------------------------------------------------ */

/* Close reasons a transport gives (beside libuv's errors; inside 16 bits
 * and below libuv's lowest, UV_EOF): the TLS layer failed (a bad or missing
 * handshake, a bad record, an alert), or the handshake took too long. */
enum { MULTILOOP_REASON_TLS = -5001, MULTILOOP_REASON_TLS_TIMEOUT = -5002 };

/* The ext block, made if need be (NULL: out of memory). */
multiloop_stream_ext_t *multiloop_stream_ext(multiloop_stream_t *s);
/* Where a transport puts the next bytes for the owner: after the kept bytes
 * when there are any (room for at least a read's worth; len 0 when memory
 * ran out), else `scratch`. multiloop_stream_received then hands the n
 * bytes put there (with the kept ones) to the owner's `read`. */
uv_buf_t multiloop_stream_read_room(multiloop_stream_t *s, char *scratch, size_t len);
void multiloop_stream_received(multiloop_stream_t *s, const uv_buf_t *room, size_t n);
/* The peer ended its side: as the plain transport's EOF. */
void multiloop_stream_ended(multiloop_stream_t *s);
/* A write of the transport's is done: the owner's `wr` (or NULL for bytes
 * of the transport's own) with its status, then the drain check. */
void multiloop_stream_write_done(multiloop_stream_t *s, multiloop_stream_write_t *wr, int status);
/* Sets a transport on an open stream (its state is the transport's). */
int multiloop_stream_set_transport(multiloop_stream_t *s, const multiloop_transport_t *tp,
                                   void *state);

#endif
