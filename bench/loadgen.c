/*
 * loadgen.c: a bounded, loopback-only TCP load generator for `make bench`.
 *
 *   loadgen --port P [--host 127.0.0.1] --mode echo|connrate|idle
 *           [--conns C] [--size S] [--depth D] [--duration SECONDS]
 *           [--threads T]
 *
 * Modes:
 *   echo      C persistent connections, each keeping D messages of S bytes in
 *             flight (pipeline depth D). Every echoed byte is checked against
 *             what was sent. Reports ops/s (a message sent and fully echoed),
 *             MB/s of echoed payload, and p50/p99/p999 latency per message.
 *   connrate  C concurrent loops of connect, send S bytes, read them back,
 *             close. Reports connections/s and p50/p99/p999 of the whole loop.
 *   idle      opens C connections, one 1-byte round trip each (so the server
 *             has served every one), prints "READY <n>", then holds them open
 *             until the duration ends or SIGTERM/SIGINT arrives. For measuring
 *             the server's memory per idle connection.
 *
 * Bounds: every run stops by itself after --duration seconds (plus at most one
 * second to drain replies in flight; idle mode holds for at most the duration).
 * Only loopback targets are accepted: 127.0.0.0/8, ::1 or "localhost".
 *
 * The last line printed is machine-readable: `RESULT key=value ...`.
 *
 * Threads: each of the T threads owns its own epoll set and a share of the
 * connections; nothing is shared between threads while running except the
 * stop flag. Per-thread counters and latency histograms are merged after the
 * threads are joined.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PATTERN_PERIOD 251u               /* prime: a shifted byte is caught */
#define MAX_WINDOW (64 * 1024)            /* depth * size, and the read size */
#define PATTERN_LEN (PATTERN_PERIOD + MAX_WINDOW)
#define DRAIN_NS 1000000000LL             /* wait this long for replies in flight */
#define IDLE_CONNECTING_MAX 256           /* idle mode: handshakes at once */

typedef enum { MODE_ECHO, MODE_CONNRATE, MODE_IDLE } mode_t_;

/* --- options --------------------------------------------------------------- */

typedef struct {
  struct sockaddr_storage addr;
  socklen_t addrlen;
  mode_t_ mode;
  int conns, size, depth, threads;
  double duration;
} options;

static options opt;
static unsigned char pattern[PATTERN_LEN];
static atomic_int stop_now;               /* set by SIGTERM/SIGINT */

/* --- latency histogram ----------------------------------------------------- */

/* Log-linear buckets over nanoseconds: 2^k groups of 32 linear sub-buckets
 * each, so a bucket is at most about 3% wide. */
#define SUB_BITS 5
#define SUB (1 << SUB_BITS)
#define GROUPS 40
typedef struct {
  uint64_t counts[GROUPS * SUB];
  uint64_t total;
} histogram;

static int bucket_of(uint64_t ns) {
  int msb, group;
  if (ns < SUB) return (int)ns;
  msb = 63 - __builtin_clzll(ns);
  group = msb - SUB_BITS + 1;
  if (group >= GROUPS) return GROUPS * SUB - 1;
  return group * SUB + (int)((ns >> (msb - SUB_BITS)) & (SUB - 1));
}

/* The upper edge of a bucket, in ns. */
static uint64_t bucket_value(int b) {
  int group = b / SUB, sub = b % SUB;
  if (group == 0) return (uint64_t)sub;
  return ((uint64_t)(SUB + sub + 1) << (group - 1)) - 1;
}

static void hist_add(histogram *h, uint64_t ns) {
  h->counts[bucket_of(ns)]++;
  h->total++;
}

static double hist_percentile_us(const histogram *h, double p) {
  uint64_t want, seen = 0;
  int b;
  if (h->total == 0) return 0;
  want = (uint64_t)(p / 100.0 * (double)h->total + 0.5);
  if (want < 1) want = 1;
  for (b = 0; b < GROUPS * SUB; b++) {
    seen += h->counts[b];
    if (seen >= want) return (double)bucket_value(b) / 1000.0;
  }
  return (double)bucket_value(GROUPS * SUB - 1) / 1000.0;
}

/* --- time ------------------------------------------------------------------ */

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* --- connections ----------------------------------------------------------- */

typedef enum { C_FREE, C_CONNECTING, C_OPEN, C_DONE } conn_state;

typedef struct {
  int fd;
  conn_state state;
  unsigned seed;                          /* shifts the pattern per connection */
  uint64_t sent, target, recvd;           /* stream offsets in bytes */
  int64_t started;                        /* connrate: when the loop began */
  int64_t *sent_at;                       /* echo: send time per slot (depth) */
  uint32_t events;                        /* what epoll watches now */
} conn;

