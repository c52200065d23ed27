/*
 * worker.c: a worker thread, its uv loop and its lua_State.
 *
 * The worker builds its own Lua state (standard libraries, the creating
 * state's package.path/cpath, the connection and timer metatables), then the
 * `worker` object: a core table made here (id, count, the copied config, and
 * the C primitives timer.c and message.c export as luaL_Reg arrays) handed to
 * lua/multiloop/worker.lua, found through that package.path, which returns
 * the object. It then loads the user's handler, calls its optional
 * init(worker), and serves the connections that reach it: from the acceptor
 * over its end of an IPC socketpair (ipc) or through its inbox (queue), or
 * from its own listening socket (reuseport). Connection callbacks, timers
 * and messages are then called from C directly: worker.lua runs at start.
 *
 * Threads: multiloop_worker_start, _request_stop and _join are called by the
 * main thread; everything else runs on the worker thread, which alone uses the
 * loop and the Lua state and closes both: the loop runs dry first (every
 * handle closed, uv_loop_close returns 0), then lua_close.
 *
 * Every connection that holds a slot for this worker (slots.c: taken by the
 * acceptor as it picked this worker, or here as our own reuseport listener
 * accepted it) is either opened as a connection (conn.c gives the slot back
 * when it closes) or closed here with its slot given back: one it cannot
 * take (stopping, no memory), one still queued in the inbox or pending on
 * the pipe as the worker closes, one still unread in the pipe's socket, one
 * whose fd the kernel dropped on the way (its byte came without it). None is
 * left behind.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>

#include <lualib.h>

#include "multiloop.h"
#include "tls.h"

/* --- the start handshake -------------------------------------------------- */

/* Moves the worker's start to `phase` under rt->start_lock; at DONE the
 * main thread, waiting in server.c, is woken. Returns whether the main
 * thread has given up on this worker (start_timeout). */
static int start_phase(multiloop_worker_t *w, int phase) {
  multiloop_runtime_t *rt = w->rt;
  int interrupted;
  uv_mutex_lock(&rt->start_lock);
  w->start_phase = phase;
  if (phase == MULTILOOP_START_DONE) {
    rt->nready++;
    uv_cond_signal(&rt->start_cond);
  }
  interrupted = w->interrupted;
  uv_mutex_unlock(&rt->start_lock);
  return interrupted;
}

/* A count hook: raises at every instruction, so that a loop in the
 * handler's top level or its init cannot go on, even one that catches
 * errors with pcall (the loop's own instructions raise outside it). */
static void interrupt_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  luaL_error(L, "start_timeout: interrupted");
}

/* Main thread, holding rt->start_lock, past the start timeout: gives up on
 * a worker that has not finished starting. A worker running Lua (loading
 * the handler or in init) gets the hook: lua_sethook is the one Lua call
 * written to be made asynchronously (ldebug.c: "can be called during a
 * signal"; lua.c does it from its SIGINT handler). From another thread it
 * is a benign race (word-sized stores the worker sees at its next
 * instruction), and the lock keeps the state alive and still in its Lua
 * code meanwhile. One not in Lua yet sees `interrupted` at its next phase
 * and stops there. Lua code the hook cannot reach (a coroutine made before
 * it was set, a C call that never returns) is not interrupted, and start()
 * keeps waiting for it. */
void multiloop_worker_interrupt(multiloop_worker_t *w) {
  if (w->start_phase >= MULTILOOP_START_OPENING) return;   /* done with Lua: wait */
  w->interrupted = 1;
  if (w->start_phase != MULTILOOP_START_NEW) lua_sethook(w->L, interrupt_hook, LUA_MASKCOUNT, 1);
}

/* Protected: pushes the function lua/multiloop/worker.lua returns, found
 * through the worker's package.path (copied from the creating state) as a
 * handler module would be. Not through require, so that package.loaded is
 * left as the handler would find it without us. Raises naming the file. */
