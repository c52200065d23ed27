/*
 * acceptor.c: the acceptor thread. It owns the listening socket, its own uv
 * loop, and the acceptor ends of the per-worker socketpairs, opened as IPC
 * pipes. Each accepted connection is sent round-robin to a worker with
 * uv_write2 (SCM_RIGHTS); the acceptor closes its copy once the write is done,
 * so the worker's copy is then the only one.
 *
 * We run the accept path ourselves (a uv_poll_t on the listening socket and
 * accept4 in batches) instead of uv_listen, because libuv 1.44 accepts in a
 * loop inside one callback and its EMFILE spare-fd trick is process-global and
 * not thread-safe. Owning it lets the acceptor simply stop polling:
 *   - at max_connections, until a worker closes a connection and rings
 *     resume_async (pending clients wait in the kernel backlog);
 *   - on EMFILE/ENFILE, retrying on a short timer, logged once per episode
 *     (an episode ends after a quiet second: see quiet_cb).
 *
 * Threads: multiloop_acceptor_start and _stop are called by the main thread,
 * multiloop_acceptor_released by workers; everything else runs on the
 * acceptor thread. A hand-off in flight owns one malloc'd `handoff` (the write
 * request and the acceptor's uv_tcp_t), freed in the close callback of that
 * uv_tcp_t, also when stop cancels the write.
 */
#define _GNU_SOURCE             /* accept4 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/socket.h>

#include "multiloop.h"

#define ACCEPT_BATCH 64          /* accepts per wake-up before yielding to the loop */
#define FD_RETRY_MS 100          /* retry interval after EMFILE/ENFILE */
#define FD_QUIET_MS 1000         /* no failure for this long ends an episode */

typedef struct {
  uv_write_t req;
  uv_tcp_t tcp;
  multiloop_runtime_t *rt;
  char byte;                     /* IPC needs a byte to carry the fd */
} handoff;

static void accept_cb(uv_poll_t *poll, int status, int events);

/* Polls the listening socket exactly when nothing holds accepting back. */
static void update_polling(multiloop_acceptor_t *a) {
  int want = !a->stopping && !a->paused_for_limit && !a->paused_for_fds;
  if (want && !a->polling) uv_poll_start(&a->listener, UV_READABLE, accept_cb);
  else if (!want && a->polling) uv_poll_stop(&a->listener);
  a->polling = want;
}

/* --- hand-off -------------------------------------------------------------- */

static void handoff_free_cb(uv_handle_t *h) { free(h->data); }

static void handoff_write_cb(uv_write_t *req, int status) {
  handoff *ho = req->data;
  /* On failure (a worker gone, or stop cancelled it) the client is closed:
   * its only copy of the fd is ours, and its slot is free again. */
  if (status < 0) multiloop_acceptor_released(ho->rt);
  uv_close((uv_handle_t *)&ho->tcp, handoff_free_cb);
}

static void hand_off(multiloop_runtime_t *rt, uv_os_sock_t fd) {
  multiloop_acceptor_t *a = &rt->acceptor;
  handoff *ho = malloc(sizeof *ho);
  uv_buf_t byte;
  if (ho == NULL) {
    close(fd);
    multiloop_acceptor_released(rt);
    return;
  }
  ho->rt = rt;
  ho->byte = 'c';
  ho->req.data = ho;
  ho->tcp.data = ho;
  uv_tcp_init(&a->loop, &ho->tcp);
  if (uv_tcp_open(&ho->tcp, fd) != 0) {
    close(fd);
    multiloop_acceptor_released(rt);
    uv_close((uv_handle_t *)&ho->tcp, handoff_free_cb);
    return;
  }
  byte = uv_buf_init(&ho->byte, 1);
  if (uv_write2(&ho->req, (uv_stream_t *)&a->pipes[a->next], &byte, 1,
                (uv_stream_t *)&ho->tcp, handoff_write_cb) != 0) {
    multiloop_acceptor_released(rt);
    uv_close((uv_handle_t *)&ho->tcp, handoff_free_cb);
  }
  a->next = (a->next + 1) % rt->cfg->nworkers;
}

/* --- accepting ------------------------------------------------------------- */

static void retry_cb(uv_timer_t *t) {
  multiloop_acceptor_t *a = t->data;
  a->paused_for_fds = 0;
  update_polling(a);
}

/* Out of fds: stop polling (level-triggered epoll would spin on the pending
 * connection) and retry on a timer. One log line per episode. */
static void pause_for_fds(multiloop_runtime_t *rt, int err) {
  multiloop_acceptor_t *a = &rt->acceptor;
  if (a->fd_failures++ == 0) {
    fprintf(stderr, "multiloop: acceptor: accept failed: %s (%s); accepting paused, "
                    "retrying every %d ms\n", uv_strerror(err), uv_err_name(err), FD_RETRY_MS);
    fflush(stderr);
  }
  a->paused_for_fds = 1;
  uv_timer_stop(&a->quiet_timer);
  update_polling(a);
  uv_timer_start(&a->retry_timer, retry_cb, FD_RETRY_MS, 0);
}

