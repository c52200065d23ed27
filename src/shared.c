/*
 * shared.c: named dictionaries that every Lua state of the process shares
 * (the main state and each worker's), and their Lua object
 * ("multiloop.shared"). Keys are strings; values are strings, integers,
 * floats (kept distinct) or booleans, copied in and out as plain bytes, so
 * nothing Lua-shaped is shared.
 *
 * Owns: the process-wide registry (dictionaries by name), the dictionaries
 * and their entries, and in each state the userdata that refers to one.
 * The registry is a list under one mutex, initialised once; it is the one
 * mutable global of the module, and unavoidable: a worker's fresh state has
 * no other way to meet the dictionary that the main state made.
 *
 * Memory is bounded by the capacity, split evenly over the stripes (16 from
 * 1 MiB up; below that fewer, each at least 64 KiB): a stripe's bytes are
 * its entries (header, key, string value) plus its hash buckets; malloc's
 * own overhead is not counted. When an entry does not fit, the stripe's
 * least recently used entries are freed until it does (set reports
 * forcible = true when a live one went); an entry larger than a stripe's
 * share is refused ("no memory") and nothing changes. Expired entries are
 * freed lazily: when a lookup meets one, when eviction reaches it, and by
 * count() and keys(). Time is uv_hrtime(): monotonic, one clock for every
 * thread.
 *
 * Threads: any thread that owns a lua_State calls the functions here, on the
 * userdata of its own state. The registry lock guards the list and every
 * dictionary's reference count; a stripe's lock guards its hash table, LRU
 * list and byte count. A key's hash picks its stripe, so threads working on
 * different keys rarely meet on one lock. No lock is held while another is
 * taken, and no Lua API is called while one is held (a Lua error would
 * longjmp past the unlock): arguments are checked before locking, and what
 * a call returns is copied (into the userdata's scratch buffer for strings)
 * and pushed after unlocking.
 *
 * Freeing: each userdata holds one reference, dropped in __gc. The last one
 * unlinks the dictionary from the registry and frees it with every entry, so
 * a dictionary that no state references is gone: the next shared(name)
 * makes a new, empty one.
 */
#include <stdlib.h>
#include <string.h>

#include "multiloop.h"

#define SHARED_MT "multiloop.shared"

#define MIN_CAPACITY 4096                /* lua/multiloop/shared.lua says the same */
#define MAX_STRIPES 16                   /* a power of two */
#define STRIPE_MIN_BYTES (64 * 1024)     /* fewer stripes below 16 * this */
#define INITIAL_BUCKETS 8                /* a power of two */
#define MAX_TTL_MS INT64_C(1000000000000) /* about 31 years */
#define NS_PER_MS UINT64_C(1000000)
#define DEFAULT_MAX_KEYS 1024            /* keys() without max, as OpenResty's get_keys */

enum { V_BOOLEAN, V_INTEGER, V_FLOAT, V_STRING };

typedef struct entry_s {
  struct entry_s *hnext;                 /* hash chain */
  struct entry_s *prev, *next;           /* LRU list: head is the most recent */
  uint64_t hash;
  uint64_t expires;                      /* uv_hrtime() in ns; 0: never */
  size_t klen, vlen;                     /* vlen: string values only */
  int type;                              /* V_* */
  union {
    int b;
    lua_Integer i;
    lua_Number n;
  } v;
  char data[];                           /* the key, then a string value */
} entry;

/* Aligned to a cache line, so that threads on neighbouring stripes do not
 * invalidate each other's lock. */
typedef struct {
  uv_mutex_t lock;
  entry **buckets;
  size_t nbuckets;                       /* a power of two */
  entry *head, *tail;
  size_t count;                          /* entries, expired ones included */
  size_t used;                           /* bytes: entries and buckets */
  size_t cap;                            /* this stripe's share of the capacity */
} __attribute__((aligned(64))) stripe;

/* Everything but `next`, `refs` and the stripes is written once, before the
 * registry lock publishes the dictionary, and only read afterwards. */
typedef struct shared_dict_s {
  struct shared_dict_s *next;            /* the registry list */
  int refs;                              /* under the registry lock */
  char *name;
  size_t namelen;
  size_t capacity;
  uint64_t seed;
  unsigned nstripes;                     /* a power of two */
  stripe stripes[];
} shared_dict;

