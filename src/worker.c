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
 * A reload (server:reload: "generations and reload" below) builds a second
 * state the same way, from the handler and config the reload names, while
 * the first keeps serving; the worker then holds up to two states.
 *
 * Threads: multiloop_worker_start, _request_stop, _request_reload and _join
 * are called by the main thread; everything else runs on the worker thread,
 * which alone uses the loop and the Lua states and closes them: the loop runs
 * dry first (every handle closed, uv_loop_close returns 0), then lua_close
 * (an old generation's once it has drained, on a loop callback).
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
  if (w->start_phase != MULTILOOP_START_NEW)
    lua_sethook(w->gen[0].L, interrupt_hook, LUA_MASKCOUNT, 1);
}

/* Main thread, holding rt->start_lock, past the start timeout of a reload:
 * a worker still loading the new version gets the hook, as at start. */
void multiloop_worker_reload_interrupt(multiloop_worker_t *w) {
  if (w->reload_answered) return;
  w->reload_interrupted = 1;
  if (w->reload_L) lua_sethook(w->reload_L, interrupt_hook, LUA_MASKCOUNT, 1);
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
static void push_core(lua_State *L, multiloop_worker_t *w, const multiloop_reload_t *src) {
  const multiloop_config_t *cfg = w->cfg;
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, w->id);
  lua_setfield(L, -2, "id");
  lua_pushinteger(L, cfg->nworkers);
  lua_setfield(L, -2, "count");
  multiloop_copy_decode(L, src->config, src->config_len);
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
typedef struct {
  multiloop_gen_t *g;
  const multiloop_reload_t *src;       /* what to load: the handler and the config */
  int starting;                        /* the worker's start (its phases), not a reload */
} load_ev;

static int load_handler(lua_State *L) {
  load_ev *ev = lua_touserdata(L, 1);
  multiloop_gen_t *g = ev->g;
  multiloop_worker_t *w = g->w;
  const multiloop_config_t *cfg = w->cfg;
  const multiloop_reload_t *src = ev->src;
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
  push_core(L, w, src);                            /* build core */
  lua_call(L, 1, 1);                               /* worker */
  if (!lua_istable(L, -1))
    return luaL_error(L, "multiloop.worker: must build a table (got %s)", luaL_typename(L, -1));
  worker = lua_gettop(L);
  lua_pushvalue(L, worker);                        /* core.worker() returns it */
  lua_setfield(L, LUA_REGISTRYINDEX, MULTILOOP_WORKER_KEY);

  switch (src->kind) {
    case MULTILOOP_HANDLER_MODULE:
      lua_getglobal(L, "require");
      lua_pushstring(L, src->handler);
      lua_call(L, 1, 1);
      break;
    case MULTILOOP_HANDLER_PATH:
      if (luaL_loadfilex(L, src->handler, NULL) != LUA_OK) lua_error(L);
      lua_call(L, 0, 1);
      break;
    case MULTILOOP_HANDLER_BYTECODE:
      if (luaL_loadbufferx(L, src->handler, src->handler_len, "=handler", "b") != LUA_OK)
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
    g->serve = serve == LUA_TFUNCTION;
  }
  switch (lua_getfield(L, handler, "init")) {
    case LUA_TNIL: break;
    case LUA_TFUNCTION:
      if (ev->starting) start_phase(w, MULTILOOP_START_INIT);   /* interrupted: the hook raises */
      lua_pushvalue(L, worker);
      lua_call(L, 1, 0);
      break;
    default:
      return luaL_error(L, "the handler's init must be a function (got %s)",
                        luaL_typename(L, -1));
  }
  lua_settop(L, handler);
  g->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  g->worker_ref = luaL_ref(L, LUA_REGISTRYINDEX);
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
 * thread ends. Connections are all closing by now. Both generations go (an
 * old one still draining too). */
static void finish(multiloop_worker_t *w) {
  int i;
  if (w->closing) return;
  for (i = 0; i < 2; i++)
    if (w->gen[i].L) multiloop_pools_close(&w->gen[i]);   /* before the deadlines go */
  multiloop_outbound_stop(w, NULL);                /* connects in flight: "stopped" */
  w->closing = 1;
  multiloop_resolver_stop(w);
  multiloop_tls_worker_close(w);
  multiloop_deadlines_close(w);
  for (i = 0; i < 2; i++) {
    multiloop_timers_close(&w->gen[i]);
    multiloop_threads_stop(&w->gen[i]);            /* sleepers get "stopped" */
  }
  drop_queued(w, multiloop_inbox_close(&w->inbox));
  multiloop_listener_close(&w->listener);
  if (w->pipe.loop != NULL && !uv_is_closing((uv_handle_t *)&w->pipe)) {
    drain_pipe(w);
    uv_close((uv_handle_t *)&w->pipe, NULL);
  }
  close_if_open((uv_handle_t *)&w->grace_timer);
  close_if_open((uv_handle_t *)&w->drain_timer);
}

static int threads_left(multiloop_worker_t *w) {
  return w->gen[0].th.count + w->gen[1].th.count;
}

/* conn.c: the last connection closed while stopping; thread.c: the last
 * light thread ended while stopping. The stop ends once both are gone. */
void multiloop_worker_drained(multiloop_worker_t *w) {
  if (w->stopping && w->conns == NULL && threads_left(w) == 0) finish(w);
}

static void grace_timer_cb(uv_timer_t *t) {
  multiloop_worker_t *w = t->data;
  multiloop_conn_close_all(w);
  finish(w);
}

/* Protected: the handler's optional shutdown(worker) hook, in g's state. */
static int shutdown_body(lua_State *L) {
  multiloop_gen_t *g = lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, g->handler_ref);
  if (lua_getfield(L, -1, "shutdown") != LUA_TFUNCTION) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, g->worker_ref);
  lua_call(L, 1, 0);
  return 0;
}