/* An EMFILE episode ends after FD_QUIET_MS of accepting without a failure:
 * while the process stays at its limit a hand-off frees an fd now and then,
 * and one lucky accept must not read as a recovery. */
static void quiet_cb(uv_timer_t *t) {
  multiloop_acceptor_t *a = t->data;
  fprintf(stderr, "multiloop: acceptor: accepting again after %lu failed attempts\n",
          a->fd_failures);
  fflush(stderr);
  a->fd_failures = 0;
}

/* At max_connections: stop polling until a worker releases a slot. The flag
 * is raised before the count is checked again, and workers decrement before
 * they read the flag, so one of the two always sees the other. */
static int pause_for_limit(multiloop_runtime_t *rt) {
  multiloop_acceptor_t *a = &rt->acceptor;
  atomic_store(&rt->accept_waiting, 1);
  if (atomic_load(&rt->active) < rt->cfg->max_connections) {
    atomic_store(&rt->accept_waiting, 0);
    return 0;
  }
  a->paused_for_limit = 1;
  update_polling(a);
  return 1;
}

static void resume_cb(uv_async_t *async) {
  multiloop_runtime_t *rt = async->data;
  multiloop_acceptor_t *a = &rt->acceptor;
  if (!a->paused_for_limit || atomic_load(&rt->active) >= rt->cfg->max_connections)
    return;
  atomic_store(&rt->accept_waiting, 0);
  a->paused_for_limit = 0;
  update_polling(a);
}

static void accept_cb(uv_poll_t *poll, int status, int events) {
  multiloop_runtime_t *rt = poll->data;
  multiloop_acceptor_t *a = &rt->acceptor;
  int max = rt->cfg->max_connections, n;
  (void)events;
  if (status < 0) return;
  for (n = 0; n < ACCEPT_BATCH; n++) {
    uv_os_sock_t fd;
    if (max > 0 && atomic_load(&rt->active) >= max && pause_for_limit(rt)) return;
    fd = accept4(a->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      int err = errno;
      if (err == EAGAIN || err == EWOULDBLOCK) return;
      if (err == EINTR || err == ECONNABORTED) continue;
      atomic_fetch_add(&rt->accept_errors, 1);
      if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
        pause_for_fds(rt, uv_translate_sys_error(err));
      }
      return;
    }
    if (a->fd_failures > 0 && !uv_is_active((uv_handle_t *)&a->quiet_timer))
      uv_timer_start(&a->quiet_timer, quiet_cb, FD_QUIET_MS, 0);
    atomic_fetch_add(&rt->active, 1);
    hand_off(rt, fd);
  }
}

/* Any thread: a connection closed (or never reached a worker). */
void multiloop_acceptor_released(multiloop_runtime_t *rt) {
  atomic_fetch_sub(&rt->active, 1);
  if (!atomic_load(&rt->accept_waiting)) return;       /* the usual, lock-free case */
  /* The acceptor may be closing its loop (stop): ring only while it is open. */
  uv_mutex_lock(&rt->resume_lock);
  if (rt->resume_open) uv_async_send(&rt->acceptor.resume_async);
  uv_mutex_unlock(&rt->resume_lock);
}

/* --- start and stop -------------------------------------------------------- */

static void close_if_open(uv_handle_t *h) {
  if (h->loop != NULL && !uv_is_closing(h)) uv_close(h, NULL);
}

static void close_all(multiloop_runtime_t *rt) {
  multiloop_acceptor_t *a = &rt->acceptor;
  int i, nworkers = rt->cfg->nworkers;
  a->stopping = 1;
  uv_mutex_lock(&rt->resume_lock);
  rt->resume_open = 0;
  uv_mutex_unlock(&rt->resume_lock);
  close_if_open((uv_handle_t *)&a->listener);
  close_if_open((uv_handle_t *)&a->retry_timer);
  close_if_open((uv_handle_t *)&a->quiet_timer);
  for (i = 0; i < nworkers; i++) close_if_open((uv_handle_t *)&a->pipes[i]);
  close_if_open((uv_handle_t *)&a->stop_async);
  close_if_open((uv_handle_t *)&a->resume_async);
}

static void stop_cb(uv_async_t *async) {
  multiloop_runtime_t *rt = async->data;
  close_all(rt);
}

static int parse_address(const char *host, int port, struct sockaddr_storage *ss) {
  memset(ss, 0, sizeof *ss);
  if (strchr(host, ':') != NULL)
    return uv_ip6_addr(host, port, (struct sockaddr_in6 *)ss);
  return uv_ip4_addr(host, port, (struct sockaddr_in *)ss);
}

