/*
 * tls_loadgen.c: a bounded, loopback-only TLS load generator for the TLS
 * scenarios of `make bench` (OpenSSL, one thread, epoll).
 *
 *   tls_loadgen --port P [--host 127.0.0.1] --mode http|handshake|idle|bulk
 *               [--conns C] [--duration SECONDS] [--bytes N] [--idle-proto http|echo]
 *               [--ciphersuites LIST] [--groups LIST] [--servername NAME] [--wait-go]
 *
 * Every connection is TLS 1.3 only, offers only --ciphersuites (default
 * TLS_AES_128_GCM_SHA256) and --groups (default X25519), sends SNI
 * --servername (default "localhost") and does not verify the certificate
 * (the server's certificate chain is still parsed and its CertificateVerify
 * signature checked, as TLS 1.3 requires). No session is ever offered for
 * resumption (SSL_set_session is never called, every connection has a new
 * SSL object), so every handshake is a full one; the session tickets the
 * server sends anyway are counted (tickets=) so the driver can check that
 * the servers compared do the same.
 *
 * Modes:
 *   http       C keep-alive connections, each with one "GET /" in flight;
 *              every answer must be a 200 with the body "Hello, world!\n"
 *              (examples/http_hello.lua's). ops = requests answered. With
 *              --wait-go, every connection first does its handshake and one
 *              request (not counted), then "READY <n>" is printed and nothing
 *              more is sent until SIGUSR1 arrives (at most 300 s), when the
 *              duration starts: a callgrind count per request can leave the
 *              handshakes out (bench/run.sh zeroes the counters in between).
 *   handshake  C concurrent loops of: connect, full handshake, one GET with
 *              "Connection: close", read the whole answer, close_notify,
 *              close. ops = connections (handshakes) completed.
 *   idle       opens C connections (at most 64 handshakes at a time), each
 *              with one round trip (--idle-proto http: one GET; echo: one
 *              byte echoed), prints "READY <n>", then holds them open until
 *              the duration ends or SIGTERM/SIGINT arrives.
 *   bulk       C concurrent loops of: connect, handshake, send --bytes bytes
 *              (default 64 MiB) of a pattern while reading the echo back
 *              (at most 256 KiB ahead), every byte checked, close. ops =
 *              echoes completed; mib= the MiB echoed.
 *
 * When the duration ends no new request, connection or echo is started;
 * the ones under way finish (at most 30 s more) and are counted, so the
 * server's CPU over the whole run pays for exactly the operations counted.
 * Only loopback targets are accepted: 127.0.0.0/8, ::1 or "localhost".
 * The last line printed is machine-readable: `RESULT key=value ...`.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#define PATTERN_PERIOD 251u               /* prime: a shifted byte is caught */
#define CHUNK (16 * 1024)                 /* one TLS record's worth per SSL_write */
#define PATTERN_LEN (PATTERN_PERIOD + CHUNK)
#define BULK_AHEAD (256 * 1024)           /* bulk: sent but not yet echoed, at most */
#define RESP_MAX 4096                     /* an HTTP answer's head and body */
#define DRAIN_NS (30 * 1000000000LL)      /* operations under way finish within this */
#define IDLE_CONNECTING_MAX 64            /* idle mode: handshakes at once */

typedef enum { MODE_HTTP, MODE_HANDSHAKE, MODE_IDLE, MODE_BULK } mode_t_;
typedef enum { C_FREE, C_CONNECTING, C_HANDSHAKE, C_OPEN, C_HELD, C_DONE } conn_state;

static struct {
  struct sockaddr_storage addr;
  socklen_t addrlen;
  mode_t_ mode;
  int conns, idle_http;
  double duration;
  uint64_t bytes;
  const char *servername;
} opt;

static SSL_CTX *ctx;
static unsigned char pattern[PATTERN_LEN];
static atomic_int stop_now;               /* set by SIGTERM/SIGINT */
static atomic_int go_now;                 /* set by SIGUSR1 (--wait-go) */
static int wait_go, going = 1, parked;    /* going: counting; parked: waiting for go */
static uint64_t tickets;                  /* NewSessionTicket messages seen */