/* The Lua object: one per dictionary per state (shared.lua caches it). */
typedef struct {
  shared_dict *d;                        /* NULL: released (or not yet acquired) */
  char *buf;                             /* scratch for results, this state only */
  size_t bufcap;
} shared_ud;

/* A value read from Lua, before any lock is taken. */
typedef struct {
  int type;
  int b;
  lua_Integer i;
  lua_Number n;
  const char *s;
  size_t len;
} value;

/* --- the registry (the one global) ---------------------------------------- */

static uv_once_t registry_once = UV_ONCE_INIT;
static uv_mutex_t registry_lock;
static shared_dict *registry_head;

static void registry_init(void) {
  if (uv_mutex_init(&registry_lock) != 0) abort();   /* as libuv does for its own */
}

/* --- one stripe ----------------------------------------------------------- */

static size_t entry_size(size_t klen, size_t vlen) {
  return sizeof(entry) + klen + vlen;
}

static int expired(const entry *e, uint64_t now) {
  return e->expires != 0 && e->expires <= now;
}

static void lru_unlink(stripe *s, entry *e) {
  if (e->prev) e->prev->next = e->next;
  else s->head = e->next;
  if (e->next) e->next->prev = e->prev;
  else s->tail = e->prev;
}

static void lru_push(stripe *s, entry *e) {
  e->prev = NULL;
  e->next = s->head;
  if (s->head) s->head->prev = e;
  else s->tail = e;
  s->head = e;
}

static void lru_touch(stripe *s, entry *e) {
  if (s->head == e) return;
  lru_unlink(s, e);
  lru_push(s, e);
}

/* The link that points at the entry for the key, or at the chain's end. */
static entry **lookup(stripe *s, uint64_t h, const char *k, size_t kn) {
  entry **pp = &s->buckets[h & (s->nbuckets - 1)];
  for (; *pp != NULL; pp = &(*pp)->hnext) {
    entry *e = *pp;
    if (e->hash == h && e->klen == kn && memcmp(e->data, k, kn) == 0) break;
  }
  return pp;
}

static void remove_entry(stripe *s, entry *e) {
  entry **pp = &s->buckets[e->hash & (s->nbuckets - 1)];
  while (*pp != e) pp = &(*pp)->hnext;
  *pp = e->hnext;
  lru_unlink(s, e);
  s->used -= entry_size(e->klen, e->vlen);
  s->count--;
  free(e);
}

/* The live entry for the key, or NULL; an expired one is freed on the way. */
static entry *find(stripe *s, uint64_t h, const char *k, size_t kn, uint64_t now) {
  entry *e = *lookup(s, h, k, kn);
  if (e != NULL && expired(e, now)) {
    remove_entry(s, e);
    e = NULL;
  }
  return e;
}

static void purge_expired(stripe *s, uint64_t now) {
  entry *e = s->head, *next;
  for (; e != NULL; e = next) {
    next = e->next;
    if (expired(e, now)) remove_entry(s, e);
  }
}

/* Doubles the buckets when the table is loaded, if the bytes fit in the
 * stripe's share; otherwise chains just grow longer. Never fails. */
static void maybe_grow(stripe *s) {
  size_t n = s->nbuckets * 2, i;
  entry **b;
  if (s->count <= s->nbuckets) return;
  if (s->used + s->nbuckets * sizeof *b > s->cap) return;  /* n - nbuckets more */
  if ((b = calloc(n, sizeof *b)) == NULL) return;
  for (i = 0; i < s->nbuckets; i++) {
    entry *e = s->buckets[i], *next;
    for (; e != NULL; e = next) {
      next = e->hnext;
      e->hnext = b[e->hash & (n - 1)];
      b[e->hash & (n - 1)] = e;
    }
  }
  free(s->buckets);
  s->used += (n - s->nbuckets) * sizeof *b;
  s->buckets = b;
  s->nbuckets = n;
}

/* Whether an entry of `size` bytes fits once every other entry is gone. */
static int fits(const stripe *s, size_t size) {
  return size <= s->cap && s->nbuckets * sizeof(entry *) <= s->cap - size;
}

/* Frees entries from the LRU end until `size` more bytes fit (the caller
 * checked fits()). Returns 1 when a live, unexpired entry had to go. */
