/*
 * activation.c: listening sockets the process inherited, instead of ones
 * listener.c makes: `listen = "systemd"` / `"systemd:NAME"` (socket
 * activation: systemd's sd_listen_fds(3) protocol, read here without
 * libsystemd) and `fd = n` (any listening socket: inetd, a supervisor, a
 * socket the script made itself).
 *
 * The protocol: LISTEN_PID is the pid the sockets are for, LISTEN_FDS how
 * many there are, at fds 3, 4, ...; LISTEN_FDNAMES, when set, their names
 * separated by ':' (FileDescriptorName=, systemd-socket-activate --fdname);
 * a socket with no name is "unknown", as sd_listen_fds_with_names says.
 * The environment is read once per process, on first use (core.listen_fds,
 * or a server with `listen`), and only when LISTEN_PID is this process: the
 * sockets are then marked close-on-exec and the three variables removed,
 * so a child the handler starts neither inherits the sockets nor believes
 * they are its own; what was read stays here for every later server.
 * While LISTEN_PID names another process nothing is taken and nothing is
 * removed: they are not ours.
 *
 * Several sockets: `listen = "systemd"` serves every one passed, and
 * "systemd:NAME" every one named NAME, all through one server: the
 * acceptor thread has a listener on each (acceptor.more: the second and
 * later), and any worker serves a connection from any of them. Their
 * families may differ (TCP and Unix): then each connection's is asked of
 * its fd (multiloop_conn_is_unix). A server can also take only some, by
 * name, and another server of the process the rest. Reuseport serves one
 * inherited socket only (each worker's listener is the one socket).
 *
 * Ownership: an inherited fd is never closed by multiloop. Each start
 * listens on a dup of each (one for the acceptor; with reuseport, one per
 * worker, all on the one socket and its one accept queue), which the
 * listener closes at stop: so a stopped server can start again, and a
 * client that connects while it is stopped waits in the socket's backlog
 * instead of being refused. The socket is set non-blocking (a property of
 * the socket, so the original fd sees it too): our accept path needs it.
 * A Unix socket received this way is never unlinked: its file is not ours
 * (cfg->path stays NULL, so multiloop_listen_unlink passes over it).
 *
 * Threads: the main thread (core.new, start). The process-wide record of
 * what was passed is written once, under a mutex. unsetenv is not
 * thread-safe against a getenv in another thread: a worker of another
 * server that reads the environment while the first `listen` server is
 * made races with it (glibc); make that server first.
 */
#define _GNU_SOURCE                      /* F_DUPFD_CLOEXEC, SO_DOMAIN */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "multiloop.h"

#define LISTEN_FDS_START 3               /* SD_LISTEN_FDS_START */
#define MAX_PASSED 1024                  /* sockets read from LISTEN_FDS */
#define MAX_NAME 255                     /* systemd's own limit on a name */

typedef struct {
  int fd;
  char name[MAX_NAME + 1];
} passed_t;

static pthread_mutex_t passed_lock = PTHREAD_MUTEX_INITIALIZER;
static passed_t *passed;                 /* passed_lock; NULL until read */
static int npassed;

/* What was read lives as long as the module: freed when it is unloaded
 * (lua_close dlcloses it), when no server can be using it any more. */
__attribute__((destructor)) static void passed_free(void) {
  free(passed);
  passed = NULL;
  npassed = 0;
}

/* A non-negative decimal integer, all of s; -1 otherwise. */
static long parse_count(const char *s) {
  char *end;
  long v;
  if (s == NULL || *s < '0' || *s > '9') return -1;
  errno = 0;
  v = strtol(s, &end, 10);
  if (errno != 0 || *end != '\0') return -1;
  return v;
}

/* Holding passed_lock: reads the environment into `passed`, or returns -1
 * with a message (nothing taken, nothing removed). */