typedef struct {
  int id, epfd;
  int nconns;
  conn *conns;
  pthread_t thread;
  int64_t start, deadline;
  /* results */
  uint64_t ops, bytes, errors, connect_errors, verify_errors, ready;
  int handshakes;                         /* idle: connections not yet served */
  histogram hist;
  char last_error[96];
} worker;

static void note_error(worker *w, const char *what, int err) {
  w->errors++;
  if (w->last_error[0] == '\0')
    snprintf(w->last_error, sizeof w->last_error, "%s:%s", what, err ? strerror(err) : "eof");
}

static int watch(worker *w, conn *c, uint32_t events) {
  struct epoll_event ev;
  int op = c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
  if (c->events == events) return 0;
  ev.events = events;
  ev.data.ptr = c;
  if (epoll_ctl(w->epfd, op, c->fd, &ev) != 0) return -1;
  c->events = events;
  return 0;
}

static void conn_close(worker *w, conn *c) {
  if (c->fd >= 0) {
    if (c->events) epoll_ctl(w->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
  }
  c->fd = -1;
  c->events = 0;
  c->state = C_DONE;
}

/* Starts a non-blocking connect; the connection is C_CONNECTING after it. */
static int conn_start(worker *w, conn *c) {
  int fd = socket(opt.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
  c->fd = fd;
  c->events = 0;
  c->sent = c->target = c->recvd = 0;
  c->started = now_ns();
  if (fd < 0) {
    w->connect_errors++;
    note_error(w, "socket", errno);
    c->state = C_DONE;
    return -1;
  }
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (struct sockaddr *)&opt.addr, opt.addrlen) != 0 && errno != EINPROGRESS) {
    w->connect_errors++;
    note_error(w, "connect", errno);
    conn_close(w, c);
    return -1;
  }
  c->state = C_CONNECTING;
  if (watch(w, c, EPOLLOUT) != 0) {
    note_error(w, "epoll_ctl", errno);
    conn_close(w, c);
    return -1;
  }
  return 0;
}

/* The bytes of the stream at offset `off` for this connection. */
static const unsigned char *stream_at(const conn *c, uint64_t off) {
  return pattern + (off + c->seed) % PATTERN_PERIOD;
}

/* Writes what is due (sent .. target). Returns -1 on a socket error. */
static int flush_out(worker *w, conn *c) {
  while (c->sent < c->target) {
    size_t len = (size_t)(c->target - c->sent);
    ssize_t n;
    if (len > MAX_WINDOW) len = MAX_WINDOW;
    n = send(c->fd, stream_at(c, c->sent), len, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      if (errno == EINTR) continue;
      note_error(w, "send", errno);
      return -1;
    }
    c->sent += (uint64_t)n;
  }
  return watch(w, c, EPOLLIN | (c->sent < c->target ? EPOLLOUT : 0));
}

/* Reads what is there and checks it. Returns bytes read, 0 for nothing yet,
 * -1 on error (EOF included: the server must never close first). */
static ssize_t read_check(worker *w, conn *c, unsigned char *buf) {
  ssize_t n;
  for (;;) {
    n = recv(c->fd, buf, MAX_WINDOW, 0);
    if (n > 0) break;
    if (n == 0) {
      note_error(w, "recv", 0);
      return -1;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    note_error(w, "recv", errno);
    return -1;
  }
  if (c->recvd + (uint64_t)n > c->sent ||
      memcmp(buf, stream_at(c, c->recvd), (size_t)n) != 0) {
    w->verify_errors++;
    note_error(w, "verify", EBADMSG);
    return -1;
  }
  c->recvd += (uint64_t)n;
  return n;
}

static int connected_ok(worker *w, conn *c) {
  int err = 0;
  socklen_t len = sizeof err;
  getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
  if (err != 0) {
    w->connect_errors++;
    note_error(w, "connect", err);
    return 0;
  }
  c->state = C_OPEN;
  return 1;
}

/* --- echo ------------------------------------------------------------------ */

static void echo_event(worker *w, conn *c, uint32_t events, unsigned char *buf, int draining) {
  uint64_t size = (uint64_t)opt.size, done_before, done_after, m;
  int64_t t;
  ssize_t n;
  if (c->state == C_CONNECTING) {
    if (!connected_ok(w, c)) {
      conn_close(w, c);
      return;
    }
    t = now_ns();
    for (m = 0; m < (uint64_t)opt.depth; m++) c->sent_at[m] = t;
    c->target = size * (uint64_t)opt.depth;
    if (flush_out(w, c) != 0) conn_close(w, c);
    return;
  }
  if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
    done_before = c->recvd / size;
    if ((n = read_check(w, c, buf)) < 0) {
      conn_close(w, c);
      return;
    }
    done_after = c->recvd / size;
    if (done_after > done_before) {
      t = now_ns();
      for (m = done_before; m < done_after; m++) {
        int slot = (int)(m % (uint64_t)opt.depth);
        if (!draining) {
          hist_add(&w->hist, (uint64_t)(t - c->sent_at[slot]));
          w->ops++;
          w->bytes += size;
        }
        c->sent_at[slot] = t;              /* message m + depth leaves now */
      }
      if (!draining) c->target = (done_after + (uint64_t)opt.depth) * size;
    }
  }
  if (flush_out(w, c) != 0) conn_close(w, c);
}

