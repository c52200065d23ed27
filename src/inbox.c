/*
 * inbox.c: a worker's inbox, the one way plain data reaches a worker thread.
 *
 * A mutex-guarded list of malloc'd messages, rung by a uv_async_t on the
 * worker's loop. Sends coalesce: the callback detaches the whole list under
 * the lock and handles every message in order, so many posts cost one
 * wake-up. A message carries plain C data only (an fd, copied bytes), never
 * a Lua value or a libuv handle.
 *
 * Threads: multiloop_inbox_post may be called from any thread; init, close
 * and the callback run on the owning worker's thread. Ownership: the sender
 * allocates a message; from a successful post the inbox owns it, and the
 * worker's handler frees it. A post after close fails (UV_ECANCELED) and the
 * sender keeps the message. Close hands what is still queued back to the
 * owner, which disposes of each message as it must: an fd in one holds a
 * connection slot (slots.c) the sender took, so only the owner knows how to
 * close it and give its slot back (worker.c). The ring happens under the lock, so it can never
 * reach an async handle that close has already closed; and the lock itself
 * lives until multiloop_inbox_destroy, called after the owner's thread is
 * joined.
 *
 * Limit: a value message (message.c) is posted counted, its bytes (header
 * plus copied data) added to `queued` under the lock, and refused
 * (UV_ENOBUFS: the sender says "full") when they would take `queued` past
 * the limit; nothing is dropped once posted. The callback takes the batch's
 * bytes off once it has handled the whole batch: one more lock round-trip
 * per batch, none per message, and what a worker holds (queued, or detached
 * and not yet freed) never exceeds the limit. Connections (queue dispatch)
 * and stops are posted uncounted and never refused for room: refusing a
 * connection would close a client the acceptor already took, and a stop must
 * always get through. Neither can pile up: each queued connection holds an
 * open fd (so the fd limit bounds them), and stops come one per stop() call.
 */
#include <stdlib.h>

#include "multiloop.h"

static void inbox_cb(uv_async_t *async) {
  multiloop_inbox_t *box = async->data;
  multiloop_msg_t *msg, *next;
  size_t batch;
  uv_mutex_lock(&box->lock);
  msg = box->head;
  box->head = box->tail = NULL;
  /* Every counted byte is in this batch: the previous callback took its
   * own batch's bytes off before it returned, and callbacks do not nest. */
  batch = box->queued;
  uv_mutex_unlock(&box->lock);
  for (; msg; msg = next) {
    next = msg->next;
    box->handle(box->owner, msg);            /* frees msg */
  }
  if (batch == 0) return;
  /* Also after a stop in this batch closed the inbox: the lock lives on. */
  uv_mutex_lock(&box->lock);
  box->queued -= batch;
  uv_mutex_unlock(&box->lock);
}

/* Worker thread, before any other thread may post. */
int multiloop_inbox_init(multiloop_inbox_t *box, uv_loop_t *loop,
                         multiloop_worker_t *owner, multiloop_inbox_handler handle) {
  int rc;
  box->head = box->tail = NULL;
  box->queued = 0;
  box->owner = owner;
  box->handle = handle;
  if ((rc = uv_mutex_init(&box->lock)) != 0) return rc;
  if ((rc = uv_async_init(loop, &box->async, inbox_cb)) != 0) {
    uv_mutex_destroy(&box->lock);
    return rc;
  }
  box->async.data = box;
  box->open = 1;
  box->initialized = 1;
  return 0;
}

/* Under the lock: appends msg and rings the owner. */
static void append(multiloop_inbox_t *box, multiloop_msg_t *msg) {
  msg->next = NULL;
  if (box->tail) box->tail->next = msg;
  else box->head = msg;
  box->tail = msg;
  uv_async_send(&box->async);
}

/* Any thread, uncounted (a connection or a stop): never refused for room.
 * Returns 0 (the inbox owns msg now) or UV_ECANCELED (closed). */
int multiloop_inbox_post(multiloop_inbox_t *box, multiloop_msg_t *msg) {
  uv_mutex_lock(&box->lock);
  if (!box->open) {
    uv_mutex_unlock(&box->lock);
    return UV_ECANCELED;
  }
  append(box, msg);
  uv_mutex_unlock(&box->lock);
  return 0;
}

/* Any thread: posts msg counted as `bytes` against `limit`. Returns 0 (the
 * inbox owns msg now), UV_ECANCELED (closed) or UV_ENOBUFS (no room: queued
 * plus bytes would pass the limit); on an error the sender keeps msg. Every
 * sender passes the same limit, so queued never exceeds it. */
int multiloop_inbox_post_counted(multiloop_inbox_t *box, multiloop_msg_t *msg, size_t bytes,
                                 size_t limit) {
  uv_mutex_lock(&box->lock);
  if (!box->open) {
    uv_mutex_unlock(&box->lock);
    return UV_ECANCELED;
  }
  if (bytes > limit || box->queued > limit - bytes) {   /* no overflow either way */
    uv_mutex_unlock(&box->lock);
    return UV_ENOBUFS;
  }
  box->queued += bytes;
  append(box, msg);
  uv_mutex_unlock(&box->lock);
  return 0;
}

/* Frees a message the receiver is done with. An fd it still carries is not
 * closed here: it holds a slot (slots.c), and closing it is the owner's
 * business, together with giving the slot back. */
void multiloop_msg_free(multiloop_msg_t *msg) {
  if (!msg->keep) free(msg);
}

/* Worker thread: refuse further posts and close the async. Returns what was
 * still queued, in order (a list linked by `next`): the caller owns it.
 * `queued` is left as it is: nothing is posted or counted any more. */
multiloop_msg_t *multiloop_inbox_close(multiloop_inbox_t *box) {
  multiloop_msg_t *msg;
  if (!box->open) return NULL;
  uv_mutex_lock(&box->lock);
  box->open = 0;
  msg = box->head;
  box->head = box->tail = NULL;
  uv_mutex_unlock(&box->lock);
  uv_close((uv_handle_t *)&box->async, NULL);
  return msg;
}

/* The thread that joined the owner: the lock must outlive every poster, so
 * it is destroyed only once no other thread can post. */
void multiloop_inbox_destroy(multiloop_inbox_t *box) {
  if (box->initialized) uv_mutex_destroy(&box->lock);
  box->initialized = 0;
}
