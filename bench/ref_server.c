/*
 * ref_server.c: multiloop's server with no Lua at all, the ceiling that
 * `make bench` measures multiloop's Lua layer against.
 *
 *   ref_server [--host 127.0.0.1] [--port 0] [--workers N]
 *              [--dispatch ipc|queue|reuseport] [--mode echo|http]
 *              [--max-seconds S]
 *
 * The same threads and hand-offs as multiloop, in raw C on libuv:
 *   - ipc: an acceptor thread accepts (uv_poll_t on the listening socket,
 *     accept4 in batches of 64) and sends each fd round-robin to a worker
 *     with uv_write2 over that worker's socketpair, both ends opened as IPC
 *     pipes; the worker uv_accept()s it from its end;
 *   - queue: the same acceptor puts the fd on the worker's mutex list and
 *     rings the worker's uv_async_t; the worker uv_tcp_open()s it;
 *   - reuseport: no acceptor; each worker accepts on its own SO_REUSEPORT
 *     socket bound to the same port.
 * Each worker has its own loop and one 64 KiB read buffer. Connections get
 * TCP_NODELAY, as multiloop's do by default.
 *   - echo: writes back what it reads: uv_try_write first, then only the rest
 *     is queued (a malloc'd copy); reading pauses over 1 MiB queued and
 *     resumes under 256 KiB, as multiloop's write_high_water/low_water;
 *   - http: the same minimal HTTP/1.1 responder as examples/http_hello.lua:
 *     heads end at "\r\n\r\n", pipelined requests are answered in order,
 *     "Connection: close" (and HTTP/1.0 without keep-alive) closes after the
 *     answer, a Content-Length body is skipped.
 *
 * Prints "LISTENING <port>" once every thread is up; stops cleanly on SIGTERM
 * or SIGINT, or by itself after --max-seconds (default 900). Listens on
 * loopback addresses only.
 *
 * Threads: main() owns the main loop (signals, the lifetime timer); the
 * acceptor and every worker own their own loop, used only by themselves.
 * Across threads go only fds (over the socketpair, or the mutex list) and
 * uv_async_send.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#define READ_BUFFER_SIZE (64 * 1024)
#define ACCEPT_BATCH 64
#define HIGH_WATER (1024 * 1024)
#define LOW_WATER (HIGH_WATER / 4)
#define MAX_HEAD 8192

enum { DISPATCH_IPC, DISPATCH_QUEUE, DISPATCH_REUSEPORT };
enum { MODE_ECHO, MODE_HTTP };

static const char RESPONSE[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n\r\nHello, world!\n";
static const char RESPONSE_CLOSE[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n"
    "Connection: close\r\n\r\nHello, world!\n";
#define BODY_LEN 14                /* "Hello, world!\n": left out for HEAD */
static const char RESPONSE_BAD[] =
    "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

typedef struct fd_node {
  struct fd_node *next;
  uv_os_sock_t fd;
} fd_node;

typedef struct worker {
  int id;
  uv_thread_t thread;
  uv_loop_t loop;
  uv_async_t wake;                 /* stop, and (queue) fds waiting */
  uv_mutex_t lock;                 /* guards `queued` */
  fd_node *queued;
  uv_pipe_t pipe;                  /* ipc: our end of the socketpair */
  uv_os_sock_t pipe_fd;            /* ipc: the worker's end of the socketpair */
  uv_os_sock_t acceptor_fd;        /* ipc: the acceptor's end */
  uv_os_sock_t listen_fd;          /* reuseport */
  uv_poll_t listen_poll;
  char *rbuf;
  atomic_int stop;
} worker;

typedef struct {
  uv_tcp_t tcp;
  worker *w;
  char *pend;                      /* http: an unfinished head */
  size_t plen;
  size_t skip;                     /* http: body bytes still to discard */
  unsigned paused : 1;
  unsigned closing : 1;
} conn;

typedef struct {
  uv_write_t req;
  char data[];
} write_req;

/* Everything the threads share, written by main() before any thread starts. */
static struct {
  int nworkers, dispatch, mode, port;
  worker *workers;
  uv_os_sock_t listen_fd;
  /* the acceptor thread */
  uv_thread_t thread;
  uv_loop_t loop;
  uv_async_t stop_async;
  uv_poll_t poll;
  uv_pipe_t *pipes;
  int next;
  uv_sem_t ready;
} g;

/* --- connections ----------------------------------------------------------- */