/* Stop: take no new connections, tell the handler, then let the connections
 * close and the light threads end by themselves for up to `timeout` ms (0:
 * close them now; sleeping threads get nil, "stopped": thread.c). A second
 * stop with timeout 0 cuts a graceful one short. An old generation still
 * draining had its shutdown hook at the reload; its connections are waited
 * for (or closed) as the current one's are. */
static void begin_stop(multiloop_worker_t *w, uint64_t timeout) {
  if (w->closing) return;
  if (!w->stopping) {
    int i;
    w->stopping = 1;
    multiloop_listener_close(&w->listener);        /* the pipe closes in finish() */
    multiloop_enter(&w->gen[w->cur], shutdown_body, &w->gen[w->cur], NULL, "shutdown");
    for (i = 0; i < 2; i++)                        /* idle pooled conns hold no one up */
      if (w->gen[i].L) multiloop_pools_close(&w->gen[i]);
  }
  if (timeout == 0 || (w->conns == NULL && threads_left(w) == 0)) {
    multiloop_conn_close_all(w);
    finish(w);
  } else if (!uv_is_active((uv_handle_t *)&w->grace_timer)) {
    uv_timer_start(&w->grace_timer, grace_timer_cb, timeout, 0);
  }
}

/* --- generations and reload ---------------------------------------------------
 *
 * A reload comes as three inbox messages from server:reload (server.c), each
 * answered under rt->start_lock as the start is: PREPARE builds a new state
 * in the free slot (gen[!cur]) from rt->reload (the handler and config to
 * load: init runs there) while the current one serves on; then either
 * COMMIT (every worker built its state) switches: cur moves to the new one,
 * and the old one is retired: its shutdown(worker) hook runs, its `every`
 * timers stop, its idle pooled connections close (a setkeepalive there
 * closes instead of pooling), and it drains: the connections and light
 * threads it has go on in it until they end, or until drain_timeout, when
 * its connections close with reason "reload" and its threads are closed.
 * Or ABORT (some worker failed): the new state is dropped the same way,
 * and nothing changed. A drained generation is closed from drain_cb (a
 * loop callback, so never under a Lua call of its own), after its timers,
 * threads and idle handle have closed (g->pending), with lua_close; the
 * slot is then free.
 *
 * Never more than two states: a PREPARE that finds the old generation still
 * draining first closes it at once (its connections: reason "reload") and
 * builds the new state once its slot is free, a few turns of the loop
 * later, whatever that reload's outcome. */