/* --- connrate -------------------------------------------------------------- */

static void connrate_event(worker *w, conn *c, uint32_t events, unsigned char *buf, int draining) {
  ssize_t n;
  if (c->state == C_CONNECTING) {
    if (!connected_ok(w, c)) goto next;
    c->target = (uint64_t)opt.size;
    if (flush_out(w, c) != 0) goto next;
    return;
  }
  if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
    if ((n = read_check(w, c, buf)) < 0) goto next;
    if (c->recvd == (uint64_t)opt.size) {
      if (!draining) {
        hist_add(&w->hist, (uint64_t)(now_ns() - c->started));
        w->ops++;
        w->bytes += (uint64_t)opt.size;
      }
      goto next;
    }
  }
  if (flush_out(w, c) != 0) goto next;
  return;
next:
  conn_close(w, c);
  c->seed++;
  if (!draining) conn_start(w, c);
}

/* --- idle ------------------------------------------------------------------ */

static void idle_fail(worker *w, conn *c) {
  if (c->recvd == 0) w->handshakes--;
  else w->ready--;
  conn_close(w, c);
}

static void idle_event(worker *w, conn *c, uint32_t events, unsigned char *buf) {
  if (c->state == C_CONNECTING) {
    if (!connected_ok(w, c)) {
      idle_fail(w, c);
      return;
    }
    c->target = 1;
    if (flush_out(w, c) != 0) idle_fail(w, c);
    return;
  }
  if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
    uint64_t before = c->recvd;
    ssize_t n = read_check(w, c, buf);
    if (n < 0) {
      if (before == 1) c->recvd = 1;       /* it was counted as ready */
      idle_fail(w, c);
      return;
    }
    if (n > 0) {                           /* served: now it just sits there */
      w->handshakes--;
      w->ready++;
      return;
    }
  }
  if (c->recvd == 0 && flush_out(w, c) != 0) idle_fail(w, c);
}

/* --- the thread ------------------------------------------------------------ */

static int pending_in_flight(const worker *w) {
  int i;
  for (i = 0; i < w->nconns; i++) {
    const conn *c = &w->conns[i];
    if (c->state == C_CONNECTING) return 1;
    if (c->state == C_OPEN && c->recvd < c->sent) return 1;
  }
  return 0;
}

static atomic_int threads_ready;

static void *worker_main(void *arg) {
  worker *w = arg;
  struct epoll_event evs[256];
  unsigned char *buf = malloc(MAX_WINDOW);
  int i, n, draining = 0, next_idle = 0, announced = 0;
  int64_t t, drain_until = 0;

  if (buf == NULL) {
    note_error(w, "malloc", ENOMEM);
    return NULL;
  }
  if (opt.mode != MODE_IDLE) {
    for (i = 0; i < w->nconns; i++) conn_start(w, &w->conns[i]);
  }
  for (;;) {
    t = now_ns();
    if (opt.mode == MODE_IDLE) {
      /* Open connections a few hundred at a time: a burst of thousands of
       * SYNs overflows the server's backlog and costs seconds of retries. */
      while (next_idle < w->nconns && w->handshakes < IDLE_CONNECTING_MAX && !stop_now) {
        if (conn_start(w, &w->conns[next_idle++]) == 0) w->handshakes++;
      }
      if (!announced && next_idle == w->nconns && w->handshakes == 0) {
        announced = 1;
        atomic_fetch_add(&threads_ready, 1);
      }
      if (t >= w->deadline || stop_now) break;
    } else if (!draining && (t >= w->deadline || stop_now)) {
      draining = 1;
      drain_until = t + DRAIN_NS;
    } else if (opt.mode == MODE_CONNRATE && !draining) {
      /* A loop whose connect failed at once (no free port, no fd) retries. */
      for (i = 0; i < w->nconns; i++)
        if (w->conns[i].state == C_DONE) conn_start(w, &w->conns[i]);
    }
    if (draining && (t >= drain_until || !pending_in_flight(w))) break;
    n = epoll_wait(w->epfd, evs, 256, 10);
    if (n < 0 && errno != EINTR) {
      note_error(w, "epoll_wait", errno);
      break;
    }
    for (i = 0; i < n; i++) {
      conn *c = evs[i].data.ptr;
      if (c->state != C_CONNECTING && c->state != C_OPEN) continue;
      switch (opt.mode) {
        case MODE_ECHO: echo_event(w, c, evs[i].events, buf, draining); break;
        case MODE_CONNRATE: connrate_event(w, c, evs[i].events, buf, draining); break;
        case MODE_IDLE: idle_event(w, c, evs[i].events, buf); break;
      }
    }
  }
  for (i = 0; i < w->nconns; i++) conn_close(w, &w->conns[i]);
  free(buf);
  return NULL;
}