static void conn_free_cb(uv_handle_t *h) {
  conn *c = h->data;
  free(c->pend);
  free(c);
}

static void conn_close(conn *c) {
  if (c->closing) return;
  c->closing = 1;
  uv_close((uv_handle_t *)&c->tcp, conn_free_cb);
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  conn *c = h->data;
  (void)suggested;
  *buf = uv_buf_init(c->w->rbuf, READ_BUFFER_SIZE);
}

static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

static void write_cb(uv_write_t *req, int status) {
  conn *c = req->handle->data;
  free(req);
  if (status < 0) {
    if (status != UV_ECANCELED) conn_close(c);
    return;
  }
  if (c->paused && !c->closing && c->tcp.write_queue_size <= LOW_WATER) {
    c->paused = 0;
    uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb);
  }
}

/* Sends `len` bytes: the socket first, a copy of the rest queued. */
static int conn_send(conn *c, const char *data, size_t len) {
  uv_buf_t buf = uv_buf_init((char *)(uintptr_t)data, (unsigned)len);
  write_req *wr;
  int n;
  if (c->tcp.write_queue_size == 0) {
    n = uv_try_write((uv_stream_t *)&c->tcp, &buf, 1);
    if (n < 0 && n != UV_EAGAIN) return n;
    if (n == (int)len) return 0;
    if (n > 0) {
      data += n;
      len -= (size_t)n;
    }
  }
  if ((wr = malloc(sizeof *wr + len)) == NULL) return UV_ENOMEM;
  memcpy(wr->data, data, len);
  buf = uv_buf_init(wr->data, (unsigned)len);
  if ((n = uv_write(&wr->req, (uv_stream_t *)&c->tcp, &buf, 1, write_cb)) != 0) {
    free(wr);
    return n;
  }
  if (c->tcp.write_queue_size > HIGH_WATER && !c->paused) {
    c->paused = 1;
    uv_read_stop((uv_stream_t *)&c->tcp);
  }
  return 0;
}

static void shutdown_cb(uv_shutdown_t *req, int status) {
  conn *c = req->handle->data;
  free(req);
  (void)status;
  conn_close(c);
}

/* Closes once queued writes are out. */
static void conn_finish(conn *c) {
  uv_shutdown_t *req;
  uv_read_stop((uv_stream_t *)&c->tcp);
  if (c->tcp.write_queue_size == 0 || (req = malloc(sizeof *req)) == NULL) {
    conn_close(c);
    return;
  }
  if (uv_shutdown(req, (uv_stream_t *)&c->tcp, shutdown_cb) != 0) {
    free(req);
    conn_close(c);
  }
}

/* --- http ------------------------------------------------------------------ */

/* The value of header `name` (with its colon) in head[0..len), or NULL. */
static const char *header(const char *head, size_t len, const char *name, size_t *vlen) {
  size_t nlen = strlen(name);
  const char *p = head, *end = head + len, *eol;
  while ((p = memchr(p, '\n', (size_t)(end - p))) != NULL) {
    p++;
    if ((size_t)(end - p) > nlen && strncasecmp(p, name, nlen) == 0) {
      p += nlen;
      while (p < end && (*p == ' ' || *p == '\t')) p++;
      eol = memchr(p, '\r', (size_t)(end - p));
      *vlen = (size_t)((eol ? eol : end) - p);
      return p;
    }
  }
  return NULL;
}

static int has_token(const char *v, size_t vlen, const char *token) {
  size_t tlen = strlen(token), i;
  for (i = 0; i + tlen <= vlen; i++)
    if (strncasecmp(v + i, token, tlen) == 0) return 1;
  return 0;
}

/* Answers every complete request in data[0..len); keeps an unfinished head.
 * Returns 0, or -1 when the connection is finished. */