static void load_front(lua_State *L) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "searchpath");
  lua_pushliteral(L, "multiloop.worker");
  lua_getfield(L, -3, "path");
  lua_call(L, 2, 2);                               /* package filename|nil tried */
  if (lua_isnil(L, -2))
    luaL_error(L, "cannot find multiloop.worker (lua/multiloop/worker.lua, installed with "
                  "the module) in the worker's package.path:\n\t%s", lua_tostring(L, -1));
  if (luaL_loadfilex(L, lua_tostring(L, -2), "t") != LUA_OK) lua_error(L);
  lua_call(L, 0, 1);                               /* package filename tried build */
  if (!lua_isfunction(L, -1))
    luaL_error(L, "%s: must return a function (got %s)", lua_tostring(L, -3),
               luaL_typename(L, -1));
  lua_replace(L, -4);                              /* build filename tried */
  lua_pop(L, 2);                                   /* build */
}

/* core.exiting(): true from the moment the worker starts to stop (a
 * graceful stop's grace period included), as OpenResty's
 * ngx.worker.exiting(). */
static int core_exiting(lua_State *L) {
  multiloop_worker_t *w = lua_touserdata(L, lua_upvalueindex(1));
  lua_pushboolean(L, w->stopping || w->closing);
  return 1;
}

/* core.time(): the wall clock, seconds since the epoch with microseconds
 * (uv_gettimeofday), not cached: what ngx.now() is measured against. */
static int core_time(lua_State *L) {
  uv_timeval64_t tv;
  if (uv_gettimeofday(&tv) != 0) return luaL_error(L, "worker.time: no clock");
  lua_pushnumber(L, (lua_Number)tv.tv_sec + (lua_Number)tv.tv_usec / 1e6);
  return 1;
}

static const luaL_Reg worker_funcs[] = {
  { "exiting", core_exiting },
  { "time", core_time },
  { NULL, NULL }
};

/* Protected: the worker's core table: its id, count and copied config, and
 * the C primitives of timer.c and message.c, each closing over the worker.
 * worker.lua builds the public `worker` object from it. */
static void push_core(lua_State *L, multiloop_worker_t *w) {
  const multiloop_config_t *cfg = w->cfg;
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, w->id);
  lua_setfield(L, -2, "id");
  lua_pushinteger(L, cfg->nworkers);
  lua_setfield(L, -2, "count");
  multiloop_copy_decode(L, cfg->config, cfg->config_len);
  lua_setfield(L, -2, "config");
  lua_pushlightuserdata(L, w);
  luaL_setfuncs(L, multiloop_timer_funcs, 1);      /* timer, every, now */
  lua_pushlightuserdata(L, w);
  luaL_setfuncs(L, multiloop_message_funcs, 1);    /* send, broadcast */
  lua_pushlightuserdata(L, w);
  luaL_setfuncs(L, multiloop_thread_funcs, 1);     /* spawn, wait, sleep, kill */
  lua_pushlightuserdata(L, w);
  luaL_setfuncs(L, multiloop_outbound_funcs, 1);   /* tcp, connect */
  lua_pushlightuserdata(L, w);
  luaL_setfuncs(L, multiloop_resolve_funcs, 1);    /* resolve */
  lua_pushlightuserdata(L, w);
  luaL_setfuncs(L, worker_funcs, 1);               /* exiting, time */
  lua_pushlightuserdata(L, w);
  luaL_setfuncs(L, multiloop_log_funcs, 1);        /* log (log.c) */
}

/* Protected (run by lua_pcall): prepares the state, builds the `worker`
 * object (lua/multiloop/worker.lua over the core table) and loads the
 * handler. */
