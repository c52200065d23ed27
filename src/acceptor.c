/*
 * acceptor.c: the acceptor thread (dispatch "ipc" and "queue"). It runs its
 * own uv loop with one listener (listener.c: our accept path on the socket
 * the main thread created) and gives each accepted fd to one worker:
 *   - ipc: uv_write2 over the worker's socketpair, opened as IPC pipes on both
 *     ends (SCM_RIGHTS); the acceptor closes its copy once the write is done;
 *   - queue: a message on the worker's inbox (inbox.c), whose async wakes the
 *     worker; the fd is the same in every thread of the process, so nothing
 *     is copied, and posts made before the worker wakes coalesce.
 * The worker is chosen round-robin, or by least connections (the slots each
 * worker holds: slots.c; ties go round-robin). The acceptor takes the slot
 * for the worker it picks, and gives it back itself when the hand-off fails;
 * otherwise the worker gives it back. A worker that frees a slot while the
 * acceptor is paused at max_connections rings resume_async (slots.c).
 *
 * Threads: multiloop_acceptor_start and _stop are called by the main thread;
 * everything else runs on the acceptor thread. An ipc hand-off in flight owns one malloc'd `handoff` (the
 * write request and the acceptor's uv_tcp_t or uv_pipe_t), freed in that
 * handle's close callback, also when stop cancels the write: the client is
 * closed then, never leaked. A queued fd belongs to the worker's inbox.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "multiloop.h"

typedef struct {
  uv_write_t req;
  union {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;
  } client;
  multiloop_runtime_t *rt;
  int worker;                    /* index of the worker it is for */
  char byte;                     /* IPC needs a byte to carry the fd */
} handoff;

/* A connection that never reached its worker: its slot is free again. */
static void give_back(multiloop_runtime_t *rt, int worker) {
  multiloop_slot_give(rt, &rt->workers[worker]);
}

/* --- choosing a worker ----------------------------------------------------- */

static int pick_worker(multiloop_runtime_t *rt) {
  multiloop_acceptor_t *a = &rt->acceptor;
  int n = rt->cfg->nworkers, best = a->next, i;
  if (rt->cfg->balance == MULTILOOP_BALANCE_LEAST_CONNECTIONS) {
    int least = multiloop_slots_held(&rt->workers[best]);
    for (i = 1; i < n && least > 0; i++) {   /* scan from the cursor: ties rotate */
      int k = (a->next + i) % n;
      int active = multiloop_slots_held(&rt->workers[k]);
      if (active < least) {
        least = active;
        best = k;
      }
    }
  }
  a->next = (best + 1) % n;
  return best;
}

/* --- ipc ------------------------------------------------------------------- */

static void handoff_free_cb(uv_handle_t *h) { free(h->data); }

static void handoff_write_cb(uv_write_t *req, int status) {
  handoff *ho = req->data;
  /* On failure (a worker gone, or stop cancelled it) the client is closed:
   * its only copy of the fd is ours, and its slot is free again. */
  if (status < 0) give_back(ho->rt, ho->worker);
  else atomic_fetch_add_explicit(&ho->rt->acceptor.handed_off, 1, memory_order_relaxed);
  uv_close(&ho->client.handle, handoff_free_cb);
}

static void hand_off_ipc(multiloop_runtime_t *rt, uv_os_sock_t fd, int worker) {
  multiloop_acceptor_t *a = &rt->acceptor;
  handoff *ho = malloc(sizeof *ho);
  uv_buf_t byte;
  int rc;
  if (ho == NULL) {
    close(fd);
    give_back(rt, worker);
    return;
  }
  ho->rt = rt;
  ho->worker = worker;
  ho->byte = 'c';
  ho->req.data = ho;
  ho->client.handle.data = ho;
  if (multiloop_conn_is_unix(rt, NULL, fd)) {
    uv_pipe_init(&a->loop, &ho->client.pipe, 0);
    rc = uv_pipe_open(&ho->client.pipe, fd);
  } else {
    uv_tcp_init(&a->loop, &ho->client.tcp);
    rc = uv_tcp_open(&ho->client.tcp, fd);
  }
  if (rc != 0) {
    close(fd);
    give_back(rt, worker);
    uv_close(&ho->client.handle, handoff_free_cb);
    return;
  }
  ho->client.handle.data = ho;
  byte = uv_buf_init(&ho->byte, 1);
  if (uv_write2(&ho->req, (uv_stream_t *)&a->pipes[worker], &byte, 1, &ho->client.stream,
                handoff_write_cb) != 0) {
    give_back(rt, worker);
    uv_close(&ho->client.handle, handoff_free_cb);
  }
}