static int http_serve(conn *c, const char *data, size_t len) {
  char out[4096];
  size_t olen = 0, pos = 0, vlen;
  int done = 0;
  while (pos < len && !done) {
    const char *head = data + pos, *end, *v, *eol;
    size_t hlen;
    int close_after, head_only;
    if (c->skip > 0) {                     /* a body we do not read */
      size_t n = len - pos < c->skip ? len - pos : c->skip;
      c->skip -= n;
      pos += n;
      continue;
    }
    end = memmem(head, len - pos, "\r\n\r\n", 4);
    if (end == NULL) break;
    hlen = (size_t)(end - head) + 2;       /* through the last header's CRLF */
    eol = memchr(head, '\r', hlen);
    if (eol - head < 10 || memcmp(eol - 8, "HTTP/1.", 7) != 0) {
      if (conn_send(c, out, olen) != 0) return -1;
      conn_send(c, RESPONSE_BAD, sizeof RESPONSE_BAD - 1);
      return -1;
    }
    close_after = eol[-1] == '0';          /* HTTP/1.0: close unless keep-alive */
    if ((v = header(head, hlen, "connection:", &vlen)) != NULL) {
      if (has_token(v, vlen, "close")) close_after = 1;
      else if (has_token(v, vlen, "keep-alive")) close_after = 0;
    }
    if ((v = header(head, hlen, "content-length:", &vlen)) != NULL) c->skip = strtoul(v, NULL, 10);
    head_only = hlen > 5 && memcmp(head, "HEAD ", 5) == 0;
    pos += hlen + 2;
    if (close_after) done = 1;
    if (olen + sizeof RESPONSE_CLOSE > sizeof out) {
      if (conn_send(c, out, olen) != 0) return -1;
      olen = 0;
    }
    if (close_after) {
      memcpy(out + olen, RESPONSE_CLOSE, sizeof RESPONSE_CLOSE - 1);
      olen += sizeof RESPONSE_CLOSE - 1;
    } else {
      memcpy(out + olen, RESPONSE, sizeof RESPONSE - 1);
      olen += sizeof RESPONSE - 1;
    }
    if (head_only) olen -= BODY_LEN;
  }
  if (olen > 0 && conn_send(c, out, olen) != 0) return -1;
  if (done) return -1;
  /* Keep what is left: the start of the next head. */
  if (pos < len) {
    char *p;
    if (len - pos > MAX_HEAD) return -1;
    if (data == c->pend) {
      memmove(c->pend, data + pos, len - pos);
    } else {
      if ((p = realloc(c->pend, MAX_HEAD + READ_BUFFER_SIZE)) == NULL) return -1;
      c->pend = p;
      memcpy(c->pend, data + pos, len - pos);
    }
    c->plen = len - pos;
  } else {
    c->plen = 0;
  }
  return 0;
}

static void http_read(conn *c, const char *data, size_t len) {
  int rc;
  if (c->plen > 0) {                       /* an unfinished head: append */
    memcpy(c->pend + c->plen, data, len);
    rc = http_serve(c, c->pend, c->plen + len);
  } else {
    rc = http_serve(c, data, len);
  }
  if (rc != 0) conn_finish(c);
}

/* --- reading --------------------------------------------------------------- */

static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  conn *c = s->data;
  if (nread > 0) {
    if (g.mode == MODE_HTTP) http_read(c, buf->base, (size_t)nread);
    else if (conn_send(c, buf->base, (size_t)nread) != 0) conn_close(c);
  } else if (nread < 0) {
    if (nread == UV_EOF) conn_finish(c);
    else conn_close(c);
  }
}

/* Takes a connection: from the pipe (fd < 0) or an fd. */
static void conn_take(worker *w, uv_os_sock_t fd) {
  conn *c = calloc(1, sizeof *c);
  int rc;
  if (c == NULL) {
    if (fd >= 0) close(fd);
    return;
  }
  c->w = w;
  uv_tcp_init(&w->loop, &c->tcp);
  c->tcp.data = c;
  rc = fd < 0 ? uv_accept((uv_stream_t *)&w->pipe, (uv_stream_t *)&c->tcp)
              : uv_tcp_open(&c->tcp, fd);
  if (rc != 0) {
    if (fd >= 0) close(fd);
    conn_close(c);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb);
}

/* --- accepting ------------------------------------------------------------- */

typedef struct {
  uv_write_t req;
  uv_tcp_t tcp;
  char byte;
} handoff;

static void handoff_free_cb(uv_handle_t *h) { free(h->data); }

static void handoff_cb(uv_write_t *req, int status) {
  handoff *ho = req->data;
  (void)status;                            /* on failure the client is dropped */
  uv_close((uv_handle_t *)&ho->tcp, handoff_free_cb);
}

