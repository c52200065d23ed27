/*
 * copy.c: Lua values as plain bytes, so that they can cross from one Lua state
 * (thread) to another. Nothing Lua-shaped is shared: the sender encodes into a
 * malloc'd buffer, which the caller owns and frees; a receiver decodes it into
 * fresh values in its own state.
 *
 * Copied: nil, booleans, integers and floats (kept distinct), strings with any
 * bytes, and tables of those (keys and values), nested up to MAX_DEPTH. A
 * function, userdata, thread or a table cycle is an error that names the path
 * ("config.users[2].cb: cannot copy a function"). A table reached twice by two
 * paths without a cycle is copied twice.
 *
 * Encoding: a tag byte, then a payload in host byte order (both ends are one
 * process): 'n' nil, 'f'/'t' booleans, 'i' lua_Integer, 'd' lua_Number,
 * 's' size_t length + bytes, '{' key/value pairs up to '}'.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "multiloop.h"

#define MAX_DEPTH 100

typedef struct {
  lua_State *L;
  char *data;
  size_t len, cap;
  int seen;              /* stack index of the table of tables being copied */
  int failed;
  char path[256];        /* where we are, for error messages */
  char error[400];
} encoder;

static int reserve(encoder *e, size_t n) {
  if (e->len + n <= e->cap) return 1;
  size_t cap = e->cap ? e->cap : 64;
  while (cap < e->len + n) cap *= 2;
  char *p = realloc(e->data, cap);
  if (p == NULL) {
    snprintf(e->error, sizeof e->error, "%s: out of memory", e->path);
    e->failed = 1;
    return 0;
  }
  e->data = p;
  e->cap = cap;
  return 1;
}

static void put(encoder *e, const void *p, size_t n) {
  if (reserve(e, n)) {
    memcpy(e->data + e->len, p, n);
    e->len += n;
  }
}

static void put_tag(encoder *e, char tag) { put(e, &tag, 1); }

static void fail(encoder *e, const char *what) {
  snprintf(e->error, sizeof e->error, "%s: %s", e->path, what);
  e->failed = 1;
}

/* Appends "[k]" or ".k" to the path for the key at `kidx`; returns the old length. */
static size_t push_path(encoder *e, int kidx) {
  size_t old = strlen(e->path), room = sizeof e->path - old;
  lua_State *L = e->L;
  if (lua_type(L, kidx) == LUA_TSTRING) {
    const char *k = lua_tostring(L, kidx);
    size_t i, ident = (*k != '\0' && !(*k >= '0' && *k <= '9'));
    for (i = 0; k[i] && ident; i++)
      ident = (k[i] == '_' || (k[i] >= 'a' && k[i] <= 'z') ||
               (k[i] >= 'A' && k[i] <= 'Z') || (k[i] >= '0' && k[i] <= '9'));
    if (ident) snprintf(e->path + old, room, ".%s", k);
    else snprintf(e->path + old, room, "[\"%.40s\"]", k);
  } else if (lua_isinteger(L, kidx)) {
    snprintf(e->path + old, room, "[%lld]", (long long)lua_tointeger(L, kidx));
  } else {
    snprintf(e->path + old, room, "[%s]", luaL_typename(L, kidx));
  }
  return old;
}

static void encode(encoder *e, int idx, int depth);

static void encode_table(encoder *e, int idx, int depth) {
  lua_State *L = e->L;
  int top;
  if (depth >= MAX_DEPTH) { fail(e, "tables nested too deeply to copy"); return; }
  if (!lua_checkstack(L, 4)) { fail(e, "out of Lua stack"); return; }
  lua_pushvalue(L, idx);
  if (lua_rawget(L, e->seen) != LUA_TNIL) {
    lua_pop(L, 1);
    fail(e, "cannot copy a table that contains itself (a cycle)");
    return;
  }
  lua_pop(L, 1);
  lua_pushvalue(L, idx);                       /* mark it as on the current path */
  lua_pushboolean(L, 1);
  lua_rawset(L, e->seen);
  put_tag(e, '{');
  top = lua_gettop(L);
  lua_pushnil(L);
  while (!e->failed && lua_next(L, idx) != 0) { /* ... key value */
    int k = lua_gettop(L) - 1;
    size_t old = push_path(e, k);
    int kt = lua_type(L, k);
    if (kt != LUA_TSTRING && kt != LUA_TNUMBER && kt != LUA_TBOOLEAN)
      fail(e, lua_pushfstring(L, "cannot copy a %s used as a table key",
                              luaL_typename(L, k)));
    else {
      encode(e, k, depth + 1);
      encode(e, k + 1, depth + 1);
    }
    e->path[old] = '\0';
    lua_settop(L, k);                           /* ... key */
  }
  lua_settop(L, top);                           /* a failure leaves its key behind */
  put_tag(e, '}');
  lua_pushvalue(L, idx);
  lua_pushnil(L);
  lua_rawset(L, e->seen);
}