static int load_handler(lua_State *L) {
  multiloop_worker_t *w = lua_touserdata(L, 1);
  const multiloop_config_t *cfg = w->cfg;
  int worker, handler;

  luaL_openlibs(L);
  lua_getglobal(L, "package");
  lua_pushstring(L, cfg->package_path);
  lua_setfield(L, -2, "path");
  lua_pushstring(L, cfg->package_cpath);
  lua_setfield(L, -2, "cpath");
  lua_pop(L, 1);
  multiloop_conn_register(L);
  multiloop_outbound_register(L);                  /* after conn's: it forwards to its methods */
  multiloop_timer_register(L);
  multiloop_thread_register(L);

  load_front(L);                                   /* build */
  push_core(L, w);                                 /* build core */
  lua_call(L, 1, 1);                               /* worker */
  if (!lua_istable(L, -1))
    return luaL_error(L, "multiloop.worker: must build a table (got %s)", luaL_typename(L, -1));
  worker = lua_gettop(L);
  lua_pushvalue(L, worker);                        /* core.worker() returns it */
  lua_setfield(L, LUA_REGISTRYINDEX, MULTILOOP_WORKER_KEY);

  switch (cfg->handler_kind) {
    case MULTILOOP_HANDLER_MODULE:
      lua_getglobal(L, "require");
      lua_pushstring(L, cfg->handler);
      lua_call(L, 1, 1);
      break;
    case MULTILOOP_HANDLER_PATH:
      if (luaL_loadfilex(L, cfg->handler, NULL) != LUA_OK) lua_error(L);
      lua_call(L, 0, 1);
      break;
    case MULTILOOP_HANDLER_BYTECODE:
      if (luaL_loadbufferx(L, cfg->handler, cfg->handler_len, "=handler", "b") != LUA_OK)
        lua_error(L);
      break;
  }
  if (lua_isfunction(L, -1)) {                     /* connect(conn) alone */
    lua_createtable(L, 0, 1);
    lua_insert(L, -2);
    lua_setfield(L, -2, "connect");
  } else if (!lua_istable(L, -1)) {
    return luaL_error(L, "the handler must be a function or a table with a "
                         "connect or a serve function (got %s)", luaL_typename(L, -1));
  }
  handler = lua_gettop(L);
  {
    int connect = lua_getfield(L, handler, "connect"), serve = lua_getfield(L, handler, "serve");
    if (connect != LUA_TNIL && serve != LUA_TNIL)
      return luaL_error(L, "the handler has both connect and serve (connect is the callback "
                           "style, serve the sequential one: give it one of them)");
    if (serve != LUA_TNIL && serve != LUA_TFUNCTION)
      return luaL_error(L, "the handler's serve must be a function (got %s)",
                        luaL_typename(L, -1));
    if (serve == LUA_TNIL && connect != LUA_TFUNCTION)
      return luaL_error(L, connect == LUA_TNIL
                               ? "the handler must have a connect or a serve function"
                               : "the handler's connect must be a function (got %s)",
                        luaL_typename(L, -2));
    w->serve = serve == LUA_TFUNCTION;
  }
  switch (lua_getfield(L, handler, "init")) {
    case LUA_TNIL: break;
    case LUA_TFUNCTION:
      start_phase(w, MULTILOOP_START_INIT);        /* interrupted: the hook raises */
      lua_pushvalue(L, worker);
      lua_call(L, 1, 0);
      break;
    default:
      return luaL_error(L, "the handler's init must be a function (got %s)",
                        luaL_typename(L, -1));
  }
  lua_settop(L, handler);
  w->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  w->worker_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

static void pipe_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  multiloop_worker_t *w = h->data;
  (void)suggested;
  *buf = uv_buf_init(w->read_buffer, MULTILOOP_READ_BUFFER_SIZE);
}

/* A connection that reached this worker and will not be served (stopping,
 * or no memory for it) is closed: its slot is given back. */
static void release_unserved(multiloop_worker_t *w) {
  multiloop_slot_give(w->rt, w);
}

static void take_pending(multiloop_worker_t *w);

static void refused_close_cb(uv_handle_t *h) {
  multiloop_worker_t *w = h->data;
  release_unserved(w);
  if (h != &w->spare.handle) {
    free(h);
    return;
  }
  w->spare_busy = 0;
  take_pending(w);                    /* what waited for the spare */
}

/* Takes the next connection pending on the pipe into a bare handle and
 * closes it: into a malloc'd one, or the worker's spare when memory is short.
 * Returns 0 when it could not because the spare is still closing; its close
 * callback then takes what is pending. uv_accept never fails to take the fd
 * while one is pending: on an error it closes it itself, and either way the
 * slot is given back in the close callback. */