static void hand_off(uv_os_sock_t fd) {
  worker *w = &g.workers[g.next];
  g.next = (g.next + 1) % g.nworkers;
  if (g.dispatch == DISPATCH_QUEUE) {
    fd_node *n = malloc(sizeof *n);
    if (n == NULL) {
      close(fd);
      return;
    }
    n->fd = fd;
    uv_mutex_lock(&w->lock);
    n->next = w->queued;                   /* order does not matter here */
    w->queued = n;
    uv_mutex_unlock(&w->lock);
    uv_async_send(&w->wake);
  } else {
    handoff *ho = malloc(sizeof *ho);
    uv_buf_t b;
    if (ho == NULL) {
      close(fd);
      return;
    }
    ho->req.data = ho->tcp.data = ho;
    ho->byte = 'c';
    uv_tcp_init(&g.loop, &ho->tcp);
    if (uv_tcp_open(&ho->tcp, fd) != 0) {
      close(fd);
      uv_close((uv_handle_t *)&ho->tcp, handoff_free_cb);
      return;
    }
    b = uv_buf_init(&ho->byte, 1);
    if (uv_write2(&ho->req, (uv_stream_t *)&g.pipes[w->id], &b, 1, (uv_stream_t *)&ho->tcp,
                  handoff_cb) != 0)
      uv_close((uv_handle_t *)&ho->tcp, handoff_free_cb);
  }
}

/* Accepts up to a batch; `w` is the worker for reuseport, NULL for the
 * acceptor. */
static void accept_some(uv_os_sock_t lfd, worker *w) {
  int n;
  for (n = 0; n < ACCEPT_BATCH; n++) {
    uv_os_sock_t fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;                              /* EAGAIN, or out of fds: next wake-up */
    }
    if (w) conn_take(w, fd);
    else hand_off(fd);
  }
}

static void acceptor_poll_cb(uv_poll_t *p, int status, int events) {
  (void)p;
  (void)events;
  if (status == 0) accept_some(g.listen_fd, NULL);
}

static void worker_poll_cb(uv_poll_t *p, int status, int events) {
  worker *w = p->data;
  (void)events;
  if (status == 0) accept_some(w->listen_fd, w);
}

/* --- threads --------------------------------------------------------------- */

/* Stop: every handle of the loop closes; a connection frees itself. */
static void worker_close_walk_cb(uv_handle_t *h, void *arg) {
  (void)arg;
  if (uv_is_closing(h)) return;
  if (h->type == UV_TCP) conn_close(h->data);
  else uv_close(h, NULL);
}

static void acceptor_close_walk_cb(uv_handle_t *h, void *arg) {
  (void)arg;
  if (uv_is_closing(h)) return;
  /* A hand-off still in flight is freed by its write callback (cancelled). */
  if (h->type != UV_TCP) uv_close(h, NULL);
}

static void acceptor_stop_cb(uv_async_t *a) {
  (void)a;
  uv_walk(&g.loop, acceptor_close_walk_cb, NULL);
}

static void acceptor_main(void *arg) {
  int i;
  (void)arg;
  uv_loop_init(&g.loop);
  uv_async_init(&g.loop, &g.stop_async, acceptor_stop_cb);
  for (i = 0; i < g.nworkers && g.dispatch == DISPATCH_IPC; i++) {
    uv_pipe_init(&g.loop, &g.pipes[i], 1);
    if (uv_pipe_open(&g.pipes[i], g.workers[i].acceptor_fd) != 0) {
      fprintf(stderr, "ref_server: cannot open a hand-off pipe\n");
      exit(1);
    }
  }
  uv_poll_init_socket(&g.loop, &g.poll, g.listen_fd);
  uv_poll_start(&g.poll, UV_READABLE, acceptor_poll_cb);
  uv_sem_post(&g.ready);
  uv_run(&g.loop, UV_RUN_DEFAULT);
  close(g.listen_fd);
  if (uv_loop_close(&g.loop) != 0) fprintf(stderr, "ref_server: acceptor: handles left open\n");
}

static void pipe_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  worker *w = h->data;
  (void)suggested;
  *buf = uv_buf_init(w->rbuf, READ_BUFFER_SIZE);
}

/* A byte on the pipe carries a connection (several when reads coalesce). */
static void pipe_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  worker *w = s->data;
  (void)buf;
  if (nread < 0) {
    uv_read_stop(s);
    return;
  }
  while (uv_pipe_pending_count(&w->pipe) > 0) conn_take(w, -1);
}

