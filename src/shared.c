/*
 * shared.c: the Lua object of a shared dictionary ("multiloop.shared"), in
 * the main state and in every worker's; the dictionaries themselves, their
 * locks and their memory are dict.c's. Keys are strings; values strings,
 * integers, floats (kept distinct) or booleans, copied in and out as plain
 * bytes, so nothing Lua-shaped is shared.
 *
 * Owns: in each state, the userdata that holds one reference to a
 * dictionary, and a scratch buffer that reads copy strings into (a string
 * read under a stripe's lock is pushed once the lock is released; kept
 * between reads only while it is small).
 *
 * Threads: any thread that owns a lua_State calls these, on the userdata of
 * its own state. Arguments are checked before dict.c takes any lock, and
 * dict.c calls no Lua API, so no Lua error can longjmp past a held lock.
 *
 * Freeing: __gc drops the reference and frees the scratch buffer; the last
 * reference anywhere frees the dictionary (dict.c).
 */
#include <stdlib.h>
#include <string.h>

#include "multiloop.h"

#define SHARED_MT "multiloop.shared"

#define MIN_CAPACITY MULTILOOP_DICT_MIN_CAPACITY  /* lua/multiloop/shared.lua says the same */
#define MAX_CAPACITY MULTILOOP_DICT_MAX_CAPACITY  /* and this */
#define DEFAULT_MAX_KEYS 1024            /* keys() without max, as OpenResty's get_keys */

/* The Lua object: one per dictionary per state (shared.lua caches it). */
typedef struct {
  multiloop_dict_t *d;                   /* NULL: released (or not yet acquired) */
  multiloop_scratch_t buf;               /* results, this state only */
} shared_ud;

/* --- Lua argument checks (before any lock) -------------------------------- */

static shared_ud *check_shared(lua_State *L) {
  shared_ud *u = luaL_checkudata(L, 1, SHARED_MT);
  if (u->d == NULL) luaL_error(L, "attempt to use a released " SHARED_MT);
  return u;
}

/* Keys are strings only: a number is not silently turned into one. */
static const char *check_key(lua_State *L, int arg, size_t *len) {
  if (lua_type(L, arg) != LUA_TSTRING) luaL_typeerror(L, arg, "string");
  return lua_tolstring(L, arg, len);
}

static void check_value(lua_State *L, int arg, multiloop_value_t *v) {
  memset(v, 0, sizeof *v);
  switch (lua_type(L, arg)) {
    case LUA_TBOOLEAN:
      v->type = MULTILOOP_V_BOOLEAN;
      v->b = lua_toboolean(L, arg);
      break;
    case LUA_TNUMBER:
      if (lua_isinteger(L, arg)) {
        v->type = MULTILOOP_V_INTEGER;
        v->i = lua_tointeger(L, arg);
      } else {
        v->type = MULTILOOP_V_FLOAT;
        v->n = lua_tonumber(L, arg);
      }
      break;
    case LUA_TSTRING:
      v->type = MULTILOOP_V_STRING;
      v->s = lua_tolstring(L, arg, &v->len);
      break;
    default:
      luaL_typeerror(L, arg, "string, number or boolean");
  }
}

static void check_number(lua_State *L, int arg, multiloop_value_t *v) {
  if (lua_type(L, arg) != LUA_TNUMBER) luaL_typeerror(L, arg, "number");
  check_value(L, arg, v);
}

/* List elements: strings and numbers, as in OpenResty (integers and
 * floats kept apart, as everywhere here). */
static void check_list_value(lua_State *L, int arg, multiloop_value_t *v) {
  int t = lua_type(L, arg);
  if (t != LUA_TSTRING && t != LUA_TNUMBER) luaL_typeerror(L, arg, "string or number");
  check_value(L, arg, v);
}

/* A ttl in ms (0: none), optional or not; `what` names it in the error. A
 * number only: a string is not silently turned into one, as with keys. */
static uint64_t check_ms(lua_State *L, int arg, int required, const char *what) {
  lua_Integer ms;
  if ((required || !lua_isnoneornil(L, arg)) && lua_type(L, arg) != LUA_TNUMBER)
    luaL_typeerror(L, arg, "number");
  ms = required ? luaL_checkinteger(L, arg) : luaL_optinteger(L, arg, 0);
  if (ms < 0 || ms > MULTILOOP_DICT_MAX_TTL_MS)
    luaL_argerror(L, arg, lua_pushfstring(L, "%s must be from 0 to 1e12; 0 means no expiry", what));
  return (uint64_t)ms;
}