static int make_room(stripe *s, size_t size, uint64_t now) {
  int forced = 0;
  while (s->used + size > s->cap && s->tail != NULL) {
    if (!expired(s->tail, now)) forced = 1;
    remove_entry(s, s->tail);
  }
  return forced;
}

static void insert(stripe *s, entry *e) {
  entry **b = &s->buckets[e->hash & (s->nbuckets - 1)];
  e->hnext = *b;
  *b = e;
  lru_push(s, e);
  s->used += entry_size(e->klen, e->vlen);
  s->count++;
  maybe_grow(s);
}

static void put_value(entry *e, const value *v) {
  e->type = v->type;
  switch (v->type) {
    case V_BOOLEAN: e->v.b = v->b; break;
    case V_INTEGER: e->v.i = v->i; break;
    case V_FLOAT: e->v.n = v->n; break;
    default: memcpy(e->data + e->klen, v->s, v->len); break;
  }
}

/* The entry's value, except a string's bytes. */
static void get_value(const entry *e, value *v) {
  memset(v, 0, sizeof *v);
  v->type = e->type;
  switch (e->type) {
    case V_BOOLEAN: v->b = e->v.b; break;
    case V_INTEGER: v->i = e->v.i; break;
    case V_FLOAT: v->n = e->v.n; break;
    default: break;
  }
}

/* A new, unlinked entry, or NULL when out of memory. */
static entry *new_entry(uint64_t h, const char *k, size_t kn, const value *v,
                        uint64_t expires) {
  size_t vlen = v->type == V_STRING ? v->len : 0;
  entry *e = malloc(entry_size(kn, vlen));
  if (e == NULL) return NULL;
  e->hash = h;
  e->expires = expires;
  e->klen = kn;
  e->vlen = vlen;
  memcpy(e->data, k, kn);
  put_value(e, v);
  return e;
}

static void stripe_clear(stripe *s) {
  entry *e = s->head, *next;
  for (; e != NULL; e = next) {
    next = e->next;
    free(e);
  }
  memset(s->buckets, 0, s->nbuckets * sizeof *s->buckets);
  s->head = s->tail = NULL;
  s->count = 0;
  s->used = s->nbuckets * sizeof *s->buckets;
}

/* --- a dictionary --------------------------------------------------------- */

static uint64_t hash_key(const shared_dict *d, const char *k, size_t kn) {
  uint64_t h = d->seed ^ (kn * UINT64_C(0x9e3779b97f4a7c15));
  size_t i;
  for (i = 0; i < kn; i++) h = (h ^ (unsigned char)k[i]) * UINT64_C(0x100000001b3);
  h ^= h >> 33;                          /* finalizer: spread every bit */
  h *= UINT64_C(0xff51afd7ed558ccd);
  h ^= h >> 33;
  h *= UINT64_C(0xc4ceb9fe1a85ec53);
  h ^= h >> 33;
  return h;
}

/* The stripe takes bits that bucket indexes only reach in huge tables. */
static stripe *stripe_of(shared_dict *d, uint64_t h) {
  return &d->stripes[(h >> 48) & (d->nstripes - 1)];
}

static void dict_free(shared_dict *d, unsigned nready) {
  unsigned i;
  for (i = 0; i < nready; i++) {
    stripe_clear(&d->stripes[i]);
    free(d->stripes[i].buckets);
    uv_mutex_destroy(&d->stripes[i].lock);
  }
  free(d->name);
  free(d);
}

/* A new dictionary with one reference, or NULL when out of memory. */
static shared_dict *dict_new(const char *name, size_t namelen, size_t capacity) {
  unsigned n = 1, i;
  size_t size;
  shared_dict *d;
  while (n < MAX_STRIPES && capacity / (2 * n) >= STRIPE_MIN_BYTES) n *= 2;
  size = sizeof *d + n * sizeof(stripe);
  size = (size + 63) & ~(size_t)63;      /* aligned_alloc wants a multiple */
  if ((d = aligned_alloc(64, size)) == NULL) return NULL;
  memset(d, 0, size);
  d->refs = 1;
  d->capacity = capacity;
  d->nstripes = n;
  d->seed = uv_hrtime() ^ (uint64_t)(uintptr_t)d;
  d->namelen = namelen;
  if ((d->name = malloc(namelen + 1)) == NULL) {
    free(d);
    return NULL;
  }
  memcpy(d->name, name, namelen);
  d->name[namelen] = '\0';
  for (i = 0; i < n; i++) {
    stripe *s = &d->stripes[i];
    s->nbuckets = INITIAL_BUCKETS;
    s->cap = capacity / n;
    s->buckets = calloc(s->nbuckets, sizeof *s->buckets);
    if (s->buckets == NULL || uv_mutex_init(&s->lock) != 0) {
      free(s->buckets);
      dict_free(d, i);
      return NULL;
    }
    s->used = s->nbuckets * sizeof *s->buckets;
  }
  return d;
}

