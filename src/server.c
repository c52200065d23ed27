/*
 * server.c: the server object of the main Lua state ("multiloop.core.server")
 * and the start/stop handshakes.
 *
 * Threads: everything here runs on the thread of the Lua state that created
 * the server. The userdata holds the copied configuration (plain malloc'd
 * data that the other threads only read) and, between start and stop, the
 * runtime: the acceptor and the workers. Options arrive already validated by
 * lua/multiloop/init.lua; core.new checks again every bound C must not get
 * wrong (see "core.new's options").
 *
 * start(): one socketpair per worker; start every worker and wait until each
 * has loaded the handler or failed; then start the acceptor and wait until it
 * listens. Any failure tears down what was started and returns nil, message.
 * stop(): stop the acceptor (no new connections), then every worker (each
 * closes its connections, runs its loop dry, closes its Lua state), then join
 * every thread and free the runtime. __gc and __close stop a running server.
 * The main thread's blocking waits are here too: server:wait_stopped and
 * core.wait_signal on a loop of their own made and closed by each call, and
 * the signal watcher (server:signals) that run() keeps open from start to
 * end, on a loop that lives as long as the watcher (it also reopens the log
 * file on SIGUSR1: log.c).
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "multiloop.h"
#include "proxy.h"
#include "tls.h"

#define SERVER_MT "multiloop.core.server"

/* One row of server:stats(): row 0 holds the totals, row i worker i. */
typedef struct {
  uint64_t accepted, active, handed_off, accept_errors, bytes_in, bytes_out;
  uint64_t threads;                    /* live light threads (thread.c) */
  uint64_t connects, connect_errors, reused, pooled;   /* outbound (outbound.c) */
  uint64_t tls_handshakes, tls_errors;                 /* tls.c */
  uint64_t proxy_errors;                               /* proxy.c */
  uint64_t generation, old_connections;                /* reload (worker.c) */
} counts_t;

typedef struct {
  multiloop_config_t cfg;
  multiloop_runtime_t *rt;             /* NULL while stopped */
  uint64_t reloads;                    /* reloads that switched, since the last start */
  counts_t counts[];                   /* nworkers + 1 rows: the last run's
                                          figures once stopped, scratch while
                                          running */
} server_t;

/* --- the runtime ----------------------------------------------------------- */

static void close_fd(uv_os_sock_t *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

#define LOAD(x) atomic_load_explicit(&(x), memory_order_relaxed)

/* Reads the counters into counts[0..nworkers]: per worker (relaxed atomics,
 * no lock on the hot path), summed into row 0. */
static void runtime_counts(multiloop_runtime_t *rt, counts_t *counts) {
  int i, n = rt->cfg->nworkers;
  int reuseport = rt->cfg->dispatch == MULTILOOP_DISPATCH_REUSEPORT;
  counts_t *total = &counts[0];
  memset(counts, 0, (size_t)(n + 1) * sizeof *counts);
  for (i = 0; i < n; i++) {
    multiloop_worker_t *w = &rt->workers[i];
    counts_t *c = &counts[i + 1];
    int active = LOAD(w->active);
    int threads = LOAD(w->nthreads);
    c->accepted = LOAD(w->accepted);
    c->active = active > 0 ? (uint64_t)active : 0;
    c->bytes_in = LOAD(w->bytes_in);
    c->bytes_out = LOAD(w->bytes_out);
    c->threads = threads > 0 ? (uint64_t)threads : 0;
    total->threads += c->threads;
    {
      int pooled = LOAD(w->pooled);
      c->connects = LOAD(w->connects_ok);
      c->connect_errors = LOAD(w->connect_errors);
      c->reused = LOAD(w->reused);
      c->pooled = pooled > 0 ? (uint64_t)pooled : 0;
      total->connects += c->connects;
      total->connect_errors += c->connect_errors;
      total->reused += c->reused;
      total->pooled += c->pooled;
    }
    c->tls_handshakes = LOAD(w->tls_handshakes);
    c->tls_errors = LOAD(w->tls_errors);
    total->tls_handshakes += c->tls_handshakes;
    total->tls_errors += c->tls_errors;
    c->proxy_errors = LOAD(w->proxy_errors);
    total->proxy_errors += c->proxy_errors;
    {
      int old = LOAD(w->old_conns);
      c->generation = LOAD(w->generation);
      c->old_connections = old > 0 ? (uint64_t)old : 0;
      total->old_connections += c->old_connections;
    }
    total->accepted += c->accepted;
    total->active += c->active;
    total->bytes_in += c->bytes_in;
    total->bytes_out += c->bytes_out;
    if (reuseport) {
      total->handed_off += LOAD(w->listener.accepted);   /* no hand-off: straight in */
      total->accept_errors += LOAD(w->listener.accept_errors);
    }
  }
  if (!reuseport) {
    total->handed_off = LOAD(rt->acceptor.handed_off);
    total->accept_errors = LOAD(rt->acceptor.listener.accept_errors);
    for (i = 0; i < rt->acceptor.nmore; i++)       /* several inherited sockets */
      total->accept_errors += LOAD(rt->acceptor.more[i].accept_errors);
  }
}

/* Stops whatever still runs (at once), joins every thread, frees it all.
 * With `final`, the counters as the last thread left them are kept there. */
static void runtime_free(multiloop_runtime_t *rt, counts_t *final) {
  int i, n = rt->cfg->nworkers;
  multiloop_acceptor_stop(rt);
  for (i = 0; i < n; i++) multiloop_worker_request_stop(&rt->workers[i], 0);
  for (i = 0; i < n; i++) multiloop_worker_join(&rt->workers[i]);
  (void)multiloop_slots_audit(rt);
  if (final) runtime_counts(rt, final);
  for (i = 0; i < n; i++) {                /* what no thread took over */
    multiloop_worker_t *w = &rt->workers[i];
    close_fd(&rt->acceptor.pipe_fds[i]);
    close_fd(&w->pipe_fd);
    close_fd(&w->listen_fd);
    multiloop_inbox_destroy(&w->inbox);
    free(w->stop_msg);
    free(w->error);
    free(w->reload_error);
  }
  close_fd(&rt->acceptor.listen_fd);
  multiloop_inherited_free(rt);            /* several inherited sockets: the others */
  multiloop_listen_unlink(rt->cfg, &rt->listen_addr);   /* only the file we made */
  free(rt->acceptor.error);
  free(rt->acceptor.pipes);
  free(rt->acceptor.pipe_fds);
  free(rt->workers);
  uv_cond_destroy(&rt->start_cond);
  uv_mutex_destroy(&rt->start_lock);
  uv_mutex_destroy(&rt->resume_lock);
  uv_sem_destroy(&rt->ready);
  free(rt);
}

/* The listening sockets, made here so that a bind error comes back at once
 * and port 0 is resolved once: reuseport workers all bind the port the first
 * one got. */
static int open_sockets(multiloop_runtime_t *rt, char *err, size_t errlen) {
  const multiloop_config_t *cfg = rt->cfg;
  int i, rc, port = cfg->port;
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  uv_os_sock_t first;
  multiloop_listen_addr_t *la = &rt->listen_addr;
  if (cfg->ninherit > 0) return multiloop_inherited_open(rt, err, errlen);   /* listen, fd */
  rt->listen_unix = cfg->path != NULL;
  if ((rc = multiloop_listen_resolve(cfg, la, err, errlen)) != 0) return rc;
  if (cfg->dispatch == MULTILOOP_DISPATCH_REUSEPORT) {
    if ((rc = multiloop_listen_probe(cfg, la, port, &port, err, errlen)) != 0) return rc;
    for (i = 0; i < cfg->nworkers; i++) {
      rc = multiloop_listen_socket(cfg, la, port, 1, &rt->workers[i].listen_fd, &port, err,
                                   errlen);
      if (rc != 0) return rc;
    }
    first = rt->workers[0].listen_fd;
  } else {
    rc = multiloop_listen_socket(cfg, la, port, 0, &rt->acceptor.listen_fd, &port, err, errlen);
    if (rc != 0) return rc;
    first = rt->acceptor.listen_fd;
  }
  if (!cfg->path && getsockname(first, (struct sockaddr *)&ss, &len) == 0) {
    uv_ip_name((struct sockaddr *)&ss, rt->bound_host, sizeof rt->bound_host);
  }
  rt->bound_port = port;
  return 0;
}

/* SIGINT, SIGTERM (and SIGUSR1) are the main thread's: the threads made between
 * block_signals and restore_signals inherit a mask that blocks them (a new
 * thread starts with its creator's mask), so the kernel always delivers
 * them to the thread that waits for them (run()'s watcher), and a worker's
 * system calls are never interrupted by one. */
static void block_signals(sigset_t *old) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGUSR1);                /* logs: run() reopens the log file on it */
  sigaddset(&set, SIGHUP);                 /* reload: run() reloads on it */
  pthread_sigmask(SIG_BLOCK, &set, old);
}