static int refuse_pending(multiloop_worker_t *w) {
  uv_handle_t *h = malloc(sizeof w->spare);     /* a bare uv_tcp_t or uv_pipe_t */
  if (h == NULL) {
    if (w->spare_busy) return 0;
    w->spare_busy = 1;
    h = &w->spare.handle;
  }
  if (multiloop_conn_is_unix(w->rt, &w->pipe, -1)) uv_pipe_init(&w->loop, (uv_pipe_t *)h, 0);
  else uv_tcp_init(&w->loop, (uv_tcp_t *)h);
  h->data = w;
  (void)uv_accept((uv_stream_t *)&w->pipe, (uv_stream_t *)h);
  uv_close(h, refused_close_cb);
  return 1;
}

/* ipc: every connection pending on the pipe is opened as a connection or,
 * while stopping or when there is no memory for it, refused. None is left
 * pending: no further byte may ever come to retry on. */
static void take_pending(multiloop_worker_t *w) {
  while (!w->closing && uv_pipe_pending_count(&w->pipe) > 0) {
    if (!w->stopping && multiloop_conn_open(w, -1)) continue;
    if (!refuse_pending(w)) break;
  }
  w->pipe_left = uv_pipe_pending_count(&w->pipe);
}

/* ipc: `bytes` just read from the pipe, each one a hand-off whose fd came in
 * its ancillary data. A worker at its fd limit gets the byte without the fd:
 * the kernel closes what it cannot install (MSG_CTRUNC, which libuv does not
 * report), and that client is gone. Its slot is given back here: the fds
 * that did come are the ones now pending beyond what was left before. */
static void give_back_dropped(multiloop_worker_t *w, ssize_t bytes) {
  ssize_t came = uv_pipe_pending_count(&w->pipe) - w->pipe_left;
  for (; bytes > came; bytes--) release_unserved(w);
}

/* ipc: receives what is still unread in the pipe's socket, closes every
 * connection in it and gives a slot back for each byte (one per hand-off,
 * with or without its fd: at the fd limit the kernel drops it). Only once the acceptor's end is
 * closed, so that nothing more can come: at the pipe's end, or as the worker
 * closes (the acceptor stops before any worker does: server.c). */