static uint64_t check_ttl(lua_State *L, int arg) { return check_ms(L, arg, 0, "ttl_ms"); }

static void push_value(lua_State *L, const multiloop_value_t *v) {
  switch (v->type) {
    case MULTILOOP_V_BOOLEAN: lua_pushboolean(L, v->b); break;
    case MULTILOOP_V_INTEGER: lua_pushinteger(L, v->i); break;
    case MULTILOOP_V_FLOAT: lua_pushnumber(L, v->n); break;
    default: lua_pushlstring(L, v->s, v->len); break;
  }
}

/* nil (or false), message: the environmental failures callers test for. */
static int push_fail(lua_State *L, int as_false, const char *msg) {
  if (as_false) lua_pushboolean(L, 0);
  else lua_pushnil(L);
  lua_pushstring(L, msg);
  return 2;
}

static const char *status_text(int status) {
  switch (status) {
    case MULTILOOP_DICT_EXISTS: return "exists";
    case MULTILOOP_DICT_NOT_FOUND: return "not found";
    case MULTILOOP_DICT_NOT_A_NUMBER: return "not a number";
    case MULTILOOP_DICT_NOT_A_LIST: return "value not a list";
    default: return "no memory";
  }
}

static int stored(int status) {
  return status == MULTILOOP_DICT_STORED || status == MULTILOOP_DICT_STORED_FORCED;
}

/* --- one key --------------------------------------------------------------- */

/* d:set/add/replace(key, value [, ttl_ms]) -> true, nil, forcible
 * or false, "exists" | "not found" | "no memory", false. forcible is true
 * when live (unexpired) entries were evicted to make room.
 * d:safe_set/safe_add(key, value [, ttl_ms]) -> the same, but they never
 * evict a live entry: false, "no memory", false instead (forcible is always
 * false, as from OpenResty's resty.core). */
static int store_method(lua_State *L, int mode) {
  shared_ud *u = check_shared(L);
  size_t kn;
  const char *k = check_key(L, 2, &kn);
  multiloop_value_t v;
  uint64_t ttl;
  int r;
  check_value(L, 3, &v);
  ttl = check_ttl(L, 4);
  r = multiloop_dict_store(u->d, mode, k, kn, &v, ttl);
  if (stored(r)) {
    lua_pushboolean(L, 1);
    lua_pushnil(L);
  } else {
    push_fail(L, 1, status_text(r));
  }
  lua_pushboolean(L, r == MULTILOOP_DICT_STORED_FORCED);   /* never, when safe */
  return 3;
}

static int shared_set(lua_State *L) { return store_method(L, MULTILOOP_DICT_SET); }
static int shared_add(lua_State *L) { return store_method(L, MULTILOOP_DICT_ADD); }
static int shared_replace(lua_State *L) { return store_method(L, MULTILOOP_DICT_REPLACE); }
static int shared_safe_set(lua_State *L) {
  return store_method(L, MULTILOOP_DICT_SET | MULTILOOP_DICT_SAFE);
}
static int shared_safe_add(lua_State *L) {
  return store_method(L, MULTILOOP_DICT_ADD | MULTILOOP_DICT_SAFE);
}

/* After a read that needed more than this, the scratch buffer is freed
 * rather than kept: one 4 MiB get or a keys() of every key must not pin
 * that much memory per Lua state for as long as the object lives. */
#define SCRATCH_KEEP (64 * 1024)

static void scratch_trim(multiloop_scratch_t *buf) {
  if (buf->cap <= SCRATCH_KEEP) return;
  free(buf->p);
  buf->p = NULL;
  buf->cap = 0;
}

/* d:get(key) -> value, or nil when absent or expired, or nil, "value is a
 * list". Reading makes the entry the most recently used. */
static int shared_get(lua_State *L) {
  shared_ud *u = check_shared(L);
  size_t kn;
  const char *k = check_key(L, 2, &kn);
  multiloop_value_t v;
  int found = multiloop_dict_get(u->d, k, kn, &v, &u->buf);
  if (found == MULTILOOP_DICT_WRONG_KIND) return push_fail(L, 0, "value is a list");
  if (found < 0) return luaL_error(L, "not enough memory");
  if (found == 0) lua_pushnil(L);
  else push_value(L, &v);
  scratch_trim(&u->buf);                 /* v.s pointed into it: pushed now */
  return 1;
}