static void restore_signals(const sigset_t *old) { pthread_sigmask(SIG_SETMASK, old, NULL); }

/* Waits until each of the first `started` workers has loaded the handler
 * and run its init, or failed, for up to cfg->start_timeout ms in all. Past
 * that, the ones still in their Lua code are interrupted (worker.c), and
 * the wait goes on until they have failed: a worker is joined, never left
 * running. */
static void wait_started(multiloop_runtime_t *rt, int started) {
  uint64_t now = uv_hrtime(), deadline = now + rt->cfg->start_timeout * UINT64_C(1000000);
  int i;
  uv_mutex_lock(&rt->start_lock);
  while (rt->nready < started && (now = uv_hrtime()) < deadline)
    (void)uv_cond_timedwait(&rt->start_cond, &rt->start_lock, deadline - now);
  for (i = 0; i < started && rt->nready < started; i++) {
    multiloop_worker_t *w = &rt->workers[i];
    w->start_phase_at_deadline = w->start_phase;
    multiloop_worker_interrupt(w);
  }
  while (rt->nready < started) uv_cond_wait(&rt->start_cond, &rt->start_lock);
  uv_mutex_unlock(&rt->start_lock);
}

/* Returns the runtime, or NULL with a message in err[]. */
static multiloop_runtime_t *runtime_start(const multiloop_config_t *cfg, char *err,
                                          size_t errlen) {
  int i, n = cfg->nworkers, started = 0, rc;
  sigset_t mask;
  multiloop_runtime_t *rt = calloc(1, sizeof *rt);
  if (rt == NULL) goto nomem;
  if (uv_sem_init(&rt->ready, 0) != 0) {
    free(rt);
    goto nomem;
  }
  if (uv_mutex_init(&rt->resume_lock) != 0) {
    uv_sem_destroy(&rt->ready);
    free(rt);
    goto nomem;
  }
  if (uv_mutex_init(&rt->start_lock) != 0) {
    uv_mutex_destroy(&rt->resume_lock);
    uv_sem_destroy(&rt->ready);
    free(rt);
    goto nomem;
  }
  if (uv_cond_init(&rt->start_cond) != 0) {
    uv_mutex_destroy(&rt->start_lock);
    uv_mutex_destroy(&rt->resume_lock);
    uv_sem_destroy(&rt->ready);
    free(rt);
    goto nomem;
  }
  rt->cfg = cfg;
  rt->acceptor.listen_fd = -1;
  rt->acceptor.pipes = calloc(n, sizeof *rt->acceptor.pipes);
  rt->acceptor.pipe_fds = malloc(n * sizeof *rt->acceptor.pipe_fds);
  rt->workers = calloc(n, sizeof *rt->workers);
  if (!rt->acceptor.pipes || !rt->acceptor.pipe_fds || !rt->workers) {
    rt->cfg = &(const multiloop_config_t){ .nworkers = 0 };   /* nothing else to free */
    runtime_free(rt, NULL);
    goto nomem;
  }
  for (i = 0; i < n; i++) {               /* a valid, empty state first */
    multiloop_worker_t *w = &rt->workers[i];
    rt->acceptor.pipe_fds[i] = w->pipe_fd = w->listen_fd = -1;
    w->id = i + 1;
    w->cfg = cfg;
    w->rt = rt;
  }
  for (i = 0; i < n; i++) {
    multiloop_worker_t *w = &rt->workers[i];
    if ((w->stop_msg = calloc(1, sizeof *w->stop_msg)) == NULL) {
      snprintf(err, errlen, "not enough memory");
      goto fail;
    }
    w->stop_msg->keep = 1;
  }
  if (open_sockets(rt, err, errlen) != 0) goto fail;
  if (cfg->dispatch == MULTILOOP_DISPATCH_IPC) {
    for (i = 0; i < n; i++) {
      int fds[2];
      if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
        snprintf(err, errlen, "socketpair: %s", uv_strerror(uv_translate_sys_error(errno)));
        goto fail;
      }
      rt->acceptor.pipe_fds[i] = fds[0];
      rt->workers[i].pipe_fd = fds[1];
    }
  }
  block_signals(&mask);
  for (i = 0; i < n; i++) {
    if ((rc = multiloop_worker_start(&rt->workers[i])) != 0) {
      snprintf(err, errlen, "worker %d: cannot start a thread: %s", i + 1, uv_strerror(rc));
      break;
    }
    started++;
  }
  restore_signals(&mask);
  wait_started(rt, started);
  if (started < n) goto fail;
  for (i = 0; i < n; i++) {
    multiloop_worker_t *w = &rt->workers[i];
    if (w->interrupted) {
      snprintf(err, errlen, "worker %d: %s within %llu ms", i + 1,
               w->start_phase_at_deadline == MULTILOOP_START_INIT
                   ? "init did not finish" : "the handler did not load",
               (unsigned long long)cfg->start_timeout);
      goto fail;
    }
    if (rt->workers[i].failed) {
      snprintf(err, errlen, "worker %d failed to load the handler: %s", i + 1,
               rt->workers[i].error);
      goto fail;
    }
  }
  if (cfg->dispatch != MULTILOOP_DISPATCH_REUSEPORT) {
    block_signals(&mask);
    rc = multiloop_acceptor_start(rt);
    restore_signals(&mask);
    if (rc != 0) {
      snprintf(err, errlen, "%s", rt->acceptor.error);
      goto fail;
    }
  }
  return rt;