static void drain_socket(multiloop_worker_t *w) {
  uv_os_fd_t fd;
  if (uv_fileno((uv_handle_t *)&w->pipe, &fd) != 0) return;
  for (;;) {
    char bytes[64];
    union {                                        /* aligned for cmsghdr */
      struct cmsghdr h;
      char buf[CMSG_SPACE(16 * sizeof(int))];   /* the acceptor passes one per byte */
    } ctl;
    struct iovec iov = { bytes, sizeof bytes };
    struct msghdr mh;
    struct cmsghdr *cm;
    ssize_t got;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctl.buf;
    mh.msg_controllen = sizeof ctl.buf;
    got = recvmsg(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return;                          /* empty (EAGAIN), or the end */
    for (cm = CMSG_FIRSTHDR(&mh); cm != NULL; cm = CMSG_NXTHDR(&mh, cm)) {
      size_t i, nfds;
      if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
      nfds = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (i = 0; i < nfds; i++) {
        int client;
        memcpy(&client, CMSG_DATA(cm) + i * sizeof(int), sizeof client);
        close(client);
      }
    }
    for (; got > 0; got--) release_unserved(w);
  }
}

/* A byte on the pipe carries a connection (or several, when reads coalesce);
 * one that came without its fd is a client already gone (give_back_dropped).
 * While stopping, the pipe stays open until the worker finishes, so that
 * what the acceptor sent before it stopped is refused here, each with its
 * slot given back. At the pipe's end the acceptor has gone, but libuv may
 * report the end early: an IPC read stops at each passed fd, so it always
 * looks partial, and a hang-up after a partial read counts as the end. What
 * is still unread then is drained here, since libuv will not read it. */
static void pipe_read_cb(uv_stream_t *pipe, ssize_t nread, const uv_buf_t *buf) {
  multiloop_worker_t *w = pipe->data;
  (void)buf;
  if (nread > 0) give_back_dropped(w, nread);
  take_pending(w);
  if (nread < 0) {
    drain_socket(w);
    uv_read_stop(pipe);
  }
}

/* ipc, as the worker closes its pipe: the connections still pending in
 * libuv (it closes their fds with the pipe) and those still in the socket
 * were never taken: each one's slot is given back. */
static void drain_pipe(multiloop_worker_t *w) {
  int n = uv_pipe_pending_count(&w->pipe);
  while (n-- > 0) release_unserved(w);
  drain_socket(w);
}

/* A connection our own listener accepted (reuseport), or the inbox brought
 * (queue). When we cannot take it, the client is closed and its slot freed. */
static void take_fd(multiloop_worker_t *w, uv_os_sock_t fd) {
  if (w->stopping || w->closing || !multiloop_conn_open(w, fd)) {
    close(fd);
    release_unserved(w);
  }
}

/* Reuseport: our own listener accepted `fd`; its slot is ours from here. */
static void listener_fd_cb(multiloop_listener_t *l, uv_os_sock_t fd) {
  multiloop_slot_take(l->rt, l->data);
  take_fd(l->data, fd);
}

/* --- stopping -------------------------------------------------------------- */

static void close_if_open(uv_handle_t *h) {
  if (h->loop != NULL && !uv_is_closing(h)) uv_close(h, NULL);
}

/* What was still queued in the inbox as it closed: a connection is closed
 * and its slot given back (take_fd, now that the worker is closing), any
 * other message freed. */
static void drop_queued(multiloop_worker_t *w, multiloop_msg_t *msg) {
  multiloop_msg_t *next;
  for (; msg; msg = next) {
    next = msg->next;
    if (msg->kind == MULTILOOP_MSG_FD && msg->fd >= 0) take_fd(w, msg->fd);
    multiloop_msg_free(msg);
  }
}

/* Closes every handle the worker still has; the loop then runs dry and the
 * thread ends. Connections are all closing by now. */
static void finish(multiloop_worker_t *w) {
  if (w->closing) return;
  multiloop_pools_close(w);                        /* before the deadlines go */
  multiloop_outbound_stop(w);                      /* connects in flight: "stopped" */
  w->closing = 1;
  multiloop_resolver_stop(w);
  multiloop_tls_worker_close(w);
  multiloop_deadlines_close(w);
  multiloop_timers_close(w);
  multiloop_threads_stop(w);                       /* sleepers get "stopped" */
  drop_queued(w, multiloop_inbox_close(&w->inbox));
  multiloop_listener_close(&w->listener);
  if (w->pipe.loop != NULL && !uv_is_closing((uv_handle_t *)&w->pipe)) {
    drain_pipe(w);
    uv_close((uv_handle_t *)&w->pipe, NULL);
  }
  close_if_open((uv_handle_t *)&w->grace_timer);
}

/* conn.c: the last connection closed while stopping; thread.c: the last
 * light thread ended while stopping. The stop ends once both are gone. */
void multiloop_worker_drained(multiloop_worker_t *w) {
  if (w->stopping && w->conns == NULL && w->th.count == 0) finish(w);
}

static void grace_timer_cb(uv_timer_t *t) {
  multiloop_worker_t *w = t->data;
  multiloop_conn_close_all(w);
  finish(w);
}

/* Protected: the handler's optional shutdown(worker) hook. */
static int shutdown_body(lua_State *L) {
  multiloop_worker_t *w = lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->handler_ref);
  if (lua_getfield(L, -1, "shutdown") != LUA_TFUNCTION) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->worker_ref);
  lua_call(L, 1, 0);
  return 0;
}

/* Stop: take no new connections, tell the handler, then let the connections
 * close and the light threads end by themselves for up to `timeout` ms (0:
 * close them now; sleeping threads get nil, "stopped": thread.c). A second
 * stop with timeout 0 cuts a graceful one short. */