enum { RELOAD_PREPARE = MULTILOOP_RELOAD_PREPARE, RELOAD_COMMIT = MULTILOOP_RELOAD_COMMIT,
       RELOAD_ABORT = MULTILOOP_RELOAD_ABORT };

/* Makes g's state: luaL_newstate's allocator with g as its userdata
 * (multiloop_gen_of), and its light threads' idle handle. Returns 0, or -1
 * with g->L NULL (out of memory). */
static int gen_open(multiloop_worker_t *w, multiloop_gen_t *g, uint64_t number) {
  memset(g, 0, sizeof *g);
  g->w = w;
  g->handler_ref = g->worker_ref = LUA_NOREF;
  g->number = number;
  multiloop_threads_init(g);
  g->L = luaL_newstate();
  if (g->L == NULL) return -1;
  lua_setallocf(g->L, lua_getallocf(g->L, NULL), g);   /* l_alloc ignores its userdata */
  /* Not a light thread: coroutines copy this, and thread.c sets its own. */
  *(void **)lua_getextraspace(g->L) = NULL;
  return 0;
}

static int gen_busy(const multiloop_gen_t *g) {
  return g->nconns > 0 || g->nconnects > 0 || (!g->forced && g->th.count > 0);
}

static void drain_cb(uv_timer_t *t);

void multiloop_gen_check(multiloop_gen_t *g) {
  multiloop_worker_t *w = g->w;
  if (!g->retired || g->L == NULL || w->closing) return;
  if (g->closed ? g->pending > 0 : gen_busy(g)) return;
  uv_timer_start(&w->drain_timer, drain_cb, 0, 0);   /* from a clean stack */
}

/* Everything of g's closes now: connections (reason "reload"), connects,
 * idle pooled connections, sleepers ("stopped"); its threads are closed
 * once its connections are gone. */
static void gen_force(multiloop_gen_t *g) {
  g->forced = 1;
  multiloop_conn_close_gen(g);
  multiloop_outbound_stop(g->w, g);
  multiloop_pools_close(g);
  multiloop_threads_stop(g);
  multiloop_gen_check(g);
}

static void reload_prepare(multiloop_worker_t *w);

static void gen_free(multiloop_gen_t *g) {
  multiloop_worker_t *w = g->w;
  lua_close(g->L);
  g->L = NULL;
  g->retired = g->forced = g->closed = 0;
  atomic_store_explicit(&w->old_conns, 0, memory_order_relaxed);
  if (w->reload_deferred) {                        /* a prepare waited for this slot */
    w->reload_deferred = 0;
    reload_prepare(w);
  }
}

/* The retired generation (there is at most one: gen[!cur]) drained, or its
 * drain_timeout came. */
static void drain_cb(uv_timer_t *t) {
  multiloop_worker_t *w = t->data;
  multiloop_gen_t *g = &w->gen[!w->cur];
  uint64_t now = uv_now(&w->loop);
  if (g->L == NULL || !g->retired || w->closing) return;
  if (!g->forced && now >= g->drain_due) {
    if (g->nconns > 0 || g->th.count > 0)
      multiloop_log(w, MULTILOOP_LOG_INFO, 0, "reload: drain_timeout: closing generation %llu "
                    "(%d connections, %d threads)", (unsigned long long)g->number, g->nconns,
                    g->th.count);
    gen_force(g);
  }
  if (!g->closed) {
    if (gen_busy(g)) {
      if (!g->forced) uv_timer_start(t, drain_cb, g->drain_due - now, 0);
      return;                                      /* forced: each close checks again */
    }
    g->closed = 1;
    g->pending++;                                  /* no free from inside these */
    multiloop_timers_close(g);
    multiloop_threads_close(g);
    g->pending--;
  }
  if (g->pending == 0) gen_free(g);
}