/* --- main ------------------------------------------------------------------ */

static void usage(void) {
  fprintf(stderr,
          "usage: loadgen --port P [--host 127.0.0.1] --mode echo|connrate|idle\n"
          "               [--conns C] [--size BYTES] [--depth D] [--duration SECONDS]\n"
          "               [--threads T]\n");
  exit(2);
}

static long parse_long(const char *name, const char *s, long lo, long hi) {
  char *end;
  long v;
  errno = 0;
  v = strtol(s, &end, 10);
  if (errno || *end || v < lo || v > hi) {
    fprintf(stderr, "loadgen: --%s must be an integer from %ld to %ld (got '%s')\n", name, lo,
            hi, s);
    exit(2);
  }
  return v;
}

/* Loopback only: 127.0.0.0/8, ::1, or the name "localhost". */
static void set_target(const char *host, int port) {
  struct sockaddr_in *in4 = (struct sockaddr_in *)&opt.addr;
  struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&opt.addr;
  memset(&opt.addr, 0, sizeof opt.addr);
  if (strcmp(host, "localhost") == 0) host = "127.0.0.1";
  if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
    if ((ntohl(in4->sin_addr.s_addr) >> 24) != 127) goto refuse;
    in4->sin_family = AF_INET;
    in4->sin_port = htons((uint16_t)port);
    opt.addrlen = sizeof *in4;
    return;
  }
  if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
    if (!IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr)) goto refuse;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    opt.addrlen = sizeof *in6;
    return;
  }
refuse:
  fprintf(stderr, "loadgen: refusing target '%s': only loopback addresses "
                  "(127.0.0.0/8, ::1, localhost) may be loaded\n", host);
  exit(2);
}

static void on_signal(int sig) {
  (void)sig;
  atomic_store(&stop_now, 1);
}