/* --- latency histogram (as bench/loadgen.c) -------------------------------- */

#define SUB_BITS 5
#define SUB (1 << SUB_BITS)
#define GROUPS 40
static uint64_t hist[GROUPS * SUB], hist_total;

static int bucket_of(uint64_t ns) {
  int msb, group;
  if (ns < SUB) return (int)ns;
  msb = 63 - __builtin_clzll(ns);
  group = msb - SUB_BITS + 1;
  if (group >= GROUPS) return GROUPS * SUB - 1;
  return group * SUB + (int)((ns >> (msb - SUB_BITS)) & (SUB - 1));
}

static uint64_t bucket_value(int b) {
  int group = b / SUB, sub = b % SUB;
  if (group == 0) return (uint64_t)sub;
  return ((uint64_t)(SUB + sub + 1) << (group - 1)) - 1;
}

static void hist_add(uint64_t ns) {
  hist[bucket_of(ns)]++;
  hist_total++;
}

static double percentile_us(double p) {
  uint64_t want, seen = 0;
  int b;
  if (hist_total == 0) return 0;
  want = (uint64_t)(p / 100.0 * (double)hist_total + 0.5);
  if (want < 1) want = 1;
  for (b = 0; b < GROUPS * SUB; b++) {
    seen += hist[b];
    if (seen >= want) return (double)bucket_value(b) / 1000.0;
  }
  return (double)bucket_value(GROUPS * SUB - 1) / 1000.0;
}

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* --- connections ----------------------------------------------------------- */

typedef struct {
  int fd;
  SSL *ssl;
  conn_state state;
  uint32_t events;                        /* what epoll watches now */
  int want_write;                         /* OpenSSL asked for EPOLLOUT */
  int64_t started;                        /* this request, loop or echo began */
  unsigned seed;                          /* shifts the bulk pattern */
  uint64_t sent, recvd;                   /* bulk: stream offsets */
  size_t req_off;                         /* http: request bytes written */
  size_t resp_len;                        /* http: answer bytes read */
  char resp[RESP_MAX];
} conn;

static conn *conns;
static int epfd, draining, next_idle, connecting;
static uint64_t ops, bytes_echoed, errors, connect_errors, verify_errors, handshakes, resumed,
  ready;
static char last_error[160];
static char proto_seen[32], cipher_seen[64], group_seen[32];

static const char REQ_KA[] = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
static const char REQ_CLOSE[] = "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
static const char BODY[] = "Hello, world!\n";

static void note_error(const char *what, const char *why) {
  errors++;
  if (last_error[0] == '\0') snprintf(last_error, sizeof last_error, "%s: %s", what, why);
}

static void note_ssl_error(const char *what, SSL *ssl, int ret) {
  int e = SSL_get_error(ssl, ret);
  unsigned long code = ERR_peek_error();
  char buf[120];
  if (e == SSL_ERROR_SYSCALL && code == 0)
    snprintf(buf, sizeof buf, "%s", errno ? strerror(errno) : "unexpected eof");
  else if (e == SSL_ERROR_ZERO_RETURN)
    snprintf(buf, sizeof buf, "close_notify");
  else
    ERR_error_string_n(code, buf, sizeof buf);
  ERR_clear_error();
  note_error(what, buf);
}

static int watch(conn *c, uint32_t events) {
  struct epoll_event ev;
  int op = c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
  if (c->events == events) return 0;
  ev.events = events;
  ev.data.ptr = c;
  if (epoll_ctl(epfd, op, c->fd, &ev) != 0) return -1;
  c->events = events;
  return 0;
}

/* clean: send close_notify first (one attempt, never waited for). */
static void conn_close(conn *c, int clean) {
  if (c->ssl) {
    if (clean) SSL_shutdown(c->ssl);
    SSL_free(c->ssl);
    ERR_clear_error();
  }
  if (c->fd >= 0) {
    if (c->events) epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
  }
  if (c->state == C_CONNECTING || c->state == C_HANDSHAKE) connecting--;
  c->ssl = NULL;
  c->fd = -1;
  c->events = 0;
  c->state = C_DONE;
}