/* The named dictionary, found or made, with a reference for the caller;
 * NULL when out of memory. */
static shared_dict *dict_acquire(const char *name, size_t namelen, size_t capacity) {
  shared_dict *d;
  uv_once(&registry_once, registry_init);
  uv_mutex_lock(&registry_lock);
  for (d = registry_head; d != NULL; d = d->next)
    if (d->namelen == namelen && memcmp(d->name, name, namelen) == 0) break;
  if (d != NULL) {
    d->refs++;
  } else if ((d = dict_new(name, namelen, capacity)) != NULL) {
    d->next = registry_head;
    registry_head = d;
  }
  uv_mutex_unlock(&registry_lock);
  return d;
}

static void dict_release(shared_dict *d) {
  shared_dict **pp;
  int last;
  uv_mutex_lock(&registry_lock);
  last = --d->refs == 0;
  if (last) {
    for (pp = &registry_head; *pp != d; pp = &(*pp)->next) {}
    *pp = d->next;
  }
  uv_mutex_unlock(&registry_lock);
  if (last) dict_free(d, d->nstripes);   /* unreachable now: no lock needed */
}

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

static void check_value(lua_State *L, int arg, value *v) {
  memset(v, 0, sizeof *v);
  switch (lua_type(L, arg)) {
    case LUA_TBOOLEAN:
      v->type = V_BOOLEAN;
      v->b = lua_toboolean(L, arg);
      break;
    case LUA_TNUMBER:
      if (lua_isinteger(L, arg)) {
        v->type = V_INTEGER;
        v->i = lua_tointeger(L, arg);
      } else {
        v->type = V_FLOAT;
        v->n = lua_tonumber(L, arg);
      }
      break;
    case LUA_TSTRING:
      v->type = V_STRING;
      v->s = lua_tolstring(L, arg, &v->len);
      break;
    default:
      luaL_typeerror(L, arg, "string, number or boolean");
  }
}

static void check_number(lua_State *L, int arg, value *v) {
  if (lua_type(L, arg) != LUA_TNUMBER) luaL_typeerror(L, arg, "number");
  check_value(L, arg, v);
}

/* An optional ttl in ms, as an absolute expiry time (0: none). */
static uint64_t check_expiry(lua_State *L, int arg, uint64_t now) {
  lua_Integer ms = luaL_optinteger(L, arg, 0);
  luaL_argcheck(L, ms >= 0 && ms <= MAX_TTL_MS, arg,
                "ttl_ms must be from 0 to 1e12; 0 means no expiry");
  return ms == 0 ? 0 : now + (uint64_t)ms * NS_PER_MS;
}

/* Scratch space for `n` bytes of results; called with a stripe locked, so it
 * reports failure instead of raising. */
static char *scratch(shared_ud *u, size_t n) {
  if (n > u->bufcap || u->buf == NULL) {         /* NULL: even for 0 bytes */
    size_t cap = u->bufcap ? u->bufcap : 256;
    char *p;
    while (cap < n) cap *= 2;
    if ((p = realloc(u->buf, cap)) == NULL) return NULL;
    u->buf = p;
    u->bufcap = cap;
  }
  return u->buf;
}

