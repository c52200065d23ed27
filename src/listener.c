/*
 * listener.c: a listening socket and the accept path we run ourselves.
 *
 * multiloop_listen_resolve works out once per start what to bind (an IP
 * literal, the first bindable address a host name resolves to, or a Unix
 * path); multiloop_listen_socket then creates a listening TCP (IPv4/IPv6) or
 * Unix stream socket on it (it only makes an fd), and multiloop_listen_unlink
 * removes the Unix socket file at stop if it is still the one bind made. The
 * main thread calls these three. A multiloop_listener_t
 * then watches that fd on one loop with a uv_poll_t and accept4()s in batches,
 * handing each fd to its owner's on_fd. The acceptor thread owns one (ipc and
 * queue dispatch); with reuseport each worker owns one on its own socket.
 *
 * We do not use uv_listen: libuv 1.44 accepts in a loop inside one callback,
 * and its EMFILE spare-fd trick is process-global and not thread-safe. Owning
 * the accept path lets a listener simply stop polling:
 *   - at max_connections (slots.c keeps the count and says when; the acceptor
 *     is woken by a worker that frees a slot, a reuseport worker re-checks on
 *     a short timer), while pending clients wait in the kernel backlog;
 *   - on EMFILE/ENFILE, retrying on a short timer, logged once per episode; an
 *     episode ends after a quiet second without failures, because hand-offs
 *     free an fd now and then even while the process stays at its limit.
 *
 * Threads: the rest runs on the owning loop's thread.
 * The listener closes its fd in multiloop_listener_close's close callback.
 * It counts no slot itself: its owner's on_fd takes one for each fd
 * (multiloop_slot_take), once it knows the worker the fd is for.
 */
#define _GNU_SOURCE                      /* accept4 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "multiloop.h"

#define ACCEPT_BATCH 64          /* accepts per wake-up before yielding to the loop */
#define FD_RETRY_MS 100          /* retry interval after EMFILE/ENFILE */
#define FD_QUIET_MS 1000         /* no failure for this long ends an episode */
#define LIMIT_RECHECK_MS 50      /* a listener nobody wakes re-checks its limit */

/* --- the socket ------------------------------------------------------------ */

static int fail_msg(char *err, size_t errlen, const char *step, const multiloop_config_t *cfg,
                    const multiloop_listen_addr_t *la, int port, int rc) {
  char ip[64] = "";
  if (cfg->path) {
    snprintf(err, errlen, "%s %s: %s (%s)", step, cfg->path, uv_strerror(rc), uv_err_name(rc));
    return rc;
  }
  /* A name: say which of its addresses it was. */
  if (la && uv_ip_name((const struct sockaddr *)&la->addr, ip, sizeof ip) == 0 &&
      strcmp(ip, cfg->host) != 0)
    snprintf(err, errlen, "%s %s (%s) port %d: %s (%s)", step, cfg->host, ip, port,
             uv_strerror(rc), uv_err_name(rc));
  else
    snprintf(err, errlen, "%s %s port %d: %s (%s)", step, cfg->host, port, uv_strerror(rc),
             uv_err_name(rc));
  return rc;
}

/* Whether an address of this family can be bound here at all (port 0): an
 * IPv6 address on a host whose IPv6 is off cannot. */
static int bindable(const struct sockaddr *sa, socklen_t len) {
  int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0), ok;
  if (fd < 0) return 0;
  ok = bind(fd, sa, len) == 0;
  close(fd);
  return ok;
}

/* A host name: getaddrinfo on a loop of our own (synchronous: no callback),
 * then the first address in its order that this host can bind. When none
 * can, the first: its bind then reports why. */
static int resolve_name(const multiloop_config_t *cfg, multiloop_listen_addr_t *la, char *err,
                        size_t errlen) {
  uv_loop_t loop;
  uv_getaddrinfo_t req;
  struct addrinfo hints, *ai, *pick = NULL;
  int rc;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if ((rc = multiloop_loop_init(&loop)) != 0) {
    snprintf(err, errlen, "resolve '%s': cannot make a loop: %s (%s)", cfg->host,
             uv_strerror(rc), uv_err_name(rc));
    return rc;
  }
  rc = uv_getaddrinfo(&loop, &req, NULL, cfg->host, NULL, &hints);
  if (rc == 0) {
    for (ai = req.addrinfo; ai != NULL; ai = ai->ai_next) {
      if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6) continue;
      if (pick == NULL) pick = ai;
      if (bindable(ai->ai_addr, ai->ai_addrlen)) {
        pick = ai;
        break;
      }
    }
    if (pick != NULL && pick->ai_addrlen <= sizeof la->addr) {
      memcpy(&la->addr, pick->ai_addr, pick->ai_addrlen);
      la->addrlen = pick->ai_addrlen;
    } else {
      rc = UV_EAI_ADDRFAMILY;            /* nothing of a family we can listen on */
    }
    uv_freeaddrinfo(req.addrinfo);
  }
  uv_loop_close(&loop);
  if (rc != 0)
    snprintf(err, errlen, "resolve '%s': %s (%s)", cfg->host, uv_strerror(rc), uv_err_name(rc));
  return rc;
}