fail:
  runtime_free(rt, NULL);
  return NULL;
nomem:
  snprintf(err, errlen, "not enough memory");
  return NULL;
}

/* Graceful stop, first half: no new connections; every worker runs the
 * handler's shutdown hook and gives its connections `timeout` ms. */
static void runtime_stop_begin(multiloop_runtime_t *rt, uint64_t timeout) {
  int i;
  multiloop_acceptor_stop(rt);
  for (i = 0; i < rt->cfg->nworkers; i++) multiloop_worker_request_stop(&rt->workers[i], timeout);
}

static int runtime_finished(multiloop_runtime_t *rt) {
  int i;
  for (i = 0; i < rt->cfg->nworkers; i++)
    if (rt->workers[i].thread_started && !atomic_load(&rt->workers[i].finished)) return 0;
  return 1;
}

/* --- reload ---------------------------------------------------------------- */

/* Posts reload `step` to every worker and waits for each one that took it
 * to answer (worker.c); a PREPARE for up to start_timeout ms, then the
 * workers still loading are interrupted, as at start, and waited for.
 * A worker that could not take the step is marked failed ("stopped"). */
static void reload_all(multiloop_runtime_t *rt, int step) {
  int i, n = rt->cfg->nworkers, posted = 0;
  uint64_t now = uv_hrtime(), deadline = now + rt->cfg->start_timeout * UINT64_C(1000000);
  uv_mutex_lock(&rt->start_lock);
  rt->nreload = 0;
  for (i = 0; i < n; i++) {
    multiloop_worker_t *w = &rt->workers[i];
    w->reload_answered = w->reload_failed = w->reload_interrupted = 0;
  }
  uv_mutex_unlock(&rt->start_lock);
  for (i = 0; i < n; i++) {
    multiloop_worker_t *w = &rt->workers[i];
    if (multiloop_worker_request_reload(w, step) == 0) {
      posted++;
      continue;
    }
    uv_mutex_lock(&rt->start_lock);
    w->reload_answered = w->reload_failed = 1;     /* reload_error NULL: "stopped" */
    free(w->reload_error);
    w->reload_error = NULL;
    uv_mutex_unlock(&rt->start_lock);
  }
  uv_mutex_lock(&rt->start_lock);
  while (rt->nreload < posted && step == MULTILOOP_RELOAD_PREPARE &&
         (now = uv_hrtime()) < deadline)
    (void)uv_cond_timedwait(&rt->start_cond, &rt->start_lock, deadline - now);
  if (rt->nreload < posted && step == MULTILOOP_RELOAD_PREPARE)
    for (i = 0; i < n; i++) multiloop_worker_reload_interrupt(&rt->workers[i]);
  while (rt->nreload < posted) uv_cond_wait(&rt->start_cond, &rt->start_lock);
  uv_mutex_unlock(&rt->start_lock);
}

/* Every worker loads `src` into a new state; if one fails, every new
 * state is dropped and err names the first worker that failed; otherwise
 * they all switch to it. Returns 0 or -1. */
static int runtime_reload(multiloop_runtime_t *rt, const multiloop_reload_t *src, char *err,
                          size_t errlen) {
  int i, n = rt->cfg->nworkers, bad = -1;
  rt->reload = src;
  reload_all(rt, MULTILOOP_RELOAD_PREPARE);
  rt->reload = NULL;                       /* every worker has answered: none reads it */
  for (i = 0; i < n && bad < 0; i++)
    if (rt->workers[i].reload_failed) bad = i;
  if (bad >= 0) {
    const char *why = rt->workers[bad].reload_error;
    snprintf(err, errlen, "worker %d: %s", bad + 1, why ? why : "stopped");
    reload_all(rt, MULTILOOP_RELOAD_ABORT);
    return -1;
  }
  reload_all(rt, MULTILOOP_RELOAD_COMMIT);
  return 0;
}

/* --- the Lua object -------------------------------------------------------- */

static server_t *check_server(lua_State *L) {
  return luaL_checkudata(L, 1, SERVER_MT);
}

static void config_free(multiloop_config_t *cfg) {
  free(cfg->host);
  free(cfg->path);
  free(cfg->handler);
  free(cfg->config);
  free(cfg->package_path);
  free(cfg->package_cpath);
  multiloop_tls_free(cfg);
  multiloop_proxy_free(cfg);
  free(cfg->inherit_listen);
  free(cfg->inherit_fds);
  multiloop_logger_free(cfg->logger);      /* every thread that wrote through it is joined */
  memset(cfg, 0, sizeof *cfg);
}

/* --- core.new's options ---------------------------------------------------- */

/* init.lua checks every option first; these checks are for what C must not
 * get wrong when core.new is called some other way: every bound that
 * protects memory (or would wrap in a cast) is checked here again. The
 * errors name the option as init.lua's do, without its "multiloop.server: ". */
#define MAX_MS 0x7fffffff
#define MAX_BYTES 0x7fffffff

static int bad_option(lua_State *L, const char *key, const char *what) {
  size_t n;
  const char *got;
  if (lua_type(L, -1) == LUA_TSTRING) {
    got = lua_tolstring(L, -1, &n);
    if (n <= 64 && strlen(got) == n) got = lua_pushfstring(L, "'%s'", got);
    else got = lua_pushfstring(L, "a string of %d bytes", (int)n);
  } else {
    got = luaL_tolstring(L, -1, NULL);
  }
  return luaL_error(L, "option '%s' %s (got %s)", key, what, got);
}