static void begin_stop(multiloop_worker_t *w, uint64_t timeout) {
  if (w->closing) return;
  if (!w->stopping) {
    w->stopping = 1;
    multiloop_listener_close(&w->listener);        /* the pipe closes in finish() */
    multiloop_enter(w, shutdown_body, w, NULL, "shutdown");
    multiloop_pools_close(w);                      /* idle pooled conns hold no one up */
  }
  if (timeout == 0 || (w->conns == NULL && w->th.count == 0)) {
    multiloop_conn_close_all(w);
    finish(w);
  } else if (!uv_is_active((uv_handle_t *)&w->grace_timer)) {
    uv_timer_start(&w->grace_timer, grace_timer_cb, timeout, 0);
  }
}

/* Every message a worker receives goes through here; each is freed here. */
static void inbox_cb(multiloop_worker_t *w, multiloop_msg_t *msg) {
  switch (msg->kind) {
    case MULTILOOP_MSG_FD:
      take_fd(w, msg->fd);
      msg->fd = -1;
      break;
    case MULTILOOP_MSG_VALUE:
      multiloop_message_deliver(w, msg);         /* message.c; freed below */
      break;
    case MULTILOOP_MSG_STOP:
      begin_stop(w, msg->timeout);
      break;                                     /* stop_msg is kept: see msg->keep */
  }
  multiloop_msg_free(msg);
}

static void fail(multiloop_worker_t *w, const char *msg) {
  w->failed = 1;
  w->error = strdup(msg ? msg : "(no message)");
}

/* Sets up the handles once the handler has loaded; on failure closes what it
 * opened (the loop then ends) and returns a uv error. */
static int open_handles(multiloop_worker_t *w) {
  const multiloop_config_t *cfg = w->cfg;
  char who[32];
  int rc;
  uv_timer_init(&w->loop, &w->grace_timer);
  w->grace_timer.data = w;
  multiloop_deadlines_init(w);
  if ((rc = multiloop_inbox_init(&w->inbox, &w->loop, w, inbox_cb)) != 0) {
    close_if_open((uv_handle_t *)&w->grace_timer);
    multiloop_deadlines_close(w);
    return rc;
  }
  if (cfg->dispatch == MULTILOOP_DISPATCH_IPC) {
    uv_pipe_init(&w->loop, &w->pipe, 1);
    w->pipe.data = w;
    if ((rc = uv_pipe_open(&w->pipe, w->pipe_fd)) == 0) {
      w->pipe_fd = -1;                             /* the pipe owns it now */
      rc = uv_read_start((uv_stream_t *)&w->pipe, pipe_alloc_cb, pipe_read_cb);
    }
  } else if (cfg->dispatch == MULTILOOP_DISPATCH_REUSEPORT) {
    uv_os_sock_t fd = w->listen_fd;
    snprintf(who, sizeof who, "worker %d", w->id);
    w->listen_fd = -1;                             /* the listener owns it now */
    rc = multiloop_listener_start(&w->listener, &w->loop, w->rt, fd, 0, who,
                                  listener_fd_cb, w);
  }
  if (rc != 0) finish(w);
  return rc;
}