static void wake_cb(uv_async_t *a) {
  worker *w = a->data;
  fd_node *list, *next;
  uv_mutex_lock(&w->lock);
  list = w->queued;
  w->queued = NULL;
  uv_mutex_unlock(&w->lock);
  for (; list; list = next) {
    next = list->next;
    if (atomic_load(&w->stop)) close(list->fd);
    else conn_take(w, list->fd);
    free(list);
  }
  if (atomic_load(&w->stop)) uv_walk(&w->loop, worker_close_walk_cb, NULL);
}

static void worker_main(void *arg) {
  worker *w = arg;
  uv_loop_init(&w->loop);
  uv_async_init(&w->loop, &w->wake, wake_cb);
  w->wake.data = w;
  if (g.dispatch == DISPATCH_IPC) {
    uv_pipe_init(&w->loop, &w->pipe, 1);
    w->pipe.data = w;
    if (uv_pipe_open(&w->pipe, w->pipe_fd) != 0 ||
        uv_read_start((uv_stream_t *)&w->pipe, pipe_alloc_cb, pipe_read_cb) != 0) {
      fprintf(stderr, "ref_server: worker %d: cannot open its pipe\n", w->id);
      exit(1);
    }
  } else if (g.dispatch == DISPATCH_REUSEPORT) {
    uv_poll_init_socket(&w->loop, &w->listen_poll, w->listen_fd);
    w->listen_poll.data = w;
    uv_poll_start(&w->listen_poll, UV_READABLE, worker_poll_cb);
  }
  uv_sem_post(&g.ready);
  uv_run(&w->loop, UV_RUN_DEFAULT);
  if (g.dispatch == DISPATCH_REUSEPORT) close(w->listen_fd);
  if (uv_loop_close(&w->loop) != 0)
    fprintf(stderr, "ref_server: worker %d: handles left open\n", w->id);
}

/* --- main ------------------------------------------------------------------ */

static uv_os_sock_t listen_on(const struct sockaddr *sa, socklen_t len, int reuseport) {
  int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), on = 1;
  if (fd < 0) return -1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  if (reuseport) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof on);
  if (bind(fd, sa, len) != 0 || listen(fd, 511) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

static int bound_port(uv_os_sock_t fd) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  getsockname(fd, (struct sockaddr *)&ss, &len);
  return ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                        : ((struct sockaddr_in *)&ss)->sin_port);
}

static uv_signal_t sigterm, sigint;
static uv_timer_t lifetime;

static void quit_main_loop(void) {
  uv_close((uv_handle_t *)&sigterm, NULL);
  uv_close((uv_handle_t *)&sigint, NULL);
  uv_close((uv_handle_t *)&lifetime, NULL);
}

static void signal_cb(uv_signal_t *s, int signum) {
  (void)s;
  (void)signum;
  quit_main_loop();
}

static void lifetime_cb(uv_timer_t *t) {
  (void)t;
  fprintf(stderr, "ref_server: --max-seconds reached, stopping\n");
  quit_main_loop();
}

static void usage(void) {
  fprintf(stderr, "usage: ref_server [--host 127.0.0.1] [--port 0] [--workers N]\n"
                  "                  [--dispatch ipc|queue|reuseport] [--mode echo|http]\n"
                  "                  [--max-seconds S]\n");
  exit(2);
}