/* Sets g aside: it takes nothing new and closes once it has drained. */
static void gen_retire(multiloop_gen_t *g, int run_shutdown) {
  multiloop_worker_t *w = g->w;
  g->retired = 1;
  if (run_shutdown) multiloop_enter(g, shutdown_body, g, NULL, "shutdown");
  multiloop_timers_stop_every(g);
  multiloop_pools_close(g);
  g->drain_due = uv_now(&w->loop) + w->cfg->drain_timeout;
  atomic_store_explicit(&w->old_conns, g->nconns, memory_order_relaxed);
  uv_timer_start(&w->drain_timer, drain_cb, w->cfg->drain_timeout, 0);
  multiloop_gen_check(g);
}

/* Tells the main thread (server.c) this worker has done the step it asked.
 * The message's copy goes into w->reload_error, which the next answer or
 * runtime_free (after the join) frees: gcc's analyzer loses it there (a
 * false positive, as with fail()'s w->error when the store is reached
 * through its callers), so its leak check is off for this function alone;
 * ASan and valgrind see no leak (reload_spec's failing versions). */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wanalyzer-malloc-leak"
#endif
static void reload_answer(multiloop_worker_t *w, const char *error) {
  multiloop_runtime_t *rt = w->rt;
  char *copy = error ? strdup(error) : NULL, *old;  /* NULL for an error: no memory left */
  uv_mutex_lock(&rt->start_lock);
  w->reload_failed = error != NULL;
  old = w->reload_error;
  w->reload_error = copy;
  w->reload_answered = 1;
  rt->nreload++;
  uv_cond_signal(&rt->start_cond);
  uv_mutex_unlock(&rt->start_lock);
  free(old);
}
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC diagnostic pop
#endif

/* PREPARE: the new state, in the free slot, loaded from rt->reload. */
static void reload_prepare(multiloop_worker_t *w) {
  multiloop_gen_t *g = &w->gen[!w->cur];
  load_ev ev;
  const char *err = NULL;
  char late[96];
  if (g->L != NULL) {                              /* the last reload's old one still drains */
    w->reload_deferred = 1;
    if (!g->forced) gen_force(g);
    return;
  }
  if (gen_open(w, g, w->gen[w->cur].number + 1) != 0) {
    err = "not enough memory";
  } else {
    ev.g = g;
    ev.src = w->rt->reload;
    ev.starting = 0;
    int given_up;
    uv_mutex_lock(&w->rt->start_lock);
    w->reload_L = g->L;                            /* start_timeout's hook may be set now */
    given_up = w->reload_interrupted;              /* while it waited for the old one */
    uv_mutex_unlock(&w->rt->start_lock);
    lua_pushcfunction(g->L, load_handler);
    lua_pushlightuserdata(g->L, &ev);
    if (!given_up && lua_pcall(g->L, 1, 0, 0) != LUA_OK) err = lua_tostring(g->L, -1);
    uv_mutex_lock(&w->rt->start_lock);             /* no hook can be set after this */
    w->reload_L = NULL;
    if (w->reload_interrupted) {                   /* whatever the hook made it raise */
      lua_sethook(g->L, NULL, 0, 0);
      snprintf(late, sizeof late, "the new version did not load within %llu ms "
               "(start_timeout)", (unsigned long long)w->cfg->start_timeout);
      err = late;
    }
    uv_mutex_unlock(&w->rt->start_lock);
  }
  if (err != NULL) {
    reload_answer(w, err);                         /* before the state (and err) goes */
    if (g->L) {
      lua_settop(g->L, 0);
      gen_retire(g, 0);
      gen_force(g);
    } else {
      multiloop_threads_close(g);                  /* its idle handle */
    }
    return;
  }
  lua_settop(g->L, 0);
  reload_answer(w, NULL);
}