/* Main thread, once per start: what every socket of that start binds. An IP
 * literal is taken as it is; a name is resolved now (it may resolve
 * differently tomorrow, and every reuseport socket must bind the same one).
 * The path's length is checked here as well as by core.new: sun_path is a
 * fixed array. */
int multiloop_listen_resolve(const multiloop_config_t *cfg, multiloop_listen_addr_t *la,
                             char *err, size_t errlen) {
  memset(la, 0, sizeof *la);
  if (cfg->path) {
    struct sockaddr_un *sun = (struct sockaddr_un *)&la->addr;
    size_t n = strlen(cfg->path);
    if (n == 0 || n >= sizeof sun->sun_path) {
      snprintf(err, errlen, "option 'path' must be a Unix socket path of 1 to %d bytes "
               "(got %zu bytes)", (int)sizeof sun->sun_path - 1, n);
      return UV_EINVAL;
    }
    sun->sun_family = AF_UNIX;
    memcpy(sun->sun_path, cfg->path, n + 1);
    la->addrlen = sizeof *sun;
    return 0;
  }
  if (uv_ip4_addr(cfg->host, 0, (struct sockaddr_in *)&la->addr) == 0) {
    la->addrlen = sizeof(struct sockaddr_in);
    return 0;
  }
  if (uv_ip6_addr(cfg->host, 0, (struct sockaddr_in6 *)&la->addr) == 0) {
    la->addrlen = sizeof(struct sockaddr_in6);
    return 0;
  }
  if (strchr(cfg->host, ':')) {            /* meant as IPv6, and not one */
    snprintf(err, errlen, "invalid host '%s': not an IPv6 address (EINVAL)", cfg->host);
    return UV_EINVAL;
  }
  return resolve_name(cfg, la, err, errlen);
}

/* A Unix socket path that exists: a live server's socket is always an error;
 * a stale one (nobody accepts on it) is removed only when cfg->unlink. */
static int clear_unix_path(const multiloop_config_t *cfg, const multiloop_listen_addr_t *la,
                           char *err, size_t errlen) {
  struct stat st;
  int probe, live;
  if (lstat(cfg->path, &st) != 0) return 0;
  if (!S_ISSOCK(st.st_mode)) {
    snprintf(err, errlen, "bind %s: the path exists and is not a socket", cfg->path);
    return UV_EADDRINUSE;
  }
  probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  live = probe >= 0 && connect(probe, (const struct sockaddr *)&la->addr, la->addrlen) == 0;
  if (probe >= 0) close(probe);
  if (live) {
    snprintf(err, errlen, "bind %s: address already in use by a running server (EADDRINUSE)",
             cfg->path);
    return UV_EADDRINUSE;
  }
  if (!cfg->unlink) {
    snprintf(err, errlen, "bind %s: a stale socket file exists (remove it, or pass "
                          "unlink = true) (EADDRINUSE)", cfg->path);
    return UV_EADDRINUSE;
  }
  unlink(cfg->path);
  return 0;
}

/* Main thread, at stop (or a failed start): removes the socket file bind
 * made, only while the path still names that file. Someone may have removed
 * it and put a file of their own there, or another server's socket: that is
 * theirs. (A swap between the lstat and the unlink cannot be excluded: POSIX
 * has no unlink by inode.) */