int main(int argc, char **argv) {
  const char *host = "127.0.0.1", *mode = NULL;
  int port = -1, i, t, k, announced = 0;
  worker *ws;
  histogram *all;
  uint64_t ops = 0, bytes = 0, errors = 0, cerr = 0, verr = 0, ready = 0;
  double elapsed;
  int64_t start;
  struct sigaction sa;
  const char *last_error = "";

  opt.conns = 64;
  opt.size = 64;
  opt.depth = 1;
  opt.threads = 1;
  opt.duration = 5;
  for (i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (v == NULL) usage();
    if (strcmp(a, "--host") == 0) host = v;
    else if (strcmp(a, "--port") == 0) port = (int)parse_long("port", v, 1, 65535);
    else if (strcmp(a, "--mode") == 0) mode = v;
    else if (strcmp(a, "--conns") == 0) opt.conns = (int)parse_long("conns", v, 1, 100000);
    else if (strcmp(a, "--size") == 0) opt.size = (int)parse_long("size", v, 1, MAX_WINDOW);
    else if (strcmp(a, "--depth") == 0) opt.depth = (int)parse_long("depth", v, 1, 1024);
    else if (strcmp(a, "--threads") == 0) opt.threads = (int)parse_long("threads", v, 1, 64);
    else if (strcmp(a, "--duration") == 0) {
      opt.duration = atof(v);
      if (!(opt.duration > 0 && opt.duration <= 3600)) {
        fprintf(stderr, "loadgen: --duration must be from 0 to 3600 seconds\n");
        return 2;
      }
    } else usage();
    i++;
  }
  if (port < 0 || mode == NULL) usage();
  if (strcmp(mode, "echo") == 0) opt.mode = MODE_ECHO;
  else if (strcmp(mode, "connrate") == 0) opt.mode = MODE_CONNRATE;
  else if (strcmp(mode, "idle") == 0) opt.mode = MODE_IDLE;
  else usage();
  if (opt.mode == MODE_ECHO && (long)opt.size * opt.depth > MAX_WINDOW) {
    fprintf(stderr, "loadgen: --size times --depth must be at most %d\n", MAX_WINDOW);
    return 2;
  }
  if (opt.threads > opt.conns) opt.threads = opt.conns;
  set_target(host, port);

  for (i = 0; i < (int)PATTERN_LEN; i++) pattern[i] = (unsigned char)(((unsigned)i % PATTERN_PERIOD) * 7 + 1);
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);

  ws = calloc((size_t)opt.threads, sizeof *ws);
  all = calloc(1, sizeof *all);
  if (ws == NULL || all == NULL) return 1;
  start = now_ns();
  for (t = 0, k = 0; t < opt.threads; t++) {
    worker *w = &ws[t];
    w->id = t;
    w->nconns = opt.conns / opt.threads + (t < opt.conns % opt.threads);
    w->conns = calloc((size_t)w->nconns, sizeof *w->conns);
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (w->conns == NULL || w->epfd < 0) return 1;
    for (i = 0; i < w->nconns; i++, k++) {
      conn *c = &w->conns[i];
      c->fd = -1;
      c->seed = (unsigned)k * 13u;
      if (opt.mode == MODE_ECHO) {
        c->sent_at = calloc((size_t)opt.depth, sizeof *c->sent_at);
        if (c->sent_at == NULL) return 1;
      }
    }
    w->start = start;
    w->deadline = start + (int64_t)(opt.duration * 1e9);
  }
  for (t = 0; t < opt.threads; t++)
    if (pthread_create(&ws[t].thread, NULL, worker_main, &ws[t]) != 0) {
      fprintf(stderr, "loadgen: cannot start a thread\n");
      return 1;
    }
  if (opt.mode == MODE_IDLE) {
    /* Tell the driver once every thread has its connections served. */
    while (!announced && !stop_now && now_ns() < start + (int64_t)(opt.duration * 1e9)) {
      if (atomic_load(&threads_ready) == opt.threads) {
        uint64_t n = 0;
        for (t = 0; t < opt.threads; t++) n += ws[t].ready;
        printf("READY %" PRIu64 "\n", n);
        fflush(stdout);
        announced = 1;
      } else {
        usleep(5000);
      }
    }
  }
  for (t = 0; t < opt.threads; t++) pthread_join(ws[t].thread, NULL);
  elapsed = (double)(now_ns() - start) / 1e9;
  if (opt.mode != MODE_IDLE && elapsed > opt.duration) elapsed = opt.duration;

  for (t = 0; t < opt.threads; t++) {
    worker *w = &ws[t];
    ops += w->ops;
    bytes += w->bytes;
    errors += w->errors;
    cerr += w->connect_errors;
    verr += w->verify_errors;
    ready += w->ready;
    for (i = 0; i < GROUPS * SUB; i++) all->counts[i] += w->hist.counts[i];
    all->total += w->hist.total;
    if (!*last_error && w->last_error[0]) last_error = w->last_error;
  }
  if (*last_error) fprintf(stderr, "loadgen: first error: %s\n", last_error);
  if (opt.mode == MODE_IDLE) {
    printf("RESULT mode=idle conns=%d ready=%" PRIu64 " errors=%" PRIu64
           " connect_errors=%" PRIu64 "\n",
           opt.conns, ready, errors, cerr);
  } else {
    printf("RESULT mode=%s conns=%d size=%d depth=%d threads=%d duration=%.3f ops=%" PRIu64
           " ops_per_s=%.1f mb_per_s=%.3f p50_us=%.1f p99_us=%.1f p999_us=%.1f errors=%" PRIu64
           " connect_errors=%" PRIu64 " verify_errors=%" PRIu64 "\n",
           mode, opt.conns, opt.size, opt.mode == MODE_ECHO ? opt.depth : 1, opt.threads,
           elapsed, ops, (double)ops / elapsed, (double)bytes / elapsed / 1e6,
           hist_percentile_us(all, 50), hist_percentile_us(all, 99),
           hist_percentile_us(all, 99.9), errors, cerr, verr);
  }
  fflush(stdout);
  for (t = 0; t < opt.threads; t++) {
    for (i = 0; i < ws[t].nconns; i++) free(ws[t].conns[i].sent_at);
    free(ws[t].conns);
    close(ws[t].epfd);
  }
  free(ws);
  free(all);
  return 0;
}
