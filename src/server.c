/*
 * server.c: the server object of the main Lua state ("multiloop.core.server")
 * and the start/stop handshakes, plus the module's entry point.
 *
 * Threads: everything here runs on the thread of the Lua state that created
 * the server. The userdata holds the copied configuration (plain malloc'd
 * data that the other threads only read) and, between start and stop, the
 * runtime: the acceptor and the workers. Options arrive already validated by
 * lua/multiloop/init.lua; this file checks only what C must not get wrong.
 *
 * start(): one socketpair per worker; start every worker and wait until each
 * has loaded the handler or failed; then start the acceptor and wait until it
 * listens. Any failure tears down what was started and returns nil, message.
 * stop(): stop the acceptor (no new connections), then every worker (each
 * closes its connections, runs its loop dry, closes its Lua state), then join
 * every thread and free the runtime. __gc and __close stop a running server.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "multiloop.h"

#define SERVER_MT "multiloop.core.server"

typedef struct {
  multiloop_config_t cfg;
  multiloop_runtime_t *rt;             /* NULL while stopped */
} server_t;

/* --- the runtime ----------------------------------------------------------- */

static void runtime_free(multiloop_runtime_t *rt) {
  int i, n = rt->cfg->nworkers;
  multiloop_acceptor_stop(rt);
  for (i = 0; i < n; i++) multiloop_worker_request_stop(&rt->workers[i]);
  for (i = 0; i < n; i++) multiloop_worker_join(&rt->workers[i]);
  for (i = 0; i < n; i++) {                /* fds no thread took over */
    if (rt->acceptor.pipe_fds[i] >= 0) close(rt->acceptor.pipe_fds[i]);
    if (rt->workers[i].pipe_fd >= 0) close(rt->workers[i].pipe_fd);
    free(rt->workers[i].error);
  }
  free(rt->acceptor.error);
  free(rt->acceptor.pipes);
  free(rt->acceptor.pipe_fds);
  free(rt->workers);
  uv_mutex_destroy(&rt->resume_lock);
  uv_sem_destroy(&rt->ready);
  free(rt);
}

/* Returns the runtime, or NULL with a message in err[]. */
static multiloop_runtime_t *runtime_start(const multiloop_config_t *cfg, char *err,
                                          size_t errlen) {
  int i, n = cfg->nworkers, started = 0, rc;
  multiloop_runtime_t *rt = calloc(1, sizeof *rt);
  if (rt == NULL || uv_sem_init(&rt->ready, 0) != 0) {
    free(rt);
    snprintf(err, errlen, "not enough memory");
    return NULL;
  }
  if (uv_mutex_init(&rt->resume_lock) != 0) {
    uv_sem_destroy(&rt->ready);
    free(rt);
    snprintf(err, errlen, "not enough memory");
    return NULL;
  }
  rt->cfg = cfg;
  rt->acceptor.pipes = calloc(n, sizeof *rt->acceptor.pipes);
  rt->acceptor.pipe_fds = malloc(n * sizeof *rt->acceptor.pipe_fds);
  rt->workers = calloc(n, sizeof *rt->workers);
  if (!rt->acceptor.pipes || !rt->acceptor.pipe_fds || !rt->workers) {
    snprintf(err, errlen, "not enough memory");
    free(rt->acceptor.pipes);
    free(rt->acceptor.pipe_fds);
    free(rt->workers);
    uv_mutex_destroy(&rt->resume_lock);
    uv_sem_destroy(&rt->ready);
    free(rt);
    return NULL;
  }
  for (i = 0; i < n; i++) rt->acceptor.pipe_fds[i] = rt->workers[i].pipe_fd = -1;

  for (i = 0; i < n; i++) {
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
      snprintf(err, errlen, "socketpair: %s", uv_strerror(uv_translate_sys_error(errno)));
      goto fail;
    }
    rt->acceptor.pipe_fds[i] = fds[0];
    rt->workers[i].pipe_fd = fds[1];
  }
  for (i = 0; i < n; i++) {
    multiloop_worker_t *w = &rt->workers[i];
    w->id = i + 1;
    w->cfg = cfg;
    w->rt = rt;
    if ((rc = multiloop_worker_start(w)) != 0) {
      snprintf(err, errlen, "worker %d: cannot start a thread: %s", w->id, uv_strerror(rc));
      break;
    }
    started++;
  }
  for (i = 0; i < started; i++) uv_sem_wait(&rt->ready);
  if (started < n) goto fail;
  for (i = 0; i < n; i++) {
    if (rt->workers[i].failed) {
      snprintf(err, errlen, "worker %d failed to load the handler: %s", i + 1,
               rt->workers[i].error);
      goto fail;
    }
  }
  if (multiloop_acceptor_start(rt) != 0) {
    snprintf(err, errlen, "%s", rt->acceptor.error);
    goto fail;
  }
  return rt;

fail:
  runtime_free(rt);
  return NULL;
}

/* --- the Lua object -------------------------------------------------------- */

static server_t *check_server(lua_State *L) {
  return luaL_checkudata(L, 1, SERVER_MT);
}

static void config_free(multiloop_config_t *cfg) {
  free(cfg->host);
  free(cfg->handler);
  free(cfg->config);
  free(cfg->package_path);
  free(cfg->package_cpath);
  memset(cfg, 0, sizeof *cfg);
}

static char *copy_field(lua_State *L, int t, const char *key, size_t *len) {
  size_t n;
  const char *s;
  char *p;
  lua_getfield(L, t, key);
  s = luaL_tolstring(L, -1, &n);          /* validated by the Lua side */
  p = malloc(n + 1);
  if (p == NULL) luaL_error(L, "not enough memory");
  memcpy(p, s, n + 1);
  if (len) *len = n;
  lua_pop(L, 2);
  return p;
}

