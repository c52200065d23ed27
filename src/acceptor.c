/*
 * acceptor.c: the acceptor thread. It owns the listening socket, its own uv
 * loop, and the acceptor ends of the per-worker socketpairs, opened as IPC
 * pipes. Each accepted connection is sent round-robin to a worker with
 * uv_write2 (SCM_RIGHTS); the acceptor closes its copy once the write is done,
 * so the worker's copy is then the only one.
 *
 * Threads: multiloop_acceptor_start and _stop are called by the main thread;
 * everything else runs on the acceptor thread. A hand-off in flight owns one
 * malloc'd `handoff` (the write request and the acceptor's uv_tcp_t), freed in
 * the close callback of that uv_tcp_t, also when stop cancels the write.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "multiloop.h"

typedef struct {
  uv_write_t req;
  uv_tcp_t tcp;
  char byte;                              /* IPC needs a byte to carry the fd */
} handoff;

static void handoff_free_cb(uv_handle_t *h) { free(h->data); }

static void handoff_write_cb(uv_write_t *req, int status) {
  handoff *ho = req->data;
  /* On failure (a worker gone, or stop cancelled it) the client is closed:
   * its only copy of the fd is ours. */
  (void)status;
  uv_close((uv_handle_t *)&ho->tcp, handoff_free_cb);
}

static void connection_cb(uv_stream_t *listener, int status) {
  multiloop_runtime_t *rt = listener->data;
  multiloop_acceptor_t *a = &rt->acceptor;
  handoff *ho;
  uv_buf_t byte;
  int rc;

  if (status < 0) return;
  ho = malloc(sizeof *ho);
  if (ho == NULL) return;                 /* it waits in the backlog; we are called again */
  uv_tcp_init(&a->loop, &ho->tcp);
  ho->tcp.data = ho;
  ho->req.data = ho;
  ho->byte = 'c';
  byte = uv_buf_init(&ho->byte, 1);
  if (uv_accept(listener, (uv_stream_t *)&ho->tcp) != 0) {
    uv_close((uv_handle_t *)&ho->tcp, handoff_free_cb);
    return;
  }
  rc = uv_write2(&ho->req, (uv_stream_t *)&a->pipes[a->next], &byte, 1,
                 (uv_stream_t *)&ho->tcp, handoff_write_cb);
  a->next = (a->next + 1) % rt->cfg->nworkers;
  if (rc != 0) uv_close((uv_handle_t *)&ho->tcp, handoff_free_cb);
}

static void close_all(multiloop_acceptor_t *a, int nworkers) {
  int i;
  if (!uv_is_closing((uv_handle_t *)&a->listener))
    uv_close((uv_handle_t *)&a->listener, NULL);
  for (i = 0; i < nworkers; i++)
    if (!uv_is_closing((uv_handle_t *)&a->pipes[i]))
      uv_close((uv_handle_t *)&a->pipes[i], NULL);
  if (!uv_is_closing((uv_handle_t *)&a->stop_async))
    uv_close((uv_handle_t *)&a->stop_async, NULL);
}

static void stop_cb(uv_async_t *async) {
  multiloop_runtime_t *rt = async->data;
  close_all(&rt->acceptor, rt->cfg->nworkers);
}

static int parse_address(const char *host, int port, struct sockaddr_storage *ss) {
  if (strchr(host, ':') != NULL)
    return uv_ip6_addr(host, port, (struct sockaddr_in6 *)ss);
  return uv_ip4_addr(host, port, (struct sockaddr_in *)ss);
}

/* Sets up the loop, the pipes and the listener; returns 0 or a uv error, with
 * a.error set to a message naming the step that failed. */
static int listen_on(multiloop_runtime_t *rt) {
  multiloop_acceptor_t *a = &rt->acceptor;
  const multiloop_config_t *cfg = rt->cfg;
  struct sockaddr_storage ss;
  int namelen = sizeof ss, rc, i;
  const char *step;

  for (i = 0; i < cfg->nworkers; i++) {
    if ((rc = uv_pipe_open(&a->pipes[i], a->pipe_fds[i])) != 0) {
      step = "open hand-off pipe";
      goto fail;
    }
    a->pipe_fds[i] = -1;                  /* the pipe handle owns it now */
  }
  step = "address";
  if ((rc = parse_address(cfg->host, cfg->port, &ss)) != 0) goto fail;
  step = "bind";
  if ((rc = uv_tcp_bind(&a->listener, (struct sockaddr *)&ss, 0)) != 0) goto fail;
  step = "listen";
  if ((rc = uv_listen((uv_stream_t *)&a->listener, cfg->backlog, connection_cb)) != 0)
    goto fail;
  step = "getsockname";
  if ((rc = uv_tcp_getsockname(&a->listener, (struct sockaddr *)&ss, &namelen)) != 0)
    goto fail;
  if (ss.ss_family == AF_INET6) {
    uv_ip6_name((struct sockaddr_in6 *)&ss, a->bound_host, sizeof a->bound_host);
    a->bound_port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
  } else {
    uv_ip4_name((struct sockaddr_in *)&ss, a->bound_host, sizeof a->bound_host);
    a->bound_port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
  }
  return 0;

fail:
  {
    char msg[512];
    if (strcmp(step, "address") == 0)
      snprintf(msg, sizeof msg, "invalid host '%s': %s (%s)", cfg->host,
               uv_strerror(rc), uv_err_name(rc));
    else
      snprintf(msg, sizeof msg, "%s %s port %d: %s (%s)", step, cfg->host,
               cfg->port, uv_strerror(rc), uv_err_name(rc));
    a->error = strdup(msg);
  }
  return rc;
}

static void acceptor_main(void *arg) {
  multiloop_runtime_t *rt = arg;
  multiloop_acceptor_t *a = &rt->acceptor;
  int i, rc;

  uv_loop_init(&a->loop);
  uv_async_init(&a->loop, &a->stop_async, stop_cb);
  a->stop_async.data = rt;
  uv_tcp_init(&a->loop, &a->listener);
  a->listener.data = rt;
  for (i = 0; i < rt->cfg->nworkers; i++) uv_pipe_init(&a->loop, &a->pipes[i], 1);
  if (listen_on(rt) != 0) {
    a->failed = 1;
    close_all(a, rt->cfg->nworkers);
    for (i = 0; i < rt->cfg->nworkers; i++)
      if (a->pipe_fds[i] >= 0) { close(a->pipe_fds[i]); a->pipe_fds[i] = -1; }
  }
  uv_sem_post(&rt->ready);                /* after this, `a` belongs to this thread */
  uv_run(&a->loop, UV_RUN_DEFAULT);
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