static void push_value(lua_State *L, const value *v) {
  switch (v->type) {
    case V_BOOLEAN: lua_pushboolean(L, v->b); break;
    case V_INTEGER: lua_pushinteger(L, v->i); break;
    case V_FLOAT: lua_pushnumber(L, v->n); break;
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

/* --- writing: set, add, replace ------------------------------------------- */

enum { STORE_SET, STORE_ADD, STORE_REPLACE };
enum { STORED, STORED_FORCED, NOT_STORED_EXISTS, NOT_STORED_MISSING, NOT_STORED_NO_MEMORY };

static int store(shared_dict *d, int mode, const char *k, size_t kn, const value *v,
                 uint64_t expires, uint64_t now) {
  uint64_t h = hash_key(d, k, kn);
  stripe *s = stripe_of(d, h);
  size_t vlen = v->type == V_STRING ? v->len : 0;
  entry *old, *e;
  int forced;

  uv_mutex_lock(&s->lock);
  old = find(s, h, k, kn, now);
  if (mode == STORE_ADD && old != NULL) {
    uv_mutex_unlock(&s->lock);
    return NOT_STORED_EXISTS;
  }
  if (mode == STORE_REPLACE && old == NULL) {
    uv_mutex_unlock(&s->lock);
    return NOT_STORED_MISSING;
  }
  if (old != NULL && old->vlen == vlen) { /* same size (all numbers): in place */
    put_value(old, v);
    old->expires = expires;
    lru_touch(s, old);
    uv_mutex_unlock(&s->lock);
    return STORED;
  }
  /* Allocate before dropping the old entry, so a failure changes nothing. */
  if (!fits(s, entry_size(kn, vlen)) || (e = new_entry(h, k, kn, v, expires)) == NULL) {
    uv_mutex_unlock(&s->lock);
    return NOT_STORED_NO_MEMORY;
  }
  if (old != NULL) remove_entry(s, old);
  forced = make_room(s, entry_size(kn, vlen), now);
  insert(s, e);
  uv_mutex_unlock(&s->lock);
  return forced ? STORED_FORCED : STORED;
}

/* d:set/add/replace(key, value [, ttl_ms]) -> true, nil, forcible
 * or false, "exists" | "not found" | "no memory", false. forcible is true
 * when live (unexpired) entries were evicted to make room. */
static int store_method(lua_State *L, int mode) {
  shared_ud *u = check_shared(L);
  size_t kn;
  const char *k = check_key(L, 2, &kn);
  uint64_t now = uv_hrtime(), expires;
  value v;
  int r;
  check_value(L, 3, &v);
  expires = check_expiry(L, 4, now);
  r = store(u->d, mode, k, kn, &v, expires, now);
  if (r == STORED || r == STORED_FORCED) {
    lua_pushboolean(L, 1);
    lua_pushnil(L);
  } else {
    push_fail(L, 1, r == NOT_STORED_EXISTS    ? "exists"
                    : r == NOT_STORED_MISSING ? "not found"
                                              : "no memory");
  }
  lua_pushboolean(L, r == STORED_FORCED);
  return 3;
}

static int shared_set(lua_State *L) { return store_method(L, STORE_SET); }
static int shared_add(lua_State *L) { return store_method(L, STORE_ADD); }
static int shared_replace(lua_State *L) { return store_method(L, STORE_REPLACE); }

/* --- reading -------------------------------------------------------------- */

/* d:get(key) -> value, or nil when absent or expired. Reading makes the
 * entry the most recently used. */
static int shared_get(lua_State *L) {
  shared_ud *u = check_shared(L);
  size_t kn;
  const char *k = check_key(L, 2, &kn);
  uint64_t h = hash_key(u->d, k, kn), now = uv_hrtime();
  stripe *s = stripe_of(u->d, h);
  entry *e;
  value v;

  uv_mutex_lock(&s->lock);
  if ((e = find(s, h, k, kn, now)) == NULL) {
    uv_mutex_unlock(&s->lock);
    lua_pushnil(L);
    return 1;
  }
  lru_touch(s, e);
  get_value(e, &v);
  if (e->type == V_STRING) {
    char *p = scratch(u, e->vlen);
    if (p == NULL) {
      uv_mutex_unlock(&s->lock);
      return luaL_error(L, "not enough memory");
    }
    memcpy(p, e->data + e->klen, e->vlen);
    v.s = p;
    v.len = e->vlen;
  }
  uv_mutex_unlock(&s->lock);
  push_value(L, &v);
  return 1;
}

/* d:ttl(key) -> remaining ms (at least 1), 0 when the entry never expires,
 * or nil, "not found". */
static int shared_ttl(lua_State *L) {
  shared_ud *u = check_shared(L);
  size_t kn;
  const char *k = check_key(L, 2, &kn);
  uint64_t h = hash_key(u->d, k, kn), now = uv_hrtime(), expires = 0;
  stripe *s = stripe_of(u->d, h);
  entry *e;

  uv_mutex_lock(&s->lock);
  if ((e = find(s, h, k, kn, now)) != NULL) expires = e->expires;
  uv_mutex_unlock(&s->lock);
  if (e == NULL) return push_fail(L, 0, "not found");
  /* Rounded up, so an entry that will expire never reads as 0 (no ttl). */
  lua_pushinteger(L, expires == 0 ? 0
                                  : (lua_Integer)((expires - now + NS_PER_MS - 1) / NS_PER_MS));
  return 1;
}

/* d:incr(key, n [, init]) -> new value, nil, forcible. Atomic. A missing key
 * starts from init (which must then be given: else nil, "not found"); a value
 * that is not a number gives nil, "not a number". Integers add as integers
 * (wrapping around, as in Lua); with a float on either side the sum is a
 * float. An existing entry keeps its ttl; one made from init has none. */
static int shared_incr(lua_State *L) {
  shared_ud *u = check_shared(L);
  size_t kn;
  const char *k = check_key(L, 2, &kn);
  uint64_t h = hash_key(u->d, k, kn), now = uv_hrtime();
  stripe *s = stripe_of(u->d, h);
  value n, base, sum;
  int has_init = !lua_isnoneornil(L, 4), forced = 0;
  const char *err = NULL;
  entry *e;

  memset(&base, 0, sizeof base);
  memset(&sum, 0, sizeof sum);
  check_number(L, 3, &n);
  if (has_init) check_number(L, 4, &base);
  uv_mutex_lock(&s->lock);
  e = find(s, h, k, kn, now);
  if (e != NULL) {
    get_value(e, &base);
    if (base.type != V_INTEGER && base.type != V_FLOAT) err = "not a number";
  } else if (!has_init) {
    err = "not found";
  }
  if (err == NULL) {
    if (base.type == V_INTEGER && n.type == V_INTEGER) {
      sum.type = V_INTEGER;
      sum.i = (lua_Integer)((lua_Unsigned)base.i + (lua_Unsigned)n.i);
    } else {
      sum.type = V_FLOAT;
      sum.n = (base.type == V_INTEGER ? (lua_Number)base.i : base.n) +
              (n.type == V_INTEGER ? (lua_Number)n.i : n.n);
    }
    if (e != NULL) {
      put_value(e, &sum);
      lru_touch(s, e);
    } else if (!fits(s, entry_size(kn, 0)) || (e = new_entry(h, k, kn, &sum, 0)) == NULL) {
      err = "no memory";
    } else {
      forced = make_room(s, entry_size(kn, 0), now);
      insert(s, e);
    }
  }
  uv_mutex_unlock(&s->lock);
  if (err != NULL) {
    push_fail(L, 0, err);
    lua_pushboolean(L, 0);
    return 3;
  }
  push_value(L, &sum);
  lua_pushnil(L);
  lua_pushboolean(L, forced);
  return 3;
}

/* d:delete(key) -> true when a live entry was removed, false when absent. */
static int shared_delete(lua_State *L) {
  shared_ud *u = check_shared(L);
  size_t kn;
  const char *k = check_key(L, 2, &kn);
  uint64_t h = hash_key(u->d, k, kn), now = uv_hrtime();
  stripe *s = stripe_of(u->d, h);
  entry *e;

  uv_mutex_lock(&s->lock);
  if ((e = find(s, h, k, kn, now)) != NULL) remove_entry(s, e);
  uv_mutex_unlock(&s->lock);
  lua_pushboolean(L, e != NULL);
  return 1;
}

/* --- the whole dictionary: one stripe at a time, so not a snapshot -------- */

/* d:keys([max]) -> a list of at most max live keys (default 1024, 0: all),
 * in no particular order. */
static int shared_keys(lua_State *L) {
  shared_ud *u = check_shared(L);
  lua_Integer max = luaL_optinteger(L, 2, DEFAULT_MAX_KEYS);
  uint64_t now = uv_hrtime();
  lua_Integer n = 0;
  unsigned i;
  luaL_argcheck(L, max >= 0, 2, "max must not be negative; 0 means all keys");
  lua_newtable(L);                                 /* d max? keys */
  for (i = 0; i < u->d->nstripes && (max == 0 || n < max); i++) {
    stripe *s = &u->d->stripes[i];
    size_t off = 0, got = 0, j;
    entry *e;
    int oom = 0;
    uv_mutex_lock(&s->lock);
    purge_expired(s, now);
    /* Copied out as (length, bytes) records, pushed once unlocked. */
    for (e = s->head; e != NULL && (max == 0 || n + (lua_Integer)got < max); e = e->next) {
      char *p = scratch(u, off + sizeof(size_t) + e->klen);
      if (p == NULL) {
        oom = 1;
        break;
      }
      memcpy(p + off, &e->klen, sizeof(size_t));
      memcpy(p + off + sizeof(size_t), e->data, e->klen);
      off += sizeof(size_t) + e->klen;
      got++;
    }
    uv_mutex_unlock(&s->lock);
    if (oom) return luaL_error(L, "not enough memory");
    for (off = 0, j = 0; j < got; j++) {
      size_t len;
      memcpy(&len, u->buf + off, sizeof len);
      lua_pushlstring(L, u->buf + off + sizeof len, len);
      lua_rawseti(L, -2, ++n);
      off += sizeof len + len;
    }
  }
  return 1;
}

/* d:count() -> the number of live entries. Frees expired ones on the way. */
static int shared_count(lua_State *L) {
  shared_ud *u = check_shared(L);
  uint64_t now = uv_hrtime();
  size_t total = 0;
  unsigned i;
  for (i = 0; i < u->d->nstripes; i++) {
    stripe *s = &u->d->stripes[i];
    uv_mutex_lock(&s->lock);
    purge_expired(s, now);
    total += s->count;
    uv_mutex_unlock(&s->lock);
  }
  lua_pushinteger(L, (lua_Integer)total);
  return 1;
}

/* d:flush(): frees every entry. */
static int shared_flush(lua_State *L) {
  shared_ud *u = check_shared(L);
  unsigned i;
  for (i = 0; i < u->d->nstripes; i++) {
    stripe *s = &u->d->stripes[i];
    uv_mutex_lock(&s->lock);
    stripe_clear(s);
    uv_mutex_unlock(&s->lock);
  }
  return 0;
}

/* d:capacity() -> bytes, as given to shared(). */
static int shared_capacity(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)check_shared(L)->d->capacity);
  return 1;
}