static int int_field(lua_State *L, int t, const char *key) {
  int v;
  lua_getfield(L, t, key);
  v = (int)luaL_checkinteger(L, -1);
  lua_pop(L, 1);
  return v;
}

/* core.new(opts): opts are validated by lua/multiloop/init.lua. Raises with a
 * message naming the config path when config cannot be copied. */
static int core_new(lua_State *L) {
  server_t *s;
  const char *kind;
  luaL_checktype(L, 1, LUA_TTABLE);
  s = lua_newuserdatauv(L, sizeof *s, 0);
  memset(s, 0, sizeof *s);                 /* a valid, stopped server first */
  luaL_setmetatable(L, SERVER_MT);

  s->cfg.port = int_field(L, 1, "port");
  s->cfg.backlog = int_field(L, 1, "backlog");
  s->cfg.nworkers = int_field(L, 1, "workers");
  s->cfg.max_connections = int_field(L, 1, "max_connections");
  s->cfg.idle_timeout = (uint64_t)int_field(L, 1, "idle_timeout");
  s->cfg.write_high_water = (size_t)int_field(L, 1, "write_high_water");
  s->cfg.write_low_water = (size_t)int_field(L, 1, "write_low_water");
  s->cfg.keepalive = (unsigned)int_field(L, 1, "keepalive_seconds");
  lua_getfield(L, 1, "nodelay");
  s->cfg.nodelay = lua_toboolean(L, -1);
  lua_pop(L, 1);
  luaL_argcheck(L, s->cfg.nworkers >= 1, 1, "workers must be at least 1");
  lua_getfield(L, 1, "handler_kind");
  kind = luaL_checkstring(L, -1);
  if (strcmp(kind, "module") == 0) s->cfg.handler_kind = MULTILOOP_HANDLER_MODULE;
  else if (strcmp(kind, "path") == 0) s->cfg.handler_kind = MULTILOOP_HANDLER_PATH;
  else if (strcmp(kind, "bytecode") == 0) s->cfg.handler_kind = MULTILOOP_HANDLER_BYTECODE;
  else return luaL_error(L, "unknown handler kind '%s'", kind);
  lua_pop(L, 1);
  s->cfg.host = copy_field(L, 1, "host", NULL);
  s->cfg.handler = copy_field(L, 1, "handler", &s->cfg.handler_len);
  s->cfg.package_path = copy_field(L, 1, "package_path", NULL);
  s->cfg.package_cpath = copy_field(L, 1, "package_cpath", NULL);
  lua_getfield(L, 1, "config");
  if (!multiloop_copy_encode(L, -1, "config", &s->cfg.config, &s->cfg.config_len))
    return lua_error(L);
  lua_pop(L, 1);
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
  lua_pushboolean(L, 1);
  return 1;
}

static int server_stop(lua_State *L) {
  server_t *s = check_server(L);
  if (s->rt != NULL) {
    multiloop_runtime_t *rt = s->rt;
    s->rt = NULL;
    runtime_free(rt);
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
  lua_pushstring(L, s->rt->acceptor.bound_host);
  lua_pushinteger(L, s->rt->acceptor.bound_port);
  return 2;
}

static int server_running(lua_State *L) {
  lua_pushboolean(L, check_server(L)->rt != NULL);
  return 1;
}

/* --- module functions ------------------------------------------------------ */

static void signal_cb(uv_signal_t *h, int signum) {
  *(int *)h->loop->data = signum;
  uv_stop(h->loop);
}

/* core.wait_signal(): blocks this thread until SIGINT or SIGTERM arrives and
 * returns its name. The workers keep serving meanwhile. */
static int core_wait_signal(lua_State *L) {
  uv_loop_t loop;
  uv_signal_t sigint, sigterm;
  int got = 0, rc;
  if ((rc = uv_loop_init(&loop)) != 0)
    return luaL_error(L, "wait_signal: %s", uv_strerror(rc));
  loop.data = &got;
  uv_signal_init(&loop, &sigint);
  uv_signal_init(&loop, &sigterm);
  uv_signal_start(&sigint, signal_cb, SIGINT);
  uv_signal_start(&sigterm, signal_cb, SIGTERM);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_close((uv_handle_t *)&sigint, NULL);
  uv_close((uv_handle_t *)&sigterm, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  lua_pushstring(L, got == SIGINT ? "SIGINT" : "SIGTERM");
  return 1;
}

static int core_parallelism(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_available_parallelism());
  return 1;
}

static const luaL_Reg server_methods[] = {
  { "start", server_start },
  { "stop", server_stop },
  { "address", server_address },
  { "running", server_running },
  { NULL, NULL }
};

static const luaL_Reg server_meta[] = {
  { "__gc", server_gc },
  { "__close", server_stop },
  { NULL, NULL }
};

static const luaL_Reg module_funcs[] = {
  { "new", core_new },
  { "wait_signal", core_wait_signal },
  { "parallelism", core_parallelism },
  { "shared", multiloop_shared_open },
  { NULL, NULL }
};

LUAMOD_API int luaopen_multiloop_core(lua_State *L);

__attribute__((visibility("default"))) int luaopen_multiloop_core(lua_State *L) {
  /* A peer that goes away must be an EPIPE from write, not a dead process
   * (LuaSocket does the same). Leave a handler someone else installed. */
  struct sigaction sa;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
    signal(SIGPIPE, SIG_IGN);

  if (luaL_newmetatable(L, SERVER_MT)) {
    luaL_setfuncs(L, server_meta, 0);
    luaL_newlib(L, server_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  luaL_newlib(L, module_funcs);
  lua_pushfstring(L, "libuv %s", uv_version_string());
  lua_setfield(L, -2, "uv_version");
  return 1;
}