void multiloop_listen_unlink(const multiloop_config_t *cfg, const multiloop_listen_addr_t *la) {
  struct stat st;
  if (!cfg->path || !la->unix_made) return;
  if (lstat(cfg->path, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == la->unix_dev &&
      st.st_ino == la->unix_ino)
    unlink(cfg->path);
}

/* Reuseport only: SO_REUSEPORT would let us bind a port that another server
 * (ours or not, same user) already listens on, and silently share it. A
 * plain bind first fails with EADDRINUSE as any server's would, and resolves
 * port 0. The probe is closed before the real sockets bind (a narrow window
 * in which another process could take the port). */
int multiloop_listen_probe(const multiloop_config_t *cfg, multiloop_listen_addr_t *la, int port,
                           int *bound_port, char *err, size_t errlen) {
  uv_os_sock_t fd;
  multiloop_config_t plain = *cfg;
  int rc;
  plain.backlog = 1;
  if ((rc = multiloop_listen_socket(&plain, la, port, 0, &fd, bound_port, err, errlen)) != 0)
    return rc;
  close(fd);
  return 0;
}

/* Creates a listening socket on la's address (from multiloop_listen_resolve)
 * and `port` (ignored for a Unix path), with SO_REUSEPORT when asked.
 * Returns 0 and the fd, or a uv error with a message in err. *bound_port
 * receives the real port (TCP). A Unix socket file gets cfg->mode between
 * bind and listen, so no client ever connects while it has the umask's mode
 * (connecting before listen is refused), and la records which file bind made
 * (multiloop_listen_unlink). */
int multiloop_listen_socket(const multiloop_config_t *cfg, multiloop_listen_addr_t *la,
                            int port, int reuseport, uv_os_sock_t *out, int *bound_port,
                            char *err, size_t errlen) {
  struct sockaddr_storage ss;
  socklen_t len = la->addrlen;
  int fd = -1, rc, on = 1, made = 0;
  const char *step = "socket";

  memcpy(&ss, &la->addr, sizeof ss);
  if (cfg->path) {
    if ((rc = clear_unix_path(cfg, la, err, errlen)) != 0) return rc;
  } else if (ss.ss_family == AF_INET6) {
    ((struct sockaddr_in6 *)&ss)->sin6_port = htons((uint16_t)port);
  } else {
    ((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)port);
  }
  fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) goto fail_errno;
  step = "bind";
  if (!cfg->path && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) != 0)
    goto fail_errno;
  if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof on) != 0)
    goto fail_errno;
  if (bind(fd, (struct sockaddr *)&ss, len) != 0) goto fail_errno;
  if (cfg->path) {
    struct stat st;
    if (lstat(cfg->path, &st) == 0) {        /* the file bind just made */
      la->unix_made = made = 1;
      la->unix_dev = st.st_dev;
      la->unix_ino = st.st_ino;
    }
    step = "chmod";
    if (cfg->mode >= 0 && chmod(cfg->path, (mode_t)cfg->mode) != 0) goto fail_errno;
  }
  step = "listen";
  if (listen(fd, cfg->backlog) != 0) goto fail_errno;
  if (!cfg->path) {
    len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0) goto fail_errno;
    *bound_port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                 : ((struct sockaddr_in *)&ss)->sin_port);
  }
  *out = fd;
  return 0;

fail_errno:
  rc = uv_translate_sys_error(errno);
  if (fd >= 0) close(fd);
  if (made) {                                /* no server behind it: not left behind */
    multiloop_listen_unlink(cfg, la);
    la->unix_made = 0;
  }
  return fail_msg(err, errlen, step, cfg, la, port, rc);
}

/* --- accepting ------------------------------------------------------------- */

static void accept_cb(uv_poll_t *poll, int status, int events);

/* Polls the socket exactly when nothing holds accepting back. */
static void update_polling(multiloop_listener_t *l) {
  int want = !l->closing && !l->paused_for_limit && !l->paused_for_fds;
  if (want && !l->polling) uv_poll_start(&l->poll, UV_READABLE, accept_cb);
  else if (!want && l->polling) uv_poll_stop(&l->poll);
  l->polling = want;
}

static void quiet_cb(uv_timer_t *t) {
  multiloop_listener_t *l = t->data;
  multiloop_log_as(l->rt->cfg->logger, MULTILOOP_LOG_INFO, l->who, 0,
                   "accepting again after %lu failed attempts", l->fd_failures);
  l->fd_failures = 0;
}

static void retry_cb(uv_timer_t *t) {
  multiloop_listener_t *l = t->data;
  l->paused_for_fds = 0;
  multiloop_listener_resume(l);          /* also re-checks a limit pause */
  update_polling(l);
}

/* Out of fds: stop polling (level-triggered epoll would spin on the pending
 * connection) and retry on a timer. One log line per episode. */