static void reload_step(multiloop_worker_t *w, int step) {
  multiloop_gen_t *next = &w->gen[!w->cur];
  switch (step) {
    case RELOAD_PREPARE:
      if (w->stopping) reload_answer(w, "stopping");
      else reload_prepare(w);
      break;
    case RELOAD_COMMIT:
      if (next->L != NULL && !next->retired && !w->stopping) {
        multiloop_gen_t *old = &w->gen[w->cur];
        w->cur = !w->cur;
        atomic_store_explicit(&w->generation, next->number, memory_order_relaxed);
        gen_retire(old, 1);
      }
      reload_answer(w, NULL);
      break;
    case RELOAD_ABORT:
      if (next->L != NULL && !next->retired) {
        gen_retire(next, 0);
        gen_force(next);
      }
      reload_answer(w, NULL);
      break;
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
    case MULTILOOP_MSG_RELOAD:
      reload_step(w, (int)msg->timeout);
      break;
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
  uv_timer_init(&w->loop, &w->drain_timer);
  w->drain_timer.data = w;
  multiloop_deadlines_init(w);
  if ((rc = multiloop_inbox_init(&w->inbox, &w->loop, w, inbox_cb)) != 0) {
    close_if_open((uv_handle_t *)&w->grace_timer);
    close_if_open((uv_handle_t *)&w->drain_timer);
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
  int rc, i;
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
  w->cur = 0;
  w->read_buffer = malloc(MULTILOOP_READ_BUFFER_SIZE);
  gen_open(w, &w->gen[0], 1);
  atomic_store_explicit(&w->generation, 1, memory_order_relaxed);
  if (w->read_buffer == NULL || w->gen[0].L == NULL) {
    fail(w, "not enough memory");
  } else if (start_phase(w, MULTILOOP_START_LOADING)) {
    fail(w, "start_timeout: interrupted");          /* given up before it began */
  } else {
    lua_State *L = w->gen[0].L;
    const multiloop_config_t *cfg = w->cfg;
    multiloop_reload_t src = { cfg->handler_kind, cfg->handler, cfg->handler_len,
                               cfg->config, cfg->config_len };
    load_ev ev = { &w->gen[0], &src, 1 };
    lua_pushcfunction(L, load_handler);
    lua_pushlightuserdata(L, &ev);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) fail(w, lua_tostring(L, -1));
    lua_settop(L, 0);
    uv_mutex_lock(&w->rt->start_lock);             /* no hook can be set after this */
    if (w->interrupted) {
      lua_sethook(L, NULL, 0, 0);
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
    multiloop_timers_close(&w->gen[0]);
    multiloop_threads_stop(&w->gen[0]);
  }
  else multiloop_message_open(w);                  /* other threads may post to us now */
  start_phase(w, MULTILOOP_START_DONE);            /* up, or failed for good */

  uv_run(&w->loop, UV_RUN_DEFAULT);
  for (i = 0; i < 2; i++)
    multiloop_threads_close(&w->gen[i]);           /* what is still suspended */
  uv_run(&w->loop, UV_RUN_DEFAULT);                /* their close callbacks */
  if ((rc = uv_loop_close(&w->loop)) != 0)
    multiloop_log(w, MULTILOOP_LOG_ERROR, 0, "loop closed with handles open: %s",
                  uv_err_name(rc));
  for (i = 0; i < 2; i++) {
    if (w->gen[i].L) lua_close(w->gen[i].L);
    w->gen[i].L = NULL;
  }
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

/* Main thread, holding no lock: posts reload step `step` (worker.c's
 * RELOAD_*); the worker answers with reload_answer. Returns 0, or a uv
 * error (no memory, the worker has ended or is stopping). */
int multiloop_worker_request_reload(multiloop_worker_t *w, int step) {
  multiloop_msg_t *msg;
  int rc;
  if (!w->thread_started || w->failed) return UV_ECANCELED;
  if ((msg = calloc(1, sizeof *msg)) == NULL) return UV_ENOMEM;
  msg->kind = MULTILOOP_MSG_RELOAD;
  msg->fd = -1;
  msg->timeout = (uint64_t)step;
  rc = multiloop_inbox_post(&w->inbox, msg);
  if (rc != 0) free(msg);
  return rc;
}

void multiloop_worker_join(multiloop_worker_t *w) {
  if (!w->thread_started) return;
  uv_thread_join(&w->thread);
  w->thread_started = 0;
}