/* --- queue ----------------------------------------------------------------- */

static void hand_off_queue(multiloop_runtime_t *rt, uv_os_sock_t fd, int worker) {
  multiloop_msg_t *msg = malloc(sizeof *msg);
  if (msg != NULL) {
    msg->kind = MULTILOOP_MSG_FD;
    msg->keep = 0;
    msg->from = 0;
    msg->fd = fd;
    msg->len = 0;
    if (multiloop_inbox_post(&rt->workers[worker].inbox, msg) == 0) {
      atomic_fetch_add_explicit(&rt->acceptor.handed_off, 1, memory_order_relaxed);
      return;
    }
    free(msg);                         /* the worker is stopping */
  }
  close(fd);
  give_back(rt, worker);
}

static void on_fd(multiloop_listener_t *l, uv_os_sock_t fd) {
  multiloop_runtime_t *rt = l->rt;
  int worker = pick_worker(rt);
  /* The slot is taken for the worker now, not when it gets there: least
   * connections must see the hand-offs still in flight. The worker gives it
   * back when the connection closes; a failed hand-off, right here. */
  multiloop_slot_take(rt, &rt->workers[worker]);
  if (rt->cfg->dispatch == MULTILOOP_DISPATCH_QUEUE) hand_off_queue(rt, fd, worker);
  else hand_off_ipc(rt, fd, worker);
}

/* A worker freed a slot while the listener was paused at the limit. */
static void resume_cb(uv_async_t *async) {
  multiloop_runtime_t *rt = async->data;
  multiloop_listener_resume(&rt->acceptor.listener);
}

/* --- start and stop -------------------------------------------------------- */

static void close_if_open(uv_handle_t *h) {
  if (h->loop != NULL && !uv_is_closing(h)) uv_close(h, NULL);
}

static void close_all(multiloop_runtime_t *rt) {
  multiloop_acceptor_t *a = &rt->acceptor;
  int i;
  multiloop_slots_bell(rt, NULL);          /* no give rings a closing handle */
  multiloop_listener_close(&a->listener);
  for (i = 0; i < a->nmore; i++) multiloop_listener_close(&a->more[i]);
  if (rt->cfg->dispatch == MULTILOOP_DISPATCH_IPC)
    for (i = 0; i < rt->cfg->nworkers; i++) close_if_open((uv_handle_t *)&a->pipes[i]);
  close_if_open((uv_handle_t *)&a->stop_async);
  close_if_open((uv_handle_t *)&a->resume_async);
}

static void stop_cb(uv_async_t *async) { close_all(async->data); }

static int setup(multiloop_runtime_t *rt) {
  multiloop_acceptor_t *a = &rt->acceptor;
  uv_os_sock_t fd = a->listen_fd;
  int i, rc;
  char msg[160];
  if (rt->cfg->dispatch == MULTILOOP_DISPATCH_IPC) {
    for (i = 0; i < rt->cfg->nworkers; i++) {
      if ((rc = uv_pipe_open(&a->pipes[i], a->pipe_fds[i])) != 0) {
        snprintf(msg, sizeof msg, "acceptor: hand-off pipe: %s", uv_strerror(rc));
        a->error = strdup(msg);
        return rc;
      }
      a->pipe_fds[i] = -1;                   /* the pipe handle owns it now */
    }
  }
  a->listen_fd = -1;                         /* the listener owns it now */
  if ((rc = multiloop_listener_start(&a->listener, &a->loop, rt, fd, 1, "acceptor", on_fd,
                                     NULL)) != 0) {
    snprintf(msg, sizeof msg, "acceptor: %s", uv_strerror(rc));
    a->error = strdup(msg);
    return rc;
  }
  /* Several inherited sockets: a listener each, on this loop. Only the
   * first is rung when a slot frees (the flag it raises is one for the
   * process); the others look again on a short timer, as reuseport's do. */
  for (i = 0; i < a->nmore; i++) {
    fd = a->more_fds[i];
    a->more_fds[i] = -1;
    if ((rc = multiloop_listener_start(&a->more[i], &a->loop, rt, fd, 0, "acceptor", on_fd,
                                       NULL)) != 0) {
      snprintf(msg, sizeof msg, "acceptor: %s", uv_strerror(rc));
      a->error = strdup(msg);
      return rc;
    }
  }
  return 0;
}