static int read_environment(char *err, size_t errlen) {
  const char *pid_s = getenv("LISTEN_PID"), *fds_s = getenv("LISTEN_FDS");
  const char *names = getenv("LISTEN_FDNAMES");
  long pid, n, i;
  passed_t *p;
  if (pid_s == NULL || fds_s == NULL) {
    snprintf(err, errlen, "LISTEN_PID and LISTEN_FDS are not set: the process was not "
             "started by socket activation (systemd, systemd-socket-activate)");
    return -1;
  }
  pid = parse_count(pid_s);
  if (pid <= 0) {
    snprintf(err, errlen, "LISTEN_PID is '%.32s', not a process id", pid_s);
    return -1;
  }
  if (pid != (long)getpid()) {
    snprintf(err, errlen, "LISTEN_PID is %ld, not this process (%ld): the sockets were "
             "passed to another process", pid, (long)getpid());
    return -1;
  }
  n = parse_count(fds_s);
  if (n < 1 || n > MAX_PASSED) {
    snprintf(err, errlen, "LISTEN_FDS is '%.32s', not a number of sockets from 1 to %d",
             fds_s, MAX_PASSED);
    return -1;
  }
  if ((p = calloc((size_t)n, sizeof *p)) == NULL) {
    snprintf(err, errlen, "not enough memory");
    return -1;
  }
  for (i = 0; i < n; i++) {
    p[i].fd = LISTEN_FDS_START + (int)i;
    strcpy(p[i].name, "unknown");
  }
  if (names != NULL) {                   /* "a:b:c", one name per socket */
    const char *s = names;
    for (i = 0;; i++) {
      size_t len = strcspn(s, ":");
      if (i < n) {
        if (len > MAX_NAME) {
          snprintf(err, errlen, "LISTEN_FDNAMES: name %ld is longer than %d bytes", i + 1,
                   MAX_NAME);
          free(p);
          return -1;
        }
        memcpy(p[i].name, s, len);
        p[i].name[len] = '\0';
      }
      if (s[len] == '\0') break;
      s += len + 1;
    }
    if (i + 1 != n) {
      snprintf(err, errlen, "LISTEN_FDNAMES names %ld sockets, LISTEN_FDS passes %ld", i + 1,
               n);
      free(p);
      return -1;
    }
  }
  /* Ours now: not for a child. (A closed one is left: the check at use
   * names it.) */
  for (i = 0; i < n; i++) {
    int flags = fcntl(p[i].fd, F_GETFD);
    if (flags >= 0) (void)fcntl(p[i].fd, F_SETFD, flags | FD_CLOEXEC);
  }
  unsetenv("LISTEN_PID");
  unsetenv("LISTEN_FDS");
  unsetenv("LISTEN_FDNAMES");
  passed = p;
  npassed = (int)n;
  return 0;
}

/* The sockets passed to this process (read on the first call), or NULL
 * with a message. */
static const passed_t *get_passed(int *n, char *err, size_t errlen) {
  const passed_t *p;
  pthread_mutex_lock(&passed_lock);
  if (passed == NULL) (void)read_environment(err, errlen);
  p = passed;
  *n = npassed;
  pthread_mutex_unlock(&passed_lock);
  return p;
}