/* opts[key] as an integer from lo to hi (an integral float counts). */
static lua_Integer int_field(lua_State *L, const char *key, lua_Integer lo, lua_Integer hi) {
  lua_Integer v;
  int isint;
  lua_getfield(L, 1, key);
  v = lua_tointegerx(L, -1, &isint);
  if (!isint || lua_type(L, -1) != LUA_TNUMBER || v < lo || v > hi) {
    char what[96];
    snprintf(what, sizeof what, "must be an integer from %lld to %lld", (long long)lo,
             (long long)hi);
    bad_option(L, key, what);
  }
  lua_pop(L, 1);
  return v;
}

/* opts[key] as a malloc'd copy of a string of lo to hi bytes; with `nul_ok`
 * it may hold zero bytes (bytecode), else not (a C string). */
static char *str_field(lua_State *L, const char *key, size_t lo, size_t hi, int nul_ok,
                       size_t *len) {
  size_t n;
  const char *v;
  char *p;
  lua_getfield(L, 1, key);
  if (lua_type(L, -1) != LUA_TSTRING) bad_option(L, key, "must be a string");
  v = lua_tolstring(L, -1, &n);
  if (n < lo || n > hi) {
    char what[64];
    snprintf(what, sizeof what, "must be a string of %zu to %zu bytes", lo, hi);
    bad_option(L, key, what);
  }
  if (!nul_ok && strlen(v) != n) bad_option(L, key, "must not contain a zero byte");
  if ((p = malloc(n + 1)) == NULL) {
    luaL_error(L, "not enough memory");
    return NULL;                           /* not reached: luaL_error raises */
  }
  memcpy(p, v, n + 1);
  if (len) *len = n;
  lua_pop(L, 1);
  return p;
}

/* opts[key], one of `names` (NULL-terminated), or `dflt` when nil. */
static int choice_field(lua_State *L, const char *key, const char *const names[], int dflt) {
  int i;
  if (lua_getfield(L, 1, key) == LUA_TNIL) {
    lua_pop(L, 1);
    return dflt;
  }
  if (lua_type(L, -1) == LUA_TSTRING)
    for (i = 0; names[i]; i++)
      if (strcmp(lua_tostring(L, -1), names[i]) == 0) {
        lua_pop(L, 1);
        return i;
      }
  return bad_option(L, key, "is not one of the choices");
}

static int has_field(lua_State *L, const char *key) {
  int has = lua_getfield(L, 1, key) != LUA_TNIL;
  lua_pop(L, 1);
  return has;
}

static int bool_field(lua_State *L, const char *key) {
  int v = (lua_getfield(L, 1, key), lua_toboolean(L, -1));
  lua_pop(L, 1);
  return v;
}

/* core.new(opts): opts as lua/multiloop/init.lua prepares them. Raises with
 * a message naming the option when one is out of bounds, or the config path
 * when config cannot be copied. */