/* The start failed at `step`: the message start() raises. */
static void setup_failed(multiloop_acceptor_t *a, const char *step, int rc) {
  char msg[160];
  snprintf(msg, sizeof msg, "acceptor: %s: %s (%s)", step, uv_strerror(rc), uv_err_name(rc));
  a->error = strdup(msg);
  a->failed = 1;
}

static void acceptor_main(void *arg) {
  multiloop_runtime_t *rt = arg;
  multiloop_acceptor_t *a = &rt->acceptor;
  int i, rc;

  /* Out of fds, uv_loop_init and uv_async_init fail: the start then fails
   * with the reason, and the fds stay with the main thread, which closes
   * them. A handle whose init failed keeps loop == NULL (the runtime is
   * calloc'd), so close_all passes over it. */
  if ((rc = multiloop_loop_init(&a->loop)) != 0) {
    setup_failed(a, "cannot make its loop", rc);
    uv_sem_post(&rt->ready);
    return;
  }
  if ((rc = uv_async_init(&a->loop, &a->stop_async, stop_cb)) != 0 ||
      (rc = uv_async_init(&a->loop, &a->resume_async, resume_cb)) != 0) {
    setup_failed(a, "cannot make its wake-up handles", rc);
  } else {
    a->stop_async.data = a->resume_async.data = rt;
    if (rt->cfg->dispatch == MULTILOOP_DISPATCH_IPC)
      for (i = 0; i < rt->cfg->nworkers; i++) uv_pipe_init(&a->loop, &a->pipes[i], 1);
    multiloop_slots_bell(rt, &a->resume_async);
    if (setup(rt) != 0) a->failed = 1;
  }
  if (a->failed) close_all(rt);
  uv_sem_post(&rt->ready);                /* after this, `a` belongs to this thread */
  uv_run(&a->loop, UV_RUN_DEFAULT);
  rc = uv_loop_close(&a->loop);
  if (rc != 0)
    multiloop_log_as(rt->cfg->logger, MULTILOOP_LOG_ERROR, "acceptor", 0,
                     "loop closed with handles open: %s", uv_err_name(rc));
}

/* Main thread. Starts the acceptor on rt->acceptor.listen_fd and waits until
 * it accepts or has failed. Returns 0, or -1 with rt->acceptor.error set (the
 * thread is joined then). Fds it did not take over stay with the caller. */
int multiloop_acceptor_start(multiloop_runtime_t *rt) {
  multiloop_acceptor_t *a = &rt->acceptor;
  int rc = uv_thread_create(&a->thread, acceptor_main, rt);
  if (rc != 0) {
    char msg[128];
    snprintf(msg, sizeof msg, "cannot start the acceptor thread: %s", uv_strerror(rc));
    a->error = strdup(msg);
    return -1;
  }
  a->thread_started = 1;
  uv_sem_wait(&rt->ready);
  if (a->failed) {
    uv_thread_join(&a->thread);
    a->thread_started = 0;
    return -1;
  }
  return 0;
}

/* Main thread. Stops accepting, cancels ipc hand-offs in flight, joins. */
void multiloop_acceptor_stop(multiloop_runtime_t *rt) {
  multiloop_acceptor_t *a = &rt->acceptor;
  if (!a->thread_started) return;
  uv_async_send(&a->stop_async);
  uv_thread_join(&a->thread);
  a->thread_started = 0;
}