/* core.listen_fds(): { { fd = 3, name = "web" }, ... }, or nil, message. */
int multiloop_listen_fds(lua_State *L) {
  char err[256];
  int i, n;
  const passed_t *p = get_passed(&n, err, sizeof err);
  if (p == NULL) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_createtable(L, n, 0);
  for (i = 0; i < n; i++) {
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, p[i].fd);
    lua_setfield(L, -2, "fd");
    lua_pushstring(L, p[i].name);
    lua_setfield(L, -2, "name");
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

/* "fd 3 'web', fd 4 'admin'" (the first few), for a message. */
static void list_passed(const passed_t *p, int n, char *out, size_t outlen) {
  size_t used = 0;
  int i;
  out[0] = '\0';
  for (i = 0; i < n && i < 8 && used < outlen; i++)
    used += (size_t)snprintf(out + used, outlen - used, "%sfd %d '%.40s'", i ? ", " : "",
                             p[i].fd, p[i].name);
  if (i < n && used < outlen) snprintf(out + used, outlen - used, ", ...");
}

/* The fds that `listen` names: "systemd", every passed socket;
 * "systemd:NAME", every one named NAME (a .socket unit with two
 * ListenStream= lines names both after itself). A malloc'd array and its
 * length, or NULL with a message naming the option (or "not enough
 * memory", *n = -1: raise that as it is). */
static int *pick_passed(const char *listen, int *count, char *err, size_t errlen) {
  char why[256], names[400];
  const char *want = NULL;
  int i, n, k = 0;
  int *fds;
  const passed_t *p;
  *count = 0;
  if (strcmp(listen, "systemd") != 0) {
    if (strncmp(listen, "systemd:", 8) != 0 || listen[8] == '\0') {
      snprintf(err, errlen, "option 'listen' must be 'systemd' or 'systemd:NAME' (got '%.64s')",
               listen);
      return NULL;
    }
    want = listen + 8;
  }
  if ((p = get_passed(&n, why, sizeof why)) == NULL) {
    snprintf(err, errlen, "option 'listen' '%.64s': %s", listen, why);
    return NULL;
  }
  if ((fds = malloc((size_t)n * sizeof *fds)) == NULL) {
    snprintf(err, errlen, "not enough memory");
    *count = -1;
    return NULL;
  }
  for (i = 0; i < n; i++)
    if (want == NULL || strcmp(p[i].name, want) == 0) fds[k++] = p[i].fd;
  if (k == 0) {
    list_passed(p, n, names, sizeof names);
    snprintf(err, errlen, "option 'listen' '%.64s': no socket is named '%.40s' (passed: %s)",
             listen, want, names);
    free(fds);
    return NULL;
  }
  *count = k;
  return fds;
}

/* --- checking and opening an inherited socket ------------------------------ */

/* Whether fd is a listening stream socket we can serve: TCP over IPv4 or
 * IPv6, or a Unix stream socket. 0 and *is_unix, or a uv error with the
 * message "<label>: <why>". */
static int check_socket(int fd, const char *label, int *is_unix, char *err, size_t errlen) {
  struct stat st;
  int domain, type, proto, listening;
  socklen_t len;
  if (fstat(fd, &st) != 0) {
    int rc = uv_translate_sys_error(errno);
    snprintf(err, errlen, "%s: %s (%s)", label,
             rc == UV_EBADF ? "not an open file descriptor" : uv_strerror(rc), uv_err_name(rc));
    return rc;
  }
  if (!S_ISSOCK(st.st_mode)) {
    snprintf(err, errlen, "%s: not a socket (%s) (ENOTSOCK)", label,
             S_ISREG(st.st_mode) ? "a regular file" : S_ISDIR(st.st_mode) ? "a directory"
             : S_ISFIFO(st.st_mode) ? "a pipe" : S_ISCHR(st.st_mode) ? "a character device"
             : "not a socket");
    return UV_ENOTSOCK;
  }
  len = sizeof domain;
  if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0) goto fail_errno;
  len = sizeof type;
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) goto fail_errno;
  len = sizeof proto;
  if (getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &proto, &len) != 0) goto fail_errno;
  if (domain != AF_INET && domain != AF_INET6 && domain != AF_UNIX) {
    snprintf(err, errlen, "%s: a socket of address family %d, not TCP (IPv4, IPv6) or Unix "
             "(EAFNOSUPPORT)", label, domain);
    return UV_EAFNOSUPPORT;
  }
  if (type != SOCK_STREAM) {
    snprintf(err, errlen, "%s: a %s socket, not a stream socket (TCP or Unix stream) "
             "(ESOCKTNOSUPPORT)", label, type == SOCK_DGRAM ? (domain == AF_UNIX ?
             "Unix datagram" : "UDP (datagram)") : type == SOCK_SEQPACKET ? "seqpacket"
             : "non-stream");
    return UV_ESOCKTNOSUPPORT;
  }
  if (domain != AF_UNIX && proto != IPPROTO_TCP) {
    snprintf(err, errlen, "%s: a stream socket of protocol %d, not TCP (EPROTONOSUPPORT)",
             label, proto);
    return UV_EPROTONOSUPPORT;
  }
  len = sizeof listening;
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0) goto fail_errno;
  if (!listening) {
    snprintf(err, errlen, "%s: the socket is not listening (bind and listen it first) "
             "(EINVAL)", label);
    return UV_EINVAL;
  }
  *is_unix = domain == AF_UNIX;
  return 0;

fail_errno: {
    int rc = uv_translate_sys_error(errno);
    snprintf(err, errlen, "%s: %s (%s)", label, uv_strerror(rc), uv_err_name(rc));
    return rc;
  }
}

/* What messages call inherited socket i: "option 'fd' 7", "option
 * 'listen' 'systemd:web' (fd 4)". */
static void label_of(const multiloop_config_t *cfg, int i, char *out, size_t outlen) {
  if (cfg->inherit_listen)
    snprintf(out, outlen, "option 'listen' '%.64s' (fd %d)", cfg->inherit_listen,
             cfg->inherit_fds[i]);
  else
    snprintf(out, outlen, "option 'fd' %d", cfg->inherit_fds[i]);
}