static void encode(encoder *e, int idx, int depth) {
  lua_State *L = e->L;
  if (e->failed) return;
  switch (lua_type(L, idx)) {
    case LUA_TNIL: put_tag(e, 'n'); break;
    case LUA_TBOOLEAN: put_tag(e, lua_toboolean(L, idx) ? 't' : 'f'); break;
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) {
        lua_Integer i = lua_tointeger(L, idx);
        put_tag(e, 'i');
        put(e, &i, sizeof i);
      } else {
        lua_Number d = lua_tonumber(L, idx);
        put_tag(e, 'd');
        put(e, &d, sizeof d);
      }
      break;
    case LUA_TSTRING: {
      size_t n;
      const char *s = lua_tolstring(L, idx, &n);
      put_tag(e, 's');
      put(e, &n, sizeof n);
      put(e, s, n);
      break;
    }
    case LUA_TTABLE: encode_table(e, idx, depth); break;
    default: {
      char what[64];
      snprintf(what, sizeof what, "cannot copy a %s", luaL_typename(L, idx));
      fail(e, what);
    }
  }
}

/* Encodes the value at `idx` into a malloc'd buffer (*out, *outlen), which the
 * caller frees. On failure returns 0 and pushes a message naming the path that
 * starts at `root`; nothing is allocated then. Raises only on a Lua memory error. */
int multiloop_copy_encode(lua_State *L, int idx, const char *root, char **out,
                          size_t *outlen) {
  encoder e;
  int top;
  idx = lua_absindex(L, idx);
  memset(&e, 0, sizeof e);
  e.L = L;
  snprintf(e.path, sizeof e.path, "%s", root);
  lua_newtable(L);
  e.seen = top = lua_gettop(L);
  encode(&e, idx, 0);
  lua_settop(L, top - 1);
  if (e.failed) {
    free(e.data);
    lua_pushstring(L, e.error);
    return 0;
  }
  *out = e.data;
  *outlen = e.len;
  return 1;
}

typedef struct {
  const char *p, *end;
} decoder;

static void get(decoder *d, void *dst, size_t n) {
  memcpy(dst, d->p, n);
  d->p += n;
}

/* Pushes one value. The bytes come from multiloop_copy_encode, so they are
 * trusted; the bounds checks guard only against a truncated buffer. */
static void decode(lua_State *L, decoder *d) {
  luaL_checkstack(L, 3, "copying a value");
  if (d->p >= d->end) luaL_error(L, "copy: truncated value");
  switch (*d->p++) {
    case 'n': lua_pushnil(L); break;
    case 'f': lua_pushboolean(L, 0); break;
    case 't': lua_pushboolean(L, 1); break;
    case 'i': { lua_Integer i; get(d, &i, sizeof i); lua_pushinteger(L, i); break; }
    case 'd': { lua_Number n; get(d, &n, sizeof n); lua_pushnumber(L, n); break; }
    case 's': {
      size_t n;
      get(d, &n, sizeof n);
      lua_pushlstring(L, d->p, n);
      d->p += n;
      break;
    }
    case '{':
      lua_newtable(L);
      while (d->p < d->end && *d->p != '}') {
        decode(L, d);
        decode(L, d);
        lua_rawset(L, -3);
      }
      d->p++;
      break;
    default: luaL_error(L, "copy: corrupt value");
  }
}

/* Pushes the value encoded in data[0..len). May raise (memory errors). */
void multiloop_copy_decode(lua_State *L, const char *data, size_t len) {
  decoder d = { data, data + len };
  if (len == 0) { lua_pushnil(L); return; }
  decode(L, &d);
}