static int conn_start(conn *c) {
  int fd = socket(opt.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
  c->fd = fd;
  c->ssl = NULL;
  c->events = 0;
  c->want_write = 0;
  c->sent = c->recvd = 0;
  c->req_off = c->resp_len = 0;
  c->started = now_ns();
  c->state = C_DONE;
  if (fd < 0) {
    connect_errors++;
    note_error("socket", strerror(errno));
    return -1;
  }
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (struct sockaddr *)&opt.addr, opt.addrlen) != 0 && errno != EINPROGRESS) {
    connect_errors++;
    note_error("connect", strerror(errno));
    close(fd);
    c->fd = -1;
    return -1;
  }
  c->state = C_CONNECTING;
  connecting++;
  if (watch(c, EPOLLOUT) != 0) {
    note_error("epoll_ctl", strerror(errno));
    conn_close(c, 0);
    return -1;
  }
  return 0;
}

/* Sets what epoll waits for: what OpenSSL asked, or (wr) data to write. */
static int rewatch(conn *c, int wr) {
  return watch(c, EPOLLIN | (wr || c->want_write ? EPOLLOUT : 0));
}

/* The next thing a loop does after an operation: another one, or stop. */
static void restart(conn *c) {
  c->seed += 7;
  if (!draining && !stop_now) conn_start(c);
}

/* --- http ------------------------------------------------------------------ */

/* 1: a complete, correct answer; 0: not complete yet; -1: wrong. */
static int http_answer(conn *c) {
  char *end, *cl;
  size_t head, body;
  c->resp[c->resp_len] = '\0';
  end = strstr(c->resp, "\r\n\r\n");
  if (end == NULL) return c->resp_len >= RESP_MAX - 1 ? -1 : 0;
  head = (size_t)(end - c->resp) + 4;
  if (strncmp(c->resp, "HTTP/1.1 200 ", 13) != 0) return -1;
  cl = strcasestr(c->resp, "\r\nContent-Length:");
  if (cl == NULL || cl > end) return -1;
  body = (size_t)strtoul(cl + 17, NULL, 10);
  if (head + body > RESP_MAX - 1) return -1;
  if (c->resp_len < head + body) return 0;
  if (c->resp_len > head + body || body != sizeof BODY - 1 ||
      memcmp(c->resp + head, BODY, body) != 0)
    return -1;
  return 1;
}

static const char *request(void) { return opt.mode == MODE_HANDSHAKE ? REQ_CLOSE : REQ_KA; }

/* Writes what is left of the request. 0: all written or waiting; -1: error. */
static int http_send(conn *c) {
  const char *req = request();
  size_t len = strlen(req);
  while (c->req_off < len) {
    int n = SSL_write(c->ssl, req + c->req_off, (int)(len - c->req_off));
    if (n <= 0) {
      int e = SSL_get_error(c->ssl, n);
      if (e == SSL_ERROR_WANT_WRITE) { c->want_write = 1; return rewatch(c, 1); }
      if (e == SSL_ERROR_WANT_READ) return rewatch(c, 0);
      note_ssl_error("SSL_write", c->ssl, n);
      return -1;
    }
    c->req_off += (size_t)n;
  }
  c->want_write = 0;
  return rewatch(c, 0);
}

/* --- the events ------------------------------------------------------------ */

static void record_session(conn *c) {
  handshakes++;
  if (SSL_session_reused(c->ssl)) resumed++;
  if (proto_seen[0] == '\0') {
    const char *g = SSL_group_to_name(c->ssl, SSL_get_negotiated_group(c->ssl));
    snprintf(proto_seen, sizeof proto_seen, "%s", SSL_get_version(c->ssl));
    snprintf(cipher_seen, sizeof cipher_seen, "%s", SSL_get_cipher_name(c->ssl));
    snprintf(group_seen, sizeof group_seen, "%s", g ? g : "?");
  }
}

static const unsigned char *stream_at(const conn *c, uint64_t off) {
  return pattern + (off + c->seed) % PATTERN_PERIOD;
}