/* Checks every inherited socket of cfg; 0, or a uv error with a message.
 * *is_unix: all are Unix sockets; *mixed: some are and some are not. */
static int check_all(const multiloop_config_t *cfg, int *is_unix, int *mixed, char *err,
                     size_t errlen) {
  char label[128];
  int i, rc, unix_n = 0, one = 0;
  for (i = 0; i < cfg->ninherit; i++) {
    label_of(cfg, i, label, sizeof label);
    if ((rc = check_socket(cfg->inherit_fds[i], label, &one, err, errlen)) != 0) return rc;
    unix_n += one;
  }
  *is_unix = unix_n == cfg->ninherit;
  *mixed = unix_n > 0 && unix_n < cfg->ninherit;
  return 0;
}

/* core.new, after the other options: `listen` or `fd` into cfg (ninherit
 * stays 0 without either), checked now so that a bad one fails the
 * server's creation naming it (start checks again: it may have been closed
 * since). Raises. */
void multiloop_inherited_config(lua_State *L, multiloop_config_t *cfg) {
  char err[1024];
  int is_unix, mixed, has_listen, has_fd;
  has_listen = lua_getfield(L, 1, "listen") != LUA_TNIL;
  has_fd = lua_getfield(L, 1, "fd") != LUA_TNIL;
  lua_pop(L, 2);
  if (!has_listen && !has_fd) return;
  if (has_listen && has_fd) luaL_error(L, "option 'listen' cannot be combined with 'fd'");
  if (cfg->path) luaL_error(L, "option '%s' cannot be combined with 'path'",
                            has_fd ? "fd" : "listen");
  if (has_fd) {
    lua_Integer fd;
    int isint;
    lua_getfield(L, 1, "fd");
    fd = lua_tointegerx(L, -1, &isint);
    if (!isint || lua_type(L, -1) != LUA_TNUMBER || fd < 0 || fd > INT_MAX)
      luaL_error(L, "option 'fd' must be an integer from 0 to %d (got %s)", INT_MAX,
                 luaL_tolstring(L, -1, NULL));
    lua_pop(L, 1);
    if ((cfg->inherit_fds = malloc(sizeof *cfg->inherit_fds)) == NULL)
      luaL_error(L, "not enough memory");
    cfg->inherit_fds[0] = (int)fd;
    cfg->ninherit = 1;                     /* config_free frees inherit_fds */
  } else {
    size_t n;
    const char *s;
    int count;
    lua_getfield(L, 1, "listen");
    if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "option 'listen' must be a string");
    s = lua_tolstring(L, -1, &n);
    if (n > 8 + MAX_NAME || strlen(s) != n)
      luaL_error(L, "option 'listen' must be 'systemd' or 'systemd:NAME' with a NAME of 1 to "
                 "%d bytes", MAX_NAME);
    if ((cfg->inherit_listen = strdup(s)) == NULL) luaL_error(L, "not enough memory");
    if ((cfg->inherit_fds = pick_passed(s, &count, err, sizeof err)) == NULL)
      luaL_error(L, "%s", err);
    cfg->ninherit = count;                 /* config_free frees both */
    lua_pop(L, 1);
  }
  if (cfg->dispatch == MULTILOOP_DISPATCH_REUSEPORT && cfg->ninherit > 1)
    luaL_error(L, "option 'dispatch' 'reuseport' serves one inherited socket, and option "
               "'listen' '%s' names %d: use 'queue' or 'ipc'", cfg->inherit_listen,
               cfg->ninherit);
  if (check_all(cfg, &is_unix, &mixed, err, sizeof err) != 0) luaL_error(L, "%s", err);
}

/* A dup of fd for a listener: close-on-exec, non-blocking (the flag is the
 * socket's: the original fd gets it too). -1 with errno on failure. */
static int dup_listening(int fd) {
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0), flags;
  if (copy < 0) return -1;
  if ((flags = fcntl(copy, F_GETFL)) < 0 || fcntl(copy, F_SETFL, flags | O_NONBLOCK) != 0) {
    int e = errno;
    close(copy);
    errno = e;
    return -1;
  }
  return copy;
}

