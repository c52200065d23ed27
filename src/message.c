/*
 * message.c: Lua values sent between states. In a worker: worker.send(id,
 * value) and worker.broadcast(value) (to every other worker), the C
 * functions of worker.c's core table that lua/multiloop/worker.lua hands out
 * as they are, arguments checked here; in the main
 * state: server:send(id, value) and server:broadcast(value) (to every
 * worker). A worker receives them in its handler's message(worker, value,
 * from) hook, `from` being the sender's worker id, or 0 for the main state.
 *
 * Threads: a sender runs on the thread of its own Lua state (a worker's, or
 * the main state's) and touches the receiver only through its inbox
 * (inbox.c), whose lock lives until every worker thread has been joined.
 * Delivery runs on the receiving worker's thread, through multiloop_enter.
 *
 * Ownership: the value is encoded by copy.c in the sender's state (nothing
 * Lua-shaped crosses), copied into one malloc'd multiloop_msg_t per receiver
 * and posted; from a successful post the receiver owns the message. Its
 * worker.c inbox callback hands it to multiloop_message_deliver, which
 * decodes it inside a protected call and never frees it: the caller does,
 * and the worker frees what is still queued at stop (inbox_close hands it
 * back). A post that the inbox refuses (the worker is stopping) is freed
 * here and reported as false, "stopped".
 *
 * Limit: each message counts its header plus its copied bytes against the
 * receiver's inbox_limit (inbox.c keeps the count under the inbox lock and
 * takes it off once the receiver has handled it). A message that would take
 * the receiver past it is freed here and reported as false, "full" (a
 * broadcast does not count that worker): never dropped after it was taken.
 *
 * A worker takes messages once its inbox is up (w->msg_ready, set by
 * multiloop_message_open before the start handshake completes): a send that
 * races a worker still loading its handler (from init, or from an early
 * timer) gets false, "not started" instead of touching an inbox that does
 * not exist yet. Order is kept per sender-receiver pair: the inbox is FIFO.
 */
#include <stdlib.h>
#include <string.h>

#include "multiloop.h"

enum { POSTED, NOT_STARTED, STOPPED, FULL, NO_MEMORY };

static const char *const post_words[] = { NULL, "not started", "stopped", "full", NULL };

/* Any thread: the inbox exists from now on (the worker's thread, after
 * multiloop_inbox_init; the release pairs with the acquire in post). */
void multiloop_message_open(multiloop_worker_t *w) {
  atomic_store_explicit(&w->msg_ready, 1, memory_order_release);
}

/* Posts a copy of data[0..len) to worker `to`. */
static int post(multiloop_worker_t *to, int from, const char *data, size_t len) {
  multiloop_msg_t *msg;
  size_t bytes = sizeof *msg + len;
  if (!atomic_load_explicit(&to->msg_ready, memory_order_acquire)) return NOT_STARTED;
  if (len > to->cfg->inbox_limit) return FULL;      /* cannot fit: do not even copy it */
  if ((msg = malloc(bytes)) == NULL) return NO_MEMORY;
  msg->kind = MULTILOOP_MSG_VALUE;
  msg->from = from;
  msg->fd = -1;
  msg->timeout = 0;
  msg->keep = 0;
  msg->len = len;
  memcpy(msg->data, data, len);
  switch (multiloop_inbox_post_counted(&to->inbox, msg, bytes, to->cfg->inbox_limit)) {
    case 0: return POSTED;
    case UV_ENOBUFS: free(msg); return FULL;
    default: free(msg); return STOPPED;
  }
}

/* Encodes the value at `idx` (a missing one is nil) into a malloc'd buffer,
 * or raises "<who>: value.path: cannot copy a function". */
static void encode(lua_State *L, int idx, const char *who, char **data, size_t *len) {
  lua_settop(L, idx);                          /* none becomes nil */
  if (!multiloop_copy_encode(L, idx, "value", data, len))
    luaL_error(L, "%s: %s", who, lua_tostring(L, -1));
}

/* send(id, value) from `from` (0: the main state). The id is at `arg`, the
 * value just after it. Returns true, or false plus a fixed word. */