static void pause_for_fds(multiloop_listener_t *l, int err) {
  if (l->fd_failures++ == 0) {
    multiloop_log_as(l->rt->cfg->logger, MULTILOOP_LOG_WARN, l->who, 0,
                     "accept failed: %s (%s); accepting paused, retrying every %d ms",
                     uv_strerror(err), uv_err_name(err), FD_RETRY_MS);
  }
  l->paused_for_fds = 1;
  uv_timer_stop(&l->quiet_timer);
  update_polling(l);
  uv_timer_start(&l->retry_timer, retry_cb, FD_RETRY_MS, 0);
}

/* At max_connections: stop polling until a slot frees (slots.c: the
 * acceptor is rung then, without a lost wake-up). */
static int pause_for_limit(multiloop_listener_t *l) {
  if (!multiloop_slots_wait(l->rt, l->woken_on_release)) return 0;
  l->paused_for_limit = 1;
  update_polling(l);
  if (!l->woken_on_release)                /* nobody rings us: look again soon */
    uv_timer_start(&l->retry_timer, retry_cb, LIMIT_RECHECK_MS, 0);
  return 1;
}

/* Owner's thread: a slot may have freed; resume if under the limit again. */
void multiloop_listener_resume(multiloop_listener_t *l) {
  if (!l->paused_for_limit) return;
  if (!multiloop_slots_resume(l->rt, l->woken_on_release)) {
    if (!l->woken_on_release) uv_timer_start(&l->retry_timer, retry_cb, LIMIT_RECHECK_MS, 0);
    return;
  }
  l->paused_for_limit = 0;
  update_polling(l);
}

static void accept_cb(uv_poll_t *poll, int status, int events) {
  multiloop_listener_t *l = poll->data;
  int n;
  (void)events;
  if (status < 0) return;
  for (n = 0; n < ACCEPT_BATCH && !l->closing; n++) {
    uv_os_sock_t fd;
    if (multiloop_slots_full(l->rt) && pause_for_limit(l)) return;
    fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      int err = errno;
      if (err == EAGAIN || err == EWOULDBLOCK) return;
      if (err == EINTR || err == ECONNABORTED) continue;
      atomic_fetch_add_explicit(&l->accept_errors, 1, memory_order_relaxed);
      if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM)
        pause_for_fds(l, uv_translate_sys_error(err));
      return;
    }
    if (l->fd_failures > 0 && !uv_is_active((uv_handle_t *)&l->quiet_timer))
      uv_timer_start(&l->quiet_timer, quiet_cb, FD_QUIET_MS, 0);
    atomic_fetch_add_explicit(&l->accepted, 1, memory_order_relaxed);
    l->on_fd(l, fd);
  }
}

/* Owner's thread. Takes over `fd` (closed at multiloop_listener_close, or
 * here on failure) and starts accepting. */
int multiloop_listener_start(multiloop_listener_t *l, uv_loop_t *loop, multiloop_runtime_t *rt,
                             uv_os_sock_t fd, int woken_on_release, const char *who,
                             multiloop_fd_cb on_fd, void *data) {
  int rc;
  memset(l, 0, sizeof *l);
  l->rt = rt;
  l->fd = fd;
  l->on_fd = on_fd;
  l->data = data;
  l->woken_on_release = woken_on_release;
  snprintf(l->who, sizeof l->who, "%s", who);
  uv_timer_init(loop, &l->retry_timer);
  uv_timer_init(loop, &l->quiet_timer);
  l->retry_timer.data = l->quiet_timer.data = l;
  if ((rc = uv_poll_init_socket(loop, &l->poll, fd)) != 0) {
    close(fd);
    l->fd = -1;
    uv_close((uv_handle_t *)&l->retry_timer, NULL);
    uv_close((uv_handle_t *)&l->quiet_timer, NULL);
    l->closing = 1;
    return rc;
  }
  l->poll.data = l;
  l->started = 1;
  update_polling(l);
  return 0;
}

static void poll_close_cb(uv_handle_t *h) {
  multiloop_listener_t *l = h->data;
  close(l->fd);                          /* uv_poll does not close it */
  l->fd = -1;
}

/* Owner's thread: stop accepting and close the socket. Idempotent. */
void multiloop_listener_close(multiloop_listener_t *l) {
  if (!l->started || l->closing) return;
  l->closing = 1;
  uv_close((uv_handle_t *)&l->poll, poll_close_cb);
  uv_close((uv_handle_t *)&l->retry_timer, NULL);
  uv_close((uv_handle_t *)&l->quiet_timer, NULL);
}