/* d:get_stale(key) -> value, nil, stale; nil when absent; nil, "value is a
 * list". As OpenResty's value, flags, stale, with no flags (always nil, so
 * `local v, _, stale = d:get_stale(k)` reads the same): an expired entry
 * not yet freed is read too, stale true. */
static int shared_get_stale(lua_State *L) {
  shared_ud *u = check_shared(L);
  size_t kn;
  const char *k = check_key(L, 2, &kn);
  multiloop_value_t v;
  int stale, found = multiloop_dict_get_stale(u->d, k, kn, &v, &u->buf, &stale);
  if (found == MULTILOOP_DICT_WRONG_KIND) return push_fail(L, 0, "value is a list");
  if (found < 0) return luaL_error(L, "not enough memory");
  if (found == 0) {
    lua_pushnil(L);
    return 1;
  }
  push_value(L, &v);
  lua_pushnil(L);
  lua_pushboolean(L, stale);
  scratch_trim(&u->buf);
  return 3;
}

/* d:expire(key, ttl_ms) -> true, or nil, "not found". 0 removes the expiry. */
static int shared_expire(lua_State *L) {
  shared_ud *u = check_shared(L);
  size_t kn;
  const char *k = check_key(L, 2, &kn);
  uint64_t ms = check_ms(L, 3, 1, "ttl_ms");
  if (!multiloop_dict_expire(u->d, k, kn, ms)) return push_fail(L, 0, "not found");
  lua_pushboolean(L, 1);
  return 1;
}

/* d:ttl(key) -> remaining ms (at least 1), 0 when the entry never expires,
 * or nil, "not found". */
static int shared_ttl(lua_State *L) {
  shared_ud *u = check_shared(L);
  size_t kn;
  const char *k = check_key(L, 2, &kn);
  int64_t ms = multiloop_dict_ttl(u->d, k, kn);
  if (ms < 0) return push_fail(L, 0, "not found");
  lua_pushinteger(L, (lua_Integer)ms);
  return 1;
}

/* d:incr(key, n [, init [, init_ttl_ms]]) -> new value, nil, forcible.
 * Atomic. A missing key starts from init (which must then be given: else
 * nil, "not found") and expires after init_ttl_ms (0 or none: never); a
 * value that is not a number (or a list) gives nil, "not a number".
 * Integers add as integers (wrapping around, as in Lua); with a float on
 * either side the sum is a float. An existing entry keeps its ttl. */
static int shared_incr(lua_State *L) {
  shared_ud *u = check_shared(L);
  size_t kn;
  const char *k = check_key(L, 2, &kn);
  multiloop_value_t n, init, sum;
  int has_init = !lua_isnoneornil(L, 4), r;
  uint64_t init_ttl;
  check_number(L, 3, &n);
  if (has_init) check_number(L, 4, &init);
  init_ttl = check_ms(L, 5, 0, "init_ttl_ms");
  if (!has_init && !lua_isnoneornil(L, 5)) luaL_argerror(L, 5, "init_ttl_ms needs init");
  r = multiloop_dict_incr(u->d, k, kn, &n, has_init ? &init : NULL, init_ttl, &sum);
  if (!stored(r)) {
    push_fail(L, 0, status_text(r));
    lua_pushboolean(L, 0);
    return 3;
  }
  push_value(L, &sum);
  lua_pushnil(L);
  lua_pushboolean(L, r == MULTILOOP_DICT_STORED_FORCED);
  return 3;
}

/* d:delete(key) -> true when a live entry was removed, false when absent. */
static int shared_delete(lua_State *L) {
  shared_ud *u = check_shared(L);
  size_t kn;
  const char *k = check_key(L, 2, &kn);
  lua_pushboolean(L, multiloop_dict_delete(u->d, k, kn));
  return 1;
}

/* --- lists ---------------------------------------------------------------- */

/* d:lpush/rpush(key, value) -> the new length, or nil, "value not a list" |
 * "no memory". value: a string or a number. Never evicts a live entry. */