/* The operation this connection exists for, once the handshake is done. */
static int begin(conn *c) {
  c->state = C_OPEN;
  connecting--;
  record_session(c);
  if (opt.mode == MODE_BULK) return rewatch(c, 1);
  if (opt.mode == MODE_IDLE && !opt.idle_http) return rewatch(c, 1);
  if (opt.mode == MODE_HTTP) c->started = now_ns();   /* handshake: the whole loop */
  return http_send(c);
}

/* One operation is done on c: count it and go on. */
static void completed(conn *c) {
  if (!going) {                           /* --wait-go: the warm-up request */
    parked++;
    return;
  }
  hist_add((uint64_t)(now_ns() - c->started));
  ops++;
  if (opt.mode == MODE_HTTP) {
    if (draining || stop_now) {
      conn_close(c, 1);
      return;
    }
    c->req_off = c->resp_len = 0;
    c->started = now_ns();
    if (http_send(c) != 0) conn_close(c, 0);
    return;
  }
  if (opt.mode == MODE_BULK) bytes_echoed += opt.bytes;
  conn_close(c, 1);
  restart(c);
}

static void fail(conn *c) {
  int loops = opt.mode == MODE_HANDSHAKE || opt.mode == MODE_BULK;
  if (c->state == C_HELD) ready--;
  conn_close(c, 0);
  if (loops) restart(c);
}

/* bulk: writes up to BULK_AHEAD beyond what came back, reads and checks. */
static void bulk_io(conn *c, unsigned char *buf) {
  for (;;) {
    int progress = 0, n;
    while (c->sent < opt.bytes && c->sent - c->recvd < BULK_AHEAD) {
      uint64_t len = opt.bytes - c->sent;
      if (len > CHUNK) len = CHUNK;
      n = SSL_write(c->ssl, stream_at(c, c->sent), (int)len);
      if (n <= 0) {
        int e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_WRITE) { c->want_write = 1; break; }
        if (e == SSL_ERROR_WANT_READ) break;
        note_ssl_error("SSL_write", c->ssl, n);
        fail(c);
        return;
      }
      c->want_write = 0;
      c->sent += (uint64_t)n;
      progress = 1;
    }
    n = SSL_read(c->ssl, buf, CHUNK);
    if (n > 0) {
      if (c->recvd + (uint64_t)n > c->sent || memcmp(buf, stream_at(c, c->recvd), (size_t)n) != 0) {
        verify_errors++;
        note_error("verify", "the echo differs from what was sent");
        fail(c);
        return;
      }
      c->recvd += (uint64_t)n;
      if (c->recvd == opt.bytes) {
        completed(c);
        return;
      }
      continue;
    }
    {
      int e = SSL_get_error(c->ssl, n);
      if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
        note_ssl_error("SSL_read", c->ssl, n);
        fail(c);
        return;
      }
      if (e == SSL_ERROR_WANT_WRITE) c->want_write = 1;
    }
    if (!progress) break;
  }
  if (rewatch(c, c->sent < opt.bytes && c->sent - c->recvd < BULK_AHEAD) != 0) fail(c);
}