int multiloop_server_new(lua_State *L) {
  static const char *const dispatches[] = { "ipc", "queue", "reuseport", NULL };
  static const char *const balances[] = { "round_robin", "least_connections", NULL };
  static const char *const kinds[] = { "module", "path", "bytecode", NULL };
  server_t *s;
  multiloop_config_t *cfg;
  int nworkers, isint;
  lua_Integer low;
  size_t size;
  luaL_checktype(L, 1, LUA_TTABLE);
  nworkers = (int)int_field(L, "workers", 1, MULTILOOP_MAX_WORKERS);
  size = sizeof *s + ((size_t)nworkers + 1) * sizeof(counts_t);
  s = lua_newuserdatauv(L, size, 0);
  memset(s, 0, size);                      /* a valid, stopped server first */
  luaL_setmetatable(L, SERVER_MT);         /* from here __gc frees what is copied */
  cfg = &s->cfg;
  cfg->mode = -1;

  cfg->nworkers = nworkers;
  cfg->port = (int)int_field(L, "port", 0, 65535);
  cfg->backlog = (int)int_field(L, "backlog", 1, 65535);
  cfg->max_connections = (int)int_field(L, "max_connections", 0, INT32_MAX);
  cfg->idle_timeout = (uint64_t)int_field(L, "idle_timeout", 0, MAX_MS);
  cfg->write_high_water = (size_t)int_field(L, "write_high_water", 1, MAX_BYTES);
  lua_getfield(L, 1, "write_low_water");     /* an integral float counts, as in int_field */
  if (lua_type(L, -1) == LUA_TNUMBER && (low = lua_tointegerx(L, -1, &isint), isint) &&
      low >= 0 && (size_t)low >= cfg->write_high_water) {
    char what[80];
    snprintf(what, sizeof what, "must be below write_high_water (%zu)", cfg->write_high_water);
    bad_option(L, "write_low_water", what);
  }
  lua_pop(L, 1);
  cfg->write_low_water = (size_t)int_field(L, "write_low_water", 0, MAX_BYTES);
  cfg->keepalive = (unsigned)int_field(L, "keepalive_seconds", 0, MAX_MS / 1000 + 1);
  cfg->nodelay = bool_field(L, "nodelay");
  /* Reload: drain_timeout, ms an old generation drains; nil: the default. */
  if (lua_getfield(L, 1, "drain_timeout") == LUA_TNIL) {
    cfg->drain_timeout = 30000;
  } else {
    cfg->drain_timeout = (uint64_t)int_field(L, "drain_timeout", 0, INT_MAX);
  }
  lua_pop(L, 1);
  /* start_timeout: ms a worker may take to load the handler and run init; nil: the default. */
  if (lua_getfield(L, 1, "start_timeout") == LUA_TNIL) {
    cfg->start_timeout = 30000;
  } else {
    cfg->start_timeout = (uint64_t)int_field(L, "start_timeout", 1, INT_MAX);
  }
  lua_pop(L, 1);
  /* inbox_limit bounds memory, so it is checked here too; nil: the default. */
  if (lua_getfield(L, 1, "inbox_limit") == LUA_TNIL) {
    cfg->inbox_limit = MULTILOOP_INBOX_LIMIT_DEFAULT;
  } else {
    cfg->inbox_limit = (size_t)int_field(L, "inbox_limit", 1, MULTILOOP_INBOX_LIMIT_MAX);
  }
  lua_pop(L, 1);
  /* dns_*: the resolver (resolve.c); max_lookups bounds memory and the pool's use. */
  if (lua_getfield(L, 1, "dns_cache_ttl") == LUA_TNIL) {
    cfg->dns_cache_ttl = MULTILOOP_DNS_CACHE_TTL_DEFAULT;
  } else {
    cfg->dns_cache_ttl = (uint64_t)int_field(L, "dns_cache_ttl", 0, MAX_MS);
  }
  lua_pop(L, 1);
  if (lua_getfield(L, 1, "dns_max_lookups") == LUA_TNIL) {
    cfg->dns_max_lookups = MULTILOOP_DNS_MAX_LOOKUPS_DEFAULT;
  } else {
    cfg->dns_max_lookups = (int)int_field(L, "dns_max_lookups", 1, MULTILOOP_DNS_MAX_LOOKUPS_MAX);
  }
  lua_pop(L, 1);
  /* receive_limit bounds what one read may buffer (serve.c); nil: the default. */
  if (lua_getfield(L, 1, "receive_limit") == LUA_TNIL) {
    cfg->receive_limit = MULTILOOP_RECEIVE_LIMIT_DEFAULT;
  } else {
    cfg->receive_limit = (size_t)int_field(L, "receive_limit", 1, MULTILOOP_RECEIVE_LIMIT_MAX);
  }
  lua_pop(L, 1);
  cfg->unlink = bool_field(L, "unlink");
  cfg->dispatch = (multiloop_dispatch)choice_field(L, "dispatch", dispatches,
                                                   MULTILOOP_DISPATCH_IPC);
  cfg->balance = (multiloop_balance)choice_field(L, "balance", balances,
                                                 MULTILOOP_BALANCE_ROUND_ROBIN);
  if (lua_getfield(L, 1, "path") != LUA_TNIL) {
    lua_pop(L, 1);
    cfg->path = str_field(L, "path", 1, MULTILOOP_MAX_PATH, 0, NULL);
    if (cfg->dispatch == MULTILOOP_DISPATCH_REUSEPORT)
      return luaL_error(L, "option 'dispatch' 'reuseport' cannot listen on a Unix socket (path)");
    cfg->host = str_field(L, "host", 0, MULTILOOP_MAX_HOST, 0, NULL);   /* unused */
  } else if (has_field(L, "listen") || has_field(L, "fd")) {
    lua_pop(L, 1);                         /* an inherited socket: multiloop_inherited_config */
    cfg->host = str_field(L, "host", 0, MULTILOOP_MAX_HOST, 0, NULL);   /* unused */
  } else {
    lua_pop(L, 1);
    cfg->host = str_field(L, "host", 1, MULTILOOP_MAX_HOST, 0, NULL);
  }
  if (lua_getfield(L, 1, "mode") != LUA_TNIL) {
    lua_pop(L, 1);
    if (!cfg->path) return luaL_error(L, "option 'mode' applies only to a Unix socket (path)");
    cfg->mode = (int)int_field(L, "mode", 0, 0777);
  } else {
    lua_pop(L, 1);
  }
  multiloop_inherited_config(L, cfg);      /* listen, fd: socket activation (activation.c) */
  cfg->handler_kind = (multiloop_handler_kind)choice_field(L, "handler_kind", kinds, -1);
  if ((int)cfg->handler_kind < 0) return luaL_error(L, "option 'handler_kind' is required");
  cfg->handler = str_field(L, "handler", 1, MAX_BYTES, cfg->handler_kind ==
                           MULTILOOP_HANDLER_BYTECODE, &cfg->handler_len);
  cfg->package_path = str_field(L, "package_path", 0, MAX_BYTES, 0, NULL);
  cfg->package_cpath = str_field(L, "package_cpath", 0, MAX_BYTES, 0, NULL);
  lua_getfield(L, 1, "config");
  if (!multiloop_copy_encode(L, -1, "config", &cfg->config, &cfg->config_len)) {
    lua_pushfstring(L, "option 'config': %s", lua_tostring(L, -1));
    return lua_error(L);
  }
  lua_pop(L, 1);
  multiloop_tls_configure(L, 1, cfg);      /* tls, tls_ca: OpenSSL loads the files now */
  multiloop_proxy_configure(L, 1, cfg);
  /* Logs (log.c): log_level (nil: info) and log, a file opened here, so
   * that a path that cannot be opened fails the server's creation. */
  {
    int level = choice_field(L, "log_level", multiloop_log_levels, MULTILOOP_LOG_INFO - 1) + 1;
    char *path = NULL, why[512];
    if (lua_getfield(L, 1, "log") != LUA_TNIL) {
      lua_pop(L, 1);
      path = str_field(L, "log", 1, MULTILOOP_LOG_MAX_PATH, 0, NULL);   /* nothing raises */
    } else {                                                            /* until it is freed */
      lua_pop(L, 1);
    }
    cfg->logger = multiloop_logger_open(path, level, why, sizeof why);
    free(path);
    if (cfg->logger == NULL)
      return luaL_error(L, "option 'log' must be a file that can be opened for appending: %s",
                        why);
  }
  multiloop_logger_make_current(cfg->logger);   /* multiloop.log's, from now on */
  lua_settop(L, 2);                        /* opts, the server */
  return 1;
}

static int server_start(lua_State *L) {
  server_t *s = check_server(L);
  char err[1024];
  if (s->rt != NULL) return luaL_error(L, "the server is already running");
  if (s->cfg.host == NULL) return luaL_error(L, "the server is not configured");
  s->rt = runtime_start(&s->cfg, err, sizeof err);
  if (s->rt == NULL) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  s->reloads = 0;                          /* a restart counts from zero */
  lua_pushboolean(L, 1);
  return 1;
}