static int push_method(lua_State *L, int left) {
  shared_ud *u = check_shared(L);
  size_t kn, len;
  const char *k = check_key(L, 2, &kn);
  multiloop_value_t v;
  int r;
  check_list_value(L, 3, &v);
  r = multiloop_dict_push(u->d, k, kn, left, &v, &len);
  if (r != MULTILOOP_DICT_STORED) return push_fail(L, 0, status_text(r));
  lua_pushinteger(L, (lua_Integer)len);
  return 1;
}

static int shared_lpush(lua_State *L) { return push_method(L, 1); }
static int shared_rpush(lua_State *L) { return push_method(L, 0); }

/* d:lpop/rpop(key) -> the element, nil when the key is absent, or nil,
 * "value not a list". A list left empty is removed. */
static int pop_method(lua_State *L, int left) {
  shared_ud *u = check_shared(L);
  size_t kn;
  const char *k = check_key(L, 2, &kn);
  multiloop_value_t v;
  int r = multiloop_dict_pop(u->d, k, kn, left, &v, &u->buf);
  if (r == MULTILOOP_DICT_WRONG_KIND) return push_fail(L, 0, "value not a list");
  if (r < 0) return luaL_error(L, "not enough memory");
  if (r == 0) lua_pushnil(L);
  else push_value(L, &v);
  scratch_trim(&u->buf);
  return 1;
}

static int shared_lpop(lua_State *L) { return pop_method(L, 1); }
static int shared_rpop(lua_State *L) { return pop_method(L, 0); }

/* d:llen(key) -> the length (0 when absent), or nil, "value not a list". */
static int shared_llen(lua_State *L) {
  shared_ud *u = check_shared(L);
  size_t kn, len;
  const char *k = check_key(L, 2, &kn);
  if (multiloop_dict_llen(u->d, k, kn, &len) < 0) return push_fail(L, 0, "value not a list");
  lua_pushinteger(L, (lua_Integer)len);
  return 1;
}

/* d:lrange(key, start, stop) -> an array of the elements start..stop by
 * Redis's rules (0-based, negative from the end, inclusive, clipped; an
 * absent key: {}), or nil, "value not a list". A multiloop extension. */
static int shared_lrange(lua_State *L) {
  shared_ud *u = check_shared(L);
  size_t kn, count, off = 0, i;
  const char *k = check_key(L, 2, &kn);
  lua_Integer start = luaL_checkinteger(L, 3), stop = luaL_checkinteger(L, 4);
  int r = multiloop_dict_lrange(u->d, k, kn, (int64_t)start, (int64_t)stop, &u->buf, &count);
  if (r == MULTILOOP_DICT_WRONG_KIND) return push_fail(L, 0, "value not a list");
  if (r < 0) return luaL_error(L, "not enough memory");
  lua_createtable(L, count > INT32_MAX ? INT32_MAX : (int)count, 0);
  for (i = 0; i < count; i++) {                    /* (value, bytes) records */
    multiloop_value_t v;
    memcpy(&v, u->buf.p + off, sizeof v);
    off += sizeof v;
    if (v.type == MULTILOOP_V_STRING) {
      v.s = u->buf.p + off;
      off += v.len;
    }
    push_value(L, &v);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  scratch_trim(&u->buf);
  return 1;
}

/* --- the whole dictionary -------------------------------------------------- */

/* d:keys([max]) -> a list of at most max live keys (default 1024, 0: all),
 * in no particular order; not a snapshot (one stripe at a time). */
static int shared_keys(lua_State *L) {
  shared_ud *u = check_shared(L);
  lua_Integer max = luaL_optinteger(L, 2, DEFAULT_MAX_KEYS);
  size_t count, off = 0, i;
  luaL_argcheck(L, max >= 0, 2, "max must not be negative; 0 means all keys");
  if (multiloop_dict_keys(u->d, (size_t)max, &u->buf, &count) != 0)
    return luaL_error(L, "not enough memory");
  lua_createtable(L, count > INT32_MAX ? INT32_MAX : (int)count, 0);
  for (i = 0; i < count; i++) {                    /* (length, bytes) records */
    size_t len;
    memcpy(&len, u->buf.p + off, sizeof len);
    lua_pushlstring(L, u->buf.p + off + sizeof len, len);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
    off += sizeof len + len;
  }
  scratch_trim(&u->buf);
  return 1;
}

/* d:count() -> the number of live entries. Frees expired ones on the way. */
static int shared_count(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)multiloop_dict_count(check_shared(L)->d));
  return 1;
}