static void on_event(conn *c, unsigned char *buf) {
  int n;
  if (c->state == C_CONNECTING) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      connect_errors++;
      note_error("connect", strerror(err));
      fail(c);
      return;
    }
    c->ssl = SSL_new(ctx);
    if (c->ssl == NULL || !SSL_set_fd(c->ssl, c->fd) ||
        !SSL_set_tlsext_host_name(c->ssl, opt.servername)) {
      note_error("SSL_new", "out of memory");
      fail(c);
      return;
    }
    c->state = C_HANDSHAKE;
  }
  if (c->state == C_HANDSHAKE) {
    n = SSL_connect(c->ssl);
    if (n == 1) {
      if (begin(c) != 0) fail(c);
      if (c->state == C_OPEN && opt.mode == MODE_BULK) bulk_io(c, buf);
      return;
    }
    switch (SSL_get_error(c->ssl, n)) {
      case SSL_ERROR_WANT_READ: c->want_write = 0; if (rewatch(c, 0) != 0) fail(c); return;
      case SSL_ERROR_WANT_WRITE: c->want_write = 1; if (rewatch(c, 1) != 0) fail(c); return;
      default: note_ssl_error("handshake", c->ssl, n); fail(c); return;
    }
  }
  if (opt.mode == MODE_BULK) {
    bulk_io(c, buf);
    return;
  }
  if (opt.mode == MODE_IDLE && !opt.idle_http) {   /* one byte out, one back */
    if (c->sent == 0) {
      n = SSL_write(c->ssl, "x", 1);
      if (n == 1) c->sent = 1;
      else if (SSL_get_error(c->ssl, n) != SSL_ERROR_WANT_WRITE &&
               SSL_get_error(c->ssl, n) != SSL_ERROR_WANT_READ) {
        note_ssl_error("SSL_write", c->ssl, n);
        fail(c);
        return;
      }
    }
    n = SSL_read(c->ssl, buf, CHUNK);
    if (n > 0) {
      if (n != 1 || buf[0] != 'x' || c->state == C_HELD) {
        verify_errors++;
        note_error("verify", "not the one byte sent");
        fail(c);
        return;
      }
      c->state = C_HELD;
      ready++;
      if (rewatch(c, 0) != 0) fail(c);
      return;
    }
    if (SSL_get_error(c->ssl, n) != SSL_ERROR_WANT_READ) {
      note_ssl_error("SSL_read", c->ssl, n);
      fail(c);
      return;
    }
    if (rewatch(c, c->sent == 0) != 0) fail(c);
    return;
  }
  /* http, handshake, idle over http */
  if (c->req_off < strlen(request())) {
    if (http_send(c) != 0) { fail(c); return; }
    if (c->req_off < strlen(request())) return;
  }
  for (;;) {
    int r;
    n = SSL_read(c->ssl, c->resp + c->resp_len, (int)(RESP_MAX - 1 - c->resp_len));
    if (n <= 0) {
      int e = SSL_get_error(c->ssl, n);
      if (e == SSL_ERROR_WANT_READ) break;
      if (e == SSL_ERROR_WANT_WRITE) { c->want_write = 1; break; }
      note_ssl_error("SSL_read", c->ssl, n);
      fail(c);
      return;
    }
    if (c->state == C_HELD) {
      note_error("idle", "the server sent something unasked");
      fail(c);
      return;
    }
    c->resp_len += (size_t)n;
    r = http_answer(c);
    if (r < 0) {
      verify_errors++;
      note_error("verify", "not a 200 with \"Hello, world!\\n\"");
      fail(c);
      return;
    }
    if (r == 1) {
      if (opt.mode == MODE_IDLE) {
        c->state = C_HELD;
        ready++;
        break;
      }
      completed(c);
      return;
    }
  }
  if (rewatch(c, 0) != 0) fail(c);
}

/* Counted here: a ticket the server sent; the session is not kept. */
static int on_new_session(SSL *ssl, SSL_SESSION *sess) {
  (void)ssl;
  (void)sess;
  tickets++;
  return 0;
}

/* --- main ------------------------------------------------------------------ */

static void usage(void) {
  fprintf(stderr,
          "usage: tls_loadgen --port P [--host 127.0.0.1] --mode http|handshake|idle|bulk\n"
          "                   [--conns C] [--duration SECONDS] [--bytes N] [--idle-proto http|echo]\n"
          "                   [--ciphersuites LIST] [--groups LIST] [--servername NAME]\n");
  exit(2);
}

static long long parse_num(const char *name, const char *s, long long lo, long long hi) {
  char *end;
  long long v;
  errno = 0;
  v = strtoll(s, &end, 10);
  if (errno || *end || v < lo || v > hi) {
    fprintf(stderr, "tls_loadgen: --%s must be an integer from %lld to %lld (got '%s')\n", name,
            lo, hi, s);
    exit(2);
  }
  return v;
}

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
  fprintf(stderr, "tls_loadgen: refusing target '%s': only loopback addresses "
                  "(127.0.0.0/8, ::1, localhost) may be loaded\n", host);
  exit(2);
}

static void on_signal(int sig) {
  (void)sig;
  atomic_store(&stop_now, 1);
}

static void on_go(int sig) {
  (void)sig;
  atomic_store(&go_now, 1);
}