static int server_stop(lua_State *L) {
  server_t *s = check_server(L);
  if (s->rt != NULL) {
    multiloop_runtime_t *rt = s->rt;
    s->rt = NULL;
    runtime_free(rt, s->counts);
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int server_gc(lua_State *L) {
  server_t *s = check_server(L);
  server_stop(L);
  config_free(&s->cfg);
  return 0;
}

static int server_address(lua_State *L) {
  server_t *s = check_server(L);
  if (s->rt == NULL) {
    lua_pushnil(L);
    lua_pushliteral(L, "not running");
    return 2;
  }
  if (s->cfg.path) {                       /* a Unix socket: just its path */
    lua_pushstring(L, s->cfg.path);
    return 1;
  }
  if (s->rt->bound_unix) {                 /* an inherited one: the path it is bound to */
    lua_pushstring(L, s->rt->bound_path);
    return 1;
  }
  lua_pushstring(L, s->rt->bound_host);
  lua_pushinteger(L, s->rt->bound_port);
  return 2;
}

/* server:stop_begin(timeout_ms): the first half of a graceful stop; returns
 * at once. server:stop() then waits for (or cuts short) the rest. */
static int server_stop_begin(lua_State *L) {
  server_t *s = check_server(L);
  lua_Integer timeout = luaL_checkinteger(L, 2);
  luaL_argcheck(L, timeout >= 0, 2, "timeout must not be negative");
  if (s->rt != NULL) runtime_stop_begin(s->rt, (uint64_t)timeout);
  return 0;
}

static void poll_finished_cb(uv_timer_t *t) {
  if (runtime_finished(t->data)) uv_stop(t->loop);
}

/* Blocks the calling thread on a loop of its own, made and closed here,
 * until `rt` has finished stopping. Returns 0, or -1 when no loop could be
 * made. The workers keep serving meanwhile. */
static int block_until_finished(multiloop_runtime_t *rt) {
  uv_loop_t loop;
  uv_timer_t poll;
  if (uv_loop_init(&loop) != 0) return -1;
  uv_timer_init(&loop, &poll);              /* polled every 20 ms: once per stop */
  poll.data = rt;
  uv_timer_start(&poll, poll_finished_cb, 20, 20);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_close((uv_handle_t *)&poll, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return 0;
}

/* --- the signal watcher ("multiloop.core.signals") ------------------------ */

/* SIGINT and SIGTERM caught for as long as the watcher is open, on a loop of
 * its own that runs only while the main thread waits. libuv's handler writes
 * every signal that arrives in between to the loop's signal pipe, so none is
 * lost and the default action (death, without shutdown hooks or clean-up)
 * never comes back while the watcher is open: run() keeps one from its first
 * line to its last. A fresh uv_signal_t per wait would leave a gap between
 * one wait's close and the next one's start, and a second signal landing in
 * it killed the process. Only the creating thread uses it. */
#define SIGNALS_MT "multiloop.core.signals"
#define SIGNALS_QUEUE 16

typedef struct {
  uv_loop_t loop;
  uv_signal_t sigint, sigterm;
  uv_signal_t sigusr1;                 /* logs: reopens `logger`'s file; not counted */
  uv_signal_t sighup;                  /* reload: wait(false) returns "SIGHUP"; not counted */
  unsigned hups;                       /* SIGHUPs not yet waited for (coalesced into one) */
  multiloop_logger_t *logger;          /* the server's (its user value keeps it) */
  uv_timer_t poll;                     /* while waiting for a stop: the workers */
  uv_timer_t tick;                     /* wait(_, ms): run()'s `every` */
  int ticked;                          /* the tick timer fired during this wait */
  int open;
  unsigned count;                      /* signals seen since open */
  unsigned head, tail;                 /* queue[head..tail): not yet waited for */
  int queue[SIGNALS_QUEUE];
} signals_t;

static void watch_signal_cb(uv_signal_t *h, int signum) {
  signals_t *w = h->data;
  w->count++;
  if (w->tail - w->head < SIGNALS_QUEUE) w->queue[w->tail++ % SIGNALS_QUEUE] = signum;
  uv_stop(&w->loop);
}

static void watch_poll_cb(uv_timer_t *t) { uv_stop(t->loop); }

static void watch_tick_cb(uv_timer_t *t) {
  signals_t *w = t->data;
  w->ticked = 1;
  uv_stop(t->loop);
}

/* Logs: SIGUSR1 (logrotate's postrotate) reopens the log file; the wait goes
 * on. A failure is logged to the file still open. */
static void watch_usr1_cb(uv_signal_t *h, int signum) {
  signals_t *w = h->data;
  char why[512];
  (void)signum;
  if (multiloop_logger_path(w->logger) == NULL)
    multiloop_log_as(w->logger, MULTILOOP_LOG_INFO, "main", 0,
                     "SIGUSR1: nothing to reopen (the log is stderr)");
  else if (multiloop_logger_reopen(w->logger, why, sizeof why) != 0)
    multiloop_log_as(w->logger, MULTILOOP_LOG_ERROR, "main", 0,
                     "SIGUSR1: cannot reopen the log: %s", why);
  else
    multiloop_log_as(w->logger, MULTILOOP_LOG_INFO, "main", 0, "SIGUSR1: log reopened");
}

/* Reload: SIGHUP ends a wait(false) with "SIGHUP" (run() reloads); one
 * that comes during wait(true), a graceful stop, waits for nothing. */
static void watch_hup_cb(uv_signal_t *h, int signum) {
  signals_t *w = h->data;
  (void)signum;
  w->hups++;
  uv_stop(&w->loop);
}

/* Runs the loop without blocking: delivers the signals already written to
 * its pipe. */
static void signals_collect(signals_t *w) {
  if (w->open) uv_run(&w->loop, UV_RUN_NOWAIT);
}

static void signals_close(signals_t *w) {
  if (!w->open) return;
  signals_collect(w);
  w->open = 0;
  uv_close((uv_handle_t *)&w->sigint, NULL);
  uv_close((uv_handle_t *)&w->sigterm, NULL);
  uv_close((uv_handle_t *)&w->sigusr1, NULL);
  uv_close((uv_handle_t *)&w->sighup, NULL);
  uv_close((uv_handle_t *)&w->poll, NULL);
  uv_close((uv_handle_t *)&w->tick, NULL);
  uv_run(&w->loop, UV_RUN_DEFAULT);
  uv_loop_close(&w->loop);
}

static signals_t *check_signals(lua_State *L) {
  signals_t *w = luaL_checkudata(L, 1, SIGNALS_MT);
  if (!w->open) luaL_error(L, "the signal watcher is closed");
  return w;
}

/* server:signals(): a watcher, open from now until closed (or collected).
 * The server is its user value: wait(true) reads the server's workers. */
static int server_signals(lua_State *L) {
  signals_t *w;
  int rc;
  server_t *s = luaL_checkudata(L, 1, SERVER_MT);
  w = lua_newuserdatauv(L, sizeof *w, 1);
  memset(w, 0, sizeof *w);                 /* closed first */
  luaL_setmetatable(L, SIGNALS_MT);
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 1);
  if ((rc = uv_loop_init(&w->loop)) != 0)
    return luaL_error(L, "signals: cannot make a loop: %s", uv_strerror(rc));
  uv_signal_init(&w->loop, &w->sigint);
  uv_signal_init(&w->loop, &w->sigterm);
  uv_signal_init(&w->loop, &w->sigusr1);
  uv_signal_init(&w->loop, &w->sighup);
  uv_timer_init(&w->loop, &w->poll);
  uv_timer_init(&w->loop, &w->tick);
  w->sigint.data = w->sigterm.data = w->sigusr1.data = w->poll.data = w->tick.data = w;
  w->sighup.data = w;
  w->logger = s->cfg.logger;
  w->open = 1;
  /* SIGINT first, SIGTERM last: the specs take a caught SIGTERM (/proc
   * SigCgt) to mean all three are, since lua.c catches SIGINT anyway while
   * a script runs. */
  if ((rc = uv_signal_start(&w->sigint, watch_signal_cb, SIGINT)) != 0 ||
      (rc = uv_signal_start(&w->sigusr1, watch_usr1_cb, SIGUSR1)) != 0 ||
      (rc = uv_signal_start(&w->sighup, watch_hup_cb, SIGHUP)) != 0 ||
      (rc = uv_signal_start(&w->sigterm, watch_signal_cb, SIGTERM)) != 0) {
    signals_close(w);
    return luaL_error(L, "signals: cannot catch SIGINT, SIGTERM, SIGUSR1 and SIGHUP: %s",
                      uv_strerror(rc));
  }
  return 1;
}

static void push_signal_name(lua_State *L, int signum) {
  lua_pushstring(L, signum == SIGINT ? "SIGINT" : "SIGTERM");
}

/* watcher:wait([until_stopped [, ms]]): the name of the next signal not yet
 * waited for, blocking until one comes; with until_stopped, nil as soon as
 * the server's workers have all finished a graceful stop (or it is not
 * running); with ms (0 to 2^31-1), nil, "timeout" once ms pass without a
 * signal (run()'s `every`). */
static int signals_wait(lua_State *L) {
  signals_t *w = check_signals(L);
  int until_stopped = lua_toboolean(L, 2);
  lua_Integer ms = luaL_optinteger(L, 3, -1);
  server_t *s;
  luaL_argcheck(L, ms >= -1 && ms <= INT_MAX, 3, "must be from 0 to 2147483647 ms");
  lua_getiuservalue(L, 1, 1);
  s = luaL_checkudata(L, -1, SERVER_MT);
  signals_collect(w);
  w->ticked = 0;
  if (ms >= 0) uv_timer_start(&w->tick, watch_tick_cb, (uint64_t)ms, 0);
  for (;;) {
    if (w->head != w->tail) {
      push_signal_name(L, w->queue[w->head++ % SIGNALS_QUEUE]);
      break;
    }
    if (!until_stopped && w->hups > 0) {
      w->hups = 0;                         /* several in a row: one reload */
      lua_pushliteral(L, "SIGHUP");
      break;
    }
    if (until_stopped && (s->rt == NULL || runtime_finished(s->rt))) {
      lua_pushnil(L);
      break;
    }
    if (w->ticked) {
      lua_pushnil(L);
      lua_pushliteral(L, "timeout");
      uv_timer_stop(&w->poll);
      return 2;
    }
    if (until_stopped && !uv_is_active((uv_handle_t *)&w->poll))
      uv_timer_start(&w->poll, watch_poll_cb, 20, 20);   /* once per stop */
    uv_run(&w->loop, UV_RUN_DEFAULT);      /* until a signal, a poll or a tick */
  }
  uv_timer_stop(&w->poll);
  uv_timer_stop(&w->tick);
  return 1;
}

/* watcher:count(): how many SIGINT and SIGTERM arrived since it opened
 * (two sent closer together than the kernel delivers them count as one). */
static int signals_count(lua_State *L) {
  signals_t *w = check_signals(L);
  signals_collect(w);
  lua_pushinteger(L, (lua_Integer)w->count);
  return 1;
}

static int signals_gc(lua_State *L) {
  signals_close(luaL_checkudata(L, 1, SIGNALS_MT));
  return 0;
}

/* server:wait_stopped(): blocks until every worker has finished a graceful
 * stop. The workers are polled rather than given a way to reach the main
 * thread. */
static int server_wait_stopped(lua_State *L) {
  server_t *s = check_server(L);
  if (s->rt == NULL || runtime_finished(s->rt)) return 0;
  if (block_until_finished(s->rt) < 0) return luaL_error(L, "wait_stopped: cannot make a loop");
  return 0;
}

static void wait_signal_cb(uv_signal_t *h, int signum) {
  *(int *)h->loop->data = signum;
  uv_stop(h->loop);
}

/* core.wait_signal(): blocks this thread until SIGINT or SIGTERM arrives and
 * returns its name. The handlers exist only during the call: run() uses a
 * watcher instead. */
int multiloop_wait_signal(lua_State *L) {
  uv_loop_t loop;
  uv_signal_t sigint, sigterm;
  int got = 0;
  if (uv_loop_init(&loop) != 0) return luaL_error(L, "wait_signal: cannot make a loop");
  loop.data = &got;
  uv_signal_init(&loop, &sigint);
  uv_signal_init(&loop, &sigterm);
  uv_signal_start(&sigint, wait_signal_cb, SIGINT);
  uv_signal_start(&sigterm, wait_signal_cb, SIGTERM);
  while (got == 0) uv_run(&loop, UV_RUN_DEFAULT);
  uv_close((uv_handle_t *)&sigint, NULL);
  uv_close((uv_handle_t *)&sigterm, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  push_signal_name(L, got);
  return 1;
}

static void set_counter(lua_State *L, const char *name, uint64_t v) {
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, name);
}

/* server:stats(): live while running; once stopped, the figures the last run
 * ended with (active 0); all zero before the first start. Totals equal the
 * sums of the workers'. */
static int server_stats(lua_State *L) {
  server_t *s = check_server(L);
  int i, n = s->cfg.nworkers;
  if (s->rt != NULL) runtime_counts(s->rt, s->counts);
  lua_createtable(L, 0, 8);
  lua_createtable(L, n, 0);
  for (i = 1; i <= n; i++) {
    lua_createtable(L, 0, 5);
    set_counter(L, "accepted", s->counts[i].accepted);
    set_counter(L, "active", s->counts[i].active);
    set_counter(L, "bytes_in", s->counts[i].bytes_in);
    set_counter(L, "bytes_out", s->counts[i].bytes_out);
    set_counter(L, "threads", s->counts[i].threads);
    set_counter(L, "connects", s->counts[i].connects);
    set_counter(L, "connect_errors", s->counts[i].connect_errors);
    set_counter(L, "reused", s->counts[i].reused);
    set_counter(L, "pooled", s->counts[i].pooled);
    set_counter(L, "tls_handshakes", s->counts[i].tls_handshakes);
    set_counter(L, "tls_errors", s->counts[i].tls_errors);
    set_counter(L, "proxy_errors", s->counts[i].proxy_errors);
    set_counter(L, "generation", s->counts[i].generation);
    set_counter(L, "old_connections", s->counts[i].old_connections);
    lua_rawseti(L, -2, i);
  }
  lua_setfield(L, -2, "workers");
  set_counter(L, "accepted", s->counts[0].accepted);
  set_counter(L, "active", s->counts[0].active);
  set_counter(L, "handed_off", s->counts[0].handed_off);
  set_counter(L, "accept_errors", s->counts[0].accept_errors);
  set_counter(L, "bytes_in", s->counts[0].bytes_in);
  set_counter(L, "bytes_out", s->counts[0].bytes_out);
  set_counter(L, "threads", s->counts[0].threads);
  set_counter(L, "connects", s->counts[0].connects);
  set_counter(L, "connect_errors", s->counts[0].connect_errors);
  set_counter(L, "reused", s->counts[0].reused);
  set_counter(L, "pooled", s->counts[0].pooled);
  set_counter(L, "tls_handshakes", s->counts[0].tls_handshakes);
  set_counter(L, "tls_errors", s->counts[0].tls_errors);
  set_counter(L, "proxy_errors", s->counts[0].proxy_errors);
  set_counter(L, "old_connections", s->counts[0].old_connections);
  set_counter(L, "reloads", s->reloads);
  return 1;
}

/* A malloc'd copy of the string at idx (NUL-terminated, *len its length). */
static char *copy_string(lua_State *L, int idx, size_t *len) {
  const char *p = lua_tolstring(L, idx, len);
  char *q = p ? malloc(*len + 1) : NULL;
  if (q) memcpy(q, p, *len + 1);
  return q;
}

/* core:reload(kind, handler, has_config, config [, why]): init.lua checked
 * the handler (kind nil: the one the server has, loaded again); `config`
 * is encoded here. true, or nil, "worker N: <error>". With `why` ("SIGHUP"),
 * the outcome is logged as "main". After a reload the server keeps the new
 * handler and config: a restart and the next reload use them. */
static int server_reload(lua_State *L) {
  static const char *const kinds[] = { "module", "path", "bytecode", NULL };
  server_t *s = check_server(L);
  multiloop_config_t *cfg = &s->cfg;
  const char *why = luaL_optstring(L, 6, NULL);
  multiloop_reload_t src = { cfg->handler_kind, cfg->handler, cfg->handler_len, cfg->config,
                             cfg->config_len };
  char *handler = NULL, *config = NULL, err[1024];
  size_t hlen = 0, clen = 0;
  int kind = -1;
  if (s->rt == NULL) {
    snprintf(err, sizeof err, "not running");
    goto failed;
  }
  if (!lua_isnoneornil(L, 2)) {
    kind = luaL_checkoption(L, 2, NULL, kinds);
    luaL_checktype(L, 3, LUA_TSTRING);
    if ((handler = copy_string(L, 3, &hlen)) == NULL) return luaL_error(L, "not enough memory");
    src.kind = (multiloop_handler_kind)kind;
    src.handler = handler;
    src.handler_len = hlen;
  }
  if (lua_toboolean(L, 4)) {
    if (!multiloop_copy_encode(L, 5, "config", &config, &clen)) {
      free(handler);
      snprintf(err, sizeof err, "option 'config': %s", lua_tostring(L, -1));
      goto failed;
    }
    src.config = config;
    src.config_len = clen;
  }
  if (runtime_reload(s->rt, &src, err, sizeof err) != 0) {
    free(handler);
    free(config);
    goto failed;
  }
  if (handler) {
    free(cfg->handler);
    cfg->handler = handler;
    cfg->handler_len = hlen;
    cfg->handler_kind = (multiloop_handler_kind)kind;
  }
  if (config) {
    free(cfg->config);
    cfg->config = config;
    cfg->config_len = clen;
  }
  s->reloads++;
  if (why)
    multiloop_log_as(cfg->logger, MULTILOOP_LOG_INFO, "main", 0, "%s: reloaded (generation %llu)",
                     why, (unsigned long long)atomic_load(&s->rt->workers[0].generation));
  lua_pushboolean(L, 1);
  return 1;
failed:
  if (why) multiloop_log_as(cfg->logger, MULTILOOP_LOG_ERROR, "main", 0,
                            "%s: reload failed, the old code keeps serving: %s", why, err);
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

static int server_running(lua_State *L) {
  lua_pushboolean(L, check_server(L)->rt != NULL);
  return 1;
}

/* --- module functions ------------------------------------------------------ */

/* server:send(id, value), server:broadcast(value): message.c. */
static int server_send(lua_State *L) { return multiloop_server_send(L, check_server(L)->rt); }
static int server_broadcast(lua_State *L) {
  return multiloop_server_broadcast(L, check_server(L)->rt);
}

/* Logs (log.c). server:log(level, ...): through this server's log, as
 * "main". server:reopen_log(): true, or nil, "reopen_log: <path>: <why>",
 * "<NAME>" (the old file stays open). */
static int server_log(lua_State *L) {
  server_t *s = check_server(L);
  if (s->cfg.logger == NULL) return luaL_error(L, "the server is not configured");
  return multiloop_log_lua(L, s->cfg.logger, 2, "main", 0, "server:log");
}

static int server_reopen_log(lua_State *L) {
  server_t *s = check_server(L);
  char why[512];
  const char *name;
  if (s->cfg.logger == NULL) return luaL_error(L, "the server is not configured");
  if (multiloop_logger_reopen(s->cfg.logger, why, sizeof why) == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushnil(L);
  lua_pushfstring(L, "reopen_log: %s", why);
  /* why ends with "(NAME)": the name alone as the third value */
  name = strrchr(why, '(');
  lua_pushlstring(L, name ? name + 1 : "EIO", name ? strlen(name + 1) - 1 : 3);
  return 3;
}

static const luaL_Reg server_methods[] = {
  { "log", server_log },
  { "reopen_log", server_reopen_log },
  { "start", server_start },
  { "stop", server_stop },
  { "address", server_address },
  { "stop_begin", server_stop_begin },
  { "wait_stopped", server_wait_stopped },
  { "signals", server_signals },
  { "stats", server_stats },
  { "running", server_running },
  { "reload", server_reload },
  { "send", server_send },
  { "broadcast", server_broadcast },
  { NULL, NULL }
};

static const luaL_Reg server_meta[] = {
  { "__gc", server_gc },
  { "__close", server_stop },
  { NULL, NULL }
};

static const luaL_Reg signals_methods[] = {
  { "wait", signals_wait },
  { "count", signals_count },
  { "close", signals_gc },
  { NULL, NULL }
};

static const luaL_Reg signals_meta[] = {
  { "__gc", signals_gc },
  { "__close", signals_gc },
  { NULL, NULL }
};

/* module.c: the server's and the watcher's metatables, in the state that
 * loads the module. */
void multiloop_server_register(lua_State *L) {
  if (luaL_newmetatable(L, SERVER_MT)) {
    luaL_setfuncs(L, server_meta, 0);
    luaL_newlib(L, server_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, SIGNALS_MT)) {
    luaL_setfuncs(L, signals_meta, 0);
    luaL_newlib(L, signals_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
}