/* Creates, binds and listens on the socket; returns 0 or a uv error, with
 * a->error naming the step that failed. */
static int open_listener(multiloop_runtime_t *rt) {
  multiloop_acceptor_t *a = &rt->acceptor;
  const multiloop_config_t *cfg = rt->cfg;
  struct sockaddr_storage ss;
  socklen_t len;
  int rc, on = 1;
  const char *step = "address";
  char msg[512];

  if ((rc = parse_address(cfg->host, cfg->port, &ss)) != 0) goto fail;
  len = ss.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
  step = "socket";
  a->listen_fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (a->listen_fd < 0) goto fail_errno;
  step = "bind";
  if (setsockopt(a->listen_fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) != 0) goto fail_errno;
  if (bind(a->listen_fd, (struct sockaddr *)&ss, len) != 0) goto fail_errno;
  step = "listen";
  if (listen(a->listen_fd, cfg->backlog) != 0) goto fail_errno;
  len = sizeof ss;
  if (getsockname(a->listen_fd, (struct sockaddr *)&ss, &len) != 0) goto fail_errno;
  uv_ip_name((struct sockaddr *)&ss, a->bound_host, sizeof a->bound_host);
  a->bound_port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port);
  return 0;

fail_errno:
  rc = uv_translate_sys_error(errno);
fail:
  if (strcmp(step, "address") == 0)
    snprintf(msg, sizeof msg, "invalid host '%s': %s (%s)", cfg->host, uv_strerror(rc),
             uv_err_name(rc));
  else
    snprintf(msg, sizeof msg, "%s %s port %d: %s (%s)", step, cfg->host, cfg->port,
             uv_strerror(rc), uv_err_name(rc));
  a->error = strdup(msg);
  return rc;
}

static int setup(multiloop_runtime_t *rt) {
  multiloop_acceptor_t *a = &rt->acceptor;
  int i, rc;
  for (i = 0; i < rt->cfg->nworkers; i++) {
    uv_pipe_init(&a->loop, &a->pipes[i], 1);
    if ((rc = uv_pipe_open(&a->pipes[i], a->pipe_fds[i])) != 0) {
      char msg[128];
      snprintf(msg, sizeof msg, "acceptor: hand-off pipe: %s", uv_strerror(rc));
      a->error = strdup(msg);
      return rc;
    }
    a->pipe_fds[i] = -1;                   /* the pipe handle owns it now */
  }
  if ((rc = open_listener(rt)) != 0) return rc;
  if ((rc = uv_poll_init_socket(&a->loop, &a->listener, a->listen_fd)) != 0) {
    a->error = strdup(uv_strerror(rc));
    return rc;
  }
  a->listener.data = rt;
  update_polling(a);
  return 0;
}

static void acceptor_main(void *arg) {
  multiloop_runtime_t *rt = arg;
  multiloop_acceptor_t *a = &rt->acceptor;
  int i, rc;

  a->listen_fd = -1;
  uv_loop_init(&a->loop);
  uv_async_init(&a->loop, &a->stop_async, stop_cb);
  uv_async_init(&a->loop, &a->resume_async, resume_cb);
  a->stop_async.data = a->resume_async.data = rt;
  uv_timer_init(&a->loop, &a->retry_timer);
  uv_timer_init(&a->loop, &a->quiet_timer);
  a->retry_timer.data = a->quiet_timer.data = a;
  uv_mutex_lock(&rt->resume_lock);
  rt->resume_open = 1;
  uv_mutex_unlock(&rt->resume_lock);
  if (setup(rt) != 0) {
    a->failed = 1;
    close_all(rt);
    for (i = 0; i < rt->cfg->nworkers; i++)
      if (a->pipe_fds[i] >= 0) { close(a->pipe_fds[i]); a->pipe_fds[i] = -1; }
  }
  uv_sem_post(&rt->ready);                /* after this, `a` belongs to this thread */
  uv_run(&a->loop, UV_RUN_DEFAULT);
  if (a->listen_fd >= 0) close(a->listen_fd);   /* uv_poll does not close it */
  rc = uv_loop_close(&a->loop);
  if (rc != 0)
    fprintf(stderr, "multiloop: acceptor: loop closed with handles open: %s\n",
            uv_err_name(rc));
}

/* Main thread. Starts the acceptor and waits until it listens or has failed.
 * Returns 0, or -1 with rt->acceptor.error set (the thread is joined then). */
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

/* Main thread. Stops accepting, cancels hand-offs in flight, joins the thread. */
void multiloop_acceptor_stop(multiloop_runtime_t *rt) {
  multiloop_acceptor_t *a = &rt->acceptor;
  if (!a->thread_started) return;
  uv_async_send(&a->stop_async);
  uv_thread_join(&a->thread);
  a->thread_started = 0;
}