static int busy(void) {
  int i;
  for (i = 0; i < opt.conns; i++) {
    conn_state s = conns[i].state;
    if (s == C_CONNECTING || s == C_HANDSHAKE || s == C_OPEN) return 1;
  }
  return 0;
}

int main(int argc, char **argv) {
  const char *host = "127.0.0.1", *mode = NULL, *suites = "TLS_AES_128_GCM_SHA256",
             *groups = "X25519", *idle_proto = "http";
  int port = -1, i, announced = 0;
  unsigned char *buf;
  struct epoll_event evs[256];
  struct sigaction sa;
  int64_t start, deadline, drain_until = 0;
  double elapsed;

  opt.conns = 16;
  opt.duration = 5;
  opt.bytes = 64ull << 20;
  opt.servername = "localhost";
  for (i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--wait-go") == 0) {
      wait_go = 1;
      continue;
    }
    if (v == NULL) usage();
    if (strcmp(a, "--host") == 0) host = v;
    else if (strcmp(a, "--port") == 0) port = (int)parse_num("port", v, 1, 65535);
    else if (strcmp(a, "--mode") == 0) mode = v;
    else if (strcmp(a, "--conns") == 0) opt.conns = (int)parse_num("conns", v, 1, 19000);
    else if (strcmp(a, "--bytes") == 0) opt.bytes = (uint64_t)parse_num("bytes", v, 1, 1ll << 40);
    else if (strcmp(a, "--idle-proto") == 0) idle_proto = v;
    else if (strcmp(a, "--ciphersuites") == 0) suites = v;
    else if (strcmp(a, "--groups") == 0) groups = v;
    else if (strcmp(a, "--servername") == 0) opt.servername = v;
    else if (strcmp(a, "--duration") == 0) {
      opt.duration = atof(v);
      if (!(opt.duration > 0 && opt.duration <= 3600)) {
        fprintf(stderr, "tls_loadgen: --duration must be from 0 to 3600 seconds\n");
        return 2;
      }
    } else usage();
    i++;
  }
  if (port < 0 || mode == NULL) usage();
  if (wait_go && strcmp(mode, "http") != 0) {
    fprintf(stderr, "tls_loadgen: --wait-go is for --mode http only\n");
    return 2;
  }
  if (strcmp(mode, "http") == 0) opt.mode = MODE_HTTP;
  else if (strcmp(mode, "handshake") == 0) opt.mode = MODE_HANDSHAKE;
  else if (strcmp(mode, "idle") == 0) opt.mode = MODE_IDLE;
  else if (strcmp(mode, "bulk") == 0) opt.mode = MODE_BULK;
  else usage();
  if (strcmp(idle_proto, "http") == 0) opt.idle_http = 1;
  else if (strcmp(idle_proto, "echo") != 0) usage();
  set_target(host, port);

  ctx = SSL_CTX_new(TLS_client_method());
  if (ctx == NULL || !SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) ||
      !SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION) ||
      !SSL_CTX_set_ciphersuites(ctx, suites) || !SSL_CTX_set1_groups_list(ctx, groups)) {
    fprintf(stderr, "tls_loadgen: cannot set up TLS (--ciphersuites '%s', --groups '%s'): %s\n",
            suites, groups, ERR_error_string(ERR_get_error(), NULL));
    return 2;
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  /* Sessions are seen (to count tickets) but never stored or offered. */
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
  SSL_CTX_sess_set_new_cb(ctx, on_new_session);

  for (i = 0; i < (int)PATTERN_LEN; i++) pattern[i] = (unsigned char)(((unsigned)i % PATTERN_PERIOD) * 7 + 1);
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  sa.sa_handler = on_go;
  sigaction(SIGUSR1, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);

  conns = calloc((size_t)opt.conns, sizeof *conns);
  buf = malloc(CHUNK);
  epfd = epoll_create1(EPOLL_CLOEXEC);
  if (conns == NULL || buf == NULL || epfd < 0) return 1;
  for (i = 0; i < opt.conns; i++) {
    conns[i].fd = -1;
    conns[i].seed = (unsigned)i * 13u;
  }
  start = now_ns();
  deadline = start + (int64_t)(opt.duration * 1e9);
  if (wait_go) {
    going = 0;
    deadline = start + 300 * 1000000000LL;  /* the longest wait for SIGUSR1 */
  }
  if (opt.mode != MODE_IDLE)
    for (i = 0; i < opt.conns; i++) conn_start(&conns[i]);
  for (;;) {
    int64_t t = now_ns();
    int n;
    if (!going && !stop_now) {
      if (!announced && parked + (int)errors >= opt.conns) {
        printf("READY %d\n", parked);
        fflush(stdout);
        announced = 1;
      }
      if (atomic_load(&go_now)) {         /* the counted run starts now */
        going = 1;
        start = t;
        deadline = start + (int64_t)(opt.duration * 1e9);
        for (i = 0; i < opt.conns; i++) {
          conn *c = &conns[i];
          if (c->state != C_OPEN) continue;
          c->req_off = c->resp_len = 0;
          c->started = t;
          if (http_send(c) != 0) conn_close(c, 0);
        }
      }
    }
    if (opt.mode == MODE_IDLE) {
      while (next_idle < opt.conns && connecting < IDLE_CONNECTING_MAX && !stop_now)
        conn_start(&conns[next_idle++]);
      if (!announced && next_idle == opt.conns && connecting == 0) {
        int open = 0;
        for (i = 0; i < opt.conns; i++) open += conns[i].state == C_HELD || conns[i].state == C_OPEN;
        if (open == (int)ready) {        /* every open connection answered */
          printf("READY %" PRIu64 "\n", ready);
          fflush(stdout);
          announced = 1;
        }
      }
      if (t >= deadline || stop_now) break;
    } else if (!draining && (t >= deadline || stop_now)) {
      draining = 1;
      drain_until = t + DRAIN_NS;
      for (i = 0; i < opt.conns; i++)     /* not started yet: never will be */
        if (conns[i].state == C_CONNECTING) conn_close(&conns[i], 0);
    } else if (!draining && opt.mode != MODE_HTTP) {
      for (i = 0; i < opt.conns; i++)     /* a connect that failed at once retries */
        if (conns[i].state == C_DONE) conn_start(&conns[i]);
    }
    if (draining && (t >= drain_until || !busy())) break;
    n = epoll_wait(epfd, evs, 256, 10);
    if (n < 0 && errno != EINTR) {
      note_error("epoll_wait", strerror(errno));
      break;
    }
    for (i = 0; i < n; i++) {
      conn *c = evs[i].data.ptr;
      if (c->state == C_CONNECTING || c->state == C_HANDSHAKE || c->state == C_OPEN ||
          c->state == C_HELD)
        on_event(c, buf);
    }
  }
  elapsed = (double)(now_ns() - start) / 1e9;
  for (i = 0; i < opt.conns; i++)
    if (conns[i].fd >= 0) conn_close(&conns[i], conns[i].state == C_OPEN || conns[i].state == C_HELD);
  if (last_error[0]) fprintf(stderr, "tls_loadgen: first error: %s\n", last_error);
  printf("RESULT mode=%s conns=%d duration=%.3f ops=%" PRIu64 " ops_per_s=%.1f mib=%" PRIu64
         " p50_us=%.1f p99_us=%.1f p999_us=%.1f errors=%" PRIu64 " connect_errors=%" PRIu64
         " verify_errors=%" PRIu64 " handshakes=%" PRIu64 " resumed=%" PRIu64 " tickets=%" PRIu64
         " ready=%" PRIu64 " proto=%s cipher=%s group=%s\n",
         mode, opt.conns, elapsed, ops, (double)ops / elapsed, bytes_echoed >> 20,
         percentile_us(50), percentile_us(99), percentile_us(99.9), errors, connect_errors,
         verify_errors, handshakes, resumed, tickets, ready, proto_seen[0] ? proto_seen : "-",
         cipher_seen[0] ? cipher_seen : "-", group_seen[0] ? group_seen : "-");
  fflush(stdout);
  free(conns);
  free(buf);
  close(epfd);
  SSL_CTX_free(ctx);
  return 0;
}