static int send_value(lua_State *L, multiloop_runtime_t *rt, int from, int arg,
                      const char *who) {
  int n = rt->cfg->nworkers, isint = 0, rc;
  lua_Integer id = lua_type(L, arg) == LUA_TNUMBER ? lua_tointegerx(L, arg, &isint) : 0;
  char *data;
  size_t len;
  if (!isint || id < 1 || id > n)
    return luaL_error(L, "%s: id must be a worker id from 1 to %d (got %s)", who, n,
                      luaL_tolstring(L, arg, NULL));
  encode(L, arg + 1, who, &data, &len);
  rc = post(&rt->workers[id - 1], from, data, len);
  free(data);                                  /* nothing below raises before this */
  if (rc == NO_MEMORY) return luaL_error(L, "%s: not enough memory", who);
  lua_pushboolean(L, rc == POSTED);
  if (rc == POSTED) return 1;
  lua_pushstring(L, post_words[rc]);
  return 2;
}

/* broadcast(value) to every worker but `from`: the value is at `arg`.
 * Returns how many workers took it. */
static int broadcast_value(lua_State *L, multiloop_runtime_t *rt, int from, int arg,
                           const char *who) {
  int i, taken = 0, oom = 0;
  char *data;
  size_t len;
  encode(L, arg, who, &data, &len);
  for (i = 0; i < rt->cfg->nworkers; i++) {
    if (i + 1 == from) continue;
    switch (post(&rt->workers[i], from, data, len)) {
      case POSTED: taken++; break;
      case NO_MEMORY: oom = 1; break;
      default: break;
    }
  }
  free(data);
  if (oom) return luaL_error(L, "%s: not enough memory", who);
  lua_pushinteger(L, taken);
  return 1;
}

/* --- in a worker ----------------------------------------------------------- */

/* worker.send(id, value) -> true, or false, "full" | "stopped" | "not started".
 * Upvalue 1: the worker. A worker may send to itself. */
static int worker_send(lua_State *L) {
  multiloop_worker_t *w = lua_touserdata(L, lua_upvalueindex(1));
  return send_value(L, w->rt, w->id, 1, "worker.send");
}

/* worker.broadcast(value) -> the number of other workers that took it. */
static int worker_broadcast(lua_State *L) {
  multiloop_worker_t *w = lua_touserdata(L, lua_upvalueindex(1));
  return broadcast_value(L, w->rt, w->id, 1, "worker.broadcast");
}

/* For worker.c's core table, which lua/multiloop/worker.lua hands out as
 * worker.send and worker.broadcast themselves (no Lua in between): each
 * closes over the worker (one light userdata upvalue). */
const luaL_Reg multiloop_message_funcs[] = {
  { "send", worker_send },
  { "broadcast", worker_broadcast },
  { NULL, NULL }
};

typedef struct {
  multiloop_worker_t *w;
  const multiloop_msg_t *msg;
} deliver_ev;

/* Protected: handler.message(worker, value, from). Without a hook the value
 * is dropped (not even decoded). */
static int deliver_body(lua_State *L) {
  deliver_ev *ev = lua_touserdata(L, 1);
  multiloop_gen_t *g = multiloop_gen_of(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, g->handler_ref);
  switch (lua_getfield(L, -1, "message")) {
    case LUA_TFUNCTION: break;
    case LUA_TNIL: return 0;
    default:
      return luaL_error(L, "the handler's message must be a function (got %s)",
                        luaL_typename(L, -1));
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, g->worker_ref);
  multiloop_copy_decode(L, ev->msg->data, ev->msg->len);
  lua_pushinteger(L, ev->msg->from);
  lua_call(L, 3, 0);
  return 0;
}

/* Worker thread, from the inbox callback. A Lua error is reported (as
 * "message") and the worker goes on. Does not free msg: the caller does. */
void multiloop_message_deliver(multiloop_worker_t *w, multiloop_msg_t *msg) {
  deliver_ev ev = { w, msg };
  /* Behind a stop in the same batch: the worker has closed, and what was
   * still queued at stop is dropped. */
  if (w->closing) return;
  multiloop_enter(&w->gen[w->cur], deliver_body, &ev, NULL, "message");   /* the current state */
}

/* --- in the main state ------------------------------------------------------ */

/* server:send(id, value) (server.c: the core server is argument 1). Raises
 * "not running" when the server is stopped. */
int multiloop_server_send(lua_State *L, multiloop_runtime_t *rt) {
  if (rt == NULL) return luaL_error(L, "multiloop.server: send: not running");
  return send_value(L, rt, 0, 2, "multiloop.server: send");
}

/* server:broadcast(value) to every worker: how many took it. */
int multiloop_server_broadcast(lua_State *L, multiloop_runtime_t *rt) {
  if (rt == NULL) return luaL_error(L, "multiloop.server: broadcast: not running");
  return broadcast_value(L, rt, 0, 2, "multiloop.server: broadcast");
}
