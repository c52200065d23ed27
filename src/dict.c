/*
 * dict.c: the dictionaries behind multiloop.shared (shared.c is their Lua
 * object): a process-wide registry of named dictionaries, each a set of
 * striped hash tables with an LRU list and expiry. Keys are byte strings;
 * values booleans, integers, floats or byte strings (multiloop_value_t).
 * No Lua API is used here, so no Lua error can ever longjmp past a lock.
 *
 * Owns: the registry (dictionaries by name), the dictionaries and their
 * entries. The registry is a list under one mutex, initialised once; it is
 * the one mutable global of the module, and unavoidable: a worker's fresh
 * state has no other way to meet the dictionary that the main state made.
 *
 * Memory is bounded by the capacity, split evenly over the stripes (16 from
 * 1 MiB up; below that fewer, each at least 64 KiB): a stripe's bytes are
 * its entries (header, key, string value) plus its hash buckets; malloc's
 * own overhead is not counted. When an entry does not fit, the stripe's
 * least recently used entries are freed until it does (a store reports
 * MULTILOOP_DICT_STORED_FORCED when a live one went); an entry larger than
 * a stripe's share is refused (MULTILOOP_DICT_NO_MEMORY) and nothing
 * changes. Expired entries are freed lazily: when a lookup meets one, when
 * eviction reaches it, and by count and keys. Time is uv_hrtime():
 * monotonic, one clock for every thread.
 *
 * Threads: any thread. The registry lock guards the list and every
 * dictionary's reference count; a stripe's lock guards its hash table, LRU
 * list and byte count. A key's hash picks its stripe, so threads working on
 * different keys rarely meet on one lock. No lock is held while another is
 * taken. What a read returns is copied out under the stripe's lock (strings
 * into the caller's multiloop_scratch_t), so nothing points into the
 * dictionary once the call returns.
 *
 * Freeing: each holder has one reference (multiloop_dict_acquire). The last
 * release unlinks the dictionary from the registry and frees it with every
 * entry, so a dictionary that nobody references is gone: the next acquire
 * of its name makes a new, empty one.
 */
#include <stdlib.h>
#include <string.h>

#include "multiloop.h"

#define MAX_STRIPES 16                   /* a power of two */
#define STRIPE_MIN_BYTES (64 * 1024)     /* fewer stripes below 16 * this */
#define INITIAL_BUCKETS 8                /* a power of two */
#define NS_PER_MS UINT64_C(1000000)