static void worker_main(void *arg) {
  multiloop_worker_t *w = arg;
  int rc;
  char why[128];

  /* Out of fds, the loop cannot be made: fail the start with the reason;
   * the fds meant for this worker stay with the main thread (server.c). */
  if ((rc = multiloop_loop_init(&w->loop)) != 0) {
    snprintf(why, sizeof why, "cannot make its loop: %s (%s)", uv_strerror(rc), uv_err_name(rc));
    fail(w, why);
    atomic_store(&w->finished, 1);
    start_phase(w, MULTILOOP_START_DONE);          /* failed for good: wake the start */
    return;
  }
  w->loop.data = w;                    /* how a stream finds its worker (stream.h) */
  multiloop_threads_init(w);
  w->read_buffer = malloc(MULTILOOP_READ_BUFFER_SIZE);
  w->L = luaL_newstate();
  w->handler_ref = w->worker_ref = LUA_NOREF;
  /* Not a light thread: coroutines copy this, and thread.c sets its own. */
  if (w->L) *(void **)lua_getextraspace(w->L) = NULL;
  if (w->read_buffer == NULL || w->L == NULL) {
    fail(w, "not enough memory");
  } else if (start_phase(w, MULTILOOP_START_LOADING)) {
    fail(w, "start_timeout: interrupted");          /* given up before it began */
  } else {
    lua_pushcfunction(w->L, load_handler);
    lua_pushlightuserdata(w->L, w);
    if (lua_pcall(w->L, 1, 0, 0) != LUA_OK) fail(w, lua_tostring(w->L, -1));
    lua_settop(w->L, 0);
    uv_mutex_lock(&w->rt->start_lock);             /* no hook can be set after this */
    if (w->interrupted) {
      lua_sethook(w->L, NULL, 0, 0);
      if (!w->failed) fail(w, "start_timeout: interrupted");
    }
    w->start_phase = MULTILOOP_START_OPENING;      /* no longer interrupted */
    uv_mutex_unlock(&w->rt->start_lock);
  }
  if (!w->failed && (rc = open_handles(w)) != 0) {   /* its inbox's uv_async_init, its pipe */
    snprintf(why, sizeof why, "cannot open its handles: %s (%s)", uv_strerror(rc),
             uv_err_name(rc));
    fail(w, why);
  }
  if (w->failed) {                                 /* any init() started: the loop must end */
    multiloop_timers_close(w);
    multiloop_threads_stop(w);
  }
  else multiloop_message_open(w);                  /* other threads may post to us now */
  start_phase(w, MULTILOOP_START_DONE);            /* up, or failed for good */

  uv_run(&w->loop, UV_RUN_DEFAULT);
  multiloop_threads_close(w);                      /* what is still suspended */
  uv_run(&w->loop, UV_RUN_DEFAULT);                /* their close callbacks */
  if ((rc = uv_loop_close(&w->loop)) != 0)
    multiloop_log(w, MULTILOOP_LOG_ERROR, 0, "loop closed with handles open: %s",
                  uv_err_name(rc));
  if (w->L) lua_close(w->L);
  w->L = NULL;
  multiloop_resolver_free(w);
  multiloop_tls_worker_free(w);
  free(w->read_buffer);
  w->read_buffer = NULL;
  atomic_store(&w->finished, 1);
}

/* Main thread. Starts the thread; the caller waits for it to reach
 * MULTILOOP_START_DONE (server.c). */
int multiloop_worker_start(multiloop_worker_t *w) {
  int rc = uv_thread_create(&w->thread, worker_main, w);
  if (rc == 0) w->thread_started = 1;
  return rc;
}

/* Main thread. Asks a running worker to stop: gracefully within `timeout`
 * ms, or at once (0: the preallocated message, so this cannot fail for lack
 * of memory). Returns 0, or UV_ECANCELED when the worker has already ended. */
int multiloop_worker_request_stop(multiloop_worker_t *w, uint64_t timeout) {
  multiloop_msg_t *msg;
  int rc;
  if (!w->thread_started || w->failed) return UV_ECANCELED;
  msg = timeout > 0 ? malloc(sizeof *msg) : NULL;   /* after the guard: never leaked */
  if (msg == NULL) {
    msg = w->stop_msg;
    timeout = 0;
    if (w->stop_posted) return 0;                  /* already on its way */
    w->stop_posted = 1;
  }
  msg->kind = MULTILOOP_MSG_STOP;
  msg->keep = (msg == w->stop_msg);
  msg->fd = -1;
  msg->from = 0;
  msg->len = 0;
  msg->timeout = timeout;
  rc = multiloop_inbox_post(&w->inbox, msg);
  if (rc != 0 && msg != w->stop_msg) free(msg);
  return rc;
}

void multiloop_worker_join(multiloop_worker_t *w) {
  if (!w->thread_started) return;
  uv_thread_join(&w->thread);
  w->thread_started = 0;
}