/* d:free_space() -> bytes not in use, summed over the stripes (so the largest
 * entry that fits without eviction may be smaller). */
static int shared_free_space(lua_State *L) {
  shared_ud *u = check_shared(L);
  size_t total = 0;
  unsigned i;
  for (i = 0; i < u->d->nstripes; i++) {
    stripe *s = &u->d->stripes[i];
    uv_mutex_lock(&s->lock);
    total += s->cap - s->used;
    uv_mutex_unlock(&s->lock);
  }
  lua_pushinteger(L, (lua_Integer)total);
  return 1;
}

/* --- the Lua object ------------------------------------------------------- */

static int shared_gc(lua_State *L) {
  shared_ud *u = luaL_checkudata(L, 1, SHARED_MT);
  if (u->d != NULL) dict_release(u->d);
  u->d = NULL;
  free(u->buf);
  u->buf = NULL;
  u->bufcap = 0;
  return 0;
}

static int shared_tostring(lua_State *L) {
  shared_ud *u = luaL_checkudata(L, 1, SHARED_MT);
  if (u->d == NULL) lua_pushliteral(L, SHARED_MT " (released)");
  else lua_pushfstring(L, SHARED_MT " '%s' (capacity %I)", u->d->name,
                       (lua_Integer)u->d->capacity);
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
  luaL_argcheck(L, capacity >= MIN_CAPACITY && (lua_Unsigned)capacity <= SIZE_MAX, 2,
                "capacity must be at least 4096 bytes");
  if (luaL_newmetatable(L, SHARED_MT)) {            /* once per state */
    luaL_setfuncs(L, shared_meta, 0);
    luaL_newlib(L, shared_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);                          /* a valid, released object first */
  luaL_setmetatable(L, SHARED_MT);
  if ((u->d = dict_acquire(name, namelen, (size_t)capacity)) == NULL)
    return luaL_error(L, "not enough memory");
  return 1;
}