typedef struct entry_s {
  struct entry_s *hnext;                 /* hash chain */
  struct entry_s *prev, *next;           /* LRU list: head is the most recent */
  uint64_t hash;
  uint64_t expires;                      /* uv_hrtime() in ns; 0: never */
  size_t klen, vlen;                     /* vlen: string values only */
  int type;                              /* MULTILOOP_V_* */
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
struct multiloop_dict_s {
  struct multiloop_dict_s *next;            /* the registry list */
  int refs;                              /* under the registry lock */
  char *name;
  size_t namelen;
  size_t capacity;
  uint64_t seed;
  unsigned nstripes;                     /* a power of two */
  stripe stripes[];
};

/* --- the registry (the one global) ---------------------------------------- */

static uv_once_t registry_once = UV_ONCE_INIT;
static uv_mutex_t registry_lock;
static multiloop_dict_t *registry_head;

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

static void put_value(entry *e, const multiloop_value_t *v) {
  e->type = v->type;
  switch (v->type) {
    case MULTILOOP_V_BOOLEAN: e->v.b = v->b; break;
    case MULTILOOP_V_INTEGER: e->v.i = v->i; break;
    case MULTILOOP_V_FLOAT: e->v.n = v->n; break;
    default: memcpy(e->data + e->klen, v->s, v->len); break;
  }
}

/* The entry's value, except a string's bytes. */
static void get_value(const entry *e, multiloop_value_t *v) {
  memset(v, 0, sizeof *v);
  v->type = e->type;
  switch (e->type) {
    case MULTILOOP_V_BOOLEAN: v->b = e->v.b; break;
    case MULTILOOP_V_INTEGER: v->i = e->v.i; break;
    case MULTILOOP_V_FLOAT: v->n = e->v.n; break;
    default: break;
  }
}

/* A new, unlinked entry, or NULL when out of memory. */
static entry *new_entry(uint64_t h, const char *k, size_t kn, const multiloop_value_t *v,
                        uint64_t expires) {
  size_t vlen = v->type == MULTILOOP_V_STRING ? v->len : 0;
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

static uint64_t hash_key(const multiloop_dict_t *d, const char *k, size_t kn) {
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
static stripe *stripe_of(multiloop_dict_t *d, uint64_t h) {
  return &d->stripes[(h >> 48) & (d->nstripes - 1)];
}

static void dict_free(multiloop_dict_t *d, unsigned nready) {
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
static multiloop_dict_t *dict_new(const char *name, size_t namelen, size_t capacity) {
  unsigned n = 1, i;
  size_t size;
  multiloop_dict_t *d;
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
multiloop_dict_t *multiloop_dict_acquire(const char *name, size_t namelen, size_t capacity) {
  multiloop_dict_t *d;
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

void multiloop_dict_release(multiloop_dict_t *d) {
  multiloop_dict_t **pp;
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

/* --- operations on one key ------------------------------------------------ */

/* Copies a string value out into `buf` (grown as needed): 0, or -1 when out
 * of memory. Called with a stripe locked. */
static int copy_out(multiloop_scratch_t *buf, size_t off, const char *p, size_t n) {
  if (off + n > buf->cap || buf->p == NULL) {        /* NULL: even for 0 bytes */
    size_t cap = buf->cap ? buf->cap : 256;
    char *np;
    while (cap < off + n) cap *= 2;
    if ((np = realloc(buf->p, cap)) == NULL) return -1;
    buf->p = np;
    buf->cap = cap;
  }
  memcpy(buf->p + off, p, n);
  return 0;
}

/* Stores v under the key (mode: MULTILOOP_DICT_SET, _ADD only when absent,
 * _REPLACE only when present), expiring after ttl_ms (0: never). Returns
 * MULTILOOP_DICT_STORED, _STORED_FORCED (live entries were evicted), or
 * _EXISTS, _NOT_FOUND, _NO_MEMORY with nothing changed. */
int multiloop_dict_store(multiloop_dict_t *d, int mode, const char *k, size_t kn,
                         const multiloop_value_t *v, uint64_t ttl_ms) {
  uint64_t now = uv_hrtime(), expires = ttl_ms == 0 ? 0 : now + ttl_ms * NS_PER_MS;
  uint64_t h = hash_key(d, k, kn);
  stripe *s = stripe_of(d, h);
  size_t vlen = v->type == MULTILOOP_V_STRING ? v->len : 0;
  entry *old, *e;
  int forced;

  uv_mutex_lock(&s->lock);
  old = find(s, h, k, kn, now);
  if (mode == MULTILOOP_DICT_ADD && old != NULL) {
    uv_mutex_unlock(&s->lock);
    return MULTILOOP_DICT_EXISTS;
  }
  if (mode == MULTILOOP_DICT_REPLACE && old == NULL) {
    uv_mutex_unlock(&s->lock);
    return MULTILOOP_DICT_NOT_FOUND;
  }
  if (old != NULL && old->vlen == vlen) { /* same size (all numbers): in place */
    put_value(old, v);
    old->expires = expires;
    lru_touch(s, old);
    uv_mutex_unlock(&s->lock);
    return MULTILOOP_DICT_STORED;
  }
  /* Allocate before dropping the old entry, so a failure changes nothing. */
  if (!fits(s, entry_size(kn, vlen)) || (e = new_entry(h, k, kn, v, expires)) == NULL) {
    uv_mutex_unlock(&s->lock);
    return MULTILOOP_DICT_NO_MEMORY;
  }
  if (old != NULL) remove_entry(s, old);
  forced = make_room(s, entry_size(kn, vlen), now);
  insert(s, e);
  uv_mutex_unlock(&s->lock);
  return forced ? MULTILOOP_DICT_STORED_FORCED : MULTILOOP_DICT_STORED;
}

/* The live value for the key into *out (a string's bytes into buf, which
 * out->s then points at); the entry becomes the most recently used. Returns
 * 1, 0 when absent or expired, or -1 when buf could not grow. */
int multiloop_dict_get(multiloop_dict_t *d, const char *k, size_t kn, multiloop_value_t *out,
                       multiloop_scratch_t *buf) {
  uint64_t h = hash_key(d, k, kn);
  stripe *s = stripe_of(d, h);
  entry *e;
  int rc = 1;
  uv_mutex_lock(&s->lock);
  if ((e = find(s, h, k, kn, uv_hrtime())) == NULL) {
    rc = 0;
  } else {
    lru_touch(s, e);
    get_value(e, out);
    if (e->type == MULTILOOP_V_STRING) {
      if (copy_out(buf, 0, e->data + e->klen, e->vlen) != 0) rc = -1;
      out->s = buf->p;
      out->len = e->vlen;
    }
  }
  uv_mutex_unlock(&s->lock);
  return rc;
}

/* The milliseconds left before the key expires (rounded up, so an entry
 * that will expire never reads as 0), 0 when it never does, or -1 when it
 * is absent. */
int64_t multiloop_dict_ttl(multiloop_dict_t *d, const char *k, size_t kn) {
  uint64_t h = hash_key(d, k, kn), now = uv_hrtime(), expires = 0;
  stripe *s = stripe_of(d, h);
  entry *e;
  uv_mutex_lock(&s->lock);
  if ((e = find(s, h, k, kn, now)) != NULL) expires = e->expires;
  uv_mutex_unlock(&s->lock);
  if (e == NULL) return -1;
  return expires == 0 ? 0 : (int64_t)((expires - now + NS_PER_MS - 1) / NS_PER_MS);
}

/* Adds n (a number) to the key's number, atomically, into *sum. A missing
 * key starts from *init (NULL: MULTILOOP_DICT_NOT_FOUND). Integers add as
 * integers (wrapping around, as in Lua); with a float on either side the
 * sum is a float. An existing entry keeps its ttl; one made from init has
 * none. Returns MULTILOOP_DICT_STORED (or _FORCED), or _NOT_FOUND,
 * _NOT_A_NUMBER, _NO_MEMORY. */
int multiloop_dict_incr(multiloop_dict_t *d, const char *k, size_t kn, const multiloop_value_t *n,
                        const multiloop_value_t *init, multiloop_value_t *sum) {
  uint64_t h = hash_key(d, k, kn), now = uv_hrtime();
  stripe *s = stripe_of(d, h);
  multiloop_value_t base;
  int rc = MULTILOOP_DICT_STORED;
  entry *e;

  memset(&base, 0, sizeof base);
  memset(sum, 0, sizeof *sum);
  if (init != NULL) base = *init;
  uv_mutex_lock(&s->lock);
  e = find(s, h, k, kn, now);
  if (e != NULL) {
    get_value(e, &base);
    if (base.type != MULTILOOP_V_INTEGER && base.type != MULTILOOP_V_FLOAT)
      rc = MULTILOOP_DICT_NOT_A_NUMBER;
  } else if (init == NULL) {
    rc = MULTILOOP_DICT_NOT_FOUND;
  }
  if (rc == MULTILOOP_DICT_STORED) {
    if (base.type == MULTILOOP_V_INTEGER && n->type == MULTILOOP_V_INTEGER) {
      sum->type = MULTILOOP_V_INTEGER;
      sum->i = (lua_Integer)((lua_Unsigned)base.i + (lua_Unsigned)n->i);
    } else {
      sum->type = MULTILOOP_V_FLOAT;
      sum->n = (base.type == MULTILOOP_V_INTEGER ? (lua_Number)base.i : base.n) +
               (n->type == MULTILOOP_V_INTEGER ? (lua_Number)n->i : n->n);
    }
    if (e != NULL) {
      put_value(e, sum);
      lru_touch(s, e);
    } else if (!fits(s, entry_size(kn, 0)) || (e = new_entry(h, k, kn, sum, 0)) == NULL) {
      rc = MULTILOOP_DICT_NO_MEMORY;
    } else {
      if (make_room(s, entry_size(kn, 0), now)) rc = MULTILOOP_DICT_STORED_FORCED;
      insert(s, e);
    }
  }
  uv_mutex_unlock(&s->lock);
  return rc;
}

/* 1 when a live entry was removed, 0 when the key was absent. */
int multiloop_dict_delete(multiloop_dict_t *d, const char *k, size_t kn) {
  uint64_t h = hash_key(d, k, kn);
  stripe *s = stripe_of(d, h);
  entry *e;
  uv_mutex_lock(&s->lock);
  if ((e = find(s, h, k, kn, uv_hrtime())) != NULL) remove_entry(s, e);
  uv_mutex_unlock(&s->lock);
  return e != NULL;
}

/* --- the whole dictionary: one stripe at a time, so not a snapshot -------- */

/* Up to max live keys (0: all), in no particular order, copied into buf as
 * records of a size_t length and the key's bytes; *count says how many.
 * Returns 0, or -1 when buf could not grow (*count keys are there then). */
int multiloop_dict_keys(multiloop_dict_t *d, size_t max, multiloop_scratch_t *buf,
                        size_t *count) {
  uint64_t now = uv_hrtime();
  size_t off = 0, n = 0;
  unsigned i;
  int rc = 0;
  for (i = 0; i < d->nstripes && rc == 0 && (max == 0 || n < max); i++) {
    stripe *s = &d->stripes[i];
    entry *e;
    uv_mutex_lock(&s->lock);
    purge_expired(s, now);
    for (e = s->head; e != NULL && (max == 0 || n < max); e = e->next) {
      if (copy_out(buf, off, (const char *)&e->klen, sizeof e->klen) != 0 ||
          copy_out(buf, off + sizeof e->klen, e->data, e->klen) != 0) {
        rc = -1;
        break;
      }
      off += sizeof e->klen + e->klen;
      n++;
    }
    uv_mutex_unlock(&s->lock);
  }
  *count = n;
  return rc;
}

/* The number of live entries; expired ones are freed on the way. */
size_t multiloop_dict_count(multiloop_dict_t *d) {
  uint64_t now = uv_hrtime();
  size_t total = 0;
  unsigned i;
  for (i = 0; i < d->nstripes; i++) {
    stripe *s = &d->stripes[i];
    uv_mutex_lock(&s->lock);
    purge_expired(s, now);
    total += s->count;
    uv_mutex_unlock(&s->lock);
  }
  return total;
}

void multiloop_dict_flush(multiloop_dict_t *d) {
  unsigned i;
  for (i = 0; i < d->nstripes; i++) {
    stripe *s = &d->stripes[i];
    uv_mutex_lock(&s->lock);
    stripe_clear(s);
    uv_mutex_unlock(&s->lock);
  }
}

/* Bytes not in use, summed over the stripes (so the largest entry that fits
 * without eviction may be smaller). */
size_t multiloop_dict_free_space(multiloop_dict_t *d) {
  size_t total = 0;
  unsigned i;
  for (i = 0; i < d->nstripes; i++) {
    stripe *s = &d->stripes[i];
    uv_mutex_lock(&s->lock);
    total += s->cap - s->used;
    uv_mutex_unlock(&s->lock);
  }
  return total;
}

const char *multiloop_dict_name(const multiloop_dict_t *d) { return d->name; }
size_t multiloop_dict_capacity(const multiloop_dict_t *d) { return d->capacity; }