/* What address() reports: the first socket's address. */
static int record_address(multiloop_runtime_t *rt, int fd) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  int is_unix;
  memset(&ss, 0, sizeof ss);
  if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0) return -1;
  rt->bound_unix = is_unix = ss.ss_family == AF_UNIX;
  rt->bound_path[0] = '\0';
  if (is_unix) {
    const struct sockaddr_un *sun = (const struct sockaddr_un *)&ss;
    size_t off = offsetof(struct sockaddr_un, sun_path);
    size_t plen = len > off ? len - off : 0;
    if (plen > sizeof sun->sun_path) plen = sizeof sun->sun_path;
    if (plen > 0 && sun->sun_path[0] == '\0') {            /* abstract: "@name" */
      rt->bound_path[0] = '@';
      memcpy(rt->bound_path + 1, sun->sun_path + 1, plen - 1);
      rt->bound_path[plen] = '\0';
    } else {
      memcpy(rt->bound_path, sun->sun_path, plen);
      rt->bound_path[plen] = '\0';
    }
  } else {
    uv_ip_name((const struct sockaddr *)&ss, rt->bound_host, sizeof rt->bound_host);
    rt->bound_port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                    : ((struct sockaddr_in *)&ss)->sin_port);
  }
  return 0;
}

/* open_sockets (server.c), main thread, each start: the listening fds of
 * this start, dups of the inherited ones: the first into the acceptor's
 * listen_fd (with reuseport, a dup of the one socket into each worker's),
 * the others into acceptor.more_fds; whatever no thread has taken when the
 * start fails or the server stops, runtime_free closes (here:
 * multiloop_inherited_free). 0, or a uv error with a message. */
int multiloop_inherited_open(multiloop_runtime_t *rt, char *err, size_t errlen) {
  const multiloop_config_t *cfg = rt->cfg;
  multiloop_acceptor_t *a = &rt->acceptor;
  int reuseport = cfg->dispatch == MULTILOOP_DISPATCH_REUSEPORT;
  int i, rc, n = reuseport ? cfg->nworkers : 1, at = 0;
  char label[128];
  if ((rc = check_all(cfg, &rt->listen_unix, &rt->listen_mixed, err, errlen)) != 0) return rc;
  for (i = 0; i < n; i++) {
    int fd = dup_listening(cfg->inherit_fds[0]);
    if (fd < 0) goto fail_errno;
    if (reuseport) rt->workers[i].listen_fd = fd;
    else a->listen_fd = fd;
  }
  if (!reuseport && cfg->ninherit > 1) {
    int more = cfg->ninherit - 1;
    a->more = calloc((size_t)more, sizeof *a->more);
    a->more_fds = malloc((size_t)more * sizeof *a->more_fds);
    if (a->more == NULL || a->more_fds == NULL) {
      snprintf(err, errlen, "not enough memory");
      return UV_ENOMEM;                    /* multiloop_inherited_free frees what was made */
    }
    for (i = 0; i < more; i++) a->more_fds[i] = -1;
    a->nmore = more;
    for (i = 0; i < more; i++) {
      at = i + 1;
      if ((a->more_fds[i] = dup_listening(cfg->inherit_fds[at])) < 0) goto fail_errno;
    }
  }
  at = 0;
  if (record_address(rt, cfg->inherit_fds[0]) != 0) goto fail_errno;
  return 0;

fail_errno:
  rc = uv_translate_sys_error(errno);
  label_of(cfg, at, label, sizeof label);
  snprintf(err, errlen, "%s: %s (%s)", label, uv_strerror(rc), uv_err_name(rc));
  return rc;
}

/* runtime_free, main thread, every thread joined: the other inherited
 * sockets' dups no listener took, and their arrays. */
void multiloop_inherited_free(multiloop_runtime_t *rt) {
  multiloop_acceptor_t *a = &rt->acceptor;
  int i;
  for (i = 0; i < a->nmore; i++)
    if (a->more_fds[i] >= 0) close(a->more_fds[i]);
  free(a->more);
  free(a->more_fds);
  a->more = NULL;
  a->more_fds = NULL;
  a->nmore = 0;
}

/* Whether a connection is a Unix one. Known for the whole server unless
 * its inherited sockets are of both kinds: then an ipc hand-off says (the
 * type pending on the pipe) and an fd is asked (SO_DOMAIN). */
int multiloop_conn_is_unix(const multiloop_runtime_t *rt, uv_pipe_t *pipe, uv_os_sock_t fd) {
  int domain = 0;
  socklen_t len = sizeof domain;
  if (!rt->listen_mixed) return rt->listen_unix;
  if (fd < 0) return pipe != NULL && uv_pipe_pending_type(pipe) == UV_NAMED_PIPE;
  if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0) return 0;
  return domain == AF_UNIX;
}