int main(int argc, char **argv) {
  const char *host = "127.0.0.1";
  struct sockaddr_storage ss;
  socklen_t sslen;
  int i, max_seconds = 900, port = 0;
  uv_loop_t *main_loop = uv_default_loop();

  g.nworkers = 1;
  g.dispatch = DISPATCH_IPC;
  g.mode = MODE_ECHO;
  for (i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (v == NULL) usage();
    if (strcmp(a, "--host") == 0) host = v;
    else if (strcmp(a, "--port") == 0) port = atoi(v);
    else if (strcmp(a, "--workers") == 0) g.nworkers = atoi(v);
    else if (strcmp(a, "--max-seconds") == 0) max_seconds = atoi(v);
    else if (strcmp(a, "--dispatch") == 0) {
      if (strcmp(v, "ipc") == 0) g.dispatch = DISPATCH_IPC;
      else if (strcmp(v, "queue") == 0) g.dispatch = DISPATCH_QUEUE;
      else if (strcmp(v, "reuseport") == 0) g.dispatch = DISPATCH_REUSEPORT;
      else usage();
    } else if (strcmp(a, "--mode") == 0) {
      if (strcmp(v, "echo") == 0) g.mode = MODE_ECHO;
      else if (strcmp(v, "http") == 0) g.mode = MODE_HTTP;
      else usage();
    } else usage();
    i++;
  }
  if (g.nworkers < 1 || g.nworkers > 256 || port < 0 || port > 65535 || max_seconds < 1) usage();

  /* Loopback only: this is a benchmark target, not a server to expose. */
  memset(&ss, 0, sizeof ss);
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)&ss) == 0 &&
      (ntohl(((struct sockaddr_in *)&ss)->sin_addr.s_addr) >> 24) == 127) {
    sslen = sizeof(struct sockaddr_in);
  } else if (uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss) == 0 &&
             IN6_IS_ADDR_LOOPBACK(&((struct sockaddr_in6 *)&ss)->sin6_addr)) {
    sslen = sizeof(struct sockaddr_in6);
  } else {
    fprintf(stderr, "ref_server: --host must be a loopback address (127.0.0.0/8 or ::1)\n");
    return 2;
  }

  g.workers = calloc((size_t)g.nworkers, sizeof *g.workers);
  g.pipes = calloc((size_t)g.nworkers, sizeof *g.pipes);
  if (g.workers == NULL || g.pipes == NULL) return 1;
  uv_sem_init(&g.ready, 0);
  g.listen_fd = listen_on((struct sockaddr *)&ss, sslen, g.dispatch == DISPATCH_REUSEPORT);
  if (g.listen_fd < 0) {
    fprintf(stderr, "ref_server: cannot listen on %s port %d: %s\n", host, port, strerror(errno));
    return 1;
  }
  g.port = bound_port(g.listen_fd);
  if (ss.ss_family == AF_INET6) ((struct sockaddr_in6 *)&ss)->sin6_port = htons((uint16_t)g.port);
  else ((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)g.port);

  for (i = 0; i < g.nworkers; i++) {
    worker *w = &g.workers[i];
    w->id = i;
    w->pipe_fd = w->acceptor_fd = w->listen_fd = -1;
    uv_mutex_init(&w->lock);
    if ((w->rbuf = malloc(READ_BUFFER_SIZE)) == NULL) return 1;
    if (g.dispatch == DISPATCH_IPC) {
      int fds[2];
      if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) return 1;
      w->acceptor_fd = fds[0];             /* each end is opened on its own thread's loop */
      w->pipe_fd = fds[1];
    } else if (g.dispatch == DISPATCH_REUSEPORT) {
      w->listen_fd = i == 0 ? g.listen_fd
                            : listen_on((struct sockaddr *)&ss, sslen, 1);
      if (w->listen_fd < 0) {
        fprintf(stderr, "ref_server: cannot listen (reuseport): %s\n", strerror(errno));
        return 1;
      }
    }
  }
  for (i = 0; i < g.nworkers; i++) {
    if (uv_thread_create(&g.workers[i].thread, worker_main, &g.workers[i]) != 0) return 1;
    uv_sem_wait(&g.ready);
  }
  if (g.dispatch != DISPATCH_REUSEPORT) {
    if (uv_thread_create(&g.thread, acceptor_main, NULL) != 0) return 1;
    uv_sem_wait(&g.ready);
  }

  uv_signal_init(main_loop, &sigterm);
  uv_signal_init(main_loop, &sigint);
  uv_signal_start(&sigterm, signal_cb, SIGTERM);
  uv_signal_start(&sigint, signal_cb, SIGINT);
  uv_timer_init(main_loop, &lifetime);
  uv_timer_start(&lifetime, lifetime_cb, (uint64_t)max_seconds * 1000, 0);
  printf("LISTENING %d\n", g.port);
  fflush(stdout);
  uv_run(main_loop, UV_RUN_DEFAULT);

  /* Stop: the acceptor first (no new hand-offs), then the workers. */
  if (g.dispatch != DISPATCH_REUSEPORT) {
    uv_async_send(&g.stop_async);
    uv_thread_join(&g.thread);
  }
  for (i = 0; i < g.nworkers; i++) {
    atomic_store(&g.workers[i].stop, 1);
    uv_async_send(&g.workers[i].wake);
  }
  for (i = 0; i < g.nworkers; i++) {
    uv_thread_join(&g.workers[i].thread);
    uv_mutex_destroy(&g.workers[i].lock);
    free(g.workers[i].rbuf);
  }
  uv_loop_close(main_loop);
  free(g.workers);
  free(g.pipes);
  return 0;
}