/* d:flush_expired([max]) -> how many expired entries were freed (at most
 * max; 0 or none: all). */
static int shared_flush_expired(lua_State *L) {
  shared_ud *u = check_shared(L);
  lua_Integer max = luaL_optinteger(L, 2, 0);
  luaL_argcheck(L, max >= 0, 2, "max must not be negative; 0 means all");
  lua_pushinteger(L, (lua_Integer)multiloop_dict_flush_expired(u->d, (size_t)max));
  return 1;
}

/* d:flush(): frees every entry. */
static int shared_flush(lua_State *L) {
  multiloop_dict_flush(check_shared(L)->d);
  return 0;
}

/* d:capacity() -> bytes, as given to shared(). */
static int shared_capacity(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)multiloop_dict_capacity(check_shared(L)->d));
  return 1;
}

/* d:free_space() -> bytes not in use, summed over the stripes (so the largest
 * entry that fits without eviction may be smaller). */
static int shared_free_space(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)multiloop_dict_free_space(check_shared(L)->d));
  return 1;
}

/* --- the Lua object ------------------------------------------------------- */

static int shared_gc(lua_State *L) {
  shared_ud *u = luaL_checkudata(L, 1, SHARED_MT);
  if (u->d != NULL) multiloop_dict_release(u->d);
  u->d = NULL;
  free(u->buf.p);
  u->buf = (multiloop_scratch_t){ NULL, 0 };
  return 0;
}

static int shared_tostring(lua_State *L) {
  shared_ud *u = luaL_checkudata(L, 1, SHARED_MT);
  if (u->d == NULL) lua_pushliteral(L, SHARED_MT " (released)");
  else lua_pushfstring(L, SHARED_MT " '%s' (capacity %I)", multiloop_dict_name(u->d),
                       (lua_Integer)multiloop_dict_capacity(u->d));
  return 1;
}

static const luaL_Reg shared_methods[] = {
  { "get", shared_get },
  { "set", shared_set },
  { "add", shared_add },
  { "replace", shared_replace },
  { "incr", shared_incr },
  { "delete", shared_delete },
  { "ttl", shared_ttl },
  { "expire", shared_expire },
  { "get_stale", shared_get_stale },
  { "safe_set", shared_safe_set },
  { "safe_add", shared_safe_add },
  { "lpush", shared_lpush },
  { "rpush", shared_rpush },
  { "lpop", shared_lpop },
  { "rpop", shared_rpop },
  { "llen", shared_llen },
  { "lrange", shared_lrange },
  { "flush_expired", shared_flush_expired },
  { "keys", shared_keys },
  { "count", shared_count },
  { "flush", shared_flush },
  { "capacity", shared_capacity },
  { "free_space", shared_free_space },
  { NULL, NULL }
};

static const luaL_Reg shared_meta[] = {
  { "__gc", shared_gc },
  { "__tostring", shared_tostring },
  { NULL, NULL }
};

/* core.shared(name, capacity) -> the dictionary called name, made with this
 * capacity (bytes) if no state references one. An existing dictionary keeps
 * its own capacity: the caller compares. Options are validated by
 * lua/multiloop/shared.lua; this checks only what C must not get wrong. */
int multiloop_shared_open(lua_State *L) {
  size_t namelen;
  const char *name = luaL_checklstring(L, 1, &namelen);
  lua_Integer capacity = luaL_checkinteger(L, 2);
  shared_ud *u;
  luaL_argcheck(L, capacity >= MIN_CAPACITY, 2, "capacity must be at least 4096 bytes");
  luaL_argcheck(L, capacity <= MAX_CAPACITY && (lua_Unsigned)capacity <= SIZE_MAX, 2,
                "capacity must be at most 2^40 bytes (1 TiB)");
  if (luaL_newmetatable(L, SHARED_MT)) {            /* once per state */
    luaL_setfuncs(L, shared_meta, 0);
    luaL_newlib(L, shared_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);                          /* a valid, released object first */
  luaL_setmetatable(L, SHARED_MT);
  /* The capacity is not allocated up front: only the stripes are. */
  if ((u->d = multiloop_dict_acquire(name, namelen, (size_t)capacity)) == NULL)
    return luaL_error(L, "multiloop.shared: not enough memory for dictionary '%s'", name);
  return 1;
}
